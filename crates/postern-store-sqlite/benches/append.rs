//! The store's write path on its own: batches of appends to 100 logs, each durable
//! before it is acknowledged (WAL, `synchronous=FULL`), as the server makes them under
//! full load (`postern bench throughput`). BENCHMARKS.md has the figures.

#![allow(clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use postern_proto::ids::{IdemKey, LogId, PublicKey};
use postern_store::{NewEntry, Store};
use postern_store_sqlite::{Options, SqliteStore};

const LOGS: u8 = 100;
/// Appends submitted at once: about what 100 pairs with 32 appends in flight keep queued.
const BATCH: u64 = 512;
/// An envelope as `postern bench` sends it (374 bytes of ciphertext in its envelope).
const ENVELOPE: usize = 468;

/// How the bench makes the `n`th idempotency key.
#[derive(Clone, Copy)]
enum Keys {
    /// Growing, as clients make them (the clock first: `IdemKey::ordered`).
    Ordered,
    /// Random, as clients made them before: each lands on a page of its own in a log's part
    /// of the `(log, idem)` index.
    Random,
}

impl Keys {
    fn key(self, n: u64) -> IdemKey {
        match self {
            Keys::Ordered => IdemKey::ordered(n, [0; 12]),
            Keys::Random => {
                // splitmix64: random-looking and repeatable.
                let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                let mut key = [0u8; 16];
                key[..8].copy_from_slice(&(z ^ (z >> 31)).to_be_bytes());
                key[8..].copy_from_slice(&n.to_be_bytes());
                IdemKey(key)
            }
        }
    }
}

fn appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(BATCH));
    for (name, keys) in [
        ("append, 512 at once over 100 logs", Keys::Ordered),
        ("append, 512 at once over 100 logs, random keys", Keys::Random),
    ] {
        appends_with(&mut group, name, keys);
    }
    group.finish();
}

fn appends_with(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    keys: Keys,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store =
        SqliteStore::open(&dir.path().join("postern.db"), Options::default()).expect("the store");
    let key = PublicKey([7; 32]);
    rt.block_on(async {
        for i in 0..LOGS {
            store.create_log(LogId([i; 32]), key, 20_000).await.expect("a log");
        }
    });
    let counter = AtomicU64::new(0);
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let entry = NewEntry {
                            idem: keys.key(n),
                            key_id: key.key_id(),
                            next_key: None,
                            data: vec![(n % 251) as u8; ENVELOPE],
                            from_upload: None,
                        };
                        (LogId([(n % u64::from(LOGS)) as u8; 32]), entry)
                    })
                    .collect::<Vec<_>>()
            },
            |batch| {
                rt.block_on(async {
                    let tasks: Vec<_> = batch
                        .into_iter()
                        .map(|(log, entry)| {
                            let store = store.clone();
                            tokio::spawn(async move { store.append(log, entry, 20_000).await })
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("the task").expect("the append");
                    }
                })
            },
            BatchSize::PerIteration,
        )
    });
    store.close();
}

criterion_group!(benches, appends);
criterion_main!(benches);
