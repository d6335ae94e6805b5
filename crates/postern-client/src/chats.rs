//! Contacts, chats, the outbox and the receive path: the client's state machine.
//!
//! Each public step runs in one transaction of the client store together with openmls' own
//! state ([`Ctx`] carries both), so a crash at any point leaves either the step done or not
//! begun. The steps:
//!
//! - **Queue**: `send` stores the message (`queued`); when its chat is active it is
//!   encrypted, sealed into an envelope and put in the outbox (`sealed`) in the same step.
//! - **Outbox**: requests for the server, oldest first, each with the exact bytes a retry
//!   resends (idempotency key included). When the server acknowledges one, [`outbox_done`]
//!   applies what follows from it: a commit's merge, a message's sequence number, a
//!   Welcome's release.
//! - **Receive**: each log entry after the chat's cursor is opened, processed by MLS, stored
//!   and the cursor moved, in one step; an entry that cannot be opened is skipped with the
//!   cursor moved, in a step of its own. Our own entries are recognised by idempotency key,
//!   never decrypted.
//! - **Mailbox**: each item after the fetch cursor is opened (HPKE) and turned into a chat
//!   (a Welcome) or a request, in one step.

use ed25519_dalek::SigningKey;
use openmls_traits::OpenMlsProvider as _;
use openmls_traits::crypto::OpenMlsCrypto as _;
use openmls_traits::types::{HpkeAeadType, HpkeCiphertext, HpkeConfig, HpkeKdfType, HpkeKemType};
use postern_proto::content::{AppMessage, Content, DropPayload, MAX_TEXT};
use postern_proto::envelope::Envelope;
use postern_proto::ids::{DropId, IdemKey, LogId, MailboxId, PublicKey, TokenHash};
use postern_proto::link::{InviteLink, ServerLink};
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use zeroize::Zeroizing;

use crate::gaps::{self, Gap};
use crate::groups::{self, Invitee, WelcomeTarget};
use crate::identity::{DeviceCredential, Identity, fingerprint};
use crate::mls::{self, EpochKeys, MlsError, Provider, Received};
use crate::{ClientError, envelope};

/// One step's view of the store: the open transaction, openmls over it, and who we are.
pub(crate) struct Ctx<'a> {
    pub(crate) db: &'a Connection,
    pub(crate) mls: Provider<'a>,
    pub(crate) me: &'a Identity,
    pub(crate) server: &'a ServerLink,
}

pub(crate) const MIGRATION: &str = r#"
CREATE TABLE contacts (
    id           INTEGER PRIMARY KEY,
    identity_key BLOB NOT NULL UNIQUE,
    name         TEXT NOT NULL UNIQUE,
    added_at     INTEGER NOT NULL
);
CREATE TABLE chats (
    id          INTEGER PRIMARY KEY,
    ref         TEXT NOT NULL UNIQUE,
    group_id    BLOB NOT NULL UNIQUE,
    contact_id  INTEGER REFERENCES contacts(id),
    server_link TEXT NOT NULL,
    log_id      BLOB NOT NULL,
    cursor      INTEGER NOT NULL,
    active      INTEGER NOT NULL,
    fork_alarm  INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
CREATE TABLE chat_epochs (
    chat_id       INTEGER NOT NULL REFERENCES chats(id),
    epoch         INTEGER NOT NULL,
    key_id        BLOB NOT NULL,
    append_secret BLOB NOT NULL,
    envelope_key  BLOB NOT NULL,
    auth_tag      BLOB NOT NULL,
    PRIMARY KEY (chat_id, epoch)
);
CREATE TABLE messages (
    id         INTEGER PRIMARY KEY,
    chat_id    INTEGER NOT NULL REFERENCES chats(id),
    idem       BLOB NOT NULL,
    seq        INTEGER,
    sender_key BLOB NOT NULL,
    outgoing   INTEGER NOT NULL,
    body       TEXT NOT NULL,
    sent_at    INTEGER NOT NULL,
    state      TEXT NOT NULL,
    seen       INTEGER NOT NULL DEFAULT 0,
    UNIQUE (chat_id, idem)
);
CREATE INDEX messages_by_chat ON messages (chat_id, seq);
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY,
    chat_id     INTEGER REFERENCES chats(id),
    kind        TEXT NOT NULL,
    server_link TEXT NOT NULL,
    target      BLOB NOT NULL,
    idem        BLOB NOT NULL,
    body        BLOB NOT NULL,
    signer      BLOB,
    hpke_key    BLOB,
    message_id  INTEGER REFERENCES messages(id)
);
CREATE TABLE requests (
    id           INTEGER PRIMARY KEY,
    ref          TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    identity_key BLOB NOT NULL,
    payload      BLOB NOT NULL,
    received_at  INTEGER NOT NULL
);
ALTER TABLE mailbox ADD COLUMN fetched INTEGER NOT NULL DEFAULT 0;
ALTER TABLE invites ADD COLUMN used INTEGER NOT NULL DEFAULT 0;
ALTER TABLE invites ADD COLUMN expect_identity BLOB;
"#;

/// Groups: chat kinds and membership state, acknowledged-but-unresolved commits, contact
/// cards, names of group members who are not contacts, and intents.
pub(crate) const MIGRATION_GROUPS: &str = r#"
ALTER TABLE chats ADD COLUMN kind TEXT NOT NULL DEFAULT 'direct';
ALTER TABLE chats ADD COLUMN title TEXT;
ALTER TABLE chats ADD COLUMN state TEXT NOT NULL DEFAULT 'member';
ALTER TABLE chats ADD COLUMN leave_epoch INTEGER;
ALTER TABLE chats ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN acked_seq INTEGER;
ALTER TABLE contacts ADD COLUMN card BLOB;
CREATE TABLE names (
    identity_key BLOB PRIMARY KEY,
    name         TEXT NOT NULL
);
CREATE TABLE own_entries (
    chat_id INTEGER NOT NULL REFERENCES chats(id),
    idem    BLOB NOT NULL,
    PRIMARY KEY (chat_id, idem)
);
CREATE TABLE intents (
    id       INTEGER PRIMARY KEY,
    chat_id  INTEGER NOT NULL REFERENCES chats(id),
    kind     TEXT NOT NULL,
    identity BLOB NOT NULL,
    payload  BLOB,
    state    TEXT NOT NULL
);
"#;

pub(crate) fn dbe(e: rusqlite::Error) -> ClientError {
    ClientError::Store(e.to_string())
}

pub(crate) fn bad(what: &'static str) -> ClientError {
    ClientError::Internal(what)
}

/// Days since the Unix epoch, as the server counts expiry, by this machine's clock (plus
/// `POSTERN_TEST_DAYS_AHEAD`, a test hook, as on the server).
pub fn today() -> u32 {
    let ahead = std::env::var("POSTERN_TEST_DAYS_AHEAD").ok().and_then(|d| d.parse().ok());
    u32::try_from(now_ms() / 86_400_000).unwrap_or(u32::MAX).saturating_add(ahead.unwrap_or(0))
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A fresh idempotency key for something this client sends to `server`, ordered by time
/// for the server's index ([`IdemKey::ordered`]). While `server` is out of reach the time is
/// when it went out of reach, so what is written offline does not tell the server when.
pub(crate) fn fresh_idem(db: &Connection, server: &str) -> Result<IdemKey, ClientError> {
    let now = now_ms() / 1000;
    let since = crate::moves::outage_since(db, server)?;
    Ok(IdemKey::ordered(since.map_or(now, |since| since.min(now)), random()))
}

pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut out);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn arr<const N: usize>(v: &[u8]) -> Result<[u8; N], ClientError> {
    v.try_into().map_err(|_| bad("a stored value has the wrong size"))
}

