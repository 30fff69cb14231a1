//! The simulator checked against reality: real `shoal serve` processes on loopback with
//! emulated links (`--emulate-rtt-ms`, `--emulate-mbps`), against `shoal sim` on the same
//! topology. A benchmark, not a test of correctness: run it with
//!
//! ```sh
//! cargo test -p shoal-node --test sim_vs_real -- --ignored --nocapture
//! ```
//!
//! It calibrates this machine's profile for the simulator from two runs without
//! emulated links (one process, and three servers: per-block time and per-step
//! overhead), then compares prediction and measurement on topologies with links the
//! calibration never saw, and prints the table.

mod common;

use common::*;

const PROMPT: &str = "Write a long story about a lighthouse keeper.";

/// Decode tokens/s of a generation (best of three, as `shoal bench` does).
fn decode_tps(extra: &[&str]) -> f64 {
    (0..3)
        .map(|_| {
            let args = [
                &["--chat", "--prompt", PROMPT, "--max-tokens", "64"][..],
                extra,
            ]
            .concat();
            generate_json(&args)["tokens_per_second"]
                .as_f64()
                .expect("tokens_per_second")
        })
        .fold(0.0, f64::max)
}

/// Starts servers for `spans` with emulated links; returns them and the bootstrap.
fn swarm(m: &std::path::Path, spans: &[&str], emulate: &[&str]) -> (Vec<Server>, String) {
    let mut servers: Vec<Server> = Vec::new();
    for s in spans {
        let boot = servers.first().map(|f| f.addr.clone());
        let mut args = vec!["--blocks", s];
        args.extend_from_slice(emulate);
        servers.push(serve_with(m, &args, boot.as_deref()));
    }
    let boot = servers[0].addr.clone();
    wait_for_servers(&boot, servers.len());
    (servers, boot)
}

fn topology(
    spans: &[&str],
    rtt_ms: f64,
    mbps: f64,
    bandwidth_gbs: f64,
    overhead_ms: f64,
) -> String {
    let mut t = format!(
        "name = \"emulated\"\nmodel = \"smollm2-135m\"\nduration_s = 120\n\n[[region]]\nname = \"lo\"\nrtt_ms = {{ lo = {rtt_ms} }}\n\n"
    );
    for s in spans {
        t += &format!(
            "[[nodes]]\ncount = 1\nregion = \"lo\"\nmemory_gb = 8\ntflops = 1000\nmem_bandwidth_gbs = {bandwidth_gbs}\nuplink_mbps = {mbps}\ndownlink_mbps = {mbps}\nstep_overhead_ms = {overhead_ms}\nblocks = \"{s}\"\n\n"
        );
    }
    t + "[[clients]]\ncount = 1\nregion = \"lo\"\nprompt_tokens = 40\nnew_tokens = 64\nthink_s = 1\n"
}

#[test]
#[ignore = "benchmark: several minutes of real generations; run with --ignored"]
fn simulator_predicts_emulated_swarms() {
    let m = model();
    let block_bytes = sim::model::preset("smollm2-135m")
        .expect("preset")
        .block_bytes();
    // Calibration: one process, then three servers on plain loopback.
    let local = decode_tps(&["--local"]);
    let three = ["0..10", "10..20", "20..30"];
    let plain = {
        let (servers, boot) = swarm(&m, &three, &[]);
        let tps = decode_tps(&["--bootstrap", &boot]);
        drop(servers);
        tps
    };
    // local: 30 tau + h = 1/local; three servers: 30 tau + 3 h = 1/plain (loopback
    // round trips are a few hundred microseconds, inside h).
    let h = ((1.0 / plain - 1.0 / local) / 2.0).max(0.0);
    let tau = (1.0 / local - h) / 30.0;
    let bandwidth_gbs = block_bytes / tau / 1e9;
    eprintln!("calibration: local {local:.1} tok/s, 3 servers {plain:.1} tok/s -> {:.2} ms per block, {:.2} ms per step", tau * 1e3, h * 1e3);

    let cases: [(&str, &[&str], f64, f64); 3] = [
        ("3 servers, 10 ms RTT", &three, 10.0, 1000.0),
        (
            "5 servers, 40 ms RTT, 20 Mbit/s",
            &["0..6", "6..12", "12..18", "18..24", "24..30"],
            40.0,
            20.0,
        ),
        (
            "4 servers, 100 ms RTT, 10 Mbit/s",
            &["0..8", "8..15", "15..23", "23..30"],
            100.0,
            10.0,
        ),
    ];
    let mut rows = Vec::new();
    for (name, spans, rtt, mbps) in cases {
        let rtt_s = rtt.to_string();
        let mbps_s = mbps.to_string();
        let emulate = [
            "--emulate-rtt-ms",
            rtt_s.as_str(),
            "--emulate-mbps",
            mbps_s.as_str(),
        ];
        let measured = {
            let (servers, boot) = swarm(&m, spans, &emulate);
            let mut extra = vec!["--bootstrap", boot.as_str()];
            extra.extend_from_slice(&emulate);
            let tps = decode_tps(&extra);
            drop(servers);
            tps
        };
        let topo = sim::Topology::parse(&topology(spans, rtt, mbps, bandwidth_gbs, h * 1e3))
            .expect("topology");
        let predicted = sim::run(&topo, &sim::Options::default(), |_| {}).decode_tokens_per_second;
        let error = predicted / measured - 1.0;
        rows.push((name, measured, predicted, error));
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
