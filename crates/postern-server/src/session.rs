//! One client session over a WebSocket: the Noise handshake, then frames until either side
//! closes. Requests run concurrently (up to [`MAX_IN_FLIGHT`]); their answers go out as they
//! complete. Subscriptions live here, one cursor per log.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use postern_proto::DecodeError;
use postern_proto::envelope::Envelope;
use postern_proto::frame::{
    Body, ClientFrame, ErrorCode, Item, Push, Request, Response, ServerFrame,
};
use postern_proto::ids::{KeyId, LogId};
use postern_proto::limits::MAX_ITEMS;
use postern_proto::session::{Transport, server_respond};
use postern_store::{ITEM_OVERHEAD, Page, ReadLimit, Store};
use rand::RngCore;

use crate::App;
use crate::handler::{code, handle, read_limit};
use crate::hub::{Heard, Notice, Subscriber};
use crate::limits::{Bucket, Lease};

/// Requests one session may have running at once; beyond this the session stops reading.
const MAX_IN_FLIGHT: usize = 64;
/// Frames written but not yet flushed to the socket before a flush is forced. Frames are
/// flushed when the session has nothing else ready, so answers and pushes that are ready
/// together leave in one write.
const MAX_UNFLUSHED: usize = 32;
/// Logs one session may subscribe to. Clients spread subscriptions over several connections.
const MAX_SUBSCRIPTIONS: usize = 1_024;
/// Append keys one connection may prove it holds.
const MAX_TRUSTED_KEYS: usize = 1_024;
/// Time for the client's first handshake message after the upgrade.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session with no frame from the client for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

type Work = Pin<Box<dyn Future<Output = Done> + Send>>;

enum Done {
    /// A request's answer; its share of the buffer budget is given back with it.
    Response {
        request_id: u32,
        result: Result<Response, ErrorCode>,
        lease: Lease,
        /// A `log_auth` that succeeded: appends under this key need no signature check.
        grant: Option<(LogId, KeyId)>,
    },
    CatchUp {
        log: LogId,
        reply_to: Option<u32>,
        result: Result<Page, ErrorCode>,
    },
}

/// Per-log subscription state: everything up to `cursor` has been pushed.
struct Sub {
    cursor: u64,
    /// The most entry bytes a push carries (as the subscriber asked, within our limits).
    max_bytes: usize,
    reading: bool,
    dirty: bool,
}

/// Why the loop stopped; only used to decide whether to say anything.
struct Closed;

struct Session<S: Store> {
    app: Arc<App<S>>,
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    transport: Transport,
    nonce: [u8; 32],
    last_request_id: Option<u32>,
    /// The connection's request budget.
    bucket: Bucket,
    subs: HashMap<LogId, Sub>,
    /// Append keys this connection proved it holds (`log_auth`), by log.
    trusted: HashSet<(LogId, KeyId)>,
    work: FuturesUnordered<Work>,
    /// Frames fed to the sink since its last flush.
    unflushed: usize,
}

/// Runs a session to its end.
///
/// Not an async fn, and the session boxed: an async fn keeps room for its arguments (the
/// socket, moved into its halves at once) and for every local across an await (the
/// session twice, as the `Option` and as its content) for the session's whole life. Each
/// idle session paid for those (BENCHMARKS.md).
pub(crate) fn run<S: Store>(
    app: Arc<App<S>>,
    socket: WebSocket,
) -> impl Future<Output = ()> + Send + 'static {
    let (sink, stream) = socket.split();
    async move {
        app.metrics.sessions_total.inc();
        app.metrics.sessions_open.inc();
        let subscriber = app.hub.subscriber();
        if let Some(mut session) = handshake(&app, sink, stream).await {
            let _ = session.serve(&subscriber).await;
            app.hub.unsubscribe_all(session.subs.keys().copied(), subscriber.id);
            let _ = session.sink.close().await;
        }
        app.metrics.sessions_open.dec();
    }
}

async fn handshake<S: Store>(
    app: &Arc<App<S>>,
    mut sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
) -> Option<Box<Session<S>>> {
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.next()).await.ok()??.ok()?;
    let Message::Binary(first) = first else {
        return None;
    };
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    // A handshake that does not decrypt gets no answer: it was not meant for this key.
    let (transport, answer) = server_respond(&app.static_key, &first, nonce).ok()?;
    sink.send(Message::Binary(answer.into())).await.ok()?;
    Some(Box::new(Session {
        app: app.clone(),
        sink,
        stream,
        transport: transport?,
        nonce,
        last_request_id: None,
        bucket: Bucket::full(app.request_rate.1, tokio::time::Instant::now()),
        subs: HashMap::new(),
        trusted: HashSet::new(),
        work: FuturesUnordered::new(),
        unflushed: 0,
    }))
}