/// Test hook: with `POSTERN_TEST_PAUSE_AT=<point>` (or `<point>#<n>` for its n-th passage),
/// the process stops at that point of the state machine, says so on stderr and waits to be
/// killed. Crash tests use it to SIGKILL the client at an exact step. Unset, it does nothing.
pub fn pause_point(point: &str) {
    static PASSED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Ok(wanted) = std::env::var("POSTERN_TEST_PAUSE_AT") else { return };
    let (name, nth) = match wanted.split_once('#') {
        Some((name, n)) => (name, n.parse().unwrap_or(1)),
        None => (wanted.as_str(), 1),
    };
    if name != point {
        return;
    }
    if PASSED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 != nth {
        return;
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "postern: paused at {point}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

// ---------------------------------------------------------------------------------------
// Public views

/// A person we are connected with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The name shown here: the one they chose, made unique locally.
    pub name: String,
    /// Their safety number.
    pub fingerprint: String,
}

/// A chat as listed by `chats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSummary {
    /// The chat's local id.
    pub id: String,
    /// The contact's name, or the group's.
    pub name: String,
    /// Messages received and not yet shown by `read`.
    pub unread: u64,
    /// False until the chat's creation has reached the server.
    pub active: bool,
    /// Set when a member's view of the group differs from ours (a fork).
    pub fork_alarm: bool,
    /// A group (not a 1:1 chat).
    pub group: bool,
    /// False once we have left or been removed.
    pub member: bool,
    /// This device fell behind the group's history and waits to be re-added.
    pub rejoining: bool,
}

/// Where an outgoing message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    /// Waiting for its chat to be ready, or encrypted and waiting for the server.
    Queued,
    /// The server has it durably.
    Sent,
    /// The server refused it for good.
    Failed,
    /// Received from another member.
    Received,
}

impl MessageState {
    fn parse(s: &str) -> Self {
        match s {
            "sent" => MessageState::Sent,
            "failed" => MessageState::Failed,
            "received" => MessageState::Received,
            _ => MessageState::Queued,
        }
    }

    /// The word `--json` output uses.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Sent => "sent",
            MessageState::Failed => "failed",
            MessageState::Received => "received",
        }
    }
}

/// A message in a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The chat's id.
    pub chat: String,
    /// Position in the chat's log, once the server has it.
    pub seq: Option<u64>,
    /// Who wrote it (our own name for ours).
    pub from: String,
    /// Whether we (this or another of our devices) wrote it.
    pub outgoing: bool,
    /// The text.
    pub text: String,
    /// The sender's clock at sending, ms since the Unix epoch.
    pub sent_at: u64,
    /// Where it stands.
    pub state: MessageState,
}

/// A pending request to connect through one of our addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The request's local id, for `accept`.
    pub id: String,
    /// The name the requester chose.
    pub name: String,
    /// The requester's safety number.
    pub fingerprint: String,
}

/// Something that happened while receiving.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A new chat with a contact.
    Connected {
        /// The chat's id.
        chat: String,
        /// The contact's name.
        contact: String,
    },
    /// A message arrived.
    Message(Message),
    /// Someone asks to connect.
    Request(ConnectRequest),
    /// A log entry could not be opened and was skipped.
    Skipped {
        /// The chat.
        chat: String,
        /// Its position.
        seq: u64,
    },
    /// A member's epoch authenticator differs from ours: the group has forked.
    ForkAlarm {
        /// The chat.
        chat: String,
    },
    /// A message could not be delivered (the server refused it for good).
    Failed {
        /// The chat.
        chat: String,
    },
    /// We were removed from a group (or our leave was committed).
    Removed {
        /// The chat.
        chat: String,
    },
    /// Entries of a chat's log expired on the server before this device read them.
    HistoryLost {
        /// The chat.
        chat: String,
        /// How many.
        entries: u64,
    },
    /// This device fell behind a group's history (a commit expired unread, or a fork) and
    /// asked `asked` members to re-add it; with none to ask, someone must add it again.
    Rejoining {
        /// The chat.
        chat: String,
        /// How many members were asked.
        asked: usize,
        /// Whether this asks again: nobody answered for the retry time.
        again: bool,
    },
    /// We are in a chat again: re-added after falling behind (`lost`), or added back.
    Rejoined {
        /// The chat.
        chat: String,
        /// Whether history between our old and new state is lost to this device.
        lost: bool,
    },
    /// Our home server was out of reach for the failover time: the mailbox moved to the
    /// next server of our list, and our contacts were sent cards naming it.
    HomeMoved {
        /// The new home server's addresses.
        addrs: Vec<String>,
        /// How many contacts were sent a new card.
        cards: usize,
    },
}

/// One item of a chat's history as `read` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryItem {
    /// A message.
    Message(Message),
    /// History this device does not have.
    Gap(Gap),
}

/// One request for the server, as the outbox holds it.
#[derive(Debug)]
pub struct OutboxItem {
    /// The outbox row.
    pub id: i64,
    /// The server it goes to.
    pub server: ServerLink,
    /// What to do.
    pub op: OutboxOp,
}

/// The operation of an outbox item; the driver turns it into a request (uploading large
/// bodies in chunks first).
pub enum OutboxOp {
    /// Create a log with its first append key, signed by that key.
    LogCreate {
        /// The log.
        log: LogId,
        /// The key that signs `log_create` and the first appends.
        key: SigningKey,
    },
    /// Append an envelope.
    Append {
        /// The log.
        log: LogId,
        /// The envelope's idempotency key (also the upload id of a large one).
        idem: IdemKey,
        /// The envelope.
        envelope: Vec<u8>,
        /// The append key that signed it, while we still hold it: the driver proves holding
        /// it once per connection (`log_auth`), so the server need not check each signature.
        key: Option<SigningKey>,
    },
    /// Drop a sealed payload into someone's mailbox.
    Drop {
        /// The drop address.
        drop: DropId,
        /// The drop's idempotency key.
        idem: IdemKey,
        /// The sealed payload.
        body: Vec<u8>,
    },
    /// Register a claim token (for a contact card) on our mailbox, signed by the owner key.
    ClaimTokenCreate {
        /// Our mailbox.
        mailbox: MailboxId,
        /// The token's hash.
        token_hash: TokenHash,
        /// When it expires.
        expires_day: u32,
        /// Claims allowed per day.
        per_day: u16,
        /// The owner key.
        owner: SigningKey,
    },
    /// Register a drop address on our mailbox, signed by the owner key.
    DropCreate {
        /// Our mailbox.
        mailbox: MailboxId,
        /// The address.
        drop: DropId,
        /// The owner key.
        owner: SigningKey,
    },
}

impl std::fmt::Debug for OutboxOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutboxOp::LogCreate { .. } => "LogCreate",
            OutboxOp::Append { .. } => "Append",
            OutboxOp::Drop { .. } => "Drop",
            OutboxOp::DropCreate { .. } => "DropCreate",
            OutboxOp::ClaimTokenCreate { .. } => "ClaimTokenCreate",
        })
    }
}

/// A chat's log, for reading.
#[derive(Debug, Clone)]
pub struct LogCursor {
    /// The chat's id.
    pub chat: String,
    /// The server holding the log.
    pub server: ServerLink,
    /// The log.
    pub log: LogId,
    /// The last entry applied.
    pub cursor: u64,
}

// ---------------------------------------------------------------------------------------
// HPKE for mailbox drops

const HPKE: HpkeConfig =
    HpkeConfig(HpkeKemType::DhKem25519, HpkeKdfType::HkdfSha256, HpkeAeadType::ChaCha20Poly1305);
const HPKE_INFO: &[u8] = b"postern/v1/drop";
const KEM_OUTPUT: usize = 32;

/// HPKE-seals a drop payload to a mailbox key: `kem_output [32] · ciphertext`.
pub(crate) fn seal_drop(
    provider: &Provider<'_>,
    hpke_key: &[u8; 32],
    payload: &DropPayload,
) -> Result<Vec<u8>, ClientError> {
    let ct = provider
        .crypto()
        .hpke_seal(HPKE, hpke_key, HPKE_INFO, b"", &payload.encode())
        .map_err(|_| bad("HPKE sealing failed"))?;
    Ok([ct.kem_output.as_slice(), ct.ciphertext.as_slice()].concat())
}

fn open_drop(
    provider: &Provider<'_>,
    private: &[u8; 32],
    sealed: &[u8],
) -> Result<DropPayload, MlsError> {
    if sealed.len() < KEM_OUTPUT {
        return Err(MlsError::Invalid);
    }
    let (kem, ct) = sealed.split_at(KEM_OUTPUT);
    let input = HpkeCiphertext { kem_output: kem.to_vec().into(), ciphertext: ct.to_vec().into() };
    let plain = Zeroizing::new(
        provider
            .crypto()
            .hpke_open(HPKE, &input, private, HPKE_INFO, b"")
            .map_err(|_| MlsError::Invalid)?,
    );
    DropPayload::decode(&plain).map_err(|_| MlsError::Invalid)
}

