use postern_proto::ids::PublicKey;
use std::path::Path;

use zeroize::Zeroizing;

use super::*;

/// A chat's history as text: messages as they are, gaps as `[gap N]`, `[gap rejoined]` or
/// `[gap waiting]`.
fn texts(c: &mut Client, chat: &str) -> Vec<String> {
    c.read(chat, None)
        .unwrap()
        .into_iter()
        .map(|item| match item {
            HistoryItem::Message(m) => m.text,
            HistoryItem::Gap(g) if g.waiting => "[gap waiting]".into(),
            HistoryItem::Gap(g) if g.rejoined => "[gap rejoined]".into(),
            HistoryItem::Gap(g) => format!("[gap {}]", g.entries.unwrap_or_default()),
        })
        .collect()
}

fn link() -> ServerLink {
    crate::offline_link()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn init_then_open_with_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let client = Client::init(&home, KeySource::KeyFile, "Alice Canary", link()).unwrap();
    let who = client.whoami();
    assert_eq!(who.name, "Alice Canary");
    assert_eq!(who.fingerprint.split(' ').count(), 12);
    assert!(client.identity().credential().verify());
    assert!(matches!(Client::open(&home, KeySource::KeyFile), Err(ClientError::Busy(_))));
    drop(client);
    let again = Client::open(&home, KeySource::KeyFile).unwrap();
    assert_eq!(again.whoami(), who);
    assert_eq!(again.server(), &link());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.join("store.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(again);
    // Encrypted at rest: neither the name nor the link's secret is in any file in clear.
    for entry in std::fs::read_dir(&home).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!contains(&bytes, b"Alice Canary"));
        assert!(!contains(&bytes, b"postern://"));
    }
}

#[test]
fn passphrase_protects_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let pass = |p: &str| KeySource::Passphrase(Zeroizing::new(p.to_owned()));
    drop(Client::init(&home, pass("correct horse"), "Bob", link()).unwrap());
    assert!(!home.join("store.key").exists());
    assert!(matches!(Client::open(&home, pass("wrong")), Err(ClientError::WrongKey(_))));
    assert!(matches!(
        Client::open(&home, KeySource::KeyFile),
        Err(ClientError::PassphraseRequired(_))
    ));
    assert_eq!(Client::open(&home, pass("correct horse")).unwrap().whoami().name, "Bob");
}

#[test]
fn refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    assert!(matches!(Client::open(&home, KeySource::KeyFile), Err(ClientError::NotInitialized(_))));
    for bad in ["", " padded", "new\nline", &"x".repeat(65)] {
        assert!(matches!(
            Client::init(&home, KeySource::KeyFile, bad, link()),
            Err(ClientError::InvalidName)
        ));
    }
    assert!(!home.exists(), "nothing written for refused input");
    drop(Client::init(&home, KeySource::KeyFile, "Carol", link()).unwrap());
    assert!(matches!(
        Client::init(&home, KeySource::KeyFile, "Carol", link()),
        Err(ClientError::AlreadyInitialized(_))
    ));
    // A damaged database is an error, never a silent reset.
    let db = home.join("client.db");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b ^= 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let _ = std::fs::remove_file(home.join("client.db-wal"));
    assert!(matches!(Client::open(&home, KeySource::KeyFile), Err(ClientError::WrongKey(_))));
}

#[test]
fn credentials_verify_only_when_signed_by_the_identity() {
    let id = Identity::generate("D");
    let cred = id.credential();
    assert_eq!(DeviceCredential::decode(&cred.encode()), Some(cred.clone()));
    let mut forged = cred.clone();
    forged.device_key = PublicKey(Identity::generate("E").credential().device_key.0);
    assert!(!forged.verify());
    assert_eq!(DeviceCredential::decode(&[0; 127]), None);
}

#[test]
fn fingerprint_is_stable() {
    // A known-answer value: changing the derivation changes every user's safety number.
    // Computed independently: SHA-512 of the context and 32 zero bytes, 12 chunks mod 10^5.
    assert_eq!(
        fingerprint(&PublicKey([0; 32])),
        "79023 19047 05965 25479 58108 81364 18206 60457 36957 99716 25886 23045"
    );
    assert_ne!(fingerprint(&PublicKey([0; 32])), fingerprint(&PublicKey([1; 32])));
}

/// SQLCipher (with its OpenSSL) and BoringSSL (btls, prefixed symbols) in one binary: the
/// client store and the browser-like TLS stack of the doors must link together.
#[test]
fn sqlcipher_links_beside_boringssl() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    conn.pragma_update(None, "key", "k").unwrap();
    let version: String = conn.query_row("PRAGMA cipher_version", [], |r| r.get(0)).unwrap();
    assert!(version.starts_with('4'), "SQLCipher {version}");
    let digest = btls::hash::hash(btls::hash::MessageDigest::sha256(), b"abc").unwrap();
    assert_eq!(&digest[..4], &[0xba, 0x78, 0x16, 0xbf], "BoringSSL's SHA-256");
}

fn two_clients(dir: &Path) -> (Client, Client) {
    let alice = Client::init(&dir.join("alice"), KeySource::KeyFile, "Alice", link()).unwrap();
    let bob = Client::init(&dir.join("bob"), KeySource::KeyFile, "Bob", link()).unwrap();
    (alice, bob)
}

