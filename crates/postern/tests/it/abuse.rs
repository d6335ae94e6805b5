//! Abuse and overload: attackers on 127.0.1.x, honest clients on 127.0.2.x (each client
//! process leaves from its own address with the POSTERN_TEST_SOURCE_IP hook).

use std::path::Path;
use std::time::{Duration, Instant};

use postern_test_support::TestServer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bin;
use crate::chat::ok_with;

/// The server's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Runs a client command from `source`; returns its JSON lines.
fn honest(home: &Path, source: &str, args: &[&str]) -> Vec<Value> {
    ok_with(home, args, &[("POSTERN_TEST_SOURCE_IP", source)])
}

/// Bound on the server's memory growth while 5,000 connections hang in the TLS handshake.
const SLOW_BOUND_KIB: u64 = 160 * 1024;

#[tokio::test]
async fn five_thousand_slow_connections_do_not_stop_honest_clients() {
    let server = TestServer::start(bin()).await;
    let addr: std::net::SocketAddr = server.link.addrs[0].parse().unwrap();
    let before = rss_kib(server.pid());
    // Attackers: 5,000 connections from 50 addresses, each sending the first byte of a TLS
    // record and then nothing (slowloris at the handshake).
    let mut slow = Vec::new();
    for i in 0..5_000u32 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("127.0.1.{}:0", 1 + i % 50).parse().unwrap()).unwrap();
        let mut tcp = socket.connect(addr).await.unwrap();
        tcp.write_all(&[0x16]).await.unwrap();
        slow.push(tcp);
    }
    let during = rss_kib(server.pid());
    // Honest people make first contact and talk meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let link = server.link.to_link_string();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    honest(&alice, "127.0.2.1", &["init", "--name", "Alice", "--server", &link]);
    honest(&bob, "127.0.2.2", &["init", "--name", "Bob", "--server", &link]);
    let invite =
        honest(&alice, "127.0.2.1", &["invite", "--once"])[0]["link"].as_str().unwrap().to_owned();
    honest(&bob, "127.0.2.2", &["connect", &invite]);
    honest(&bob, "127.0.2.2", &["send", "Alice", "through the crowd"]);
    let got = honest(&alice, "127.0.2.1", &["sync"]);
    assert!(got.iter().any(|e| e["text"] == "through the crowd"), "{got:?}");
    let peak = rss_kib(server.pid()).max(during);
    eprintln!("server RSS {before} KiB before, {peak} KiB with 5,000 slow connections");
    assert!(peak - before < SLOW_BOUND_KIB, "grew {} KiB", peak - before);
    // The server drops each slow connection when its handshake time runs out (60 s from its
    // start, nginx's client_header_timeout).
    let deadline = Instant::now() + Duration::from_secs(80);
    for tcp in slow.iter_mut().step_by(250) {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(left, tcp.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a slow connection was kept open");
    }
}

/// A server whose drop addresses hold at most 1 MiB unread (the default is 16 MiB), so a
/// flood reaches the quota quickly.
async fn small_quota_server(dir: &Path) -> TestServer {
    let config = dir.join("server.toml");
    std::fs::write(&config, "[quotas]\ndrop_bytes = 1048576\n").unwrap();
    TestServer::start_with_env(
        bin(),
        vec![("POSTERN_CONFIG".to_owned(), config.display().to_string())],
    )
    .await
}

