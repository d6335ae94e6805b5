//! The censor's decisions: every forwarded packet in, a verdict out. Pure (no sockets, no
//! clock), so each module is tested on packets built in memory; the daemon feeds it from
//! NFQUEUE.
//!
//! Per flow (TCP or UDP 5-tuple, oriented by who spoke first) it counts packets and payload
//! bytes both ways, reassembles the first [`MAX_STREAM`] bytes the client sends (TCP, by
//! sequence number, so a ClientHello split across segments is read whole), and once a
//! module condemns the flow, drops every later packet of it in both directions, without a
//! reset — what users of the real censor see as a hang.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use serde::Serialize;

use crate::dns::Zone;
use crate::hello::{self, Parsed};
use crate::prober;
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
    /// M7b.
    TlsInTls,
    /// M9.
    Freeze,
    /// M10.
    Whitelist,
    /// M4.
    Quic,
    /// M8: a blocked JA4.
    Fingerprint,
    /// M8: the server name's DNS answer is another address.
    SniMismatch,
    /// M8: too many connections to one server (the server's address is blocked a while).
    ConnectionCount,
    /// M11: the prober found a proxy (the server's address is blocked a while).
    Probe,
    /// M12.
    EncryptedUdp,
    /// M14.
    Residual,
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
    /// Its raw form (sorted ciphers, extensions, signature algorithms).
    pub ja4_r: Option<String>,
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
    #[serde(skip)]
    nested_checked: bool,
}

/// The censor: a profile, the address map and the flow table.
pub struct Engine {
    profile: Profile,
    map: AddrMap,
    zone: Zone,
    blocked: Vec<Cidr>,
    /// Addresses blocked for a while (M8's connection count, the prober), with the time
    /// they are free again and why.
    blocked_until: HashMap<Ipv4Addr, (u64, Reason)>,
    /// M11: servers probed or queued, requests not yet taken, and what was found.
    probed: HashSet<SocketAddrV4>,
    probe_queue: Vec<prober::Request>,
    findings: Vec<prober::Finding>,
    /// M14: (client, server, port) refused until a time.
    residual: HashMap<(Ipv4Addr, Ipv4Addr, u16), u64>,
    /// M8: recent connection starts to port 443 per (client, server).
    starts: HashMap<(Ipv4Addr, Ipv4Addr), Vec<u64>>,
    flows: HashMap<Key, Flow>,
    order: Vec<Key>,
}

/// A packet's fields the modules use.
struct Packet<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    payload: &'a [u8],
    /// TCP: SYN without ACK, and the sequence number.
    tcp: Option<(bool, u32)>,
}

fn slice(packet: &[u8]) -> Option<Packet<'_>> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else { return None };
    let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
    Some(match sliced.transport? {
        TransportSlice::Tcp(t) => Packet {
            src,
            dst,
            sport: t.source_port(),
            dport: t.destination_port(),
            proto: 6,
            payload: t.payload(),
            tcp: Some((t.syn() && !t.ack(), t.sequence_number())),
        },
        TransportSlice::Udp(u) => Packet {
            src,
            dst,
            sport: u.source_port(),
            dport: u.destination_port(),
            proto: 17,
            payload: u.payload(),
            tcp: None,
        },
        _ => return None,
    })
}

impl Engine {
    /// A censor running `profile` over the lab's addresses.
    pub fn new(profile: Profile, map: AddrMap, zone: Zone) -> anyhow::Result<Engine> {
        let blocked = profile.ip_block.iter().map(|c| Cidr::parse(c)).collect::<Result<_, _>>()?;
        Ok(Engine {
            profile,
            map,
            zone,
            blocked,
            blocked_until: HashMap::new(),
            probed: HashSet::new(),
            probe_queue: Vec::new(),
            findings: Vec::new(),
            residual: HashMap::new(),
            starts: HashMap::new(),
            flows: HashMap::new(),
            order: Vec::new(),
        })
    }

    /// The flows seen, in the order they started.
    pub fn flows(&self) -> Vec<Flow> {
        self.order.iter().filter_map(|k| self.flows.get(k)).cloned().collect()
    }

    /// Adds an address range to the block list (M1) while running: flows to it are cut from
    /// their next packet.
    pub fn block(&mut self, range: Cidr) {
        self.blocked.push(range);
    }

    /// Runs `profile` from the next packet on (the device moved to another network, or the
    /// censor changed its rules): its block list replaces the old one; flows, residual
    /// blocks and the prober's findings stay.
    pub fn set_profile(&mut self, profile: Profile) -> anyhow::Result<()> {
        self.blocked = profile.ip_block.iter().map(|c| Cidr::parse(c)).collect::<Result<_, _>>()?;
        self.profile = profile;
        Ok(())
    }

