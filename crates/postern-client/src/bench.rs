//! Benchmark support (feature `bench`, used by `benches/mls.rs`): a 200-byte message through
//! the whole client path, through the client's MLS layer, and through raw openmls over a
//! store with the same settings (SQLCipher, WAL, `synchronous=FULL`, one transaction per
//! operation), so the client's own overhead shows.

use std::path::Path;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use postern_proto::link::ServerLink;
use rusqlite::Connection;

use crate::mls::{self, DeviceSigner, Provider};
use crate::{Client, ClientError, Event, Identity, InviteKind, KeySource, OutboxOp};

/// A link to a server nobody runs: the benchmarks' clients never connect.
pub fn link() -> ServerLink {
    crate::offline_link()
}

fn bad(what: &'static str) -> ClientError {
    ClientError::Store(what.into())
}

/// Two people in a 1:1 chat, through the whole client: `queue_message`, the outbox, the
/// envelope (sealed and signed), and `receive_entry` on the other side.
pub struct Chat {
    alice: Client,
    bob: Client,
    /// The log, as an in-memory list of entries.
    entries: Vec<Vec<u8>>,
}

impl Chat {
    /// Alice and Bob in `dir`, connected through a one-time invite.
    pub fn new(dir: &Path) -> Result<Self, ClientError> {
        let mut alice = Client::init(&dir.join("alice"), KeySource::KeyFile, "Alice", link())?;
        let mut bob = Client::init(&dir.join("bob"), KeySource::KeyFile, "Bob", link())?;
        let invite = alice.new_invite(InviteKind::Once, crate::today())?;
        let kp = alice.sealed_key_package(&invite.link.kp_key, false)?;
        bob.connect_once(&invite.link, &[kp])?;
        let mut chat = Chat { alice, bob, entries: Vec::new() };
        let mut drops = Vec::new();
        chat.deliver_bob(&mut drops)?;
        for (seq, bytes) in drops.iter().enumerate() {
            chat.alice.receive_drop(seq as u64 + 1, bytes)?;
        }
        chat.deliver_alice()?;
        chat.read_bob()?;
        Ok(chat)
    }

    /// Sends Bob's outbox (appends to the log, drops collected), resolving his commits.
    fn deliver_bob(&mut self, drops: &mut Vec<Vec<u8>>) -> Result<(), ClientError> {
        for _ in 0..8 {
            while let Some(item) = self.bob.next_outbox(&[])? {
                let seq = match item.op {
                    OutboxOp::Append { envelope, .. } => {
                        self.entries.push(envelope);
                        Some(self.entries.len() as u64)
                    }
                    OutboxOp::Drop { body, .. } => {
                        drops.push(body);
                        Some(drops.len() as u64)
                    }
                    _ => None,
                };
                self.bob.outbox_done(item.id, seq)?;
            }
            let unresolved = self.bob.unresolved()?;
            if unresolved.is_empty() {
                return Ok(());
            }
            for log in unresolved {
                self.read(log)?;
            }
        }
        Err(bad("bob's commit stayed unresolved"))
    }

    fn deliver_alice(&mut self) -> Result<(), ClientError> {
        while let Some(item) = self.alice.next_outbox(&[])? {
            let seq = match item.op {
                OutboxOp::Append { envelope, .. } => {
                    self.entries.push(envelope);
                    Some(self.entries.len() as u64)
                }
                _ => None,
            };
            self.alice.outbox_done(item.id, seq)?;
        }
        Ok(())
    }

    fn read_bob(&mut self) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        for log in self.bob.logs()? {
            events.extend(self.read(log)?);
        }
        Ok(events)
    }

    /// Bob reads the log past `log`'s cursor.
    fn read(&mut self, log: crate::LogCursor) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        for (i, bytes) in self.entries.iter().enumerate().skip(log.cursor as usize) {
            events.extend(self.bob.receive_entry(&log.log, i as u64 + 1, bytes)?);
        }
        Ok(events)
    }

    /// Alice sends `text`; Bob reads it.
    pub fn round_trip(&mut self, text: &str) -> Result<(), ClientError> {
        self.alice.queue_message("Bob", text)?;
        self.deliver_alice()?;
        match self.read_bob()?.as_slice() {
            [Event::Message(m)] if m.text == text => Ok(()),
            _ => Err(bad("the message did not arrive")),
        }
    }
}

/// Two clients in one group, through the client's MLS layer only (`encrypt`, `receive`).
pub struct MlsPair {
    alice: Client,
    bob: Client,
    group: Vec<u8>,
}

