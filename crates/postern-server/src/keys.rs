//! Append keys by log and key id, decoded once and kept for a minute, so an append needs no
//! store read. The sweep, which removes expired keys, clears the cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use postern_proto::ids::{KeyId, LogId, PreparedKey};

/// How long a key read from the store is trusted without reading it again.
pub(crate) const TTL: Duration = Duration::from_secs(60);
/// Most keys held; past it the cache starts again empty.
const CAPACITY: usize = 100_000;

#[derive(Default)]
pub(crate) struct KeyCache(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    keys: HashMap<(LogId, KeyId), (PreparedKey, Instant)>,
    /// Bumped by every [`KeyCache::clear`], so a key read from the store before a sweep is
    /// not cached after it.
    generation: u64,
}

impl KeyCache {
    /// The key, if read from the store less than [`TTL`] ago; else the generation to hand
    /// to [`put`](Self::put) with the key read from the store.
    pub(crate) fn get(&self, log: LogId, key_id: KeyId, now: Instant) -> Result<PreparedKey, u64> {
        let Ok(cache) = self.0.lock() else { return Err(u64::MAX) };
        match cache.keys.get(&(log, key_id)) {
            Some((key, at)) if now.saturating_duration_since(*at) < TTL => Ok(key.clone()),
            _ => Err(cache.generation),
        }
    }

    /// Caches a key read from the store, unless the cache was cleared since `generation`.
    pub(crate) fn put(&self, log: LogId, key: PreparedKey, generation: u64, now: Instant) {
        if let Ok(mut cache) = self.0.lock()
            && cache.generation == generation
        {
            if cache.keys.len() >= CAPACITY {
                cache.keys.clear();
            }
            cache.keys.insert((log, key.key_id()), (key, now));
        }
    }

    /// Forgets every key (after the sweep removed expired ones).
    pub(crate) fn clear(&self) {
        if let Ok(mut cache) = self.0.lock() {
            cache.keys.clear();
            cache.generation += 1;
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
        let generation = cache.get(log, key.key_id(), t0).unwrap_err();
        cache.put(log, key.clone(), generation, t0);
        assert!(cache.get(log, key.key_id(), t0 + TTL / 2).is_ok());
        assert!(cache.get(LogId([2; 32]), key.key_id(), t0).is_err(), "keyed by log too");
        assert!(cache.get(log, key.key_id(), t0 + TTL).is_err(), "read again after the TTL");
        // A key read before a clear (the sweep) is not cached after it.
        cache.clear();
        let before = generation;
        assert!(cache.get(log, key.key_id(), t0).is_err(), "cleared");
        cache.put(log, key.clone(), before, t0);
        assert!(cache.get(log, key.key_id(), t0).is_err(), "a stale read is not cached");
    }
}
