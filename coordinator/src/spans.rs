//! Which blocks a server serves: the choice of a joining server, and rebalancing.
//!
//! The swarm's strength at block `b` is the sum of the throughputs of the servers that
//! cover it; the swarm is as fast as its weakest block. A joining server takes the window
//! of its size where the swarm is weakest (uncovered blocks, at 0, fill first). A running
//! server moves only when moving would raise the weakest block by more than a threshold
//! and would leave no block uncovered; with that threshold a balanced swarm stops moving
//! (Petals' users saw swarms thrash, reloading blocks over and over, without one).

use std::time::Duration;

/// A server's span and speed, as block selection sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpanView {
    /// First block.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
    /// Tokens per second through its span.
    pub throughput: f32,
}

/// Sum of the throughputs covering each block.
pub fn block_throughputs(spans: &[SpanView], n_blocks: u32) -> Vec<f32> {
    let mut t = vec![0.0f32; n_blocks as usize];
    for s in spans {
        for b in s.start.min(n_blocks)..s.end.min(n_blocks) {
            t[b as usize] += s.throughput.max(0.0);
        }
    }
    t
}

/// The span of `len` blocks (clamped to `1..=n_blocks`) where the swarm is weakest:
/// the window whose weakest block is lowest, then whose total is lowest, then the first.
pub fn choose_span(others: &[SpanView], n_blocks: u32, len: u32) -> (u32, u32) {
    choose_span_in(&block_throughputs(others, n_blocks), len)
}

/// [`choose_span`] over already summed block throughputs (`t[b]` for every block), for
/// callers that keep the sums up to date themselves (the simulator, with thousands of
/// servers).
pub fn choose_span_in(t: &[f32], len: u32) -> (u32, u32) {
    let n_blocks = t.len() as u32;
    let len = len.clamp(1, n_blocks.max(1));
    let mut best: Option<(f32, f32, u32)> = None;
    for start in 0..=n_blocks.saturating_sub(len) {
        let w = &t[start as usize..(start + len) as usize];
        let min = w.iter().copied().fold(f32::INFINITY, f32::min);
        let sum: f32 = w.iter().sum();
        let better = match best {
            None => true,
            Some((bm, bs, _)) => min < bm || (min == bm && sum < bs),
        };
        if better {
            best = Some((min, sum, start));
        }
    }
    let start = best.map(|b| b.2).unwrap_or(0);
    (start, start + len)
}

fn weakest(t: &[f32]) -> f32 {
    t.iter().copied().fold(f32::INFINITY, f32::min)
}

/// Whether `me` should move, given every other server's span: `Some(new span)` only
/// when moving keeps every currently covered block covered, and either covers blocks
/// nobody serves or raises the weakest block's throughput by more than `threshold`
/// (0.15 = 15%).
pub fn should_move(
    others: &[SpanView],
    me: SpanView,
    n_blocks: u32,
    threshold: f32,
) -> Option<(u32, u32)> {
    should_move_in(&block_throughputs(others, n_blocks), me, threshold)
}

/// [`should_move`] given the summed throughputs of every *other* server per block (for
/// callers that keep the sums up to date themselves, like the simulator).
pub fn should_move_in(others: &[f32], me: SpanView, threshold: f32) -> Option<(u32, u32)> {
    let with_me = |(s, e): (u32, u32)| {
        let mut t = others.to_vec();
        for b in s..e.min(t.len() as u32) {
            t[b as usize] += me.throughput.max(0.0);
        }
        t
    };
    let now = with_me((me.start, me.end));
    let target = choose_span_in(others, me.end - me.start);
    if target == (me.start, me.end) {
        return None;
    }
    let after = with_me(target);
    if now.iter().zip(&after).any(|(n, a)| *n > 0.0 && *a <= 0.0) {
        return None; // would leave a block uncovered
    }
    let gaps = |t: &[f32]| t.iter().filter(|x| **x <= 0.0).count();
    if gaps(&after) < gaps(&now) {
        return Some(target);
    }
    (weakest(&after) > weakest(&now) * (1.0 + threshold)).then_some(target)
}

