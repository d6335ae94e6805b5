//! The server side of the gate: token checks plus a replay cache. Relays use the same cache
//! with their own tokens (`relay`).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use postern_proto::gate::{FreshToken, GateKey, WINDOW_SECS};

/// Most nonces remembered. Beyond this, new tokens are refused (the website answers) until
/// old ones age out: failing closed keeps replays impossible.
const MAX_REMEMBERED: usize = 1_000_000;

pub(crate) struct Gate {
    key: GateKey,
    replay: ReplayCache,
}

/// The nonces of tokens that opened the gate and could still pass the freshness check.
#[derive(Default)]
pub(crate) struct ReplayCache {
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    nonces: HashSet<[u8; 16]>,
    order: VecDeque<(u64, [u8; 16])>,
}

impl Gate {
    pub(crate) fn new(key: GateKey) -> Self {
        Gate { key, replay: ReplayCache::default() }
    }

    /// Whether `token` opens the gate now. A token opens it at most once.
    pub(crate) fn admit(&self, token: &str, now_secs: u64) -> bool {
        self.key.check(token, now_secs).is_ok_and(|fresh| self.replay.first_use(fresh, now_secs))
    }
}

impl ReplayCache {
    /// Whether this is the first time a checked token is used; remembers it.
    pub(crate) fn first_use(&self, fresh: FreshToken, now_secs: u64) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        // Forget nonces whose tokens can no longer pass the freshness check.
        let horizon = now_secs.saturating_sub(WINDOW_SECS);
        while let Some(&(ts, nonce)) = seen.order.front() {
            if ts >= horizon && seen.order.len() < MAX_REMEMBERED {
                break;
            }
            if ts >= horizon {
                return false;
            }
            seen.order.pop_front();
            seen.nonces.remove(&nonce);
        }
        if !seen.nonces.insert(fresh.nonce) {
            return false;
        }
        // Timestamps can arrive out of order within the window; keep the queue ordered by
        // the latest time a nonce could still be valid.
        seen.order.push_back((fresh.timestamp.max(now_secs), fresh.nonce));
        true
    }
}

#[cfg(test)]
mod tests {
    use postern_proto::gate::AccessSecret;

    use super::*;

    #[test]
    fn admits_once_and_forgets_after_the_window() {
        let key = GateKey::derive(&AccessSecret([1; 32]));
        let gate = Gate::new(key.clone());
        let t = key.token(10_000, [1; 16]);
        assert!(gate.admit(&t, 10_000));
        assert!(!gate.admit(&t, 10_001), "replay");
        assert!(gate.admit(&key.token(10_000, [2; 16]), 10_002));
        assert!(!gate.admit(&t, 10_000 + WINDOW_SECS + 1), "stale");
        assert!(!gate.admit("garbage", 10_000));
        let other = GateKey::derive(&AccessSecret([2; 32]));
        assert!(!gate.admit(&other.token(10_000, [3; 16]), 10_000), "wrong secret");
    }
}
