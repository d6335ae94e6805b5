//! Test helpers: start the real `postern` binary on loopback with a temporary data
//! directory, read its link, and drive it with the real client connection.
//!
//! Helpers fail by panicking, as tests do.
//!
//! Nothing here is mocked: the server is the binary users run, on real TLS, with the real
//! SQLite store. Tests pass the binary's path (`env!("CARGO_BIN_EXE_postern")`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod faultfs;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use postern_net::Connection;
use postern_proto::ids::{DeviceId, DropId, IdemKey, LogId, MailboxId, UploadId};
use postern_proto::link::ServerLink;
use rand::RngCore;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How long a server gets to start and print its link.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `postern server` process on 127.0.0.1 with its own data directory.
pub struct TestServer {
    bin: PathBuf,
    child: Option<Child>,
    /// The link the server printed.
    pub link: ServerLink,
    /// The admin listener.
    pub admin: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The server's log (stderr) from every start.
    pub log_path: PathBuf,
    extra_env: Vec<(String, String)>,
    root: tempfile::TempDir,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer").field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

impl TestServer {
    /// Starts a server with a fresh data directory.
    pub async fn start(bin: &Path) -> Self {
        Self::start_with_env(bin, Vec::new()).await
    }

    /// Starts a server with extra environment variables (a config file path, say).
    pub async fn start_with_env(bin: &Path, extra_env: Vec<(String, String)>) -> Self {
        Self::start_full(bin, None, extra_env).await
    }

    /// Starts a server whose data directory is `data_dir` (a [`faultfs::FaultFs`], say).
    pub async fn start_at(bin: &Path, data_dir: &Path) -> Self {
        Self::start_full(bin, Some(data_dir.to_owned()), Vec::new()).await
    }

    async fn start_full(
        bin: &Path,
        data_dir: Option<PathBuf>,
        extra_env: Vec<(String, String)>,
    ) -> Self {
        let root = tempfile::tempdir().expect("temporary directory");
        let data_dir = data_dir.unwrap_or_else(|| root.path().join("data"));
        let log_path = root.path().join("server.log");
        let env = extra_env;
        let (child, link, admin) = launch(bin, "127.0.0.1:0", &data_dir, &log_path, &env).await;
        TestServer {
            bin: bin.to_owned(),
            child: Some(child),
            link,
            admin,
            data_dir,
            log_path,
            extra_env: env,
            root,
        }
    }

    /// The temporary directory holding the data directory and the log.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).expect("server running")
    }

    /// Kills the server with SIGKILL and waits for it to die.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill server");
        }
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited successfully.
    pub async fn terminate(&mut self) -> bool {
        let mut child = self.child.take().expect("server running");
        let pid = child.id().expect("pid").to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().await.expect("run kill");
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("server did not stop after SIGTERM")
            .expect("wait for server");
        status.success()
    }

    /// Sets an environment variable for the next [`restart`](Self::restart).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.extra_env.retain(|(k, _)| k != key);
        self.extra_env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the server again on the same data directory and address (same keys and
    /// secret), so clients holding its link reach it again.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        let addr = self.link.addrs.first().cloned().expect("the link has an address");
        let (child, link, admin) =
            launch(&self.bin, &addr, &self.data_dir, &self.log_path, &self.extra_env).await;
        self.child = Some(child);
        self.link = link;
        self.admin = admin;
    }

    /// A new session.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.link).await.expect("connect to test server")
    }

    /// GETs a path on the admin listener; returns the body.
    pub async fn admin_get(&self, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(&self.admin).await.expect("admin connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.expect("admin write");
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.expect("admin read");
        out
    }

    /// Sends raw bytes inside TLS to the public listener and returns everything the server
    /// answers until it closes (or 5 s pass).
    pub async fn raw_https(&self, request: &[u8]) -> Vec<u8> {
        let mut tls = postern_net::connect_tls(&self.link, &[b"http/1.1"]).await.expect("TLS");
        tls.write_all(request).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        out
    }
}

async fn launch(
    bin: &Path,
    listen: &str,
    data_dir: &Path,
    log_path: &Path,
    extra_env: &[(String, String)],
) -> (Child, ServerLink, String) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("server log file");
    let mut cmd = Command::new(bin);
    cmd.args(["--json", "server", "--listen", listen, "--admin", "127.0.0.1:0", "--data"])
        .arg(data_dir)
        .env("POSTERN_LOG", "debug")
        .envs(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn postern server");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
        .await
        .expect("server did not start in time")
        .expect("read server stdout")
        .unwrap_or_else(|| {
            panic!(
                "server exited at start; log: {}",
                std::fs::read_to_string(log_path).unwrap_or_default()
            )
        });
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON start line");
    let link = ServerLink::parse(v["link"].as_str().expect("link")).expect("valid link");
    let admin = v["admin"].as_str().expect("admin").to_owned();
    // Keep reading stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, link, admin)
}

/// An HTTP response with the `Date` header removed, for comparing answers.
pub fn without_date(response: &[u8]) -> String {
    String::from_utf8_lossy(response)
        .split("\r\n")
        .filter(|line| !line.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// Random ids and keys for tests.
pub mod ids {
    use super::*;

    /// A random mailbox id.
    pub fn mailbox() -> MailboxId {
        MailboxId(random())
    }
    /// A random drop address.
    pub fn drop() -> DropId {
        DropId(random())
    }
    /// A random log id.
    pub fn log() -> LogId {
        LogId(random())
    }
    /// A random idempotency key.
    pub fn idem() -> IdemKey {
        IdemKey(random())
    }
    /// A random upload id.
    pub fn upload() -> UploadId {
        UploadId(random())
    }
    /// A random device id.
    pub fn device() -> DeviceId {
        DeviceId(random())
    }
    /// A random Ed25519 signing key.
    pub fn signing_key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&random())
    }
}
