//! Creating chats and groups, and the commit loop that keeps every member in the same state.
//!
//! - **Intents.** Adding or removing someone is first stored as an intent; [`pump`] turns the
//!   pending intents of a chat, together with every stored proposal, into one commit when no
//!   commit of ours is in flight.
//! - **First valid commit in log order wins.** A commit goes to the log as an outbox item;
//!   its acknowledgement only records its place. It is resolved when the log is read up to it
//!   ([`resolve_own_commit`]): if no other valid commit came first and it still covers every
//!   Remove proposal before it, it is merged; otherwise it is dropped, with its Welcome, and
//!   its intents go back to pending to be re-planned against the new state.
//! - **Welcomes only after the win**, sealed then, with the log the new member must read.
//! - **A removal rotates the log**: the new log id is derived from the new epoch, which the
//!   removed member cannot compute. Every member creates the new log (the same id and key for
//!   all; a conflict means another member was first) and moves to it; our own messages that
//!   landed in the old log after the removal are sealed again for the new one.
//! - **Removals go out as a Remove proposal, then the commit.** Every member refuses a commit
//!   that leaves out a Remove proposal before it in the log, so a member who keeps
//!   committing cannot outrun its own removal.
//! - **Proposals** (a member leaving) are committed by the member with the lowest leaf index
//!   that is not leaving, at once, or by anyone who has something to send (openmls encrypts
//!   nothing while a proposal waits), so one leave never stalls the group.

use postern_proto::content::{Content, DropPayload, GroupMeta, KeyPackagePayload};
use postern_proto::ids::{ClaimToken, DropId, LogId, PublicKey};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::chats::{
    ChatRow, Ctx, arr, bad, chat_row, contact_for, dbe, insert_outbox, mailbox_keys, new_ref,
    now_ms, queue_envelope, random, resend_after, resolve, save_epoch, seal_drop, seal_queued,
    today, unseal,
};
use crate::mls::{self, EpochKeys, MlsError};
use crate::{ClientError, envelope};

/// Where a person's Welcome goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WelcomeTarget {
    pub(crate) server: String,
    pub(crate) drop: [u8; 32],
    pub(crate) hpke: [u8; 32],
}

/// A person to add: their identity, chosen name, one key package per device, and where
/// their Welcome goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Invitee {
    pub(crate) identity: [u8; 32],
    pub(crate) name: String,
    pub(crate) key_packages: Vec<Vec<u8>>,
    pub(crate) welcome_to: WelcomeTarget,
}

/// A contact's card: how to claim their key packages and reach their mailbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Card {
    pub(crate) server: String,
    pub(crate) drop: [u8; 32],
    pub(crate) hpke: [u8; 32],
    pub(crate) kp_key: [u8; 32],
    pub(crate) token: [u8; 32],
}

impl Card {
    /// The server to claim from.
    pub fn server(&self) -> Result<postern_proto::link::ServerLink, ClientError> {
        Ok(postern_proto::link::ServerLink::parse(&self.server)?)
    }

    /// The claim token.
    pub fn token(&self) -> ClaimToken {
        ClaimToken(self.token)
    }
}

fn checked_key_packages(
    ctx: &Ctx<'_>,
    invitee: &Invitee,
) -> Result<Vec<openmls::prelude::KeyPackage>, ClientError> {
    let kps = invitee
        .key_packages
        .iter()
        .map(|kp| {
            let kp = mls::peer_key_package(&ctx.mls, kp)?;
            let leaf = kp.leaf_node();
            let device = mls::check_credential(leaf.credential(), leaf.signature_key().as_slice())?;
            if device.identity_key.0 != invitee.identity {
                return Err(MlsError::BadCredential);
            }
            Ok(kp)
        })
        .collect::<Result<Vec<_>, MlsError>>()?;
    if kps.is_empty() {
        return Err(MlsError::Invalid.into());
    }
    Ok(kps)
}

