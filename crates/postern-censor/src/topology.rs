//! The lab's network: four namespaces joined through a censor router, made by [`Lab::up`]
//! and removed when the [`Lab`] is dropped (also after a failed test: nothing is left
//! behind). Addresses exist only inside these namespaces and nothing routes out of them.
//!
//! ```text
//!  client 10.0.1.2, 10.0.1.3 ── censor 10.0.1.1 | 10.0.2.1 10.0.4.1 | 10.0.3.1   (probe 10.0.9.1)
//!                        ├── foreign  10.0.2.2, 10.0.2.66 (IP-blocked), 10.0.4.2 (cdn)
//!                        └── domestic 10.0.3.2 (domestic-dc), 10.0.3.130 (whitelisted)
//! ```
//!
//! Offloads (GRO, GSO, TSO) are off on every veth so the censor sees real packets. The
//! client resolves names with the national resolver on the router.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A host of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The user's device.
    Client,
    /// The censor's router (and its prober).
    Censor,
    /// Foreign hosting and a CDN.
    Foreign,
    /// Domestic hosting; its upper half is whitelisted.
    Domestic,
}

impl Host {
    fn suffix(self) -> &'static str {
        match self {
            Host::Client => "client",
            Host::Censor => "censor",
            Host::Foreign => "foreign",
            Host::Domestic => "domestic",
        }
    }
}

/// Well-known lab addresses.
pub mod addr {
    /// The client.
    pub const CLIENT: &str = "10.0.1.2";
    /// A second client, on a line of its own (the censor counts per address).
    pub const CLIENT2: &str = "10.0.1.3";
    /// A foreign hosting server.
    pub const FOREIGN: &str = "10.0.2.2";
    /// A foreign server on the profiles' IP block list.
    pub const FOREIGN_BLOCKED: &str = "10.0.2.66";
    /// A CDN edge.
    pub const CDN: &str = "10.0.4.2";
    /// A domestic data-centre server (not whitelisted).
    pub const DOMESTIC: &str = "10.0.3.2";
    /// A domestic whitelisted server.
    pub const WHITELISTED: &str = "10.0.3.130";
}

