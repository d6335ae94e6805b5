//! The client commands: `init`, `whoami`, `fingerprint`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use postern_client::{Client, InviteKind, KeySource};
use postern_net::{Connection, NetError};
use postern_proto::frame::{ErrorCode, Request};
use postern_proto::link::ServerLink;
use zeroize::Zeroizing;

/// Where the client's home is: `--home`, else `$XDG_DATA_HOME/postern/client`.
pub(crate) fn home_dir(home: Option<PathBuf>) -> PathBuf {
    home.unwrap_or_else(|| crate::data_dir().join("client"))
}

/// The store key: `POSTERN_PASSPHRASE` when set, else the home's key file.
fn key_source() -> KeySource {
    match std::env::var("POSTERN_PASSPHRASE") {
        Ok(p) if !p.is_empty() => KeySource::Passphrase(Zeroizing::new(p)),
        _ => KeySource::KeyFile,
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct InitArgs {
    /// Your display name, shown to the people you connect with.
    #[arg(long)]
    name: String,
    /// The link of your home server (`postern://server#…`).
    #[arg(long)]
    server: String,
}

pub(crate) fn init(home: &Path, args: InitArgs, json: bool) -> Result<()> {
    let link = ServerLink::parse(&args.server).context("invalid server link")?;
    let mut client = Client::init(home, key_source(), &args.name, link)?;
    let who = client.whoami();
    publish(&mut client).context("your identity is created; run `postern sync` to finish")?;
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

pub(crate) fn whoami(home: &Path, json: bool) -> Result<()> {
    let client = Client::open(home, key_source())?;
    let who = client.whoami();
    let mut out = std::io::stdout().lock();
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
    Ok(())
}

pub(crate) fn fingerprint(home: &Path, json: bool) -> Result<()> {
    let client = Client::open(home, key_source())?;
    let who = client.whoami();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "name": who.name, "fingerprint": who.fingerprint })
        )?;
    } else {
        writeln!(out, "{}", who.fingerprint)?;
    }
    Ok(())
}

/// Sends what is queued for the server: for now, the mailbox and key packages that let
/// others reach this user.
pub(crate) fn sync(home: &Path, json: bool) -> Result<()> {
    let mut client = Client::open(home, key_source())?;
    let published = publish(&mut client)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::json!({ "event": "synced", "published": published }))?;
    } else if published {
        writeln!(out, "Published your mailbox and key packages.")?;
    } else {
        writeln!(out, "Nothing to send.")?;
    }
    Ok(())
}

/// Publishes the mailbox and key packages if that has not happened yet; true if it did now.
fn publish(client: &mut Client) -> Result<bool> {
    let Some(publication) = client.pending_publication()? else { return Ok(false) };
    send_signed(client.server(), publication.requests, &publication.owner)
        .context("the server refused to publish the mailbox")?;
    client.mark_published()?;
    Ok(true)
}

/// Sends owner-signed requests in order on one connection. A `conflict` counts as done:
/// the ids are ours alone, so it means an earlier attempt already got through.
fn send_signed(
    link: &ServerLink,
    requests: Vec<Request>,
    owner: &ed25519_dalek::SigningKey,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut conn = Connection::connect(link)
            .await
            .with_context(|| format!("cannot reach the server at {}", link.addrs.join(", ")))?;
        for request in requests {
            match conn.request(request, Some(owner)).await {
                Ok(_) | Err(NetError::Refused(ErrorCode::Conflict)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        conn.close().await;
        anyhow::Ok(())
    })
}

#[derive(clap::Args, Debug)]
pub(crate) struct InviteArgs {
    /// A one-time invite: whoever uses it first is connected, with no accept step.
    /// Without it, the invite is a long-lived address whose uses arrive as requests.
    #[arg(long)]
    once: bool,
}

pub(crate) fn invite(home: &Path, args: InviteArgs, json: bool) -> Result<()> {
    let mut client = Client::open(home, key_source())?;
    publish(&mut client)?;
    let kind = if args.once { InviteKind::Once } else { InviteKind::Address };
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs() / 86_400).unwrap_or(u32::MAX));
    let invite = client.new_invite(kind, today)?;
    send_signed(client.server(), invite.requests, &invite.owner)
        .context("cannot register the invite")?;
    let link = invite.link.to_link_string();
    let mut out = std::io::stdout().lock();
    if json {
        let kind = if args.once { "once" } else { "address" };
        writeln!(out, "{}", serde_json::json!({ "event": "invite", "kind": kind, "link": link }))?;
    } else {
        let qr = qrcode::QrCode::new(link.as_bytes()).context("the link does not fit a QR code")?;
        let art = qr.render::<qrcode::render::unicode::Dense1x2>().quiet_zone(true).build();
        writeln!(out, "{art}")?;
        writeln!(out, "{link}")?;
        let note = if args.once {
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
