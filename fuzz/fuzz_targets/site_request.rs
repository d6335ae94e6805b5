//! A stranger's request to the website (a server's or a relay's public face): the method on
//! the first line, the request target on the second, then `name: value` header lines. The
//! site reads the path, Range, If-* and Accept-Encoding itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let (Some(method), Some(target)) = (lines.next(), lines.next()) else { return };
    let headers: Vec<(&[u8], &[u8])> = lines
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii()))
        })
        .collect();
    if let Some(status) = postern_server::site_answer_status(method, target, &headers) {
        assert!((200..600).contains(&status));
    }
});
