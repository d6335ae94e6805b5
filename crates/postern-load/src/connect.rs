//! `connect`: full TLS handshakes, or whole sessions, set up per second.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use postern_net::Connection;

use crate::Measured;
use crate::server::{ProcStats, Target};

/// `connect`.
#[derive(Args, Debug)]
pub(crate) struct ConnectArgs {
    /// Connections to set up (each leaves a socket in TIME_WAIT: keep it well under the
    /// ephemeral port range, about 28,000).
    #[arg(long, default_value_t = 2_000)]
    count: usize,
    /// Set up at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// What each connection sets up.
    #[arg(long, value_enum, default_value_t = What::Tls)]
    what: What,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum What {
    /// TCP and a full TLS handshake (no resumption), then close.
    Tls,
    /// A whole session: TLS, the gated WebSocket upgrade and the Noise handshake.
    Session,
}

pub(crate) async fn run(target: &Target, args: ConnectArgs) -> Result<Measured> {
    let ConnectArgs { count, concurrency, what } = args;
    if count == 0 || concurrency == 0 {
        bail!("nothing to set up");
    }
    let link = &target.link;
    let addr = link.addrs.first().ok_or_else(|| anyhow!("the link has no address"))?.clone();
    let name = rustls::pki_types::ServerName::try_from(link.tls_name())?;
    // Full handshakes only: no session cache, no tickets.
    let mut config = (*postern_net::tls_config(link, &[b"http/1.1"])?).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let before = target.stats()?;
    let own_before = ProcStats::own()?;
    let started = Instant::now();
    let results: Vec<Result<Option<String>>> = futures_util::stream::iter(0..count)
        .map(|_| {
            let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
            async move {
                match what {
                    What::Tls => {
                        let tcp = tokio::net::TcpStream::connect(&addr).await?;
                        let tls = connector.connect(name, tcp).await?;
                        let group = tls.get_ref().1.negotiated_key_exchange_group();
                        Ok(group.map(|g| format!("{:?}", g.name())))
                    }
                    What::Session => {
                        Connection::connect(link).await?.close().await;
                        Ok(None)
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let after = target.stats()?;
    let own_after = ProcStats::own()?;
    let mut group = None;
    let mut failed = 0;
    for r in results {
        match r {
            Ok(g) => group = group.or(g),
            Err(_) => failed += 1,
        }
    }
    let done = count - failed;
    let server_cpu = after.cpu_secs - before.cpu_secs;
    let per_sec = done as f64 / elapsed;
    let server_us = if done == 0 { 0.0 } else { server_cpu * 1e6 / done as f64 };
    let kind = match what {
        What::Tls => "full TLS 1.3 handshakes",
        What::Session => "sessions",
    };
    let json = serde_json::json!({
        "what": format!("{what:?}").to_lowercase(),
        "count": count,
        "failed": failed,
        "concurrency": concurrency,
        "elapsed_secs": (elapsed * 1000.0).round() / 1000.0,
        "per_sec": per_sec.round(),
        "server_cpu_us_each": server_us.round(),
        "tool_cpu_secs": ((own_after.cpu_secs - own_before.cpu_secs) * 100.0).round() / 100.0,
        "key_exchange_group": group,
        "certificate_key": "ECDSA P-256 (the server's self-signed certificate)",
    });
    let summary = format!(
        "{done} {kind} ({failed} failed) in {elapsed:.2} s = {per_sec:.0}/s; server CPU {server_us:.0} µs each{}",
        group.as_deref().map(|g| format!("; key exchange {g}")).unwrap_or_default()
    );
    if done == 0 {
        return Err(anyhow!("every connection failed")).context(summary);
    }
    Ok((json, summary))
}
