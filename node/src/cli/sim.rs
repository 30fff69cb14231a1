//! `shoal sim`: a swarm topology run in virtual time by the simulator.

use std::time::Instant;

use anyhow::Context;

use crate::args::SimArgs;

/// `shoal sim`: runs a topology in virtual time and prints the report.
pub fn simulate(args: SimArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.topology)
        .with_context(|| format!("cannot read {}", args.topology.display()))?;
    let topo = sim::Topology::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.topology.display()))?;
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {percent}% ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!(
        "simulating {} for {} s",
        topo.name, topo.duration_s
    ));
    let started = Instant::now();
    let report = sim::run(&topo, &sim::Options { seed: args.seed }, |f| {
        bar.set_position((f * 1000.0) as u64)
    });
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let r = &report;
    println!(
        "{} ({}), {} s virtual in {wall:.1} s, seed {}",
        r.topology, r.model, r.duration_s, r.seed
    );
    println!(
        "  nodes: {} started, {} alive at the end ({} chose their span); clients: {}",
        r.nodes_started, r.nodes_alive_at_end, r.auto_nodes, r.clients
    );
    println!(
        "  generations: {} completed, {} lost; tokens: {}",
        r.generations_completed, r.generations_lost, r.tokens_generated
    );
    println!(
        "  tokens/s: {:.1} in total; per client mean {:.2} (min {:.2}, max {:.2})",
        r.tokens_per_second_total,
        r.tokens_per_second_per_client.mean,
        r.tokens_per_second_per_client.min,
        r.tokens_per_second_per_client.max
    );
    println!("  decode: {:.2} tokens/s per generation; step latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms", r.decode_tokens_per_second, r.decode_step_latency_ms.p50, r.decode_step_latency_ms.p95, r.decode_step_latency_ms.p99);
    println!(
        "  re-routes: {}; rebalances: {}; events: {}",
        r.reroutes, r.rebalances, r.events
    );
    let worst = r.uncovered_blocks.iter().map(|x| x.1).max().unwrap_or(0);
    let minutes = r.uncovered_blocks.iter().filter(|x| x.1 > 0).count();
    println!(
        "  blocks uncovered: at most {worst}; in {minutes} of {} one-minute samples",
        r.uncovered_blocks.len()
    );
    Ok(())
}
