//! Padded frames after decryption: unpadding never panics, and pad(unpad(x)) == x.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::pad::{pad, unpad};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = unpad(data) {
        assert_eq!(pad(frame).as_deref(), Some(data));
    }
});
