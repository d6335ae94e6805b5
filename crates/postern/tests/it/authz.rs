//! The authorization matrix of `docs/authorization.md`: every server operation tried as each
//! party it can come from, against the real server. A refusal is `not_found` whether the
//! object is missing or the caller may not use it, so a stranger learns nothing.

use postern_net::{Connection, NetError};
use postern_proto::frame::{Body, ClaimPolicy, ClientFrame, ErrorCode, Request, Response};
use postern_proto::ids::{ClaimToken, MailboxId, TokenHash, public_key};
use postern_test_support::{TestServer, ids};

use crate::{bin, envelope, new_log, new_mailbox};

type Outcome = Result<Response, ErrorCode>;

fn outcome(result: Result<Response, NetError>) -> Outcome {
    match result {
        Ok(r) => Ok(r),
        Err(NetError::Refused(code)) => Err(code),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// Sends `request` signed by `key` over the nonce of connection `signed_for`, on `on`.
async fn signed_for(
    on: &mut Connection,
    signed_for: &Connection,
    request: Request,
    key: &ed25519_dalek::SigningKey,
) -> Outcome {
    // Request ids are per connection and never reused; keep these clear of `request`'s.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1_000_000);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut frame = ClientFrame { request_id: id, request, signature: None };
    frame.sign(key, signed_for.nonce());
    on.send_frame(&frame).await.unwrap();
    outcome(on.response(id).await)
}

/// The owner-signed operations, each built fresh against `mailbox` (objects they act on are
/// created first by the owner, so only the caller's standing decides).
async fn owner_requests(
    c: &mut Connection,
    key: &ed25519_dalek::SigningKey,
    mailbox: MailboxId,
) -> Vec<(&'static str, Request)> {
    let (drop, revoked) = (ids::drop(), ids::drop());
    for d in [drop, revoked] {
        c.request(Request::DropCreate { mailbox, drop: d }, Some(key)).await.unwrap();
    }
    c.request(Request::Drop { drop, idem: ids::idem(), body: Body::Inline(vec![1; 10]) }, None)
        .await
        .unwrap();
    // Token hashes are global: fresh random ones, so runs and roles never collide.
    let token = TokenHash(rand::random());
    let create_token = |token_hash| Request::ClaimTokenCreate {
        mailbox,
        token_hash,
        policy: ClaimPolicy::Once,
        expires_day: u32::MAX,
    };
    c.request(create_token(token), Some(key)).await.unwrap();
    vec![
        ("drop_create", Request::DropCreate { mailbox, drop: ids::drop() }),
        ("drop_revoke", Request::DropRevoke { mailbox, drop: revoked }),
        (
            "mailbox_fetch",
            Request::MailboxFetch { mailbox, after: 0, max_items: 8, max_bytes: u16::MAX },
        ),
        (
            "mailbox_read_part",
            Request::MailboxReadPart { mailbox, seq: 1, offset: 0, max_bytes: u16::MAX },
        ),
        ("mailbox_delete", Request::MailboxDelete { mailbox, through: 0 }),
        (
            "key_package_upload",
            Request::KeyPackageUpload {
                mailbox,
                device: ids::device(),
                last_resort: false,
                packages: vec![vec![5; 100]],
            },
        ),
        ("key_package_status", Request::KeyPackageStatus { mailbox }),
        ("claim_token_create", create_token(TokenHash(rand::random()))),
        ("claim_token_revoke", Request::ClaimTokenRevoke { mailbox, token_hash: token }),
    ]
}

#[tokio::test]
async fn owner_operations_answer_only_the_owner_on_the_owners_connection() {
    let server = TestServer::start(bin()).await;
    let mut other = server.connect().await;
    let stranger = ids::signing_key();
    for role in ["owner", "stranger", "unsigned", "replayed"] {
        // A fresh mailbox and connection per role, so one role's effects never decide another's.
        let mut c = server.connect().await;
        let (key, mailbox) = new_mailbox(&mut c).await;
        for (op, request) in owner_requests(&mut c, &key, mailbox).await {
            let got = match role {
                "owner" => outcome(c.request(request, Some(&key)).await),
                "stranger" => outcome(c.request(request, Some(&stranger)).await),
                "replayed" => signed_for(&mut other, &c, request, &key).await,
                _ => {
                    // Unsigned: a protocol violation that closes the connection.
                    let mut fresh = server.connect().await;
                    outcome(fresh.request(request, None).await)
                }
            };
            let expected = match role {
                "owner" => None,
                "unsigned" => Some(ErrorCode::BadFrame),
                _ => Some(ErrorCode::NotFound),
            };
            assert_eq!(got.err(), expected, "{op} as {role}");
        }
    }
    // Creating a mailbox is signed by the key it names. (A new connection: request ids only
    // go up, and the replays above used high ones on `other`.)
    let mut other = server.connect().await;
    let key = ids::signing_key();
    let create = |mailbox| Request::MailboxCreate { mailbox, owner_key: public_key(&key) };
    assert_eq!(
        outcome(other.request(create(ids::mailbox()), Some(&stranger)).await).err(),
        Some(ErrorCode::NotFound)
    );
    assert!(outcome(other.request(create(ids::mailbox()), Some(&key)).await).is_ok());
}

#[tokio::test]
async fn capabilities_open_what_they_name_and_nothing_else() {
    let server = TestServer::start(bin()).await;
    let mut owner = server.connect().await;
    let mut holder = server.connect().await;
    let (key, mailbox) = new_mailbox(&mut owner).await;
    let drop = ids::drop();
    owner.request(Request::DropCreate { mailbox, drop }, Some(&key)).await.unwrap();
    let device = ids::device();
    let upload = Request::KeyPackageUpload {
        mailbox,
        device,
        last_resort: false,
        packages: vec![vec![1; 50], vec![2; 50]],
    };
    owner.request(upload, Some(&key)).await.unwrap();
    let token = ClaimToken([0x42; 32]);
    let create = Request::ClaimTokenCreate {
        mailbox,
        token_hash: token.hash(),
        policy: ClaimPolicy::Daily(5),
        expires_day: u32::MAX,
    };
    owner.request(create, Some(&key)).await.unwrap();
    let (log_key, log) = new_log(&mut owner).await;
    owner
        .request(
            Request::LogAppend {
                log,
                body: Body::Inline(envelope(&log, &log_key, ids::idem(), None, b"x")),
            },
            None,
        )
        .await
        .unwrap();

    let item = |drop| Request::Drop { drop, idem: ids::idem(), body: Body::Inline(vec![3; 20]) };
    let cells: Vec<(&str, Request, bool)> = vec![
        ("drop, holder", item(drop), true),
        ("drop, stranger", item(ids::drop()), false),
        ("key_package_claim, holder", Request::KeyPackageClaim { token: token.clone() }, true),
        (
            "key_package_claim, stranger",
            Request::KeyPackageClaim { token: ClaimToken([0x43; 32]) },
            false,
        ),
        (
            "log_read, holder",
            Request::LogRead { log, after: 0, max_items: 8, max_bytes: u16::MAX },
            true,
        ),
        (
            "log_read, stranger",
            Request::LogRead { log: ids::log(), after: 0, max_items: 8, max_bytes: u16::MAX },
            false,
        ),
        (
            "log_read_part, holder",
            Request::LogReadPart { log, seq: 1, offset: 0, max_bytes: u16::MAX },
            true,
        ),
        (
            "log_read_part, stranger",
            Request::LogReadPart { log: ids::log(), seq: 1, offset: 0, max_bytes: u16::MAX },
            false,
        ),
        ("subscribe, holder", Request::Subscribe { log, after: 0, max_bytes: u16::MAX }, true),
        (
            "subscribe, stranger",
            Request::Subscribe { log: ids::log(), after: 0, max_bytes: u16::MAX },
            false,
        ),
        (
            "upload_chunk, anyone",
            Request::UploadChunk {
                upload: ids::upload(),
                total_len: 10,
                offset: 0,
                bytes: vec![0; 10],
            },
            true,
        ),
        ("ping, anyone", Request::Ping, true),
    ];
    for (cell, request, allowed) in cells {
        let got = outcome(holder.request(request, None).await);
        if allowed {
            assert!(got.is_ok(), "{cell}: {got:?}");
        } else {
            assert_eq!(got.err(), Some(ErrorCode::NotFound), "{cell}");
        }
    }
    // A revoked drop address is gone for everyone who held it.
    owner.request(Request::DropRevoke { mailbox, drop }, Some(&key)).await.unwrap();
    assert_eq!(outcome(holder.request(item(drop), None).await).err(), Some(ErrorCode::NotFound));
    // Creating a log: signed by the key it names; a taken id with another key conflicts.
    let k = ids::signing_key();
    let fresh = ids::log();
    let create =
        |log, key: &ed25519_dalek::SigningKey| Request::LogCreate { log, key: public_key(key) };
    assert_eq!(
        outcome(holder.request(create(fresh, &k), Some(&ids::signing_key())).await).err(),
        Some(ErrorCode::NotFound)
    );
    assert!(outcome(holder.request(create(fresh, &k), Some(&k)).await).is_ok());
    let other = ids::signing_key();
    assert_eq!(
        outcome(holder.request(create(fresh, &other), Some(&other)).await).err(),
        Some(ErrorCode::Conflict)
    );
}

#[tokio::test]
async fn appends_need_a_live_key_of_this_log() {
    let mut server = TestServer::start(bin()).await;
    let mut c = server.connect().await;
    let append = |log, key: &ed25519_dalek::SigningKey, next| Request::LogAppend {
        log,
        body: Body::Inline(envelope(&log, key, ids::idem(), next, b"entry")),
    };
    // Day 0: a log with its first key, and a commit registering the next epoch's key.
    let (first, log) = new_log(&mut c).await;
    let next = ids::signing_key();
    c.request(append(log, &first, Some(public_key(&next))), None).await.unwrap();
    // A member removed at a rotation keeps the old log's key; the new log refuses it.
    let (_, rotated) = new_log(&mut c).await;
    assert_eq!(
        outcome(c.request(append(rotated, &first, None), None).await).err(),
        Some(ErrorCode::NotFound),
        "removed member"
    );
    assert_eq!(
        outcome(c.request(append(log, &ids::signing_key(), None), None).await).err(),
        Some(ErrorCode::NotFound),
        "stranger"
    );
    assert!(outcome(c.request(append(log, &next, None), None).await).is_ok(), "member");
    drop(c);
    // Day 100 the next key is used again; day 185 the first key, unused since day 0, has
    // expired (180 days) while the log lives on.
    for (day, use_next) in [(100, true), (185, false)] {
        assert!(server.terminate().await);
        server.set_env("POSTERN_TEST_DAYS_AHEAD", &day.to_string());
        server.restart().await;
        let mut c = server.connect().await;
        if use_next {
            assert!(outcome(c.request(append(log, &next, None), None).await).is_ok());
        } else {
            // The sweep runs at start; give it a moment to have run.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let got = outcome(c.request(append(log, &first, None), None).await);
                if got.as_ref().err() == Some(&ErrorCode::NotFound) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the expired key still appends: {got:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            assert!(
                outcome(c.request(append(log, &next, None), None).await).is_ok(),
                "the live key"
            );
        }
    }
}

#[tokio::test]
async fn log_auth_proves_a_key_for_its_connection_only() {
    let server = TestServer::start(bin()).await;
    let mut holder = server.connect().await;
    let mut other = server.connect().await;
    let (key, log) = new_log(&mut holder).await;
    let auth = |key: &ed25519_dalek::SigningKey| Request::LogAuth { log, key: public_key(key) };
    // An envelope whose signature no longer matches (a byte of its ciphertext flipped).
    let mut broken = envelope(&log, &key, ids::idem(), None, b"entry");
    broken[30] ^= 1;
    let append = |bytes: Vec<u8>| Request::LogAppend { log, body: Body::Inline(bytes) };

    // A stranger's key, a signature over another connection's nonce: refused.
    let stranger = ids::signing_key();
    assert_eq!(
        outcome(holder.request(auth(&stranger), Some(&stranger)).await),
        Err(ErrorCode::NotFound)
    );
    assert_eq!(
        signed_for(&mut other, &holder, auth(&key), &key).await,
        Err(ErrorCode::NotFound),
        "a log_auth signature is bound to its connection's nonce"
    );
    // Before log_auth, every envelope's signature is checked.
    assert_eq!(
        outcome(holder.request(append(broken.clone()), None).await),
        Err(ErrorCode::NotFound)
    );
    // After it, appends under that key on that connection are taken unchecked (members
    // check envelope signatures themselves and skip this one) ...
    assert_eq!(outcome(holder.request(auth(&key), Some(&key)).await), Ok(Response::Ok));
    assert!(matches!(
        outcome(holder.request(append(broken.clone()), None).await),
        Ok(Response::Seq(_))
    ));
    // ... but not on another connection, and not under another key.
    let mut again = broken.clone();
    again[30] ^= 2;
    let mut third = server.connect().await;
    assert_eq!(outcome(third.request(append(again), None).await), Err(ErrorCode::NotFound));
    let unregistered = envelope(&log, &stranger, ids::idem(), None, b"entry");
    assert_eq!(outcome(holder.request(append(unregistered), None).await), Err(ErrorCode::NotFound));
}