#[tokio::test]
async fn a_drop_flood_stops_at_its_address_quota_and_first_contact_still_works() {
    use postern_net::NetError;
    use postern_proto::frame::{Body, ErrorCode, Request};
    use postern_proto::ids::IdemKey;
    let dir = tempfile::tempdir().unwrap();
    let server = small_quota_server(dir.path()).await;
    let link = server.link.to_link_string();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    honest(&alice, "127.0.2.1", &["init", "--name", "Alice", "--server", &link]);
    honest(&bob, "127.0.2.2", &["init", "--name", "Bob", "--server", &link]);
    // Alice's long-lived address leaks; an attacker floods its drop address.
    let address = honest(&alice, "127.0.2.1", &["invite"])[0]["link"].as_str().unwrap().to_owned();
    let leaked = postern_proto::link::InviteLink::parse(&address).unwrap();
    let before = rss_kib(server.pid());
    let mut attacker = server.connect().await;
    let (mut accepted, mut refused) = (0, None);
    for i in 0..1_000u32 {
        let mut idem = [0u8; 16];
        idem[..4].copy_from_slice(&i.to_be_bytes());
        let flood = Request::Drop {
            drop: leaked.drop,
            idem: IdemKey(idem),
            body: Body::Inline(vec![0xab; 16_000]),
        };
        match attacker.request(flood, None).await {
            Ok(_) => accepted += 1,
            Err(NetError::Refused(code)) => {
                refused = Some(code);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, Some(ErrorCode::QuotaExceeded), "after {accepted} items");
    assert!(accepted <= 66, "{accepted} items of 16,000 bytes passed a 1 MiB quota");
    // Bob makes first contact through a one-time invite (its own drop address) and talks.
    let invite =
        honest(&alice, "127.0.2.1", &["invite", "--once"])[0]["link"].as_str().unwrap().to_owned();
    honest(&bob, "127.0.2.2", &["connect", &invite]);
    honest(&bob, "127.0.2.2", &["send", "Alice", "not drowned"]);
    let got = honest(&alice, "127.0.2.1", &["sync"]);
    assert!(got.iter().any(|e| e["text"] == "not drowned"), "{got:?}");
    let grown = rss_kib(server.pid()).saturating_sub(before);
    eprintln!("{accepted} flood items accepted, then quota_exceeded; server RSS grew {grown} KiB");
    assert!(grown < 64 * 1024, "grew {grown} KiB");
}

#[tokio::test]
async fn draining_key_packages_hits_the_daily_claim_limit_and_first_contact_still_works() {
    use postern_net::NetError;
    use postern_proto::frame::{ErrorCode, Request};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(bin()).await;
    let link = server.link.to_link_string();
    let (alice, dave) = (dir.path().join("alice"), dir.path().join("dave"));
    honest(&alice, "127.0.2.1", &["init", "--name", "Alice", "--server", &link]);
    honest(&dave, "127.0.2.4", &["init", "--name", "Dave", "--server", &link]);
    let address = honest(&alice, "127.0.2.1", &["invite"])[0]["link"].as_str().unwrap().to_owned();
    let leaked = postern_proto::link::InviteLink::parse(&address).unwrap();
    let mut attacker = server.connect().await;
    let mut claimed = 0;
    let refused = loop {
        match attacker.request(Request::KeyPackageClaim { token: leaked.token.clone() }, None).await
        {
            Ok(_) => claimed += 1,
            Err(NetError::Refused(code)) => break code,
            Err(e) => panic!("{e}"),
        }
        assert!(claimed <= 1_000, "no limit");
    };
    assert_eq!(refused, ErrorCode::RateLimited);
    assert_eq!(claimed, usize::from(postern_client::ADDRESS_CLAIMS_PER_DAY));
    // Dave still connects with a one-time invite (its own token), even with Alice's pool
    // drained: the last-resort key package answers.
    let invite =
        honest(&alice, "127.0.2.1", &["invite", "--once"])[0]["link"].as_str().unwrap().to_owned();
    honest(&dave, "127.0.2.4", &["connect", &invite]);
    honest(&dave, "127.0.2.4", &["send", "Alice", "still here"]);
    let got = honest(&alice, "127.0.2.1", &["sync"]);
    assert!(got.iter().any(|e| e["text"] == "still here"), "{got:?}");
    // Joined through the last-resort package, Alice updated her leaf at once (epoch 2).
    honest(&dave, "127.0.2.4", &["sync"]);
    let epoch = |home: &Path, chat: &str| {
        use postern_client::{Client, KeySource};
        Client::open(home, KeySource::KeyFile).unwrap().chat_epoch(chat).unwrap()
    };
    assert_eq!(epoch(&alice, "Dave").0, 2);
    assert_eq!(epoch(&alice, "Dave"), epoch(&dave, "Alice"));
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "max_connections_per_ip = 50\n").unwrap();
    let env = vec![("POSTERN_CONFIG".to_owned(), config.display().to_string())];
    let server = TestServer::start_with_env(bin(), env).await;
    let addr: std::net::SocketAddr = server.link.addrs[0].parse().unwrap();
    // 60 silent connections from one attacker address: the server keeps 50 (until their
    // handshake time runs out) and closes the rest at once.
    let conns = silent_connections(addr, "127.0.1.9", 60).await;
    let closed = closed_within_a_second(conns).await;
    assert_eq!(closed, 10, "the connections over the address's cap are closed, the rest kept");
    // Someone on another address is not affected.
    let home = dir.path().join("alice");
    let link = server.link.to_link_string();
    honest(&home, "127.0.2.1", &["init", "--name", "Alice", "--server", &link]);
    honest(&home, "127.0.2.1", &["sync"]);
}

#[tokio::test]
async fn one_address_cannot_open_connections_faster_than_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "new_connections_per_ip_per_second = 1\nnew_connection_burst_per_ip = 20\n\
         relay_addresses = [\"127.0.1.11\"]\n",
    )
    .unwrap();
    let env = vec![("POSTERN_CONFIG".to_owned(), config.display().to_string())];
    let server = TestServer::start_with_env(bin(), env).await;
    let addr: std::net::SocketAddr = server.link.addrs[0].parse().unwrap();
    // A relay's address is not held to it: it brings many people.
    let relay = silent_connections(addr, "127.0.1.11", 30).await;
    assert_eq!(closed_within_a_second(relay).await, 0, "a relay's connections are kept");
    // 30 connections opened at once from one address: the burst of 20 is let in, the rest
    // closed at once, less one for each second the opening took (the rate refills).
    let started = Instant::now();
    let conns = silent_connections(addr, "127.0.1.10", 30).await;
    let refilled = started.elapsed().as_secs() as usize + 1;
    let closed = closed_within_a_second(conns).await;
    assert!(
        (10usize.saturating_sub(refilled)..=10).contains(&closed),
        "{closed} of 30 closed; expected 10 (at most {refilled} refilled)"
    );
    // Someone on another address is not affected.
    let home = dir.path().join("alice");
    let link = server.link.to_link_string();
    honest(&home, "127.0.2.1", &["init", "--name", "Alice", "--server", &link]);
    // The limit is a rate, not a ban: after a pause the address connects again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let again = silent_connections(addr, "127.0.1.10", 1).await;
    assert_eq!(closed_within_a_second(again).await, 0, "admitted again after a pause");
}