/// `base` scaled by a random factor in `[0.5, 1.5)`: servers that check on the same
/// schedule drift apart, so they do not all move at once.
pub fn jittered(base: Duration, rng: &mut impl rand::Rng) -> Duration {
    let f = 0.5 + (rng.next_u32() as f64 / (u32::MAX as f64 + 1.0));
    base.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn v(start: u32, end: u32, throughput: f32) -> SpanView {
        SpanView {
            start,
            end,
            throughput,
        }
    }

    #[test]
    fn a_joining_server_fills_gaps_first_then_the_weakest_blocks() {
        assert_eq!(choose_span(&[], 30, 15), (0, 15));
        assert_eq!(choose_span(&[v(0, 15, 10.0)], 30, 15), (15, 30));
        assert_eq!(
            choose_span(&[v(0, 20, 10.0)], 30, 15),
            (15, 30),
            "covers the 10-block gap"
        );
        // Everything covered once; 15..30 is slower, so the next server goes there.
        assert_eq!(
            choose_span(&[v(0, 15, 30.0), v(15, 30, 28.0)], 30, 15),
            (15, 30)
        );
        assert_eq!(
            choose_span(&[v(0, 15, 30.0), v(15, 30, 28.0), v(15, 30, 25.0)], 30, 15),
            (0, 15)
        );
        // Sizes are clamped to the model.
        assert_eq!(choose_span(&[], 30, 100), (0, 30));
        assert_eq!(choose_span(&[], 30, 0), (0, 1));
    }

    #[test]
    fn moves_only_for_a_real_gain_and_never_uncovers() {
        // Two servers on the same half leave 15..30 uncovered: one of them moves.
        let me = v(0, 15, 10.0);
        assert_eq!(should_move(&[v(0, 15, 10.0)], me, 30, 0.15), Some((15, 30)));
        // The only server of 0..15 never leaves it, whatever the gain elsewhere.
        assert_eq!(
            should_move(&[v(15, 30, 1.0), v(15, 30, 1.0)], v(0, 15, 100.0), 30, 0.15),
            None
        );
        // Balanced: no move.
        let others = [v(0, 15, 10.0), v(15, 30, 10.0), v(15, 30, 10.0)];
        assert_eq!(should_move(&others, v(0, 15, 10.0), 30, 0.15), None);
        // A gain below the threshold is not worth reloading blocks.
        let others = [v(0, 15, 10.0), v(0, 15, 10.0), v(15, 30, 10.0)];
        assert_eq!(should_move(&others, v(15, 30, 11.0), 30, 0.15), None);
        // A large gain is.
        let others = [
            v(0, 15, 10.0),
            v(0, 15, 10.0),
            v(0, 15, 10.0),
            v(15, 30, 10.0),
        ];
        assert_eq!(
            should_move(&others, v(0, 15, 10.0), 30, 0.15),
            Some((15, 30))
        );
    }

    /// Servers join one by one choosing their spans, then every server checks whether to
    /// move, round after round: the swarm settles, every block is covered, and once
    /// settled nobody moves again.
    #[test]
    fn a_stable_swarm_stops_moving() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for trial in 0..50u32 {
            let n_blocks = 20 + trial % 17;
            let mut spans: Vec<SpanView> = Vec::new();
            for i in 0..(3 + trial % 9) {
                let len = 4 + (rng.next_u32() % n_blocks.min(12));
                let tput = 5.0 + (rng.next_u32() % 100) as f32;
                let (s, e) = choose_span(&spans, n_blocks, len);
                spans.push(v(s, e, tput));
                let _ = i;
            }
            let mut moves = 0;
            let mut quiet_rounds = 0;
            for _round in 0..100 {
                let mut moved = false;
                for i in 0..spans.len() {
                    let others: Vec<SpanView> = spans
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, s)| *s)
                        .collect();
                    if let Some((s, e)) = should_move(&others, spans[i], n_blocks, 0.15) {
                        spans[i].start = s;
                        spans[i].end = e;
                        moves += 1;
                        moved = true;
                    }
                }
                if moved {
                    quiet_rounds = 0;
                } else {
                    quiet_rounds += 1;
                    if quiet_rounds == 3 {
                        break;
                    }
                }
            }
            assert_eq!(
                quiet_rounds, 3,
                "trial {trial}: still moving after 100 rounds ({moves} moves)"
            );
            assert!(
                moves <= 3 * spans.len(),
                "trial {trial}: {moves} moves for {} servers",
                spans.len()
            );
            let t = block_throughputs(&spans, n_blocks);
            let total_len: u32 = spans.iter().map(|s| s.end - s.start).sum();
            if total_len >= n_blocks {
                assert!(
                    t.iter().all(|x| *x > 0.0),
                    "trial {trial}: uncovered blocks in {spans:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_checks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let base = Duration::from_secs(60);
        let d: Vec<Duration> = (0..100).map(|_| jittered(base, &mut rng)).collect();
        assert!(d.iter().all(|x| *x >= base / 2 && *x < base * 3 / 2));
        let distinct: std::collections::HashSet<_> = d.iter().collect();
        assert!(distinct.len() > 90);
    }
}
