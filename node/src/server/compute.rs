//! The server runtime: sessions, limits, and the compute thread.
//!
//! All model work for a server happens on one dedicated OS thread that owns the loaded
//! [`Span`] and every session's KV cache, so the libp2p event loop never waits on a
//! matmul. Requests reach it through a channel in arrival order; the channel holds at
//! most [`INBOX_LIMIT`] of them, past which they are refused as busy (see
//! [`ServerHandle::submit`]). Steps come on the data plane (one-way frames,
//! [`Network::send`]): a step is validated (a refusal goes to its client as a failure
//! report), computed together with the other sessions' steps waiting at the same time
//! or due at once (see [`Server::due_soon`]), and its output pushed to the next server
//! of the chain and a copy to the client, from the async runtime.
//!
//! Here: the thread, its state and its loop. Its inbox and the handle others hold are in
//! `inbox`, sessions (opening, checking, ending) in `sessions`, running steps and
//! passing their outputs on in `steps`.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use protocol::{Announcement, BlockSpan, SessionId, Step};
use shard::Span;

use super::inbox::Inbox;
use super::inbox::Work;
use super::sessions::Session;
use super::steps::Forwards;
use super::Handover;
use super::Job;
use super::ServerHandle;
use crate::metrics::ServerMetrics;
use crate::net::{unix_ms, Network, ANNOUNCE_TTL};

/// A session unused this long is dropped and its cache freed: a client that vanished
/// without closing must not hold memory forever.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The longest the compute thread holds a step back to batch it with steps of other
/// sessions that are due (see [`Server::due_soon`]).
const MAX_GATHER: Duration = Duration::from_millis(5);

/// Requests and steps the compute thread's inbox holds before it refuses more as busy.
/// A healthy server holds about one step per open session there; a step is at most a
/// prefill chunk (~2 MB of f16 hidden states at width 4096), so a full inbox stays
/// within ~0.5 GB instead of growing until the machine runs out of memory.
pub const INBOX_LIMIT: usize = 256;

/// Limits and identity of a server.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Most sessions open at once.
    pub max_sessions: usize,
    /// Longest sequence a session may reach.
    pub max_seq_len: usize,
    /// KV-cache tokens all sessions together may reserve (each reserves its `max_len`).
    pub max_cache_tokens: usize,
    /// Most sessions one client may hold here at once.
    pub max_sessions_per_peer: usize,
    /// Testing only: announce ten times the measured speed and corrupt every output.
    pub lie: bool,
    /// The only clients sessions are opened for; `None` = anyone.
    pub allowed: Option<std::collections::HashSet<PeerId>>,
    /// Name shown by status tools.
    pub public_name: String,
}

/// The state the compute thread owns.
pub struct Server {
    pub(super) span: Span,
    /// The model's size, announced for status tools.
    pub(super) params: protocol::ModelParams,
    pub(super) model_id: String,
    pub(super) limits: ServerLimits,
    pub(super) sessions: HashMap<SessionId, Session>,
    pub(super) throughput: f32,
    pub(super) net: Network,
    pub(super) rt: tokio::runtime::Handle,
    /// The current announcement, shared with the network side so `Info` requests (a
    /// client's liveness probe) are answered at once, even while a long step computes.
    pub(super) public: Arc<Mutex<Announcement>>,
    pub(super) metrics: ServerMetrics,
    /// Shutting down: no new sessions, no more announcements, steps refused as
    /// [`ErrorKind::Leaving`].
    pub(super) draining: bool,
    /// The last step of each session passed on to each next server.
    pub(super) forwards: Arc<Forwards>,
    /// How long the last batch of steps took: the longest the thread waits for steps
    /// that are due (see [`Server::due_soon`]).
    pub(super) batch_time: Duration,
    /// Batches of steps run so far.
    pub(super) batches: u64,
}

impl Server {
    /// Wraps a loaded span. `throughput` is the measured tokens/s of a decode step.
    pub fn new(
        span: Span,
        model_id: String,
        params: protocol::ModelParams,
        limits: ServerLimits,
        throughput: f32,
        net: Network,
    ) -> Self {
        let mut server = Server {
            span,
            model_id,
            params,
            limits,
            sessions: HashMap::new(),
            throughput,
            net,
            rt: tokio::runtime::Handle::current(),
            public: Arc::new(Mutex::new(Announcement {
                peer_id: String::new(),
                model_id: String::new(),
                span: BlockSpan::new(0, 0),
                n_blocks: 0,
                throughput: 0.0,
                free_cache_tokens: 0,
                sessions: 0,
                max_seq_len: 0,
                version: String::new(),
                public_name: String::new(),
                addrs: Vec::new(),
                reachability: protocol::Reachability::Unknown,
                expires_unix_ms: 0,
                params,
            })),
            metrics: ServerMetrics::default(),
            draining: false,
            forwards: Arc::default(),
            batch_time: Duration::ZERO,
            batches: 0,
        };
        server
            .metrics
            .cache_tokens_limit
            .set(server.limits.max_cache_tokens as i64);
        server.refresh_public();
        server
    }

