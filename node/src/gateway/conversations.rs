//! Conversations that remember: a chat's session stays open on its servers between
//! turns, so the next turn sends only what is new.
//!
//! OpenAI's and Anthropic's chat requests carry the whole history every turn; without
//! this, every turn's prompt went through every server again and the time to first
//! token grew with the conversation. After a turn the gateway keeps its session
//! ([`Warm`]) with the tokens its servers' caches hold, shrunk on the servers to exactly
//! those tokens (a parked session: the servers may drop it when another session needs
//! the room, see the server's `make_room`). The next request that names the same
//! conversation (the chat page sends an id), or, naming none, whose prompt begins with
//! most of a kept session's tokens, takes that session: the servers keep the tokens the
//! two share and get only the rest. Anything that goes wrong on the way (a server
//! dropped the session, has no room to grow it, or has gone) means a fresh session and
//! the whole prompt, exactly as without this; a server failing mid-turn fails over by
//! replay as always. The cached positions hold bit for bit what a resent prompt would
//! recompute, on servers whose blocks run on the CPU in f32 (`shard`'s attention gives
//! a row the same numbers however the tokens were grouped into steps), so the answers
//! are a resend's; on a GPU, or with candle's matmuls (dense safetensors weights), up
//! to float rounding.
//!
//! Kept sessions go when idle too long, when more than the limit are kept (least
//! recently used first), and when the chat page deletes its conversation.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

use crate::client::RemoteSession;
use crate::generation::{shared_prefix, Warm};

/// How often kept sessions are checked for idleness.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A session kept after its turn. Its session sits behind a lock while it is shrunk on
/// its servers (just after the turn), so a next turn arriving meanwhile waits for that.
struct Kept {
    /// The conversation's id, when its client names it.
    id: Option<String>,
    /// What its servers' caches hold.
    tokens: Vec<u32>,
    since: Instant,
    /// `None` once shrinking it failed (it was closed).
    session: Arc<tokio::sync::Mutex<Option<RemoteSession>>>,
}

/// The sessions kept between turns of conversations.
pub(super) struct Conversations {
    kept: Mutex<Vec<Kept>>,
    /// Most kept at once; 0 keeps none.
    limit: usize,
    /// How long one is kept unused.
    idle: Duration,
    /// How many are kept, for the metrics (set at every change).
    gauge: Gauge,
}

fn lock(m: &Mutex<Vec<Kept>>) -> std::sync::MutexGuard<'_, Vec<Kept>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes sessions in the background (closing waits for the servers' answers).
fn close_all(gone: Vec<Kept>) {
    if gone.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for k in gone {
            if let Some(s) = k.session.lock().await.take() {
                s.close().await;
            }
        }
    });
}

impl Conversations {
    /// Keeps at most `limit` sessions, each for at most `idle` unused; `gauge` shows
    /// how many.
    pub(super) fn new(limit: usize, idle: Duration, gauge: Gauge) -> Self {
        Conversations {
            kept: Mutex::new(Vec::new()),
            limit,
            idle,
            gauge,
        }
    }

    /// Whether sessions are kept at all.
    pub(super) fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// Takes out the kept sessions `gone` picks and closes them (in the background);
    /// how many there were.
    fn drop_where(&self, gone: impl FnMut(&Kept) -> bool) -> usize {
        let gone: Vec<Kept> = {
            let mut kept = lock(&self.kept);
            let (gone, rest) = std::mem::take(&mut *kept).into_iter().partition(gone);
            *kept = rest;
            self.gauge.set(kept.len() as i64);
            gone
        };
        let n = gone.len();
        close_all(gone);
        n
    }

    /// Starts closing kept sessions once idle too long (the task ends with the store).
    pub(super) fn sweep_idle(self: &Arc<Self>) {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(store) = store.upgrade() else { return };
                store.drop_where(|k| k.since.elapsed() >= store.idle);
            }
        });
    }

    /// The kept session for a request with `prompt`: the conversation `id`'s if it
    /// names one; otherwise, of those kept without an id, the one sharing the longest
    /// beginning with the prompt, if that is at least half of what it holds (a session
    /// of another conversation that shares only a system prompt stays for its own).
    /// It is no longer kept: the caller runs the turn with it and keeps it again.
    pub(super) async fn take(&self, id: Option<&str>, prompt: &[u32]) -> Option<Warm> {
        let k = {
            let mut kept = lock(&self.kept);
            let at = match id {
                Some(id) => kept.iter().position(|k| k.id.as_deref() == Some(id)),
                None => kept
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| k.id.is_none())
                    .map(|(i, k)| (i, shared_prefix(&k.tokens, prompt), k.tokens.len()))
                    .filter(|&(_, shared, held)| shared > 0 && 2 * shared >= held)
                    .max_by_key(|&(_, shared, _)| shared)
                    .map(|(i, _, _)| i),
            }?;
            let k = kept.swap_remove(at);
            self.gauge.set(kept.len() as i64);
            k
        };
        let session = k.session.lock().await.take()?;
        Some(Warm {
            session,
            tokens: k.tokens,
        })
    }

    /// Keeps a turn's session for the conversation's next turn, shrunk on its servers
    /// to what it holds. It is findable at once, before the shrinking ends; the least
    /// recently used beyond the limit are closed, as is one kept for the same id.
    pub(super) fn keep(&self, id: Option<String>, warm: Warm) {
        if !self.enabled() {
            tokio::spawn(warm.session.close());
            return;
        }
        let Warm {
            mut session,
            tokens,
        } = warm;
        let slot = Arc::new(tokio::sync::Mutex::new(None));
        let Ok(mut guard) = slot.clone().try_lock_owned() else {
            // A lock just made is free: this does not happen.
            tokio::spawn(session.close());
            return;
        };
        let held = tokens.len() as u32;
        if id.is_some() {
            self.drop_where(|k| k.id == id);
        }
        let gone = {
            let mut kept = lock(&self.kept);
            kept.sort_by_key(|k| std::cmp::Reverse(k.since));
            let room = kept.len().min(self.limit - 1);
            let gone = kept.split_off(room);
            kept.push(Kept {
                id,
                tokens,
                since: Instant::now(),
                session: slot,
            });
            self.gauge.set(kept.len() as i64);
            gone
        };
        close_all(gone);
        tokio::spawn(async move {
            match session.resize(held.max(1)).await {
                Ok(()) => *guard = Some(session),
                Err(e) => {
                    tracing::info!("a conversation's session is not kept: {e:#}");
                    session.close().await;
                }
            }
        });
    }

    /// Closes the session kept for conversation `id`; whether there was one.
    pub(super) fn forget(&self, id: &str) -> bool {
        self.drop_where(|k| k.id.as_deref() == Some(id)) > 0
    }
}