// ---------------------------------------------------------------------------------------
// Small store helpers

pub(crate) fn new_ref(db: &Connection, table: &str) -> Result<String, ClientError> {
    loop {
        let candidate = hex(&random::<4>());
        let taken: bool = db
            .query_row(
                &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE ref = ?1)"),
                [&candidate],
                |r| r.get(0),
            )
            .map_err(dbe)?;
        if !taken {
            return Ok(candidate);
        }
    }
}

/// The contact for an identity, created when new with a name unique among our contacts and
/// different from our own.
pub(crate) fn contact_for(
    ctx: &Ctx<'_>,
    identity: &PublicKey,
    chosen: &str,
) -> Result<(i64, String), ClientError> {
    let db = ctx.db;
    if let Some(found) = db
        .query_row(
            "SELECT id, name FROM contacts WHERE identity_key = ?1",
            [&identity.0[..]],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(dbe)?
    {
        return Ok(found);
    }
    let chosen = if crate::check_name(chosen).is_ok() { chosen } else { "Unnamed" };
    let mut name = chosen.to_owned();
    let mut n = 2;
    loop {
        let taken: bool = db
            .query_row("SELECT EXISTS (SELECT 1 FROM contacts WHERE name = ?1)", [&name], |r| {
                r.get(0)
            })
            .map_err(dbe)?;
        if !taken && name != ctx.me.name {
            break;
        }
        name = format!("{chosen} ({n})");
        n += 1;
    }
    db.execute(
        "INSERT INTO contacts (identity_key, name, added_at) VALUES (?1, ?2, ?3)",
        params![&identity.0[..], name, now_ms() / 1000],
    )
    .map_err(dbe)?;
    Ok((db.last_insert_rowid(), name))
}

pub(crate) fn save_epoch(db: &Connection, chat: i64, keys: &EpochKeys) -> Result<(), ClientError> {
    // An epoch saved again keeps where we entered it.
    db.execute(
        "INSERT INTO chat_epochs
             (chat_id, epoch, key_id, append_secret, envelope_key, auth_tag, since_generation, since_seq)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, generation, cursor FROM chats WHERE id = ?1
         ON CONFLICT (chat_id, epoch) DO UPDATE SET key_id = excluded.key_id,
             append_secret = excluded.append_secret, envelope_key = excluded.envelope_key,
             auth_tag = excluded.auth_tag",
        params![
            chat,
            keys.epoch,
            &keys.append_public().key_id().0[..],
            &keys.append_key.to_bytes()[..],
            &keys.envelope_key[..],
            &keys.authenticator_tag[..],
        ],
    )
    .map_err(dbe)?;
    // Keep the epochs whose messages MLS still accepts (the current one and two before).
    db.execute(
        "DELETE FROM chat_epochs WHERE chat_id = ?1 AND epoch + 2 < ?2",
        params![chat, keys.epoch],
    )
    .map_err(dbe)?;
    Ok(())
}

/// The keys of every epoch kept for a chat (the current one and two before), oldest first.
pub(crate) fn stored_epochs(db: &Connection, chat: i64) -> Result<Vec<EpochKeys>, ClientError> {
    let key_ids: Vec<Vec<u8>> = {
        let mut stmt = db
            .prepare_cached("SELECT key_id FROM chat_epochs WHERE chat_id = ?1 ORDER BY epoch")
            .map_err(dbe)?;
        let rows = stmt.query_map([chat], |r| r.get(0)).map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    let mut out = Vec::new();
    for key_id in key_ids {
        out.extend(epoch_by_key_id(db, chat, &key_id)?);
    }
    Ok(out)
}

fn epoch_by_key_id(
    db: &Connection,
    chat: i64,
    key_id: &[u8],
) -> Result<Option<EpochKeys>, ClientError> {
    type Row = (u64, Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>, Vec<u8>);
    let row: Option<Row> = db
        .query_row(
            "SELECT epoch, append_secret, envelope_key, auth_tag FROM chat_epochs
             WHERE chat_id = ?1 AND key_id = ?2",
            params![chat, key_id],
            |r| Ok((r.get(0)?, Zeroizing::new(r.get(1)?), Zeroizing::new(r.get(2)?), r.get(3)?)),
        )
        .optional()
        .map_err(dbe)?;
    let Some((epoch, append, envelope_key, tag)) = row else { return Ok(None) };
    Ok(Some(EpochKeys {
        log_id: LogId([0; 32]),
        append_key: SigningKey::from_bytes(&arr(&append)?),
        envelope_key: arr(&envelope_key)?,
        epoch,
        authenticator_tag: arr(&tag)?,
    }))
}

pub(crate) struct ChatRow {
    pub(crate) id: i64,
    pub(crate) reference: String,
    pub(crate) group_id: Vec<u8>,
    pub(crate) log: LogId,
    pub(crate) cursor: u64,
    pub(crate) active: bool,
    pub(crate) kind: String,
    pub(crate) state: String,
    pub(crate) server: String,
    pub(crate) leave_epoch: Option<u64>,
}

pub(crate) fn chat_row(
    db: &Connection,
    where_: &str,
    arg: &dyn rusqlite::ToSql,
) -> Result<Option<ChatRow>, ClientError> {
    let row = db
        .query_row(
            &format!(
                "SELECT id, ref, group_id, log_id, cursor, active, kind, state, server_link, leave_epoch
                 FROM chats WHERE {where_}"
            ),
            [arg],
            |r| {
                Ok((
                    (r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?),
                    (r.get::<_, Vec<u8>>(3)?, r.get::<_, u64>(4)?, r.get::<_, bool>(5)?),
                    (r.get::<_, String>(6)?, r.get::<_, String>(7)?, r.get::<_, String>(8)?),
                    r.get::<_, Option<u64>>(9)?,
                ))
            },
        )
        .optional()
        .map_err(dbe)?;
    let Some((
        (id, reference, group_id),
        (log, cursor, active),
        (kind, state, server),
        leave_epoch,
    )) = row
    else {
        return Ok(None);
    };
    Ok(Some(ChatRow {
        id,
        reference,
        group_id,
        log: LogId(arr(&log)?),
        cursor,
        active,
        kind,
        state,
        server,
        leave_epoch,
    }))
}

pub(crate) fn identity_name(ctx: &Ctx<'_>, identity: &PublicKey) -> Result<String, ClientError> {
    if *identity == ctx.me.identity_public() {
        return Ok(ctx.me.name.clone());
    }
    // A contact by our name for them; a group member who is not a contact by the name they
    // chose, marked so nobody passes for a contact.
    let name: Option<String> = ctx
        .db
        .query_row(
            "SELECT name FROM contacts WHERE identity_key = ?1
             UNION ALL SELECT name || ' (not a contact)' FROM names WHERE identity_key = ?1
             LIMIT 1",
            [&identity.0[..]],
            |r| r.get(0),
        )
        .optional()
        .map_err(dbe)?;
    Ok(name.unwrap_or_else(|| "unknown".to_owned()))
}

pub(crate) fn mailbox_keys(ctx: &Ctx<'_>) -> Result<crate::MailboxKeys, ClientError> {
    crate::store::read_mailbox(ctx.db)?.map(|(k, _)| k).ok_or(bad("no mailbox"))
}

pub(crate) fn insert_outbox(
    db: &Connection,
    chat: Option<i64>,
    kind: &str,
    server: &str,
    target: &[u8],
    body: &[u8],
    extra: (Option<&[u8]>, Option<&[u8]>, Option<i64>),
) -> Result<(), ClientError> {
    let (signer, hpke_key, message) = extra;
    // An envelope's own idempotency key, so we recognise it when we read it back.
    let idem = match kind {
        "commit" | "message" | "proposal" => {
            Envelope::decode(body).map_err(|_| bad("queued envelope does not decode"))?.idem.0
        }
        _ => fresh_idem(db, server)?.0,
    };
    db.execute(
        "INSERT INTO outbox (chat_id, kind, server_link, target, idem, body, signer, hpke_key, message_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![chat, kind, server, target, &idem[..], body, signer, hpke_key, message],
    )
    .map_err(dbe)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Creating chats

/// `connect` with a one-time invite: the inviter's key packages were claimed with its token.
pub(crate) fn connect_once(
    ctx: &Ctx<'_>,
    link: &InviteLink,
    sealed: &[Vec<u8>],
) -> Result<(String, String), ClientError> {
    let payloads = groups::open_key_packages(&link.kp_key, sealed)?;
    let name = payloads.first().map(|p| p.name.clone()).ok_or(MlsError::Invalid)?;
    let invitee = Invitee {
        identity: link.identity.0,
        name,
        key_packages: payloads.into_iter().map(|p| p.key_package).collect(),
        welcome_to: WelcomeTarget {
            server: link.server.to_link_string(),
            drop: link.drop.0,
            hpke: link.hpke_key,
        },
    };
    groups::create_chat(ctx, vec![invitee], None)
}

/// `connect` with an address: queue a request with this device's key package and a fresh
/// drop address of ours for the Welcome.
pub(crate) fn request_connect(ctx: &Ctx<'_>, link: &InviteLink) -> Result<(), ClientError> {
    let keys = mailbox_keys(ctx)?;
    let (_, hpke_public) = crate::store::hpke_keypair(ctx.db)?;
    let reply = DropId(random());
    ctx.db
        .execute(
            "INSERT INTO invites (drop_id, token, kind, expires, expect_identity) VALUES (?1, ?2, 'reply', ?3, ?4)",
            params![&reply.0[..], &[0u8; 32][..], u32::MAX, &link.identity.0[..]],
        )
        .map_err(dbe)?;
    let kp = mls::new_key_package(&ctx.mls, ctx.me, false)?;
    let payload = DropPayload::Request {
        drop: link.drop,
        name: ctx.me.name.clone(),
        server: ctx.server.to_link_string(),
        reply_drop: reply,
        reply_hpke: hpke_public,
        key_packages: vec![kp],
    };
    let sealed = seal_drop(&ctx.mls, &link.hpke_key, &payload)?;
    let owner = keys.owner.to_bytes();
    insert_outbox(
        ctx.db,
        None,
        "drop_create",
        &ctx.server.to_link_string(),
        &reply.0,
        &keys.mailbox.0,
        (Some(&owner[..]), None, None),
    )?;
    insert_outbox(
        ctx.db,
        None,
        "drop",
        &link.server.to_link_string(),
        &link.drop.0,
        &sealed,
        (None, None, None),
    )?;
    Ok(())
}

/// `accept`: create the chat with the requester.
pub(crate) fn accept(ctx: &Ctx<'_>, request: &str) -> Result<(String, String), ClientError> {
    let row: Option<(i64, Vec<u8>)> = ctx
        .db
        .query_row("SELECT id, payload FROM requests WHERE ref = ?1", [request], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(dbe)?;
    let (id, payload) = row.ok_or_else(|| ClientError::NotFound(request.to_owned()))?;
    let Ok(DropPayload::Request { name, server, reply_drop, reply_hpke, key_packages, .. }) =
        DropPayload::decode(&payload)
    else {
        return Err(bad("a stored request does not decode"));
    };
    let identity = request_identity(&ctx.mls, &key_packages)?;
    ctx.db.execute("DELETE FROM requests WHERE id = ?1", [id]).map_err(dbe)?;
    let welcome_to = WelcomeTarget { server, drop: reply_drop.0, hpke: reply_hpke };
    let invitee = Invitee { identity: identity.0, name, key_packages, welcome_to };
    groups::create_chat(ctx, vec![invitee], None)
}

/// The one identity behind a request's key packages.
fn request_identity(
    provider: &Provider<'_>,
    key_packages: &[Vec<u8>],
) -> Result<PublicKey, MlsError> {
    let mut identity = None;
    for kp in key_packages {
        let kp = mls::peer_key_package(provider, kp)?;
        let leaf = kp.leaf_node();
        let device = mls::check_credential(leaf.credential(), leaf.signature_key().as_slice())?;
        if identity.is_some_and(|i| i != device.identity_key) {
            return Err(MlsError::BadCredential);
        }
        identity = Some(device.identity_key);
    }
    identity.ok_or(MlsError::Invalid)
}

// ---------------------------------------------------------------------------------------
// Sending

/// Finds a chat by id or by its contact's name.
pub(crate) fn resolve(ctx: &Ctx<'_>, chat: &str) -> Result<ChatRow, ClientError> {
    if let Some(row) = chat_row(ctx.db, "ref = ?1", &chat)? {
        return Ok(row);
    }
    if let Some(row) = chat_row(
        ctx.db,
        "contact_id = (SELECT id FROM contacts WHERE name = ?1) ORDER BY id DESC LIMIT 1",
        &chat,
    )? {
        return Ok(row);
    }
    // A group by its name (the newest one we are still in, if several share it).
    let groups: Vec<String> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT ref FROM chats WHERE kind = 'group' ORDER BY state = 'left', id DESC",
            )
            .map_err(dbe)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    for reference in groups {
        let row = chat_row(ctx.db, "ref = ?1", &reference)?.ok_or(bad("chat vanished"))?;
        if mls::group_meta(&ctx.mls, &row.group_id)?.is_some_and(|m| m.name == chat) {
            return Ok(row);
        }
    }
    Err(ClientError::NotFound(chat.to_owned()))
}

/// Stores an outgoing message, sealing it at once when the chat is ready. Returns its id.
pub(crate) fn queue_message(ctx: &Ctx<'_>, chat: &str, text: &str) -> Result<i64, ClientError> {
    if text.is_empty() || text.len() > MAX_TEXT {
        return Err(ClientError::InvalidMessage);
    }
    let chat = resolve(ctx, chat)?;
    if chat.state == "left" {
        return Err(ClientError::NotAMember(chat.reference));
    }
    ctx.db
        .execute(
            "INSERT INTO messages (chat_id, idem, sender_key, outgoing, body, sent_at, state, seen)
             VALUES (?1, ?2, ?3, 1, ?4, ?5, 'queued', 1)",
            params![
                chat.id,
                &fresh_idem(ctx.db, &chat.server)?.0[..],
                &ctx.me.identity_public().0[..],
                text,
                now_ms()
            ],
        )
        .map_err(dbe)?;
    let id = ctx.db.last_insert_rowid();
    groups::pump(ctx, chat.id)?;
    Ok(id)
}

/// The queued messages of a chat found without reading its whole history: sending looked
/// for them among every message of the chat, each time (BENCHMARKS.md, client).
pub(crate) const MIGRATION_QUEUED: &str = r#"
CREATE INDEX messages_queued ON messages (chat_id, id) WHERE state = 'queued';
"#;

/// Encrypts and seals every queued message of an active chat into the outbox under the
/// epoch's `keys` (only when no commit or proposal waits: [`groups::pump`] decides).
pub(crate) fn seal_queued(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    keys: &EpochKeys,
) -> Result<(), ClientError> {
    seal_controls(ctx, chat)?;
    let queued: Vec<(i64, Vec<u8>, String, u64)> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT m.id, m.idem, m.body, m.sent_at FROM messages m
                 WHERE m.chat_id = ?1 AND m.state = 'queued'
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = m.id)
                 ORDER BY m.id",
            )
            .map_err(dbe)?;
        let rows = stmt
            .query_map([chat.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    for (id, idem, body, sent_at) in queued {
        let plain = AppMessage {
            epoch_tag: keys.authenticator_tag,
            content: Content::Text { sent_at, body },
        }
        .encode();
        let mls_message = mls::encrypt(&ctx.mls, ctx.me, &chat.group_id, &plain)?;
        let message = Some((id, IdemKey(arr(&idem)?)));
        queue_envelope(ctx, chat, keys, "message", None, &mls_message, message)?;
    }
    Ok(())
}

/// Seals an MLS message (an application message, a proposal, a commit carrying the next
/// epoch's append key) with `keys` for the chat's log and queues it. A text message keeps
/// its row's idempotency key; anything else gets a fresh one.
/// Control messages (cards, profiles) have no row among the chat's messages: the outbox
/// keeps their plaintext, so that one unsealed before it went out (the chat moved, or its
/// log rotated) waits in `controls` and is sealed again, like a queued message.
pub(crate) const MIGRATION_CONTROLS: &str = r#"
ALTER TABLE outbox ADD COLUMN control BLOB;
CREATE TABLE controls (
    id      INTEGER PRIMARY KEY,
    chat_id INTEGER NOT NULL REFERENCES chats(id),
    plain   BLOB NOT NULL
);
"#;

/// Encrypts a control message (a card, a profile) into the chat's outbox now.
pub(crate) fn queue_control(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    content: Content,
) -> Result<(), ClientError> {
    let keys = mls::epoch_keys(&ctx.mls, &chat.group_id)?;
    let plain = Zeroizing::new(AppMessage { epoch_tag: keys.authenticator_tag, content }.encode());
    let mls_message = mls::encrypt(&ctx.mls, ctx.me, &chat.group_id, &plain)?;
    queue_envelope(ctx, chat, &keys, "message", None, &mls_message, None)?;
    ctx.db
        .execute(
            "UPDATE outbox SET control = ?2 WHERE id = ?1",
            params![ctx.db.last_insert_rowid(), &plain[..]],
        )
        .map_err(dbe)?;
    Ok(())
}

/// Seals again the control messages that were unsealed before they went out.
fn seal_controls(ctx: &Ctx<'_>, chat: &ChatRow) -> Result<(), ClientError> {
    let waiting: Vec<(i64, Zeroizing<Vec<u8>>)> = {
        let mut stmt = ctx
            .db
            .prepare_cached("SELECT id, plain FROM controls WHERE chat_id = ?1 ORDER BY id")
            .map_err(dbe)?;
        let rows = stmt
            .query_map([chat.id], |r| Ok((r.get(0)?, Zeroizing::new(r.get(1)?))))
            .map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    for (id, plain) in waiting {
        let message = AppMessage::decode(&plain).map_err(|_| bad("a stored control message"))?;
        queue_control(ctx, chat, message.content)?;
        ctx.db.execute("DELETE FROM controls WHERE id = ?1", [id]).map_err(dbe)?;
    }
    Ok(())
}

pub(crate) fn queue_envelope(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    keys: &EpochKeys,
    kind: &str,
    next_key: Option<PublicKey>,
    mls_message: &[u8],
    message: Option<(i64, IdemKey)>,
) -> Result<(), ClientError> {
    let idem = match message {
        Some((_, idem)) => idem,
        None => fresh_idem(ctx.db, &chat.server)?,
    };
    let env = envelope::seal(keys, &chat.log, idem, next_key, mls_message)?;
    let extra = (None, None, message.map(|(id, _)| id));
    insert_outbox(ctx.db, Some(chat.id), kind, &chat.server, &chat.log.0, &env, extra)
}

/// The oldest outbox item that can go now.
pub(crate) fn next_outbox(ctx: &Ctx<'_>, skip: &[i64]) -> Result<Option<OutboxItem>, ClientError> {
    type Row =
        (i64, String, String, Vec<u8>, Vec<u8>, Vec<u8>, Option<Zeroizing<Vec<u8>>>, Option<i64>);
    let mut stmt = ctx
        .db
        .prepare_cached(
            "SELECT id, kind, server_link, target, idem, body, signer, chat_id FROM outbox
             WHERE kind <> 'welcome' AND acked_seq IS NULL
               -- Addresses on our mailbox wait until it is published (after a move).
               AND NOT (kind IN ('drop_create', 'claim_token_create')
                        AND coalesce((SELECT published FROM mailbox WHERE id = 1), 1) = 0)
             ORDER BY id",
        )
        .map_err(dbe)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get::<_, Option<Vec<u8>>>(6)?.map(Zeroizing::new),
                r.get(7)?,
            ))
        })
        .map_err(dbe)?;
    for row in rows {
        let (id, kind, server, target, idem, body, signer, chat): Row = row.map_err(dbe)?;
        if skip.contains(&id) {
            continue;
        }
        let signer = || -> Result<SigningKey, ClientError> {
            Ok(SigningKey::from_bytes(&arr(signer
                .as_deref()
                .ok_or(bad("unsigned outbox item"))?)?))
        };
        let op = match kind.as_str() {
            "log_create" => OutboxOp::LogCreate { log: LogId(arr(&target)?), key: signer()? },
            "commit" | "message" | "proposal" => {
                let key = match (chat, Envelope::key_id_of(&body)) {
                    (Some(chat), Some(key_id)) => {
                        epoch_by_key_id(ctx.db, chat, &key_id.0)?.map(|k| k.append_key)
                    }
                    _ => None,
                };
                OutboxOp::Append {
                    log: LogId(arr(&target)?),
                    idem: IdemKey(arr(&idem)?),
                    envelope: body,
                    key,
                }
            }
            "drop" => {
                OutboxOp::Drop { drop: DropId(arr(&target)?), idem: IdemKey(arr(&idem)?), body }
            }
            "drop_create" => OutboxOp::DropCreate {
                mailbox: MailboxId(arr(&body)?),
                drop: DropId(arr(&target)?),
                owner: signer()?,
            },
            "claim_token_create" => {
                // body: mailbox [32] · expires_day u32 · claims per day u16
                let (mailbox, rest) = body.split_at_checked(32).ok_or(bad("claim token item"))?;
                let (day, per_day) = rest.split_at_checked(4).ok_or(bad("claim token item"))?;
                OutboxOp::ClaimTokenCreate {
                    mailbox: MailboxId(arr(mailbox)?),
                    token_hash: TokenHash(arr(&target)?),
                    expires_day: u32::from_be_bytes(arr(day)?),
                    per_day: u16::from_be_bytes(arr(per_day)?),
                    owner: signer()?,
                }
            }
            _ => return Err(bad("unknown outbox item")),
        };
        return Ok(Some(OutboxItem { id, server: ServerLink::parse(&server)?, op }));
    }
    Ok(None)
}

