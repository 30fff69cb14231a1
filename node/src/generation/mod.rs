//! A generation: tokenise, embed, run the blocks (here or through the swarm), sample,
//! stream text. The same loop serves `--local` (the reference) and the swarm, so the two
//! can only differ in where the blocks run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use prometheus_client::metrics::histogram::Histogram;
use protocol::WireDType;
use serde::Serialize;
use shard::candle_core::{Device, Tensor};
use shard::{ChatMessage, Head, KvCache, Sampler, SamplingParams, Span, TextCodec};

mod logits;
mod runner;
mod speculate;

pub use logits::TokenLogprob;
use logits::{highest, token_logprob};
pub use runner::{
    client_and_side, run_generation, run_turn, shared_prefix, start_client, swarm_client,
    ClientSide, RouteEntry, Trip, Turn, Warm,
};
use speculate::next_draft_len;
pub use speculate::{ngram_draft, DraftModel, Drafts, Speculate};

use crate::client::RemoteSession;
use crate::hidden::{from_wire, to_wire};
use crate::NodeError;

/// Prompt tokens sent per prefill step: long prompts go in chunks so each frame stays
/// well under the protocol's limit (256 tokens x 8192 hidden x f32 = 8 MiB).
pub const PREFILL_CHUNK: usize = 256;

/// A row of hidden states waiting for the LM head, and where its logits go.
type LogitsJob = (
    Tensor,
    tokio::sync::oneshot::Sender<anyhow::Result<Vec<f32>>>,
);

/// The client side of the model, shared by every generation of this process: embeddings
/// on the caller's thread, the LM head on a thread of its own that runs the rows of all
/// the generations waiting as one product. The head is the largest matrix of a small
/// model (SmolLM2's tied 49152 x 576 embedding): one product for 8 rows costs 1.2x one
/// for a single row, so concurrent sessions (the API, `shoal bench`) share it.
///
/// Taking only the rows already queued is not enough: measured with 8 concurrent
/// sessions on a 3-server loopback swarm, about two thirds of the products ran a single
/// row, because once one session's row goes alone the sessions drift apart and never
/// line up again (the servers hold steps back for the same reason: `Server::due_soon`).
/// So a generation whose decode step is on its way marks itself ([`ClientHead::stepping`]),
/// and the head, holding a row, waits for the rows still on their way, at most as long
/// as its last product took (worst case: a row's logits come one product later).
#[derive(Clone)]
pub struct ClientHead {
    head: Arc<Head>,
    tx: std_mpsc::Sender<LogitsJob>,
    on_the_way: Arc<AtomicUsize>,
}

/// A decode step on its way to the LM head: counted by the head's gathering until the
/// step's row reaches the head, or the step fails.
pub struct Stepping(Arc<AtomicUsize>);

impl Drop for Stepping {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The LM head's thread: each product takes every row queued, and the rows of steps
/// still on their way if they come within the last product's time.
fn head_loop(head: &Head, rx: &std_mpsc::Receiver<LogitsJob>, on_the_way: &AtomicUsize) {
    // The longest the head waits for a row: the last product's time, within bounds.
    let mut patience = Duration::from_millis(1);
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + patience;
        loop {
            while let Ok(more) = rx.try_recv() {
                jobs.push(more);
            }
            let now = Instant::now();
            if on_the_way.load(Ordering::Acquire) == 0 || now >= deadline {
                break;
            }
            // Short naps: a step's mark is dropped just after its row is sent.
            let nap = (deadline - now).min(Duration::from_micros(200));
            if let Ok(more) = rx.recv_timeout(nap) {
                jobs.push(more);
            }
        }
        let started = Instant::now();
        let rows: Vec<&Tensor> = jobs.iter().map(|(row, _)| row).collect();
        let logits = Tensor::cat(&rows, 0)
            .map_err(anyhow::Error::from)
            .and_then(|x| Ok(head.logits(&x)?));
        patience = started
            .elapsed()
            .clamp(Duration::from_micros(200), Duration::from_millis(10));
        match logits {
            Ok(all) => {
                for (i, (_, reply)) in jobs.into_iter().enumerate() {
                    let row = all.get(i).and_then(|r| r.to_vec1::<f32>());
                    let _ = reply.send(row.map_err(anyhow::Error::from));
                }
            }
            Err(e) => {
                for (_, reply) in jobs {
                    let _ = reply.send(Err(anyhow!("LM head: {e:#}")));
                }
            }
        }
    }
}

