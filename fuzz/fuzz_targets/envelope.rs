//! Envelopes as the server and members decode them; canonical.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::envelope::Envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        assert_eq!(env.encode(), data);
    }
});
