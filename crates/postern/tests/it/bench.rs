//! A smoke of `postern bench` (seconds, not minutes), so the load tool cannot rot. The
//! figures themselves are measured by hand with the release build (BENCHMARKS.md).

use std::process::Command;

use serde_json::Value;

use crate::bin;

/// Runs `postern --json bench ARGS` (it starts its own server) and returns its JSON.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(bin())
        .args(["--json", "bench", "--time-limit", "60"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "postern bench {args:?}: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn every_bench_mode_runs_and_counts_what_it_measured() {
    let closed = bench(&["throughput", "--pairs", "3", "--messages", "40"]);
    assert_eq!(closed["delivered"], 120, "{closed}");
    assert_eq!((closed["missing"].as_u64(), closed["duplicates"].as_u64()), (Some(0), Some(0)));
    assert_eq!(closed["appends_acknowledged"], 120);
    assert!(
        closed["latency_us"]["p99"].as_u64().unwrap()
            >= closed["latency_us"]["p50"].as_u64().unwrap()
    );
    // The server's CPU comes from /proc in 10 ms ticks: a run of 120 messages can take less
    // than one, so it is read over a longer run.
    let longer = bench(&["throughput", "--pairs", "3", "--messages", "2000"]);
    assert_eq!(longer["delivered"], 6000, "{longer}");
    assert!(
        longer["server_cpu_secs"].as_f64().unwrap() > 0.0,
        "the server's CPU is read: {longer}"
    );
    let paced = bench(&["throughput", "--pairs", "2", "--messages", "20", "--rate", "200"]);
    assert_eq!(paced["delivered"], 40, "{paced}");
    assert!(paced["elapsed_secs"].as_f64().unwrap() >= 0.19, "paced at 200/s: {paced}");
    let fanout = bench(&["fanout", "--members", "4", "--messages", "10"]);
    assert_eq!(fanout["delivered"], 30, "each of 3 receivers gets all 10: {fanout}");
    let idle = bench(&["idle", "--sessions", "20", "--settle", "0"]);
    assert_eq!(idle["sessions"], 20, "{idle}");
    assert!(idle["server_rss_after_kib"].as_u64().unwrap() > 0);
    let tls = bench(&["connect", "--count", "20"]);
    assert_eq!(tls["failed"], 0, "{tls}");
    assert_eq!(tls["key_exchange_group"], "X25519", "{tls}");
    let sessions = bench(&["connect", "--count", "10", "--what", "session"]);
    assert_eq!(sessions["failed"], 0, "{sessions}");
    assert!(sessions["client_setup_bytes_in"].as_u64().unwrap() > 500, "{sessions}");
    // Through a relay started for the run: what a door costs.
    let relayed = bench(&["--relay", "throughput", "--pairs", "2", "--messages", "20"]);
    assert_eq!(
        (relayed["door"].as_str(), relayed["delivered"].as_u64()),
        (Some("relay"), Some(40))
    );
    let relayed = bench(&["--relay", "connect", "--count", "5", "--what", "session"]);
    assert_eq!((relayed["door"].as_str(), relayed["failed"].as_u64()), (Some("relay"), Some(0)));
    // One at a time: resumed handshakes, each reading the website (and its tickets).
    let resumed =
        bench(&["connect", "--count", "10", "--concurrency", "1", "--what", "tls-get", "--resume"]);
    assert_eq!(
        (resumed["failed"].as_u64(), resumed["resumed"].as_u64()),
        (Some(0), Some(10)),
        "{resumed}"
    );
}

#[test]
fn bench_refuses_a_target_off_loopback() {
    let out = Command::new(bin())
        .args(["bench", "--link"])
        .arg("postern://server#v=1&a=192.0.2.1:443&p=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE&k=AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI&s=AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM")
        .args(["--server-pid", &std::process::id().to_string(), "connect", "--count", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("non-loopback"), "{out:?}");
}
