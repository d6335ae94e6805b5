//! Relays: people reach a server they cannot reach directly through a relay, or a chain of
//! two; to everyone without a credential a relay is the same small website a server is.

use std::path::Path;

use postern_net::{Connection, relay_cookie};
use postern_proto::gate::AccessSecret;
use postern_proto::link::RelayLink;
use postern_proto::relay::Credential;
use postern_test_support::{TestRelay, TestServer, upgrade_request as upgrade, without_date};

use crate::bin;
use crate::chat::{ok, ok_with, texts};

/// A server whose link names an address nobody listens on, as if the censor blocked it.
async fn unreachable_server(dir: &Path) -> TestServer {
    let config = dir.join("server.toml");
    std::fs::write(&config, "public_addrs = [\"127.0.0.1:1\"]\n").unwrap();
    let env = vec![("POSTERN_CONFIG".to_owned(), config.display().to_string())];
    TestServer::start_with_env(bin(), env).await
}

fn servers(server: &TestServer) -> String {
    format!("servers = [\"{}\"]", server.bound_link().to_link_string())
}

#[tokio::test]
async fn people_talk_through_a_relay_and_a_chain_when_the_server_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let server = unreachable_server(dir.path()).await;
    assert_eq!(server.link.addrs, ["127.0.0.1:1"]);
    let exit = TestRelay::start(bin(), &servers(&server)).await;
    let (for_ingress, _) = exit.mint();
    let ingress =
        TestRelay::start(bin(), &format!("via = \"{}\"", for_ingress.to_link_string())).await;

    let server_link = server.link.to_link_string();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    // Alice's traffic leaves from an address of her own, which no relay may log.
    let from_alice = [("POSTERN_TEST_SOURCE_IP", "127.0.0.77"), ("POSTERN_LOG", "trace")];
    let exit_link = exit.link.to_link_string();
    let init = ["init", "--name", "Alice", "--server", &server_link, "--relay", &exit_link];
    ok_with(&alice, &init, &from_alice);
    assert_eq!(ok(&alice, &["relays", "add", &exit_link])[0]["new"], false);
    assert_eq!(ok(&alice, &["relays", "list"]).len(), 1);
    // Bob first has no relay: he cannot reach the server, and the error names the door.
    let out = crate::chat::run(&bob, &["init", "--name", "Bob", "--server", &server_link]);
    let err = crate::chat::stderr(&out);
    assert!(!out.status.success() && err.contains("direct: connection failed"), "{err}");
    let added = ok(&bob, &["relays", "add", &ingress.link.to_link_string()]);
    assert_eq!(added[0]["new"], true);
    ok(&bob, &["sync"]);

    // Alice's status: the direct door fails (nobody listens there), her relay works.
    let status = &ok(&alice, &["status"])[0];
    let doors = status["doors"].as_array().unwrap();
    assert_eq!(doors.len(), 2, "{status}");
    let direct = doors.iter().find(|d| d["door"] == "direct").unwrap();
    let relay = doors.iter().find(|d| d["relay"].is_i64()).unwrap();
    assert_eq!(direct["ok"], false, "{status}");
    assert!(direct["error"].as_str().unwrap().contains("refused"), "{status}");
    assert_eq!((relay["ok"].as_bool(), relay["last_used"].as_bool()), (Some(true), Some(true)));
    assert_eq!(status["whitelist_mode"], false);
    assert_eq!(status["queued"]["messages"], 0);

    // Alice goes through the exit relay, Bob through the ingress relay and then the exit.
    let link =
        ok_with(&alice, &["invite", "--once"], &from_alice)[0]["link"].as_str().unwrap().to_owned();
    let joined = ok(&bob, &["connect", &link]);
    assert_eq!(joined[0]["event"], "connected");
    ok(&bob, &["send", "Alice", "through two relays"]);
    ok_with(&alice, &["sync"], &from_alice);
    ok_with(&alice, &["send", "Bob", "through one"], &from_alice);
    assert_eq!(texts(&bob, "Alice"), ["through two relays", "through one"]);

    // Carol has nothing but Alice's invite: the relay in it (with a credential of its own)
    // gets her in.
    let carol = dir.path().join("carol");
    let out = crate::chat::run(&carol, &["init", "--name", "Carol", "--server", &server_link]);
    assert!(!out.status.success());
    let link =
        ok_with(&alice, &["invite", "--once"], &from_alice)[0]["link"].as_str().unwrap().to_owned();
    let invite = postern_proto::link::InviteLink::parse(&link).unwrap();
    assert_eq!(invite.relays.len(), 1);
    assert_eq!(invite.relays[0].addrs, exit.link.addrs);
    assert_ne!(invite.relays[0].credential, exit.link.credential, "a child credential");
    assert_eq!(ok(&carol, &["connect", &link])[0]["event"], "connected");
    ok(&carol, &["send", "Alice", "from an invite alone"]);
    assert_eq!(texts(&alice, "Carol"), ["from an invite alone"]);
    // Bob passes his relay on to someone, again with a credential of its own.
    let shared = ok(&bob, &["relays", "share", "1"])[0]["link"].as_str().unwrap().to_owned();
    let shared = RelayLink::parse(&shared).unwrap();
    assert_eq!(shared.credential.path.len(), 2);
    assert_eq!(shared.credential.path[0], ingress.link.credential.path[0]);
    Connection::connect_via(&shared, &server.link).await.unwrap();

    for relay in [&exit, &ingress] {
        let log = relay.log();
        assert!(!log.contains("127.0.0.77"), "a relay logged a client address: {log}");
    }

    // Bob also holds the relay from Alice's invite; without his relays, his message waits
    // in the queue.
    let relays = ok(&bob, &["relays", "list"]);
    assert_eq!(relays.len(), 2);
    for relay in relays {
        ok(&bob, &["relays", "remove", &relay["id"].to_string()]);
    }
    assert!(ok(&bob, &["relays", "list"]).is_empty());
    let out = crate::chat::run(&bob, &["send", "Alice", "queued"]);
    assert!(!out.status.success());
    let status = &ok(&bob, &["status"])[0];
    assert_eq!(status["queued"]["messages"], 1, "{status}");
    assert_eq!(status["whitelist_mode"], false, "refused is not whitelist mode");
}

