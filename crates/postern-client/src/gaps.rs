//! History the server no longer keeps, and getting back into a group after it.
//!
//! **Keeping quiet chats alive.** The server forgets a log whose append keys all went
//! unused for its commit retention (180 days by default). So that a chat nobody writes in
//! does not vanish while its members are around, each client re-sends `log_create` for the
//! chat's log with the current epoch's key once every [`KEEPALIVE_DAYS`] (the server takes
//! it as a use of that key); [`keep_alive`] queues these after the logs were read.
//!
//! The server expires application entries after its retention period and commits later
//! (DESIGN: 30 and 180 days by default). A device that was away longer finds a **gap**: the
//! log's next entry is further on than the entry after its cursor. What it does then:
//!
//! - **Only messages lost**: the entries after the gap still open under an epoch we hold.
//!   The gap is recorded where it is (shown by `read` among the messages) and reading goes on.
//! - **Fallen behind**: an entry after the gap is sealed under an epoch we do not know (a
//!   commit was lost), or the whole log is gone. The chat becomes `stale`: it reads nothing,
//!   and asks up to [`REJOIN_HELPERS`] members it can reach (contacts with a card, admins
//!   first) to re-add this device, with a fresh key package and a reply drop address.
//! - **Re-add**: a member that receives the request commits, in one commit, the removal of
//!   our old leaf and the addition of the new key package of the *same device* (same
//!   signature key). Every member accepts such a replacement from any member, whatever the
//!   group's rules, since nobody joins or leaves; it does not rotate the log. Helpers that
//!   come second see the device's leaf already replaced and drop the request.
//! - **Asking again**: a request nobody answered (the helpers asked were away, gone, or
//!   on the branch a fork gave up) is sent again, the same request, to the next helpers not
//!   yet asked, once every retry period the caller gives (`ask_again`; the CLI asks daily),
//!   and to the first ones again once every helper was asked. A chat that went stale with
//!   nobody to ask asks the first member it gets a card for.
//! - **Rejoined**: the Welcome replaces our old group state (only with a later epoch, unless
//!   the chat is waiting for this re-add: after a fork the other branch may be behind ours),
//!   the chat moves to the log and position the Welcome names, queued messages go out, and the
//!   gap is marked as ended by a re-add.

use postern_proto::content::DropPayload;
use postern_proto::ids::{DropId, PublicKey};
use rusqlite::{OptionalExtension, params};
use sha2::Digest as _;

use crate::ClientError;
use crate::chats::{
    ChatRow, Ctx, Event, arr, chat_row, dbe, insert_outbox, mailbox_keys, random, save_epoch,
    seal_drop, unseal,
};
use crate::groups::{self, Card, Invitee, WelcomeTarget};
use crate::mls;

/// Gaps, and the key packages of rejoin requests already acted on (a replayed request must
/// not replace a device's leaf again).
pub(crate) const MIGRATION_GAPS: &str = r#"
CREATE TABLE gaps (
    id         INTEGER PRIMARY KEY,
    chat_id    INTEGER NOT NULL REFERENCES chats(id),
    generation INTEGER NOT NULL,
    after_seq  INTEGER NOT NULL,
    epoch      INTEGER NOT NULL,
    entries    INTEGER,
    stale      INTEGER NOT NULL DEFAULT 0,
    rejoined   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE rejoins_seen (
    key_package_hash BLOB PRIMARY KEY
);
ALTER TABLE chats ADD COLUMN touched INTEGER NOT NULL DEFAULT 0;
"#;

/// A stale chat's request to be re-added, kept until the re-add so that asking again sends
/// the same request (one key package: a helper that already re-added the device, or saw the
/// request, drops it), and whom it was sent to.
pub(crate) const MIGRATION_REJOIN_ASKS: &str = r#"
CREATE TABLE rejoin_requests (
    chat_id     INTEGER PRIMARY KEY REFERENCES chats(id),
    server      TEXT NOT NULL,
    reply_drop  BLOB NOT NULL,
    key_package BLOB NOT NULL,
    abandoned   BLOB,
    asked_at    INTEGER NOT NULL
);
CREATE TABLE rejoin_asked (
    chat_id      INTEGER NOT NULL REFERENCES chats(id),
    identity_key BLOB NOT NULL,
    PRIMARY KEY (chat_id, identity_key)
);
"#;

/// How often, in days, a client tells the server a chat's log is still in use.
pub const KEEPALIVE_DAYS: u32 = 7;

/// How many members a stale device asks to re-add it.
pub const REJOIN_HELPERS: usize = 3;

/// History we do not have, as `read` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The chat's id.
    pub chat: String,
    /// How many log entries expired unread, when the log shows it (not across a re-add).
    pub entries: Option<u64>,
    /// Whether the gap ends with our device being re-added to the group.
    pub rejoined: bool,
    /// Whether we are still waiting to be re-added.
    pub waiting: bool,
    /// When the last message before it was sent (ms since the Unix epoch), if any.
    pub since: Option<u64>,
    /// When the first message after it was sent, if any yet.
    pub until: Option<u64>,
}

