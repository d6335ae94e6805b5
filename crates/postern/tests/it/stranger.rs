//! Without the access secret, the server is an ordinary small website: random bytes,
//! replayed tokens and wrong secrets all get the website's own answers.

use postern_net::{Connection, NetError, gate_token};
use postern_proto::gate::AccessSecret;
use postern_test_support::{TestServer, upgrade_request, without_date};

use crate::bin;

fn assert_no_postern(response: &str) {
    assert!(!response.to_ascii_lowercase().contains("postern"), "Postern visible: {response}");
}

#[tokio::test]
async fn strangers_see_only_the_website() {
    let server = TestServer::start(bin()).await;
    let plain =
        server.raw_https(b"GET / HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n").await;
    let plain = without_date(&plain);
    assert!(plain.starts_with("HTTP/1.1 200 OK"), "{plain}");
    assert!(plain.contains("Birch &amp; Kiln"));
    assert_no_postern(&plain);

    // Upgrades without a valid token: no cookie, garbage, wrong secret, a replayed token.
    let mut wrong = server.link.clone();
    wrong.secret = AccessSecret([0x55; 32]);
    let replayed = gate_token(&server.link);
    let conn = Connection::connect_with_token(&server.link, &replayed).await;
    assert!(conn.is_ok_and(|c| c.over_http2()), "a fresh token opens the gate once, over HTTP/2");
    for cookie in
        [None, Some("garbage".to_owned()), Some(gate_token(&wrong)), Some(replayed.clone())]
    {
        let answer = without_date(
            &server
                .raw_https(&upgrade_request(cookie.as_ref().map(|c| format!("sid={c}")).as_deref()))
                .await,
        );
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{cookie:?}: {answer}");
        assert!(!answer.contains("101"), "no upgrade for {cookie:?}");
        assert_no_postern(&answer);
        // The page is the same page a plain visit gets.
        let body = |s: &str| s.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        assert_eq!(body(&answer), body(&plain));
    }
    match Connection::connect_with_token(&server.link, &replayed).await {
        Err(NetError::Connect(_)) => {}
        other => panic!("a replayed token must not open the gate: {other:?}"),
    }

    // Postern-looking paths and the admin paths are not on the public listener.
    for path in ["/health", "/metrics", "/postern", "/ws"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n");
        let answer = without_date(&server.raw_https(req.as_bytes()).await);
        assert!(answer.starts_with("HTTP/1.1 404 Not Found"), "{path}: {answer}");
        assert_no_postern(&answer);
    }
    let post = without_date(
        &server
            .raw_https(
                b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await,
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");

    // Random bytes inside TLS get the HTTP server's plain refusal.
    let noise: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
    let answer = without_date(&server.raw_https(&noise).await);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_no_postern(&answer);

    // Health and metrics are on the admin listener.
    let health = server.admin_get("/health").await;
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");
    let metrics = server.admin_get("/metrics").await;
    assert!(metrics.contains("postern_website_responses_total"), "{metrics}");
}

#[tokio::test]
async fn a_wrong_pin_or_static_key_never_reaches_a_session() {
    let server = TestServer::start(bin()).await;
    let mut wrong_pin = server.link.clone();
    wrong_pin.pins = vec![[0; 32]];
    assert!(matches!(Connection::connect(&wrong_pin).await, Err(NetError::Connect(_))));
    let mut wrong_key = server.link.clone();
    wrong_key.static_key = [9; 32];
    // The gate opens (the secret is right) but the handshake is not for this server's key:
    // the server closes without a word.
    assert!(matches!(Connection::connect(&wrong_key).await, Err(NetError::Session(_))));
}
