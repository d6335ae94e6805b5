//! Relay credentials and the relay's gate token.
//!
//! A relay holds one secret, its relay key. A credential is a path of 8-byte ids from that
//! key, each step an HMAC:
//!
//! ```text
//! secret_0 = relay key
//! secret_k = HMAC-SHA256(secret_{k-1}, "postern/v1/relay-credential\0" · id_k)
//! ```
//!
//! The operator mints first-level credentials (`postern relay … link`), one per person or
//! group; whoever holds a credential derives a child for each invite it puts the relay in,
//! without asking the relay. The relay keeps no list: it derives the secret from the ids in
//! the token. Revoking an id cuts off that credential and everything derived from it, and
//! nothing else, so a leaked invite burns only its own credential.
//!
//! The token goes in the WebSocket upgrade's `sid` cookie, like a server's gate token:
//!
//! `token = base64url(n · id_1 … id_n · timestamp u64 · nonce [16] · tag [16])`,
//! `tag = HMAC-SHA256(gate_key(secret_n), ctx · n · ids · timestamp · nonce)[..16]`
//!
//! with the same window and single use as [`crate::gate`]. Beside it, the request carries the
//! server the client wants (`ref`, the server's SPKI pin) and the server's own gate token
//! (`tok`), which the relay passes on untouched: only the client can open the server's gate.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::gate::{AccessSecret, FreshToken, GateError, GateKey, WINDOW_SECS};

/// The most ids in a credential's path (operator, holder, invite).
pub const MAX_DEPTH: usize = 3;
/// The cookie with the server selector: the server's SPKI pin.
pub const SERVER_COOKIE: &str = "ref";
/// The cookie with the server's gate token, passed on by the relay.
pub const SERVER_TOKEN_COOKIE: &str = "tok";

const TOKEN_CONTEXT: &[u8] = b"postern/v1/relay-token\0";
const CREDENTIAL_CONTEXT: &[u8] = b"postern/v1/relay-credential\0";
const MAX_TOKEN_LEN: usize = 1 + MAX_DEPTH * 8 + 8 + 16 + 16;

/// One step of a credential's path.
pub type CredentialId = [u8; 8];

/// A credential: the path of ids from the relay key, and the secret at its end.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// Ids from the relay key down; 1 to [`MAX_DEPTH`] of them.
    pub path: Vec<CredentialId>,
    /// The secret the path leads to.
    pub secret: AccessSecret,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("depth", &self.path.len()).finish_non_exhaustive()
    }
}

fn step(secret: &AccessSecret, id: &CredentialId) -> AccessSecret {
    // HMAC pads a key shorter than its block with zeros, so this is HMAC keyed with the
    // 32-byte secret, without a fallible length check.
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(&secret.0);
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into());
    mac.update(CREDENTIAL_CONTEXT);
    mac.update(id);
    AccessSecret(mac.finalize().into_bytes().into())
}

/// Derives the secret at the end of `path` from `root` (the relay key, or a credential's
/// secret for a path below it).
pub fn derive(root: &AccessSecret, path: &[CredentialId]) -> AccessSecret {
    path.iter().fold(root.clone(), |secret, id| step(&secret, id))
}

impl Credential {
    /// The credential one level down, for `id`; `None` past [`MAX_DEPTH`].
    pub fn child(&self, id: CredentialId) -> Option<Credential> {
        if self.path.len() >= MAX_DEPTH {
            return None;
        }
        let mut path = self.path.clone();
        path.push(id);
        Some(Credential { path, secret: step(&self.secret, &id) })
    }

    /// A token for the given time and random nonce.
    pub fn token(&self, now_secs: u64, nonce: [u8; 16]) -> String {
        let key = GateKey::derive(&self.secret);
        let ids = self.path.concat();
        let n = [u8::try_from(self.path.len()).unwrap_or(u8::MAX)];
        let ts = now_secs.to_be_bytes();
        let tag = key.tag(TOKEN_CONTEXT, &[&n, &ids, &ts, &nonce]);
        let mut raw = Vec::with_capacity(MAX_TOKEN_LEN);
        for part in [&n[..], &ids, &ts, &nonce, &tag] {
            raw.extend_from_slice(part);
        }
        URL_SAFE_NO_PAD.encode(raw)
    }
}

/// A token that passed [`check`]: the relay must still check `fresh.nonce` for replay and
/// `path` against its revoked ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedToken {
    /// The credential's path.
    pub path: Vec<CredentialId>,
    /// Time and nonce.
    pub fresh: FreshToken,
}

