//! The OpenAI endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
//! with OpenAI's error shape and server-sent-event streaming.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use shard::{ChatMessage, SamplingParams};

use super::board::Tracker;
use super::ApiState;
use super::DEFAULT_MAX_TOKENS;
use crate::generation::{prompt_tokens, run_turn, GenerateRequest, Generation, Trip, Turn};
use crate::NodeError;
use coordinator::budget::DEFAULT_MAX_SEQ_LEN;

/// An error in OpenAI's shape.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) code: Option<&'static str>,
    pub(super) message: String,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// The status for each way a generation fails: the client's fault (400), the swarm's
/// lack of servers (503, worth retrying), anything else (500).
impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::InvalidRequest(message) => ApiError::invalid(message),
            NodeError::NoRoute(e) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: Some("no_route"),
                message: format!("{e:#}"),
                retry_after: None,
            },
            NodeError::Other(e) => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "server_error",
                code: None,
                message: format!("{e:#}"),
                retry_after: None,
            },
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
        let mut response = (self.status, Json(body)).into_response();
        add_retry_after(&mut response, self.retry_after);
        response
    }
}

/// Adds `Retry-After: secs` to `response`, if given.
pub(super) fn add_retry_after(response: &mut Response, secs: Option<u64>) {
    if let Some(secs) = secs {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(secs),
        );
    }
}

/// A stop sequence or several.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
pub(super) struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize, Debug)]
pub(super) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of a chat or text completion request that Shoal uses; others are
/// accepted and ignored, as OpenAI-compatible servers commonly do.
#[derive(Deserialize, Debug, Default)]
pub(super) struct CompletionParams {
    pub(super) model: Option<String>,
    pub(super) max_tokens: Option<usize>,
    pub(super) max_completion_tokens: Option<usize>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) seed: Option<u64>,
    pub(super) stop: Option<Stop>,
    #[serde(default)]
    pub(super) stream: bool,
    pub(super) stream_options: Option<StreamOptions>,
    /// Chat: `true` for each token's log-probability; completions: how many of the
    /// most likely tokens' to give besides.
    pub(super) logprobs: Option<Logprobs>,
    /// Chat: how many of the most likely tokens' log-probabilities to give besides.
    pub(super) top_logprobs: Option<usize>,
    /// Shoal's own: speculative decoding for this request (`off`, `ngram`, `draft`,
    /// `auto`); the gateway's `--speculate` when absent.
    pub(super) speculate: Option<crate::generation::Speculate>,
    /// Shoal's own: in a stream, chunks with no choices and a `shoal` object holding
    /// the route (servers, spans, how each is reached) once it is chosen and after each
    /// failover, as it happens (what the chat page shows under an answer).
    #[serde(default)]
    pub(super) route_events: bool,
    /// Shoal's own: the conversation this request continues (any id its client
    /// chooses; the chat page sends one). The gateway reuses the session it kept from
    /// that conversation's last turn; `DELETE /v1/conversations/{id}` frees it. Without
    /// an id a kept session is found by the tokens it shares with the prompt.
    pub(super) conversation: Option<String>,
}

/// `logprobs`: a switch in chat requests, a count in completion requests.
#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(untagged)]
pub(super) enum Logprobs {
    On(bool),
    Top(usize),
}

/// Most alternatives a request may ask log-probabilities of (OpenAI's limit).
const MOST_LOGPROBS: usize = 20;

#[derive(Deserialize, Debug)]
pub(super) struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    params: CompletionParams,
}

#[derive(Deserialize, Debug)]
pub(super) struct TextRequest {
    prompt: String,
    #[serde(flatten)]
    params: CompletionParams,
}

pub(super) async fn models(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name(), "object": "model", "created": 0, "owned_by": "shoal"}],
    }))
}

/// Counts a request refused before it reached the model, and answers its error as
/// `render` shapes it (OpenAI's shape, or Anthropic's).
pub(super) fn rejected(
    state: &ApiState,
    endpoint: &'static str,
    r: Result<Response, ApiError>,
    render: impl FnOnce(ApiError) -> Response,
) -> Response {
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
            render(e)
        }
    }
}

