//! The load tool behind `postern bench`: it speaks the real protocol (TLS, the gated
//! WebSocket upgrade, the Noise session, signed envelopes) to a Postern server on loopback
//! and reports what the server did. The server never reads MLS content, so messages are
//! random ciphertext of a real message's size.
//!
//! Modes (each bounded in count and in time, loopback only):
//! - `throughput`: N conversation logs, one sender and one subscribed receiver each, sending
//!   as fast as the server acknowledges (a window of appends in flight per sender) or at a
//!   fixed offered rate (`--rate`, latency measured from the scheduled send time, so a slow
//!   server cannot hide its queue: HDR's correction for coordinated omission).
//! - `fanout`: the same with groups: one sender and M−1 subscribed members per log.
//! - `idle`: K sessions each holding S subscriptions; server memory per session.
//! - `connect`: TLS handshakes (full or resumed) or whole sessions set up per second.
//!
//! Output: one JSON object (stdout) and a human summary (stderr).
//!
//! **Architecture Invariant:** the tool only ever dials loopback addresses.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use postern_proto::link::ServerLink;

mod connect;
mod flow;
mod idle;
mod server;

pub use server::ProcStats;

/// `postern bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Mode,
    /// Measure a server already running, by its link (it must be on loopback and allow
    /// this many connections from one address); without it, a server is started on a fresh
    /// data directory for the run.
    #[arg(long, requires = "server_pid")]
    link: Option<String>,
    /// The running server's process id (for its CPU time and memory).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Stop the run after this many seconds, whatever its counts say.
    #[arg(long, default_value_t = 110)]
    time_limit: u64,
    /// Go through a relay started for the run in front of the server (what a door costs).
    #[arg(long)]
    relay: bool,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Conversation logs, one sender and one receiver each.
    Throughput(flow::ThroughputArgs),
    /// Groups: one sender and M−1 receiving members per log.
    Fanout(flow::FanoutArgs),
    /// Idle sessions holding subscriptions: server memory per session.
    Idle(idle::IdleArgs),
    /// TLS handshakes or whole sessions set up per second.
    Connect(connect::ConnectArgs),
}

/// What a run measured.
pub struct Report {
    /// The machine-readable result: one JSON object.
    pub json: serde_json::Value,
    /// A few lines for people.
    pub summary: String,
}

/// Runs one benchmark. `postern` is the binary that serves when no `--link` is given.
pub async fn run(args: BenchArgs, postern: PathBuf) -> Result<Report> {
    let limit = Duration::from_secs(args.time_limit);
    tokio::time::timeout(limit, run_inner(args, postern))
        .await
        .map_err(|_| anyhow::anyhow!("the run passed its time limit of {} s", limit.as_secs()))?
}

async fn run_inner(args: BenchArgs, postern: PathBuf) -> Result<Report> {
    let (mut target, _spawned) = match (&args.link, args.server_pid) {
        (Some(link), Some(pid)) => {
            let link = ServerLink::parse(link).context("--link")?;
            (server::Target::attach(link, pid)?, None)
        }
        (None, None) => {
            let spawned = server::Spawned::start(&postern).await?;
            (spawned.target(), Some(spawned))
        }
        _ => bail!("--link and --server-pid go together"),
    };
    let _relay = if args.relay {
        let relay = server::SpawnedRelay::start(&postern, &target.link).await?;
        target.door = postern_net::Door::Relay(relay.link.clone());
        Some(relay)
    } else {
        None
    };
    let (name, (mut json, summary)) = match args.mode {
        Mode::Throughput(a) => ("throughput", flow::throughput(&target, a).await?),
        Mode::Fanout(a) => ("fanout", flow::fanout(&target, a).await?),
        Mode::Idle(a) => ("idle", idle::run(&target, a).await?),
        Mode::Connect(a) => ("connect", connect::run(&target, a).await?),
    };
    if let Some(obj) = json.as_object_mut() {
        obj.insert("mode".into(), name.into());
        obj.insert("server_pid".into(), target.pid.into());
        obj.insert(
            "door".into(),
            if target.door == postern_net::Door::Direct { "direct" } else { "relay" }.into(),
        );
    }
    Ok(Report { json, summary: format!("{name}: {summary}") })
}

/// A mode's result: its JSON fields and its summary.
type Measured = (serde_json::Value, String);

/// `x` rounded to `places` decimals, for the report.
fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// Random bytes.
fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}
