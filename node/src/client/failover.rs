//! Failing over: the replicas that can take a failed server's blocks, replaying the
//! inputs the client holds into them, and planning the rest of a new chain.

use std::time::Instant;

use anyhow::{bail, Context};
use coordinator::timeouts::FIRST_STEP_TIMEOUT;
use libp2p::PeerId;
use protocol::{BlockSpan, HiddenState, Step};

use super::route_line;
use super::session::Failure;
use super::ActiveHop;
use super::Delivery;
use super::PlannedHop;
use super::RemoteSession;
use super::Reroute;
use super::GRACE;
use super::VERIFY_CHUNK;
use crate::hidden::{concat, rows};
use crate::patience::noting_wait;

impl RemoteSession {
    /// The other servers that serve all of `span`, are not `not` and are not banned.
    pub(super) fn replicas_for(&self, span: BlockSpan, not: PeerId, upto: u32) -> Vec<PlannedHop> {
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
    pub(super) async fn replica_output(
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
    pub(super) async fn run_on_replica(
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

    pub(super) async fn replay_alone(
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
                .send(
                    hop.hop.peer,
                    hop.hop.addrs.clone(),
                    protocol::Frame::Step(step),
                )
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
    pub(super) async fn recover(
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
}
