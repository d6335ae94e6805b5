//! The relay: a website on its own TLS listener that forwards clients who prove a relay
//! credential to a Postern server, or to the next relay of a chain.
//!
//! ```text
//! client ─TLS─► relay: website for everyone
//!                 └─ WebSocket upgrade with a fresh relay token (sid), the server's pin (ref)
//!                    and the server's own gate token (tok)
//!                      → WebSocket to the server (sid = tok), or to the next relay
//!                        (its own token, ref and tok passed on)
//!                      → binary messages copied both ways until either side closes
//! ```
//!
//! The relay sees the client's address and opaque sealed frames (the Noise session ends at
//! the server); it opens nothing for a server it was not configured for, so it is not an
//! open proxy. It keeps no record of clients and logs nothing about them.
//!
//! **Architecture Invariant:** before its gate opens, every answer comes from `site`, exactly
//! as on a server; a wrong, stale, replayed or revoked token, an unknown server and an
//! upstream that cannot be reached before the upgrade all look the same from outside.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::ws::{Message as AxMessage, WebSocket};
use axum::extract::{FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::{SinkExt, StreamExt};
use postern_net::{Endpoint, Ws};
use postern_proto::gate::{AccessSecret, COOKIE_NAME, cookie};
use postern_proto::link::{RelayLink, ServerLink};
use postern_proto::relay::{Credential, CredentialId, SERVER_COOKIE, SERVER_TOKEN_COOKIE};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as TMessage;

use crate::gate::ReplayCache;
use crate::identity::{TlsIdentity, load_secret};
use crate::{Clock, ServerError, limits, public, site};

const RELAY_KEY: &str = "relay.key";
const OPERATOR_ID: &str = "operator.id";

/// Everything `postern relay` needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The public TLS listener.
    pub listen: SocketAddr,
    /// Where the relay key and the certificate live.
    pub data_dir: PathBuf,
    /// Addresses (`host:port`) put into relay links. Empty: derived from `listen`.
    pub public_addrs: Vec<String>,
    /// TLS server name clients send, and the self-signed certificate's name.
    pub server_name: Option<String>,
    /// An operator-provided certificate chain and key (PEM).
    pub tls_cert: Option<PathBuf>,
    /// The key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Servers this relay forwards to, chosen by the pin the client names. Only addresses,
    /// names and pins are used; the secret in a link stays unused (clients bring their own
    /// gate token for the server).
    pub servers: Vec<ServerLink>,
    /// The next relay of a chain: clients asking for a server not in `servers` go on there.
    pub via: Option<RelayLink>,
    /// Credential ids cut off, with everything derived from them.
    pub revoked: Vec<CredentialId>,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Connection limits per client address (backstops, as on a server).
    pub per_ip: (usize, u32, u32),
}

/// The relay's configuration file (TOML). Unknown fields are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFileConfig {
    /// The public listener [default: 0.0.0.0:443].
    pub listen: Option<SocketAddr>,
    /// The data directory.
    pub data: Option<PathBuf>,
    /// Addresses put into relay links.
    pub public_addrs: Option<Vec<String>>,
    /// The TLS server name.
    pub server_name: Option<String>,
    /// An operator's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Its key.
    pub tls_key: Option<PathBuf>,
    /// Server links (`postern://server#…`) this relay forwards to.
    #[serde(default)]
    pub servers: Vec<String>,
    /// A relay link (`postern://relay#…`) to forward everything else through.
    pub via: Option<String>,
    /// Revoked credential ids (base64url, as `postern relay … link` prints them).
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Most concurrent connections [default: 15,000].
    pub max_connections: Option<usize>,
    /// Most concurrent connections from one address [default: 1,000].
    pub max_connections_per_ip: Option<usize>,
    /// New connections per second from one address [default: 100].
    pub new_connections_per_ip_per_second: Option<u32>,
    /// Burst of new connections from one address [default: 1,000].
    pub new_connection_burst_per_ip: Option<u32>,
}

