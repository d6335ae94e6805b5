//! The client side of a connection to a Postern server: TLS checked against the link's SPKI
//! pins (no certificate authority involved), the gate token in the upgrade request, a
//! WebSocket, and the Noise session inside it.
//!
//! A connection goes to the server directly, or through a relay ([`Connection::connect_via`]):
//! then TLS and the WebSocket end at the relay, which checks its own token and passes the
//! server's on, and the Noise session still ends at the server, so the relay carries only
//! sealed frames. Relays use [`open_websocket`] for their own hop upstream.
//!
//! Used by the client core, the load tool, relays and the tests.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use postern_proto::frame::{ClientFrame, ErrorCode, Push, Request, Response, ServerFrame};
use postern_proto::gate::{COOKIE_NAME, GateKey};
use postern_proto::link::{RelayLink, ServerLink};
use postern_proto::relay::{SERVER_COOKIE, SERVER_TOKEN_COOKIE};
use postern_proto::session::{ClientHandshake, MAX_MESSAGE, Transport};
use rand::RngCore;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

mod browser;
mod pin;

pub use browser::{H2Stream, Held, Io, Profile};
pub use pin::PinVerifier;

/// Time allowed to connect, complete TLS, upgrade and finish the Noise handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A way to a server: straight to it, or through a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Door {
    /// TLS to the server's own address.
    Direct,
    /// Through this relay.
    Relay(RelayLink),
}

impl std::fmt::Display for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Door::Direct => f.write_str("direct"),
            Door::Relay(relay) => write!(f, "relay {}", relay.addrs.join(", ")),
        }
    }
}

/// Opens a session to `server` through whichever of `doors` opens first. Door `i` starts
/// `i × stagger` after the first (unless every earlier one has failed by then), so a
/// working first door costs nothing and a blocked one costs `stagger`, not its timeout.
/// The losers are dropped. On failure: every door's error, in order.
pub async fn connect_any(
    server: &ServerLink,
    doors: &[Door],
    stagger: Duration,
) -> Result<(Connection, usize), Vec<(usize, NetError)>> {
    use futures_util::stream::FuturesUnordered;
    let mut pending = FuturesUnordered::new();
    let mut errors = Vec::new();
    let mut next = 0;
    let mut started_at = tokio::time::Instant::now();
    loop {
        if next < doors.len() && (pending.is_empty() || started_at.elapsed() >= stagger) {
            let i = next;
            let door = doors[i].clone();
            pending.push(async move { (i, Connection::through(&door, server).await) });
            next += 1;
            started_at = tokio::time::Instant::now();
            continue;
        }
        if pending.is_empty() {
            errors.sort_by_key(|(i, _)| *i);
            return Err(errors);
        }
        let wait = if next < doors.len() {
            stagger.saturating_sub(started_at.elapsed())
        } else {
            Duration::MAX
        };
        match tokio::time::timeout(wait, pending.next()).await {
            Ok(Some((i, Ok(conn)))) => return Ok((conn, i)),
            Ok(Some((i, Err(e)))) => errors.push((i, e)),
            Ok(None) | Err(_) => {}
        }
    }
}

/// Why a connection or request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// TCP, TLS or WebSocket failed, or the server did not act like a Postern server
    /// (wrong pin, no upgrade: the gate did not open).
    #[error("connection failed: {0}")]
    Connect(String),
    /// The session broke (decryption failure, malformed frame, closed socket).
    #[error("session failed: {0}")]
    Session(String),
    /// The server refused the request with this code.
    #[error("refused: {0}")]
    Refused(ErrorCode),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
}

/// A WebSocket over browser-like TLS, as opened by [`open_websocket`].
pub type Ws = WebSocketStream<Io>;

/// Where a TLS connection goes: a server's or a relay's addresses, name and pins.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port` addresses, most preferred first (the first is dialled).
    pub addrs: Vec<String>,
    /// The TLS server name to send.
    pub tls_name: String,
    /// Accepted SPKI pins.
    pub pins: Vec<[u8; 32]>,
}

