//! 1:1 chats end to end: real servers, real `postern` client processes with their own homes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_test_support::TestServer;
use serde_json::Value;

use crate::bin;

pub(crate) fn command(home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("--home")
        .arg(home)
        .args(args)
        .env_remove("POSTERN_PASSPHRASE")
        .env_remove("POSTERN_TEST_PAUSE_AT")
        .env_remove("POSTERN_TEST_DAYS_AHEAD")
        .env_remove("POSTERN_LOG");
    cmd
}

pub(crate) fn run(home: &Path, args: &[&str]) -> Output {
    command(home, args).output().expect("run postern")
}

/// Runs a command that must succeed; returns its JSON lines.
pub(crate) fn ok(home: &Path, args: &[&str]) -> Vec<Value> {
    ok_with(home, args, &[])
}

/// [`ok`] with extra environment variables (test hooks).
pub(crate) fn ok_with(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = command(home, &all).envs(env.iter().copied()).output().expect("run postern");
    assert!(
        out.status.success(),
        "`postern {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub(crate) fn init(dir: &Path, name: &str, server: &TestServer) -> PathBuf {
    let home = dir.join(name.to_lowercase());
    ok(&home, &["init", "--name", name, "--server", &server.link.to_link_string()]);
    home
}

pub(crate) fn invite(home: &Path, once: bool) -> String {
    let args: &[&str] = if once { &["invite", "--once"] } else { &["invite"] };
    ok(home, args)[0]["link"].as_str().expect("link").to_owned()
}

/// Connects `joiner` to `inviter` with a one-time invite; returns the joiner's chat id.
pub(crate) fn connect(inviter: &Path, joiner: &Path) -> String {
    let link = invite(inviter, true);
    let out = ok(joiner, &["connect", &link]);
    assert_eq!(out[0]["event"], "connected");
    out[0]["chat"].as_str().expect("chat").to_owned()
}

/// `(from, text)` of every message in a chat, in log order.
/// `(from, text)` of each message; a gap in the history reads `("", "[gap N]")` with the
/// entries it lost, `[gap rejoined]` when it ended with a re-add, `[gap waiting]` before.
pub(crate) fn history(home: &Path, chat: &str) -> Vec<(String, String)> {
    ok(home, &["read", chat])
        .into_iter()
        .map(|m| {
            if m["gap"] == true {
                let what = if m["waiting"] == true {
                    "waiting".to_owned()
                } else if m["rejoined"] == true {
                    "rejoined".to_owned()
                } else {
                    m["entries"].to_string()
                };
                return (String::new(), format!("[gap {what}]"));
            }
            (m["from"].as_str().unwrap().to_owned(), m["text"].as_str().unwrap().to_owned())
        })
        .collect()
}

pub(crate) fn texts(home: &Path, chat: &str) -> Vec<String> {
    history(home, chat).into_iter().map(|(_, t)| t).collect()
}

/// Starts a command that will stop at `point` (the `POSTERN_TEST_PAUSE_AT` hook), waits
/// until it has, and kills it with SIGKILL.
pub(crate) fn kill_at(home: &Path, args: &[&str], point: &str) {
    let mut child = command(home, args)
        .env("POSTERN_TEST_PAUSE_AT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn postern");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("paused at") {
                let _ = tx.send(());
            }
        }
    });
    let paused = rx.recv_timeout(Duration::from_secs(60));
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(paused.is_ok(), "`postern {}` never reached {point}", args.join(" "));
}

