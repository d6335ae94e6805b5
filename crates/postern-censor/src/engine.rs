//! The censor's decisions: every forwarded packet in, a verdict out. Pure (no sockets, no
//! clock), so each module is tested on packets built in memory; the daemon feeds it from
//! NFQUEUE.
//!
//! Per flow (TCP or UDP 5-tuple, oriented by who spoke first) it counts packets and payload
//! bytes both ways, reassembles the first [`MAX_STREAM`] bytes the client sends (TCP, by
//! sequence number, so a ClientHello split across segments is read whole), and once a
//! module condemns the flow, drops every later packet of it in both directions, without a
//! reset — what users of the real censor see as a hang.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use serde::Serialize;

use crate::hello::{self, Parsed};
use crate::profile::{Profile, name_matches};

/// How much of the client's stream is reassembled and inspected.
pub const MAX_STREAM: usize = 16 * 1024;

/// An IPv4 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    base: u32,
    mask: u32,
}

impl Cidr {
    /// Parses `a.b.c.d/n` (or a bare address).
    pub fn parse(s: &str) -> anyhow::Result<Cidr> {
        let (addr, bits) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr.parse().map_err(|_| anyhow::anyhow!("bad address in {s:?}"))?;
        let bits: u32 = bits.parse().map_err(|_| anyhow::anyhow!("bad prefix in {s:?}"))?;
        anyhow::ensure!(bits <= 32, "bad prefix in {s:?}");
        let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
        Ok(Cidr { base: u32::from(addr) & mask, mask })
    }

    /// Whether `addr` is in the range.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask == self.base
    }
}

/// Labels of address ranges (`foreign-hosting`, `cdn`, `domestic-dc`,
/// `domestic-whitelisted`, `probe`): modules key on labels, never on addresses.
#[derive(Debug, Clone)]
pub struct AddrMap(Vec<(Cidr, String)>);

impl AddrMap {
    /// The lab's own map (see `topology`).
    pub fn lab() -> AddrMap {
        Self::parse(include_str!("../profiles/lab.map")).unwrap_or(AddrMap(Vec::new()))
    }

    /// `CIDR label` lines; `#` starts a comment.
    pub fn parse(text: &str) -> anyhow::Result<AddrMap> {
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (cidr, label) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| anyhow::anyhow!("expected `CIDR label`: {line:?}"))?;
            out.push((Cidr::parse(cidr)?, label.trim().to_owned()));
        }
        Ok(AddrMap(out))
    }

    /// The label of the most specific range holding `addr`.
    pub fn label(&self, addr: Ipv4Addr) -> Option<&str> {
        self.0
            .iter()
            .filter(|(c, _)| c.contains(addr))
            .max_by_key(|(c, _)| c.mask.count_ones())
            .map(|(_, l)| l.as_str())
    }

    fn has(&self, addr: Ipv4Addr, labels: &[String]) -> bool {
        self.label(addr).is_some_and(|l| labels.iter().any(|x| x == l))
    }
}

/// What happens to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Accept,
    /// Drop it silently.
    Drop,
}

/// Which module condemned a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// M1.
    IpBlock,
    /// M3 (TLS SNI or HTTP Host).
    Sni,
    /// M6.
    VpnSignature,
    /// M7.
    FullyEncrypted,
    /// M9.
    Freeze,
    /// M10.
    Whitelist,
}

type Key = (Ipv4Addr, u16, Ipv4Addr, u16, u8);

/// One flow, as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// Who spoke first.
    pub client: String,
    /// The other side.
    pub server: String,
    /// The server's address label.
    pub server_label: Option<String>,
    /// Packets client→server, server→client.
    pub packets: [u64; 2],
    /// Payload bytes client→server, server→client.
    pub bytes: [u64; 2],
    /// The TLS server name or HTTP host, once read.
    pub sni: Option<String>,
    /// The ClientHello's JA4.
    pub ja4: Option<String>,
    /// Why the flow was cut, if it was.
    pub blocked: Option<Reason>,
    /// Packets dropped after it was cut.
    pub dropped: u64,
    #[serde(skip)]
    isn: Option<u32>,
    #[serde(skip)]
    stream: Vec<u8>,
    #[serde(skip)]
    inspected: bool,
    #[serde(skip)]
    first_payload_seen: bool,
}

