//! The client side of the swarm: finding servers, planning a chain, running a session's
//! steps through it, and failing over when a server of the chain fails.
//!
//! A step goes to the first server of the chain with the rest of the route attached;
//! servers push it along, and every server also sends its output to the client (the last
//! one's is the result). Those copies are what the client keeps for failover: for every
//! block boundary of the chain, the hidden states that entered it at every position.
//!
//! When a step fails (a server reports a failure, the first server refuses, a server's
//! connection closes, or no result comes within a timeout adapted to recent steps), the
//! client bans the suspect, keeps the servers before it whose inputs it can vouch for,
//! plans a new chain from that block, replays the stored inputs into it so the new
//! servers' caches hold every earlier position, and carries on. Step indices only grow,
//! so a retried step is never applied twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use coordinator::Bans;
use libp2p::{Multiaddr, PeerId};
use protocol::{
    Announcement, BlockSpan, ErrorKind, HiddenState, Hop, OpenSession, Request, Response,
    SessionId, Step, WireDType,
};
use tokio::sync::mpsc;

use crate::hidden::{concat, relative_rms, rows};
use crate::net::{Link, Network};

/// What a server sends a session.
#[derive(Debug)]
pub enum Delivery {
    /// A server's output for a step.
    Output(protocol::StepOutput),
    /// A step failed somewhere in the chain.
    Failed(protocol::StepFailed),
}

type SessionTable = Arc<Mutex<HashMap<SessionId, mpsc::UnboundedSender<Delivery>>>>;

/// A swarm client: the network handle, the sessions awaiting outputs, and the bans.
#[derive(Clone)]
pub struct Client {
    net: Network,
    sessions: SessionTable,
    bans: Arc<Mutex<Bans>>,
    epoch: Instant,
    /// Chance, per server and step, of checking the server's output against a replica
    /// (see [`RemoteSession::verify`]); 0 = never.
    verify_rate: f64,
}

/// One server of a planned chain.
#[derive(Clone, Debug)]
pub struct PlannedHop {
    /// Who.
    pub peer: PeerId,
    /// Where to reach it.
    pub addrs: Vec<Multiaddr>,
    /// Blocks it runs for us.
    pub span: BlockSpan,
    /// Its announced decode speed over its whole span, tokens per second.
    pub throughput: f32,
}

/// A server of a session's chain, with the session opened on it.
#[derive(Clone, Debug)]
pub struct ActiveHop {
    /// The server and its blocks.
    pub hop: PlannedHop,
    /// The session id opened on it.
    pub session: SessionId,
}

/// Time allowed to open a session on one server that just answered a probe: opens wait
/// behind the steps queued on its compute thread.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for servers to answer `Info` while planning (answered off their compute
/// thread: a round trip plus scheduling slack on a loaded machine).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

// Step timeouts and the wait for a suspected server: `coordinator::timeouts`, which the
// simulator's clients use too.
use coordinator::timeouts::{step_timeout, DEATH_PROBE_TIMEOUT, FIRST_STEP_TIMEOUT};

/// Failovers tried for one step before giving up.
const MAX_RECOVERIES: usize = 8;

/// After a failure, time given to outputs already on their way, so the client knows
/// which servers finished the step.
const GRACE: Duration = Duration::from_millis(60);

/// A server's output and a replica's for the same inputs may differ by rounding (the
/// replica runs the history as one prefill, on other hardware); past this RMS distance,
/// relative to the replica's output, the server is taken to lie.
const VERIFY_TOLERANCE: f64 = 0.02;
/// Rows of history sent to a replica in one step when verifying.
const VERIFY_CHUNK: usize = 256;

/// A client's wait that lasts this long gets a line in the log saying what it waits
/// for (on a healthy swarm every wait is well under it)...
const SLOW_WAIT: Duration = Duration::from_secs(3);
/// ... and another every this long while it goes on.
const SLOW_WAIT_REPEAT: Duration = Duration::from_secs(10);

