//! The transport engine's bookkeeping for each door (the direct one to a server, and each
//! relay): how fast it answers, how many connections it attempted lately, and the budget a
//! connection through it must stay under once a freeze was seen there.
//!
//! - **Freeze detector.** A request with no answer within `K × smoothed RTT` (at least
//!   [`MIN_WAIT`], at most [`MAX_WAIT`]) counts as frozen: the connection is dropped and the
//!   request sent again on a fresh one, through whichever door opens (every request the
//!   driver retries is idempotent). Each retry waits twice as long, so a slow link is not
//!   churned.
//! - **Per-connection budget.** Censors that freeze flows after about 25 packets or 16 KB
//!   (the Russian "l4-25" block) let a connection carry a few exchanges. A relay's
//!   connections start under [`RELAY_BUDGET`] (a relay is there for a censored network, and
//!   a freeze is punished with residual blocking, so the budget is not learned by freezing
//!   through one). A direct door starts with none; once it froze, its connections are
//!   rotated before they reach the packets the frozen one had spent when it sent its last
//!   request. Either way, before [`BUDGET_BYTES_IN`] received. Since the
//!   censor sits on the network rather than at one door, the budget also becomes that of
//!   every door without one (a first freeze can get the address blocked for a while, as the
//!   Russian "residual" blocking does, so the next door must not freeze too). Budgets are
//!   kept in the client store, per network, so the next command starts under them.
//! - **A probe lifts a relay's budget** where nothing froze: `listen` sends pings through a
//!   relay that worked, on one connection, until it is past [`PROBE_PACKETS`] packets and
//!   [`PROBE_BYTES_IN`] received, where a freezing censor would have cut it. If every ping
//!   is answered, the relay's connections go without a budget (and without the cap) on this
//!   network; if one is not, the freeze teaches the budget as any other does. Either way the
//!   relay is not probed again on this network for [`PROBE_AGAIN`]. The probe risks what
//!   a freeze costs (a relay blocked for the client for a minute where the censor punishes
//!   freezes) once a week per network and relay, against a few requests per connection
//!   and fifteen connections a minute for as long as the relay is used.
//! - **New connections per door** are capped at [`NEW_PER_MINUTE`] a minute wherever a budget
//!   applies (censors count connections per destination too, and cut off a destination past
//!   twenty a minute; a burst of them is itself a signal). Every attempt counts, answered
//!   or not, as it does for the censor. Their times are then kept in the client store, so
//!   short commands one after another share the cap. A direct door with no freeze seen is
//!   neither capped nor written down.
//! - **Spread over doors.** Where the cap applies, a new connection goes through the door
//!   that has worked and attempted the fewest connections in the last minute, so several
//!   relays carry the traffic together and each stays further from the censor's count.
//! - **Failed doors wait.** A door that could not be opened (blocked, or its host down), or
//!   that lost to a door tried after it, stands aside for [`FAILED_FOR`]: it is tried only
//!   when no other door is free. Doors none of which has worked in this process are tried
//!   only until a capped door that has is free again: a blocked address costs a connect
//!   timeout, far more than waiting for a working door's next slot.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use postern_net::Spent;

/// How many smoothed RTTs without an answer count as a freeze.
const K: u32 = 4;
/// The least time a request waits before it counts as frozen.
pub(crate) const MIN_WAIT: Duration = Duration::from_secs(2);
/// The most: a request this slow is lost whatever the cause.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// New connections one door may open per minute.
pub(crate) const NEW_PER_MINUTE: usize = 15;
/// Bytes a connection may receive once its door has a budget (below the 16 KB freeze).
pub(crate) const BUDGET_BYTES_IN: u64 = 12 << 10;
/// Above this many packets, a silent connection is not taken for a count-based freeze.
const FREEZE_BELOW: u32 = 48;
/// The budget a relay's connections start under, before any freeze: below the 25 packets
/// after which the Russian censor freezes flows to foreign hosting (`ru-2025-06` on), with a
/// margin for acknowledgements the estimate misses.
const RELAY_BUDGET: u32 = 22;
/// How long a door that could not be opened stands aside for the others.
pub(crate) const FAILED_FOR: Duration = Duration::from_secs(60);
/// A probe for a freeze goes on until its connection is past this many packets (beyond
/// [`FREEZE_BELOW`], where a count-based freeze would have struck)...
pub(crate) const PROBE_PACKETS: u32 = FREEZE_BELOW + 16;
/// ...and this many bytes received (beyond the censor's 16 KB).
pub(crate) const PROBE_BYTES_IN: u64 = 24 << 10;
/// The most pings one probe sends (about 300 bytes on the wire each way).
pub(crate) const PROBE_PINGS: usize = 160;
/// How long a probe's finding holds on a network.
pub(crate) const PROBE_AGAIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// The lowest budget: set-up and one exchange.
const MIN_BUDGET: u32 = postern_net::SETUP_PACKETS + 4;

