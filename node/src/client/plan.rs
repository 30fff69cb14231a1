//! Planning and opening a chain: announcements from the DHT, probes of the servers,
//! the fastest route by `coordinator`, and a session opened on each hop.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use coordinator::timeouts::DEATH_PROBE_TIMEOUT;
use libp2p::{Multiaddr, PeerId};
use protocol::{Announcement, BlockSpan, OpenSession, Request, Response, WireDType};
use tokio::sync::mpsc;

use super::route_line;
use super::session::SessionSpec;
use super::ActiveHop;
use super::Client;
use super::Delivery;
use super::PlannedHop;
use super::RemoteSession;
use super::OPEN_TIMEOUT;

/// The pause before planning again after a chain's server refused to open a session.
const REPLAN_PAUSE: Duration = Duration::from_millis(250);
use super::PROBE_TIMEOUT;
use crate::net::Link;
use crate::patience::noting_wait;
use crate::NodeError;

impl Client {
    /// Plans the fastest chain through blocks `[from, n_blocks)` among servers that are
    /// not banned and have room for `max_len` tokens. Tries the announcements already
    /// in `known` first (a failover must not wait on the DHT), then looks again until
    /// `deadline`.
    pub(super) async fn plan(
        &self,
        spec: &SessionSpec,
        from: u32,
        deadline: Instant,
        known: &mut Vec<Announcement>,
    ) -> anyhow::Result<Vec<PlannedHop>> {
        let mut fresh = known.is_empty();
        let mut attempt = 0;
        loop {
            if fresh {
                // A quick lookup first; after one that left blocks uncovered, patient
                // ones (the peers that answer first may know only part of the swarm).
                *known = if attempt == 0 {
                    self.net.find_servers(&spec.model_id).await?
                } else {
                    let mut found = self.net.find_servers_patiently(&spec.model_id).await?;
                    // Records can be lost with the peers that held them (under churn,
                    // until their owners announce again): ask the DHT servers we know.
                    self.ask_dht_peers(&spec.model_id, &mut found).await;
                    found
                };
                attempt += 1;
                tracing::debug!(
                    attempt,
                    found = ?known.iter().map(|a| (a.peer_id.as_str(), a.span.to_string(), &a.addrs)).collect::<Vec<_>>(),
                    "looked up servers"
                );
            }
            // Ask the candidates directly: the DHT still lists servers that died within
            // its record lifetime, and their free cache there is stale.
            let candidates: Vec<&Announcement> =
                known.iter().filter(|a| a.span.end > from).collect();
            let alive = self
                .probe(&candidates, from, spec.n_blocks, spec.max_len)
                .await;
            // Banned servers are avoided while others can do the job; a banned server
            // that answers its probe is better than no route at all.
            let unbanned: Vec<Announcement> = alive
                .iter()
                .filter(|a| !self.is_banned(&a.peer_id))
                .cloned()
                .collect();
            let err = match self.route_from(&unbanned, from, spec.n_blocks).await {
                Ok(route) => return Ok(route),
                Err(e) => match self.route_from(&alive, from, spec.n_blocks).await {
                    Ok(route) => return Ok(route),
                    Err(_) => e,
                },
            };
            if Instant::now() >= deadline {
                return Err(err.context(crate::error::NoRoute {
                    model: spec.model_id.clone(),
                    max_len: spec.max_len,
                }));
            }
            if fresh {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            fresh = true;
        }
    }

    /// Asks each server for its current announcement (a dead server's record can
    /// outlive it in the DHT, and the record's free cache is stale) and returns those
    /// that answer and have room for `max_len` tokens. Stops waiting once the answers
    /// cover blocks `[from, n_blocks)` and a short while has passed for more (a dead
    /// server must not hold up a failover for the whole [`PROBE_TIMEOUT`]).
    /// Asks every DHT server in the routing table that `known` lacks for its
    /// announcement, and adds those serving `model_id`.
    pub(super) async fn ask_dht_peers(&self, model_id: &str, known: &mut Vec<Announcement>) {
        let Ok(peers) = self.net.dht_peers().await else {
            return;
        };
        let asks = peers
            .into_iter()
            .filter(|(p, _)| !known.iter().any(|a| a.peer_id == p.to_string()))
            .map(|(peer, addrs)| {
                let net = self.net.clone();
                async move {
                    match tokio::time::timeout(
                        PROBE_TIMEOUT,
                        net.request(peer, addrs, Request::Info),
                    )
                    .await
                    {
                        Ok(Ok(Response::Info(a))) if a.peer_id == peer.to_string() => Some(a),
                        _ => None,
                    }
                }
            });
        for a in futures::future::join_all(asks).await.into_iter().flatten() {
            if a.model_id == model_id {
                known.push(a);
            }
        }
    }

    pub(super) async fn probe(
        &self,
        candidates: &[&Announcement],
        from: u32,
        n_blocks: u32,
        max_len: u32,
    ) -> Vec<Announcement> {
        use futures::StreamExt;
        let mut asks: futures::stream::FuturesUnordered<_> = candidates
            .iter()
            .filter_map(|a| {
                let peer: PeerId = a.peer_id.parse().ok()?;
                let addrs: Vec<Multiaddr> = a.addrs.iter().filter_map(|x| x.parse().ok()).collect();
                let net = self.net.clone();
                Some(async move {
                    match net.request(peer, addrs, Request::Info).await {
                        Ok(Response::Info(fresh)) if fresh.peer_id == peer.to_string() => {
                            Some(fresh)
                        }
                        _ => None,
                    }
                })
            })
            .collect();
        let started = tokio::time::Instant::now();
        let mut deadline = started + PROBE_TIMEOUT;
        let mut found: Vec<Announcement> = Vec::new();
        let mut covered = vec![false; n_blocks as usize];
        loop {
            match tokio::time::timeout_at(deadline, asks.next()).await {
                Ok(Some(Some(a))) => {
                    if a.free_cache_tokens >= max_len as u64 && a.max_seq_len >= max_len {
                        for b in a.span.start..a.span.end.min(n_blocks) {
                            covered[b as usize] = true;
                        }
                        found.push(a);
                        if covered[from as usize..].iter().all(|c| *c) {
                            // Enough for a route: wait a little longer for better ones.
                            let settle = (started.elapsed() * 2).max(Duration::from_millis(20));
                            deadline = deadline.min(tokio::time::Instant::now() + settle);
                        }
                    }
                }
                Ok(Some(None)) => {}
                Ok(None) | Err(_) => return found,
            }
        }
    }

    /// True when the server answers a liveness probe within [`DEATH_PROBE_TIMEOUT`].
    pub(super) async fn alive(&self, hop: &PlannedHop) -> bool {
        let probe = self.net.request(hop.peer, hop.addrs.clone(), Request::Info);
        matches!(
            tokio::time::timeout(DEATH_PROBE_TIMEOUT, probe).await,
            Ok(Ok(Response::Info(_)))
        )
    }

    pub(super) async fn route_from(
        &self,
        found: &[Announcement],
        from: u32,
        n_blocks: u32,
    ) -> anyhow::Result<Vec<PlannedHop>> {
        let rtts = self.net.rtts().await.unwrap_or_default();
        let links = self.net.links().await.unwrap_or_default();
        let views: Vec<coordinator::ServerView> = found
            .iter()
            .map(|a| {
                let peer = a.peer_id.parse::<PeerId>().ok();
                // Relayed: connected only through a relay, or not connected and
                // reachable only that way by its own account.
                let relayed = match peer.and_then(|p| links.get(&p)) {
                    Some(Link::Relayed(_)) => true,
                    Some(_) => false,
                    None => a.reachability == protocol::Reachability::Relayed,
                };
                coordinator::ServerView {
                    id: a.peer_id.clone(),
                    start: a.span.start,
                    end: a.span.end,
                    throughput: a.throughput.max(1e-3),
                    rtt: peer.and_then(|p| rtts.get(&p)).map(|d| d.as_secs_f32()),
                    sessions: a.sessions,
                    relayed,
                }
            })
            .collect();
        let route = coordinator::plan_route(&views, from, n_blocks)?;
        route
            .into_iter()
            .map(|h| {
                let a = &found[h.server];
                Ok(PlannedHop {
                    peer: a
                        .peer_id
                        .parse()
                        .context("announcement with a bad peer id")?,
                    addrs: a.addrs.iter().filter_map(|x| x.parse().ok()).collect(),
                    span: BlockSpan::new(h.start, h.end),
                    throughput: a.throughput,
                })
            })
            .collect()
    }

    /// Opens a session on each planned server; on a refusal or an unreachable server,
    /// bans it and returns the error so the caller plans again.
    pub(super) async fn open_hops(
        &self,
        route: Vec<PlannedHop>,
        model_id: &str,
        max_len: u32,
        wire: WireDType,
        tx: &mpsc::UnboundedSender<Delivery>,
    ) -> anyhow::Result<Vec<ActiveHop>> {
        let hops: Vec<ActiveHop> = route
            .into_iter()
            .map(|hop| ActiveHop {
                hop,
                session: rand::random(),
            })
            .collect();
        for h in &hops {
            self.register(h.session, tx.clone());
        }
        let opens = hops.iter().map(|h| {
            let req = Request::Open(OpenSession {
                session: h.session,
                model_id: model_id.to_string(),
                span: h.hop.span,
                max_len,
                wire_dtype: wire,
            });
            let net = self.net.clone();
            let (peer, addrs) = (h.hop.peer, h.hop.addrs.clone());
            async move {
                let r = tokio::time::timeout(OPEN_TIMEOUT, net.request(peer, addrs, req)).await;
                (peer, r)
            }
        });
        let peers: Vec<String> = hops.iter().map(|h| h.hop.peer.to_string()).collect();
        let what = || format!("servers to open sessions: {}", peers.join(", "));
        let results = noting_wait(what, futures::future::join_all(opens)).await;
        let mut failure = None;
        for (peer, r) in results {
            let Some(problem) = super::refusal(r) else {
                continue;
            };
            self.ban(&peer);
            failure.get_or_insert(anyhow!("server {peer} {problem}"));
        }
        if let Some(e) = failure {
            self.close_hops(&hops).await;
            return Err(e);
        }
        Ok(hops)
    }

    /// Plans and opens a chain from block `from`, trying other servers until `deadline`.
    pub(super) async fn plan_and_open(
        &self,
        spec: &SessionSpec,
        from: u32,
        tx: &mpsc::UnboundedSender<Delivery>,
        deadline: Instant,
        known: &mut Vec<Announcement>,
    ) -> anyhow::Result<Vec<ActiveHop>> {
        let what = || {
            format!(
                "a chain of servers for blocks {from}..{} of {} with room for {} tokens (the DHT's records, or probes of the servers found)",
                spec.n_blocks, spec.model_id, spec.max_len
            )
        };
        loop {
            let route = noting_wait(what, self.plan(spec, from, deadline, known)).await?;
            match self
                .open_hops(route, &spec.model_id, spec.max_len, spec.wire, tx)
                .await
            {
                Ok(hops) => return Ok(hops),
                Err(e) if Instant::now() < deadline => {
                    // Not at once: a server that refused as busy is asked again only
                    // after a pause (at once, a client hit its request limit).
                    tracing::warn!("{e:#}; planning again");
                    tokio::time::sleep(REPLAN_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(super) async fn close_hops(&self, hops: &[ActiveHop]) {
        for h in hops {
            self.unregister(h.session);
        }
        let closes = hops.iter().map(|h| {
            let net = self.net.clone();
            let (peer, addrs, session) = (h.hop.peer, h.hop.addrs.clone(), h.session);
            async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    net.request(peer, addrs, Request::Close { session }),
                )
                .await;
            }
        });
        futures::future::join_all(closes).await;
    }

    /// Opens a generation's session over the fastest chain covering all `n_blocks`.
    /// `on_route` hears the route now and after every failover.
    pub async fn open_session(
        &self,
        model_id: &str,
        n_blocks: u32,
        max_len: u32,
        wire: WireDType,
        route_timeout: Duration,
        mut on_route: Box<dyn FnMut(&str) + Send>,
    ) -> Result<RemoteSession, NodeError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let deadline = Instant::now() + route_timeout;
        let spec = SessionSpec {
            model_id: model_id.to_string(),
            n_blocks,
            max_len,
            wire,
        };
        let mut known = Vec::new();
        let hops = self
            .plan_and_open(&spec, 0, &tx, deadline, &mut known)
            .await
            .map_err(NodeError::from)?;
        let links = self.net.links().await.unwrap_or_default();
        on_route(&route_line(&hops, &links));
        Ok(RemoteSession {
            client: self.clone(),
            spec,
            route_timeout,
            known,
            hops,
            tx,
            rx,
            disconnects: self.net.disconnects(),
            next_index: 0,
            position: 0,
            inputs: BTreeMap::new(),
            step_secs: None,
            reroutes: Vec::new(),
            on_route,
        })
    }
}