/// Awaits `fut`; if that takes longer than [`SLOW_WAIT`], warns what it is waiting for
/// (`what` says it), and again every [`SLOW_WAIT_REPEAT`]: a client that is slow says
/// why, so the next slowness explains itself.
pub async fn noting_wait<F: std::future::Future>(what: impl Fn() -> String, fut: F) -> F::Output {
    let started = tokio::time::Instant::now();
    let mut note_at = started + SLOW_WAIT;
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tokio::time::sleep_until(note_at) => {
                tracing::warn!("waiting {:.0?} so far for {}", started.elapsed(), what());
                note_at += SLOW_WAIT_REPEAT;
            }
        }
    }
}

impl Client {
    /// A client over `net`.
    pub fn new(net: Network) -> Self {
        Client {
            net,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            bans: Arc::new(Mutex::new(Bans::default())),
            epoch: Instant::now(),
            verify_rate: 0.0,
        }
    }

    /// Checks each server's output against a replica with chance `rate` per step (1 =
    /// every step of every server; 0 = never).
    pub fn with_verify_rate(mut self, rate: f64) -> Self {
        self.verify_rate = rate.clamp(0.0, 1.0);
        self
    }

    /// The network handle.
    pub fn net(&self) -> &Network {
        &self.net
    }

    /// Hands an output or failure to the session waiting for it. Returns false when no
    /// such session is open here.
    pub fn deliver(&self, session: SessionId, d: Delivery) -> bool {
        let table = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match table.get(&session) {
            Some(tx) => tx.send(d).is_ok(),
            None => false,
        }
    }

