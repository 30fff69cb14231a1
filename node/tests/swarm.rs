//! End to end: real `shoal serve` processes on loopback serving the default model.

mod common;

use std::time::Duration;

use common::*;

/// Greedy generation through three servers equals the one-process reference, token for
/// token, on three prompts of 32 new tokens: one at a time, then all three at once.
#[test]
fn three_servers_match_local_token_for_token() {
    let m = model();
    let a = serve(&m, "0..10", None);
    let b = serve(&m, "10..20", Some(&a.addr));
    let c = serve(&m, "20..30", Some(&a.addr));
    let prompts: [(&str, bool); 3] = [
        (
            "Write a short story about a robot who learns to paint.",
            true,
        ),
        ("Explain how a bicycle works, step by step.", true),
        ("Once upon a time, in a small village by the sea,", false),
    ];
    let mut locals = Vec::new();
    for (prompt, chat) in prompts {
        let mut args = vec!["--prompt", prompt, "--max-tokens", "32"];
        if chat {
            args.push("--chat");
        }
        let local = generate_json(&[args.as_slice(), &["--local"]].concat());
        locals.push(ids(&local, "completion_tokens"));
        let swarm = generate_json(&[args.as_slice(), &["--bootstrap", &a.addr]].concat());
        assert_eq!(ids(&local, "prompt_tokens"), ids(&swarm, "prompt_tokens"));
        let (l, s) = (
            ids(&local, "completion_tokens"),
            ids(&swarm, "completion_tokens"),
        );
        assert_eq!(
            l.len(),
            32,
            "prompt {prompt:?} should give 32 new tokens: {local}"
        );
        assert_eq!(l, s, "swarm differs from local for {prompt:?}");
        assert_eq!(local["text"], swarm["text"]);
        let route = route_spans(&swarm);
        assert_eq!(route, vec![(0, 10), (10, 20), (20, 30)]);
    }
    // All three at once: the servers batch the steps that arrive together, and each
    // generation must still equal its one-process reference.
    let concurrent: Vec<_> = prompts
        .iter()
        .map(|&(prompt, chat)| {
            let boot = a.addr.clone();
            std::thread::spawn(move || {
                let mut args = vec!["--prompt", prompt, "--max-tokens", "32", "--bootstrap"];
                args.push(&boot);
                if chat {
                    args.push("--chat");
                }
                ids(&generate_json(&args), "completion_tokens")
            })
        })
        .collect();
    for ((handle, local), (prompt, _)) in concurrent.into_iter().zip(&locals).zip(prompts) {
        let swarm = handle.join().expect("client thread");
        assert_eq!(
            &swarm, local,
            "concurrent swarm differs from local for {prompt:?}"
        );
    }
    drop((a, b, c));
}

/// A node's memory grows with its span: 30 blocks take clearly more than 10.
#[test]
fn resident_memory_grows_with_the_span() {
    let m = model();
    let small = serve(&m, "0..10", None);
    let rss_small = rss_bytes(small.child.id());
    drop(small);
    let big = serve(&m, "0..30", None);
    let rss_big = rss_bytes(big.child.id());
    drop(big);
    // Q4_1 weights of one SmolLM2 block are ~2.2 MB; 20 more blocks must show.
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "resident memory: 10 blocks {:.1} MiB, 30 blocks {:.1} MiB",
        mib(rss_small),
        mib(rss_big)
    );
    assert!(
        rss_big > rss_small + 30 * (1 << 20),
        "30-block node ({:.1} MiB) not clearly above 10-block node ({:.1} MiB)",
        mib(rss_big),
        mib(rss_small)
    );
}

/// Memory that keeps its promise: two nodes given a budget of about half the model
/// each (no --blocks) size their spans from it, cover the model between them, and
/// after loading and serving a generation their peak resident memory (VmHWM, from
/// /proc) is under the budget.
#[test]
fn nodes_stay_within_their_memory_budget() {
    let m = model();
    let mut cmd = shoal();
    cmd.args(["inspect", "--json", "--model"]).arg(&m);
    let (out, _) = run(cmd, Duration::from_secs(60));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    let n = info["blocks"].as_u64().expect("blocks");
    let seq = 1024u64;
    let per_block = info["block_memory_estimate"].as_u64().expect("estimate")
        + seq * info["kv_bytes_per_token_per_block"].as_u64().expect("kv");
    let budget =
        info["node_overhead_bytes"].as_u64().expect("overhead") + per_block * n / 2 + per_block / 2;
    let budget_arg = budget.to_string();
    let args = [
        "--memory-budget",
        budget_arg.as_str(),
        "--max-seq-len",
        "1024",
        "--rebalance-interval",
        "0",
    ];
    let a = serve_with(&m, &args, None);
    let b = serve_with(&m, &args, Some(&a.addr));
    let g = generate_json(&[
        "--bootstrap",
        a.addr.as_str(),
        "--prompt",
        "Tell me about the sea.",
        "--chat",
        "--max-tokens",
        "64",
    ]);
    let route = g["route"].as_array().expect("route");
    assert_eq!(route.len(), 2, "the two nodes share the model: {route:?}");
    let stored = info["block_bytes"].as_u64().expect("block bytes") * n / 2;
    for s in [&a, &b] {
        let peak = peak_rss_bytes(s.child.id());
        let mib = |x: u64| x as f64 / (1 << 20) as f64;
        eprintln!(
            "budget {:.1} MiB, peak resident {:.1} MiB",
            mib(budget),
            mib(peak)
        );
        assert!(peak <= budget, "peak {peak} over the budget {budget}");
        // It holds its weights: the measurement is of a real node.
        assert!(peak > stored, "peak {peak} below the weights {stored}");
    }
}

/// A server without room for a session is passed over for one that has it; with no such
/// server, the client says what it needed.
#[test]
fn a_full_server_is_passed_over() {
    let m = model();
    let small = common::serve_with(&m, &["--blocks", "0..30", "--max-cache-tokens", "16"], None);
    let prompt = [
        "--prompt",
        "Tell me about the moon.",
        "--max-tokens",
        "8",
        "--chat",
    ];
    let mut cmd = shoal();
    cmd.arg("generate")
        .arg("--model")
        .arg(&m)
        .args(prompt)
        .args(["--route-timeout", "2", "--bootstrap", &small.addr]);
    let (out, _) = run(cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should find no server with room");
    assert!(
        err.contains("with room for") && err.contains("no usable server covers blocks 0..30"),
        "{err}"
    );

    let roomy = common::serve(&m, "0..30", Some(&small.addr));
    let out = generate_json(&[&prompt[..], &["--bootstrap", &small.addr]].concat());
    let route = out["route"].as_array().expect("route");
    assert_eq!(route.len(), 1);
    assert_eq!(route[0]["peer"].as_str(), Some(roomy.peer.as_str()));
}