    /// Servers the prober should visit now.
    pub fn take_probe_requests(&mut self) -> Vec<prober::Request> {
        std::mem::take(&mut self.probe_queue)
    }

    /// The prober's finding: a server that is no ordinary website is blocked for a while.
    pub fn probed(&mut self, finding: prober::Finding, now_ms: u64) {
        if !finding.website
            && let (Some(p), Ok(server)) =
                (&self.profile.prober, finding.server.parse::<SocketAddrV4>())
        {
            self.blocked_until.insert(*server.ip(), (now_ms + p.block_secs * 1000, Reason::Probe));
        }
        self.findings.push(finding);
    }

    /// What the prober found so far.
    pub fn findings(&self) -> &[prober::Finding] {
        &self.findings
    }

    /// The verdict on one IPv4 packet seen at `now_ms` (any monotonic clock, in ms).
    pub fn packet(&mut self, packet: &[u8], now_ms: u64) -> Verdict {
        let Some(pkt) = slice(packet) else { return Verdict::Accept };
        let forward = (pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto);
        let backward = (pkt.dst, pkt.dport, pkt.src, pkt.sport, pkt.proto);
        let (key, dir, new) = if self.flows.contains_key(&forward) {
            (forward, 0, false)
        } else if self.flows.contains_key(&backward) {
            (backward, 1, false)
        } else {
            let flow = Flow {
                proto: if pkt.proto == 6 { "tcp" } else { "udp" },
                client: format!("{}:{}", pkt.src, pkt.sport),
                server: format!("{}:{}", pkt.dst, pkt.dport),
                server_label: self.map.label(pkt.dst).map(str::to_owned),
                packets: [0; 2],
                bytes: [0; 2],
                sni: None,
                ja4: None,
                ja4_r: None,
                blocked: None,
                dropped: 0,
                isn: None,
                stream: Vec::new(),
                inspected: false,
                first_payload_seen: false,
                nested_checked: false,
            };
            self.flows.insert(forward, flow);
            self.order.push(forward);
            (forward, 0, true)
        };
        let (client, server, port) = (key.0, key.2, key.3);
        let reason = self.judge(key, dir, new, &pkt, now_ms);
        let Some(flow) = self.flows.get_mut(&key) else { return Verdict::Accept };
        if flow.blocked.is_some() {
            flow.dropped += 1;
            return Verdict::Drop;
        }
        let Some(reason) = reason else { return Verdict::Accept };
        flow.blocked = Some(reason);
        flow.dropped += 1;
        if let Some(secs) = self.profile.residual_secs {
            self.residual.insert((client, server, port), now_ms + secs * 1000);
        }
        Verdict::Drop
    }