impl ClientHead {
    /// Starts the LM head's thread; it ends when the last clone is dropped.
    pub fn start(head: Head) -> std::io::Result<Self> {
        let head = Arc::new(head);
        let (tx, rx) = std_mpsc::channel::<LogitsJob>();
        let on_the_way = Arc::new(AtomicUsize::new(0));
        let (shared, counted) = (head.clone(), on_the_way.clone());
        std::thread::Builder::new()
            .name("shoal-head".into())
            .spawn(move || head_loop(&shared, &rx, &counted))?;
        Ok(Self {
            head,
            tx,
            on_the_way,
        })
    }

    /// Embeddings, norm and the model's shape.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Marks a decode step as on its way: the head waits a little for its row before
    /// running the rows it has. Pass the mark to [`ClientHead::last_logits`].
    pub fn stepping(&self) -> Stepping {
        self.on_the_way.fetch_add(1, Ordering::AcqRel);
        Stepping(self.on_the_way.clone())
    }

    /// Logits of the last row of `hidden` (`[tokens, hidden]`); `step`, the mark of the
    /// step that made `hidden`, is dropped once the row is queued.
    pub async fn last_logits(
        &self,
        hidden: &Tensor,
        step: Option<Stepping>,
    ) -> anyhow::Result<Vec<f32>> {
        let n = hidden.dim(0)?;
        if n == 0 {
            bail!("no hidden states");
        }
        let last = hidden.narrow(0, n - 1, 1)?.contiguous()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || anyhow!("the LM head's thread has stopped");
        self.tx.send((last, reply)).map_err(|_| gone())?;
        drop(step);
        answer.await.map_err(|_| gone())?
    }
}

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
        /// Told the route again after each failover.
        watch: Option<TripWatch>,
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
            Blocks::Swarm {
                session,
                wire,
                watch,
            } => {
                let failovers = session.reroutes.len();
                let out = session.forward(to_wire(x, *wire)?).await?;
                if let Some(w) = watch
                    .as_ref()
                    .filter(|_| session.reroutes.len() > failovers)
                {
                    (w.0)(&runner::trip(session).await);
                }
                from_wire(&out, hidden, device)
            }
        }
    }

    /// Tokens the blocks have seen: where the next one goes.
    fn position(&self) -> usize {
        match self {
            Blocks::Local { cache, .. } => cache.len(),
            Blocks::Swarm { session, .. } => session.position() as usize,
        }
    }

    /// Forgets the positions from `to` on (drafts a verify step rejected).
    fn rewind(&mut self, to: usize) {
        match self {
            Blocks::Local { cache, .. } => cache.truncate(to),
            Blocks::Swarm { session, .. } => session.rewind(to as u32),
        }
    }
}

/// What to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerateRequest {
    /// The user's text.
    pub prompt: String,
    /// Apply the chat template to the prompt as a user message.
    pub chat: bool,
    /// A whole conversation for the chat template; when not empty it is the prompt and
    /// `prompt` / `chat` are ignored.
    pub messages: Vec<ChatMessage>,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Texts that end the generation where they appear (they are not part of the
    /// completion).
    pub stop: Vec<String>,
    /// Where to record the seconds of each step through the blocks (a prefill chunk or
    /// one token), for metrics.
    pub step_latency: Option<Histogram>,
    /// Record the K highest logits before each token is chosen (0 = none): to see how
    /// close a choice was when two devices or chains disagree.
    pub top_logits: usize,
    /// Record each completion token's log-probability and those of the N most likely
    /// tokens there (OpenAI's `logprobs` / `top_logprobs`).
    pub logprobs: Option<usize>,
    /// Speculative decoding: greedy output is exactly the same; sampled output has the
    /// same distribution (and a seed repeats it).
    pub speculate: Speculate,
    /// The model `Speculate::Draft` drafts with (and `Auto`, when given).
    pub draft_model: Option<Arc<DraftModel>>,
    /// Told the route once it is chosen and again after each failover, as it happens.
    pub watch: Option<TripWatch>,
    /// The conversation this request continues, if its client names one (the chat
    /// page does): the gateway reuses that conversation's session first.
    pub conversation: Option<String>,
}

