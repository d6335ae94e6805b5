//! Moving a chat to the next server of its list when the one it is on cannot be reached
//! (design review finding 6).
//!
//! - **The list** is in the group context ([`postern_proto::content::ServerList`]): the
//!   creator's server, then the servers the creator added with `postern servers add`. Every
//!   member reads the same list.
//! - **A deterministic successor.** A member that found every door to the chat's server
//!   failing for the failover time moves the chat to the next server on the list. The new
//!   log's id is derived from the current epoch ([`EpochKeys::successor_log`]), so every
//!   member in the epoch derives the same log and no server can. Each member that moves
//!   creates it with the epoch's append key (a conflict means another was first). The MLS
//!   group goes on as it is: only its log moves.
//! - **What moves along.** Whatever was sealed for the old log and not acknowledged is
//!   sealed again for the new one; a commit in flight is dropped and planned again there.
//!   The first entry a member writes to the new log is [`Content::Moved`] with how far it
//!   had read the old one.
//! - **Re-sends.** Each member re-sends, with their original idempotency keys, its own
//!   messages that landed in the old log after its own `read_to` and after that of every
//!   `Moved` it reads. A member that read one on the old log recognises the key and skips
//!   it, so every message arrives once.
//! - **Following.** Members who still reach the old server learn of the move by looking
//!   for the successor log of their current epoch on the next server, now and then
//!   ([`successors`]); when it has entries, they move the same way.
//!
//! - **Forks.** A member whose epoch moved on at the old server while the others moved (a
//!   commit there after the split) cannot follow: MLS cannot merge the two histories. It
//!   finds the move among the successors of its earlier epochs ([`moved_without_us`]),
//!   marks the chat as forked (`fork_alarm`, which `postern chats` shows until it is back),
//!   gives its branch up and asks members it can reach to re-add it on theirs, through the
//!   rejoin path of [`crate::gaps`], naming the abandoned log so that members on its branch
//!   do not answer. Its own messages since it entered the epoch of the move go again after
//!   the re-add; those the movers had read carry keys they recognise. What is lost: what
//!   the moved branch sent between the move and the re-add (a gap ended by the re-add), and
//!   the membership changes of the abandoned branch (a member it added must be invited
//!   again). With nobody to ask, the chat stays on its branch, alarmed.
//! - **The home.** Our mailbox lives on our home server, and cards, invites and rejoin
//!   requests name it. When every door to it has failed for the failover time, the first
//!   server of our own list that answers becomes the home ([`move_home`]), and contacts
//!   get cards naming it.

use postern_proto::content::{AppMessage, Content};
use postern_proto::ids::LogId;
use postern_proto::link::ServerLink;
use rusqlite::{OptionalExtension, params};

use crate::ClientError;
use crate::chats::{ChatRow, Ctx, Event, bad, chat_row, dbe, resend_after};
use crate::{gaps, groups, mls};

pub(crate) const MIGRATION_MOVES: &str = r#"
CREATE TABLE fallback_servers (
    id   INTEGER PRIMARY KEY,
    link TEXT NOT NULL UNIQUE
);
CREATE TABLE outages (
    server TEXT PRIMARY KEY,
    since  INTEGER NOT NULL
);
CREATE TABLE successor_checks (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL
);
"#;

/// Where in the chat's history we entered each epoch kept (the log's generation and our
/// cursor then): after a fork, our messages from there on go again (see [`moved_without_us`]).
/// Epochs saved before this know no place (0, 0): everything of ours would go again, which
/// receivers drop as already read.
pub(crate) const MIGRATION_FORKS: &str = r#"
ALTER TABLE chat_epochs ADD COLUMN since_generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chat_epochs ADD COLUMN since_seq INTEGER NOT NULL DEFAULT 0;
"#;

/// Servers our mailbox was on before it moved ([`move_home`]), read now and then while they
/// keep it: how far, and when we last looked.
pub(crate) const MIGRATION_HOMES: &str = r#"
CREATE TABLE former_homes (
    server_link TEXT PRIMARY KEY,
    fetched     INTEGER NOT NULL,
    checked_at  INTEGER
);
"#;