fn queue_welcomes(
    ctx: &Ctx<'_>,
    chat: i64,
    welcome: &[u8],
    targets: &[WelcomeTarget],
) -> Result<(), ClientError> {
    for t in targets {
        insert_outbox(
            ctx.db,
            Some(chat),
            "welcome",
            &t.server,
            &t.drop,
            welcome,
            (None, Some(&t.hpke[..]), None),
        )?;
    }
    Ok(())
}

/// Creates the MLS group and the chat (inactive until its first commit wins), and queues
/// `log_create`, the commit and the Welcomes. A 1:1 chat has one invitee and no `meta`.
/// Returns the chat id and its display name (the contact's, or the group's).
pub(crate) fn create_chat(
    ctx: &Ctx<'_>,
    invitees: Vec<Invitee>,
    meta: Option<GroupMeta>,
) -> Result<(String, String), ClientError> {
    let mut members = Vec::new();
    for invitee in &invitees {
        members.extend(checked_key_packages(ctx, invitee)?);
    }
    // The log lives on the server of whoever creates the chat, and moves through their
    // fallback servers.
    let servers = crate::moves::new_chat_servers(ctx)?;
    let created = mls::create_group(&ctx.mls, ctx.me, &members, meta.as_ref(), &servers)?;
    let keys = mls::epoch_keys(&ctx.mls, &created.group_id)?;
    let next = mls::pending_epoch_keys(&ctx.mls, &created.group_id)?;
    let log = keys.log_id;
    let (contact, name, kind) = match (&meta, &invitees[..]) {
        (None, [one]) => {
            let (id, name) = contact_for(ctx, &PublicKey(one.identity), &one.name)?;
            (Some(id), name, "direct")
        }
        (Some(meta), _) => (None, meta.name.clone(), "group"),
        (None, _) => return Err(bad("a 1:1 chat has one other person")),
    };
    let reference = new_ref(ctx.db, "chats")?;
    let server = ctx.server.to_link_string();
    ctx.db
        .execute(
            "INSERT INTO chats (ref, group_id, contact_id, server_link, log_id, cursor, active, created_at, kind)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, ?6, ?7)",
            params![reference, created.group_id, contact, server, &log.0[..], now_ms() / 1000, kind],
        )
        .map_err(dbe)?;
    let chat =
        chat_row(ctx.db, "id = ?1", &ctx.db.last_insert_rowid())?.ok_or(bad("chat vanished"))?;
    save_epoch(ctx.db, chat.id, &keys)?;
    let key = keys.append_key.to_bytes();
    insert_outbox(
        ctx.db,
        Some(chat.id),
        "log_create",
        &server,
        &log.0,
        &[],
        (Some(&key[..]), None, None),
    )?;
    let next_key = Some(next.append_public());
    queue_envelope(ctx, &chat, &keys, "commit", next_key, &created.commit, None)?;
    let targets: Vec<WelcomeTarget> = invitees.into_iter().map(|i| i.welcome_to).collect();
    queue_welcomes(ctx, chat.id, &created.welcome, &targets)?;
    Ok((reference, name))
}

// ---------------------------------------------------------------------------------------
// Contact cards

/// How long a card's claim token lasts, in days.
const CARD_DAYS: u32 = 365;
/// Claims per day through a card's token.
const CARD_CLAIMS_PER_DAY: u16 = 20;

