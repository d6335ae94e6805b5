//! The gate: how a client proves, in its first HTTP request, that it knows the access secret
//! from the server link. Without a valid, fresh, unreplayed token the server answers as the
//! ordinary website it also is.
//!
//! `token = base64url(timestamp u64 · nonce [16] · HMAC-SHA256(gate_key, ctx · timestamp · nonce)[..16])`
//! with `gate_key = HKDF-SHA256(access_secret, info = "postern/v1/gate")`. The server accepts a
//! timestamp within [`WINDOW_SECS`] of its clock and remembers nonces for twice that, so a
//! captured token cannot be replayed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a token's timestamp may be from the server's clock, in seconds.
pub const WINDOW_SECS: u64 = 300;
/// The cookie that carries the token in the upgrade request.
pub const COOKIE_NAME: &str = "sid";

const TOKEN_LEN: usize = 8 + 16 + 16;
const MAC_CONTEXT: &[u8] = b"postern/v1/gate-token\0";

/// The secret from the server link. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct AccessSecret(pub [u8; 32]);

impl std::fmt::Debug for AccessSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessSecret(<redacted>)")
    }
}

/// The MAC key derived from an [`AccessSecret`].
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct GateKey([u8; 64]);

impl std::fmt::Debug for GateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GateKey(<redacted>)")
    }
}

/// Why a gate token was refused. The server answers every variant the same way (the website),
/// so the distinction exists only for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// Not a token at all.
    #[error("malformed token")]
    Malformed,
    /// The timestamp is outside the window.
    #[error("stale token")]
    Stale,
    /// The MAC does not verify.
    #[error("bad token")]
    BadMac,
}

/// A token that passed [`GateKey::check`]: the caller must still check its nonce for replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshToken {
    /// The token's timestamp (seconds since the Unix epoch).
    pub timestamp: u64,
    /// The token's random nonce.
    pub nonce: [u8; 16],
}

impl GateKey {
    /// Derives the gate key from the link's secret.
    pub fn derive(secret: &AccessSecret) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(None, &secret.0);
        // A key of HMAC-SHA256's block size, so `KeyInit::new` takes it without a length check.
        let mut key = [0u8; 64];
        // 64 bytes is far below HKDF-SHA256's 8160-byte output limit, so this cannot fail.
        let _ = hk.expand(b"postern/v1/gate", &mut key);
        GateKey(key)
    }

    /// HMAC over `context · parts…`.
    fn mac_over(&self, context: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(&self.0.into());
        mac.update(context);
        for part in parts {
            mac.update(part);
        }
        mac
    }

    /// The 16-byte tag over `context · parts…` (also for relays' tokens).
    pub(crate) fn tag(&self, context: &[u8], parts: &[&[u8]]) -> [u8; 16] {
        let full = self.mac_over(context, parts).finalize().into_bytes();
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&full[..16]);
        tag
    }

    /// Whether `tag` is the tag over `context · parts…`, in constant time.
    pub(crate) fn verify(&self, context: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac_over(context, parts).verify_truncated_left(tag).is_ok()
    }

    /// Makes a token for the given time and random nonce.
    pub fn token(&self, now_secs: u64, nonce: [u8; 16]) -> String {
        let tag = self.tag(MAC_CONTEXT, &[&now_secs.to_be_bytes(), &nonce]);
        let mut raw = Vec::with_capacity(TOKEN_LEN);
        raw.extend_from_slice(&now_secs.to_be_bytes());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks a token's form, freshness and MAC (in constant time).
    pub fn check(&self, token: &str, now_secs: u64) -> Result<FreshToken, GateError> {
        if token.len() > 64 {
            return Err(GateError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| GateError::Malformed)?;
        if raw.len() != TOKEN_LEN {
            return Err(GateError::Malformed);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let timestamp = u64::from_be_bytes(ts);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&raw[8..24]);
        if !self.verify(MAC_CONTEXT, &[&ts, &nonce], &raw[24..]) {
            return Err(GateError::BadMac);
        }
        if timestamp.abs_diff(now_secs) > WINDOW_SECS {
            return Err(GateError::Stale);
        }
        Ok(FreshToken { timestamp, nonce })
    }
}

/// Finds the gate cookie's value in a `Cookie` header value.
pub fn cookie_value(header: &str) -> Option<&str> {
    cookie(header, COOKIE_NAME)
}

/// Finds cookie `name`'s value in a `Cookie` header value.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> GateKey {
        GateKey::derive(&AccessSecret([9; 32]))
    }

    #[test]
    fn fresh_token_passes_and_reports_its_nonce() {
        let t = key().token(1_000_000, [3; 16]);
        assert_eq!(
            key().check(&t, 1_000_100),
            Ok(FreshToken { timestamp: 1_000_000, nonce: [3; 16] })
        );
    }

    #[test]
    fn refusals() {
        let t = key().token(1_000_000, [3; 16]);
        assert_eq!(key().check(&t, 1_000_000 + WINDOW_SECS + 1), Err(GateError::Stale));
        let other = GateKey::derive(&AccessSecret([8; 32]));
        assert_eq!(other.check(&t, 1_000_000), Err(GateError::BadMac));
        assert_eq!(key().check("not a token", 0), Err(GateError::Malformed));
        assert_eq!(key().check(&t[..20], 0), Err(GateError::Malformed));
        let mut tampered = t.clone().into_bytes();
        tampered[2] ^= 1;
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(key().check(&tampered, 1_000_000).is_err());
    }

    #[test]
    fn cookie_parsing() {
        assert_eq!(cookie_value("a=1; sid=xyz; b=2"), Some("xyz"));
        assert_eq!(cookie_value("sidx=1"), None);
        assert_eq!(cookie_value(""), None);
    }

    proptest::proptest! {
        #[test]
        fn any_token_checks_within_its_window(secret in proptest::prelude::any::<[u8; 32]>(), now in 0..u64::MAX / 2, skew in 0..=WINDOW_SECS, nonce in proptest::prelude::any::<[u8; 16]>()) {
            let key = GateKey::derive(&AccessSecret(secret));
            let token = key.token(now, nonce);
            let fresh = Ok(FreshToken { timestamp: now, nonce });
            proptest::prop_assert_eq!(key.check(&token, now + skew), fresh);
            proptest::prop_assert_eq!(key.check(&token, now.saturating_sub(skew)), fresh);
        }
    }
}