/// Where a gap sits among a chat's messages, for ordering: after the entry `after_seq` of
/// the chat's log `generation`.
pub(crate) struct GapRow {
    pub(crate) generation: u64,
    pub(crate) after_seq: u64,
    pub(crate) gap: Gap,
}

fn generation(ctx: &Ctx<'_>, chat: i64) -> Result<u64, ClientError> {
    ctx.db
        .query_row("SELECT generation FROM chats WHERE id = ?1", [chat], |r| r.get(0))
        .map_err(dbe)
}

fn newest_epoch(ctx: &Ctx<'_>, chat: i64) -> Result<u64, ClientError> {
    ctx.db
        .query_row(
            "SELECT coalesce(max(epoch), 0) FROM chat_epochs WHERE chat_id = ?1",
            [chat],
            |r| r.get(0),
        )
        .map_err(dbe)
}

/// Moves the chat's cursor to `seq`, recording a gap when entries before it are gone.
pub(crate) fn advance(ctx: &Ctx<'_>, chat: &ChatRow, seq: u64) -> Result<Vec<Event>, ClientError> {
    ctx.db
        .execute("UPDATE chats SET cursor = ?2 WHERE id = ?1", params![chat.id, seq])
        .map_err(dbe)?;
    let missing = seq.saturating_sub(chat.cursor).saturating_sub(1);
    if missing == 0 {
        return Ok(vec![]);
    }
    ctx.db
        .execute(
            "INSERT INTO gaps (chat_id, generation, after_seq, epoch, entries)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                chat.id,
                generation(ctx, chat.id)?,
                chat.cursor,
                newest_epoch(ctx, chat.id)?,
                missing
            ],
        )
        .map_err(dbe)?;
    Ok(vec![Event::HistoryLost { chat: chat.reference.clone(), entries: missing }])
}

/// Whether an entry we cannot open may mean we fell behind: a gap was found since our
/// epoch last changed.
pub(crate) fn behind(ctx: &Ctx<'_>, chat: &ChatRow) -> Result<bool, ClientError> {
    ctx.db
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM gaps WHERE chat_id = ?1 AND generation = ?2 AND epoch = ?3)",
            params![chat.id, generation(ctx, chat.id)?, newest_epoch(ctx, chat.id)?],
            |r| r.get(0),
        )
        .map_err(dbe)
}

