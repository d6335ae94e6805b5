//! Gate tokens from the cookie of any HTTP request, including strangers': a server's, and a
//! relay's (whose credential path comes from the token itself).
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::gate::{AccessSecret, GateKey, cookie_value};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let secret = AccessSecret([7; 32]);
        let token = cookie_value(text).unwrap_or(text);
        let _ = GateKey::derive(&secret).check(token, 1_800_000_000);
        let _ = postern_proto::relay::check(&secret, token, 1_800_000_000);
    }
});
