//! Routing: the chain of servers with the lowest expected time per token.

/// A server as the router sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerView {
    /// Opaque id (the peer id in a real node).
    pub id: String,
    /// Blocks served, `[start, end)`.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
    /// Measured decode throughput over its whole span, tokens per second.
    pub throughput: f32,
    /// Round-trip time to it in seconds, if measured.
    pub rtt: Option<f32>,
    /// Sessions it is serving now. Their steps share its compute, so each makes a step
    /// about that much slower; counting them spreads clients over replicas instead of
    /// piling every client onto the single fastest server.
    pub sessions: u32,
    /// Reachable only through a relay (behind a NAT, no hole punched yet): every step
    /// to it crosses the relay. Its measured round trip (through the relay) is its
    /// cost; unmeasured, it is assumed [`DEFAULT_RELAYED_RTT_S`], not the LAN guess.
    pub relayed: bool,
}

/// One hop of a planned route: which server runs which blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteHop {
    /// Index into the `servers` slice given to [`plan_route`].
    pub server: usize,
    /// First block this hop runs.
    pub start: u32,
    /// One past the last block this hop runs.
    pub end: u32,
}

/// Why no route exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Some blocks are served by nobody (usable).
    #[error("no usable server covers blocks {uncovered} (servers cover: {covered})")]
    Uncovered {
        /// The blocks nobody serves, as ranges (`10..12, 20..21`).
        uncovered: String,
        /// The ranges that are served.
        covered: String,
    },
}

/// Time assumed for a hop whose round trip was never measured: a LAN-ish guess, high
/// enough that measured fast peers win, low enough not to rule unmeasured ones out.
const DEFAULT_RTT_S: f32 = 0.01;

/// Time assumed for an unmeasured hop through a relay: two legs and a relay that
/// serves many, a hundred milliseconds. A measured one is used as measured, and only
/// while it lasts: once a hole is punched the client measures the direct path, so one
/// slow relay measurement cannot keep a server out of routes for good (Mesh LLM's
/// 2.6 s relay round trip kept its pipeline from ever splitting).
pub const DEFAULT_RELAYED_RTT_S: f32 = 0.1;

/// Expected seconds for `server` to run `blocks` blocks of one token, plus its round trip.
fn hop_cost(s: &ServerView, blocks: u32) -> f32 {
    let span = s.end.saturating_sub(s.start).max(1) as f32;
    let busy = 1.0 + s.sessions as f32;
    let unmeasured = if s.relayed {
        DEFAULT_RELAYED_RTT_S
    } else {
        DEFAULT_RTT_S
    };
    s.rtt.unwrap_or(unmeasured) + busy * blocks as f32 / (s.throughput.max(1e-6) * span)
}

