//! Scenario tests of the simulator: determinism, scripted trouble, bad files.

use sim::{run, Options, Report, Topology};

fn topo(text: &str) -> Topology {
    Topology::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn go(t: &Topology) -> Report {
    run(t, &Options::default(), |_| {})
}

const TWO_REGIONS: &str = r#"
name = "two-regions"
model = "llama-2-70b"
duration_s = 900
seed = 3

[[region]]
name = "us"
rtt_ms = { us = 20, eu = 90 }

[[region]]
name = "eu"
rtt_ms = { us = 90, eu = 20 }

[[nodes]]
count = 4
region = "us"
memory_gb = 48
tflops = 100
mem_bandwidth_gbs = 1000
uplink_mbps = 1000
downlink_mbps = 1000
blocks = "0..40"

[[nodes]]
count = 4
region = "us"
memory_gb = 48
tflops = 100
mem_bandwidth_gbs = 1000
uplink_mbps = 1000
downlink_mbps = 1000
blocks = "40..80"

[[nodes]]
count = 4
region = "eu"
memory_gb = 48
tflops = 100
mem_bandwidth_gbs = 1000
uplink_mbps = 1000
downlink_mbps = 1000
blocks = "0..40"

[[nodes]]
count = 4
region = "eu"
memory_gb = 48
tflops = 100
mem_bandwidth_gbs = 1000
uplink_mbps = 1000
downlink_mbps = 1000
blocks = "40..80"

[[clients]]
count = 6
region = "eu"
prompt_tokens = 128
new_tokens = 64
think_s = 2
"#;

#[test]
fn same_seed_same_report_byte_for_byte() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/topologies/university.toml"
    ))
    .expect("topology");
    let t = topo(&text);
    let a = serde_json::to_string(&go(&t)).expect("json");
    let b = serde_json::to_string(&go(&t)).expect("json");
    assert_eq!(a, b);
    let other = serde_json::to_string(&run(&t, &Options { seed: Some(99) }, |_| {})).expect("json");
    assert_ne!(a, other, "a different seed should change a run with churn");
}

#[test]
fn a_region_going_dark_reroutes_without_losing_generations() {
    let calm = go(&topo(TWO_REGIONS));
    assert_eq!(calm.reroutes, 0);
    let dark = go(&topo(&format!(
        "{TWO_REGIONS}\n[[events]]\nat_s = 303.3\nkind = \"region_down\"\nregion = \"eu\"\n"
    )));
    // (Not at a round 300 s: the clients run in step, and at 300 s all six think.)
    // The European clients lose their nearby servers: they fail over to the US ones,
    // lose nothing, and pay the ocean on every hop.
    assert!(
        dark.reroutes >= 6,
        "every client re-routes at least once: {}",
        dark.reroutes
    );
    assert_eq!(dark.generations_lost, 0);
    assert!(dark.uncovered_blocks.iter().all(|(_, n)| *n == 0));
    assert!(
        dark.decode_step_latency_ms.p95 > calm.decode_step_latency_ms.p95 + 50.0,
        "hops across the ocean must show: {} vs {}",
        dark.decode_step_latency_ms.p95,
        calm.decode_step_latency_ms.p95
    );
}

#[test]
fn a_region_holding_the_only_copy_leaves_blocks_uncovered_and_loses_generations() {
    // Only Europe serves blocks 40..80; it goes dark for ten minutes.
    let text = TWO_REGIONS.replacen("blocks = \"40..80\"", "blocks = \"0..40\"", 1);
    let t = topo(&format!(
        "{text}\n[[events]]\nat_s = 200\nkind = \"region_down\"\nregion = \"eu\"\n\n[[events]]\nat_s = 800\nkind = \"region_up\"\nregion = \"eu\"\n"
    ));
    let r = go(&t);
    let during: Vec<u32> = r
        .uncovered_blocks
        .iter()
        .filter(|(t, _)| *t > 200.0 && *t < 800.0)
        .map(|x| x.1)
        .collect();
    assert!(
        during.iter().all(|n| *n == 40),
        "blocks 40..80 uncovered while Europe is dark: {during:?}"
    );
    assert!(
        r.uncovered_blocks.last().is_some_and(|(_, n)| *n == 0),
        "covered again after: {:?}",
        r.uncovered_blocks
    );
    assert!(
        r.generations_lost > 0,
        "generations waiting 20 s for a route are lost"
    );
}

