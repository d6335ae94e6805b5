//! The async driver: carries what the client core queues to the servers and feeds what
//! comes back into it. It holds no state of its own beyond open connections; everything that
//! must survive a crash is in the client store, written by the core before or after each
//! network step.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use postern_client::{Client, Event, OutboxItem, OutboxOp};
use postern_net::{Connection, Door, NetError};
use postern_proto::frame::{Body, ClaimPolicy, ErrorCode, Item, Push, Request, Response};
use postern_proto::ids::{KeyId, LogId, UploadId, public_key};
use postern_proto::limits::MAX_INLINE;
use postern_proto::link::ServerLink;
use tokio::time::Instant;

use super::transport::{self, DoorBook, DoorKey, DoorState};

/// How long after a log was read to its end a subscription needs no read of its backlog
/// first: what can be appended meanwhile is a few entries, each pushed in one segment.
const FRESH: Duration = Duration::from_secs(10);
/// How long a door gets before the next one is tried beside it.
const DOOR_STAGGER: Duration = Duration::from_secs(2);
/// The name the store keeps the network's packet budget under: the lowest any door learned,
/// the default for doors that learned none.
const NETWORK_BUDGET: &str = "network";
/// `max_bytes` for the server's own limit.
const ANY: u16 = u16::MAX;
/// How many times a request is sent again on a fresh connection after its connection froze
/// or broke.
const RETRIES: u32 = 2;
/// Items asked for per read.
const READ_BATCH: u16 = 64;
/// Entry bytes one frame carries through a door with a budget (an upload's chunk, an
/// answer's items, a push): with its framing it fills the 4 KiB padding bucket, so no
/// request or answer there takes more than three full segments. Elsewhere frames go up to
/// the largest bucket.
const SMALL_FRAME: u16 = 3_968;
/// Entry bytes an answer carries when the connection has no room for [`SMALL_FRAME`]: it
/// fills the 1 KiB bucket, one segment (what an empty read or a short message needs).
const TINY_FRAME: u16 = 960;
/// Rounds of sending and resolving commits in one flush (each commit needs one).
const MAX_FLUSH_ROUNDS: usize = 16;
/// How long every door to a chat's server must have failed before the chat moves to the
/// next server on its list (`POSTERN_FAILOVER_AFTER`, in seconds, overrides it).
const FAILOVER_AFTER: Duration = Duration::from_secs(10 * 60);
/// How often a client looks on the next servers for chats other members moved
/// (`POSTERN_SUCCESSOR_CHECK`, in seconds, overrides it).
const SUCCESSOR_CHECK: Duration = Duration::from_secs(10 * 60);
/// How long a stale chat's request to be re-added goes unanswered before it is sent to the
/// next members (`POSTERN_REJOIN_RETRY`, in seconds, overrides it).
const REJOIN_RETRY: Duration = Duration::from_secs(24 * 60 * 60);

/// A duration in seconds from the environment, or the default.
fn secs_from_env(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(default, Duration::from_secs)
}

/// No door to a server opened.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// A server's answer, or why there was none. Refusals are the server's word on the request;
/// everything else is the network's fault and worth a retry.
enum Outcome {
    Done(Response),
    Refused(ErrorCode),
}

/// How one door to a server did when tried (`postern status`).
pub(crate) struct DoorReport {
    pub(crate) door: Door,
    /// The relay's id, `None` for the direct door.
    pub(crate) relay: Option<i64>,
    /// The time to a session and a ping, or why it failed.
    pub(crate) result: Result<Duration, NetError>,
    /// The packet budget its connections keep under.
    pub(crate) budget: Option<u32>,
    /// The last probe of it for a freeze on this network.
    pub(crate) probe: Option<postern_client::doors::Probe>,
    /// Whether it is the door that opened last.
    pub(crate) last: bool,
}

/// Why a request got no answer.
enum Failure {
    /// No door opened: sending again now would not help.
    Unreachable(anyhow::Error),
    /// The connection broke or froze under the request: a fresh one may do.
    Lost(anyhow::Error),
}

/// The client core and its connections.
pub(crate) struct Driver {
    pub(crate) client: Client,
    /// One connection per server link.
    conns: HashMap<String, Connection>,
    /// The logs subscribed on each server's current connection.
    subscribed: HashMap<String, HashSet<LogId>>,
    /// The append keys each server's current connection has proved it holds (`log_auth`).
    authed: HashMap<String, HashSet<(LogId, KeyId)>>,
    /// The door that last opened to each server (a relay's id, `None` direct): tried
    /// first next time.
    doors: HashMap<String, Option<i64>>,
    /// What the transport engine knows of each door.
    book: DoorBook,
    /// When each log was last known read to its end (a read that reached it, a push, our
    /// own append right after the cursor): subscribing again soon after needs no read of
    /// the backlog first, even under a budget.
    caught_up: HashMap<LogId, Instant>,
    /// What arrived while a command that does not print it ran (a send reads its chat),
    /// or while subscribing read a backlog: `listen` prints it; after a one-shot command it
    /// waits for `postern read`.
    pub(crate) unshown: Vec<Event>,
    /// How long a chat's server stays out of reach before the chat moves on.
    failover_after: Duration,
    /// How often moved chats are looked for.
    successor_check: Duration,
    /// How long a request to be re-added waits for an answer before it is sent again.
    rejoin_retry: Duration,
    /// Whether the client was told which network it is on.
    network_told: bool,
    /// The doors probed for a freeze in this process (on any network).
    probed: HashSet<DoorKey>,
}

impl Driver {
    pub(crate) fn new(client: Client) -> Self {
        Driver {
            client,
            conns: HashMap::new(),
            subscribed: HashMap::new(),
            authed: HashMap::new(),
            doors: HashMap::new(),
            book: DoorBook::default(),
            caught_up: HashMap::new(),
            unshown: Vec::new(),
            failover_after: secs_from_env("POSTERN_FAILOVER_AFTER", FAILOVER_AFTER),
            successor_check: secs_from_env("POSTERN_SUCCESSOR_CHECK", SUCCESSOR_CHECK),
            rejoin_retry: secs_from_env("POSTERN_REJOIN_RETRY", REJOIN_RETRY),
            network_told: false,
            probed: HashSet::new(),
        }
    }

    /// Looks at which network the device is on (before a connection opens, since the
    /// device may have moved since the last one). On another network than before, what the
    /// engine learned of the doors no longer holds: it starts again from what the store
    /// remembers of this network.
    fn check_network(&mut self) -> Result<()> {
        let description = super::network::describe();
        self.network_told = true;
        if self.client.on_network(description.as_deref())? {
            tracing::info!("on another network: the doors are tried afresh");
            self.book = DoorBook::default();
            self.doors.clear();
        }
        Ok(())
    }

    /// The engine's state of a door, with the budget the store remembers for it loaded the
    /// first time this process sees it.
    fn door(&mut self, key: &DoorKey) -> Result<&mut DoorState> {
        if !self.network_told {
            self.check_network()?;
        }
        if !self.book.known(key) {
            // Its own budget; else none if a probe on this network lately found nothing
            // freezing through it; else the network's; else the one its kind starts with.
            let own = self.client.door_budget(&key.store_name())?;
            let lifted = own.is_none()
                && self.client.door_probe(&key.store_name())?.is_some_and(|p| {
                    !p.froze && unix_now().saturating_sub(p.at) < transport::PROBE_AGAIN.as_secs()
                });
            let budget = match own {
                Some(own) => Some(own),
                None if lifted => None,
                None => self.client.door_budget(NETWORK_BUDGET)?.or(key.starting_budget()),
            };
            // Connection times are kept only where the cap applies.
            let ages: Vec<Duration> = if budget.is_some() {
                let now = unix_now();
                self.client
                    .door_opens(&key.store_name(), now.saturating_sub(60))?
                    .into_iter()
                    .map(|at| Duration::from_secs(now.saturating_sub(at)))
                    .collect()
            } else {
                Vec::new()
            };
            let state = self.book.get(key);
            state.budget = budget;
            state.lifted = lifted;
            state.attempted_before(std::time::Instant::now(), ages);
        }
        Ok(self.book.get(key))
    }

