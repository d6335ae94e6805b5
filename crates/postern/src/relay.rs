//! `postern relay --config FILE`: run a relay (a website that forwards clients holding a
//! relay credential to Postern servers), and `postern relay --config FILE link`: mint a new
//! credential's link for one person or group.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use base64::Engine;
use postern_proto::link::RelayLink;
use postern_server::{RelayConfig, RelayFileConfig};

/// Name of the file the operator's own relay link is written to.
const LINK_FILE: &str = "relay-link.txt";

#[derive(clap::Args, Debug)]
pub(crate) struct RelayArgs {
    /// The relay's TOML configuration file (docs/circumvention.md).
    #[arg(long, env = "POSTERN_RELAY_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<RelayCommand>,
}

#[derive(clap::Subcommand, Debug)]
enum RelayCommand {
    /// Mint a new credential and print its relay link; revoke it by listing its id under
    /// `revoked` in the configuration.
    Link {
        /// Also print the link as a QR code.
        #[arg(long)]
        qr: bool,
    },
}

fn default_data_dir() -> PathBuf {
    crate::data_dir().join("relay")
}

fn build_config(path: &std::path::Path) -> Result<RelayConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let file = RelayFileConfig::parse(&text)
        .with_context(|| format!("invalid config file {}", path.display()))?;
    file.into_config(default_data_dir())
        .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
}

pub(crate) fn run(args: RelayArgs, json: bool) -> Result<()> {
    let config = build_config(&args.config)?;
    match args.command {
        Some(RelayCommand::Link { qr }) => mint(&config, qr, json),
        None => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(serve(config, json))
        }
    }
}

fn mint(config: &RelayConfig, qr: bool, json: bool) -> Result<()> {
    let mut config = config.clone();
    if config.public_addrs.is_empty() {
        // The addresses the relay last listened on, from the link it wrote at start.
        let path = config.data_dir.join(LINK_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read {}: start the relay once, or set public_addrs", path.display())
        })?;
        let last = RelayLink::parse(text.trim())
            .with_context(|| format!("{} holds no relay link", path.display()))?;
        config.public_addrs = last.addrs;
    }
    let (link, id) = postern_server::mint_link(&config).context("cannot load the relay's keys")?;
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id);
    let text = link.to_link_string();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::json!({ "link": text, "id": id }))?;
        return Ok(());
    }
    writeln!(out, "{text}")?;
    writeln!(out, "Credential id (list it under `revoked` to cut this link off): {id}")?;
    if qr {
        writeln!(out, "{}", crate::qr(&text)?)?;
    }
    Ok(())
}

async fn serve(config: RelayConfig, json: bool) -> Result<()> {
    let mut signals = crate::signals::Signals::install()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let data_dir = config.data_dir.clone();
    let relay = postern_server::start_relay(config, postern_server::system_clock())
        .await
        .context("cannot start the relay")?;
    let link: RelayLink = relay.identity.operator_link();
    let link = link.to_link_string();
    let link_path = data_dir.join(LINK_FILE);
    crate::server::write_private(&link_path, &format!("{link}\n"))
        .with_context(|| format!("cannot write {}", link_path.display()))?;
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({
            "event": "listening",
            "listen": relay.addr.to_string(),
            "link": link,
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "Postern relay listening on {}", relay.addr)?;
        writeln!(out, "Data directory: {}", data_dir.display())?;
        writeln!(out, "Your relay link (also in {}):", link_path.display())?;
        writeln!(out, "{link}")?;
        writeln!(
            out,
            "Give each person or group its own link: postern relay --config FILE link [--qr]"
        )?;
    }
    out.flush()?;
    drop(out);
    tracing::info!("relay started");
    signals.wait().await;
    tracing::info!("shutting down");
    relay.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let file = RelayFileConfig::parse(include_str!("../../../docs/relay.example.toml"))
            .expect("docs/relay.example.toml parses");
        let config = file.into_config(PathBuf::from("/nowhere")).expect("valid");
        assert_eq!(config.servers.len(), 1);
        assert_eq!(config.listen.port(), 443);
        assert!(config.via.is_none() && config.revoked.is_empty());
    }

    #[test]
    fn a_relay_with_nowhere_to_forward_or_a_bad_id_is_refused() {
        let parse =
            |text: &str| RelayFileConfig::parse(text).expect("toml").into_config(".".into());
        assert!(parse("listen = \"127.0.0.1:1\"\n").unwrap_err().contains("servers"));
        let via = "via = \"postern://relay#v=1&a=h:1&p=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE&c=AAAAAAAAAAA&s=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\n";
        assert!(parse(via).is_ok());
        assert!(parse(&format!("{via}revoked = [\"short\"]\n")).unwrap_err().contains("revoked"));
        assert!(RelayFileConfig::parse("listen_typo = 1\n").is_err());
    }
}
