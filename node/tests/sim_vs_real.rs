//! The simulator checked against reality: real `shoal serve` processes on loopback with
//! emulated links (`--emulate-rtt-ms`, `--emulate-mbps`), against `shoal sim` on the same
//! topology. A benchmark, not a test of correctness: run it with
//!
//! ```sh
//! cargo test -p shoal-node --test sim_vs_real -- --ignored --nocapture
//! ```
//!
//! It calibrates this machine's profile for each model file once, without emulated
//! links: one process (per-block time, the client's own work per step, and from a
//! prompt the compute rate), and three servers (per-step overhead). Then it compares
//! prediction and measurement on topologies with links the calibration never saw:
//! chains of several lengths and link speeds, speculative decoding by prompt lookup and
//! by a draft model, several clients sharing replicated servers, and a long chain on a
//! thin link with a long prompt. It prints the table and fails past 15%.
//!
//! The draft-model case needs llama.cpp's quantiser (llama-cpp-python, as the
//! reference tests): the default model re-quantised to Q8_0 is drafted for by its
//! Q4_0.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use sim::model::ModelShape;

/// An ordinary prompt (the calibration's, and the plain cases').
const STORY: &str = "Write a long story about a lighthouse keeper.";
/// A prompt whose answer repeats its context: prompt lookup drafts well.
const REPEAT: &str = "Repeat this paragraph exactly, word for word: The lighthouse keeper climbed the hundred steps every evening, lit the great lamp, wound the clockwork that turned it, and sat by the window to watch the ships pass safely along the rocky coast until morning came. Then he wrote the night in his log, ate his bread, and slept until noon.";
/// An ordinary chat prompt for the draft model.
const CHAT: &str = "Write a short story about a cat who learns to fly.";

/// Of three generations with `args` (greedy: the same text each time), the one with the
/// fastest decode.
fn best_of_three(args: &[&str]) -> Value {
    (0..3)
        .map(|_| generate_json(args))
        .max_by(|a, b| tps(a).total_cmp(&tps(b)))
        .expect("three runs")
}

fn tps(v: &Value) -> f64 {
    v["tokens_per_second"].as_f64().expect("tokens_per_second")
}