#[tokio::test]
async fn one_to_one_both_ways_offline_and_across_a_server_restart() {
    let mut server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    // Long names, so the disclosure scan at the end cannot match them by chance.
    let (a, b) = ("Alice-CANARY-NAME", "Bob-CANARY-NAME");
    let alice = init(dir.path(), a, &server);
    let bob = init(dir.path(), b, &server);

    let bob_chat = connect(&alice, &bob);
    // Bob names the contact by the name Alice chose; a chat id works where a name does.
    assert_eq!(ok(&bob, &["contacts"])[0]["name"], a);
    let out = run(&bob, &["send", a, "CANARY-first message"]);
    assert!(out.status.success(), "{}", stderr(&out));
    ok(&bob, &["send", &bob_chat, "second"]);

    // Alice was offline throughout; her next sync joins the chat and reads both.
    let synced = ok(&alice, &["sync"]);
    assert_eq!(synced[0]["event"], "connected");
    assert_eq!(synced[0]["contact"], b);
    let alice_chat = synced[0]["chat"].as_str().unwrap().to_owned();
    assert_eq!(
        history(&alice, b),
        [(b.into(), "CANARY-first message".into()), (b.into(), "second".into())]
    );
    ok(&alice, &["send", &alice_chat, "hello back"]);
    assert_eq!(texts(&bob, a), ["CANARY-first message", "second", "hello back"]);
    // Both see the other's safety number as the other sees their own.
    let alice_fp = ok(&alice, &["fingerprint"])[0]["fingerprint"].clone();
    assert_eq!(ok(&bob, &["fingerprint", a])[0]["fingerprint"], alice_fp);

    // The server restarts between a send and its receipt: nothing is lost.
    ok(&bob, &["send", a, "before the restart"]);
    server.kill().await;
    server.restart().await;
    assert_eq!(texts(&alice, b).last().unwrap(), "before the restart");

    // Server unreachable: the error names the address, the message stays queued and goes
    // out with the next sync.
    server.kill().await;
    let out = run(&bob, &["send", a, "queued while down"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&server.link.addrs[0]) && err.contains("postern sync"), "{err}");
    assert_eq!(ok(&bob, &["read", a]).last().unwrap()["state"], "queued");
    server.restart().await;
    ok(&bob, &["sync"]);
    assert_eq!(
        texts(&alice, b),
        ["CANARY-first message", "second", "hello back", "before the restart", "queued while down"]
    );

    // Bad input: an invalid link is a clear error and writes nothing.
    let out = run(&bob, &["connect", "postern://invite#v=1&m=once"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid invite link"), "{}", stderr(&out));
    let out = run(&bob, &["send", "Nobody", "x"]);
    assert!(stderr(&out).contains("no chat, contact or request called \"Nobody\""));
    assert_eq!(ok(&bob, &["chats"]).len(), 1);
    // A used one-time invite cannot connect anyone else.
    let link = invite(&alice, true);
    let carol = init(dir.path(), "Carol-CANARY-NAME", &server);
    ok(&carol, &["connect", &link]);
    let out = run(&bob, &["connect", &link]);
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));

    // Disclosure: nothing the server keeps holds a message, a name or an identity.
    server.terminate().await;
    let identity = postern_client::Client::open(&alice, postern_client::KeySource::KeyFile)
        .unwrap()
        .identity()
        .identity_public();
    let fingerprint = alice_fp.as_str().unwrap().to_owned();
    let canaries: Vec<&[u8]> = vec![
        b"CANARY-first message",
        b"hello back",
        a.as_bytes(),
        b.as_bytes(),
        b"Carol-CANARY-NAME",
        &identity.0,
        fingerprint.as_bytes(),
    ];
    for file in crate::disclosure::files(&server.data_dir) {
        let bytes = std::fs::read(&file).unwrap();
        for canary in &canaries {
            for form in crate::disclosure::encodings(canary) {
                assert!(
                    !crate::disclosure::contains(&bytes, &form),
                    "{} holds a canary",
                    file.display()
                );
            }
        }
    }
}

