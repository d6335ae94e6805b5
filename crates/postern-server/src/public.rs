//! The public listener, shared by the server and the relay: accept with the connection
//! limits, TLS with a deadline, then HTTP/1.1 or HTTP/2 (with WebSocket upgrades) into a
//! router, until shutdown.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::limits;

/// Time allowed for a TLS handshake and for an HTTP request's headers.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection limits of the public listener.
#[derive(Clone)]
pub(crate) struct Limits {
    /// Most open connections.
    pub(crate) total: usize,
    /// Per peer address.
    pub(crate) per_ip: limits::PerIpLimits,
    /// Addresses the per-address limits do not apply to (relays, which carry many people).
    pub(crate) exempt: HashSet<IpAddr>,
}

impl Limits {
    pub(crate) fn of(config: &crate::ServerConfig) -> Self {
        Limits {
            total: config.max_connections,
            per_ip: limits::PerIpLimits {
                open: config.max_connections_per_ip,
                rate: config.new_connections_per_ip_per_second,
                burst: config.new_connection_burst_per_ip,
            },
            exempt: config.relay_addresses.iter().copied().collect(),
        }
    }
}

/// A WebSocket's read buffer: a frame of the 256- or 1,024-byte bucket fits; larger ones
/// grow it. (tungstenite's default, 128 KiB, was most of an idle session's memory, and it
/// zeroes the whole buffer before every read.)
const WS_READ_BUFFER: usize = 2 << 10;

/// An accepted upgrade with the sizes every session's WebSocket uses (the server's and the
/// relay's client side): frames up to the protocol's largest message, a small read buffer.
pub(crate) fn sized(ws: axum::extract::WebSocketUpgrade) -> axum::extract::WebSocketUpgrade {
    use postern_proto::session::MAX_MESSAGE;
    ws.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE).read_buffer_size(WS_READ_BUFFER)
}

/// Waits (up to [`DRAIN_TIMEOUT`]) until no connection is open and `busy` says nothing else
/// is running, after shutdown was signalled.
pub(crate) async fn drain(live: &AtomicUsize, busy: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while (live.load(Ordering::Acquire) > 0 || busy()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a request asks for a WebSocket (the only way past a gate): an HTTP/1.1 upgrade, or
/// an HTTP/2 extended CONNECT (RFC 8441), which is what the client's browser-like HTTP/2 sends.
pub(crate) fn wants_websocket(parts: &axum::http::request::Parts) -> bool {
    let upgrade = parts
        .headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connect = parts.method == axum::http::Method::CONNECT
        && parts
            .extensions
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    upgrade || connect
}

/// Everything the accept loop needs.
pub(crate) struct Public {
    pub(crate) tls: tokio_rustls::TlsAcceptor,
    pub(crate) router: Router,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Open connections, counted here.
    pub(crate) live: Arc<AtomicUsize>,
    pub(crate) limits: Limits,
}

impl Public {
    /// Accepts until shutdown; each connection runs on its own task.
    pub(crate) async fn accept_loop(self, listener: TcpListener) {
        let mut shutdown = self.shutdown.clone();
        let per_ip = Arc::new(limits::PerIp::new(self.limits.per_ip));
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let exempt = self.limits.exempt.contains(&peer.ip());
            if self.live.load(Ordering::Acquire) >= self.limits.total
                || (!exempt && !per_ip.admit(peer.ip(), tokio::time::Instant::now()))
            {
                drop(tcp);
                continue;
            }
            let _ = tcp.set_nodelay(true);
            self.live.fetch_add(1, Ordering::AcqRel);
            let (tls, router, live) = (self.tls.clone(), self.router.clone(), self.live.clone());
            let (per_ip, shutdown) = (per_ip.clone(), self.shutdown.clone());
            tokio::spawn(async move {
                serve_connection(tls, tcp, router, shutdown).await;
                live.fetch_sub(1, Ordering::AcqRel);
                if !exempt {
                    per_ip.release(peer.ip());
                }
            });
        }
    }
}

async fn serve_connection(
    tls: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await else {
        return;
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
    builder.http2().timer(TokioTimer::new()).enable_connect_protocol();
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}
