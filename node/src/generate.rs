//! A generation: tokenise, embed, run the blocks (here or through the swarm), sample,
//! stream text. The same loop serves `--local` (the reference) and the swarm, so the two
//! can only differ in where the blocks run.

use std::time::Instant;

use anyhow::{bail, Context};
use protocol::WireDType;
use serde::Serialize;
use shard::candle_core::{Device, Tensor};
use shard::{ChatMessage, Head, KvCache, Sampler, SamplingParams, Span, TextCodec};

use crate::client::RemoteSession;
use crate::hidden::{from_wire, to_wire};

/// Prompt tokens sent per prefill step: long prompts go in chunks so each frame stays
/// well under the protocol's limit (256 tokens x 8192 hidden x f32 = 8 MiB).
pub const PREFILL_CHUNK: usize = 256;

/// Where the blocks run.
pub enum Blocks<'a> {
    /// Every block in this process.
    Local {
        /// All blocks of the model.
        span: &'a Span,
        /// This generation's cache.
        cache: KvCache,
    },
    /// Through a chain of servers.
    Swarm {
        /// The open session.
        session: &'a mut RemoteSession,
        /// Element type on the wire.
        wire: WireDType,
    },
}

impl Blocks<'_> {
    async fn forward(
        &mut self,
        x: &Tensor,
        device: &Device,
        hidden: usize,
    ) -> anyhow::Result<Tensor> {
        match self {
            Blocks::Local { span, cache } => {
                Ok(tokio::task::block_in_place(|| span.forward(x, cache))?)
            }
            Blocks::Swarm { session, wire } => {
                let out = session.forward(to_wire(x, *wire)?).await?;
                from_wire(&out, hidden, device)
            }
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The user's text.
    pub prompt: String,
    /// Apply the chat template to the prompt as a user message.
    pub chat: bool,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
}

/// The result of a generation.
#[derive(Serialize, Debug, Clone)]
pub struct Generation {
    /// Completion text.
    pub text: String,
    /// Prompt token ids.
    pub prompt_tokens: Vec<u32>,
    /// Completion token ids.
    pub completion_tokens: Vec<u32>,
    /// Decode speed: tokens after the first, per second of decoding.
    pub tokens_per_second: f64,
    /// Seconds spent on the prompt (prefill and first token).
    pub prefill_seconds: f64,
    /// Why it stopped: "stop" (end of turn) or "length".
    pub finish_reason: String,
}

/// Tokenises a request; the prompt must leave room for at least one new token.
pub fn prompt_tokens(text: &TextCodec, req: &GenerateRequest) -> anyhow::Result<Vec<u32>> {
    let rendered = if req.chat {
        text.render_chat(&[ChatMessage::new("user", &req.prompt)])?
    } else {
        req.prompt.clone()
    };
    let ids = text.encode(&rendered, true)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(ids)
}

/// Checks the prompt fits the context and returns how many tokens may be generated.
pub fn budget(prompt_len: usize, max_tokens: usize, context: usize) -> anyhow::Result<usize> {
    if prompt_len >= context {
        bail!(
            "the prompt is {prompt_len} tokens, longer than the model's context of {context} tokens (at most {} fit with one new token)",
            context - 1
        );
    }
    Ok(max_tokens.min(context - prompt_len))
}

/// Runs one generation; `on_text` receives text as soon as it is decoded.
pub async fn generate(
    head: &Head,
    text: &TextCodec,
    blocks: &mut Blocks<'_>,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    mut on_text: impl FnMut(&str),
) -> anyhow::Result<Generation> {
    let device = Device::Cpu;
    let hidden = head.config().hidden;
    let mut sampler = Sampler::new(sampling);
    let mut stream = text.stream();
    let started = Instant::now();
    let mut last = None;
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        let x = head.embed(chunk)?;
        last = Some(blocks.forward(&x, &device, hidden).await?);
    }
    let mut h = last.context("empty prompt")?;
    let mut history = prompt.clone();
    let mut completion = Vec::new();
    let mut out_text = String::new();
    let mut finish = "length";
    let mut prefill_seconds = 0.0;
    let mut decode_started = Instant::now();
    while completion.len() < max_tokens {
        let logits = tokio::task::block_in_place(|| head.last_logits(&h))?;
        let tok = sampler.sample(&logits, &history);
        if completion.is_empty() {
            prefill_seconds = started.elapsed().as_secs_f64();
            decode_started = Instant::now();
        }
        if text.is_stop(tok) {
            finish = "stop";
            break;
        }
        completion.push(tok);
        history.push(tok);
        if let Some(piece) = stream.push(tok)? {
            on_text(&piece);
            out_text.push_str(&piece);
        }
        if completion.len() == max_tokens {
            break;
        }
        let x = head.embed(&[tok])?;
        h = blocks.forward(&x, &device, hidden).await?;
    }
    let decoded = completion.len().saturating_sub(1);
    let secs = decode_started.elapsed().as_secs_f64();
    Ok(Generation {
        // The stream holds back incomplete characters; the full decode is authoritative.
        text: text.decode(&completion).unwrap_or(out_text),
        prompt_tokens: prompt,
        completion_tokens: completion,
        tokens_per_second: if secs > 0.0 {
            decoded as f64 / secs
        } else {
            0.0
        },
        prefill_seconds,
        finish_reason: finish.to_string(),
    })
}
