//! The public listener, shared by the server and the relay: accept with the connection
//! limits, TLS with a deadline, then HTTP/1.1 or HTTP/2 (with WebSocket upgrades) into a
//! router, until shutdown.

use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::limits;

/// Time a connection has, from its acceptance, for the TLS handshake and the head of its
/// first HTTP/1 request or its first HTTP/2 stream: nginx's client_header_timeout (a prober
/// that holds a connection open silently times it).
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a connection may wait, after its last request or stream, for the next one:
/// nginx's keepalive_timeout.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// Requests a connection serves before it closes: nginx's keepalive_requests (its HTTP/1.1
/// answer to the last says `Connection: close`; over HTTP/2 a GOAWAY comes before it).
pub(crate) const KEEPALIVE_REQUESTS: u32 = 1000;
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
    shutdown: watch::Receiver<bool>,
) {
    // What serves the connection is built outside this future and boxed, sized for the
    // protocol it speaks: kept in here, the TLS stream it was built from and the HTTP/2
    // connection would each hold their space for the connection's life (an idle session
    // paid 7.3 KiB for this task; BENCHMARKS.md).
    let served = {
        let accepted = tokio::time::Instant::now();
        // Boxed too: the handshake's state is larger than what follows it.
        let handshake =
            tokio::time::timeout(HEADER_TIMEOUT, Box::pin(tls.accept(Coalesce::new(tcp))));
        let Ok(Ok(stream)) = handshake.await else {
            return;
        };
        // nginx's timer runs from the connection's acceptance, not from the handshake's end.
        serve(stream, router, HEADER_TIMEOUT.saturating_sub(accepted.elapsed()), shutdown)
    };
    served.await;
}

/// HTTP/1 or HTTP/2 over an accepted TLS stream, as a future of its own size.
fn serve(
    stream: tokio_rustls::server::TlsStream<Coalesce>,
    router: Router,
    header_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let (io, service) =
        (TokioIo::new(Ending(stream, Client::Quiet)), TowerToHyperService::new(router));
    // The protocol is the one ALPN chose, as nginx decides it: an HTTP/2 preface on a
    // connection that did not agree on h2 is a bad HTTP/1 request, not HTTP/2.
    if io.inner().0.get_ref().1.alpn_protocol() == Some(b"h2") {
        // nginx's HTTP/2 SETTINGS and connection window. The 16 MiB frame size is only
        // announced: the patched h2 reads frames up to 64 KiB (vendor/h2/PATCH.md).
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_concurrent_streams(128)
            .initial_stream_window_size(65_536)
            .initial_connection_window_size((1 << 31) - 1)
            .max_frame_size(16_777_215)
            .idle_timeouts(header_timeout, KEEPALIVE_TIMEOUT)
            .max_requests(KEEPALIVE_REQUESTS);
        let conn = http2.serve_connection(io, service);
        Box::pin(drive(Box::pin(conn), |conn| conn.graceful_shutdown(), shutdown))
    } else {
        // Headers written as nginx writes them (`Content-Length`, not `content-length`).
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            // nginx's lingering close of a connection whose request body it did not read.
            .lingering_close(Duration::from_secs(5), Duration::from_secs(30))
            .title_case_headers(true)
            // nginx takes several spaces between the request line's parts, and answers
            // what it cannot read with its own pages (crate::unparsed).
            .allow_multiple_spaces_in_request_line_delimiters(true)
            // nginx has no limit on header lines but its buffers' (crate::site::oversize).
            .max_headers(1000)
            .parse_error_answer(crate::unparsed::answer);
        let service = Numbered { inner: service, served: std::cell::Cell::new(0) };
        let conn =
            http1.serve_connection(io, service).on_lingered(Ending::lingered).with_upgrades();
        Box::pin(drive(Box::pin(conn), |conn| conn.graceful_shutdown(), shutdown))
    }
}

/// A request's number on its HTTP/1 connection, from 1 (the site says `Connection: close`
/// to the [`KEEPALIVE_REQUESTS`]th).
#[derive(Clone, Copy)]
pub(crate) struct RequestNumber(pub(crate) u32);