    fn register(&self, id: SessionId, tx: mpsc::UnboundedSender<Delivery>) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
    }

    fn unregister(&self, id: SessionId) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn ban(&self, peer: &PeerId) -> Duration {
        let now = self.epoch.elapsed();
        self.bans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail(&peer.to_string(), now)
    }

    fn is_banned(&self, peer: &str) -> bool {
        let now = self.epoch.elapsed();
        self.bans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_banned(peer, now)
    }

    /// Dials the bootstrap nodes; at least one must answer within `timeout`.
    pub async fn connect(&self, bootstrap: &[Multiaddr], timeout: Duration) -> anyhow::Result<()> {
        connect_any(&self.net, bootstrap, timeout).await
    }

    /// Plans the fastest chain through blocks `[from, n_blocks)` among servers that are
    /// not banned and have room for `max_len` tokens. Tries the announcements already
    /// in `known` first (a failover must not wait on the DHT), then looks again until
    /// `deadline`.
    async fn plan(
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
                return Err(err.context(format!(
                    "no chain of servers for model {} with room for {} tokens",
                    spec.model_id, spec.max_len
                )));
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
    async fn ask_dht_peers(&self, model_id: &str, known: &mut Vec<Announcement>) {
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

    async fn probe(
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
    async fn alive(&self, hop: &PlannedHop) -> bool {
        let probe = self.net.request(hop.peer, hop.addrs.clone(), Request::Info);
        matches!(
            tokio::time::timeout(DEATH_PROBE_TIMEOUT, probe).await,
            Ok(Ok(Response::Info(_)))
        )
    }

    async fn route_from(
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
    async fn open_hops(
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
            let problem = match r {
                Ok(Ok(Response::Opened { .. })) => continue,
                Ok(Ok(Response::Error(e))) => format!("refused the session: {e}"),
                Ok(Ok(other)) => format!("answered the session request with {other:?}"),
                Ok(Err(e)) => format!("unreachable: {e:#}"),
                Err(_) => format!("no answer within {OPEN_TIMEOUT:?}"),
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
    async fn plan_and_open(
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
                Err(e) if Instant::now() < deadline => tracing::warn!("{e:#}; planning again"),
                Err(e) => return Err(e),
            }
        }
    }

    async fn close_hops(&self, hops: &[ActiveHop]) {
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
    ) -> anyhow::Result<RemoteSession> {
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
            .await?;
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

/// `route <peer>[A..B] <peer>[B..C] ...`, as printed on stderr; a hop this client
/// reaches only through a relay is marked `(relayed:<relay>)`, one reached by hole
/// punching `(hole-punched)`.
pub fn route_line(hops: &[ActiveHop], links: &HashMap<PeerId, Link>) -> String {
    let parts: Vec<String> = hops
        .iter()
        .map(|h| {
            let how = match links.get(&h.hop.peer) {
                Some(l @ (Link::Relayed(_) | Link::HolePunched)) => format!("({l})"),
                _ => String::new(),
            };
            format!(
                "{}[{}..{}]{how}",
                h.hop.peer, h.hop.span.start, h.hop.span.end
            )
        })
        .collect();
    format!("route {}", parts.join(" "))
}

/// Dials each address; succeeds when at least one answers within `timeout`.
pub async fn connect_any(
    net: &Network,
    bootstrap: &[Multiaddr],
    timeout: Duration,
) -> anyhow::Result<()> {
    if bootstrap.is_empty() {
        return Ok(());
    }
    let dials = bootstrap.iter().map(|a| net.dial(a.clone(), timeout));
    let shown = || {
        let addrs: Vec<String> = bootstrap.iter().map(|a| a.to_string()).collect();
        format!("a bootstrap node to answer ({})", addrs.join(", "))
    };
    let results = noting_wait(shown, futures::future::join_all(dials)).await;
    if results.iter().any(|r| r.is_ok()) {
        return Ok(());
    }
    let reasons: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    Err(anyhow!(
        "could not reach any bootstrap node: {}",
        reasons.join("; ")
    ))
}

/// Relative RMS distance between two outputs of the same rows (infinite if they cannot
/// be compared).
fn distance(a: &HiddenState, b: &HiddenState) -> f64 {
    match (a.to_f32(), b.to_f32()) {
        (Ok(a), Ok(b)) if a.len() == b.len() => relative_rms(&a, &b),
        _ => f64::INFINITY,
    }
}

/// Beyond rounding; NaN (garbage) counts as a mismatch.
fn is_mismatch(distance: f64) -> bool {
    distance.is_nan() || distance > VERIFY_TOLERANCE
}

/// A failover that happened during a session.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reroute {
    /// The server blamed.
    pub failed_peer: String,
    /// What went wrong.
    pub reason: String,
    /// Position of the step that failed.
    pub position: u32,
    /// First block of the replaced part of the chain.
    pub from_block: u32,
    /// Tokens replayed into the new servers.
    pub replayed_tokens: u32,
    /// From noticing the failure to having the step's result, in milliseconds.
    pub recovery_ms: f64,
    /// The part of `recovery_ms` spent replaying history into the new servers.
    pub replay_ms: f64,
}

/// Why a step failed, and whom to blame.
#[derive(Debug)]
struct Failure {
    /// Index into the chain of the server blamed.
    suspect: usize,
    reason: String,
    /// Time from sending the step to noticing the failure.
    after: Duration,
}

/// What every server of a session must agree to.
struct SessionSpec {
    model_id: String,
    n_blocks: u32,
    max_len: u32,
    wire: WireDType,
}

/// A generation's state on a chain of servers.
pub struct RemoteSession {
    client: Client,
    spec: SessionSpec,
    route_timeout: Duration,
    /// Servers from the last DHT lookup, for planning a failover without a new one.
    known: Vec<Announcement>,
    hops: Vec<ActiveHop>,
    tx: mpsc::UnboundedSender<Delivery>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    disconnects: tokio::sync::broadcast::Receiver<PeerId>,
    /// Index of the next step sent (normal or replay): indices only grow.
    next_index: u64,
    /// Tokens processed so far.
    position: u32,
    /// For each block boundary: the hidden states that entered it, by first position.
    inputs: BTreeMap<u32, BTreeMap<u32, HiddenState>>,
    /// Smoothed time of a one-token step, seconds.
    step_secs: Option<f64>,
    /// Failovers so far.
    pub reroutes: Vec<Reroute>,
    on_route: Box<dyn FnMut(&str) + Send>,
}

impl RemoteSession {
    /// The chain in use.
    pub fn route(&self) -> &[ActiveHop] {
        &self.hops
    }

    /// How this client reaches each server it is connected to now. (The future holds
    /// no borrow of the session, which is not `Sync`.)
    pub fn links(&self) -> impl std::future::Future<Output = HashMap<PeerId, Link>> + Send {
        let net = self.client.net.clone();
        async move { net.links().await.unwrap_or_default() }
    }

    fn hop_index(&self, session: SessionId) -> Option<usize> {
        self.hops.iter().position(|h| h.session == session)
    }

    /// How long a step of `tokens` tokens may take before the chain is presumed broken:
    /// a multiple of the recent one-token step, plus, for many tokens, a multiple of
    /// what the servers' announced speeds predict (a prefill is faster per token than
    /// decoding, so this errs long).
    fn timeout(&self, tokens: u32) -> Duration {
        let per_token: f64 = self
            .hops
            .iter()
            .map(|h| 1.0 / (h.hop.throughput.max(1e-3) as f64))
            .sum();
        step_timeout(self.step_secs, per_token, tokens)
    }

    /// Keeps a server's output as the input of the next block boundary.
    fn keep_copy(&mut self, hop: usize, position: u32, hidden: HiddenState) {
        let end = self.hops[hop].hop.span.end;
        if end < self.spec.n_blocks {
            self.inputs.entry(end).or_default().insert(position, hidden);
        }
    }

    /// The inputs of block `block` for positions `0..upto`, if the client holds them all.
    fn history(&self, block: u32, upto: u32) -> Option<Vec<HiddenState>> {
        let map = self.inputs.get(&block)?;
        let mut out = Vec::new();
        let mut at = 0u32;
        while at < upto {
            let h = map.get(&at)?;
            let n = h.shape.first().copied().unwrap_or(0);
            if n == 0 {
                return None;
            }
            let take = n.min(upto - at);
            out.push(if take == n {
                h.clone()
            } else {
                rows(h, 0, take as usize)
            });
            at += take;
        }
        Some(out)
    }

    /// Sends a step to hop `first` (with the rest of the chain attached) and waits for
    /// the last hop's output.
    async fn run_step(
        &mut self,
        first: usize,
        position: u32,
        hidden: HiddenState,
    ) -> Result<HiddenState, Failure> {
        let tokens = hidden.shape.first().copied().unwrap_or(0);
        let index = self.next_index;
        self.next_index += 1;
        let next: Vec<Hop> = self.hops[first + 1..]
            .iter()
            .map(|h| Hop {
                peer: h.hop.peer.to_string(),
                span: h.hop.span,
                addrs: h.hop.addrs.iter().map(|a| a.to_string()).collect(),
                session: h.session,
            })
            .collect();
        let target = self.hops[first].clone();
        let step = Step {
            session: target.session,
            step: index,
            position,
            hidden,
            next,
            reply_to: self.client.net.peer_id().to_string(),
        };
        let timeout = self.timeout(tokens);
        let started = Instant::now();
        // On the data plane: written to the first server's stream, no answer. A server
        // that refuses the step reports it like any failure; one that died is found by
        // the output deadline below and a probe.
        let sent = self
            .client
            .net
            .send(
                target.hop.peer,
                target.hop.addrs.clone(),
                Request::Step(step),
            )
            .await;
        if let Err(e) = sent {
            return Err(Failure {
                suspect: first,
                reason: format!("{e:#}"),
                after: started.elapsed(),
            });
        }
        let last = self.hops.len() - 1;
        let mut reported: HashSet<usize> = HashSet::new();
        let mut deadline = tokio::time::Instant::from_std(started + timeout);
        let mut note_at = tokio::time::Instant::from_std(started + SLOW_WAIT);
        loop {
            tokio::select! {
                d = self.rx.recv() => {
                    let Some(d) = d else {
                        return Err(Failure { suspect: first, reason: "session table closed".into(), after: started.elapsed() });
                    };
                    match d {
                        Delivery::Output(o) => {
                            let Some(h) = self.hop_index(o.session) else { continue };
                            if h == last && o.step == index {
                                if tokens == 1 && first == 0 {
                                    let s = started.elapsed().as_secs_f64();
                                    self.step_secs = Some(self.step_secs.map_or(s, |p| 0.8 * p + 0.2 * s));
                                }
                                return Ok(o.hidden);
                            }
                            if o.step == index {
                                reported.insert(h);
                            }
                            self.keep_copy(h, o.position, o.hidden);
                        }
                        // A server leaving the swarm tells its sessions' clients at once,
                        // whatever step they are at: move now rather than time out later.
                        Delivery::Failed(f) if f.error.kind == ErrorKind::Leaving => {
                            if let Some(suspect) = self.hops.iter().position(|h| h.hop.peer.to_string() == f.peer) {
                                return Err(Failure { suspect, reason: format!("{}", f.error), after: started.elapsed() });
                            }
                        }
                        Delivery::Failed(f) if f.step == index => {
                            let by_peer = self.hops.iter().position(|h| h.hop.peer.to_string() == f.peer);
                            if by_peer.is_none() && f.peer.parse::<PeerId>().is_ok() {
                                // About a server this route does not use: a late report
                                // from a chain left behind (a server that lost its
                                // connection to the next one tells of the last step it
                                // passed on), not about this one.
                                continue;
                            }
                            let suspect = by_peer.or_else(|| self.hop_index(f.session)).unwrap_or(first);
                            return Err(Failure { suspect, reason: format!("{}", f.error), after: started.elapsed() });
                        }
                        Delivery::Failed(_) => {}
                    }
                }
                peer = self.disconnects.recv() => {
                    if let Ok(peer) = peer {
                        if let Some(h) = self.hops[first..].iter().position(|h| h.hop.peer == peer) {
                            return Err(Failure { suspect: first + h, reason: "connection closed".into(), after: started.elapsed() });
                        }
                    }
                }
                _ = tokio::time::sleep_until(note_at) => {
                    let missing: Vec<String> = (first..=last)
                        .filter(|h| !reported.contains(h))
                        .map(|h| format!("{}[{}]", self.hops[h].hop.peer, self.hops[h].hop.span))
                        .collect();
                    tracing::warn!(
                        "waiting {:.0?} so far for the output of step {index} ({tokens} tokens at position {position}); not reported yet by {}; the chain's servers answer probes, so the wait goes on for up to {FIRST_STEP_TIMEOUT:?}",
                        started.elapsed(),
                        missing.join(" ")
                    );
                    note_at += SLOW_WAIT_REPEAT;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let suspect = (first..=last).find(|h| !reported.contains(h)).unwrap_or(last);
                    let hop = self.hops[suspect].hop.clone();
                    if started.elapsed() < FIRST_STEP_TIMEOUT && self.client.alive(&hop).await {
                        deadline = tokio::time::Instant::now() + timeout;
                        continue;
                    }
                    return Err(Failure { suspect, reason: format!("no output within {timeout:?}"), after: started.elapsed() });
                }
            }
        }
    }

    /// Runs `hidden` (`[tokens, hidden]`) through the whole chain, failing over as needed.
    pub async fn forward(&mut self, hidden: HiddenState) -> anyhow::Result<HiddenState> {
        let tokens = hidden.shape.first().copied().unwrap_or(0);
        let position = self.position;
        self.inputs
            .entry(0)
            .or_default()
            .insert(position, hidden.clone());
        let mut failure = match self.run_step(0, position, hidden).await {
            Ok(out) => match self.verify(position, tokens, &out).await {
                None => {
                    self.position += tokens;
                    return Ok(out);
                }
                Some(f) => f,
            },
            Err(f) => f,
        };
        for _ in 0..MAX_RECOVERIES {
            match self.recover(failure, position, tokens).await? {
                Ok(out) => {
                    self.position += tokens;
                    return Ok(out);
                }
                Err(f) => failure = f,
            }
        }
        bail!("gave up on step at position {position} after {MAX_RECOVERIES} failovers")
    }

    /// Checks the servers' outputs for the step at `position` (`tokens` rows; `out` is
    /// the last server's): each server, with the client's verify rate as its chance, has
    /// its output compared with a replica's, computed by another server that serves its
    /// blocks from the inputs the client holds (all positions so far, in chunks). A
    /// difference beyond [`VERIFY_TOLERANCE`] is a failure of that server: it is banned
    /// and the step redone on another chain, before its output is used. Servers without
    /// a replica in the swarm go unchecked.
    async fn verify(&mut self, position: u32, tokens: u32, out: &HiddenState) -> Option<Failure> {
        let rate = self.client.verify_rate;
        if rate <= 0.0 {
            return None;
        }
        let started = Instant::now();
        let upto = position + tokens;
        let last = self.hops.len() - 1;
        for h in 0..self.hops.len() {
            if rand::random::<f64>() >= rate {
                continue;
            }
            let span = self.hops[h].hop.span;
            let claimed = if h == last {
                out.clone()
            } else {
                let what = || format!("the copy of blocks {span}'s output at position {position}");
                match noting_wait(what, self.await_copy(span.end, position)).await {
                    Some(c) => c,
                    None => continue,
                }
            };
            let Some(history) = self.history(span.start, upto) else {
                continue;
            };
            let suspect = self.hops[h].hop.peer;
            // Replicas in random order: a liar that claims to be fastest must not be
            // everyone's reference.
            let mut replicas = self.replicas_for(span, suspect, upto);
            rand::seq::SliceRandom::shuffle(&mut replicas[..], &mut rand::rng());
            let mut replicas = replicas.into_iter();
            let Some((checked, theirs)) = self
                .replica_output(&mut replicas, upto, tokens, &history)
                .await
            else {
                tracing::debug!(peer = %suspect, "no replica serves {span}: not verified");
                continue;
            };
            let gap = distance(&claimed, &theirs);
            tracing::debug!(peer = %suspect, replica = %checked, gap, "verified a step in {:?}", started.elapsed());
            if is_mismatch(gap) {
                // Two disagree: a third decides which one lies, if there is one.
                if let Some((third, judge)) = self
                    .replica_output(&mut replicas, upto, tokens, &history)
                    .await
                {
                    if !is_mismatch(distance(&claimed, &judge)) {
                        tracing::warn!(replica = %checked, agreeing = %third, "a replica's output differs from two others': banned");
                        self.client.ban(&checked);
                        continue;
                    }
                    // The third agrees with the replica (or with nobody): the server
                    // is the one to leave.
                }
                return Some(Failure {
                    suspect: h,
                    reason: format!(
                        "verification: its output for blocks {span} differs from {checked}'s by {gap:.3} (relative RMS)"
                    ),
                    after: started.elapsed(),
                });
            }
        }
        None
    }

    /// The copy of the output that crossed block boundary `block` at `position`, waiting
    /// a little for it (copies are sent after the output goes on).
    async fn await_copy(&mut self, block: u32, position: u32) -> Option<HiddenState> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(c) = self.inputs.get(&block).and_then(|m| m.get(&position)) {
                return Some(c.clone());
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Delivery::Output(o))) => {
                    if let Some(h) = self.hop_index(o.session) {
                        self.keep_copy(h, o.position, o.hidden);
                    }
                }
                Ok(Some(Delivery::Failed(_))) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The other servers that serve all of `span`, are not `not` and are not banned.
    fn replicas_for(&self, span: BlockSpan, not: PeerId, upto: u32) -> Vec<PlannedHop> {
        let not = not.to_string();
        self.known
            .iter()
            .filter(|a| a.peer_id != not && !self.client.is_banned(&a.peer_id))
            .filter(|a| a.span.contains(&span) && a.free_cache_tokens >= upto as u64)
            .filter_map(|a| {
                Some(PlannedHop {
                    peer: a.peer_id.parse().ok()?,
                    addrs: a.addrs.iter().filter_map(|x| x.parse().ok()).collect(),
                    span,
                    throughput: a.throughput,
                })
            })
            .collect()
    }

    /// The rows of the step (the last `tokens` of `upto`) as the next replica that can
    /// compute them does, with its peer id; `None` when none can.
    async fn replica_output(
        &mut self,
        replicas: &mut impl Iterator<Item = PlannedHop>,
        upto: u32,
        tokens: u32,
        history: &[HiddenState],
    ) -> Option<(PeerId, HiddenState)> {
        for replica in replicas.by_ref() {
            let peer = replica.peer;
            match self.run_on_replica(replica, upto, history.to_vec()).await {
                Ok(all) => {
                    return Some((peer, rows(&all, (upto - tokens) as usize, upto as usize)))
                }
                Err(e) => tracing::debug!(%peer, "replica could not verify: {e:#}"),
            }
        }
        None
    }

    /// Opens a session on `replica` alone, runs `history` through it in chunks, closes
    /// it, and returns all its output rows.
    async fn run_on_replica(
        &mut self,
        replica: PlannedHop,
        upto: u32,
        history: Vec<HiddenState>,
    ) -> anyhow::Result<HiddenState> {
        let opened = self
            .client
            .open_hops(
                vec![replica],
                &self.spec.model_id,
                upto,
                self.spec.wire,
                &self.tx,
            )
            .await?;
        let hop = opened[0].clone();
        let what = || {
            format!(
                "replica {} to recompute {upto} positions of blocks {}",
                hop.hop.peer, hop.hop.span
            )
        };
        let result = noting_wait(what, self.replay_alone(&hop, history)).await;
        self.client.close_hops(&opened).await;
        result
    }

    async fn replay_alone(
        &mut self,
        hop: &ActiveHop,
        history: Vec<HiddenState>,
    ) -> anyhow::Result<HiddenState> {
        let all = concat(&history)?;
        let n = all.shape.first().copied().unwrap_or(0) as usize;
        let mut outs = Vec::new();
        let mut at = 0usize;
        while at < n {
            let take = VERIFY_CHUNK.min(n - at);
            let index = self.next_index;
            self.next_index += 1;
            let step = Step {
                session: hop.session,
                step: index,
                position: at as u32,
                hidden: rows(&all, at, at + take),
                next: Vec::new(),
                reply_to: self.client.net.peer_id().to_string(),
            };
            self.client
                .net
                .send(hop.hop.peer, hop.hop.addrs.clone(), Request::Step(step))
                .await?;
            let deadline = tokio::time::Instant::now() + FIRST_STEP_TIMEOUT;
            loop {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(Delivery::Output(o)))
                        if o.session == hop.session && o.step == index =>
                    {
                        outs.push(o.hidden);
                        break;
                    }
                    Ok(Some(Delivery::Output(o))) => {
                        if let Some(h) = self.hop_index(o.session) {
                            self.keep_copy(h, o.position, o.hidden);
                        }
                    }
                    Ok(Some(Delivery::Failed(f))) if f.session == hop.session => {
                        bail!("the replica failed: {}", f.error)
                    }
                    Ok(Some(Delivery::Failed(_))) => {}
                    Ok(None) | Err(_) => bail!("no output from the replica"),
                }
            }
            at += take;
        }
        concat(&outs)
    }

    /// Replaces the chain from the failed server on, replays the inputs the new servers
    /// missed, and returns the result of the step at `position`.
    async fn recover(
        &mut self,
        failure: Failure,
        position: u32,
        tokens: u32,
    ) -> anyhow::Result<Result<HiddenState, Failure>> {
        let t0 = Instant::now();
        tracing::warn!(
            "step at position {position} failed after {:?}: {}",
            failure.after,
            failure.reason
        );
        // Outputs already on their way tell which servers finished the step.
        let grace = tokio::time::Instant::now() + GRACE;
        while let Ok(Some(d)) = tokio::time::timeout_at(grace, self.rx.recv()).await {
            if let Delivery::Output(o) = d {
                if let Some(h) = self.hop_index(o.session) {
                    self.keep_copy(h, o.position, o.hidden);
                }
            }
        }
        let suspect = failure.suspect.min(self.hops.len() - 1);
        let failed = self.hops[suspect].hop.peer;
        self.client.ban(&failed);
        tracing::warn!(peer = %failed, "step at position {position} failed: {}; re-routing", failure.reason);
        // Keep the longest prefix of the chain whose successor's inputs we hold in full.
        let upto = position + tokens;
        let (keep, history) = (0..=suspect)
            .rev()
            .find_map(|i| {
                self.history(self.hops[i].hop.span.start, upto)
                    .map(|h| (i, h))
            })
            .context("lost the inputs of block 0")?;
        let from_block = self.hops[keep].hop.span.start;
        let dropped = self.hops.split_off(keep);
        {
            let client = self.client.clone();
            tokio::spawn(async move { client.close_hops(&dropped).await });
        }
        let deadline = Instant::now() + self.route_timeout;
        let new = self
            .client
            .plan_and_open(&self.spec, from_block, &self.tx, deadline, &mut self.known)
            .await
            .context("failover found no replacement")?;
        self.hops.extend(new);
        let links = self.client.net.links().await.unwrap_or_default();
        (self.on_route)(&route_line(&self.hops, &links));
        let replay_started = Instant::now();
        // Replay positions 0..upto into the new part of the chain, step by step as they
        // first ran: a different grouping of tokens changes the float rounding (candle
        // quantises activations per matmul), and the output must not change at all.
        let mut result = Vec::new();
        let mut at = 0u32;
        for chunk in history {
            let n = chunk.shape.first().copied().unwrap_or(0);
            let out = match self.run_step(keep, at, chunk).await {
                Ok(o) => o,
                Err(f) => return Ok(Err(f)),
            };
            if at + n > position {
                let from = position.saturating_sub(at);
                result.push(rows(&out, from as usize, n as usize));
            }
            at += n;
        }
        let r = Reroute {
            failed_peer: failed.to_string(),
            reason: failure.reason,
            position,
            from_block,
            replayed_tokens: upto,
            recovery_ms: t0.elapsed().as_secs_f64() * 1e3,
            replay_ms: replay_started.elapsed().as_secs_f64() * 1e3,
        };
        tracing::warn!(
            "re-routed from block {} in {:.0} ms after noticing the failure ({:.0} ms of it replaying {} tokens)",
            r.from_block,
            r.recovery_ms,
            r.replay_ms,
            r.replayed_tokens
        );
        self.reroutes.push(r);
        Ok(Ok(concat(&result)?))
    }

    /// Closes the session on every server (best effort) and forgets it.
    pub async fn close(mut self) {
        let hops = std::mem::take(&mut self.hops);
        self.client.close_hops(&hops).await;
    }
}

impl Drop for RemoteSession {
    /// A session dropped without [`RemoteSession::close`] (its generation was cancelled:
    /// an API client that hung up mid-stream) still frees its servers' caches.
    fn drop(&mut self) {
        if self.hops.is_empty() {
            return;
        }
        let hops = std::mem::take(&mut self.hops);
        let client = self.client.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { client.close_hops(&hops).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::{noting_wait, SLOW_WAIT};

    /// Collects what the log says.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into()
        }
    }

    /// A wait past [`SLOW_WAIT`] is logged with what it waits for; a quick one is not.
    #[tokio::test]
    async fn a_slow_wait_says_what_it_waits_for() {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let quick = noting_wait(|| "the quick one".into(), async { 7 }).await;
        assert_eq!(quick, 7);
        let slow = tokio::time::sleep(SLOW_WAIT + Duration::from_millis(300));
        noting_wait(|| "server X to answer".into(), slow).await;

        let text = log.text();
        assert!(!text.contains("the quick one"), "{text}");
        assert_eq!(
            text.matches("so far for server X to answer").count(),
            1,
            "{text}"
        );
    }
}
