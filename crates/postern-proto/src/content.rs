//! What clients say to each other, inside encryption the server cannot remove.
//!
//! Three payloads, each versioned and each decoded from bytes another person chose:
//!
//! - [`KeyPackagePayload`]: what a mailbox owner seals under the key-package key and uploads;
//!   whoever claims it with an invite learns the owner's display name and gets one device's
//!   MLS key package.
//! - [`DropPayload`]: what a sender HPKE-seals to a mailbox and drops through a drop address:
//!   a Welcome into a chat, a request to connect through a long-lived address, or a request
//!   from a member who lost track of a group to be re-added.
//! - [`AppMessage`]: the plaintext of an MLS application message: the sender's view of the
//!   epoch (a tag of the epoch authenticator, for fork detection) and the content.
//!
//! Layouts (integers big-endian, `bytes` = u32 length · bytes):
//!
//! ```text
//! KeyPackagePayload  version u8 (1) · name bytes · key_package bytes
//! DropPayload        version u8 (1) · kind u8 · …
//!   kind 1 Welcome   drop [32] · name bytes · server bytes · log [32] · after u64 · welcome bytes
//!   kind 2 Request   drop [32] · name bytes · server bytes · reply_drop [32] · reply_hpke [32]
//!                    · count u8 · key_package bytes × count
//!   kind 3 Rejoin    drop [32] · group bytes (≤ 64) · server bytes · reply_drop [32]
//!                    · reply_hpke [32] · key_package bytes · [abandoned log [32]]
//! AppMessage         version u8 (1) · epoch_tag [8] · kind u8 · …
//!   kind 1 Text      sent_at u64 (ms since the Unix epoch) · body bytes (UTF-8)
//!   kind 2 Card      server bytes · drop [32] · hpke [32] · kp_key [32] · token [32]
//!   kind 3 Profile   name bytes
//! ```
//!
//! [`GroupMeta`] is the group context extension with a group's name and rules.

use crate::DecodeError;
use crate::codec::{Reader, Writer};
use crate::ids::{DropId, LogId};

const VERSION: u8 = 1;

/// Longest display name, in bytes (64 characters of at most 4 bytes).
pub const MAX_NAME: usize = 256;
/// Longest server link inside a payload.
pub const MAX_LINK: usize = 2048;
/// Longest MLS key package or Welcome carried here.
pub const MAX_MLS: usize = 256 * 1024;
/// Longest text message, in bytes of UTF-8.
pub const MAX_TEXT: usize = 8 * 1024;
/// Most key packages in one request (one per device).
pub const MAX_DEVICES: usize = 16;

fn string(r: &mut Reader<'_>, max: usize) -> Result<String, DecodeError> {
    String::from_utf8(r.bytes(max)?.to_vec()).map_err(|_| DecodeError::Invalid("UTF-8 text"))
}

fn version(r: &mut Reader<'_>) -> Result<(), DecodeError> {
    match r.u8()? {
        VERSION => Ok(()),
        v => Err(DecodeError::UnsupportedVersion(v)),
    }
}

/// A claimed key package and the owner's display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackagePayload {
    /// The mailbox owner's display name.
    pub name: String,
    /// One device's MLS key package (TLS-encoded).
    pub key_package: Vec<u8>,
}

impl KeyPackagePayload {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(VERSION).bytes(self.name.as_bytes()).bytes(&self.key_package);
        w.finish()
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        version(&mut r)?;
        let name = string(&mut r, MAX_NAME)?;
        let key_package = r.bytes(MAX_MLS)?.to_vec();
        r.finish()?;
        Ok(KeyPackagePayload { name, key_package })
    }
}

/// What arrives in a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropPayload {
    /// Someone created a chat with us: join it.
    Welcome {
        /// The drop address it came through (which invite was used).
        drop: DropId,
        /// The sender's display name.
        name: String,
        /// The link of the server that holds the chat's log.
        server: String,
        /// The chat's log.
        log: LogId,
        /// The sequence number of the commit the Welcome belongs to; read from after it.
        after: u64,
        /// The MLS Welcome (TLS-encoded).
        welcome: Vec<u8>,
    },
    /// Someone asks to connect through a long-lived address.
    Request {
        /// The drop address it came through.
        drop: DropId,
        /// The requester's display name.
        name: String,
        /// The link of the requester's server, where `reply_drop` lives.
        server: String,
        /// Where to drop the Welcome on acceptance.
        reply_drop: DropId,
        /// The HPKE key to seal that Welcome to.
        reply_hpke: [u8; 32],
        /// One key package per requesting device.
        key_packages: Vec<Vec<u8>>,
    },
    /// A member whose view of a group fell behind what the server still keeps asks to have
    /// its device's leaf replaced by a fresh one.
    Rejoin {
        /// The drop address it came through.
        drop: DropId,
        /// The MLS group id.
        group: Vec<u8>,
        /// The link of the requester's server, where `reply_drop` lives.
        server: String,
        /// Where to drop the Welcome.
        reply_drop: DropId,
        /// The HPKE key to seal that Welcome to.
        reply_hpke: [u8; 32],
        /// A fresh key package of the device to re-add.
        key_package: Vec<u8>,
        /// Set when the requester left a fork: the log of the branch it gave up. A member
        /// whose chat is still on that log is on the same branch and cannot help. Written
        /// last and only when set, so requests without it keep their old layout.
        abandoned: Option<LogId>,
    },
}

