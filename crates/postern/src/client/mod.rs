//! The client commands. Each runs against an open client and a [`driver::Driver`]; when
//! `postern listen` owns the home, commands are handed to it over the home's control socket
//! ([`control`]) instead of opening the store beside it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use postern_client::{
    Client, ClientError, Event, HistoryItem, InviteKind, InviteLink, KeySource, MessageState,
};
use postern_proto::link::{RelayLink, ServerLink};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

mod control;
mod driver;
mod network;
mod transport;

use driver::Driver;

/// Where the client's home is: `--home`, else `$XDG_DATA_HOME/postern/client`.
pub(crate) fn home_dir(home: Option<PathBuf>) -> PathBuf {
    home.or_else(|| std::env::var_os("POSTERN_HOME").filter(|h| !h.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| crate::data_dir().join("client"))
}

/// The store key: `POSTERN_PASSPHRASE` when set, else the home's key file.
fn key_source() -> KeySource {
    match std::env::var("POSTERN_PASSPHRASE") {
        Ok(p) if !p.is_empty() => KeySource::Passphrase(Zeroizing::new(p)),
        _ => KeySource::KeyFile,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[derive(clap::Args, Debug)]
pub(crate) struct InitArgs {
    /// Your display name, shown to the people you connect with.
    #[arg(long)]
    name: String,
    /// The link of your home server (`postern://server#…`).
    #[arg(long, required_unless_present = "test_device_of")]
    server: Option<String>,
    /// A relay link (`postern://relay#…`) to go through when the server cannot be reached
    /// directly; repeat for several.
    #[arg(long = "relay", value_name = "LINK")]
    relays: Vec<String>,
    /// Test hook: make this home a second device of the user in DIR (same identity and
    /// mailbox). Real device linking is not built yet.
    #[arg(long, hide = true, value_name = "DIR", conflicts_with = "server")]
    test_device_of: Option<PathBuf>,
}

pub(crate) fn init(home: &Path, args: InitArgs, json: bool) -> Result<()> {
    let relays = args
        .relays
        .iter()
        .map(|l| RelayLink::parse(l.trim()).context("not a relay link (postern://relay#…)"))
        .collect::<Result<Vec<_>>>()?;
    let mut client = match (&args.server, &args.test_device_of) {
        (Some(server), _) => {
            let link = ServerLink::parse(server).context("invalid server link")?;
            Client::init(home, key_source(), &args.name, link)?
        }
        (None, Some(first)) => {
            let first = Client::open(first, key_source())?;
            Client::init_device_of(home, key_source(), &first)?
        }
        (None, None) => anyhow::bail!("--server is required"),
    };
    for relay in &relays {
        client.add_relay(relay)?;
    }
    let who = client.whoami();
    let mut driver = Driver::new(client);
    runtime()?
        .block_on(async {
            let published = driver.publish().await;
            driver.close().await;
            published
        })
        .context("your identity is created; run `postern sync` to finish")?;
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({
            "event": "initialized",
            "name": who.name,
            "fingerprint": who.fingerprint,
            "device": who.device,
            "home": home.display().to_string(),
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "Created the identity of {} in {}.", who.name, home.display())?;
        writeln!(out, "Your safety number: {}", who.fingerprint)?;
    }
    Ok(())
}

/// A command that works on an existing home, in a form `listen` can be handed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Command {
    Whoami,
    Fingerprint { contact: Option<String> },
    Sync,
    Invite { once: bool },
    Connect { link: String },
    Requests,
    Accept { request: String },
    Chats,
    Contacts,
    Send { chat: String, text: String },
    Read { chat: String, limit: Option<usize> },
    GroupCreate { name: String, contacts: Vec<String>, rules: postern_client::GroupRules },
    GroupAdd { chat: String, contact: String },
    GroupRemove { chat: String, contact: String },
    GroupLeave { chat: String },
    GroupMembers { chat: String },
    RelaysAdd { link: String },
    RelaysList,
    RelaysRemove { id: i64 },
    RelaysShare { id: i64, qr: bool },
    ServersAdd { link: String },
    ServersList,
    Status { references: Vec<String> },
}

/// How long a command waits for another short-lived process to release the home.
const BUSY_WAIT: Duration = Duration::from_secs(30);

/// Runs a command: here when the home is free, else handed to the `listen` that owns it,
/// else after waiting for the other process to finish.
pub(crate) fn run(home: &Path, command: Command, json: bool) -> Result<()> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match Client::open(home, key_source()) {
            Ok(client) => {
                let mut out = Vec::new();
                let result = runtime()?.block_on(async {
                    let mut driver = Driver::new(client);
                    let result = execute(&mut driver, &command, json, &mut out).await;
                    driver.close().await;
                    result
                });
                std::io::stdout().lock().write_all(&out)?;
                return result;
            }
            Err(ClientError::Busy(dir)) => {
                if let Some(reply) = control::forward(home, &command, json)? {
                    std::io::stdout().lock().write_all(reply.output.as_bytes())?;
                    return match reply.error {
                        None => Ok(()),
                        Some(e) => Err(anyhow!(e)),
                    };
                }
                if std::time::Instant::now() > deadline {
                    return Err(ClientError::Busy(dir).into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs one command against an open client, writing its output to `out`.
pub(crate) async fn execute(
    driver: &mut Driver,
    command: &Command,
    json: bool,
    out: &mut Vec<u8>,
) -> Result<()> {
    match command {
        Command::Whoami => {
            let who = driver.client.whoami();
            if json {
                let line = serde_json::json!({
                    "name": who.name,
                    "fingerprint": who.fingerprint,
                    "device": who.device,
                    "server": who.server,
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}", who.name)?;
                writeln!(out, "safety number: {}", who.fingerprint)?;
                writeln!(out, "device: {}", who.device)?;
                writeln!(out, "server: {}", who.server.join(", "))?;
            }
        }
        Command::Fingerprint { contact } => {
            let (name, fingerprint) = match contact {
                None => {
                    let who = driver.client.whoami();
                    (who.name, who.fingerprint)
                }
                Some(wanted) => {
                    let found = driver.client.contacts()?.into_iter().find(|c| c.name == *wanted);
                    let c = found.ok_or_else(|| ClientError::NotFound(wanted.clone()))?;
                    (c.name, c.fingerprint)
                }
            };
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "name": name, "fingerprint": fingerprint })
                )?;
            } else {
                writeln!(out, "{fingerprint}")?;
            }
        }
        Command::Sync => {
            let published = driver.publish().await?;
            let events = match driver.sync().await {
                Ok(events) => events,
                Err(e) => {
                    // What did happen before the error (messages read, a chat or the mailbox
                    // moved) is shown with it.
                    print_events(out, &std::mem::take(&mut driver.unshown), json)?;
                    return Err(e);
                }
            };
            print_events(out, &events, json)?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "event": "synced", "published": published })
                )?;
            } else if published {
                writeln!(out, "Published your mailbox and key packages.")?;
            }
        }
        Command::Invite { once } => invite(driver, *once, json, out).await?,
        Command::Connect { link } => connect(driver, link, json, out).await?,
        Command::Requests => {
            // New messages stay stored for `read`; the requests are the list below.
            sync_quietly(driver).await;
            for r in driver.client.requests()? {
                if json {
                    let line = serde_json::json!({
                        "request": r.id, "name": r.name, "fingerprint": r.fingerprint,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{}  {}  safety number {}", r.id, r.name, r.fingerprint)?;
                }
            }
        }
        Command::Accept { request } => {
            let (chat, name) = driver.client.accept(request)?;
            let sent = driver.flush().await;
            report_connected(out, &chat, &name, json)?;
            sent.context("the chat is created here; run `postern sync` to finish")?;
        }
        Command::Chats => {
            for c in driver.client.chats()? {
                if json {
                    let line = serde_json::json!({
                        "chat": c.id, "name": c.name, "unread": c.unread, "group": c.group,
                        "member": c.member, "active": c.active, "fork_alarm": c.fork_alarm,
                        "rejoining": c.rejoining,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    let mut flags = String::new();
                    if c.group {
                        flags.push_str("  (group)");
                    }
                    if !c.member {
                        flags.push_str("  (you left)");
                    }
                    if !c.active {
                        flags.push_str("  (not yet on the server: run `postern sync`)");
                    }
                    if c.fork_alarm {
                        flags.push_str("  (WARNING: members disagree about this chat's state)");
                    }
                    if c.rejoining {
                        flags.push_str("  (fell behind: waiting to be re-added)");
                    }
                    writeln!(out, "{}  {}  {} unread{flags}", c.id, c.name, c.unread)?;
                }
            }
        }
        Command::Contacts => {
            for c in driver.client.contacts()? {
                if json {
                    let line = serde_json::json!({ "name": c.name, "fingerprint": c.fingerprint });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{}  safety number {}", c.name, c.fingerprint)?;
                }
            }
        }
        Command::Send { chat, text } => send(driver, chat, text, json, out).await?,
        Command::RelaysAdd { link } => {
            let link =
                RelayLink::parse(link.trim()).context("not a relay link (postern://relay#…)")?;
            let (id, new) = driver.client.add_relay(&link)?;
            let at = link.addrs.join(", ");
            if json {
                let line = serde_json::json!({ "event": "relay", "id": id, "new": new, "addrs": link.addrs });
                writeln!(out, "{line}")?;
            } else if new {
                writeln!(
                    out,
                    "Added relay {id} at {at}: used when your server cannot be reached directly."
                )?;
            } else {
                writeln!(out, "Relay {id} at {at} was already added.")?;
            }
        }
        Command::RelaysList => {
            for relay in driver.client.relays()? {
                if json {
                    let line = serde_json::json!({ "id": relay.id, "addrs": relay.link.addrs });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{}  {}", relay.id, relay.link.addrs.join(", "))?;
                }
            }
        }
        Command::Status { references } => status(driver, references, json, out).await?,
        Command::ServersAdd { link } => {
            let link =
                ServerLink::parse(link.trim()).context("not a server link (postern://server#…)")?;
            let new = driver.client.add_fallback(&link)?;
            let at = link.addrs.join(", ");
            if json {
                let line =
                    serde_json::json!({ "event": "server", "new": new, "addrs": link.addrs });
                writeln!(out, "{line}")?;
            } else if new {
                writeln!(
                    out,
                    "Added the server at {at}: chats you create from now on move there when theirs is blocked."
                )?;
            } else {
                writeln!(out, "The server at {at} was already added.")?;
            }
        }
        Command::ServersList => {
            // The home server is in the list once the mailbox moved to one of its servers.
            let home = driver.client.whoami().server;
            for link in driver.client.fallbacks()? {
                let link = ServerLink::parse(&link)?;
                let is_home = link.addrs == home;
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({ "addrs": link.addrs, "home": is_home })
                    )?;
                } else if is_home {
                    writeln!(out, "{} (your home server now)", link.addrs.join(", "))?;
                } else {
                    writeln!(out, "{}", link.addrs.join(", "))?;
                }
            }
        }
        Command::RelaysShare { id, qr } => {
            let relays = driver.client.relays_to_share_one(*id)?;
            let Some(link) = relays else {
                anyhow::bail!("no relay {id} (see `postern relays list`)");
            };
            let text = link.to_link_string();
            if json {
                writeln!(out, "{}", serde_json::json!({ "event": "relay_link", "link": text }))?;
            } else {
                if *qr {
                    writeln!(out, "{}", crate::qr(&text)?)?;
                }
                writeln!(out, "{text}")?;
            }
        }
        Command::RelaysRemove { id } => {
            if !driver.client.remove_relay(*id)? {
                anyhow::bail!("no relay {id} (see `postern relays list`)");
            }
            if json {
                writeln!(out, "{}", serde_json::json!({ "event": "relay_removed", "id": id }))?;
            } else {
                writeln!(out, "Removed relay {id}.")?;
            }
        }
        Command::Read { chat, limit } => {
            sync_quietly(driver).await;
            for item in driver.client.read(chat, *limit)? {
                match item {
                    HistoryItem::Message(m) => print_message(out, &m, json)?,
                    HistoryItem::Gap(g) => print_gap(out, &g, json)?,
                }
            }
        }
        Command::GroupCreate { name, contacts, rules } => {
            let mut claimed = Vec::new();
            for contact in contacts {
                claimed.push(claim_contact(driver, contact).await?);
            }
            let (chat, name) = driver.client.group_create(name, claimed, *rules)?;
            let sent = driver.flush().await;
            if json {
                let line =
                    serde_json::json!({ "event": "group_created", "chat": chat, "name": name });
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "Created the group {name} (chat {chat}).")?;
            }
            sent.context("the group is created here; run `postern sync` to finish")?;
        }
        Command::GroupAdd { chat, contact } => {
            sync_quietly(driver).await;
            let claimed = claim_contact(driver, contact).await?;
            driver.client.group_add(chat, claimed)?;
            driver.flush().await.context("queued; run `postern sync` to finish")?;
            report_membership(driver, out, chat, contact, true, json)?;
        }
        Command::GroupRemove { chat, contact } => {
            sync_quietly(driver).await;
            driver.client.group_remove(chat, contact)?;
            driver.flush().await.context("queued; run `postern sync` to finish")?;
            report_membership(driver, out, chat, contact, false, json)?;
        }
        Command::GroupLeave { chat } => {
            sync_quietly(driver).await;
            driver.client.group_leave(chat)?;
            driver.flush().await.context("queued; run `postern sync` to finish")?;
            if json {
                writeln!(out, "{}", serde_json::json!({ "event": "leaving", "chat": chat }))?;
            } else {
                writeln!(out, "Asked to leave {chat}; the next member online completes it.")?;
            }
        }
        Command::GroupMembers { chat } => {
            sync_quietly(driver).await;
            let (name, members) = driver.client.group_members(chat)?;
            for m in members {
                if json {
                    let line = serde_json::json!({
                        "group": name, "name": m.name, "fingerprint": m.fingerprint,
                        "devices": m.devices, "admin": m.admin, "me": m.me,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    let role = if m.admin { "  (admin)" } else { "" };
                    let me = if m.me { "  (you)" } else { "" };
                    writeln!(out, "{}{role}{me}  safety number {}", m.name, m.fingerprint)?;
                }
            }
        }
    }
    Ok(())
}

/// A contact's card and the key packages claimed with it.
async fn claim_contact(
    driver: &mut Driver,
    contact: &str,
) -> Result<(postern_proto::ids::PublicKey, String, postern_client::Card, Vec<Vec<u8>>)> {
    let (identity, name, card) = driver.client.card(contact)?;
    let sealed = driver.claim(&card.server()?, card.token()).await?;
    Ok((identity, name, card, sealed))
}

/// Says whether an add or remove is done, or waits for another member's commit.
fn report_membership(
    driver: &mut Driver,
    out: &mut Vec<u8>,
    chat: &str,
    contact: &str,
    added: bool,
    json: bool,
) -> Result<()> {
    let (_, members) = driver.client.group_members(chat)?;
    let member = members.iter().any(|m| m.name == contact);
    let done = member == added;
    if json {
        let event = match (added, done) {
            (true, true) => "added",
            (false, true) => "removed",
            _ => "queued",
        };
        writeln!(
            out,
            "{}",
            serde_json::json!({ "event": event, "chat": chat, "contact": contact })
        )?;
    } else if done {
        writeln!(out, "{} {contact}.", if added { "Added" } else { "Removed" })?;
    } else {
        writeln!(out, "Queued; it completes when the group's pending changes have settled.")?;
    }
    Ok(())
}

/// A sync whose failure is only a warning (the command goes on with what is stored here).
async fn sync_quietly(driver: &mut Driver) {
    match driver.sync().await {
        Ok(events) => driver.unshown.extend(events),
        Err(e) => tracing::warn!("showing what is stored here: {e:#}"),
    }
}

async fn invite(driver: &mut Driver, once: bool, json: bool, out: &mut Vec<u8>) -> Result<()> {
    driver.publish().await?;
    let kind = if once { InviteKind::Once } else { InviteKind::Address };
    let invite = driver.client.new_invite(kind, postern_client::today())?;
    driver
        .send_signed(invite.requests, &invite.owner)
        .await
        .context("cannot register the invite")?;
    let link = invite.link.to_link_string();
    if json {
        let kind = if once { "once" } else { "address" };
        writeln!(out, "{}", serde_json::json!({ "event": "invite", "kind": kind, "link": link }))?;
    } else {
        writeln!(out, "{}", crate::qr(&link)?)?;
        writeln!(out, "{link}")?;
        let note = if once {
            "One-time invite: the first person to use it is connected to you."
        } else {
            "Address: each use arrives as a request for you to accept."
        };
        writeln!(
            out,
            "{note} Share it only with them; it expires in {} days.",
            postern_client::INVITE_DAYS
        )?;
    }
    Ok(())
}

async fn connect(driver: &mut Driver, link: &str, json: bool, out: &mut Vec<u8>) -> Result<()> {
    let link = InviteLink::parse(link.trim()).context("invalid invite link")?;
    if link.identity == driver.client.identity().identity_public() {
        return Err(ClientError::OwnInvite.into());
    }
    // The inviter's relays: doors to their server, and to ours if they serve it.
    for relay in &link.relays {
        driver.client.add_relay(relay)?;
    }
    match link.kind {
        InviteKind::Once => {
            let sealed = driver.claim(&link.server, link.token.clone()).await?;
            let (chat, name) = driver.client.connect_once(&link, &sealed)?;
            let sent = driver.flush().await;
            report_connected(out, &chat, &name, json)?;
            sent.context("the chat is created here; run `postern sync` to finish")?;
        }
        InviteKind::Address => {
            driver.publish().await?;
            driver.client.request_connect(&link)?;
            driver
                .flush()
                .await
                .context("the request is queued here; run `postern sync` to send it")?;
            let fingerprint = postern_client::fingerprint(&link.identity);
            if json {
                let line = serde_json::json!({ "event": "requested", "fingerprint": fingerprint });
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "Request sent to the person with safety number {fingerprint}.")?;
                writeln!(out, "You are connected when they accept; `postern sync` picks it up.")?;
            }
        }
    }
    Ok(())
}

fn report_connected(out: &mut Vec<u8>, chat: &str, name: &str, json: bool) -> Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "event": "connected", "chat": chat, "contact": name })
        )?;
    } else {
        writeln!(out, "Connected with {name} (chat {chat}).")?;
    }
    Ok(())
}