    /// The door the current connection to a server came through.
    fn door_key(link: &ServerLink, relay: Option<i64>) -> DoorKey {
        match relay {
            None => DoorKey::Direct(link.addrs.join(",")),
            Some(id) => DoorKey::Relay(id),
        }
    }

    /// The doors to a server, in the order to try them: the one that opened last (in this
    /// process, else as the store remembers), then the direct one, then every relay. Each
    /// with its relay id (`None`: direct).
    fn doors(&self, link: &ServerLink) -> Result<Vec<(Option<i64>, Door)>> {
        let mut doors = vec![(None, Door::Direct)];
        doors.extend(self.client.relays()?.into_iter().map(|r| (Some(r.id), Door::Relay(r.link))));
        let last = match self.doors.get(&link.to_link_string()) {
            Some(last) => Some(*last),
            None => self.client.last_door(link)?,
        };
        if let Some(last) = last
            && let Some(i) = doors.iter().position(|(id, _)| *id == last)
        {
            let first = doors.remove(i);
            doors.insert(0, first);
        }
        Ok(doors)
    }

    /// The connection to a server, opened on first use through whichever door opens first
    /// among those under their cap of new connections (waiting for a slot if none is).
    async fn conn(&mut self, link: &ServerLink) -> Result<&mut Connection> {
        let key = link.to_link_string();
        if !self.conns.contains_key(&key) {
            self.check_network()?;
            let all = self.doors(link)?;
            // Doors under their cap are tried at once, but a door that failed lately only
            // when no other is free. Doors that have not worked are tried only until a capped
            // door's next slot: a blocked address costs a connect timeout. With no door
            // free, the client waits for the next slot (under a minute). Each door is tried
            // once.
            let mut tried = std::collections::HashSet::new();
            let mut failures = Vec::new();
            let opened = loop {
                let now = Instant::now().into_std();
                let mut ready = Vec::new();
                let mut failed_lately = Vec::new();
                let mut next_slot: Option<std::time::Instant> = None;
                for (id, door) in &all {
                    if tried.contains(id) {
                        continue;
                    }
                    let state = self.door(&Self::door_key(link, *id))?;
                    if !state.may_open(now) {
                        if let Some(slot) = state.next_slot() {
                            next_slot = Some(next_slot.map_or(slot, |n| n.min(slot)));
                        }
                    } else if state.failed_lately(now) {
                        failed_lately.push((*id, door.clone()));
                    } else {
                        ready.push(((*id, door.clone()), state.standing()));
                    }
                }
                transport::spread(&mut ready);
                // Doors none of which has worked (or that failed lately) are tried only until
                // a capped door, which has, is free again.
                let proven = ready.iter().any(|(_, standing)| standing.worked());
                let ready: Vec<_> = ready.into_iter().map(|(door, _)| door).collect();
                let (candidates, until) = if !ready.is_empty() {
                    (ready, if proven { None } else { next_slot })
                } else if !failed_lately.is_empty() {
                    (failed_lately, next_slot)
                } else if let Some(slot) = next_slot {
                    tracing::info!("the other doors are at their cap of new connections: waiting");
                    tokio::time::sleep_until(Instant::from_std(slot)).await;
                    continue;
                } else {
                    return Err(anyhow::Error::new(Unreachable(format!(
                        "cannot reach the server at {} ({})",
                        link.addrs.join(", "),
                        failures.join("; ")
                    ))));
                };
                let (ids, doors): (Vec<_>, Vec<_>) = candidates.into_iter().unzip();
                let started = Instant::now();
                let attempt = postern_net::connect_any(link, &doors, DOOR_STAGGER);
                let result = match until {
                    Some(slot) => {
                        match tokio::time::timeout_at(Instant::from_std(slot), attempt).await {
                            Ok(result) => result,
                            // A door with a good record is free again: it goes first. The doors
                            // started so far (one per stagger) count as attempted.
                            Err(_) => {
                                let stagger = DOOR_STAGGER.as_millis().max(1);
                                let began = started.elapsed().as_millis() / stagger + 1;
                                let began = usize::try_from(began).unwrap_or(usize::MAX);
                                self.attempted(link, &ids[..began.min(ids.len())])?;
                                continue;
                            }
                        }
                    }
                    None => attempt.await,
                };
                tried.extend(ids.iter().copied());
                match result {
                    Ok((conn, i)) => {
                        self.attempted(link, &ids[..=i])?;
                        // The doors tried before it had the stagger's head start and lost:
                        // they failed or are slow, and stand aside for a while.
                        for id in &ids[..i] {
                            self.door(&Self::door_key(link, *id))?.failed(now);
                        }
                        break (conn, ids[i], doors[i].clone(), started);
                    }
                    Err(errors) => {
                        self.attempted(link, &ids)?;
                        for (i, e) in errors {
                            self.door(&Self::door_key(link, ids[i]))?.failed(now);
                            failures.push(format!("{}: {e}", doors[i]));
                        }
                    }
                }
            };
            let (conn, relay, opened_door, started) = opened;
            tracing::debug!(door = %opened_door, "connected");
            let door = Self::door_key(link, relay);
            let state = self.door(&door)?;
            state.opened();
            // A session's set-up is about four round trips: a first guess at the RTT.
            state.first_guess(started.elapsed() / 4);
            self.doors.insert(key.clone(), relay);
            self.client.door_opened(link, relay)?;
            // A new connection starts with no subscriptions and no proved keys.
            self.subscribed.remove(&key);
            self.authed.remove(&key);
            self.conns.insert(key.clone(), conn);
        }
        self.conns.get_mut(&key).ok_or_else(|| anyhow!("connection vanished"))
    }

    /// Connection attempts just started through these doors, answered or not: each counts
    /// toward its door's cap, since the censor counts attempts. Where the cap applies (a
    /// door with a budget) they are written down for later commands too.
    fn attempted(&mut self, link: &ServerLink, ids: &[Option<i64>]) -> Result<()> {
        for id in ids {
            let door = Self::door_key(link, *id);
            let state = self.door(&door)?;
            state.attempted(std::time::Instant::now());
            if state.budget.is_some() {
                let now = unix_now();
                self.client.door_opened_at(&door.store_name(), now, now.saturating_sub(120))?;
            }
        }
        Ok(())
    }

    /// Whether the connection to `link` (opened if none is) came through a door with a
    /// budget.
    async fn budgeted(&mut self, link: &ServerLink) -> Result<bool> {
        self.conn(link).await?;
        Ok(self.current_door(link)?.1.budget.is_some())
    }

    /// Whether a chat's log is subscribed on its server's open connection: its entries then
    /// arrive as they are appended, and a read would bring nothing new.
    pub(crate) fn live(&mut self, chat: &str) -> Result<bool> {
        Ok(self.client.logs()?.into_iter().any(|c| {
            let key = c.server.to_link_string();
            c.chat == chat
                && self.conns.contains_key(&key)
                && self.subscribed.get(&key).is_some_and(|s| s.contains(&c.log))
        }))
    }

