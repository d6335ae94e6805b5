//! Integration tests: the real `postern` binary on loopback, driven by the real client
//! connection. One test binary with modules, so the binary links once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

mod config;
mod disclosure;
mod durability;
mod ops;
mod stranger;

use std::path::Path;

use postern_proto::envelope::Envelope;
use postern_proto::ids::{IdemKey, LogId, PublicKey};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_postern"))
}

/// An envelope for `log`, signed by `key`, as bytes.
fn envelope(
    log: &LogId,
    key: &ed25519_dalek::SigningKey,
    idem: IdemKey,
    next_key: Option<PublicKey>,
    ciphertext: &[u8],
) -> Vec<u8> {
    Envelope::seal(log, key, idem, next_key, ciphertext.to_vec()).encode()
}