impl RelayFileConfig {
    /// Parses a configuration file's text (TOML).
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The configuration, with `data` the data directory when the file names none.
    pub fn into_config(self, data: PathBuf) -> Result<RelayConfig, String> {
        let servers = self
            .servers
            .iter()
            .map(|l| ServerLink::parse(l).map_err(|e| format!("servers: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let via = match &self.via {
            Some(l) => Some(RelayLink::parse(l).map_err(|e| format!("via: {e}"))?),
            None => None,
        };
        if servers.is_empty() && via.is_none() {
            return Err("give `servers` (server links) or `via` (a relay link), or both".into());
        }
        let revoked = self
            .revoked
            .iter()
            .map(|id| {
                URL_SAFE_NO_PAD
                    .decode(id)
                    .ok()
                    .and_then(|raw| CredentialId::try_from(raw).ok())
                    .ok_or_else(|| format!("revoked: `{id}` is not a credential id"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RelayConfig {
            listen: self.listen.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 443))),
            data_dir: self.data.unwrap_or(data),
            public_addrs: self.public_addrs.unwrap_or_default(),
            server_name: self.server_name,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            servers,
            via,
            revoked,
            max_connections: self.max_connections.unwrap_or(15_000),
            per_ip: (
                self.max_connections_per_ip.unwrap_or(1_000),
                self.new_connections_per_ip_per_second.unwrap_or(100),
                self.new_connection_burst_per_ip.unwrap_or(1_000),
            ),
        })
    }
}

/// The relay's keys, and how to make links to it.
pub struct RelayIdentity {
    tls: TlsIdentity,
    key: AccessSecret,
    operator: CredentialId,
    addrs: Vec<String>,
    server_name: Option<String>,
}

impl RelayIdentity {
    /// Loads (creating what is missing) the relay's certificate, key and operator id.
    /// `bound` is the listener's address, for links when `public_addrs` is empty.
    pub fn load(config: &RelayConfig, bound: SocketAddr) -> Result<Self, ServerError> {
        let tls = TlsIdentity::load_or_create(
            &config.data_dir,
            config.server_name.as_deref(),
            (config.tls_cert.as_deref(), config.tls_key.as_deref()),
        )?;
        let key = load_secret(&config.data_dir, RELAY_KEY)?;
        let operator = load_secret(&config.data_dir, OPERATOR_ID)?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&operator.0[..8]);
        let addrs = crate::public_addrs(&config.public_addrs, bound);
        Ok(RelayIdentity { tls, key, operator: id, addrs, server_name: config.server_name.clone() })
    }

    /// A link with a first-level credential for `id`.
    pub fn link(&self, id: CredentialId) -> RelayLink {
        RelayLink {
            addrs: self.addrs.clone(),
            server_name: self.server_name.clone(),
            pins: vec![self.tls.pin],
            credential: Credential {
                path: vec![id],
                secret: postern_proto::relay::derive(&self.key, &[id]),
            },
        }
    }

    /// The operator's own link (the same at every start).
    pub fn operator_link(&self) -> RelayLink {
        self.link(self.operator)
    }
}

/// Where a client's connection goes on.
enum Upstream {
    Server(Endpoint),
    Relay(RelayLink),
}

struct Relay {
    key: AccessSecret,
    revoked: HashSet<CredentialId>,
    replay: ReplayCache,
    servers: Vec<ServerLink>,
    via: Option<RelayLink>,
    clock: Clock,
    forwarding: AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

impl Relay {
    /// Whether the relay token opens the gate: it checks, its path is not revoked, and it is
    /// used for the first time.
    fn admit(&self, token: &str) -> bool {
        let now = (self.clock)();
        let Ok(checked) = postern_proto::relay::check(&self.key, token, now) else {
            return false;
        };
        !checked.path.iter().any(|id| self.revoked.contains(id))
            && self.replay.first_use(checked.fresh, now)
    }

