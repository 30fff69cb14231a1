//! Attention of query rows over a session's cached keys and values on the CPU, in one
//! arithmetic for every row: a row's output depends on its query and the keys and
//! values it sees, and on nothing else: not on how many rows came with it, which they
//! are, or where the step began. So a prompt sent whole, in chunks, or token by token,
//! and a conversation's next turn on a kept session, all give bit for bit the numbers
//! of one another (with the rest of a block row-exact too, see [`crate::kernels`]).
//! Tensor products (a general matrix product's blocking depends on the shapes) and a
//! separate decode loop gave up to 5.2 apart in the last hidden state of SmolLM2-135M.
//!
//! How each number comes out the same:
//! - **Scores.** Keys are kept transposed, `[kv_heads][head_dim][stride]`, so a vector
//!   holds one dimension of consecutive positions. A row's score at position `t` is a
//!   chain of fused multiply-adds over the dimensions in order, from zero, in the lane
//!   of `t`: the same chain in a 16-lane vector, an 8-lane one or a plain loop, and the
//!   same whichever other rows share the keys' loads.
//! - **Weights.** A softmax over the positions the row sees ([`softmax_row`]), whose sums
//!   run in lanes counted from the row's own first position.
//! - **Weighted sum.** Per output dimension, a chain of fused multiply-adds over the
//!   positions in order, from zero. Rows computed together run from the earliest first
//!   position among them; a row's weights before its own first are zeros, which leave
//!   its chain at +0 exactly, and those after its last add ±0, which changes nothing.
//!   (Two exceptions need degenerate numbers: an infinite or NaN value before a row's
//!   window, which 0 times makes NaN, and a sum that is exactly -0, which adding +0
//!   makes +0.)
//!
//! Speed: rows are taken four at a time, so each vector of keys or values loaded serves
//! four rows (a tile of 16 rows of one KV head reads its positions four times); with
//! AVX-512 a pass of the weighted sum holds 64 dimensions of four rows in 16
//! accumulators, with AVX2 32 dimensions in 8. `shard/examples/attention_after_history`
//! on SmolLM2-135M (Q4_1, 2 cores with AVX-512, best of three runs each): 83 prompt
//! rows after 1,052 cached positions through the 30 blocks 124 ms, against 177 ms with
//! the tensor products and separate decode loop this replaced; the same rows after no
//! history 88 ms (93); one decode step after 1,052 positions 6.8 ms (6.7). On that
//! machine with `SHOAL_KERNELS=avx2` (AVX2 for the products too, two runs each): the
//! prompt after the history 156-164 ms against 197-207 ms before, but the decode step
//! 8.5 ms against 6.6 ms (7.6-8.5 against 6.6-7.2 with a task per decode row, below). A decode row's scores read each key dimension's positions as
//! a stream of its own, 64 streams for a 64-wide head, more than the hardware
//! prefetches; asking for the lines two passes ahead took that step from 10-13 ms to
//! 8.5 ms, and the rest is still to find.

use rayon::prelude::*;

/// Positions are padded to a multiple of this in the transposed keys' stride, so a
/// whole vector can always be loaded (the scores past the last position are dropped).
pub(crate) const KEY_STRIDE_STEP: usize = 64;

/// Rows whose scores and weights one task keeps (one head's consecutive tokens).
const TILE: usize = 16;

/// Rows computed together: each loaded vector serves all of them.
const ROWS: usize = 4;

/// Positions per vector of scores at most, and the alignment of their first.
const VECTOR: usize = 16;

/// One call: query rows of a segment over one layer's cache.
pub(crate) struct CacheAttention<'a> {
    /// Queries, rope applied, `[heads][seq][head_dim]`.
    pub q: &'a [f32],
    /// Keys, transposed: `[kv_heads][head_dim][key_stride]`.
    pub keys_t: &'a [f32],
    pub key_stride: usize,
    /// Values, `[kv_heads][value_cap][head_dim]`.
    pub values: &'a [f32],
    pub value_cap: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rows per head: the last `seq` of the `total` positions held.
    pub seq: usize,
    pub total: usize,
    /// A sliding window: each row sees its last `window` positions only.
    pub window: Option<usize>,
    pub scale: f32,
    pub softcap: Option<f32>,
    /// Per head, a logit that joins the softmax and gives back no value.
    pub sinks: Option<&'a [f32]>,
}

/// One row's place: its head, its token within the segment, and the positions it sees.
#[derive(Clone, Copy)]
struct Row {
    head: usize,
    token: usize,
    first: usize,
    last: usize,
}