/// Queues our card for the contact of a direct chat that just became usable: a fresh drop
/// address and claim token of ours (registered first), sent inside the chat.
pub(crate) fn send_card(ctx: &Ctx<'_>, chat: &ChatRow) -> Result<(), ClientError> {
    let keys = mailbox_keys(ctx)?;
    let (_, hpke) = crate::store::hpke_keypair(ctx.db)?;
    let drop: [u8; 32] = random();
    let token: [u8; 32] = random();
    let expires = today().saturating_add(CARD_DAYS);
    ctx.db
        .execute(
            "INSERT INTO invites (drop_id, token, kind, expires) VALUES (?1, ?2, 'card', ?3)",
            params![&drop[..], &token[..], expires],
        )
        .map_err(dbe)?;
    let owner = keys.owner.to_bytes();
    let home = ctx.server.to_link_string();
    insert_outbox(
        ctx.db,
        None,
        "drop_create",
        &home,
        &drop,
        &keys.mailbox.0,
        (Some(&owner[..]), None, None),
    )?;
    let mut body = keys.mailbox.0.to_vec();
    body.extend_from_slice(&expires.to_be_bytes());
    body.extend_from_slice(&CARD_CLAIMS_PER_DAY.to_be_bytes());
    let hash = ClaimToken(token).hash();
    insert_outbox(
        ctx.db,
        None,
        "claim_token_create",
        &home,
        &hash.0,
        &body,
        (Some(&owner[..]), None, None),
    )?;
    let card = Content::Card { server: home, drop: DropId(drop), hpke, kp_key: keys.kp_key, token };
    crate::chats::queue_control(ctx, chat, card)
}

/// A contact's card, if it has arrived.
pub(crate) fn card_of(
    ctx: &Ctx<'_>,
    contact: &str,
) -> Result<(PublicKey, String, Card), ClientError> {
    let row: Option<(Vec<u8>, Option<Vec<u8>>)> = ctx
        .db
        .query_row("SELECT identity_key, card FROM contacts WHERE name = ?1", [contact], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(dbe)?;
    let (identity, card) = row.ok_or_else(|| ClientError::NotFound(contact.to_owned()))?;
    let card = card.ok_or_else(|| ClientError::NoCard(contact.to_owned()))?;
    let card: Card =
        serde_json::from_slice(&card).map_err(|_| bad("a stored card does not decode"))?;
    Ok((PublicKey(arr(&identity)?), contact.to_owned(), card))
}

/// Stores a card that arrived in a chat, for the contact who sent it.
pub(crate) fn store_card(ctx: &Ctx<'_>, sender: &PublicKey, card: Card) -> Result<(), ClientError> {
    let json = serde_json::to_vec(&card).map_err(|_| bad("card encoding"))?;
    ctx.db
        .execute(
            "UPDATE contacts SET card = ?2 WHERE identity_key = ?1",
            params![&sender.0[..], json],
        )
        .map_err(dbe)?;
    Ok(())
}

/// Opens claimed key packages (sealed under `kp_key` with the owner's name).
pub(crate) fn open_key_packages(
    kp_key: &[u8; 32],
    sealed: &[Vec<u8>],
) -> Result<Vec<KeyPackagePayload>, ClientError> {
    sealed
        .iter()
        .map(|s| {
            let plain = Zeroizing::new(envelope::open_key_package(kp_key, s)?);
            Ok(KeyPackagePayload::decode(&plain).map_err(|_| MlsError::Invalid)?)
        })
        .collect()
}

/// The invitee for a contact, from their card and the key packages claimed with it.
pub(crate) fn invitee(
    identity: PublicKey,
    name: String,
    card: &Card,
    sealed: &[Vec<u8>],
) -> Result<Invitee, ClientError> {
    let key_packages =
        open_key_packages(&card.kp_key, sealed)?.into_iter().map(|p| p.key_package).collect();
    Ok(Invitee {
        identity: identity.0,
        name,
        key_packages,
        welcome_to: WelcomeTarget { server: card.server.clone(), drop: card.drop, hpke: card.hpke },
    })
}

// ---------------------------------------------------------------------------------------
// Group operations

fn group_row(ctx: &Ctx<'_>, chat: &str) -> Result<(ChatRow, GroupMeta), ClientError> {
    let row = resolve(ctx, chat)?;
    let meta = mls::group_meta(&ctx.mls, &row.group_id)?
        .ok_or_else(|| ClientError::NotAGroup(chat.to_owned()))?;
    match row.state.as_str() {
        "member" => {}
        "stale" => return Err(ClientError::Rejoining(chat.to_owned())),
        _ => return Err(ClientError::NotAMember(chat.to_owned())),
    }
    Ok((row, meta))
}

fn may(ctx: &Ctx<'_>, meta: &GroupMeta, members_may: bool) -> Result<(), ClientError> {
    if members_may || meta.admins.contains(&ctx.me.identity_public().0) {
        Ok(())
    } else {
        Err(ClientError::NotAllowed)
    }
}

/// What members who are not admins may do in a group (admins may do both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRules {
    /// Every member may add people.
    pub members_can_add: bool,
    /// Every member may remove people.
    pub members_can_remove: bool,
}

