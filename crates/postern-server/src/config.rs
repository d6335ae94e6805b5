//! The server's typed configuration, built once by the binary and passed down.

use std::net::SocketAddr;
use std::path::PathBuf;

use postern_store::{Quotas, Retention};
use serde::Deserialize;

/// Everything `postern server` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The public TLS listener.
    pub listen: SocketAddr,
    /// The admin listener (health, metrics). Keep it on loopback.
    pub admin: SocketAddr,
    /// Where keys, the certificate and the database live.
    pub data_dir: PathBuf,
    /// Addresses (`host:port`) put into the server link. Empty: derived from `listen`.
    pub public_addrs: Vec<String>,
    /// TLS server name clients send, and the self-signed certificate's name.
    pub server_name: Option<String>,
    /// An operator-provided certificate chain and key (PEM) instead of the self-signed pair.
    pub tls_cert: Option<PathBuf>,
    /// The key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Limits.
    pub quotas: Quotas,
    /// Retention.
    pub retention: Retention,
    /// Most concurrent connections (TLS or not) on the public listener.
    pub max_connections: usize,
    /// Most concurrent connections from one address: a backstop only, since relays, NAT and
    /// loopback put many people behind one address.
    pub max_connections_per_ip: usize,
    /// New connections one address may open per second, on average (a backstop too).
    pub new_connections_per_ip_per_second: u32,
    /// New connections one address may open at once beyond that rate.
    pub new_connection_burst_per_ip: u32,
    /// Relays' addresses, which the per-address limits do not apply to: a relay brings
    /// everyone who goes through it from its one address.
    pub relay_addresses: Vec<std::net::IpAddr>,
    /// Requests one connection may make per second, on average.
    pub requests_per_second: u32,
    /// Requests one connection may make at once beyond that rate.
    pub request_burst: u32,
    /// Bytes of requests all connections together may have in flight; past it, new
    /// requests are answered `rate_limited` until earlier ones finish.
    pub buffer_bytes: usize,
    /// Test hook: expiry takes today to be this many days later than the clock says, so a
    /// test can restart the server past retention. Only days move; the gate's clock does not.
    pub days_ahead: u32,
}

impl ServerConfig {
    /// Defaults for a data directory: listen on 0.0.0.0:8443, admin on 127.0.0.1:8444.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            admin: SocketAddr::from(([127, 0, 0, 1], 8444)),
            data_dir,
            public_addrs: Vec::new(),
            server_name: None,
            tls_cert: None,
            tls_key: None,
            quotas: Quotas::default(),
            retention: Retention::default(),
            max_connections: 15_000,
            max_connections_per_ip: 1_000,
            new_connections_per_ip_per_second: 100,
            new_connection_burst_per_ip: 1_000,
            relay_addresses: Vec::new(),
            requests_per_second: 1_000,
            request_burst: 2_000,
            buffer_bytes: 256 << 20,
            days_ahead: 0,
        }
    }
}

