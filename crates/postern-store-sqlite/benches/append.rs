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

fn appends(c: &mut Criterion) {
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
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("append, 512 at once over 100 logs", |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let mut idem = [0u8; 16];
                        idem[..8].copy_from_slice(&n.to_be_bytes());
                        let entry = NewEntry {
                            idem: IdemKey(idem),
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
    group.finish();
    store.close();
}

criterion_group!(benches, appends);
criterion_main!(benches);