#[test]
fn two_devices_chat_both_ways_through_mls() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob) = two_clients(dir.path());
    let kp = bob.key_package(false).unwrap();
    let group = alice.create_group(&[kp]).unwrap();
    alice.merge_pending_commit(&group.group_id).unwrap();
    let (joined, members) = bob.join_group(&group.welcome).unwrap();
    assert_eq!(joined, group.group_id);
    let identities: Vec<_> = members.iter().map(|m| m.identity_key).collect();
    assert_eq!(
        identities,
        vec![alice.identity().identity_public(), bob.identity().identity_public()]
    );

    // Both derive the same log id, append key and fork-detection tag; the epoch is 1.
    let (ka, kb) = (alice.epoch_keys(&joined).unwrap(), bob.epoch_keys(&joined).unwrap());
    assert_eq!(
        (ka.log_id, ka.append_public(), ka.envelope_key, ka.epoch),
        (kb.log_id, kb.append_public(), kb.envelope_key, 1)
    );
    assert_eq!(ka.authenticator_tag, kb.authenticator_tag);

    for i in 0..5 {
        let text = format!("hello {i}");
        let ct = alice.encrypt(&joined, text.as_bytes()).unwrap();
        assert!(!contains(&ct, text.as_bytes()), "ciphertext hides the text");
        match bob.receive(&joined, &ct).unwrap() {
            Received::Message { sender, plaintext } => {
                assert_eq!(plaintext, text.as_bytes());
                assert_eq!(sender.identity_key, alice.identity().identity_public());
            }
            other => panic!("expected a message, got {other:?}"),
        }
        let reply = bob.encrypt(&joined, b"ack").unwrap();
        assert!(matches!(alice.receive(&joined, &reply).unwrap(), Received::Message { .. }));
    }
    // A message cannot be processed twice: its key is gone (delivery de-duplicates by log
    // position before it gets here).
    let ct = alice.encrypt(&joined, b"once").unwrap();
    bob.receive(&joined, &ct).unwrap();
    assert!(bob.receive(&joined, &ct).is_err());
}

#[test]
fn state_survives_reopening_and_failed_operations_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob) = two_clients(dir.path());
    let group = alice.create_group(&[bob.key_package(false).unwrap()]).unwrap();
    alice.merge_pending_commit(&group.group_id).unwrap();
    bob.join_group(&group.welcome).unwrap();
    drop(bob);
    let mut bob = Client::open(&dir.path().join("bob"), KeySource::KeyFile).unwrap();
    let ct = alice.encrypt(&group.group_id, b"after restart").unwrap();
    // Garbage and a message for an unknown group fail without touching the group.
    assert!(bob.receive(&group.group_id, b"garbage").is_err());
    let mut tampered = ct.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(bob.receive(&group.group_id, &tampered).is_err());
    assert!(matches!(bob.receive(b"unknown", &ct), Err(ClientError::Mls(MlsError::UnknownGroup))));
    assert!(
        matches!(bob.receive(&group.group_id, &ct).unwrap(), Received::Message { plaintext, .. } if plaintext == b"after restart")
    );
}

#[test]
fn key_packages_with_forged_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob) = two_clients(dir.path());
    let good = bob.key_package(false).unwrap();
    assert!(alice.create_group(&[b"not a key package".to_vec()]).is_err());
    // Flip a byte inside the credential's identity signature: the key package's own
    // signature then fails, and so does the device credential.
    let mut forged = good.clone();
    let sig = bob.identity().credential().signature;
    let at = forged.windows(64).position(|w| w == sig).expect("credential inside the key package");
    forged[at] ^= 1;
    assert!(alice.create_group(&[forged]).is_err());
    assert!(alice.create_group(&[good]).is_ok());
}

#[test]
fn envelopes_carry_mls_messages_only_members_can_open() {
    use postern_proto::ids::IdemKey;
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob) = two_clients(dir.path());
    let group = alice.create_group(&[bob.key_package(false).unwrap()]).unwrap();
    alice.merge_pending_commit(&group.group_id).unwrap();
    bob.join_group(&group.welcome).unwrap();
    let keys = alice.epoch_keys(&group.group_id).unwrap();
    let mls = alice.encrypt(&group.group_id, b"canary text").unwrap();
    let log = keys.log_id;
    let sealed = envelope::seal(&keys, &log, IdemKey([1; 16]), None, &mls).unwrap();
    assert!(!contains(&sealed, &mls[..16]), "the MLS header is not visible");
    // The server's check: signed by the registered append key for this log.
    let env = postern_proto::envelope::Envelope::decode(&sealed).unwrap();
    assert!(env.verify(&keys.log_id, &keys.append_public()));

    let bob_keys = bob.epoch_keys(&group.group_id).unwrap();
    let open = |keys: &EpochKeys, bytes: &[u8]| {
        let env =
            postern_proto::envelope::Envelope::decode(bytes).map_err(|_| MlsError::Invalid)?;
        envelope::open(keys, &log, &env)
    };
    let opened = open(&bob_keys, &sealed).unwrap();
    assert!(matches!(bob.receive(&group.group_id, &opened).unwrap(),
        Received::Message { plaintext, .. } if plaintext == b"canary text"));

    // Tampering, another log's keys, or a stranger's keys: the same refusal.
    let mut tampered = sealed.clone();
    let at = tampered.len() - 70;
    tampered[at] ^= 1;
    assert!(matches!(open(&bob_keys, &tampered), Err(MlsError::Invalid)));
    let (mut carol, mut dave) = (
        Client::init(&dir.path().join("carol"), KeySource::KeyFile, "Carol", link()).unwrap(),
        Client::init(&dir.path().join("dave"), KeySource::KeyFile, "Dave", link()).unwrap(),
    );
    let other = carol.create_group(&[dave.key_package(false).unwrap()]).unwrap();
    carol.merge_pending_commit(&other.group_id).unwrap();
    let stranger = carol.epoch_keys(&other.group_id).unwrap();
    assert!(matches!(open(&stranger, &sealed), Err(MlsError::Invalid)));
}

