//! The server runtime: sessions, limits, and the compute thread.
//!
//! All model work for a server happens on one dedicated OS thread that owns the loaded
//! [`Span`] and every session's KV cache, so the libp2p event loop never waits on a
//! matmul. Requests reach it through a channel in arrival order. Steps come on the data
//! plane (one-way frames, [`Network::send`]): a step is validated (a refusal goes to its
//! client as a failure report), computed together with the other sessions' steps waiting
//! at the same time, and its output pushed to the next server of the chain and a copy to
//! the client, from the async runtime.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use protocol::{
    Announcement, BlockSpan, ErrorInfo, ErrorKind, Hop, OpenSession, Request, Response, SessionId,
    Step, StepFailed, StepOutput, WireDType,
};
use shard::candle_core::Tensor;
use shard::{KvCache, Span};

use crate::hidden::{from_wire, to_wire};
use crate::metrics::ServerMetrics;
use crate::net::{unix_ms, Inbound, Network, Presence, ANNOUNCE_TTL};

/// A session unused this long is dropped and its cache freed: a client that vanished
/// without closing must not hold memory forever.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

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

/// A session's cache lives until the first of: its client closes it, its client's
/// presence ends (the client's last connection closed, or it came back as a new
/// process: see [`Server::drop_departed`]), it has been idle [`SESSION_IDLE_TIMEOUT`],
/// or the server moves to another span or shuts down.
struct Session {
    /// The client that opened it (told when this server leaves).
    client: PeerId,
    /// The client's presence when it opened the session; `None` if it was not
    /// connected by then (the session goes at the next sweep).
    presence: Option<Presence>,
    cache: KvCache,
    wire: WireDType,
    /// Index of the last step applied: a step must carry a larger one.
    last_step: Option<u64>,
    last_used: Instant,
}

/// The state the compute thread owns.
pub struct Server {
    span: Span,
    /// The model's size, announced for status tools.
    params: protocol::ModelParams,
    model_id: String,
    limits: ServerLimits,
    sessions: HashMap<SessionId, Session>,
    throughput: f32,
    net: Network,
    rt: tokio::runtime::Handle,
    /// The current announcement, shared with the network side so `Info` requests (a
    /// client's liveness probe) are answered at once, even while a long step computes.
    public: Arc<Mutex<Announcement>>,
    metrics: ServerMetrics,
    /// Shutting down: no new sessions, no more announcements, steps refused as
    /// [`ErrorKind::Leaving`].
    draining: bool,
    /// The last step of each session passed on to each next server.
    forwards: Arc<Forwards>,
}

/// The last step of each session this server passed on, per next server. A frame
/// written just before a connection died is lost without an error (a relay that dies
/// takes its connections with it, and this end notices only when QUIC's idle timeout
/// ends them), and the client would wait for an output that never comes while both
/// servers still answer its probes. So when the connection to a next server closes,
/// the client of every session with a step passed to it hears at once (a client that
/// has its output already ignores a failure of a step it is past). An entry ends with
/// its session ([`Forwards::forget`]) or with the connection to the next server; one
/// recorded just after its session ended (the send raced the close) is pruned after
/// [`SESSION_IDLE_TIMEOUT`], when the next new session is recorded.
#[derive(Default)]
struct Forwards(Mutex<HashMap<PeerId, HashMap<SessionId, Forwarded>>>);

/// A step passed on: whose (the client), which, and when.
type Forwarded = (PeerId, u64, Instant);

impl Forwards {
    /// `session` (this server's id) passed step `step` of `client` on to `next`.
    fn record(&self, next: PeerId, session: SessionId, client: PeerId, step: u64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let sessions = map.entry(next).or_default();
        if sessions
            .insert(session, (client, step, Instant::now()))
            .is_none()
        {
            // A new session: forget those long gone (not on every step).
            sessions.retain(|_, (_, _, at)| at.elapsed() < SESSION_IDLE_TIMEOUT);
        }
    }