/// The server acknowledged an outbox item (`seq` for appends and drops). A message records
/// its place. A commit only records its place: whether it won is decided when the log is
/// read up to it ([`groups::resolve_own_commit`]); until then it stays, and nothing after it
/// in its chat is sealed.
pub(crate) fn outbox_done(ctx: &Ctx<'_>, id: i64, seq: Option<u64>) -> Result<(), ClientError> {
    let row: Option<(String, Option<i64>)> = ctx
        .db
        .query_row("SELECT kind, message_id FROM outbox WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(dbe)?;
    let Some((kind, message)) = row else { return Ok(()) };
    if kind == "commit" {
        let seq = seq.ok_or(bad("commit without seq"))?;
        ctx.db
            .execute("UPDATE outbox SET acked_seq = ?2 WHERE id = ?1", params![id, seq])
            .map_err(dbe)?;
        return Ok(());
    }
    // Our control messages and proposals have no message row: remember their keys so we
    // recognise them when we read the log.
    if (kind == "message" && message.is_none()) || kind == "proposal" {
        ctx.db
            .execute(
                "INSERT OR IGNORE INTO own_entries (chat_id, idem)
                 SELECT chat_id, idem FROM outbox WHERE id = ?1",
                [id],
            )
            .map_err(dbe)?;
    }
    ctx.db.execute("DELETE FROM outbox WHERE id = ?1", [id]).map_err(dbe)?;
    if kind == "message" {
        ctx.db
            .execute(
                "UPDATE messages SET state = 'sent', seq = ?2,
                     generation = (SELECT generation FROM chats WHERE chats.id = messages.chat_id)
                 WHERE id = ?1",
                params![message, seq],
            )
            .map_err(dbe)?;
    }
    Ok(())
}

/// Chats with a commit of ours acknowledged and not yet resolved (including a new chat
/// whose first commit is): their logs must be read up to it.
pub(crate) fn unresolved(ctx: &Ctx<'_>) -> Result<Vec<LogCursor>, ClientError> {
    let mut stmt = ctx
        .db
        .prepare_cached(
            "SELECT ref, server_link, log_id, cursor FROM chats c WHERE state <> 'left'
             AND EXISTS (SELECT 1 FROM outbox o WHERE o.chat_id = c.id AND o.acked_seq IS NOT NULL)",
        )
        .map_err(dbe)?;
    cursors(&mut stmt)
}

fn cursors(stmt: &mut rusqlite::Statement<'_>) -> Result<Vec<LogCursor>, ClientError> {
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?, r.get(3)?))
        })
        .map_err(dbe)?;
    let mut out = Vec::new();
    for row in rows {
        let (chat, server, log, cursor) = row.map_err(dbe)?;
        out.push(LogCursor {
            chat,
            server: ServerLink::parse(&server)?,
            log: LogId(arr(&log)?),
            cursor,
        });
    }
    Ok(out)
}

