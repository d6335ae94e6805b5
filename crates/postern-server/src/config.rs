//! The server's typed configuration, built once by the binary and passed down.

use std::net::SocketAddr;
use std::path::PathBuf;

use postern_store::{Quotas, Retention};

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
            days_ahead: 0,
        }
    }
}
