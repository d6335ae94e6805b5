//! A chat moves to the next server on its list when every door to its own has failed for
//! the failover time: a partition where each side sends, then heals, and every message
//! arrives once; a member whose group changed on the old server meanwhile is added back;
//! and a user's mailbox moves off a blocked home server.

use std::path::PathBuf;

use postern_test_support::TestServer;

use crate::bin;
use crate::chat::{Listener, connect, init, ok, ok_with, run, stderr, texts};

/// Moves at the first failure, and looks for moved chats at every sync.
const AT_ONCE: &[(&str, &str)] =
    &[("POSTERN_FAILOVER_AFTER", "0"), ("POSTERN_SUCCESSOR_CHECK", "0")];

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Two servers, and Alice and Bob at home on the first with the second added.
struct Two {
    first: TestServer,
    second: TestServer,
    alice: PathBuf,
    bob: PathBuf,
    _dir: tempfile::TempDir,
}

async fn two() -> Two {
    let first = TestServer::start(bin()).await;
    let second = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let alice = init(dir.path(), "Alice", &first);
    let bob = init(dir.path(), "Bob", &first);
    for home in [&alice, &bob] {
        let added = ok(home, &["servers", "add", &second.link.to_link_string()]);
        assert_eq!(added[0]["new"], true);
    }
    Two { first, second, alice, bob, _dir: dir }
}

#[tokio::test]
async fn a_partitioned_chat_moves_to_its_next_server_and_every_message_arrives_once() {
    let Two { mut first, second, alice, bob, _dir } = two().await;
    let fallback = second.link.to_link_string();
    assert_eq!(ok(&bob, &["servers", "add", &fallback])[0]["new"], false);
    let servers = ok(&bob, &["servers", "list"]);
    assert_eq!(
        (&servers[0]["addrs"][0], &servers[0]["home"]),
        (&second.link.addrs[0].as_str().into(), &false.into())
    );
    let out = run(&bob, &["servers", "add", &first.link.to_link_string()]);
    assert!(stderr(&out).contains("your home server"), "{}", stderr(&out));

    let bob_chat = connect(&alice, &bob);
    ok(&bob, &["send", &bob_chat, "one"]);
    let alice_chat = ok(&alice, &["sync"])[0]["chat"].as_str().unwrap().to_owned();
    ok(&alice, &["send", &alice_chat, "two"]);
    assert_eq!(texts(&bob, "Alice"), ["one", "two"]);

    // The first server goes down. Before the failover time the message waits...
    first.kill().await;
    let out = run(&alice, &["send", &alice_chat, "three, queued"]);
    assert!(!out.status.success() && stderr(&out).contains("queued"), "{}", stderr(&out));
    // `status` says where the chat is and that its server is out of reach.
    let status = &ok(&alice, &["status"])[0]["chat_servers"];
    assert_eq!(status[0]["server"][0], first.link.addrs[0]);
    assert!(status[0]["out_of_reach_secs"].is_u64(), "{status}");
    // ... after it the chat moves, and both messages go to the second server.
    ok_with(&alice, &["send", &alice_chat, "four, moved"], AT_ONCE);

    // The first server comes back for Bob, who has not noticed: his message lands there.
    first.restart().await;
    ok(&bob, &["send", &bob_chat, "five, on the first server"]);
    // His next sync finds the moved chat and follows it; his message goes again, to the
    // second server, where Alice reads it.
    ok_with(&bob, &["sync"], AT_ONCE);
    let everything = ["five, on the first server", "four, moved", "one", "three, queued", "two"];
    assert_eq!(sorted(texts(&alice, "Bob")), everything);
    assert_eq!(sorted(texts(&bob, "Alice")), everything);

    // The first server goes for good: the chat lives on the second, mailbox or not.
    first.kill().await;
    ok(&alice, &["send", &alice_chat, "six"]);
    ok(&bob, &["send", &bob_chat, "seven"]);
    let mut all = everything.map(str::to_owned).to_vec();
    all.extend(["seven".to_owned(), "six".to_owned()]);
    let all = sorted(all);
    assert_eq!(sorted(texts(&alice, "Bob")), all);
    assert_eq!(sorted(texts(&bob, "Alice")), all);
    for home in [&alice, &bob] {
        let chats = ok(home, &["chats"]);
        assert_eq!(chats.len(), 1);
        assert_eq!(chats[0]["fork_alarm"], false);
        let status = &ok(home, &["status"])[0]["chat_servers"];
        assert_eq!(status.as_array().unwrap().len(), 1, "{status}");
        assert_eq!(status[0]["server"][0], second.link.addrs[0]);
        assert_eq!(status[0]["chats"], 1);
        assert!(status[0]["out_of_reach_secs"].is_null(), "{status}");
    }
}