#[test]
fn published_key_packages_open_with_the_invite_key_and_start_a_group() {
    use postern_proto::frame::Request;
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob) = two_clients(dir.path());
    let publication = bob.pending_publication().unwrap().expect("not yet published");
    let keys = bob.mailbox().unwrap();
    let [Request::MailboxCreate { mailbox, .. }, uploads @ ..] = &publication.requests[..] else {
        panic!("unexpected publication {:?}", publication.requests)
    };
    assert_eq!(*mailbox, keys.mailbox);
    // The packages go a few per request (small frames), the last-resort one last.
    let mut packages = Vec::new();
    let mut last = Vec::new();
    for upload in uploads {
        let Request::KeyPackageUpload { packages: some, last_resort, .. } = upload else {
            panic!("unexpected request {upload:?}")
        };
        assert!(last.is_empty(), "the last-resort package goes last");
        assert!(some.len() <= 2);
        if *last_resort { last.extend(some.clone()) } else { packages.extend(some.clone()) }
    }
    assert_eq!((packages.len(), last.len()), (KEY_PACKAGES_PER_UPLOAD, 1));
    // What a server stores is opaque; the invite's key opens it, another key does not.
    assert!(envelope::open_key_package(&[9; 32], &packages[0]).is_err());
    let opened = envelope::open_key_package(&keys.kp_key, &packages[0]).unwrap();
    let payload = postern_proto::content::KeyPackagePayload::decode(&opened).unwrap();
    assert_eq!(payload.name, "Bob", "the claimer learns the owner's chosen name");
    let group = alice.create_group(&[payload.key_package]).unwrap();
    alice.merge_pending_commit(&group.group_id).unwrap();
    bob.join_group(&group.welcome).unwrap();
    bob.mark_published().unwrap();
    assert!(bob.pending_publication().unwrap().is_none());
}

/// A server in memory: logs, and dropped items in one sequence (each mailbox sees its own
/// items in order, with gaps), appends idempotent by envelope.
#[derive(Default)]
struct MemServer {
    logs: std::collections::HashMap<[u8; 32], Vec<Vec<u8>>>,
    drops: Vec<([u8; 32], Vec<u8>)>,
}

impl MemServer {
    /// Sends everything the client has queued and resolves its commits by reading their
    /// logs, as the driver does.
    fn drain(&mut self, c: &mut Client) {
        for _ in 0..20 {
            while let Some(item) = c.next_outbox(&[]).unwrap() {
                let seq = match item.op {
                    OutboxOp::Append { log, envelope, .. } => {
                        let entries = self.logs.entry(log.0).or_default();
                        let at = match entries.iter().position(|e| *e == envelope) {
                            Some(i) => i,
                            None => {
                                entries.push(envelope);
                                entries.len() - 1
                            }
                        };
                        Some(at as u64 + 1)
                    }
                    OutboxOp::Drop { drop, body, .. } => {
                        self.drops.push((drop.0, body));
                        Some(self.drops.len() as u64)
                    }
                    _ => None,
                };
                c.outbox_done(item.id, seq).unwrap();
            }
            let unresolved = c.unresolved().unwrap();
            if unresolved.is_empty() {
                return;
            }
            for l in unresolved {
                self.read_log(c, l.log, l.cursor);
            }
        }
        panic!("a commit stayed unresolved after reading its log");
    }

    /// Entries after `after`; an expired entry (emptied) is not served.
    fn read_log(&self, c: &mut Client, log: postern_proto::ids::LogId, after: u64) -> Vec<Event> {
        let entries = self.logs.get(&log.0).cloned().unwrap_or_default();
        let mut events = Vec::new();
        for (i, bytes) in entries.iter().enumerate().skip(after as usize) {
            if !bytes.is_empty() {
                events.extend(c.receive_entry(&log, i as u64 + 1, bytes).unwrap());
            }
        }
        events
    }

    /// Expires every entry of `log` after `after` except the newest `keep`.
    fn expire(&mut self, log: postern_proto::ids::LogId, after: u64, keep: usize) {
        let entries = self.logs.get_mut(&log.0).unwrap();
        let end = entries.len() - keep;
        for e in &mut entries[after as usize..end] {
            e.clear();
        }
    }

    /// Every drop address any client used, for a sync that reads them all.
    fn all_drops(&self) -> Vec<[u8; 32]> {
        self.drops.iter().map(|(d, _)| *d).collect()
    }

    /// Reads every chat's log and the given drop addresses, as `sync` does.
    fn sync(&mut self, c: &mut Client, drops: &[[u8; 32]]) -> Vec<Event> {
        let mut events = Vec::new();
        for (i, (drop, bytes)) in self.drops.clone().iter().enumerate() {
            if drops.contains(drop) {
                events.extend(c.receive_drop(i as u64 + 1, bytes).unwrap());
            }
        }
        for l in c.logs().unwrap() {
            events.extend(self.read_log(c, l.log, l.cursor));
        }
        self.drain(c);
        events
    }
}

