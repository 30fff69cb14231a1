//! Speculative decoding: several tokens proposed cheaply, verified together in one pass
//! through the blocks (one round trip of the chain), the longest accepted prefix kept.
//!
//! A verify step feeds the last chosen token and `k` drafts at once, as a prompt chunk
//! is fed; row `i` of its output gives the choice after draft `i`. Draft `i` stands
//! when the sampler keeps it there (`Sampler::accept_draft`): greedy, when it is the
//! most likely token (with the same repetition penalty), so the text is exactly the
//! text of decoding one token at a time; sampled, with the standard speculative-sampling
//! rule, so each token keeps its distribution and a seed repeats the text. The first
//! draft that does not stand is replaced by the sampler's token there (after the last
//! draft, when all stand, the choice there is a token for free). The caches then hold rejected drafts: the next step starts at the accepted
//! position, and each server drops what lies past it as it runs that step
//! (`KvCache::truncate`), so a rejection costs no round trip.

use serde::Serialize;

pub use crate::args::Speculate;

/// What `auto` decides from: smoothed times of plain and verify steps, and the tokens
/// a verify step gives (one, plus the drafts accepted).
#[derive(Debug)]
pub(super) struct Pacing {
    plain: Option<f64>,
    verify: Option<f64>,
    gain: f64,
    /// Plain steps since drafts were last tried.
    since_try: usize,
    /// Plain steps after which drafts are tried again though they did not pay (the
    /// chain or the text may have changed): doubled each time they are given up, from
    /// [`RETRY`] to [`RETRY_MAX`], and back to [`RETRY`] once they pay.
    retry_after: usize,
    /// Verify steps since drafts were last taken up (or tried again).
    tries: usize,
    /// A draft model's seconds per draft (its steps, catching up included),
    /// smoothed; `None` for prompt lookup, whose drafts cost nothing.
    draft_cost: Option<f64>,
}

/// See [`Pacing::retry_after`].
const RETRY: usize = 16;
const RETRY_MAX: usize = 64;

/// Verify steps before drafts are judged: the first drafts of an answer often fall
/// where later ones stand (measured on a chat prompt at 40 ms RTT, judged after one
/// step `auto` gave up at 1.01x where drafting all along gave 2.34x).
const MIN_TRIES: usize = 3;

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            plain: None,
            verify: None,
            gain: 0.0,
            since_try: 0,
            retry_after: RETRY,
            tries: 0,
            draft_cost: None,
        }
    }
}

impl Pacing {
    /// Records a plain step's seconds.
    pub(super) fn plain(&mut self, secs: f64) {
        self.plain = Some(self.plain.map_or(secs, |p| 0.8 * p + 0.2 * secs));
        self.since_try += 1;
    }

    /// Records a verify step of `secs` (drafting included) that kept `accepted` of
    /// `drafted` drafts, and for a draft model the seconds it took to draft them.
    pub(super) fn verify(
        &mut self,
        secs: f64,
        drafted: usize,
        accepted: usize,
        model: Option<f64>,
    ) {
        if let Some(drafting) = model.filter(|_| drafted > 0) {
            let cost = drafting / drafted as f64;
            self.draft_cost = Some(self.draft_cost.map_or(cost, |c| 0.7 * c + 0.3 * cost));
        }
        let gain = 1.0 + accepted as f64;
        match self.verify {
            Some(v) => {
                self.verify = Some(0.8 * v + 0.2 * secs);
                self.gain = 0.7 * self.gain + 0.3 * gain;
            }
            None => {
                self.verify = Some(secs);
                self.gain = gain;
            }
        }
        self.since_try = 0;
        self.tries += 1;
    }