/// The censor: a profile, the address map and the flow table.
pub struct Engine {
    profile: Profile,
    map: AddrMap,
    blocked: Vec<Cidr>,
    flows: HashMap<Key, Flow>,
    order: Vec<Key>,
}

impl Engine {
    /// A censor running `profile` over the lab's addresses.
    pub fn new(profile: Profile, map: AddrMap) -> anyhow::Result<Engine> {
        let blocked = profile.ip_block.iter().map(|c| Cidr::parse(c)).collect::<Result<_, _>>()?;
        Ok(Engine { profile, map, blocked, flows: HashMap::new(), order: Vec::new() })
    }

    /// The flows seen, in the order they started.
    pub fn flows(&self) -> Vec<Flow> {
        self.order.iter().filter_map(|k| self.flows.get(k)).cloned().collect()
    }

    /// The verdict on one IPv4 packet.
    pub fn packet(&mut self, packet: &[u8]) -> Verdict {
        let Ok(sliced) = SlicedPacket::from_ip(packet) else { return Verdict::Accept };
        let Some(NetSlice::Ipv4(ip)) = &sliced.net else { return Verdict::Accept };
        let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
        let (proto, sport, dport, payload, tcp) = match &sliced.transport {
            Some(TransportSlice::Tcp(t)) => (
                6u8,
                t.source_port(),
                t.destination_port(),
                t.payload(),
                Some((t.syn(), t.sequence_number())),
            ),
            Some(TransportSlice::Udp(u)) => {
                (17u8, u.source_port(), u.destination_port(), u.payload(), None)
            }
            _ => return Verdict::Accept,
        };
        let forward = (src, sport, dst, dport, proto);
        let backward = (dst, dport, src, sport, proto);
        let (key, dir) = if self.flows.contains_key(&forward) {
            (forward, 0)
        } else if self.flows.contains_key(&backward) {
            (backward, 1)
        } else {
            let flow = Flow {
                proto: if proto == 6 { "tcp" } else { "udp" },
                client: format!("{src}:{sport}"),
                server: format!("{dst}:{dport}"),
                server_label: self.map.label(dst).map(str::to_owned),
                packets: [0; 2],
                bytes: [0; 2],
                sni: None,
                ja4: None,
                blocked: None,
                dropped: 0,
                isn: None,
                stream: Vec::new(),
                inspected: false,
                first_payload_seen: false,
            };
            self.flows.insert(forward, flow);
            self.order.push(forward);
            (forward, 0)
        };
        let server = key.2;
        let Some(flow) = self.flows.get_mut(&key) else { return Verdict::Accept };
        flow.packets[dir] += 1;
        flow.bytes[dir] += payload.len() as u64;
        if flow.blocked.is_some() {
            flow.dropped += 1;
            return Verdict::Drop;
        }
        let p = &self.profile;
        let condemn = |flow: &mut Flow, reason| {
            flow.blocked = Some(reason);
            flow.dropped += 1;
            Verdict::Drop
        };
        // M1 and M10: by address.
        if self.blocked.iter().any(|c| c.contains(server)) {
            return condemn(flow, Reason::IpBlock);
        }
        if let Some(w) = &p.whitelist
            && !self.map.has(server, &w.labels)
        {
            return condemn(flow, Reason::Whitelist);
        }
        // The client's first bytes.
        if dir == 0 && !payload.is_empty() {
            match tcp {
                Some((_, seq)) => {
                    if let Some(isn) = flow.isn {
                        let offset = seq.wrapping_sub(isn.wrapping_add(1)) as usize;
                        if offset < MAX_STREAM && offset <= flow.stream.len() {
                            let end = (offset + payload.len()).min(MAX_STREAM);
                            if end > flow.stream.len() {
                                flow.stream.resize(end, 0);
                            }
                            flow.stream[offset..end].copy_from_slice(&payload[..end - offset]);
                        }
                    }
                }
                None => {
                    if !flow.first_payload_seen {
                        flow.stream = payload.to_vec();
                    }
                }
            }
            let first = !flow.first_payload_seen;
            flow.first_payload_seen = true;
            if first {
                // M6: a WireGuard handshake initiation.
                if p.vpn_signatures
                    && proto == 17
                    && payload.len() == 148
                    && payload[..4] == [1, 0, 0, 0]
                {
                    return condemn(flow, Reason::VpnSignature);
                }
                // M7: a first TCP payload that looks like random bytes.
                if let Some(fe) = &p.fully_encrypted
                    && proto == 6
                    && self.map.has(server, &fe.labels)
                    && looks_fully_encrypted(payload)
                {
                    return condemn(flow, Reason::FullyEncrypted);
                }
            }
            if !flow.inspected {
                match hello::parse(&flow.stream) {
                    Parsed::Incomplete if flow.stream.len() < MAX_STREAM => {}
                    Parsed::Hello(h) => {
                        flow.inspected = true;
                        flow.sni = h.sni;
                        flow.ja4 = Some(h.ja4);
                    }
                    Parsed::NotTls => {
                        flow.inspected = true;
                        flow.sni = http_host(&flow.stream);
                    }
                    _ => flow.inspected = true,
                }
                if let Some(sni) = &flow.sni
                    && p.sni_block.iter().any(|b| name_matches(sni, b))
                {
                    return condemn(flow, Reason::Sni);
                }
            }
        }
        if let Some((true, seq)) = tcp
            && dir == 0
        {
            flow.isn = Some(seq);
        }
        // M9: the freeze.
        if let Some(f) = &p.freeze
            && self.map.has(server, &f.labels)
            && !flow.sni.as_deref().is_some_and(|s| f.exempt_sni.iter().any(|e| name_matches(s, e)))
            && (flow.packets[0] + flow.packets[1] > f.packets || flow.bytes[1] > f.server_bytes)
        {
            return condemn(flow, Reason::Freeze);
        }
        Verdict::Accept
    }
}

