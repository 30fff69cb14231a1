//! Anthropic's Messages API, `POST /v1/messages`, plain and streamed, for tools that
//! speak it (coding assistants among them): text content only, errors in Anthropic's
//! shape (`{"type": "error", "error": {"type", "message"}}`).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use shard::ChatMessage;

use super::board::Tracker;
use super::openai::{self, ApiError, CompletionParams, Stop};
use super::ApiState;
use crate::generation::{GenerateRequest, Generation, Trip};

/// The endpoint's name in metrics and on the dashboard.
pub(super) const MESSAGES: &str = "messages";

/// A message's content: a string, or blocks of which only text ones are understood.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Deserialize, Debug)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

impl Content {
    fn text(self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Blocks(blocks) => {
                let mut out = String::new();
                for b in blocks {
                    if b.kind != "text" {
                        return Err(ApiError::invalid(format!(
                            "content blocks of type `{}` are not supported here (text only)",
                            b.kind
                        )));
                    }
                    out.push_str(&b.text);
                }
                Ok(out)
            }
        }
    }
}

#[derive(Deserialize, Debug)]
struct Message {
    role: String,
    content: Content,
}

/// The fields of a Messages request that Shoal uses; others are accepted and ignored.
#[derive(Deserialize, Debug)]
pub(super) struct MessagesRequest {
    model: String,
    max_tokens: usize,
    messages: Vec<Message>,
    system: Option<Content>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    #[serde(default)]
    stream: bool,
    /// Shoal's own, as on the OpenAI endpoints.
    speculate: Option<crate::generation::Speculate>,
    /// Shoal's own, as on the OpenAI endpoints.
    conversation: Option<String>,
}

/// An error in Anthropic's shape, from the gateway's own.
struct Refusal(ApiError);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, kind) = anthropic_kind(&self.0);
        let body = json!({"type": "error", "error": {"type": kind, "message": self.0.message}});
        let mut response = (status, Json(body)).into_response();
        openai::add_retry_after(&mut response, self.0.retry_after);
        response
    }
}

/// Anthropic's status and error type for one of the gateway's errors.
fn anthropic_kind(e: &ApiError) -> (StatusCode, &'static str) {
    match e.status {
        StatusCode::NOT_FOUND => (e.status, "not_found_error"),
        StatusCode::TOO_MANY_REQUESTS => (e.status, "rate_limit_error"),
        // No route over every block: the swarm is overloaded, worth retrying (529).
        StatusCode::SERVICE_UNAVAILABLE => (
            StatusCode::from_u16(529).unwrap_or(e.status),
            "overloaded_error",
        ),
        s if s.is_client_error() => (s, "invalid_request_error"),
        s => (s, "api_error"),
    }
}

pub(super) async fn messages(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<MessagesRequest>, JsonRejection>,
) -> Response {
    let r = messages_inner(state.clone(), body).await;
    openai::rejected(&state, MESSAGES, r, |e| Refusal(e).into_response())
}

async fn messages_inner(
    state: Arc<ApiState>,
    body: Result<Json<MessagesRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    if req.max_tokens == 0 {
        return Err(ApiError::invalid("max_tokens must be at least 1"));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system {
        messages.push(ChatMessage::new("system", &system.text()?));
    }
    for m in req.messages {
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::invalid(format!(
                "messages: role `{}`; use user or assistant (and `system` for the system prompt)",
                m.role
            )));
        }
        messages.push(ChatMessage::new(&m.role, &m.content.text()?));
    }
    let params = CompletionParams {
        model: Some(req.model),
        max_tokens: Some(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        stop: Some(Stop::Many(req.stop_sequences)),
        speculate: req.speculate,
        conversation: req.conversation,
        ..CompletionParams::default()
    };
    let generate = GenerateRequest {
        messages,
        ..openai::request(&state, &params)?
    };
    let prompt = openai::checked_prompt(&state, &generate)?;
    let turn = state.admit().await?;
    let id = format!(
        "msg_{:016x}{:08x}",
        rand::random::<u64>(),
        crate::net::unix_ms() / 1000
    );
    let model = state.model_name();
    let tracker = Tracker::start(&state, &id, MESSAGES, prompt, turn);
    if !req.stream {
        let result = openai::generate(&state, &generate, |_| {}).await;
        tracker.finish(&result);
        let (g, _) = result?;
        let mut message = message_json(&id, &model, g.prompt_tokens.len());
        message["content"] = json!([{"type": "text", "text": g.text}]);
        message["stop_reason"] = json!(stop_reason(&g));
        message["stop_sequence"] = json!(g.stop_sequence);
        message["usage"]["output_tokens"] = json!(g.completion_tokens.len());
        // Tokens a kept session held count as read from a cache, not as input.
        message["usage"]["input_tokens"] = json!(g.prompt_tokens.len() - g.cached_tokens);
        message["usage"]["cache_read_input_tokens"] = json!(g.cached_tokens);
        return Ok(Json(message).into_response());
    }
    let named = |name: &str, v: Value| Event::default().event(name).data(v.to_string());
    let first = vec![
        named(
            "message_start",
            json!({"type": "message_start", "message": message_json(&id, &model, prompt)}),
        ),
        named(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
        named("ping", json!({"type": "ping"})),
    ];
    let piece = move |text: &str| {
        named(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": text}}),
        )
    };
    let end = move |_: &ApiState, result: Result<(Generation, Trip), ApiError>| match result {
        Ok((g, _)) => vec![
            named(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            named(
                "message_delta",
                json!({"type": "message_delta",
                       "delta": {"stop_reason": stop_reason(&g), "stop_sequence": g.stop_sequence},
                       "usage": {"output_tokens": g.completion_tokens.len(),
                                 "cache_read_input_tokens": g.cached_tokens}}),
            ),
            named("message_stop", json!({"type": "message_stop"})),
        ],
        Err(e) => {
            let (_, kind) = anthropic_kind(&e);
            vec![named(
                "error",
                json!({"type": "error", "error": {"type": kind, "message": e.message}}),
            )]
        }
    };
    Ok(super::stream::events(
        state, generate, tracker, first, piece, None, end,
    ))
}

/// A message as Anthropic shapes it, empty: content, stop and output still to come.
fn message_json(id: &str, model: &str, prompt_tokens: usize) -> Value {
    json!({"id": id, "type": "message", "role": "assistant", "model": model,
           "content": [], "stop_reason": null, "stop_sequence": null,
           "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}})
}

/// Why a generation ended, in Anthropic's words.
fn stop_reason(g: &Generation) -> &'static str {
    match (g.finish_reason.as_str(), &g.stop_sequence) {
        ("length", _) => "max_tokens",
        (_, Some(_)) => "stop_sequence",
        _ => "end_turn",
    }
}
