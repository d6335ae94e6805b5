//! The bytes of an HTTP/1 request hyper could not parse, as the website (a server's or a
//! relay's public face) answers them in nginx's words: a status line and headers, or for
//! HTTP/0.9 a body alone.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let answer = postern_server::site_unparsed_answer(data).expect("every request is answered");
    assert!(!answer.is_empty());
    if answer.starts_with(b"HTTP/1.1 ") {
        assert!(answer.windows(4).any(|w| w == b"\r\n\r\n"), "a whole head");
    }
});
