//! How many generations the gateway runs at once, and the queue before them: a request
//! waits its turn while the queue has room, and is turned away with a 429 and a
//! `Retry-After` when it has none, so a crowd cannot pile unbounded work on the swarm.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::openai::ApiError;
use super::ApiState;

/// Defaults of `shoal api --max-running` and `--max-queued`.
pub(super) const MAX_RUNNING: usize = 32;
pub(super) const MAX_QUEUED: usize = 64;

/// The gateway's limits and what is under them now.
pub(super) struct Admission {
    running: Arc<Semaphore>,
    max_running: usize,
    queued: AtomicUsize,
    max_queued: usize,
    /// Smoothed seconds a generation holds its turn, in microseconds (for
    /// `Retry-After`).
    held_us: Arc<AtomicU64>,
}

impl Admission {
    pub(super) fn new(max_running: usize, max_queued: usize) -> Self {
        let max_running = max_running.max(1);
        Admission {
            running: Arc::new(Semaphore::new(max_running)),
            max_running,
            queued: AtomicUsize::new(0),
            max_queued,
            held_us: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// A turn to generate, given back when dropped.
pub(super) struct Turn {
    _permit: OwnedSemaphorePermit,
    /// How long the request waited for it.
    pub(super) waited: Duration,
    since: Instant,
    held_us: Arc<AtomicU64>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let held = self.since.elapsed().as_micros() as u64;
        // A rough average is enough for a hint: races lose an update, no more.
        let old = self.held_us.load(Ordering::Relaxed);
        let new = if old == 0 { held } else { (old * 7 + held) / 8 };
        self.held_us.store(new, Ordering::Relaxed);
    }
}

/// Counts a request in the queue while it waits (also when its client hangs up and the
/// wait is dropped).
struct Waiting<'a>(&'a ApiState);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.admission.queued.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.queued.dec();
    }
}

impl ApiState {
    /// A turn to generate: at once while fewer than `--max-running` generations run,
    /// after a wait in the queue while it holds fewer than `--max-queued`, else a 429
    /// whose `Retry-After` guesses when a turn frees up.
    pub(super) async fn admit(&self) -> Result<Turn, ApiError> {
        let a = &self.admission;
        let arrived = Instant::now();
        let turn = |permit, waited| Turn {
            _permit: permit,
            waited,
            since: Instant::now(),
            held_us: a.held_us.clone(),
        };
        if let Ok(permit) = a.running.clone().try_acquire_owned() {
            return Ok(turn(permit, Duration::ZERO));
        }
        let ahead = a.queued.fetch_add(1, Ordering::Relaxed);
        self.metrics.queued.inc();
        let waiting = Waiting(self);
        if ahead >= a.max_queued {
            drop(waiting);
            let held = a.held_us.load(Ordering::Relaxed) as f64 / 1e6;
            let rounds = (ahead / a.max_running + 1) as f64;
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "rate_limit_error",
                code: Some("too_many_requests"),
                message: format!(
                    "the gateway is busy: {} generations running and {ahead} waiting (--max-running, --max-queued); try again shortly",
                    a.max_running
                ),
                retry_after: Some((held * rounds).ceil().max(1.0) as u64),
            });
        }
        let permit = a
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::invalid("the gateway is shutting down"))?;
        drop(waiting);
        Ok(turn(permit, arrived.elapsed()))
    }
}
