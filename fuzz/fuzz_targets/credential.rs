//! Device credentials arrive in other members' MLS leaves: decoding must refuse or round-trip
//! exactly, and checking one must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::credential::DeviceCredential;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = DeviceCredential::decode(data) {
        assert_eq!(c.encode(), data);
        let _ = c.verify();
    }
});