#[tokio::test]
async fn a_group_moves_and_a_member_who_read_a_message_on_the_old_server_sees_it_once() {
    let mut first = TestServer::start(bin()).await;
    let second = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let homes = crate::group::people(dir.path(), &first, &["Alice", "Bob", "Carol"]);
    let [alice, bob, carol] = &homes[..] else { unreachable!() };
    // The creator's fallbacks make the group's list.
    ok(alice, &["servers", "add", &second.link.to_link_string()]);
    ok(alice, &["group", "create", "Moving", "Bob", "Carol"]);
    for home in [bob, carol] {
        ok(home, &["sync"]);
    }
    ok(bob, &["send", "Moving", "hello"]);

    // Alice cannot reach the first server and moves the group.
    first.kill().await;
    ok_with(alice, &["send", "Moving", "alice moved"], AT_ONCE);
    first.restart().await;
    // Bob and Carol still reach it (and looked for moves a moment ago, at their join):
    // Bob's message lands there and Carol reads it there.
    ok(bob, &["send", "Moving", "bob on the first server"]);
    assert_eq!(texts(carol, "Moving"), ["hello", "bob on the first server"]);
    // Bob follows and sends his message again; Carol follows and already has it.
    ok_with(bob, &["sync"], AT_ONCE);
    ok_with(carol, &["sync"], AT_ONCE);
    let all =
        sorted(["hello", "alice moved", "bob on the first server"].map(str::to_owned).to_vec());
    for home in [alice, bob, carol] {
        assert_eq!(sorted(texts(home, "Moving")), all, "{}", home.display());
    }
    // All three are on the second server now.
    first.kill().await;
    ok(carol, &["send", "Moving", "carol after"]);
    for home in [alice, bob] {
        assert_eq!(texts(home, "Moving").last().unwrap(), "carol after");
    }
}

#[tokio::test]
async fn a_listening_client_moves_an_idle_chat_and_gets_pushes_on_the_next_server() {
    let Two { mut first, second: _second, alice, bob, _dir } = two().await;
    let bob_chat = connect(&alice, &bob);
    ok(&alice, &["sync"]);
    let mut listen = Listener::start_with(&alice, AT_ONCE);
    ok(&bob, &["send", &bob_chat, "before"]);
    assert_eq!(listen.next("message")["text"], "before");

    // The server goes; whichever of them moves the chat first, the other follows, and the
    // message reaches Alice's listen on the second server.
    first.kill().await;
    ok_with(&bob, &["send", &bob_chat, "after the move"], AT_ONCE);
    assert_eq!(listen.next("message")["text"], "after the move");
    ok_with(&bob, &["send", &bob_chat, "and one more"], AT_ONCE);
    assert_eq!(listen.next("message")["text"], "and one more");
    listen.stop();
    assert_eq!(texts(&alice, "Bob"), ["before", "after the move", "and one more"]);
}