impl CacheAttention<'_> {
    fn row(&self, head: usize, token: usize) -> Row {
        let last = self.total - self.seq + token;
        let first = self.window.map_or(0, |w| (last + 1).saturating_sub(w));
        Row {
            head,
            token,
            first,
            last,
        }
    }

    fn check(&self, out: &[f32]) -> Result<(), String> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let bad = nkv == 0
            || nh % nkv != 0
            || hd == 0
            || self.seq == 0
            || self.seq > self.total
            || self.q.len() != nh * self.seq * hd
            || out.len() != nh * self.seq * hd
            || !self.key_stride.is_multiple_of(KEY_STRIDE_STEP)
            || self.key_stride < self.total
            || self.keys_t.len() < nkv * hd * self.key_stride
            || self.value_cap < self.total
            || self.values.len() < nkv * self.value_cap * hd
            || self.sinks.is_some_and(|s| s.len() < nh)
            || self.window == Some(0);
        if bad {
            return Err(format!(
                "cache attention: {nh} heads over {nkv} of {hd}, {} rows of {} positions, \
                 {} query values, {} out, key stride {}, value capacity {}, window {:?}",
                self.seq,
                self.total,
                self.q.len(),
                out.len(),
                self.key_stride,
                self.value_cap,
                self.window
            ));
        }
        Ok(())
    }
}

