//! Server links pasted or scanned by users. A link that parses formats to one that parses
//! to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::link::ServerLink;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(link) = ServerLink::parse(text)
    {
        assert_eq!(ServerLink::parse(&link.to_link_string()), Ok(link));
    }
});
