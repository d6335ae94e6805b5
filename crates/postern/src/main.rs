//! `postern`: the one binary. It parses arguments and configuration, sets up logging and
//! dispatches; the work happens in the library crates.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod client;
mod server;

#[derive(Parser, Debug)]
#[command(
    name = "postern",
    version,
    about = "A messenger that keeps working when the network is censored"
)]
struct Cli {
    /// Print machine-readable JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// The client's home directory [default: $XDG_DATA_HOME/postern/client].
    #[arg(long, global = true, env = "POSTERN_HOME")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a Postern server on its embedded database.
    Server(server::ServerArgs),
    /// Create your identity and choose your home server.
    Init(client::InitArgs),
    /// Show your name, safety number, device and server.
    Whoami,
    /// Show your safety number.
    Fingerprint,
    /// Send what is queued for the server.
    Sync,
    /// Make an invite link (and QR code) for someone to connect with you.
    Invite(client::InviteArgs),
}

/// `$XDG_DATA_HOME/postern`, else `~/.local/share/postern`.
pub(crate) fn data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share"))
    });
    base.unwrap_or_else(|| PathBuf::from(".")).join("postern")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server reports its life at info; client commands speak on stdout and log only
    // warnings unless POSTERN_LOG says otherwise.
    let default_filter = if matches!(cli.command, Command::Server(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let home = client::home_dir(cli.home);
    let result = match cli.command {
        Command::Server(args) => server::run(args, cli.json),
        Command::Init(args) => client::init(&home, args, cli.json),
        Command::Whoami => client::whoami(&home, cli.json),
        Command::Fingerprint => client::fingerprint(&home, cli.json),
        Command::Sync => client::sync(&home, cli.json),
        Command::Invite(args) => client::invite(&home, args, cli.json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed stdout (`postern … | head`) is a normal way to stop, not an error.
            if err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "postern: error: {err}");
            for cause in err.chain().skip(1) {
                let _ = write!(stderr, ": {cause}");
            }
            let _ = writeln!(stderr);
            ExitCode::FAILURE
        }
    }
}
