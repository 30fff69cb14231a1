//! Running steps: a batch through the span, each output pushed to the next server and a
//! copy to the client, failures reported to the client, and what was passed to whom
//! (so a lost connection to the next server is reported at once).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use libp2p::PeerId;
use protocol::{
    ErrorInfo, ErrorKind, Frame, Hop, SessionId, Step, StepFailed, StepOutput, WireDType,
};
use shard::candle_core::Tensor;

use super::compute::Server;
use super::compute::SESSION_IDLE_TIMEOUT;
use super::inbox::BlockRange;
use super::sessions::Session;
use crate::hidden::{from_wire, to_wire};
use crate::net::Network;

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
pub(super) struct Forwards(Mutex<HashMap<PeerId, HashMap<SessionId, Forwarded>>>);

/// A step passed on: whose (the client), which, and when.
pub(super) type Forwarded = (PeerId, u64, Instant);

impl Forwards {
    /// `session` (this server's id) passed step `step` of `client` on to `next`.
    pub(super) fn record(&self, next: PeerId, session: SessionId, client: PeerId, step: u64) {
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
    pub(super) fn forget(&self, sessions: &[SessionId]) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for passed in map.values_mut() {
            for s in sessions {
                passed.remove(s);
            }
        }
        map.retain(|_, passed| !passed.is_empty());
    }

    /// Tells the clients of the steps last passed to `next`, whose connection closed.
    pub(super) async fn connection_lost(&self, net: &Network, next: PeerId) {
        let lost = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&next)
            .unwrap_or_default();
        for (session, (client, step, _)) in lost {
            tracing::debug!(%next, session, step, "connection to the next server closed");
            let msg = Frame::Failed(StepFailed {
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

impl Server {
    /// Computes validated steps, as one batch per set of sessions over the same blocks,
    /// and sends each output on. A step that fails is reported to its client.
    pub(super) fn run_steps(&mut self, steps: Vec<Step>) {
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
                if let Some(mut session) = self.sessions.remove(&step.session) {
                    // Drafts the client rejected go before the step runs.
                    session.cache.truncate(step.position as usize);
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
            self.batch_time = started.elapsed();
            let took = self.batch_time.as_secs_f64();
            let mut done = Vec::with_capacity(taken.len());
            self.batches += 1;
            for (step, _, mut session) in taken {
                session.last_step = Some(step.step);
                session.batch = self.batches;
                let now = Instant::now();
                session.period = Some(now.duration_since(session.last_used));
                session.last_used = now;
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

    pub(super) fn count_failure(&self, e: &ErrorInfo) {
        self.metrics
            .failures
            .get_or_create(&[("kind", e.kind.name())])
            .inc();
    }

    /// A step that cannot be taken: the error goes to the step's client.
    pub(super) fn step_failed(&self, step: &Step, e: ErrorInfo) {
        tracing::warn!(session = step.session, "step failed: {e}");
        self.count_failure(&e);
        let me = self.net.peer_id();
        self.report_failure(&step.reply_to, step.session, step.step, me, e);
    }

    /// Pushes a step's output to the next server of the chain and a copy to the client.
    pub(super) fn send_output(
        &self,
        step: Step,
        y: &Tensor,
        wire: WireDType,
    ) -> Result<(), ErrorInfo> {
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
            let copy = Frame::Output(StepOutput {
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
                let fwd = Frame::Step(Step {
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
                let msg = Frame::Failed(StepFailed {
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

    pub(super) fn report_failure(
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
        let msg = Frame::Failed(StepFailed {
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