    /// The announcement kept current for the network side (see the field's doc).
    pub fn public_view(&self) -> Arc<Mutex<Announcement>> {
        self.public.clone()
    }

    /// This server's metrics (register them to export them).
    pub fn metrics(&self) -> ServerMetrics {
        self.metrics.clone()
    }

    pub(super) fn refresh_public(&mut self) {
        let a = self.announcement();
        *self.public.lock().unwrap_or_else(|p| p.into_inner()) = a;
        self.update_cache_gauges();
    }

    /// Sessions and cache use, for the metrics.
    pub(super) fn update_cache_gauges(&self) {
        let m = &self.metrics;
        m.sessions.set(self.sessions.len() as i64);
        let used: usize = self.sessions.values().map(|s| s.cache.len()).sum();
        let reserved: usize = self.sessions.values().map(|s| s.cache.max_len()).sum();
        m.cache_tokens_used.set(used as i64);
        m.cache_tokens_reserved.set(reserved as i64);
    }

    /// This server's current announcement.
    pub fn announcement(&self) -> Announcement {
        Announcement {
            peer_id: self.net.peer_id().to_string(),
            model_id: self.model_id.clone(),
            span: BlockSpan::new(self.span.start() as u32, self.span.end() as u32),
            n_blocks: self.span.config().n_layers as u32,
            throughput: if self.limits.lie {
                self.throughput * 10.0
            } else {
                self.throughput
            },
            free_cache_tokens: self.offered_cache_tokens() as u64,
            sessions: self.sessions.len() as u32,
            max_seq_len: self.limits.max_seq_len as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            public_name: self.limits.public_name.clone(),
            // What it listens on now, relay slots included (they come and go behind a
            // NAT).
            addrs: self
                .net
                .listen_addrs_now()
                .iter()
                .map(|a| a.to_string())
                .collect(),
            reachability: self.net.status().reachability,
            expires_unix_ms: unix_ms() + ANNOUNCE_TTL.as_millis() as u64,
            params: self.params,
        }
    }

    pub(super) fn free_cache_tokens(&self) -> usize {
        let reserved: usize = self.sessions.values().map(|s| s.cache.max_len()).sum();
        self.limits.max_cache_tokens.saturating_sub(reserved)
    }

    pub(super) fn announce_now(&mut self) {
        self.refresh_public();
        if self.draining {
            return;
        }
        let a = self.announcement();
        let net = self.net.clone();
        self.rt.spawn(async move { net.announce(a).await });
    }