/// Checks a relay token against the relay key: form, MAC (constant time) and freshness.
pub fn check(
    relay_key: &AccessSecret,
    token: &str,
    now_secs: u64,
) -> Result<CheckedToken, GateError> {
    if token.len() > MAX_TOKEN_LEN.div_ceil(3) * 4 {
        return Err(GateError::Malformed);
    }
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| GateError::Malformed)?;
    let (&n, rest) = raw.split_first().ok_or(GateError::Malformed)?;
    let depth = usize::from(n);
    if depth == 0 || depth > MAX_DEPTH || rest.len() != depth * 8 + 8 + 16 + 16 {
        return Err(GateError::Malformed);
    }
    let (ids, rest) = rest.split_at(depth * 8);
    let (ts, rest) = rest.split_at(8);
    let (nonce, tag) = rest.split_at(16);
    let path: Vec<CredentialId> = ids
        .chunks_exact(8)
        .map(|c| c.try_into().map_err(|_| GateError::Malformed))
        .collect::<Result<_, _>>()?;
    let key = GateKey::derive(&derive(relay_key, &path));
    if !key.verify(TOKEN_CONTEXT, &[&[n], ids, ts, nonce], tag) {
        return Err(GateError::BadMac);
    }
    let timestamp = u64::from_be_bytes(ts.try_into().map_err(|_| GateError::Malformed)?);
    if timestamp.abs_diff(now_secs) > WINDOW_SECS {
        return Err(GateError::Stale);
    }
    let nonce = nonce.try_into().map_err(|_| GateError::Malformed)?;
    Ok(CheckedToken { path, fresh: FreshToken { timestamp, nonce } })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key() -> AccessSecret {
        AccessSecret([7; 32])
    }

    fn minted(id: CredentialId) -> Credential {
        Credential { path: vec![id], secret: derive(&key(), &[id]) }
    }

    #[test]
    fn a_minted_credential_and_its_children_pass() {
        let alice = minted([1; 8]);
        let t = alice.token(5_000, [2; 16]);
        let checked = check(&key(), &t, 5_010).unwrap();
        assert_eq!(checked.path, vec![[1; 8]]);
        assert_eq!(checked.fresh, FreshToken { timestamp: 5_000, nonce: [2; 16] });

        let invite = alice.child([3; 8]).unwrap().child([4; 8]).unwrap();
        assert_eq!(check(&key(), &invite.token(5_000, [5; 16]), 5_000).unwrap().path.len(), 3);
        assert!(invite.child([6; 8]).is_none(), "no deeper than MAX_DEPTH");
    }

    #[test]
    fn forged_stale_and_malformed_tokens_fail() {
        let alice = minted([1; 8]);
        // Knowing an id is not knowing its secret.
        let forged = Credential { path: vec![[1; 8]], secret: AccessSecret([0; 32]) };
        assert_eq!(check(&key(), &forged.token(5_000, [0; 16]), 5_000), Err(GateError::BadMac));
        // A child's secret does not open its parent's path.
        let child = alice.child([9; 8]).unwrap();
        let swapped = Credential { path: alice.path.clone(), secret: child.secret.clone() };
        assert_eq!(check(&key(), &swapped.token(5_000, [0; 16]), 5_000), Err(GateError::BadMac));
        // Another relay's key.
        let other = AccessSecret([8; 32]);
        assert_eq!(check(&other, &alice.token(5_000, [0; 16]), 5_000), Err(GateError::BadMac));
        let t = alice.token(5_000, [0; 16]);
        assert_eq!(check(&key(), &t, 5_000 + WINDOW_SECS + 1), Err(GateError::Stale));
        assert_eq!(check(&key(), "", 0), Err(GateError::Malformed));
        assert_eq!(check(&key(), &t[..30], 0), Err(GateError::Malformed));
        // A server's gate token is not a relay token.
        let server = GateKey::derive(&key()).token(5_000, [0; 16]);
        assert!(check(&key(), &server, 5_000).is_err());
        let deep = URL_SAFE_NO_PAD.encode([4u8; 1 + 32 + 40]);
        assert_eq!(check(&key(), &deep, 0), Err(GateError::Malformed));
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", minted([1; 8])).contains("secret"));
    }

    proptest! {
        #[test]
        fn any_path_checks(
            path in proptest::collection::vec(any::<CredentialId>(), 1..=MAX_DEPTH),
            root in any::<[u8; 32]>(),
            now in 0..u64::MAX / 2,
            nonce in any::<[u8; 16]>(),
        ) {
            let root = AccessSecret(root);
            let credential = Credential { secret: derive(&root, &path), path: path.clone() };
            let checked = check(&root, &credential.token(now, nonce), now);
            prop_assert_eq!(checked, Ok(CheckedToken { path, fresh: FreshToken { timestamp: now, nonce } }));
        }
    }
}