const DROP_WELCOME: u8 = 1;
const DROP_REQUEST: u8 = 2;
const DROP_REJOIN: u8 = 3;
/// Longest MLS group id in a rejoin request.
pub const MAX_GROUP_ID: usize = 64;

impl DropPayload {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(VERSION);
        match self {
            DropPayload::Welcome { drop, name, server, log, after, welcome } => {
                w.u8(DROP_WELCOME)
                    .fixed(&drop.0)
                    .bytes(name.as_bytes())
                    .bytes(server.as_bytes())
                    .fixed(&log.0)
                    .u64(*after)
                    .bytes(welcome);
            }
            DropPayload::Request { drop, name, server, reply_drop, reply_hpke, key_packages } => {
                w.u8(DROP_REQUEST)
                    .fixed(&drop.0)
                    .bytes(name.as_bytes())
                    .bytes(server.as_bytes())
                    .fixed(&reply_drop.0)
                    .fixed(reply_hpke)
                    .u8(u8::try_from(key_packages.len()).unwrap_or(u8::MAX));
                for kp in key_packages.iter().take(usize::from(u8::MAX)) {
                    w.bytes(kp);
                }
            }
            DropPayload::Rejoin {
                drop,
                group,
                server,
                reply_drop,
                reply_hpke,
                key_package,
                abandoned,
            } => {
                w.u8(DROP_REJOIN)
                    .fixed(&drop.0)
                    .bytes(group)
                    .bytes(server.as_bytes())
                    .fixed(&reply_drop.0)
                    .fixed(reply_hpke)
                    .bytes(key_package);
                if let Some(log) = abandoned {
                    w.fixed(&log.0);
                }
            }
        }
        w.finish()
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        version(&mut r)?;
        let payload = match r.u8()? {
            DROP_WELCOME => DropPayload::Welcome {
                drop: DropId(r.array()?),
                name: string(&mut r, MAX_NAME)?,
                server: string(&mut r, MAX_LINK)?,
                log: LogId(r.array()?),
                after: r.u64()?,
                welcome: r.bytes(MAX_MLS)?.to_vec(),
            },
            DROP_REQUEST => {
                let drop = DropId(r.array()?);
                let name = string(&mut r, MAX_NAME)?;
                let server = string(&mut r, MAX_LINK)?;
                let reply_drop = DropId(r.array()?);
                let reply_hpke = r.array()?;
                let count = usize::from(r.u8()?);
                if count == 0 || count > MAX_DEVICES {
                    return Err(DecodeError::Invalid("key package count"));
                }
                let key_packages =
                    (0..count).map(|_| Ok(r.bytes(MAX_MLS)?.to_vec())).collect::<Result<_, _>>()?;
                DropPayload::Request { drop, name, server, reply_drop, reply_hpke, key_packages }
            }
            DROP_REJOIN => DropPayload::Rejoin {
                drop: DropId(r.array()?),
                group: r.bytes(MAX_GROUP_ID)?.to_vec(),
                server: string(&mut r, MAX_LINK)?,
                reply_drop: DropId(r.array()?),
                reply_hpke: r.array()?,
                key_package: r.bytes(MAX_MLS)?.to_vec(),
                abandoned: if r.remaining() == 0 { None } else { Some(LogId(r.array()?)) },
            },
            _ => return Err(DecodeError::Invalid("drop payload kind")),
        };
        r.finish()?;
        Ok(payload)
    }
}

