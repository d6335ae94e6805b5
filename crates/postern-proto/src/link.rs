//! Server links: `postern://server#v=1&a=HOST:PORT&p=PIN&k=KEY&s=SECRET[&n=NAME]`, and relay
//! links: `postern://relay#v=1&a=HOST:PORT&p=PIN&c=ID[&c=ID…]&s=SECRET[&n=NAME]`.
//!
//! - `a`: an address `host:port` (repeatable, in order of preference; IPv6 in brackets);
//! - `n`: the TLS server name to send, when it differs from the host (optional);
//! - `p`: SHA-256 of the server certificate's SubjectPublicKeyInfo (repeatable, for rotation);
//! - `k`: the server's static X25519 key for the Noise session;
//! - `s`: the access secret that opens the gate (a relay's: the credential's secret);
//! - `c`: a relay credential's path of ids (repeatable, in order, see [`crate::relay`]).
//!
//! Binary values are unpadded base64url. Everything sits in the fragment, which HTTP clients
//! never send. Unknown keys are ignored so later versions can add fields; a known key given
//! twice where only one is allowed is an error.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::gate::AccessSecret;
use crate::ids::{ClaimToken, DropId, PublicKey};
use crate::relay::{Credential, CredentialId, MAX_DEPTH};

const PREFIX: &str = "postern://server#";

/// The pin of a server key: SHA-256 of its DER SubjectPublicKeyInfo. The server computes it
/// for its link, clients check the certificate against it; both call this.
pub fn spki_pin(spki_der: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(spki_der).into()
}
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
    /// Not a `postern://` link of the expected kind (`server#`, `invite#` or `relay#`).
    #[error("not a Postern link of this kind")]
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

/// The `key=value` pairs of a link's fragment: repeatable `a`, `p` and `c`, every other known
/// key at most once, unknown keys ignored (for forward compatibility).
struct Fields<'a> {
    singles: Vec<(&'a str, &'a str)>,
    addrs: Vec<String>,
    pins: Vec<[u8; 32]>,
    path: Vec<CredentialId>,
    relays: Vec<RelayLink>,
}

impl<'a> Fields<'a> {
    fn parse(link: &'a str, prefix: &str) -> Result<Self, LinkError> {
        if link.len() > MAX_LINK {
            return Err(LinkError::TooLong);
        }
        let rest = link.trim().strip_prefix(prefix).ok_or(LinkError::NotALink)?;
        let mut fields = Fields {
            singles: Vec::new(),
            addrs: Vec::new(),
            pins: Vec::new(),
            path: Vec::new(),
            relays: Vec::new(),
        };
        for pair in rest.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or(LinkError::Invalid("pair"))?;
            match k {
                "a" => {
                    if !valid_host_port(v) || fields.addrs.len() == MAX_REPEATS {
                        return Err(LinkError::Invalid("a"));
                    }
                    fields.addrs.push(v.to_owned());
                }
                "p" => {
                    if fields.pins.len() == MAX_REPEATS {
                        return Err(LinkError::Invalid("p"));
                    }
                    fields.pins.push(b64::<32>(v, "p")?);
                }
                "c" => {
                    if fields.path.len() == MAX_DEPTH {
                        return Err(LinkError::Invalid("c"));
                    }
                    fields.path.push(b64::<8>(v, "c")?);
                }
                "r" => {
                    if fields.relays.len() == MAX_INVITE_RELAYS {
                        return Err(LinkError::Invalid("r"));
                    }
                    fields.relays.push(RelayLink::from_compact(v)?);
                }
                _ => match SINGLE_KEYS.iter().find(|known| **known == k) {
                    Some(known) if fields.get(known).is_some() => {
                        return Err(LinkError::Invalid(known));
                    }
                    Some(known) => fields.singles.push((known, v)),
                    None => {}
                },
            }
        }
        match fields.get("v") {
            Some("1") => Ok(fields),
            Some(other) => Err(LinkError::Version(other.chars().take(8).collect())),
            None => Err(LinkError::Missing("v")),
        }
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.singles.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn require(&self, key: &'static str) -> Result<&'a str, LinkError> {
        self.get(key).ok_or(LinkError::Missing(key))
    }

    fn key32(&self, key: &'static str) -> Result<[u8; 32], LinkError> {
        b64(self.require(key)?, key)
    }

    /// Addresses, TLS name and pins, which every kind of link has.
    fn endpoint(&self) -> Result<Endpoint, LinkError> {
        if self.addrs.is_empty() {
            return Err(LinkError::Missing("a"));
        }
        if self.pins.is_empty() {
            return Err(LinkError::Missing("p"));
        }
        let server_name = match self.get("n") {
            Some(n) if !valid_name(n) => return Err(LinkError::Invalid("n")),
            n => n.map(str::to_owned),
        };
        Ok((self.addrs.clone(), server_name, self.pins.clone()))
    }

    fn server(&self) -> Result<ServerLink, LinkError> {
        let (addrs, server_name, pins) = self.endpoint()?;
        Ok(ServerLink {
            addrs,
            server_name,
            pins,
            static_key: self.key32("k")?,
            secret: AccessSecret(self.key32("s")?),
        })
    }
}

/// A link's addresses, TLS name and pins.
type Endpoint = (Vec<String>, Option<String>, Vec<[u8; 32]>);

/// `&a=…[&n=…]&p=…` for an endpoint.
fn endpoint_params(addrs: &[String], server_name: Option<&str>, pins: &[[u8; 32]]) -> String {
    let mut out = String::new();
    for a in addrs {
        out.push_str("&a=");
        out.push_str(a);
    }
    if let Some(n) = server_name {
        out.push_str("&n=");
        out.push_str(n);
    }
    for p in pins {
        out.push_str("&p=");
        out.push_str(&URL_SAFE_NO_PAD.encode(p));
    }
    out
}

/// The TLS server name to send: `server_name`, or else the first address's host.
fn tls_name(addrs: &[String], server_name: Option<&str>) -> String {
    if let Some(n) = server_name {
        return n.to_owned();
    }
    let addr = addrs.first().map(String::as_str).unwrap_or_default();
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']').to_owned()
}

