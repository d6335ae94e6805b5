//! TLS and HTTP/2 that look like a browser's.
//!
//! A censor scores the ClientHello: a default rustls or Go hello is a fingerprint of its own
//! (design review, finding 5). The client therefore writes its ClientHello with BoringSSL
//! (`btls`), configured to match a current browser's JA4 exactly, and speaks HTTP/2 with that
//! browser's SETTINGS, window update and pseudo-header order (`http2`, a fork of h2 that can).
//! The WebSocket then runs over an HTTP/2 extended CONNECT stream (RFC 8441), as a browser's
//! does; a server that answers ALPN `http/1.1` gets the HTTP/1.1 upgrade instead.
//!
//! Profiles are matched against the browsers the censor lab captures (Debian's Firefox ESR and
//! Chromium; `postern-lab ja4`). Only Firefox ESR 153 can be matched with the BoringSSL `btls`
//! 0.5.6 carries: Chromium 156 offers ML-DSA signature algorithms and a GREASE signature
//! algorithm that this BoringSSL cannot send, so a "Chrome" profile here would be a
//! fingerprint no browser has. `docs/circumvention.md` says so.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use btls::ssl::{
    CertificateCompressionAlgorithm, CertificateCompressor, ExtensionType, SslAlert, SslConnector,
    SslMethod, SslSignatureAlgorithm, SslVerifyError, SslVerifyMode, SslVersion,
};
use bytes::Bytes;
use http2::frame::{PseudoId, PseudoOrder, SettingId, SettingsOrder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::{Endpoint, NetError};

/// A browser whose ClientHello and HTTP/2 preface a connection copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Profile {
    /// Firefox ESR 153 (Debian's `firefox-esr`): JA4 `t13d1617h2_86a278354501_3cbfd9057e0d`.
    FirefoxEsr153,
}

impl Profile {
    /// Every profile, for rotation.
    pub const ALL: &'static [Profile] = &[Profile::FirefoxEsr153];

    /// The profile for a door, chosen by a hash of its name so that one door always shows the
    /// same browser (a browser does not change its fingerprint between visits) and different
    /// doors may show different ones.
    pub fn for_name(name: &str) -> Profile {
        let sum = name.bytes().fold(0usize, |acc, b| acc.wrapping_mul(31).wrapping_add(b.into()));
        Self::ALL[sum % Self::ALL.len()]
    }

    fn connector(self) -> Result<&'static SslConnector, NetError> {
        static FIREFOX: OnceLock<Result<SslConnector, String>> = OnceLock::new();
        let cell = match self {
            Profile::FirefoxEsr153 => &FIREFOX,
        };
        cell.get_or_init(|| firefox().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| NetError::Connect(format!("TLS set-up: {e}")))
    }

    fn http2(self) -> http2::client::Builder {
        let mut builder = http2::client::Builder::new();
        match self {
            Profile::FirefoxEsr153 => {
                // SETTINGS 1:65536;2:0;4:131072;5:16384, WINDOW_UPDATE 12517377, pseudo-headers
                // m,p,a,s.
                builder
                    .header_table_size(65_536)
                    .enable_push(false)
                    .initial_window_size(131_072)
                    .max_frame_size(16_384)
                    .initial_connection_window_size(12_517_377 + 65_535)
                    .settings_order(
                        SettingsOrder::builder()
                            .push(SettingId::HeaderTableSize)
                            .push(SettingId::EnablePush)
                            .push(SettingId::InitialWindowSize)
                            .push(SettingId::MaxFrameSize)
                            .build(),
                    )
                    .headers_pseudo_order(
                        PseudoOrder::builder()
                            .push(PseudoId::Method)
                            .push(PseudoId::Path)
                            .push(PseudoId::Authority)
                            .push(PseudoId::Scheme)
                            .push(PseudoId::Protocol)
                            .build(),
                    );
            }
        }
        builder
    }
}