impl From<&ServerLink> for Endpoint {
    fn from(link: &ServerLink) -> Self {
        Endpoint { addrs: link.addrs.clone(), tls_name: link.tls_name(), pins: link.pins.clone() }
    }
}

impl From<&RelayLink> for Endpoint {
    fn from(link: &RelayLink) -> Self {
        Endpoint { addrs: link.addrs.clone(), tls_name: link.tls_name(), pins: link.pins.clone() }
    }
}

/// What a censor counting packets has seen of a connection so far.
///
/// The kernel's count of TCP segments both ways (`TCP_INFO`) when it can be read; otherwise
/// an estimate: set-up (TCP, TLS, the upgrade, the Noise handshake) counts
/// [`SETUP_PACKETS`], every message its segments ([`SEGMENT`] bytes each) plus half an
/// acknowledgement. [`Spent::after`] estimates what one more message adds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    /// Messages both ways.
    pub messages: u32,
    /// Estimated packets both ways, set-up included.
    pub packets: u32,
    /// Bytes received (message payloads).
    pub bytes_in: u64,
}

/// Packets a connection's set-up takes, as counted by [`Spent`].
pub const SETUP_PACKETS: u32 = 14;
/// Payload bytes per TCP segment, as counted by [`Spent`].
pub const SEGMENT: usize = 1_400;

impl Spent {
    /// A fresh connection's: its set-up.
    pub fn new() -> Self {
        Spent { messages: 0, packets: SETUP_PACKETS, bytes_in: 0 }
    }

    /// The estimate after one more message of `len` bytes.
    pub fn after(self, len: usize) -> Spent {
        let segments = u32::try_from(len.div_ceil(SEGMENT).max(1)).unwrap_or(u32::MAX);
        let messages = self.messages.saturating_add(1);
        // Half an acknowledgement per message: one for every second message.
        let acks = u32::from(messages.is_multiple_of(2));
        Spent {
            messages,
            packets: self.packets.saturating_add(segments).saturating_add(acks),
            bytes_in: self.bytes_in,
        }
    }

    fn received(self, len: usize) -> Spent {
        let mut spent = self.after(len);
        spent.bytes_in = spent.bytes_in.saturating_add(len as u64);
        spent
    }
}