async fn send(
    driver: &mut Driver,
    chat: &str,
    text: &str,
    json: bool,
    out: &mut Vec<u8>,
) -> Result<()> {
    // Read first, so the message is sealed for the group as it is now (a removal may have
    // moved it to a new log) ...
    // (A chat subscribed on an open connection is as fresh as a read would make it: under a
    // packet budget that read would cost a connection.)
    let chat_id = driver.client.chat_id(chat)?;
    if !driver.live(&chat_id)?
        && let Ok(events) = driver.pull_chat(&chat_id).await
    {
        driver.unshown.extend(events);
    }
    let id = driver.client.queue_message(&chat_id, text)?;
    let mut flushed = driver.flush().await.map(|events| driver.unshown.extend(events));
    // ... and read again after: if a removal landed just before our message, it is sealed
    // again for the new log and sent there before we report success. A message that landed
    // right after the last entry read had nothing land before it.
    let passed = if flushed.is_ok() { driver.client.pass_own(id)? } else { None };
    if let Some(log) = passed {
        driver.caught_up(log);
    } else if flushed.is_ok() {
        flushed = match driver.pull_chat(&chat_id).await {
            Ok(events) => {
                driver.unshown.extend(events);
                driver.flush().await.map(|events| driver.unshown.extend(events))
            }
            Err(e) => Err(e),
        };
    }
    let state = driver.client.message_state(id)?;
    match (state, flushed) {
        (MessageState::Sent, _) => {
            if json {
                writeln!(out, "{}", serde_json::json!({ "event": "sent", "chat": chat }))?;
            }
            Ok(())
        }
        (MessageState::Failed, _) => Err(anyhow!("the server refused the message")),
        (_, Err(e)) => {
            Err(e.context("the message is queued and goes out with the next `postern sync`"))
        }
        (_, Ok(_)) if driver.client.chats()?.iter().any(|c| c.id == chat_id && c.rejoining) => {
            Err(anyhow!(
                "this device is waiting to be re-added to the chat; the message is queued and goes out once it is"
            ))
        }
        (_, Ok(_)) => Err(anyhow!(
            "the chat is not on the server yet; the message is queued for the next `postern sync`"
        )),
    }
}

