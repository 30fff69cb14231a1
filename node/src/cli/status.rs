//! `shoal status`: every server the DHT knows, with its span, speed and reachability.

use std::time::Duration;

use super::short;
use super::short_link;
use super::GOODBYE_TIMEOUT;
use crate::args::StatusArgs;
use crate::net::connect_any;
use crate::net::{self, NetConfig};

/// A server's reachability as `shoal status` shows it: what the server found out
/// (public, relayed, ...) and, where it differs, how this node reached it (a server
/// behind a NAT reached directly after a hole punch shows `relayed, hole-punched`).
fn reach(r: protocol::Reachability, link: Option<&str>) -> String {
    match link {
        Some("hole-punched") => format!("{r}, hole-punched"),
        Some(l) if l.starts_with("relayed:") && r != protocol::Reachability::Relayed => {
            format!("{r}, {}", short_link(l))
        }
        Some(l) if l.starts_with("relayed:") => format!("{r} via {}", short(&l[8..])),
        _ => r.to_string(),
    }
}

/// `shoal status`: asks every server the DHT knows for its announcement.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (net, _inbound) = net::start(NetConfig {
        listen: vec![],
        dht_server: false,
        shaping: None,
        swarm_key: args.swarm_key.load()?,
        identity: None,
        mdns: false,
        relay: None,
    })?;
    connect_any(
        &net,
        &args.bootstrap,
        Duration::from_secs_f64(args.connect_timeout),
    )
    .await?;
    let what = || "the DHT's records and the servers found to answer".to_string();
    let seen = crate::patience::noting_wait(
        what,
        crate::client::survey::survey(&net, None, Duration::from_secs(5)),
    )
    .await;
    net.close_all(GOODBYE_TIMEOUT).await;
    let coverage = crate::client::survey::coverage(&seen);
    let (rows, silent): (Vec<_>, Vec<_>) = seen.into_iter().partition(|s| s.answering());
    if args.json {
        let cov: serde_json::Map<String, serde_json::Value> = coverage
            .iter()
            .map(|(m, (_, c))| (m.clone(), serde_json::json!(c)))
            .collect();
        println!(
            "{}",
            serde_json::json!({"servers": rows, "silent": silent, "coverage": cov})
        );
        return Ok(());
    }
    println!(
        "{:<54} {:>9} {:>10} {:>11} {:>8}  {:<28} name",
        "peer", "blocks", "tokens/s", "free cache", "rtt ms", "reachability"
    );
    for r in &rows {
        let a = &r.announcement;
        println!(
            "{:<54} {:>9} {:>10.1} {:>11} {:>8.1}  {:<28} {}",
            a.peer_id,
            a.span.to_string(),
            a.throughput,
            a.free_cache_tokens,
            r.rtt_ms.unwrap_or(f64::NAN),
            reach(a.reachability, r.link.as_deref()),
            a.public_name
        );
    }
    for s in &silent {
        let a = &s.announcement;
        println!(
            "{:<54} {:>9}  not answering (announced {})",
            a.peer_id,
            a.span.to_string(),
            a.public_name
        );
    }
    for (model, (n, counts)) in &coverage {
        let size = rows
            .iter()
            .map(|r| &r.announcement)
            .find(|a| &a.model_id == model && a.params.total > 0)
            .map(|a| describe_params(a.params))
            .unwrap_or_default();
        println!("\n{model}: {n} blocks{size}, servers per block:");
        if coverage.len() > 1 {
            println!("  (a node with no model file joins it with --model-id {model})");
        }
        let mut at = 0usize;
        while at < counts.len() {
            let mut end = at;
            while end < counts.len() && counts[end] == counts[at] {
                end += 1;
            }
            let note = if counts[at] == 0 {
                "  <- nobody serves these"
            } else {
                ""
            };
            println!("  {at:>4}..{end:<4} x{}{note}", counts[at]);
            at = end;
        }
    }
    if rows.is_empty() {
        println!("(no servers found)");
    }
    Ok(())
}

/// `, 30.5B parameters (3.3B active)` (the active count only for a mixture of
/// experts).
fn describe_params(p: protocol::ModelParams) -> String {
    let human = |n: u64| {
        let n = n as f64;
        if n >= 1e9 {
            format!("{:.1}B", n / 1e9)
        } else {
            format!("{:.0}M", n / 1e6)
        }
    };
    if p.active < p.total {
        format!(
            ", {} parameters ({} active)",
            human(p.total),
            human(p.active)
        )
    } else {
        format!(", {} parameters", human(p.total))
    }
}
