//! `connect`: full TLS handshakes, or whole sessions, set up per second.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;

use crate::server::{ProcStats, Target};
use crate::{Measured, round};

/// Time one connection may take before it counts as failed.
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// Resume TLS sessions (TLS 1.3 tickets from earlier connections) instead of full
    /// handshakes; with `tls-get` only, since a client reads its tickets after the handshake.
    #[arg(long)]
    resume: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum What {
    /// TCP and a full TLS handshake (no resumption), then close.
    Tls,
    /// TCP, a TLS handshake and a GET of the server's website, read to the end.
    TlsGet,
    /// A whole session: TLS, the gated WebSocket upgrade and the Noise handshake.
    Session,
}

pub(crate) async fn run(target: &Target, args: ConnectArgs) -> Result<Measured> {
    let ConnectArgs { count, concurrency, what, resume } = args;
    if count == 0 || concurrency == 0 {
        bail!("nothing to set up");
    }
    if resume && !matches!(what, What::TlsGet) {
        bail!("--resume needs --what tls-get (tickets arrive after the handshake)");
    }
    if target.door != postern_net::Door::Direct && !matches!(what, What::Session) {
        bail!("through a relay, only whole sessions are measured (--what session)");
    }
    let link = &target.link;
    let addr = link.addrs.first().ok_or_else(|| anyhow!("the link has no address"))?.clone();
    let name = rustls::pki_types::ServerName::try_from(link.tls_name())?;
    // Full handshakes unless resuming: then one session cache shared by every connection,
    // filled by a first connection that is not counted.
    let mut config = (*postern_net::tls_config(&link.pins, &[b"http/1.1"])?).clone();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    if resume {
        tls_get(&connector, &name, &addr).await.context("the first connection")?;
    }
    let before = target.stats()?;
    let own_before = ProcStats::own()?;
    let started = Instant::now();
    // Per connection: key-exchange group, resumed, client bytes on the wire (out, in) and
    // packets both ways.
    type One = (Option<String>, bool, Option<(u64, u64, u64)>);
    let results: Vec<Result<One>> = futures_util::stream::iter(0..count)
        .map(|_| {
            let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
            let one = async move {
                match what {
                    What::Tls => {
                        let tcp = tokio::net::TcpStream::connect(&addr).await?;
                        let tls = connector.connect(name, tcp).await?;
                        Ok((group_of(&tls), false, None))
                    }
                    What::TlsGet => {
                        let (group, resumed) = tls_get(&connector, &name, &addr).await?;
                        Ok((group, resumed, None))
                    }
                    What::Session => {
                        let conn = target.open().await?;
                        let bytes =
                            conn.wire_bytes().map(|(o, i)| (o, i, u64::from(conn.spent().packets)));
                        conn.close().await;
                        Ok((None, false, bytes))
                    }
                }
            };
            // One stuck connection must not hold up the run: it counts as failed.
            async move {
                tokio::time::timeout(CONNECTION_TIMEOUT, one)
                    .await
                    .map_err(|_| anyhow!("no answer within {} s", CONNECTION_TIMEOUT.as_secs()))?
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let after = target.stats()?;
    let own_after = ProcStats::own()?;
    let (mut group, mut failed, mut resumed, mut first_error) = (None, 0, 0, None);
    let mut wire: Vec<(u64, u64, u64)> = Vec::new();
    for r in results {
        match r {
            Ok((g, r, bytes)) => {
                group = group.or(g);
                resumed += usize::from(r);
                wire.extend(bytes);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let done = count - failed;
    let server_cpu = after.cpu_secs - before.cpu_secs;
    let per_sec = done as f64 / elapsed;
    let server_us = if done == 0 { 0.0 } else { server_cpu * 1e6 / done as f64 };
    let kind = match (what, resume) {
        (What::Tls, _) => "full TLS 1.3 handshakes",
        (What::TlsGet, false) => "full TLS 1.3 handshakes with a GET",
        (What::TlsGet, true) => "TLS 1.3 resumptions with a GET",
        (What::Session, _) => "sessions",
    };
    let json = serde_json::json!({
        "what": format!("{what:?}").to_lowercase(),
        "resume": resume,
        "resumed": resumed,
        "count": count,
        "failed": failed,
        "first_error": first_error,
        "concurrency": concurrency,
        "elapsed_secs": round(elapsed, 3),
        "per_sec": round(per_sec, 0),
        "server_cpu_us_each": round(server_us, 0),
        "tool_cpu_secs": round(own_after.cpu_secs - own_before.cpu_secs, 2),
        "key_exchange_group": group,
        // A session's set-up as the client's kernel counted it (TCP payload both ways).
        "client_setup_bytes_out": median(wire.iter().map(|w| w.0)),
        "client_setup_bytes_in": median(wire.iter().map(|w| w.1)),
        "client_setup_packets": median(wire.iter().map(|w| w.2)),
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

/// The median of some counts, if any.
fn median(values: impl Iterator<Item = u64>) -> Option<u64> {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn group_of(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Option<String> {
    tls.get_ref().1.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()))
}

/// A TLS connection that GETs the website and reads it to the end (reading also takes in
/// the session tickets the server sends after the handshake). Returns the key-exchange
/// group and whether the handshake resumed a session.
async fn tls_get(
    connector: &tokio_rustls::TlsConnector,
    name: &rustls::pki_types::ServerName<'static>,
    addr: &str,
) -> Result<(Option<String>, bool)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let phase = CONNECTION_TIMEOUT / 3;
    let tcp = tokio::time::timeout(phase, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("TCP: no answer"))?
        .context("TCP")?;
    let mut tls = tokio::time::timeout(phase, connector.connect(name.clone(), tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake: no answer"))?
        .context("TLS handshake")?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let host = match name {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_owned(),
        _ => "localhost".to_owned(),
    };
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .context("sending the GET")?;
    // tokio-rustls may keep part of a write buffered until flushed.
    tls.flush().await.context("sending the GET")?;
    let mut page = Vec::new();
    match tokio::time::timeout(phase, tls.read_to_end(&mut page)).await {
        Ok(read) => read.context("reading the page")?,
        Err(_) => bail!("reading the page: {} bytes, then nothing", page.len()),
    };
    if page.is_empty() {
        bail!("an empty answer");
    }
    Ok((group_of(&tls), resumed))
}
