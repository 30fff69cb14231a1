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
//!
//! - `plan`: finding servers, probing them and opening a session on a chain.
//! - `session`: [`RemoteSession`], a generation's steps through its chain.
//! - `failover`: replacing the servers of a failed step and replaying their history.
//! - `verify`: checking a server's output against a replica's.

mod failover;
mod plan;
mod session;
pub mod survey;
mod verify;

pub use session::{RemoteSession, Reroute};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordinator::Bans;
use libp2p::{Multiaddr, PeerId};
use protocol::{BlockSpan, SessionId};
use tokio::sync::mpsc;

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

/// A server's answer to opening or resizing a session, asked with [`OPEN_TIMEOUT`].
type OpenAnswer = Result<anyhow::Result<protocol::Response>, tokio::time::error::Elapsed>;

/// What went wrong with a session's opening or resizing; `None` when the server agreed.
fn refusal(answer: OpenAnswer) -> Option<String> {
    use protocol::Response;
    Some(match answer {
        Ok(Ok(Response::Opened { .. })) => return None,
        Ok(Ok(Response::Error(e))) => format!("refused the session: {e}"),
        Ok(Ok(other)) => format!("answered the session request with {other:?}"),
        Ok(Err(e)) => format!("unreachable: {e:#}"),
        Err(_) => format!("no answer within {OPEN_TIMEOUT:?}"),
    })
}

/// Longest wait for servers to answer `Info` while planning (answered off their compute
/// thread: a round trip plus scheduling slack on a loaded machine).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

// Step timeouts and the wait for a suspected server come from `coordinator::timeouts`,
// which the simulator's clients use too.

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

    pub(super) fn register(&self, id: SessionId, tx: mpsc::UnboundedSender<Delivery>) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
    }

    pub(super) fn unregister(&self, id: SessionId) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    pub(super) fn ban(&self, peer: &PeerId) -> Duration {
        let now = self.epoch.elapsed();
        self.bans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail(&peer.to_string(), now)
    }

    pub(super) fn is_banned(&self, peer: &str) -> bool {
        let now = self.epoch.elapsed();
        self.bans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_banned(peer, now)
    }

    /// Dials the bootstrap nodes; at least one must answer within `timeout`.
    pub async fn connect(&self, bootstrap: &[Multiaddr], timeout: Duration) -> anyhow::Result<()> {
        crate::net::connect_any(&self.net, bootstrap, timeout).await
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
