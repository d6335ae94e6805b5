//! What a web server shows a prober, for comparing Postern's public listener with nginx: how
//! it answers ClientHellos of several shapes, its first HTTP/2 frames, and its HTTP/2 and
//! HTTP/1.1 answers. Everything that changes from one connection to the next (random values,
//! keys, dates) is left out, so two servers that behave alike print alike.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
pub use rustls::crypto::ring::{cipher_suite, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
pub use rustls::version;
use rustls::{DigitallySignedStruct, SignatureScheme, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long a read may wait for a server that has nothing more to say.
const QUIET: Duration = Duration::from_millis(300);
/// How long any one exchange may take.
const EXCHANGE: Duration = Duration::from_secs(10);

/// The shape of a ClientHello.
#[derive(Clone, Debug)]
pub struct Hello {
    pub versions: Vec<&'static rustls::SupportedProtocolVersion>,
    pub suites: Vec<SupportedCipherSuite>,
    pub groups: Vec<&'static dyn SupportedKxGroup>,
    pub alpn: Vec<Vec<u8>>,
    /// Whether the client offers TLS 1.2 session tickets.
    pub tickets: bool,
}

impl Hello {
    /// TLS 1.3 and 1.2, rustls' suites and groups, ALPN `h2` and `http/1.1`.
    pub fn browser() -> Self {
        let provider = rustls::crypto::ring::default_provider();
        Hello {
            versions: vec![&rustls::version::TLS13, &rustls::version::TLS12],
            suites: provider.cipher_suites,
            groups: provider.kx_groups,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            tickets: true,
        }
    }
}

/// How a server answered one ClientHello.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TlsPrint {
    /// The handshake failed: the alert or error, as text.
    pub failed: Option<String>,
    /// The server's first flight (what it sent before the client's second flight), a line
    /// per record: its content type, and the handshake messages of a plaintext one.
    pub records: Vec<String>,
    /// The length of the first encrypted record (TLS 1.3's EncryptedExtensions), which
    /// varies with the extensions in it.
    pub first_encrypted: Option<usize>,
    /// The ServerHello's legacy version, cipher suite and session ID length.
    pub version: u16,
    pub suite: u16,
    pub session_id_len: usize,
    /// Its extensions, in order: type and body, with a key share's key left out.
    pub extensions: Vec<(u16, Vec<u8>)>,
    /// The protocol both sides agreed on, and ALPN's choice.
    pub negotiated: Option<String>,
    pub alpn: Option<Vec<u8>>,
    /// Session tickets the client was given (TLS 1.3 ones after the handshake).
    pub tickets: usize,
    /// A TLS 1.2 ticket's lifetime hint, which is sent in the clear.
    pub ticket_lifetime: Option<u32>,
}

/// Connects to `addr`, sends a ClientHello of `hello`'s shape with `sni`, completes the
/// handshake if the server agrees, and reads what follows for a moment.
pub async fn tls(addr: SocketAddr, sni: &str, hello: &Hello) -> TlsPrint {
    let tickets = Arc::new(Tickets::default());
    let provider = CryptoProvider {
        cipher_suites: hello.suites.clone(),
        kx_groups: hello.groups.clone(),
        ..rustls::crypto::ring::default_provider()
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&hello.versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    config.alpn_protocols = hello.alpn.clone();
    config.resumption = rustls::client::Resumption::store(tickets.clone());
    if !hello.tickets {
        config.resumption =
            config.resumption.tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
    }
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let marks = Arc::new(Mutex::new(Vec::new()));
    let recorded = Recorded { inner: tcp, seen: seen.clone(), marks: marks.clone() };
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = tokio::time::timeout(EXCHANGE, connector.connect(name, recorded)).await;
    let (failed, negotiated, alpn) = match handshake {
        Ok(Ok(mut stream)) => {
            let (_, conn) = stream.get_ref();
            let negotiated = conn.protocol_version().map(|v| format!("{v:?}"));
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            // TLS 1.3 tickets come after the handshake; HTTP/2's SETTINGS may too.
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(QUIET, stream.read(&mut buf)).await;
            (None, negotiated, alpn)
        }
        Ok(Err(e)) => (Some(e.to_string()), None, None),
        Err(_) => (Some("timed out".to_owned()), None, None),
    };
    let seen = seen.lock().expect("recorded bytes").clone();
    let flight_end = marks.lock().expect("marks").get(1).copied().unwrap_or(seen.len());
    let mut print = read_server_flight(&seen, flight_end);
    print.failed = failed;
    print.negotiated = negotiated;
    print.alpn = alpn;
    print.tickets = tickets.count.load(Ordering::SeqCst);
    print
}

/// Reads the records of what a server sent: those of its first flight (the first
/// `flight_end` bytes), and a TLS 1.2 ticket after it.
fn read_server_flight(bytes: &[u8], flight_end: usize) -> TlsPrint {
    let mut print = TlsPrint::default();
    let mut rest = bytes;
    let mut tls13 = false;
    let mut encrypted = false;
    while rest.len() >= 5 {
        let (kind, len) = (rest[0], usize::from(u16::from_be_bytes([rest[3], rest[4]])));
        let Some(body) = rest.get(5..5 + len) else { break };
        let in_flight = bytes.len() - rest.len() < flight_end;
        rest = &rest[5 + len..];
        if !in_flight {
            // After the first flight only a TLS 1.2 ticket is read: it comes in the clear,
            // before the server's ChangeCipherSpec; the handshake records after that are
            // encrypted (its Finished), and one whose ciphertext starts with a 4 is no ticket.
            if kind == 20 {
                encrypted = true;
            }
            if kind == 22 && !tls13 && !encrypted && body.first() == Some(&4) && body.len() >= 8 {
                print.ticket_lifetime =
                    Some(u32::from_be_bytes([body[4], body[5], body[6], body[7]]));
            }
            continue;
        }
        match kind {
            22 => {
                let mut messages = body;
                let mut types = Vec::new();
                while messages.len() >= 4 {
                    let mlen = usize::from(messages[1]) << 16
                        | usize::from(messages[2]) << 8
                        | usize::from(messages[3]);
                    let Some(message) = messages.get(4..4 + mlen) else { break };
                    types.push(messages[0].to_string());
                    if messages[0] == 2 {
                        tls13 = read_server_hello(message, &mut print);
                    }
                    messages = &messages[4 + mlen..];
                }
                print.records.push(format!("handshake {}", types.join(",")));
            }
            20 => print.records.push("change_cipher_spec".to_owned()),
            21 => print.records.push(format!("alert {body:?}")),
            23 => {
                print.first_encrypted.get_or_insert(len);
                print.records.push("encrypted".to_owned());
            }
            other => print.records.push(format!("type {other}")),
        }
    }
    print
}

/// Reads a ServerHello (or HelloRetryRequest) into `print`; whether it chose TLS 1.3.
fn read_server_hello(m: &[u8], print: &mut TlsPrint) -> bool {
    let Some(&sid_len) = m.get(34) else { return false };
    let sid_len = usize::from(sid_len);
    let at = 35 + sid_len;
    let Some(rest) = m.get(at..at + 3) else { return false };
    print.version = u16::from_be_bytes([m[0], m[1]]);
    print.session_id_len = sid_len;
    print.suite = u16::from_be_bytes([rest[0], rest[1]]);
    let mut exts = m.get(at + 5..).unwrap_or_default();
    let mut tls13 = false;
    while exts.len() >= 4 {
        let kind = u16::from_be_bytes([exts[0], exts[1]]);
        let len = usize::from(u16::from_be_bytes([exts[2], exts[3]]));
        let Some(body) = exts.get(4..4 + len) else { break };
        let kept = match kind {
            // key_share: the group only.
            51 => body.get(..2).unwrap_or_default().to_vec(),
            43 => {
                tls13 = body == [3, 4];
                body.to_vec()
            }
            _ => body.to_vec(),
        };
        print.extensions.push((kind, kept));
        exts = &exts[4 + len..];
    }
    tls13
}

/// A TCP stream that keeps a copy of everything it reads, and how much it had read at each
/// write.
struct Recorded {
    inner: TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
    marks: Arc<Mutex<Vec<usize>>>,
}

impl AsyncRead for Recorded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            let new = buf.filled()[before..].to_vec();
            self.seen.lock().expect("recorded bytes").extend_from_slice(&new);
        }
        polled
    }
}

