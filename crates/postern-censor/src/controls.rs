//! Programs the lab's tests run on either side of the censor: servers that print one ready
//! line and exit when their stdin closes, and clients that print one JSON outcome.
//!
//! - TLS: `tls_serve` answers `GET n\n` with `n` bytes; `tls_get` connects with a chosen
//!   server name (rustls' default ClientHello, optionally written in small TCP segments) and
//!   reports how far it got before its timeout.
//! - UDP: `udp_echo` / `udp_send` with a WireGuard handshake initiation or random bytes.
//! - TCP: `tcp_echo` / `tcp_send` with random bytes (the fully-encrypted shape) or an HTTP
//!   request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::RngCore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;

/// Exits the process when stdin closes (the lab closes it to stop a server).
pub fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
}

fn ready(what: &str) -> Result<()> {
    let mut out = std::io::stdout();
    writeln!(out, "{what}")?;
    out.flush()?;
    Ok(())
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves TLS on `addr` with a self-signed certificate for `names`: a small website
/// (`GET / HTTP/1.1` gets a page naming the first name) that also answers the lab's own
/// `GET n` with n bytes. As a `proxy` it plays a naive TLS proxy instead: its certificate
/// names `proxy.invalid` whatever the client asked for, and an HTTP request gets no answer
/// (it waits for the tunnel's own protocol).
pub fn tls_serve(
    addr: SocketAddr,
    names: Vec<String>,
    proxy: bool,
    page_bytes: usize,
    forward: Option<SocketAddr>,
) -> Result<()> {
    let mut page = format!("lab site {}\n", names.first().map_or("", String::as_str));
    while page.len() < page_bytes {
        page.push_str("All work and no play makes a censor dull.\n");
    }
    let names = if proxy { vec!["proxy.invalid".to_owned()] } else { names };
    let cert = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    let config = Arc::new(config);
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    exit_when_stdin_closes();
    ready("listening")?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let config = config.clone();
        let page = page.clone();
        std::thread::spawn(move || -> Result<()> {
            let conn = rustls::ServerConnection::new(config)?;
            let mut tls = rustls::StreamOwned::new(conn, stream);
            if let Some(target) = forward {
                return pipe(&mut tls, target);
            }
            let mut line = String::new();
            BufReader::new(&mut tls).read_line(&mut line)?;
            if line.starts_with("GET /") && line.contains("HTTP/1.") {
                if proxy {
                    let _ = tls.read_to_end(&mut Vec::new());
                    return Ok(());
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    page.len()
                );
                tls.write_all(head.as_bytes())?;
                tls.write_all(page.as_bytes())?;
                tls.conn.send_close_notify();
                tls.flush()?;
                return Ok(());
            }
            let n: usize = line.trim().strip_prefix("GET ").unwrap_or("0").parse().unwrap_or(0);
            let chunk = [b'x'; 4096];
            let mut left = n.min(64 << 20);
            while left > 0 {
                let k = left.min(chunk.len());
                tls.write_all(&chunk[..k])?;
                left -= k;
            }
            tls.conn.send_close_notify();
            tls.flush()?;
            Ok(())
        });
    }
    Ok(())
}

/// Accepts any server certificate (the lab's are self-signed) and keeps the end-entity one
/// for whoever wants to look at its names.
#[derive(Debug, Default)]
pub(crate) struct AnyCert(std::sync::Mutex<Option<Vec<u8>>>);