/// The content of an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A text message.
    Text {
        /// When the sender wrote it, in milliseconds since the Unix epoch (their clock).
        sent_at: u64,
        /// The text.
        body: String,
    },
    /// A contact card, sent once in each 1:1 chat: how the contact can add us to groups
    /// (claim our key packages with `token`, open them with `kp_key`, drop the Welcome
    /// through `drop` sealed to `hpke`, all on `server`).
    Card {
        /// Our server's link.
        server: String,
        /// A drop address of ours for this contact.
        drop: DropId,
        /// Our mailbox's HPKE key.
        hpke: [u8; 32],
        /// The key that opens our key packages.
        kp_key: [u8; 32],
        /// A claim token for this contact.
        token: [u8; 32],
    },
    /// The sender's display name, sent once on joining a group so members who are not
    /// contacts can name them.
    Profile {
        /// The name chosen at `init`.
        name: String,
    },
    /// The first entry a member writes into a chat's log on the next server of its
    /// [`ServerList`] when it moves the chat there: it had read the old log up to
    /// `read_to`, so members re-send into the new log what they sent to the old one after it.
    Moved {
        /// The last sequence number of the old log the sender had read.
        read_to: u64,
    },
}

const CONTENT_TEXT: u8 = 1;
const CONTENT_CARD: u8 = 2;
const CONTENT_PROFILE: u8 = 3;
const CONTENT_MOVED: u8 = 4;

/// The plaintext of an MLS application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppMessage {
    /// The first 8 bytes of a hash of the sender's epoch authenticator; a receiver in the
    /// same epoch with a different value has forked from the sender.
    pub epoch_tag: [u8; 8],
    /// What was said.
    pub content: Content,
}

impl AppMessage {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(VERSION).fixed(&self.epoch_tag);
        match &self.content {
            Content::Text { sent_at, body } => {
                w.u8(CONTENT_TEXT).u64(*sent_at).bytes(body.as_bytes());
            }
            Content::Card { server, drop, hpke, kp_key, token } => {
                w.u8(CONTENT_CARD)
                    .bytes(server.as_bytes())
                    .fixed(&drop.0)
                    .fixed(hpke)
                    .fixed(kp_key)
                    .fixed(token);
            }
            Content::Profile { name } => {
                w.u8(CONTENT_PROFILE).bytes(name.as_bytes());
            }
            Content::Moved { read_to } => {
                w.u8(CONTENT_MOVED).u64(*read_to);
            }
        }
        w.finish()
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        version(&mut r)?;
        let epoch_tag = r.array()?;
        let content = match r.u8()? {
            CONTENT_TEXT => Content::Text { sent_at: r.u64()?, body: string(&mut r, MAX_TEXT)? },
            CONTENT_CARD => Content::Card {
                server: string(&mut r, MAX_LINK)?,
                drop: DropId(r.array()?),
                hpke: r.array()?,
                kp_key: r.array()?,
                token: r.array()?,
            },
            CONTENT_PROFILE => Content::Profile { name: string(&mut r, MAX_NAME)? },
            CONTENT_MOVED => Content::Moved { read_to: r.u64()? },
            _ => return Err(DecodeError::Invalid("content kind")),
        };
        r.finish()?;
        Ok(AppMessage { epoch_tag, content })
    }
}

/// A group's name and rules, carried in the MLS group context (extension
/// [`GroupMeta::EXTENSION_TYPE`]), so every member checks the same rules on the same bytes.
///
/// ```text
/// version u8 (1) · name bytes · flags u8 (1: members may add, 2: members may remove)
///   · count u8 · admin identity key [32] × count
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMeta {
    /// The group's name.
    pub name: String,
    /// Identity keys allowed to add and remove anyone.
    pub admins: Vec<[u8; 32]>,
    /// Whether members who are not admins may add members.
    pub members_can_add: bool,
    /// Whether members who are not admins may remove others (anyone may leave).
    pub members_can_remove: bool,
}

const MEMBERS_ADD: u8 = 1;
const MEMBERS_REMOVE: u8 = 2;
/// Most admins listed.
pub const MAX_ADMINS: usize = 16;

impl GroupMeta {
    /// The group context extension type (from the private-use range).
    pub const EXTENSION_TYPE: u16 = 0xff50;

    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        let flags = u8::from(self.members_can_add) * MEMBERS_ADD
            + u8::from(self.members_can_remove) * MEMBERS_REMOVE;
        let admins = &self.admins[..self.admins.len().min(MAX_ADMINS)];
        w.u8(VERSION).bytes(self.name.as_bytes()).u8(flags).u8(admins.len() as u8);
        for a in admins {
            w.fixed(a);
        }
        w.finish()
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        version(&mut r)?;
        let name = string(&mut r, MAX_NAME)?;
        let flags = r.u8()?;
        if flags & !(MEMBERS_ADD | MEMBERS_REMOVE) != 0 {
            return Err(DecodeError::Invalid("group flags"));
        }
        let count = usize::from(r.u8()?);
        if count > MAX_ADMINS {
            return Err(DecodeError::TooLong);
        }
        let admins = (0..count).map(|_| r.array()).collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(GroupMeta {
            name,
            admins,
            members_can_add: flags & MEMBERS_ADD != 0,
            members_can_remove: flags & MEMBERS_REMOVE != 0,
        })
    }
}