#[test]
fn a_one_time_invite_connects_two_people_who_then_chat_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob) = two_clients(dir.path());
    let mut server = MemServer::default();
    let invite = alice.new_invite(InviteKind::Once, 20_000).unwrap();
    let publication = alice.pending_publication().unwrap().unwrap();
    let postern_proto::frame::Request::KeyPackageUpload { packages, .. } = &publication.requests[1]
    else {
        panic!("no key packages")
    };
    assert!(matches!(
        alice.connect_once(&invite.link, &packages[..1]),
        Err(ClientError::OwnInvite)
    ));

    let (chat, name) = bob.connect_once(&invite.link, &packages[..1]).unwrap();
    assert_eq!(name, "Alice");
    // Until the creation reaches the server, messages wait.
    let early = bob.queue_message("Alice", "sent before the chat existed").unwrap();
    assert_eq!(bob.message_state(early).unwrap(), MessageState::Queued);
    server.drain(&mut bob);
    assert_eq!(bob.message_state(early).unwrap(), MessageState::Sent);
    assert!(bob.chats().unwrap()[0].active);

    let events = server.sync(&mut alice, &[invite.link.drop.0]);
    let [Event::Connected { chat: alice_chat, contact }, Event::Message(m)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(contact, "Bob");
    assert_eq!((m.from.as_str(), m.text.as_str()), ("Bob", "sent before the chat existed"));
    // And back.
    alice.queue_message(alice_chat, "hello Bob").unwrap();
    server.drain(&mut alice);
    let events = server.sync(&mut bob, &[]);
    assert!(
        matches!(&events[..], [Event::Message(m)] if m.text == "hello Bob" && m.from == "Alice" && !m.outgoing),
        "{events:?}"
    );
    // Replays and Bob's own entries change nothing.
    let log = bob.logs().unwrap()[0].log;
    assert!(server.read_log(&mut bob, log, 0).is_empty());
    let texts = texts(&mut bob, &chat);
    assert_eq!(texts, ["sent before the chat existed", "hello Bob"]);
    // A junk entry is skipped, once.
    let next = server.logs[&log.0].len() as u64 + 1;
    let events = bob.receive_entry(&log, next, b"junk").unwrap();
    assert!(matches!(&events[..], [Event::Skipped { .. }]));
    assert_eq!(bob.chats().unwrap()[0].unread, 0);
    assert_eq!(bob.contacts().unwrap()[0].fingerprint, alice.whoami().fingerprint);
    // Both sent their contact card inside the chat: each can now add the other to groups.
    assert!(bob.card("Alice").is_ok());
    assert!(alice.card("Bob").is_ok());
}

/// Alice, Bob and Carol, connected pairwise through Alice with cards exchanged, in a group
/// "G" that Alice created. Returns the clients and the server.
fn group_of_three(dir: &Path) -> (Client, Client, Client, MemServer) {
    group_of_three_with(dir, GroupRules::default())
}

fn group_of_three_with(dir: &Path, rules: GroupRules) -> (Client, Client, Client, MemServer) {
    let mut server = MemServer::default();
    let mut alice = Client::init(&dir.join("alice"), KeySource::KeyFile, "Alice", link()).unwrap();
    let mut bob = Client::init(&dir.join("bob"), KeySource::KeyFile, "Bob", link()).unwrap();
    let mut carol = Client::init(&dir.join("carol"), KeySource::KeyFile, "Carol", link()).unwrap();
    connect(&mut server, &mut alice, &mut bob);
    connect(&mut server, &mut alice, &mut carol);
    let mut claimed = Vec::new();
    for (name, client) in [("Bob", &mut bob), ("Carol", &mut carol)] {
        let (identity, name, card) = alice.card(name).unwrap();
        let keys = client.mailbox().unwrap();
        assert_eq!(card.kp_key, keys.kp_key);
        let kp = client.sealed_key_package(&keys.kp_key, false).unwrap();
        claimed.push((identity, name, card, vec![kp]));
    }
    alice.group_create("G", claimed, rules).unwrap();
    server.drain(&mut alice);
    let cards: Vec<[u8; 32]> = server.drops.iter().map(|(d, _)| *d).collect();
    for client in [&mut bob, &mut carol] {
        server.sync(client, &cards);
    }
    server.sync(&mut alice, &[]);
    (alice, bob, carol, server)
}

/// `b` connects to `a` with a one-time invite of `a`'s; both get the other's card.
fn connect(server: &mut MemServer, a: &mut Client, b: &mut Client) {
    connect_with(server, a, b, false);
}

fn in_sync(clients: &mut [&mut Client]) {
    let views: Vec<_> = clients.iter_mut().map(|c| c.chat_epoch("G").unwrap()).collect();
    assert!(views.windows(2).all(|w| w[0] == w[1]), "members differ: {views:?}");
}

#[test]
fn a_junk_commit_from_a_member_does_not_block_the_next_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, mut carol, mut server) = group_of_three(dir.path());
    // Bob holds this epoch's keys and appends garbage that claims to be a commit.
    let (log, keys) = bob.chat_keys("G").unwrap();
    let junk_next =
        postern_proto::ids::public_key(&ed25519_dalek::SigningKey::from_bytes(&[9; 32]));
    let junk =
        envelope::seal(&keys, &log, postern_proto::ids::IdemKey([5; 16]), Some(junk_next), b"junk")
            .unwrap();
    server.logs.get_mut(&log.0).unwrap().push(junk);
    // Alice removes Carol: her proposal and commit come after the junk and win.
    for c in [&mut alice, &mut bob, &mut carol] {
        server.sync(c, &[]);
    }
    alice.group_remove("G", "Carol").unwrap();
    server.drain(&mut alice);
    server.sync(&mut bob, &[]);
    let events = server.sync(&mut carol, &[]);
    assert!(events.iter().any(|e| matches!(e, Event::Removed { .. })), "{events:?}");
    in_sync(&mut [&mut alice, &mut bob]);
    bob.queue_message("G", "still moving").unwrap();
    server.drain(&mut bob);
    let events = server.sync(&mut alice, &[]);
    assert!(events.iter().any(|e| matches!(e, Event::Message(m) if m.text == "still moving")));
}