/// Queues a `log_create` for each chat we are in whose log we have not kept alive for
/// [`KEEPALIVE_DAYS`]; returns how many.
pub(crate) fn keep_alive(ctx: &Ctx<'_>) -> Result<usize, ClientError> {
    let today = crate::chats::today();
    let due: Vec<i64> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT id FROM chats WHERE active = 1 AND state IN ('member', 'leaving')
                 AND touched + ?1 <= ?2",
            )
            .map_err(dbe)?;
        let rows = stmt.query_map(params![KEEPALIVE_DAYS, today], |r| r.get(0)).map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    for &chat in &due {
        let row = chat_row(ctx.db, "id = ?1", &chat)?.ok_or(crate::chats::bad("chat vanished"))?;
        let key = mls::epoch_keys(&ctx.mls, &row.group_id)?.append_key.to_bytes();
        insert_outbox(
            ctx.db,
            Some(chat),
            "log_create",
            &row.server,
            &row.log.0,
            &[],
            (Some(&key[..]), None, None),
        )?;
        ctx.db
            .execute("UPDATE chats SET touched = ?2 WHERE id = ?1", params![chat, today])
            .map_err(dbe)?;
    }
    Ok(due.len())
}

/// The chat's log is gone from its server (every entry and key expired).
pub(crate) fn log_gone(ctx: &Ctx<'_>, chat: &str) -> Result<Vec<Event>, ClientError> {
    let Some(row) = chat_row(ctx.db, "ref = ?1", &chat)? else { return Ok(vec![]) };
    // A log not created yet (a new chat, a rotation) is not gone.
    if !row.active || row.cursor == 0 || !matches!(row.state.as_str(), "member" | "leaving") {
        return Ok(vec![]);
    }
    go_stale(ctx, &row)
}

/// We fell behind the group: stop reading it and ask members to re-add this device.
pub(crate) fn go_stale(ctx: &Ctx<'_>, chat: &ChatRow) -> Result<Vec<Event>, ClientError> {
    fall_behind(ctx, chat, &helpers(ctx, chat)?, None)
}

/// Stops reading the chat and asks `helpers` to re-add this device; `abandoned` is the log
/// of a branch we give up after a fork, which helpers still on it ignore.
pub(crate) fn fall_behind(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    helpers: &[(PublicKey, Card)],
    abandoned: Option<&postern_proto::ids::LogId>,
) -> Result<Vec<Event>, ClientError> {
    let generation = generation(ctx, chat.id)?;
    let marked = ctx
        .db
        .execute(
            "UPDATE gaps SET stale = 1 WHERE id = (SELECT max(id) FROM gaps WHERE chat_id = ?1 AND generation = ?2)",
            params![chat.id, generation],
        )
        .map_err(dbe)?;
    if marked == 0 {
        ctx.db
            .execute(
                "INSERT INTO gaps (chat_id, generation, after_seq, epoch, stale) VALUES (?1, ?2, ?3, ?4, 1)",
                params![chat.id, generation, chat.cursor, newest_epoch(ctx, chat.id)?],
            )
            .map_err(dbe)?;
    }
    ctx.db.execute("UPDATE chats SET state = 'stale' WHERE id = ?1", [chat.id]).map_err(dbe)?;
    // What was sealed for the state we lost goes out again after the re-add.
    unseal(ctx, chat.id, &["message", "proposal", "commit", "welcome"], None)?;
    // A new request: the one of an earlier time we fell behind is done with.
    end_request(ctx, chat.id)?;
    let asked = if helpers.is_empty() { 0 } else { ask_to_rejoin(ctx, chat, helpers, abandoned)? };
    Ok(vec![Event::Rejoining { chat: chat.reference.clone(), asked, again: false }])
}

/// Sends the request of each stale chat not asked for `retry_secs` (or never: nobody could
/// be asked when it went stale) again, to the next helpers not yet asked (see the module's
/// documentation).
pub(crate) fn ask_again(ctx: &Ctx<'_>, retry_secs: u64) -> Result<Vec<Event>, ClientError> {
    let now = crate::chats::now_ms() / 1000;
    let due: Vec<i64> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT c.id FROM chats c LEFT JOIN rejoin_requests r ON r.chat_id = c.id
                 WHERE c.active = 1 AND c.state = 'stale'
                   AND (r.asked_at IS NULL OR r.asked_at + ?1 <= ?2)
                 ORDER BY c.id",
            )
            .map_err(dbe)?;
        let rows = stmt.query_map(params![retry_secs, now], |r| r.get(0)).map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    let mut events = Vec::new();
    for id in due {
        let row = chat_row(ctx.db, "id = ?1", &id)?.ok_or(crate::chats::bad("chat vanished"))?;
        let helpers = helpers(ctx, &row)?;
        if helpers.is_empty() {
            continue;
        }
        // A request kept names the branch a fork gave up; a chat that had nobody to ask when
        // it went stale did not fork (a fork with nobody to ask stays on its branch).
        let asked = ask_to_rejoin(ctx, &row, &helpers, None)?;
        events.push(Event::Rejoining { chat: row.reference.clone(), asked, again: true });
    }
    Ok(events)
}