impl AsyncWrite for Recorded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let read = self.seen.lock().expect("recorded bytes").len();
        let mut marks = self.marks.lock().expect("marks");
        if marks.last() != Some(&read) {
            marks.push(read);
        }
        drop(marks);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A session store that counts the tickets it is given.
#[derive(Debug)]
struct Tickets {
    inner: ClientSessionMemoryCache,
    count: AtomicUsize,
}

impl Default for Tickets {
    fn default() -> Self {
        Tickets { inner: ClientSessionMemoryCache::new(16), count: AtomicUsize::new(0) }
    }
}

impl ClientSessionStore for Tickets {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(name, group);
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(name)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.inner.set_tls12_session(name, value);
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.inner.remove_tls12_session(name);
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(name, value);
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(name)
    }
}

/// Accepts any certificate: the prints compare servers, not trust.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS connection to `addr` offering `alpn` only.
async fn connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(EXCHANGE, connector.connect(name, tcp))
        .await
        .expect("TLS in time")
        .expect("TLS")
}

/// The frames a server sends first on HTTP/2, one line each, up to its acknowledgement of a
/// PING the client sends after its preface and an empty SETTINGS.
pub async fn h2_preface(addr: SocketAddr, sni: &str) -> Vec<String> {
    let mut tls = connect(addr, sni, b"h2").await;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    tls.write_all(&hello).await.expect("preface");
    let mut frames = Vec::new();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await.expect("frame header");
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).await.expect("frame payload");
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            let body = match head[3] {
                4 => payload
                    .chunks(6)
                    .map(|s| {
                        let id = u16::from_be_bytes([s[0], s[1]]);
                        let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                        format!("{id}={value}")
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                8 => {
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]).to_string()
                }
                _ => format!("{payload:02x?}"),
            };
            frames.push(format!("type {} flags {} stream {stream}: {body}", head[3], head[4]));
            if head[3] == 6 && head[4] & 1 == 1 {
                return;
            }
        }
    };
    tokio::time::timeout(EXCHANGE, read).await.expect("frames up to the PING ACK in time");
    frames
}