#[tokio::test]
async fn a_member_who_changed_the_group_on_the_old_server_is_added_back_on_the_new_one() {
    let mut first = TestServer::start(bin()).await;
    let second = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let homes = crate::group::people(dir.path(), &first, &["Alice", "Bob", "Carol"]);
    let [alice, bob, carol] = &homes[..] else { unreachable!() };
    // Dave is Bob's contact, not Alice's.
    let dave = init(dir.path(), "Dave", &first);
    connect(bob, &dave);
    for home in [bob, &dave, bob] {
        ok(home, &["sync"]);
    }
    ok(alice, &["servers", "add", &second.link.to_link_string()]);
    ok(alice, &["group", "create", "Split", "Bob", "Carol", "--members-can-add"]);
    for home in [bob, carol] {
        ok(home, &["sync"]);
    }
    // Alice moves the group while the first server is down for her...
    first.kill().await;
    ok_with(alice, &["send", "Split", "alice moved"], AT_ONCE);
    first.restart().await;
    // ... Bob, who still reaches it, writes there (Carol reads it there too), then adds
    // Dave there: a commit the moved group never saw. What he writes after it only the
    // first server's branch can read.
    ok(bob, &["send", "Split", "bob before the fork"]);
    assert_eq!(texts(carol, "Split"), ["bob before the fork"]);
    ok(bob, &["group", "add", "Split", "Dave"]);
    ok(bob, &["send", "Split", "bob on his branch"]);
    ok(&dave, &["sync"]);
    // Carol has not read that commit: she follows Alice. Bob cannot: he is told, and asks
    // the members he has cards for (Alice and Dave) to add him back.
    ok_with(carol, &["sync"], AT_ONCE);
    assert_eq!(texts(carol, "Split").last().unwrap(), "alice moved");
    let synced = ok_with(bob, &["sync"], AT_ONCE);
    assert!(synced.iter().any(|e| e["event"] == "fork_alarm"), "{synced:?}");
    let asked: Vec<_> = synced.iter().filter(|e| e["event"] == "rejoining").collect();
    assert_eq!(asked.len(), 1, "{synced:?}");
    assert_eq!(asked[0]["asked"], 2);
    let split = ok(bob, &["chats"]).into_iter().find(|c| c["name"] == "Split").unwrap();
    assert_eq!(split["fork_alarm"], true);
    assert_eq!(split["rejoining"], true);
    // Reported once.
    let again = ok_with(bob, &["sync"], AT_ONCE);
    assert!(!again.iter().any(|e| e["event"] == "fork_alarm"), "{again:?}");
    // Unanswered, the request goes again once the retry time has passed (here at once):
    // the same request, to the same two, since nobody else can be asked.
    let again = ok_with(bob, &["sync"], &[("POSTERN_REJOIN_RETRY", "0")]);
    let asked: Vec<_> = again.iter().filter(|e| e["event"] == "rejoining").collect();
    assert_eq!(asked.len(), 1, "{again:?}");
    assert_eq!((&asked[0]["asked"], &asked[0]["again"]), (&2.into(), &true.into()));

    // Dave is on Bob's branch and does not answer (were he to, his Welcome would come
    // first and take Bob back to the branch he left); Alice adds Bob back on the second
    // server, once for both copies of the request.
    ok(&dave, &["sync"]);
    ok(alice, &["sync"]);
    let synced = ok(bob, &["sync"]);
    assert!(synced.iter().any(|e| e["event"] == "rejoined"), "{synced:?}");
    let split = ok(bob, &["chats"]).into_iter().find(|c| c["name"] == "Split").unwrap();
    assert_eq!(split["fork_alarm"], false);
    assert_eq!(split["rejoining"], false);
    // Bob's messages from the first server went again: each arrives once, also for
    // Carol, who had read one of them there.
    let bobs = sorted(["bob before the fork", "bob on his branch"].map(str::to_owned).to_vec());
    for home in [alice, carol] {
        let mine: Vec<String> =
            texts(home, "Split").into_iter().filter(|t| t.starts_with("bob")).collect();
        assert_eq!(sorted(mine), bobs, "{}", home.display());
    }
    // The group goes on, on the second server, with Bob in it.
    first.kill().await;
    ok(carol, &["send", "Split", "carol after"]);
    ok(bob, &["send", "Split", "bob after"]);
    for home in [alice, bob, carol] {
        let seen = texts(home, "Split");
        for text in ["carol after", "bob after"] {
            assert_eq!(
                seen.iter().filter(|t| *t == text).count(),
                1,
                "{}: {seen:?}",
                home.display()
            );
        }
    }
}