/// What is told of a generation's route while it runs ([`GenerateRequest::watch`]).
#[derive(Clone)]
pub struct TripWatch(pub Arc<dyn Fn(&Trip) + Send + Sync>);

impl std::fmt::Debug for TripWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TripWatch")
    }
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
    /// Prompt tokens the blocks held already, from an earlier turn of the conversation
    /// (not sent again).
    pub cached_tokens: usize,
    /// Why it stopped: "stop" (end of turn or a stop sequence) or "length".
    pub finish_reason: String,
    /// The stop sequence that ended it, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_sequence: Option<String>,
    /// Per token chosen (the end-of-turn token included), the highest logits as
    /// (token id, logit), highest first; empty unless asked for
    /// ([`GenerateRequest::top_logits`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logits: Vec<Vec<(u32, f32)>>,
    /// Per completion token, its log-probability and the most likely tokens'; empty
    /// unless asked for ([`GenerateRequest::logprobs`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    /// Tokens drafted and accepted by speculative decoding.
    pub drafts: Drafts,
    /// Steps sent through the blocks after the prompt (plain and verify steps).
    pub decode_steps: usize,
    /// Seconds this client spent on its own work between a step's output arriving and
    /// the next step leaving (LM head, sampling, drafting, text): its share of a step's
    /// time, which the simulator takes as the client's per-step cost.
    pub client_seconds: f64,
}

/// Tokenises a request; the prompt must leave room for at least one new token.
pub fn prompt_tokens(text: &TextCodec, req: &GenerateRequest) -> Result<Vec<u32>, NodeError> {
    let refused = |e: shard::ShardError| NodeError::InvalidRequest(e.to_string());
    let rendered = if !req.messages.is_empty() {
        text.render_chat(&req.messages).map_err(refused)?
    } else if req.chat {
        text.render_chat(&[ChatMessage::new("user", &req.prompt)])
            .map_err(refused)?
    } else {
        req.prompt.clone()
    };
    let ids = text.encode(&rendered, true)?;
    if ids.is_empty() {
        return Err(NodeError::InvalidRequest("the prompt is empty".into()));
    }
    Ok(ids)
}

/// Checks the prompt fits the context and returns how many tokens may be generated.
pub fn budget(prompt_len: usize, max_tokens: usize, context: usize) -> Result<usize, NodeError> {
    if prompt_len >= context {
        return Err(NodeError::InvalidRequest(format!(
            "the prompt is {prompt_len} tokens, longer than the model's context of {context} tokens (at most {} fit with one new token)",
            context - 1
        )));
    }
    Ok(max_tokens.min(context - prompt_len))
}