/// Adds a server that new chats move to when theirs is blocked. Returns whether it is new.
pub(crate) fn add_fallback(ctx: &Ctx<'_>, link: &ServerLink) -> Result<bool, ClientError> {
    let link = link.to_link_string();
    if link == ctx.server.to_link_string() {
        return Err(ClientError::OwnServer);
    }
    let added = ctx
        .db
        .execute("INSERT OR IGNORE INTO fallback_servers (link) VALUES (?1)", [&link])
        .map_err(dbe)?;
    Ok(added == 1)
}

/// The servers new chats move to, in the order added.
pub(crate) fn fallbacks(db: &rusqlite::Connection) -> Result<Vec<String>, ClientError> {
    let mut stmt =
        db.prepare_cached("SELECT link FROM fallback_servers ORDER BY id").map_err(dbe)?;
    let rows = stmt.query_map([], |r| r.get(0)).map_err(dbe)?;
    rows.collect::<Result<_, _>>().map_err(dbe)
}

/// The server list of a chat we create: ours first, then our fallbacks (which hold our home
/// server too once the mailbox moved to one of them).
pub(crate) fn new_chat_servers(ctx: &Ctx<'_>) -> Result<Vec<String>, ClientError> {
    let home = ctx.server.to_link_string();
    let mut servers = vec![home.clone()];
    servers.extend(fallbacks(ctx.db)?.into_iter().filter(|s| *s != home));
    servers.truncate(postern_proto::content::MAX_SERVERS);
    Ok(servers)
}

/// The chat's place in its server list and the list, if there is a server after it.
fn next_server(ctx: &Ctx<'_>, chat: &ChatRow) -> Result<Option<(usize, String)>, ClientError> {
    let servers = mls::servers(&ctx.mls, &chat.group_id)?;
    let Some(at) = servers.iter().position(|s| *s == chat.server) else { return Ok(None) };
    Ok(servers.get(at + 1).map(|next| (at + 1, next.clone())))
}

/// Active chats a move could concern.
fn active_chats(ctx: &Ctx<'_>, server: Option<&str>) -> Result<Vec<ChatRow>, ClientError> {
    let ids: Vec<i64> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT id FROM chats WHERE active = 1 AND state NOT IN ('left', 'stale')
                 AND (?1 IS NULL OR server_link = ?1) ORDER BY id",
            )
            .map_err(dbe)?;
        let rows = stmt.query_map([server], |r| r.get(0)).map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    let mut chats = Vec::new();
    for id in ids {
        chats.extend(chat_row(ctx.db, "id = ?1", &id)?);
    }
    Ok(chats)
}

/// Every door to `server` failed just now: records since when it has been out of reach
/// and returns it (Unix seconds).
pub(crate) fn out_of_reach(ctx: &Ctx<'_>, server: &str, now: u64) -> Result<u64, ClientError> {
    ctx.db
        .execute(
            "INSERT OR IGNORE INTO outages (server, since) VALUES (?1, ?2)",
            params![server, now],
        )
        .map_err(dbe)?;
    Ok(outage_since(ctx.db, server)?.unwrap_or(now))
}

/// A door to `server` opened: its outage, if one was recorded, is over.
pub(crate) fn reached(ctx: &Ctx<'_>, server: &str) -> Result<(), ClientError> {
    ctx.db.execute("DELETE FROM outages WHERE server = ?1", [server]).map_err(dbe)?;
    Ok(())
}

/// Since when `server` has been out of reach (Unix seconds), if an outage is on record.
pub(crate) fn outage_since(
    db: &rusqlite::Connection,
    server: &str,
) -> Result<Option<u64>, ClientError> {
    db.query_row("SELECT since FROM outages WHERE server = ?1", [server], |r| r.get(0))
        .optional()
        .map_err(dbe)
}

/// The servers the chats on `server` would move to.
pub(crate) fn successors_of(ctx: &Ctx<'_>, server: &str) -> Result<Vec<ServerLink>, ClientError> {
    let mut next = Vec::new();
    for chat in active_chats(ctx, Some(server))? {
        if let Some((_, link)) = next_server(ctx, &chat)?
            && !next.contains(&link)
        {
            next.push(link);
        }
    }
    next.iter().map(|l| Ok(ServerLink::parse(l)?)).collect()
}

