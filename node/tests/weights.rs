//! Weights from the swarm: nodes with no model file fetch their part of the model from
//! the nodes that hold it, check every chunk, resume an interrupted fetch, and ban a
//! peer that sends bad bytes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use shard::ModelFile;

/// Bytes of every file under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = e.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// The files under `dir` whose names end with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

/// Stored bytes of the default model's tensors that `keep` picks by name, and the
/// model's metadata (its GGUF header).
fn model_bytes(keep: impl Fn(&str) -> bool) -> (u64, u64) {
    let whole = ModelFile::open(model()).expect("default model");
    let manifest = whole.manifest().expect("manifest");
    let tensors = manifest
        .tensors()
        .iter()
        .filter(|t| keep(&t.name))
        .map(|t| t.bytes)
        .sum();
    (tensors, manifest.header().len() as u64)
}

/// Whether tensor `name` belongs to blocks `start..end`.
fn in_blocks(name: &str, start: usize, end: usize) -> bool {
    (start..end).any(|i| name.starts_with(&format!("blk.{i}.")))
}

/// `shoal generate --json` with no --model through `bootstrap`, its part of the model
/// fetched into `cache`.
fn generate_fileless(bootstrap: &str, cache: &Path, prompt: &str) -> Value {
    let mut cmd = shoal();
    cmd.args(["generate", "--bootstrap", bootstrap, "--prompt", prompt])
        .args(["--max-tokens", "24", "--json", "--cache-dir"])
        .arg(cache)
        .env("RUST_LOG", "info");
    let (out, _) = run(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "fileless generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// `shoal serve` of blocks `blocks` with no --model, through `bootstrap`, fetching into
/// `cache`; logging at info.
fn fileless_serve(blocks: &str, bootstrap: &str, cache: &Path) -> std::process::Command {
    let mut cmd = shoal();
    cmd.args([
        "serve",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
    ])
    .args(["--blocks", blocks, "--bootstrap", bootstrap, "--cache-dir"])
    .arg(cache)
    .env("RUST_LOG", "info");
    cmd
}

/// One server holds the file; two servers and a client with none join through it.
/// The servers fetch their spans and serve them; the client fetches the embeddings and
/// LM head; the greedy text equals one process's; each keeps on disk its part and the
/// model's metadata, within 5%.
#[test]
fn fileless_servers_and_client_fetch_their_parts() {
    let m = model();
    let a = serve_with(&m, &["--blocks", "0..1"], None);
    let dirs = tempfile::tempdir().expect("tempdir");
    let (b_dir, c_dir, d_dir) = (
        dirs.path().join("b"),
        dirs.path().join("c"),
        dirs.path().join("d"),
    );
    let cache = |d: &Path| d.to_string_lossy().into_owned();
    let b = serve_fileless(
        &["--blocks", "1..15", "--cache-dir", &cache(&b_dir)],
        &a.addr,
    );
    let c = serve_fileless(
        &["--blocks", "15..30", "--cache-dir", &cache(&c_dir)],
        &a.addr,
    );
    for s in [&b, &c] {
        assert!(
            s.log_text().contains("fetched blocks-"),
            "no fetch in the log:\n{}",
            s.log_text()
        );
    }
    let prompt = "The lighthouse keeper climbed the stairs and";
    let swarm = generate_fileless(&a.addr, &d_dir, prompt);
    let local = generate_json(&["--local", "--prompt", prompt, "--max-tokens", "24"]);
    assert_eq!(
        ids(&swarm, "completion_tokens"),
        ids(&local, "completion_tokens")
    );
    assert_eq!(swarm["text"], local["text"]);
    let route = route_spans(&swarm);
    assert_eq!(route, vec![(0, 1), (1, 15), (15, 30)]);
    // On disk: the part's tensors plus the model's metadata, within 5%.
    let checks = [
        ("server 1..15", &b_dir, model_bytes(|n| in_blocks(n, 1, 15))),
        (
            "server 15..30",
            &c_dir,
            model_bytes(|n| in_blocks(n, 15, 30)),
        ),
        ("client", &d_dir, model_bytes(|n| !n.starts_with("blk."))),
    ];
    for (who, dir, (tensors, metadata)) in checks {
        let want = tensors + metadata;
        let got = bytes_under(dir);
        eprintln!("{who}: {got} bytes on disk, its tensors {tensors} + metadata {metadata}");
        assert!(
            got >= tensors && (got as f64) <= want as f64 * 1.05,
            "{who} keeps {got} bytes; its part is {tensors} bytes of tensors and {metadata} of metadata"
        );
        assert!(files_ending(dir, ".part").is_empty() && files_ending(dir, ".journal").is_empty());
    }
    drop((a, b, c));
}

/// A peer that sends corrupted chunks: alone, the fetch fails with a clear error and
/// leaves nothing that passes for a complete part; beside an honest peer, it is banned
/// and the part is fetched whole and right from the other.
#[test]
fn a_peer_sending_bad_chunks_is_banned() {
    let m = model();
    let liar = serve_with(&m, &["--blocks", "0..1", "--debug-corrupt-chunks"], None);
    let dirs = tempfile::tempdir().expect("tempdir");
    let alone = dirs.path().join("alone");
    let cmd = fileless_serve("1..30", &liar.addr, &alone);
    let (out, _) = run(cmd, Duration::from_secs(120));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a fetch from a liar alone succeeded:\n{err}"
    );
    assert!(err.contains("bad chunk"), "no bad chunk reported:\n{err}");
    assert!(
        err.contains("no peer left that holds"),
        "no clear reason for the failure:\n{err}"
    );
    assert!(
        files_ending(&alone, ".gguf").is_empty(),
        "a failed fetch left a complete-looking part"
    );

    let honest = serve_with(&m, &["--blocks", "0..1"], Some(&liar.addr));
    let dir = dirs.path().join("joined");
    let b = serve_fileless(
        &["--blocks", "1..30", "--cache-dir", &dir.to_string_lossy()],
        &liar.addr,
    );
    let log = b.log_text();
    assert!(
        log.contains("banned") && log.contains(&liar.peer),
        "the liar {} was not banned:\n{log}",
        liar.peer
    );
    // Every tensor of the part is the original's, byte for byte.
    let parts = files_ending(&dir, ".gguf");
    assert_eq!(parts.len(), 1, "{parts:?}");
    let part = ModelFile::open(&parts[0]).expect("the part opens");
    let whole = ModelFile::open(&m).expect("default model");
    let held = part.held_tensors();
    assert!(held.iter().any(|n| n.starts_with("blk.29.")));
    for name in &held {
        assert!(
            part.tensor_bytes(name) == whole.tensor_bytes(name),
            "tensor {name} differs from the original"
        );
    }
    drop((liar, honest, b));
}

/// A fetch killed midway resumes when the node starts again, fetching only what was
/// missing (the seeder uploads slowly, so the kill lands midway).
#[test]
fn an_interrupted_fetch_resumes() {
    let m = model();
    let a = serve_with(&m, &["--blocks", "0..1", "--share-mbps", "24"], None);
    let dirs = tempfile::tempdir().expect("tempdir");
    let dir = dirs.path().join("b");
    let log = dirs.path().join("first.log");
    let mut cmd = fileless_serve("1..30", &a.addr, &dir);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut first = cmd.spawn().expect("spawn");
    // Kill it once a third or so of its chunks are written.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let written = files_ending(&dir, ".journal")
            .first()
            .and_then(|j| std::fs::read_to_string(j).ok())
            .map_or(0, |t| t.lines().count());
        if written >= 80 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no chunk written in 90 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    first.kill().expect("kill");
    first.wait().expect("wait");
    assert!(
        files_ending(&dir, ".gguf").is_empty(),
        "complete before it was killed"
    );

    let b = serve_fileless(
        &["--blocks", "1..30", "--cache-dir", &dir.to_string_lossy()],
        &a.addr,
    );
    let text = b.log_text();
    let number_before = |text: &str, marker: &str| -> u64 {
        let at = text
            .find(marker)
            .unwrap_or_else(|| panic!("no {marker:?} in the log:\n{text}"));
        text[..at]
            .rsplit(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no number before {marker:?}"))
    };
    let resumed = number_before(&text, " chunks (");
    let resumed_mib = number_before(&text, " MiB) already here");
    let fetched_mib = number_before(&text, " MiB in ");
    let (tensors, _) = model_bytes(|n| in_blocks(n, 1, 30));
    let total_mib = tensors >> 20;
    eprintln!(
        "resumed {resumed} chunks ({resumed_mib} MiB), fetched {fetched_mib} of {total_mib} MiB"
    );
    assert!(resumed >= 80 && resumed_mib >= 5, "{text}");
    // Only what was missing (MiB are rounded down, hence the 1).
    assert!(
        fetched_mib + resumed_mib <= total_mib + 1 && fetched_mib < total_mib - 4,
        "fetched more than was missing:\n{text}"
    );
    drop((a, b));
}

/// A server with no file that moves to another span fetches the new span's tensors
/// (from a holder of the whole file) and frees the old ones.
#[test]
fn a_fileless_server_that_moves_fetches_the_new_span_and_frees_the_old() {
    let m = model();
    // A budget of half the model's blocks.
    let (blocks, budget) = half_model_budget(1024);
    let budget = budget.to_string();
    let a = serve_with(&m, &["--blocks", "0..30"], None);
    let dirs = tempfile::tempdir().expect("tempdir");
    let dir = dirs.path().join("b");
    let b = serve_fileless(
        &[
            "--memory-budget",
            &budget,
            "--max-cache-tokens",
            "1024",
            "--rebalance-interval",
            "2",
            "--cache-dir",
            &dir.to_string_lossy(),
        ],
        &a.addr,
    );
    let first = wait_until("B's span listed", Duration::from_secs(30), || {
        let st = status(&a.addr);
        let found = st["servers"].as_array().and_then(|s| {
            s.iter()
                .find(|x| x["peer_id"] == b.peer.as_str())
                .map(|x| (x["span"]["start"].as_u64(), x["span"]["end"].as_u64()))
        });
        match found {
            Some((Some(s), Some(e))) => Ok((s, e)),
            _ => Err(st.to_string()),
        }
    });
    assert_eq!(first.1 - first.0, blocks / 2, "B takes half the model");
    // C holds the whole file and serves B's half; then A, the only server of the other
    // half, leaves: B must move there, fetching it from C.
    let c_blocks = format!("{}..{}", first.0, first.1);
    let c = serve_with(&m, &["--blocks", &c_blocks], Some(&a.addr));
    wait_for_servers(&a.addr, 3);
    drop(a);
    let moved = wait_until("B moved", Duration::from_secs(90), || {
        let log = b.log_text();
        let removed = log.contains("removed the previous span's part");
        if removed {
            Ok(log)
        } else {
            Err(log)
        }
    });
    let old = format!("blocks-{}-{}", first.0, first.1);
    assert!(moved.contains("moving from blocks"), "{moved}");
    let parts = files_ending(&dir, ".gguf");
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert!(
        !parts[0].to_string_lossy().contains(&old),
        "the old part {old} is still kept: {parts:?}"
    );
    // The swarm answers through B's new span and C, as one process does.
    let prompt = "Seven lighthouses stood along the coast, and";
    let swarm = generate_json(&[
        "--bootstrap",
        &c.addr,
        "--prompt",
        prompt,
        "--max-tokens",
        "16",
    ]);
    let local = generate_json(&["--local", "--prompt", prompt, "--max-tokens", "16"]);
    assert_eq!(
        ids(&swarm, "completion_tokens"),
        ids(&local, "completion_tokens")
    );
    drop((b, c));
}
