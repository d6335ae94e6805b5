//! Payloads other clients send inside encryption: claimed key packages, mailbox drops and
//! application messages, and the group context extensions with a group's rules and its servers. Each decoder must refuse or round-trip exactly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_proto::content::{AppMessage, DropPayload, GroupMeta, KeyPackagePayload, ServerList};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = KeyPackagePayload::decode(data) {
        assert_eq!(p.encode(), data);
    }
    if let Ok(p) = DropPayload::decode(data) {
        assert_eq!(p.encode(), data);
    }
    if let Ok(m) = AppMessage::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(m) = GroupMeta::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(l) = ServerList::decode(data) {
        assert_eq!(l.encode(), data);
    }
});