/// An open session to a server.
pub struct Connection {
    ws: Ws,
    /// The number of the TCP socket `ws` owns, for `TCP_INFO` (not a second descriptor: a
    /// load test holds 15,000 connections under a 20,000-file limit). Valid while `ws` is.
    probe: std::os::fd::RawFd,
    transport: Transport,
    nonce: [u8; 32],
    next_id: u32,
    pushes: VecDeque<Push>,
    spent: Spent,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("next_id", &self.next_id).finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A TLS client configuration that accepts exactly these pins.
pub fn tls_config(
    pins: &[[u8; 32]],
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinVerifier::new(pins.to_vec(), provider.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NetError::Connect(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Opens TLS to the endpoint's first address.
pub async fn connect_tls(
    endpoint: &Endpoint,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, NetError> {
    let addr =
        endpoint.addrs.first().ok_or_else(|| NetError::Connect("link has no address".into()))?;
    let tcp = connect_tcp(addr).await.map_err(|e| NetError::Connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(endpoint.tls_name.clone())
        .map_err(|e| NetError::Connect(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(tls_config(&endpoint.pins, alpn)?);
    connector.connect(name, tcp).await.map_err(|e| NetError::Connect(e.to_string()))
}

/// Opens TLS to the endpoint and a WebSocket inside it, sending `cookie` (the gate's tokens)
/// with the request: TLS and HTTP/2 as a browser writes them ([`Profile::for_name`] of the
/// endpoint's name), the WebSocket on an extended CONNECT stream, or after an HTTP/1.1
/// upgrade if the endpoint chose HTTP/1.1. An endpoint that does not open its gate answers as
/// a website, which is an error here.
pub async fn open_websocket(endpoint: &Endpoint, cookie: &str) -> Result<Ws, NetError> {
    let (mut ws, opened) = open_websocket_held(endpoint, cookie).await?;
    opened.hold.release();
    ws.flush().await.map_err(|e| NetError::Connect(e.to_string()))?;
    Ok(ws)
}

/// What [`open_websocket_held`] leaves with the caller.
struct Opened {
    /// Releases the request (and what the caller has sent since) at the next flush.
    hold: browser::Hold,
    /// The TCP socket's number, for reading `TCP_INFO`.
    probe: std::os::fd::RawFd,
}

/// [`open_websocket`], except that over HTTP/2 nothing after the ClientHello has been sent: the
/// caller's first message joins TLS Finished and the request, and the caller releases them.
async fn open_websocket_held(endpoint: &Endpoint, cookie: &str) -> Result<(Ws, Opened), NetError> {
    use std::os::fd::AsRawFd;
    let addr =
        endpoint.addrs.first().ok_or_else(|| NetError::Connect("link has no address".into()))?;
    let tcp = connect_tcp(addr).await.map_err(|e| NetError::Connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let probe = tcp.as_raw_fd();
    let (tcp, hold) = browser::Tcp::new(tcp);
    let profile = Profile::for_name(&endpoint.tls_name);
    let tls = browser::tls(endpoint, tcp, profile).await?;
    // A small read buffer (the default, 128 KiB, is zeroed on every read); larger frames
    // grow it.
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .read_buffer_size(2 << 10);
    let host = addr.as_str();
    let ws = if tls.ssl().selected_alpn_protocol() == Some(b"h2") {
        let stream = browser::websocket_stream(tls, profile, host, cookie).await?;
        WebSocketStream::from_raw_socket(
            Io::Http2(Box::new(stream)),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            Some(config),
        )
        .await
    } else {
        // The upgrade waits for its answer: TLS Finished leaves with the request.
        hold.release();
        let mut request = format!("wss://{host}/")
            .into_client_request()
            .map_err(|e| NetError::Connect(e.to_string()))?;
        let cookie = HeaderValue::from_str(cookie).map_err(|e| NetError::Connect(e.to_string()))?;
        request.headers_mut().insert("cookie", cookie);
        tokio_tungstenite::client_async_with_config(request, Io::Http1(tls), Some(config))
            .await
            .map_err(|e| NetError::Connect(format!("upgrade refused: {e}")))?
            .0
    };
    Ok((ws, Opened { hold, probe }))
}

/// A TCP connection to `addr`. Test hook: with `POSTERN_TEST_SOURCE_IP` set, it leaves
/// from that address (tests give each client its own loopback address).
async fn connect_tcp(addr: &str) -> std::io::Result<TcpStream> {
    let Ok(source) = std::env::var("POSTERN_TEST_SOURCE_IP") else {
        return TcpStream::connect(addr).await;
    };
    let source: std::net::IpAddr = source
        .parse()
        .map_err(|_| std::io::Error::other("POSTERN_TEST_SOURCE_IP is not an address"))?;
    let target = tokio::net::lookup_host(addr)
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .ok_or_else(|| std::io::Error::other("no address of the same family"))?;
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

fn random_nonce() -> [u8; 16] {
    let mut nonce = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

/// A fresh gate token for the link's secret.
pub fn gate_token(link: &ServerLink) -> String {
    GateKey::derive(&link.secret).token(now_secs(), random_nonce())
}

/// The cookie that asks a relay for `server`: a fresh relay token for the relay's
/// credential, the server's pin, and a fresh gate token for the server, which the relay
/// passes on. `server_token` replaces the latter (tests replay one).
pub fn relay_cookie(relay: &RelayLink, server: &ServerLink, server_token: Option<&str>) -> String {
    use base64::Engine;
    let pin = server
        .pins
        .first()
        .map(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(p))
        .unwrap_or_default();
    let server_token = server_token.map_or_else(|| gate_token(server), str::to_owned);
    relay_cookie_parts(relay, &pin, &server_token)
}

/// The cookie for `relay` with the server's pin (base64url) and gate token as given: what a
/// relay sends to the next relay of a chain.
pub fn relay_cookie_parts(relay: &RelayLink, server_pin: &str, server_token: &str) -> String {
    let relay_token = relay.credential.token(now_secs(), random_nonce());
    format!(
        "{COOKIE_NAME}={relay_token}; {SERVER_COOKIE}={server_pin}; {SERVER_TOKEN_COOKIE}={server_token}"
    )
}

impl Connection {
    /// Connects to the link's first address with a fresh gate token.
    pub async fn connect(link: &ServerLink) -> Result<Self, NetError> {
        Self::connect_with_token(link, &gate_token(link)).await
    }

    /// Connects presenting `token` (tests use this to replay one).
    pub async fn connect_with_token(link: &ServerLink, token: &str) -> Result<Self, NetError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(link, token))
            .await
            .map_err(|_| NetError::Timeout)?
    }

    /// Connects to `server` through `door`.
    pub async fn through(door: &Door, server: &ServerLink) -> Result<Self, NetError> {
        match door {
            Door::Direct => Self::connect(server).await,
            Door::Relay(relay) => Self::connect_via(relay, server).await,
        }
    }

    /// Connects to `server` through `relay`: TLS and the WebSocket go to the relay, the Noise
    /// session to the server.
    pub async fn connect_via(relay: &RelayLink, server: &ServerLink) -> Result<Self, NetError> {
        let cookie = relay_cookie(relay, server, None);
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open(&relay.into(), &cookie, server))
            .await
            .map_err(|_| NetError::Timeout)?
    }

    async fn connect_inner(link: &ServerLink, token: &str) -> Result<Self, NetError> {
        Self::open(&link.into(), &format!("{COOKIE_NAME}={token}"), link).await
    }

    async fn open(
        endpoint: &Endpoint,
        cookie: &str,
        server: &ServerLink,
    ) -> Result<Self, NetError> {
        let (mut ws, Opened { hold, probe }) = open_websocket_held(endpoint, cookie).await?;
        let (handshake, first) = ClientHandshake::start(&server.static_key)
            .map_err(|e| NetError::Session(e.to_string()))?;
        // The Noise handshake's first message leaves with the request, before its answer.
        ws.send(Message::Binary(first.into()))
            .await
            .map_err(|e| NetError::Session(e.to_string()))?;
        hold.release();
        ws.flush().await.map_err(|e| NetError::Session(e.to_string()))?;
        let answer = next_binary(&mut ws).await?;
        let (transport, hello) =
            handshake.finish(&answer).map_err(|e| NetError::Session(e.to_string()))?;
        // The two handshake messages are part of the set-up.
        Ok(Connection {
            ws,
            probe,
            transport,
            nonce: hello.nonce,
            next_id: 1,
            pushes: VecDeque::new(),
            spent: Spent::new(),
        })
    }

    /// What this connection has carried so far (for a per-connection budget): packets as
    /// the kernel counted them when it tells, else as estimated.
    pub fn spent(&self) -> Spent {
        match tcp_info_sys::get_tcp_info(self.probe) {
            Ok(info) => Spent {
                packets: info.tcpi_segs_out.saturating_add(info.tcpi_segs_in),
                ..self.spent
            },
            Err(_) => self.spent,
        }
    }

    /// Bytes on the wire so far, both ways (TCP payload, TLS and WebSocket framing
    /// included), as the kernel counts them; `None` where it cannot tell.
    pub fn wire_bytes(&self) -> Option<(u64, u64)> {
        let info = tcp_info_sys::get_tcp_info(self.probe).ok()?;
        Some((info.tcpi_bytes_acked, info.tcpi_bytes_received))
    }

    /// Whether the WebSocket runs on an HTTP/2 stream (as a browser's would), rather than
    /// after an HTTP/1.1 upgrade.
    pub fn over_http2(&self) -> bool {
        matches!(self.ws.get_ref(), Io::Http2(_))
    }

    /// This connection's server nonce (signed requests bind it).
    pub fn nonce(&self) -> &[u8; 32] {
        &self.nonce
    }

    /// Sends a request without waiting; returns its id. `signer` signs it when given.
    pub async fn send(
        &mut self,
        request: Request,
        signer: Option<&ed25519_dalek::SigningKey>,
    ) -> Result<u32, NetError> {
        let request_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut frame = ClientFrame { request_id, request, signature: None };
        if let Some(key) = signer {
            frame.sign(key, &self.nonce);
        }
        self.send_frame(&frame).await?;
        Ok(request_id)
    }

    /// Sends an already built frame (tests use this for malformed or replayed frames).
    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), NetError> {
        self.send_raw(&frame.encode()).await
    }

    /// Seals and sends arbitrary frame bytes.
    pub async fn send_raw(&mut self, frame: &[u8]) -> Result<(), NetError> {
        let sealed = self.transport.seal(frame).map_err(|e| NetError::Session(e.to_string()))?;
        self.spent = self.spent.after(sealed.len());
        self.ws
            .send(Message::Binary(sealed.into()))
            .await
            .map_err(|e| NetError::Session(e.to_string()))
    }

    /// The next frame from the server (pushes included).
    pub async fn recv(&mut self) -> Result<ServerFrame, NetError> {
        let sealed = next_binary(&mut self.ws).await?;
        self.spent = self.spent.received(sealed.len());
        let plain = self.transport.open(&sealed).map_err(|e| NetError::Session(e.to_string()))?;
        ServerFrame::decode(&plain).map_err(|e| NetError::Session(e.to_string()))
    }

    /// Waits for the answer to `request_id`, queueing pushes that arrive meanwhile.
    pub async fn response(&mut self, request_id: u32) -> Result<Response, NetError> {
        loop {
            match self.recv().await? {
                ServerFrame::Response { request_id: id, result } if id == request_id || id == 0 => {
                    return result.map_err(NetError::Refused);
                }
                ServerFrame::Response { .. } => {
                    return Err(NetError::Session("answer to another request".into()));
                }
                ServerFrame::Push(push) => self.pushes.push_back(push),
            }
        }
    }

    /// Sends a request and waits for its answer.
    pub async fn request(
        &mut self,
        request: Request,
        signer: Option<&ed25519_dalek::SigningKey>,
    ) -> Result<Response, NetError> {
        let id = self.send(request, signer).await?;
        self.response(id).await
    }

    /// The next push, waiting up to `timeout`.
    pub async fn next_push(&mut self, timeout: Duration) -> Result<Push, NetError> {
        if let Some(push) = self.pushes.pop_front() {
            return Ok(push);
        }
        tokio::time::timeout(timeout, async {
            match self.recv().await? {
                ServerFrame::Push(push) => Ok(push),
                ServerFrame::Response { .. } => {
                    Err(NetError::Session("unexpected answer while waiting for a push".into()))
                }
            }
        })
        .await
        .map_err(|_| NetError::Timeout)?
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

async fn next_binary(ws: &mut Ws) -> Result<Vec<u8>, NetError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_))) | None => {
                return Err(NetError::Session("closed by server".into()));
            }
            Some(Ok(Message::Text(_))) => {
                return Err(NetError::Session("unexpected text message".into()));
            }
            // Over HTTP/2 the upgrade's answer comes with the first bytes: a refusal is a
            // failure to connect.
            Some(Err(tokio_tungstenite::tungstenite::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Err(NetError::Connect(e.to_string()));
            }
            Some(Err(e)) => return Err(NetError::Session(e.to_string())),
        }
    }
}
