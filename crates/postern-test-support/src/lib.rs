//! Test helpers: start the real `postern` binary on loopback with a temporary data
//! directory, read its link, and drive it with the real client connection.
//!
//! Helpers fail by panicking, as tests do.
//!
//! Nothing here is mocked: the server is the binary users run, on real TLS, with the real
//! SQLite store. Tests pass the binary's path (`env!("CARGO_BIN_EXE_postern")`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod faultfs;
pub mod webprint;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use postern_net::Connection;
use postern_proto::ids::{DeviceId, DropId, IdemKey, LogId, MailboxId, UploadId};
use postern_proto::link::{RelayLink, ServerLink};
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
    /// The bound public address (the link may name others, from `public_addrs`).
    pub listen: String,
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
        let (child, start) =
            launch(bin, &server_args("127.0.0.1:0", &data_dir), &log_path, &env).await;
        TestServer {
            bin: bin.to_owned(),
            child: Some(child),
            link: start.link(),
            admin: start.admin(),
            listen: start.listen(),
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
        let args = server_args(&self.listen, &self.data_dir);
        let (child, start) = launch(&self.bin, &args, &self.log_path, &self.extra_env).await;
        self.child = Some(child);
        self.link = start.link();
        self.admin = start.admin();
    }

    /// The link with the address the server is bound to, whatever `public_addrs` says.
    pub fn bound_link(&self) -> ServerLink {
        ServerLink { addrs: vec![self.listen.clone()], ..self.link.clone() }
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
        let mut tls =
            postern_net::connect_tls(&(&self.link).into(), &[b"http/1.1"]).await.expect("TLS");
        tls.write_all(request).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        out
    }
}

fn server_args(listen: &str, data_dir: &Path) -> Vec<String> {
    ["--json", "server", "--listen", listen, "--admin", "127.0.0.1:0", "--data"]
        .into_iter()
        .map(str::to_owned)
        .chain([data_dir.display().to_string()])
        .collect()
}

/// The JSON line a server or relay prints when it is listening.
struct StartLine(serde_json::Value);

impl StartLine {
    fn link(&self) -> ServerLink {
        ServerLink::parse(self.0["link"].as_str().expect("link")).expect("valid link")
    }
    fn relay_link(&self) -> RelayLink {
        RelayLink::parse(self.0["link"].as_str().expect("link")).expect("valid relay link")
    }
    fn admin(&self) -> String {
        self.0["admin"].as_str().expect("admin").to_owned()
    }
    fn listen(&self) -> String {
        self.0["listen"].as_str().expect("listen").to_owned()
    }
}

/// Starts `bin args…` and waits for its start line.
async fn launch(
    bin: &Path,
    args: &[String],
    log_path: &Path,
    extra_env: &[(String, String)],
) -> (Child, StartLine) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("server log file");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("POSTERN_LOG", "debug")
        .envs(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn postern");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
        .await
        .expect("did not start in time")
        .expect("read stdout")
        .unwrap_or_else(|| {
            panic!(
                "exited at start; log: {}",
                std::fs::read_to_string(log_path).unwrap_or_default()
            )
        });
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON start line");
    // Keep reading stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, StartLine(v))
}

/// A running `postern relay` process on 127.0.0.1 with its own configuration file and data
/// directory.
pub struct TestRelay {
    bin: PathBuf,
    child: Option<Child>,
    /// The operator's relay link.
    pub link: RelayLink,
    /// The bound address.
    pub listen: String,
    /// The configuration file.
    pub config_path: PathBuf,
    log_path: PathBuf,
    root: tempfile::TempDir,
}

impl std::fmt::Debug for TestRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRelay").field("listen", &self.listen).finish_non_exhaustive()
    }
}

impl TestRelay {
    /// Starts a relay whose configuration is `settings` (TOML lines: `servers`, `via`,
    /// `revoked`…) plus a loopback listener and a temporary data directory.
    pub async fn start(bin: &Path, settings: &str) -> Self {
        let root = tempfile::tempdir().expect("temporary directory");
        let config_path = root.path().join("relay.toml");
        let log_path = root.path().join("relay.log");
        let (child, start) =
            spawn_relay(bin, root.path(), &config_path, &log_path, "127.0.0.1:0", settings).await;
        TestRelay {
            bin: bin.to_owned(),
            child: Some(child),
            link: start.relay_link(),
            listen: start.listen(),
            config_path,
            log_path,
            root,
        }
    }

    /// Stops the relay (SIGKILL), rewrites its configuration with `settings` and starts it
    /// again on the same address and data directory.
    pub async fn restart_with(&mut self, settings: &str) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill relay");
        }
        let (child, start) = spawn_relay(
            &self.bin,
            self.root.path(),
            &self.config_path,
            &self.log_path,
            &self.listen,
            settings,
        )
        .await;
        self.child = Some(child);
        self.link = start.relay_link();
    }

    /// Mints a new credential: its link and id (`postern relay … link`).
    pub fn mint(&self) -> (RelayLink, String) {
        let out = std::process::Command::new(&self.bin)
            .args(["--json", "relay", "--config"])
            .arg(&self.config_path)
            .arg("link")
            .output()
            .expect("run postern relay link");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let link = RelayLink::parse(v["link"].as_str().expect("link")).expect("relay link");
        (link, v["id"].as_str().expect("id").to_owned())
    }

    /// The relay's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends raw bytes inside TLS and returns everything the relay answers until it closes
    /// (or 5 s pass).
    pub async fn raw_https(&self, request: &[u8]) -> Vec<u8> {
        raw_https(&(&self.link).into(), request).await
    }
}

/// Writes a relay configuration (`settings` plus listener and data directory under `root`)
/// and starts `postern relay` on it.
async fn spawn_relay(
    bin: &Path,
    root: &Path,
    config_path: &Path,
    log_path: &Path,
    listen: &str,
    settings: &str,
) -> (Child, StartLine) {
    let data = root.join("data");
    let text = format!("listen = \"{listen}\"\ndata = \"{}\"\n{settings}\n", data.display());
    std::fs::write(config_path, text).expect("write relay config");
    let args = ["--json", "relay", "--config"].into_iter().map(str::to_owned);
    let args: Vec<String> = args.chain([config_path.display().to_string()]).collect();
    launch(bin, &args, log_path, &[]).await
}

/// Sends raw bytes inside TLS to `endpoint` and returns everything it answers until it
/// closes (or 5 s pass).
pub async fn raw_https(endpoint: &postern_net::Endpoint, request: &[u8]) -> Vec<u8> {
    let mut tls = postern_net::connect_tls(endpoint, &[b"http/1.1"]).await.expect("TLS");
    tls.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    out
}

/// A WebSocket upgrade request for `/`, with `cookie` as its `Cookie` header when given.
pub fn upgrade_request(cookie: Option<&str>) -> Vec<u8> {
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    format!(
        "GET / HTTP/1.1\r\nHost: example\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{cookie}\r\n"
    )
    .into_bytes()
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
