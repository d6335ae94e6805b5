//! `censord`: the [`Engine`] on NFQUEUE, run inside the censor namespace. It binds the
//! queue, then sends every forwarded packet to it with iptables (`-j NFQUEUE` without
//! `--queue-bypass`: if the daemon dies, traffic stops rather than flowing uncensored),
//! prints `ready`, and gives verdicts until its stdin closes; a line `block CIDR` on stdin
//! adds a range to the block list while it runs, and `profile NAME` runs another profile
//! from then on (its modules and block list; the link's loss and delay, and the resolver,
//! stay as the first profile set them). It writes its report (the
//! profile and every flow) to a JSON file every 100 ms while it changes, and at the end.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::dns::Zone;
use crate::engine::{AddrMap, Cidr, Engine, Flow, Verdict};

/// The national resolver's address, on the censor router.
pub const RESOLVER: &str = "10.0.1.1:53";
use crate::profile::Profile;

/// What the daemon saw.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// The profile's name.
    pub profile: &'a str,
    /// The link's loss and jitter seed, and packets it lost.
    pub link: Option<(u64, u64)>,
    /// Every flow, in order of appearance.
    pub flows: Vec<Flow>,
    /// What the prober found, in order.
    pub probes: &'a [crate::prober::Finding],
}

fn write_report(
    path: &Path,
    profile: &str,
    link: Option<(u64, u64)>,
    engine: &Engine,
) -> Result<()> {
    let report = Report { profile, link, flows: engine.flows(), probes: engine.findings() };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&report)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn iptables(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("iptables").args(args).output().context("run iptables")?;
    if !out.status.success() {
        bail!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs the censor until stdin closes.
pub fn run(profile: Profile, report: &Path, queue_num: u16) -> Result<()> {
    let mut name = profile.name.clone();
    let dns = profile.dns.clone().unwrap_or_default();
    let link = profile.link.clone();
    let mut rng = {
        use rand::SeedableRng;
        rand::rngs::StdRng::seed_from_u64(link.as_ref().map_or(0, |l| l.seed))
    };
    let mut lost = 0u64;
    let mut held: std::collections::VecDeque<(u64, nfq::Message)> =
        std::collections::VecDeque::new();
    let mut engine = Engine::new(profile, AddrMap::lab(), Zone::lab())?;
    let resolver = std::net::UdpSocket::bind(RESOLVER).context("bind the national resolver")?;
    std::thread::spawn(move || crate::dns::serve(resolver, Zone::lab(), dns.remove));
    if dns.redirect {
        for proto in ["udp", "tcp"] {
            iptables(&[
                "-t",
                "nat",
                "-I",
                "PREROUTING",
                "-p",
                proto,
                "--dport",
                "53",
                "-j",
                "DNAT",
                "--to-destination",
                RESOLVER,
            ])?;
        }
    }
    let mut queue = nfq::Queue::open().context("open NFQUEUE (root, nfnetlink_queue)")?;
    queue.bind(queue_num).context("bind the queue")?;
    queue.set_copy_range(queue_num, 0xffff)?;
    queue.set_fail_open(queue_num, false)?;
    queue.set_nonblocking(true);
    let num = queue_num.to_string();
    iptables(&["-I", "FORWARD", "-j", "NFQUEUE", "--queue-num", &num])?;
    let link_report = |lost| link.as_ref().map(|l| (l.seed, lost));
    write_report(report, &name, link_report(lost), &engine)?;
    // Commands on stdin, one a line: `block CIDR` adds a range to the block list (a door
    // killed mid-run); `profile NAME` switches profiles (the device on another network).
    // End of input stops the censor.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (commands, commanded) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if commands.send(line).is_err() {
                break;
            }
        }
        flag.store(true, Ordering::SeqCst);
    });
    writeln!(std::io::stdout(), "ready")?;
    std::io::stdout().flush()?;
    let mut dirty = false;
    let mut written = Instant::now();
    let started = Instant::now();
    let (found, findings) = std::sync::mpsc::channel();
    while !stop.load(Ordering::SeqCst) {
        match queue.recv() {
            Ok(mut msg) => {
                let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let mut verdict = match engine.packet(msg.get_payload(), now) {
                    Verdict::Accept => nfq::Verdict::Accept,
                    Verdict::Drop => nfq::Verdict::Drop,
                };
                let mut due = now;
                if let (Some(l), nfq::Verdict::Accept) = (&link, verdict) {
                    use rand::Rng;
                    if rng.r#gen::<f64>() < l.loss {
                        verdict = nfq::Verdict::Drop;
                        lost += 1;
                    }
                    due = now + l.delay_ms + rng.gen_range(0..=l.jitter_ms);
                }
                msg.set_verdict(verdict);
                if due > now && verdict == nfq::Verdict::Accept {
                    held.push_back((due, msg));
                } else {
                    queue.verdict(msg)?;
                }
                dirty = true;
                for request in engine.take_probe_requests() {
                    let found = found.clone();
                    std::thread::spawn(move || {
                        let _ = found.send(crate::prober::probe(&request, &Zone::lab()));
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("receive from the queue"),
        }
        // Held packets whose delay has passed go out (in the order they are due).
        let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        held.make_contiguous().sort_by_key(|(due, _)| *due);
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, msg)) = held.pop_front() {
                queue.verdict(msg)?;
            }
        }
        while let Ok(command) = commanded.try_recv() {
            match command.split_once(' ') {
                Some(("block", range)) => engine.block(Cidr::parse(range.trim())?),
                Some(("profile", next)) => {
                    let profile = Profile::load(next.trim())?;
                    name.clone_from(&profile.name);
                    engine.set_profile(profile)?;
                }
                _ => anyhow::bail!("unknown command on stdin: {command:?}"),
            }
        }
        while let Ok(finding) = findings.try_recv() {
            let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            engine.probed(finding, now);
            dirty = true;
        }
        if dirty && written.elapsed() > Duration::from_millis(100) {
            write_report(report, &name, link_report(lost), &engine)?;
            dirty = false;
            written = Instant::now();
        }
    }
    write_report(report, &name, link_report(lost), &engine)
}
