//! Helpers for tests that run real `shoal` processes on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The default model: `$SHOAL_TEST_MODEL`, or the cached (fetched if need be) one.
pub fn model() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_TEST_MODEL") {
        return PathBuf::from(p);
    }
    shoal_node::model_cache::default_model()
        .expect("the default model is needed for this test (fetched with pip)")
}

/// The binary under test.
pub fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

/// A `shoal serve` process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `shoal serve` on loopback and waits (at most 120 s) for its `listening` line.
pub fn serve(model: &std::path::Path, blocks: &str, bootstrap: Option<&str>) -> Server {
    let mut cmd = shoal();
    cmd.args([
        "serve",
        "--blocks",
        blocks,
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--model",
    ])
    .arg(model)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let mut child = cmd.spawn().expect("spawn shoal serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        // Drain the rest so the server never blocks on a full pipe.
        for _ in lines {}
    });
    let line = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            panic!("shoal serve {blocks} printed no listening line within 120 s");
        }
    };
    let addr = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(addr.contains("/p2p/"), "address {addr} lacks a peer id");
    Server { child, addr }
}

/// Runs a command to completion, killing it after `limit`; returns its output and the
/// time it took.
pub fn run(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command ran past its limit of {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    };
    (output, start.elapsed())
}

/// Resident memory of a process, in bytes, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}
