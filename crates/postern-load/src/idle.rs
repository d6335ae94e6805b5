//! `idle`: sessions that hold subscriptions and send nothing; server memory per session.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::StreamExt;
use postern_net::Connection;
use postern_proto::frame::{Request, Response};
use postern_proto::ids::LogId;

use crate::server::{ProcStats, Target};
use crate::{Measured, random, round};

/// Logs the sessions subscribe to.
const LOGS: usize = 16;

/// `idle`.
#[derive(Args, Debug)]
pub(crate) struct IdleArgs {
    /// Sessions to hold (each is one TLS connection; this machine allows 20,000 open files
    /// per process, so up to about 15,000).
    #[arg(long, default_value_t = 1_000)]
    sessions: usize,
    /// Subscriptions each session holds.
    #[arg(long, default_value_t = 3)]
    subscriptions: usize,
    /// Seconds the server is left to settle before each memory reading.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Sessions opened at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

pub(crate) async fn run(target: &Target, args: IdleArgs) -> Result<Measured> {
    let IdleArgs { sessions, subscriptions, settle, concurrency } = args;
    if sessions == 0 || concurrency == 0 || subscriptions > LOGS {
        bail!("nothing to hold, or more subscriptions than the {LOGS} logs");
    }
    let settle = Duration::from_secs(settle);
    // The logs, created by one setup session that then closes.
    let mut setup = target.open().await.context("setup session")?;
    let mut logs = Vec::new();
    for _ in 0..LOGS {
        let key = ed25519_dalek::SigningKey::from_bytes(&random());
        let log = LogId(random());
        let public = postern_proto::ids::public_key(&key);
        match setup.request(Request::LogCreate { log, key: public }, Some(&key)).await {
            Ok(Response::Ok) => logs.push(log),
            other => bail!("log_create: {other:?}"),
        }
    }
    setup.close().await;
    tokio::time::sleep(settle).await;
    let before = target.stats()?;
    let own_before = ProcStats::own()?;
    let started = std::time::Instant::now();
    let logs = &logs;
    let held: Vec<Connection> = futures_util::stream::iter(0..sessions)
        .map(|i| async move {
            let mut conn = target.open().await?;
            for j in 0..subscriptions {
                let log = logs[(i + j) % LOGS];
                conn.request(Request::Subscribe { log, after: 0, max_bytes: u16::MAX }, None)
                    .await?;
            }
            Ok::<_, postern_net::NetError>(conn)
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .context("opening sessions")?;
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let after = target.stats()?;
    let own_after = ProcStats::own()?;
    let per_session = after.rss_kib.saturating_sub(before.rss_kib) as f64 / sessions as f64;
    let own_per_session =
        own_after.rss_kib.saturating_sub(own_before.rss_kib) as f64 / sessions as f64;
    drop(held);
    let json = serde_json::json!({
        "sessions": sessions,
        "subscriptions_per_session": subscriptions,
        "open_secs": round(open_secs, 2),
        "server_rss_before_kib": before.rss_kib,
        "server_rss_after_kib": after.rss_kib,
        "server_kib_per_session": round(per_session, 1),
        "tool_kib_per_session": round(own_per_session, 1),
        "server_malloc_arena_max": target.malloc_arena_max(),
    });
    let summary = format!(
        "{sessions} sessions × {subscriptions} subscriptions opened in {open_secs:.1} s; server RSS \
         {} → {} KiB = {per_session:.1} KiB per session",
        before.rss_kib, after.rss_kib
    );
    Ok((json, summary))
}