/// The server refused an outbox item for good: drop it (and fail its message).
pub(crate) fn outbox_failed(ctx: &Ctx<'_>, id: i64) -> Result<Option<Event>, ClientError> {
    let row: Option<(Option<i64>, Option<i64>)> = ctx
        .db
        .query_row("SELECT chat_id, message_id FROM outbox WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(dbe)?;
    ctx.db.execute("DELETE FROM outbox WHERE id = ?1", [id]).map_err(dbe)?;
    let Some((chat, message)) = row else { return Ok(None) };
    if let Some(message) = message {
        ctx.db
            .execute("UPDATE messages SET state = 'failed' WHERE id = ?1", [message])
            .map_err(dbe)?;
    }
    let Some(chat) = chat else { return Ok(None) };
    let reference = chat_row(ctx.db, "id = ?1", &chat)?.map(|c| c.reference).unwrap_or_default();
    Ok(Some(Event::Failed { chat: reference }))
}

/// Where an outgoing message stands.
pub(crate) fn message_state(ctx: &Ctx<'_>, id: i64) -> Result<MessageState, ClientError> {
    let state: String = ctx
        .db
        .query_row("SELECT state FROM messages WHERE id = ?1", [id], |r| r.get(0))
        .map_err(dbe)?;
    Ok(MessageState::parse(&state))
}

/// If a sent message landed right after the last entry read in its chat's log, moves the
/// chat's cursor past it (all reading it back would do, for our own entry) and returns the
/// log: nothing came between the read its sealing rests on and the message, so there is
/// nothing it must be sealed again for.
pub(crate) fn pass_own(ctx: &Ctx<'_>, id: i64) -> Result<Option<LogId>, ClientError> {
    let log: Option<Vec<u8>> = ctx
        .db
        .query_row(
            "UPDATE chats SET cursor = cursor + 1
             WHERE id = (SELECT chat_id FROM messages WHERE id = ?1)
               AND cursor + 1 = (SELECT seq FROM messages WHERE id = ?1 AND state = 'sent'
                                 AND generation = chats.generation)
             RETURNING log_id",
            [id],
            |r| r.get(0),
        )
        .optional()
        .map_err(dbe)?;
    log.map(|l| arr(&l).map(LogId)).transpose()
}

// ---------------------------------------------------------------------------------------
// Receiving

/// Our messages that landed in the chat's previous log (the generation before) after `seq`
/// go out again, to the log it has now, with their idempotency keys.
pub(crate) fn resend_after(db: &Connection, chat: i64, seq: u64) -> Result<(), ClientError> {
    db.execute(
        "UPDATE messages SET state = 'queued', seq = NULL
         WHERE chat_id = ?1 AND outgoing = 1 AND state = 'sent' AND seq > ?2
           AND generation = (SELECT generation - 1 FROM chats WHERE id = ?1)",
        params![chat, seq],
    )
    .map_err(dbe)?;
    Ok(())
}

/// What was sealed for a group state we no longer have is sealed again: messages in the
/// chat's outbox go back to queued, and its items of `kinds` (only those bound for `log`,
/// when given) are dropped.
pub(crate) fn unseal(
    ctx: &Ctx<'_>,
    chat: i64,
    kinds: &[&str],
    log: Option<&LogId>,
) -> Result<(), ClientError> {
    let kinds = kinds.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
    let log = log.map(|l| l.0.to_vec());
    ctx.db
        .execute(
            "UPDATE messages SET state = 'queued' WHERE id IN (SELECT message_id FROM outbox
             WHERE chat_id = ?1 AND kind = 'message' AND (?2 IS NULL OR target = ?2))",
            params![chat, log],
        )
        .map_err(dbe)?;
    ctx.db
        .execute(
            "INSERT INTO controls (chat_id, plain) SELECT chat_id, control FROM outbox
             WHERE chat_id = ?1 AND kind = 'message' AND control IS NOT NULL
               AND (?2 IS NULL OR target = ?2) ORDER BY id",
            params![chat, log],
        )
        .map_err(dbe)?;
    ctx.db
        .execute(
            &format!(
                "DELETE FROM outbox WHERE chat_id = ?1 AND kind IN ({kinds})
                 AND (?2 IS NULL OR target = ?2)"
            ),
            params![chat, log],
        )
        .map_err(dbe)?;
    Ok(())
}