#[tokio::test]
async fn an_address_invite_connects_after_accept() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let alice = init(dir.path(), "Alice", &server);
    let bob = init(dir.path(), "Bob", &server);
    // Two people who chose the same name are told apart locally.
    let other_bob = dir.path().join("other-bob");
    ok(&other_bob, &["init", "--name", "Bob", "--server", &server.link.to_link_string()]);

    let address = invite(&alice, false);
    for home in [&bob, &other_bob] {
        assert_eq!(ok(home, &["connect", &address])[0]["event"], "requested");
    }
    let requests = ok(&alice, &["requests"]);
    let requests: Vec<&Value> = requests.iter().filter(|r| r.get("request").is_some()).collect();
    assert_eq!(requests.len(), 2);
    let bob_fp = ok(&bob, &["fingerprint"])[0]["fingerprint"].clone();
    assert_eq!(requests[0]["fingerprint"], bob_fp);
    for r in &requests {
        ok(&alice, &["accept", r["request"].as_str().unwrap()]);
    }
    let names: Vec<String> =
        ok(&alice, &["contacts"]).iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["Bob", "Bob (2)"]);
    assert!(
        run(&alice, &["accept", requests[0]["request"].as_str().unwrap()]).status.code() != Some(0)
    );

    // Each requester joins on its next sync and names Alice by her chosen name.
    for home in [&bob, &other_bob] {
        let synced = ok(home, &["sync"]);
        assert_eq!(
            (&synced[0]["event"], &synced[0]["contact"]),
            (&"connected".into(), &"Alice".into())
        );
    }
    ok(&other_bob, &["send", "Alice", "from the second Bob"]);
    ok(&bob, &["send", "Alice", "from the first Bob"]);
    assert_eq!(history(&alice, "Bob (2)"), [("Bob (2)".into(), "from the second Bob".into())]);
    ok(&alice, &["send", "Bob", "to the first Bob"]);
    assert_eq!(texts(&bob, "Alice"), ["from the first Bob", "to the first Bob"]);
    assert_eq!(texts(&other_bob, "Alice"), ["from the second Bob"]);
}

#[tokio::test]
async fn five_hundred_messages_arrive_in_order_without_duplicates() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let alice = init(dir.path(), "Alice", &server);
    let bob = init(dir.path(), "Bob", &server);
    connect(&alice, &bob);
    ok(&alice, &["sync"]);
    // Alternate senders in runs so both directions interleave in one log.
    let mut expected = Vec::new();
    for i in 0..500 {
        let (from, to, name) =
            if (i / 50) % 2 == 0 { (&bob, "Alice", "Bob") } else { (&alice, "Bob", "Alice") };
        let text = format!("message {i:03}");
        ok(from, &["send", to, &text]);
        expected.push((name.to_owned(), text));
    }
    assert_eq!(history(&alice, "Bob"), expected);
    assert_eq!(history(&bob, "Alice"), expected);
}

/// A running `postern --json listen` and the events it prints.
pub(crate) struct Listener {
    child: std::process::Child,
    events: std::sync::mpsc::Receiver<Value>,
    /// Events printed while we waited for another kind, oldest first.
    seen: std::collections::VecDeque<Value>,
}

impl Listener {
    /// Starts listening on `home` and waits until it is ready.
    pub(crate) fn start(home: &Path) -> Self {
        Self::start_with(home, &[])
    }

    /// [`start`](Self::start) with extra environment variables.
    pub(crate) fn start_with(home: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = command(home, &["--json", "listen"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn listen");
        let (tx, events) = std::sync::mpsc::channel::<Value>();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let mut listener = Listener { child, events, seen: Default::default() };
        listener.next("listening");
        listener
    }

    /// The oldest event of this kind not yet taken, waiting up to a minute for it.
    pub(crate) fn next(&mut self, want: &str) -> Value {
        if let Some(at) = self.seen.iter().position(|v| v["event"] == want) {
            return self.seen.remove(at).expect("present");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("listen never printed {want}"));
            if v["event"] == want {
                return v;
            }
            self.seen.push_back(v);
        }
    }

    /// Stops it with SIGTERM; it must exit cleanly.
    pub(crate) fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        assert!(self.child.wait().unwrap().success());
    }
}