#[tokio::test]
async fn a_relay_is_the_website_to_whoever_lacks_a_good_credential() {
    let server = TestServer::start(bin()).await;
    let mut relay = TestRelay::start(bin(), &servers(&server)).await;
    let get = b"GET / HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n";
    let site = without_date(&relay.raw_https(get).await);
    assert!(site.starts_with("HTTP/1.1 200 OK"), "{site}");
    assert_eq!(site, without_date(&server.raw_https(get).await), "the server's own website");
    let website = without_date(&relay.raw_https(&upgrade(None)).await);

    let (minted, minted_id) = relay.mint();
    let good = relay_cookie(&minted, &server.link, None);
    // Knowing a credential's id is not knowing its secret.
    let forged = RelayLink {
        credential: Credential {
            path: minted.credential.path.clone(),
            secret: AccessSecret([0x55; 32]),
        },
        ..minted.clone()
    };
    // A server this relay does not serve.
    let mut elsewhere = server.link.clone();
    elsewhere.pins = vec![[9; 32]];
    for cookie in [
        "sid=garbage; ref=x; tok=y".to_owned(),
        relay_cookie(&forged, &server.link, None),
        relay_cookie(&minted, &elsewhere, None),
        // The server's own gate token is no relay token.
        format!("sid={}", postern_net::gate_token(&server.link)),
    ] {
        let answer = without_date(&relay.raw_https(&upgrade(Some(&cookie))).await);
        assert_eq!(answer, website, "cookie {cookie}");
    }
    // A good token opens the gate once; replayed, it is the website.
    let opened = without_date(&relay.raw_https(&upgrade(Some(&good))).await);
    assert!(opened.starts_with("HTTP/1.1 101"), "{opened}");
    assert_eq!(without_date(&relay.raw_https(&upgrade(Some(&good))).await), website);

    // A credential derived from the minted one works until the minted one is revoked;
    // the operator's own link keeps working.
    let child = minted.child([7; 8]).unwrap();
    let mut conn = Connection::connect_via(&child, &server.link).await.unwrap();
    conn.request(postern_proto::frame::Request::Ping, None).await.unwrap();
    relay.restart_with(&format!("{}\nrevoked = [\"{minted_id}\"]", servers(&server))).await;
    for revoked in [&minted, &child] {
        let cookie = relay_cookie(revoked, &server.link, None);
        assert_eq!(without_date(&relay.raw_https(&upgrade(Some(&cookie))).await), website);
    }
    let mut conn = Connection::connect_via(&relay.link, &server.link).await.unwrap();
    assert!(conn.over_http2(), "the client's hop to the relay is HTTP/2, as a browser's");
    conn.request(postern_proto::frame::Request::Ping, None).await.unwrap();
}
