//! Groups end to end: real servers and real `postern` clients, each with its own home.

use std::path::{Path, PathBuf};

use postern_client::{Client, KeySource};
use postern_proto::frame::{Body, ErrorCode, Request};
use postern_proto::ids::IdemKey;
use postern_test_support::TestServer;

use crate::bin;
use crate::chat::{Listener, connect, init, kill_at, ok, ok_with, run, stderr, texts};

/// `(epoch, epoch-authenticator tag)` of a home's view of a group.
fn epoch(home: &Path, chat: &str) -> (u64, [u8; 8]) {
    Client::open(home, KeySource::KeyFile).unwrap().chat_epoch(chat).unwrap()
}

/// Alice and her contacts, every pair's cards exchanged.
pub(crate) fn people(dir: &Path, server: &TestServer, names: &[&str]) -> Vec<PathBuf> {
    let homes: Vec<PathBuf> = names.iter().map(|n| init(dir, n, server)).collect();
    for other in &homes[1..] {
        connect(&homes[0], other);
    }
    for home in homes.iter().chain(&homes[..1]) {
        ok(home, &["sync"]);
    }
    homes
}

fn group_id(home: &Path, name: &str) -> String {
    ok(home, &["chats"])
        .into_iter()
        .find(|c| c["name"] == name && c["group"] == true)
        .and_then(|c| c["chat"].as_str().map(str::to_owned))
        .expect("the group is listed")
}

#[tokio::test]
async fn a_group_adds_removes_and_leaves_and_a_removed_member_reads_nothing_new() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let homes = people(dir.path(), &server, &["Alice", "Bob", "Carol", "Dave"]);
    let [alice, bob, carol, dave] = &homes[..] else { unreachable!() };

    let created = ok(alice, &["group", "create", "CANARY-group-name", "Bob", "Carol"]);
    assert_eq!(created[0]["event"], "group_created");
    for home in [bob, carol] {
        assert_eq!(ok(home, &["sync"])[0]["contact"], "CANARY-group-name");
    }
    ok(bob, &["send", "CANARY-group-name", "hello group"]);
    ok(carol, &["send", "CANARY-group-name", "hello from Carol"]);
    // Names: a contact by our name for them, a member who is not a contact by theirs.
    let seen: Vec<String> = ok(carol, &["read", "CANARY-group-name"])
        .iter()
        .map(|m| format!("{}: {}", m["from"].as_str().unwrap(), m["text"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, ["Bob (not a contact): hello group", "Carol: hello from Carol"]);
    let members = ok(alice, &["group", "members", "CANARY-group-name"]);
    let names: Vec<&str> = members.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Alice", "Bob", "Carol"]);
    assert_eq!(members[0]["admin"], true);
    // Only the admin adds and removes.
    let out = run(bob, &["group", "remove", "CANARY-group-name", "Carol"]);
    assert!(stderr(&out).contains("not") || !out.status.success(), "{}", stderr(&out));

    // Add Dave: he reads from his arrival on.
    assert_eq!(ok(alice, &["group", "add", "CANARY-group-name", "Dave"])[0]["event"], "added");
    assert_eq!(ok(dave, &["sync"])[0]["contact"], "CANARY-group-name");
    ok(dave, &["send", "CANARY-group-name", "Dave here"]);
    assert_eq!(texts(dave, "CANARY-group-name"), ["Dave here"]);

    // Remove Carol: the log rotates; she learns neither the new log nor what follows.
    ok(carol, &["sync"]);
    let carol_log =
        Client::open(carol, KeySource::KeyFile).unwrap().chat_keys("CANARY-group-name").unwrap();
    assert_eq!(
        ok(alice, &["group", "remove", "CANARY-group-name", "Carol"])[0]["event"],
        "removed"
    );
    ok(bob, &["send", "CANARY-group-name", "CANARY-after Carol"]);
    let carol_view = run(carol, &["--json", "read", "CANARY-group-name"]);
    assert!(!String::from_utf8_lossy(&carol_view.stdout).contains("CANARY-after Carol"));
    assert_eq!(ok(carol, &["chats"])[1]["member"], false);
    let (new_log, _) =
        Client::open(alice, KeySource::KeyFile).unwrap().chat_keys("CANARY-group-name").unwrap();
    assert_ne!(carol_log.0, new_log, "the log id rotated");
    // Carol, running on with her last keys, and a stranger cannot append to the new log.
    let mut conn = server.connect().await;
    let (old_log, carol_keys) = carol_log;
    let forged =
        postern_client::envelope::seal(&carol_keys, &new_log, IdemKey([7; 16]), None, b"x")
            .unwrap();
    let refused =
        conn.request(Request::LogAppend { log: new_log, body: Body::Inline(forged) }, None).await;
    assert!(matches!(refused, Err(postern_net::NetError::Refused(ErrorCode::NotFound))));
    // A stranger who knows the old log id cannot append to it either.
    let stranger_key = postern_test_support::ids::signing_key();
    let junk = crate::envelope(&old_log, &stranger_key, IdemKey([8; 16]), None, b"junk");
    let refused =
        conn.request(Request::LogAppend { log: old_log, body: Body::Inline(junk) }, None).await;
    assert!(matches!(refused, Err(postern_net::NetError::Refused(ErrorCode::NotFound))));

    // Bob leaves while everyone else is offline; the next member online commits it.
    assert_eq!(ok(bob, &["group", "leave", "CANARY-group-name"])[0]["event"], "leaving");
    ok(dave, &["sync"]);
    ok(alice, &["sync"]);
    ok(bob, &["sync"]);
    let names: Vec<String> = ok(alice, &["group", "members", "CANARY-group-name"])
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["Alice", "Dave"]);
    let out = run(bob, &["send", "CANARY-group-name", "still here?"]);
    assert!(!out.status.success());
    ok(alice, &["send", "CANARY-group-name", "just us"]);
    ok(dave, &["sync"]);
    assert_eq!(epoch(alice, "CANARY-group-name"), epoch(dave, "CANARY-group-name"));
    assert_eq!(
        texts(dave, "CANARY-group-name"),
        ["Dave here", "CANARY-after Carol", "just us"],
        "in log order, across the rotations"
    );
    assert_eq!(
        texts(alice, "CANARY-group-name"),
        ["hello group", "hello from Carol", "Dave here", "CANARY-after Carol", "just us"]
    );

    // Disclosure: the server never saw the group's name or what was said.
    drop(conn);
    let mut server = server;
    server.terminate().await;
    for file in crate::disclosure::files(&server.data_dir) {
        let bytes = std::fs::read(&file).unwrap();
        for canary in [&b"CANARY-group-name"[..], b"CANARY-after Carol", b"hello from Carol"] {
            assert!(!crate::disclosure::contains(&bytes, canary), "{} leaks", file.display());
        }
    }
}

