//! The TLS ClientHello as a censor sees it: parsed from the reassembled start of a TCP
//! stream (across segments and across TLS records), with the server name, ALPN and the JA4
//! fingerprint (FoxIO's JA4, TCP form).

use sha2::{Digest, Sha256};

/// What the start of a client's stream is, so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// Not a TLS handshake.
    NotTls,
    /// A TLS handshake record that does not hold a well-formed ClientHello.
    Invalid,
    /// A ClientHello.
    Hello(ClientHello),
}

/// What a censor reads from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name (SNI), if any.
    pub sni: Option<String>,
    /// ALPN protocols, in order.
    pub alpn: Vec<String>,
    /// The JA4 fingerprint.
    pub ja4: String,
    /// JA4's raw form (`ja4_r`): the same prefix, then the sorted ciphers, the sorted
    /// extensions and the signature algorithms in hex, which show what a hash differs in.
    pub ja4_r: String,
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn u16s(bytes: &[u8]) -> Vec<u16> {
        bytes.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()
    }
}

/// Most handshake bytes gathered before giving up (a ClientHello is a few kilobytes at most).
const MAX_HELLO: usize = 16 * 1024;

/// Parses the start of a client's TCP stream.
pub fn parse(stream: &[u8]) -> Parsed {
    // Gather the handshake message from consecutive handshake records.
    let mut handshake = Vec::new();
    let mut rest = stream;
    loop {
        if rest.len() < 5 {
            return if rest.is_empty() || rest[0] == 0x16 {
                Parsed::Incomplete
            } else {
                Parsed::NotTls
            };
        }
        if rest[0] != 0x16 || rest[1] != 0x03 {
            return if handshake.is_empty() { Parsed::NotTls } else { Parsed::Invalid };
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if rest.len() < 5 + len {
            return Parsed::Incomplete;
        }
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Parsed::Invalid;
            }
            let body = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if body > MAX_HELLO {
                return Parsed::Invalid;
            }
            if handshake.len() >= 4 + body {
                return match hello(&handshake[4..4 + body]) {
                    Some(h) => Parsed::Hello(h),
                    None => Parsed::Invalid,
                };
            }
        }
    }
}

/// The content type and length of each complete TLS record at the start of `stream`.
pub fn records(stream: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    let mut rest = stream;
    while rest.len() >= 5 && rest[1] == 0x03 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if rest.len() < 5 + len {
            break;
        }
        out.push((rest[0], len));
        rest = &rest[5 + len..];
    }
    out
}

/// Whether a client's TLS 1.3 records show a TLS handshake carried inside the first one
/// (the lab's model of "encapsulated TLS" detection, after Xue et al., USENIX Security
/// 2024): after the outer Finished, an application-data record the size of a ClientHello
/// (300–2,000 bytes), then one the size of an inner Finished (75 or 91 bytes: a 58- or
/// 74-byte record plus 17 of outer overhead; 81 or 97 with an inner ChangeCipherSpec in
/// front of it), possibly after a lone inner ChangeCipherSpec (23).
pub fn tls_in_tls(stream: &[u8]) -> Option<bool> {
    let data: Vec<usize> =
        records(stream).into_iter().filter(|(t, _)| *t == 0x17).map(|(_, l)| l).collect();
    let finished = |l: usize| [75, 81, 91, 97].contains(&l);
    match data.as_slice() {
        [_, hello, 23, next, ..] => Some((300..=2000).contains(hello) && finished(*next)),
        [_, hello, next, ..] if *next != 23 => {
            Some((300..=2000).contains(hello) && finished(*next))
        }
        [_, hello] if !(300..=2000).contains(hello) => Some(false),
        _ => None,
    }
}

fn grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

