//! Integration tests: the real `postern` binary on loopback, driven by the real client
//! connection. One test binary with modules, so the binary links once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)]

mod abuse;
mod authz;
mod bench;
mod chat;
mod cli;
mod config;
mod crash;
mod disclosure;
mod durability;
mod group;
mod logs;
mod lookalike;
mod moves;
mod ops;
mod relay;
mod stranger;

use std::path::Path;

use postern_net::Connection;
use postern_proto::envelope::Envelope;
use postern_proto::frame::Request;
use postern_proto::ids::{IdemKey, LogId, MailboxId, PublicKey, public_key};
use postern_test_support::ids;

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

/// Creates a log on `c`; returns its first append key and its id.
async fn new_log(c: &mut Connection) -> (ed25519_dalek::SigningKey, LogId) {
    let key = ids::signing_key();
    let log = ids::log();
    c.request(Request::LogCreate { log, key: public_key(&key) }, Some(&key)).await.unwrap();
    (key, log)
}

/// Creates a mailbox on `c`; returns its owner key and its id.
async fn new_mailbox(c: &mut Connection) -> (ed25519_dalek::SigningKey, MailboxId) {
    let key = ids::signing_key();
    let mailbox = ids::mailbox();
    c.request(Request::MailboxCreate { mailbox, owner_key: public_key(&key) }, Some(&key))
        .await
        .unwrap();
    (key, mailbox)
}