#[test]
fn a_flash_crowd_queues_on_the_servers() {
    let base = go(&topo(TWO_REGIONS));
    let crowd = go(&topo(&format!(
        "{TWO_REGIONS}\n[[clients]]\ncount = 200\nregion = \"us\"\nprompt_tokens = 128\nnew_tokens = 64\nthink_s = 2\nstart_s = 300\n"
    )));
    assert!(
        crowd.tokens_per_second_total > base.tokens_per_second_total * 2.0,
        "more users, more total tokens"
    );
    assert!(
        crowd.decode_step_latency_ms.p99 > base.decode_step_latency_ms.p99 * 2.0,
        "steps queue behind each other: p99 {} vs {}",
        crowd.decode_step_latency_ms.p99,
        base.decode_step_latency_ms.p99
    );
    assert!(crowd.tokens_per_second_per_client.min < base.tokens_per_second_per_client.min);
}

const CHAIN: &str = r#"
name = "chain"
model = "llama-3-8b"
duration_s = 300

[[region]]
name = "lan"
rtt_ms = { lan = 1 }

[[nodes]]
count = 1
region = "lan"
memory_gb = 16
tflops = 50
mem_bandwidth_gbs = 500
uplink_mbps = 1000
downlink_mbps = 1000
blocks = "0..16"

[[nodes]]
count = 1
region = "lan"
memory_gb = 16
tflops = SECOND_TFLOPS
mem_bandwidth_gbs = SECOND_BW
uplink_mbps = 1000
downlink_mbps = 1000
blocks = "16..32"

[[clients]]
count = 1
region = "lan"
prompt_tokens = 32
new_tokens = 128
"#;

fn chain(tflops: f64, bw: f64, extra: &str) -> Report {
    let text = CHAIN
        .replace("SECOND_TFLOPS", &tflops.to_string())
        .replace("SECOND_BW", &bw.to_string());
    go(&topo(&format!("{text}{extra}")))
}

#[test]
fn a_slow_node_on_the_critical_path_sets_the_pace_until_a_replica_routes_around_it() {
    let fast = chain(50.0, 500.0, "");
    let slow = chain(5.0, 25.0, "");
    // The slow node reads its 16 blocks (~1.96 GB) at 25 GB/s: ~78 ms per token against
    // ~4 ms at 500 GB/s. The decode step must grow by about that difference.
    let grown = slow.decode_step_latency_ms.p50 - fast.decode_step_latency_ms.p50;
    assert!((60.0..100.0).contains(&grown), "step grew by {grown} ms");
    // A fast replica of the same blocks: the route avoids the slow node.
    let replica = "\n[[nodes]]\ncount = 1\nregion = \"lan\"\nmemory_gb = 16\ntflops = 50\nmem_bandwidth_gbs = 500\nuplink_mbps = 1000\ndownlink_mbps = 1000\nblocks = \"16..32\"\n";
    let routed = chain(5.0, 25.0, replica);
    let ratio = routed.decode_tokens_per_second / fast.decode_tokens_per_second;
    assert!(
        (0.9..1.1).contains(&ratio),
        "with a fast replica the pace is the fast one: {ratio}"
    );
}

#[test]
fn malformed_files_name_the_line_and_the_field() {
    let cases = [
        (
            TWO_REGIONS.replacen("memory_gb = 48", "memory_gb = \"lots\"", 1),
            18,
            "memory_gb",
        ),
        (
            TWO_REGIONS.replacen("uplink_mbps = 1000", "uplnk_mbps = 1000", 1),
            21,
            "uplnk_mbps",
        ),
        (
            TWO_REGIONS.replacen(
                "region = \"us\"\nmemory_gb",
                "region = \"mars\"\nmemory_gb",
                1,
            ),
            17,
            "region",
        ),
        (
            TWO_REGIONS.replacen("blocks = \"0..40\"", "blocks = \"30..90\"", 1),
            23,
            "blocks",
        ),
        (
            TWO_REGIONS.replacen("model = \"llama-2-70b\"", "model = \"gpt-9\"", 1),
            3,
            "model",
        ),
        (
            TWO_REGIONS.replacen("rtt_ms = { us = 20, eu = 90 }", "rtt_ms = { us = 20 }", 1),
            9,
            "rtt_ms",
        ),
    ];
    for (text, line, field) in cases {
        let err = Topology::parse(&text).expect_err("malformed").to_string();
        assert!(
            err.starts_with(&format!("line {line}, field `{field}`")),
            "expected line {line}, {field}: {err}"
        );
    }
}

