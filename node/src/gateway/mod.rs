//! `shoal api`: an OpenAI-compatible HTTP gateway to the swarm.
//!
//! Any OpenAI client or SDK pointed at `http://HOST:PORT/v1` talks to the swarm through
//! the same client as `shoal generate`: `GET /v1/models`, `POST /v1/chat/completions`
//! (messages rendered with the model's chat template; `stream: true` as server-sent
//! events in OpenAI's chunk format ending with `[DONE]`) and `POST /v1/completions`.
//! Errors come in OpenAI's JSON shape (`{"error": {"message", "type", "param",
//! "code"}}`) with the matching status: 400 for a body that is not a valid request or a
//! prompt longer than the context, 404 for an unknown model, 429 (with `Retry-After`)
//! when the gateway is full, 503 when the swarm has no route over every block. Chat
//! and text completions give `logprobs` when asked. Anthropic's Messages API is served
//! at `POST /v1/messages` too. Requests are served concurrently, up to a limit with a
//! bounded queue before it; the client process batches their LM heads and the servers
//! batch their steps. A conversation's session stays open on its servers between turns
//! (`conversations`), so a turn sends only its new tokens; `DELETE
//! /v1/conversations/{id}` frees one.
//!
//! A chat page at `/chat` (built into the binary: conversations kept in the browser,
//! streamed answers with a stop button, the route and any failover under each answer)
//! talks to the chat endpoint like any client.
//!
//! The same server has a live dashboard at `/` (a page built into the binary that polls
//! `/api/swarm`: every server found, its span against the model's blocks, throughput,
//! free cache and health, coverage per block, the recent requests) and Prometheus
//! metrics at `/metrics` ([`GatewayMetrics`]).
//!
//! - this module: the shared state and the routes;
//! - `admission`: how many generations run at once, and the queue before them;
//! - `board`: what the dashboard shows (`/api/swarm`) and the tracking of each request;
//! - `conversations`: sessions kept open between the turns of a conversation;
//! - `openai`: the OpenAI endpoints and their errors (the gateway's error type);
//! - `anthropic`: the Messages endpoint, in Anthropic's shapes;
//! - `stream`: a generation answered as server-sent events, for both.

mod admission;
mod anthropic;
mod board;
mod conversations;
mod openai;
mod stream;

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::Html;
use axum::routing::{get, post};
use axum::Router;
use protocol::WireDType;
use serde::Serialize;

use crate::client::survey::Seen;
use crate::client::Client;
use crate::generation::{ClientSide, RouteEntry};
use crate::metrics::GatewayMetrics;

use board::swarm;
use openai::{chat_completions, completions, models};

/// Tokens generated when a request names no limit.
const DEFAULT_MAX_TOKENS: usize = 256;

/// Requests the dashboard lists.
const RECENT_REQUESTS: usize = 20;
/// The dashboard's tokens/s counts the tokens of generations that ended this recently.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// A survey of the swarm is reused this long (several dashboards poll at once).
const SURVEY_TTL: Duration = Duration::from_secs(1);
/// How long a server may take to answer the survey before it is shown as silent.
const SURVEY_ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// What the handlers share.
pub struct ApiState {
    /// Tokenizer, template, embeddings and LM head of the model.
    pub side: ClientSide,
    /// The swarm; `None` runs every block in this process (`--local`).
    pub client: Option<Client>,
    /// Element type of hidden states on the wire.
    pub wire: WireDType,
    /// How long to look for a route over every block.
    pub route_timeout: Duration,
    /// What the gateway counts (exported at `/metrics`).
    pub metrics: GatewayMetrics,
    /// Speculative decoding for requests that do not choose.
    pub speculate: crate::generation::Speculate,
    /// The model `draft` speculation drafts with.
    pub draft_model: Option<std::sync::Arc<crate::generation::DraftModel>>,
    board: Board,
    admission: admission::Admission,
    conversations: Arc<conversations::Conversations>,
}

/// What the dashboard shows besides the swarm itself.
struct Board {
    started: Instant,
    /// Newest first.
    recent: Mutex<VecDeque<RequestRecord>>,
    /// When generations ended and how many tokens each made, within [`RATE_WINDOW`].
    ended: Mutex<VecDeque<(Instant, usize)>>,
    /// Requests that reached the model (answered, failed or cancelled).
    requests: AtomicU64,
    survey: tokio::sync::Mutex<Option<(Instant, Vec<Seen>)>>,
}

/// One request, as the dashboard lists it.
#[derive(Serialize, Clone, Debug)]
struct RequestRecord {
    id: String,
    endpoint: &'static str,
    started_unix_ms: u64,
    /// "running", "done", "failed" or "cancelled" (the client hung up).
    state: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    seconds: f64,
    tokens_per_second: Option<f64>,
    finish_reason: Option<String>,
    error: Option<String>,
    route: Vec<RouteEntry>,
    reroutes: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ApiState {
    /// A gateway over `client` (or local blocks when `None`).
    pub fn new(
        side: ClientSide,
        client: Option<Client>,
        wire: WireDType,
        route_timeout: Duration,
    ) -> Self {
        ApiState {
            side,
            client,
            wire,
            route_timeout,
            metrics: GatewayMetrics::default(),
            speculate: crate::generation::Speculate::Auto,
            draft_model: None,
            admission: admission::Admission::new(admission::MAX_RUNNING, admission::MAX_QUEUED),
            conversations: Arc::new(conversations::Conversations::new(
                0,
                Duration::ZERO,
                Default::default(),
            )),
            board: Board {
                started: Instant::now(),
                recent: Mutex::new(VecDeque::new()),
                ended: Mutex::new(VecDeque::new()),
                requests: AtomicU64::new(0),
                survey: tokio::sync::Mutex::new(None),
            },
        }
    }

    /// At most `running` generations at once, and `queued` requests waiting for a turn
    /// (beyond: 429).
    pub fn set_limits(&mut self, running: usize, queued: usize) {
        self.admission = admission::Admission::new(running, queued);
    }

    /// Keeps at most `limit` conversations' sessions open between turns, each for at
    /// most `idle` unused (0 keeps none: every turn sends its whole history).
    pub fn keep_conversations(&mut self, limit: usize, idle: Duration) {
        let gauge = self.metrics.conversations_kept.clone();
        self.conversations = Arc::new(conversations::Conversations::new(limit, idle, gauge));
        self.conversations.sweep_idle();
    }

    /// The id clients name the model by: the file's name without its extension (the
    /// directory's name for a Hugging Face directory).
    fn model_name(&self) -> String {
        let path = self.side.file().path();
        let stem = if path.is_dir() {
            path.file_name()
        } else {
            path.file_stem()
        };
        match stem.and_then(|s| s.to_str()) {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => self.side.file().id().to_string(),
        }
    }

    /// Whether `model` names this gateway's model (by its id, its file or its name).
    fn serves(&self, model: &str) -> bool {
        let file = self.side.file();
        model == self.model_name() || model == file.id() || model == file.config().name
    }
}

/// The gateway's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    let mut registry = crate::metrics::registry();
    state.metrics.register(&mut registry);
    let registry = Arc::new(registry);
    Router::new()
        .route("/", get(|| async { Html(include_str!("dashboard.html")) }))
        .route("/chat", get(|| async { Html(include_str!("chat.html")) }))
        .route("/api/swarm", get(swarm))
        .route(
            "/metrics",
            get(move || crate::metrics::scrape(registry.clone())),
        )
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/messages", post(anthropic::messages))
        .route(
            "/v1/conversations/{id}",
            axum::routing::delete(openai::forget_conversation),
        )
        .with_state(state)
}