/// A commit made behind the client's back (it covers only the proposals this client has
/// read, and removes the leaves in `remove`), appended straight to the log: what a hostile
/// member can send.
fn commit_behind_the_back(c: &mut Client, server: &mut MemServer, remove: Vec<u32>) {
    hostile_commit(c, server, |ctx, group| {
        let plan = mls::CommitPlan { replace: remove, ..Default::default() };
        Ok(mls::commit(&ctx.mls, ctx.me, group, plan)?.0)
    });
}

/// A commit `make` builds in G from `c`'s state, appended straight to the log.
fn hostile_commit(
    c: &mut Client,
    server: &mut MemServer,
    make: impl FnOnce(&chats::Ctx<'_>, &[u8]) -> Result<Vec<u8>, ClientError>,
) {
    let (log, envelope) = c
        .step(|ctx| {
            let row = chats::resolve(ctx, "G")?;
            let keys = mls::epoch_keys(&ctx.mls, &row.group_id)?;
            let commit = make(ctx, &row.group_id)?;
            let next = mls::pending_epoch_keys(&ctx.mls, &row.group_id)?;
            let idem = postern_proto::ids::IdemKey([6; 16]);
            Ok((
                row.log,
                envelope::seal(&keys, &row.log, idem, Some(next.append_public()), &commit)?,
            ))
        })
        .unwrap();
    server.logs.get_mut(&log.0).unwrap().push(envelope);
}

#[test]
fn a_member_who_commits_ahead_of_their_removal_is_still_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, mut carol, mut server) = group_of_three(dir.path());
    let (epoch, _) = alice.chat_epoch("G").unwrap();
    // Alice removes Bob: her Remove proposal reaches the log; her commit is not sent yet.
    alice.group_remove("G", "Bob").unwrap();
    let proposal = alice.next_outbox(&[]).unwrap().unwrap();
    let OutboxOp::Append { log, envelope, .. } = proposal.op else { panic!("a proposal first") };
    server.logs.get_mut(&log.0).unwrap().push(envelope);
    let seq = server.logs[&log.0].len() as u64;
    alice.outbox_done(proposal.id, Some(seq)).unwrap();
    // Bob, who has not read it, gets a valid commit in first.
    commit_behind_the_back(&mut bob, &mut server, vec![]);
    // Every member refuses a commit that leaves out an earlier Remove: Alice's wins.
    server.drain(&mut alice);
    let events = server.sync(&mut bob, &[]);
    assert!(events.iter().any(|e| matches!(e, Event::Removed { .. })), "{events:?}");
    server.sync(&mut carol, &[]);
    in_sync(&mut [&mut alice, &mut carol]);
    assert_eq!(
        alice.chat_epoch("G").unwrap().0,
        epoch + 1,
        "Bob's commit was skipped, not applied"
    );
    let (_, members) = alice.group_members("G").unwrap();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["Alice", "Carol"]);
    carol.queue_message("G", "without Bob").unwrap();
    server.drain(&mut carol);
    let events = server.sync(&mut alice, &[]);
    assert!(events.iter().any(|e| matches!(e, Event::Message(m) if m.text == "without Bob")));
}

/// Sends a message in G from `c` and drains it.
fn say(server: &mut MemServer, c: &mut Client, text: &str) {
    c.queue_message("G", text).unwrap();
    server.drain(c);
}

