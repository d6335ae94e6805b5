//! The client commands: `init`, `whoami`, `fingerprint`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use postern_client::{Client, KeySource};
use postern_net::{Connection, NetError};
use postern_proto::frame::ErrorCode;
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
    let link = client.server().clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut conn = Connection::connect(&link)
            .await
            .with_context(|| format!("cannot reach the server at {}", link.addrs.join(", ")))?;
        for request in publication.requests {
            match conn.request(request, Some(&publication.owner)).await {
                // The mailbox exists: an earlier attempt created it (its id is ours alone).
                Ok(_) | Err(NetError::Refused(ErrorCode::Conflict)) => {}
                Err(e) => return Err(e).context("the server refused to publish the mailbox"),
            }
        }
        conn.close().await;
        anyhow::Ok(())
    })?;
    client.mark_published()?;
    Ok(true)
}
