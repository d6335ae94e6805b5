//! Append keys by log and key id, decoded once and kept for a minute, so an append needs no
//! store read. A key the store no longer holds (expired and swept) may be honoured here for
//! at most [`TTL`] more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use postern_proto::ids::{KeyId, LogId, PreparedKey};

/// How long a key read from the store is trusted without reading it again.
pub(crate) const TTL: Duration = Duration::from_secs(60);
/// Most keys held; past it the cache starts again empty.
const CAPACITY: usize = 100_000;

#[derive(Default)]
pub(crate) struct KeyCache(Mutex<HashMap<(LogId, KeyId), (PreparedKey, Instant)>>);

impl KeyCache {
    /// The key, if read from the store less than [`TTL`] ago.
    pub(crate) fn get(&self, log: LogId, key_id: KeyId, now: Instant) -> Option<PreparedKey> {
        let cache = self.0.lock().ok()?;
        let (key, at) = cache.get(&(log, key_id))?;
        (now.saturating_duration_since(*at) < TTL).then(|| key.clone())
    }

    pub(crate) fn put(&self, log: LogId, key: PreparedKey, now: Instant) {
        if let Ok(mut cache) = self.0.lock() {
            if cache.len() >= CAPACITY {
                cache.clear();
            }
            cache.insert((log, key.key_id()), (key, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use postern_proto::ids::PublicKey;

    use super::*;

    #[test]
    fn keys_are_kept_for_their_ttl_only() {
        let cache = KeyCache::default();
        let signing = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let key = PreparedKey::new(&PublicKey(signing.verifying_key().to_bytes())).unwrap();
        let (log, t0) = (LogId([1; 32]), Instant::now());
        assert!(cache.get(log, key.key_id(), t0).is_none());
        cache.put(log, key.clone(), t0);
        assert!(cache.get(log, key.key_id(), t0 + TTL / 2).is_some());
        assert!(cache.get(LogId([2; 32]), key.key_id(), t0).is_none(), "keyed by log too");
        assert!(cache.get(log, key.key_id(), t0 + TTL).is_none(), "read again after the TTL");
    }
}
