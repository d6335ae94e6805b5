//! The Postern server: a small website on a TLS port, and behind the gate, Postern sessions.
//!
//! ```text
//! TCP → TLS (rustls) → HTTP/1.1 or HTTP/2 (hyper, axum)
//!        ├─ no valid gate token → the website (`site`)
//!        └─ WebSocket upgrade with a fresh gate token → Noise session (`session`)
//!              → frames → `handler` → `postern_store::Store`
//! appends → `hub` → subscribed sessions (push)
//! admin listener (loopback): /health, /metrics
//! ```
//!
//! **Architecture Invariant:** this crate never depends on the client core or on openmls. It
//! reads only the envelope header (key id, next key, signature); the ciphertext is opaque.
//!
//! **Architecture Invariant:** nothing about a client (address, ids, keys) is logged. Logs
//! carry only operation names and error kinds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use postern_proto::gate::{GateKey, cookie_value};
use postern_proto::link::ServerLink;
use postern_proto::session::StaticKeypair;
use postern_store::{Day, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;

mod config;
mod gate;
mod handler;
mod hub;
mod identity;
mod keys;
mod limits;
mod public;
mod relay;
mod session;
mod site;
mod unparsed;

pub use config::{FileConfig, QuotaConfig, RetentionConfig, ServerConfig};
pub use relay::{
    RelayConfig, RelayFileConfig, RelayIdentity, RunningRelay, mint_link, start_relay,
};
pub use site::answer_status as site_answer_status;
pub use unparsed::answer as site_unparsed_answer;

/// How often expired data is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(3_600);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The data directory could not be read or written.
    #[error("data directory: {0}")]
    DataDir(String),
    /// The TLS key or certificate is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The source of time: seconds since the Unix epoch. Tests may shift it.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) website_responses: Counter,
    pub(crate) sessions_open: Counter,
    pub(crate) sessions_total: Counter,
    pub(crate) requests: Counter,
    pub(crate) refusals: Counter,
    pub(crate) appends: Counter,
}