/// An HTTP/1 connection's service, numbering its requests.
struct Numbered<S> {
    inner: S,
    served: std::cell::Cell<u32>,
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for Numbered<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: hyper::Request<B>) -> Self::Future {
        let n = self.served.get().saturating_add(1);
        self.served.set(n);
        request.extensions_mut().insert(RequestNumber(n));
        self.inner.call(request)
    }
}

/// Serves a connection until it ends, or, once the server shuts down, asks it to finish
/// (`graceful`) and drains it for a while. The connection comes boxed: an async fn holds its
/// arguments for its whole life, so a pinned copy would double it.
async fn drive<C: Future>(
    mut conn: Pin<Box<C>>,
    graceful: impl FnOnce(Pin<&mut C>),
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.changed() => {
            graceful(conn.as_mut());
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}

/// How long the server holds what it writes after its handshake flight: long enough for the
/// session tickets, the HTTP/2 SETTINGS and their acknowledgement, the answer to the client's
/// request and the first Noise message to be written, which then leave together.
const COALESCE: Duration = Duration::from_millis(10);

enum Phase {
    /// Until the first flush (the TLS handshake flight): writes pass through.
    First,
    /// Writes are held; the timer starts at the first of them.
    Holding(Option<Pin<Box<tokio::time::Sleep>>>),
    /// Writes pass through.
    Open,
}

/// A connection's TCP stream on the public listener. A censor that freezes flows counts
/// packets both ways, and a client acknowledges each of the server's segments: after its
/// handshake flight, the server holds its writes for [`COALESCE`] so that what it sends in
/// answer to the client's first flight leaves in one segment rather than four (with one
/// acknowledgement rather than four). Whoever reads or flushes next, once the time is up,
/// sends them.
pub(crate) struct Coalesce {
    inner: tokio::net::TcpStream,
    held: postern_net::Held,
    phase: Phase,
}

impl Coalesce {
    pub(crate) fn new(inner: tokio::net::TcpStream) -> Coalesce {
        Coalesce { inner, held: postern_net::Held::default(), phase: Phase::First }
    }

    /// Whether a write now is held: in the holding phase (whose timer starts with its first
    /// write), before the time is up, and under the cap.
    fn holds(&mut self, cx: &mut Context<'_>) -> bool {
        let Phase::Holding(timer) = &mut self.phase else { return false };
        timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(COALESCE)));
        !self.hold_over(cx) && self.held.has_room()
    }

    /// Whether the hold is over, registering for a wake-up when it ends if not.
    fn hold_over(&mut self, cx: &mut Context<'_>) -> bool {
        let over = match &mut self.phase {
            Phase::Holding(Some(timer)) => timer.as_mut().poll(cx).is_ready(),
            Phase::Holding(None) => false,
            Phase::First | Phase::Open => return true,
        };
        if over {
            self.phase = Phase::Open;
        }
        over
    }
}

impl Drop for Coalesce {
    /// A connection dropped while holding (an HTTP/1.1 answer with `Connection: close`, say)
    /// still sends what it held: the socket takes a few kilobytes without waiting.
    fn drop(&mut self) {
        self.held.send_now(&self.inner);
    }
}

/// A connection's TLS stream on the public listener, and what the client did last. Dropped
/// without a TLS close (hyper drops a connection whose request, or next request, did not
/// come in time), it closes as nginx does when it times a client out: with close_notify if
/// no part of a request came since the last answer, without one if a part did (nginx then
/// marks the connection timed out and skips it). After a lingering close it shuts down
/// without one too (nginx's read timed out there). A client that closed its side gets none:
/// under a censor that counts packets, one more after a connection's last exchange could
/// be the one that freezes it.
struct Ending(tokio_rustls::server::TlsStream<Coalesce>, Client);

/// What the client of an [`Ending`] did since the server last wrote.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Client {
    Quiet,
    Wrote,
    Closed,
    /// The lingering close after an unread request body ended.
    Lingered,
}