/// How a server ended a connection a client left alone (`left_alone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Seconds from the client's last write to the end, rounded.
    pub after_secs: u64,
    /// `close_notify` (TLS closed cleanly), `eof` (TCP closed without it), `reset`, or
    /// `open` (still open at the cap).
    pub how: &'static str,
    /// What the server wrote after the last write: over HTTP/2 its GOAWAY frames (last
    /// stream and error code), otherwise how many bytes.
    pub wrote: String,
}

/// Opens a connection (TLS offering `alpn`, or bare TCP if `None`), writes each of `sent`
/// (waiting a moment after each, so an answer comes before the next), then waits up to
/// `cap` for the server to end it.
pub async fn left_alone(
    addr: SocketAddr,
    sni: &str,
    alpn: Option<&[u8]>,
    sent: &[&[u8]],
    cap: Duration,
) -> Ended {
    let mut io: Box<dyn AsyncReadWrite> = match alpn {
        Some(alpn) => Box::new(connect(addr, sni, alpn).await),
        None => Box::new(TcpStream::connect(addr).await.expect("connect")),
    };
    for bytes in sent {
        io.write_all(bytes).await.expect("write");
        tokio::time::sleep(QUIET).await;
    }
    // What came before the last write's moment is not counted.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), io.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
    let started = tokio::time::Instant::now();
    let how = loop {
        match tokio::time::timeout_at(started + cap, io.read(&mut buf)).await {
            Err(_) => break "open",
            Ok(Ok(0)) => break if alpn.is_some() { "close_notify" } else { "eof" },
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break "eof",
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Ok(Err(_)) => break "error",
        }
    };
    let after_secs = (started.elapsed().as_millis() + 500) as u64 / 1000;
    let wrote = if alpn == Some(b"h2") {
        let mut goaways = Vec::new();
        let mut rest = &got[..];
        while rest.len() >= 9 {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let Some(payload) = rest.get(9..9 + len) else { break };
            if rest[3] == 7 && payload.len() >= 8 {
                goaways.push(format!("GOAWAY {:02x?}", &payload[..8]));
            }
            rest = &rest[9 + len..];
        }
        goaways.join(", ")
    } else {
        format!("{} bytes", got.len())
    };
    Ended { after_secs, how, wrote }
}

