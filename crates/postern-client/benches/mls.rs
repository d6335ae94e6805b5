//! A 200-byte message from one client to another: the whole client path, the client's MLS
//! layer, and raw openmls over a store with the same settings.
//! `cargo bench -p postern-client --features bench --bench mls`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use std::cell::RefCell;

use criterion::BatchSize;
use postern_client::bench::{BigGroup, Chat, Devices, MlsPair, RawPair, raw_add};

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

/// Creating a group with N members in one commit: the client (`Client::create_group`,
/// which also checks every credential) beside raw openmls; 1,000 for openmls alone.
fn add(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("create a group with N members");
    group.sample_size(10);
    let mut devices = Devices::new(dir.path(), 1_000).unwrap();
    let all = devices.key_packages.clone();
    let mut creator = postern_client::Client::init(
        &dir.path().join("creator"),
        postern_client::KeySource::KeyFile,
        "Creator",
        postern_client::bench::link(),
    )
    .unwrap();
    for n in [10, 100, 250, 1_000] {
        let kps = &all[..n];
        group.bench_function(format!("raw openmls, {n}"), |b| {
            b.iter(|| raw_add(&mut devices, kps).unwrap())
        });
        if n <= 250 {
            group.bench_function(format!("client, {n}"), |b| {
                b.iter(|| creator.create_group(kps).unwrap())
            });
        }
    }
    group.finish();
}

/// Processing one commit (an Update by the group's creator) in a group of 250: a raw
/// openmls member and a client member; each processes every commit, only one is timed.
fn commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let big = RefCell::new(BigGroup::new(dir.path(), 250).unwrap());
    let mut group = c.benchmark_group("process a commit, 250 members");
    group.sample_size(10);
    group.bench_function("raw openmls", |b| {
        b.iter_batched(
            || commit_seen_by(&big, Member::Client),
            |commit| big.borrow_mut().raw_process(&commit).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("client", |b| {
        b.iter_batched(
            || commit_seen_by(&big, Member::Raw),
            |commit| big.borrow_mut().client_process(&commit).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

enum Member {
    Client,
    Raw,
}

/// Alice's next commit, already processed by the member that is not being timed.
fn commit_seen_by(big: &RefCell<BigGroup>, other: Member) -> Vec<u8> {
    let mut big = big.borrow_mut();
    let commit = big.next_commit().unwrap();
    match other {
        Member::Client => big.client_process(&commit).unwrap(),
        Member::Raw => big.raw_process(&commit).unwrap(),
    }
    commit
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = message, add, commit
}
criterion_main!(benches);
