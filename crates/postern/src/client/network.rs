//! Which network the device is on, for the transport engine's memory (the door that
//! opened last, budgets taught by freezes), which is kept per network: a home Wi-Fi that
//! lets everything through and a mobile network that freezes foreign flows need different
//! doors.
//!
//! - `POSTERN_NETWORK`, when set, names the network (a shell that knows the Wi-Fi or the
//!   carrier passes it; tests use it).
//! - Otherwise, on Linux, the default IPv4 route: its interface and gateway, and the
//!   gateway's hardware address when the neighbour table has it (two home routers at
//!   192.168.1.1 differ by it). A point-to-point link (a modem) has no gateway and is named
//!   by its interface.
//! - Otherwise the network is unknown, and everything learned goes under one name.
//!
//! The client core stores only a keyed hash of this description.

use std::net::Ipv4Addr;

/// What names the network the device is on now, if anything does.
pub(crate) fn describe() -> Option<String> {
    if let Ok(name) = std::env::var("POSTERN_NETWORK")
        && !name.trim().is_empty()
    {
        return Some(format!("named {}", name.trim()));
    }
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let (interface, gateway) = default_route(&routes)?;
    let Some(gateway) = gateway else {
        return Some(format!("link {interface}"));
    };
    let neighbours = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
    Some(match hardware_address(&neighbours, gateway, &interface) {
        Some(mac) => format!("route {interface} {gateway} {mac}"),
        None => format!("route {interface} {gateway}"),
    })
}

/// The default IPv4 route in `/proc/net/route`'s text: its interface, and its gateway
/// (`None` for a point-to-point link). The lowest metric wins; the first among equals.
fn default_route(table: &str) -> Option<(String, Option<Ipv4Addr>)> {
    const UP: u32 = 0x1;
    const GATEWAY: u32 = 0x2;
    let mut best: Option<(u32, String, Option<Ipv4Addr>)> = None;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        let [interface, destination, gateway, flags, _, _, metric, mask, ..] = fields[..] else {
            continue;
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(0), Some(0), Some(flags), Ok(metric)) =
            (hex(destination), hex(mask), hex(flags), metric.parse::<u32>())
        else {
            continue;
        };
        if flags & UP == 0 || best.as_ref().is_some_and(|(m, ..)| *m <= metric) {
            continue;
        }
        // The kernel prints the address's four bytes as one number in the machine's byte
        // order.
        let gateway =
            hex(gateway).filter(|_| flags & GATEWAY != 0).map(|g| Ipv4Addr::from(g.to_ne_bytes()));
        best = Some((metric, interface.to_owned(), gateway));
    }
    best.map(|(_, interface, gateway)| (interface, gateway))
}

/// The hardware address `/proc/net/arp`'s text holds for `ip` on `interface`, if complete.
fn hardware_address(table: &str, ip: Ipv4Addr, interface: &str) -> Option<String> {
    const COMPLETE: u32 = 0x2;
    table.lines().skip(1).find_map(|line| {
        // IP address, HW type, Flags, HW address, Mask, Device
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [address, _, flags, mac, _, device] = fields[..] else { return None };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        (address.parse() == Ok(ip)
            && device == interface
            && flags & COMPLETE != 0
            && mac != "00:00:00:00:00:00")
            .then(|| mac.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn the_default_route_with_the_lowest_metric_names_the_network() {
        // The table as a little-endian machine prints it.
        if cfg!(target_endian = "big") {
            return;
        }
        assert_eq!(
            default_route(ROUTES),
            Some(("eth0".to_owned(), Some(Ipv4Addr::new(10, 0, 0, 1))))
        );
        let wifi_only: String = ROUTES.lines().take(2).map(|l| format!("{l}\n")).collect();
        assert_eq!(
            default_route(&wifi_only),
            Some(("wlan0".to_owned(), Some(Ipv4Addr::new(192, 168, 1, 1))))
        );
        // A modem's point-to-point default route has no gateway.
        let modem = "Iface Destination Gateway Flags RefCnt Use Metric Mask\n\
                     wwan0 00000000 00000000 0001 0 0 0 00000000\n";
        assert_eq!(default_route(modem), Some(("wwan0".to_owned(), None)));
        // No default route, or one that is down, names nothing.
        assert_eq!(default_route(&ROUTES.lines().take(1).collect::<String>()), None);
        let down = "Iface Destination Gateway Flags RefCnt Use Metric Mask\n\
                    eth0 00000000 0100000A 0002 0 0 0 00000000\n";
        assert_eq!(default_route(down), None);
        assert_eq!(default_route("garbage\nmore garbage with words\n"), None);
    }

    #[test]
    fn the_gateway_hardware_address_comes_from_a_complete_entry_on_its_interface() {
        let table = "\
IP address       HW type     Flags       HW address            Mask     Device
10.0.0.1         0x1         0x0         00:00:00:00:00:00     *        eth0
192.168.1.1      0x1         0x2         AA:BB:cc:dd:ee:01     *        eth1
192.168.1.1      0x1         0x2         aa:bb:cc:dd:ee:02     *        wlan0
";
        let gw = Ipv4Addr::new(192, 168, 1, 1);
        assert_eq!(hardware_address(table, gw, "eth1").as_deref(), Some("aa:bb:cc:dd:ee:01"));
        assert_eq!(hardware_address(table, gw, "wlan0").as_deref(), Some("aa:bb:cc:dd:ee:02"));
        assert_eq!(hardware_address(table, Ipv4Addr::new(10, 0, 0, 1), "eth0"), None);
        assert_eq!(hardware_address(table, gw, "eth0"), None);
    }
}
