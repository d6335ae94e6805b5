//! `postern server`: configuration (flags, `POSTERN_*` variables, a TOML file, defaults, in
//! that order of precedence), start-up, and shutdown on SIGTERM or Ctrl-C.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use postern_server::{FileConfig, ServerConfig};
use postern_store_sqlite::{Options, SqliteStore};

/// Name of the database file in the data directory.
const DATABASE: &str = "postern.db";
/// Name of the file the server link is written to.
const LINK_FILE: &str = "server-link.txt";

#[derive(clap::Args, Debug)]
pub(crate) struct ServerArgs {
    /// Address of the public TLS listener [default: 0.0.0.0:8443].
    #[arg(long, env = "POSTERN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address of the admin listener (health, metrics) [default: 127.0.0.1:8444].
    #[arg(long, env = "POSTERN_ADMIN")]
    admin: Option<SocketAddr>,
    /// Data directory: keys, certificate, database [default: $XDG_DATA_HOME/postern/server].
    #[arg(long, env = "POSTERN_DATA")]
    data: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long, env = "POSTERN_CONFIG")]
    config: Option<PathBuf>,
}

fn default_data_dir() -> PathBuf {
    crate::data_dir().join("server")
}

fn read_file_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    FileConfig::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
}

fn build_config(args: ServerArgs) -> Result<ServerConfig> {
    let file = match &args.config {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    let data = args.data.or(file.data.clone()).unwrap_or_else(default_data_dir);
    let mut config = ServerConfig::new(data);
    if let Some(listen) = args.listen.or(file.listen) {
        config.listen = listen;
    }
    if let Some(admin) = args.admin.or(file.admin) {
        config.admin = admin;
    }
    file.apply(&mut config);
    // Test hook (docs/cli.md): move expiry days forward, to test what clients do after
    // being away longer than retention.
    if let Ok(days) = std::env::var("POSTERN_TEST_DAYS_AHEAD") {
        config.days_ahead = days.parse().context("POSTERN_TEST_DAYS_AHEAD must be a number")?;
    }
    Ok(config)
}

pub(crate) fn run(args: ServerArgs, json: bool) -> Result<()> {
    let config = build_config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, json))
}

async fn serve(config: ServerConfig, json: bool) -> Result<()> {
    // Before anything is printed: whoever reads "listening" may send SIGTERM at once.
    let mut signals = crate::signals::Signals::install()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let store = SqliteStore::open(
        &config.data_dir.join(DATABASE),
        Options { quotas: config.quotas, retention: config.retention },
    )
    .context("cannot open the database")?;
    let unspecified = config.listen.ip().is_unspecified() && config.public_addrs.is_empty();
    let data_dir = config.data_dir.clone();
    let server = postern_server::start(config, store.clone(), postern_server::system_clock())
        .await
        .context("cannot start the server")?;
    let link = server.link.to_link_string();
    let link_path = data_dir.join(LINK_FILE);
    write_private(&link_path, &format!("{link}\n"))
        .with_context(|| format!("cannot write {}", link_path.display()))?;

    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({
            "event": "listening",
            "listen": server.addr.to_string(),
            "admin": server.admin_addr.to_string(),
            "link": link,
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(
            out,
            "Postern server listening on {} (admin on {})",
            server.addr, server.admin_addr
        )?;
        writeln!(out, "Data directory: {}", data_dir.display())?;
        writeln!(
            out,
            "Server link (give it only to people you invite; also in {}):",
            link_path.display()
        )?;
        writeln!(out, "{link}")?;
        if unspecified {
            writeln!(
                out,
                "Note: listening on all interfaces; the link says {}. Set public_addrs in the config file \
                 to the address clients should use.",
                server.link.addrs.join(", ")
            )?;
        }
    }
    out.flush()?;
    drop(out);
    tracing::info!("server started");

    signals.wait().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    store.close();
    tracing::info!("stopped");
    Ok(())
}

/// Writes a file only its owner can read (the link carries the access secret).
pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_applies() {
        let file = FileConfig::parse(include_str!("../../../docs/server.example.toml"))
            .expect("docs/server.example.toml parses");
        assert_eq!(file.public_addrs.as_deref(), Some(&["203.0.113.7:8443".to_owned()][..]));
        assert_eq!(file.quotas.disk_bytes, Some(10 << 30));
        assert_eq!(file.retention.commit_days, Some(180));
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(FileConfig::parse("listen = \"127.0.0.1:1\"\nlisten_typo = 1\n").is_err());
        assert!(FileConfig::parse("[quotas]\ndisk = 1\n").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("postern-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1000\"\nadmin = \"127.0.0.1:1001\"\n")
            .expect("write");
        let args = ServerArgs {
            listen: Some("127.0.0.1:2000".parse().expect("addr")),
            admin: None,
            data: Some(dir.clone()),
            config: Some(path),
        };
        let config = build_config(args).expect("config");
        assert_eq!(config.listen.port(), 2000);
        assert_eq!(config.admin.port(), 1001);
        let _ = std::fs::remove_dir_all(dir);
    }
}