    /// Whether the home server's connections go (or last went) through a door with a budget.
    pub(crate) fn under_budget(&mut self) -> bool {
        let link = self.client.server().clone();
        self.current_door(&link).is_ok_and(|(_, state)| state.budget.is_some())
    }

    /// The engine's state of the door the current connection to `link` came through.
    fn current_door(&mut self, link: &ServerLink) -> Result<(DoorKey, &mut DoorState)> {
        let relay = self.doors.get(&link.to_link_string()).copied().flatten();
        let key = Self::door_key(link, relay);
        let state = self.door(&key)?;
        Ok((key, state))
    }

    /// Sends one request and waits for its answer, sending it again on a fresh connection
    /// (maybe through another door) when the connection froze or broke. A claim is sent
    /// once: a second claim could use up a one-time invite.
    async fn call(
        &mut self,
        link: &ServerLink,
        request: Request,
        signer: Option<&ed25519_dalek::SigningKey>,
    ) -> Result<Outcome> {
        let retries = if matches!(request, Request::KeyPackageClaim { .. }) { 0 } else { RETRIES };
        let mut attempt = 0;
        loop {
            match self.call_once(link, request.clone(), signer, attempt).await {
                Ok(outcome) => return Ok(outcome),
                Err(Failure::Lost(e)) if attempt < retries => {
                    tracing::info!(error = %e, attempt, "sending the request again");
                    attempt += 1;
                }
                Err(Failure::Lost(e) | Failure::Unreachable(e)) => return Err(e),
            }
        }
    }

    /// One try of [`call`](Self::call). The connection is replaced first if its door has a
    /// budget the request would exceed; a request unanswered within the door's freeze wait
    /// counts as frozen.
    async fn call_once(
        &mut self,
        link: &ServerLink,
        request: Request,
        signer: Option<&ed25519_dalek::SigningKey>,
        attempt: u32,
    ) -> Result<Outcome, Failure> {
        let key = link.to_link_string();
        // Only a door with a budget has its connection's spending read, and the request's
        // answer sized for what the connection has left.
        let open = self.conns.contains_key(&key);
        if open && self.current_door(link).map_err(Failure::Unreachable)?.1.budget.is_some() {
            let spent = self.conns.get(&key).map(Connection::spent).unwrap_or_default();
            let (_, state) = self.current_door(link).map_err(Failure::Unreachable)?;
            if fit(state, spent, &request).is_none() {
                tracing::debug!(
                    packets = spent.packets,
                    next = request.name(),
                    "connection at its budget: replacing it"
                );
                self.conns.remove(&key);
            }
        }
        self.conn(link).await.map_err(Failure::Unreachable)?;
        let spent = self.conns.get(&key).map(Connection::spent).unwrap_or_default();
        let (door, state) = self.current_door(link).map_err(Failure::Unreachable)?;
        let wait = state.freeze_wait(attempt);
        let request = match state.budget {
            // A fresh connection too small for the request gets the smallest answers.
            Some(_) => {
                fit(state, spent, &request).unwrap_or_else(|| small_answers(request, TINY_FRAME))
            }
            None => request,
        };
        tracing::trace!(packets = spent.packets, op = request.name(), "request");
        let conn = self
            .conns
            .get_mut(&key)
            .ok_or_else(|| Failure::Unreachable(anyhow!("connection vanished")))?;
        // Where the connection stood before the request: if it freezes, the censor's count
        // ran out somewhere in this request (what the kernel counts after includes resends).
        let before = conn.spent();
        let started = Instant::now();
        let answer = tokio::time::timeout(wait, conn.request(request, signer)).await;
        match answer {
            Ok(Ok(response)) => {
                self.book.get(&door).sample(started.elapsed());
                Ok(Outcome::Done(response))
            }
            Ok(Err(NetError::Refused(code))) if !code.closes_connection() => {
                Ok(Outcome::Refused(code))
            }
            Ok(Err(e)) => {
                self.conns.remove(&key);
                Err(Failure::Lost(
                    anyhow!(e).context(format!("lost the server at {}", link.addrs.join(", "))),
                ))
            }
            Err(_) => {
                self.conns.remove(&key);
                self.learn_freeze(&door, before).map_err(Failure::Unreachable)?;
                Err(Failure::Lost(anyhow!(
                    "no answer from the server at {}",
                    link.addrs.join(", ")
                )))
            }
        }
    }

    /// A request through `door` went unanswered on a connection that had spent `before`
    /// when it was sent: if that is a count-based freeze, the door gets the budget it
    /// teaches, and so does every door without a budget of its own (a fresh door would
    /// freeze the same way, and a freeze can block the address for a while).
    fn learn_freeze(&mut self, door: &DoorKey, before: postern_net::Spent) -> Result<()> {
        let Some(budget) = self.book.get(door).froze(before) else { return Ok(()) };
        self.book.network_budget(budget);
        let network = self.client.door_budget(NETWORK_BUDGET).ok().flatten();
        if network.is_none_or(|n| budget < n) {
            self.client.set_door_budget(NETWORK_BUDGET, budget)?;
        }
        tracing::info!(
            packets = before.packets,
            budget,
            "a connection froze: rotating connections through this door from now on"
        );
        self.client.set_door_budget(&door.store_name(), budget)?;
        Ok(())
    }

    /// Probes each relay to the home server that worked in this process and is under the
    /// budget relays start with, where nothing froze on this network and no probe of it
    /// lately found anything (see `transport`'s module documentation): one connection of
    /// pings past where a freezing censor cuts. Relays whose connection could not be opened
    /// or broke are probed again only in another process.
    pub(crate) async fn probe_relays(&mut self) -> Result<()> {
        let link = self.client.server().clone();
        self.check_network()?;
        if self.client.door_budget(NETWORK_BUDGET)?.is_some() {
            return Ok(());
        }
        for relay in self.client.relays()? {
            let key = DoorKey::Relay(relay.id);
            let now = std::time::Instant::now();
            let state = self.door(&key)?;
            let ready = state.budget == key.starting_budget()
                && state.standing().worked()
                && !state.failed_lately(now)
                && state.may_open(now);
            let wait = state.freeze_wait(0);
            let probed_lately = self.client.door_probe(&key.store_name())?.is_some_and(|p| {
                unix_now().saturating_sub(p.at) < transport::PROBE_AGAIN.as_secs()
            });
            if !ready
                || probed_lately
                || self.client.door_budget(&key.store_name())?.is_some()
                || !self.probed.insert(key.clone())
            {
                continue;
            }
            self.attempted(&link, &[Some(relay.id)])?;
            match probe_freeze(&Door::Relay(relay.link), &link, wait).await {
                Ok(Probed::Clear(spent)) => {
                    tracing::info!(
                        relay = relay.id,
                        packets = spent.packets,
                        "nothing froze a probe through this relay: no budget for it on this network"
                    );
                    let state = self.book.get(&key);
                    state.budget = None;
                    state.lifted = true;
                    let probe = postern_client::doors::Probe { at: unix_now(), froze: false };
                    self.client.set_door_probe(&key.store_name(), probe)?;
                }
                Ok(Probed::Froze(before)) => {
                    tracing::info!(relay = relay.id, "a probe through this relay froze");
                    self.learn_freeze(&key, before)?;
                    let probe = postern_client::doors::Probe { at: unix_now(), froze: true };
                    self.client.set_door_probe(&key.store_name(), probe)?;
                }
                Err(e) => {
                    tracing::info!(relay = relay.id, error = %e, "no probe through this relay")
                }
            }
        }
        Ok(())
    }