/// Attention of every query row over the cache, into `out` (`[seq][heads * head_dim]`).
/// Tasks are tiles of one KV head's rows, spread over the pool once there is enough
/// work.
pub(crate) fn attend(a: &CacheAttention, out: &mut [f32]) -> Result<(), String> {
    a.check(out)?;
    let (nh, nkv, hd, seq) = (a.heads, a.kv_heads, a.head_dim, a.seq);
    let n_rep = nh / nkv;
    let per_group = n_rep * seq;
    // A decode step's few rows each a task of its own: a task per KV head left one of
    // two cores with two of SmolLM2's three heads (measured with AVX2, a step after
    // 1,052 positions 8.7-9.1 ms -> 7.6-8.5 ms; 6.6-7.2 ms before this kernel).
    let rows_per_task = if seq == 1 { 1 } else { TILE };
    let tasks: Vec<(usize, usize, usize)> = (0..nkv)
        .flat_map(|g| {
            (0..per_group)
                .step_by(rows_per_task)
                .map(move |j| (g, j, (j + rows_per_task).min(per_group)))
        })
        .collect();
    let run = |&(g, j0, j1): &(usize, usize, usize)| {
        let rows: Vec<Row> = (j0..j1)
            .map(|j| a.row(g * n_rep + j / seq, j % seq))
            .collect();
        let mut o = vec![0f32; rows.len() * hd];
        super::with_vector_isa(
            #[inline(always)]
            || tile(a, g, &rows, &mut o),
        );
        (rows, o)
    };
    let seen = a.total - a.window.map_or(0, |w| a.total.saturating_sub(w + seq));
    let results: Vec<(Vec<Row>, Vec<f32>)> = if seen * nh * seq >= 4096 && tasks.len() > 1 {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    for (rows, o) in results {
        for (r, o) in rows.iter().zip(o.chunks_exact(hd)) {
            let at = (r.token * nh + r.head) * hd;
            out[at..at + hd].copy_from_slice(o);
        }
    }
    Ok(())
}

/// One tile's rows (all of KV head `g`): scores, weights, weighted sums into `out`
/// (`[rows][head_dim]`).
#[inline(always)]
fn tile(a: &CacheAttention, g: usize, rows: &[Row], out: &mut [f32]) {
    let hd = a.head_dim;
    let lo = rows.iter().map(|r| r.first).min().unwrap_or(0);
    let hi = rows.iter().map(|r| r.last + 1).max().unwrap_or(0);
    // Scores are computed in whole vectors from a multiple of their width: room for
    // them from `start`, and the positions past `hi` dropped.
    let start = lo - lo % VECTOR;
    let width = hi.next_multiple_of(VECTOR) - start;
    let mut scores = vec![0f32; rows.len() * width];
    let keys = &a.keys_t[g * hd * a.key_stride..(g + 1) * hd * a.key_stride];
    let values = &a.values[g * a.value_cap * hd..(g + 1) * a.value_cap * hd];
    let query = |r: &Row| &a.q[(r.head * a.seq + r.token) * hd..][..hd];
    for (group, s) in rows.chunks(ROWS).zip(scores.chunks_mut(ROWS * width)) {
        let qs: Vec<&[f32]> = group.iter().map(query).collect();
        let mut outs: Vec<&mut [f32]> = s.chunks_mut(width).collect();
        vector::scores(&qs, keys, a.key_stride, start, hi, &mut outs);
    }
    let seen = lo - start..hi - start;
    for (r, s) in rows.iter().zip(scores.chunks_mut(width)) {
        let sink = a.sinks.map(|s| s[r.head]);
        softmax_row(
            &mut s[seen.clone()],
            r.first - lo,
            r.last - lo,
            a.scale,
            a.softcap,
            sink,
        );
    }
    for (w, o) in scores.chunks(ROWS * width).zip(out.chunks_mut(ROWS * hd)) {
        let ws: Vec<&[f32]> = w.chunks(width).map(|w| &w[seen.clone()]).collect();
        let mut os: Vec<&mut [f32]> = o.chunks_mut(hd).collect();
        vector::weigh(&ws, &values[lo * hd..hi * hd], hd, &mut os);
    }
}

/// A row's scores at positions `first..=last` of `row` (the rest zeroed) made weights:
/// scaled, capped, softmax with the head's sink. Loops without a dependence from one
/// element to the next (sums and maxima in eight lanes counted from `first`), so they
/// compile to vector code.
#[inline(always)]
fn softmax_row(
    row: &mut [f32],
    first: usize,
    last: usize,
    scale: f32,
    softcap: Option<f32>,
    sink: Option<f32>,
) {
    row[last + 1..].fill(0.0);
    row[..first].fill(0.0);
    let seen = &mut row[first..=last];
    for s in seen.iter_mut() {
        *s *= scale;
    }
    if let Some(c) = softcap {
        for s in seen.iter_mut() {
            *s = c * (*s / c).tanh();
        }
    }
    // (A comparison, not `f32::max`, whose care for NaN keeps it out of vector code.)
    let max = lanes(seen, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    let max = max.max(sink.unwrap_or(f32::NEG_INFINITY));
    for s in seen.iter_mut() {
        *s = exp_at_most_zero(*s - max);
    }
    let sum = lanes(seen, 0.0, |a, b| a + b) + sink.map_or(0.0, |s| exp_at_most_zero(s - max));
    let inv = 1.0 / sum;
    for s in seen.iter_mut() {
        *s *= inv;
    }
}

/// `xs` folded by `f` in eight independent lanes, then the lanes folded together.
#[inline(always)]
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    for c in chunks {
        for l in 0..8 {
            acc[l] = f(acc[l], c[l]);
        }
    }
    acc.into_iter().fold(rest, f)
}

/// e^x for x <= 0 (a softmax's shifted scores) within a few ulp, without a branch or
/// a call, so a loop of it compiles to vector code for the CPU found at run time.
/// libm's, one call per score, was most of a long prompt's softmax. The `wide` crate's
/// vector exp picks its instructions when it is compiled (SSE in a build for any
/// x86-64): with it a prompt's forward after a long history took 205 ms, with this
/// 172 ms. Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2, a degree-6 Taylor
/// polynomial for e^r, and 2^n put in the exponent's bits; below -87 (where e^x is
/// under f32's least normal) it gives e^-87.
#[inline(always)]
fn exp_at_most_zero(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 x 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = if x > -87.0 { x } else { -87.0 };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // The integer n, from the low bits of `shifted` (a cast would saturate, which
    // keeps a loop out of vector code).
    let k = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * f32::from_bits(((k + 127) as u32) << 23)
}

/// The two loops, in whatever vectors the CPU has; every lane a chain of fused
/// multiply-adds, so every width gives the same numbers.
mod vector {
    /// Scores of up to [`super::ROWS`] rows (`qs`, `[head_dim]` each) at positions
    /// `lo..hi` of one KV head's transposed keys (`[head_dim][stride]`): `outs[r][t - lo]`.
    /// `lo` is a multiple of [`super::VECTOR`], and positions up to the next multiple
    /// past `hi` are computed too: the stride and the outputs have room for them.
    #[inline(always)]
    pub(super) fn scores(
        qs: &[&[f32]],
        keys: &[f32],
        stride: usize,
        lo: usize,
        hi: usize,
        outs: &mut [&mut [f32]],
    ) {
        #[cfg(target_arch = "x86_64")]
        match x86::level() {
            // SAFETY: the CPU has the instructions (checked by `level`).
            x86::Level::Avx512 => {
                return unsafe { x86::avx512::scores(qs, keys, stride, lo, hi, outs) }
            }
            // SAFETY: as above.
            x86::Level::Avx2 => {
                return unsafe { x86::avx2::scores(qs, keys, stride, lo, hi, outs) }
            }
            x86::Level::None => {}
        }
        plain_scores(qs, keys, stride, lo, hi, outs);
    }

    /// Weighted sums of up to [`super::ROWS`] rows: `outs[r][d]` = sum over positions
    /// `t` of `ws[r][t] * values[t][d]` (`values`: `[positions][head_dim]`).
    #[inline(always)]
    pub(super) fn weigh(ws: &[&[f32]], values: &[f32], hd: usize, outs: &mut [&mut [f32]]) {
        #[cfg(target_arch = "x86_64")]
        match x86::level() {
            // SAFETY: the CPU has the instructions (checked by `level`).
            x86::Level::Avx512 => return unsafe { x86::avx512::weigh(ws, values, hd, outs) },
            // SAFETY: as above.
            x86::Level::Avx2 => return unsafe { x86::avx2::weigh(ws, values, hd, outs) },
            x86::Level::None => {}
        }
        plain_weigh(ws, values, hd, 0, outs);
    }

    /// [`scores`] in 8-lane arrays the compiler vectorises (with the caller's
    /// instruction set: fused multiply-adds where the CPU has them, `fmaf` elsewhere).
    #[inline(always)]
    pub(super) fn plain_scores(
        qs: &[&[f32]],
        keys: &[f32],
        stride: usize,
        lo: usize,
        hi: usize,
        outs: &mut [&mut [f32]],
    ) {
        const L: usize = 8;
        let hd = keys.len() / stride;
        let mut t = lo;
        while t < hi {
            for (q, out) in qs.iter().zip(outs.iter_mut()) {
                let mut acc = [0f32; L];
                for (d, &qd) in q.iter().enumerate().take(hd) {
                    let k = &keys[d * stride + t..][..L];
                    for l in 0..L {
                        acc[l] = qd.mul_add(k[l], acc[l]);
                    }
                }
                out[t - lo..t - lo + L].copy_from_slice(&acc);
            }
            t += L;
        }
    }

    /// [`weigh`] over dimensions `from..` in plain loops.
    #[inline(always)]
    pub(super) fn plain_weigh(
        ws: &[&[f32]],
        values: &[f32],
        hd: usize,
        from: usize,
        outs: &mut [&mut [f32]],
    ) {
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            let out = &mut out[from..hd];
            out.fill(0.0);
            for (t, &wt) in w.iter().enumerate() {
                let v = &values[t * hd + from..(t + 1) * hd];
                for (o, &x) in out.iter_mut().zip(v) {
                    *o = wt.mul_add(x, *o);
                }
            }
        }
    }

    /// Every instruction set this CPU has gives the plain loops' numbers bit for bit.
    #[cfg(all(test, target_arch = "x86_64"))]
    #[test]
    fn every_instruction_set_gives_the_same_numbers() {
        use super::tests::numbers;
        let (hd, stride, rows) = (80, 128, 3);
        let keys = numbers(hd * stride, 1);
        let qs: Vec<Vec<f32>> = (0..rows).map(|r| numbers(hd, 2 + r as u64)).collect();
        let qs: Vec<&[f32]> = qs.iter().map(|q| q.as_slice()).collect();
        let (lo, hi): (usize, usize) = (16, 101);
        let width = hi.next_multiple_of(super::VECTOR) - lo;
        let n = 77;
        let values = numbers(n * hd, 4);
        let ws: Vec<Vec<f32>> = (0..rows).map(|r| numbers(n, 7 + r as u64)).collect();
        let ws: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
        let run = |level: x86::Level| {
            let mut scores = vec![vec![0f32; width]; rows];
            let mut sums = vec![vec![0f32; hd]; rows];
            let mut s: Vec<&mut [f32]> = scores.iter_mut().map(|o| o.as_mut_slice()).collect();
            let mut o: Vec<&mut [f32]> = sums.iter_mut().map(|o| o.as_mut_slice()).collect();
            // SAFETY: each level runs only where the CPU has its instructions.
            unsafe {
                match level {
                    x86::Level::Avx512 => {
                        x86::avx512::scores(&qs, &keys, stride, lo, hi, &mut s);
                        x86::avx512::weigh(&ws, &values, hd, &mut o);
                    }
                    x86::Level::Avx2 => {
                        x86::avx2::scores(&qs, &keys, stride, lo, hi, &mut s);
                        x86::avx2::weigh(&ws, &values, hd, &mut o);
                    }
                    x86::Level::None => {
                        plain_scores(&qs, &keys, stride, lo, hi, &mut s);
                        plain_weigh(&ws, &values, hd, 0, &mut o);
                    }
                }
            }
            let bits = |v: &[Vec<f32>], n: usize| -> Vec<u32> {
                v.iter()
                    .flat_map(|r| r[..n].iter().map(|x| x.to_bits()))
                    .collect()
            };
            (bits(&scores, hi - lo), bits(&sums, hd))
        };
        let plain = run(x86::Level::None);
        let mut levels = Vec::new();
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            levels.push(x86::Level::Avx2);
        }
        if std::is_x86_feature_detected!("avx512f") {
            levels.push(x86::Level::Avx512);
        }
        for level in levels {
            assert!(
                run(level) == plain,
                "a vector loop's numbers differ from the plain loops'"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::sync::OnceLock;

        #[derive(Clone, Copy, PartialEq, Eq)]
        pub(super) enum Level {
            Avx512,
            Avx2,
            None,
        }

        /// The widest vectors this CPU has fused multiply-adds for (`SHOAL_KERNELS`
        /// =avx2 or =portable asks for a lesser set, as for the products).
        pub(super) fn level() -> Level {
            static LEVEL: OnceLock<Level> = OnceLock::new();
            *LEVEL.get_or_init(|| {
                let avx2 =
                    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
                let avx512 = std::is_x86_feature_detected!("avx512f");
                match std::env::var("SHOAL_KERNELS").as_deref() {
                    Ok("portable") => Level::None,
                    Ok("avx2") if avx2 => Level::Avx2,
                    _ if avx512 => Level::Avx512,
                    _ if avx2 => Level::Avx2,
                    _ => Level::None,
                }
            })
        }

        /// The two loops for one kind of vector: `$lanes` floats in a `$v`, `$d` vectors
        /// of dimensions per pass of the weighted sum (as many accumulators as the
        /// registers hold for four rows).
        macro_rules! loops {
            ($name:ident, $features:literal, $v:ty, $lanes:literal, $d:literal,
             $zero:ident, $set1:ident, $load:ident, $store:ident, $fma:ident) => {
                pub(super) mod $name {
                    use std::arch::x86_64::*;

                    const L: usize = $lanes;

                    /// [`super::super::scores`]: rows by four (fewer at the end),
                    /// positions two vectors at a time, then one.
                    #[target_feature(enable = $features)]
                    pub(in super::super) unsafe fn scores(
                        qs: &[&[f32]],
                        keys: &[f32],
                        stride: usize,
                        lo: usize,
                        hi: usize,
                        outs: &mut [&mut [f32]],
                    ) {
                        let hd = keys.len() / stride;
                        assert!(qs.iter().all(|q| q.len() >= hd));
                        // Whole vectors past `hi` stay inside the stride and the outputs.
                        let end = hi.next_multiple_of(L);
                        assert!(lo.is_multiple_of(L) && end <= stride);
                        assert!(outs.iter().all(|o| o.len() >= end - lo));
                        assert!(outs.len() == qs.len() && qs.len() <= super::super::super::ROWS);
                        // The rows' pointers in arrays on the stack: no allocation per call.
                        let mut q = [std::ptr::null::<f32>(); super::super::super::ROWS];
                        let mut o = [std::ptr::null_mut::<f32>(); super::super::super::ROWS];
                        for (p, r) in q.iter_mut().zip(qs) {
                            *p = r.as_ptr();
                        }
                        for (p, r) in o.iter_mut().zip(outs.iter_mut()) {
                            *p = r.as_mut_ptr();
                        }
                        let k = keys.as_ptr();
                        // SAFETY: rows hold `hd` values, keys `hd` rows of `stride` with
                        // every vector read below `end <= stride`, outputs `end - lo`
                        // (asserted above).
                        unsafe {
                            match qs.len() {
                                4 => score_rows::<4>(&q, k, stride, hd, lo, end, &o),
                                3 => score_rows::<3>(&q, k, stride, hd, lo, end, &o),
                                2 => score_rows::<2>(&q, k, stride, hd, lo, end, &o),
                                1 => score_rows::<1>(&q, k, stride, hd, lo, end, &o),
                                _ => unreachable!("rows come four at most"),
                            }
                        }
                    }

                    #[target_feature(enable = $features)]
                    unsafe fn score_rows<const R: usize>(
                        q: &[*const f32],
                        k: *const f32,
                        stride: usize,
                        hd: usize,
                        lo: usize,
                        end: usize,
                        o: &[*mut f32],
                    ) {
                        let mut t = lo;
                        // SAFETY: the caller's bounds.
                        unsafe {
                            while t + 2 * L <= end {
                                let mut acc: [[$v; 2]; R] = [[$zero(); 2]; R];
                                for d in 0..hd {
                                    let row = k.add(d * stride + t);
                                    // Each dimension's positions are a stream of their
                                    // own, too many for the hardware's prefetcher:
                                    // two passes ahead, asked for here.
                                    _mm_prefetch::<_MM_HINT_T0>(row.add(4 * L).cast());
                                    _mm_prefetch::<_MM_HINT_T0>(row.add(5 * L).cast());
                                    let k0 = $load(row);
                                    let k1 = $load(row.add(L));
                                    for r in 0..R {
                                        let qd = $set1(*q[r].add(d));
                                        acc[r][0] = $fma(qd, k0, acc[r][0]);
                                        acc[r][1] = $fma(qd, k1, acc[r][1]);
                                    }
                                }
                                for r in 0..R {
                                    $store(o[r].add(t - lo), acc[r][0]);
                                    $store(o[r].add(t - lo + L), acc[r][1]);
                                }
                                t += 2 * L;
                            }
                            while t < end {
                                let mut acc: [$v; R] = [$zero(); R];
                                for d in 0..hd {
                                    let k0 = $load(k.add(d * stride + t));
                                    for r in 0..R {
                                        acc[r] = $fma($set1(*q[r].add(d)), k0, acc[r]);
                                    }
                                }
                                for r in 0..R {
                                    $store(o[r].add(t - lo), acc[r]);
                                }
                                t += L;
                            }
                        }
                    }

                    /// [`super::super::weigh`]: rows by four, dimensions `$d` vectors
                    /// at a time, then one, then the rest in plain loops.
                    #[target_feature(enable = $features)]
                    pub(in super::super) unsafe fn weigh(
                        ws: &[&[f32]],
                        values: &[f32],
                        hd: usize,
                        outs: &mut [&mut [f32]],
                    ) {
                        let n = ws.first().map_or(0, |w| w.len());
                        assert!(ws.iter().all(|w| w.len() == n) && values.len() >= n * hd);
                        assert!(outs.len() == ws.len() && outs.iter().all(|o| o.len() >= hd));
                        assert!(ws.len() <= super::super::super::ROWS);
                        let mut w = [std::ptr::null::<f32>(); super::super::super::ROWS];
                        let mut o = [std::ptr::null_mut::<f32>(); super::super::super::ROWS];
                        for (p, r) in w.iter_mut().zip(ws) {
                            *p = r.as_ptr();
                        }
                        for (p, r) in o.iter_mut().zip(outs.iter_mut()) {
                            *p = r.as_mut_ptr();
                        }
                        let rows = ws.len();
                        let v = values.as_ptr();
                        let mut d = 0;
                        // SAFETY: weights hold `n` values, values `n` rows of `hd`,
                        // outputs `hd` (asserted above); every vector read or written
                        // lies below `hd`.
                        unsafe {
                            while d + $d * L <= hd {
                                weigh_dims::<$d>(&w[..rows], v, hd, n, d, &o[..rows]);
                                d += $d * L;
                            }
                            while d + L <= hd {
                                weigh_dims::<1>(&w[..rows], v, hd, n, d, &o[..rows]);
                                d += L;
                            }
                        }
                        if d < hd {
                            super::super::plain_weigh(ws, values, hd, d, outs);
                        }
                    }

                    #[target_feature(enable = $features)]
                    unsafe fn weigh_dims<const D: usize>(
                        w: &[*const f32],
                        v: *const f32,
                        hd: usize,
                        n: usize,
                        d: usize,
                        o: &[*mut f32],
                    ) {
                        // SAFETY: the caller's bounds.
                        unsafe {
                            match w.len() {
                                4 => weigh_rows::<4, D>(w, v, hd, n, d, o),
                                3 => weigh_rows::<3, D>(w, v, hd, n, d, o),
                                2 => weigh_rows::<2, D>(w, v, hd, n, d, o),
                                1 => weigh_rows::<1, D>(w, v, hd, n, d, o),
                                _ => unreachable!("rows come four at most"),
                            }
                        }
                    }

                    #[target_feature(enable = $features)]
                    unsafe fn weigh_rows<const R: usize, const D: usize>(
                        w: &[*const f32],
                        v: *const f32,
                        hd: usize,
                        n: usize,
                        d: usize,
                        o: &[*mut f32],
                    ) {
                        // SAFETY: the caller's bounds.
                        unsafe {
                            let mut acc: [[$v; D]; R] = [[$zero(); D]; R];
                            for t in 0..n {
                                let row = v.add(t * hd + d);
                                let mut x: [$v; D] = [$zero(); D];
                                for (j, x) in x.iter_mut().enumerate() {
                                    *x = $load(row.add(j * L));
                                }
                                for r in 0..R {
                                    let wt = $set1(*w[r].add(t));
                                    for j in 0..D {
                                        acc[r][j] = $fma(wt, x[j], acc[r][j]);
                                    }
                                }
                            }
                            for r in 0..R {
                                for j in 0..D {
                                    $store(o[r].add(d + j * L), acc[r][j]);
                                }
                            }
                        }
                    }
                }
            };
        }

        loops!(
            avx512,
            "avx512f",
            __m512,
            16,
            4,
            _mm512_setzero_ps,
            _mm512_set1_ps,
            _mm512_loadu_ps,
            _mm512_storeu_ps,
            _mm512_fmadd_ps
        );
        loops!(
            avx2,
            "avx2,fma",
            __m256,
            8,
            2,
            _mm256_setzero_ps,
            _mm256_set1_ps,
            _mm256_loadu_ps,
            _mm256_storeu_ps,
            _mm256_fmadd_ps
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers of a fixed pseudo-random sequence in [-1, 1).
    pub(super) fn numbers(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// A cache of `total` positions and queries for all of them, in the layouts the
    /// kernel takes.
    struct Case {
        nh: usize,
        nkv: usize,
        hd: usize,
        total: usize,
        /// `[heads][total][head_dim]`
        q: Vec<f32>,
        /// `[kv_heads][total][head_dim]`
        k: Vec<f32>,
        v: Vec<f32>,
        sinks: Option<Vec<f32>>,
        window: Option<usize>,
        softcap: Option<f32>,
    }

    impl Case {
        fn new(nh: usize, nkv: usize, hd: usize, total: usize, seed: u64) -> Case {
            Case {
                nh,
                nkv,
                hd,
                total,
                q: numbers(nh * total * hd, seed)
                    .iter()
                    .map(|x| x * 3.0)
                    .collect(),
                k: numbers(nkv * total * hd, seed + 1),
                v: numbers(nkv * total * hd, seed + 2),
                sinks: None,
                window: None,
                softcap: None,
            }
        }

        /// Rows `from..to` attending over positions `..to` (the cache as it stands after
        /// a step of those rows): `[to - from][heads * head_dim]`.
        fn step(&self, from: usize, to: usize) -> Vec<f32> {
            let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
            let stride = to.next_multiple_of(KEY_STRIDE_STEP);
            // Past `to` the buffers hold what a longer history would have left there.
            let mut keys_t = vec![7.5f32; nkv * hd * stride];
            for g in 0..nkv {
                for t in 0..to {
                    for d in 0..hd {
                        keys_t[(g * hd + d) * stride + t] = self.k[(g * self.total + t) * hd + d];
                    }
                }
            }
            let cap = to + 3;
            let mut values = vec![-2.5f32; nkv * cap * hd];
            for g in 0..nkv {
                for t in 0..to {
                    let at = (g * cap + t) * hd;
                    values[at..at + hd].copy_from_slice(&self.v[(g * self.total + t) * hd..][..hd]);
                }
            }
            let seq = to - from;
            let q: Vec<f32> = (0..nh)
                .flat_map(|h| {
                    self.q[(h * self.total + from) * hd..(h * self.total + to) * hd].to_vec()
                })
                .collect();
            let mut out = vec![0f32; seq * nh * hd];
            let call = CacheAttention {
                q: &q,
                keys_t: &keys_t,
                key_stride: stride,
                values: &values,
                value_cap: cap,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                seq,
                total: to,
                window: self.window,
                scale: 1.0 / (hd as f32).sqrt(),
                softcap: self.softcap,
                sinks: self.sinks.as_deref(),
            };
            attend(&call, &mut out).expect("a well-formed call");
            out
        }

        /// Row `t`, head `h` in f64 from the definition.
        fn reference(&self, t: usize, h: usize) -> Vec<f64> {
            let (hd, g) = (self.hd, h / (self.nh / self.nkv));
            let first = self.window.map_or(0, |w| (t + 1).saturating_sub(w));
            let q = &self.q[(h * self.total + t) * hd..][..hd];
            let scores: Vec<f64> = (first..=t)
                .map(|j| {
                    let k = &self.k[(g * self.total + j) * hd..][..hd];
                    let s: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let s = s / (hd as f64).sqrt();
                    match self.softcap {
                        Some(c) => c as f64 * (s / c as f64).tanh(),
                        None => s,
                    }
                })
                .collect();
            let sink = self.sinks.as_ref().map(|s| s[h] as f64);
            let max = scores.iter().cloned().chain(sink).fold(f64::MIN, f64::max);
            let sum: f64 = scores
                .iter()
                .chain(sink.as_ref())
                .map(|s| (s - max).exp())
                .sum();
            let mut out = vec![0f64; hd];
            for (i, s) in scores.iter().enumerate() {
                let w = (s - max).exp() / sum;
                let v = &self.v[(g * self.total + first + i) * hd..][..hd];
                for (o, &x) in out.iter_mut().zip(v) {
                    *o += w * x as f64;
                }
            }
            out
        }
    }

    /// The kernel against attention computed from its definition in f64, with and
    /// without a window, a soft cap and sinks, over head widths that do and do not fill
    /// whole vectors.
    #[test]
    fn attention_is_the_softmax_weighted_sum_of_the_values() {
        for (nh, nkv, hd, total) in [(6, 2, 64, 150), (4, 4, 80, 70), (2, 1, 20, 33)] {
            for variant in 0..3 {
                let mut case = Case::new(nh, nkv, hd, total, 11 + variant);
                match variant {
                    1 => case.window = Some(40),
                    2 => {
                        case.softcap = Some(3.0);
                        case.sinks = Some(numbers(nh, 5));
                    }
                    _ => {}
                }
                let from = total - 23;
                let out = case.step(from, total);
                for t in from..total {
                    for h in 0..nh {
                        let want = case.reference(t, h);
                        let got = &out[((t - from) * nh + h) * hd..][..hd];
                        for (d, (&g, &w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g as f64 - w).abs() < 2e-5,
                                "{nh}/{nkv} heads of {hd}, variant {variant}, row {t} head \
                                 {h} dim {d}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every row's output is bit for bit the same however the rows are grouped into
    /// steps: all at once, in uneven chunks, or one by one.
    #[test]
    fn a_row_gets_the_same_numbers_in_any_grouping() {
        for (nh, nkv, hd, window) in [(9, 3, 64, None), (4, 2, 80, Some(50)), (2, 1, 20, None)] {
            let total = 140;
            let mut case = Case::new(nh, nkv, hd, total, 3);
            case.window = window;
            case.sinks = window.map(|_| numbers(nh, 9));
            let whole = case.step(0, total);
            for cuts in [
                vec![0, 37, 38, 39, 100, 140],
                (0..=total).collect::<Vec<_>>(),
            ] {
                let mut pieces = Vec::new();
                for w in cuts.windows(2) {
                    pieces.extend(case.step(w[0], w[1]));
                }
                let same = whole
                    .iter()
                    .zip(&pieces)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same && whole.len() == pieces.len(),
                    "{nh} heads of {hd}, cuts {cuts:?}"
                );
            }
        }
    }

    /// A call the kernel cannot serve (a window of nothing, buffers too short) is an
    /// error, not a panic in a server.
    #[test]
    fn a_malformed_call_is_an_error() {
        let (hd, total) = (16, 10);
        let q = numbers(hd, 1);
        let keys_t = numbers(hd * KEY_STRIDE_STEP, 2);
        let values = numbers(total * hd, 3);
        let call = |window, value_cap| CacheAttention {
            q: &q,
            keys_t: &keys_t,
            key_stride: KEY_STRIDE_STEP,
            values: &values,
            value_cap,
            heads: 1,
            kv_heads: 1,
            head_dim: hd,
            seq: 1,
            total,
            window,
            scale: 0.25,
            softcap: None,
            sinks: None,
        };
        let mut out = vec![0f32; hd];
        assert!(attend(&call(Some(3), total), &mut out).is_ok());
        assert!(attend(&call(Some(0), total), &mut out).is_err());
        assert!(attend(&call(None, total - 1), &mut out).is_err());
        assert!(attend(&call(None, total), &mut out[..hd - 1]).is_err());
    }

    /// The softmax's exponential against libm's over the whole range it is used on.
    #[test]
    fn exp_at_most_zero_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..=2_000_000u32 {
            let x = -(i as f32) * 87.0 / 2_000_000.0;
            let (ours, libm) = (exp_at_most_zero(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        // An ulp of f32 is 2^-23 ~ 1.2e-7 relative.
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst:e}");
        assert_eq!(exp_at_most_zero(0.0), 1.0);
        assert!(exp_at_most_zero(-1000.0) < 1e-37);
        assert!(exp_at_most_zero(f32::NEG_INFINITY) < 1e-37);
    }
}