/// A byte stream either way (TLS or bare TCP).
trait AsyncReadWrite: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

/// An answer, with the date's value blanked.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// One HTTP/2 request on its own connection.
pub async fn h2_request(
    addr: SocketAddr,
    sni: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let tls = connect(addr, sni, b"h2").await;
    let (mut client, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = http::Request::builder().method(method).uri(format!("https://{sni}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).expect("request");
    let exchange = async {
        let (response, _) = client.send_request(request, true).expect("send request");
        let response = response.await.expect("response");
        let (parts, mut body) = response.into_parts();
        let mut content = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("body");
            let _ = body.flow_control().release_capacity(chunk.len());
            content.extend_from_slice(&chunk);
        }
        Answer {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    let value = if name == http::header::DATE {
                        String::new()
                    } else {
                        String::from_utf8_lossy(value.as_bytes()).into_owned()
                    };
                    (name.as_str().to_owned(), value)
                })
                .collect(),
            body: content.escape_ascii().to_string(),
        }
    };
    let answer = tokio::time::timeout(EXCHANGE, exchange).await.expect("an answer in time");
    driver.abort();
    answer
}

/// An HTTP/1 answer's head with the date's value blanked.
fn blank_date(head: &str) -> String {
    head.split("\r\n")
        .map(|line| if line.to_ascii_lowercase().starts_with("date:") { "Date: -" } else { line })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// An HTTP/1 head's Content-Length, if it has one.
fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
    })
}

/// One raw HTTP/1.1 request on its own connection: the answer's head, as text with the
/// date's value blanked, and its body with bytes outside printable ASCII escaped. The body
/// is read by its Content-Length (none after HEAD or a 304), to its last chunk, or to the
/// end when the server closes.
pub async fn h1_request(addr: SocketAddr, sni: &str, raw: impl AsRef<[u8]>) -> String {
    let raw = raw.as_ref();
    let mut tls = connect(addr, sni, b"http/1.1").await;
    tls.write_all(raw).await.expect("request");
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).into_owned();
                let length = content_length(&head).unwrap_or(0);
                let bodiless = raw.starts_with(b"HEAD ") || head.starts_with("HTTP/1.1 304");
                let chunked = head.to_ascii_lowercase().contains("\r\ntransfer-encoding: chunked");
                if chunked && !bodiless {
                    if got[end..].windows(7).any(|w| w == b"\r\n0\r\n\r\n") {
                        return got;
                    }
                } else {
                    let want = end + 4 + if bodiless { 0 } else { length };
                    if got.len() >= want {
                        got.truncate(want);
                        return got;
                    }
                }
            }
            match tokio::time::timeout(QUIET * 10, tls.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return got,
            }
        }
    };
    let got = tokio::time::timeout(EXCHANGE, read).await.expect("an answer in time");
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").map_or(got.len(), |end| end + 4);
    let head = blank_date(&String::from_utf8_lossy(&got[..end]));
    format!("{head}{}", got[end..].escape_ascii())
}

/// How a server treats `n` requests for one file (`/robots.txt`) on one connection, each
/// sent once the answer before it came: how many it answered, what it said (over HTTP/1.1
/// the last answer's head, date blanked; over HTTP/2 its GOAWAY frames, with how many
/// answers came before each), and how the connection ended after the last (`close_notify`,
/// `eof`, `reset`, or `open` if it stayed open for 3 s).
#[derive(Debug, PartialEq, Eq)]
pub struct OneAfterAnother {
    pub answers: usize,
    pub said: Vec<String>,
    pub how: &'static str,
}

/// Reads until `done` finds what it waits for in `got` (returning how much of it to drop),
/// or the connection ends (`Err` with how), or nothing comes for 3 s (`Err("open")`).
async fn read_until(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    got: &mut Vec<u8>,
    mut done: impl FnMut(&[u8]) -> Option<usize>,
) -> Result<(), &'static str> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(used) = done(got) {
            got.drain(..used);
            return Ok(());
        }
        match tokio::time::timeout(QUIET * 10, tls.read(&mut buf)).await {
            Err(_) => return Err("open"),
            Ok(Ok(0)) => return Err("close_notify"),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err("eof"),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err("reset"),
            Ok(Err(_)) => return Err("error"),
        }
    }
}

