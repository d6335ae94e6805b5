//! The client commands, run as a user would: the real binary with a temporary home.

use std::path::Path;
use std::process::Output;

use postern_proto::frame::{Request, Response};
use postern_test_support::TestServer;

use crate::bin;

fn postern(home: &Path, args: &[&str], passphrase: Option<&str>) -> Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("--home").arg(home).args(args).env_remove("POSTERN_PASSPHRASE");
    if let Some(p) = passphrase {
        cmd.env("POSTERN_PASSPHRASE", p);
    }
    cmd.output().expect("run postern")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[tokio::test]
async fn init_whoami_and_fingerprint() {
    let server = TestServer::start(bin()).await;
    let link = server.link.to_link_string();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("alice");

    let created =
        json(&postern(&home, &["--json", "init", "--name", "Alice", "--server", &link], None));
    assert_eq!(created["name"], "Alice");
    // `--json` is accepted after the subcommand too.
    let who = json(&postern(&home, &["whoami", "--json"], None));
    assert_eq!(who["name"], "Alice");
    assert_eq!(who["fingerprint"], created["fingerprint"]);
    assert_eq!(who["server"][0], server.link.addrs[0].as_str());
    let fp = postern(&home, &["fingerprint"], None);
    assert_eq!(
        String::from_utf8_lossy(&fp.stdout).trim(),
        created["fingerprint"].as_str().unwrap()
    );

    // `init` published the mailbox and this device's key packages.
    let mailbox = postern_client::Client::open(&home, postern_client::KeySource::KeyFile)
        .unwrap()
        .mailbox()
        .unwrap();
    let mut conn = server.connect().await;
    let status = conn
        .request(Request::KeyPackageStatus { mailbox: mailbox.mailbox }, Some(&mailbox.owner))
        .await
        .unwrap();
    let Response::KeyPackageStatus(devices) = status else { panic!("status expected") };
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].remaining as usize, postern_client::KEY_PACKAGES_PER_UPLOAD);
    assert!(devices[0].last_resort);
    assert_eq!(
        json(&postern(&home, &["--json", "sync"], None))["published"],
        false,
        "nothing left to send"
    );

    let again = postern(&home, &["init", "--name", "Alice", "--server", &link], None);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a Postern client"));
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("bob");
    let out =
        postern(&home, &["init", "--name", "Bob", "--server", "postern://server#v=1&a=nope"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid server link"), "{err}");
    assert!(!home.exists(), "nothing written");

    let out = postern(&home, &["whoami"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `postern init` first"));
}

#[tokio::test]
async fn a_passphrase_home_needs_its_passphrase() {
    let server = TestServer::start(bin()).await;
    let link = server.link.to_link_string();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("carol");
    json(&postern(
        &home,
        &["--json", "init", "--name", "Carol", "--server", &link],
        Some("canary pass"),
    ));
    let out = postern(&home, &["whoami"], Some("wrong"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line, no library noise: {err}");
    let out = postern(&home, &["whoami"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("set POSTERN_PASSPHRASE"));
    assert_eq!(json(&postern(&home, &["--json", "whoami"], Some("canary pass")))["name"], "Carol");
}

#[tokio::test]
async fn an_unreachable_server_is_named_and_the_identity_kept() {
    let mut server = TestServer::start(bin()).await;
    let link = server.link.to_link_string();
    let addr = server.link.addrs[0].clone();
    assert!(server.terminate().await);
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dave");
    let out = postern(&home, &["init", "--name", "Dave", "--server", &link], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot reach the server at {addr}")), "{err}");
    assert!(err.contains("postern sync"), "{err}");
    // The identity exists; publishing waits for `sync`.
    assert_eq!(json(&postern(&home, &["--json", "whoami"], None))["name"], "Dave");
    let out = postern(&home, &["sync"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
}

#[tokio::test]
async fn invites_register_a_drop_address_and_a_claim_token() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("erin");
    let created = json(&postern(
        &home,
        &["--json", "init", "--name", "Erin", "--server", &server.link.to_link_string()],
        None,
    ));
    let once = json(&postern(&home, &["--json", "invite", "--once"], None));
    assert_eq!(once["kind"], "once");
    let link = postern_proto::link::InviteLink::parse(once["link"].as_str().unwrap()).unwrap();
    assert_eq!(link.kind, postern_proto::link::InviteKind::Once);
    assert_eq!(link.server, server.link);
    assert_eq!(
        postern_client::fingerprint(&link.identity),
        created["fingerprint"].as_str().unwrap()
    );

    // Whoever holds the invite claims one key package per device, once, and can read it.
    let mut stranger = server.connect().await;
    let claim = Request::KeyPackageClaim { token: link.token.clone() };
    let Response::KeyPackages(packages) = stranger.request(claim.clone(), None).await.unwrap()
    else {
        panic!("key packages expected")
    };
    assert_eq!(packages.len(), 1);
    postern_client::envelope::open_key_package(&link.kp_key, &packages[0])
        .expect("the invite's key opens it");
    assert!(stranger.request(claim, None).await.is_err(), "a one-time token is used up");
    // The drop address takes sealed items.
    let drop = Request::Drop {
        drop: link.drop,
        idem: postern_test_support::ids::idem(),
        body: postern_proto::frame::Body::Inline(b"sealed".to_vec()),
    };
    assert!(matches!(stranger.request(drop, None).await.unwrap(), Response::Seq(_)));

    // An address allows several claims.
    let address = json(&postern(&home, &["--json", "invite"], None));
    let link = postern_proto::link::InviteLink::parse(address["link"].as_str().unwrap()).unwrap();
    for _ in 0..2 {
        let claim = Request::KeyPackageClaim { token: link.token.clone() };
        assert!(matches!(stranger.request(claim, None).await.unwrap(), Response::KeyPackages(_)));
    }
}

#[tokio::test]
async fn postern_home_is_read_from_the_environment_and_an_empty_one_is_unset() {
    let server = TestServer::start(bin()).await;
    let link = server.link.to_link_string();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("frank");
    let run = |env: &[(&str, &std::ffi::OsStr)], args: &[&str]| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(args)
            .env_remove("POSTERN_PASSPHRASE")
            .env("XDG_DATA_HOME", dir.path().join("xdg"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(
        &[("POSTERN_HOME", home.as_os_str())],
        &["--json", "init", "--name", "Frank", "--server", &link],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(home.join("client.db").exists(), "POSTERN_HOME chose the home");
    // --home wins over the variable; an empty variable is as if unset (the default home).
    let out = run(
        &[("POSTERN_HOME", "".as_ref())],
        &["--home", home.to_str().unwrap(), "--json", "whoami"],
    );
    assert_eq!(json(&out)["name"], "Frank");
    let out = run(&[("POSTERN_HOME", "".as_ref())], &["whoami"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("a value is required"), "{err}");
    assert!(err.contains("xdg"), "the default home under XDG_DATA_HOME is named: {err}");
}
