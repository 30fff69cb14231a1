//! What a generation reports of the logits its tokens were chosen from: the highest
//! logits (`--top-logits`, to see how close a choice was) and log-probabilities
//! (OpenAI's `logprobs`).

use serde::Serialize;

/// A token chosen, its log-probability under the model (the softmax of the raw logits,
/// before temperature, top-p and penalties), and the most likely tokens' there.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The `k` highest of `logits` as (token id, logit), highest first.
pub(super) fn highest(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut ranked: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = k.min(ranked.len());
    if k == 0 {
        return Vec::new();
    }
    ranked.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    ranked.truncate(k);
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked
}

/// `token`'s log-probability in `logits`, with the `top` most likely tokens'.
pub(super) fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_norm = max + sum.ln() as f32;
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - log_norm),
        top: highest(logits, top)
            .into_iter()
            .map(|(id, l)| (id, l - log_norm))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_logits_come_first() {
        let logits = [0.5, 3.0, -1.0, 2.5, 3.0];
        assert_eq!(highest(&logits, 2), vec![(1, 3.0), (4, 3.0)]);
        assert_eq!(highest(&logits, 3)[2], (3, 2.5));
        assert_eq!(highest(&logits, 9).len(), 5);
        assert!(highest(&logits, 0).is_empty());
    }

    #[test]
    fn log_probabilities_are_a_log_softmax() {
        // Two tokens at ln 3 and 0: probabilities 3/4 and 1/4.
        let l = [3f32.ln(), 0.0];
        let p = token_logprob(&l, 1, 2);
        assert!((p.logprob - 0.25f32.ln()).abs() < 1e-6, "{p:?}");
        assert_eq!(p.top[0].0, 0);
        assert!((p.top[0].1 - 0.75f32.ln()).abs() < 1e-6, "{p:?}");
        let total: f32 = p.top.iter().map(|(_, lp)| lp.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
