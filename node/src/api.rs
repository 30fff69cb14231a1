//! `shoal api`: an OpenAI-compatible HTTP gateway to the swarm.
//!
//! Any OpenAI client or SDK pointed at `http://HOST:PORT/v1` talks to the swarm through
//! the same client as `shoal generate`: `GET /v1/models`, `POST /v1/chat/completions`
//! (messages rendered with the model's chat template; `stream: true` as server-sent
//! events in OpenAI's chunk format ending with `[DONE]`) and `POST /v1/completions`.
//! Errors come in OpenAI's JSON shape (`{"error": {"message", "type", "param",
//! "code"}}`) with the matching status: 400 for a body that is not a valid request or a
//! prompt longer than the context, 404 for an unknown model, 503 when the swarm has no
//! route over every block. Requests are served concurrently; the client process batches
//! their LM heads and the servers batch their steps.
//!
//! The same server has a live dashboard at `/` (a page built into the binary that polls
//! `/api/swarm`: every server found, its span against the model's blocks, throughput,
//! free cache and health, coverage per block, the recent requests) and Prometheus
//! metrics at `/metrics` ([`GatewayMetrics`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::WireDType;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shard::{ChatMessage, SamplingParams};

use crate::client::Client;
use crate::generation::{
    prompt_tokens, run_generation, ClientSide, GenerateRequest, Generation, RouteEntry, Trip,
};
use crate::metrics::GatewayMetrics;
use crate::server::serve::DEFAULT_MAX_SEQ_LEN;
use crate::survey::{coverage, survey, Seen};

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
    board: Board,
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
            board: Board {
                started: Instant::now(),
                recent: Mutex::new(VecDeque::new()),
                ended: Mutex::new(VecDeque::new()),
                requests: AtomicU64::new(0),
                survey: tokio::sync::Mutex::new(None),
            },
        }
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
        .route("/api/swarm", get(swarm))
        .route(
            "/metrics",
            get(move || crate::metrics::scrape(registry.clone())),
        )
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .with_state(state)
}

/// What the dashboard draws: the model, every server found, coverage per block, the
/// gateway's own numbers and its recent requests.
async fn swarm(State(state): State<Arc<ApiState>>) -> Json<Value> {
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
struct Tracker {
    state: Arc<ApiState>,
    id: String,
    endpoint: &'static str,
    started: Instant,
    finished: bool,
}

impl Tracker {
    fn start(state: &Arc<ApiState>, id: &str, endpoint: &'static str, prompt: usize) -> Self {
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
        }
    }

    fn update(&self, f: impl FnOnce(&mut RequestRecord)) {
        let mut recent = lock(&self.state.board.recent);
        if let Some(r) = recent.iter_mut().find(|r| r.id == self.id) {
            r.seconds = self.started.elapsed().as_secs_f64();
            f(r);
        }
    }

    fn outcome(&self, outcome: &'static str) {
        self.state
            .metrics
            .requests
            .get_or_create(&[("endpoint", self.endpoint), ("outcome", outcome)])
            .inc();
    }

    fn finish(mut self, result: &Result<(Generation, Trip), ApiError>) {
        self.finished = true;
        let m = &self.state.metrics;
        match result {
            Ok((g, trip)) => {
                let made = g.completion_tokens.len();
                m.tokens_generated.inc_by(made as u64);
                m.prompt_tokens.inc_by(g.prompt_tokens.len() as u64);
                m.reroutes.inc_by(trip.reroutes.len() as u64);
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

/// An error in OpenAI's shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

/// A stop sequence or several.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize, Debug)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of a chat or text completion request that Shoal uses; others are
/// accepted and ignored, as OpenAI-compatible servers commonly do.
#[derive(Deserialize, Debug)]
struct CompletionParams {
    model: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize, Debug)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    params: CompletionParams,
}

#[derive(Deserialize, Debug)]
struct TextRequest {
    prompt: String,
    #[serde(flatten)]
    params: CompletionParams,
}

async fn models(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name(), "object": "model", "created": 0, "owned_by": "shoal"}],
    }))
}

/// Counts a request refused before it reached the model.
fn rejected(state: &ApiState, endpoint: &'static str, r: Result<Response, ApiError>) -> Response {
    match r {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_client_error() {
                state
                    .metrics
                    .requests
                    .get_or_create(&[("endpoint", endpoint), ("outcome", "rejected")])
                    .inc();
            }
            e.into_response()
        }
    }
}

async fn chat_completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let r = chat_completions_inner(state.clone(), body).await;
    rejected(&state, CHAT, r)
}

async fn completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<TextRequest>, JsonRejection>,
) -> Response {
    let r = completions_inner(state.clone(), body).await;
    rejected(&state, TEXT, r)
}

/// Endpoint names in metrics and on the dashboard.
const CHAT: &str = "chat.completions";
const TEXT: &str = "completions";

async fn chat_completions_inner(
    state: Arc<ApiState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    let messages = req
        .messages
        .into_iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect();
    let generate = GenerateRequest {
        messages,
        ..request(&state, &req.params)?
    };
    complete(state, generate, req.params, true).await
}