impl MlsPair {
    /// Alice and Bob in `dir`.
    pub fn new(dir: &Path) -> Result<Self, ClientError> {
        let mut alice = Client::init(&dir.join("alice"), KeySource::KeyFile, "Alice", link())?;
        let mut bob = Client::init(&dir.join("bob"), KeySource::KeyFile, "Bob", link())?;
        let kp = bob.key_package(false)?;
        let created = alice.create_group(&[kp])?;
        alice.merge_pending_commit(&created.group_id)?;
        bob.join_group(&created.welcome)?;
        Ok(MlsPair { alice, bob, group: created.group_id })
    }

    /// Alice encrypts `text`; Bob decrypts it.
    pub fn round_trip(&mut self, text: &[u8]) -> Result<(), ClientError> {
        let message = self.alice.encrypt(&self.group, text)?;
        match self.bob.receive(&self.group, &message)? {
            crate::Received::Message { plaintext, .. } if plaintext == text => Ok(()),
            _ => Err(bad("the message did not decrypt")),
        }
    }
}

/// One member's raw openmls state: a SQLCipher store with the client's settings.
struct RawMember {
    conn: Connection,
    identity: Identity,
}

impl RawMember {
    fn open(path: &Path, name: &str) -> Result<Self, ClientError> {
        let store = |e: rusqlite::Error| ClientError::Store(e.to_string());
        let mut conn = Connection::open(path).map_err(store)?;
        conn.pragma_update(None, "key", "bench key").map_err(store)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(store)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(store)?;
        mls::migrate(&mut conn)?;
        Ok(RawMember { conn, identity: Identity::generate(name) })
    }

    /// Runs `op` in one transaction, as the client does.
    fn step<T>(
        &mut self,
        op: impl FnOnce(&Provider<'_>, &Identity) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let tx = self.conn.transaction().map_err(|e| ClientError::Store(e.to_string()))?;
        let value = op(&Provider::new(&tx), &self.identity)?;
        tx.commit().map_err(|e| ClientError::Store(e.to_string()))?;
        Ok(value)
    }
}

/// Two members in one group, through openmls' own calls only (create_message,
/// process_message) over stores with the client's settings: the baseline.
pub struct RawPair {
    alice: RawMember,
    bob: RawMember,
    group: GroupId,
}

impl RawPair {
    /// Alice and Bob in `dir` (set up with the client's own functions; measured raw).
    pub fn new(dir: &Path) -> Result<Self, ClientError> {
        let mut alice = RawMember::open(&dir.join("raw-alice.db"), "Alice")?;
        let mut bob = RawMember::open(&dir.join("raw-bob.db"), "Bob")?;
        let kp = bob.step(|p, id| Ok(mls::new_key_package(p, id, false)?))?;
        let created = alice.step(|p, id| {
            let kp = mls::peer_key_package(p, &kp)?;
            let created = mls::create_group(p, id, &[kp], None, &[])?;
            mls::merge_pending(p, &created.group_id)?;
            Ok(created)
        })?;
        bob.step(|p, _| Ok(mls::join(p, &created.welcome, |_| false).map(|_| ())?))?;
        Ok(RawPair { alice, bob, group: GroupId::from_slice(&created.group_id) })
    }

