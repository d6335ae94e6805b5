//! `postern-lab`: the censor lab's one command. `run` brings the lab up, starts the censor
//! with a profile, runs a scenario in the client namespace (and servers elsewhere), and
//! prints one JSON object: the scenario's exit status and the censor's report. The other
//! subcommands are the daemon and the controls the lab's tests use.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use postern_censor::controls::{self, Payload};
use postern_censor::dns::{self, Zone};
use postern_censor::profile::Profile;
use postern_censor::topology::{Host, Lab};

#[derive(Parser)]
#[command(name = "postern-lab", about = "The censor lab")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario under a profile and print the censor's report as JSON.
    Run {
        /// A built-in profile (open, ru-2023, ru-2024, ru-2025-06, ru-whitelist) or a TOML file.
        #[arg(long)]
        profile: String,
        /// A server to start first: `foreign=CMD ARGS…` or `domestic=CMD ARGS…` (repeatable).
        #[arg(long)]
        serve: Vec<String>,
        /// The scenario, run in the client namespace.
        #[arg(trailing_var_arg = true, required = true)]
        scenario: Vec<String>,
    },
    /// The censor daemon (inside the censor namespace).
    Censord {
        #[arg(long)]
        profile: String,
        #[arg(long)]
        report: PathBuf,
        #[arg(long, default_value_t = 0)]
        queue: u16,
    },
    /// A TLS server answering `GET n` with n bytes.
    TlsServe {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
        /// Play a naive TLS proxy (wrong certificate, no website).
        #[arg(long)]
        proxy: bool,
        /// Pad the website's page to this many bytes.
        #[arg(long, default_value_t = 0)]
        page_bytes: usize,
        /// Be a TLS-in-TLS proxy: forward what arrives inside TLS to this address.
        #[arg(long)]
        forward: Option<SocketAddr>,
    },
    /// Fetch through a TLS-in-TLS proxy; prints the outcome as JSON.
    TlsInTls {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        outer_sni: String,
        #[arg(long)]
        inner_sni: String,
        #[arg(long, default_value_t = 1000)]
        bytes: u64,
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Load a page in a headless browser (chromium or firefox-esr); prints its outcome.
    Browse {
        #[arg(long)]
        browser: String,
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
    /// Capture a browser's JA4 in the lab (open profile); prints `{"browser", "ja4"}`.
    Ja4 {
        #[arg(long)]
        browser: String,
    },
    /// A TLS client; prints its outcome as JSON.
    TlsGet {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long, default_value_t = 1000)]
        bytes: u64,
        #[arg(long, default_value_t = 3)]
        timeout: u64,
        /// Write the ClientHello in TCP segments of this many bytes.
        #[arg(long)]
        split: Option<usize>,
        /// Offer these ALPN protocols.
        #[arg(long, value_delimiter = ',')]
        alpn: Vec<String>,
    },
    /// A resolver abroad: the lab's names, nothing removed.
    DnsServe {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Ask a resolver for a name's address; prints `{"answer": …, "nxdomain": …}`.
    DnsQuery {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
    /// An obfs4 bridge (Debian's obfs4proxy) in front of a TCP backend; prints `cert=…`.
    Obfs4Serve {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        orport: SocketAddr,
    },
    /// Send a line through an obfs4 bridge and wait for its echo.
    Obfs4Send {
        #[arg(long)]
        bridge: SocketAddr,
        #[arg(long)]
        cert: String,
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// A UDP echo server.
    UdpEcho {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Send one UDP datagram and wait for its echo.
    UdpSend {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, value_enum)]
        payload: Payload,
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
    /// A TCP echo server.
    TcpEcho {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Send a first TCP packet and wait for its echo.
    TcpSend {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, value_enum)]
        payload: Payload,
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout();
    writeln!(out, "{}", serde_json::to_string(value)?)?;
    Ok(())
}

fn run(profile: &str, serve: &[String], scenario: &[String]) -> Result<i32> {
    Profile::load(profile)?;
    let me = std::env::current_exe()?.display().to_string();
    let dir = tempfile_dir()?;
    let report = dir.join("report.json");
    let mut lab = Lab::up()?;
    lab.start(
        Host::Censor,
        &[&me, "censord", "--profile", profile, "--report", &report.display().to_string()],
    )?;
    for s in serve {
        let (host, cmd) = s.split_once('=').context("--serve HOST=CMD")?;
        let host = match host {
            "foreign" => Host::Foreign,
            "domestic" => Host::Domestic,
            other => anyhow::bail!("--serve: no host {other:?} (foreign, domestic)"),
        };
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        lab.start(host, &argv)?;
    }
    let (program, args) = scenario.split_first().context("no scenario")?;
    let status = lab.command(Host::Client, program).args(args).status()?;
    lab.stop_all();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    print_json(&serde_json::json!({ "exit": status.code(), "censor": report }))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(status.code().unwrap_or(1))
}

/// Runs `browser` against a lab website under `open` and reads its JA4 off the censor's
/// report.
fn ja4(browser: &str) -> Result<()> {
    let me = std::env::current_exe()?.display().to_string();
    let dir = tempfile_dir()?;
    let report = dir.join("report.json");
    let mut lab = Lab::up()?;
    let r = report.display().to_string();
    lab.start(Host::Censor, &[&me, "censord", "--profile", "open", "--report", &r])?;
    lab.start(
        Host::Foreign,
        &[&me, "tls-serve", "--addr", "10.0.2.2:443", "--names", "fine.example"],
    )?;
    lab.command(Host::Client, &me)
        .args(["browse", "--browser", browser, "--url", "https://fine.example/", "--timeout", "8"])
        .output()?;
    lab.stop_all();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    let flow = report["flows"]
        .as_array()
        .and_then(|flows| flows.iter().find(|f| f["sni"] == "fine.example" && f["ja4"].is_string()))
        .context("the browser sent no ClientHello for fine.example")?;
    print_json(
        &serde_json::json!({ "browser": browser, "ja4": flow["ja4"], "ja4_r": flow["ja4_r"] }),
    )
}

fn dns_serve(addr: SocketAddr) -> Result<()> {
    let socket = std::net::UdpSocket::bind(addr)?;
    controls::exit_when_stdin_closes();
    writeln!(std::io::stdout(), "listening")?;
    dns::serve(socket, Zone::lab(), Vec::new())
}

fn tempfile_dir() -> Result<PathBuf> {
    use rand::Rng;
    let dir =
        std::env::temp_dir().join(format!("postern-lab-{:08x}", rand::thread_rng().r#gen::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let secs = Duration::from_secs;
    let result = match cli.command {
        Command::Run { profile, serve, scenario } => run(&profile, &serve, &scenario)
            .map(|code| if code == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }),
        Command::Censord { profile, report, queue } => Profile::load(&profile)
            .and_then(|p| postern_censor::daemon::run(p, &report, queue))
            .map(|()| ExitCode::SUCCESS),
        Command::TlsServe { addr, names, proxy, page_bytes, forward } => {
            controls::tls_serve(addr, names, proxy, page_bytes, forward).map(|()| ExitCode::SUCCESS)
        }
        Command::TlsInTls { addr, outer_sni, inner_sni, bytes, timeout } => {
            print_json(&controls::tls_in_tls(addr, &outer_sni, &inner_sni, bytes, secs(timeout)))
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Browse { browser, url, timeout } => {
            print_json(&controls::browse(&browser, &url, secs(timeout))).map(|()| ExitCode::SUCCESS)
        }
        Command::Ja4 { browser } => ja4(&browser).map(|()| ExitCode::SUCCESS),
        Command::TlsGet { addr, sni, bytes, timeout, split, alpn } => {
            let shape = controls::HelloShape { split, alpn };
            print_json(&controls::tls_get(addr, &sni, bytes, secs(timeout), &shape))
                .map(|()| ExitCode::SUCCESS)
        }
        Command::DnsServe { addr } => dns_serve(addr).map(|()| ExitCode::SUCCESS),
        Command::DnsQuery { server, name, timeout } => {
            let outcome = match dns::query(server, &name, secs(timeout)) {
                Ok(answer) => serde_json::json!({
                    "answer": answer.map(|a| a.to_string()), "nxdomain": answer.is_none(),
                }),
                Err(e) => serde_json::json!({ "answer": null, "error": e.to_string() }),
            };
            print_json(&outcome).map(|()| ExitCode::SUCCESS)
        }
        Command::Obfs4Serve { addr, orport } => {
            controls::obfs4_serve(addr, orport).map(|()| ExitCode::SUCCESS)
        }
        Command::Obfs4Send { bridge, cert, timeout } => {
            print_json(&controls::obfs4_send(bridge, &cert, secs(timeout)))
                .map(|()| ExitCode::SUCCESS)
        }
        Command::UdpEcho { addr } => controls::udp_echo(addr).map(|()| ExitCode::SUCCESS),
        Command::UdpSend { addr, payload, timeout } => {
            print_json(&controls::udp_send(addr, payload, secs(timeout)))
                .map(|()| ExitCode::SUCCESS)
        }
        Command::TcpEcho { addr } => controls::tcp_echo(addr).map(|()| ExitCode::SUCCESS),
        Command::TcpSend { addr, payload, timeout } => {
            print_json(&controls::tcp_send(addr, payload, secs(timeout)))
                .map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "postern-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}
