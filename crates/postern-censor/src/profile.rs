//! Censor profiles: which modules run and how, in TOML (`profiles/*.toml`, embedded).

use serde::{Deserialize, Serialize};

/// A censor profile. Every module is off unless the profile sets it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// The profile's name.
    pub name: String,
    /// What it models.
    pub about: String,
    /// M2: the national resolver.
    pub dns: Option<Dns>,
    /// M1: address ranges dropped silently, both ways (CIDRs).
    pub ip_block: Vec<String>,
    /// M3: server names (and their subdomains) whose TLS or HTTP flows are cut after the
    /// ClientHello or request, read after TCP reassembly.
    pub sni_block: Vec<String>,
    /// M6: VPN protocol signatures (WireGuard handshake initiation) are dropped.
    pub vpn_signatures: bool,
    /// M7: the "fully encrypted first packet" heuristic.
    pub fully_encrypted: Option<FullyEncrypted>,
    /// M9: the freeze of flows to foreign hosting.
    pub freeze: Option<Freeze>,
    /// M10: whitelist mode.
    pub whitelist: Option<Whitelist>,
    /// M4: QUIC v1 Initials are dropped except toward these labels.
    pub quic: Option<Quic>,
    /// M7b: flows to these labels that carry a TLS handshake inside TLS are cut.
    pub tls_in_tls: Option<TlsInTls>,
    /// M8: ClientHello fingerprint policy.
    pub fingerprint: Option<Fingerprint>,
    /// M11: the active prober.
    pub prober: Option<Prober>,
    /// M12: UDP flows whose first datagram looks fully encrypted are dropped.
    pub encrypted_udp: Option<EncryptedUdp>,
    /// The link's own delay and loss (the kernel here has no netem: the daemon holds and
    /// drops packets it would otherwise pass).
    pub link: Option<Link>,
    /// M14: after a module cuts a flow, new flows from that client to that server and port
    /// are dropped for this many seconds.
    pub residual_secs: Option<u64>,
}

/// M2: names the national resolver does not know, and whether queries to other resolvers
/// are answered by it instead.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Names (and their subdomains) answered with NXDOMAIN.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Queries to any resolver are redirected to the national one.
    #[serde(default)]
    pub redirect: bool,
}

/// Delay and loss on every packet the censor passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Added to every packet, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Up to this much more, uniformly, in milliseconds.
    #[serde(default)]
    pub jitter_ms: u64,
    /// The share of packets lost, 0 to 1.
    #[serde(default)]
    pub loss: f64,
    /// The seed of the loss and jitter draws (the report records it).
    #[serde(default)]
    pub seed: u64,
}

/// M4: the 2022 QUIC block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quic {
    /// Address labels QUIC still reaches.
    pub allow_labels: Vec<String>,
}

/// M8: the 2026 ClientHello scoring toward "suspicious" networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// Address labels it applies to.
    pub labels: Vec<String>,
    /// JA4 fingerprints whose flows are cut (stale browsers, app-specific TLS stacks).
    #[serde(default)]
    pub ja4_block: Vec<String>,
    /// TLS connections one client may open to one server within `window_secs` before the
    /// server's address is blocked for `block_secs`.
    pub max_connections: Option<u32>,
    /// A server name whose national DNS answer is not the server's address is cut (the
    /// suspected TSPU check on REALITY-style proxies that borrow a real site's name).
    #[serde(default)]
    pub sni_must_resolve: bool,
    /// The sliding window, in seconds.
    #[serde(default = "sixty")]
    pub window_secs: u64,
    /// How long an address stays blocked, in seconds.
    #[serde(default = "six_hundred")]
    pub block_secs: u64,
}

fn sixty() -> u64 {
    60
}

fn six_hundred() -> u64 {
    600
}

/// M11: every TLS server (address and port) a client reaches in these labels is probed
/// once; one that does not pass for an ordinary website has its address blocked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prober {
    /// Address labels whose servers are probed.
    pub labels: Vec<String>,
    /// How long a server that fails stays blocked, in seconds.
    #[serde(default = "six_hundred")]
    pub block_secs: u64,
}

/// M12: encrypted UDP on mobile networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptedUdp {
    /// Address labels it applies to.
    pub labels: Vec<String>,
}

/// M7: a TCP flow whose first client payload looks like random bytes, and is none of the
/// exempt shapes, is dropped (the GFW rule of Wu et al. 2023, as the Russian TSPU applies it
/// toward foreign hosting since 2024).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullyEncrypted {
    /// Address labels of the servers it applies to.
    pub labels: Vec<String>,
}

/// M9: a flow to these labels goes silent, both ways and without a reset, once it has
/// carried `packets` packets (both directions) or the server has sent `server_bytes` bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Freeze {
    /// Address labels of the servers it applies to.
    pub labels: Vec<String>,
    /// Packets, both ways, after which the flow freezes.
    pub packets: u64,
    /// Server-to-client payload bytes after which the flow freezes.
    pub server_bytes: u64,
    /// Server names exempt from it.
    #[serde(default)]
    pub exempt_sni: Vec<String>,
}

/// M7b: the Russian "encapsulated TLS" heuristic toward foreign hosting (2024–25).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsInTls {
    /// Address labels it applies to.
    pub labels: Vec<String>,
}

/// M10: only servers with these labels are reachable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Whitelist {
    /// Address labels that stay reachable.
    pub labels: Vec<String>,
    /// Labels of the clients it applies to (the mobile subscribers); empty: every client.
    /// A data centre's uplink is not in whitelist mode when its mobile network is.
    #[serde(default)]
    pub subscribers: Vec<String>,
}

const BUILT_IN: &[(&str, &str)] = &[
    ("open", include_str!("../profiles/open.toml")),
    ("ru-2023", include_str!("../profiles/ru-2023.toml")),
    ("ru-2024", include_str!("../profiles/ru-2024.toml")),
    ("ru-2025-06", include_str!("../profiles/ru-2025-06.toml")),
    ("ru-2026-06", include_str!("../profiles/ru-2026-06.toml")),
    ("ru-whitelist", include_str!("../profiles/ru-whitelist.toml")),
];

impl Profile {
    /// A built-in profile by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> anyhow::Result<Profile> {
        let text = match BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            Some((_, text)) => (*text).to_owned(),
            None => std::fs::read_to_string(name_or_path).map_err(|e| {
                anyhow::anyhow!("{name_or_path}: not a built-in profile, and not readable: {e}")
            })?,
        };
        let profile: Profile =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("profile {name_or_path}: {e}"))?;
        Ok(profile)
    }

    /// The built-in profiles' names.
    pub fn built_in() -> impl Iterator<Item = &'static str> {
        BUILT_IN.iter().map(|(n, _)| *n)
    }
}

/// Whether `name` is `pattern` or a subdomain of it.
pub fn name_matches(name: &str, pattern: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    name == pattern || name.ends_with(&format!(".{pattern}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_profile_parses_and_names_itself() {
        for name in Profile::built_in() {
            assert_eq!(Profile::load(name).unwrap().name, name);
        }
        assert!(Profile::load("no-such-profile").is_err());
    }

    #[test]
    fn names_match_themselves_and_subdomains_only() {
        assert!(name_matches("Blocked.Example.", "blocked.example"));
        assert!(name_matches("cdn.blocked.example", "blocked.example"));
        assert!(!name_matches("notblocked.example", "blocked.example"));
    }
}
