//! Checking a server's output against a replica's: the client holds every input a
//! server took, so another server of the same blocks can recompute what it sent.

use std::time::{Duration, Instant};

use protocol::HiddenState;

use super::session::Failure;
use super::Delivery;
use super::RemoteSession;
use super::VERIFY_TOLERANCE;
use crate::hidden::relative_rms;
use crate::patience::noting_wait;

/// Relative RMS distance between two outputs of the same rows (infinite if they cannot
/// be compared).
pub(super) fn distance(a: &HiddenState, b: &HiddenState) -> f64 {
    match (a.to_f32(), b.to_f32()) {
        (Ok(a), Ok(b)) if a.len() == b.len() => relative_rms(&a, &b),
        _ => f64::INFINITY,
    }
}

/// Beyond rounding; NaN (garbage) counts as a mismatch.
pub(super) fn is_mismatch(distance: f64) -> bool {
    distance.is_nan() || distance > VERIFY_TOLERANCE
}

impl RemoteSession {
    /// Checks the servers' outputs for the step at `position` (`tokens` rows; `out` is
    /// the last server's): each server, with the client's verify rate as its chance, has
    /// its output compared with a replica's, computed by another server that serves its
    /// blocks from the inputs the client holds (all positions so far, in chunks). A
    /// difference beyond [`VERIFY_TOLERANCE`] is a failure of that server: it is banned
    /// and the step redone on another chain, before its output is used. Servers without
    /// a replica in the swarm go unchecked.
    pub(super) async fn verify(
        &mut self,
        position: u32,
        tokens: u32,
        out: &HiddenState,
    ) -> Option<Failure> {
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
    pub(super) async fn await_copy(&mut self, block: u32, position: u32) -> Option<HiddenState> {
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
}