/// Keys that may appear at most once, in server and invite links.
const SINGLE_KEYS: &[&str] = &["v", "n", "k", "s", "m", "d", "h", "q", "t", "i"];

impl ServerLink {
    /// Parses a link.
    pub fn parse(link: &str) -> Result<Self, LinkError> {
        Fields::parse(link, PREFIX)?.server()
    }

    /// Formats the link. The result contains the secret: print it only where the operator
    /// asked for it, never into logs.
    pub fn to_link_string(&self) -> String {
        format!("{PREFIX}v=1{}", self.params())
    }

    /// The server's fields as `&key=value` pairs, shared by server and invite links.
    fn params(&self) -> String {
        let mut out = endpoint_params(&self.addrs, self.server_name.as_deref(), &self.pins);
        out.push_str("&k=");
        out.push_str(&URL_SAFE_NO_PAD.encode(self.static_key));
        out.push_str("&s=");
        out.push_str(&URL_SAFE_NO_PAD.encode(self.secret.0));
        out
    }

    /// The TLS server name to send: `n`, or else the first address's host.
    pub fn tls_name(&self) -> String {
        tls_name(&self.addrs, self.server_name.as_deref())
    }
}

const RELAY_PREFIX: &str = "postern://relay#";
/// Most relays an invite carries.
pub const MAX_INVITE_RELAYS: usize = 3;

/// Everything a client needs to go through a relay: where it is, its pins, and a credential.
/// It says nothing of which servers the relay reaches.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayLink {
    /// `host:port` addresses, most preferred first; never empty.
    pub addrs: Vec<String>,
    /// TLS server name, when it differs from the address's host.
    pub server_name: Option<String>,
    /// Accepted SPKI pins of the relay's certificate; never empty.
    pub pins: Vec<[u8; 32]>,
    /// The credential that opens the relay's gate.
    pub credential: Credential,
}