/// [`OneAfterAnother`] over HTTP/1.1.
pub async fn h1_one_after_another(addr: SocketAddr, sni: &str, n: usize) -> OneAfterAnother {
    let mut tls = connect(addr, sni, b"http/1.1").await;
    let (mut answers, mut head, mut got) = (0, String::new(), Vec::new());
    let mut how = None;
    for _ in 0..n {
        if tls.write_all(b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n").await.is_err() {
            how = Some("write failed");
            break;
        }
        let answer = read_until(&mut tls, &mut got, |got| {
            let end = got.windows(4).position(|w| w == b"\r\n\r\n")?;
            let text = String::from_utf8_lossy(&got[..end]);
            let whole = end + 4 + content_length(&text)?;
            (got.len() >= whole).then(|| {
                head = blank_date(&text);
                whole
            })
        });
        match answer.await {
            Ok(()) => answers += 1,
            Err(ended) => {
                how = Some(ended);
                break;
            }
        }
    }
    let how = match how {
        Some(how) => how,
        None => read_until(&mut tls, &mut got, |_| None).await.err().unwrap_or("open"),
    };
    OneAfterAnother { answers, said: vec![head], how }
}

/// An HTTP/2 frame whole at the start of `bytes`: its type, flags, stream, payload, and
/// length with its header.
fn h2_frame(bytes: &[u8]) -> Option<(u8, u8, u32, &[u8], usize)> {
    let head = bytes.get(..9)?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let payload = bytes.get(9..9 + len)?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream, payload, 9 + len))
}

/// [`OneAfterAnother`] over HTTP/2, a stream after another (the client's connection window
/// opened wide, so flow control never holds an answer).
pub async fn h2_one_after_another(addr: SocketAddr, sni: &str, n: usize) -> OneAfterAnother {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("a small frame").to_be_bytes();
        [&len[1..], &[kind, flags], &stream.to_be_bytes(), payload].concat()
    }
    let mut tls = connect(addr, sni, b"h2").await;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    hello.extend(frame(8, 0, 0, &((1u32 << 31) - 1 - 65_535).to_be_bytes()));
    tls.write_all(&hello).await.expect("preface");
    // GET https://x/robots.txt: HPACK's static table, literals never indexed.
    let mut get = vec![0x82, 0x87, 0x14, 11];
    get.extend_from_slice(b"/robots.txt");
    get.extend_from_slice(&[0x11, 1, b'x']);
    let (mut answers, mut said, mut got) = (0, Vec::new(), Vec::new());
    // A GOAWAY is noted, and its last stream returned.
    let mut read = |payload: &[u8], kind: u8, answers: usize| {
        if kind != 7 || payload.len() < 8 {
            return None;
        }
        let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        said.push(format!("GOAWAY last {last} code {code} after {answers} answers"));
        Some(last)
    };
    let (mut how, mut acks, mut last_allowed) = (None, Vec::new(), u32::MAX);
    for i in 0..n {
        let stream = 2 * u32::try_from(i).expect("a stream id") + 1;
        if stream > last_allowed {
            break;
        }
        let ask = [std::mem::take(&mut acks), frame(1, 5, stream, &get)].concat();
        if tls.write_all(&ask).await.is_err() {
            how = Some("write failed");
            break;
        }
        // Each read takes the whole frames that came (up to the answer), once.
        let mut answered = false;
        let ended = loop {
            let frames = read_until(&mut tls, &mut got, |got| {
                let mut at = 0;
                while let Some((kind, flags, id, payload, len)) = h2_frame(&got[at..]) {
                    at += len;
                    if kind == 4 && flags & 1 == 0 {
                        acks.extend(frame(4, 1, 0, &[]));
                    }
                    if let Some(last) = read(payload, kind, answers) {
                        last_allowed = last_allowed.min(last);
                    }
                    answered = matches!(kind, 0 | 1) && id == stream && flags & 1 == 1;
                    if answered {
                        break;
                    }
                }
                (at > 0).then_some(at)
            });
            match frames.await {
                Err(ended) => break Some(ended),
                Ok(()) if answered || stream > last_allowed => break None,
                Ok(()) => {}
            }
        };
        match ended {
            Some(ended) => {
                how = Some(ended);
                break;
            }
            None if answered => answers += 1,
            None => break,
        }
    }
    let how = match how {
        Some(how) => how,
        None => {
            let end = read_until(&mut tls, &mut got, |_| None).await.err().unwrap_or("open");
            let mut at = 0;
            while let Some((kind, _, _, payload, len)) = h2_frame(&got[at..]) {
                at += len;
                read(payload, kind, answers);
            }
            end
        }
    };
    OneAfterAnother { answers, said, how }
}

