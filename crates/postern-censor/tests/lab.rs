//! The lab proves it censors: for each module, its control is blocked under a profile that
//! runs the module, and passes under `open`. Real namespaces, the real daemon on NFQUEUE
//! and real clients and servers; needs root, iproute2, iptables and ethtool (`.ci/run`
//! installs them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stderr)]

use postern_censor::topology::{Host, Lab, addr};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_postern-lab");

/// Whether Debian's `browser` is installed (`.ci/run` installs chromium and firefox-esr).
fn installed(browser: &str) -> bool {
    let found =
        std::process::Command::new("which").arg(browser).output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("{browser} is not installed: skipped");
    }
    found
}

fn root() -> bool {
    let root = postern_censor::topology::can_run();
    if !root {
        eprintln!("the censor lab needs root: skipped");
    }
    root
}

/// A lab with the censor running `profile` and every control server up.
struct Run {
    lab: Lab,
    report: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn lab(profile: &str) -> Run {
    lab_in(profile, tempfile::tempdir().unwrap())
}

fn lab_in(profile: &str, dir: tempfile::TempDir) -> Run {
    let report = dir.path().join("report.json");
    let mut lab = Lab::up().unwrap();
    let r = report.display().to_string();
    assert_eq!(
        lab.start(Host::Censor, &[BIN, "censord", "--profile", profile, "--report", &r]).unwrap(),
        "ready"
    );
    let names =
        "fine.example,messenger.example,blocked.example,cdn.example,shop.example,bank.example";
    for (host, ip) in [
        (Host::Foreign, addr::FOREIGN),
        (Host::Foreign, addr::FOREIGN_BLOCKED),
        (Host::Foreign, addr::CDN),
        (Host::Domestic, addr::DOMESTIC),
        (Host::Domestic, addr::WHITELISTED),
    ] {
        let a = format!("{ip}:443");
        let page = ["--page-bytes", "100000"];
        lab.start(host, &[&[BIN, "tls-serve", "--addr", &a, "--names", names][..], &page].concat())
            .unwrap();
    }
    for (host, ip) in [(Host::Foreign, addr::FOREIGN), (Host::Domestic, addr::WHITELISTED)] {
        let udp = format!("{ip}:51820");
        lab.start(host, &[BIN, "udp-echo", "--addr", &udp]).unwrap();
    }
    let tcp = format!("{}:8443", addr::FOREIGN);
    lab.start(Host::Foreign, &[BIN, "tcp-echo", "--addr", &tcp]).unwrap();
    let resolver = format!("{}:53", addr::FOREIGN);
    lab.start(Host::Foreign, &[BIN, "dns-serve", "--addr", &resolver]).unwrap();
    Run { lab, report, _dir: dir }
}

impl Run {
    /// The prober's finding on `server`, waiting for it up to 15 s.
    fn finding(&self, server: &str) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let report: Value =
                serde_json::from_slice(&std::fs::read(&self.report).unwrap_or_default())
                    .unwrap_or_default();
            if let Some(found) =
                report["probes"].as_array().and_then(|p| p.iter().find(|f| f["server"] == server))
            {
                return found.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no probe of {server}: {report}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Runs a control in the client namespace; returns its JSON outcome.
    fn client(&self, args: &[&str]) -> Value {
        let out = self.lab.command(Host::Client, BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn tls(&self, ip: &str, sni: &str, bytes: u64) -> Value {
        let a = format!("{ip}:443");
        self.client(&[
            "tls-get",
            "--addr",
            &a,
            "--sni",
            sni,
            "--bytes",
            &bytes.to_string(),
            "--split",
            "40",
            "--timeout",
            "2",
        ])
    }

    /// Stops the censor and returns why each flow (by server address) was cut.
    fn verdicts(mut self) -> Vec<(String, Value)> {
        self.lab.stop_all();
        let report: Value = serde_json::from_slice(&std::fs::read(&self.report).unwrap()).unwrap();
        report["flows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["server"].as_str().unwrap().to_owned(), f["blocked"].clone()))
            .collect()
    }
}

fn blocked_by(verdicts: &[(String, Value)], server: &str) -> Value {
    verdicts.iter().find(|(s, _)| s == server).map(|(_, b)| b.clone()).unwrap_or(Value::Null)
}

#[test]
fn sni_filter_reads_a_split_client_hello_and_open_passes_it() {
    if !root() {
        return;
    }
    let run = lab("ru-2023");
    let cut = run.tls(addr::FOREIGN, "messenger.example", 1000);
    assert_eq!(
        (cut["connected"].as_bool(), cut["handshake"].as_bool()),
        (Some(true), Some(false)),
        "{cut}"
    );
    assert_eq!(run.tls(addr::FOREIGN, "fine.example", 1000)["complete"], true);
    let verdicts = run.verdicts();
    assert_eq!(verdicts.iter().filter(|(_, b)| *b == "sni").count(), 1, "{verdicts:?}");
    let open = lab("open");
    assert_eq!(open.tls(addr::FOREIGN, "messenger.example", 1000)["complete"], true);
}

#[test]
fn ip_block_and_whitelist_mode_cut_by_address() {
    if !root() {
        return;
    }
    let run = lab("ru-2023");
    assert_eq!(run.tls(addr::FOREIGN_BLOCKED, "fine.example", 100)["connected"], false);
    assert_eq!(run.tls(addr::FOREIGN, "fine.example", 100)["complete"], true);
    assert_eq!(blocked_by(&run.verdicts(), &format!("{}:443", addr::FOREIGN_BLOCKED)), "ip-block");
    let white = lab("ru-whitelist");
    assert_eq!(white.tls(addr::FOREIGN, "fine.example", 100)["connected"], false);
    assert_eq!(white.tls(addr::DOMESTIC, "fine.example", 100)["connected"], false);
    assert_eq!(white.tls(addr::WHITELISTED, "fine.example", 100)["complete"], true);
    let open = lab("open");
    assert_eq!(open.tls(addr::FOREIGN_BLOCKED, "fine.example", 100)["complete"], true);
    assert_eq!(open.tls(addr::DOMESTIC, "fine.example", 100)["complete"], true);
}

#[test]
fn vpn_signatures_and_fully_encrypted_first_packets_are_cut() {
    if !root() {
        return;
    }
    let udp = format!("{}:51820", addr::FOREIGN);
    let tcp = format!("{}:8443", addr::FOREIGN);
    let run = lab("ru-2024");
    assert_eq!(
        run.client(&["udp-send", "--addr", &udp, "--payload", "wireguard"])["complete"],
        false
    );
    assert_eq!(run.client(&["udp-send", "--addr", &udp, "--payload", "random"])["complete"], true);
    assert_eq!(run.client(&["tcp-send", "--addr", &tcp, "--payload", "random"])["complete"], false);
    assert_eq!(run.client(&["tcp-send", "--addr", &tcp, "--payload", "http"])["complete"], true);
    let verdicts = run.verdicts();
    assert_eq!(blocked_by(&verdicts, &udp), "vpn-signature", "{verdicts:?}");
    assert!(verdicts.iter().any(|(s, b)| *s == tcp && *b == "fully-encrypted"), "{verdicts:?}");
    let open = lab("open");
    assert_eq!(
        open.client(&["udp-send", "--addr", &udp, "--payload", "wireguard"])["complete"],
        true
    );
    assert_eq!(open.client(&["tcp-send", "--addr", &tcp, "--payload", "random"])["complete"], true);
}

#[test]
fn the_freeze_stops_long_foreign_flows_but_not_domestic_ones() {
    if !root() {
        return;
    }
    let run = lab("ru-2025-06");
    let frozen = run.tls(addr::FOREIGN, "fine.example", 200_000);
    assert_eq!(frozen["handshake"], true);
    assert_eq!(frozen["complete"], false);
    let got = frozen["received"].as_u64().unwrap();
    assert!(got < 24 * 1024, "the freeze came after {got} bytes");
    assert_eq!(run.tls(addr::WHITELISTED, "fine.example", 200_000)["complete"], true);
    assert_eq!(blocked_by(&run.verdicts(), &format!("{}:443", addr::FOREIGN)), "freeze");
    let open = lab("open");
    assert_eq!(open.tls(addr::FOREIGN, "fine.example", 200_000)["complete"], true);
}

#[test]
fn a_failing_test_leaves_no_namespace_behind() {
    if !root() {
        return;
    }
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let run = lab("ru-2023");
        names.push(run.lab.netns(Host::Censor));
        panic!("a test failing with the lab up");
    }));
    assert!(result.is_err());
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!names.is_empty() && names.iter().all(|n| !list.contains(n.as_str())), "{list}");
}

#[test]
fn udp_is_cut_by_quic_vpn_and_encrypted_datagram_rules() {
    if !root() {
        return;
    }
    let foreign = format!("{}:51820", addr::FOREIGN);
    let white = format!("{}:51820", addr::WHITELISTED);
    let tcp = format!("{}:8443", addr::FOREIGN);
    let send = |run: &Run, a: &str, p: &str| {
        run.client(&["udp-send", "--addr", a, "--payload", p])["complete"].clone()
    };
    let run = lab("ru-2026-06");
    assert_eq!(send(&run, &foreign, "quic"), false);
    assert_eq!(send(&run, &white, "quic"), true);
    assert_eq!(send(&run, &foreign, "openvpn"), false);
    assert_eq!(
        run.client(&["tcp-send", "--addr", &tcp, "--payload", "openvpn"])["complete"],
        false
    );
    assert_eq!(send(&run, &white, "random"), true);
    let verdicts = run.verdicts();
    let reasons: Vec<&Value> = verdicts.iter().map(|(_, b)| b).collect();
    for reason in ["quic", "vpn-signature"] {
        assert!(reasons.iter().any(|r| *r == reason), "{reason}: {verdicts:?}");
    }
    // Random datagrams: cut toward foreign hosting only where the profile drops encrypted UDP.
    let random = lab("ru-2026-06");
    assert_eq!(send(&random, &foreign, "random"), false);
    assert_eq!(blocked_by(&random.verdicts(), &foreign), "encrypted-udp");
    let open = lab("open");
    for p in ["quic", "openvpn", "random"] {
        assert_eq!(send(&open, &foreign, p), true, "{p}");
    }
    assert_eq!(
        open.client(&["tcp-send", "--addr", &tcp, "--payload", "openvpn"])["complete"],
        true
    );
}

#[test]
fn a_default_rustls_client_hello_is_cut_toward_suspicious_networks() {
    if !root() {
        return;
    }
    let run = lab("ru-2026-06");
    let cut = run.tls(addr::FOREIGN, "fine.example", 100);
    assert_eq!(
        (cut["connected"].as_bool(), cut["handshake"].as_bool()),
        (Some(true), Some(false)),
        "{cut}"
    );
    assert_eq!(run.tls(addr::WHITELISTED, "fine.example", 100)["complete"], true);
    // The next connection to the same server and port meets the residual block.
    assert_eq!(run.tls(addr::FOREIGN, "fine.example", 100)["connected"], false);
    let verdicts = run.verdicts();
    let foreign = format!("{}:443", addr::FOREIGN);
    let reasons: Vec<&Value> =
        verdicts.iter().filter(|(s, _)| *s == foreign).map(|(_, b)| b).collect();
    assert_eq!(reasons, [&Value::from("fingerprint"), &Value::from("residual")], "{verdicts:?}");
    let open = lab("open");
    assert_eq!(open.tls(addr::FOREIGN, "fine.example", 100)["complete"], true);
}

#[test]
fn the_national_resolver_removes_names_and_catches_queries_abroad() {
    if !root() {
        return;
    }
    let abroad = format!("{}:53", addr::FOREIGN);
    let national = postern_censor::daemon::RESOLVER;
    let ask = |run: &Run, server: &str, name: &str| {
        run.client(&["dns-query", "--server", server, "--name", name])["answer"].clone()
    };
    let run = lab("ru-2024");
    assert_eq!(ask(&run, national, "messenger.example"), Value::Null);
    assert_eq!(ask(&run, &abroad, "messenger.example"), Value::Null, "redirected");
    assert_eq!(ask(&run, &abroad, "fine.example"), addr::FOREIGN);
    let open = lab("open");
    assert_eq!(ask(&open, national, "messenger.example"), addr::FOREIGN_BLOCKED);
    assert_eq!(ask(&open, &abroad, "messenger.example"), addr::FOREIGN_BLOCKED);
}

#[test]
fn a_server_name_borrowed_from_another_address_is_cut() {
    if !root() {
        return;
    }
    // bank.example is a whitelisted domestic site; a foreign server claiming its name (a
    // REALITY-style proxy) does not match the national DNS answer.
    // It offers ALPN, so its JA4 is not the listed default rustls one.
    let get = |run: &Run, sni: &str| {
        let a = format!("{}:443", addr::CDN);
        run.client(&["tls-get", "--addr", &a, "--sni", sni, "--alpn", "h2", "--timeout", "2"])
    };
    let run = lab("ru-2026-06");
    assert_eq!(get(&run, "cdn.example")["complete"], true);
    assert_eq!(get(&run, "bank.example")["handshake"], false);
    let verdicts = run.verdicts();
    assert!(verdicts.iter().any(|(_, b)| *b == "sni-mismatch"), "{verdicts:?}");
    let open = lab("open");
    assert_eq!(get(&open, "bank.example")["complete"], true);
}

#[test]
fn the_prober_blocks_a_naive_proxy_and_passes_a_website() {
    if !root() {
        return;
    }
    let proxy = format!("{}:8443", addr::CDN);
    let site = format!("{}:443", addr::FOREIGN);
    let get = |run: &Run, a: &str, sni: &str| {
        run.client(&["tls-get", "--addr", a, "--sni", sni, "--alpn", "h2", "--timeout", "2"])
    };
    let mut run = lab("ru-2026-06");
    run.lab
        .start(
            Host::Foreign,
            &[BIN, "tls-serve", "--addr", &proxy, "--names", "cdn.example", "--proxy"],
        )
        .unwrap();
    assert_eq!(
        get(&run, &proxy, "cdn.example")["complete"],
        true,
        "its own client gets through once"
    );
    let found = run.finding(&proxy);
    assert_eq!(
        (found["website"].as_bool(), found["certificate_matches"].as_bool()),
        (Some(false), Some(false)),
        "{found}"
    );
    assert_eq!(get(&run, &proxy, "cdn.example")["connected"], false, "then its address is blocked");
    assert_eq!(get(&run, &site, "fine.example")["complete"], true);
    let found = run.finding(&site);
    assert_eq!(found["website"], true, "{found}");
    assert_eq!(found["http_status"], 200);
    assert_eq!(get(&run, &site, "fine.example")["complete"], true);
    assert!(run.verdicts().iter().any(|(s, b)| *s == proxy && *b == "probe"));
    let mut open = lab("open");
    open.lab
        .start(
            Host::Foreign,
            &[BIN, "tls-serve", "--addr", &proxy, "--names", "cdn.example", "--proxy"],
        )
        .unwrap();
    for _ in 0..2 {
        assert_eq!(get(&open, &proxy, "cdn.example")["complete"], true);
    }
}

/// One browser at a time: on two cores, several Chromiums starting at once beside the other
/// lab tests can take longer than any sensible timeout.
static BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loads `url` in headless Chromium, waiting up to `secs`.
fn browse_for(run: &Run, url: &str, secs: u32) -> Value {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    run.client(&["browse", "--browser", "chromium", "--url", url, "--timeout", &secs.to_string()])
}

/// A page that should load: a generous timeout.
fn browse(run: &Run, url: &str) -> Value {
    browse_for(run, url, 40)
}

#[test]
fn chromium_reaches_a_whitelisted_domestic_site_under_every_profile() {
    if !root() || !installed("chromium") {
        return;
    }
    for profile in postern_censor::profile::Profile::built_in() {
        let run = lab(profile);
        let page = browse(&run, "https://bank.example/");
        assert_eq!(page["complete"], true, "{profile}: {page}");
    }
}

#[test]
fn chromium_is_frozen_abroad_under_ru_2025_06() {
    if !root() || !installed("chromium") {
        return;
    }
    let run = lab("ru-2025-06");
    assert_eq!(browse_for(&run, "https://fine.example/", 10)["complete"], false);
    // Chromium may open more than one connection; the one that carried the page froze.
    let verdicts = run.verdicts();
    let site = format!("{}:443", addr::FOREIGN);
    assert!(verdicts.iter().any(|(s, b)| *s == site && *b == "freeze"), "{verdicts:?}");
    let open = lab("open");
    assert_eq!(browse(&open, "https://fine.example/")["complete"], true);
}

#[test]
fn browser_fingerprints_are_captured_in_the_lab() {
    if !root() || !installed("chromium") || !installed("firefox-esr") {
        return;
    }
    let rustls = postern_censor::profile::Profile::load("ru-2026-06")
        .unwrap()
        .fingerprint
        .unwrap()
        .ja4_block;
    for browser in ["chromium", "firefox-esr"] {
        let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
        let out =
            std::process::Command::new(BIN).args(["ja4", "--browser", browser]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let found: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ja4 = found["ja4"].as_str().unwrap();
        eprintln!("{browser}: {ja4}");
        assert!(ja4.starts_with("t13d") && ja4.contains("h2_"), "{browser}: {ja4}");
        assert!(!rustls.iter().any(|b| b == ja4), "{browser} is on the block list");
    }
}

#[test]
fn a_tls_handshake_inside_tls_is_cut_and_plain_tls_is_not() {
    if !root() {
        return;
    }
    // Only M7b, so the prober does not find the proxy first.
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("nested.toml");
    std::fs::write(
        &profile,
        "name = \"nested\"\n[tls_in_tls]\nlabels = [\"foreign-hosting\", \"cdn\"]\n",
    )
    .unwrap();
    let proxy = format!("{}:8443", addr::CDN);
    let target = format!("{}:443", addr::FOREIGN);
    let start = |run: &mut Run| {
        let argv =
            [BIN, "tls-serve", "--addr", &proxy, "--names", "cdn.example", "--forward", &target];
        run.lab.start(Host::Foreign, &argv).unwrap();
    };
    let nested = |run: &Run| {
        let argv = [
            "tls-in-tls",
            "--addr",
            &proxy,
            "--outer-sni",
            "cdn.example",
            "--inner-sni",
            "fine.example",
        ];
        run.client(&argv)["complete"].clone()
    };
    let mut run = lab_in(&profile.display().to_string(), dir);
    start(&mut run);
    assert_eq!(nested(&run), false);
    assert_eq!(
        run.tls(addr::FOREIGN, "fine.example", 50_000)["complete"],
        true,
        "plain TLS passes"
    );
    if installed("chromium") {
        assert_eq!(
            browse(&run, "https://fine.example/")["complete"],
            true,
            "and so does a browser"
        );
    }
    assert_eq!(blocked_by(&run.verdicts(), &proxy), "tls-in-tls");
    let mut open = lab("open");
    start(&mut open);
    assert_eq!(nested(&open), true);
}

#[test]
fn the_link_delays_and_loses_packets_as_configured() {
    if !root() {
        return;
    }
    let profile = |text: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link.toml");
        std::fs::write(&path, text).unwrap();
        lab_in(&path.display().to_string(), dir)
    };
    // Every packet held 100 ms: connecting, the handshake and the request take three round
    // trips, so at least 600 ms.
    let slow = profile("name = \"slow\"\n[link]\ndelay_ms = 100\njitter_ms = 10\nseed = 7\n");
    let got = slow.tls(addr::WHITELISTED, "fine.example", 10_000);
    assert_eq!(got["complete"], true, "{got}");
    assert!(got["elapsed_ms"].as_u64().unwrap() >= 600, "{got}");
    let lossy = profile("name = \"lossy\"\n[link]\nloss = 1.0\nseed = 7\n");
    assert_eq!(lossy.tls(addr::WHITELISTED, "fine.example", 100)["connected"], false);
}

#[test]
fn an_obfs4_bridge_is_cut_by_the_fully_encrypted_rule() {
    if !root() || !installed("obfs4proxy") {
        return;
    }
    let bridge = format!("{}:9443", addr::FOREIGN);
    let send = |profile: &str| {
        let mut run = lab(profile);
        let orport = format!("{}:8443", addr::FOREIGN);
        let cert = run
            .lab
            .start(Host::Foreign, &[BIN, "obfs4-serve", "--addr", &bridge, "--orport", &orport])
            .unwrap();
        let cert = cert.strip_prefix("cert=").unwrap().to_owned();
        let got = run.client(&["obfs4-send", "--bridge", &bridge, "--cert", &cert]);
        (got, run.verdicts())
    };
    // obfs4's first packet is random: its first six bytes are printable about one time in
    // 385, and the rule's exemption then lets it through, as the real censor's would (seen
    // once in CI). A fresh handshake is fresh randomness: three in a row pass one time in
    // about 57 million.
    let (cut, verdicts) = (0..3)
        .map(|_| send("ru-2024"))
        .find(|(got, _)| got["complete"] == false)
        .expect("three obfs4 handshakes in a row got through the fully-encrypted rule");
    assert_eq!(cut["complete"], false, "{cut}");
    assert_eq!(blocked_by(&verdicts, &bridge), "fully-encrypted", "{verdicts:?}");
    let (open, _) = send("open");
    assert_eq!(open["complete"], true, "{open}");
}