    /// Counts the packet into its flow and returns the module that cuts the flow now, if any.
    fn judge(
        &mut self,
        key: Key,
        dir: usize,
        new: bool,
        pkt: &Packet<'_>,
        now: u64,
    ) -> Option<Reason> {
        let (client, server, port) = (key.0, key.2, key.3);
        let p = &self.profile;
        let flow = self.flows.get_mut(&key)?;
        flow.packets[dir] += 1;
        flow.bytes[dir] += pkt.payload.len() as u64;
        if flow.blocked.is_some() {
            return None;
        }
        // By address: M1 (static and timed), M10, M14.
        if self.blocked.iter().any(|c| c.contains(server)) {
            return Some(Reason::IpBlock);
        }
        if let Some((until, why)) = self.blocked_until.get(&server)
            && now < *until
        {
            return Some(*why);
        }
        if let Some(w) = &p.whitelist
            && !self.map.has(server, &w.labels)
            && (w.subscribers.is_empty() || self.map.has(client, &w.subscribers))
        {
            return Some(Reason::Whitelist);
        }
        if new && self.residual.get(&(client, server, port)).is_some_and(|until| now < *until) {
            return Some(Reason::Residual);
        }
        // M8: too many TLS connections from one client to one server.
        if let (Some(f), Some((true, _)), 0, 443) = (&p.fingerprint, pkt.tcp, dir, port)
            && self.map.has(server, &f.labels)
            && let Some(max) = f.max_connections
        {
            let window = f.window_secs * 1000;
            let starts = self.starts.entry((client, server)).or_default();
            starts.retain(|t| now.saturating_sub(*t) < window);
            starts.push(now);
            if starts.len() > max as usize {
                self.blocked_until
                    .insert(server, (now + f.block_secs * 1000, Reason::ConnectionCount));
                return Some(Reason::ConnectionCount);
            }
        }
        if dir == 0 && !pkt.payload.is_empty() {
            let first = !flow.first_payload_seen;
            flow.first_payload_seen = true;
            match pkt.tcp {
                Some((_, seq)) => {
                    if let Some(isn) = flow.isn {
                        let offset = seq.wrapping_sub(isn.wrapping_add(1)) as usize;
                        if offset < MAX_STREAM && offset <= flow.stream.len() {
                            let end = (offset + pkt.payload.len()).min(MAX_STREAM);
                            if end > flow.stream.len() {
                                flow.stream.resize(end, 0);
                            }
                            flow.stream[offset..end].copy_from_slice(&pkt.payload[..end - offset]);
                        }
                    }
                }
                None if first => flow.stream = pkt.payload.to_vec(),
                None => {}
            }
            if first && let Some(reason) = first_payload(p, &self.map, server, pkt) {
                return Some(reason);
            }
            if !flow.inspected {
                match hello::parse(&flow.stream) {
                    Parsed::Incomplete if flow.stream.len() < MAX_STREAM => {}
                    Parsed::Hello(h) => {
                        flow.inspected = true;
                        flow.sni = h.sni;
                        flow.ja4 = Some(h.ja4);
                        flow.ja4_r = Some(h.ja4_r);
                        let target = SocketAddrV4::new(server, port);
                        if let Some(pr) = &p.prober
                            && self.map.has(server, &pr.labels)
                            && self.probed.insert(target)
                        {
                            self.probe_queue.push(prober::Request {
                                server: target,
                                sni: flow.sni.clone(),
                                first_flight: flow.stream.clone(),
                            });
                        }
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
                    return Some(Reason::Sni);
                }
                if let (Some(f), Some(ja4)) = (&p.fingerprint, &flow.ja4)
                    && self.map.has(server, &f.labels)
                {
                    if f.ja4_block.iter().any(|b| b == ja4) {
                        return Some(Reason::Fingerprint);
                    }
                    if f.sni_must_resolve
                        && flow.sni.as_deref().is_some_and(|n| self.zone.lookup(n) != Some(server))
                    {
                        return Some(Reason::SniMismatch);
                    }
                }
            }
        }
        // M7b: a TLS handshake inside the TLS flow.
        if let Some(t) = &p.tls_in_tls
            && dir == 0
            && flow.ja4.is_some()
            && !flow.nested_checked
            && self.map.has(server, &t.labels)
            && let Some(nested) = hello::tls_in_tls(&flow.stream)
        {
            flow.nested_checked = true;
            if nested {
                return Some(Reason::TlsInTls);
            }
        }
        if let Some((true, seq)) = pkt.tcp
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
            return Some(Reason::Freeze);
        }
        None
    }
}

/// Modules that judge a flow by the client's first payload: M4, M6, M7, M12.
fn first_payload(p: &Profile, map: &AddrMap, server: Ipv4Addr, pkt: &Packet<'_>) -> Option<Reason> {
    let payload = pkt.payload;
    if p.vpn_signatures && (wireguard(pkt) || openvpn(pkt)) {
        return Some(Reason::VpnSignature);
    }
    if pkt.proto == 17 {
        if let Some(q) = &p.quic
            && quic_initial(payload)
            && !map.has(server, &q.allow_labels)
        {
            return Some(Reason::Quic);
        }
        if let Some(e) = &p.encrypted_udp
            && map.has(server, &e.labels)
            && looks_fully_encrypted(payload)
        {
            return Some(Reason::EncryptedUdp);
        }
    }
    if let Some(fe) = &p.fully_encrypted
        && pkt.proto == 6
        && map.has(server, &fe.labels)
        && looks_fully_encrypted(payload)
    {
        return Some(Reason::FullyEncrypted);
    }
    None
}

/// A WireGuard handshake initiation: type 1, three reserved zero bytes, 148 bytes.
fn wireguard(pkt: &Packet<'_>) -> bool {
    pkt.proto == 17 && pkt.payload.len() == 148 && pkt.payload[..4] == [1, 0, 0, 0]
}

/// An OpenVPN client hard reset (opcode 7 or 10, key id 0): over TCP after a two-byte length
/// that matches the packet, over UDP as the first byte of a short datagram.
fn openvpn(pkt: &Packet<'_>) -> bool {
    let reset = |b: u8| b == 7 << 3 || b == 10 << 3;
    let p = pkt.payload;
    match pkt.proto {
        6 => {
            p.len() >= 3
                && usize::from(u16::from_be_bytes([p[0], p[1]])) == p.len() - 2
                && reset(p[2])
        }
        _ => (14..=100).contains(&p.len()) && reset(p[0]),
    }
}