/// A door, as the engine and the store name it: direct to a server address, or a relay.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum DoorKey {
    Direct(String),
    Relay(i64),
}

impl DoorKey {
    /// The budget a door of this kind starts with when neither it nor the network learned
    /// one: a relay is there for a censored network, so its connections start under the
    /// budget a freezing censor allows rather than learn it by a freeze (which the censor
    /// punishes with residual blocking); a direct door starts with none.
    pub(crate) fn starting_budget(&self) -> Option<u32> {
        match self {
            DoorKey::Relay(_) => Some(RELAY_BUDGET),
            DoorKey::Direct(_) => None,
        }
    }

    /// The name the store keeps budgets under.
    pub(crate) fn store_name(&self) -> String {
        match self {
            DoorKey::Direct(addr) => format!("direct {addr}"),
            DoorKey::Relay(id) => format!("relay {id}"),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct DoorState {
    srtt: Option<Duration>,
    /// When connections through it were attempted in the last minute.
    attempts: VecDeque<Instant>,
    /// Packets a connection may spend, once a freeze was seen.
    pub(crate) budget: Option<u32>,
    /// When the door last failed to open.
    failed: Option<Instant>,
    /// Whether it opened in this process.
    worked: bool,
    /// Whether a probe found that nothing freezes through it on this network: a budget
    /// learned through another door does not apply to it.
    pub(crate) lifted: bool,
}

impl DoorState {
    /// How long a request may go unanswered before it counts as frozen; `attempt` doubles it.
    pub(crate) fn freeze_wait(&self, attempt: u32) -> Duration {
        let base = self.srtt.map_or(MIN_WAIT, |rtt| rtt * K).clamp(MIN_WAIT, MAX_WAIT);
        (base * 2u32.saturating_pow(attempt)).min(MAX_WAIT)
    }

    /// A first estimate of the RTT, taken only while there is none.
    pub(crate) fn first_guess(&mut self, rtt: Duration) {
        if self.srtt.is_none() {
            self.srtt = Some(rtt);
        }
    }

    /// Takes an answered request's round trip into the smoothed RTT.
    pub(crate) fn sample(&mut self, rtt: Duration) {
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => (s * 7 + rtt) / 8,
        });
    }

    /// Whether the door may open another connection now: always while it has no budget;
    /// with one (a relay's from the start, a direct door's after a freeze), within the cap.
    pub(crate) fn may_open(&mut self, now: Instant) -> bool {
        self.forget_before(now);
        self.budget.is_none() || self.attempts.len() < NEW_PER_MINUTE
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .attempts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.attempts.pop_front();
        }
    }

    /// How the door stands for [`spread`] (as of the last [`may_open`](Self::may_open)).
    pub(crate) fn standing(&self) -> Standing {
        Standing { capped: self.budget.is_some(), worked: self.worked, recent: self.attempts.len() }
    }

    /// When [`may_open`](Self::may_open) will be true again.
    pub(crate) fn next_slot(&self) -> Option<Instant> {
        (self.budget.is_some() && self.attempts.len() >= NEW_PER_MINUTE)
            .then(|| self.attempts.front().map(|t| *t + Duration::from_secs(60)))
            .flatten()
    }

    /// A connection attempt through the door started (whether it opens or not).
    pub(crate) fn attempted(&mut self, now: Instant) {
        self.forget_before(now);
        self.attempts.push_back(now);
    }

    /// A connection through the door opened.
    pub(crate) fn opened(&mut self) {
        self.worked = true;
        self.failed = None;
    }

    /// The door could not be opened.
    pub(crate) fn failed(&mut self, now: Instant) {
        self.failed = Some(now);
    }

    /// Whether the door failed to open within the last [`FAILED_FOR`].
    pub(crate) fn failed_lately(&self, now: Instant) -> bool {
        self.failed.is_some_and(|at| now.duration_since(at) < FAILED_FOR)
    }

