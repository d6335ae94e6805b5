//! The censor lab reads packets and ClientHellos from programs under test: its TLS parser
//! and its engine must take any bytes without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_censor::dns::{self, Zone};
use postern_censor::engine::{AddrMap, Engine};
use postern_censor::hello;
use postern_censor::profile::Profile;

fuzz_target!(|data: &[u8]| {
    let _ = hello::parse(data);
    let _ = dns::answer(&Zone::lab(), &[], data);
    if let Ok(profile) = Profile::load("ru-2026-06")
        && let Ok(mut engine) = Engine::new(profile, AddrMap::lab(), Zone::lab())
    {
        // The same bytes as one packet, then as a stream of packets split at a NUL.
        engine.packet(data, 0);
        for part in data.split(|b| *b == 0) {
            engine.packet(part, 1);
        }
    }
});