/// Runs one generation; `on_text` receives text as soon as it is decoded.
pub async fn generate(
    client_head: &ClientHead,
    text: &TextCodec,
    blocks: &mut Blocks<'_>,
    prompt: Vec<u32>,
    max_tokens: usize,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> anyhow::Result<Generation> {
    let stop = &req.stop[..];
    let device = Device::Cpu;
    let head = client_head.head();
    let hidden = head.config().hidden;
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut stream = text.stream();
    let started = Instant::now();
    let mut last = None;
    let timed = |t: Instant| {
        if let Some(h) = &req.step_latency {
            h.observe(t.elapsed().as_secs_f64());
        }
    };
    // The draft model reads the prompt on a thread of its own meanwhile.
    let drafter = match (req.speculate, &req.draft_model) {
        (Speculate::Draft | Speculate::Auto, Some(m)) => {
            let d = speculate::Drafter::new(m.clone(), prompt.len() + max_tokens + 1);
            let prompt = prompt.clone();
            Some(tokio::task::spawn_blocking(move || d.read_prompt(prompt)))
        }
        (Speculate::Draft, None) => bail!("--speculate draft needs a --draft-model"),
        _ => None,
    };
    // The blocks may hold the prompt's first tokens already (a conversation's earlier
    // turns, kept on its servers): only the rest is sent, and at least the last token.
    let cached = blocks.position().min(prompt.len().saturating_sub(1));
    blocks.rewind(cached);
    for chunk in prompt[cached..].chunks(PREFILL_CHUNK) {
        let x = head.embed(chunk)?;
        let t = Instant::now();
        last = Some(blocks.forward(&x, &device, hidden).await?);
        timed(t);
    }
    let mut drafter = match drafter {
        Some(d) => Some(d.await.context("the draft model's thread")??),
        None => None,
    };
    let mut h = last.context("empty prompt")?;
    // The client's own time: from an output's arrival to the next step's departure.
    let mut arrived = Instant::now();
    let (mut client_seconds, mut decode_steps) = (0.0, 0);
    let mut history = prompt.clone();
    let mut completion = Vec::new();
    let mut out_text = String::new();
    // Decoded text not yet passed on: it may be the start of a stop sequence.
    let mut held = String::new();
    let mut stopped_by_text = false;
    let mut stop_sequence = None;
    let mut finish = "length";
    let mut prefill_seconds = 0.0;
    let mut decode_started = Instant::now();
    let mut top_logits = Vec::new();
    let mut logprobs = Vec::new();
    // Tokens chosen and not yet emitted, each with the logits it was chosen from: one
    // after a plain step, the accepted drafts and the next token after a verify step.
    let mut chosen: VecDeque<(u32, Vec<f32>)> = VecDeque::new();
    let speculating = req.speculate != Speculate::Off;
    let mut drafts = Drafts::default();
    // `auto` starts n-gram drafts short: its first tries are bets (a draft model's
    // are capped by `Pacing::draft_cap`).
    let mut draft_len = if req.speculate == Speculate::Auto {
        2
    } else {
        4
    };
    let mut pacing = speculate::Pacing::default();
    let mut plain_started: Option<Instant> = None;
    // The mark of the decode step on its way (none for the prompt's last chunk).
    let mut step = None;
    'generation: while completion.len() < max_tokens {
        if chosen.is_empty() {
            let logits = client_head.last_logits(&h, step.take()).await?;
            let tok = sampler.sample(&logits, &history);
            chosen.push_back((tok, logits));
            // A plain step's time: feeding a token to having the next one.
            if let Some(t) = plain_started.take() {
                pacing.plain(t.elapsed().as_secs_f64());
            }
        }
        let mut last = None;
        while let Some((tok, logits)) = chosen.pop_front() {
            if req.top_logits > 0 {
                top_logits.push(highest(&logits, req.top_logits));
            }
            if completion.is_empty() {
                prefill_seconds = started.elapsed().as_secs_f64();
                decode_started = Instant::now();
            }
            if text.is_stop(tok) {
                finish = "stop";
                break 'generation;
            }
            if let Some(n) = req.logprobs {
                logprobs.push(token_logprob(&logits, tok, n));
            }
            completion.push(tok);
            history.push(tok);
            if let Some(piece) = stream.push(tok)? {
                held.push_str(&piece);
                if let Some((at, which)) = find_stop(&out_text, &held, stop) {
                    held.truncate(at);
                    on_text(&held);
                    out_text.push_str(&held);
                    stopped_by_text = true;
                    stop_sequence = Some(which.to_string());
                    finish = "stop";
                    break 'generation;
                }
                // Text that could still become a stop sequence waits for the next piece.
                let safe = held.len() - stop_prefix_len(&held, stop);
                if safe > 0 {
                    on_text(&held[..safe]);
                    out_text.push_str(&held[..safe]);
                    held.drain(..safe);
                }
            }
            if completion.len() == max_tokens {
                break 'generation;
            }
            last = Some(tok);
        }
        let Some(tok) = last else { break };
        // Feed the last token chosen, with drafts to verify when speculating (no more
        // than could still be used).
        let room = max_tokens - completion.len() - 1;
        let drafting = Instant::now();
        let proposed = if !speculating || (req.speculate == Speculate::Auto && !pacing.worth_it()) {
            Vec::new()
        } else if let Some(d) = drafter.as_mut() {
            let mut k = speculate::MAX_DRAFT.min(room);
            if req.speculate == Speculate::Auto {
                k = pacing.draft_cap(k);
            }
            tokio::task::block_in_place(|| d.propose(&history, k))?
        } else {
            ngram_draft(&history, draft_len.min(room))
        };
        let drafted_in = drafting.elapsed().as_secs_f64();
        drafts.draft_seconds += drafted_in;
        let fed: Vec<u32> = std::iter::once(tok)
            .chain(proposed.iter().copied())
            .collect();
        let x = head.embed(&fed)?;
        let at = blocks.position();
        let t = Instant::now();
        if proposed.is_empty() {
            step = Some(client_head.stepping());
        }
        client_seconds += arrived.elapsed().as_secs_f64();
        decode_steps += 1;
        h = blocks.forward(&x, &device, hidden).await?;
        arrived = Instant::now();
        timed(t);
        if proposed.is_empty() {
            plain_started = Some(t);
            continue;
        }
        // Verify: row i is the choice after `fed[..=i]`; each draft stands if the
        // sampler keeps it there, and the first that does not is replaced.
        let rows = tokio::task::block_in_place(|| head.logits(&h))?.to_vec2::<f32>()?;
        let mut seen = history.clone();
        let mut accepted = 0;
        for (i, row) in rows.into_iter().enumerate() {
            let Some(&draft) = proposed.get(i) else {
                // After the last draft: a token for free.
                let tok = sampler.sample(&row, &seen);
                chosen.push_back((tok, row));
                break;
            };
            match sampler.accept_draft(&row, &seen, draft) {
                Ok(()) => {
                    chosen.push_back((draft, row));
                    seen.push(draft);
                    accepted += 1;
                }
                Err(instead) => {
                    chosen.push_back((instead, row));
                    break;
                }
            }
        }
        // A verify step's time: feeding its tokens to having its choices.
        let model_drafting = drafter.as_ref().map(|_| drafted_in);
        pacing.verify(
            drafting.elapsed().as_secs_f64(),
            proposed.len(),
            accepted,
            model_drafting,
        );
        drafts.steps += 1;
        drafts.drafted += proposed.len();
        drafts.accepted += accepted;
        draft_len = next_draft_len(draft_len, proposed.len(), accepted);
        // The blocks keep the token fed and the accepted drafts; the last token chosen
        // is fed next (after all drafts were accepted: the choice after the last one).
        blocks.rewind(at + 1 + accepted);
    }
    if !stopped_by_text {
        // What never completed a character goes out replaced (U+FFFD).
        held.push_str(&stream.finish());
        if !held.is_empty() {
            on_text(&held);
            out_text.push_str(&held);
        }
    }
    let decoded = completion.len().saturating_sub(1);
    let secs = decode_started.elapsed().as_secs_f64();
    Ok(Generation {
        // Exactly what was streamed: the stream's pieces are the text.
        text: out_text,
        prompt_tokens: prompt,
        completion_tokens: completion,
        tokens_per_second: if secs > 0.0 {
            decoded as f64 / secs
        } else {
            0.0
        },
        prefill_seconds,
        cached_tokens: cached,
        finish_reason: finish.to_string(),
        stop_sequence,
        top_logits,
        logprobs,
        drafts,
        decode_steps,
        client_seconds,
    })
}

