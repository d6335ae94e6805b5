//! Client frames as the server decodes them. Decoding never panics, and whatever decodes
//! re-encodes to the same bytes (the encoding is canonical, which signatures rely on).
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::frame::ClientFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ClientFrame::decode(data) {
        assert_eq!(frame.encode(), data);
    }
});