    /// Whether to verify drafts now: when verify steps are expected to give more tokens
    /// per second than plain steps, or have not been tried yet or for a while. Never
    /// before a plain step has been timed: there is nothing to compare with yet.
    ///
    /// A draft model's draft saves at most a plain step's time, and costs its own step
    /// and a row: once both are measured, drafts wait (tries included) while the one
    /// does not exceed the other by [`DRAFT_MARGIN`]. Measured without emulated
    /// delay (Q4_0 drafting for Q8_0 through 3 loopback servers), a plain step took
    /// 8.5 ms, a draft 6.5 ms, and half the drafts stood: retrying every 16 to 64 steps
    /// made `auto` 0.80x `off`.
    pub(super) fn worth_it(&mut self) -> bool {
        if let (Some(plain), Some(cost)) = (self.plain, self.draft_cost) {
            // Even if every draft stood, a draft would save at most a plain step: from
            // the first verify step on, that must exceed its cost. (How many stand is
            // judged below, by tokens per second, and tried again later.)
            if plain <= DRAFT_MARGIN * cost {
                return false;
            }
        }
        match (self.plain, self.verify) {
            (Some(plain), Some(verify)) => {
                if self.tries < MIN_TRIES || self.gain / verify > 1.0 / plain {
                    self.retry_after = RETRY;
                    true
                } else if self.since_try >= self.retry_after {
                    self.retry_after = (self.retry_after * 2).min(RETRY_MAX);
                    self.tries = 0;
                    true
                } else {
                    false
                }
            }
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

impl Pacing {
    /// The most drafts to propose now: [`TRIAL_DRAFTS`] while drafts are on trial
    /// (their first [`MIN_TRIES`] verify steps, and again after each retry), so a trial
    /// that does not pay costs little; `max` once they have paid.
    pub(super) fn draft_cap(&self, max: usize) -> usize {
        if self.tries < MIN_TRIES {
            max.min(TRIAL_DRAFTS)
        } else {
            max
        }
    }
}

/// How much more than its own step a draft must be expected to save: each draft is
/// also a row through the blocks and the LM head, and drafting costs the steps around
/// it more than its own timing shows. Measured without emulated delay (Q4_0 drafting
/// for Q8_0, medians of 7 interleaved runs): with 1.0 `auto` kept retrying on noise
/// (0.96x `off`); with 1.5 it judged drafts of 5.5 ms worth a plain step of 9.3 ms
/// with 5 in 6 standing, and ran 0.83x `off`. At 40 ms round trips a plain step is
/// over ten times a draft.
const DRAFT_MARGIN: f64 = 3.0;

/// Drafts per verify step while `auto` tries drafting (see [`Pacing::draft_cap`]).
const TRIAL_DRAFTS: usize = 2;

/// A draft model: all its blocks and its head, loaded once and shared by the
/// generations of this process.
pub struct DraftModel {
    span: shard::Span,
    head: shard::Head,
    vocab: usize,
}

impl std::fmt::Debug for DraftModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DraftModel({} tokens)", self.vocab)
    }
}

impl DraftModel {
    /// Loads the model at `path` on the CPU, which must share `vocab` with the model it
    /// drafts for.
    pub fn load(path: &std::path::Path, vocab: usize) -> anyhow::Result<DraftModel> {
        let file = shard::ModelFile::open(path)?;
        let cfg = file.config().clone();
        if cfg.vocab != vocab {
            anyhow::bail!(
                "--draft-model {}: a vocabulary of {} tokens, but the model has {vocab}: a draft model must share the vocabulary",
                path.display(),
                cfg.vocab
            );
        }
        let device = shard::candle_core::Device::Cpu;
        let span = shard::Span::load(&file, 0, cfg.n_layers, &device, |_, _| {})?;
        let head = shard::Head::load(&file, &device)?;
        Ok(DraftModel { span, head, vocab })
    }
}

/// One generation's use of a draft model: its cache, and the tokens in it.
pub(super) struct Drafter {
    model: std::sync::Arc<DraftModel>,
    cache: shard::KvCache,
    fed: Vec<u32>,
}

impl Drafter {
    /// A drafter for sequences of at most `max_len` tokens.
    pub(super) fn new(model: std::sync::Arc<DraftModel>, max_len: usize) -> Self {
        let cache = model.span.new_cache(max_len);
        Drafter {
            model,
            cache,
            fed: Vec::new(),
        }
    }