/// Firefox ESR 153's ClientHello: its 16 cipher suites, its 17 extensions in its order, its
/// signature algorithms, groups, record size limit, delegated credentials and certificate
/// compression algorithms, no GREASE, an ECH GREASE extension.
fn firefox() -> Result<SslConnector, btls::error::ErrorStack> {
    let mut b = SslConnector::bare_builder(SslMethod::tls())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_grease_enabled(false);
    b.set_preserve_tls13_cipher_list(true);
    b.set_cipher_list(
        "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:\
         ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
         ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:\
         ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
         ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:\
         AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA:AES256-SHA",
    )?;
    // The X25519MLKEM768 key share (1,216 bytes) makes the ClientHello two segments on a
    // 1,500-byte link, a packet of the censor's budget; Postern's servers do not take it
    // (rustls with ring). It stays: Firefox sends it, and without it the ClientHello (its ECH
    // GREASE is 144–240 random bytes) would sometimes fall under 512 bytes, where BoringSSL
    // adds a padding extension, a JA4 no browser has.
    b.set_curves_list("X25519MLKEM768:X25519:P-256:P-384:P-521")?;
    b.set_verify_algorithm_prefs(&[
        SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256,
        SslSignatureAlgorithm::ECDSA_SECP384R1_SHA384,
        SslSignatureAlgorithm::ECDSA_SECP521R1_SHA512,
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256,
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA384,
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA512,
        SslSignatureAlgorithm::RSA_PKCS1_SHA256,
        SslSignatureAlgorithm::RSA_PKCS1_SHA384,
        SslSignatureAlgorithm::RSA_PKCS1_SHA512,
        SslSignatureAlgorithm::ECDSA_SHA1,
        SslSignatureAlgorithm::RSA_PKCS1_SHA1,
    ])?;
    b.set_delegated_credentials(
        "ecdsa_secp256r1_sha256:ecdsa_secp384r1_sha384:ecdsa_secp521r1_sha512:ecdsa_sha1",
    )?;
    b.set_record_size_limit(0x4001);
    b.enable_ocsp_stapling();
    b.enable_signed_cert_timestamps();
    b.add_certificate_compression_algorithm(Zlib)?;
    b.add_certificate_compression_algorithm(Brotli)?;
    b.add_certificate_compression_algorithm(Zstd)?;
    b.set_alpn_protos(b"\x02h2\x08http/1.1")?;
    b.set_extension_permutation(&[
        ExtensionType::SERVER_NAME,
        ExtensionType::EXTENDED_MASTER_SECRET,
        ExtensionType::RENEGOTIATE,
        ExtensionType::SUPPORTED_GROUPS,
        ExtensionType::EC_POINT_FORMATS,
        ExtensionType::SESSION_TICKET,
        ExtensionType::APPLICATION_LAYER_PROTOCOL_NEGOTIATION,
        ExtensionType::STATUS_REQUEST,
        ExtensionType::DELEGATED_CREDENTIAL,
        ExtensionType::CERTIFICATE_TIMESTAMP,
        ExtensionType::KEY_SHARE,
        ExtensionType::SUPPORTED_VERSIONS,
        ExtensionType::SIGNATURE_ALGORITHMS,
        ExtensionType::PSK_KEY_EXCHANGE_MODES,
        ExtensionType::RECORD_SIZE_LIMIT,
        ExtensionType::CERT_COMPRESSION,
        ExtensionType::ENCRYPTED_CLIENT_HELLO,
    ])?;
    Ok(b.build())
}

macro_rules! decompressor {
    ($name:ident, $algorithm:ident, |$input:ident| $decoder:expr) => {
        struct $name;
        impl CertificateCompressor for $name {
            const ALGORITHM: CertificateCompressionAlgorithm =
                CertificateCompressionAlgorithm::$algorithm;
            const CAN_COMPRESS: bool = false;
            const CAN_DECOMPRESS: bool = true;
            fn decompress<W: io::Write>(&self, $input: &[u8], output: &mut W) -> io::Result<()> {
                // A certificate chain is a few kilobytes; refuse a decompression bomb.
                let mut limited = io::Read::take($decoder, MAX_CERTIFICATES as u64);
                io::copy(&mut limited, output).map(|_| ())
            }
        }
    };
}

