//! M11, the active prober: what a censor does to a server it suspects of being a proxy,
//! from the censor's own address range (10.0.9.1). A server passes if it behaves like an
//! ordinary website, the way Postern's relays must:
//!
//! 1. **Random bytes** (200, on a fresh connection): an ordinary TLS server answers with an
//!    alert or closes; a server that waits silently for more (a proxy reading its own
//!    handshake) is suspicious.
//! 2. **Replay** of the client's first flight (its ClientHello): an ordinary server answers
//!    with a handshake record.
//! 3. **A browser-like handshake with the observed server name**: it must complete with a
//!    certificate that names that server.
//! 4. **`GET /` over it**: it must answer HTTP; and if the national DNS gives another
//!    address for the name, that address's answer must be the same (status and body).
//!
//! Any deviation blocks the server's address (the daemon applies it).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::ServerName;
use serde::Serialize;

use crate::controls::{AnyCert, client_config};
use crate::dns::Zone;

/// The prober's source address, on the censor router.
pub const SOURCE: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 1);
const TIMEOUT: Duration = Duration::from_secs(2);

/// A server to probe.
#[derive(Debug, Clone)]
pub struct Request {
    /// The server.
    pub server: SocketAddrV4,
    /// The server name a client used.
    pub sni: Option<String>,
    /// The client's first flight, reassembled.
    pub first_flight: Vec<u8>,
}

/// What the prober found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The server.
    pub server: String,
    /// The name probed.
    pub sni: Option<String>,
    /// Random bytes were answered or the connection closed (not a silent wait).
    pub random_answered: bool,
    /// The replayed first flight got a handshake record back.
    pub replay_answered: bool,
    /// The handshake with the name completed and the certificate names it.
    pub certificate_matches: bool,
    /// `GET /` got an HTTP status.
    pub http_status: Option<u16>,
    /// The name's own address (by the national DNS) answered the same, when it is another.
    pub same_as_dns: Option<bool>,
    /// Whether it passed for an ordinary website.
    pub website: bool,
}

/// A connection from the prober's range: the router's routes toward the server networks
/// prefer [`SOURCE`] for what the router itself sends (see `topology`).
fn connect(server: SocketAddrV4) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(server), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Sends `bytes`; returns whether the server answered or closed within the timeout (rather
/// than waiting silently), and the first bytes it sent.
fn poke(server: SocketAddrV4, bytes: &[u8]) -> (bool, Vec<u8>) {
    let Ok(mut stream) = connect(server) else { return (false, Vec::new()) };
    if stream.write_all(bytes).is_err() {
        return (true, Vec::new());
    }
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(n) => (true, buf[..n].to_vec()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            (false, Vec::new())
        }
        Err(_) => (true, Vec::new()),
    }
}

fn names_in(cert: &[u8]) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else { return Vec::new() };
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// `GET /` with `sni` at `server` over TLS (HTTP/1.1): the certificate's names, the status
/// and the body.
fn fetch(server: SocketAddrV4, sni: &str) -> Result<(Vec<String>, u16, Vec<u8>)> {
    let capture = Arc::new(AnyCert::default());
    let config = client_config(capture.clone(), vec![b"http/1.1".to_vec()])?;
    let mut conn = rustls::ClientConnection::new(config, ServerName::try_from(sni.to_owned())?)?;
    let mut tcp = connect(server)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if response.len() < 64 * 1024 => response.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) if !response.is_empty() => break,
            Err(e) => return Err(e).context("no HTTP answer"),
        }
    }
    let cert = capture.seen();
    let text = String::from_utf8_lossy(&response);
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse().ok())
        .context("not HTTP")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.as_bytes().to_vec()).unwrap_or_default();
    Ok((names_in(&cert), status, body))
}

/// Probes one server.
pub fn probe(request: &Request, zone: &Zone) -> Finding {
    use rand::RngCore;
    let mut random = [0u8; 200];
    rand::thread_rng().fill_bytes(&mut random);
    let (random_answered, _) = poke(request.server, &random);
    let (_, replay) = poke(request.server, &request.first_flight);
    let replay_answered = replay.first() == Some(&0x16);
    let mut finding = Finding {
        server: request.server.to_string(),
        sni: request.sni.clone(),
        random_answered,
        replay_answered,
        certificate_matches: false,
        http_status: None,
        same_as_dns: None,
        website: false,
    };
    if let Some(sni) = &request.sni
        && let Ok((names, status, body)) = fetch(request.server, sni)
    {
        finding.certificate_matches = names.iter().any(|n| n == &sni.to_ascii_lowercase());
        finding.http_status = Some(status);
        if let Some(real) = zone.lookup(sni).filter(|a| *a != *request.server.ip()) {
            let reference = fetch(SocketAddrV4::new(real, request.server.port()), sni);
            finding.same_as_dns = Some(reference.is_ok_and(|(_, s, b)| s == status && b == body));
        }
    }
    finding.website = finding.random_answered
        && finding.replay_answered
        && finding.certificate_matches
        && finding.http_status.is_some()
        && finding.same_as_dns != Some(false);
    finding
}