fn ranges(blocks: impl Iterator<Item = u32>) -> String {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some(r) if r.1 == b => r.1 = b + 1,
            _ => out.push((b, b + 1)),
        }
    }
    if out.is_empty() {
        return "none".into();
    }
    out.iter()
        .map(|(a, b)| format!("{a}..{b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Plans the chain with the lowest expected time per token through blocks
/// `[from, n_blocks)`.
///
/// A hop's cost is its round trip plus its per-token time for the blocks it runs; a
/// server may run any sub-span of what it serves. The search is a shortest path over
/// block boundaries (`O(blocks^2 * servers)`); ties go to fewer hops, then to the
/// earlier server, so the result is deterministic.
pub fn plan_route(
    servers: &[ServerView],
    from: u32,
    n_blocks: u32,
) -> Result<Vec<RouteHop>, RouteError> {
    let (from, n) = (from as usize, n_blocks as usize);
    // best[b] = (cost, hops, previous boundary, server) of reaching boundary b.
    let mut best: Vec<Option<(f32, usize, usize, usize)>> = vec![None; n + 1];
    if from <= n {
        best[from] = Some((0.0, 0, from, usize::MAX));
    }
    for at in from..n {
        let Some((cost, hops, _, _)) = best[at] else {
            continue;
        };
        for (si, s) in servers.iter().enumerate() {
            let (start, end) = (s.start as usize, (s.end as usize).min(n));
            if !(start <= at && at < end) {
                continue;
            }
            for (to, slot) in best.iter_mut().enumerate().take(end + 1).skip(at + 1) {
                let c = cost + hop_cost(s, (to - at) as u32);
                let better = match *slot {
                    None => true,
                    Some((bc, bh, _, _)) => {
                        c < bc - 1e-9 || ((c - bc).abs() <= 1e-9 && hops + 1 < bh)
                    }
                };
                if better {
                    *slot = Some((c, hops + 1, at, si));
                }
            }
        }
    }
    if from >= n || best[n].is_none() {
        let covered = |b: u32| servers.iter().any(|s| s.start <= b && b < s.end);
        return Err(RouteError::Uncovered {
            uncovered: ranges(
                (from as u32..n_blocks.max(from as u32 + 1)).filter(|&b| !covered(b)),
            ),
            covered: ranges((0..n_blocks).filter(|&b| covered(b))),
        });
    }
    let mut route = Vec::new();
    let mut at = n;
    while at > from {
        let Some((_, _, prev, server)) = best[at] else {
            break;
        };
        route.push(RouteHop {
            server,
            start: prev as u32,
            end: at as u32,
        });
        at = prev;
    }
    route.reverse();
    Ok(route)
}

/// For each hop of `route`, the other servers that could run exactly its blocks, best
/// first: the replicas a client falls back to when that hop fails.
pub fn alternatives(servers: &[ServerView], route: &[RouteHop]) -> Vec<Vec<usize>> {
    route
        .iter()
        .map(|hop| {
            let mut alts: Vec<usize> = (0..servers.len())
                .filter(|&i| {
                    i != hop.server && servers[i].start <= hop.start && hop.end <= servers[i].end
                })
                .collect();
            alts.sort_by(|&a, &b| {
                hop_cost(&servers[a], hop.end - hop.start)
                    .total_cmp(&hop_cost(&servers[b], hop.end - hop.start))
                    .then(a.cmp(&b))
            });
            alts
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, start: u32, end: u32, tput: f32) -> ServerView {
        ServerView {
            id: id.into(),
            start,
            end,
            throughput: tput,
            rtt: Some(0.001),
            sessions: 0,
            relayed: false,
        }
    }

    #[test]
    fn relayed_servers_pay_for_the_relay() {
        let relayed = |id: &str, rtt: Option<f32>| ServerView {
            relayed: true,
            rtt,
            ..s(id, 0, 30, 100.0)
        };
        let direct = |id: &str| ServerView {
            rtt: None,
            ..s(id, 0, 30, 100.0)
        };
        // Equal speed, nothing measured: the direct one.
        let r = plan_route(&[relayed("r", None), direct("d")], 0, 30).expect("covered");
        assert_eq!(hops(&r), vec![(1, 0, 30)]);
        // A relay measured at 2.6 s loses even to a server four times slower...
        let slow = ServerView {
            throughput: 25.0,
            ..direct("slow")
        };
        let r = plan_route(&[relayed("r", Some(2.6)), slow.clone()], 0, 30).expect("covered");
        assert_eq!(hops(&r), vec![(1, 0, 30)]);
        // ...but once a hole is punched (direct, measured 20 ms) the faster one wins.
        let punched = ServerView {
            relayed: false,
            rtt: Some(0.02),
            ..relayed("r", None)
        };
        let r = plan_route(&[punched, slow], 0, 30).expect("covered");
        assert_eq!(hops(&r), vec![(0, 0, 30)]);
    }

    fn hops(r: &[RouteHop]) -> Vec<(usize, u32, u32)> {
        r.iter().map(|h| (h.server, h.start, h.end)).collect()
    }

    #[test]
    fn covers_every_block_with_consecutive_hops() {
        let servers = vec![
            s("a", 0, 10, 100.0),
            s("b", 10, 20, 100.0),
            s("c", 20, 30, 100.0),
        ];
        let r = plan_route(&servers, 0, 30).expect("covered");
        assert_eq!(hops(&r), vec![(0, 0, 10), (1, 10, 20), (2, 20, 30)]);
    }

    #[test]
    fn prefers_fewer_faster_hops_and_uses_sub_spans() {
        let servers = vec![
            s("slow", 0, 30, 1.0),
            s("a", 0, 15, 200.0),
            s("b", 10, 30, 200.0),
        ];
        let r = plan_route(&servers, 0, 30).expect("covered");
        // b's blocks are cheaper (same speed over a longer span, so less time per
        // block), so the hand-over happens as early as b allows: a sub-span of a.
        assert_eq!(hops(&r), vec![(1, 0, 10), (2, 10, 30)]);
        // With a single fast server covering everything, one hop wins.
        let servers = vec![
            s("all", 0, 30, 200.0),
            s("a", 0, 15, 200.0),
            s("b", 15, 30, 200.0),
        ];
        assert_eq!(plan_route(&servers, 0, 30).expect("covered").len(), 1);
    }

    #[test]
    fn measured_round_trips_steer_the_route() {
        let mut far = s("far", 0, 10, 100.0);
        far.rtt = Some(0.2);
        let near = s("near", 0, 10, 50.0);
        let r = plan_route(&[far, near], 0, 10).expect("covered");
        assert_eq!(hops(&r), vec![(1, 0, 10)]);
    }

    #[test]
    fn plans_from_a_middle_block_for_failover() {
        let servers = vec![
            s("a", 0, 10, 100.0),
            s("b", 10, 20, 100.0),
            s("b2", 5, 20, 90.0),
            s("c", 20, 30, 100.0),
        ];
        let r = plan_route(&servers, 10, 30).expect("covered");
        assert_eq!(r.first().map(|h| h.start), Some(10));
        assert_eq!(r.last().map(|h| h.end), Some(30));
        assert!(
            r.iter().all(|h| h.server != 0),
            "a serves nothing past block 10"
        );
    }

    #[test]
    fn busy_servers_are_passed_over_for_idle_replicas() {
        let mut busy = s("busy", 0, 10, 100.0);
        busy.sessions = 3;
        let idle = s("idle", 0, 10, 60.0);
        let r = plan_route(&[busy.clone(), idle], 0, 10).expect("covered");
        assert_eq!(hops(&r), vec![(1, 0, 10)]);
        busy.sessions = 0;
        let r = plan_route(&[busy, s("idle", 0, 10, 60.0)], 0, 10).expect("covered");
        assert_eq!(hops(&r), vec![(0, 0, 10)]);
    }

    #[test]
    fn keeps_alternatives_for_every_hop_best_first() {
        let servers = vec![
            s("a", 0, 10, 100.0),
            s("a-slow", 0, 10, 10.0),
            s("a-fast-but-chosen-elsewhere", 0, 12, 50.0),
            s("b", 10, 20, 100.0),
        ];
        let r = plan_route(&servers, 0, 20).expect("covered");
        let alts = alternatives(&servers, &r);
        assert_eq!(alts.len(), r.len());
        assert_eq!(hops(&r)[0], (0, 0, 10));
        assert_eq!(alts[0], vec![2, 1]);
        assert!(alts[1].is_empty(), "b has no replica");
    }

    #[test]
    fn names_the_uncovered_blocks() {
        let servers = vec![
            s("a", 0, 10, 100.0),
            s("c", 12, 30, 100.0),
            s("d", 20, 29, 1.0),
        ];
        let err = plan_route(&servers, 0, 31).expect_err("gap");
        assert_eq!(
            err,
            RouteError::Uncovered {
                uncovered: "10..12, 30..31".into(),
                covered: "0..10, 12..30".into()
            }
        );
        assert!(err
            .to_string()
            .contains("no usable server covers blocks 10..12, 30..31"));
        let err = plan_route(&[], 0, 4).expect_err("empty swarm");
        assert_eq!(
            err,
            RouteError::Uncovered {
                uncovered: "0..4".into(),
                covered: "none".into()
            }
        );
    }
}