#[tokio::test]
async fn a_sync_that_fails_still_says_the_mailbox_moved() {
    let mut first = TestServer::start(bin()).await;
    let second = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let carol = init(dir.path(), "Carol", &first);
    let dave = init(dir.path(), "Dave", &first);
    // Their chat is made before Carol adds a second server: it has nowhere to move.
    connect(&carol, &dave);
    ok(&carol, &["sync"]);
    ok(&carol, &["servers", "add", &second.link.to_link_string()]);
    first.kill().await;
    let mut command = crate::chat::command(&carol, &["--json", "sync"]);
    let out = command.envs(AT_ONCE.iter().copied()).output().unwrap();
    // The chat's server is out of reach, so the sync fails; the move of the mailbox is
    // reported all the same.
    assert!(!out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("\"home_moved\""), "{printed}\n{}", stderr(&out));
}

#[tokio::test]
async fn a_blocked_home_server_moves_the_mailbox_and_contacts_reach_it_on_the_next() {
    let Two { mut first, second, alice, bob, _dir: dir } = two().await;
    let bob_chat = connect(&alice, &bob);
    ok(&alice, &["sync"]);
    ok(&bob, &["sync"]);
    let old_invite = crate::chat::invite(&alice, true);

    // Their home server goes. Within the failover time nothing moves...
    first.kill().await;
    let out = run(&alice, &["sync"]);
    assert!(!out.status.success(), "{}", stderr(&out));
    // (An invite made now waits to be registered on the first server.)
    let out = run(&alice, &["invite"]);
    assert!(!out.status.success(), "{}", stderr(&out));
    // ... after it, Alice's chat moves, and so does her mailbox, and Bob gets her new card.
    // The invite's registration, for a mailbox that has moved, is dropped.
    let synced = ok_with(&alice, &["sync"], AT_ONCE);
    let moved: Vec<_> = synced.iter().filter(|e| e["event"] == "home_moved").collect();
    assert_eq!(moved.len(), 1, "{synced:?}");
    assert_eq!(moved[0]["addrs"][0], second.link.addrs[0]);
    assert_eq!(moved[0]["cards"], 1);
    let synced = ok_with(&bob, &["sync"], AT_ONCE);
    assert!(synced.iter().any(|e| e["event"] == "home_moved"), "{synced:?}");
    // Once moved, the home stays where it went.
    let again = ok_with(&alice, &["sync"], AT_ONCE);
    assert!(!again.iter().any(|e| e["event"] == "home_moved"), "{again:?}");
    let servers = ok(&alice, &["servers", "list"]);
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(
        (&servers[0]["addrs"][0], &servers[0]["home"]),
        (&second.link.addrs[0].as_str().into(), &true.into())
    );

    // Bob adds Alice to a group through the card naming her new server: her key package is
    // claimed there and the Welcome dropped there.
    ok(&bob, &["group", "create", "After", "Alice"]);
    ok(&bob, &["send", "After", "in the group"]);
    ok(&alice, &["sync"]);
    assert_eq!(texts(&alice, "After"), ["in the group"]);
    ok(&bob, &["send", &bob_chat, "and here"]);
    assert_eq!(texts(&alice, "Bob"), ["and here"]);

    // A new invite names the new home: Carol, who never knew the first server, connects.
    let carol = init(dir.path(), "Carol", &second);
    let chat = connect(&alice, &carol);
    ok(&carol, &["send", &chat, "hello from carol"]);
    assert_eq!(texts(&alice, "Carol"), ["hello from carol"]);

    // The first server comes back: Alice's mailbox there is still read now and then, so an
    // invite link she gave out before the move still works.
    first.restart().await;
    let dan = init(dir.path(), "Dan", &second);
    let connected = ok(&dan, &["connect", &old_invite]);
    assert_eq!(connected[0]["event"], "connected");
    let synced = ok_with(&alice, &["sync"], AT_ONCE);
    assert!(synced.iter().any(|e| e["event"] == "connected"), "{synced:?}");
}