impl AnyCert {
    /// The certificate the server presented, DER.
    pub(crate) fn seen(&self) -> Vec<u8> {
        self.0.lock().ok().and_then(|c| c.clone()).unwrap_or_default()
    }
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(end_entity.to_vec());
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A client that accepts the lab's self-signed certificates (keeping the one it saw in
/// `verifier`), offering `alpn`.
pub(crate) fn client_config(
    verifier: Arc<AnyCert>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    c.alpn_protocols = alpn;
    Ok(Arc::new(c))
}

/// Asks a lab server for `bytes` bytes over `tls` and counts what arrives into `out`.
fn get(tls: &mut (impl Read + Write), bytes: u64, out: &mut Outcome) -> Result<()> {
    tls.write_all(format!("GET {bytes}\n").as_bytes())?;
    let mut buf = [0u8; 16 * 1024];
    while out.received < bytes {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.received += n as u64;
    }
    out.complete = out.received >= bytes;
    Ok(())
}

fn quiet(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// A TLS-in-TLS proxy's core: what arrives inside the outer TLS goes to `target` over TCP,
/// and back.
fn pipe(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    target: SocketAddr,
) -> Result<()> {
    let mut inner = TcpStream::connect(target)?;
    let tick = Some(Duration::from_millis(5));
    tls.sock.set_read_timeout(tick)?;
    inner.set_read_timeout(tick)?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => inner.write_all(&buf[..n])?,
            Err(e) if quiet(&e) => {}
            Err(e) => return Err(e.into()),
        }
        match inner.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => tls.write_all(&buf[..n])?,
            Err(e) if quiet(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Fetches `bytes` bytes from a lab server through a TLS-in-TLS proxy at `addr`: an outer
/// TLS connection named `outer_sni`, and inside it a TLS connection named `inner_sni` whose
/// ClientHello is padded (with ALPN names) to a browser's size.
pub fn tls_in_tls(
    addr: SocketAddr,
    outer_sni: &str,
    inner_sni: &str,
    bytes: u64,
    timeout: Duration,
) -> Outcome {
    let mut out = Outcome::default();
    let result = (|| -> Result<()> {
        let mut tcp = TcpStream::connect_timeout(&addr, timeout)?;
        out.connected = true;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_nodelay(true)?;
        let outer_name = ServerName::try_from(outer_sni.to_owned())?;
        let mut outer = rustls::ClientConnection::new(
            client_config(Arc::default(), vec![b"h2".to_vec()])?,
            outer_name,
        )?;
        while outer.is_handshaking() {
            outer.complete_io(&mut tcp)?;
        }
        let mut padding: Vec<Vec<u8>> = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        padding.extend((0..12).map(|i| format!("x-lab-padding-{i:02}").into_bytes()));
        let inner_name = ServerName::try_from(inner_sni.to_owned())?;
        let mut inner =
            rustls::ClientConnection::new(client_config(Arc::default(), padding)?, inner_name)?;
        let mut tunnel = rustls::Stream::new(&mut outer, &mut tcp);
        while inner.is_handshaking() {
            inner.complete_io(&mut tunnel)?;
        }
        out.handshake = true;
        let mut tls = rustls::Stream::new(&mut inner, &mut tunnel);
        get(&mut tls, bytes, &mut out)
    })();
    out.error = result.err().map(|e| e.to_string());
    out
}

/// A TCP stream whose writes go out in pieces of at most `size` bytes, each its own segment.
struct Split {
    inner: TcpStream,
    size: usize,
}

impl Read for Split {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Split {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.size);
        self.inner.write_all(&buf[..n])?;
        std::thread::sleep(Duration::from_millis(2));
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// How far a client got.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    /// The TCP connection (or UDP send) succeeded.
    pub connected: bool,
    /// The TLS handshake completed (TLS only).
    pub handshake: bool,
    /// Bytes received.
    pub received: u64,
    /// Everything asked for arrived.
    pub complete: bool,
    /// What stopped it, if anything.
    pub error: Option<String>,
    /// How long it took, in milliseconds.
    pub elapsed_ms: u64,
}

/// How `tls_get` shapes its ClientHello.
#[derive(Debug, Clone, Default)]
pub struct HelloShape {
    /// Write it in TCP segments of this many bytes.
    pub split: Option<usize>,
    /// ALPN protocols to offer (none: rustls' default, which the lab's profiles list).
    pub alpn: Vec<String>,
}

/// Connects to `addr` with server name `sni`, asks for `bytes` bytes and reads them, each
/// step bounded by `timeout`.
pub fn tls_get(
    addr: SocketAddr,
    sni: &str,
    bytes: u64,
    timeout: Duration,
    shape: &HelloShape,
) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome::default();
    let result = (|| -> Result<()> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        out.connected = true;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        tcp.set_nodelay(true)?;
        let config = client_config(
            Arc::default(),
            shape.alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
        )?;
        let name = ServerName::try_from(sni.to_owned())?;
        let mut conn = rustls::ClientConnection::new(config, name)?;
        let mut io = Split { inner: tcp, size: shape.split.unwrap_or(usize::MAX) };
        while conn.is_handshaking() {
            conn.complete_io(&mut io)?;
        }
        out.handshake = true;
        io.size = usize::MAX;
        let mut tls = rustls::Stream::new(&mut conn, &mut io);
        get(&mut tls, bytes, &mut out)
    })();
    out.error = result.err().map(|e| e.to_string());
    out.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    out
}

/// Loads `url` in a headless browser (Debian's `chromium` or `firefox-esr`), killed after
/// `timeout`. Chromium prints the page, so `complete` means the page arrived; Firefox is run
/// only for its ClientHello (it refuses the lab's self-signed certificates).
pub fn browse(browser: &str, url: &str, timeout: Duration) -> Outcome {
    // A browser that quits at once with an empty page crashed (it happens under load); that
    // is not the network's answer, so it gets one more try. A blocked page is a browser
    // still waiting at the timeout, or an error page: never empty and quick.
    let started = Instant::now();
    let mut out = browse_once(browser, url, timeout);
    if out.error.is_none() && out.received == 0 && out.elapsed_ms < 5_000 {
        out = browse_once(browser, url, timeout.saturating_sub(started.elapsed()));
    }
    out
}

fn browse_once(browser: &str, url: &str, timeout: Duration) -> Outcome {
    let mut out = Outcome::default();
    let started = Instant::now();
    let result = (|| -> Result<()> {
        let dir =
            std::env::temp_dir().join(format!("postern-lab-browser-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let profile = dir.display().to_string();
        let mut cmd = std::process::Command::new(browser);
        match browser {
            "chromium" => cmd.args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--ignore-certificate-errors",
                &format!("--user-data-dir={profile}"),
                "--dump-dom",
                url,
            ]),
            _ => cmd.env("HOME", &dir).args([
                "--headless",
                "--no-remote",
                "--profile",
                &profile,
                url,
            ]),
        };
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("start {browser}"))?;
        let mut stdout = child.stdout.take().context("browser stdout")?;
        let reader = std::thread::spawn(move || {
            let mut page = Vec::new();
            let _ = stdout.read_to_end(&mut page);
            page
        });
        while child.try_wait()?.is_none() && started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let page = reader.join().unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        out.connected = true;
        out.received = page.len() as u64;
        out.complete = String::from_utf8_lossy(&page).contains("lab site");
        Ok(())
    })();
    out.error = result.err().map(|e| e.to_string());
    out.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    out
}

