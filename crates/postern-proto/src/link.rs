//! Server links: `postern://server#v=1&a=HOST:PORT&p=PIN&k=KEY&s=SECRET[&n=NAME]`.
//!
//! - `a`: an address `host:port` (repeatable, in order of preference; IPv6 in brackets);
//! - `n`: the TLS server name to send, when it differs from the host (optional);
//! - `p`: SHA-256 of the server certificate's SubjectPublicKeyInfo (repeatable, for rotation);
//! - `k`: the server's static X25519 key for the Noise session;
//! - `s`: the access secret that opens the gate.
//!
//! Binary values are unpadded base64url. Everything sits in the fragment, which HTTP clients
//! never send. Unknown keys are ignored so later versions can add fields; a known key given
//! twice where only one is allowed is an error.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::gate::AccessSecret;

const PREFIX: &str = "postern://server#";
/// Longest link accepted (links travel in QR codes).
pub const MAX_LINK: usize = 2_048;
const MAX_REPEATS: usize = 8;

/// Everything a client needs to reach a server.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerLink {
    /// `host:port` addresses, most preferred first; never empty.
    pub addrs: Vec<String>,
    /// TLS server name, when it differs from the address's host.
    pub server_name: Option<String>,
    /// Accepted SPKI pins; never empty.
    pub pins: Vec<[u8; 32]>,
    /// The server's static Noise key.
    pub static_key: [u8; 32],
    /// The gate's access secret.
    pub secret: AccessSecret,
}

impl std::fmt::Debug for ServerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLink")
            .field("addrs", &self.addrs)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a link could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Not a `postern://server#` link.
    #[error("not a Postern server link")]
    NotALink,
    /// Longer than [`MAX_LINK`].
    #[error("link too long")]
    TooLong,
    /// The link is for a protocol version this build does not speak.
    #[error("unsupported link version {0}")]
    Version(String),
    /// A required field is missing.
    #[error("link has no `{0}` field")]
    Missing(&'static str),
    /// A field is malformed or repeated.
    #[error("invalid `{0}` field in link")]
    Invalid(&'static str),
}

fn b64<const N: usize>(value: &str, field: &'static str) -> Result<[u8; N], LinkError> {
    let raw = URL_SAFE_NO_PAD.decode(value).map_err(|_| LinkError::Invalid(field))?;
    raw.try_into().map_err(|_| LinkError::Invalid(field))
}

fn valid_host_port(value: &str) -> bool {
    let Some((host, port)) = value.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn valid_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
}

impl ServerLink {
    /// Parses a link.
    pub fn parse(link: &str) -> Result<Self, LinkError> {
        if link.len() > MAX_LINK {
            return Err(LinkError::TooLong);
        }
        let rest = link.trim().strip_prefix(PREFIX).ok_or(LinkError::NotALink)?;
        let (mut version, mut name, mut key, mut secret) = (None, None, None, None);
        let (mut addrs, mut pins) = (Vec::new(), Vec::new());
        for pair in rest.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or(LinkError::Invalid("pair"))?;
            let set_once = |slot: &mut Option<String>, field| {
                if slot.replace(v.to_owned()).is_some() {
                    Err(LinkError::Invalid(field))
                } else {
                    Ok(())
                }
            };
            match k {
                "v" => set_once(&mut version, "v")?,
                "n" => set_once(&mut name, "n")?,
                "k" => set_once(&mut key, "k")?,
                "s" => set_once(&mut secret, "s")?,
                "a" => {
                    if !valid_host_port(v) || addrs.len() == MAX_REPEATS {
                        return Err(LinkError::Invalid("a"));
                    }
                    addrs.push(v.to_owned());
                }
                "p" => {
                    if pins.len() == MAX_REPEATS {
                        return Err(LinkError::Invalid("p"));
                    }
                    pins.push(b64::<32>(v, "p")?);
                }
                _ => {}
            }
        }
        match version.as_deref() {
            Some("1") => {}
            Some(other) => return Err(LinkError::Version(other.chars().take(8).collect())),
            None => return Err(LinkError::Missing("v")),
        }
        if addrs.is_empty() {
            return Err(LinkError::Missing("a"));
        }
        if pins.is_empty() {
            return Err(LinkError::Missing("p"));
        }
        if let Some(n) = &name
            && !valid_name(n)
        {
            return Err(LinkError::Invalid("n"));
        }
        Ok(ServerLink {
            addrs,
            server_name: name,
            pins,
            static_key: b64(&key.ok_or(LinkError::Missing("k"))?, "k")?,
            secret: AccessSecret(b64(&secret.ok_or(LinkError::Missing("s"))?, "s")?),
        })
    }

    /// Formats the link. The result contains the secret: print it only where the operator
    /// asked for it, never into logs.
    pub fn to_link_string(&self) -> String {
        let mut out = String::from(PREFIX);
        out.push_str("v=1");
        for a in &self.addrs {
            out.push_str("&a=");
            out.push_str(a);
        }
        if let Some(n) = &self.server_name {
            out.push_str("&n=");
            out.push_str(n);
        }
        for p in &self.pins {
            out.push_str("&p=");
            out.push_str(&URL_SAFE_NO_PAD.encode(p));
        }
        out.push_str("&k=");
        out.push_str(&URL_SAFE_NO_PAD.encode(self.static_key));
        out.push_str("&s=");
        out.push_str(&URL_SAFE_NO_PAD.encode(self.secret.0));
        out
    }

    /// The TLS server name to send: `n`, or else the first address's host.
    pub fn tls_name(&self) -> String {
        if let Some(n) = &self.server_name {
            return n.clone();
        }
        let addr = self.addrs.first().map(String::as_str).unwrap_or_default();
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ServerLink {
        ServerLink {
            addrs: vec!["127.0.0.1:8443".into(), "[::1]:443".into()],
            server_name: Some("example.org".into()),
            pins: vec![[1; 32], [2; 32]],
            static_key: [3; 32],
            secret: AccessSecret([4; 32]),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample().to_link_string();
        assert_eq!(ServerLink::parse(&s).unwrap(), sample());
        assert_eq!(sample().tls_name(), "example.org");
        let mut no_name = sample();
        no_name.server_name = None;
        assert_eq!(no_name.tls_name(), "127.0.0.1");
    }

    #[test]
    fn refusals() {
        let good = sample().to_link_string();
        let check = |link: &str, want: LinkError| assert_eq!(ServerLink::parse(link), Err(want));
        check("https://example.org", LinkError::NotALink);
        check(&good.replace("v=1", "v=2"), LinkError::Version("2".into()));
        check(&good.replace("&k=", "&x="), LinkError::Missing("k"));
        check(&format!("{good}&k=AAAA"), LinkError::Invalid("k"));
        check(&good.replace("127.0.0.1:8443", "127.0.0.1:0"), LinkError::Invalid("a"));
        check(&good.replace("127.0.0.1:8443", "bad host:1"), LinkError::Invalid("a"));
        check(&"x".repeat(MAX_LINK + 1), LinkError::TooLong);
        // Unknown fields are ignored for forward compatibility.
        assert!(ServerLink::parse(&format!("{good}&future=1")).is_ok());
    }

    #[test]
    fn debug_hides_secret() {
        let s = format!("{:?}", sample());
        assert!(!s.contains("secret") && !s.contains("4, 4"));
    }
}
