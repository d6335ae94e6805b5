//! Limits a stranger cannot push past: token buckets (requests per connection, new
//! connections per address), open connections per address, and the shared budget of
//! buffered request bytes. Per-address limits are a backstop only: relays, NAT and carriers
//! put many people behind one address, so their defaults are generous.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// A token bucket: `rate` a second on average, `burst` at once.
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn full(burst: u32, now: Instant) -> Self {
        Bucket { tokens: f64::from(burst), last: now }
    }

    /// Tokens the bucket holds at `now`.
    fn level(&self, now: Instant, rate: u32, burst: u32) -> f64 {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * f64::from(rate);
        (self.tokens + refill).min(f64::from(burst))
    }

    fn refill(&mut self, now: Instant, rate: u32, burst: u32) {
        self.tokens = self.level(now, rate, burst);
        self.last = now;
    }

    /// Takes one token, if there is one.
    pub(crate) fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        self.refill(now, rate, burst);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Whether the bucket would be full at `now` (so forgetting it changes nothing).
    fn is_full(&self, now: Instant, rate: u32, burst: u32) -> bool {
        self.level(now, rate, burst) >= f64::from(burst)
    }
}

/// Per-address connection limits of the public listener.
#[derive(Clone, Copy)]
pub(crate) struct PerIpLimits {
    /// Most open connections from one address.
    pub(crate) open: usize,
    /// New connections one address may open per second, on average.
    pub(crate) rate: u32,
    /// New connections one address may open at once beyond that rate.
    pub(crate) burst: u32,
}

/// One address's open connections and its bucket of new ones.
struct Peer {
    open: usize,
    bucket: Bucket,
}

/// Open connections and new-connection rate per peer address.
pub(crate) struct PerIp {
    limits: PerIpLimits,
    state: Mutex<PerIpState>,
}

struct PerIpState {
    peers: HashMap<IpAddr, Peer>,
    /// When the table reaches this size, forgettable entries are swept (amortized O(1)).
    sweep_at: usize,
}

/// Smallest table size that triggers a sweep.
const MIN_SWEEP: usize = 1_024;

impl PerIp {
    pub(crate) fn new(limits: PerIpLimits) -> Self {
        PerIp {
            limits,
            state: Mutex::new(PerIpState { peers: HashMap::new(), sweep_at: MIN_SWEEP }),
        }
    }

    /// Counts a new connection from `ip`, unless the address is at its cap of open
    /// connections or past its rate of new ones.
    pub(crate) fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        let PerIpLimits { open, rate, burst } = self.limits;
        let Ok(mut state) = self.state.lock() else { return false };
        if state.peers.len() >= state.sweep_at {
            state.peers.retain(|_, p| p.open > 0 || !p.bucket.is_full(now, rate, burst));
            state.sweep_at = (state.peers.len() * 2).max(MIN_SWEEP);
        }
        let peer = state
            .peers
            .entry(ip)
            .or_insert_with(|| Peer { open: 0, bucket: Bucket::full(burst, now) });
        if peer.open >= open || !peer.bucket.take(now, rate, burst) {
            return false;
        }
        peer.open += 1;
        true
    }

    /// A connection from `ip` ended. The entry stays until its bucket is full again.
    pub(crate) fn release(&self, ip: IpAddr) {
        if let Ok(mut state) = self.state.lock()
            && let Some(peer) = state.peers.get_mut(&ip)
        {
            peer.open = peer.open.saturating_sub(1);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state.lock().map_or(0, |s| s.peers.len())
    }
}

/// A budget of bytes shared by every connection: the cap on buffered request data.
pub(crate) struct Buffered {
    used: AtomicUsize,
    limit: usize,
}

impl Buffered {
    pub(crate) fn new(limit: usize) -> Self {
        Buffered { used: AtomicUsize::new(0), limit }
    }

    /// Takes `n` bytes of the budget, if they are free; they come back when the lease is
    /// dropped (answered, or its connection gone).
    pub(crate) fn try_take(self: &Arc<Self>, n: usize) -> Option<Lease> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .ok()
            .map(|_| Lease { budget: self.clone(), n })
    }
}

/// Bytes of the shared budget held by one request.
pub(crate) struct Lease {
    budget: Arc<Buffered>,
    n: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_buffer_budget_lends_up_to_its_limit_and_takes_back_on_drop() {
        let budget = Arc::new(Buffered::new(100));
        let a = budget.try_take(60);
        assert!(a.is_some());
        assert!(budget.try_take(50).is_none(), "over the limit");
        let b = budget.try_take(40);
        assert!(b.is_some());
        drop(a);
        assert!(budget.try_take(60).is_some(), "given back when dropped");
        drop(b);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut bucket = Bucket::full(3, t0);
        assert!((0..3).all(|_| bucket.take(t0, 2, 3)));
        assert!(!bucket.take(t0, 2, 3));
        let half = t0 + Duration::from_millis(500);
        assert!(bucket.take(half, 2, 3), "one token back after half a second at 2/s");
        assert!(!bucket.take(half, 2, 3));
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| bucket.take(later, 2, 3)), "refills up to the burst only");
        assert!(!bucket.take(later, 2, 3));
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x7f01_0000 + n))
    }

    #[test]
    fn an_address_is_held_to_its_open_connections_and_its_rate_of_new_ones() {
        let per_ip = PerIp::new(PerIpLimits { open: 2, rate: 1, burst: 4 });
        let t0 = Instant::now();
        assert!(per_ip.admit(ip(1), t0) && per_ip.admit(ip(1), t0));
        assert!(!per_ip.admit(ip(1), t0), "at the cap of open connections");
        assert!(per_ip.admit(ip(2), t0), "another address has its own");
        per_ip.release(ip(1));
        per_ip.release(ip(1));
        // Two of the four tokens were taken (the refused one took none): two are left.
        assert!(per_ip.admit(ip(1), t0));
        per_ip.release(ip(1));
        assert!(per_ip.admit(ip(1), t0));
        per_ip.release(ip(1));
        assert!(!per_ip.admit(ip(1), t0), "past the rate of new connections");
        assert!(per_ip.admit(ip(1), t0 + Duration::from_secs(1)), "and back after a second");
    }

    #[test]
    fn addresses_that_went_quiet_are_forgotten() {
        let per_ip = PerIp::new(PerIpLimits { open: 10, rate: 10, burst: 10 });
        let t0 = Instant::now();
        for n in 0..5_000 {
            assert!(per_ip.admit(ip(n), t0));
            per_ip.release(ip(n));
        }
        // A second later every bucket is full again and nothing is open: a sweep forgets them.
        let t1 = t0 + Duration::from_secs(1);
        for n in 5_000..5_000 + MIN_SWEEP as u32 * 4 {
            assert!(per_ip.admit(ip(n), t1));
        }
        assert!(
            per_ip.tracked() <= MIN_SWEEP * 4,
            "the quiet 5,000 are gone: {}",
            per_ip.tracked()
        );
    }
}