/// `group create`: a new group with these people (the creator is its admin).
pub(crate) fn create_group(
    ctx: &Ctx<'_>,
    name: &str,
    invitees: Vec<Invitee>,
    rules: GroupRules,
) -> Result<(String, String), ClientError> {
    crate::check_name(name)?;
    let meta = GroupMeta {
        name: name.to_owned(),
        admins: vec![ctx.me.identity_public().0],
        members_can_add: rules.members_can_add,
        members_can_remove: rules.members_can_remove,
    };
    create_chat(ctx, invitees, Some(meta))
}

/// `group add`: queue adding a person.
pub(crate) fn add(ctx: &Ctx<'_>, chat: &str, invitee: Invitee) -> Result<(), ClientError> {
    let (row, meta) = group_row(ctx, chat)?;
    may(ctx, &meta, meta.members_can_add)?;
    checked_key_packages(ctx, &invitee)?;
    let payload = serde_json::to_vec(&invitee).map_err(|_| bad("intent encoding"))?;
    ctx.db
        .execute(
            "INSERT INTO intents (chat_id, kind, identity, payload, state) VALUES (?1, 'add', ?2, ?3, 'pending')",
            params![row.id, &invitee.identity[..], payload],
        )
        .map_err(dbe)?;
    pump(ctx, row.id)
}

/// A member's device asks to be re-added (its rejoin request was checked): queue replacing
/// its leaf.
pub(crate) fn readd(ctx: &Ctx<'_>, row: &ChatRow, invitee: &Invitee) -> Result<(), ClientError> {
    let payload = serde_json::to_vec(invitee).map_err(|_| bad("intent encoding"))?;
    ctx.db
        .execute(
            "INSERT INTO intents (chat_id, kind, identity, payload, state) VALUES (?1, 'readd', ?2, ?3, 'pending')",
            params![row.id, &invitee.identity[..], payload],
        )
        .map_err(dbe)?;
    pump(ctx, row.id)
}

/// We joined from our last-resort key package: queue an Update of our own leaf, so its
/// keys, shared by every first contact the package answered, stop protecting this chat.
/// (Call after anything sealed in the joining epoch: nothing is encrypted while our commit
/// is in flight.)
pub(crate) fn update_own_leaf(ctx: &Ctx<'_>, row: &ChatRow) -> Result<(), ClientError> {
    ctx.db
        .execute(
            "INSERT INTO intents (chat_id, kind, identity, state) VALUES (?1, 'update', ?2, 'pending')",
            params![row.id, &ctx.me.identity_public().0[..]],
        )
        .map_err(dbe)?;
    pump(ctx, row.id)
}

