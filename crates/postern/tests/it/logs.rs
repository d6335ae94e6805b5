//! No secrets in logs: a whole scenario — two people, an invite, messages both ways, a group
//! — with the server and every client at the most verbose log level, each client leaving from
//! its own loopback address; no message text, name, key, token, passphrase, link secret or
//! client address may appear in any log line.

use std::path::Path;
use std::process::Command;

use postern_client::{Client, KeySource};
use postern_test_support::TestServer;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::bin;
use crate::disclosure::{contains, encodings};

struct Person<'a> {
    home: &'a Path,
    source: &'a str,
    passphrase: Option<&'a str>,
}

impl Person<'_> {
    /// Runs a command at trace level; returns its JSON lines and its log (stderr).
    fn run(&self, args: &[&str]) -> (Vec<Value>, Vec<u8>) {
        let mut cmd = Command::new(bin());
        cmd.arg("--home").arg(self.home).arg("--json").args(args);
        cmd.env("POSTERN_LOG", "trace").env("POSTERN_TEST_SOURCE_IP", self.source);
        cmd.env_remove("POSTERN_TEST_PAUSE_AT").env_remove("POSTERN_TEST_DAYS_AHEAD");
        match self.passphrase {
            Some(p) => cmd.env("POSTERN_PASSPHRASE", p),
            None => cmd.env_remove("POSTERN_PASSPHRASE"),
        };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "postern {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines, out.stderr)
    }
}

#[tokio::test]
async fn a_whole_scenario_at_trace_level_logs_no_secret() {
    let env = vec![("POSTERN_LOG".to_owned(), "trace".to_owned())];
    let mut server = TestServer::start_with_env(bin(), env).await;
    let dir = tempfile::tempdir().unwrap();
    let link = server.link.to_link_string();
    let alice = Person { home: &dir.path().join("alice"), source: "127.0.0.77", passphrase: None };
    let bob = Person {
        home: &dir.path().join("bob"),
        source: "127.0.0.78",
        passphrase: Some("CANARY-passphrase-Bob"),
    };
    let mut logs = Vec::new();
    let mut step = |who: &Person, args: &[&str]| {
        let (out, log) = who.run(args);
        logs.push(log);
        out
    };
    step(&alice, &["init", "--name", "CANARY-name-Alice", "--server", &link]);
    step(&bob, &["init", "--name", "CANARY-name-Bob", "--server", &link]);
    let invite = step(&alice, &["invite", "--once"])[0]["link"].as_str().unwrap().to_owned();
    step(&bob, &["connect", &invite]);
    step(&bob, &["send", "CANARY-name-Alice", "CANARY-text-from-Bob"]);
    step(&alice, &["sync"]);
    step(&alice, &["send", "CANARY-name-Bob", "CANARY-text-from-Alice"]);
    step(&bob, &["sync"]);
    step(&alice, &["sync"]);
    step(&alice, &["group", "create", "CANARY-group-name", "CANARY-name-Bob"]);
    step(&bob, &["sync"]);
    step(&bob, &["send", "CANARY-group-name", "CANARY-text-in-group"]);
    step(&alice, &["read", "CANARY-group-name"]);
    assert!(server.terminate().await);
    logs.push(server.log().into_bytes());

    let mut canaries: Vec<Vec<u8>> = [
        "CANARY-text-from-Bob",
        "CANARY-text-from-Alice",
        "CANARY-text-in-group",
        "CANARY-name-Alice",
        "CANARY-name-Bob",
        "CANARY-group-name",
        "CANARY-passphrase-Bob",
        "127.0.0.77",
        "127.0.0.78",
        invite.as_str(),
    ]
    .iter()
    .map(|c| c.as_bytes().to_vec())
    .collect();
    // The invite's claim token and keys, the link's access secret, and the clients' own keys,
    // in every encoding a log could use.
    let parsed = postern_proto::link::InviteLink::parse(&invite).unwrap();
    let mut secrets =
        vec![parsed.token.0.to_vec(), parsed.kp_key.to_vec(), server.link.secret.0.to_vec()];
    for (home, key) in [
        (alice.home, KeySource::KeyFile),
        (bob.home, KeySource::Passphrase(Zeroizing::new("CANARY-passphrase-Bob".into()))),
    ] {
        let client = Client::open(home, key).unwrap();
        secrets.push(client.identity().identity_public().0.to_vec());
        let mailbox = client.mailbox().unwrap();
        secrets.push(mailbox.mailbox.0.to_vec());
        secrets.push(mailbox.kp_key.to_vec());
    }
    for secret in &secrets {
        canaries.extend(encodings(secret));
    }
    let total: usize = logs.iter().map(Vec::len).sum();
    assert!(total > 10_000, "trace logging is on ({total} bytes of log)");
    for log in &logs {
        for canary in &canaries {
            if contains(log, canary) {
                let text = String::from_utf8_lossy(log);
                let needle = String::from_utf8_lossy(canary);
                let line = text.lines().find(|l| l.contains(needle.as_ref())).unwrap_or_default();
                panic!("a log holds {needle}: {line}");
            }
        }
    }
}