/// The ordered list of servers a chat lives on, carried in the MLS group context
/// (extension [`ServerList::EXTENSION_TYPE`]) so every member agrees on it: the chat starts
/// on the first, and moves to the next when the one it is on cannot be reached by any door.
///
/// ```text
/// version u8 (1) · count u8 · server link bytes × count
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList {
    /// Server links (`postern://server#…`), in the order a chat moves through them.
    pub servers: Vec<String>,
}

/// Most servers in a chat's list.
pub const MAX_SERVERS: usize = 8;

impl ServerList {
    /// The group context extension type (from the private-use range).
    pub const EXTENSION_TYPE: u16 = 0xff51;

    /// Wire form (at most [`MAX_SERVERS`], each at most [`MAX_LINK`] bytes: longer lists
    /// are cut, longer links left out).
    pub fn encode(&self) -> Vec<u8> {
        let servers: Vec<&String> =
            self.servers.iter().filter(|s| s.len() <= MAX_LINK).take(MAX_SERVERS).collect();
        let mut w = Writer::new();
        w.u8(VERSION).u8(servers.len() as u8);
        for s in servers {
            w.bytes(s.as_bytes());
        }
        w.finish()
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        version(&mut r)?;
        let count = usize::from(r.u8()?);
        if count > MAX_SERVERS {
            return Err(DecodeError::TooLong);
        }
        let servers = (0..count).map(|_| string(&mut r, MAX_LINK)).collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(ServerList { servers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn every_prefix_fails<T: std::fmt::Debug>(
        bytes: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, DecodeError>,
    ) {
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes decoded");
        }
    }

    #[test]
    fn truncations_and_trailing_bytes_are_refused() {
        let kp = KeyPackagePayload { name: "Alice".into(), key_package: vec![7; 40] }.encode();
        every_prefix_fails(&kp, KeyPackagePayload::decode);
        let welcome = DropPayload::Welcome {
            drop: DropId([1; 32]),
            name: "Bob".into(),
            server: "postern://server#v=1".into(),
            log: LogId([2; 32]),
            after: 9,
            welcome: vec![3; 50],
        }
        .encode();
        every_prefix_fails(&welcome, DropPayload::decode);
        let rejoin = DropPayload::Rejoin {
            drop: DropId([1; 32]),
            group: vec![5; 32],
            server: "postern://server#v=1".into(),
            reply_drop: DropId([6; 32]),
            reply_hpke: [7; 32],
            key_package: vec![8; 40],
            abandoned: None,
        }
        .encode();
        every_prefix_fails(&rejoin, DropPayload::decode);
        // After a fork: the abandoned log comes last, whole or not at all.
        let mut forked = rejoin.clone();
        forked.extend_from_slice(&[9; 32]);
        assert!(matches!(
            DropPayload::decode(&forked),
            Ok(DropPayload::Rejoin { abandoned: Some(LogId([9, ..])), .. })
        ));
        for cut in rejoin.len() + 1..forked.len() {
            assert!(DropPayload::decode(&forked[..cut]).is_err(), "cut at {cut}");
        }
        let mut long_group = rejoin.clone();
        long_group[2 + 32..2 + 36].copy_from_slice(&(MAX_GROUP_ID as u32 + 1).to_be_bytes());
        assert!(DropPayload::decode(&long_group).is_err());
        let msg = AppMessage {
            epoch_tag: [4; 8],
            content: Content::Text { sent_at: 5, body: "hi".into() },
        }
        .encode();
        every_prefix_fails(&msg, AppMessage::decode);
        for bytes in [&kp, &welcome, &rejoin, &msg] {
            let mut long = bytes.clone();
            long.push(0);
            assert!(KeyPackagePayload::decode(&long).is_err());
            assert!(DropPayload::decode(&long).is_err());
            assert!(AppMessage::decode(&long).is_err());
        }
    }

    #[test]
    fn bad_text_and_counts_are_refused() {
        let mut msg = AppMessage {
            epoch_tag: [0; 8],
            content: Content::Text { sent_at: 0, body: "é".into() },
        }
        .encode();
        let last = msg.len() - 1;
        msg[last] = 0xff;
        assert_eq!(AppMessage::decode(&msg), Err(DecodeError::Invalid("UTF-8 text")));
        let request = DropPayload::Request {
            drop: DropId([0; 32]),
            name: "B".into(),
            server: String::new(),
            reply_drop: DropId([1; 32]),
            reply_hpke: [2; 32],
            key_packages: vec![],
        }
        .encode();
        assert_eq!(DropPayload::decode(&request), Err(DecodeError::Invalid("key package count")));
        let mut future = KeyPackagePayload { name: String::new(), key_package: vec![] }.encode();
        future[0] = 2;
        assert_eq!(KeyPackagePayload::decode(&future), Err(DecodeError::UnsupportedVersion(2)));
    }

    proptest! {
        #[test]
        fn key_package_payload_round_trips(name in "\\PC{0,64}", kp in proptest::collection::vec(any::<u8>(), 0..300)) {
            let p = KeyPackagePayload { name, key_package: kp };
            prop_assert_eq!(KeyPackagePayload::decode(&p.encode()), Ok(p));
        }

        #[test]
        fn drop_payload_round_trips(
            kind in 0u8..4,
            ids in any::<[u8; 32]>(),
            name in "\\PC{0,64}",
            server in "\\PC{0,100}",
            after in any::<u64>(),
            blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..4),
        ) {
            let p = match kind {
                0 => DropPayload::Welcome { drop: DropId(ids), name, server, log: LogId(ids), after, welcome: blobs[0].clone() },
                1 => DropPayload::Request { drop: DropId(ids), name, server, reply_drop: DropId(ids), reply_hpke: ids, key_packages: blobs },
                2 => DropPayload::Rejoin { drop: DropId(ids), group: ids.to_vec(), server, reply_drop: DropId(ids), reply_hpke: ids, key_package: blobs[0].clone(), abandoned: None },
                _ => DropPayload::Rejoin { drop: DropId(ids), group: ids.to_vec(), server, reply_drop: DropId(ids), reply_hpke: ids, key_package: blobs[0].clone(), abandoned: Some(LogId(ids)) },
            };
            prop_assert_eq!(DropPayload::decode(&p.encode()), Ok(p));
        }

        #[test]
        fn app_message_round_trips(tag in any::<[u8; 8]>(), sent_at in any::<u64>(), body in "\\PC{0,200}") {
            let m = AppMessage { epoch_tag: tag, content: Content::Text { sent_at, body } };
            prop_assert_eq!(AppMessage::decode(&m.encode()), Ok(m));
        }

        #[test]
        fn cards_profiles_and_group_meta_round_trip(
            ids in any::<[u8; 32]>(),
            name in "\\PC{0,64}",
            admins in proptest::collection::vec(any::<[u8; 32]>(), 0..=MAX_ADMINS),
            add in any::<bool>(),
            remove in any::<bool>(),
        ) {
            for content in [
                Content::Card { server: name.clone(), drop: DropId(ids), hpke: ids, kp_key: ids, token: ids },
                Content::Profile { name: name.clone() },
                Content::Moved { read_to: u64::from_be_bytes(ids[..8].try_into().unwrap()) },
            ] {
                let m = AppMessage { epoch_tag: [1; 8], content };
                prop_assert_eq!(AppMessage::decode(&m.encode()), Ok(m));
            }
            let meta = GroupMeta { name, admins, members_can_add: add, members_can_remove: remove };
            prop_assert_eq!(GroupMeta::decode(&meta.encode()), Ok(meta));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = KeyPackagePayload::decode(&bytes);
            let _ = DropPayload::decode(&bytes);
            let _ = AppMessage::decode(&bytes);
            let _ = GroupMeta::decode(&bytes);
            let _ = ServerList::decode(&bytes);
        }

        #[test]
        fn server_lists_round_trip(servers in proptest::collection::vec("\\PC{0,80}", 0..=MAX_SERVERS)) {
            let list = ServerList { servers };
            prop_assert_eq!(ServerList::decode(&list.encode()), Ok(list));
        }
    }

    #[test]
    fn server_lists_are_bounded() {
        let long = ServerList { servers: vec!["x".repeat(MAX_LINK + 1), "a".into()] };
        assert_eq!(ServerList::decode(&long.encode()).unwrap().servers, vec!["a".to_string()]);
        let many = ServerList { servers: vec!["s".into(); MAX_SERVERS + 3] };
        assert_eq!(ServerList::decode(&many.encode()).unwrap().servers.len(), MAX_SERVERS);
        let mut too_many = ServerList { servers: vec![] }.encode();
        too_many[1] = MAX_SERVERS as u8 + 1;
        assert_eq!(ServerList::decode(&too_many), Err(DecodeError::TooLong));
        every_prefix_fails(&ServerList { servers: vec!["ab".into()] }.encode(), ServerList::decode);
    }
}