/// Whether this process runs as root, which the lab needs (tests skip without it, saying
/// so on stderr).
pub fn can_run() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// A running lab. Dropping it kills what it started and deletes its namespaces.
pub struct Lab {
    prefix: String,
    made: Vec<String>,
    children: Vec<Child>,
    etc: Option<std::path::PathBuf>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Lab {
    /// Makes the namespaces, links, addresses and routes, with a fresh name prefix.
    pub fn up() -> Result<Lab> {
        use rand::Rng;
        let prefix = format!("pl{:06x}", rand::thread_rng().gen_range(0..0x100_0000));
        let mut lab = Lab { prefix, made: Vec::new(), children: Vec::new(), etc: None };
        lab.build()?;
        Ok(lab)
    }

    /// The namespace of a host.
    pub fn netns(&self, host: Host) -> String {
        format!("{}-{}", self.prefix, host.suffix())
    }

    fn build(&mut self) -> Result<()> {
        for host in [Host::Client, Host::Censor, Host::Foreign, Host::Domestic] {
            let ns = self.netns(host);
            ip(&["netns", "add", &ns])?;
            self.made.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let p = self.prefix.clone();
        let censor = self.netns(Host::Censor);
        let links = [
            (
                Host::Client,
                "c",
                "rc",
                vec!["10.0.1.2/24", "10.0.1.3/24"],
                vec!["10.0.1.1/24"],
                "10.0.1.1",
            ),
            (
                Host::Foreign,
                "f",
                "rf",
                vec!["10.0.2.2/24", "10.0.2.66/24", "10.0.4.2/24"],
                vec!["10.0.2.1/24", "10.0.4.1/24"],
                "10.0.2.1",
            ),
            (
                Host::Domestic,
                "d",
                "rd",
                vec!["10.0.3.2/24", "10.0.3.130/24"],
                vec!["10.0.3.1/24"],
                "10.0.3.1",
            ),
        ];
        for (host, end, router_end, addrs, router_addrs, gateway) in links {
            let ns = self.netns(host);
            let (a, b) = (format!("{p}{end}"), format!("{p}{router_end}"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ip(&["link", "set", &a, "netns", &ns])?;
            ip(&["link", "set", &b, "netns", &censor])?;
            for addr in addrs {
                ip(&["-n", &ns, "addr", "add", addr, "dev", &a])?;
            }
            for addr in router_addrs {
                ip(&["-n", &censor, "addr", "add", addr, "dev", &b])?;
            }
            ip(&["-n", &ns, "link", "set", &a, "up"])?;
            ip(&["-n", &censor, "link", "set", &b, "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", gateway])?;
            self.run_ok(host, &["ethtool", "-K", &a, "gro", "off", "gso", "off", "tso", "off"])?;
            self.run_ok(
                Host::Censor,
                &["ethtool", "-K", &b, "gro", "off", "gso", "off", "tso", "off"],
            )?;
        }
        // The client asks the national resolver (`ip netns exec` mounts this file over
        // /etc/resolv.conf inside the namespace).
        let etc = std::path::Path::new("/etc/netns").join(self.netns(Host::Client));
        std::fs::create_dir_all(&etc).context("create the client's resolver config")?;
        self.etc = Some(etc.clone());
        std::fs::write(etc.join("resolv.conf"), "nameserver 10.0.1.1\n")?;
        ip(&["-n", &censor, "addr", "add", "10.0.9.1/24", "dev", "lo"])?;
        // What the router itself sends toward the servers (the prober) comes from the
        // prober's range.
        for (net, dev) in [("10.0.2.0/24", "rf"), ("10.0.4.0/24", "rf"), ("10.0.3.0/24", "rd")] {
            let dev = format!("{p}{dev}");
            ip(&["-n", &censor, "route", "replace", net, "dev", &dev, "src", "10.0.9.1"])?;
        }
        self.run_ok(Host::Censor, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        Ok(())
    }

    /// A command to run inside a host's namespace.
    pub fn command(&self, host: Host, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns(host), program]);
        cmd
    }

    /// Runs a command in a host and requires success.
    pub fn run_ok(&self, host: Host, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().context("empty command")?;
        let out = self
            .command(host, program)
            .args(args)
            .output()
            .with_context(|| format!("run {program} in {:?}", host))?;
        if !out.status.success() {
            bail!("{}: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running program in a host; waits until it prints a first line on
    /// stdout (its readiness) and returns that line. The lab stops it when dropped.
    pub fn start(&mut self, host: Host, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().context("empty command")?;
        let mut child = self
            .command(host, program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {program} in {:?}", host))?;
        let stdout = child.stdout.take().context("child stdout")?;
        self.children.push(child);
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).context("read the ready line")?;
        if line.is_empty() {
            bail!("{} exited before it was ready", argv.join(" "));
        }
        // Keep reading, so the program never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Ok(line.trim().to_owned())
    }

    /// Writes a line to the stdin of the `nth` program started with [`start`](Self::start)
    /// (from 0, in the order they were started): `block CIDR` to the censor daemon, say.
    pub fn tell(&mut self, nth: usize, line: &str) -> Result<()> {
        use std::io::Write;
        let child = self.children.get_mut(nth).context("no such program")?;
        let stdin = child.stdin.as_mut().context("its stdin is closed")?;
        writeln!(stdin, "{line}").context("write to its stdin")?;
        stdin.flush().context("flush its stdin")
    }

    /// Stops the programs started with [`start`](Self::start), newest first: closes their
    /// stdin (the censor daemon writes its report then) and waits up to 5 s before killing.
    pub fn stop_all(&mut self) {
        while let Some(mut child) = self.children.pop() {
            drop(child.stdin.take());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_all();
        for ns in self.made.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
        if let Some(etc) = self.etc.take() {
            let _ = std::fs::remove_dir_all(etc);
        }
    }
}