    /// Forgets what was passed on for sessions that ended.
    fn forget(&self, sessions: &[SessionId]) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for passed in map.values_mut() {
            for s in sessions {
                passed.remove(s);
            }
        }
        map.retain(|_, passed| !passed.is_empty());
    }

    /// Tells the clients of the steps last passed to `next`, whose connection closed.
    async fn connection_lost(&self, net: &Network, next: PeerId) {
        let lost = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&next)
            .unwrap_or_default();
        for (session, (client, step, _)) in lost {
            tracing::debug!(%next, session, step, "connection to the next server closed");
            let msg = Request::Failed(StepFailed {
                session,
                step,
                peer: next.to_string(),
                error: ErrorInfo::new(
                    ErrorKind::Unreachable,
                    "the connection to this server closed after a step was passed to it",
                ),
            });
            let _ = net.send(client, vec![], msg).await;
        }
    }
}

/// An open session whose client must move elsewhere: this server is leaving.
#[derive(Debug, Clone, Copy)]
pub struct Handover {
    /// Who opened it.
    pub client: PeerId,
    /// Its id here.
    pub session: SessionId,
    /// The step it would take next.
    pub next_step: u64,
}

/// Blocks `[start, end)` a session's cache covers.
type BlockRange = (usize, usize);

/// Work for the compute thread.
pub enum Job {
    /// A request from the network (boxed, as the span below: jobs stay small).
    Request(Box<Inbound>),
    /// Serve this span from now on (rebalancing): every open session is dropped, and
    /// their clients fail over.
    Replace {
        /// The newly loaded span.
        span: Box<Span>,
        /// Its measured throughput.
        throughput: f32,
    },
    /// Announce again now (a peer that held our records may have left).
    Announce,
    /// Some peer's presence ended: drop the sessions of clients that are gone.
    Departed,
    /// Shut down gracefully: finish what is queued before this, then stop taking
    /// sessions and steps and answer with the sessions to hand over.
    Drain(tokio::sync::oneshot::Sender<Vec<Handover>>),
}

/// Sends work to the compute thread.
#[derive(Clone)]
pub struct ServerHandle {
    tx: std_mpsc::Sender<Job>,
}

impl ServerHandle {
    /// Queues a request for the compute thread; false if the thread has stopped.
    pub fn submit(&self, inbound: Inbound) -> bool {
        self.tx.send(Job::Request(Box::new(inbound))).is_ok()
    }

    /// Swaps in a new span; false if the thread has stopped.
    pub fn replace(&self, span: Span, throughput: f32) -> bool {
        self.tx
            .send(Job::Replace {
                span: Box::new(span),
                throughput,
            })
            .is_ok()
    }

    /// Drops the sessions of clients whose presence has ended; false if the thread has
    /// stopped.
    pub fn departed(&self) -> bool {
        self.tx.send(Job::Departed).is_ok()
    }

    /// Puts the announcement in the DHT again now; false if the thread has stopped.
    pub fn announce(&self) -> bool {
        self.tx.send(Job::Announce).is_ok()
    }

