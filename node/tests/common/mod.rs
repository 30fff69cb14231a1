//! Helpers for tests that run real `shoal` processes on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub(crate) mod gateway;
pub(crate) mod netns;

/// How often [`wait_until`] looks again.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Polls `probe` until it returns `Ok`, and returns that value; past `limit`, panics with
/// `what` was awaited and what `probe` last saw (its `Err`). For what comes true by
/// itself (announcements spreading, sessions freed, a log line): a test waits as long as
/// that takes and no longer, never a fixed "let it spread" sleep.
pub(crate) fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; last seen: {seen}"
            ),
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// Waits until `shoal status` through `boot` lists `n` servers (their announcements have
/// spread); returns what it listed.
pub(crate) fn wait_for_servers(boot: &str, n: usize) -> serde_json::Value {
    wait_until(
        &format!("{n} servers listed"),
        Duration::from_secs(30),
        || {
            let st = status(boot);
            match st["servers"].as_array() {
                Some(s) if s.len() == n => Ok(st),
                _ => Err(st.to_string()),
            }
        },
    )
}

/// The default model: `$SHOAL_TEST_MODEL`, or the cached (fetched if need be) one.
pub(crate) fn model() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_TEST_MODEL") {
        return PathBuf::from(p);
    }
    shoal_node::model_cache::default_model()
        .expect("the default model is needed for this test (fetched with pip)")
}

/// The binary under test, with LAN discovery off: concurrent tests' swarms must not
/// find each other (node/tests/lan.rs turns it on in its own namespaces).
pub(crate) fn shoal() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
    cmd.env("SHOAL_NO_MDNS", "true");
    cmd
}

/// A `shoal serve` process, killed when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    /// Its `listening` address.
    pub(crate) addr: String,
    /// Its peer id.
    pub(crate) peer: String,
    /// Where its stderr (logs) goes.
    pub(crate) log: PathBuf,
    /// Its metrics URL, when started with `--metrics`.
    pub(crate) metrics: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // SHOAL_KEEP_TEST_LOGS=1 keeps the servers' logs in the temp dir, to debug a
        // failure that shows only now and then.
        if std::env::var_os("SHOAL_KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

impl Server {
    /// Its log so far.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `shoal serve --blocks` on loopback and waits for its `listening` line.
pub(crate) fn serve(model: &std::path::Path, blocks: &str, bootstrap: Option<&str>) -> Server {
    serve_with(model, &["--blocks", blocks], bootstrap)
}

/// The first line `child` prints on stdout (at most 120 s); the rest is drained so it
/// never blocks on a full pipe. Kills it and shows its log if the line does not come.
pub(crate) fn first_line(child: &mut Child, log: &std::path::Path, what: &str) -> String {
    first_lines(child, log, what, 1).remove(0)
}

/// The first `n` lines `child` prints on stdout (at most 120 s), as [`first_line`].
pub(crate) fn first_lines(
    child: &mut Child,
    log: &std::path::Path,
    what: &str,
    n: usize,
) -> Vec<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first: Vec<String> = lines.by_ref().take(n).map_while(Result::ok).collect();
        let _ = tx.send(first);
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(l) if l.len() == n => l,
        got => {
            let _ = child.kill();
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what} printed {got:?}, not {n} lines, within 120 s; log:\n{log_text}");
        }
    }
}

/// Starts `shoal serve` with extra arguments on loopback (QUIC, unless `extra` has a
/// `--listen`) and waits (at most 120 s) for its `listening` line.
pub(crate) fn serve_with(
    model: &std::path::Path,
    extra: &[&str],
    bootstrap: Option<&str>,
) -> Server {
    start_serve(Some(model), extra, bootstrap)
}

/// `shoal serve` with no --model through `bootstrap` (it serves the swarm's model,
/// fetching its span into `--cache-dir`, which `extra` should give), as [`serve_with`].
pub(crate) fn serve_fileless(extra: &[&str], bootstrap: &str) -> Server {
    start_serve(None, extra, Some(bootstrap))
}

fn start_serve(model: Option<&std::path::Path>, extra: &[&str], bootstrap: Option<&str>) -> Server {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::env::temp_dir().join(format!("shoal-test-{}-{n}.log", std::process::id()));
    let mut cmd = shoal();
    // Tests' swarms must not find each other on the LAN.
    cmd.args(["serve", "--no-mdns"]);
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"]);
    }
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    cmd.args(extra)
        .env(
            "RUST_LOG",
            std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"));
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let mut child = cmd.spawn().expect("spawn shoal serve");
    let with_metrics = extra.contains(&"--metrics");
    let mut lines = first_lines(
        &mut child,
        &log,
        &format!("shoal serve {extra:?}"),
        1 + usize::from(with_metrics),
    );
    let metrics = with_metrics.then(|| {
        let l = lines.pop().expect("metrics line");
        l.strip_prefix("metrics ")
            .unwrap_or_else(|| panic!("unexpected second line {l:?}"))
            .to_string()
    });
    listening(child, &lines.remove(0), log, metrics)
}

