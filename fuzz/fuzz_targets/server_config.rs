//! The server's configuration file: any text parses or is refused, and what parses applies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_server::{FileConfig, ServerConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(file) = FileConfig::parse(text)
    {
        file.apply(&mut ServerConfig::new("data".into()));
    }
});