/// The configuration file. Every field is optional; unknown fields are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The public listener.
    pub listen: Option<SocketAddr>,
    /// The admin listener.
    pub admin: Option<SocketAddr>,
    /// The data directory.
    pub data: Option<PathBuf>,
    /// Addresses put into the server link.
    pub public_addrs: Option<Vec<String>>,
    /// The TLS server name.
    pub server_name: Option<String>,
    /// An operator's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Its key.
    pub tls_key: Option<PathBuf>,
    /// Most concurrent connections.
    pub max_connections: Option<usize>,
    /// Most concurrent connections from one address.
    pub max_connections_per_ip: Option<usize>,
    /// New connections per second from one address.
    pub new_connections_per_ip_per_second: Option<u32>,
    /// Burst of new connections from one address.
    pub new_connection_burst_per_ip: Option<u32>,
    /// Relays' addresses: not subject to the per-address limits.
    pub relay_addresses: Option<Vec<std::net::IpAddr>>,
    /// Requests per second per connection.
    pub requests_per_second: Option<u32>,
    /// Burst of requests per connection.
    pub request_burst: Option<u32>,
    /// Bytes of requests in flight, all connections together.
    pub buffer_bytes: Option<usize>,
    /// `[quotas]`.
    #[serde(default)]
    pub quotas: QuotaConfig,
    /// `[retention]`.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// `[quotas]`: each unset field keeps its default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// See [`Quotas::disk_bytes`].
    pub disk_bytes: Option<u64>,
    /// See [`Quotas::log_bytes`].
    pub log_bytes: Option<u64>,
    /// See [`Quotas::log_keys`].
    pub log_keys: Option<u32>,
    /// See [`Quotas::drop_bytes`].
    pub drop_bytes: Option<u64>,
    /// See [`Quotas::drops_per_mailbox`].
    pub drops_per_mailbox: Option<u32>,
    /// See [`Quotas::key_packages_per_device`].
    pub key_packages_per_device: Option<u32>,
    /// See [`Quotas::claim_tokens_per_mailbox`].
    pub claim_tokens_per_mailbox: Option<u32>,
}

/// `[retention]`, in days: each unset field keeps its default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// See [`Retention::entry_days`].
    pub entry_days: Option<u32>,
    /// See [`Retention::commit_days`].
    pub commit_days: Option<u32>,
    /// See [`Retention::drop_days`].
    pub drop_days: Option<u32>,
    /// See [`Retention::mailbox_days`].
    pub mailbox_days: Option<u32>,
}

impl FileConfig {
    /// Parses a configuration file's text (TOML).
    pub fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Applies what the file sets, other than the listeners and the data directory (the
    /// command line may override those, so the caller handles them).
    pub fn apply(self, config: &mut ServerConfig) {
        config.public_addrs = self.public_addrs.unwrap_or_default();
        config.server_name = self.server_name;
        config.tls_cert = self.tls_cert;
        config.tls_key = self.tls_key;
        if let Some(n) = self.max_connections {
            config.max_connections = n;
        }
        if let Some(n) = self.max_connections_per_ip {
            config.max_connections_per_ip = n;
        }
        if let Some(n) = self.new_connections_per_ip_per_second {
            config.new_connections_per_ip_per_second = n;
        }
        if let Some(n) = self.new_connection_burst_per_ip {
            config.new_connection_burst_per_ip = n;
        }
        if let Some(addrs) = self.relay_addresses {
            config.relay_addresses = addrs;
        }
        if let Some(n) = self.requests_per_second {
            config.requests_per_second = n;
        }
        if let Some(n) = self.request_burst {
            config.request_burst = n;
        }
        if let Some(n) = self.buffer_bytes {
            config.buffer_bytes = n;
        }
        let q = self.quotas;
        let d = Quotas::default();
        config.quotas = Quotas {
            disk_bytes: q.disk_bytes.unwrap_or(d.disk_bytes),
            log_bytes: q.log_bytes.unwrap_or(d.log_bytes),
            log_keys: q.log_keys.unwrap_or(d.log_keys),
            drop_bytes: q.drop_bytes.unwrap_or(d.drop_bytes),
            drops_per_mailbox: q.drops_per_mailbox.unwrap_or(d.drops_per_mailbox),
            key_packages_per_device: q.key_packages_per_device.unwrap_or(d.key_packages_per_device),
            devices_per_mailbox: d.devices_per_mailbox,
            claim_tokens_per_mailbox: q
                .claim_tokens_per_mailbox
                .unwrap_or(d.claim_tokens_per_mailbox),
        };
        let r = self.retention;
        let d = Retention::default();
        config.retention = Retention {
            entry_days: r.entry_days.unwrap_or(d.entry_days),
            commit_days: r.commit_days.unwrap_or(d.commit_days),
            drop_days: r.drop_days.unwrap_or(d.drop_days),
            mailbox_days: r.mailbox_days.unwrap_or(d.mailbox_days),
            upload_days: d.upload_days,
        };
    }
}