#[tokio::test]
async fn two_commits_at_one_epoch_the_loser_retries_and_all_stay_in_sync() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let homes = people(dir.path(), &server, &["Alice", "Bob", "Carol"]);
    let [alice, bob, carol] = &homes[..] else { unreachable!() };
    ok(alice, &["group", "create", "Race", "Bob", "Carol"]);
    ok(bob, &["sync"]);
    ok(carol, &["sync"]);
    let group = group_id(alice, "Race");

    // Bob asks to leave. Alice (the designated committer) reads it and commits at once, but
    // is stopped before sending; Carol reads it too, then sends, which commits it as well.
    assert_eq!(ok(bob, &["group", "leave", "Race"])[0]["event"], "leaving");
    kill_at(alice, &["sync"], "before-send");
    ok(carol, &["read", "Race"]);
    ok(carol, &["send", "Race", "after Bob"]);
    // Alice's commit goes out after Carol's: it loses, she clears it and follows Carol's.
    ok(alice, &["sync"]);
    assert_eq!(epoch(alice, &group), epoch(carol, "Race"));
    assert_eq!(texts(alice, &group), ["after Bob"]);
    let names: Vec<String> = ok(alice, &["group", "members", "Race"])
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["Alice", "Carol"]);
    ok(alice, &["send", "Race", "and Alice"]);
    assert_eq!(texts(carol, "Race"), ["after Bob", "and Alice"]);
}

#[tokio::test]
async fn a_crash_between_merge_and_welcome_still_welcomes_once() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let homes = people(dir.path(), &server, &["Alice", "Bob", "Dave"]);
    let [alice, bob, dave] = &homes[..] else { unreachable!() };
    ok(alice, &["group", "create", "Crash", "Bob"]);
    ok(bob, &["sync"]);
    kill_at(alice, &["group", "add", "Crash", "Dave"], "before-welcome");
    ok(alice, &["sync"]);
    let joined = ok(dave, &["sync"]);
    assert_eq!(joined.iter().filter(|e| e["event"] == "connected").count(), 1);
    ok(dave, &["send", "Crash", "made it"]);
    assert_eq!(texts(bob, "Crash"), ["made it"]);
    assert_eq!(epoch(alice, "Crash"), epoch(dave, "Crash"));
}

#[tokio::test]
async fn five_hundred_group_messages_in_order_without_duplicates() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let homes = people(dir.path(), &server, &["Alice", "Bob", "Carol"]);
    ok(&homes[0], &["group", "create", "Many", "Bob", "Carol"]);
    for home in &homes[1..] {
        ok(home, &["sync"]);
    }
    let mut expected = Vec::new();
    for i in 0..500 {
        let from = &homes[(i / 25) % 3];
        let text = format!("group message {i:03}");
        ok(from, &["send", "Many", &text]);
        expected.push(text);
    }
    for home in &homes {
        assert_eq!(texts(home, "Many"), expected);
    }
}

