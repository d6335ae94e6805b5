//! `throughput` and `fanout`: logs with one sender and subscribed receivers.
//!
//! A message is a `--plaintext`-byte text as the envelope it becomes: 200 bytes of text
//! make a 346-byte MLS message, sealed with a 12-byte nonce and a 16-byte tag into 374
//! bytes of envelope ciphertext, signed by the epoch's append key (the frame then pads to
//! the 1,024-byte bucket). Envelopes are made and signed before the clock starts; each
//! one's idempotency key carries its index, so receivers find its send time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use ed25519_dalek::SigningKey;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use postern_net::{Connection, NetError};
use postern_proto::envelope::Envelope;
use postern_proto::frame::{Body, Push, Request, Response, ServerFrame};
use postern_proto::ids::{IdemKey, LogId};
use tokio::sync::mpsc;

use crate::server::{ProcStats, Target};
use crate::{Measured, random, round};

/// What MLS adds to a text (a 200-byte text is a 346-byte MLS message).
const MLS_OVERHEAD: usize = 146;
/// The envelope's nonce and tag around the MLS message.
const ENVELOPE_AEAD: usize = 12 + 16;
/// Connections opened at once while setting up.
const SETUP_CONCURRENCY: usize = 64;
/// A receiver that sees nothing for this long stops and reports what is missing.
const RECEIVE_IDLE: Duration = Duration::from_secs(10);
/// Largest latency the histograms hold, µs.
const MAX_LATENCY_US: u64 = 120_000_000;

/// `throughput`.
#[derive(Args, Debug)]
pub(crate) struct ThroughputArgs {
    /// Conversation logs, each a pair of people: one sends, one receives.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    #[command(flatten)]
    load: LoadArgs,
}

/// `fanout`.
#[derive(Args, Debug)]
pub(crate) struct FanoutArgs {
    /// Members of each group: one sends, the others receive.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Groups.
    #[arg(long, default_value_t = 1)]
    groups: usize,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// Messages each sender sends.
    #[arg(long, default_value_t = 1_000)]
    messages: usize,
    /// Offered load in messages a second over all senders; without it, each sender sends
    /// as fast as the server acknowledges, with `--window` appends in flight.
    #[arg(long)]
    rate: Option<u64>,
    /// Appends in flight per sender when sending as fast as acknowledged.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 200)]
    plaintext: usize,
    /// Leave out `log_auth`, so the server checks every envelope's signature.
    #[arg(long)]
    no_log_auth: bool,
}

pub(crate) async fn throughput(target: &Target, args: ThroughputArgs) -> Result<Measured> {
    run(target, args.pairs, 1, args.load).await
}

pub(crate) async fn fanout(target: &Target, args: FanoutArgs) -> Result<Measured> {
    if args.members < 2 {
        bail!("a group needs at least 2 members");
    }
    run(target, args.groups, args.members - 1, args.load).await
}

/// One log: its id, append key, envelopes, and when each was sent (ns since the run's
/// epoch, plus one; 0 = not yet).
struct LogPlan {
    log: LogId,
    key: SigningKey,
    sent_at: Vec<AtomicU64>,
}

fn envelopes(plan: &LogPlan, count: usize, ciphertext_len: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            // Ordered within the log, as the client's keys are (`IdemKey::ordered`: its clock
            // first). Signed before the clock starts, so the position stands for the time.
            let mut idem = [0u8; 16];
            idem[..8].copy_from_slice(&(i as u64).to_be_bytes());
            idem[8..].copy_from_slice(&random::<8>());
            let ciphertext: Vec<u8> = (0..ciphertext_len).map(|_| rand::random()).collect();
            Envelope::seal(&plan.log, &plan.key, IdemKey(idem), None, ciphertext).encode()
        })
        .collect()
}

/// What one receiver saw.
struct Received {
    latency: Histogram<u64>,
    unique: usize,
    duplicates: usize,
    last: Option<Instant>,
    lost_subscriptions: usize,
}

/// What one sender saw.
#[derive(Default)]
struct Sent {
    acknowledged: usize,
    refused: usize,
}