/// The Host header of an HTTP request, if the stream starts with one.
fn http_host(stream: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(stream.get(..stream.len().min(4096))?).ok()?;
    let mut lines = text.split("\r\n");
    let request = lines.next()?;
    if !request.ends_with("HTTP/1.1") && !request.ends_with("HTTP/1.0") {
        return None;
    }
    lines
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("host")))
        .map(|(_, v)| v.trim().split(':').next().unwrap_or("").to_owned())
}

/// The fully-encrypted heuristic of Wu et al. (USENIX Security 2023), as nDPI implements it:
/// a first packet is exempt if its first six bytes are printable, more than half of it is
/// printable, it has more than 20 printable bytes in a row, or it starts like TLS or HTTP;
/// otherwise it is flagged when the average number of set bits per byte is between 3.4 and
/// 4.6 (random bytes average 4).
pub fn looks_fully_encrypted(payload: &[u8]) -> bool {
    let printable = |b: &u8| (0x20..=0x7e).contains(b);
    if payload.len() >= 6 && payload[..6].iter().all(printable) {
        return false;
    }
    if payload.iter().filter(|b| printable(b)).count() * 2 > payload.len() {
        return false;
    }
    let mut run = 0;
    for b in payload {
        run = if printable(b) { run + 1 } else { 0 };
        if run > 20 {
            return false;
        }
    }
    if payload.len() >= 3
        && (payload[0] == 0x16 || payload[0] == 0x17)
        && payload[1] == 0x03
        && payload[2] <= 0x04
    {
        return false;
    }
    let bits: u32 = payload.iter().map(|b| b.count_ones()).sum();
    let average = f64::from(bits) / payload.len().max(1) as f64;
    (3.4..=4.6).contains(&average)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const CLIENT: [u8; 4] = [10, 0, 1, 2];
    const FOREIGN: [u8; 4] = [10, 0, 2, 2];

    fn tcp(from_client: bool, server: [u8; 4], seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
        let (src, dst, sp, dp) =
            if from_client { (CLIENT, server, 40000, 443) } else { (server, CLIENT, 443, 40000) };
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sp, dp, seq, 65535);
        if syn {
            b = b.syn();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn engine(profile: &str) -> Engine {
        Engine::new(Profile::load(profile).unwrap(), AddrMap::lab()).unwrap()
    }

    use crate::hello::rustls_hello as hello;

    /// Sends a ClientHello in segments of `size` bytes; returns the verdicts.
    fn send_hello(e: &mut Engine, sni: &str, size: usize) -> Vec<Verdict> {
        let mut verdicts = vec![e.packet(&tcp(true, FOREIGN, 1000, true, &[]))];
        let mut seq = 1001;
        for chunk in hello(sni).chunks(size) {
            verdicts.push(e.packet(&tcp(true, FOREIGN, seq, false, chunk)));
            seq += chunk.len() as u32;
        }
        verdicts
    }

    #[test]
    fn sni_is_blocked_after_reassembly_even_in_small_segments() {
        let mut e = engine("ru-2023");
        let v = send_hello(&mut e, "messenger.example", 7);
        assert_eq!(v.last(), Some(&Verdict::Drop));
        assert!(v[..v.len() - 1].iter().all(|v| *v == Verdict::Accept), "cut only once whole");
        assert_eq!(e.packet(&tcp(false, FOREIGN, 5, false, b"reply")), Verdict::Drop, "both ways");
        assert_eq!(e.flows()[0].blocked, Some(Reason::Sni));
        let mut open = engine("open");
        assert!(
            send_hello(&mut open, "messenger.example", 7).iter().all(|v| *v == Verdict::Accept)
        );
        assert_eq!(open.flows()[0].sni.as_deref(), Some("messenger.example"));
        let mut other = engine("ru-2023");
        assert!(send_hello(&mut other, "fine.example", 100).iter().all(|v| *v == Verdict::Accept));
    }

    #[test]
    fn the_freeze_cuts_foreign_flows_after_the_packet_budget() {
        let mut e = engine("ru-2025-06");
        send_hello(&mut e, "fine.example", 2000);
        let mut dropped_at = None;
        for i in 0..40u32 {
            if e.packet(&tcp(false, FOREIGN, i * 1000, false, &[0u8; 1000])) == Verdict::Drop {
                dropped_at = Some(i);
                break;
            }
        }
        let at = dropped_at.expect("frozen");
        assert!((15..=25).contains(&at), "frozen after {at} server packets");
        assert_eq!(e.flows()[0].blocked, Some(Reason::Freeze));
        // A domestic whitelisted server is not frozen.
        let mut d = engine("ru-2025-06");
        for i in 0..100u32 {
            assert_eq!(
                d.packet(&tcp(false, [10, 0, 3, 130], i, false, &[0u8; 1000])),
                Verdict::Accept
            );
        }
    }

    #[test]
    fn address_modules_block_and_open_passes() {
        let mut e = engine("ru-2023");
        assert_eq!(e.packet(&tcp(true, [10, 0, 2, 66], 1, true, &[])), Verdict::Drop);
        let mut w = engine("ru-whitelist");
        assert_eq!(w.packet(&tcp(true, FOREIGN, 1, true, &[])), Verdict::Drop);
        assert_eq!(w.packet(&tcp(true, [10, 0, 3, 2], 1, true, &[])), Verdict::Drop);
        assert_eq!(w.packet(&tcp(true, [10, 0, 3, 130], 1, true, &[])), Verdict::Accept);
        let mut o = engine("open");
        assert_eq!(o.packet(&tcp(true, [10, 0, 2, 66], 1, true, &[])), Verdict::Accept);
    }

    #[test]
    fn random_first_packets_are_flagged_and_tls_http_are_not() {
        use rand::RngCore;
        let mut random = [0u8; 300];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut random);
        assert!(looks_fully_encrypted(&random));
        assert!(!looks_fully_encrypted(&hello("fine.example")));
        assert!(!looks_fully_encrypted(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!looks_fully_encrypted(&[0u8; 300]), "too few bits set");
        let mut e = engine("ru-2024");
        e.packet(&tcp(true, FOREIGN, 1, true, &[]));
        assert_eq!(e.packet(&tcp(true, FOREIGN, 2, false, &random)), Verdict::Drop);
        let mut o = engine("open");
        o.packet(&tcp(true, FOREIGN, 1, true, &[]));
        assert_eq!(o.packet(&tcp(true, FOREIGN, 2, false, &random)), Verdict::Accept);
    }

    use rand::SeedableRng;

    #[test]
    fn http_hosts_are_read() {
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: Blocked.example:80\r\n\r\n").as_deref(),
            Some("Blocked.example")
        );
        assert_eq!(http_host(b"\x16\x03\x01"), None);
    }
}