    /// Alice encrypts `text`; Bob decrypts it: openmls calls in one transaction each.
    pub fn round_trip(&mut self, text: &[u8]) -> Result<(), ClientError> {
        let lib = |e: &dyn std::fmt::Display| ClientError::Store(e.to_string());
        let group = self.group.clone();
        let message = self.alice.step(|p, id| {
            let mut g =
                MlsGroup::load(p.storage(), &group).map_err(|e| lib(&e))?.ok_or(bad("no group"))?;
            let out =
                g.create_message(p, &DeviceSigner(&id.device_key), text).map_err(|e| lib(&e))?;
            out.tls_serialize_detached().map_err(|e| lib(&e))
        })?;
        let plaintext = self.bob.step(|p, _| {
            let mut g =
                MlsGroup::load(p.storage(), &group).map_err(|e| lib(&e))?.ok_or(bad("no group"))?;
            let msg = MlsMessageIn::tls_deserialize_exact(&message).map_err(|e| lib(&e))?;
            let protocol = msg.try_into_protocol_message().map_err(|e| lib(&e))?;
            match g.process_message(p, protocol).map_err(|e| lib(&e))?.into_content() {
                ProcessedMessageContent::ApplicationMessage(m) => Ok(m.into_bytes()),
                _ => Err(bad("not an application message")),
            }
        })?;
        if plaintext == text { Ok(()) } else { Err(bad("the message did not decrypt")) }
    }
}

/// Key packages of `n` distinct devices (valid Postern credentials), made in one raw store.
pub struct Devices {
    store: RawMember,
    /// Each device's key package, serialized.
    pub key_packages: Vec<Vec<u8>>,
}

impl Devices {
    /// `n` devices with their key packages, in `dir`.
    pub fn new(dir: &Path, n: usize) -> Result<Self, ClientError> {
        let mut store = RawMember::open(&dir.join("devices.db"), "Devices")?;
        let key_packages = store.step(|p, _| {
            (0..n)
                .map(|i| Ok(mls::new_key_package(p, &Identity::generate(&format!("D{i}")), false)?))
                .collect()
        })?;
        Ok(Devices { store, key_packages })
    }
}

/// Creating a group with everyone in `devices` in one commit, raw openmls (the key
/// packages parsed and validated, the group made, the members added), in one transaction.
pub fn raw_add(creator: &mut Devices, key_packages: &[Vec<u8>]) -> Result<(), ClientError> {
    let lib = |e: &dyn std::fmt::Display| ClientError::Store(e.to_string());
    let me = Identity::generate("Creator");
    creator.store.step(|p, _| {
        let kps = key_packages
            .iter()
            .map(|kp| {
                KeyPackageIn::tls_deserialize_exact(kp)
                    .map_err(|e| lib(&e))?
                    .validate(p.crypto(), ProtocolVersion::Mls10)
                    .map_err(|e| lib(&e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let signer = DeviceSigner(&me.device_key);
        let mut group =
            MlsGroup::new(p, &signer, &mls::create_config(), mls::credential_with_key(&me))
                .map_err(|e| lib(&e))?;
        group.add_members(p, &signer, &kps).map_err(|e| lib(&e))?;
        Ok(())
    })
}

/// A group of `n` members made by a client, with one other client and one raw member in it,
/// for processing a commit both ways.
pub struct BigGroup {
    alice: Client,
    bob: Client,
    raw: RawMember,
    group: Vec<u8>,
}

impl BigGroup {
    /// Alice's group: Bob (a client), Carol (raw openmls) and `n - 3` other devices.
    pub fn new(dir: &Path, n: usize) -> Result<Self, ClientError> {
        let mut alice = Client::init(&dir.join("alice"), KeySource::KeyFile, "Alice", link())?;
        let mut bob = Client::init(&dir.join("bob"), KeySource::KeyFile, "Bob", link())?;
        let mut raw = RawMember::open(&dir.join("carol.db"), "Carol")?;
        let others = Devices::new(dir, n.saturating_sub(3))?;
        let mut kps = others.key_packages;
        kps.push(bob.key_package(false)?);
        kps.push(raw.step(|p, id| Ok(mls::new_key_package(p, id, false)?))?);
        let created = alice.create_group(&kps)?;
        alice.merge_pending_commit(&created.group_id)?;
        bob.join_group(&created.welcome)?;
        raw.step(|p, _| Ok(mls::join(p, &created.welcome, |_| false).map(|_| ())?))?;
        Ok(BigGroup { alice, bob, raw, group: created.group_id })
    }

    /// Alice commits an Update of her leaf (and merges it): the commit others process.
    pub fn next_commit(&mut self) -> Result<Vec<u8>, ClientError> {
        let group = self.group.clone();
        self.alice.step(|ctx| {
            let plan = mls::CommitPlan { self_update: true, ..Default::default() };
            let (commit, _) = mls::commit(&ctx.mls, ctx.me, &group, plan)?;
            mls::merge_pending(&ctx.mls, &group)?;
            Ok(commit)
        })
    }

    /// Bob, a client, processes `commit` (the client's checks, openmls, one transaction).
    pub fn client_process(&mut self, commit: &[u8]) -> Result<(), ClientError> {
        match self.bob.receive(&self.group, commit)? {
            crate::Received::Commit { .. } => Ok(()),
            _ => Err(bad("not a commit")),
        }
    }

    /// Carol, raw openmls, processes `commit` and merges it, in one transaction.
    pub fn raw_process(&mut self, commit: &[u8]) -> Result<(), ClientError> {
        let lib = |e: &dyn std::fmt::Display| ClientError::Store(e.to_string());
        let group = GroupId::from_slice(&self.group);
        self.raw.step(|p, _| {
            let mut g =
                MlsGroup::load(p.storage(), &group).map_err(|e| lib(&e))?.ok_or(bad("no group"))?;
            let msg = MlsMessageIn::tls_deserialize_exact(commit).map_err(|e| lib(&e))?;
            let protocol = msg.try_into_protocol_message().map_err(|e| lib(&e))?;
            match g.process_message(p, protocol).map_err(|e| lib(&e))?.into_content() {
                ProcessedMessageContent::StagedCommitMessage(staged) => {
                    g.merge_staged_commit(p, *staged).map_err(|e| lib(&e))
                }
                _ => Err(bad("not a commit")),
            }
        })
    }
}