pub(super) async fn chat_completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let r = chat_completions_inner(state.clone(), body).await;
    rejected(&state, CHAT, r, IntoResponse::into_response)
}

pub(super) async fn completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<TextRequest>, JsonRejection>,
) -> Response {
    let r = completions_inner(state.clone(), body).await;
    rejected(&state, TEXT, r, IntoResponse::into_response)
}

/// Endpoint names in metrics and on the dashboard.
pub(super) const CHAT: &str = "chat.completions";
pub(super) const TEXT: &str = "completions";

pub(super) async fn chat_completions_inner(
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

pub(super) async fn completions_inner(
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
pub(super) fn request(state: &ApiState, p: &CompletionParams) -> Result<GenerateRequest, ApiError> {
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
                retry_after: None,
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
    let logprobs = match (p.logprobs, p.top_logprobs) {
        (Some(Logprobs::On(true)), top) => Some(top.unwrap_or(0)),
        (Some(Logprobs::Top(n)), _) => Some(n),
        (None | Some(Logprobs::On(false)), Some(_)) => {
            return Err(ApiError::invalid("top_logprobs needs logprobs: true"))
        }
        (None | Some(Logprobs::On(false)), None) => None,
    };
    if logprobs.is_some_and(|n| n > MOST_LOGPROBS) {
        return Err(ApiError::invalid(format!(
            "at most {MOST_LOGPROBS} most likely tokens' log-probabilities per token"
        )));
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
        logprobs,
        speculate: p.speculate.unwrap_or(state.speculate),
        draft_model: state.draft_model.clone(),
        conversation: p.conversation.clone(),
        ..GenerateRequest::default()
    })
}

/// The prompt's length in tokens, checked to fit the model's context.
pub(super) fn checked_prompt(state: &ApiState, req: &GenerateRequest) -> Result<usize, ApiError> {
    let prompt = prompt_tokens(state.side.text(), req)?;
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
            retry_after: None,
        });
    }
    Ok(prompt.len())
}

/// Checks the prompt fits, then answers at once or as a stream of chunks.
pub(super) async fn complete(
    state: Arc<ApiState>,
    req: GenerateRequest,
    params: CompletionParams,
    chat: bool,
) -> Result<Response, ApiError> {
    let prompt = checked_prompt(&state, &req)?;
    let turn = state.admit().await?;
    let id = format!(
        "{}-{:x}",
        if chat { "chatcmpl" } else { "cmpl" },
        rand::random::<u64>()
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = state.model_name();
    let tracker = Tracker::start(&state, &id, if chat { CHAT } else { TEXT }, prompt, turn);
    if !params.stream {
        let result = generate(&state, &req, |_| {}).await;
        tracker.finish(&result);
        let (g, _) = result?;
        let logprobs = logprobs_json(&state, &g, chat);
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": g.text},
                   "finish_reason": g.finish_reason, "logprobs": logprobs})
        } else {
            json!({"index": 0, "text": g.text, "finish_reason": g.finish_reason, "logprobs": logprobs})
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
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value| -> Value {
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    let data = |v: Value| Event::default().data(v.to_string());
    let first = if chat {
        vec![data(chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                   "finish_reason": null}),
        ))]
    } else {
        Vec::new()
    };
    let piece_chunk = chunk.clone();
    let piece = move |text: &str| {
        let choice = if chat {
            json!({"index": 0, "delta": {"content": text}, "finish_reason": null})
        } else {
            json!({"index": 0, "text": text, "finish_reason": null})
        };
        data(piece_chunk(choice))
    };
    let trip_chunk = chunk.clone();
    let trip = params.route_events.then(|| -> super::stream::TripEvent {
        Box::new(move |t: &Trip| {
            let mut c = trip_chunk(Value::Null);
            c["choices"] = json!([]);
            c["shoal"] = json!({"route": t.route, "reroutes": t.reroutes});
            data(c)
        })
    });
    let end = move |state: &ApiState, result: Result<(Generation, Trip), ApiError>| {
        let mut out = Vec::new();
        match result {
            Ok((g, _)) => {
                // Log-probabilities, if asked for, come with the last chunk, for all
                // the tokens (pieces of text and tokens do not line up).
                let logprobs = logprobs_json(state, &g, chat);
                let last = if chat {
                    json!({"index": 0, "delta": {}, "finish_reason": g.finish_reason,
                           "logprobs": logprobs})
                } else {
                    json!({"index": 0, "text": "", "finish_reason": g.finish_reason,
                           "logprobs": logprobs})
                };
                out.push(data(chunk(last)));
                if include_usage {
                    let mut u = chunk(Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&g);
                    out.push(data(u));
                }
            }
            Err(e) => out.push(data(json!({"error": {"message": e.message, "type": e.kind,
                                                      "param": null, "code": e.code}}))),
        }
        out.push(Event::default().data("[DONE]"));
        out
    };
    Ok(super::stream::events(
        state, req, tracker, first, piece, trip, end,
    ))
}