/// Every active chat's log and cursor.
pub(crate) fn logs(ctx: &Ctx<'_>) -> Result<Vec<LogCursor>, ClientError> {
    let mut stmt = ctx
        .db
        .prepare_cached(
            "SELECT ref, server_link, log_id, cursor FROM chats
             WHERE active = 1 AND state NOT IN ('left', 'stale') ORDER BY id",
        )
        .map_err(dbe)?;
    cursors(&mut stmt)
}

/// The chat reading `log`, if `seq` is past its cursor (entries at or before it are done;
/// entries of a log the chat has left behind belong to no chat).
fn chat_before(ctx: &Ctx<'_>, log: &LogId, seq: u64) -> Result<Option<ChatRow>, ClientError> {
    Ok(chat_row(ctx.db, "log_id = ?1 AND state <> 'stale'", &&log.0[..])?
        .filter(|chat| seq > chat.cursor))
}

/// Applies one log entry. An `Err` leaves everything as it was; the caller then skips the
/// entry with [`skip_entry`] when the error is the entry's fault.
pub(crate) fn receive_entry(
    ctx: &Ctx<'_>,
    log: &LogId,
    seq: u64,
    bytes: &[u8],
) -> Result<Vec<Event>, ClientError> {
    let Some(chat) = chat_before(ctx, log, seq)? else { return Ok(vec![]) };
    let mut events = gaps::advance(ctx, &chat, seq)?;
    events.extend(apply_entry(ctx, &chat, seq, bytes)?);
    Ok(events)
}

fn apply_entry(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    seq: u64,
    bytes: &[u8],
) -> Result<Vec<Event>, ClientError> {
    let env = Envelope::decode(bytes).map_err(|_| MlsError::Invalid)?;
    // Our own entry, acknowledged or not: finish its outbox item, never decrypt it. Our
    // commit is resolved here, in log order: it wins only if nothing valid came first.
    let ours: Option<(i64, String)> = ctx
        .db
        .query_row(
            "SELECT id, kind FROM outbox WHERE chat_id = ?1 AND idem = ?2",
            params![chat.id, &env.idem.0[..]],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(dbe)?;
    match ours {
        Some((item, kind)) if kind == "commit" => {
            groups::resolve_own_commit(ctx, chat, item, seq)?;
            return Ok(vec![]);
        }
        Some((item, _)) => {
            outbox_done(ctx, item, Some(seq))?;
            return Ok(vec![]);
        }
        None => {}
    }
    // Ours, or a message we have: a member re-sent it after the chat moved to another
    // server, with its idempotency key (see moves.rs).
    let known: bool = ctx
        .db
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE chat_id = ?1 AND idem = ?2)
                 OR EXISTS (SELECT 1 FROM own_entries WHERE chat_id = ?1 AND idem = ?2)",
            params![chat.id, &env.idem.0[..]],
            |r| r.get(0),
        )
        .map_err(dbe)?;
    if known {
        return Ok(vec![]);
    }
    let Some(keys) = epoch_by_key_id(ctx.db, chat.id, &env.key_id.0)? else {
        // Sealed under an epoch we never had: after a gap, we lost a commit.
        if gaps::behind(ctx, chat)? {
            return gaps::go_stale(ctx, chat);
        }
        return Err(MlsError::Invalid.into());
    };
    let mls_message = envelope::open(&keys, &chat.log, &env)?;
    match mls::receive(&ctx.mls, &chat.group_id, &mls_message)? {
        Received::Message { sender, plaintext } => {
            pause_point("between-decrypt-and-store");
            store_message(ctx, chat, &keys, &env, seq, &sender, &plaintext)
        }
        Received::Proposal => {
            groups::pump(ctx, chat.id)?;
            Ok(vec![])
        }
        Received::Commit { removed_me, removed_any, added_any } => {
            if !removed_me {
                let new = mls::epoch_keys(&ctx.mls, &chat.group_id)?;
                if env.next_key != Some(new.append_public()) {
                    // A commit must register the append key of the epoch it makes.
                    return Err(MlsError::Invalid.into());
                }
            }
            // Another commit came first: ours, if any, lost (merging cleared it).
            groups::lose_commit(ctx, chat)?;
            groups::after_commit(ctx, chat, seq, removed_any, removed_me)?;
            if removed_me {
                return Ok(vec![Event::Removed { chat: chat.reference.clone() }]);
            }
            if added_any && chat.kind == "group" {
                let row = chat_row(ctx.db, "id = ?1", &chat.id)?.ok_or(bad("chat vanished"))?;
                groups::send_profile(ctx, &row)?;
            }
            groups::pump(ctx, chat.id)?;
            Ok(vec![])
        }
    }
}

