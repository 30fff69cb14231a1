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

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::WireDType;
use serde::Deserialize;
use serde_json::{json, Value};
use shard::{ChatMessage, SamplingParams};

use crate::client::Client;
use crate::commands::{run_generation, ClientSide};
use crate::generate::{prompt_tokens, GenerateRequest, Generation};
use crate::serving::DEFAULT_MAX_SEQ_LEN;

/// Tokens generated when a request names no limit.
const DEFAULT_MAX_TOKENS: usize = 256;

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
}

impl ApiState {
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
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .with_state(state)
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

async fn chat_completions(
    State(state): State<Arc<ApiState>>,
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

async fn completions(
    State(state): State<Arc<ApiState>>,
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
    if !params.stream {
        let g = generate(&state, &req, |_| {}).await?;
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
        match result {
            Ok(g) => {
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
) -> Result<Generation, ApiError> {
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
        Ok((g, _)) => Ok(g),
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