async fn completions_inner(
    state: Arc<ApiState>,
    body: Result<Json<TextRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let generate = GenerateRequest {
        prompt: req.prompt,
        ..request(&state, &req.params)?
    };
    complete(state, generate, req.params, false).await
}

/// The generation a request's parameters ask for (no prompt yet).
fn request(state: &ApiState, p: &CompletionParams) -> Result<GenerateRequest, ApiError> {
    if let Some(model) = &p.model {
        if !state.serves(model) {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                code: Some("model_not_found"),
                message: format!(
                    "the model `{model}` does not exist here; this gateway serves `{}`",
                    state.model_name()
                ),
            });
        }
    }
    let temperature = p.temperature.unwrap_or(1.0);
    let top_p = p.top_p.unwrap_or(1.0);
    if !((0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "temperature must be in [0, 2] and top_p in (0, 1]",
        ));
    }
    let seed = p.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    Ok(GenerateRequest {
        max_tokens: p
            .max_tokens
            .or(p.max_completion_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS),
        sampling: SamplingParams {
            temperature,
            top_p,
            seed,
            ..SamplingParams::default()
        },
        stop: match &p.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        },
        step_latency: Some(state.metrics.step_seconds.clone()),
        ..GenerateRequest::default()
    })
}

/// Checks the prompt fits, then answers at once or as a stream of chunks.
async fn complete(
    state: Arc<ApiState>,
    req: GenerateRequest,
    params: CompletionParams,
    chat: bool,
) -> Result<Response, ApiError> {
    let prompt =
        prompt_tokens(state.side.text(), &req).map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    let context = state
        .side
        .file()
        .config()
        .max_seq_len
        .min(DEFAULT_MAX_SEQ_LEN);
    if prompt.len() >= context {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            message: format!(
                "the prompt is {} tokens; this model's context is {context} tokens",
                prompt.len()
            ),
        });
    }
    let id = format!(
        "{}-{:x}",
        if chat { "chatcmpl" } else { "cmpl" },
        rand::random::<u64>()
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = state.model_name();
    let tracker = Tracker::start(&state, &id, if chat { CHAT } else { TEXT }, prompt.len());
    if !params.stream {
        let result = generate(&state, &req, |_| {}).await;
        tracker.finish(&result);
        let (g, _) = result?;
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": g.text},
                   "finish_reason": g.finish_reason, "logprobs": null})
        } else {
            json!({"index": 0, "text": g.text, "finish_reason": g.finish_reason, "logprobs": null})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        return Ok(Json(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice], "usage": usage(&g),
        }))
        .into_response());
    }
    // Streaming: the generation runs in its own task and sends chunks as text arrives.
    let include_usage = params.stream_options.is_some_and(|o| o.include_usage);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value| -> Value {
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    if chat {
        let _ = tx.send(chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": null}),
        ));
    }
    tokio::spawn(async move {
        let piece_tx = tx.clone();
        let piece_chunk = chunk.clone();
        let generation = generate(&state, &req, move |piece| {
            let choice = if chat {
                json!({"index": 0, "delta": {"content": piece}, "finish_reason": null})
            } else {
                json!({"index": 0, "text": piece, "finish_reason": null})
            };
            let _ = piece_tx.send(piece_chunk(choice));
        });
        // A client that hangs up cancels its generation; dropping it closes its
        // sessions on the servers (RemoteSession's Drop).
        let result = tokio::select! {
            r = generation => r,
            () = tx.closed() => return,
        };
        tracker.finish(&result);
        match result {
            Ok((g, _)) => {
                let last = if chat {
                    json!({"index": 0, "delta": {}, "finish_reason": g.finish_reason})
                } else {
                    json!({"index": 0, "text": "", "finish_reason": g.finish_reason})
                };
                let _ = tx.send(chunk(last));
                if include_usage {
                    let mut u = chunk(Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&g);
                    let _ = tx.send(u);
                }
            }
            Err(e) => {
                let _ = tx.send(json!({"error": {"message": e.message, "type": e.kind,
                                                 "param": null, "code": e.code}}));
            }
        }
    });
    let events = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(v) => Some((
                Ok::<_, Infallible>(Event::default().data(v.to_string())),
                Some(rx),
            )),
            None => Some((Ok(Event::default().data("[DONE]")), None)),
        }
    });
    Ok(Sse::new(events).into_response())
}

fn usage(g: &Generation) -> Value {
    let (p, c) = (g.prompt_tokens.len(), g.completion_tokens.len());
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// Runs a generation, sorting its failures into OpenAI's error kinds.
async fn generate(
    state: &ApiState,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<(Generation, Trip), ApiError> {
    match run_generation(
        &state.side,
        state.client.as_ref(),
        req,
        state.wire,
        state.route_timeout,
        on_text,
    )
    .await
    {
        Ok(done) => Ok(done),
        Err(e) => {
            let message = format!("{e:#}");
            let no_route = message.contains("no chain of servers");
            Err(ApiError {
                status: if no_route {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                },
                kind: "server_error",
                code: no_route.then_some("no_route"),
                message,
            })
        }
    }
}