    /// The hop for the server with this pin (base64url), if the relay serves it.
    fn route(&self, pin: &str) -> Option<Upstream> {
        let pin: [u8; 32] = URL_SAFE_NO_PAD.decode(pin).ok()?.try_into().ok()?;
        if let Some(server) = self.servers.iter().find(|s| s.pins.contains(&pin)) {
            return Some(Upstream::Server(server.into()));
        }
        self.via.clone().map(Upstream::Relay)
    }
}

/// A started relay. Dropping it does not stop it; call [`RunningRelay::shutdown`].
pub struct RunningRelay {
    /// The bound public address.
    pub addr: SocketAddr,
    /// Keys and links.
    pub identity: RelayIdentity,
    relay: Arc<Relay>,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    live: Arc<AtomicUsize>,
}

/// Binds the listener, loads or creates the relay's keys and starts serving.
pub async fn start_relay(config: RelayConfig, clock: Clock) -> Result<RunningRelay, ServerError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let identity = RelayIdentity::load(&config, addr)?;
    let tls = tokio_rustls::TlsAcceptor::from(identity.tls.tls_config()?);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let relay = Arc::new(Relay {
        key: identity.key.clone(),
        revoked: config.revoked.iter().copied().collect(),
        replay: ReplayCache::default(),
        servers: config.servers.clone(),
        via: config.via.clone(),
        clock,
        forwarding: AtomicUsize::new(0),
        shutdown: shutdown_rx.clone(),
    });
    let live = Arc::new(AtomicUsize::new(0));
    let (open, rate, burst) = config.per_ip;
    let public = public::Public {
        tls,
        router: Router::new().fallback(front).with_state(relay.clone()),
        shutdown: shutdown_rx,
        live: live.clone(),
        limits: public::Limits {
            total: config.max_connections,
            per_ip: limits::PerIpLimits { open, rate, burst },
            exempt: Default::default(),
        },
    };
    let accept = tokio::spawn(public.accept_loop(listener));
    Ok(RunningRelay { addr, identity, relay, shutdown: shutdown_tx, accept, live })
}

impl RunningRelay {
    /// Stops accepting, closes forwarded connections, and waits (up to 10 s) for them to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
        public::drain(&self.live, || self.relay.forwarding.load(Ordering::Acquire) > 0).await;
    }
}

/// Mints a link without starting the relay (`postern relay … link`).
pub fn mint_link(config: &RelayConfig) -> Result<(RelayLink, CredentialId), ServerError> {
    let identity = RelayIdentity::load(config, config.listen)?;
    let mut id = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
    Ok((identity.link(id), id))
}

/// Every HTTP request lands here: an upgrade with a relay token that opens the gate, for a
/// server the relay serves, is forwarded; everything else is the website.
async fn front(State(relay): State<Arc<Relay>>, req: Request) -> Response {
    let (mut parts, _body) = req.into_parts();
    if public::wants_websocket(&parts) {
        let cookies: Vec<String> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        let find = |name: &str| cookies.iter().find_map(|h| cookie(h, name));
        if let (Some(token), Some(pin), Some(server_token)) =
            (find(COOKIE_NAME), find(SERVER_COOKIE), find(SERVER_TOKEN_COOKIE))
            && server_token.len() <= 128
            && let Some(upstream) = relay.route(pin)
            && relay.admit(token)
            && let Ok(ws) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await
        {
            let cookie = match &upstream {
                Upstream::Server(_) => format!("{COOKIE_NAME}={server_token}"),
                Upstream::Relay(next) => postern_net::relay_cookie_parts(next, pin, server_token),
            };
            let relay = relay.clone();
            return public::sized(ws)
                .on_upgrade(move |socket| forward(relay, socket, upstream, cookie))
                .into_response();
        }
    }
    site::respond(&parts)
}

/// Opens the hop upstream and copies messages both ways until either side ends.
async fn forward(relay: Arc<Relay>, client: WebSocket, upstream: Upstream, cookie: String) {
    relay.forwarding.fetch_add(1, Ordering::AcqRel);
    let endpoint = match &upstream {
        Upstream::Server(endpoint) => endpoint.clone(),
        Upstream::Relay(next) => next.into(),
    };
    let opened = tokio::time::timeout(
        postern_net::CONNECT_TIMEOUT,
        postern_net::open_websocket(&endpoint, &cookie),
    )
    .await;
    match opened {
        Ok(Ok(server)) => pipe(client, server, relay.shutdown.clone()).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "upstream refused"),
        Err(_) => tracing::debug!("upstream timed out"),
    }
    relay.forwarding.fetch_sub(1, Ordering::AcqRel);
}

async fn pipe(client: WebSocket, server: Ws, mut shutdown: watch::Receiver<bool>) {
    let (mut client_tx, mut client_rx) = client.split();
    let (mut server_tx, mut server_rx) = server.split();
    loop {
        tokio::select! {
            msg = client_rx.next() => match msg {
                Some(Ok(AxMessage::Binary(b))) => {
                    if server_tx.send(TMessage::Binary(b)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(AxMessage::Ping(_) | AxMessage::Pong(_))) => {}
                _ => break,
            },
            msg = server_rx.next() => match msg {
                Some(Ok(TMessage::Binary(b))) => {
                    if client_tx.send(AxMessage::Binary(b)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(TMessage::Ping(_) | TMessage::Pong(_) | TMessage::Frame(_))) => {}
                _ => break,
            },
            _ = shutdown.changed() => break,
        }
    }
    let _ = client_tx.send(AxMessage::Close(None)).await;
    let _ = server_tx.send(TMessage::Close(None)).await;
}