async fn run(target: &Target, logs: usize, receivers: usize, load: LoadArgs) -> Result<Measured> {
    let LoadArgs { messages, rate, window, plaintext, no_log_auth } = load;
    if logs == 0 || messages == 0 || window == 0 {
        bail!("nothing to send");
    }
    if rate == Some(0) {
        bail!("--rate must be positive");
    }
    let ciphertext_len = plaintext + MLS_OVERHEAD + ENVELOPE_AEAD;
    let setup_started = Instant::now();
    let plans: Vec<Arc<LogPlan>> = (0..logs)
        .map(|_| {
            Arc::new(LogPlan {
                log: LogId(random()),
                key: SigningKey::from_bytes(&random()),
                sent_at: (0..messages).map(|_| AtomicU64::new(0)).collect(),
            })
        })
        .collect();
    // Sign every envelope before the clock starts, on every core.
    let mut prepared = Vec::new();
    for plan in &plans {
        let plan = plan.clone();
        prepared
            .push(tokio::task::spawn_blocking(move || envelopes(&plan, messages, ciphertext_len)));
    }
    let mut all_envelopes = Vec::new();
    for p in prepared {
        all_envelopes.push(p.await?);
    }
    // Connections: senders create their logs, receivers subscribe.
    let senders = open_all(target, logs).await?;
    let mut senders_ready = Vec::new();
    for (mut conn, plan) in senders.into_iter().zip(&plans) {
        let public = postern_proto::ids::public_key(&plan.key);
        match conn.request(Request::LogCreate { log: plan.log, key: public }, Some(&plan.key)).await
        {
            Ok(Response::Ok) => {}
            other => bail!("log_create: {other:?}"),
        }
        if !no_log_auth {
            match conn
                .request(Request::LogAuth { log: plan.log, key: public }, Some(&plan.key))
                .await
            {
                Ok(Response::Ok) => {}
                other => bail!("log_auth: {other:?}"),
            }
        }
        senders_ready.push(conn);
    }
    let mut receiver_conns = open_all(target, logs * receivers).await?;
    for (i, conn) in receiver_conns.iter_mut().enumerate() {
        let log = plans[i / receivers].log;
        conn.request(Request::Subscribe { log, after: 0, max_bytes: u16::MAX }, None)
            .await
            .with_context(|| format!("subscribe {i}"))?;
    }
    let setup_secs = setup_started.elapsed().as_secs_f64();

    // The clock starts.
    let epoch = Instant::now();
    let server_before = target.stats()?;
    let own_before = ProcStats::own()?;
    let mut receiving = Vec::new();
    for (i, conn) in receiver_conns.into_iter().enumerate() {
        let plan = plans[i / receivers].clone();
        receiving.push(tokio::spawn(receive(conn, plan, messages, epoch)));
    }
    let (pacer, mut paced) = match rate {
        Some(rate) => {
            let (txs, rxs): (Vec<_>, Vec<_>) = (0..logs).map(|_| mpsc::unbounded_channel()).unzip();
            let pacer = std::thread::spawn(move || pace(txs, messages, rate, epoch));
            (Some(pacer), rxs.into_iter().map(Some).collect())
        }
        None => (None, (0..logs).map(|_| None).collect::<Vec<_>>()),
    };
    let mut sending = Vec::new();
    for (i, (conn, envelopes)) in senders_ready.into_iter().zip(all_envelopes).enumerate() {
        let plan = plans[i].clone();
        sending.push(match paced.get_mut(i).and_then(Option::take) {
            Some(schedule) => tokio::spawn(send_paced(conn, plan, envelopes, schedule)),
            None => tokio::spawn(send_closed(conn, plan, envelopes, window, epoch)),
        });
    }
    let mut sent = Sent::default();
    for s in sending {
        let s = s.await??;
        sent.acknowledged += s.acknowledged;
        sent.refused += s.refused;
    }
    let pacer_lag_us = match pacer {
        Some(p) => p.join().map_err(|_| anyhow!("the pacer failed"))?,
        None => 0,
    };
    let mut latency = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    let (mut unique, mut duplicates, mut lost, mut last) = (0, 0, 0, epoch);
    for r in receiving {
        let r = r.await??;
        latency.add(&r.latency)?;
        unique += r.unique;
        duplicates += r.duplicates;
        lost += r.lost_subscriptions;
        last = last.max(r.last.unwrap_or(epoch));
    }
    let server_after = target.stats()?;
    let own_after = ProcStats::own()?;

    let expected = logs * receivers * messages;
    let elapsed = last.duration_since(epoch).as_secs_f64().max(1e-9);
    let server_cpu = server_after.cpu_secs - server_before.cpu_secs;
    let per_1000 = |n: usize| if n == 0 { 0.0 } else { server_cpu * 1e6 / n as f64 };
    let q = |p: f64| latency.value_at_quantile(p);
    let json = serde_json::json!({
        "logs": logs,
        "receivers_per_log": receivers,
        "messages_per_sender": messages,
        "offered_rate": rate,
        "window": if rate.is_some() { None } else { Some(window) },
        "plaintext_bytes": plaintext,
        "log_auth": !no_log_auth,
        "envelope_ciphertext_bytes": ciphertext_len,
        "connections": logs * (1 + receivers),
        "setup_secs": round(setup_secs, 2),
        "elapsed_secs": round(elapsed, 3),
        "appends_acknowledged": sent.acknowledged,
        "appends_refused": sent.refused,
        "delivered": unique,
        "missing": expected.saturating_sub(unique),
        "duplicates": duplicates,
        "subscriptions_lost": lost,
        "appends_per_sec": round(sent.acknowledged as f64 / elapsed, 0),
        "delivered_per_sec": round(unique as f64 / elapsed, 0),
        "latency_us": {
            "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": latency.max(),
            "from": if rate.is_some() { "scheduled send time" } else { "send call" },
        },
        "pacer_max_lag_us": rate.map(|_| pacer_lag_us),
        "server_cpu_secs": round(server_cpu, 2),
        "server_cpu_ms_per_1000_appends": round(per_1000(sent.acknowledged), 2),
        "server_cpu_ms_per_1000_deliveries": round(per_1000(unique), 2),
        "server_rss_kib": server_after.rss_kib,
        "tool_cpu_secs": round(own_after.cpu_secs - own_before.cpu_secs, 2),
    });
    let summary = format!(
        "{logs} logs × {receivers} receivers × {messages} messages: {unique}/{expected} delivered \
         ({} missing, {duplicates} duplicated) in {elapsed:.2} s = {:.0} delivered/s; latency \
         p50 {} µs, p99 {} µs, p99.9 {} µs; server CPU {:.2} ms per 1,000 appends, RSS {} MiB",
        expected.saturating_sub(unique),
        unique as f64 / elapsed,
        q(0.5),
        q(0.99),
        q(0.999),
        per_1000(sent.acknowledged),
        server_after.rss_kib / 1024,
    );
    Ok((json, summary))
}