#[test]
fn a_member_back_after_retention_reads_past_lost_messages_and_is_re_added_after_a_lost_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, mut carol, mut server) = group_of_three(dir.path());
    // Carol also knows Bob, so she can ask either of them.
    connect(&mut server, &mut bob, &mut carol);
    let log = carol.logs().unwrap().into_iter().find(|l| l.chat == carol.chat_id("G").unwrap());
    let log = log.unwrap();
    say(&mut server, &mut alice, "one");
    say(&mut server, &mut alice, "two");
    say(&mut server, &mut bob, "three");

    // Away past the retention of messages: two expired, the rest reads on.
    server.expire(log.log, log.cursor, 1);
    let events = server.sync(&mut carol, &[]);
    assert!(
        events.iter().any(|e| matches!(e, Event::HistoryLost { entries: 2, .. })),
        "{events:?}"
    );
    assert!(events.iter().any(|e| matches!(e, Event::Message(m) if m.text == "three")));
    assert_eq!(texts(&mut carol, "G"), ["[gap 2]", "three"]);
    in_sync(&mut [&mut alice, &mut bob, &mut carol]);

    // Away past the retention of commits: Dave was added meanwhile.
    let cursor = carol.logs().unwrap().into_iter().find(|l| l.log == log.log).unwrap().cursor;
    let mut dave =
        Client::init(&dir.path().join("dave"), KeySource::KeyFile, "Dave", link()).unwrap();
    connect(&mut server, &mut alice, &mut dave);
    let (identity, name, card) = alice.card("Dave").unwrap();
    let keys = dave.mailbox().unwrap();
    let kp = dave.sealed_key_package(&keys.kp_key, false).unwrap();
    alice.group_add("G", (identity, name, card, vec![kp])).unwrap();
    server.drain(&mut alice);
    let drops = server.all_drops();
    server.sync(&mut dave, &drops);
    server.sync(&mut bob, &[]);
    say(&mut server, &mut alice, "four");
    server.expire(log.log, cursor, 1);
    let events = server.sync(&mut carol, &[]);
    assert!(events.iter().any(|e| matches!(e, Event::Rejoining { asked: 2, .. })), "{events:?}");
    assert!(carol.chats().unwrap().iter().any(|c| c.rejoining));
    assert!(matches!(carol.group_leave("G"), Err(ClientError::Rejoining(_))));
    carol.queue_message("G", "back again").unwrap();
    server.drain(&mut carol);

    // Bob (not an admin) gets to it first; Alice's own re-add then loses and is dropped.
    let drops = server.all_drops();
    server.sync(&mut bob, &drops);
    server.sync(&mut alice, &drops);
    server.sync(&mut dave, &drops);
    server.sync(&mut bob, &drops);
    let events = server.sync(&mut carol, &server.all_drops());
    assert!(events.iter().any(|e| matches!(e, Event::Rejoined { lost: true, .. })), "{events:?}");
    for c in [&mut alice, &mut bob, &mut dave] {
        server.sync(c, &[]);
    }
    server.sync(&mut carol, &[]);
    in_sync(&mut [&mut alice, &mut bob, &mut carol, &mut dave]);
    let (_, members) = alice.group_members("G").unwrap();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["Alice", "Bob", "Carol", "Dave"]);
    assert_eq!(alice.chat_keys("G").unwrap().0, log.log, "a re-add does not rotate the log");
    say(&mut server, &mut alice, "welcome back");
    server.sync(&mut carol, &[]);
    server.sync(&mut dave, &[]);
    let seen = texts(&mut carol, "G");
    assert_eq!(seen, ["[gap 2]", "three", "[gap rejoined]", "back again", "welcome back"]);
    assert!(texts(&mut dave, "G").ends_with(&["back again".into(), "welcome back".into()]));
    // A replayed request changes nothing.
    let before = alice.chat_epoch("G").unwrap();
    let drops = server.all_drops();
    alice
        .step(|ctx| ctx.db.execute("UPDATE mailbox SET fetched = 0", []).map_err(chats::dbe))
        .unwrap();
    server.sync(&mut alice, &drops);
    assert_eq!(alice.chat_epoch("G").unwrap(), before);
}

/// A group of three where, while Carol is away, Alice removes Bob (the log rotates) and the
/// old log expires; Carol finds it gone, goes stale and asks Alice (her one card) to re-add
/// her. Returns the three, the server, and the chat's id at Carol's.
fn carol_finds_the_log_gone(dir: &std::path::Path) -> (Client, Client, Client, MemServer, String) {
    let (mut alice, mut bob, mut carol, mut server) = group_of_three(dir);
    let old = carol.chat_keys("G").unwrap().0;
    alice.group_remove("G", "Bob").unwrap();
    server.drain(&mut alice);
    server.sync(&mut alice, &[]);
    server.sync(&mut bob, &[]);
    say(&mut server, &mut alice, "without Bob");
    server.logs.remove(&old.0);
    let chat = carol.chat_id("G").unwrap();
    let events = carol.log_gone(&chat).unwrap();
    assert!(matches!(&events[..], [Event::Rejoining { asked: 1, .. }]), "{events:?}");
    (alice, bob, carol, server, chat)
}

#[test]
fn a_member_whose_log_expired_entirely_is_re_added_onto_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, mut carol, mut server, chat) = carol_finds_the_log_gone(dir.path());
    assert!(carol.logs().unwrap().iter().all(|l| l.chat != chat), "a stale chat is not read");
    server.drain(&mut carol);
    server.sync(&mut alice, &server.all_drops());
    server.sync(&mut alice, &[]);
    let events = server.sync(&mut carol, &server.all_drops());
    assert!(events.iter().any(|e| matches!(e, Event::Rejoined { lost: true, .. })), "{events:?}");
    in_sync(&mut [&mut alice, &mut carol]);
    assert_eq!(carol.chat_keys("G").unwrap().0, alice.chat_keys("G").unwrap().0);
    say(&mut server, &mut carol, "found you");
    let events = server.sync(&mut alice, &[]);
    assert!(events.iter().any(|e| matches!(e, Event::Message(m) if m.text == "found you")));
    // Bob, removed, learns nothing of it.
    assert!(server.sync(&mut bob, &server.all_drops()).is_empty());
}