/// Most bytes a decompressed certificate message may have.
const MAX_CERTIFICATES: usize = 1 << 20;

decompressor!(Zlib, ZLIB, |input| flate2::read::ZlibDecoder::new(input));
decompressor!(Brotli, BROTLI, |input| brotli_decompressor::Decompressor::new(input, 4096));
decompressor!(Zstd, ZSTD, |input| ruzstd::decoding::StreamingDecoder::new(input)
    .map_err(io::Error::other)?);

/// TLS to `endpoint` over `tcp` with `profile`'s ClientHello, accepting only the endpoint's
/// pinned keys. What TLS writes after its ClientHello (its Finished) is held in `tcp`.
pub(crate) async fn tls(endpoint: &Endpoint, tcp: Tcp, profile: Profile) -> Result<Tls, NetError> {
    let connect_err = |e: &dyn std::fmt::Display| NetError::Connect(e.to_string());
    let mut config = profile.connector()?.configure().map_err(|e| connect_err(&e))?;
    // The pin is the check; there is no certificate authority.
    config.set_verify_hostname(false);
    let pins = endpoint.pins.clone();
    config.set_custom_verify_callback(SslVerifyMode::PEER, move |ssl| {
        let pin = ssl
            .peer_certificate()
            .and_then(|cert| cert.to_der().ok())
            .and_then(|der| crate::pin::spki_pin(&der.into()));
        match pin {
            Some(pin) if pins.contains(&pin) => Ok(()),
            _ => Err(SslVerifyError::Invalid(SslAlert::BAD_CERTIFICATE)),
        }
    });
    config.set_enable_ech_grease(true);
    let ssl = config.into_ssl(&endpoint.tls_name).map_err(|e| connect_err(&e))?;
    let mut stream = tokio_btls::SslStream::new(ssl, tcp).map_err(|e| connect_err(&e))?;
    Pin::new(&mut stream).connect().await.map_err(|e| connect_err(&e))?;
    Ok(stream)
}

/// The client's TLS stream.
pub type Tls = tokio_btls::SslStream<Tcp>;

/// The client's TCP stream. During set-up it holds what is written after the first flush (the
/// ClientHello) until [`Hold::release`]: a censor counting packets then sees TLS Finished, the
/// HTTP/2 preface, the request and the session's first message leave in one segment, rather
/// than a segment for each.
#[derive(Debug)]
pub struct Tcp {
    inner: TcpStream,
    held: Held,
    /// Hold after the next flush.
    armed: bool,
    hold: Hold,
}