#[tokio::test]
async fn send_while_listen_runs_is_handed_to_it() {
    let mut server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let alice = init(dir.path(), "Alice", &server);
    let bob = init(dir.path(), "Bob", &server);
    let link = invite(&alice, true);

    let mut listen = Listener::start(&alice);
    let mut next = |want: &str| listen.next(want);
    ok(&bob, &["connect", &link]);
    // Listen finds the Welcome in the mailbox, joins and subscribes.
    let connected = next("connected");
    assert_eq!(connected["contact"], "Bob");
    ok(&bob, &["send", "Alice", "pushed to a listening client"]);
    assert_eq!(next("message")["text"], "pushed to a listening client");

    // Commands on Alice's home while listen owns it are handed over, exit status included.
    let out = run(&alice, &["send", "Bob", "sent through listen"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ok(&alice, &["chats"])[0]["name"], "Bob");
    let out = run(&alice, &["send", "Nobody", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Nobody"));
    assert_eq!(texts(&bob, "Alice"), ["pushed to a listening client", "sent through listen"]);
    assert_eq!(
        texts(&alice, "Bob"),
        ["pushed to a listening client", "sent through listen"],
        "`read` while listening shows the same history"
    );

    // The server restarts under a running listen: it reconnects, subscribes again, and
    // what was sent meanwhile arrives once. `send -` reads the text from stdin.
    server.kill().await;
    server.restart().await;
    let mut send = command(&bob, &["send", "Alice", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut send.stdin.take().unwrap(), b"after the restart\n").unwrap();
    let out = send.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(next("message")["text"], "after the restart");

    // SIGTERM stops listen and removes its socket; the home works directly again.
    listen.stop();
    assert!(!alice.join("control.sock").exists());
    assert_eq!(ok(&alice, &["whoami"])[0]["name"], "Alice");
    assert_eq!(
        texts(&alice, "Bob"),
        ["pushed to a listening client", "sent through listen", "after the restart"]
    );
}

#[tokio::test]
async fn sigkill_at_each_step_loses_nothing_and_doubles_nothing() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let alice = init(dir.path(), "Alice", &server);
    let bob = init(dir.path(), "Bob", &server);

    // Connect: killed after the server acknowledged the commit (the second acknowledgement,
    // after log_create) and before the local merge. `sync` finishes the creation.
    let link = invite(&alice, true);
    kill_at(&bob, &["connect", &link], "after-ack#2");
    assert_eq!(ok(&bob, &["chats"])[0]["active"], false);
    ok(&bob, &["sync"]);
    assert_eq!(ok(&bob, &["chats"])[0]["active"], true);
    assert_eq!(ok(&alice, &["sync"])[0]["event"], "connected");

    // Send: killed after the server's acknowledgement, before it is recorded. The retry
    // gets the same place in the log; Alice reads it once.
    kill_at(&bob, &["send", "Alice", "acknowledged then killed"], "after-ack");
    assert_eq!(ok(&bob, &["read", "Alice"])[0]["state"], "sent", "read syncs first");
    // Receive: killed between decrypting and storing; the next read stores it once.
    kill_at(&alice, &["read", "Bob"], "between-decrypt-and-store");
    ok(&bob, &["send", "Alice", "after the crashes"]);
    assert_eq!(texts(&alice, "Bob"), ["acknowledged then killed", "after the crashes"]);
    ok(&alice, &["send", "Bob", "and back"]);
    assert_eq!(texts(&bob, "Alice"), ["acknowledged then killed", "after the crashes", "and back"]);
}

#[tokio::test]
async fn a_user_with_two_devices_gets_every_message_on_both() {
    let server = TestServer::start(bin()).await;
    let dir = tempfile::tempdir().unwrap();
    let laptop = init(dir.path(), "Alice", &server);
    let phone = dir.path().join("alice-phone");
    let laptop_arg = laptop.to_str().unwrap();
    ok(&phone, &["init", "--name", "Alice", "--test-device-of", laptop_arg]);
    assert_eq!(
        ok(&phone, &["whoami"])[0]["fingerprint"],
        ok(&laptop, &["whoami"])[0]["fingerprint"],
        "one identity"
    );
    let bob = init(dir.path(), "Bob", &server);

    // Bob's connect claims one key package per device: both devices join.
    connect(&laptop, &bob);
    for device in [&laptop, &phone] {
        assert_eq!(ok(device, &["sync"])[0]["contact"], "Bob");
    }
    ok(&bob, &["send", "Alice", "to both devices"]);
    ok(&phone, &["send", "Bob", "from the phone"]);
    ok(&laptop, &["send", "Bob", "from the laptop"]);
    let expected: Vec<(String, String)> = vec![
        ("Bob".into(), "to both devices".into()),
        ("Alice".into(), "from the phone".into()),
        ("Alice".into(), "from the laptop".into()),
    ];
    assert_eq!(history(&bob, "Alice"), expected);
    assert_eq!(history(&laptop, "Bob"), expected);
    assert_eq!(history(&phone, "Bob"), expected);
}