/// Opens `n` sessions, `SETUP_CONCURRENCY` at a time.
pub(crate) async fn open_all(target: &Target, n: usize) -> Result<Vec<Connection>> {
    futures_util::stream::iter((0..n).map(|_| target.open()))
        .buffered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, NetError>>()
        .context("opening sessions")
}

fn ns_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The open-loop schedule: message `j` of all is due at `j / rate` seconds; the pacer hands
/// it to its log's sender then (late if it fell behind: the latency counts from the due
/// time anyway). Returns how late it ever was, µs.
fn pace(
    senders: Vec<mpsc::UnboundedSender<(usize, u64)>>,
    messages: usize,
    rate: u64,
    epoch: Instant,
) -> u64 {
    let logs = senders.len();
    let mut max_lag = Duration::ZERO;
    for j in 0..logs * messages {
        let due = Duration::from_secs_f64(j as f64 / rate as f64);
        let now = epoch.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            max_lag = max_lag.max(now - due);
        }
        let due_ns = u64::try_from(due.as_nanos()).unwrap_or(u64::MAX);
        if senders[j % logs].send((j / logs, due_ns)).is_err() {
            break;
        }
    }
    u64::try_from(max_lag.as_micros()).unwrap_or(u64::MAX)
}

/// Sends as fast as acknowledged, `window` appends in flight.
async fn send_closed(
    mut conn: Connection,
    plan: Arc<LogPlan>,
    envelopes: Vec<Vec<u8>>,
    window: usize,
    epoch: Instant,
) -> Result<Sent> {
    let mut sent = Sent::default();
    let mut outstanding = 0;
    let mut queue = envelopes.into_iter().enumerate().peekable();
    loop {
        if outstanding < window
            && let Some((i, envelope)) = queue.next()
        {
            append(&mut conn, &plan, i, envelope, ns_since(epoch)).await?;
            outstanding += 1;
            continue;
        }
        if outstanding == 0 && queue.peek().is_none() {
            break;
        }
        answer(conn.recv().await?, &mut sent, &mut outstanding);
    }
    conn.close().await;
    Ok(sent)
}