    /// Tries every door to `link` at once (a session and a ping each, up to `wait`) and
    /// reports how each went, with what the engine knows of it.
    pub(crate) async fn probe_doors(
        &mut self,
        link: &ServerLink,
        wait: Duration,
    ) -> Result<Vec<DoorReport>> {
        self.check_network()?;
        let doors = self.doors(link)?;
        let last = self.client.last_door(link)?;
        let tries = doors.iter().map(|(_, door)| async move {
            let started = Instant::now();
            let tried = tokio::time::timeout(wait, async {
                let mut conn = Connection::through(door, link).await?;
                conn.request(Request::Ping, None).await?;
                conn.close().await;
                Ok::<_, NetError>(())
            })
            .await;
            match tried {
                Ok(Ok(())) => Ok(started.elapsed()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(NetError::Timeout),
            }
        });
        let results = futures_util::future::join_all(tries).await;
        let mut reports = Vec::new();
        for ((relay, door), result) in doors.into_iter().zip(results) {
            let key = Self::door_key(link, relay);
            let budget = self.door(&key)?.budget;
            let probe = self.client.door_probe(&key.store_name())?;
            reports.push(DoorReport {
                door,
                relay,
                result,
                budget,
                probe,
                last: last == Some(relay),
            });
        }
        Ok(reports)
    }

    /// Closes every connection: politely, except through a door with a budget, where the
    /// WebSocket's closing handshake would spend packets the budget did not keep for it (a
    /// connection used up to its budget went past the censor's count as it closed).
    pub(crate) async fn close(&mut self) {
        let links: Vec<String> = self.conns.keys().cloned().collect();
        for key in links {
            let budgeted = match ServerLink::parse(&key) {
                Ok(link) => self.current_door(&link).is_ok_and(|(_, state)| state.budget.is_some()),
                Err(_) => false,
            };
            if let Some(conn) = self.conns.remove(&key)
                && !budgeted
            {
                conn.close().await;
            }
        }
    }

    /// Publishes the mailbox and key packages if that has not happened yet; true if now.
    pub(crate) async fn publish(&mut self) -> Result<bool> {
        let Some(publication) = self.client.pending_publication()? else { return Ok(false) };
        self.send_signed(publication.requests, &publication.owner)
            .await
            .context("cannot publish the mailbox")?;
        self.client.mark_published()?;
        Ok(true)
    }

    /// Sends owner-signed requests in order to the home server. Our ids are ours alone, so
    /// a conflict means an earlier attempt got through and counts as done.
    pub(crate) async fn send_signed(
        &mut self,
        requests: Vec<Request>,
        owner: &ed25519_dalek::SigningKey,
    ) -> Result<()> {
        let link = self.client.server().clone();
        for request in requests {
            match self.call(&link, request, Some(owner)).await? {
                Outcome::Done(_) | Outcome::Refused(ErrorCode::Conflict) => {}
                Outcome::Refused(code) => return Err(anyhow!("the server refused: {code}")),
            }
        }
        Ok(())
    }

    /// Claims an invite's key packages.
    pub(crate) async fn claim(
        &mut self,
        link: &ServerLink,
        token: postern_proto::ids::ClaimToken,
    ) -> Result<Vec<Vec<u8>>> {
        match self.call(link, Request::KeyPackageClaim { token }, None).await? {
            Outcome::Done(Response::KeyPackages(packages)) if !packages.is_empty() => Ok(packages),
            Outcome::Done(_) => Err(anyhow!("the server answered the claim with something else")),
            Outcome::Refused(ErrorCode::NotFound) => Err(anyhow!(
                "this invite was already used, has expired or was revoked: ask for a new one"
            )),
            Outcome::Refused(code) => Err(anyhow!("the server refused the invite: {code}")),
        }
    }

    /// A body for an append or drop: inline, or uploaded in chunks first (the upload id is
    /// the idempotency key, so a retry resumes the same upload). Through a door with a budget
    /// a frame stays small ([`SMALL_FRAME`]), so a larger body goes up in small chunks.
    async fn body(&mut self, link: &ServerLink, upload: [u8; 16], bytes: Vec<u8>) -> Result<Body> {
        let chunk_len = if self.budgeted(link).await? { SMALL_FRAME.into() } else { MAX_INLINE };
        if bytes.len() <= chunk_len {
            return Ok(Body::Inline(bytes));
        }
        let total_len = u32::try_from(bytes.len()).context("entry too large")?;
        let upload = UploadId(upload);
        for (i, chunk) in bytes.chunks(chunk_len).enumerate() {
            let offset = u32::try_from(i * chunk_len).context("entry too large")?;
            let request = Request::UploadChunk { upload, total_len, offset, bytes: chunk.to_vec() };
            if let Outcome::Refused(code) = self.call(link, request, None).await? {
                return Err(anyhow!("the server refused an upload: {code}"));
            }
        }
        Ok(Body::Upload(upload))
    }

    /// Proves holding `key` for `log` on this server's connection, once per connection, so
    /// the server takes our appends under it without checking each signature. A refusal
    /// changes nothing: the append is then checked on its own.
    async fn log_auth(
        &mut self,
        link: &ServerLink,
        log: LogId,
        key: &ed25519_dalek::SigningKey,
    ) -> Result<()> {
        let public = public_key(key);
        let proved = (log, public.key_id());
        let server = link.to_link_string();
        if self.conns.contains_key(&server)
            && self.authed.get(&server).is_some_and(|keys| keys.contains(&proved))
        {
            return Ok(());
        }
        if let Outcome::Done(_) =
            self.call(link, Request::LogAuth { log, key: public }, Some(key)).await?
        {
            self.authed.entry(server).or_default().insert(proved);
        }
        Ok(())
    }

    /// Sends one outbox item. `Ok(Some(seq))`/`Ok(None)`: done; an error: try again later.
    async fn send_item(&mut self, item: OutboxItem) -> Result<Result<Option<u64>, ErrorCode>> {
        let link = item.server;
        let (request, signer) = match item.op {
            OutboxOp::LogCreate { log, key } => {
                (Request::LogCreate { log, key: public_key(&key) }, Some(key))
            }
            OutboxOp::Append { log, idem, envelope, key } => {
                // Proving the key saves the server a signature check per append, but costs
                // an exchange per connection: not worth it where connections are short.
                if let Some(key) = key
                    && !self.budgeted(&link).await?
                {
                    self.log_auth(&link, log, &key).await?;
                }
                let body = self.body(&link, idem.0, envelope).await?;
                (Request::LogAppend { log, body }, None)
            }
            OutboxOp::Drop { drop, idem, body } => {
                let body = self.body(&link, idem.0, body).await?;
                (Request::Drop { drop, idem, body }, None)
            }
            OutboxOp::DropCreate { mailbox, drop, owner } => {
                (Request::DropCreate { mailbox, drop }, Some(owner))
            }
            OutboxOp::ClaimTokenCreate { mailbox, token_hash, expires_day, per_day, owner } => (
                Request::ClaimTokenCreate {
                    mailbox,
                    token_hash,
                    policy: ClaimPolicy::Daily(per_day),
                    expires_day,
                },
                Some(owner),
            ),
        };
        let creates = matches!(
            request,
            Request::LogCreate { .. }
                | Request::DropCreate { .. }
                | Request::ClaimTokenCreate { .. }
        );
        Ok(match self.call(&link, request, signer.as_ref()).await? {
            Outcome::Done(Response::Seq(seq)) => Ok(Some(seq)),
            Outcome::Done(_) => Ok(None),
            // Our own fresh ids: taken means an earlier attempt created it.
            Outcome::Refused(ErrorCode::Conflict) if creates => Ok(None),
            // Worth retrying later: the item stays.
            Outcome::Refused(
                code @ (ErrorCode::RateLimited
                | ErrorCode::ServerFull
                | ErrorCode::QuotaExceeded
                | ErrorCode::Internal),
            ) => return Err(anyhow!("the server asks to retry later: {code}")),
            Outcome::Refused(code) => Err(code),
        })
    }

    /// Sends the outbox, oldest first, until it is empty, and resolves our acknowledged
    /// commits by reading their logs up to them (which may queue more: Welcomes, the
    /// messages that waited). Stops at the first item the network could not carry (it stays
    /// queued); items the server refuses for good are dropped and reported.
    pub(crate) async fn flush(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        // Items refused for good, and items for a server no door reaches: the rest go on.
        let mut skip = Vec::new();
        let mut down = HashSet::new();
        let mut unreachable = None;
        for _ in 0..MAX_FLUSH_ROUNDS {
            while let Some(item) = self.client.next_outbox(&skip)? {
                let id = item.id;
                let server = item.server.clone();
                if down.contains(&server.to_link_string()) {
                    skip.push(id);
                    continue;
                }
                postern_client::pause_point("before-send");
                match self.send_item(item).await {
                    Ok(Ok(seq)) => {
                        postern_client::pause_point("after-ack");
                        self.client.outbox_done(id, seq)?;
                    }
                    Ok(Err(code)) => {
                        tracing::warn!(%code, "the server refused a queued request");
                        skip.push(id);
                        events.extend(self.client.outbox_failed(id)?);
                    }
                    // Its chats moved to another server: their items go there now.
                    Err(e) if e.is::<Unreachable>() && self.fail_over(&server).await? => {}
                    Err(e) if e.is::<Unreachable>() => {
                        down.insert(server.to_link_string());
                        skip.push(id);
                        unreachable.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(e) = unreachable {
                self.unshown.extend(events);
                return Err(e);
            }
            let unresolved = self.client.unresolved()?;
            if unresolved.is_empty() {
                return Ok(events);
            }
            for chat in unresolved {
                events.extend(self.read_log(&chat).await?);
            }
        }
        Err(anyhow!("a commit of ours is still unresolved after reading its log"))
    }

    /// The rest of a partly delivered item.
    async fn complete(
        &mut self,
        link: &ServerLink,
        mut item: Item,
        part: impl Fn(u64, u32) -> Request,
        owner: Option<&ed25519_dalek::SigningKey>,
    ) -> Result<Option<Item>> {
        while item.bytes.len() < item.total_len as usize {
            let offset = u32::try_from(item.bytes.len()).context("item too large")?;
            match self.call(link, part(item.seq, offset), owner).await? {
                Outcome::Done(Response::Part(bytes)) if !bytes.is_empty() => {
                    item.bytes.extend_from_slice(&bytes);
                }
                // Expired meanwhile, or a server that will not finish it: skip the item.
                _ => return Ok(None),
            }
        }
        Ok(Some(item))
    }

    /// Reads new mailbox items and applies them: on the home server, and now and then where
    /// the mailbox was before it moved.
    pub(crate) async fn fetch_mailbox(&mut self) -> Result<Vec<Event>> {
        let home = self.fetch_home_mailbox().await;
        let former = self.fetch_former_homes().await?;
        match home {
            Ok(mut events) => {
                events.extend(former);
                Ok(events)
            }
            Err(e) => {
                self.unshown.extend(former);
                Err(e)
            }
        }
    }

    /// Reads the mailbox where it was before it moved (at most every
    /// `POSTERN_SUCCESSOR_CHECK`): drops made with an old card or invite link arrive while
    /// that server answers. One that no longer keeps it is forgotten; one out of reach is
    /// only skipped.
    async fn fetch_former_homes(&mut self) -> Result<Vec<Event>> {
        let keys = self.client.mailbox()?;
        let mailbox = keys.mailbox;
        let mut events = Vec::new();
        for (link, mut after) in self.client.former_homes_due(unix_now(), self.successor_check)? {
            'reading: loop {
                let request =
                    Request::MailboxFetch { mailbox, after, max_items: READ_BATCH, max_bytes: ANY };
                let read = match self.call(&link, request, Some(&keys.owner)).await {
                    Ok(Outcome::Done(Response::Items { items, more })) => Ok((items, more)),
                    Ok(Outcome::Refused(ErrorCode::NotFound)) => {
                        self.client.forget_former_home(&link)?;
                        break;
                    }
                    Ok(other) => Err(unexpected(other)),
                    Err(e) => Err(e),
                };
                let (items, more) = match read {
                    Ok(read) => read,
                    Err(e) => {
                        tracing::info!(error = %e, "cannot read the former mailbox");
                        break;
                    }
                };
                for item in items {
                    let seq = item.seq;
                    match self.apply_drop(&link, true, &keys, item).await {
                        Ok(more) => events.extend(more),
                        Err(e) => {
                            tracing::info!(error = %e, "cannot read the former mailbox");
                            break 'reading;
                        }
                    }
                    after = seq;
                }
                if !more {
                    break;
                }
            }
        }
        Ok(events)
    }

    /// Reads the rest of a mailbox item from `link` (our home, or a `former` one) and
    /// applies it.
    async fn apply_drop(
        &mut self,
        link: &ServerLink,
        former: bool,
        keys: &postern_client::MailboxKeys,
        item: Item,
    ) -> Result<Vec<Event>> {
        let (mailbox, seq) = (keys.mailbox, item.seq);
        let part = |seq, offset| Request::MailboxReadPart { mailbox, seq, offset, max_bytes: ANY };
        let item = self.complete(link, item, part, Some(&keys.owner)).await?;
        let bytes = item.map(|i| i.bytes).unwrap_or_default();
        Ok(if former {
            self.client.receive_former_drop(link, seq, &bytes)?
        } else {
            self.client.receive_drop(seq, &bytes)?
        })
    }

    /// Reads the mailbox on the home server, which moves once out of reach for the
    /// failover time.
    async fn fetch_home_mailbox(&mut self) -> Result<Vec<Event>> {
        let keys = self.client.mailbox()?;
        let link = self.client.server().clone();
        let mut events = Vec::new();
        loop {
            let after = self.client.mailbox_cursor()?;
            let request = Request::MailboxFetch {
                mailbox: keys.mailbox,
                after,
                max_items: READ_BATCH,
                max_bytes: ANY,
            };
            let outcome = match self.call(&link, request, Some(&keys.owner)).await {
                Ok(outcome) => outcome,
                // The mailbox moved (published on the next server): read there next time.
                Err(e) if e.is::<Unreachable>() && self.fail_over(&link).await? => {
                    return Ok(events);
                }
                Err(e) => return Err(e),
            };
            let (items, more) = match outcome {
                Outcome::Done(Response::Items { items, more }) => (items, more),
                // Not published yet, or expired while we were away: publish it (again).
                Outcome::Refused(ErrorCode::NotFound) => {
                    self.client.mailbox_lost()?;
                    self.publish().await?;
                    return Ok(events);
                }
                other => return Err(unexpected(other)),
            };
            for item in items {
                events.extend(self.apply_drop(&link, false, &keys, item).await?);
            }
            if !more {
                return Ok(events);
            }
        }
    }

    /// Applies log entries in order.
    pub(crate) async fn apply_entries(
        &mut self,
        link: &ServerLink,
        log: LogId,
        items: Vec<Item>,
    ) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        for item in items {
            let seq = item.seq;
            let part = |seq, offset| Request::LogReadPart { log, seq, offset, max_bytes: ANY };
            let item = self.complete(link, item, part, None).await?;
            let bytes = item.map(|i| i.bytes).unwrap_or_default();
            events.extend(self.client.receive_entry(&log, seq, &bytes)?);
        }
        Ok(events)
    }

    /// Reads one chat's new entries.
    async fn read_log(&mut self, chat: &postern_client::LogCursor) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let mut after = chat.cursor;
        loop {
            let request =
                Request::LogRead { log: chat.log, after, max_items: READ_BATCH, max_bytes: ANY };
            let (items, more) = match self.call(&chat.server, request, None).await? {
                Outcome::Done(Response::Items { items, more }) => (items, more),
                Outcome::Refused(ErrorCode::NotFound) if chat.cursor > 0 => {
                    // Read before and now gone: it expired while we were away.
                    events.extend(self.client.log_gone(&chat.chat)?);
                    return Ok(events);
                }
                Outcome::Refused(code) => {
                    // A rotated log no member has created yet: read again next time.
                    tracing::debug!(chat = %chat.chat, %code, "cannot read a chat's log");
                    return Ok(events);
                }
                other => return Err(unexpected(other)),
            };
            after = items.last().map_or(after, |i| i.seq);
            events.extend(self.apply_entries(&chat.server, chat.log, items).await?);
            if !more {
                self.caught_up(chat.log);
                return Ok(events);
            }
        }
    }

    /// Reads every active chat's new entries (again for a chat whose log rotated while it
    /// was read).
    pub(crate) async fn pull_logs(&mut self) -> Result<Vec<Event>> {
        self.pull(None).await
    }

    /// Reads one chat's new entries, following it to a new log if it rotates meanwhile.
    pub(crate) async fn pull_chat(&mut self, chat: &str) -> Result<Vec<Event>> {
        self.pull(Some(chat)).await
    }

    async fn pull(&mut self, only: Option<&str>) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let mut done = HashSet::new();
        let mut down = HashSet::new();
        let mut unreachable = None;
        for _ in 0..MAX_FLUSH_ROUNDS {
            let pending: Vec<_> = self
                .client
                .logs()?
                .into_iter()
                .filter(|c| !done.contains(&c.log) && only.is_none_or(|id| id == c.chat))
                .collect();
            if pending.is_empty() {
                break;
            }
            for chat in pending {
                done.insert(chat.log);
                if down.contains(&chat.server.to_link_string()) {
                    continue;
                }
                match self.read_log(&chat).await {
                    Ok(more) => events.extend(more),
                    // Moved to another server: read there in the next round.
                    Err(e) if e.is::<Unreachable>() && self.fail_over(&chat.server).await? => {}
                    Err(e) if e.is::<Unreachable>() => {
                        down.insert(chat.server.to_link_string());
                        unreachable.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        match unreachable {
            Some(e) => {
                self.unshown.extend(events);
                Err(e)
            }
            None => Ok(events),
        }
    }

    /// Every door to `link` failed. Once that has lasted the failover time, the chats on it
    /// move to the next server on their lists that a door reaches now (none moves while
    /// nothing is reachable: the network is down, not the server), and so does the mailbox
    /// if `link` is the home server (its events wait in `unshown`). Returns whether
    /// anything moved.
    async fn fail_over(&mut self, link: &ServerLink) -> Result<bool> {
        let now = unix_now();
        let since = self.client.out_of_reach(link, now)?;
        if Duration::from_secs(now.saturating_sub(since)) < self.failover_after {
            return Ok(false);
        }
        let mut moved_home = false;
        if link == self.client.server() {
            let events = self.move_home(link, since).await?;
            moved_home = !events.is_empty();
            self.unshown.extend(events);
        }
        Ok(self.move_chats(link, since).await? || moved_home)
    }

    /// The chats on `link`, out of reach since `since`, move to the next server on their
    /// lists that a door reaches now. Returns whether any did.
    async fn move_chats(&mut self, link: &ServerLink, since: u64) -> Result<bool> {
        let now = unix_now();
        for next in self.client.successors_of(link)? {
            if let Err(e) = self.conn(&next).await {
                tracing::info!(error = %e, "cannot move chats there either");
                continue;
            }
            let moved = self.client.fail_over(link, &next)?;
            if !moved.is_empty() {
                tracing::info!(
                    chats = moved.len(),
                    out_of_reach_secs = now.saturating_sub(since),
                    "moved chats to the next server on their lists"
                );
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The home server, out of reach since `since`: the mailbox moves to the first server
    /// of our list (`servers add`) a door reaches now, and is published there before the
    /// cards naming it go out. Returns what happened.
    async fn move_home(&mut self, home: &ServerLink, since: u64) -> Result<Vec<Event>> {
        let now = unix_now();
        for next in self.client.fallbacks()? {
            let next = ServerLink::parse(&next)?;
            if next == *home {
                continue;
            }
            if let Err(e) = self.conn(&next).await {
                tracing::info!(error = %e, "cannot move the mailbox there either");
                continue;
            }
            let events = self.client.move_home(&next)?;
            tracing::info!(
                out_of_reach_secs = now.saturating_sub(since),
                "moved the mailbox to the next server on our list"
            );
            if let Err(e) = self.publish().await {
                // The addresses the cards name wait in the outbox until the mailbox is
                // published, which the next round tries again first.
                self.unshown.extend(events);
                return Err(e);
            }
            return Ok(events);
        }
        Ok(vec![])
    }

    /// Looks (at most every `POSTERN_SUCCESSOR_CHECK`) for chats another member moved to
    /// their next server: the log a move in our epoch makes there has entries. Follows them;
    /// reading the logs afterwards reads them there. A move from an epoch before ours cannot
    /// be followed: the chat is marked as forked and we ask to be re-added there.
    pub(crate) async fn follow_moves(&mut self) -> Result<Vec<Event>> {
        let now = unix_now();
        let last = self.client.last_successor_check()?;
        if last.is_some_and(|at| Duration::from_secs(now.saturating_sub(at)) < self.successor_check)
        {
            return Ok(vec![]);
        }
        let successors = self.client.successors()?;
        let mut events = Vec::new();
        let mut moved = HashSet::new();
        for s in &successors {
            if moved.contains(&s.chat) {
                continue;
            }
            let request =
                Request::LogRead { log: s.log, after: 0, max_items: 1, max_bytes: TINY_FRAME };
            match self.call(&s.server, request, None).await {
                Ok(Outcome::Done(Response::Items { items, .. })) if !items.is_empty() => {
                    moved.insert(s.chat.clone());
                    if s.current {
                        tracing::info!("a chat moved to the next server on its list: following it");
                        self.client.follow(&s.chat)?;
                    } else {
                        tracing::warn!(
                            "a chat moved to the next server from an epoch before ours: \
                             it cannot be followed; asking to be added back there"
                        );
                        events.extend(self.client.moved_without_us(&s.chat, s.epoch)?);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cannot look for moved chats"),
            }
        }
        if !successors.is_empty() {
            self.client.successors_checked(now)?;
        }
        Ok(events)
    }

    /// Everything: publish, send the outbox, read the mailbox and the logs, and send what
    /// that queued (a released Welcome, a rotated log's creation, a contact card).
    /// A home server out of reach stops neither the chats on other servers nor a move
    /// (the first error is returned at the end, what arrived meanwhile kept for `read`).
    pub(crate) async fn sync(&mut self) -> Result<Vec<Event>> {
        self.round(true).await
    }

    /// What `listen` does between pushes: publish, send the outbox, read the mailbox (it has
    /// no push), look for moved chats, send what that queued. Logs come by subscription.
    pub(crate) async fn poll(&mut self) -> Result<Vec<Event>> {
        self.round(false).await
    }

    async fn round(&mut self, logs: bool) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let mut first = None;
        let mut keep = |result: Result<Vec<Event>>, events: &mut Vec<Event>| match result {
            Ok(more) => events.extend(more),
            Err(e) => {
                first.get_or_insert(e);
            }
        };
        keep(self.publish().await.map(|_| vec![]), &mut events);
        keep(self.flush().await, &mut events);
        keep(self.fetch_mailbox().await, &mut events);
        keep(self.follow_moves().await, &mut events);
        if logs {
            keep(self.pull_logs().await, &mut events);
        }
        self.client.keep_alive()?;
        events.extend(self.client.ask_again(self.rejoin_retry.as_secs())?);
        keep(self.flush().await, &mut events);
        // What a step left unshown (a move of the mailbox) is shown now.
        events.append(&mut self.unshown);
        match first {
            Some(e) => {
                self.unshown.extend(events);
                Err(e)
            }
            None => Ok(events),
        }
    }

    /// Subscribes to each active chat's log not yet subscribed on its server's current
    /// connection, from its cursor (after a sync, so pushes carry only what is new).
    /// A server out of reach is tried once, and stops only its own chats; once it has been
    /// out of reach for the failover time, its chats move and are subscribed where they went.
    pub(crate) async fn subscribe_new(&mut self) -> Result<()> {
        let mut down = HashSet::new();
        let mut first = None;
        // A second round subscribes the chats that moved in the first.
        for _ in 0..2 {
            let mut moved = false;
            for chat in self.client.logs()? {
                let key = chat.server.to_link_string();
                if down.contains(&key)
                    || (self.conns.contains_key(&key)
                        && self.subscribed.get(&key).is_some_and(|s| s.contains(&chat.log)))
                {
                    continue;
                }
                match self.subscribe(&chat).await {
                    Ok(()) => {}
                    Err(e) if e.is::<Unreachable>() && self.fail_over(&chat.server).await? => {
                        moved = true;
                    }
                    Err(e) => {
                        down.insert(key);
                        first.get_or_insert(e);
                    }
                }
            }
            if !moved {
                break;
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Subscribes to one chat's log on its server's connection (opened if none is).
    async fn subscribe(&mut self, chat: &postern_client::LogCursor) -> Result<()> {
        // Under a budget the backlog is read first, in reads sized to each connection,
        // rather than pushed at once past the budget; a log read to its end moments ago has
        // next to none.
        let mut after = chat.cursor;
        let fresh = self.caught_up.get(&chat.log).is_some_and(|at| at.elapsed() < FRESH);
        if !fresh && self.budgeted(&chat.server).await? {
            let events = self.read_log(chat).await?;
            self.unshown.extend(events);
            let now = self.client.logs()?.into_iter().find(|c| c.log == chat.log);
            after = now.map_or(after, |c| c.cursor);
        }
        let request = Request::Subscribe { log: chat.log, after, max_bytes: ANY };
        match self.call(&chat.server, request, None).await? {
            Outcome::Refused(code) => {
                tracing::warn!(chat = %chat.chat, %code, "cannot subscribe to a chat's log");
            }
            Outcome::Done(_) => {
                let key = chat.server.to_link_string();
                self.subscribed.entry(key).or_default().insert(chat.log);
            }
        }
        Ok(())
    }

    /// The next push from any open connection; `None` after `wait` with nothing, or when a
    /// connection broke (it is dropped; the caller syncs again).
    pub(crate) async fn next_push(&mut self, wait: Duration) -> Option<(ServerLink, Push)> {
        if self.conns.is_empty() {
            tokio::time::sleep(wait).await;
            return None;
        }
        let waits = self
            .conns
            .iter_mut()
            .map(|(key, conn)| Box::pin(async move { (key.clone(), conn.next_push(wait).await) }));
        let ((key, result), _, _) = futures_util::future::select_all(waits).await;
        match result {
            Ok(push) => {
                let link = ServerLink::parse(&key).ok()?;
                // Pushes spend a budget too: a connection without room for one more is let
                // go before the censor freezes it (the caller subscribes again on a fresh
                // one, from where the pushes stopped).
                let spent = self.conns.get(&key).map(Connection::spent).unwrap_or_default();
                if let Ok((_, state)) = self.current_door(&link)
                    && state.over_budget(spent, 256, 1_024)
                {
                    tracing::debug!(
                        packets = spent.packets,
                        "pushes spent the connection: replacing it"
                    );
                    self.conns.remove(&key);
                }
                Some((link, push))
            }
            Err(NetError::Timeout) => None,
            Err(e) => {
                tracing::warn!(error = %e, "lost a server connection");
                self.conns.remove(&key);
                None
            }
        }
    }

    /// Applies a push.
    pub(crate) async fn handle_push(
        &mut self,
        link: &ServerLink,
        push: Push,
    ) -> Result<Vec<Event>> {
        match push {
            Push::Items { log, items } => {
                // Pushes continue from the cursor; if one does not, read the log instead, so
                // only the log itself can show a gap.
                let chat = self.client.logs()?.into_iter().find(|c| c.log == log);
                match (chat, items.first()) {
                    (Some(chat), Some(first)) if first.seq > chat.cursor + 1 => {
                        self.pull_chat(&chat.chat).await
                    }
                    _ => {
                        self.caught_up(log);
                        self.apply_entries(link, log, items).await
                    }
                }
            }
            Push::SubscriptionLost { log } => {
                // Too slow for the push stream: read what was missed, then subscribe again.
                let events = self.pull_logs().await?;
                if let Some(chat) = self.client.logs()?.into_iter().find(|c| c.log == log) {
                    let request = Request::Subscribe { log, after: chat.cursor, max_bytes: ANY };
                    self.call(&chat.server, request, None).await?;
                }
                Ok(events)
            }
            _ => Ok(vec![]),
        }
    }

    /// The log was just read to its end.
    pub(crate) fn caught_up(&mut self, log: LogId) {
        self.caught_up.insert(log, Instant::now());
    }

    /// Keeps idle connections open (the server closes silent ones after five minutes).
    pub(crate) async fn ping(&mut self) -> Result<()> {
        let links: Vec<String> = self.conns.keys().cloned().collect();
        for key in links {
            let link = ServerLink::parse(&key)?;
            self.call(&link, Request::Ping, None).await?;
        }
        Ok(())
    }
}

/// What a probe for a freeze found.
enum Probed {
    /// Every ping was answered, up to what the connection had spent then.
    Clear(postern_net::Spent),
    /// A ping sent when the connection had spent this went unanswered.
    Froze(postern_net::Spent),
}

/// One connection through `door` to `link`, with pings one after another until it is past
/// [`transport::PROBE_PACKETS`] packets and [`transport::PROBE_BYTES_IN`] received, each
/// given `wait` to be answered. A connection that cannot be opened, breaks, or stays below
/// the marks after [`transport::PROBE_PINGS`] pings is no finding.
async fn probe_freeze(door: &Door, link: &ServerLink, wait: Duration) -> Result<Probed, NetError> {
    let mut conn = Connection::through(door, link).await?;
    for _ in 0..transport::PROBE_PINGS {
        let spent = conn.spent();
        let received = conn.wire_bytes().map_or(spent.bytes_in, |(_, received)| received);
        if spent.packets >= transport::PROBE_PACKETS && received >= transport::PROBE_BYTES_IN {
            conn.close().await;
            return Ok(Probed::Clear(spent));
        }
        match tokio::time::timeout(wait, conn.request(Request::Ping, None)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(Probed::Froze(spent)),
        }
    }
    Err(NetError::Timeout)
}

/// The most an answer to `request` is expected to take on the wire: a read, the bucket its
/// `max_bytes` fills; a claim of key packages 4 KiB; everything else a small one.
fn answer_room(request: &Request) -> usize {
    let window = answer_window(&mut request.clone()).copied();
    match window {
        Some(window) if window <= TINY_FRAME => 1_024,
        Some(window) if window <= SMALL_FRAME => 4_096,
        Some(_) => postern_proto::limits::MAX_FRAME,
        None if matches!(request, Request::KeyPackageClaim { .. }) => 4_096,
        None => 256,
    }
}

/// `request` with its answer (or pushes) limited to `window` entry bytes.
fn small_answers(mut request: Request, window: u16) -> Request {
    if let Some(max_bytes) = answer_window(&mut request) {
        *max_bytes = (*max_bytes).min(window);
    }
    request
}

/// The `max_bytes` of a request whose answer (or pushes) carry entries.
fn answer_window(request: &mut Request) -> Option<&mut u16> {
    match request {
        Request::LogRead { max_bytes, .. }
        | Request::LogReadPart { max_bytes, .. }
        | Request::MailboxFetch { max_bytes, .. }
        | Request::MailboxReadPart { max_bytes, .. }
        | Request::Subscribe { max_bytes, .. } => Some(max_bytes),
        _ => None,
    }
}

/// Under a budget: `request` with answers as large as the connection, having spent `spent`,
/// has room for ([`SMALL_FRAME`], else [`TINY_FRAME`]; a subscription's pushes always
/// [`TINY_FRAME`]); `None` when even that does not fit and the connection is to be replaced.
fn fit(state: &DoorState, spent: postern_net::Spent, request: &Request) -> Option<Request> {
    let len = wire_len(request);
    // Pushes come unasked, several at a time: each is kept to one segment.
    let windows: &[u16] = match request {
        Request::Subscribe { .. } => &[TINY_FRAME],
        _ => &[SMALL_FRAME, TINY_FRAME],
    };
    windows
        .iter()
        .copied()
        .map(|window| small_answers(request.clone(), window))
        .find(|sized| !state.over_budget(spent, len, answer_room(sized)))
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The bytes a request takes on the wire, about: its padded frame (with a signature), sealed.
fn wire_len(request: &Request) -> usize {
    let frame = postern_proto::frame::ClientFrame {
        request_id: 0,
        request: request.clone(),
        signature: None,
    };
    let len = frame.encode().len() + 64 + 4;
    postern_proto::limits::BUCKETS.iter().copied().find(|b| *b >= len).unwrap_or(len) + 16
}

fn unexpected(outcome: Outcome) -> anyhow::Error {
    match outcome {
        Outcome::Refused(code) => anyhow!("the server refused: {code}"),
        Outcome::Done(_) => anyhow!("the server answered with something unexpected"),
    }
}

#[cfg(test)]
mod tests {
    use postern_proto::frame::{ClientFrame, ServerFrame};
    use postern_proto::ids::IdemKey;
    use postern_proto::pad::pad;

    use super::*;

    const SMALL: usize = SMALL_FRAME as usize;

    fn padded_request(request: Request) -> usize {
        let frame = ClientFrame { request_id: u32::MAX, request, signature: None };
        pad(&frame.encode()).unwrap().len()
    }

    #[test]
    fn requests_through_a_budget_fill_at_most_the_4_kib_bucket() {
        let log = LogId([1; 32]);
        let append = Request::LogAppend { log, body: Body::Inline(vec![7; SMALL]) };
        assert_eq!(padded_request(append.clone()), 4_096);
        assert_eq!(wire_len(&append), 4_096 + 16);
        let chunk = Request::UploadChunk {
            upload: UploadId([2; 16]),
            total_len: u32::MAX,
            offset: u32::MAX,
            bytes: vec![7; SMALL],
        };
        assert_eq!(padded_request(chunk), 4_096);
        let drop = Request::Drop {
            drop: postern_proto::ids::DropId([3; 32]),
            idem: IdemKey([4; 16]),
            body: Body::Inline(vec![7; SMALL]),
        };
        assert_eq!(padded_request(drop), 4_096);
    }

    #[test]
    fn answers_and_pushes_asked_small_fill_at_most_their_bucket() {
        // What the server may put in an answer asked for a window of bytes: items whose
        // bytes and per-item overhead add up to it, one large or many small.
        let item = |len: usize| Item { seq: u64::MAX, total_len: u32::MAX, bytes: vec![7; len] };
        let overhead = postern_store::ITEM_OVERHEAD;
        for (window, bucket) in [(SMALL_FRAME, 4_096), (TINY_FRAME, 1_024)] {
            let bytes = usize::from(window);
            let one = vec![item(bytes - overhead)];
            let many: Vec<Item> = (0..bytes / (overhead + 1)).map(|_| item(1)).collect();
            for items in [one, many] {
                let answer = ServerFrame::Response {
                    request_id: u32::MAX,
                    result: Ok(Response::Items { items: items.clone(), more: true }),
                };
                assert!(pad(&answer.encode()).unwrap().len() <= bucket);
                let push = ServerFrame::Push(Push::Items { log: LogId([1; 32]), items });
                assert!(pad(&push.encode()).unwrap().len() <= bucket);
            }
            let part = ServerFrame::Response {
                request_id: u32::MAX,
                result: Ok(Response::Part(vec![7; bytes])),
            };
            assert_eq!(pad(&part.encode()).unwrap().len(), bucket);
            let read =
                Request::LogRead { log: LogId([1; 32]), after: 0, max_items: 64, max_bytes: ANY };
            assert_eq!(answer_room(&small_answers(read, window)), bucket);
        }
    }

    #[test]
    fn a_read_is_fitted_to_what_the_connection_has_left() {
        let mut state = DoorState::default();
        state.budget = Some(22);
        let read =
            Request::LogRead { log: LogId([1; 32]), after: 0, max_items: 64, max_bytes: ANY };
        let window = |spent| fit(&state, spent, &read).map(|mut r| *answer_window(&mut r).unwrap());
        let mut spent = postern_net::Spent::new();
        let mut seen = vec![];
        while let Some(w) = window(spent) {
            seen.push(w);
            spent = spent.after(256);
        }
        assert_eq!(seen.first(), Some(&SMALL_FRAME), "a fresh connection has room for 4 KiB");
        assert_eq!(seen.last(), Some(&TINY_FRAME), "then only for 1 KiB, then none: {seen:?}");
        assert!(fit(&state, spent, &Request::Ping).is_none(), "a ping takes a segment too");
    }

    #[test]
    fn small_answers_lowers_every_read_and_leaves_the_rest() {
        let log = LogId([1; 32]);
        let read = Request::LogRead { log, after: 3, max_items: 64, max_bytes: ANY };
        assert_eq!(
            small_answers(read, SMALL_FRAME),
            Request::LogRead { log, after: 3, max_items: 64, max_bytes: SMALL_FRAME }
        );
        let smaller = Request::LogReadPart { log, seq: 1, offset: 2, max_bytes: 300 };
        assert_eq!(small_answers(smaller.clone(), SMALL_FRAME), smaller);
        let subscribe = Request::Subscribe { log, after: 0, max_bytes: ANY };
        assert_eq!(
            small_answers(subscribe, SMALL_FRAME),
            Request::Subscribe { log, after: 0, max_bytes: SMALL_FRAME }
        );
        assert_eq!(small_answers(Request::Ping, TINY_FRAME), Request::Ping);
    }
}