#[tokio::test]
async fn listen_follows_a_group_across_a_removal() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let homes = people(dir.path(), &server, &["Alice", "Bob", "Carol"]);
    let [alice, bob, carol] = &homes[..] else { unreachable!() };
    ok(alice, &["group", "create", "Live", "Bob", "Carol"]);
    ok(carol, &["sync"]);
    // Bob listens: he joins from the mailbox, then follows the group's log as it rotates.
    let mut listen = Listener::start(bob);
    assert_eq!(listen.next("connected")["contact"], "Live");
    ok(carol, &["send", "Live", "before"]);
    assert_eq!(listen.next("message")["text"], "before");
    assert_eq!(ok(alice, &["group", "remove", "Live", "Carol"])[0]["event"], "removed");
    ok(alice, &["send", "Live", "after the rotation"]);
    assert_eq!(listen.next("message")["text"], "after the rotation");
    // A command handed to listen sends into the new log too.
    ok(bob, &["send", "Live", "from Bob"]);
    listen.stop();
    assert_eq!(texts(alice, "Live"), ["before", "after the rotation", "from Bob"]);
}

/// Restarts the server with its expiry days `days` ahead of the clock, and waits for the
/// sweep that runs at start.
async fn restart_days_ahead(server: &mut TestServer, days: u32) {
    let swept = |s: &TestServer| s.log().matches("expired data swept").count();
    let before = swept(server);
    assert!(server.terminate().await);
    server.set_env("POSTERN_TEST_DAYS_AHEAD", &days.to_string());
    server.restart().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while swept(server) == before {
        assert!(std::time::Instant::now() < deadline, "no sweep after the restart");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_member_away_past_retention_is_told_what_it_lost_and_re_added() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    // Messages last a day; commits, append keys and mailboxes 30 days after last use (a use
    // extends them only once they are a week closer to expiry).
    std::fs::write(&config, "[retention]\nentry_days = 1\ncommit_days = 30\nmailbox_days = 30\n")
        .unwrap();
    let env = vec![("POSTERN_CONFIG".to_owned(), config.display().to_string())];
    let mut server = TestServer::start_with_env(bin(), env).await;
    let homes = people(dir.path(), &server, &["Alice", "Bob", "Carol", "Dave"]);
    let [alice, bob, carol, dave] = &homes[..] else { unreachable!() };
    ok(alice, &["group", "create", "Away", "Bob", "Carol"]);
    ok(bob, &["sync"]);
    ok(carol, &["sync"]);
    ok(alice, &["send", "Away", "before"]);
    assert_eq!(texts(carol, "Away"), ["before"]);

    // Carol goes away. Day 0: Alice adds Dave, Bob writes.
    ok(alice, &["group", "add", "Away", "Dave"]);
    ok(dave, &["sync"]);
    ok(bob, &["send", "Away", "lost to Carol"]);
    // Day 25: day 0's messages have expired; the group goes on.
    restart_days_ahead(&mut server, 25).await;
    for home in [alice, bob, dave] {
        ok_with(home, &["sync"], &[("POSTERN_TEST_DAYS_AHEAD", "25")]);
    }
    ok(alice, &["send", "Away", "day 25"]);
    // Their quiet 1:1 chats stay: each client tells the server weekly that it still uses them.
    // Day 40: the commit that added Dave has expired too, and Carol's mailbox with it.
    restart_days_ahead(&mut server, 40).await;
    ok(dave, &["send", "Away", "day 40"]);

    let events = ok(carol, &["sync"]);
    assert!(events.iter().any(|e| e["event"] == "history_lost"), "{events:?}");
    let rejoining: Vec<_> = events.iter().filter(|e| e["event"] == "rejoining").collect();
    assert_eq!(rejoining.len(), 1, "only the group fell behind: {events:?}");
    assert_eq!(rejoining[0]["chat"], group_id(carol, "Away"));
    assert_eq!(rejoining[0]["asked"], 1);
    assert_eq!(texts(carol, "Away"), ["before", "[gap waiting]"]);
    assert_eq!(ok(carol, &["chats"])[1]["rejoining"], true);
    let out = run(carol, &["group", "add", "Away", "Alice"]);
    assert!(stderr(&out).contains("re-add"), "{}", stderr(&out));
    let out = run(carol, &["send", "Away", "I am back"]);
    assert!(stderr(&out).contains("queued"), "{}", stderr(&out));

    // Alice, the admin and Carol's contact, re-adds her device; Carol moves onto the group.
    let events = ok(alice, &["sync"]);
    assert!(events.iter().all(|e| e["event"] != "rejoining"), "{events:?}");
    let events = ok(carol, &["sync"]);
    assert!(events.iter().any(|e| e["event"] == "rejoined" && e["lost"] == true), "{events:?}");
    assert_eq!(ok(carol, &["chats"])[1]["rejoining"], false);
    for home in [alice, bob, dave] {
        ok(home, &["sync"]);
    }
    ok(bob, &["send", "Away", "welcome back"]);
    for home in [alice, carol, dave] {
        assert_eq!(epoch(home, "Away"), epoch(bob, "Away"));
    }
    assert_eq!(texts(carol, "Away"), ["before", "[gap rejoined]", "I am back", "welcome back"]);
    // Dave read nothing between day 0 and day 40: he lost messages, but no commit.
    assert_eq!(texts(dave, "Away"), ["[gap 4]", "day 40", "I am back", "welcome back"]);
    let names: Vec<String> = ok(bob, &["group", "members", "Away"])
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}