/// `chats.fork_alarm`: a member's messages carry another epoch authenticator than ours
/// (someone, possibly the server, split the group). Stays set: only comparing safety numbers
/// and a new chat answer it.
pub(crate) const FORK_SPLIT: i64 = 1;
/// `chats.fork_alarm`: the others moved the chat to another server while our group changed
/// on the old one (`moves::moved_without_us`). Cleared when we are re-added on their side.
pub(crate) const FORK_MOVED: i64 = 2;

fn store_message(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    keys: &EpochKeys,
    env: &Envelope,
    seq: u64,
    sender: &DeviceCredential,
    plaintext: &[u8],
) -> Result<Vec<Event>, ClientError> {
    let message = AppMessage::decode(plaintext).map_err(|_| MlsError::Invalid)?;
    let mut events = Vec::new();
    if message.epoch_tag != keys.authenticator_tag {
        ctx.db
            .execute("UPDATE chats SET fork_alarm = ?2 WHERE id = ?1", params![chat.id, FORK_SPLIT])
            .map_err(dbe)?;
        events.push(Event::ForkAlarm { chat: chat.reference.clone() });
    }
    let outgoing = sender.identity_key == ctx.me.identity_public();
    let (sent_at, body) = match message.content {
        Content::Text { sent_at, body } => (sent_at, body),
        Content::Card { server, drop, hpke, kp_key, token } => {
            if !outgoing {
                let card = groups::Card { server, drop: drop.0, hpke, kp_key, token };
                groups::store_card(ctx, &sender.identity_key, card)?;
            }
            return Ok(events);
        }
        Content::Profile { name } => {
            if !outgoing && crate::check_name(&name).is_ok() {
                ctx.db
                    .execute(
                        "INSERT OR REPLACE INTO names (identity_key, name) VALUES (?1, ?2)",
                        params![&sender.identity_key.0[..], name],
                    )
                    .map_err(dbe)?;
            }
            return Ok(events);
        }
        Content::Moved { read_to } => {
            if !outgoing {
                crate::moves::moved(ctx, chat, read_to)?;
            }
            return Ok(events);
        }
    };
    ctx.db
        .execute(
            "INSERT INTO messages (chat_id, idem, seq, sender_key, outgoing, body, sent_at, state, seen, generation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'received', ?5, (SELECT generation FROM chats WHERE id = ?1))",
            params![chat.id, &env.idem.0[..], seq, &sender.identity_key.0[..], outgoing, body, sent_at],
        )
        .map_err(dbe)?;
    events.push(Event::Message(Message {
        chat: chat.reference.clone(),
        seq: Some(seq),
        from: identity_name(ctx, &sender.identity_key)?,
        outgoing,
        text: body,
        sent_at,
        state: MessageState::Received,
    }));
    Ok(events)
}

/// Moves past an entry that cannot be applied.
pub(crate) fn skip_entry(
    ctx: &Ctx<'_>,
    log: &LogId,
    seq: u64,
    bytes: &[u8],
) -> Result<Vec<Event>, ClientError> {
    let Some(chat) = chat_before(ctx, log, seq)? else { return Ok(vec![]) };
    let mut events = gaps::advance(ctx, &chat, seq)?;
    // Our own commit that cannot be applied lost: never wait for it again.
    if let Ok(env) = Envelope::decode(bytes) {
        let own_commit: bool = ctx
            .db
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM outbox WHERE chat_id = ?1 AND idem = ?2 AND kind = 'commit')",
                params![chat.id, &env.idem.0[..]],
                |r| r.get(0),
            )
            .map_err(dbe)?;
        if own_commit {
            groups::lose_commit(ctx, &chat)?;
            groups::pump(ctx, chat.id)?;
        }
    }
    events.push(Event::Skipped { chat: chat.reference, seq });
    Ok(events)
}

/// The mailbox fetch cursor.
pub(crate) fn mailbox_cursor(ctx: &Ctx<'_>) -> Result<u64, ClientError> {
    ctx.db.query_row("SELECT fetched FROM mailbox WHERE id = 1", [], |r| r.get(0)).map_err(dbe)
}

/// Moves the fetch cursor of the mailbox on our home server, or on `former`, a server it
/// was on before it moved. Returns whether `seq` is new there.
pub(crate) fn advance_mailbox_cursor(
    ctx: &Ctx<'_>,
    former: Option<&str>,
    seq: u64,
) -> Result<bool, ClientError> {
    let changed = match former {
        None => {
            ctx.db.execute("UPDATE mailbox SET fetched = ?1 WHERE id = 1 AND fetched < ?1", [seq])
        }
        Some(server) => ctx.db.execute(
            "UPDATE former_homes SET fetched = ?2 WHERE server_link = ?1 AND fetched < ?2",
            params![server, seq],
        ),
    }
    .map_err(dbe)?;
    Ok(changed == 1)
}

