//! The server under load: started for the run, or attached to; its CPU time and memory.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use postern_net::{Connection, Door, NetError};
use postern_proto::link::{RelayLink, ServerLink};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Linux reports process times in USER_HZ ticks, fixed at 100 a second by its ABI.
const USER_HZ: f64 = 100.0;

/// Limits of a server started for a run: every connection of the tool comes from one
/// address, so the per-address backstops are lifted (nothing else is changed).
const BENCH_CONFIG: &str = "\
max_connections = 18000
max_connections_per_ip = 18000
new_connections_per_ip_per_second = 1000000
new_connection_burst_per_ip = 1000000
requests_per_second = 1000000
request_burst = 1000000
";

/// The server a run talks to, and the door its sessions go through.
pub(crate) struct Target {
    pub(crate) link: ServerLink,
    pub(crate) pid: u32,
    pub(crate) door: Door,
}

impl Target {
    /// A server already running; its link must name a loopback address.
    pub(crate) fn attach(link: ServerLink, pid: u32) -> Result<Self> {
        let target = Target { link, pid, door: Door::Direct };
        target.check_loopback()?;
        ProcStats::read(pid).context("reading the server's /proc entry")?;
        Ok(target)
    }

    fn check_loopback(&self) -> Result<()> {
        for addr in &self.link.addrs {
            let addr: SocketAddr = addr.parse().context("the link's address")?;
            if !addr.ip().is_loopback() {
                bail!("refusing a non-loopback target: {addr}");
            }
        }
        if self.link.addrs.is_empty() {
            bail!("the link has no address");
        }
        Ok(())
    }

    /// A session to the server, through the run's door.
    pub(crate) async fn open(&self) -> Result<Connection, NetError> {
        Connection::through(&self.door, &self.link).await
    }

    pub(crate) fn stats(&self) -> Result<ProcStats> {
        ProcStats::read(self.pid)
    }

    /// The server's `MALLOC_ARENA_MAX`, if its environment can be read and sets it.
    pub(crate) fn malloc_arena_max(&self) -> Option<String> {
        let environ = std::fs::read(format!("/proc/{}/environ", self.pid)).ok()?;
        environ.split(|b| *b == 0).find_map(|var| {
            let value = var.strip_prefix(b"MALLOC_ARENA_MAX=")?;
            Some(String::from_utf8_lossy(value).into_owned())
        })
    }
}

/// A server started for the run on a fresh data directory; stopped when dropped.
pub(crate) struct Spawned {
    child: Child,
    link: ServerLink,
    _dir: tempfile::TempDir,
}

impl Spawned {
    pub(crate) async fn start(postern: &Path) -> Result<Self> {
        let dir = tempfile::tempdir().context("a data directory for the server")?;
        let config = dir.path().join("bench.toml");
        std::fs::write(&config, BENCH_CONFIG).context("writing the server's configuration")?;
        let mut child = Command::new(postern)
            .args(["--json", "server", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--data")
            .arg(dir.path().join("data"))
            .env("POSTERN_CONFIG", &config)
            .env("POSTERN_LOG", "warn")
            // Memory per session is measured with a fixed number of malloc arenas.
            .env("MALLOC_ARENA_MAX", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", postern.display()))?;
        let started = first_line(&mut child, "the server").await?;
        let link = started["link"].as_str().ok_or_else(|| anyhow!("no link in the start line"))?;
        let link = ServerLink::parse(link).context("the server's link")?;
        Ok(Spawned { child, link, _dir: dir })
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            link: self.link.clone(),
            pid: self.child.id().unwrap_or_default(),
            door: Door::Direct,
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A relay started for the run in front of the server (the door overhead); stopped when
/// dropped.
pub(crate) struct SpawnedRelay {
    child: Child,
    pub(crate) link: RelayLink,
    _dir: tempfile::TempDir,
}

impl SpawnedRelay {
    pub(crate) async fn start(postern: &Path, server: &ServerLink) -> Result<Self> {
        let dir = tempfile::tempdir().context("a data directory for the relay")?;
        let config = dir.path().join("relay.toml");
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata = \"{}\"\nservers = [\"{}\"]\n\
             max_connections = 18000\nmax_connections_per_ip = 18000\n\
             new_connections_per_ip_per_second = 1000000\nnew_connection_burst_per_ip = 1000000\n",
            dir.path().join("data").display(),
            server.to_link_string()
        );
        std::fs::write(&config, text).context("writing the relay's configuration")?;
        let mut child = Command::new(postern)
            .args(["--json", "relay", "--config"])
            .arg(&config)
            .env("POSTERN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", postern.display()))?;
        let started = first_line(&mut child, "the relay").await?;
        let link = started["link"].as_str().ok_or_else(|| anyhow!("no link in the start line"))?;
        let link = RelayLink::parse(link).context("the relay's link")?;
        Ok(SpawnedRelay { child, link, _dir: dir })
    }
}

impl Drop for SpawnedRelay {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Reads a started process's JSON start line, and keeps draining its stdout.
async fn first_line(child: &mut Child, what: &str) -> Result<serde_json::Value> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| anyhow!("{what} did not start within 30 s"))??
        .ok_or_else(|| anyhow!("{what} exited at start"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    serde_json::from_str(&line).with_context(|| format!("{what}'s start line"))
}

/// CPU time and resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcStats {
    /// User plus system CPU time, every thread, in seconds.
    pub cpu_secs: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

impl ProcStats {
    /// Reads `/proc/PID/stat` and `/proc/PID/status`.
    pub fn read(pid: u32) -> Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name may hold spaces; fields resume after its closing parenthesis.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            Ok(fields.get(i).ok_or_else(|| anyhow!("short stat"))?.parse::<u64>()? as f64)
        };
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
        let cpu_secs = (ticks(11)? + ticks(12)?) / USER_HZ;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS"))?;
        Ok(ProcStats { cpu_secs, rss_kib })
    }

    /// This process.
    pub fn own() -> Result<Self> {
        Self::read(std::process::id())
    }
}
