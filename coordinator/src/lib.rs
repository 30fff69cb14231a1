//! Shoal's decisions, as pure functions over plain data.
//!
//! This crate knows nothing of sockets, tensors or clocks: callers pass in what they
//! measured, and the same code runs inside a real node and inside the simulator. Today it
//! plans routes; block selection, rebalancing and bans join it as the swarm grows.

/// A server as the router sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerView {
    /// Opaque id (the peer id in a real node).
    pub id: String,
    /// Blocks served, `[start, end)`.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
    /// Measured decode throughput over its whole span, tokens per second (> 0).
    pub throughput: f32,
    /// Round-trip time to it in seconds, if measured.
    pub rtt: Option<f32>,
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
    /// Some blocks are served by nobody.
    #[error("no server covers block {block} (the swarm serves blocks {covered})")]
    Uncovered {
        /// First block nobody serves.
        block: u32,
        /// A readable list of covered ranges.
        covered: String,
    },
}

/// Time assumed for a hop whose round trip was never measured: a LAN-ish guess, high
/// enough that measured fast peers win, low enough not to rule unmeasured ones out.
const DEFAULT_RTT_S: f32 = 0.01;

/// Plans the chain of servers with the lowest expected time per token through blocks
/// `[0, n_blocks)`.
///
/// A hop's cost is its round trip plus the share of its span's per-token time for the
/// blocks it runs; a server may run any sub-span of what it serves. The search is a
/// shortest path over block boundaries (`O(blocks^2 * servers)`), and ties go to fewer
/// hops, then to the earlier server, so the result is deterministic.
pub fn plan_route(servers: &[ServerView], n_blocks: u32) -> Result<Vec<RouteHop>, RouteError> {
    let n = n_blocks as usize;
    // best[b] = (cost, hops, previous boundary, server) of reaching boundary b.
    let mut best: Vec<Option<(f32, usize, usize, usize)>> = vec![None; n + 1];
    best[0] = Some((0.0, 0, 0, usize::MAX));
    for from in 0..n {
        let Some((cost, hops, _, _)) = best[from] else {
            continue;
        };
        for (si, s) in servers.iter().enumerate() {
            let (start, end) = (s.start as usize, (s.end as usize).min(n));
            if !(start <= from && from < end) || s.throughput <= 0.0 {
                continue;
            }
            let per_block = 1.0 / (s.throughput * (s.end - s.start) as f32);
            let rtt = s.rtt.unwrap_or(DEFAULT_RTT_S);
            for (to, slot) in best.iter_mut().enumerate().take(end + 1).skip(from + 1) {
                let c = cost + rtt + per_block * (to - from) as f32;
                let better = match *slot {
                    None => true,
                    Some((bc, bh, _, _)) => {
                        c < bc - 1e-9 || ((c - bc).abs() <= 1e-9 && hops + 1 < bh)
                    }
                };
                if better {
                    *slot = Some((c, hops + 1, from, si));
                }
            }
        }
    }
    if best[n].is_none() {
        let block = (0..n).find(|&b| {
            !servers
                .iter()
                .any(|s| s.start as usize <= b && b < s.end as usize)
        });
        let mut spans: Vec<(u32, u32)> = servers.iter().map(|s| (s.start, s.end)).collect();
        spans.sort();
        let covered = if spans.is_empty() {
            "none".to_string()
        } else {
            spans
                .iter()
                .map(|(a, b)| format!("{a}..{b}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(RouteError::Uncovered {
            block: block.unwrap_or(0) as u32,
            covered,
        });
    }
    let mut route = Vec::new();
    let mut at = n;
    while at > 0 {
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
        }
    }

    #[test]
    fn covers_every_block_with_consecutive_hops() {
        let servers = vec![
            s("a", 0, 10, 100.0),
            s("b", 10, 20, 100.0),
            s("c", 20, 30, 100.0),
        ];
        let r = plan_route(&servers, 30).expect("covered");
        assert_eq!(
            r.iter()
                .map(|h| (h.server, h.start, h.end))
                .collect::<Vec<_>>(),
            vec![(0, 0, 10), (1, 10, 20), (2, 20, 30)]
        );
    }

    #[test]
    fn prefers_fewer_faster_hops_and_uses_sub_spans() {
        let servers = vec![
            s("slow", 0, 30, 1.0),
            s("a", 0, 15, 200.0),
            s("b", 10, 30, 200.0),
        ];
        let r = plan_route(&servers, 30).expect("covered");
        assert_eq!(r.len(), 2);
        // b's blocks are cheaper (same speed over a longer span, so less time per
        // block), so the hand-over happens as early as b allows: a sub-span of a.
        assert_eq!((r[0].server, r[0].start, r[0].end), (1, 0, 10));
        assert_eq!((r[1].server, r[1].start, r[1].end), (2, 10, 30));
        // With a single fast server covering everything, one hop wins.
        let servers = vec![
            s("all", 0, 30, 200.0),
            s("a", 0, 15, 200.0),
            s("b", 15, 30, 200.0),
        ];
        let r = plan_route(&servers, 30).expect("covered");
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn reports_the_first_uncovered_block() {
        let servers = vec![s("a", 0, 10, 100.0), s("c", 20, 30, 100.0)];
        let err = plan_route(&servers, 30).expect_err("gap");
        assert_eq!(
            err,
            RouteError::Uncovered {
                block: 10,
                covered: "0..10, 20..30".into()
            }
        );
        assert!(matches!(
            plan_route(&[], 4),
            Err(RouteError::Uncovered { block: 0, .. })
        ));
    }
}