/// Applies one mailbox item: a Welcome becomes a chat, a request waits for `accept`. The
/// caller has moved the mailbox's cursor past it.
pub(crate) fn receive_drop(ctx: &Ctx<'_>, bytes: &[u8]) -> Result<Vec<Event>, ClientError> {
    let (private, _) = crate::store::hpke_keypair(ctx.db)?;
    let payload = open_drop(&ctx.mls, &private, bytes)?;
    match &payload {
        DropPayload::Welcome { drop, name, server, log, after, welcome } => {
            let invite: Option<(String, Option<Vec<u8>>)> = ctx
                .db
                .query_row(
                    "SELECT kind, expect_identity FROM invites WHERE drop_id = ?1",
                    [&drop.0[..]],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(dbe)?;
            // A chat waiting to be re-added takes the Welcome whatever its epoch.
            let waiting: Vec<Vec<u8>> = {
                let mut stmt = ctx
                    .db
                    .prepare_cached("SELECT group_id FROM chats WHERE state = 'stale'")
                    .map_err(dbe)?;
                let rows = stmt.query_map([], |r| r.get(0)).map_err(dbe)?;
                rows.collect::<Result<_, _>>().map_err(dbe)?
            };
            let joined = mls::join(&ctx.mls, welcome, |group| waiting.iter().any(|g| g == group))?;
            ServerLink::parse(server)?;
            ctx.db
                .execute("UPDATE invites SET used = 1 WHERE drop_id = ?1", [&drop.0[..]])
                .map_err(dbe)?;
            let group_id = joined.group_id;
            if joined.replaced {
                // Re-added to a chat we have: it moves onto the new state.
                let row = chat_row(ctx.db, "group_id = ?1", &group_id)?.ok_or(MlsError::Invalid)?;
                let events = gaps::rejoined(ctx, &row, server, log, *after)?;
                if joined.last_resort {
                    let row = chat_row(ctx.db, "id = ?1", &row.id)?.ok_or(bad("chat vanished"))?;
                    groups::update_own_leaf(ctx, &row)?;
                }
                return Ok(events);
            }
            let me = ctx.me.identity_public();
            let mut others: Vec<PublicKey> =
                joined.members.iter().map(|m| m.identity_key).filter(|k| *k != me).collect();
            others.dedup();
            let meta = mls::group_meta(&ctx.mls, &group_id)?;
            // A Welcome through the drop address of our own request must come from the person
            // we asked. A used one-time address is not revoked here: revoking deletes unread
            // items, and our other devices may not have fetched this Welcome yet. Nobody can
            // use the invite again anyway, since its claim token is spent.
            let (contact, title, kind) = match (&meta, &others[..]) {
                (Some(meta), _) => (None, meta.name.clone(), "group"),
                (None, [other]) => {
                    if let Some((kind, Some(expected))) = invite
                        && kind == "reply"
                        && expected != other.0
                    {
                        return Err(MlsError::BadCredential.into());
                    }
                    let (id, name) = contact_for(ctx, other, name)?;
                    (Some(id), name, "direct")
                }
                (None, _) => return Err(MlsError::Invalid.into()),
            };
            let reference = new_ref(ctx.db, "chats")?;
            ctx.db
                .execute(
                    "INSERT INTO chats (ref, group_id, contact_id, server_link, log_id, cursor, active, created_at, kind)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?8)",
                    params![reference, group_id, contact, server, &log.0[..], after, now_ms() / 1000, kind],
                )
                .map_err(|_| MlsError::Invalid)?;
            let chat = ctx.db.last_insert_rowid();
            save_epoch(ctx.db, chat, &mls::epoch_keys(&ctx.mls, &group_id)?)?;
            let row = chat_row(ctx.db, "id = ?1", &chat)?.ok_or(bad("chat vanished"))?;
            if kind == "direct" {
                groups::send_card(ctx, &row)?;
            } else {
                groups::send_profile(ctx, &row)?;
            }
            if joined.last_resort {
                groups::update_own_leaf(ctx, &row)?;
            }
            Ok(vec![Event::Connected { chat: reference, contact: title }])
        }
        DropPayload::Request { key_packages, name, .. } => {
            let identity = request_identity(&ctx.mls, key_packages)?;
            let reference = new_ref(ctx.db, "requests")?;
            let name =
                if crate::check_name(name).is_ok() { name.clone() } else { "Unnamed".into() };
            let payload = payload.encode();
            ctx.db
                .execute(
                    "INSERT INTO requests (ref, name, identity_key, payload, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![reference, name, &identity.0[..], payload, now_ms() / 1000],
                )
                .map_err(dbe)?;
            Ok(vec![Event::Request(ConnectRequest {
                id: reference,
                name,
                fingerprint: fingerprint(&identity),
            })])
        }
        DropPayload::Rejoin {
            group,
            server,
            reply_drop,
            reply_hpke,
            key_package,
            abandoned,
            ..
        } => {
            ServerLink::parse(server)?;
            let to =
                WelcomeTarget { server: server.clone(), drop: reply_drop.0, hpke: *reply_hpke };
            gaps::receive_rejoin(ctx, group, to, key_package, abandoned.as_ref())
        }
    }
}

// ---------------------------------------------------------------------------------------
// Listing

/// Contacts, by name.
pub(crate) fn contacts(db: &Connection) -> Result<Vec<Contact>, ClientError> {
    let mut stmt =
        db.prepare_cached("SELECT name, identity_key FROM contacts ORDER BY name").map_err(dbe)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .map_err(dbe)?;
    let mut out = Vec::new();
    for row in rows {
        let (name, key) = row.map_err(dbe)?;
        out.push(Contact { name, fingerprint: fingerprint(&PublicKey(arr(&key)?)) });
    }
    Ok(out)
}

/// Chats, oldest first. A group's name comes from its MLS group context.
pub(crate) fn chats(ctx: &Ctx<'_>) -> Result<Vec<ChatSummary>, ClientError> {
    type Row = (ChatSummary, Vec<u8>);
    let rows: Vec<Row> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT c.ref, coalesce(k.name, ''), c.active, c.fork_alarm,
                        (SELECT count(*) FROM messages m WHERE m.chat_id = c.id AND m.seen = 0),
                        c.kind = 'group', c.state <> 'left', c.state = 'stale', c.group_id
                 FROM chats c LEFT JOIN contacts k ON k.id = c.contact_id ORDER BY c.id",
            )
            .map_err(dbe)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    ChatSummary {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        active: r.get(2)?,
                        fork_alarm: r.get(3)?,
                        unread: r.get(4)?,
                        group: r.get(5)?,
                        member: r.get(6)?,
                        rejoining: r.get(7)?,
                    },
                    r.get(8)?,
                ))
            })
            .map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    rows.into_iter()
        .map(|(mut summary, group_id)| {
            if summary.group
                && let Some(meta) = mls::group_meta(&ctx.mls, &group_id)?
            {
                summary.name = meta.name;
            }
            Ok(summary)
        })
        .collect()
}

/// A chat's history in log order (queued messages last): its messages and the gaps in it,
/// the last `limit` items; marks the messages seen.
pub(crate) fn read(
    ctx: &Ctx<'_>,
    chat: &str,
    limit: Option<usize>,
) -> Result<Vec<HistoryItem>, ClientError> {
    let chat = resolve(ctx, chat)?;
    let mut stmt = ctx
        .db
        .prepare_cached(
            "SELECT seq, sender_key, outgoing, body, sent_at, state, generation FROM messages
             WHERE chat_id = ?1 ORDER BY seq IS NULL, generation, seq, id",
        )
        .map_err(dbe)?;
    let rows = stmt
        .query_map([chat.id], |r| {
            Ok((
                (r.get::<_, Option<u64>>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, bool>(2)?),
                (r.get::<_, String>(3)?, r.get::<_, u64>(4)?, r.get::<_, String>(5)?),
                r.get::<_, u64>(6)?,
            ))
        })
        .map_err(dbe)?;
    let mut gaps = gaps::gaps(ctx, &chat)?.into_iter().peekable();
    let mut out = Vec::new();
    for row in rows {
        let ((seq, sender, outgoing), (text, sent_at, state), generation) = row.map_err(dbe)?;
        // Gaps go after the last message at or before their place in the log.
        while let Some(gap) =
            gaps.next_if(|g| seq.is_none_or(|seq| (g.generation, g.after_seq) < (generation, seq)))
        {
            out.push(HistoryItem::Gap(gap.gap));
        }
        out.push(HistoryItem::Message(Message {
            chat: chat.reference.clone(),
            seq,
            from: identity_name(ctx, &PublicKey(arr(&sender)?))?,
            outgoing,
            text,
            sent_at,
            state: MessageState::parse(&state),
        }));
    }
    out.extend(gaps.map(|g| HistoryItem::Gap(g.gap)));
    // Each gap spans from the message before it to the one after it.
    for i in 0..out.len() {
        if !matches!(out[i], HistoryItem::Gap(_)) {
            continue;
        }
        let sent_at = |item: &HistoryItem| match item {
            HistoryItem::Message(m) if m.seq.is_some() => Some(m.sent_at),
            _ => None,
        };
        let since = out[..i].iter().rev().find_map(sent_at);
        let until = out[i + 1..].iter().find_map(sent_at);
        if let HistoryItem::Gap(gap) = &mut out[i] {
            gap.since = since;
            gap.until = until;
        }
    }
    ctx.db.execute("UPDATE messages SET seen = 1 WHERE chat_id = ?1", [chat.id]).map_err(dbe)?;
    if let Some(limit) = limit {
        let skip = out.len().saturating_sub(limit);
        out.drain(..skip);
    }
    Ok(out)
}

/// Pending requests.
pub(crate) fn requests(db: &Connection) -> Result<Vec<ConnectRequest>, ClientError> {
    let mut stmt = db
        .prepare_cached("SELECT ref, name, identity_key FROM requests ORDER BY id")
        .map_err(dbe)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
        })
        .map_err(dbe)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name, key) = row.map_err(dbe)?;
        out.push(ConnectRequest { id, name, fingerprint: fingerprint(&PublicKey(arr(&key)?)) });
    }
    Ok(out)
}