#[test]
fn an_unanswered_rejoin_request_is_sent_again_and_answered_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, _bob, mut carol, mut server, _) = carol_finds_the_log_gone(dir.path());
    // The request never reaches Alice.
    let before = server.drops.len();
    server.drain(&mut carol);
    assert_eq!(server.drops.len(), before + 1);
    server.drops.truncate(before);
    // Not asked again before the retry time; after it, Alice (the only one to ask) is
    // asked again, and again the time after.
    assert!(carol.ask_again(86_400).unwrap().is_empty());
    for _ in 0..2 {
        let events = carol.ask_again(0).unwrap();
        assert!(
            matches!(&events[..], [Event::Rejoining { asked: 1, again: true, .. }]),
            "{events:?}"
        );
        server.drain(&mut carol);
    }
    assert_eq!(server.drops.len(), before + 2);
    // (Meanwhile a message showed Carol another view of the group: that alarm stays.)
    carol
        .step(|ctx| {
            let split = chats::FORK_SPLIT;
            ctx.db.execute("UPDATE chats SET fork_alarm = ?1", [split]).map_err(chats::dbe)
        })
        .unwrap();
    // Both copies reach her: the same request, so she re-adds Carol once.
    let epoch = alice.chat_epoch("G").unwrap().0;
    server.sync(&mut alice, &server.all_drops());
    server.sync(&mut alice, &[]);
    assert_eq!(alice.chat_epoch("G").unwrap().0, epoch + 1);
    let events = server.sync(&mut carol, &server.all_drops());
    assert!(events.iter().any(|e| matches!(e, Event::Rejoined { .. })), "{events:?}");
    in_sync(&mut [&mut alice, &mut carol]);
    assert!(carol.chats().unwrap().iter().all(|c| c.fork_alarm));
    // Back in the group, nothing is asked.
    assert!(carol.ask_again(0).unwrap().is_empty());
}

#[test]
fn a_rejoin_request_is_made_anew_once_the_home_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, _bob, mut carol, mut server, _) = carol_finds_the_log_gone(dir.path());
    let requested = |c: &mut Client| -> (String, Vec<u8>) {
        c.step(|ctx| {
            ctx.db
                .query_row("SELECT server, reply_drop FROM rejoin_requests", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(chats::dbe)
        })
        .unwrap()
    };
    let first = requested(&mut carol);
    assert_eq!(first.0, link().to_link_string());
    let before = server.drops.len();
    server.drain(&mut carol);
    server.drops.truncate(before);
    // Carol's home moves before anyone answered: the request that goes again names the new
    // home, with a new drop address there, and is answered.
    let moved = ServerLink { addrs: vec!["127.0.0.2:8443".into()], ..link() };
    carol.move_home(&moved).unwrap();
    let events = carol.ask_again(0).unwrap();
    assert!(matches!(&events[..], [Event::Rejoining { asked: 1, .. }]), "{events:?}");
    let second = requested(&mut carol);
    assert_eq!(second.0, moved.to_link_string());
    assert_ne!(second.1, first.1);
    server.drain(&mut carol);
    server.sync(&mut alice, &server.all_drops());
    server.sync(&mut alice, &[]);
    let events = server.sync(&mut carol, &server.all_drops());
    assert!(events.iter().any(|e| matches!(e, Event::Rejoined { .. })), "{events:?}");
    in_sync(&mut [&mut alice, &mut carol]);
}

/// `claimed` for `group_add`: `who`'s card as `by` holds it, with one key package of `who`.
fn claim(by: &mut Client, who: &mut Client, name: &str) -> (PublicKey, String, Card, Vec<Vec<u8>>) {
    let (identity, name, card) = by.card(name).unwrap();
    let keys = who.mailbox().unwrap();
    let kp = who.sealed_key_package(&keys.kp_key, false).unwrap();
    (identity, name, card, vec![kp])
}

#[test]
fn group_rules_decide_who_may_add_and_every_member_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let rules = GroupRules { members_can_add: true, members_can_remove: false };
    let (mut alice, mut bob, mut carol, mut server) = group_of_three_with(dir.path(), rules);
    let mut dave =
        Client::init(&dir.path().join("dave"), KeySource::KeyFile, "Dave", link()).unwrap();
    connect(&mut server, &mut bob, &mut dave);
    // Bob is no admin, but members may add: everyone accepts his commit.
    let claimed = claim(&mut bob, &mut dave, "Dave");
    bob.group_add("G", claimed).unwrap();
    server.drain(&mut bob);
    let drops = server.all_drops();
    server.sync(&mut dave, &drops);
    for c in [&mut alice, &mut carol] {
        server.sync(c, &[]);
    }
    in_sync(&mut [&mut alice, &mut bob, &mut carol, &mut dave]);
    assert_eq!(alice.group_members("G").unwrap().1.len(), 4);
    // Removing is still for admins: refused here, and a commit that does it anyway is
    // skipped by every member.
    assert!(matches!(bob.group_remove("G", "Dave"), Err(ClientError::NotAllowed)));
    let before = alice.chat_epoch("G").unwrap();
    commit_behind_the_back(&mut bob, &mut server, vec![3]);
    for c in [&mut alice, &mut carol, &mut dave] {
        server.sync(c, &[]);
    }
    assert_eq!(alice.chat_epoch("G").unwrap(), before);
    in_sync(&mut [&mut alice, &mut carol, &mut dave]);
    assert_eq!(dave.group_members("G").unwrap().1.len(), 4);
}

/// Found by the key-package drain test: the last-resort marker was not among the leaf's
/// capabilities, so every peer refused a last-resort package.
#[test]
fn a_last_resort_key_package_is_accepted_by_peers() {
    let dir = tempfile::tempdir().unwrap();
    let mut alice =
        Client::init(&dir.path().join("a"), KeySource::KeyFile, "Alice", link()).unwrap();
    let mut bob = Client::init(&dir.path().join("b"), KeySource::KeyFile, "Bob", link()).unwrap();
    let kp = alice.key_package(true).unwrap();
    let result = bob.step(|ctx| Ok(mls::peer_key_package(&ctx.mls, &kp).map(|_| ())));
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
}