    /// Starts the compute thread; it runs until every handle is dropped. It also
    /// re-announces the server every `reannounce`.
    pub fn spawn(self, reannounce: Duration) -> std::io::Result<ServerHandle> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let (forwards, net) = (self.forwards.clone(), self.net.clone());
        let mut departures = net.disconnects();
        let rt = self.rt.clone();
        let inbox = Inbox {
            rx,
            queued: queued.clone(),
        };
        std::thread::Builder::new()
            .name("shoal-compute".into())
            // The loop runs on the math pool itself: a step's products are shared with
            // the pool's other threads without first waking one to take the step over.
            .spawn(move || shard::kernels::on_pool(move || self.run(inbox, reannounce)))?;
        let handle = ServerHandle { tx, queued };
        // Peers that leave: the clients of steps passed to them hear at once, and the
        // compute thread drops the sessions of clients that left. Missed departures
        // (a lagging receiver) lose nothing: the sweep checks every session.
        let departed = handle.clone();
        rt.spawn(async move {
            loop {
                let peer = match departures.recv().await {
                    Ok(peer) => Some(peer),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(_) => return,
                };
                if !departed.departed() {
                    return;
                }
                if let Some(peer) = peer {
                    forwards.connection_lost(&net, peer).await;
                }
            }
        });
        Ok(handle)
    }

    pub(super) fn run(mut self, inbox: Inbox, reannounce: Duration) {
        let mut next_announce = Instant::now();
        loop {
            if Instant::now() >= next_announce {
                self.announce_now();
                next_announce = Instant::now() + reannounce;
            }
            let wait = next_announce.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(wait) {
                Ok(first @ (Job::Request(_) | Job::Step(_))) => {
                    // Everything queued behind it too, and the steps due soon: steps of
                    // different sessions that wait together are computed as one batch.
                    let mut queued = Vec::new();
                    queued.extend(Work::of(first));
                    let mut after = None;
                    let mut departed = false;
                    let deadline = Instant::now() + self.batch_time.min(MAX_GATHER);
                    loop {
                        let job = match inbox.try_recv() {
                            Ok(job) => job,
                            Err(_) => {
                                let now = Instant::now();
                                if now >= deadline || !self.due_soon(&queued, now) {
                                    break;
                                }
                                let nap = (deadline - now).min(Duration::from_micros(100));
                                match inbox.recv_timeout(nap) {
                                    Ok(job) => job,
                                    Err(_) => continue,
                                }
                            }
                        };
                        match job {
                            Job::Request(_) | Job::Step(_) => queued.extend(Work::of(job)),
                            Job::Announce => next_announce = Instant::now(),
                            Job::Departed => departed = true,
                            other => {
                                after = Some(other);
                                break;
                            }
                        }
                    }
                    if departed {
                        // Before the steps: a gone client's steps need not run.
                        self.drop_departed();
                    }
                    self.handle_all(queued);
                    match after {
                        Some(Job::Replace { span, throughput }) => {
                            self.replace_span(*span, throughput)
                        }
                        Some(Job::Drain(done)) => self.drain(done),
                        _ => {}
                    }
                }
                Ok(Job::Replace { span, throughput }) => self.replace_span(*span, throughput),
                Ok(Job::Drain(done)) => self.drain(done),
                Ok(Job::Announce) => next_announce = Instant::now(),
                Ok(Job::Departed) => self.drop_departed(),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
            self.expire_idle();
        }
    }

    /// True when a step in `queued` has a companion still on its way: a session that ran
    /// in the same batch last time, has no step queued, and is due (its last step ended
    /// less than 1.5 of its period ago). Taking only the steps already queued is not
    /// enough for concurrent sessions to batch: measured with 8 sessions on a 3-server
    /// loopback swarm (default model), 890 of 1,470 batches ran a single step, as each
    /// server started on the first step of a burst and the sessions drifted apart for
    /// good. Waiting for *any* due session was worse (the sessions settled into groups
    /// of 3 and 5 that waited for each other: 177 against ~240 tok/s); waiting for last
    /// time's companions, for at most one batch's time ([`MAX_GATHER`] at most), keeps
    /// them in batches of 8 (aggregate +6% to +17% in three interleaved runs).
    pub(super) fn due_soon(&self, queued: &[Work], now: Instant) -> bool {
        let stepping: Vec<SessionId> = queued
            .iter()
            .filter_map(|w| match w {
                Work::Step(s) => Some(s.session),
                Work::Request(_) => None,
            })
            .collect();
        let cohorts: Vec<u64> = stepping
            .iter()
            .filter_map(|id| self.sessions.get(id).map(|s| s.batch))
            .filter(|&b| b > 0)
            .collect();
        self.sessions.iter().any(|(id, s)| {
            cohorts.contains(&s.batch)
                && s.period
                    .is_some_and(|p| now.duration_since(s.last_used) < p + p / 2)
                && !stepping.contains(id)
        })
    }

    /// Stops taking work and gives up every session (their clients are told by the
    /// caller, from the async side).
    pub(super) fn drain(&mut self, done: tokio::sync::oneshot::Sender<Vec<Handover>>) {
        self.draining = true;
        let handovers: Vec<Handover> = self
            .sessions
            .drain()
            .map(|(session, s)| Handover {
                client: s.client,
                session,
                next_step: s.last_step.map_or(0, |l| l + 1),
            })
            .collect();
        let ended: Vec<SessionId> = handovers.iter().map(|h| h.session).collect();
        self.forwards.forget(&ended);
        self.refresh_public();
        let _ = done.send(handovers);
    }

    pub(super) fn replace_span(&mut self, span: Span, throughput: f32) {
        tracing::info!(
            "now serving blocks {}..{} ({} sessions dropped)",
            span.start(),
            span.end(),
            self.sessions.len()
        );
        let ended: Vec<SessionId> = self.sessions.drain().map(|(id, _)| id).collect();
        self.forwards.forget(&ended);
        self.span = span;
        self.throughput = throughput;
        self.announce_now();
    }

    /// Handles requests in arrival order, gathering valid steps of distinct sessions into
    /// one batch; anything else (or a second step of a session already in the batch)
    /// runs the batch first.
    pub(super) fn handle_all(&mut self, queued: Vec<Work>) {
        let mut batch: Vec<Step> = Vec::new();
        for work in queued {
            match work {
                Work::Step(step) => {
                    if batch.iter().any(|s| s.session == step.session) {
                        self.run_steps(std::mem::take(&mut batch));
                    }
                    match self.check_step(&step) {
                        Err(e) => self.step_failed(&step, e),
                        Ok(()) => batch.push(step),
                    }
                }
                Work::Request(inbound) => {
                    self.run_steps(std::mem::take(&mut batch));
                    self.handle(inbound);
                }
            }
        }
        self.run_steps(batch);
    }
}
