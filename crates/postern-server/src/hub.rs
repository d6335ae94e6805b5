//! Fan-out of "new entry" notices from appends to the sessions subscribed to a log.
//!
//! A notice is a hint that carries the new item so the common case needs no read. Sessions
//! keep their own cursor per log and read from the store whenever a notice does not follow
//! it, so a dropped notice delays delivery but never loses an entry. When a session's queue is
//! full the hub drops the notice and marks the session lagged; the session then catches up
//! every subscription from the store.
//!
//! On several nodes the same notices travel between nodes (NATS); this in-process hub is the
//! single-node case.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use postern_proto::frame::Item;
use postern_proto::ids::LogId;
use tokio::sync::Notify;

/// Notices one session may have queued before it counts as lagged.
const QUEUE: usize = 256;

/// Room a drained queue keeps for the next notices; past it the room is given back.
const QUEUE_KEPT: usize = 8;

/// A new entry in a log.
#[derive(Debug, Clone)]
pub(crate) struct Notice {
    pub(crate) log: LogId,
    pub(crate) item: Arc<Item>,
}

/// What a session hears from the hub.
pub(crate) enum Heard {
    Notice(Notice),
    /// Notices were dropped since the last time: every subscription must catch up from the
    /// store.
    Lagged,
}

/// A session's end of the hub.
pub(crate) struct Subscriber {
    pub(crate) id: u64,
    shared: Arc<Shared>,
}

/// A session's queue of notices.
///
/// A plain queue under a lock rather than a channel: an idle session holds none of it (a
/// bounded tokio channel allocates its first block of 32 slots, 1.8 KiB with the channel,
/// when it is made; BENCHMARKS.md), and a drained queue keeps room for a few notices only.
struct Shared {
    queue: Mutex<VecDeque<Notice>>,
    lagged: AtomicBool,
    wake: Notify,
}

impl Subscriber {
    /// Waits for the next notice, or for the news that some were dropped. Cancel-safe: what
    /// it takes from the queue it returns in the same poll.
    pub(crate) async fn next(&self) -> Heard {
        loop {
            if self.shared.lagged.swap(false, Ordering::AcqRel) {
                return Heard::Lagged;
            }
            if let Ok(mut queue) = self.shared.queue.lock()
                && let Some(notice) = queue.pop_front()
            {
                if queue.is_empty() {
                    queue.shrink_to(QUEUE_KEPT);
                }
                return Heard::Notice(notice);
            }
            self.shared.wake.notified().await;
        }
    }
}

#[derive(Default)]
pub(crate) struct Hub {
    inner: Mutex<HubInner>,
}

#[derive(Default)]
struct HubInner {
    next_id: u64,
    logs: HashMap<LogId, Vec<(u64, Arc<Shared>)>>,
}

impl Hub {
    /// A new subscriber with an empty queue.
    pub(crate) fn subscriber(&self) -> Subscriber {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            lagged: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let id = match self.inner.lock() {
            Ok(mut inner) => {
                inner.next_id += 1;
                inner.next_id
            }
            Err(_) => 0,
        };
        Subscriber { id, shared }
    }

    pub(crate) fn subscribe(&self, log: LogId, sub: &Subscriber) {
        if let Ok(mut inner) = self.inner.lock() {
            let list = inner.logs.entry(log).or_default();
            if !list.iter().any(|(id, _)| *id == sub.id) {
                list.push((sub.id, sub.shared.clone()));
            }
        }
    }

    pub(crate) fn unsubscribe(&self, log: &LogId, id: u64) {
        if let Ok(mut inner) = self.inner.lock()
            && let Some(list) = inner.logs.get_mut(log)
        {
            list.retain(|(sid, _)| *sid != id);
            if list.is_empty() {
                inner.logs.remove(log);
            }
        }
    }

    pub(crate) fn unsubscribe_all(&self, logs: impl Iterator<Item = LogId>, id: u64) {
        for log in logs {
            self.unsubscribe(&log, id);
        }
    }

    /// Tells every subscriber of `log` about a new item.
    pub(crate) fn notify(&self, log: LogId, item: Item) {
        let targets: Vec<Arc<Shared>> = match self.inner.lock() {
            Ok(inner) => match inner.logs.get(&log) {
                Some(list) => list.iter().map(|(_, s)| s.clone()).collect(),
                None => return,
            },
            Err(_) => return,
        };
        let notice = Notice { log, item: Arc::new(item) };
        for shared in targets {
            match shared.queue.lock() {
                Ok(mut queue) if queue.len() < QUEUE => queue.push_back(notice.clone()),
                _ => shared.lagged.store(true, Ordering::Release),
            }
            shared.wake.notify_one();
        }
    }

    /// Subscriptions held, for metrics.
    pub(crate) fn subscriptions(&self) -> usize {
        self.inner.lock().map(|i| i.logs.values().map(Vec::len).sum()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    fn item(seq: u64) -> Item {
        Item { seq, total_len: 1, bytes: vec![1] }
    }

    #[tokio::test]
    async fn notices_arrive_in_order_and_an_overflow_says_so_once() {
        let hub = Hub::default();
        let log = LogId([1; 32]);
        let sub = hub.subscriber();
        assert!(sub.next().now_or_never().is_none(), "nothing yet");
        hub.subscribe(log, &sub);
        hub.notify(LogId([2; 32]), item(1));
        assert!(sub.next().now_or_never().is_none(), "another log's entry");

        hub.notify(log, item(1));
        match sub.next().await {
            Heard::Notice(n) => assert_eq!((n.log, n.item.seq), (log, 1)),
            Heard::Lagged => panic!("one notice is no overflow"),
        }

        for seq in 2..(QUEUE as u64 + 12) {
            hub.notify(log, item(seq));
        }
        assert!(matches!(sub.next().await, Heard::Lagged), "the overflow first");
        for seq in 2..(QUEUE as u64 + 2) {
            match sub.next().await {
                Heard::Notice(n) => assert_eq!(n.item.seq, seq),
                Heard::Lagged => panic!("told twice"),
            }
        }
        assert!(sub.next().now_or_never().is_none(), "the queue is drained");
        assert!(
            sub.shared.queue.lock().unwrap().capacity() <= QUEUE_KEPT,
            "and gave its room back"
        );

        hub.unsubscribe(&log, sub.id);
        hub.notify(log, item(999));
        assert!(sub.next().now_or_never().is_none(), "unsubscribed");
    }
}