fn print_gap(out: &mut Vec<u8>, g: &postern_client::Gap, json: bool) -> Result<()> {
    if json {
        let line = serde_json::json!({
            "chat": g.chat, "gap": true, "entries": g.entries, "rejoined": g.rejoined,
            "waiting": g.waiting, "since": g.since, "until": g.until,
        });
        writeln!(out, "{line}")?;
        return Ok(());
    }
    let what = match g.entries {
        Some(1) => "1 entry".to_owned(),
        Some(n) => format!("{n} entries"),
        None => "history".to_owned(),
    };
    let then = if g.waiting {
        "; waiting to be re-added"
    } else if g.rejoined {
        "; re-added since"
    } else {
        ""
    };
    writeln!(
        out,
        "--- {what} lost here: the server expired it before this device read it{then} ---"
    )?;
    Ok(())
}

pub(crate) fn print_message(
    out: &mut Vec<u8>,
    m: &postern_client::Message,
    json: bool,
) -> Result<()> {
    if json {
        let line = serde_json::json!({
            "chat": m.chat, "seq": m.seq, "from": m.from, "outgoing": m.outgoing,
            "text": m.text, "sent_at": m.sent_at, "state": m.state.as_str(),
        });
        writeln!(out, "{line}")?;
    } else {
        let state = match m.state {
            MessageState::Queued => " (queued)",
            MessageState::Failed => " (not delivered)",
            MessageState::Sent | MessageState::Received => "",
        };
        writeln!(out, "{}: {}{state}", m.from, m.text)?;
    }
    Ok(())
}