/// The [`Server`] whose first line on stdout was `line` (`listening <addr>/p2p/<peer>`).
fn listening(child: Child, line: &str, log: std::path::PathBuf, metrics: Option<String>) -> Server {
    let addr = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let peer = addr
        .rsplit_once("/p2p/")
        .map(|(_, p)| p.to_string())
        .unwrap_or_else(|| panic!("address {addr} lacks a peer id"));
    Server {
        child,
        addr,
        peer,
        log,
        metrics,
    }
}

/// `shoal ARGS` inside network namespace `ns` (`ip netns exec`), with `env`, logging to
/// `log`; waits (at most 120 s) for its `listening` line.
pub(crate) fn start_in_namespace(
    ns: &str,
    args: &[&str],
    env: &[(&str, &str)],
    log: std::path::PathBuf,
) -> Server {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut child = cmd.spawn().expect("spawn");
    let line = first_line(&mut child, &log, &format!("shoal {args:?} in {ns}"));
    listening(child, &line, log, None)
}

/// `shoal generate --model <default> --json ARGS` (ARGS may name another --model), which
/// must succeed; its JSON.
pub(crate) fn generate_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = shoal();
    cmd.arg("generate");
    if !args.contains(&"--model") {
        cmd.arg("--model").arg(model());
    }
    cmd.args(args).arg("--json").env("RUST_LOG", "warn");
    let (out, _) = run(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "generate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// The array of numbers `key` of a JSON object (token ids of a generation).
pub(crate) fn ids(v: &serde_json::Value, key: &str) -> Vec<u64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
}

/// The spans of a generation's route (its JSON's `route`), in order.
pub(crate) fn route_spans(generation: &serde_json::Value) -> Vec<(u64, u64)> {
    generation["route"]
        .as_array()
        .expect("route")
        .iter()
        .map(|h| {
            (
                h["start"].as_u64().expect("start"),
                h["end"].as_u64().expect("end"),
            )
        })
        .collect()
}

/// The default model's block count, and a memory budget that fits half its blocks with
/// `cache_tokens` of KV cache each (and half a block of slack), from `shoal inspect`.
pub(crate) fn half_model_budget(cache_tokens: u64) -> (u64, u64) {
    let mut cmd = shoal();
    cmd.args(["inspect", "--json", "--model"]).arg(model());
    let (out, _) = run(cmd, Duration::from_secs(60));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    let blocks = info["blocks"].as_u64().expect("blocks");
    let per_block = info["block_memory_estimate"].as_u64().expect("estimate")
        + cache_tokens * info["kv_bytes_per_token_per_block"].as_u64().expect("kv");
    let budget = info["node_overhead_bytes"].as_u64().expect("overhead")
        + per_block * blocks / 2
        + per_block / 2;
    (blocks, budget)
}

/// `shoal status --json` of the swarm reachable through `bootstrap`.
pub(crate) fn status(bootstrap: &str) -> serde_json::Value {
    let mut cmd = shoal();
    cmd.args(["status", "--json", "--bootstrap", bootstrap]);
    let (out, _) = run(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Runs a command to completion, killing it after `limit`; returns its output and the
/// time it took.
pub(crate) fn run(mut cmd: Command, limit: Duration) -> (Output, Duration) {
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
pub(crate) fn rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

/// The most resident memory a process has had so far (VmHWM), in bytes.
pub(crate) fn peak_rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kb * 1024
}

/// A package from PyPI, installed with pip into the cache on first use (`module` is
/// what it imports as); the directory to put on `PYTHONPATH`.
pub(crate) fn python_package(name: &str, version: &str, module: &str) -> PathBuf {
    let dir = shoal_node::model_cache::cache_dir().join(format!("{name}-py-{version}"));
    if !dir.join(module).exists() {
        eprintln!(
            "installing {name} {version} with pip into {}",
            dir.display()
        );
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .arg(format!("{name}=={version}"))
            .status()
            .expect("python3 -m pip");
        assert!(status.success(), "pip could not install {name}");
    }
    dir
}

/// llama-cpp-python, the reference implementation model code is checked against
/// (tests/reference/): installed into the cache on first use, which builds llama.cpp
/// from source (about 7 minutes on 2 cores; `.ci/run` does it before the tests).
pub(crate) fn llama_cpp_python() -> PathBuf {
    python_package("llama-cpp-python", LLAMA_CPP_PYTHON, "llama_cpp")
}

/// The llama-cpp-python release the tests and `bench/llama-cpp.sh` use.
pub(crate) const LLAMA_CPP_PYTHON: &str = "0.3.36";

/// Runs `node/tests/reference/<script>` (a Python script on llama-cpp-python) with
/// `args` and, if given, `stdin` as its input; its stdout, parsed as JSON. Panics with
/// its stderr if it fails.
pub(crate) fn llama_cpp_json(
    script: &str,
    args: &[&std::ffi::OsStr],
    stdin: Option<&[u8]>,
) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    let mut cmd = Command::new("python3");
    cmd.arg(path)
        .args(args)
        .env("PYTHONPATH", llama_cpp_python());
    let input = tempfile::NamedTempFile::new().expect("temp file");
    if let Some(bytes) = stdin {
        std::fs::write(input.path(), bytes).expect("write");
        cmd.stdin(std::fs::File::open(input.path()).expect("open"));
    }
    let (out, _) = run(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the reference")
}