    /// Takes in connection attempts started `ages` ago (by earlier processes on this home).
    pub(crate) fn attempted_before(
        &mut self,
        now: Instant,
        ages: impl IntoIterator<Item = Duration>,
    ) {
        let mut times: Vec<Instant> =
            ages.into_iter().filter_map(|age| now.checked_sub(age)).collect();
        times.sort();
        self.attempts = times.into_iter().chain(self.attempts.drain(..)).collect();
    }

    /// A request went unanswered on a connection that had spent `before` when it was sent.
    /// If that is where a packet-counting censor freezes flows (under [`FREEZE_BELOW`]
    /// packets), its door's connections send nothing more once they reach it: returns the new
    /// budget. A connection that had carried more was not frozen by a count, so nothing is
    /// learned.
    pub(crate) fn froze(&mut self, before: Spent) -> Option<u32> {
        if before.packets > FREEZE_BELOW {
            return None;
        }
        let at = before.packets.max(MIN_BUDGET);
        let budget = self.budget.map_or(at, |b| b.min(at));
        self.budget = Some(budget);
        self.lifted = false;
        Some(budget)
    }

    /// Whether a connection that has spent `spent` should be replaced before sending a
    /// request of `len` bytes and reading an answer of up to `answer` bytes (and a spare
    /// acknowledgement).
    pub(crate) fn over_budget(&self, spent: Spent, len: usize, answer: usize) -> bool {
        let Some(budget) = self.budget else { return false };
        // The receiver may acknowledge each segment of the request at once (a new
        // connection's quick acknowledgements), which `Spent::after` counts only by halves.
        let request_acks = u32::try_from(len.div_ceil(postern_net::SEGMENT)).unwrap_or(u32::MAX);
        spent.after(len).after(answer).packets.saturating_add(1 + request_acks) >= budget
            || spent.bytes_in + postern_net::SEGMENT as u64 > BUDGET_BYTES_IN
    }
}

/// What [`spread`] knows of a door free to open a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Standing {
    capped: bool,
    worked: bool,
    recent: usize,
}

impl Standing {
    /// Whether the door opened in this process.
    pub(crate) fn worked(&self) -> bool {
        self.worked
    }
}

/// Orders doors free to open a connection, given the last one used first: where the cap
/// applies, the door that has worked and attempted the fewest connections in the last minute
/// goes first (among equals, the earlier). A door that never opened keeps its place: it
/// may be blocked, and a blocked door tried first costs a stagger on every connection.
pub(crate) fn spread<T>(ready: &mut Vec<(T, Standing)>) {
    if !ready.first().is_some_and(|(_, s)| s.capped) {
        return;
    }
    let best = ready
        .iter()
        .enumerate()
        .filter(|(_, (_, s))| s.capped && s.worked)
        .min_by_key(|(_, (_, s))| s.recent)
        .map(|(i, _)| i);
    if let Some(i) = best {
        let first = ready.remove(i);
        ready.insert(0, first);
    }
}

/// Every door's state in this process.
#[derive(Debug, Default)]
pub(crate) struct DoorBook(HashMap<DoorKey, DoorState>);

impl DoorBook {
    pub(crate) fn get(&mut self, key: &DoorKey) -> &mut DoorState {
        self.0.entry(key.clone()).or_default()
    }

    pub(crate) fn known(&self, key: &DoorKey) -> bool {
        self.0.contains_key(key)
    }

