//! Servers started without `--blocks` choose their spans from a memory budget, cover the
//! model between them, and stop moving once the swarm is balanced.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// (start, end) of every server, by peer id, from `shoal status`.
fn spans(st: &Value) -> BTreeMap<String, (u64, u64)> {
    st["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| {
            (
                s["peer_id"].as_str().expect("peer").to_string(),
                (
                    s["span"]["start"].as_u64().expect("start"),
                    s["span"]["end"].as_u64().expect("end"),
                ),
            )
        })
        .collect()
}

fn coverage(st: &Value) -> Vec<u64> {
    let cov = st["coverage"].as_object().expect("coverage");
    assert_eq!(cov.len(), 1, "one model: {cov:?}");
    cov.values()
        .next()
        .expect("model")
        .as_array()
        .expect("counts")
        .iter()
        .map(|c| c.as_u64().expect("count"))
        .collect()
}

/// Polls until the spans stay the same for three polls in a row; returns them.
fn wait_until_settled(boot: &str, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = BTreeMap::new();
    let mut same = 0;
    loop {
        let st = status(boot);
        let now = spans(&st);
        if now.len() == n && now == last {
            same += 1;
            if same == 3 {
                return st;
            }
        } else {
            same = 0;
        }
        last = now;
        assert!(Instant::now() < deadline, "the swarm kept moving: {st}");
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn moves(servers: &[Server]) -> usize {
    servers
        .iter()
        .map(|s| s.log_text().matches("moving from blocks").count())
        .sum()
}

#[test]
fn spans_from_a_memory_budget_cover_the_model_and_settle() {
    let m = model();
    // Half the model's blocks, and half a block of slack.
    let (blocks, budget) = half_model_budget(1024);
    let budget = budget.to_string();
    let args = [
        "--memory-budget",
        budget.as_str(),
        "--max-cache-tokens",
        "1024",
        "--rebalance-interval",
        "2",
    ];

    let first = serve_with(&m, &args, None);
    let boot = first.addr.clone();
    let mut servers = vec![first];
    wait_for_servers(&boot, 1);
    for n in 2..=4 {
        servers.push(serve_with(&m, &args, Some(&boot)));
        wait_for_servers(&boot, n);
    }
    let st = wait_until_settled(&boot, 4);
    assert!(
        spans(&st).values().all(|(a, b)| b - a == blocks / 2),
        "each takes half: {st}"
    );
    assert_eq!(
        coverage(&st),
        vec![2; blocks as usize],
        "every block covered twice: {st}"
    );
    assert_eq!(
        moves(&servers),
        0,
        "servers placed right the first time never move"
    );

    // Block throughputs before the fifth server joins: it must fill the weakest.
    let mut per_block_tput = vec![0.0f64; blocks as usize];
    for s in st["servers"].as_array().expect("servers") {
        for b in
            s["span"]["start"].as_u64().expect("start")..s["span"]["end"].as_u64().expect("end")
        {
            per_block_tput[b as usize] += s["throughput"].as_f64().expect("throughput");
        }
    }
    let weakest = per_block_tput.iter().copied().fold(f64::INFINITY, f64::min);
    let fifth = serve_with(&m, &args, Some(&boot));
    let fifth_peer = fifth.peer.clone();
    servers.push(fifth);
    let st = wait_for_servers(&boot, 5);
    let (a, b) = spans(&st)[&fifth_peer];
    let floor = (a..b)
        .map(|x| per_block_tput[x as usize])
        .fold(f64::INFINITY, f64::min);
    eprintln!("block throughputs before: {per_block_tput:?}; fifth server took {a}..{b}");
    assert_eq!(
        floor, weakest,
        "the fifth server took {a}..{b}, not the weakest blocks"
    );

    let before = moves(&servers);
    let settled = wait_until_settled(&boot, 5);
    assert!(coverage(&settled).iter().all(|c| *c >= 2), "{settled}");
    let moved = moves(&servers);
    // Settled: another stretch of checks (each server checks every ~2 s) moves nobody.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        spans(&status(&boot)),
        spans(&settled),
        "a server moved after the swarm settled"
    );
    assert_eq!(
        moves(&servers),
        moved,
        "a server moved after the swarm settled"
    );
    eprintln!("moves: {before} before the fifth server, {moved} after it joined");
}

/// The node and the simulator size a server's span by one function
/// (`coordinator::budget`): for the default model's numbers, every budget gives the
/// same block count in `shoal serve` as in a simulated node, so a change to the weight
/// factor or the overhead reaches both.
#[test]
fn the_simulator_sizes_spans_as_serve_does() {
    let file = shard::ModelFile::open(model()).expect("model");
    let cfg = file.config();
    let shape = sim::model::ModelShape {
        name: "default".into(),
        blocks: cfg.n_layers as u32,
        hidden: cfg.hidden as u32,
        params_per_block: file.block_bytes(0) as f64,
        bytes_per_param: 1.0,
        kv_bytes_per_token: cfg.kv_bytes_per_token(1) as f64,
        experts: None,
    };
    for mib in [40u64, 64, 100, 150, 300, 1000] {
        let budget = mib << 20;
        for cache in [0, 1024, 4096] {
            let serve = shoal_node::server::span::blocks_for_budget(&file, budget, cache);
            assert_eq!(
                shape.blocks_in(budget, cache),
                serve,
                "{mib} MiB, {cache} tokens"
            );
        }
    }
    let one = shoal_node::server::span::block_memory(&file, 0, 0) as f64;
    let factor = one / file.block_bytes(0) as f64;
    assert!(
        (factor - coordinator::budget::WEIGHT_FACTOR).abs() < 1e-3,
        "serve's block memory carries the shared weight factor: {factor}"
    );
}