/// `group remove`: queue removing a contact (all their devices).
pub(crate) fn remove(ctx: &Ctx<'_>, chat: &str, contact: &str) -> Result<(), ClientError> {
    let (row, meta) = group_row(ctx, chat)?;
    may(ctx, &meta, meta.members_can_remove)?;
    let identity: Vec<u8> = ctx
        .db
        .query_row("SELECT identity_key FROM contacts WHERE name = ?1", [contact], |r| r.get(0))
        .optional()
        .map_err(dbe)?
        .ok_or_else(|| ClientError::NotFound(contact.to_owned()))?;
    let members = mls::members(&ctx.mls, &row.group_id)?;
    if !members.iter().any(|m| m.credential.identity_key.0[..] == identity[..]) {
        return Err(ClientError::NotFound(contact.to_owned()));
    }
    ctx.db
        .execute(
            "INSERT INTO intents (chat_id, kind, identity, state) VALUES (?1, 'remove', ?2, 'pending')",
            params![row.id, identity],
        )
        .map_err(dbe)?;
    pump(ctx, row.id)
}

/// `group leave`: propose our removal; another member commits it.
pub(crate) fn leave(ctx: &Ctx<'_>, chat: &str) -> Result<(), ClientError> {
    let (row, _) = group_row(ctx, chat)?;
    ctx.db.execute("UPDATE chats SET state = 'leaving' WHERE id = ?1", [row.id]).map_err(dbe)?;
    pump(ctx, row.id)
}

/// A group member as `group members` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The contact's name, the name they chose, or "unknown".
    pub name: String,
    /// Their safety number.
    pub fingerprint: String,
    /// How many of their devices are in the group.
    pub devices: usize,
    /// Whether they may add and remove anyone.
    pub admin: bool,
    /// Whether this is us.
    pub me: bool,
}

/// `group members`.
pub(crate) fn members(ctx: &Ctx<'_>, chat: &str) -> Result<(String, Vec<Member>), ClientError> {
    let row = resolve(ctx, chat)?;
    let meta = mls::group_meta(&ctx.mls, &row.group_id)?
        .ok_or_else(|| ClientError::NotAGroup(chat.to_owned()))?;
    let mut out: Vec<(PublicKey, usize)> = Vec::new();
    for m in mls::members(&ctx.mls, &row.group_id)? {
        match out.iter_mut().find(|(k, _)| *k == m.credential.identity_key) {
            Some((_, n)) => *n += 1,
            None => out.push((m.credential.identity_key, 1)),
        }
    }
    let me = ctx.me.identity_public();
    let members = out
        .into_iter()
        .map(|(identity, devices)| {
            Ok(Member {
                name: crate::chats::identity_name(ctx, &identity)?,
                fingerprint: crate::fingerprint(&identity),
                devices,
                admin: meta.admins.contains(&identity.0),
                me: identity == me,
            })
        })
        .collect::<Result<_, ClientError>>()?;
    Ok((meta.name, members))
}

// ---------------------------------------------------------------------------------------
// The commit loop