/// Where the first stop sequence begins in `held`, counting one that starts in the text
/// already passed on (`before`) and ends in `held` (then at 0), and which one it is.
fn find_stop<'s>(before: &str, held: &str, stop: &'s [String]) -> Option<(usize, &'s str)> {
    let joined = format!("{before}{held}");
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| joined.find(s.as_str()).map(|at| (at, s.as_str())))
        .min_by_key(|(at, _)| *at)
        .map(|(at, s)| (at.saturating_sub(before.len()), s))
}

/// Length of the longest end of `held` that is the beginning of a stop sequence.
fn stop_prefix_len(held: &str, stop: &[String]) -> usize {
    stop.iter()
        .filter(|s| !s.is_empty())
        .flat_map(|s| {
            (1..s.len().min(held.len() + 1))
                .rev()
                .filter(move |&n| s.is_char_boundary(n) && held.ends_with(&s[..n]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_are_found_and_held_back() {
        let stop = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("", "abc END x", &stop), Some((4, "END")));
        assert_eq!(find_stop("ab\n", "\ncd", &stop), Some((0, "\n\n")));
        assert_eq!(find_stop("abc", "def", &stop), None);
        assert_eq!(stop_prefix_len("hello E", &stop), 1);
        assert_eq!(stop_prefix_len("hello EN", &stop), 2);
        assert_eq!(stop_prefix_len("hello\n", &stop), 1);
        assert_eq!(stop_prefix_len("hello", &stop), 0);
        assert_eq!(stop_prefix_len("x", &[]), 0);
    }
}