fn number(v: &Value, key: &str) -> f64 {
    let mut at = v;
    for k in key.split('.') {
        at = &at[k];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

fn count(v: &Value, key: &str) -> usize {
    v[key].as_array().map_or(0, |a| a.len())
}

/// Starts servers for `spans` with emulated links; returns them and the bootstrap.
fn swarm(m: &Path, spans: &[&str], emulate: &[String]) -> (Vec<Server>, String) {
    let mut servers: Vec<Server> = Vec::new();
    for s in spans {
        let boot = servers.first().map(|f| f.addr.clone());
        let mut args = vec!["--blocks", s];
        args.extend(emulate.iter().map(String::as_str));
        servers.push(serve_with(m, &args, boot.as_deref()));
    }
    let boot = servers[0].addr.clone();
    wait_for_servers(&boot, servers.len());
    (servers, boot)
}

/// This machine's costs for one model file, measured on plain loopback.
struct Calibration {
    model: PathBuf,
    shape: ModelShape,
    /// One block's time for one token, seconds.
    tau: f64,
    /// A server's fixed cost per step, seconds.
    overhead: f64,
    /// The client's own work per plain step, seconds.
    client: f64,
    /// Compute rate of a prompt chunk, FLOP/s.
    flops: f64,
}

/// A draft model, and what one of its steps costs on the client, seconds.
struct Draft {
    model: PathBuf,
    token: f64,
}

/// The best of three generations of the story prompt by `model`, one token per step,
/// with `extra` arguments.
fn story(model: &Path, extra: &[&str]) -> Value {
    let m = model.to_str().expect("path");
    let args = [
        "--model",
        m,
        "--chat",
        "--prompt",
        STORY,
        "--max-tokens",
        "64",
    ];
    best_of_three(&[&args[..], &["--speculate", "off"], extra].concat())
}

/// Seconds per token of `model` run alone.
fn local_token(model: &Path) -> f64 {
    1.0 / tps(&story(model, &["--local"]))
}

fn calibrate(model: &Path, shape: ModelShape) -> Calibration {
    let m = model.to_str().expect("path");
    let local = story(model, &["--local"]);
    // A prompt chunk of 256 tokens, alone: its time is compute.
    let words: String = (0..200).map(|i| format!("word{i} ")).collect();
    let prefill = (0..3)
        .map(|_| {
            let v = generate_json(&[
                "--model",
                m,
                "--local",
                "--prompt",
                &words,
                "--max-tokens",
                "1",
            ]);
            (number(&v, "prefill_seconds"), count(&v, "prompt_tokens"))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .expect("three runs");
    let three = ["0..10", "10..20", "20..30"];
    let plain = {
        let (servers, boot) = swarm(model, &three, &[]);
        let v = story(model, &["--bootstrap", &boot]);
        drop(servers);
        v
    };
    let per_step = |v: &Value| number(v, "client_seconds") / number(v, "decode_steps");
    let blocks = shape.blocks as f64;
    // Locally a token is the blocks plus the client's work; through three servers, also
    // three servers' fixed costs (loopback round trips are a few hundred microseconds).
    let client = per_step(&plain);
    let tau = (1.0 / tps(&local) - per_step(&local)) / blocks;
    let overhead = ((1.0 / tps(&plain) - blocks * tau - client) / 3.0).max(0.0);
    let flops = blocks * 2.0 * shape.params_per_token() * prefill.1 as f64 / prefill.0;
    let cal = Calibration {
        model: model.to_path_buf(),
        tau,
        overhead,
        client,
        flops,
        shape,
    };
    eprintln!(
        "calibration of {}: local {:.1} tok/s, 3 servers {:.1} tok/s -> {:.3} ms per block, {:.2} ms per server step, {:.2} ms of client work per step, {:.0} GFLOP/s in a prompt",
        model.display(),
        tps(&local),
        tps(&plain),
        cal.tau * 1e3,
        cal.overhead * 1e3,
        cal.client * 1e3,
        cal.flops / 1e9
    );
    cal
}

/// A topology to measure and to simulate.
struct Case<'a> {
    name: &'a str,
    /// Servers' spans (a span twice: two replicas).
    spans: &'a [&'a str],
    rtt_ms: f64,
    mbps: f64,
    /// Concurrent clients.
    clients: usize,
    prompt: &'a str,
    speculate: &'a str,
    /// The draft model, for `draft`.
    draft: Option<&'a Draft>,
}

/// What the clients of a case measured: decode tok/s (mean over the clients) and the
/// numbers the simulator takes as given (prompt and answer lengths, drafts).
fn measure(cal: &Calibration, case: &Case) -> (f64, Value) {
    let (rtt, mbps) = (case.rtt_ms.to_string(), case.mbps.to_string());
    let emulate = [
        "--emulate-rtt-ms".to_string(),
        rtt,
        "--emulate-mbps".to_string(),
        mbps,
    ];
    let (servers, boot) = swarm(&cal.model, case.spans, &emulate);
    let m = cal.model.to_str().expect("path");
    let mut args: Vec<&str> = vec![
        "--model",
        m,
        "--chat",
        "--prompt",
        case.prompt,
        "--max-tokens",
        "64",
        "--bootstrap",
        &boot,
        "--speculate",
        case.speculate,
    ];
    args.extend(emulate.iter().map(String::as_str));
    let draft_path;
    if let Some(d) = case.draft {
        draft_path = d.model.to_str().expect("path").to_string();
        args.extend(["--draft-model", draft_path.as_str()]);
    }
    let result = if case.clients == 1 {
        let v = best_of_three(&args);
        (tps(&v), v)
    } else {
        // All at once, each a process of its own.
        let runs: Vec<Value> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..case.clients)
                .map(|_| s.spawn(|| generate_json(&args)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client"))
                .collect()
        });
        let mean = runs.iter().map(tps).sum::<f64>() / runs.len() as f64;
        (mean, runs[0].clone())
    };
    drop(servers);
    result
}

/// The topology of `case` for the simulator, with what the measured run took as given.
fn topology(cal: &Calibration, case: &Case, run: &Value) -> String {
    let s = &cal.shape;
    let bandwidth_gbs = s.block_bytes() / cal.tau / 1e9;
    let mut t = format!(
        "name = \"{}\"\nduration_s = 120\n\n[custom_model]\nname = \"{}\"\nblocks = {}\nhidden = {}\nparams_per_block = {}\nbytes_per_param = {}\nkv_bytes_per_token = {}\n\n[[region]]\nname = \"lo\"\nrtt_ms = {{ lo = {} }}\n\n",
        case.name, s.name, s.blocks, s.hidden, s.params_per_block, s.bytes_per_param,
        s.kv_bytes_per_token, case.rtt_ms
    );
    for span in case.spans {
        t += &format!(
            "[[nodes]]\ncount = 1\nregion = \"lo\"\nmemory_gb = 8\ntflops = {}\nmem_bandwidth_gbs = {bandwidth_gbs}\nuplink_mbps = {mbps}\ndownlink_mbps = {mbps}\nstep_overhead_ms = {}\nblocks = \"{span}\"\n\n",
            cal.flops / 1e12,
            cal.overhead * 1e3,
            mbps = case.mbps,
        );
    }
    let speculate = if case.speculate == "off" {
        String::new()
    } else {
        // Per decode step: prompt lookup proposes nothing where nothing repeats, and
        // such steps are plain ones.
        let steps = number(run, "decode_steps").max(1.0);
        let drafted = number(run, "drafts.drafted");
        let draft_ms = case.draft.map_or(0.0, |d| d.token * 1e3);
        format!(
            "speculate = {{ drafts = {}, acceptance = {}, draft_ms = {draft_ms} }}\n",
            drafted / steps,
            number(run, "drafts.accepted") / drafted.max(1.0)
        )
    };
    t + &format!(
        "[[clients]]\ncount = {}\nregion = \"lo\"\nprompt_tokens = {}\nnew_tokens = {}\nthink_s = 1\nstep_ms = {}\nlink_mbps = {}\n{speculate}",
        case.clients,
        count(run, "prompt_tokens"),
        count(run, "completion_tokens").max(2),
        cal.client * 1e3,
        case.mbps
    )
}

/// The default model re-quantised by llama.cpp to `kind` (q8_0, q4_0) in `dir`.
fn requantised(default: &Path, dir: &Path, kind: &str) -> PathBuf {
    let out = dir.join(format!("smollm2-{kind}.gguf"));
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama_cpp_quantize.py");
    let status = std::process::Command::new("python3")
        .arg(script)
        .arg(default)
        .arg(&out)
        .args([kind, "--requantize"])
        .env("PYTHONPATH", llama_cpp_python())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("python3");
    assert!(status.success(), "llama.cpp's quantiser failed on {kind}");
    out
}

#[test]
#[ignore = "benchmark: several minutes of real generations; run with --ignored"]
fn simulator_predicts_emulated_swarms() {
    let default = model();
    let dir = tempfile::tempdir().expect("temp dir");
    let shape = sim::model::preset("smollm2-135m").expect("preset");
    let q8 = requantised(&default, dir.path(), "q8_0");
    let q4 = requantised(&default, dir.path(), "q4_0");
    let base = calibrate(&default, shape.clone());
    let q8_shape = ModelShape {
        bytes_per_param: 34.0 / 32.0,
        ..shape
    };
    let target = calibrate(&q8, q8_shape);
    let draft = Draft {
        token: local_token(&q4),
        model: q4,
    };

    let three = ["0..10", "10..20", "20..30"];
    let long_prompt = format!(
        "Summarise these notes in one sentence: {}",
        "The keeper lit the lamp at dusk, wound the clockwork, logged the passing ships and slept at dawn. ".repeat(18)
    );
    let plain = |name, spans, rtt_ms, mbps| Case {
        name,
        spans,
        rtt_ms,
        mbps,
        clients: 1,
        prompt: STORY,
        speculate: "off",
        draft: None,
    };
    let cases: Vec<(&Calibration, Case)> = vec![
        (&base, plain("3 servers, 10 ms RTT", &three, 10.0, 1000.0)),
        (
            &base,
            plain(
                "5 servers, 40 ms RTT, 20 Mbit/s",
                &["0..6", "6..12", "12..18", "18..24", "24..30"],
                40.0,
                20.0,
            ),
        ),
        (
            &base,
            plain(
                "4 servers, 100 ms RTT, 10 Mbit/s",
                &["0..8", "8..15", "15..23", "23..30"],
                100.0,
                10.0,
            ),
        ),
        (
            &base,
            Case {
                prompt: REPEAT,
                speculate: "ngram",
                ..plain("3 servers, 40 ms RTT, prompt lookup", &three, 40.0, 1000.0)
            },
        ),
        (
            &target,
            Case {
                prompt: CHAT,
                speculate: "draft",
                draft: Some(&draft),
                ..plain(
                    "3 servers, 40 ms RTT, Q4_0 drafting for Q8_0",
                    &three,
                    40.0,
                    1000.0,
                )
            },
        ),
        (
            &base,
            Case {
                clients: 4,
                ..plain(
                    "4 clients, 2 spans x 2 replicas, 40 ms RTT",
                    &["0..15", "0..15", "15..30", "15..30"],
                    40.0,
                    1000.0,
                )
            },
        ),
        (
            &base,
            Case {
                prompt: &long_prompt,
                ..plain(
                    "6 servers, 20 ms RTT, 5 Mbit/s, 400-token prompt",
                    &["0..5", "5..10", "10..15", "15..20", "20..25", "25..30"],
                    20.0,
                    5.0,
                )
            },
        ),
    ];
    let mut rows = Vec::new();
    for (cal, case) in &cases {
        let (measured, run) = measure(cal, case);
        let text = topology(cal, case, &run);
        let topo =
            sim::Topology::parse(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", case.name));
        let predicted = sim::run(&topo, &sim::Options::default(), |_| {}).decode_tokens_per_second;
        let error = predicted / measured - 1.0;
        eprintln!(
            "{}: measured {measured:.2}, simulated {predicted:.2} ({:+.1}%)",
            case.name,
            error * 100.0
        );
        rows.push((case.name, measured, predicted, error));
    }
    eprintln!("\n| topology | measured decode tok/s | simulated | error |\n|---|---|---|---|");
    for (name, measured, predicted, error) in &rows {
        eprintln!(
            "| {name} | {measured:.2} | {predicted:.2} | {:+.1}% |",
            error * 100.0
        );
    }
    for (name, _, _, error) in &rows {
        assert!(
            error.abs() <= 0.15,
            "{name}: simulator off by {:.1}%",
            error * 100.0
        );
    }
}