pub(crate) struct App<S> {
    pub(crate) store: S,
    /// Open connections on the public listener.
    pub(crate) live: Arc<AtomicUsize>,
    pub(crate) gate: gate::Gate,
    pub(crate) static_key: StaticKeypair,
    pub(crate) hub: hub::Hub,
    /// Logs' append keys, decoded, so appends need no store read.
    pub(crate) keys: keys::KeyCache,
    pub(crate) metrics: Metrics,
    pub(crate) clock: Clock,
    pub(crate) days_ahead: u32,
    /// Per-connection request rate and burst.
    pub(crate) request_rate: (u32, u32),
    /// Request bytes in flight, all connections together.
    pub(crate) buffered: Arc<limits::Buffered>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl<S> App<S> {
    pub(crate) fn now(&self) -> u64 {
        (self.clock)()
    }

    pub(crate) fn today(&self) -> Day {
        u32::try_from(self.now() / 86_400).unwrap_or(u32::MAX).saturating_add(self.days_ahead)
    }
}

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer<S: Store> {
    /// The bound public address.
    pub addr: SocketAddr,
    /// The bound admin address.
    pub admin_addr: SocketAddr,
    /// The link clients use.
    pub link: ServerLink,
    app: Arc<App<S>>,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    live: Arc<AtomicUsize>,
}

/// The addresses for links: those configured, else the bound one.
pub(crate) fn public_addrs(configured: &[String], bound: SocketAddr) -> Vec<String> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let ip = bound.ip();
    let ip = if ip.is_unspecified() {
        // Bound to every interface; loopback is the one address sure to work. Operators set
        // `public_addrs` for anything else, and the binary warns about it.
        match ip {
            std::net::IpAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::IpAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        ip
    };
    vec![SocketAddr::new(ip, bound.port()).to_string()]
}

/// Binds the listeners, loads or creates the identity and starts serving.
pub async fn start<S: Store>(
    config: ServerConfig,
    store: S,
    clock: Clock,
) -> Result<RunningServer<S>, ServerError> {
    let identity = identity::Identity::load_or_create(
        &config.data_dir,
        config.server_name.as_deref(),
        (config.tls_cert.as_deref(), config.tls_key.as_deref()),
    )?;
    let tls = tokio_rustls::TlsAcceptor::from(identity.tls.tls_config()?);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let admin = TcpListener::bind(config.admin)
        .await
        .map_err(|source| ServerError::Bind { addr: config.admin, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let admin_addr =
        admin.local_addr().map_err(|source| ServerError::Bind { addr: config.admin, source })?;
    let link = identity.link(public_addrs(&config.public_addrs, addr), config.server_name.clone());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let live = Arc::new(AtomicUsize::new(0));
    let app = Arc::new(App {
        store,
        live: live.clone(),
        gate: gate::Gate::new(GateKey::derive(&identity.secret)),
        static_key: StaticKeypair::from_private(identity.static_key.private),
        hub: hub::Hub::default(),
        keys: keys::KeyCache::default(),
        metrics: Metrics::default(),
        clock,
        days_ahead: config.days_ahead,
        request_rate: (config.requests_per_second, config.request_burst),
        buffered: Arc::new(limits::Buffered::new(config.buffer_bytes)),
        shutdown: shutdown_rx,
    });
    let router = Router::new().fallback(front::<S>).with_state(app.clone());
    let public = public::Public {
        tls,
        router,
        shutdown: app.shutdown.clone(),
        live: live.clone(),
        limits: public::Limits::of(&config),
    };
    let accept = tokio::spawn(public.accept_loop(listener));
    tokio::spawn(admin_loop(admin, app.clone()));
    tokio::spawn(sweep_loop(app.clone()));
    Ok(RunningServer { addr, admin_addr, link, app, shutdown: shutdown_tx, accept, live })
}

impl<S: Store> RunningServer<S> {
    /// Stops accepting, closes sessions, and waits (up to 10 s) for connections to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
        public::drain(&self.live, || self.app.metrics.sessions_open.get() > 0).await;
    }

    /// The store, for the binary to close after shutdown.
    pub fn store(&self) -> &S {
        &self.app.store
    }
}

/// Every HTTP request lands here: a WebSocket upgrade with a valid, fresh gate token becomes a
/// session; everything else is the website.
async fn front<S: Store>(State(app): State<Arc<App<S>>>, req: Request) -> Response {
    let (mut parts, _body) = req.into_parts();
    if public::wants_websocket(&parts) {
        let token = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(cookie_value);
        if let Some(token) = token
            && app.gate.admit(token, app.now())
            && let Ok(ws) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await
        {
            let session_app = app.clone();
            return public::sized(ws)
                .on_upgrade(move |socket| session::run(session_app, socket))
                .into_response();
        }
    }
    app.metrics.website_responses.inc();
    site::respond(&parts)
}

async fn admin_loop<S: Store>(listener: TcpListener, app: Arc<App<S>>) {
    let router = Router::new()
        .route("/health", axum::routing::get(|| async { "ok\n" }))
        .route("/metrics", axum::routing::get(metrics::<S>))
        .with_state(app.clone());
    let mut shutdown = app.shutdown.clone();
    let _ = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
}

async fn metrics<S: Store>(State(app): State<Arc<App<S>>>) -> String {
    let m = &app.metrics;
    let (used, quota) = match app.store.usage().await {
        Ok(u) => (u.used_bytes, u.quota_bytes),
        Err(_) => (0, 0),
    };
    format!(
        "postern_connections_open {}\npostern_website_responses_total {}\npostern_sessions_open {}\n\
         postern_sessions_total {}\npostern_requests_total {}\npostern_refusals_total {}\n\
         postern_appends_total {}\npostern_subscriptions {}\npostern_storage_used_bytes {used}\n\
         postern_storage_quota_bytes {quota}\n",
        app.live.load(Ordering::Relaxed),
        m.website_responses.get(),
        m.sessions_open.get(),
        m.sessions_total.get(),
        m.requests.get(),
        m.refusals.get(),
        m.appends.get(),
        app.hub.subscriptions(),
    )
}

async fn sweep_loop<S: Store>(app: Arc<App<S>>) {
    let mut shutdown = app.shutdown.clone();
    loop {
        let swept = app.store.sweep(app.today()).await;
        // Expired append keys are gone from the store: forget the decoded ones too.
        app.keys.clear();
        match swept {
            Ok(swept) => tracing::info!(
                entries = swept.entries,
                items = swept.items,
                other = swept.other,
                "expired data swept"
            ),
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
