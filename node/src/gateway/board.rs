//! What the dashboard draws (`/api/swarm`: the swarm surveyed, coverage, the gateway's
//! numbers) and the record of each request it lists.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::admission::Turn;
use super::lock;
use super::openai::ApiError;
use super::ApiState;
use super::RequestRecord;
use super::RATE_WINDOW;
use super::RECENT_REQUESTS;
use super::SURVEY_ASK_TIMEOUT;
use super::SURVEY_TTL;
use crate::client::survey::{coverage, survey};
use crate::generation::{Generation, Trip};

/// What the dashboard draws: the model, every server found, coverage per block, the
/// gateway's own numbers and its recent requests.
pub(super) async fn swarm(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let file = state.side.file();
    let n_blocks = file.config().n_layers;
    let (mode, servers, per_block) = match &state.client {
        None => ("local", Vec::new(), vec![1; n_blocks]),
        Some(client) => {
            let servers = {
                let mut cached = state.board.survey.lock().await;
                match &*cached {
                    Some((at, seen)) if at.elapsed() < SURVEY_TTL => seen.clone(),
                    _ => {
                        let seen = survey(client.net(), Some(file.id()), SURVEY_ASK_TIMEOUT).await;
                        *cached = Some((Instant::now(), seen.clone()));
                        seen
                    }
                }
            };
            let per_block = coverage(&servers)
                .remove(file.id())
                .map_or_else(|| vec![0; n_blocks], |(_, c)| c);
            ("swarm", servers, per_block)
        }
    };
    let board = &state.board;
    let tokens_per_second = {
        let mut ended = lock(&board.ended);
        while ended
            .front()
            .is_some_and(|(t, _)| t.elapsed() > RATE_WINDOW)
        {
            ended.pop_front();
        }
        let tokens: usize = ended.iter().map(|(_, n)| n).sum();
        tokens as f64 / board.started.elapsed().min(RATE_WINDOW).as_secs_f64()
    };
    let recent: Vec<RequestRecord> = lock(&board.recent).iter().cloned().collect();
    Json(json!({
        "model": {"name": state.model_name(), "id": file.id(), "blocks": n_blocks},
        "mode": mode,
        "servers": servers,
        "coverage": per_block,
        "gateway": {
            "uptime_seconds": board.started.elapsed().as_secs_f64(),
            "requests": board.requests.load(Ordering::Relaxed),
            "tokens_generated": state.metrics.tokens_generated.get(),
            "tokens_per_second": tokens_per_second,
            "sessions_open": state.metrics.sessions.get(),
        },
        "requests": recent,
    }))
}

/// Follows one generation for the dashboard and the metrics. Dropped before
/// [`Tracker::finish`] (the client hung up, cancelling the generation), it counts the
/// request as cancelled.
pub(super) struct Tracker {
    state: Arc<ApiState>,
    id: String,
    endpoint: &'static str,
    started: Instant,
    finished: bool,
    /// The request's turn to generate, given back when the tracker goes.
    turn: Turn,
}

impl Tracker {
    pub(super) fn start(
        state: &Arc<ApiState>,
        id: &str,
        endpoint: &'static str,
        prompt: usize,
        turn: Turn,
    ) -> Self {
        state.metrics.sessions.inc();
        state.board.requests.fetch_add(1, Ordering::Relaxed);
        let record = RequestRecord {
            id: id.to_string(),
            endpoint,
            started_unix_ms: crate::net::unix_ms(),
            state: "running",
            prompt_tokens: prompt,
            completion_tokens: 0,
            seconds: 0.0,
            tokens_per_second: None,
            finish_reason: None,
            error: None,
            route: Vec::new(),
            reroutes: 0,
        };
        let mut recent = lock(&state.board.recent);
        recent.push_front(record);
        recent.truncate(RECENT_REQUESTS);
        drop(recent);
        Tracker {
            state: state.clone(),
            id: id.to_string(),
            endpoint,
            started: Instant::now(),
            finished: false,
            turn,
        }
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut RequestRecord)) {
        let mut recent = lock(&self.state.board.recent);
        if let Some(r) = recent.iter_mut().find(|r| r.id == self.id) {
            r.seconds = self.started.elapsed().as_secs_f64();
            f(r);
        }
    }

    pub(super) fn outcome(&self, outcome: &'static str) {
        self.state
            .metrics
            .requests
            .get_or_create(&[("endpoint", self.endpoint), ("outcome", outcome)])
            .inc();
    }

    pub(super) fn finish(mut self, result: &Result<(Generation, Trip), ApiError>) {
        self.finished = true;
        let m = &self.state.metrics;
        match result {
            Ok((g, trip)) => {
                let made = g.completion_tokens.len();
                m.tokens_generated.inc_by(made as u64);
                m.prompt_tokens.inc_by(g.prompt_tokens.len() as u64);
                m.reroutes.inc_by(trip.reroutes.len() as u64);
                // From the request's arrival: its wait for a turn, then the prompt.
                m.first_token_seconds
                    .observe(self.turn.waited.as_secs_f64() + g.prefill_seconds);
                lock(&self.state.board.ended).push_back((Instant::now(), made));
                self.outcome("ok");
                self.update(|r| {
                    r.state = "done";
                    r.completion_tokens = made;
                    r.tokens_per_second = Some(g.tokens_per_second);
                    r.finish_reason = Some(g.finish_reason.clone());
                    r.route = trip.route.clone();
                    r.reroutes = trip.reroutes.len();
                });
            }
            Err(e) => {
                m.failures
                    .get_or_create(&[("kind", e.code.unwrap_or("internal"))])
                    .inc();
                self.outcome("error");
                self.update(|r| {
                    r.state = "failed";
                    r.error = Some(e.message.clone());
                });
            }
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.state.metrics.sessions.dec();
        if !self.finished {
            self.outcome("cancelled");
            self.update(|r| r.state = "cancelled");
        }
    }
}