/// Sends each message when the pacer hands it over, reading answers meanwhile.
async fn send_paced(
    mut conn: Connection,
    plan: Arc<LogPlan>,
    envelopes: Vec<Vec<u8>>,
    mut schedule: mpsc::UnboundedReceiver<(usize, u64)>,
) -> Result<Sent> {
    let mut sent = Sent::default();
    let mut envelopes: Vec<Option<Vec<u8>>> = envelopes.into_iter().map(Some).collect();
    let (mut open, mut outstanding) = (true, 0);
    while open || outstanding > 0 {
        tokio::select! {
            due = schedule.recv(), if open => match due {
                Some((i, due_ns)) => {
                    let envelope = envelopes
                        .get_mut(i)
                        .and_then(Option::take)
                        .ok_or_else(|| anyhow!("message {i} scheduled twice"))?;
                    append(&mut conn, &plan, i, envelope, due_ns).await?;
                    outstanding += 1;
                }
                None => open = false,
            },
            frame = conn.recv(), if outstanding > 0 => answer(frame?, &mut sent, &mut outstanding),
        }
    }
    conn.close().await;
    Ok(sent)
}

/// Records message `i`'s send time (`at_ns`) and appends it.
async fn append(
    conn: &mut Connection,
    plan: &LogPlan,
    i: usize,
    envelope: Vec<u8>,
    at_ns: u64,
) -> Result<()> {
    if let Some(slot) = plan.sent_at.get(i) {
        slot.store(at_ns + 1, Ordering::Release);
    }
    conn.send(Request::LogAppend { log: plan.log, body: Body::Inline(envelope) }, None).await?;
    Ok(())
}

fn answer(frame: ServerFrame, sent: &mut Sent, outstanding: &mut usize) {
    if let ServerFrame::Response { result, .. } = frame {
        *outstanding = outstanding.saturating_sub(1);
        match result {
            Ok(_) => sent.acknowledged += 1,
            Err(_) => sent.refused += 1,
        }
    }
}

async fn receive(
    mut conn: Connection,
    plan: Arc<LogPlan>,
    expected: usize,
    epoch: Instant,
) -> Result<Received> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    let mut seen = vec![false; expected];
    let (mut unique, mut duplicates, mut lost, mut last_seq) = (0, 0, 0, 0);
    let mut last = None;
    while unique < expected {
        let Ok(frame) = tokio::time::timeout(RECEIVE_IDLE, conn.recv()).await else { break };
        let items = match frame? {
            ServerFrame::Push(Push::Items { items, .. }) => items,
            ServerFrame::Response { result: Ok(Response::Items { items, .. }), .. } => items,
            ServerFrame::Push(Push::SubscriptionLost { log }) => {
                lost += 1;
                conn.send(Request::Subscribe { log, after: last_seq, max_bytes: u16::MAX }, None)
                    .await?;
                continue;
            }
            ServerFrame::Response { .. } | ServerFrame::Push(_) => continue,
        };
        let now = ns_since(epoch);
        for item in items {
            last_seq = last_seq.max(item.seq);
            let envelope = Envelope::decode(&item.bytes).context("an entry that is no envelope")?;
            let mut index = [0u8; 8];
            index.copy_from_slice(&envelope.idem.0[..8]);
            let Some(i) = usize::try_from(u64::from_be_bytes(index)).ok().filter(|i| *i < expected)
            else {
                bail!("an entry this run did not send");
            };
            if std::mem::replace(&mut seen[i], true) {
                duplicates += 1;
                continue;
            }
            unique += 1;
            let sent = plan.sent_at[i].load(Ordering::Acquire).saturating_sub(1);
            latency.saturating_record((now.saturating_sub(sent) / 1_000).max(1));
        }
        last = Some(Instant::now());
    }
    conn.close().await;
    Ok(Received { latency, unique, duplicates, last, lost_subscriptions: lost })
}
