//! Micro-benchmarks of what the server does per message: frame decode and encode, padding,
//! the envelope's signature, the Noise transport. `cargo bench -p postern-proto`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use postern_proto::envelope::Envelope;
use postern_proto::frame::{Body, ClientFrame, Request};
use postern_proto::ids::{IdemKey, LogId, public_key};
use std::hint::black_box;

/// A 200-byte text as envelope ciphertext: 346-byte MLS message, nonce and tag.
const CIPHERTEXT: usize = 374;

fn envelope() -> (LogId, SigningKey, Envelope) {
    let log = LogId([7; 32]);
    let key = SigningKey::from_bytes(&[9; 32]);
    let env = Envelope::seal(&log, &key, IdemKey([1; 16]), None, vec![0x5a; CIPHERTEXT]);
    (log, key, env)
}

fn frames(c: &mut Criterion) {
    let (log, _, env) = envelope();
    let frame = ClientFrame {
        request_id: 42,
        request: Request::LogAppend { log, body: Body::Inline(env.encode()) },
        signature: None,
    };
    let bytes = frame.encode();
    c.bench_function("frame/encode log_append", |b| b.iter(|| black_box(&frame).encode()));
    c.bench_function("frame/decode log_append", |b| {
        b.iter(|| ClientFrame::decode(black_box(&bytes)).unwrap())
    });
    let padded = postern_proto::pad::pad(&bytes).unwrap();
    c.bench_function("frame/pad", |b| b.iter(|| postern_proto::pad::pad(black_box(&bytes))));
    c.bench_function("frame/unpad", |b| {
        b.iter(|| postern_proto::pad::unpad(black_box(&padded)).unwrap().len())
    });
}

fn envelopes(c: &mut Criterion) {
    let (log, key, env) = envelope();
    let public = public_key(&key);
    let bytes = env.encode();
    c.bench_function("envelope/decode", |b| b.iter(|| Envelope::decode(black_box(&bytes))));
    c.bench_function("envelope/seal (sign)", |b| {
        b.iter(|| Envelope::seal(&log, &key, IdemKey([1; 16]), None, vec![0x5a; CIPHERTEXT]))
    });
    c.bench_function("envelope/verify", |b| b.iter(|| black_box(&env).verify(&log, &public)));
    let prepared = postern_proto::ids::PreparedKey::new(&public).unwrap();
    c.bench_function("envelope/verify, key prepared", |b| {
        b.iter(|| black_box(&env).verify_prepared(&log, &prepared))
    });
}

criterion_group!(benches, frames, envelopes);
criterion_main!(benches);
