//! A 200-byte message from one client to another: the whole client path, the client's MLS
//! layer, and raw openmls over a store with the same settings.
//! `cargo bench -p postern-client --features bench --bench mls`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use postern_client::bench::{Chat, MlsPair, RawPair};

const TEXT: &str = "A two-hundred-byte message, about the length of a chat line that says a little more \
than hello: where to meet, when, and what to bring along, with a few words more to make up \
the count exactly........";

fn message(c: &mut Criterion) {
    assert_eq!(TEXT.len(), 200);
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("message 200 B, encrypt + decrypt");
    let mut raw = RawPair::new(dir.path()).unwrap();
    group.bench_function("raw openmls (SQLCipher, WAL, synchronous=FULL)", |b| {
        b.iter(|| raw.round_trip(TEXT.as_bytes()).unwrap())
    });
    let mut mls = MlsPair::new(&dir.path().join("mls")).unwrap();
    group.bench_function("client MLS layer (Client::encrypt, Client::receive)", |b| {
        b.iter(|| mls.round_trip(TEXT.as_bytes()).unwrap())
    });
    let mut chat = Chat::new(&dir.path().join("chat")).unwrap();
    group.bench_function("whole client (queue, outbox, envelope, receive_entry)", |b| {
        b.iter(|| chat.round_trip(TEXT).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = message
}
criterion_main!(benches);