    /// Feeds the prompt to the draft model, done while the prompt goes through the
    /// swarm: its first draft then costs one step, not the prompt's prefill.
    pub(super) fn read_prompt(mut self, prompt: Vec<u32>) -> anyhow::Result<Self> {
        let head = &self.model.head;
        for chunk in prompt.chunks(super::PREFILL_CHUNK) {
            if self.cache.len() + chunk.len() > self.cache.max_len() {
                break;
            }
            self.model
                .span
                .forward(&head.embed(chunk)?, &mut self.cache)?;
            self.fed.extend_from_slice(chunk);
        }
        Ok(self)
    }

    /// The draft model's most likely next tokens after `history`, one at a time: at
    /// most `k`, and none after the first it is unsure of (its probability below
    /// [`SURE`]): that one is still proposed (it cost nothing more to find), but what
    /// would follow it is likely wasted. Its cache keeps what `history` still shares
    /// with what it saw before (rejected drafts go), and catches up on the rest.
    pub(super) fn propose(&mut self, history: &[u32], k: usize) -> anyhow::Result<Vec<u32>> {
        if k == 0 || history.is_empty() {
            return Ok(Vec::new());
        }
        let shared = self
            .fed
            .iter()
            .zip(history)
            .take_while(|(a, b)| a == b)
            .count()
            .min(history.len() - 1);
        self.cache.truncate(shared);
        self.fed.truncate(shared);
        let (span, head) = (&self.model.span, &self.model.head);
        let mut next = history[shared..].to_vec();
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            if self.cache.len() + next.len() > self.cache.max_len() {
                break;
            }
            let h = span.forward(&head.embed(&next)?, &mut self.cache)?;
            self.fed.extend_from_slice(&next);
            let logits = head.last_logits(&h)?;
            let (tok, p) = most_likely(&logits);
            out.push(tok);
            if p < SURE {
                break;
            }
            next = vec![tok];
        }
        Ok(out)
    }
}

/// The draft model's probability under which its token is the last of a draft.
/// Measured with bench/speculate.sh, the default model's Q4_0 drafting for its Q8_0
/// at 40 ms RTT, on two chat prompts: 0.2 gave 1.98x / 2.48x off, 0.3 2.03x / 2.42x,
/// 0.4 2.05x / 2.20x, 0.7 1.74x (one prompt); a fixed draft length adapted to
/// acceptance instead (no threshold) gave 1.75x.
const SURE: f32 = 0.3;

/// The most drafts a draft model proposes in one step (it stops sooner when unsure).
pub(super) const MAX_DRAFT: usize = 16;

/// The most likely token of `logits` and its probability (softmax at temperature 1).
fn most_likely(logits: &[f32]) -> (u32, f32) {
    let tok = shard::argmax(logits);
    let max = logits[tok as usize];
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    (tok, 1.0 / sum)
}

/// Longest n-gram looked up, and the shortest. Two tokens recur by chance in ordinary
/// text, and drafts after them mostly fall: measured without emulated delay on a chat
/// prompt (medians of 7 interleaved runs), `auto` with 2-grams ran 0.95x `off`, with
/// 3-grams 1.04x; a prompt whose answer repeats its context still ran 5.2x at 40 ms.
const NGRAM: (usize, usize) = (4, 3);

/// Up to `max` tokens that followed the latest earlier occurrence of the last `n`
/// tokens of `history`, for the longest `n` (of [`NGRAM`]) that occurred before.
pub fn ngram_draft(history: &[u32], max: usize) -> Vec<u32> {
    if max == 0 {
        return Vec::new();
    }
    for n in (NGRAM.1..=NGRAM.0).rev() {
        if history.len() <= n {
            continue;
        }
        let tail = &history[history.len() - n..];
        // Latest occurrence first, never the tail itself.
        let found = (0..history.len() - n)
            .rev()
            .find(|&i| &history[i..i + n] == tail);
        if let Some(i) = found {
            let from = i + n;
            let to = (from + max).min(history.len());
            if from < to {
                return history[from..to].to_vec();
            }
        }
    }
    Vec::new()
}

/// Draft tokens proposed and accepted over a generation.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Drafts {
    /// Tokens proposed for verification.
    pub drafted: usize,
    /// Of those, accepted.
    pub accepted: usize,
    /// Verify steps.
    pub steps: usize,
    /// Seconds spent proposing drafts (the draft model's steps, or the n-gram lookup).
    pub draft_seconds: f64,
}