/// Forgets the chat's request to be re-added and whom it went to.
fn end_request(ctx: &Ctx<'_>, chat: i64) -> Result<(), ClientError> {
    ctx.db.execute("DELETE FROM rejoin_requests WHERE chat_id = ?1", [chat]).map_err(dbe)?;
    ctx.db.execute("DELETE FROM rejoin_asked WHERE chat_id = ?1", [chat]).map_err(dbe)?;
    Ok(())
}

/// Members we can reach with a rejoin request: contacts of ours with a card, admins first.
pub(crate) fn helpers(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
) -> Result<Vec<(PublicKey, Card)>, ClientError> {
    let me = ctx.me.identity_public();
    let admins = mls::group_meta(&ctx.mls, &chat.group_id)?.map(|m| m.admins).unwrap_or_default();
    let mut identities: Vec<PublicKey> = Vec::new();
    for m in mls::members(&ctx.mls, &chat.group_id)? {
        let key = m.credential.identity_key;
        if key != me && !identities.contains(&key) {
            identities.push(key);
        }
    }
    identities.sort_by_key(|k| !admins.contains(&k.0));
    let mut cards = Vec::new();
    for identity in identities {
        let card: Option<Option<Vec<u8>>> = ctx
            .db
            .query_row(
                "SELECT card FROM contacts WHERE identity_key = ?1",
                [&identity.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(dbe)?;
        if let Some(Some(json)) = card
            && let Ok(card) = serde_json::from_slice::<Card>(&json)
        {
            cards.push((identity, card));
        }
    }
    Ok(cards)
}

/// The chat's request to be re-added: the server and drop address of ours the Welcome is
/// to go to, our key package, and the branch given up.
struct Request {
    server: String,
    reply: DropId,
    key_package: Vec<u8>,
    abandoned: Option<postern_proto::ids::LogId>,
}

/// Sends the chat's request (a new one, with a fresh drop address of ours for the Welcome
/// and a new key package of this device, if it has none yet or the home moved) to the first
/// [`REJOIN_HELPERS`] of `helpers` not asked yet, or from the first again once all were.
/// Returns how many were asked.
fn ask_to_rejoin(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    helpers: &[(PublicKey, Card)],
    abandoned: Option<&postern_proto::ids::LogId>,
) -> Result<usize, ClientError> {
    // A request whose Welcome would go to a home we have moved from is made anew: that home
    // may never answer again. (A helper that acts on both re-adds the device twice.)
    let home = ctx.server.to_link_string();
    let request = match request(ctx, chat.id)? {
        Some(request) if request.server == home => request,
        Some(old) => {
            end_request(ctx, chat.id)?;
            new_request(ctx, chat, home, old.abandoned.as_ref())?
        }
        None => new_request(ctx, chat, home, abandoned)?,
    };
    let asked: Vec<Vec<u8>> = {
        let mut stmt = ctx
            .db
            .prepare_cached("SELECT identity_key FROM rejoin_asked WHERE chat_id = ?1")
            .map_err(dbe)?;
        let rows = stmt.query_map([chat.id], |r| r.get(0)).map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    let mut next: Vec<_> =
        helpers.iter().filter(|(key, _)| !asked.iter().any(|a| a[..] == key.0[..])).collect();
    if next.is_empty() {
        ctx.db.execute("DELETE FROM rejoin_asked WHERE chat_id = ?1", [chat.id]).map_err(dbe)?;
        next = helpers.iter().collect();
    }
    next.truncate(REJOIN_HELPERS);
    let (_, hpke_public) = crate::store::hpke_keypair(ctx.db)?;
    for (identity, card) in &next {
        let payload = DropPayload::Rejoin {
            drop: DropId(card.drop),
            group: chat.group_id.clone(),
            server: request.server.clone(),
            reply_drop: request.reply,
            reply_hpke: hpke_public,
            key_package: request.key_package.clone(),
            abandoned: request.abandoned,
        };
        let sealed = seal_drop(&ctx.mls, &card.hpke, &payload)?;
        insert_outbox(ctx.db, None, "drop", &card.server, &card.drop, &sealed, (None, None, None))?;
        ctx.db
            .execute(
                "INSERT OR IGNORE INTO rejoin_asked (chat_id, identity_key) VALUES (?1, ?2)",
                params![chat.id, &identity.0[..]],
            )
            .map_err(dbe)?;
    }
    ctx.db
        .execute(
            "UPDATE rejoin_requests SET asked_at = ?2 WHERE chat_id = ?1",
            params![chat.id, crate::chats::now_ms() / 1000],
        )
        .map_err(dbe)?;
    Ok(next.len())
}

/// The chat's request to be re-added, if one is kept.
fn request(ctx: &Ctx<'_>, chat: i64) -> Result<Option<Request>, ClientError> {
    ctx.db
        .query_row(
            "SELECT server, reply_drop, key_package, abandoned FROM rejoin_requests WHERE chat_id = ?1",
            [chat],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            },
        )
        .optional()
        .map_err(dbe)?
        .map(|(server, reply, key_package, abandoned)| {
            Ok(Request {
                server,
                reply: DropId(arr(&reply)?),
                key_package,
                abandoned: abandoned.map(|l| arr(&l)).transpose()?.map(postern_proto::ids::LogId),
            })
        })
        .transpose()
}

/// Registers a fresh drop address of ours on the home server for the Welcome, makes a key
/// package, and keeps them as the chat's request.
fn new_request(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    home: String,
    abandoned: Option<&postern_proto::ids::LogId>,
) -> Result<Request, ClientError> {
    let keys = mailbox_keys(ctx)?;
    let reply = DropId(random());
    ctx.db
        .execute(
            "INSERT INTO invites (drop_id, token, kind, expires) VALUES (?1, ?2, 'rejoin', ?3)",
            params![&reply.0[..], &[0u8; 32][..], u32::MAX],
        )
        .map_err(dbe)?;
    let owner = keys.owner.to_bytes();
    insert_outbox(
        ctx.db,
        None,
        "drop_create",
        &home,
        &reply.0,
        &keys.mailbox.0,
        (Some(&owner[..]), None, None),
    )?;
    let key_package = mls::new_key_package(&ctx.mls, ctx.me, false)?;
    ctx.db
        .execute(
            "INSERT INTO rejoin_requests (chat_id, server, reply_drop, key_package, abandoned, asked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 0)",
            params![chat.id, &home, &reply.0[..], &key_package, abandoned.map(|l| &l.0[..])],
        )
        .map_err(dbe)?;
    Ok(Request { server: home, reply, key_package, abandoned: abandoned.copied() })
}

/// A member asks us to re-add its device: queue the replacement if it is still a member,
/// the device is in the group with another leaf, the request is new, and we are not on the
/// branch it gave up (`abandoned`, after a fork).
pub(crate) fn receive_rejoin(
    ctx: &Ctx<'_>,
    group: &[u8],
    welcome_to: WelcomeTarget,
    key_package: &[u8],
    abandoned: Option<&postern_proto::ids::LogId>,
) -> Result<Vec<Event>, ClientError> {
    let Some(row) = chat_row(ctx.db, "group_id = ?1", &group)? else { return Ok(vec![]) };
    if !row.active || row.state != "member" || abandoned == Some(&row.log) {
        return Ok(vec![]);
    }
    let kp = mls::peer_key_package(&ctx.mls, key_package)?;
    let leaf = kp.leaf_node();
    let device = mls::check_credential(leaf.credential(), leaf.signature_key().as_slice())?;
    let members = mls::members(&ctx.mls, &row.group_id)?;
    let Some(old) = members.iter().find(|m| m.credential.device_key == device.device_key) else {
        return Ok(vec![]);
    };
    if old.encryption_key == *leaf.encryption_key() {
        return Ok(vec![]);
    }
    let hash = sha2::Sha256::digest(key_package);
    let fresh = ctx
        .db
        .execute("INSERT OR IGNORE INTO rejoins_seen (key_package_hash) VALUES (?1)", [&hash[..]])
        .map_err(dbe)?;
    if fresh == 0 {
        return Ok(vec![]);
    }
    let invitee = Invitee {
        identity: device.identity_key.0,
        name: String::new(),
        key_packages: vec![key_package.to_vec()],
        welcome_to,
    };
    groups::readd(ctx, &row, &invitee)?;
    Ok(vec![])
}

/// A Welcome replaced our state of a group we already had: move the chat onto it.
pub(crate) fn rejoined(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    server: &str,
    log: &postern_proto::ids::LogId,
    after: u64,
) -> Result<Vec<Event>, ClientError> {
    let lost = ctx
        .db
        .execute(
            "UPDATE gaps SET rejoined = 1, entries = NULL WHERE chat_id = ?1 AND stale = 1 AND rejoined = 0",
            [chat.id],
        )
        .map_err(dbe)?
        > 0;
    ctx.db
        .execute(
            "UPDATE chats SET server_link = ?2, log_id = ?3, cursor = ?4, active = 1, state = 'member',
                 leave_epoch = NULL, generation = generation + 1,
                 fork_alarm = CASE fork_alarm WHEN ?5 THEN 0 ELSE fork_alarm END
             WHERE id = ?1",
            params![chat.id, server, &log.0[..], after, crate::chats::FORK_MOVED],
        )
        .map_err(dbe)?;
    ctx.db.execute("DELETE FROM chat_epochs WHERE chat_id = ?1", [chat.id]).map_err(dbe)?;
    end_request(ctx, chat.id)?;
    save_epoch(ctx.db, chat.id, &mls::epoch_keys(&ctx.mls, &chat.group_id)?)?;
    // Anything planned or sealed against the old state is planned again.
    unseal(ctx, chat.id, &["message", "proposal", "commit", "welcome", "log_create"], None)?;
    ctx.db
        .execute("UPDATE intents SET state = 'pending' WHERE chat_id = ?1", [chat.id])
        .map_err(dbe)?;
    groups::pump(ctx, chat.id)?;
    Ok(vec![Event::Rejoined { chat: chat.reference.clone(), lost }])
}

/// A chat's gaps, in order.
pub(crate) fn gaps(ctx: &Ctx<'_>, chat: &ChatRow) -> Result<Vec<GapRow>, ClientError> {
    let mut stmt = ctx
        .db
        .prepare_cached(
            "SELECT generation, after_seq, entries, stale, rejoined FROM gaps WHERE chat_id = ?1
             ORDER BY generation, after_seq, id",
        )
        .map_err(dbe)?;
    let rows = stmt
        .query_map([chat.id], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, Option<u64>>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })
        .map_err(dbe)?;
    let mut out = Vec::new();
    for row in rows {
        let (generation, after_seq, entries, stale, rejoined) = row.map_err(dbe)?;
        out.push(GapRow {
            generation,
            after_seq,
            gap: Gap {
                chat: chat.reference.clone(),
                entries,
                rejoined,
                waiting: stale && !rejoined,
                since: None,
                until: None,
            },
        });
    }
    Ok(out)
}