/// Whether a [`Tcp`] holds its writes; shared with whoever releases them.
#[derive(Debug, Clone, Default)]
pub struct Hold(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Hold {
    fn holding(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set(&self, hold: bool) {
        self.0.store(hold, std::sync::atomic::Ordering::Release);
    }

    /// Sends what is held at the stream's next flush, and stops holding.
    pub fn release(&self) {
        self.set(false);
    }
}

/// Bytes a connection's set-up holds back so that they leave in one segment with what
/// follows: the client's [`Tcp`] and the server's write coalescing keep them here.
#[derive(Debug, Default)]
pub struct Held(Vec<u8>);

impl Held {
    /// Most bytes held: set-up writes a few hundred; past this they go out at once.
    pub const MAX: usize = 16 << 10;

    /// Whether more may be held.
    pub fn has_room(&self) -> bool {
        self.0.len() < Self::MAX
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Holds `bytes` after what is held.
    pub fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// Writes everything held to `out`, then frees the buffer (an idle connection keeps
    /// nothing).
    pub fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.0.is_empty() {
            let n = ready!(Pin::new(&mut *out).poll_write(cx, &self.0))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.0.drain(..n);
        }
        self.0 = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Writes what the socket takes without waiting: for a connection dropped while holding.
    pub fn send_now(&mut self, socket: &TcpStream) {
        if !self.0.is_empty() {
            let _ = socket.try_write(&self.0);
        }
    }
}

impl Tcp {
    /// Wraps a connected socket; it starts passing writes through and holds them from its
    /// first flush on.
    pub(crate) fn new(inner: TcpStream) -> (Tcp, Hold) {
        let hold = Hold::default();
        (Tcp { inner, held: Held::default(), armed: true, hold: hold.clone() }, hold)
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.hold.holding() && me.held.has_room() {
            me.held.push(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // Released (or past the cap): held bytes go first.
        ready!(me.held.poll_send(&mut me.inner, cx))?;
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.hold.holding() && me.held.has_room() {
            return Poll::Ready(Ok(()));
        }
        ready!(me.held.poll_send(&mut me.inner, cx))?;
        ready!(Pin::new(&mut me.inner).poll_flush(cx))?;
        if std::mem::take(&mut me.armed) {
            me.hold.set(true);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.hold.set(false);
        ready!(me.held.poll_send(&mut me.inner, cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

/// An HTTP/2 extended CONNECT stream carrying a WebSocket (RFC 8441), opened on a fresh HTTP/2
/// connection over `tls` with `profile`'s preface. Nothing is sent yet: TLS Finished, the
/// preface, the request and what the caller writes next wait in `tls`'s [`Tcp`] until the
/// caller releases them, and then leave together, as a browser's first request leaves with
/// its Finished. The request does not wait for the server's SETTINGS to allow extended
/// CONNECT (RFC 8441 asks it to): Postern's servers and relays always do, and waiting would
/// cost a round trip and three packets of the censor's budget. The server's answer is read
/// with the first bytes: anything but 200 is the website answering, an error of kind
/// `ConnectionRefused`.
pub(crate) async fn websocket_stream(
    tls: Tls,
    profile: Profile,
    authority: &str,
    cookie: &str,
) -> Result<H2Stream, NetError> {
    let connect_err = |e: &dyn std::fmt::Display| NetError::Connect(e.to_string());
    let (mut send, connection) =
        profile.http2().handshake::<_, Bytes>(tls).await.map_err(|e| connect_err(&e))?;
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{authority}/"))
        .extension(http2::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .header("cookie", cookie)
        .body(())
        .map_err(|e| connect_err(&e))?;
    let (response, stream) = send.send_request(request, false).map_err(|e| connect_err(&e))?;
    Ok(H2Stream {
        connection,
        _requests: send,
        send: stream,
        recv: Recv::Answer(response),
        buf: Bytes::new(),
    })
}

/// The read side of an [`H2Stream`]: the answer to come, then the body.
enum Recv {
    Answer(http2::client::ResponseFuture),
    Body(http2::RecvStream),
}

/// One HTTP/2 stream as a byte stream. It owns its connection and drives it when read or
/// written: one connection carries one stream, and nothing needs a task of its own.
pub struct H2Stream {
    connection: http2::client::Connection<Tls, Bytes>,
    /// Kept so the connection stays open.
    _requests: http2::client::SendRequest<Bytes>,
    send: http2::SendStream<Bytes>,
    recv: Recv,
    buf: Bytes,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream").finish_non_exhaustive()
    }
}

impl H2Stream {
    /// Moves the connection along: writes what is queued, reads what came. Its end is an
    /// error for the stream.
    fn drive(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match Pin::new(&mut self.connection).poll(cx) {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(())) => Err(io::ErrorKind::UnexpectedEof.into()),
            Poll::Ready(Err(e)) => Err(h2_io_error(e)),
        }
    }
}

fn h2_io_error(e: http2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        while me.buf.is_empty() {
            let driven = me.drive(cx);
            let body = match &mut me.recv {
                Recv::Answer(answer) => {
                    let answer = match Pin::new(answer).poll(cx) {
                        Poll::Ready(answer) => answer.map_err(h2_io_error)?,
                        Poll::Pending => {
                            return driven.map_or_else(|e| Poll::Ready(Err(e)), |()| Poll::Pending);
                        }
                    };
                    if answer.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("upgrade refused: {}", answer.status()),
                        )));
                    }
                    me.recv = Recv::Body(answer.into_body());
                    continue;
                }
                Recv::Body(body) => body,
            };
            match body.poll_data(cx) {
                Poll::Pending => {
                    return driven.map_or_else(|e| Poll::Ready(Err(e)), |()| Poll::Pending);
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Ok(data))) => {
                    // Give the window back as soon as the bytes are ours.
                    let _ = body.flow_control().release_capacity(data.len());
                    me.buf = data;
                }
                Poll::Ready(Some(Err(e))) if e.reason() == Some(http2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io_error(e))),
            }
        }
        let n = me.buf.len().min(out.remaining());
        let chunk = me.buf.split_to(n);
        out.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let me = self.get_mut();
        me.drive(cx)?;
        if let Poll::Ready(reset) = me.send.poll_reset(cx) {
            return Poll::Ready(Err(match reset {
                Ok(reason) => io::Error::new(io::ErrorKind::BrokenPipe, reason.to_string()),
                Err(e) => h2_io_error(e),
            }));
        }
        me.send.reserve_capacity(buf.len());
        loop {
            let capacity = me.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                me.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_io_error)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(me.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Polling the connection writes and flushes what is queued.
        Poll::Ready(self.get_mut().drive(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.send.send_data(Bytes::new(), true).map_err(h2_io_error)?;
        Poll::Ready(me.drive(cx))
    }
}

/// What a WebSocket runs on: an HTTP/2 stream, or the TLS stream itself after an HTTP/1.1
/// upgrade.
#[derive(Debug)]
pub enum Io {
    /// An extended CONNECT stream.
    Http2(Box<H2Stream>),
    /// TLS after an HTTP/1.1 upgrade.
    Http1(Tls),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Http2(s) => Pin::new(s).poll_read(cx, buf),
            Io::Http1(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Http2(s) => Pin::new(s).poll_write(cx, buf),
            Io::Http1(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Http2(s) => Pin::new(s).poll_flush(cx),
            Io::Http1(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Http2(s) => Pin::new(s).poll_shutdown(cx),
            Io::Http1(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use super::*;

    /// The ClientHello the client sends to `name`, as read by a listener that then hangs up.
    async fn client_hello(name: &str) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint {
            addrs: vec![listener.local_addr().unwrap().to_string()],
            tls_name: name.to_owned(),
            pins: vec![[0; 32]],
        };
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(&endpoint.addrs[0]).await.unwrap();
            let _ = tls(&endpoint, Tcp::new(tcp).0, Profile::FirefoxEsr153).await;
        });
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut header = [0u8; 5];
        socket.read_exact(&mut header).await.unwrap();
        let mut hello = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
        socket.read_exact(&mut hello).await.unwrap();
        drop(socket);
        client.await.unwrap();
        hello
    }

    /// (sorted ciphers, sorted extensions, signature algorithms, ALPN) of a ClientHello
    /// handshake message, GREASE left out: what JA4 hashes.
    fn ja4_parts(hello: &[u8]) -> (Vec<u16>, Vec<u16>, Vec<u16>, Vec<u8>) {
        let u16_at = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let grease = |v: u16| v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff;
        let mut i = 4 + 2 + 32;
        i += 1 + usize::from(hello[i]);
        let n = usize::from(u16_at(hello, i));
        let mut ciphers: Vec<u16> =
            (0..n / 2).map(|k| u16_at(hello, i + 2 + 2 * k)).filter(|c| !grease(*c)).collect();
        i += 2 + n;
        i += 1 + usize::from(hello[i]);
        let end = i + 2 + usize::from(u16_at(hello, i));
        i += 2;
        let (mut extensions, mut sigalgs, mut alpn) = (Vec::new(), Vec::new(), Vec::new());
        while i < end {
            let (kind, len) = (u16_at(hello, i), usize::from(u16_at(hello, i + 2)));
            let data = &hello[i + 4..i + 4 + len];
            if !grease(kind) {
                extensions.push(kind);
            }
            if kind == 0x000d {
                sigalgs = (1..data.len() / 2).map(|k| u16_at(data, 2 * k)).collect();
            }
            if kind == 0x0010 {
                alpn = data[2..].to_vec();
            }
            i += 4 + len;
        }
        ciphers.sort_unstable();
        extensions.sort_unstable();
        (ciphers, extensions, sigalgs, alpn)
    }

    #[tokio::test]
    async fn set_up_writes_after_the_first_flush_wait_for_release() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let (mut tcp, hold) = Tcp::new(tcp);
        let mut got = [0u8; 5];
        // The first flight goes out at its flush.
        tcp.write_all(b"hello").await.unwrap();
        tcp.flush().await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // What follows is held, flushes and all, until released.
        tcp.write_all(b"fin").await.unwrap();
        tcp.write_all(b"ished").await.unwrap();
        tcp.flush().await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), server.read(&mut got)).await;
        assert!(early.is_err(), "held bytes were sent: {early:?}");
        hold.release();
        tcp.flush().await.unwrap();
        let mut rest = [0u8; 8];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"finished");
        // Released, writes pass straight through.
        tcp.write_all(b"after").await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");
    }

    #[tokio::test]
    async fn held_bytes_past_the_cap_are_sent() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let (mut tcp, _hold) = Tcp::new(tcp);
        tcp.write_all(b"x").await.unwrap();
        tcp.flush().await.unwrap();
        let big = vec![7u8; Held::MAX + 100];
        tcp.write_all(&big).await.unwrap();
        tcp.write_all(b"!").await.unwrap();
        let mut got = vec![0u8; 1 + big.len() + 1];
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got))
            .await
            .expect("past the cap, held bytes go out without a release")
            .unwrap();
        assert_eq!(got.last(), Some(&b'!'));
    }

    #[tokio::test]
    async fn the_client_hello_is_firefox_esr_s_to_a_name_and_to_an_address() {
        // Debian's Firefox ESR 153 as the censor lab captures it (`postern-lab ja4 --browser
        // firefox`; the lab test `open_lets_the_direct_door_through` compares live).
        let ciphers = [
            0x002f, 0x0035, 0x009c, 0x009d, 0x1301, 0x1302, 0x1303, 0xc00a, 0xc013, 0xc014, 0xc02b,
            0xc02c, 0xc02f, 0xc030, 0xcca8, 0xcca9,
        ];
        let extensions = [
            0x0000, 0x0005, 0x000a, 0x000b, 0x000d, 0x0010, 0x0012, 0x0017, 0x001b, 0x001c, 0x0022,
            0x0023, 0x002b, 0x002d, 0x0033, 0xfe0d, 0xff01,
        ];
        let sigalgs = [
            0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0203, 0x0201,
        ];
        // The ECH GREASE extension has a random length: try it many times, so that a hello
        // short enough for BoringSSL's padding extension would show.
        for round in 0..16 {
            for name in ["fine.example", "10.0.2.66"] {
                let hello = client_hello(name).await;
                let (c, e, s, alpn) = ja4_parts(&hello);
                let want: Vec<u16> = extensions
                    .iter()
                    .copied()
                    .filter(|x| *x != 0x0000 || name == "fine.example")
                    .collect();
                assert_eq!(c, ciphers, "{name}, round {round}");
                assert_eq!(e, want, "{name}, round {round}");
                assert_eq!(s, sigalgs, "{name}, round {round}");
                assert_eq!(alpn, b"\x02h2\x08http/1.1", "{name}");
            }
        }
    }
}
