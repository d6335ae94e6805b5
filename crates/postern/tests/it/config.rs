//! The configuration file reaches the server: the operator's own certificate, quotas.

use postern_net::NetError;
use postern_proto::frame::{ErrorCode, Request};
use postern_proto::ids::public_key;
use postern_test_support::{TestServer, ids};

use crate::bin;

fn config_env(path: &std::path::Path) -> Vec<(String, String)> {
    vec![("POSTERN_CONFIG".to_owned(), path.display().to_string())]
}

#[tokio::test]
async fn operator_certificate_is_used_and_pinned() {
    // A key pair and certificate made by one server stand in for an operator's own.
    let first = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    for name in ["tls-cert.pem", "tls-key.pem"] {
        std::fs::copy(first.data_dir.join(name), dir.path().join(name)).unwrap();
    }
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\npublic_addrs = [\"127.0.0.1:9\"]\n",
            dir.path().join("tls-cert.pem").display(),
            dir.path().join("tls-key.pem").display()
        ),
    )
    .unwrap();
    let second = TestServer::start_with_env(bin(), config_env(&config)).await;
    assert_eq!(second.link.pins, first.link.pins, "pin of the operator's key");
    assert_eq!(second.link.addrs, vec!["127.0.0.1:9".to_owned()], "public_addrs from the file");
    assert!(!second.data_dir.join("tls-key.pem").exists(), "no self-signed pair made");
}

#[tokio::test]
async fn a_full_disk_refuses_new_data_with_server_full() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[quotas]\ndisk_bytes = 1\n").unwrap();
    let server = TestServer::start_with_env(bin(), config_env(&config)).await;
    let mut c = server.connect().await;
    let key = ids::signing_key();
    let create = Request::MailboxCreate { mailbox: ids::mailbox(), owner_key: public_key(&key) };
    match c.request(create, Some(&key)).await {
        Err(NetError::Refused(ErrorCode::ServerFull)) => {}
        other => panic!("expected server_full, got {other:?}"),
    }
    let metrics = server.admin_get("/metrics").await;
    assert!(metrics.contains("postern_storage_quota_bytes 1\n"), "{metrics}");
}
