//! M2, the national resolver: the lab's names (`profiles/lab.names`) answered from the censor
//! router, minus the names a profile removes (NXDOMAIN, as WhatsApp's were in February 2026).
//! A profile can also redirect every DNS query the client sends, to any resolver, to this
//! one. Messages are parsed and built with hickory-proto.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::profile::name_matches;

/// Names and their addresses.
#[derive(Debug, Clone, Default)]
pub struct Zone(Vec<(String, Ipv4Addr)>);

impl Zone {
    /// The lab's names.
    pub fn lab() -> Zone {
        Self::parse(include_str!("../profiles/lab.names")).unwrap_or_default()
    }

    /// `name address` lines; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Zone> {
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (name, addr) =
                line.split_once(char::is_whitespace).context("expected `name address`")?;
            out.push((name.to_ascii_lowercase(), addr.trim().parse()?));
        }
        Ok(Zone(out))
    }

    /// The address of `name`, if the zone has it.
    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.0.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
    }
}

/// The answer to one query message, or `None` for bytes that are not one.
pub fn answer(zone: &Zone, removed: &[String], query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let Some(q) = request.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response.to_vec().ok();
    };
    response.add_query(q.clone());
    let name = q.name().to_ascii();
    let found = zone.lookup(&name).filter(|_| !removed.iter().any(|r| name_matches(&name, r)));
    match found {
        Some(addr) if q.query_type() == RecordType::A => {
            response.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(addr))));
        }
        Some(_) => {}
        None => response.metadata.response_code = ResponseCode::NXDomain,
    }
    response.to_vec().ok()
}

/// Answers queries on `addr` until the process ends.
pub fn serve(socket: UdpSocket, zone: Zone, removed: Vec<String>) -> Result<()> {
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        if let Some(reply) = answer(&zone, &removed, &buf[..n]) {
            socket.send_to(&reply, from)?;
        }
    }
}

/// Asks `server` for the A record of `name`: `Ok(Some(addr))`, `Ok(None)` for a name that
/// does not exist, an error when no answer came.
pub fn query(server: SocketAddr, name: &str, timeout: Duration) -> Result<Option<Ipv4Addr>> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(timeout))?;
    let mut message = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    socket.send_to(&message.to_vec()?, server)?;
    let mut buf = [0u8; 1500];
    let (n, _) = socket.recv_from(&mut buf).context("no answer")?;
    let reply = Message::from_vec(&buf[..n])?;
    if reply.metadata.response_code == ResponseCode::NXDomain {
        return Ok(None);
    }
    Ok(reply.answers.iter().find_map(|r| match r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(zone: &Zone, removed: &[String], name: &str) -> Message {
        let mut q = Message::new(7, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        Message::from_vec(&answer(zone, removed, &q.to_vec().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn removed_names_do_not_exist_and_others_resolve() {
        let zone = Zone::lab();
        let removed = vec!["messenger.example".to_owned()];
        let ok = ask(&zone, &removed, "fine.example.");
        assert_eq!(ok.metadata.id, 7);
        assert!(matches!(ok.answers[0].data, RData::A(A(a)) if a == Ipv4Addr::new(10, 0, 2, 2)));
        let gone = ask(&zone, &removed, "messenger.example.");
        assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(ask(&zone, &[], "messenger.example.").answers.len(), 1);
        assert_eq!(answer(&zone, &removed, b"junk"), None);
    }
}