/// nginx from Debian's package, serving a directory over TLS with Debian's default
/// configuration: its `http` settings and default site, with `listen ssl http2` added.
/// Killed when dropped.
pub struct Nginx {
    child: std::process::Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Where Debian installs nginx.
const NGINX: &str = "/usr/sbin/nginx";

impl Nginx {
    /// Whether nginx is installed.
    pub fn installed() -> bool {
        Path::new(NGINX).exists()
    }

    /// Starts nginx serving `root` with the certificate and key (PEM files).
    pub async fn start(root: &Path, cert: &Path, key: &Path) -> Nginx {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let d = dir.path().display();
        let config = format!(
            "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 768; }}\n\
             http {{\n\tsendfile on;\n\ttcp_nopush on;\n\ttypes_hash_max_size 2048;\n\
             \tinclude /etc/nginx/mime.types;\n\tdefault_type application/octet-stream;\n\
             \tssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;\n\tssl_prefer_server_ciphers on;\n\
             \taccess_log off;\n\tgzip on;\n\
             \tclient_body_temp_path {d}/body;\n\tproxy_temp_path {d}/proxy;\n\
             \tfastcgi_temp_path {d}/fastcgi;\n\tuwsgi_temp_path {d}/uwsgi;\n\
             \tscgi_temp_path {d}/scgi;\n\
             \tserver {{\n\t\tlisten {addr} ssl http2 default_server;\n\
             \t\tssl_certificate {cert};\n\t\tssl_certificate_key {key};\n\
             \t\troot {root};\n\t\tindex index.html index.htm index.nginx-debian.html;\n\
             \t\tserver_name _;\n\t\tlocation / {{\n\t\t\ttry_files $uri $uri/ =404;\n\t\t}}\n\
             \t}}\n}}\n",
            cert = cert.display(),
            key = key.display(),
            root = root.display(),
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).expect("nginx.conf");
        let child = std::process::Command::new(NGINX)
            .arg("-c")
            .arg(&config_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let started = async {
            while TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(EXCHANGE, started).await.expect("nginx listening in time");
        Nginx { child, addr, _dir: dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the website's files (crates/postern-server/src/site) to `dir`, each modified at
/// `mtime` (seconds since the epoch), as a static site on nginx would hold them.
pub fn site_copy(dir: &Path, mtime: u64) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../postern-server/src/site");
    for entry in std::fs::read_dir(&source).expect("the site's files") {
        let entry = entry.expect("a site file");
        let target = dir.join(entry.file_name());
        std::fs::copy(entry.path(), &target).expect("copy");
        let file = std::fs::File::options().write(true).open(&target).expect("open");
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(mtime)).expect("mtime");
    }
    dir.to_owned()
}

#[cfg(test)]
mod tests {
    use super::read_server_flight;

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes();
        [&[kind, 3, 3, len[0], len[1]][..], body].concat()
    }

    #[test]
    fn a_tls12_ticket_is_read_before_change_cipher_spec_only() {
        let flight = record(22, &[14, 0, 0, 0]); // ServerHelloDone
        let ticket = record(22, &[4, 0, 0, 10, 0, 0, 0x1c, 0x20, 0, 0]);
        let ccs = record(20, &[1]);
        // An encrypted Finished whose ciphertext happens to start with a 4.
        let finished = record(22, &[4, 0x8e, 0x7c, 0x11, 0xdc, 0x55, 0x01, 0x02, 0x03]);

        let with_ticket = [&flight[..], &ticket, &ccs, &finished].concat();
        let print = read_server_flight(&with_ticket, flight.len());
        assert_eq!(print.ticket_lifetime, Some(7200));

        let without = [&flight[..], &ccs, &finished].concat();
        assert_eq!(read_server_flight(&without, flight.len()).ticket_lifetime, None);
    }
}