/// Moves every active chat on `server` that has a server after it on its list to that
/// one, if that is `to`. Returns the chats moved.
pub(crate) fn fail_over(ctx: &Ctx<'_>, server: &str, to: &str) -> Result<Vec<String>, ClientError> {
    let mut moved = Vec::new();
    for chat in active_chats(ctx, Some(server))? {
        if let Some((index, next)) = next_server(ctx, &chat)?
            && next == to
        {
            move_chat(ctx, &chat, index, &next)?;
            moved.push(chat.reference.clone());
        }
    }
    Ok(moved)
}

/// Every door to our home server `from` has failed for the failover time, and the next
/// server of our list answers (`ctx.server`): the home moves there. The mailbox, with its
/// keys and id, is published there again (the driver does it next), and every direct chat
/// we are in gets a card naming the new server, with a fresh drop address and claim token
/// registered there, so contacts add us to groups and re-add us there. Invite links
/// already given out, answers to our own connect requests, and drops others make with an
/// old card before they read the new one, still go to the old server: it stays among the
/// `former_homes`, read now and then while it keeps our mailbox.
pub(crate) fn move_home(ctx: &Ctx<'_>, from: &str) -> Result<Vec<Event>, ClientError> {
    let to = zeroize::Zeroizing::new(ctx.server.to_link_string());
    if to.as_str() == from {
        return Ok(vec![]);
    }
    ctx.db
        .execute("UPDATE identity SET server_link = ?1 WHERE id = 1", [to.as_str()])
        .map_err(dbe)?;
    // The old mailbox is still read where it was, while that server keeps it; one we come
    // back to is the home again.
    ctx.db
        .execute(
            "INSERT OR REPLACE INTO former_homes (server_link, fetched)
             SELECT ?1, fetched FROM mailbox WHERE id = 1",
            [from],
        )
        .map_err(dbe)?;
    ctx.db
        .execute("DELETE FROM former_homes WHERE server_link = ?1", [to.as_str()])
        .map_err(dbe)?;
    ctx.db
        .execute("UPDATE mailbox SET published = 0, fetched = 0 WHERE id = 1", [])
        .map_err(dbe)?;
    // Addresses not yet registered on the old mailbox never will be.
    ctx.db
        .execute(
            "DELETE FROM outbox WHERE server_link = ?1
             AND kind IN ('drop_create', 'claim_token_create')",
            [from],
        )
        .map_err(dbe)?;
    let ids: Vec<i64> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT id FROM chats WHERE kind = 'direct' AND active = 1 AND state = 'member'
                 ORDER BY id",
            )
            .map_err(dbe)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    for id in &ids {
        let chat = chat_row(ctx.db, "id = ?1", id)?.ok_or(bad("chat vanished"))?;
        groups::send_card(ctx, &chat)?;
    }
    Ok(vec![Event::HomeMoved { addrs: ctx.server.addrs.clone(), cards: ids.len() }])
}

/// The servers our mailbox was on before, not looked at for `every` seconds, with their
/// cursors; they count as looked at now.
pub(crate) fn former_homes_due(
    ctx: &Ctx<'_>,
    now: u64,
    every: u64,
) -> Result<Vec<(ServerLink, u64)>, ClientError> {
    let due: Vec<(String, u64)> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT server_link, fetched FROM former_homes
                 WHERE checked_at IS NULL OR checked_at + ?1 <= ?2 ORDER BY rowid",
            )
            .map_err(dbe)?;
        let rows =
            stmt.query_map(params![every, now], |r| Ok((r.get(0)?, r.get(1)?))).map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    ctx.db
        .execute(
            "UPDATE former_homes SET checked_at = ?2 WHERE checked_at IS NULL OR checked_at + ?1 <= ?2",
            params![every, now],
        )
        .map_err(dbe)?;
    due.into_iter().map(|(link, fetched)| Ok((ServerLink::parse(&link)?, fetched))).collect()
}