/// Moves a chat forward when nothing of ours is in flight: proposes our leave, commits
/// pending intents and proposals, or seals queued messages.
pub(crate) fn pump(ctx: &Ctx<'_>, chat: i64) -> Result<(), ClientError> {
    let Some(row) = chat_row(ctx.db, "id = ?1", &chat)? else { return Ok(()) };
    if !row.active || matches!(row.state.as_str(), "left" | "stale") {
        return Ok(());
    }
    let Some((keys, proposals)) = mls::pump_state(&ctx.mls, &row.group_id)? else {
        return Ok(());
    };
    let epoch = keys.epoch;
    if row.state == "leaving" {
        // Proposals last one epoch: propose again in each new epoch until removed.
        if row.leave_epoch != Some(epoch) {
            let proposal = mls::leave(&ctx.mls, ctx.me, &row.group_id)?;
            queue_envelope(ctx, &row, &keys, "proposal", None, &proposal, None)?;
            ctx.db
                .execute("UPDATE chats SET leave_epoch = ?2 WHERE id = ?1", params![chat, epoch])
                .map_err(dbe)?;
        }
        return Ok(());
    }
    // Intents already done by someone else's commit are finished.
    type Intent = (i64, String, Vec<u8>, Option<Vec<u8>>);
    let intents: Vec<Intent> = {
        let mut stmt = ctx
            .db
            .prepare_cached(
                "SELECT id, kind, identity, payload FROM intents WHERE chat_id = ?1 ORDER BY id",
            )
            .map_err(dbe)?;
        let rows = stmt
            .query_map([chat], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    // The members (each credential checked again) and the proposed removals only when an
    // intent needs them: a send with none skips loading them, and in a 250-member group the
    // members' checks were most of a send's cost.
    let (members, proposed) = if intents.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        (
            mls::members(&ctx.mls, &row.group_id)?,
            mls::proposed_removal_leaves(&ctx.mls, &row.group_id)?,
        )
    };
    let is_member =
        |identity: &[u8]| members.iter().any(|m| m.credential.identity_key.0[..] == *identity);
    let decode = |payload: Option<Vec<u8>>| -> Result<Invitee, ClientError> {
        serde_json::from_slice(payload.as_deref().unwrap_or_default())
            .map_err(|_| bad("a stored intent does not decode"))
    };
    let mut adds = Vec::new();
    let mut removes = Vec::new();
    let mut replace = Vec::new();
    let mut targets = Vec::new();
    let mut used = Vec::new();
    let mut self_update = false;
    for (id, kind, identity, payload) in intents {
        match (kind.as_str(), is_member(&identity)) {
            ("add", false) => {
                let invitee = decode(payload)?;
                adds.extend(checked_key_packages(ctx, &invitee)?);
                targets.push(invitee.welcome_to);
                used.push(id);
            }
            ("remove", true) => {
                removes.extend(
                    members
                        .iter()
                        .filter(|m| m.credential.identity_key.0[..] == identity[..])
                        .map(|m| m.leaf),
                );
                used.push(id);
            }
            ("readd", true) => {
                // Replace the device's leaf, unless that happened already or the device is
                // on its way out.
                let invitee = decode(payload)?;
                let kp = checked_key_packages(ctx, &invitee)?.remove(0);
                let leaf = kp.leaf_node();
                let old = members.iter().find(|m| {
                    m.credential.device_key.0[..] == *leaf.signature_key().as_slice()
                        && m.encryption_key != *leaf.encryption_key()
                        && !proposed.contains(&m.leaf)
                        && !removes.contains(&m.leaf)
                        && !replace.contains(&m.leaf)
                });
                match old {
                    Some(old) => {
                        replace.push(old.leaf);
                        adds.push(kp);
                        targets.push(invitee.welcome_to);
                        used.push(id);
                    }
                    None => {
                        ctx.db.execute("DELETE FROM intents WHERE id = ?1", [id]).map_err(dbe)?;
                    }
                }
            }
            ("update", true) => {
                self_update = true;
                used.push(id);
            }
            _ => {
                ctx.db.execute("DELETE FROM intents WHERE id = ?1", [id]).map_err(dbe)?;
            }
        }
    }
    let queued: bool = ctx
        .db
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE chat_id = ?1 AND state = 'queued')",
            [chat],
            |r| r.get(0),
        )
        .map_err(dbe)?;
    let committer = proposals && (queued || designated_committer(ctx, &row)?);
    if used.is_empty() && !committer {
        if !proposals {
            seal_queued(ctx, &row, &keys)?;
        }
        return Ok(());
    }
    // Removals first as proposals (unless one already waits in this epoch), then the
    // commit that covers them. A replaced leaf goes in the commit itself, beside its
    // device's new key package.
    for leaf in removes.into_iter().filter(|l| !proposed.contains(l)) {
        let proposal = mls::propose_remove(&ctx.mls, ctx.me, &row.group_id, leaf)?;
        queue_envelope(ctx, &row, &keys, "proposal", None, &proposal, None)?;
    }
    let plan = mls::CommitPlan { adds, replace, self_update };
    let (commit, welcome) = mls::commit(&ctx.mls, ctx.me, &row.group_id, plan)?;
    let next_key = Some(mls::pending_epoch_keys(&ctx.mls, &row.group_id)?.append_public());
    queue_envelope(ctx, &row, &keys, "commit", next_key, &commit, None)?;
    if let Some(welcome) = welcome {
        queue_welcomes(ctx, chat, &welcome, &targets)?;
    }
    for id in used {
        ctx.db
            .execute("UPDATE intents SET state = 'committing' WHERE id = ?1", [id])
            .map_err(dbe)?;
    }
    Ok(())
}