    /// A budget learned through one door becomes the budget of every door that has none
    /// (the censor that freezes flows sits on this network, not at one door), except a door
    /// a probe found free of it.
    pub(crate) fn network_budget(&mut self, budget: u32) {
        for state in self.0.values_mut() {
            if state.budget.is_none() && !state.lifted {
                state.budget = Some(budget);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_freeze_wait_follows_the_rtt_within_bounds_and_backs_off() {
        let mut d = DoorState::default();
        assert_eq!(d.freeze_wait(0), MIN_WAIT);
        d.sample(Duration::from_millis(100));
        assert_eq!(d.freeze_wait(0), MIN_WAIT, "4 × 100 ms is below the minimum");
        for _ in 0..50 {
            d.sample(Duration::from_secs(1));
        }
        let wait = d.freeze_wait(0);
        assert!(wait > Duration::from_millis(3_900) && wait <= Duration::from_secs(4), "{wait:?}");
        assert!(d.freeze_wait(1) > wait);
        assert_eq!(d.freeze_wait(10), MAX_WAIT);
    }

    #[test]
    fn new_connections_are_capped_per_minute_once_a_censor_was_seen() {
        let mut d = DoorState::default();
        let t0 = Instant::now();
        for _ in 0..NEW_PER_MINUTE * 2 {
            assert!(d.may_open(t0), "no cap before a freeze");
            d.attempted(t0);
        }
        let mut d = DoorState { budget: Some(25), ..DoorState::default() };
        for _ in 0..NEW_PER_MINUTE {
            assert!(d.may_open(t0));
            d.attempted(t0);
        }
        assert!(!d.may_open(t0 + Duration::from_secs(59)));
        assert_eq!(d.next_slot(), Some(t0 + Duration::from_secs(60)));
        assert!(d.may_open(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_door_that_failed_stands_aside_for_a_while_and_an_open_clears_it() {
        let mut d = DoorState::default();
        let t0 = Instant::now();
        assert!(!d.failed_lately(t0));
        d.failed(t0);
        assert!(d.failed_lately(t0 + FAILED_FOR / 2));
        assert!(!d.failed_lately(t0 + FAILED_FOR));
        d.failed(t0);
        d.opened();
        assert!(!d.failed_lately(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn new_connections_spread_over_the_capped_doors_that_worked() {
        let at = |capped, worked, recent| Standing { capped, worked, recent };
        let order = |mut ready: Vec<(char, Standing)>| {
            spread(&mut ready);
            ready.into_iter().map(|(c, _)| c).collect::<String>()
        };
        // The last used is busier than another that worked: the other goes first.
        assert_eq!(order(vec![('a', at(true, true, 5)), ('b', at(true, true, 2))]), "ba");
        // Among equals the last used stays first.
        assert_eq!(order(vec![('a', at(true, true, 2)), ('b', at(true, true, 2))]), "ab");
        // A door that never opened is not put first, however idle.
        assert_eq!(order(vec![('a', at(true, true, 5)), ('b', at(true, false, 0))]), "ab");
        // With no cap on the first (an open network), the order stands.
        assert_eq!(order(vec![('a', at(false, true, 9)), ('b', at(true, true, 0))]), "ab");
    }

    #[test]
    fn a_freeze_sets_a_budget_below_where_it_happened() {
        let mut d = DoorState::default();
        let fresh = Spent::new();
        assert!(!d.over_budget(fresh, 1_000, 256), "no budget before a freeze");
        let mut spent = fresh;
        for _ in 0..10 {
            spent = spent.after(300);
        }
        let budget = d.froze(spent).unwrap();
        assert_eq!(budget, spent.packets);
        assert!(d.over_budget(spent, 300, 256));
        assert!(!d.over_budget(Spent::new(), 300, 256));
        // A later freeze lower down lowers it; a higher one does not raise it.
        assert_eq!(d.froze(Spent::new()), Some(MIN_BUDGET));
        assert_eq!(d.froze(spent), Some(MIN_BUDGET));
        // A connection that carried far more was not stopped by a packet count.
        let mut long = spent;
        for _ in 0..100 {
            long = long.after(300);
        }
        let mut fresh_door = DoorState::default();
        assert_eq!(fresh_door.froze(long), None);
        assert_eq!(fresh_door.budget, None);
    }

    #[test]
    fn a_network_budget_spares_a_door_a_probe_lifted_until_it_freezes_itself() {
        let mut book = DoorBook::default();
        let (relay, direct) = (DoorKey::Relay(1), DoorKey::Direct("x".into()));
        book.get(&relay).lifted = true;
        book.get(&direct);
        book.network_budget(20);
        assert_eq!(book.get(&relay).budget, None, "a probe found no freeze through it");
        assert_eq!(book.get(&direct).budget, Some(20));
        // A freeze through the lifted door itself teaches it a budget after all.
        let mut spent = Spent::new();
        for _ in 0..4 {
            spent = spent.after(300);
        }
        assert_eq!(book.get(&relay).froze(spent), Some(spent.packets));
        assert!(!book.get(&relay).lifted);
        book.network_budget(MIN_BUDGET);
        assert_eq!(book.get(&relay).budget, Some(spent.packets), "its own budget stands");
    }
}