/// Alice's own leaf key in her chat with `contact`.
fn own_leaf_key(alice: &mut Client, contact: &str) -> openmls::treesync::EncryptionKey {
    alice
        .step(|ctx| {
            let row = chats::resolve(ctx, contact)?;
            let own = mls::own_leaf(&ctx.mls, &row.group_id)?;
            let members = mls::members(&ctx.mls, &row.group_id)?;
            let me =
                members.into_iter().find(|m| m.leaf == own).ok_or(chats::bad("not a member"))?;
            Ok(me.encryption_key)
        })
        .unwrap()
}

/// `b` connects to `a` through a one-time invite answered by one of `a`'s one-time key
/// packages, or by its last-resort one; returns the chat's (epoch, authenticator tag).
fn connect_with(
    server: &mut MemServer,
    a: &mut Client,
    b: &mut Client,
    last_resort: bool,
) -> (u64, [u8; 8]) {
    let invite = a.new_invite(InviteKind::Once, 20_000).unwrap();
    let kp = a.sealed_key_package(&invite.link.kp_key, last_resort).unwrap();
    b.connect_once(&invite.link, &[kp]).unwrap();
    server.drain(b);
    server.sync(a, &[invite.link.drop.0]);
    server.sync(b, &[]);
    let name = a.whoami().name;
    let view = b.chat_epoch(&name).unwrap();
    assert_eq!(a.chat_epoch(&b.whoami().name).unwrap(), view, "both sides in one state");
    view
}

/// DESIGN (key-package exhaustion): after a group is created from the last-resort key
/// package, its owner commits an Update at once, so the keys that package shares with every
/// other first contact it answers stop protecting the chat.
#[test]
fn a_chat_joined_through_the_last_resort_key_package_updates_that_leaf_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = MemServer::default();
    let new = |name: &str| {
        Client::init(&dir.path().join(name), KeySource::KeyFile, name, link()).unwrap()
    };
    let (mut alice, mut bob, mut carol, mut dave) =
        (new("Alice"), new("Bob"), new("Carol"), new("Dave"));
    // A regular one-time package: no Update (creation is epoch 1).
    assert_eq!(connect_with(&mut server, &mut alice, &mut dave, false).0, 1);
    // Bob and Carol both reach Alice through her one last-resort package: each chat gets
    // Alice's Update (epoch 2), and her leaf keys in the two chats differ.
    assert_eq!(connect_with(&mut server, &mut alice, &mut bob, true).0, 2);
    assert_eq!(connect_with(&mut server, &mut alice, &mut carol, true).0, 2);
    assert_ne!(own_leaf_key(&mut alice, "Bob"), own_leaf_key(&mut alice, "Carol"));
    // The chats work both ways after it.
    alice.queue_message("Bob", "after the update").unwrap();
    server.drain(&mut alice);
    let events = server.sync(&mut bob, &[]);
    assert!(events.iter().any(|e| matches!(e, Event::Message(m) if m.text == "after the update")));
    bob.queue_message("Alice", "and back").unwrap();
    server.drain(&mut bob);
    let events = server.sync(&mut alice, &[]);
    assert!(events.iter().any(|e| matches!(e, Event::Message(m) if m.text == "and back")));
}

/// An Update may give a member's leaf fresh keys, never another identity: a commit whose
/// path brings a different (valid) credential is skipped by every member.
#[test]
fn a_commit_that_swaps_the_committers_credential_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut alice, mut bob, mut carol, mut server) = group_of_three(dir.path());
    let before = alice.chat_epoch("G").unwrap();
    let mallory = Identity::generate("Mallory");
    hostile_commit(&mut bob, &mut server, |ctx, group| {
        Ok(mls::self_update_as(&ctx.mls, ctx.me, group, &mallory)?)
    });
    for c in [&mut alice, &mut carol] {
        server.sync(c, &[]);
    }
    assert_eq!(alice.chat_epoch("G").unwrap(), before, "the swap was skipped");
    in_sync(&mut [&mut alice, &mut carol]);
    // A plain Update from Bob (same device, fresh keys) is applied.
    hostile_commit(&mut bob, &mut server, |ctx, group| {
        let plan = mls::CommitPlan { self_update: true, ..Default::default() };
        Ok(mls::commit(&ctx.mls, ctx.me, group, plan)?.0)
    });
    for c in [&mut alice, &mut carol] {
        server.sync(c, &[]);
    }
    assert_eq!(alice.chat_epoch("G").unwrap().0, before.0 + 1);
    in_sync(&mut [&mut alice, &mut carol]);
}

#[test]
fn idempotency_keys_start_with_the_clock_or_with_when_the_server_went_out_of_reach() {
    let db = rusqlite::Connection::open_in_memory().unwrap();
    db.execute_batch("CREATE TABLE outages (server TEXT PRIMARY KEY, since INTEGER NOT NULL)")
        .unwrap();
    let secs = |key: postern_proto::ids::IdemKey| {
        u64::from(u32::from_be_bytes(key.0[..4].try_into().unwrap()))
    };
    let before = chats::now_ms() / 1000;
    let a = chats::fresh_idem(&db, "s").unwrap();
    let b = chats::fresh_idem(&db, "s").unwrap();
    let after = chats::now_ms() / 1000;
    assert!((before..=after).contains(&secs(a)), "the clock, in seconds");
    assert_ne!(a.0[4..], b.0[4..], "the rest is random");

    db.execute("INSERT INTO outages (server, since) VALUES ('s', ?1)", [before - 3600]).unwrap();
    assert_eq!(secs(chats::fresh_idem(&db, "s").unwrap()), before - 3600, "written offline");
    assert!(secs(chats::fresh_idem(&db, "other").unwrap()) >= before, "another server's outage");
}