impl<S: Store> Session<S> {
    async fn serve(&mut self, subscriber: &Subscriber) -> Result<(), Closed> {
        let mut shutdown = self.app.shutdown.clone();
        let idle = tokio::time::sleep(IDLE_TIMEOUT);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                // In order: shutdown, then finished work and pushes before new requests,
                // and the flush last, when nothing else is ready.
                biased;
                _ = shutdown.changed() => return Err(Closed),
                Some(done) = self.work.next(), if !self.work.is_empty() => self.on_done(done, subscriber).await?,
                heard = subscriber.next() => match heard {
                    Heard::Notice(notice) => self.on_notice(notice).await?,
                    Heard::Lagged => {
                        let logs: Vec<LogId> = self.subs.keys().copied().collect();
                        for log in logs {
                            self.catch_up(log, None);
                        }
                    }
                },
                msg = self.stream.next(), if self.work.len() < MAX_IN_FLIGHT => {
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                    match msg {
                        Some(Ok(Message::Binary(bytes))) => self.on_message(&bytes, subscriber).await?,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        _ => return Err(Closed),
                    }
                }
                () = &mut idle => return Err(Closed),
                () = std::future::ready(()), if self.unflushed > 0 => self.flush().await?,
            }
        }
    }

    /// Queues a frame; it leaves with the next flush.
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), Closed> {
        let sealed = self.transport.seal(&frame.encode()).map_err(|_| Closed)?;
        self.sink.feed(Message::Binary(sealed.into())).await.map_err(|_| Closed)?;
        self.unflushed += 1;
        if self.unflushed >= MAX_UNFLUSHED {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Closed> {
        self.unflushed = 0;
        self.sink.flush().await.map_err(|_| Closed)
    }

    async fn respond(
        &mut self,
        request_id: u32,
        result: Result<Response, ErrorCode>,
    ) -> Result<(), Closed> {
        let closes = matches!(result, Err(c) if c.closes_connection());
        if result.is_err() {
            self.app.metrics.refusals.inc();
        }
        self.send(&ServerFrame::Response { request_id, result }).await?;
        if closes { Err(Closed) } else { Ok(()) }
    }

    async fn on_message(&mut self, bytes: &[u8], subscriber: &Subscriber) -> Result<(), Closed> {
        // A message that does not decrypt was not sent by our peer: close without a word.
        let plain = self.transport.open(bytes).map_err(|_| Closed)?;
        let frame = match ClientFrame::decode(&plain) {
            Ok(frame) => frame,
            Err(e) => {
                let code = match e {
                    DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
                    _ => ErrorCode::BadFrame,
                };
                return self.respond(0, Err(code)).await;
            }
        };
        if self.last_request_id.is_some_and(|last| frame.request_id <= last) {
            return self.respond(frame.request_id, Err(ErrorCode::BadFrame)).await;
        }
        self.last_request_id = Some(frame.request_id);
        self.app.metrics.requests.inc();
        let request_id = frame.request_id;
        let (rate, burst) = self.app.request_rate;
        if !self.bucket.take(tokio::time::Instant::now(), rate, burst) {
            return self.respond(request_id, Err(ErrorCode::RateLimited)).await;
        }
        match frame.request {
            Request::Subscribe { log, after, max_bytes } => {
                if !self.subs.contains_key(&log) && self.subs.len() >= MAX_SUBSCRIPTIONS {
                    return self.respond(request_id, Err(ErrorCode::QuotaExceeded)).await;
                }
                self.app.hub.subscribe(log, subscriber);
                let max_bytes = read_limit(u16::MAX, max_bytes).max_bytes;
                let sub = self.subs.entry(log).or_insert(Sub {
                    cursor: after,
                    max_bytes,
                    reading: false,
                    dirty: false,
                });
                sub.cursor = after;
                sub.max_bytes = max_bytes;
                sub.reading = false;
                self.catch_up(log, Some(request_id));
                Ok(())
            }
            Request::Unsubscribe { log } => {
                self.subs.remove(&log);
                self.app.hub.unsubscribe(&log, subscriber.id);
                self.respond(request_id, Ok(Response::Ok)).await
            }
            _ => {
                // Its bytes count against the budget all connections share until answered.
                let Some(lease) = self.app.buffered.try_take(plain.len()) else {
                    return self.respond(request_id, Err(ErrorCode::RateLimited)).await;
                };
                let (trusted_key, grant) = match &frame.request {
                    Request::LogAppend { log, body: Body::Inline(bytes) } => {
                        let key = Envelope::key_id_of(bytes);
                        (key.filter(|k| self.trusted.contains(&(*log, *k))), None)
                    }
                    Request::LogAuth { log, key } if self.trusted.len() < MAX_TRUSTED_KEYS => {
                        (None, Some((*log, key.key_id())))
                    }
                    Request::LogAuth { .. } => {
                        return self.respond(request_id, Err(ErrorCode::QuotaExceeded)).await;
                    }
                    _ => (None, None),
                };
                let app = self.app.clone();
                let nonce = self.nonce;
                self.work.push(Box::pin(async move {
                    let result = handle(&app, &nonce, frame, trusted_key).await;
                    let grant = grant.filter(|_| result.is_ok());
                    Done::Response { request_id, result, lease, grant }
                }));
                Ok(())
            }
        }
    }

    /// Starts a read of `log` from its cursor, unless one is running (then marks it dirty).
    fn catch_up(&mut self, log: LogId, reply_to: Option<u32>) {
        let Some(sub) = self.subs.get_mut(&log) else {
            return;
        };
        if sub.reading && reply_to.is_none() {
            sub.dirty = true;
            return;
        }
        sub.reading = true;
        sub.dirty = false;
        let after = sub.cursor;
        let limit = ReadLimit { max_items: MAX_ITEMS, max_bytes: sub.max_bytes };
        let app = self.app.clone();
        self.work.push(Box::pin(async move {
            let result = app.store.read_log(log, after, limit).await.map_err(code);
            Done::CatchUp { log, reply_to, result }
        }));
    }

    async fn on_done(&mut self, done: Done, subscriber: &Subscriber) -> Result<(), Closed> {
        match done {
            Done::Response { request_id, result, lease, grant } => {
                drop(lease);
                if let Some(grant) = grant {
                    self.trusted.insert(grant);
                }
                self.respond(request_id, result).await
            }
            Done::CatchUp { log, reply_to, result } => {
                let page = match result {
                    Ok(page) => page,
                    Err(code) => {
                        if reply_to.is_some() {
                            self.subs.remove(&log);
                            self.app.hub.unsubscribe(&log, subscriber.id);
                        } else if let Some(sub) = self.subs.get_mut(&log) {
                            sub.reading = false;
                        }
                        return match reply_to {
                            Some(id) => self.respond(id, Err(code)).await,
                            None => Ok(()),
                        };
                    }
                };
                if let Some(id) = reply_to {
                    self.respond(id, Ok(Response::Ok)).await?;
                }
                let Some(sub) = self.subs.get_mut(&log) else {
                    return Ok(());
                };
                let items: Vec<_> = page.items.into_iter().filter(|i| i.seq > sub.cursor).collect();
                if let Some(last) = items.last() {
                    sub.cursor = last.seq;
                }
                let again = page.more || sub.dirty;
                sub.reading = false;
                if again {
                    self.catch_up(log, None);
                }
                if !items.is_empty() {
                    self.send(&ServerFrame::Push(Push::Items { log, items })).await?;
                }
                Ok(())
            }
        }
    }

    async fn on_notice(&mut self, notice: Notice) -> Result<(), Closed> {
        let Some(sub) = self.subs.get_mut(&notice.log) else {
            return Ok(());
        };
        if sub.reading {
            sub.dirty = true;
            return Ok(());
        }
        if notice.item.seq <= sub.cursor {
            return Ok(());
        }
        if notice.item.seq != sub.cursor + 1 {
            self.catch_up(notice.log, None);
            return Ok(());
        }
        sub.cursor = notice.item.seq;
        // As a read would carry it: its first bytes, the rest by `log_read_part`.
        let item = &notice.item;
        let keep = item.bytes.len().min(sub.max_bytes.saturating_sub(ITEM_OVERHEAD));
        let items = vec![Item {
            seq: item.seq,
            total_len: item.total_len,
            bytes: item.bytes[..keep].to_vec(),
        }];
        self.send(&ServerFrame::Push(Push::Items { log: notice.log, items })).await
    }
}