/// How many n-gram drafts to propose next: doubled after a step that accepted them
/// all, halved after one that accepted fewer than half, within 2..=16. (A draft model
/// decides its own length by how sure it is.)
pub(super) fn next_draft_len(len: usize, drafted: usize, accepted: usize) -> usize {
    let len = if drafted > 0 && accepted == drafted {
        len * 2
    } else if accepted * 2 < drafted {
        len / 2
    } else {
        len
    };
    len.clamp(2, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_drafts_continue_the_latest_earlier_occurrence() {
        // "a b c d | x a b c" -> after "a b c" came "d" then "x" ...
        let h = [1, 2, 3, 4, 9, 1, 2, 3];
        assert_eq!(ngram_draft(&h, 3), vec![4, 9, 1]);
        assert_eq!(ngram_draft(&h, 1), vec![4]);
        // The latest occurrence wins.
        let h = [1, 2, 3, 5, 1, 2, 3, 6, 1, 2, 3];
        assert_eq!(ngram_draft(&h, 2), vec![6, 1]);
        // Two tokens that recur are not enough.
        assert!(ngram_draft(&[1, 2, 5, 1, 2], 2).is_empty());
        // Nothing repeats: no draft; nothing asked: none.
        assert!(ngram_draft(&[1, 2, 3, 4], 4).is_empty());
        assert!(ngram_draft(&h, 0).is_empty());
    }

    #[test]
    fn auto_verifies_only_while_it_pays() {
        let mut p = Pacing::default();
        assert!(!p.worth_it(), "nothing timed yet: no");
        p.plain(0.1);
        assert!(p.worth_it(), "untried: try");
        // Round trips dominate: a verify step costs what a plain one does.
        p.verify(0.11, 2, 1, None);
        assert!(p.worth_it());
        // Compute dominates and little is accepted: plain steps win...
        let mut q = Pacing::default();
        q.plain(0.01);
        for _ in 0..MIN_TRIES {
            assert!(q.worth_it(), "judged after {MIN_TRIES} tries");
            q.verify(0.05, 4, 0, None);
        }
        assert!(!q.worth_it());
        // ...until it is time to look again, later each time it did not pay.
        for wait in [RETRY, 2 * RETRY, 4 * RETRY] {
            for _ in 0..wait {
                assert!(!q.worth_it());
                q.plain(0.01);
            }
            assert!(q.worth_it(), "tried again after {wait} plain steps");
            for _ in 0..MIN_TRIES {
                q.verify(0.05, 4, 0, None);
            }
        }
    }

    #[test]
    fn auto_does_not_retry_a_draft_model_that_cannot_pay() {
        // Plain steps of 8.5 ms, drafts of 6.5 ms: no more after one verify step...
        let mut p = Pacing::default();
        p.plain(0.0085);
        assert!(p.worth_it());
        p.verify(0.02, 2, 2, Some(0.013));
        for _ in 0..2 * RETRY_MAX {
            assert!(!p.worth_it());
            p.plain(0.0085);
        }
        // ...until round trips grow to 100 ms a step: drafts pay again.
        for _ in 0..40 {
            p.plain(0.1);
        }
        assert!(p.worth_it());
    }

    #[test]
    fn auto_stops_at_once_a_draft_model_slower_than_a_plain_step() {
        // Plain steps of 9 ms, drafts of 13 ms: even if all stood, no.
        let mut p = Pacing::default();
        p.plain(0.009);
        assert!(p.worth_it());
        p.verify(0.04, 2, 2, Some(0.026));
        assert!(!p.worth_it(), "judged on cost after one verify step");
        // At 100 ms a step, the same drafts are tried out.
        let mut q = Pacing::default();
        q.plain(0.1);
        q.verify(0.14, 2, 0, Some(0.026));
        assert!(q.worth_it());
    }

    #[test]
    fn the_draft_length_follows_acceptance() {
        assert_eq!(next_draft_len(4, 4, 4), 8);
        assert_eq!(next_draft_len(16, 16, 16), 16);
        assert_eq!(next_draft_len(8, 8, 3), 4);
        assert_eq!(next_draft_len(2, 2, 0), 2);
        assert_eq!(next_draft_len(8, 8, 5), 8);
    }
}