/// Opens `n` TCP connections from `source` that send nothing.
async fn silent_connections(
    addr: std::net::SocketAddr,
    source: &str,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        conns.push(socket.connect(addr).await.unwrap());
    }
    conns
}

/// Watches connections at once for a second (well inside the server's 10 s handshake
/// time) and counts those the server closed.
async fn closed_within_a_second(conns: Vec<tokio::net::TcpStream>) -> usize {
    let mut watching = tokio::task::JoinSet::new();
    for mut tcp in conns {
        watching.spawn(async move {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await;
            matches!(read, Ok(Ok(0) | Err(_)))
        });
    }
    let mut closed = 0;
    while let Some(was_closed) = watching.join_next().await {
        closed += usize::from(was_closed.unwrap());
    }
    closed
}

#[tokio::test]
async fn a_connection_past_its_request_rate_is_refused_and_others_are_not() {
    use postern_proto::frame::{ErrorCode, Request, Response, ServerFrame};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "requests_per_second = 100\nrequest_burst = 100\n").unwrap();
    let env = vec![("POSTERN_CONFIG".to_owned(), config.display().to_string())];
    let server = TestServer::start_with_env(bin(), env).await;
    // 400 pings sent at once: the first 100 pass, then about 100 a second. The client reads
    // nothing until it has sent them all, so every answer must fit its receive window
    // (128 KiB, Firefox's), and the pings the server's 64 KiB one (nginx's) as it reads.
    // Windows that cannot take the flood would stall both sides for good: a deadline says so.
    let mut flood = server.connect().await;
    let flooding = async {
        for _ in 0..400 {
            flood.send(Request::Ping, None).await.unwrap();
        }
        // Refusals are answered at once, pongs as their work finishes: in any order.
        let (mut answered, mut limited) = (0, 0);
        for _ in 0..400 {
            match flood.recv().await.unwrap() {
                ServerFrame::Response { result: Ok(Response::Pong), .. } => answered += 1,
                ServerFrame::Response { result: Err(ErrorCode::RateLimited), .. } => limited += 1,
                other => panic!("{other:?}"),
            }
        }
        (answered, limited)
    };
    let (answered, limited) = tokio::time::timeout(Duration::from_secs(60), flooding)
        .await
        .expect("the flood and its answers stalled: the flow-control windows cannot hold them");
    eprintln!("{answered} answered, {limited} rate-limited");
    assert!(answered >= 100 && limited >= 200, "{answered} answered, {limited} limited");
    // Another connection has its own budget; and the flooding one recovers.
    let mut other = server.connect().await;
    assert_eq!(other.request(Request::Ping, None).await.unwrap(), Response::Pong);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(flood.request(Request::Ping, None).await.unwrap(), Response::Pong);
}

#[tokio::test]
async fn past_the_shared_buffer_budget_new_requests_wait_their_turn() {
    use postern_net::NetError;
    use postern_proto::frame::{ErrorCode, Request, Response};
    // A budget smaller than any request: every request that needs work is refused, and the
    // connection stays usable. The default (256 MiB) serves every other test.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "buffer_bytes = 1\n").unwrap();
    let env = vec![("POSTERN_CONFIG".to_owned(), config.display().to_string())];
    let server = TestServer::start_with_env(bin(), env).await;
    let mut c = server.connect().await;
    for _ in 0..3 {
        match c.request(Request::Ping, None).await {
            Err(NetError::Refused(ErrorCode::RateLimited)) => {}
            other => panic!("{other:?}"),
        }
    }
    let open = TestServer::start(bin()).await;
    assert_eq!(open.connect().await.request(Request::Ping, None).await.unwrap(), Response::Pong);
}