/// What `udp_send` and `tcp_send` send first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Payload {
    /// A WireGuard handshake initiation: type 1, 148 bytes.
    Wireguard,
    /// 300 random bytes, the first one unprintable.
    Random,
    /// An HTTP/1.1 request.
    Http,
    /// An OpenVPN client hard reset (with the TCP length prefix over TCP).
    Openvpn,
    /// A QUIC version 1 Initial, padded to 1,200 bytes.
    Quic,
}

fn payload(kind: Payload) -> Vec<u8> {
    let mut rng = rand::thread_rng();
    match kind {
        Payload::Wireguard => {
            let mut p = vec![0u8; 148];
            rng.fill_bytes(&mut p[4..]);
            p[0] = 1;
            p
        }
        Payload::Random => {
            let mut p = vec![0u8; 300];
            rng.fill_bytes(&mut p);
            // Never six printable bytes first (the fully-encrypted rule's exemption, one
            // random payload in about 385): a test of that rule must not depend on luck.
            p[0] |= 0x80;
            p
        }
        Payload::Http => b"GET / HTTP/1.1\r\nHost: fine.example\r\n\r\n".to_vec(),
        Payload::Openvpn => {
            let mut p = vec![0x38];
            p.extend_from_slice(&rng.next_u64().to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0, 0]);
            p
        }
        Payload::Quic => {
            let mut p = vec![0xc3, 0, 0, 0, 1, 8];
            p.resize(1200, 0);
            rng.fill_bytes(&mut p[6..]);
            p
        }
    }
}

/// `payload` framed for TCP: OpenVPN over TCP carries a two-byte length first.
fn tcp_payload(kind: Payload) -> Vec<u8> {
    let p = payload(kind);
    if kind != Payload::Openvpn {
        return p;
    }
    let mut framed = (p.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&p);
    framed
}

/// Echoes UDP datagrams on `addr`.
pub fn udp_echo(addr: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind(addr)?;
    exit_when_stdin_closes();
    ready("listening")?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        socket.send_to(&buf[..n], from)?;
    }
}

/// Sends one datagram of `kind` and waits for its echo.
pub fn udp_send(addr: SocketAddr, kind: Payload, timeout: Duration) -> Outcome {
    let mut out = Outcome::default();
    let result = (|| -> Result<()> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(timeout))?;
        let sent = payload(kind);
        socket.send_to(&sent, addr)?;
        out.connected = true;
        let mut buf = [0u8; 2048];
        let (n, _) = socket.recv_from(&mut buf)?;
        out.received = n as u64;
        out.complete = buf[..n] == sent[..];
        Ok(())
    })();
    out.error = result.err().map(|e| e.to_string());
    out
}

