//! A stranger's request to the website (a server's or a relay's public face): the method on
//! the first line (`GET 1.1` for HTTP/1.1, HTTP/2 otherwise), the request target on the
//! second, then `name: value` header lines. The site reads the path, Host, Range, If-* and
//! Accept-Encoding itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let (Some(first), Some(target)) = (lines.next(), lines.next()) else { return };
    let (method, http1) = match first.strip_suffix(b" 1.1") {
        Some(method) => (method, true),
        None => (first, false),
    };
    let headers: Vec<(&[u8], &[u8])> = lines
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii()))
        })
        .collect();
    if let Some(status) = postern_server::site_answer_status(http1, method, target, &headers) {
        assert!((200..600).contains(&status));
    }
});
