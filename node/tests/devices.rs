//! What a GPU node needs, checked where CI runs (no GPU): device choice and its errors,
//! and random-weight models of real shapes (`shoal make-model`) that load, serve and
//! answer exactly as in one process.

mod common;

use std::time::Duration;

use common::*;

/// Runs a `shoal` command that must fail; its stderr.
fn fails(args: &[&str]) -> String {
    let mut cmd = shoal();
    cmd.args(args);
    let (out, _) = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn devices_are_named_and_missing_backends_say_how_to_build_them() {
    let m = model();
    let m = m.to_str().expect("path");
    let e = fails(&["serve", "--model", m, "--blocks", "0..2", "--device", "tpu"]);
    assert!(e.contains("unknown device"), "{e}");
    if cfg!(feature = "cuda") {
        return;
    }
    let e = fails(&[
        "serve", "--model", m, "--blocks", "0..2", "--device", "cuda:0",
    ]);
    assert!(e.contains("--features cuda"), "{e}");
    // `auto` on a machine without a GPU backend serves on the CPU.
    let s = serve_with(&model(), &["--blocks", "0..2", "--device", "auto"], None);
    assert!(
        s.log_text().contains("blocks run on cpu"),
        "{}",
        s.log_text()
    );
}

#[test]
fn random_models_of_real_shapes_serve_and_answer_as_one_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let donor = model();
    for (format, out) in [
        ("gguf-q4_0", dir.path().join("random.gguf")),
        ("safetensors-bf16", dir.path().join("random-bf16")),
    ] {
        let out_s = out.to_str().expect("path");
        let mut cmd = shoal();
        cmd.args(["make-model", "--shape", "smollm2-135m", "--blocks", "4"])
            .args(["--format", format, "--out", out_s, "--tokenizer-from"])
            .arg(&donor);
        let (made, _) = run(cmd, Duration::from_secs(120));
        assert!(made.status.success(), "{made:?}");
        let said = String::from_utf8_lossy(&made.stdout);
        assert!(said.contains("4 blocks"), "{said}");
        // Not twice without --force.
        assert!(fails(&["make-model", "--out", out_s]).contains("exists"));

        let a = serve_with(&out, &["--blocks", "0..2"], None);
        let _b = serve_with(&out, &["--blocks", "2..4"], Some(&a.addr));
        let prompt = [
            "--model",
            out_s,
            "--prompt",
            "Hello",
            "--max-tokens",
            "6",
            "--top-logits",
            "2",
        ];
        let local = generate_json(&[&["--local"][..], &prompt[..]].concat());
        let swarm = generate_json(&[&["--bootstrap", a.addr.as_str()][..], &prompt[..]].concat());
        assert_eq!(
            swarm["completion_tokens"], local["completion_tokens"],
            "{format}"
        );
        assert_eq!(
            local["completion_tokens"].as_array().map(Vec::len),
            Some(6),
            "{format}: {local}"
        );
        // --top-logits: greedy picks the first of each step's two highest, and the
        // swarm's logits are the process's (the same CPU math, split in two).
        for g in [&local, &swarm] {
            let top = g["top_logits"].as_array().expect("top_logits");
            assert_eq!(top.len(), 6, "{format}: {g}");
            for (step, tok) in top
                .iter()
                .zip(g["completion_tokens"].as_array().expect("ids"))
            {
                assert_eq!(&step[0][0], tok, "{format}: {g}");
                let (l0, l1) = (step[0][1].as_f64(), step[1][1].as_f64());
                assert!(l0 >= l1, "{format}: not highest first: {step}");
            }
        }
        let logit = |g: &serde_json::Value, i: usize| g["top_logits"][i][0][1].as_f64();
        for i in 0..6 {
            let (a, b) = (
                logit(&local, i).expect("logit"),
                logit(&swarm, i).expect("logit"),
            );
            assert!(
                (a - b).abs() < 1e-3 * a.abs().max(1.0),
                "{format}: step {i}: {a} vs {b}"
            );
        }
    }
}
