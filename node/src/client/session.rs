//! [`RemoteSession`]: a generation's state on its chain, and one step through it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use coordinator::timeouts::{step_timeout, FIRST_STEP_TIMEOUT};
use libp2p::PeerId;
use protocol::{Announcement, ErrorKind, HiddenState, Hop, Request, SessionId, Step, WireDType};
use tokio::sync::mpsc;

use super::ActiveHop;
use super::Client;
use super::Delivery;
use super::MAX_RECOVERIES;
use super::OPEN_TIMEOUT;
use crate::hidden::rows;
use crate::net::Link;
use crate::patience::SLOW_WAIT;
use crate::patience::SLOW_WAIT_REPEAT;
use crate::NodeError;

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
pub(super) struct Failure {
    /// Index into the chain of the server blamed.
    pub(super) suspect: usize,
    pub(super) reason: String,
    /// Time from sending the step to noticing the failure.
    pub(super) after: Duration,
}

/// What every server of a session must agree to.
pub(super) struct SessionSpec {
    pub(super) model_id: String,
    pub(super) n_blocks: u32,
    pub(super) max_len: u32,
    pub(super) wire: WireDType,
}

/// A generation's state on a chain of servers.
pub struct RemoteSession {
    pub(super) client: Client,
    pub(super) spec: SessionSpec,
    pub(super) route_timeout: Duration,
    /// Servers from the last DHT lookup, for planning a failover without a new one.
    pub(super) known: Vec<Announcement>,
    pub(super) hops: Vec<ActiveHop>,
    pub(super) tx: mpsc::UnboundedSender<Delivery>,
    pub(super) rx: mpsc::UnboundedReceiver<Delivery>,
    pub(super) disconnects: tokio::sync::broadcast::Receiver<PeerId>,
    /// Index of the next step sent (normal or replay): indices only grow.
    pub(super) next_index: u64,
    /// Tokens processed so far.
    pub(super) position: u32,
    /// For each block boundary: the hidden states that entered it, by first position.
    pub(super) inputs: BTreeMap<u32, BTreeMap<u32, HiddenState>>,
    /// Smoothed time of a one-token step, seconds.
    pub(super) step_secs: Option<f64>,
    /// Failovers so far.
    pub reroutes: Vec<Reroute>,
    pub(super) on_route: Box<dyn FnMut(&str) + Send>,
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

    pub(super) fn hop_index(&self, session: SessionId) -> Option<usize> {
        self.hops.iter().position(|h| h.session == session)
    }

    /// How long a step of `tokens` tokens may take before the chain is presumed broken:
    /// a multiple of the recent one-token step, plus, for many tokens, a multiple of
    /// what the servers' announced speeds predict (a prefill is faster per token than
    /// decoding, so this errs long).
    pub(super) fn timeout(&self, tokens: u32) -> Duration {
        let per_token: f64 = self
            .hops
            .iter()
            .map(|h| 1.0 / (h.hop.throughput.max(1e-3) as f64))
            .sum();
        step_timeout(self.step_secs, per_token, tokens)
    }

    /// Keeps a server's output as the input of the next block boundary.
    pub(super) fn keep_copy(&mut self, hop: usize, position: u32, hidden: HiddenState) {
        let end = self.hops[hop].hop.span.end;
        if end < self.spec.n_blocks {
            self.inputs.entry(end).or_default().insert(position, hidden);
        }
    }

    /// The inputs of block `block` for positions `0..upto`, if the client holds them all.
    pub(super) fn history(&self, block: u32, upto: u32) -> Option<Vec<HiddenState>> {
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
    pub(super) async fn run_step(
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
                protocol::Frame::Step(step),
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
    pub async fn forward(&mut self, hidden: HiddenState) -> Result<HiddenState, NodeError> {
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
            match self
                .recover(failure, position, tokens)
                .await
                .map_err(NodeError::from)?
            {
                Ok(out) => {
                    self.position += tokens;
                    return Ok(out);
                }
                Err(f) => failure = f,
            }
        }
        Err(NodeError::Other(anyhow!(
            "gave up on step at position {position} after {MAX_RECOVERIES} failovers"
        )))
    }

    /// Tokens processed so far: the position the next step starts at.
    pub fn position(&self) -> u32 {
        self.position
    }

    /// Takes the session back to position `to` (drafted tokens a verify step rejected):
    /// the next step starts there, and each server drops its cache past it as it runs
    /// that step (no round trip of its own). The hidden states kept for failover are
    /// cut to match, so a replay feeds only what was accepted.
    pub fn rewind(&mut self, to: u32) {
        if to >= self.position {
            return;
        }
        self.position = to;
        for by_position in self.inputs.values_mut() {
            by_position.retain(|&at, _| at < to);
            if let Some((&at, h)) = by_position.iter_mut().next_back() {
                let n = h.shape.first().copied().unwrap_or(0);
                if at + n > to {
                    *h = rows(h, 0, (to - at) as usize);
                }
            }
        }
    }

    /// The longest sequence the session may reach.
    pub fn max_len(&self) -> u32 {
        self.spec.max_len
    }

    /// Changes the longest sequence the session may reach, on every server of its chain
    /// ([`Request::Resize`]): shrunk to the tokens held while a conversation waits for
    /// its next turn (the servers keep only what it holds, and may drop it if another
    /// session needs the room), grown again for the next turn. An error (a server that
    /// dropped the session, has no room, or is gone) leaves the session good for
    /// nothing: the caller closes it and opens another. No server is banned for it.
    pub async fn resize(&mut self, max_len: u32) -> anyhow::Result<()> {
        // A server whose connection closed while the session waited, or that has failed
        // another session meanwhile, is not asked: it would be a wait for nothing.
        loop {
            use tokio::sync::broadcast::error::TryRecvError;
            match self.disconnects.try_recv() {
                Ok(peer) if self.hops.iter().any(|h| h.hop.peer == peer) => {
                    bail!("server {peer} of the session's chain has disconnected")
                }
                Ok(_) | Err(TryRecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        if let Some(h) = self
            .hops
            .iter()
            .find(|h| self.client.is_banned(&h.hop.peer.to_string()))
        {
            bail!("server {} of the session's chain has failed", h.hop.peer);
        }
        let asks = self.hops.iter().map(|h| {
            let net = self.client.net.clone();
            let (peer, addrs, session) = (h.hop.peer, h.hop.addrs.clone(), h.session);
            async move {
                let req = Request::Resize { session, max_len };
                (
                    peer,
                    tokio::time::timeout(OPEN_TIMEOUT, net.request(peer, addrs, req)).await,
                )
            }
        });
        for (peer, r) in futures::future::join_all(asks).await {
            if let Some(problem) = super::refusal(r) {
                bail!("resizing the session to {max_len} tokens: server {peer} {problem}");
            }
        }
        self.spec.max_len = max_len;
        Ok(())
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