/// Echoes TCP streams on `addr`.
pub fn tcp_echo(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    exit_when_stdin_closes();
    ready("listening")?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Connects, sends a first packet of `kind` and waits for its echo.
pub fn tcp_send(addr: SocketAddr, kind: Payload, timeout: Duration) -> Outcome {
    let mut out = Outcome::default();
    let result = (|| -> Result<()> {
        let mut tcp = TcpStream::connect_timeout(&addr, timeout)?;
        out.connected = true;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_nodelay(true)?;
        let sent = tcp_payload(kind);
        tcp.write_all(&sent)?;
        let mut got = vec![0u8; sent.len()];
        let started = Instant::now();
        let mut have = 0;
        while have < got.len() && started.elapsed() < timeout {
            let n = tcp.read(&mut got[have..])?;
            if n == 0 {
                break;
            }
            have += n;
        }
        out.received = have as u64;
        out.complete = have == sent.len() && got == sent;
        Ok(())
    })();
    out.error = result.err().map(|e| e.to_string());
    out
}

/// Starts Debian's `obfs4proxy` in Tor's pluggable-transport managed mode with `role`'s
/// settings, and returns it, its state directory and what it printed up to `done`. The rest
/// of its output is read away (it dies of a closed stdout); it exits when its stdin closes.
fn obfs4proxy(
    role: &[(&str, String)],
    done: &str,
) -> Result<(Child, std::path::PathBuf, Vec<String>)> {
    let state =
        std::env::temp_dir().join(format!("postern-lab-obfs4-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&state)?;
    let mut child = std::process::Command::new("obfs4proxy")
        .env("TOR_PT_MANAGED_TRANSPORT_VER", "1")
        .env("TOR_PT_STATE_LOCATION", &state)
        .env("TOR_PT_EXIT_ON_STDIN_CLOSE", "1")
        .envs(role.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start obfs4proxy (Debian package obfs4proxy)")?;
    let stdout = child.stdout.take().context("obfs4proxy stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut said = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        if line == done {
            break;
        }
        said.push(line);
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, state, said))
}

/// Runs an obfs4 bridge on `addr` in front of `orport` (Tor's pluggable-transport managed
/// mode, without Tor), and prints the bridge's `cert=…` as its ready line. Exits when stdin
/// closes (and the bridge with it).
pub fn obfs4_serve(addr: SocketAddr, orport: SocketAddr) -> Result<()> {
    let role = [
        ("TOR_PT_SERVER_TRANSPORTS", "obfs4".to_owned()),
        ("TOR_PT_SERVER_BINDADDR", format!("obfs4-{addr}")),
        ("TOR_PT_ORPORT", orport.to_string()),
    ];
    let (mut child, state, said) = obfs4proxy(&role, "SMETHODS DONE")?;
    let cert = said
        .iter()
        .filter_map(|l| l.strip_prefix("SMETHOD obfs4 ").and_then(|l| l.split_once(" ARGS:")))
        .find_map(|(_, args)| args.split(',').find_map(|a| a.strip_prefix("cert=")))
        .context("obfs4proxy gave no cert")?
        .to_owned();
    exit_when_stdin_closes();
    ready(&format!("cert={cert}"))?;
    // `wait` would close the bridge's stdin, which tells it to exit: hold it open.
    let _stdin = child.stdin.take();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

/// Connects to an obfs4 bridge through `obfs4proxy` in client mode (over its SOCKS5 port),
/// sends a line and waits for its echo from the bridge's backend.
pub fn obfs4_send(bridge: SocketAddr, cert: &str, timeout: Duration) -> Outcome {
    let mut out = Outcome::default();
    let result = (|| -> Result<()> {
        let role = [("TOR_PT_CLIENT_TRANSPORTS", "obfs4".to_owned())];
        let (mut child, state, said) = obfs4proxy(&role, "CMETHODS DONE")?;
        let socks = said.iter().find_map(|l| l.strip_prefix("CMETHOD obfs4 socks5 "));
        let result = (|| -> Result<()> {
            let socks: SocketAddr =
                socks.context("obfs4proxy gave no SOCKS port")?.trim().parse()?;
            let mut s = TcpStream::connect_timeout(&socks, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            // SOCKS5 with the transport's arguments as username (pt-spec: the password is
            // a NUL when the arguments fit in the username).
            let args = format!("cert={cert};iat-mode=0");
            s.write_all(&[5, 1, 2])?;
            let mut reply = [0u8; 2];
            s.read_exact(&mut reply)?;
            let mut auth = vec![1, u8::try_from(args.len())?];
            auth.extend_from_slice(args.as_bytes());
            auth.extend_from_slice(&[1, 0]);
            s.write_all(&auth)?;
            s.read_exact(&mut reply)?;
            let SocketAddr::V4(v4) = bridge else { anyhow::bail!("an IPv4 bridge") };
            let mut connect = vec![5, 1, 0, 1];
            connect.extend_from_slice(&v4.ip().octets());
            connect.extend_from_slice(&v4.port().to_be_bytes());
            s.write_all(&connect)?;
            let mut answer = [0u8; 10];
            s.read_exact(&mut answer)?;
            anyhow::ensure!(
                answer[1] == 0,
                "the bridge could not be reached (SOCKS {})",
                answer[1]
            );
            out.connected = true;
            let line = b"hello through obfs4\n";
            s.write_all(line)?;
            let mut got = vec![0u8; line.len()];
            s.read_exact(&mut got)?;
            out.received = got.len() as u64;
            out.complete = got == line;
            Ok(())
        })();
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&state);
        result
    })();
    out.error = result.err().map(|e| e.to_string());
    out
}
