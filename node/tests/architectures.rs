//! Every architecture Shoal runs, against llama.cpp on the same file (issue 17).
//!
//! Tiny random-weight models of each family (`shoal make-model --shape tiny-*`, with
//! decisive logits: see `shard::synth`) in F32, Q8_0 and Q4_K_M. Shoal generates
//! greedily; llama.cpp (llama-cpp-python, node/tests/reference/llama_cpp_greedy.py) then
//! evaluates the same prompt and Shoal's tokens, and at every position where its own
//! top-2 logit gap is at least 0.3, the token it would choose must be Shoal's. Prompt
//! token ids must be equal too. Mixtures of experts also run through a two-node swarm
//! split between expert blocks, which must give the local tokens exactly.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const PROMPT: &str = "The quick brown fox";
const TOKENS: usize = 24;
/// llama.cpp's top-2 gap from which its choice must be ours.
const DECISIVE: f64 = 0.3;

/// `shoal make-model --shape SHAPE --dtype DTYPE` into `dir`.
fn make_model(dir: &Path, shape: &str, dtype: &str) -> PathBuf {
    let out = dir.join(format!("{shape}-{dtype}.gguf"));
    let mut cmd = shoal();
    cmd.args(["make-model", "--shape", shape, "--dtype", dtype, "--out"])
        .arg(&out)
        .arg("--tokenizer-from")
        .arg(model());
    let (o, _) = run(cmd, Duration::from_secs(120));
    assert!(
        o.status.success(),
        "make-model {shape} {dtype}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn ids(v: &Value, key: &str) -> Vec<u64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .iter()
        .map(|t| t.as_u64().expect("token id"))
        .collect()
}

/// Shoal's greedy generation on `model` (`--local`, or the swarm behind `bootstrap`).
fn shoal_greedy(model: &Path, bootstrap: Option<&str>) -> Value {
    let m = model.to_string_lossy();
    let tokens = TOKENS.to_string();
    let mut args = vec!["--model", &m, "--prompt", PROMPT, "--max-tokens", &tokens];
    args.extend(["--temperature", "0"]);
    match bootstrap {
        Some(b) => args.extend(["--bootstrap", b]),
        None => args.push("--local"),
    }
    generate_json(&args)
}

/// Checks Shoal's generation against llama.cpp's choices along it; returns how many
/// positions were decisive.
fn check_against_llama_cpp(name: &str, model: &Path, ours: &Value) -> usize {
    let chosen = ids(ours, "completion_tokens");
    assert_eq!(chosen.len(), TOKENS, "{name}: stopped early: {ours}");
    let list: Vec<String> = chosen.iter().map(u64::to_string).collect();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama_cpp_greedy.py");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script)
        .arg(model)
        .arg(PROMPT)
        .arg(list.join(","))
        .env("PYTHONPATH", llama_cpp_python());
    let (out, _) = run(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "{name}: llama.cpp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Value = serde_json::from_slice(&out.stdout).expect("reference JSON");
    assert_eq!(
        ids(&reference, "prompt_ids"),
        ids(ours, "prompt_tokens"),
        "{name}: prompt tokens differ from llama.cpp's"
    );
    let choices = ids(&reference, "choices");
    let gaps: Vec<f64> = reference["gaps"]
        .as_array()
        .expect("gaps")
        .iter()
        .map(|g| g.as_f64().expect("gap"))
        .collect();
    let mut decisive = 0;
    for (i, ((ours, theirs), gap)) in chosen.iter().zip(&choices).zip(&gaps).enumerate() {
        if *gap >= DECISIVE {
            decisive += 1;
            assert_eq!(
                ours, theirs,
                "{name}: at token {i} llama.cpp chooses {theirs} by a margin of {gap:.3}, \
                 Shoal chose {ours}"
            );
        }
    }
    eprintln!("{name}: {decisive} of {TOKENS} positions decisive, all agree");
    // The models are built to be decisive: a check on a handful of positions would
    // prove little.
    assert!(
        decisive >= TOKENS / 2,
        "{name}: only {decisive} decisive positions"
    );
    decisive
}

/// Every family and weight type, run in one process with `--local`.
#[test]
fn every_architecture_agrees_with_llama_cpp() {
    let dir = tempfile::tempdir().expect("tempdir");
    for shape in [
        "tiny-llama",
        "tiny-qwen3",
        "tiny-phi4",
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-qwen3moe",
        "tiny-mixtral",
    ] {
        for dtype in ["f32", "q8_0", "q4_k_m"] {
            let m = make_model(dir.path(), shape, dtype);
            let ours = shoal_greedy(&m, None);
            check_against_llama_cpp(&format!("{shape} {dtype}"), &m, &ours);
            std::fs::remove_file(&m).expect("remove model");
        }
    }
}

/// Mixtures of experts through two servers that split the blocks in half (each holds
/// its blocks' experts): the local tokens exactly, and so llama.cpp's.
#[test]
fn experts_split_over_two_servers_give_the_local_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    for shape in ["tiny-qwen3moe", "tiny-mixtral"] {
        let m = make_model(dir.path(), shape, "q4_k_m");
        let local = shoal_greedy(&m, None);
        let a = serve(&m, "0..2", None);
        let _b = serve(&m, "2..4", Some(&a.addr));
        let swarm = shoal_greedy(&m, Some(&a.addr));
        assert_eq!(
            ids(&swarm, "completion_tokens"),
            ids(&local, "completion_tokens"),
            "{shape}: the swarm's tokens differ from --local's"
        );
        // Status tools see the model's total and active weights.
        let (total, active) = shard::ModelFile::open(&m).expect("model").params();
        assert!(active < total, "{shape}: {active} of {total} active");
        let st = status(&a.addr);
        let announced = &st["servers"][0]["params"];
        assert_eq!(announced["total"].as_u64(), Some(total), "{st}");
        assert_eq!(announced["active"].as_u64(), Some(active), "{st}");
        let route = swarm["route"].as_array().expect("route");
        assert_eq!(route.len(), 2, "{shape}: route {route:?}");
        check_against_llama_cpp(&format!("{shape} q4_k_m, swarm"), &m, &swarm);
    }
}
