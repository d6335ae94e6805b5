//! Server, invite and relay links pasted or scanned by users. A link that parses formats to
//! one that parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::link::{InviteLink, RelayLink, ServerLink};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(link) = ServerLink::parse(text) {
            assert_eq!(ServerLink::parse(&link.to_link_string()), Ok(link));
        }
        if let Ok(invite) = InviteLink::parse(text) {
            assert_eq!(InviteLink::parse(&invite.to_link_string()), Ok(invite));
        }
        if let Ok(relay) = RelayLink::parse(text) {
            assert_eq!(RelayLink::parse(&relay.to_link_string()), Ok(relay));
        }
    }
});