/// A former home no longer keeps our mailbox.
pub(crate) fn forget_former_home(ctx: &Ctx<'_>, server: &str) -> Result<(), ClientError> {
    ctx.db.execute("DELETE FROM former_homes WHERE server_link = ?1", [server]).map_err(dbe)?;
    Ok(())
}

/// Where a chat would be if a member moved it in one of the epochs we hold: the chat, the
/// next server and the log there.
pub struct Successor {
    /// The chat's id.
    pub chat: String,
    /// The next server on its list.
    pub server: ServerLink,
    /// The log a move in that epoch makes there.
    pub log: LogId,
    /// The epoch a move would be made from.
    pub epoch: u64,
    /// Whether that epoch is our current one. A move from an earlier one means our epoch
    /// moved on, on the old server, after the others left it: the two histories cannot be
    /// merged (see the module comment).
    pub current: bool,
}

/// The successors of every active chat that has a server after its own: from our current
/// epoch, and from the earlier epochs we still hold.
pub(crate) fn successors(ctx: &Ctx<'_>) -> Result<Vec<Successor>, ClientError> {
    let mut out = Vec::new();
    for chat in active_chats(ctx, None)? {
        let Some((index, next)) = next_server(ctx, &chat)? else { continue };
        let server = ServerLink::parse(&next)?;
        let current = mls::epoch_keys(&ctx.mls, &chat.group_id)?;
        // Newest first; epoch 0 had only the creator in it, so nobody moved from it.
        let epochs = crate::chats::stored_epochs(ctx.db, chat.id)?;
        for keys in epochs.iter().rev().filter(|k| k.epoch > 0) {
            out.push(Successor {
                chat: chat.reference.clone(),
                server: server.clone(),
                log: keys.successor_log(index)?,
                epoch: keys.epoch,
                current: keys.epoch == current.epoch,
            });
        }
    }
    Ok(out)
}