impl std::fmt::Debug for RelayLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayLink")
            .field("addrs", &self.addrs)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl RelayLink {
    /// Parses a relay link.
    pub fn parse(link: &str) -> Result<Self, LinkError> {
        let fields = Fields::parse(link, RELAY_PREFIX)?;
        let (addrs, server_name, pins) = fields.endpoint()?;
        if fields.path.is_empty() {
            return Err(LinkError::Missing("c"));
        }
        let credential =
            Credential { path: fields.path.clone(), secret: AccessSecret(fields.key32("s")?) };
        Ok(RelayLink { addrs, server_name, pins, credential })
    }

    /// Formats the link. It holds the credential's secret: give it only to whoever may use
    /// the relay.
    pub fn to_link_string(&self) -> String {
        let mut out = format!(
            "{RELAY_PREFIX}v=1{}",
            endpoint_params(&self.addrs, self.server_name.as_deref(), &self.pins)
        );
        for id in &self.credential.path {
            out.push_str("&c=");
            out.push_str(&URL_SAFE_NO_PAD.encode(id));
        }
        out.push_str("&s=");
        out.push_str(&URL_SAFE_NO_PAD.encode(self.credential.secret.0));
        out
    }

    /// The same relay with a child credential (for an invite), or `None` at the deepest level.
    pub fn child(&self, id: CredentialId) -> Option<RelayLink> {
        Some(RelayLink { credential: self.credential.child(id)?, ..self.clone() })
    }

    /// The TLS server name to send.
    pub fn tls_name(&self) -> String {
        tls_name(&self.addrs, self.server_name.as_deref())
    }

    /// The compact form an invite carries (`r=`): unpadded base64url of
    /// `n u8 · (len u8 · address)ⁿ · len u8 · name (0: none) · m u8 · pin [32]ᵐ · depth u8 ·
    /// id [8]^depth · secret [32]`.
    pub fn to_compact(&self) -> String {
        let mut raw = Vec::with_capacity(160);
        let small = |n: usize| u8::try_from(n).unwrap_or(u8::MAX);
        raw.push(small(self.addrs.len()));
        for a in &self.addrs {
            raw.push(small(a.len()));
            raw.extend_from_slice(a.as_bytes());
        }
        let name = self.server_name.as_deref().unwrap_or_default();
        raw.push(small(name.len()));
        raw.extend_from_slice(name.as_bytes());
        raw.push(small(self.pins.len()));
        for p in &self.pins {
            raw.extend_from_slice(p);
        }
        raw.push(small(self.credential.path.len()));
        for id in &self.credential.path {
            raw.extend_from_slice(id);
        }
        raw.extend_from_slice(&self.credential.secret.0);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Parses [`to_compact`](Self::to_compact)'s form, with the checks of a relay link.
    pub fn from_compact(text: &str) -> Result<Self, LinkError> {
        const FIELD: &str = "r";
        let bad = || LinkError::Invalid(FIELD);
        let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
        let mut rest = raw.as_slice();
        let mut take = |n: usize| -> Result<&[u8], LinkError> {
            if rest.len() < n {
                return Err(bad());
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let count = |n: u8, max: usize| -> Result<usize, LinkError> {
            let n = usize::from(n);
            if n == 0 || n > max { Err(bad()) } else { Ok(n) }
        };
        let mut addrs = Vec::new();
        for _ in 0..count(take(1)?[0], MAX_REPEATS)? {
            let len = usize::from(take(1)?[0]);
            let addr = std::str::from_utf8(take(len)?).map_err(|_| bad())?;
            if !valid_host_port(addr) {
                return Err(bad());
            }
            addrs.push(addr.to_owned());
        }
        let len = usize::from(take(1)?[0]);
        let server_name = match std::str::from_utf8(take(len)?).map_err(|_| bad())? {
            "" => None,
            n if valid_name(n) => Some(n.to_owned()),
            _ => return Err(bad()),
        };
        let mut pins = Vec::new();
        for _ in 0..count(take(1)?[0], MAX_REPEATS)? {
            pins.push(take(32)?.try_into().map_err(|_| bad())?);
        }
        let mut path = Vec::new();
        for _ in 0..count(take(1)?[0], MAX_DEPTH)? {
            path.push(take(8)?.try_into().map_err(|_| bad())?);
        }
        let secret = AccessSecret(take(32)?.try_into().map_err(|_| bad())?);
        if !rest.is_empty() {
            return Err(bad());
        }
        Ok(RelayLink { addrs, server_name, pins, credential: Credential { path, secret } })
    }
}

const INVITE_PREFIX: &str = "postern://invite#";

/// What an invite lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteKind {
    /// Connect once, with no accept step (`m=once`).
    Once,
    /// A long-lived address: each use becomes a request the owner accepts (`m=address`).
    Address,
}

/// An invite: `postern://invite#v=1&m=KIND&<server fields>&d=DROP&h=HPKE&q=KPKEY&t=TOKEN&i=IDENTITY[&r=RELAY…]`.
///
/// It carries the inviter's server link, the drop address and the mailbox's HPKE key (for the
/// sealed Welcome or request), the key that decrypts the inviter's key packages, the claim
/// token, and the inviter's identity key (whose fingerprint the joiner can compare).
#[derive(Clone, PartialEq, Eq)]
pub struct InviteLink {
    /// Once or address.
    pub kind: InviteKind,
    /// The inviter's server.
    pub server: ServerLink,
    /// The drop address for the Welcome or request.
    pub drop: DropId,
    /// The mailbox's HPKE public key.
    pub hpke_key: [u8; 32],
    /// The key that decrypts claimed key packages.
    pub kp_key: [u8; 32],
    /// The claim token.
    pub token: ClaimToken,
    /// The inviter's identity key.
    pub identity: PublicKey,
    /// Relays to the inviter's server (each with a credential of its own), at most
    /// [`MAX_INVITE_RELAYS`].
    pub relays: Vec<RelayLink>,
}

impl std::fmt::Debug for InviteLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InviteLink")
            .field("kind", &self.kind)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl InviteLink {
    /// Parses an invite link.
    pub fn parse(link: &str) -> Result<Self, LinkError> {
        let fields = Fields::parse(link, INVITE_PREFIX)?;
        let kind = match fields.require("m")? {
            "once" => InviteKind::Once,
            "address" => InviteKind::Address,
            _ => return Err(LinkError::Invalid("m")),
        };
        Ok(InviteLink {
            kind,
            server: fields.server()?,
            drop: DropId(fields.key32("d")?),
            hpke_key: fields.key32("h")?,
            kp_key: fields.key32("q")?,
            token: ClaimToken(fields.key32("t")?),
            identity: PublicKey(fields.key32("i")?),
            relays: fields.relays.clone(),
        })
    }

    /// Formats the link. It holds secrets (the access secret, token and keys): show it only to
    /// the person invited.
    pub fn to_link_string(&self) -> String {
        let kind = match self.kind {
            InviteKind::Once => "once",
            InviteKind::Address => "address",
        };
        let b = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let mut out = format!(
            "{INVITE_PREFIX}v=1&m={kind}{}&d={}&h={}&q={}&t={}&i={}",
            self.server.params(),
            b(&self.drop.0),
            b(&self.hpke_key),
            b(&self.kp_key),
            b(&self.token.0),
            b(&self.identity.0),
        );
        for relay in &self.relays {
            out.push_str("&r=");
            out.push_str(&relay.to_compact());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

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

    fn invite() -> InviteLink {
        InviteLink {
            kind: InviteKind::Once,
            server: sample(),
            drop: DropId([5; 32]),
            hpke_key: [6; 32],
            kp_key: [7; 32],
            token: ClaimToken([8; 32]),
            identity: PublicKey([9; 32]),
            relays: Vec::new(),
        }
    }

    fn relay() -> RelayLink {
        RelayLink {
            addrs: vec!["relay.example.org:443".into()],
            server_name: None,
            pins: vec![[1; 32]],
            credential: Credential { path: vec![[2; 8], [3; 8]], secret: AccessSecret([4; 32]) },
        }
    }

    #[test]
    fn invites_carry_relays() {
        let mut with = invite();
        with.relays = vec![relay(), relay().child([5; 8]).unwrap()];
        let link = with.to_link_string();
        assert!(link.len() < 900, "fits a QR code comfortably: {}", link.len());
        assert_eq!(InviteLink::parse(&link).unwrap(), with);
        let four = format!("{link}&r={}&r={}", relay().to_compact(), relay().to_compact());
        assert_eq!(InviteLink::parse(&four), Err(LinkError::Invalid("r")));
        let mut compact = URL_SAFE_NO_PAD.decode(relay().to_compact()).unwrap();
        compact.push(0);
        let trailing = URL_SAFE_NO_PAD.encode(&compact);
        assert_eq!(RelayLink::from_compact(&trailing), Err(LinkError::Invalid("r")));
        assert_eq!(RelayLink::from_compact("AAAA"), Err(LinkError::Invalid("r")));
    }

    #[test]
    fn invites_round_trip_and_refuse_what_is_missing() {
        let link = invite().to_link_string();
        assert!(link.len() < 600, "fits a QR code comfortably: {}", link.len());
        assert_eq!(InviteLink::parse(&link).unwrap(), invite());
        let mut address = invite();
        address.kind = InviteKind::Address;
        assert_eq!(InviteLink::parse(&address.to_link_string()).unwrap(), address);
        assert_eq!(
            InviteLink::parse(&link.replace("m=once", "m=twice")),
            Err(LinkError::Invalid("m"))
        );
        assert_eq!(InviteLink::parse(&link.replace("&t=", "&x=")), Err(LinkError::Missing("t")));
        assert_eq!(InviteLink::parse(&format!("{link}&d=AAAA")), Err(LinkError::Invalid("d")));
        assert_eq!(InviteLink::parse(&sample().to_link_string()), Err(LinkError::NotALink));
        assert_eq!(ServerLink::parse(&link), Err(LinkError::NotALink));
        assert!(!format!("{:?}", invite()).contains("8, 8"), "Debug hides the token");
    }

    #[test]
    fn debug_hides_secret() {
        let s = format!("{:?}", sample());
        assert!(!s.contains("secret") && !s.contains("4, 4"));
    }

    #[test]
    fn relay_links_round_trip_and_refuse_what_is_missing() {
        let relay = relay();
        let link = relay.to_link_string();
        assert!(link.starts_with("postern://relay#v=1&a=relay.example.org:443&p="), "{link}");
        assert_eq!(RelayLink::parse(&link).unwrap(), relay);
        assert_eq!(relay.tls_name(), "relay.example.org");
        assert_eq!(RelayLink::parse(&link.replace("&c=", "&x=")), Err(LinkError::Missing("c")));
        assert_eq!(
            RelayLink::parse(&format!("{link}&c=AAAAAAAAAAA&c=AAAAAAAAAAA")),
            Err(LinkError::Invalid("c"))
        );
        assert_eq!(RelayLink::parse(&link.replace("&s=", "&x=")), Err(LinkError::Missing("s")));
        assert_eq!(ServerLink::parse(&link), Err(LinkError::NotALink));
        assert_eq!(RelayLink::parse(&sample().to_link_string()), Err(LinkError::NotALink));
        let child = relay.child([5; 8]).unwrap();
        assert_eq!(child.credential.path.len(), 3);
        assert!(child.child([6; 8]).is_none());
        assert!(!format!("{relay:?}").contains("4, 4"), "Debug hides the secret");
    }

    fn arb_server() -> impl Strategy<Value = ServerLink> {
        let addr = prop_oneof![
            (any::<[u8; 4]>(), 1..=u16::MAX)
                .prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port)).to_string()),
            (any::<[u16; 8]>(), 1..=u16::MAX)
                .prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port)).to_string()),
            ("[a-z0-9][a-z0-9.-]{0,40}", 1..=u16::MAX).prop_map(|(h, p)| format!("{h}:{p}")),
        ];
        (
            proptest::collection::vec(addr, 1..=MAX_REPEATS),
            proptest::option::of("[a-zA-Z0-9.-]{1,60}"),
            proptest::collection::vec(any::<[u8; 32]>(), 1..=MAX_REPEATS),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(addrs, server_name, pins, static_key, secret)| ServerLink {
                addrs,
                server_name,
                pins,
                static_key,
                secret: AccessSecret(secret),
            })
    }

    proptest! {
        #[test]
        fn any_server_link_round_trips(link in arb_server()) {
            prop_assert_eq!(ServerLink::parse(&link.to_link_string()), Ok(link));
        }

        #[test]
        fn any_relay_link_round_trips(
            server in arb_server(),
            path in proptest::collection::vec(any::<CredentialId>(), 1..=MAX_DEPTH),
        ) {
            let relay = RelayLink {
                addrs: server.addrs,
                server_name: server.server_name,
                pins: server.pins,
                credential: Credential { path, secret: server.secret },
            };
            prop_assert_eq!(RelayLink::parse(&relay.to_link_string()), Ok(relay.clone()));
            prop_assert_eq!(RelayLink::from_compact(&relay.to_compact()), Ok(relay));
        }

        #[test]
        fn any_invite_link_round_trips(
            server in arb_server(),
            once in any::<bool>(),
            keys in any::<[[u8; 32]; 5]>(),
        ) {
            let [drop, hpke_key, kp_key, token, identity] = keys;
            let invite = InviteLink {
                kind: if once { InviteKind::Once } else { InviteKind::Address },
                server,
                drop: DropId(drop),
                hpke_key,
                kp_key,
                token: ClaimToken(token),
                identity: PublicKey(identity),
                relays: Vec::new(),
            };
            let text = invite.to_link_string();
            // Eight addresses of the longest kind exceed MAX_LINK; those must be refused.
            if text.len() > MAX_LINK {
                prop_assert_eq!(InviteLink::parse(&text), Err(LinkError::TooLong));
            } else {
                prop_assert_eq!(InviteLink::parse(&text), Ok(invite));
            }
        }
    }
}
