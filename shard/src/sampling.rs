//! Choosing the next token from logits: greedy, or temperature with top-k, top-p and a
//! repetition penalty, from a seeded generator so a run can be repeated exactly.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How to sample. `temperature == 0` means greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1 = all).
    pub top_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already seen by this
    /// (1 = off), as in the CTRL paper and Hugging Face's implementation.
    pub repetition_penalty: f32,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// A sampler with its own generator.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Picks a token from `logits`, given the tokens of the sequence so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        match self.distribution(logits, history) {
            Chosen::Greedy(t) => t,
            Chosen::Among(idx, probs) => self.draw(&idx, &probs),
        }
    }

    /// Whether draft token `draft` stands where the sampler would pick from `logits`
    /// (speculative decoding): `Ok(())` keeps it, `Err(token)` is the token to take
    /// instead. Greedy: kept if it is the most likely token, else that token. Sampled
    /// (the standard speculative-sampling rule for a draft proposed with certainty):
    /// kept with its probability `p(draft)`, else a token drawn from `p` without the
    /// draft, renormalised; so the token that stands is distributed exactly as
    /// [`Sampler::sample`]'s.
    pub fn accept_draft(&mut self, logits: &[f32], history: &[u32], draft: u32) -> Result<(), u32> {
        match self.distribution(logits, history) {
            Chosen::Greedy(t) if t == draft => Ok(()),
            Chosen::Greedy(t) => Err(t),
            Chosen::Among(idx, mut probs) => {
                let total: f32 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= total);
                let at = idx.iter().position(|&t| t == draft);
                let p_draft = at.map_or(0.0, |i| probs[i]);
                if p_draft > 0.0 && self.rng.random::<f32>() < p_draft {
                    return Ok(());
                }
                if let Some(i) = at {
                    probs[i] = 0.0;
                }
                if probs.iter().sum::<f32>() <= 0.0 {
                    return Ok(());
                }
                Err(self.draw(&idx, &probs))
            }
        }
    }

    /// What the sampler picks from: the most likely token (greedy), or candidates and
    /// their weights after penalty, temperature, top-k and top-p (top-p's cut leaves
    /// them summing to less than one; [`Sampler::draw`] scales by their sum).
    fn distribution(&self, logits: &[f32], history: &[u32]) -> Chosen {
        let mut logits = logits.to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return Chosen::Greedy(argmax(&logits));
        }
        // Candidates sorted by logit, best first; NaN sorts last.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .partial_cmp(&logits[a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        Chosen::Among(idx, probs)
    }

    /// Draws one of `idx` with probabilities `probs`.
    fn draw(&mut self, idx: &[u32], probs: &[f32]) -> u32 {
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (pr, id) in probs.iter().zip(idx) {
            if r < *pr {
                return *id;
            }
            r -= pr;
        }
        *idx.last().unwrap_or(&0)
    }
}

/// What a sampler picks from.
enum Chosen {
    Greedy(u32),
    Among(Vec<u32>, Vec<f32>),
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_max_and_penalty_can_move_it() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits, &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[1]), 2);
    }

    /// Speculative sampling changes no distribution: over many seeded trials, the
    /// token that stands after a draft is checked (the draft, or its replacement) is
    /// distributed as plain sampling's, whichever token was drafted; and greedy keeps
    /// exactly the most likely token.
    #[test]
    fn drafts_checked_by_the_sampler_keep_its_distribution() {
        let logits: Vec<f32> = (0..12).map(|i| (i as f32 * 0.71).cos() * 2.0).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 8,
            top_p: 0.97,
            repetition_penalty: 1.2,
            seed: 3,
        };
        let history = [2u32, 5];
        let n = 40_000;
        let freq = |tokens: &mut dyn FnMut() -> u32| {
            let mut f = vec![0f64; logits.len()];
            for _ in 0..n {
                f[tokens() as usize] += 1.0 / n as f64;
            }
            f
        };
        let mut plain = Sampler::new(params.clone());
        let want = freq(&mut || plain.sample(&logits, &history));
        for draft in [argmax(&logits), 7, 11] {
            let mut spec = Sampler::new(SamplingParams {
                seed: 11 + draft as u64,
                ..params.clone()
            });
            let got = freq(&mut || match spec.accept_draft(&logits, &history, draft) {
                Ok(()) => draft,
                Err(t) => t,
            });
            for (t, (w, g)) in want.iter().zip(&got).enumerate() {
                // Binomial standard error of a frequency near 0.3 over 40,000 draws is
                // ~0.0023: 0.012 is five of them.
                assert!(
                    (w - g).abs() < 0.012,
                    "token {t} (draft {draft}): {w:.4} vs {g:.4}"
                );
            }
        }
        // A draft the sampler can never pick is always replaced.
        let mut spec = Sampler::new(params.clone());
        let worst = (0..logits.len() as u32)
            .min_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]))
            .expect("tokens");
        assert!((0..200).all(|_| spec.accept_draft(&logits, &history, worst).is_err()));
        // Greedy: the most likely token stands, any other is replaced by it.
        let mut greedy = Sampler::new(SamplingParams::default());
        let best = argmax(&logits);
        assert_eq!(greedy.accept_draft(&logits, &[], best), Ok(()));
        assert_eq!(
            greedy.accept_draft(&logits, &[], (best + 1) % 12),
            Err(best)
        );
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k_and_top_p() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 5,
            top_p: 0.95,
            seed: 7,
            ..Default::default()
        };
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(params);
        let run_a: Vec<u32> = (0..100).map(|_| a.sample(&logits, &[])).collect();
        let run_b: Vec<u32> = (0..100).map(|_| b.sample(&logits, &[])).collect();
        assert_eq!(run_a, run_b);
        let mut sorted: Vec<u32> = (0..50).collect();
        sorted.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        let top5 = &sorted[..5];
        assert!(run_a.iter().all(|t| top5.contains(t)));
        assert!(run_a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
        let mut narrow = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: 1,
            ..Default::default()
        });
        assert_eq!(narrow.sample(&logits, &[]), sorted[0]);
    }
}