/// Members moved `chat` from `epoch`, before ours: we cannot follow (MLS cannot merge the
/// two histories). The chat is marked as forked (reported once) and, when a member can be
/// asked, we give our branch up and ask to be re-added on theirs: our messages since we
/// entered `epoch` go again after the re-add (those the movers read on the old log carry
/// keys they recognise), and members still on our branch's log do not answer.
pub(crate) fn moved_without_us(
    ctx: &Ctx<'_>,
    chat: &str,
    epoch: u64,
) -> Result<Vec<Event>, ClientError> {
    let Some(row) = chat_row(ctx.db, "ref = ?1", &chat)? else { return Ok(vec![]) };
    if row.state != "member" {
        // Already waiting to be re-added, or gone.
        return Ok(vec![]);
    }
    let marked = ctx
        .db
        .execute(
            "UPDATE chats SET fork_alarm = ?2 WHERE id = ?1 AND fork_alarm = 0",
            params![row.id, crate::chats::FORK_MOVED],
        )
        .map_err(dbe)?;
    let mut events = Vec::new();
    if marked == 1 {
        events.push(Event::ForkAlarm { chat: row.reference.clone() });
    }
    let helpers = gaps::helpers(ctx, &row)?;
    if helpers.is_empty() {
        // Nobody to ask: the chat stays on its branch, with whoever is on it.
        return Ok(events);
    }
    let since: Option<(u64, u64)> = ctx
        .db
        .query_row(
            "SELECT since_generation, since_seq FROM chat_epochs WHERE chat_id = ?1 AND epoch = ?2",
            params![row.id, epoch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(dbe)?;
    let (generation, seq) = since.unwrap_or((0, 0));
    ctx.db
        .execute(
            "UPDATE messages SET state = 'queued', seq = NULL
             WHERE chat_id = ?1 AND outgoing = 1 AND state = 'sent'
               AND (generation > ?2 OR (generation = ?2 AND seq > ?3))",
            params![row.id, generation, seq],
        )
        .map_err(dbe)?;
    events.extend(gaps::fall_behind(ctx, &row, &helpers, Some(&row.log))?);
    Ok(events)
}

/// Another member moved `chat` (its successor log has entries): move with it.
pub(crate) fn follow(ctx: &Ctx<'_>, chat: &str) -> Result<bool, ClientError> {
    let Some(row) = chat_row(ctx.db, "ref = ?1", &chat)? else { return Ok(false) };
    let Some((index, next)) = next_server(ctx, &row)? else { return Ok(false) };
    move_chat(ctx, &row, index, &next)?;
    Ok(true)
}

/// Moves a chat's log to the server at `index` of its list (`to`), from the current epoch.
fn move_chat(ctx: &Ctx<'_>, chat: &ChatRow, index: usize, to: &str) -> Result<(), ClientError> {
    ServerLink::parse(to)?;
    // A commit in flight on the old log is planned again on the new one; the old server,
    // out of reach, need not have the old log created or kept alive any more.
    groups::lose_commit(ctx, chat)?;
    ctx.db
        .execute(
            "DELETE FROM outbox WHERE chat_id = ?1 AND kind = 'log_create' AND target = ?2",
            params![chat.id, &chat.log.0[..]],
        )
        .map_err(dbe)?;
    let keys = mls::epoch_keys(&ctx.mls, &chat.group_id)?;
    let read_to = chat.cursor;
    groups::switch_log(ctx, chat, to, &keys.successor_log(index)?, &keys, read_to)?;
    let row = chat_row(ctx.db, "id = ?1", &chat.id)?.ok_or(bad("chat vanished"))?;
    // MLS encrypts nothing while a proposal waits; the proposal's commit comes first then,
    // and the marker is left out (members re-send from their own `read_to` still).
    if !mls::has_pending_proposals(&ctx.mls, &chat.group_id)? {
        let plain =
            AppMessage { epoch_tag: keys.authenticator_tag, content: Content::Moved { read_to } };
        let mls_message = mls::encrypt(&ctx.mls, ctx.me, &chat.group_id, &plain.encode())?;
        crate::chats::queue_envelope(ctx, &row, &keys, "message", None, &mls_message, None)?;
    }
    groups::pump(ctx, chat.id)
}

/// A member wrote that it had read the old log up to `read_to` when it moved: our own
/// messages after that go again.
pub(crate) fn moved(ctx: &Ctx<'_>, chat: &ChatRow, read_to: u64) -> Result<(), ClientError> {
    resend_after(ctx.db, chat.id, read_to)?;
    groups::pump(ctx, chat.id)
}

/// A server that active chats are on (`postern status`).
pub struct ChatServer {
    /// The server.
    pub server: ServerLink,
    /// How many active chats are on it.
    pub chats: u64,
    /// Since when no door to it has opened (Unix seconds), if that is so.
    pub out_of_reach_since: Option<u64>,
}

/// The servers the active chats are on, the one with the oldest chat first.
pub(crate) fn chat_servers(db: &rusqlite::Connection) -> Result<Vec<ChatServer>, ClientError> {
    let mut stmt = db
        .prepare_cached(
            "SELECT c.server_link, count(*), o.since FROM chats c
             LEFT JOIN outages o ON o.server = c.server_link
             WHERE c.active = 1 AND c.state NOT IN ('left', 'stale')
             GROUP BY c.server_link ORDER BY min(c.id)",
        )
        .map_err(dbe)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?, r.get::<_, Option<u64>>(2)?))
        })
        .map_err(dbe)?;
    let mut out = Vec::new();
    for row in rows {
        let (server, chats, since) = row.map_err(dbe)?;
        out.push(ChatServer {
            server: ServerLink::parse(&server)?,
            chats,
            out_of_reach_since: since,
        });
    }
    Ok(out)
}

/// When the successors were last looked for (Unix seconds), if ever.
pub(crate) fn last_check(db: &rusqlite::Connection) -> Result<Option<u64>, ClientError> {
    db.query_row("SELECT at FROM successor_checks WHERE id = 1", [], |r| r.get(0))
        .optional()
        .map_err(dbe)
}

/// Records that the successors were looked for at `now`.
pub(crate) fn checked(ctx: &Ctx<'_>, now: u64) -> Result<(), ClientError> {
    ctx.db
        .execute("INSERT OR REPLACE INTO successor_checks (id, at) VALUES (1, ?1)", [now])
        .map_err(dbe)?;
    Ok(())
}
