//! The first message of a session, which the server reads from anyone who passed the gate.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::session::{StaticKeypair, server_respond};

fuzz_target!(|data: &[u8]| {
    let keypair = StaticKeypair::from_private([9; 32]);
    let _ = server_respond(&keypair, data, [0; 32]);
});
