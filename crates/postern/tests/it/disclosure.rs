//! What the server keeps is what `docs/server-disclosure.md` says, and no more.

use std::collections::BTreeSet;
use std::path::Path;

use base64::Engine;
use postern_proto::frame::{Body, ClaimPolicy, Request};
use postern_proto::ids::{ClaimToken, public_key};
use postern_test_support::{TestServer, ids};

use crate::{bin, envelope, new_log, new_mailbox};

fn doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/server-disclosure.md");
    std::fs::read_to_string(path).expect("docs/server-disclosure.md")
}

/// Every file under `dir`, recursively.
pub(crate) fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

pub(crate) fn encodings(bytes: &[u8]) -> Vec<Vec<u8>> {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        bytes.to_vec(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
        base64::engine::general_purpose::STANDARD.encode(bytes).into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes).into_bytes(),
    ]
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn stored_data_matches_the_disclosure_table_and_leaks_no_canary() {
    let mut server = TestServer::start(bin()).await;
    let mut c = server.connect().await;
    let (owner, mailbox) = new_mailbox(&mut c).await;
    let drop = ids::drop();
    c.request(Request::DropCreate { mailbox, drop }, Some(&owner)).await.unwrap();
    let token = ClaimToken(*b"CANARY-claim-token-0123456789abc");
    let create = Request::ClaimTokenCreate {
        mailbox,
        token_hash: token.hash(),
        policy: ClaimPolicy::Once,
        expires_day: u32::MAX,
    };
    c.request(create, Some(&owner)).await.unwrap();
    let upload = Request::KeyPackageUpload {
        mailbox,
        device: ids::device(),
        last_resort: true,
        packages: vec![b"encrypted key package".to_vec()],
    };
    c.request(upload, Some(&owner)).await.unwrap();
    c.request(Request::KeyPackageClaim { token: token.clone() }, None).await.unwrap();
    c.request(
        Request::Drop { drop, idem: ids::idem(), body: Body::Inline(b"sealed".to_vec()) },
        None,
    )
    .await
    .unwrap();
    let (key, log) = new_log(&mut c).await;
    let env = envelope(&log, &key, ids::idem(), None, b"opaque ciphertext");
    c.request(Request::LogAppend { log, body: Body::Inline(env) }, None).await.unwrap();
    std::mem::drop(c);
    assert!(server.terminate().await);

    // 1. Every column in the schema is in the document, and the document names no column
    //    that does not exist.
    let db = rusqlite::Connection::open(server.data_dir.join("postern.db")).unwrap();
    let schema: BTreeSet<String> = postern_store_sqlite::columns(&db)
        .unwrap()
        .into_iter()
        .map(|(t, c)| format!("{t}.{c}"))
        .collect();
    let doc = doc();
    let documented: BTreeSet<String> = doc
        .lines()
        .skip_while(|l| *l != "## Database columns")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .filter(|name| name.contains('.'))
        .map(str::to_owned)
        .collect();
    let undocumented: Vec<_> = schema.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "columns missing from docs/server-disclosure.md: {undocumented:?}"
    );
    let stale: Vec<_> = documented.difference(&schema).collect();
    assert!(
        stale.is_empty(),
        "docs/server-disclosure.md lists columns that do not exist: {stale:?}"
    );

    // 2. Canaries: secrets the server must never keep in clear, and ids the logs must never
    //    carry, in raw, hex, base64 and base64url forms, over the data directory and the log.
    let secret = std::fs::read(server.data_dir.join("access.secret")).unwrap();
    let never_anywhere: Vec<(&str, Vec<u8>)> = vec![("claim token", token.0.to_vec())];
    let never_in_logs: Vec<(&str, Vec<u8>)> = vec![
        ("mailbox id", mailbox.0.to_vec()),
        ("drop id", drop.0.to_vec()),
        ("log id", log.0.to_vec()),
        ("owner key", public_key(&owner).0.to_vec()),
        ("append key", public_key(&key).0.to_vec()),
        ("access secret", secret.clone()),
        ("client address", b"127.0.0.1".to_vec()),
    ];
    let log_text = std::fs::read(&server.log_path).unwrap();
    assert!(!log_text.is_empty(), "the server wrote a log");
    let mut scanned = vec![(server.log_path.clone(), log_text.clone())];
    for file in files(&server.data_dir) {
        scanned.push((file.clone(), std::fs::read(&file).unwrap()));
    }
    for (path, bytes) in &scanned {
        for (what, canary) in &never_anywhere {
            for form in encodings(canary) {
                assert!(!contains(bytes, &form), "{what} found in {}", path.display());
            }
        }
    }
    for (what, canary) in &never_in_logs {
        for form in encodings(canary).into_iter().filter(|f| f.len() >= 8) {
            assert!(!contains(&log_text, &form), "{what} found in the server log");
        }
    }
    // The secret lives only in its own file and the link file.
    for (path, bytes) in &scanned {
        let name = path.file_name().unwrap().to_string_lossy();
        if name == "access.secret" || name == "server-link.txt" {
            continue;
        }
        for form in encodings(&secret) {
            assert!(!contains(bytes, &form), "access secret found in {}", path.display());
        }
    }
}