/// The log-probabilities of a generation in OpenAI's shape (chat's or completions'),
/// or null when not asked for.
fn logprobs_json(state: &ApiState, g: &Generation, chat: bool) -> Value {
    if g.logprobs.is_empty() {
        return Value::Null;
    }
    let text = |id: u32| state.side.text().decode(&[id]).unwrap_or_default();
    if chat {
        let entry = |id: u32, logprob: f32| {
            let t = text(id);
            json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
        };
        let content: Vec<Value> = g
            .logprobs
            .iter()
            .map(|l| {
                let mut e = entry(l.token, l.logprob);
                e["top_logprobs"] = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                e
            })
            .collect();
        return json!({ "content": content });
    }
    let mut offset = 0;
    let (mut tokens, mut logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
    for l in &g.logprobs {
        let t = text(l.token);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        logprobs.push(l.logprob);
        let alternatives: serde_json::Map<String, Value> = l
            .top
            .iter()
            .map(|&(id, lp)| (text(id), json!(lp)))
            .collect();
        top.push(alternatives);
    }
    json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top,
           "text_offset": offsets})
}

pub(super) fn usage(g: &Generation) -> Value {
    let (p, c) = (g.prompt_tokens.len(), g.completion_tokens.len());
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
           "prompt_tokens_details": {"cached_tokens": g.cached_tokens}})
}

/// Runs a generation, sorting its failures into OpenAI's error kinds. Through the
/// swarm, a session kept from the conversation's last turn is reused where it fits,
/// and this turn's is kept for the next (see `conversations`).
pub(super) async fn generate(
    state: &ApiState,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<(Generation, Trip), ApiError> {
    let store = &state.conversations;
    let prompt = prompt_tokens(state.side.text(), req)?;
    let keep = store.enabled() && state.client.is_some();
    let warm = match keep {
        true => store.take(req.conversation.as_deref(), &prompt).await,
        false => None,
    };
    let turn = Turn { prompt, warm, keep };
    let (g, trip, warm) = run_turn(
        &state.side,
        state.client.as_ref(),
        req,
        turn,
        state.wire,
        state.route_timeout,
        on_text,
    )
    .await
    .map_err(ApiError::from)?;
    state
        .metrics
        .prompt_tokens_cached
        .inc_by(g.cached_tokens as u64);
    if let Some(w) = warm {
        store.keep(req.conversation.clone(), w);
    }
    Ok((g, trip))
}

/// `DELETE /v1/conversations/{id}`: closes the session kept for a conversation (the
/// chat page's, when it deletes one). 404 when none is kept.
pub(super) async fn forget_conversation(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Response {
    if state.conversations.forget(&id) {
        Json(json!({"id": id, "object": "conversation.deleted", "deleted": true})).into_response()
    } else {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            code: None,
            message: format!("no conversation {id} is kept"),
            retry_after: None,
        }
        .into_response()
    }
}
