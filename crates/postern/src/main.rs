//! `postern`: the one binary. It parses arguments and configuration, sets up logging and
//! dispatches; the work happens in the library crates.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc: a fifth less server CPU per message than glibc's malloc, whose arenas the
// tokio workers and the store's threads contend for (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod client;
mod relay;
mod server;
mod signals;

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
    /// The client's home directory [env: POSTERN_HOME; default: $XDG_DATA_HOME/postern/client].
    // Not clap's `env`: an empty POSTERN_HOME there is an error ("a value is required"),
    // where an empty variable should mean unset.
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a Postern server on its embedded database.
    Server(server::ServerArgs),
    /// Run a relay: a website that forwards people holding its links to Postern servers.
    Relay(relay::RelayArgs),
    /// Measure a server on loopback: throughput, fan-out, idle sessions, handshakes.
    Bench(postern_load::BenchArgs),
    /// Create your identity and choose your home server.
    Init(client::InitArgs),
    /// Show your name, safety number, device and server.
    Whoami,
    /// Show your safety number, or a contact's.
    Fingerprint {
        /// A contact's name; without it, your own.
        contact: Option<String>,
    },
    /// Send what is queued and fetch what arrived.
    Sync,
    /// Make an invite link (and QR code) for someone to connect with you.
    Invite {
        /// A one-time invite: whoever uses it first is connected, with no accept step.
        /// Without it, the invite is a long-lived address whose uses arrive as requests.
        #[arg(long)]
        once: bool,
    },
    /// Connect with the person who gave you an invite link.
    Connect {
        /// The invite link (`postern://invite#…`).
        link: String,
    },
    /// List requests to connect that arrived through your addresses.
    Requests,
    /// Accept a request to connect.
    Accept {
        /// The request's id, from `postern requests`.
        request: String,
    },
    /// List your chats.
    Chats,
    /// List your contacts.
    Contacts,
    /// Send a message; exit status 0 means the server has it durably.
    Send {
        /// A chat id or a contact's name.
        chat: String,
        /// The text; `-` reads it from standard input.
        text: String,
    },
    /// Show a chat's messages (after fetching new ones).
    Read {
        /// A chat id or a contact's name.
        chat: String,
        /// Show only the last N messages.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Stay connected: print messages as they arrive and serve other commands on this home.
    Listen,
    /// Groups: create, add, remove, leave, list members.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Relays you go through when your server cannot be reached directly.
    #[command(subcommand)]
    Relays(RelaysCommand),
    /// Servers your new chats move to when the one they are on is blocked.
    #[command(subcommand)]
    Servers(ServersCommand),
    /// Which ways to your server work now, which failed and why, and what is queued.
    Status {
        /// A domestic address (HOST:PORT) that a whitelist lets through, to tell whitelist
        /// mode from an outage; repeat for several [default: a few well-known sites].
        #[arg(long = "reference", value_name = "HOST:PORT")]
        references: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum RelaysCommand {
    /// Add a relay from its link (`postern://relay#…`).
    Add {
        /// The relay link.
        link: String,
    },
    /// List your relays.
    List,
    /// Forget a relay.
    Remove {
        /// The relay's number, from `postern relays list`.
        id: i64,
    },
    /// Print a link to one of your relays for someone else (with a credential of its own).
    Share {
        /// The relay's number, from `postern relays list`.
        id: i64,
        /// Also print it as a QR code.
        #[arg(long)]
        qr: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ServersCommand {
    /// Add a server (`postern://server#…`) that chats you create from now on move to, in
    /// the order added, when every way to the one they are on fails for a while.
    Add {
        /// The server link.
        link: String,
    },
    /// List those servers, in order.
    List,
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Create a group with contacts (you are its admin).
    Create {
        /// The group's name.
        name: String,
        /// Contacts to add.
        #[arg(required = true)]
        contacts: Vec<String>,
        /// Let every member add people (otherwise only admins may).
        #[arg(long)]
        members_can_add: bool,
        /// Let every member remove people (otherwise only admins may).
        #[arg(long)]
        members_can_remove: bool,
    },
    /// Add a contact to a group.
    Add {
        /// The group (its id or name).
        chat: String,
        /// The contact.
        contact: String,
    },
    /// Remove a member from a group (all their devices).
    Remove {
        /// The group (its id or name).
        chat: String,
        /// The member (a contact's name).
        contact: String,
    },
    /// Leave a group.
    Leave {
        /// The group (its id or name).
        chat: String,
    },
    /// List a group's members.
    Members {
        /// The group (its id or name).
        chat: String,
    },
}

impl Command {
    /// The form a running `listen` can be handed, reading stdin for `send … -`.
    fn for_client(self) -> anyhow::Result<client::Command> {
        use client::Command as C;
        Ok(match self {
            Command::Whoami => C::Whoami,
            Command::Fingerprint { contact } => C::Fingerprint { contact },
            Command::Sync => C::Sync,
            Command::Invite { once } => C::Invite { once },
            Command::Connect { link } => C::Connect { link },
            Command::Requests => C::Requests,
            Command::Accept { request } => C::Accept { request },
            Command::Chats => C::Chats,
            Command::Contacts => C::Contacts,
            Command::Send { chat, text } => {
                let text = if text == "-" {
                    let mut buf = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)?;
                    buf.trim_end_matches('\n').to_owned()
                } else {
                    text
                };
                C::Send { chat, text }
            }
            Command::Read { chat, limit } => C::Read { chat, limit },
            Command::Group(g) => match g {
                GroupCommand::Create { name, contacts, members_can_add, members_can_remove } => {
                    let rules = postern_client::GroupRules { members_can_add, members_can_remove };
                    C::GroupCreate { name, contacts, rules }
                }
                GroupCommand::Add { chat, contact } => C::GroupAdd { chat, contact },
                GroupCommand::Remove { chat, contact } => C::GroupRemove { chat, contact },
                GroupCommand::Leave { chat } => C::GroupLeave { chat },
                GroupCommand::Members { chat } => C::GroupMembers { chat },
            },
            Command::Status { references } => C::Status {
                references: if references.is_empty() {
                    client::DEFAULT_REFERENCES.iter().map(|r| (*r).to_owned()).collect()
                } else {
                    references
                },
            },
            Command::Relays(r) => match r {
                RelaysCommand::Add { link } => C::RelaysAdd { link },
                RelaysCommand::List => C::RelaysList,
                RelaysCommand::Remove { id } => C::RelaysRemove { id },
                RelaysCommand::Share { id, qr } => C::RelaysShare { id, qr },
            },
            Command::Servers(s) => match s {
                ServersCommand::Add { link } => C::ServersAdd { link },
                ServersCommand::List => C::ServersList,
            },
            Command::Server(_)
            | Command::Relay(_)
            | Command::Init(_)
            | Command::Listen
            | Command::Bench(_) => {
                anyhow::bail!("not a client command")
            }
        })
    }
}

/// `postern bench`: the JSON object on stdout; the summary on stderr, or only the JSON
/// with `--json`.
fn bench(args: postern_load::BenchArgs, json: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let me = std::env::current_exe().context("finding this binary to start a server")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(postern_load::run(args, me))?;
    if !json {
        writeln!(std::io::stderr(), "{}", report.summary)?;
    }
    writeln!(std::io::stdout(), "{}", report.json)?;
    Ok(())
}

/// A link as a QR code for a terminal.
pub(crate) fn qr(link: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let code = qrcode::QrCode::new(link.as_bytes()).context("the link does not fit a QR code")?;
    Ok(code.render::<qrcode::render::unicode::Dense1x2>().quiet_zone(true).build())
}

/// `$XDG_DATA_HOME/postern`, else `~/.local/share/postern`.
pub(crate) fn data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share"))
    });
    base.unwrap_or_else(|| PathBuf::from(".")).join("postern")
}

/// Log directives no setting can loosen: dependencies that log secrets when verbose (a
/// target matches every target that starts with it).
const QUIET_DEPENDENCIES: &[&str] = &["openmls=warn", "hpke=warn"];

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server reports its life at info; client commands speak on stdout and log only
    // warnings unless POSTERN_LOG says otherwise.
    let default_filter =
        if matches!(cli.command, Command::Server(_) | Command::Relay(_)) { "info" } else { "warn" };
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Whatever POSTERN_LOG asks for: openmls logs key schedules and group contexts (keys, group
    // names) at debug and trace, so it never logs below warnings here.
    for directive in QUIET_DEPENDENCIES {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let home = client::home_dir(cli.home);
    let result = match cli.command {
        Command::Server(args) => server::run(args, cli.json),
        Command::Relay(args) => relay::run(args, cli.json),
        Command::Init(args) => client::init(&home, args, cli.json),
        Command::Listen => client::listen(&home, cli.json),
        Command::Bench(args) => bench(args, cli.json),
        other => other.for_client().and_then(|c| client::run(&home, c, cli.json)),
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