/// Whether we commit pending proposals at once: we hold the lowest leaf index among the
/// members no proposal removes. Everyone reaches the same answer from the same state.
fn designated_committer(ctx: &Ctx<'_>, row: &ChatRow) -> Result<bool, ClientError> {
    let leaving = mls::proposed_removal_leaves(&ctx.mls, &row.group_id)?;
    let own = mls::own_leaf(&ctx.mls, &row.group_id)?;
    let first = mls::members(&ctx.mls, &row.group_id)?
        .into_iter()
        .map(|m| m.leaf)
        .find(|leaf| !leaving.contains(leaf));
    Ok(first == Some(own))
}

/// Our commit's entry was read back at `seq`: merge it if it won, else drop it and re-plan.
pub(crate) fn resolve_own_commit(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    outbox: i64,
    seq: u64,
) -> Result<(), ClientError> {
    ctx.db.execute("DELETE FROM outbox WHERE id = ?1", [outbox]).map_err(dbe)?;
    if mls::pending_commit_valid(&ctx.mls, &chat.group_id)? {
        crate::chats::pause_point("before-merge");
        let removed_any = mls::merge_pending(&ctx.mls, &chat.group_id)?;
        ctx.db
            .execute("DELETE FROM intents WHERE chat_id = ?1 AND state = 'committing'", [chat.id])
            .map_err(dbe)?;
        let first = !chat.active;
        after_commit(ctx, chat, seq, removed_any, false)?;
        release_welcomes(ctx, chat.id, seq)?;
        if first && chat.kind == "direct" {
            let row = chat_row(ctx.db, "id = ?1", &chat.id)?.ok_or(bad("chat vanished"))?;
            send_card(ctx, &row)?;
        }
    } else {
        lose_commit(ctx, chat)?;
    }
    pump(ctx, chat.id)
}

/// Our commit lost (another valid commit came first, or ours missed a Remove proposal
/// before it, or it cannot be applied): drop it and its Welcomes; its intents wait again.
pub(crate) fn lose_commit(ctx: &Ctx<'_>, chat: &ChatRow) -> Result<(), ClientError> {
    if mls::has_pending_commit(&ctx.mls, &chat.group_id)? {
        mls::clear_pending(&ctx.mls, &chat.group_id)?;
    }
    ctx.db
        .execute(
            "DELETE FROM outbox WHERE chat_id = ?1 AND kind IN ('commit', 'welcome')",
            [chat.id],
        )
        .map_err(dbe)?;
    ctx.db
        .execute("UPDATE intents SET state = 'pending' WHERE chat_id = ?1", [chat.id])
        .map_err(dbe)?;
    Ok(())
}