fn hash12(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn hex_list(values: &[u16]) -> String {
    values.iter().map(|v| format!("{v:04x}")).collect::<Vec<_>>().join(",")
}

fn hello(body: &[u8]) -> Option<ClientHello> {
    let mut r = Reader { bytes: body };
    let legacy_version = r.u16()?;
    r.take(32)?;
    r.vec8()?;
    let ciphers: Vec<u16> = Reader::u16s(r.vec16()?).into_iter().filter(|c| !grease(*c)).collect();
    r.vec8()?;
    let mut extensions = Vec::new();
    let (mut sni, mut alpn, mut versions, mut sigalgs) = (None, Vec::new(), Vec::new(), Vec::new());
    if !r.bytes.is_empty() {
        let mut ext = Reader { bytes: r.vec16()? };
        while !ext.bytes.is_empty() {
            let kind = ext.u16()?;
            let data = ext.vec16()?;
            if grease(kind) {
                continue;
            }
            extensions.push(kind);
            let mut d = Reader { bytes: data };
            match kind {
                0x0000 => {
                    let mut list = Reader { bytes: d.vec16()? };
                    while !list.bytes.is_empty() {
                        let name_type = list.u8()?;
                        let name = list.vec16()?;
                        if name_type == 0 {
                            sni = Some(String::from_utf8_lossy(name).into_owned());
                        }
                    }
                }
                0x0010 => {
                    let mut list = Reader { bytes: d.vec16()? };
                    while !list.bytes.is_empty() {
                        alpn.push(String::from_utf8_lossy(list.vec8()?).into_owned());
                    }
                }
                0x002b => versions = Reader::u16s(d.vec8()?),
                // GREASE is ignored here too (Chromium sends a GREASE signature algorithm).
                0x000d => {
                    sigalgs =
                        Reader::u16s(d.vec16()?).into_iter().filter(|a| !grease(*a)).collect();
                }
                _ => {}
            }
        }
    }
    let version = versions.into_iter().filter(|v| !grease(*v)).max().unwrap_or(legacy_version);
    let version = match version {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        _ => "00",
    };
    let alpn_code = match alpn.first().map(|a| a.as_bytes()) {
        Some([first, .., last])
            if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() =>
        {
            format!("{}{}", char::from(*first), char::from(*last))
        }
        Some([only]) if only.is_ascii_alphanumeric() => format!("{0}{0}", char::from(*only)),
        Some([first, .., last]) => format!("{:x}{:x}", first >> 4, last & 0x0f),
        _ => "00".to_owned(),
    };
    let mut sorted_ciphers = ciphers.clone();
    sorted_ciphers.sort_unstable();
    let mut sorted_ext: Vec<u16> =
        extensions.iter().copied().filter(|e| *e != 0x0000 && *e != 0x0010).collect();
    sorted_ext.sort_unstable();
    let cipher_hash = if ciphers.is_empty() {
        "000000000000".to_owned()
    } else {
        hash12(&hex_list(&sorted_ciphers))
    };
    let mut ext_input = hex_list(&sorted_ext);
    if !sigalgs.is_empty() {
        ext_input = format!("{ext_input}_{}", hex_list(&sigalgs));
    }
    let ext_hash =
        if sorted_ext.is_empty() { "000000000000".to_owned() } else { hash12(&ext_input) };
    let prefix = format!(
        "t{version}{}{:02}{:02}{alpn_code}",
        if sni.is_some() { 'd' } else { 'i' },
        ciphers.len().min(99),
        extensions.len().min(99),
    );
    let ja4 = format!("{prefix}_{cipher_hash}_{ext_hash}");
    let ja4_r = format!("{prefix}_{}_{ext_input}", hex_list(&sorted_ciphers));
    Some(ClientHello { sni, alpn, ja4, ja4_r })
}

/// A ClientHello record with the given SNI, as rustls' default client writes it.
#[cfg(test)]
pub(crate) fn rustls_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rustls_hello_is_read_whole_and_only_whole() {
        let bytes = rustls_hello("blocked.example");
        for n in 0..bytes.len() {
            assert_eq!(parse(&bytes[..n]), Parsed::Incomplete, "prefix of {n}");
        }
        let Parsed::Hello(h) = parse(&bytes) else { panic!("no hello") };
        assert_eq!(h.sni.as_deref(), Some("blocked.example"));
        assert!(h.ja4.starts_with("t13d"), "{}", h.ja4);
        assert_eq!(h.ja4.len(), 36);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::NotTls);
    }

    /// A TLS 1.3 ClientHello record with these ciphers and signature algorithms, a server
    /// name and supported versions.
    fn hello_with(ciphers: &[u16], sigalgs: &[u16]) -> Vec<u8> {
        let list = |values: &[u16]| -> Vec<u8> {
            let mut out = ((values.len() * 2) as u16).to_be_bytes().to_vec();
            values.iter().for_each(|v| out.extend_from_slice(&v.to_be_bytes()));
            out
        };
        let mut extensions = Vec::new();
        let mut ext = |kind: u16, data: Vec<u8>| {
            extensions.extend_from_slice(&kind.to_be_bytes());
            extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
            extensions.extend_from_slice(&data);
        };
        let name = b"grease.example";
        let mut sni = vec![0u8];
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        ext(0x0000, [&(sni.len() as u16).to_be_bytes()[..], &sni].concat());
        ext(0x002b, vec![2, 0x03, 0x04]);
        ext(0x000d, list(sigalgs));
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&list(ciphers));
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![1, 0];
        handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn grease_is_left_out_of_ciphers_and_signature_algorithms() {
        let Parsed::Hello(plain) = parse(&hello_with(&[0x1301], &[0x0403, 0x0804])) else {
            panic!("no hello")
        };
        let greased = hello_with(&[0x0a0a, 0x1301], &[0x3a3a, 0x0403, 0x0804]);
        let Parsed::Hello(greased) = parse(&greased) else { panic!("no hello") };
        assert_eq!(greased.ja4, plain.ja4);
        assert_eq!(greased.ja4_r, "t13d010300_1301_000d,002b_0403,0804");
    }

    #[test]
    fn a_hello_split_across_records_is_reassembled() {
        let whole = rustls_hello("split.example");
        let body = &whole[5..];
        let mut split = Vec::new();
        for chunk in body.chunks(40) {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            split.extend_from_slice(chunk);
        }
        let (Parsed::Hello(a), Parsed::Hello(b)) = (parse(&whole), parse(&split)) else {
            panic!("no hello")
        };
        assert_eq!(a, b);
    }

    fn records_of(lengths: &[(u8, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, len) in lengths {
            out.extend_from_slice(&[*kind, 3, 3]);
            out.extend_from_slice(&(*len as u16).to_be_bytes());
            out.resize(out.len() + len, 0);
        }
        out
    }

    #[test]
    fn a_handshake_inside_tls_shows_in_record_sizes() {
        let outer = [(0x16, 250), (0x14, 1), (0x17, 53)];
        let with = |rest: &[(u8, usize)]| tls_in_tls(&records_of(&[&outer[..], rest].concat()));
        assert_eq!(with(&[(0x17, 540), (0x17, 75)]), Some(true), "inner ClientHello, Finished");
        assert_eq!(with(&[(0x17, 540), (0x17, 23), (0x17, 91)]), Some(true), "with a lone CCS");
        assert_eq!(with(&[(0x17, 540), (0x17, 81)]), Some(true), "CCS and Finished together");
        assert_eq!(with(&[(0x17, 540)]), None, "not yet known");
        assert_eq!(with(&[(0x17, 540), (0x17, 23)]), None, "not yet known");
        assert_eq!(with(&[(0x17, 40)]), Some(false), "a short request");
        assert_eq!(with(&[(0x17, 540), (0x17, 400)]), Some(false), "two requests");
    }

    #[test]
    fn ja4_matches_the_reference_example() {
        // FoxIO's JA4 worked example: the sorted cipher list and the extension and signature
        // algorithm lists hash to these values.
        assert_eq!(
            hash12("002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9"),
            "8daaf6152771"
        );
        assert_eq!(
            hash12(
                "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,0401,0503,0805,0501,0806,0601"
            ),
            "e5627efa2ab1"
        );
        assert!(grease(0x1a1a) && grease(0xfafa) && !grease(0x1a2a) && !grease(0x0a0b));
    }
}
