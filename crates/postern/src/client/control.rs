//! `postern listen` and its control socket.
//!
//! While `listen` owns a home, it serves `control.sock` in the home (mode 0600, in the 0700
//! home): another `postern` command on the same home sends its command as one JSON line and
//! gets back one JSON line with the output and the error, if any. The command runs inside
//! `listen`, on the store it already holds open, so two processes never open the state side
//! by side.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::driver::Driver;
use super::{Command, execute, print_events};

const SOCKET: &str = "control.sock";
/// How often `listen` looks in the mailbox (it has no push) and retries a lost server.
const POLL: Duration = Duration::from_secs(2);
/// How often `listen` looks in the mailbox where connections have a budget (each look
/// spends some of it; chats come by push all the same).
const POLL_UNDER_BUDGET: Duration = Duration::from_secs(30);
/// How often `listen` pings its servers so idle connections stay open.
const PING: Duration = Duration::from_secs(60);
/// The longest command line accepted on the socket.
const MAX_REQUEST: u64 = 1 << 20;
/// How long a handed-over command may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Serialize, Deserialize)]
struct Request {
    command: Command,
    json: bool,
}

/// What `listen` answers.
#[derive(Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) output: String,
    pub(crate) error: Option<String>,
}

/// Hands a command to the `listen` that owns `home`; `None` when none is listening.
pub(crate) fn forward(home: &Path, command: &Command, json: bool) -> Result<Option<Reply>> {
    let path = home.join(SOCKET);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    };
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = serde_json::to_vec(&Request { command: command.clone(), json })?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).context("no answer from `postern listen`")?;
    Ok(Some(serde_json::from_str(&reply).context("a garbled answer from `postern listen`")?))
}

fn emit(out: &[u8]) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out);
    let _ = stdout.flush();
}

/// Polls (reconnecting when a connection was lost; through a door with a budget, only
/// every [`POLL_UNDER_BUDGET`]) and subscribes to every chat not yet subscribed on its
/// server's current connection; a subscription from the chat's cursor brings what was
/// missed. Errors are reported and retried at the next poll.
async fn catch_up(driver: &mut Driver, json: bool, polled: &mut Option<tokio::time::Instant>) {
    if !driver.under_budget() || polled.is_none_or(|at| at.elapsed() >= POLL_UNDER_BUDGET) {
        *polled = Some(tokio::time::Instant::now());
        let mut out = Vec::new();
        match driver.poll().await {
            Ok(events) => {
                let _ = print_events(&mut out, &events, json);
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
        emit(&out);
    }
    resubscribe(driver, json).await;
}

/// Subscribes to every chat not yet subscribed on its server's current connection, then
/// prints what arrived on the way: read by the last handed-over command (a send reads its
/// chat) or by the subscribing (under a budget the backlog is read first).
async fn resubscribe(driver: &mut Driver, json: bool) {
    if let Err(e) = driver.subscribe_new().await {
        tracing::warn!("{e:#}");
    }
    let mut out = Vec::new();
    let _ = print_events(&mut out, &std::mem::take(&mut driver.unshown), json);
    emit(&out);
}

pub(crate) async fn listen(mut driver: Driver, home: &Path, json: bool) -> Result<()> {
    let path = home.join(SOCKET);
    // We hold the home's lock, so a socket file here is left over from a crash.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    // Before "listening" is printed: whoever reads it may send SIGTERM at once.
    let mut signals = crate::signals::Signals::install()?;
    let mut polled = None;
    catch_up(&mut driver, json, &mut polled).await;
    if json {
        emit(format!("{}\n", serde_json::json!({ "event": "listening" })).as_bytes());
    } else {
        emit(b"Listening. Messages appear here; stop with Ctrl-C.\n");
    }
    let mut poll = tokio::time::interval(POLL);
    let mut ping = tokio::time::interval(PING);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    serve(&mut driver, stream).await;
                    resubscribe(&mut driver, json).await;
                }
            }
            push = driver.next_push(POLL) => {
                let Some((link, push)) = push else { continue };
                let mut out = Vec::new();
                match driver.handle_push(&link, push).await {
                    Ok(events) => { let _ = print_events(&mut out, &events, json); }
                    Err(e) => tracing::warn!("{e:#}"),
                }
                emit(&out);
                // A connection the pushes spent was let go: subscribe on a fresh one.
                resubscribe(&mut driver, json).await;
            }
            _ = poll.tick() => {
                catch_up(&mut driver, json, &mut polled).await;
                // Where relays carry the traffic and nothing froze, whether their budget
                // can go (once a week per network and relay). Looked at every poll, so a
                // probe held back by the cap on new connections goes once the cap clears.
                if let Err(e) = driver.probe_relays().await {
                    tracing::warn!("{e:#}");
                }
            }
            _ = ping.tick() => {
                if let Err(e) = driver.ping().await {
                    tracing::warn!("{e:#}");
                }
            }
            _ = signals.wait() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    driver.close().await;
    Ok(())
}

/// Runs one handed-over command and answers it.
async fn serve(driver: &mut Driver, stream: tokio::net::UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
    let reply = match read.ok().and_then(Result::ok).map(|_| serde_json::from_str::<Request>(&line))
    {
        Some(Ok(request)) => {
            let mut out = Vec::new();
            let result = execute(driver, &request.command, request.json, &mut out).await;
            Reply {
                output: String::from_utf8_lossy(&out).into_owned(),
                error: result.err().map(|e| format!("{e:#}")),
            }
        }
        _ => Reply { output: String::new(), error: Some("a garbled command".into()) },
    };
    if let Ok(mut bytes) = serde_json::to_vec(&reply) {
        bytes.push(b'\n');
        let _ = write.write_all(&bytes).await;
    }
}