    /// Starts a graceful shutdown (see [`Job::Drain`]); `None` if the thread has
    /// stopped.
    pub fn drain(&self) -> Option<tokio::sync::oneshot::Receiver<Vec<Handover>>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Job::Drain(tx)).ok().map(|_| rx)
    }
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

    fn refresh_public(&mut self) {
        let a = self.announcement();
        *self.public.lock().unwrap_or_else(|p| p.into_inner()) = a;
        self.update_cache_gauges();
    }

    /// Sessions and cache use, for the metrics.
    fn update_cache_gauges(&self) {
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
            free_cache_tokens: self.free_cache_tokens() as u64,
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

    fn free_cache_tokens(&self) -> usize {
        let reserved: usize = self.sessions.values().map(|s| s.cache.max_len()).sum();
        self.limits.max_cache_tokens.saturating_sub(reserved)
    }

    fn announce_now(&mut self) {
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
        let (forwards, net) = (self.forwards.clone(), self.net.clone());
        let mut departures = net.disconnects();
        let rt = self.rt.clone();
        std::thread::Builder::new()
            .name("shoal-compute".into())
            // The loop runs on the math pool itself: a step's products are shared with
            // the pool's other threads without first waking one to take the step over.
            .spawn(move || shard::kernels::on_pool(move || self.run(rx, reannounce)))?;
        let handle = ServerHandle { tx };
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

    fn run(mut self, rx: std_mpsc::Receiver<Job>, reannounce: Duration) {
        let mut next_announce = Instant::now();
        loop {
            if Instant::now() >= next_announce {
                self.announce_now();
                next_announce = Instant::now() + reannounce;
            }
            let wait = next_announce.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Job::Request(inbound)) => {
                    // Everything queued behind it too: steps of different sessions that
                    // wait together are computed as one batch.
                    let mut queued = vec![*inbound];
                    let mut after = None;
                    let mut departed = false;
                    while let Ok(job) = rx.try_recv() {
                        match job {
                            Job::Request(i) => queued.push(*i),
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

    /// Stops taking work and gives up every session (their clients are told by the
    /// caller, from the async side).
    fn drain(&mut self, done: tokio::sync::oneshot::Sender<Vec<Handover>>) {
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

    fn replace_span(&mut self, span: Span, throughput: f32) {
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
    fn handle_all(&mut self, queued: Vec<Inbound>) {
        let mut batch: Vec<Step> = Vec::new();
        for inbound in queued {
            let Inbound {
                peer,
                request,
                channel,
            } = inbound;
            match request {
                Request::Step(step) => {
                    if batch.iter().any(|s| s.session == step.session) {
                        self.run_steps(std::mem::take(&mut batch));
                    }
                    match self.check_step(&step) {
                        Err(e) => self.refuse_step(channel, &step, e),
                        Ok(()) => {
                            self.net.respond_blocking(channel, Response::Accepted);
                            batch.push(step);
                        }
                    }
                }
                request => {
                    self.run_steps(std::mem::take(&mut batch));
                    self.handle(Inbound {
                        peer,
                        request,
                        channel,
                    });
                }
            }
        }
        self.run_steps(batch);
    }

    fn expire_idle(&mut self) {
        let now = Instant::now();
        self.end_sessions("it was idle too long", |s| {
            now.duration_since(s.last_used) >= SESSION_IDLE_TIMEOUT
        });
    }

    /// Drops the sessions whose client has gone: its presence ended (its last
    /// connection closed, or it came back as a new process that knows nothing of them).
    fn drop_departed(&mut self) {
        let net = self.net.clone();
        self.end_sessions("its client has gone", |s| {
            s.presence.is_none() || net.presence(&s.client) != s.presence
        });
    }

    /// Ends every session `gone` picks, with all kept for it.
    fn end_sessions(&mut self, why: &str, mut gone: impl FnMut(&Session) -> bool) {
        let ended: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| gone(s))
            .map(|(id, _)| *id)
            .collect();
        if ended.is_empty() {
            return;
        }
        for id in &ended {
            if let Some(s) = self.sessions.remove(id) {
                tracing::info!(session = id, client = %s.client, "session ended: {why}");
            }
        }
        self.forwards.forget(&ended);
        self.refresh_public();
    }

    fn handle(&mut self, inbound: Inbound) {
        let Inbound {
            peer,
            request,
            channel,
        } = inbound;
        match request {
            Request::Info => self
                .net
                .respond_blocking(channel, Response::Info(self.announcement())),
            Request::Open(open) => {
                let r = match self.open(open, peer) {
                    Ok(r) => r,
                    Err(e) => {
                        self.metrics
                            .refused_sessions
                            .get_or_create(&[("kind", e.kind.name())])
                            .inc();
                        Response::Error(e)
                    }
                };
                self.net.respond_blocking(channel, r);
                self.refresh_public();
            }
            Request::Close { session } => {
                // Only its own client may close a session.
                if self
                    .sessions
                    .get(&session)
                    .is_some_and(|s| s.client == peer)
                {
                    self.sessions.remove(&session);
                    self.forwards.forget(&[session]);
                }
                self.net.respond_blocking(channel, Response::Accepted);
                self.refresh_public();
            }
            Request::Step(step) => match self.check_step(&step) {
                Err(e) => self.refuse_step(channel, &step, e),
                Ok(()) => {
                    self.net.respond_blocking(channel, Response::Accepted);
                    self.run_steps(vec![step]);
                }
            },
            Request::Output(_) | Request::Failed(_) => self.net.respond_blocking(
                channel,
                Response::Error(ErrorInfo::new(
                    ErrorKind::BadRequest,
                    "this node is a server; step outputs go to clients",
                )),
            ),
        }
    }

    fn open(&mut self, open: OpenSession, client: PeerId) -> Result<Response, ErrorInfo> {
        if self.draining {
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                "this server is shutting down",
            ));
        }
        if self
            .limits
            .allowed
            .as_ref()
            .is_some_and(|a| !a.contains(&client))
        {
            return Err(ErrorInfo::new(
                ErrorKind::Forbidden,
                format!("{client} is not on this server's --allow-peers list"),
            ));
        }
        if open.model_id != self.model_id {
            return Err(ErrorInfo::new(
                ErrorKind::WrongModel,
                format!("this server hosts {}, not {}", self.model_id, open.model_id),
            ));
        }
        let served = BlockSpan::new(self.span.start() as u32, self.span.end() as u32);
        if open.span.is_empty() || !served.contains(&open.span) {
            return Err(ErrorInfo::new(
                ErrorKind::SpanNotServed,
                format!("blocks {} requested, {} served", open.span, served),
            ));
        }
        if open.max_len as usize > self.limits.max_seq_len || open.max_len == 0 {
            return Err(ErrorInfo::new(
                ErrorKind::TooLong,
                format!(
                    "session of {} tokens requested, this server allows 1..={}",
                    open.max_len, self.limits.max_seq_len
                ),
            ));
        }
        if self.sessions.contains_key(&open.session) {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                "session id already in use",
            ));
        }
        if self.sessions.len() >= self.limits.max_sessions {
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                format!("{} sessions open, the limit", self.sessions.len()),
            ));
        }
        let mine = self
            .sessions
            .values()
            .filter(|s| s.client == client)
            .count();
        if mine >= self.limits.max_sessions_per_peer {
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                format!(
                    "{mine} sessions open for this client, the limit per client (--max-sessions-per-peer)"
                ),
            ));
        }
        let free = self.free_cache_tokens();
        if open.max_len as usize > free {
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                format!(
                    "session of {} tokens asked for, {free} cache tokens free (--max-cache-tokens {})",
                    open.max_len, self.limits.max_cache_tokens
                ),
            ));
        }
        let cache = self
            .span
            .new_cache_for(
                open.span.start as usize,
                open.span.end as usize,
                open.max_len as usize,
            )
            .map_err(|e| ErrorInfo::new(ErrorKind::SpanNotServed, e.to_string()))?;
        self.sessions.insert(
            open.session,
            Session {
                client,
                presence: self.net.presence(&client),
                cache,
                wire: open.wire_dtype,
                last_step: None,
                last_used: Instant::now(),
            },
        );
        Ok(Response::Opened {
            session: open.session,
            max_len: open.max_len,
        })
    }

    fn check_step(&self, step: &Step) -> Result<(), ErrorInfo> {
        if self.draining {
            return Err(ErrorInfo::new(
                ErrorKind::Leaving,
                "the server is shutting down",
            ));
        }
        let s = self.sessions.get(&step.session).ok_or_else(|| {
            ErrorInfo::new(
                ErrorKind::UnknownSession,
                format!("no session {}", step.session),
            )
        })?;
        if let Some(last) = s.last_step.filter(|l| step.step <= *l) {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                format!("step {} already applied (last step {last})", step.step),
            ));
        }
        if step.position as usize != s.cache.len() {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                format!(
                    "step {} at position {}, but the session is at position {}",
                    step.step,
                    step.position,
                    s.cache.len()
                ),
            ));
        }
        step.hidden
            .validate()
            .map_err(|e| ErrorInfo::new(ErrorKind::BadRequest, e.to_string()))?;
        let hidden = self.span.config().hidden as u32;
        match step.hidden.shape[..] {
            [tokens, h] if h == hidden && tokens > 0 => {
                if s.cache.len() + tokens as usize > s.cache.max_len() {
                    return Err(ErrorInfo::new(
                        ErrorKind::TooLong,
                        format!(
                            "{} tokens past position {} exceed the session's {}",
                            tokens,
                            s.cache.len(),
                            s.cache.max_len()
                        ),
                    ));
                }
            }
            _ => {
                return Err(ErrorInfo::new(
                    ErrorKind::BadRequest,
                    format!(
                        "hidden states of shape {:?}, expected [tokens, {hidden}]",
                        step.hidden.shape
                    ),
                ))
            }
        }
        if step.reply_to.parse::<PeerId>().is_err() {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                "reply_to is not a peer id",
            ));
        }
        Ok(())
    }

    /// Computes validated steps, as one batch per set of sessions over the same blocks,
    /// and sends each output on. A step that fails is reported to its client.
    fn run_steps(&mut self, steps: Vec<Step>) {
        if steps.is_empty() {
            return;
        }
        let device = self.span.device().clone();
        let hidden = self.span.config().hidden;
        // Sessions over the same blocks batch together (a session may use a sub-span).
        let mut groups: Vec<(BlockRange, Vec<(Step, Tensor)>)> = Vec::new();
        for step in steps {
            let Some(blocks) = self.sessions.get(&step.session).map(|s| s.cache.blocks()) else {
                let e = ErrorInfo::new(ErrorKind::UnknownSession, "session vanished");
                self.step_failed(&step, e);
                continue;
            };
            match from_wire(&step.hidden, hidden, &device) {
                Ok(x) => match groups.iter_mut().find(|(b, _)| *b == blocks) {
                    Some((_, group)) => group.push((step, x)),
                    None => groups.push((blocks, vec![(step, x)])),
                },
                Err(e) => {
                    let e = ErrorInfo::new(ErrorKind::Internal, e.to_string());
                    self.step_failed(&step, e);
                }
            }
        }
        // A batch must not change any session's numbers (a failover replays sessions
        // alone and expects the same bits): where it would, every step runs alone.
        if !self.span.batches_exactly() {
            groups = groups
                .into_iter()
                .flat_map(|(b, g)| g.into_iter().map(move |one| (b, vec![one])))
                .collect();
        }
        for (_, group) in groups {
            // The sessions leave the map while the batch borrows their caches.
            let mut taken: Vec<(Step, Tensor, Session)> = Vec::new();
            for (step, x) in group {
                if let Some(session) = self.sessions.remove(&step.session) {
                    taken.push((step, x, session));
                }
            }
            let items: Vec<_> = taken
                .iter_mut()
                .map(|(_, x, session)| (&*x, &mut session.cache))
                .collect();
            let started = Instant::now();
            let tokens: usize = items.iter().map(|(x, _)| x.dims()[0]).sum();
            let outputs = self.span.forward_batch(items);
            let took = started.elapsed().as_secs_f64();
            let mut done = Vec::with_capacity(taken.len());
            for (step, _, mut session) in taken {
                session.last_step = Some(step.step);
                session.last_used = Instant::now();
                let wire = session.wire;
                self.sessions.insert(step.session, session);
                done.push((step, wire));
            }
            match outputs {
                Ok(ys) => {
                    let m = &self.metrics;
                    m.steps.inc_by(ys.len() as u64);
                    m.tokens.inc_by(tokens as u64);
                    m.batch_sessions.observe(ys.len() as f64);
                    for _ in &ys {
                        m.step_seconds.observe(took);
                    }
                    for ((step, wire), mut y) in done.into_iter().zip(ys) {
                        if self.limits.lie {
                            y = y.affine(-1.0, 0.5).unwrap_or(y);
                        }
                        let (session, index) = (step.session, step.step);
                        let reply_to = step.reply_to.clone();
                        if let Err(e) = self.send_output(step, &y, wire) {
                            tracing::warn!(session, "step failed: {e}");
                            self.count_failure(&e);
                            let me = self.net.peer_id();
                            self.report_failure(&reply_to, session, index, me, e);
                        }
                    }
                }
                Err(e) => {
                    for (step, _) in done {
                        let e = ErrorInfo::new(ErrorKind::Internal, e.to_string());
                        self.step_failed(&step, e);
                    }
                }
            }
        }
        self.update_cache_gauges();
    }

    /// A step that cannot be taken: the error goes back as the answer to a request, or,
    /// for a step that came on the data plane (no answer), to the step's client.
    fn refuse_step(
        &self,
        channel: Option<libp2p::request_response::ResponseChannel<Response>>,
        step: &Step,
        e: ErrorInfo,
    ) {
        match channel {
            Some(channel) => {
                self.count_failure(&e);
                self.net.respond_blocking(Some(channel), Response::Error(e))
            }
            None => self.step_failed(step, e),
        }
    }

    fn count_failure(&self, e: &ErrorInfo) {
        self.metrics
            .failures
            .get_or_create(&[("kind", e.kind.name())])
            .inc();
    }

    fn step_failed(&self, step: &Step, e: ErrorInfo) {
        tracing::warn!(session = step.session, "step failed: {e}");
        self.count_failure(&e);
        let me = self.net.peer_id();
        self.report_failure(&step.reply_to, step.session, step.step, me, e);
    }

    /// Pushes a step's output to the next server of the chain and a copy to the client.
    fn send_output(&self, step: Step, y: &Tensor, wire: WireDType) -> Result<(), ErrorInfo> {
        let internal = |e: String| ErrorInfo::new(ErrorKind::Internal, e);
        let out = to_wire(y, wire).map_err(|e| internal(e.to_string()))?;
        let net = self.net.clone();
        let Step {
            session,
            step: index,
            position,
            mut next,
            reply_to,
            ..
        } = step;
        let client: PeerId = reply_to
            .parse()
            .map_err(|_| ErrorInfo::new(ErrorKind::BadRequest, "reply_to is not a peer id"))?;
        let failures = self.metrics.failures.clone();
        let forwards = self.forwards.clone();
        self.rt.spawn(async move {
            // Every server reports its output to the client: from the last one it is
            // the result, from the others a copy the client keeps for replays.
            let copy = Request::Output(StepOutput {
                session,
                step: index,
                position,
                hidden: out.clone(),
            });
            let report = {
                let net = net.clone();
                async move {
                    if let Err(e) = net.send(client, vec![], copy).await {
                        tracing::debug!(%client, "cannot send output to client: {e}");
                    }
                }
            };
            if next.is_empty() {
                report.await;
                return;
            }
            let hop: Hop = next.remove(0);
            let failed_peer = hop.peer.clone();
            let forward = async {
                let peer = hop.peer.parse::<PeerId>().map_err(|_| {
                    ErrorInfo::new(ErrorKind::BadRequest, "next hop is not a peer id")
                })?;
                let addrs = hop.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                let fwd = Request::Step(Step {
                    session: hop.session,
                    step: index,
                    position,
                    hidden: out,
                    next,
                    reply_to: reply_to.clone(),
                });
                // The next server reports its own refusal to the client directly.
                net.send(peer, addrs, fwd)
                    .await
                    .map_err(|e| ErrorInfo::new(ErrorKind::Unreachable, e.to_string()))?;
                forwards.record(peer, session, client, index);
                Ok::<(), ErrorInfo>(())
            };
            // The next server first: the copy is only needed if something fails later.
            let forwarded = forward.await;
            report.await;
            if let Err(error) = forwarded {
                failures.get_or_create(&[("kind", error.kind.name())]).inc();
                let msg = Request::Failed(StepFailed {
                    session,
                    step: index,
                    peer: failed_peer,
                    error,
                });
                let _ = net.send(client, vec![], msg).await;
            }
        });
        Ok(())
    }

    fn report_failure(
        &self,
        reply_to: &str,
        session: SessionId,
        step: u64,
        peer: PeerId,
        error: ErrorInfo,
    ) {
        let Ok(client) = reply_to.parse::<PeerId>() else {
            return;
        };
        let net = self.net.clone();
        let msg = Request::Failed(StepFailed {
            session,
            step,
            peer: peer.to_string(),
            error,
        });
        self.rt.spawn(async move {
            let _ = net.send(client, vec![], msg).await;
        });
    }
}
