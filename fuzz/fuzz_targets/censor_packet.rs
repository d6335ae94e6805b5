//! The censor lab reads packets, ClientHellos and DNS queries from programs under test: its
//! parsers and its engine must take any bytes without panicking.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postern_censor::dns::{self, Zone};
use postern_censor::engine::{AddrMap, Engine};
use postern_censor::hello;
use postern_censor::profile::Profile;

fn lab() -> Option<&'static (Profile, AddrMap, Zone)> {
    static LAB: OnceLock<Option<(Profile, AddrMap, Zone)>> = OnceLock::new();
    LAB.get_or_init(|| Some((Profile::load("ru-2026-06").ok()?, AddrMap::lab(), Zone::lab())))
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let _ = hello::parse(data);
    let _ = hello::tls_in_tls(data);
    let Some((profile, map, zone)) = lab() else { return };
    let _ = dns::answer(zone, &["messenger.example".to_owned()], data);
    if let Ok(mut engine) = Engine::new(profile.clone(), map.clone(), zone.clone()) {
        // The same bytes as one packet, then as a stream of packets split at a NUL.
        engine.packet(data, 0);
        for (i, part) in data.split(|b| *b == 0).enumerate() {
            engine.packet(part, i as u64 * 1000);
        }
    }
});