/// One region with `rtt` ms round trips, two servers of the default model (0..15,
/// 15..30) on `mbps` links, and a `[[clients]]` group of the fields in `clients`.
fn two_servers(rtt: f64, mbps: f64, clients: &str) -> Topology {
    let mut t = format!(
        "name = \"chain\"\nmodel = \"smollm2-135m\"\nduration_s = 300\n\n[[region]]\nname = \"lo\"\nrtt_ms = {{ lo = {rtt} }}\n\n"
    );
    for span in ["0..15", "15..30"] {
        t += &format!(
            "[[nodes]]\ncount = 1\nregion = \"lo\"\nmemory_gb = 8\ntflops = 0.2\nmem_bandwidth_gbs = 20\nuplink_mbps = {mbps}\ndownlink_mbps = {mbps}\nblocks = \"{span}\"\n\n"
        );
    }
    topo(&(t + "[[clients]]\nregion = \"lo\"\n" + clients))
}

#[test]
fn speculation_multiplies_tokens_per_round_trip() {
    let plain = go(&two_servers(
        100.0,
        1000.0,
        "count = 1\nprompt_tokens = 32\nnew_tokens = 64\n",
    ))
    .decode_tokens_per_second;
    // A plain step is 3 one-way trips of 50 ms plus ~4 ms on the servers. With 4
    // drafts a step, half accepted: 3 tokens a step of ~156 ms (5 rows cost a little
    // more than one).
    let spec = go(&two_servers(
        100.0,
        1000.0,
        "count = 1\nprompt_tokens = 32\nnew_tokens = 64\nspeculate = { drafts = 4, acceptance = 0.5 }\n",
    ))
    .decode_tokens_per_second;
    let gain = spec / plain;
    assert!(gain > 2.7 && gain < 3.0, "gain {gain:.2}");
    // Drafting is the client's time: 4 drafts of 25 ms make a step ~256 ms, for 3
    // tokens against 1 in ~154 ms.
    let slow = go(&two_servers(
        100.0,
        1000.0,
        "count = 1\nprompt_tokens = 32\nnew_tokens = 64\nspeculate = { drafts = 4, acceptance = 0.5, draft_ms = 25 }\n",
    ))
    .decode_tokens_per_second;
    let gain = slow / plain;
    assert!(gain > 1.75 && gain < 1.85, "gain {gain:.2}");
}

#[test]
fn the_clients_own_work_is_part_of_every_step() {
    let plain = go(&two_servers(
        20.0,
        1000.0,
        "count = 1\nprompt_tokens = 32\nnew_tokens = 64\n",
    ))
    .decode_tokens_per_second;
    let busy = go(&two_servers(
        20.0,
        1000.0,
        "count = 1\nprompt_tokens = 32\nnew_tokens = 64\nstep_ms = 10\n",
    ))
    .decode_tokens_per_second;
    let extra = 1.0 / busy - 1.0 / plain;
    assert!((extra - 0.010).abs() < 1e-4, "a step longer by {extra} s");
}

#[test]
fn clients_sharing_servers_are_batched() {
    // No round trip: the servers are the bottleneck, and a step reads the weights
    // once for every client in its batch.
    let one = go(&two_servers(
        0.0,
        1000.0,
        "count = 1\nprompt_tokens = 32\nnew_tokens = 64\n",
    ))
    .decode_tokens_per_second;
    let eight = go(&two_servers(
        0.0,
        1000.0,
        "count = 8\nprompt_tokens = 32\nnew_tokens = 64\n",
    ));
    let each = eight.decode_tokens_per_second;
    // Queued one after the other, eight would each get an eighth.
    assert!(
        each > one / 8.0 * 3.0,
        "one alone {one:.1} tok/s, each of eight {each:.1}"
    );
    assert!(
        each < one,
        "one alone {one:.1} tok/s, each of eight {each:.1}"
    );
}

#[test]
fn a_servers_uplink_carries_the_clients_copy_too() {
    // Eight clients on 1 Mbit/s links, no round trip: the first server sends each
    // decode step's output (576 floats, 18,432 bits) to the second server and a copy
    // to the client, so its uplink passes at most 1e6 / 36,864 = 27.1 steps a second
    // in all (the second server's, sending only the result, would pass 54.3).
    let t = two_servers(
        0.0,
        1.0,
        "count = 8\nprompt_tokens = 4\nnew_tokens = 2000\nthink_s = 0\n",
    );
    let total = go(&t).tokens_per_second_total;
    assert!((total - 27.1).abs() < 2.0, "{total:.1} tok/s in all");
}
