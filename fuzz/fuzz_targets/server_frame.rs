//! Server frames as clients decode them; canonical like client frames.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::frame::ServerFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ServerFrame::decode(data) {
        assert_eq!(frame.encode(), data);
    }
});
