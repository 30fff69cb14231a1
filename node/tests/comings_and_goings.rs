//! Peers that come back and peers that leave (issue 16): a client run again under the
//! same identity waits for nothing, and a client that vanishes leaves nothing behind on
//! the servers. The servers' memory over a thousand clients is measured by
//! `bench/soak.sh`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The tests of this file time whole runs: one at a time, so they do not slow each
/// other down on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// KV-cache tokens each server offers: `shoal status` shows them all free when no
/// session is open.
const CACHE: &str = "4096";

const PROMPT: &str = "The capital of France is";

/// A story long enough to be killed in the middle of.
const LONG_PROMPT: &str = "Write a long story about a dragon who loves the sea.";

/// Two servers of the default model, blocks 0..15 and 15..30.
fn swarm() -> (Server, Server) {
    let m = model();
    let a = serve_with(
        &m,
        &["--blocks", "0..15", "--max-cache-tokens", CACHE],
        None,
    );
    let b = serve_with(
        &m,
        &["--blocks", "15..30", "--max-cache-tokens", CACHE],
        Some(&a.addr),
    );
    (a, b)
}

/// A new client identity (`shoal keygen --identity`) in `dir`.
fn identity(dir: &std::path::Path) -> String {
    let path = dir.join("client.key");
    let mut cmd = shoal();
    cmd.args(["keygen", "--identity", "--out"]).arg(&path);
    let (out, _) = run(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "keygen failed");
    path.to_str().expect("utf-8 path").to_string()
}

/// One `shoal generate --json` through `bootstrap` with `extra` arguments: its JSON, its
/// wall time and its log.
fn timed_generation(bootstrap: &str, extra: &[&str]) -> (Value, Duration, String) {
    let mut cmd = shoal();
    cmd.arg("generate")
        .arg("--model")
        .arg(model())
        .args(["--bootstrap", bootstrap, "--prompt", PROMPT])
        .args(["--max-tokens", "16", "--json"])
        .args(extra)
        .env("RUST_LOG", "warn");
    let (out, took) = run(cmd, Duration::from_secs(180));
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "generate failed:\n{log}");
    let json = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    (json, took, log)
}

/// A long generation through `bootstrap`, once it has streamed some text: the client
/// has sessions open on every server of its route.
fn generation_under_way(bootstrap: &str, extra: &[&str]) -> Child {
    let mut child = shoal()
        .arg("generate")
        .arg("--model")
        .arg(model())
        .args(["--bootstrap", bootstrap, "--chat", "--prompt", LONG_PROMPT])
        .args(["--max-tokens", "1000"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn generate");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        // The first line of the story: tokens are flowing.
        let _ = tx.send(lines.next().is_some());
        for _ in lines {}
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(120)),
        Ok(true),
        "the long generation printed nothing"
    );
    child
}

/// (free cache tokens, open sessions) of each server, by first block.
fn cache_use(bootstrap: &str) -> Vec<(u64, u64)> {
    let s = status(bootstrap);
    let mut servers: Vec<&Value> = s["servers"].as_array().expect("servers").iter().collect();
    servers.sort_by_key(|v| v["span"]["start"].as_u64());
    servers
        .iter()
        .map(|v| {
            (
                v["free_cache_tokens"].as_u64().expect("free cache"),
                v["sessions"].as_u64().expect("sessions"),
            )
        })
        .collect()
}

/// The same identity, ten runs in a row: none waits on what the servers kept of the
/// run before (each run after the first took 61 s before: the servers wrote its output
/// to the previous process's connection). Then a run killed mid-generation, which says
/// no goodbye, and at once another with the same identity: the servers take it for the
/// new process it is and drop the old one's connection and sessions on the spot.
#[test]
fn a_client_run_again_under_its_identity_waits_for_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (a, b) = swarm();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = identity(dir.path());
    let runs: Vec<(Value, Duration, String)> = (0..10)
        .map(|_| timed_generation(&a.addr, &["--identity", &key]))
        .collect();
    let first = &runs[0];
    let times: Vec<String> = runs
        .iter()
        .map(|r| format!("{:.2}", r.1.as_secs_f64()))
        .collect();
    eprintln!("wall times (s): {}", times.join(" "));
    for (i, (json, took, log)) in runs.iter().enumerate().skip(1) {
        assert_eq!(
            json["text"], first.0["text"],
            "run {i} wrote other text than the first"
        );
        assert!(
            *took <= first.1 * 2,
            "run {i} took {took:?}, the first {:?}; its log:\n{log}",
            first.1
        );
    }

    let mut killed = generation_under_way(&a.addr, &["--identity", &key]);
    killed.kill().expect("kill");
    let _ = killed.wait();
    let (json, took, log) = timed_generation(&a.addr, &["--identity", &key]);
    eprintln!("right after the kill: {:.2} s", took.as_secs_f64());
    assert_eq!(json["text"], first.0["text"], "other text after the kill");
    assert!(
        took <= first.1 * 2,
        "the run right after a killed one took {took:?}, the first {:?}; its log:\n{log}",
        first.1
    );
    for s in [&a, &b] {
        assert!(
            s.log_text().contains("came back as a new process"),
            "server {} did not take the run after the kill for a new process; its log:\n{}",
            s.peer,
            s.log_text()
        );
    }
}

/// A client killed mid-generation (SIGKILL: no goodbye, its QUIC connections just go
/// quiet) has its sessions freed on every server within 30 s, and the next client gets
/// the same answer as before, in the usual time.
#[test]
fn a_killed_client_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (a, _b) = swarm();
    let total: u64 = CACHE.parse().expect("number");
    let (before, usual, _) = timed_generation(&a.addr, &[]);
    assert_eq!(cache_use(&a.addr), vec![(total, 0), (total, 0)]);

    let mut client = generation_under_way(&a.addr, &[]);
    let during = cache_use(&a.addr);
    assert!(
        during.len() == 2
            && during
                .iter()
                .all(|(free, open)| *free < total && *open == 1),
        "the generation holds no session on some server: {during:?}"
    );
    client.kill().expect("kill");
    let killed_at = Instant::now();
    let _ = client.wait();
    let freed = wait_until(
        "the killed client's sessions freed",
        Duration::from_secs(30),
        || match cache_use(&a.addr) {
            now if now == vec![(total, 0), (total, 0)] => Ok(killed_at.elapsed()),
            now => Err(format!(
                "the servers hold (free, sessions) {now:?}; logs:\n{}",
                a.log_text()
            )),
        },
    );
    eprintln!("sessions freed {:.1} s after the kill", freed.as_secs_f64());

    let (after, took, log) = timed_generation(&a.addr, &[]);
    assert_eq!(after["text"], before["text"], "other text after the kill");
    assert!(
        took <= usual * 2,
        "the next client took {took:?}, one before the kill {usual:?}; its log:\n{log}"
    );
}