/// After any commit is merged (ours or another member's): new epoch keys, the chat's state,
/// the log's rotation after a removal.
pub(crate) fn after_commit(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    seq: u64,
    removed_any: bool,
    removed_me: bool,
) -> Result<(), ClientError> {
    if removed_me {
        ctx.db.execute("UPDATE chats SET state = 'left' WHERE id = ?1", [chat.id]).map_err(dbe)?;
        ctx.db
            .execute("DELETE FROM outbox WHERE chat_id = ?1 AND kind <> 'drop'", [chat.id])
            .map_err(dbe)?;
        ctx.db
            .execute(
                "UPDATE messages SET state = 'failed' WHERE chat_id = ?1 AND state = 'queued'",
                [chat.id],
            )
            .map_err(dbe)?;
        ctx.db.execute("DELETE FROM intents WHERE chat_id = ?1", [chat.id]).map_err(dbe)?;
        return Ok(());
    }
    let keys = mls::epoch_keys(&ctx.mls, &chat.group_id)?;
    save_epoch(ctx.db, chat.id, &keys)?;
    ctx.db.execute("UPDATE chats SET active = 1 WHERE id = ?1", [chat.id]).map_err(dbe)?;
    if !removed_any {
        return Ok(());
    }
    // Rotate: the new log is named by the new epoch. Every member creates it (same id and
    // key for all) and moves to it; what we sent to the old log after this commit, or sealed
    // for it, goes again to the new one.
    switch_log(ctx, chat, &chat.server, &keys.log_id, &keys, seq)
}

/// Moves a chat to `log` on `server` (a rotation after a removal, or a move to the next
/// server of its list): a new generation, read from its start; our messages the old log has
/// after `after`, and what was sealed for the old log, go out again to the new one; the new
/// log is created with `keys`' append key (every member does; the first wins).
pub(crate) fn switch_log(
    ctx: &Ctx<'_>,
    chat: &ChatRow,
    server: &str,
    log: &LogId,
    keys: &EpochKeys,
    after: u64,
) -> Result<(), ClientError> {
    ctx.db
        .execute(
            "UPDATE chats SET server_link = ?2, log_id = ?3, cursor = 0, generation = generation + 1
             WHERE id = ?1",
            params![chat.id, server, &log.0[..]],
        )
        .map_err(dbe)?;
    resend_after(ctx.db, chat.id, after)?;
    unseal(ctx, chat.id, &["message", "proposal"], Some(&chat.log))?;
    let key = keys.append_key.to_bytes();
    insert_outbox(
        ctx.db,
        Some(chat.id),
        "log_create",
        server,
        &log.0,
        &[],
        (Some(&key[..]), None, None),
    )
}

/// Seals the Welcomes of a commit that won, with the log the new members read and where.
fn release_welcomes(ctx: &Ctx<'_>, chat: i64, seq: u64) -> Result<(), ClientError> {
    let row = chat_row(ctx.db, "id = ?1", &chat)?.ok_or(bad("chat vanished"))?;
    // After a rotation the new members start the new log from its beginning.
    let after = if row.cursor == 0 { 0 } else { seq };
    type Welcome = (i64, Vec<u8>, Vec<u8>, Vec<u8>);
    let welcomes: Vec<Welcome> = {
        let mut stmt = ctx
            .db
            .prepare_cached("SELECT id, target, body, hpke_key FROM outbox WHERE chat_id = ?1 AND kind = 'welcome'")
            .map_err(dbe)?;
        let rows = stmt
            .query_map([chat], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(dbe)?;
        rows.collect::<Result<_, _>>().map_err(dbe)?
    };
    for (id, target, welcome, hpke) in welcomes {
        let payload = DropPayload::Welcome {
            drop: DropId(arr(&target)?),
            name: ctx.me.name.clone(),
            server: row.server.clone(),
            log: row.log,
            after,
            welcome,
        };
        crate::chats::pause_point("before-welcome");
        let sealed = seal_drop(&ctx.mls, &arr(&hpke)?, &payload)?;
        ctx.db
            .execute(
                "UPDATE outbox SET kind = 'drop', body = ?2, hpke_key = NULL WHERE id = ?1",
                params![id, sealed],
            )
            .map_err(dbe)?;
    }
    Ok(())
}

/// Sends our profile into a group we just joined, or whose membership just grew, so members
/// who are not our contacts can name us.
pub(crate) fn send_profile(ctx: &Ctx<'_>, chat: &ChatRow) -> Result<(), ClientError> {
    crate::chats::queue_control(ctx, chat, Content::Profile { name: ctx.me.name.clone() })
}