pub(crate) fn print_events(out: &mut Vec<u8>, events: &[Event], json: bool) -> Result<()> {
    for event in events {
        match event {
            Event::Message(m) => {
                if json {
                    let line = serde_json::json!({
                        "event": "message", "chat": m.chat, "seq": m.seq, "from": m.from,
                        "outgoing": m.outgoing, "text": m.text, "sent_at": m.sent_at,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "[{}] {}: {}", m.chat, m.from, m.text)?;
                }
            }
            Event::Connected { chat, contact } => {
                if json {
                    let line = serde_json::json!({ "event": "connected", "chat": chat, "contact": contact });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "Connected with {contact} (chat {chat}).")?;
                }
            }
            Event::Request(r) => {
                if json {
                    let line = serde_json::json!({
                        "event": "request", "request": r.id, "name": r.name,
                        "fingerprint": r.fingerprint,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{} asks to connect: `postern accept {}`.", r.name, r.id)?;
                }
            }
            Event::Skipped { chat, seq } => {
                tracing::warn!(%chat, seq, "skipped a log entry that does not open");
            }
            Event::ForkAlarm { chat } => {
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({ "event": "fork_alarm", "chat": chat })
                    )?;
                } else {
                    writeln!(out, "WARNING: members of chat {chat} disagree about its state.")?;
                }
            }
            Event::Removed { chat } => {
                if json {
                    writeln!(out, "{}", serde_json::json!({ "event": "removed", "chat": chat }))?;
                } else {
                    writeln!(out, "You are no longer a member of chat {chat}.")?;
                }
            }
            Event::HistoryLost { chat, entries } => {
                if json {
                    let line = serde_json::json!({ "event": "history_lost", "chat": chat, "entries": entries });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "{entries} entries of chat {chat} expired on the server before this device read them."
                    )?;
                }
            }
            Event::Rejoining { chat, asked, again } => {
                if json {
                    let line = serde_json::json!({
                        "event": "rejoining", "chat": chat, "asked": asked, "again": again
                    });
                    writeln!(out, "{line}")?;
                } else if *again {
                    writeln!(
                        out,
                        "Nobody has re-added this device to chat {chat} yet; asked {asked} member(s) again."
                    )?;
                } else if *asked == 0 {
                    writeln!(
                        out,
                        "This device was away longer than the server keeps chat {chat}'s history, and none of its members is a contact to ask: ask a member to add you again."
                    )?;
                } else {
                    writeln!(
                        out,
                        "This device was away longer than the server keeps chat {chat}'s history; asked {asked} member(s) to re-add it."
                    )?;
                }
            }
            Event::Rejoined { chat, lost } => {
                if json {
                    let line =
                        serde_json::json!({ "event": "rejoined", "chat": chat, "lost": lost });
                    writeln!(out, "{line}")?;
                } else if *lost {
                    writeln!(
                        out,
                        "Re-added to chat {chat}; the history in between is lost to this device."
                    )?;
                } else {
                    writeln!(out, "You are in chat {chat} again.")?;
                }
            }
            Event::HomeMoved { addrs, cards } => {
                if json {
                    let line = serde_json::json!({ "event": "home_moved", "addrs": addrs, "cards": cards });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "Your home server was out of reach: your mailbox moved to {}, and {cards} contact(s) were sent your new card. Invite links you gave out before name the old server; make new ones.",
                        addrs.join(", ")
                    )?;
                }
            }
            Event::Failed { chat } => {
                if json {
                    writeln!(out, "{}", serde_json::json!({ "event": "failed", "chat": chat }))?;
                } else {
                    writeln!(out, "A message in chat {chat} could not be delivered.")?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `postern listen`: own the home, print what arrives, and serve the other commands.
pub(crate) fn listen(home: &Path, json: bool) -> Result<()> {
    let client = Client::open(home, key_source())?;
    runtime()?.block_on(control::listen(Driver::new(client), home, json))
}

/// How long `status` gives each door.
const STATUS_WAIT: Duration = Duration::from_secs(10);
/// How long `status` gives each domestic reference address.
const REFERENCE_WAIT: Duration = Duration::from_secs(3);
/// Domestic sites a whitelist lets through, to tell whitelist mode from an outage.
pub(crate) const DEFAULT_REFERENCES: &[&str] = &["ya.ru:443", "gosuslugi.ru:443", "vk.com:443"];

/// `postern status`: every door to the home server tried at once, what is queued, and
/// whether this network looks like whitelist mode (no door answers, every one timed out, but
/// a domestic reference address does).
async fn status(
    driver: &mut Driver,
    references: &[String],
    json: bool,
    out: &mut Vec<u8>,
) -> Result<()> {
    let server = driver.client.server().clone();
    let reports = driver.probe_doors(&server, STATUS_WAIT).await?;
    let queued = driver.client.queued()?;
    let all_silent = !reports.is_empty()
        && reports.iter().all(|r| matches!(r.result, Err(postern_net::NetError::Timeout)));
    let reference = if all_silent { reachable_reference(references).await } else { None };
    let whitelist = reference.is_some();
    let chat_servers = driver.client.chat_servers()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if json {
        let doors: Vec<_> = reports
            .iter()
            .map(|r| {
                serde_json::json!({
                    "door": r.door.to_string(),
                    "relay": r.relay,
                    "ok": r.result.is_ok(),
                    "ms": r.result.as_ref().ok().map(|d| d.as_millis()),
                    "error": r.result.as_ref().err().map(ToString::to_string),
                    "budget_packets": r.budget,
                    "probe": r.probe.map(|p| serde_json::json!({
                        "froze": p.froze,
                        "secs_ago": now.saturating_sub(p.at),
                    })),
                    "last_used": r.last,
                })
            })
            .collect();
        let line = serde_json::json!({
            "event": "status",
            "server": server.addrs,
            // The tag the doors' memory is kept under on this network (null: unknown).
            "network": Some(driver.client.network()).filter(|n| !n.is_empty()),
            "doors": doors,
            "queued": { "messages": queued.messages, "requests": queued.requests },
            "whitelist_mode": whitelist,
            "reference": reference,
            "chat_servers": chat_servers.iter().map(|s| serde_json::json!({
                "server": s.server.addrs,
                "chats": s.chats,
                "out_of_reach_secs": s.out_of_reach_since.map(|t| now.saturating_sub(t)),
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{line}")?;
        return Ok(());
    }
    writeln!(out, "Server {}", server.addrs.join(", "))?;
    for r in &reports {
        let how = match &r.result {
            Ok(d) => format!("works ({} ms)", d.as_millis()),
            Err(e) => format!("failed: {e}"),
        };
        let budget = r.budget.map(|b| format!("; {b} packets per connection")).unwrap_or_default();
        let probe = match r.probe {
            Some(p) if p.froze => "; a probe here froze",
            Some(_) => "; a probe here found no freeze",
            None => "",
        };
        let last = if r.last { "; used last" } else { "" };
        writeln!(out, "  {:<32} {how}{budget}{probe}{last}", r.door.to_string())?;
    }
    writeln!(out, "Queued: {} messages, {} requests", queued.messages, queued.requests)?;
    for s in &chat_servers {
        let home = if s.server == server { " (your server)" } else { "" };
        let reach = s
            .out_of_reach_since
            .map(|t| format!("; out of reach for {} min", now.saturating_sub(t) / 60))
            .unwrap_or_default();
        writeln!(out, "Chats on {}{home}: {}{reach}", s.server.addrs.join(", "), s.chats)?;
    }
    if let Some(reference) = reference {
        writeln!(
            out,
            "This network lets only some domestic addresses through (whitelist mode: {reference} \
             answers, your server and relays do not). Messages stay queued until a door works; \
             a relay inside the country would get through."
        )?;
    } else if reports.iter().all(|r| r.result.is_err()) {
        writeln!(out, "No door works now; messages stay queued and go out when one does.")?;
    }
    Ok(())
}

/// The first reference address a TCP connection reaches, trying them all at once.
async fn reachable_reference(references: &[String]) -> Option<String> {
    let tries = references.iter().map(|r| async move {
        let connected =
            tokio::time::timeout(REFERENCE_WAIT, tokio::net::TcpStream::connect(r.as_str())).await;
        matches!(connected, Ok(Ok(_))).then(|| r.clone())
    });
    futures_util::future::join_all(tries).await.into_iter().flatten().next()
}