impl Drop for Ending {
    fn drop(&mut self) {
        if self.1 != Client::Quiet {
            return;
        }
        let (tcp, tls) = self.0.get_mut();
        tls.send_close_notify();
        let mut bytes = Vec::new();
        while tls.wants_write() && tls.write_tls(&mut bytes).is_ok_and(|n| n > 0) {}
        // Coalesce sends what it holds as it is dropped, right after this.
        tcp.held.push(&bytes);
    }
}

impl Ending {
    /// hyper's lingering close ended (`on_lingered`): the shutdown that follows sends no
    /// close_notify.
    fn lingered(io: &mut TokioIo<Ending>) {
        io.inner_mut().1 = Client::Lingered;
    }

    /// The server writes: what the client wrote before is answered.
    fn wrote(&mut self) {
        if self.1 == Client::Wrote {
            self.1 = Client::Quiet;
        }
    }
}

impl AsyncRead for Ending {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let (before, room) = (buf.filled().len(), buf.remaining());
        let read = Pin::new(&mut self.0).poll_read(cx, buf);
        match &read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.1 = Client::Wrote,
            // Nothing read into room for something: the end of the stream.
            Poll::Ready(Ok(())) if room > 0 => self.1 = Client::Closed,
            Poll::Ready(Err(_)) => self.1 = Client::Closed,
            Poll::Ready(Ok(())) | Poll::Pending => {}
        }
        read
    }
}

impl AsyncWrite for Ending {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.wrote();
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.wrote();
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.1 == Client::Lingered {
            // TCP's FIN, without TLS's close.
            return Pin::new(self.0.get_mut().0).poll_shutdown(cx);
        }
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncRead for Coalesce {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        // The reader is woken when the hold ends, and sends what was held.
        if !me.held.is_empty()
            && me.hold_over(cx)
            && let Poll::Ready(Err(e)) = me.held.poll_send(&mut me.inner, cx)
        {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Coalesce {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.holds(cx) {
            me.held.push(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(me.held.poll_send(&mut me.inner, cx))?;
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }

    /// TLS writes a flight's records as one vectored write: one segment.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.holds(cx) {
            bufs.iter().for_each(|b| me.held.push(b));
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        ready!(me.held.poll_send(&mut me.inner, cx))?;
        Pin::new(&mut me.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.hold_over(cx) && me.held.has_room() {
            return Poll::Ready(Ok(()));
        }
        ready!(me.held.poll_send(&mut me.inner, cx))?;
        ready!(Pin::new(&mut me.inner).poll_flush(cx))?;
        if matches!(me.phase, Phase::First) {
            me.phase = Phase::Holding(None);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.phase = Phase::Open;
        ready!(me.held.poll_send(&mut me.inner, cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (Coalesce, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Coalesce::new(server), client)
    }

    #[tokio::test]
    async fn after_the_first_flight_writes_are_held_then_sent_together() {
        let (mut server, mut client) = pair().await;
        let mut got = [0u8; 6];
        server.write_all(b"flight").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"flight");
        // Held, flushes and all, however long nothing reads the server's stream.
        server.write_all(b"tic").await.unwrap();
        server.write_all(b"ket").await.unwrap();
        server.flush().await.unwrap();
        let early = tokio::time::timeout(COALESCE * 3, client.read(&mut got)).await;
        assert!(early.is_err(), "held bytes were sent: {early:?}");
        // The server reading again, after the hold, sends them.
        let reader = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).await.unwrap();
            server
        });
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ticket");
        client.write_all(b"!").await.unwrap();
        let mut server = reader.await.unwrap();
        // After that, writes pass straight through.
        server.write_all(b"after!").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after!");
    }

    #[tokio::test]
    async fn a_connection_dropped_while_holding_still_sends() {
        let (mut server, mut client) = pair().await;
        server.write_all(b"flight").await.unwrap();
        server.flush().await.unwrap();
        server.write_all(b"answer").await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"flightanswer");
    }
}