/// A QUIC version 1 Initial packet (long header, type 0).
fn quic_initial(p: &[u8]) -> bool {
    p.len() >= 1200 && p[0] & 0xf0 == 0xc0 && p[1..5] == [0, 0, 0, 1]
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
        Engine::new(Profile::load(profile).unwrap(), AddrMap::lab(), Zone::lab()).unwrap()
    }

    use crate::hello::rustls_hello as hello;

    /// Sends a ClientHello in segments of `size` bytes; returns the verdicts.
    fn send_hello(e: &mut Engine, sni: &str, size: usize) -> Vec<Verdict> {
        let mut verdicts = vec![e.packet(&tcp(true, FOREIGN, 1000, true, &[]), 0)];
        let mut seq = 1001;
        for chunk in hello(sni).chunks(size) {
            verdicts.push(e.packet(&tcp(true, FOREIGN, seq, false, chunk), 0));
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
        assert_eq!(
            e.packet(&tcp(false, FOREIGN, 5, false, b"reply"), 0),
            Verdict::Drop,
            "both ways"
        );
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
            if e.packet(&tcp(false, FOREIGN, i * 1000, false, &[0u8; 1000]), 0) == Verdict::Drop {
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
                d.packet(&tcp(false, [10, 0, 3, 130], i, false, &[0u8; 1000]), 0),
                Verdict::Accept
            );
        }
    }

    #[test]
    fn an_address_blocked_while_running_cuts_its_open_flows() {
        let mut e = engine("open");
        assert_eq!(e.packet(&tcp(true, FOREIGN, 1, true, &[]), 0), Verdict::Accept);
        e.block(Cidr::parse("10.0.2.2/32").unwrap());
        assert_eq!(e.packet(&tcp(true, FOREIGN, 2, false, &[1]), 0), Verdict::Drop);
        assert_eq!(e.packet(&tcp(true, [10, 0, 3, 2], 1, true, &[]), 0), Verdict::Accept);
    }

    #[test]
    fn another_profile_applies_from_the_next_packet() {
        let mut e = engine("open");
        let blocked = [10, 0, 2, 66];
        assert_eq!(e.packet(&tcp(true, blocked, 1, true, &[]), 0), Verdict::Accept);
        e.set_profile(Profile::load("ru-2024").unwrap()).unwrap();
        assert_eq!(e.packet(&tcp(true, blocked, 2, false, &[1]), 0), Verdict::Drop);
        // Back on the open profile, a flow that was cut stays cut.
        e.set_profile(Profile::load("open").unwrap()).unwrap();
        assert_eq!(e.packet(&tcp(true, blocked, 3, false, &[1]), 1), Verdict::Drop);
        assert_eq!(e.flows().len(), 1, "flows are kept");
    }

    #[test]
    fn address_modules_block_and_open_passes() {
        let mut e = engine("ru-2023");
        assert_eq!(e.packet(&tcp(true, [10, 0, 2, 66], 1, true, &[]), 0), Verdict::Drop);
        let mut w = engine("ru-whitelist");
        assert_eq!(w.packet(&tcp(true, FOREIGN, 1, true, &[]), 0), Verdict::Drop);
        assert_eq!(w.packet(&tcp(true, [10, 0, 3, 2], 1, true, &[]), 0), Verdict::Drop);
        assert_eq!(w.packet(&tcp(true, [10, 0, 3, 130], 1, true, &[]), 0), Verdict::Accept);
        // A whitelisted domestic relay's own uplink abroad is not a subscriber's.
        let mut uplink = Vec::new();
        PacketBuilder::ipv4([10, 0, 3, 130], FOREIGN, 64)
            .tcp(40001, 443, 1, 65535)
            .syn()
            .write(&mut uplink, &[])
            .unwrap();
        assert_eq!(w.packet(&uplink, 0), Verdict::Accept);
        let mut o = engine("open");
        assert_eq!(o.packet(&tcp(true, [10, 0, 2, 66], 1, true, &[]), 0), Verdict::Accept);
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
        e.packet(&tcp(true, FOREIGN, 1, true, &[]), 0);
        assert_eq!(e.packet(&tcp(true, FOREIGN, 2, false, &random), 0), Verdict::Drop);
        let mut o = engine("open");
        o.packet(&tcp(true, FOREIGN, 1, true, &[]), 0);
        assert_eq!(o.packet(&tcp(true, FOREIGN, 2, false, &random), 0), Verdict::Accept);
    }

    use rand::SeedableRng;

    fn udp(server: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(CLIENT, server, 64).udp(40000, 443).write(&mut out, payload).unwrap();
        out
    }

    fn quic() -> Vec<u8> {
        let mut p = vec![0xc3, 0, 0, 0, 1, 8];
        p.resize(1200, 0x5a);
        p
    }

    #[test]
    fn udp_modules_quic_openvpn_and_encrypted_datagrams() {
        use rand::RngCore;
        let mut random = [0u8; 300];
        rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut random);
        let mut openvpn_udp = vec![0x38];
        openvpn_udp.extend_from_slice(&[7; 13]);
        let cases: [(&str, Vec<u8>, [u8; 4], Verdict); 8] = [
            ("ru-2023", quic(), FOREIGN, Verdict::Drop),
            ("ru-2023", quic(), [10, 0, 3, 130], Verdict::Accept),
            ("open", quic(), FOREIGN, Verdict::Accept),
            ("ru-2023", openvpn_udp.clone(), FOREIGN, Verdict::Drop),
            ("open", openvpn_udp, FOREIGN, Verdict::Accept),
            ("ru-2026-06", random.to_vec(), FOREIGN, Verdict::Drop),
            ("ru-2024", random.to_vec(), FOREIGN, Verdict::Accept),
            ("ru-2026-06", random.to_vec(), [10, 0, 3, 130], Verdict::Accept),
        ];
        for (profile, payload, server, expected) in cases {
            assert_eq!(engine(profile).packet(&udp(server, &payload), 0), expected, "{profile}");
        }
        // OpenVPN over TCP: a length prefix, then the hard reset.
        let mut e = engine("ru-2023");
        e.packet(&tcp(true, FOREIGN, 1, true, &[]), 0);
        let reset = [0, 14, 0x38, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 1];
        assert_eq!(e.packet(&tcp(true, FOREIGN, 2, false, &reset), 0), Verdict::Drop);
    }

    #[test]
    fn fingerprints_connection_counts_and_residual_blocking() {
        // A default rustls ClientHello to foreign hosting is cut; to the whitelisted
        // domestic range it is not.
        let mut e = engine("ru-2026-06");
        assert_eq!(send_hello(&mut e, "fine.example", 2000).last(), Some(&Verdict::Drop));
        assert_eq!(e.flows()[0].blocked, Some(Reason::Fingerprint));
        // Residual: the next connection to that server and port within a minute is refused.
        assert_eq!(e.packet(&tcp(true, FOREIGN, 7, false, b"more"), 30_000), Verdict::Drop);
        let mut r = engine("ru-2026-06");
        send_hello(&mut r, "fine.example", 2000);
        let other_port = {
            let mut out = Vec::new();
            PacketBuilder::ipv4(CLIENT, FOREIGN, 64)
                .tcp(40001, 443, 1, 65535)
                .syn()
                .write(&mut out, &[])
                .unwrap();
            out
        };
        assert_eq!(r.packet(&other_port, 30_000), Verdict::Drop);
        assert_eq!(r.flows()[1].blocked, Some(Reason::Residual));
        let mut later = engine("ru-2026-06");
        send_hello(&mut later, "fine.example", 2000);
        assert_eq!(later.packet(&other_port, 61_000), Verdict::Accept);
        // More than 20 connections in a minute block the server's address for ten minutes.
        let mut c = engine("ru-2026-06");
        let syn = |port: u16| {
            let mut out = Vec::new();
            PacketBuilder::ipv4(CLIENT, [10, 0, 3, 2], 64)
                .tcp(port, 443, 1, 65535)
                .syn()
                .write(&mut out, &[])
                .unwrap();
            out
        };
        for i in 0..20u16 {
            assert_eq!(c.packet(&syn(41000 + i), u64::from(i) * 1000), Verdict::Accept);
        }
        assert_eq!(c.packet(&syn(41100), 20_000), Verdict::Drop);
        assert_eq!(c.packet(&syn(41101), 100_000), Verdict::Drop, "still blocked");
        assert_eq!(c.packet(&syn(41102), 700_000), Verdict::Accept, "free again");
    }

    #[test]
    fn http_hosts_are_read() {
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: Blocked.example:80\r\n\r\n").as_deref(),
            Some("Blocked.example")
        );
        assert_eq!(http_host(b"\x16\x03\x01"), None);
    }
}
