//! Attention: rope, grouped-query attention over a session's cache, and a plain-Rust
//! path for the single token of a decode step.

use candle_core::{DType, Device, Tensor};

use super::cache::LayerKv;
use super::{Block, Span};
use crate::{Result, RopeStyle, ShardError};

impl Span {
    /// True when a segment of `seq` rows takes the plain-Rust single-token path
    /// ([`decode_attention`]) rather than tensor ops with a mask.
    pub(super) fn decodes_in_rust(&self, seq: usize) -> bool {
        seq == 1 && self.device.is_cpu() && self.dtype == DType::F32
    }

    /// Rope over the first `rope_dims` dimensions of each head of `x`
    /// (`[1, heads, seq, width]`); the rest pass unturned (GLM-4.5 turns half).
    pub(super) fn rope(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let turn = |x: &Tensor| match self.config.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
            RopeStyle::Half => candle_nn::rotary_emb::rope(x, cos, sin),
        };
        let (dims, head) = (self.config.rope_dims, x.dim(3)?);
        if dims == head {
            return turn(x);
        }
        let turned = turn(&x.narrow(3, 0, dims)?.contiguous()?)?;
        Tensor::cat(&[&turned, &x.narrow(3, dims, head - dims)?], 3)?.contiguous()
    }

    /// Attention of one segment's `q`, `k`, `v` (`[seq, heads * head_dim]`) over its cache,
    /// which it extends: `[seq, heads * head_dim]`. A local layer attends over the
    /// sliding window only, with the local rope; a layer with sinks adds each head's
    /// sink logit to its softmax.
    ///
    /// A prompt's rows take tensor products here, a decode step's row
    /// [`decode_attention`]: the same position gets slightly different numbers the two
    /// ways, so a conversation's kept session (earlier answers computed as steps) gives
    /// a resent history's answers only up to float rounding. Attention is the only part
    /// of a block that depends on how tokens are grouped into steps: with every row
    /// through one arithmetic, a 120-token prompt sent whole, in chunks of 40, as
    /// 77 + 1 + 1 + 50 or token by token gave bit-identical outputs on SmolLM2-135M
    /// (with these tensor products, whole and token by token differ by up to 5.2 in the
    /// last hidden state). What stops that today is speed, measured there (2 cores, 83
    /// prompt rows after 1,052 cached positions through the 30 blocks): 151 ms here;
    /// 289 ms with `attend` per row (in tiles of 8 rows per KV head, no faster); ~195 ms
    /// with keys kept transposed beside the cache, 64 positions per query in AVX2 lanes
    /// (one chain of fused multiply-adds each), spans of keys and values read once per
    /// tile of 16 rows, and the weighted sum four positions per pass. With that kernel,
    /// the conversation test's answers equal the resent ones but its last turn's first
    /// token came 1.64x the first's, over the 1.5x asked. AVX-512's wider lanes were not
    /// tried.
    pub(super) fn attention(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        seg: &Segment,
        kv: &mut Option<LayerKv>,
        block: &Block,
    ) -> Result<Tensor> {
        let local = block.local;
        let sinks = block.sinks.as_deref();
        let cfg = &self.config;
        let seq = seg.seq;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            // [seq, n*hd] -> [1, n, seq, hd], the layout the rope kernels want.
            t.reshape((seq, n, hd))?
                .transpose(0, 1)?
                .unsqueeze(0)?
                .contiguous()
        };
        let q = heads(q, nh)?;
        let k = heads(k, nkv)?;
        let v = heads(v, nkv)?.squeeze(0)?;
        let (cos, sin, mask, window) = match (&seg.local, local) {
            (Some(l), true) => (
                &l.cos,
                &l.sin,
                l.mask.as_ref(),
                cfg.sliding_window.as_ref().map(|w| w.size),
            ),
            _ => (&seg.cos, &seg.sin, seg.mask.as_ref(), None),
        };
        let q = self.rope(&q, cos, sin)?;
        let k = self.rope(&k, cos, sin)?.squeeze(0)?;
        let (k, v) = LayerKv::append(kv, &k, &v, seg.max_len)?;
        let scale = cfg.attn_scale.unwrap_or(1.0 / (hd as f32).sqrt());
        let cap = cfg.attn_softcap;
        if self.decodes_in_rust(seq) {
            if let Some(l) = kv.as_ref() {
                let q = q.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; nh * hd];
                decode_attention(&q, l, nh / nkv, scale, window, cap, sinks, &mut out)?;
                return Ok(Tensor::from_vec(out, (1, nh * hd), l.k.device())?);
            }
        }
        let total = k.dim(1)?;
        // Grouped-query attention without copying K/V: the n_rep query heads that share
        // one KV head are stacked along the token axis, [nkv, n_rep * seq, hd].
        let n_rep = nh / nkv;
        let q = q.reshape((nkv, n_rep * seq, hd))?;
        if self.decodes_in_rust(1) {
            let rows = ScoreRows {
                seq,
                first: total - seq,
                window,
                scale,
                softcap: cap,
                sinks,
            };
            let att = masked_softmax(&q.matmul(&k.t()?)?, &rows)?;
            return Ok(att
                .matmul(&v)?
                .reshape((nh, seq, hd))?
                .transpose(0, 1)?
                .reshape((seq, nh * hd))?);
        }
        let att = (q.matmul(&k.t()?)? * scale as f64)?;
        let att = match cap {
            Some(c) => ((att / c as f64)?.tanh()? * c as f64)?,
            None => att,
        };
        let att = match mask {
            Some(m) => att
                .reshape((nkv, n_rep, seq, total))?
                .broadcast_add(m)?
                .reshape((nkv, n_rep * seq, total))?,
            None => att,
        };
        let att = match sinks {
            // The sink joins the softmax as one more score per row, then is dropped:
            // it takes a share of the weight and gives back no value.
            Some(s) => {
                let column: Vec<f32> = (0..nh)
                    .flat_map(|h| std::iter::repeat_n(s[h], seq))
                    .collect();
                let column = Tensor::from_vec(column, (nkv, n_rep * seq, 1), att.device())?
                    .to_dtype(att.dtype())?;
                let with_sink = Tensor::cat(&[&att, &column], 2)?;
                candle_nn::ops::softmax_last_dim(&with_sink)?.narrow(2, 0, total)?
            }
            None => candle_nn::ops::softmax_last_dim(&att)?,
        };
        Ok(att
            .matmul(&v)?
            .reshape((nh, seq, hd))?
            .transpose(0, 1)?
            .reshape((seq, nh * hd))?)
    }

    /// True when every segment is computed row by row (a decode step's token, or a
    /// verify step's short run) and such rows run in plain Rust here
    /// ([`Span::decode_batch`]).
    pub(super) fn decodes_batch_in_rust(&self, segments: &[Segment]) -> bool {
        self.decodes_in_rust(1) && segments.iter().all(|s| s.rows.is_some())
    }

    /// Attention for a batch of segments computed row by row (`q`, `k`, `v`: `[n, heads
    /// * head_dim]`, the segments' rows in order) in plain Rust: rope, the cache append
    /// and [`decode_attention`] per row straight from slices, where [`Span::attention`]
    /// runs a score of tensor ops per segment and block (measured: most of what 8
    /// concurrent sessions cost beyond the weights' products). The arithmetic is the
    /// general path's (candle's rope formulas, unfused), and a lone decode step comes
    /// here too, so a session's numbers do not depend on its batch. A segment of
    /// several rows (a verify step) appends and attends one row after the other, so
    /// each row gets exactly the numbers it would get as a decode step of its own,
    /// while the weights are read once for all. `[n, heads * head_dim]`.
    pub(super) fn decode_batch(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &[Segment],
        kvs: &mut [&mut Option<LayerKv>],
        block: &Block,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let n: usize = segments.iter().map(|s| s.seq).sum();
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let (qw, kw) = (nh * hd, nkv * hd);
        if q.len() != n * qw
            || k.len() != n * kw
            || v.len() != n * kw
            || kvs.len() != segments.len()
        {
            return Err(ShardError::BadInput(format!(
                "decode batch of {n}: q, k, v of {}, {}, {} values",
                q.len(),
                k.len(),
                v.len()
            )));
        }
        let scale = cfg.attn_scale.unwrap_or(1.0 / (hd as f32).sqrt());
        let sinks = block.sinks.as_deref();
        let mut out = vec![0f32; n * qw];
        let mut rows = q
            .chunks_exact_mut(qw)
            .zip(k.chunks_exact_mut(kw))
            .zip(v.chunks_exact(kw))
            .zip(out.chunks_exact_mut(qw));
        let freqs = cfg.rope_dims / 2;
        for (seg, kv) in segments.iter().zip(kvs.iter_mut()) {
            let (table, window) = match (&seg.local, block.local) {
                (Some(l), true) => (l.rows.as_ref(), cfg.sliding_window.as_ref().map(|w| w.size)),
                _ => (seg.rows.as_ref(), None),
            };
            let Some(table) = table else {
                return Err(ShardError::BadInput(
                    "a decode row without rope rows".into(),
                ));
            };
            for i in 0..seg.seq {
                let Some((((qi, ki), vi), oi)) = rows.next() else {
                    return Err(ShardError::BadInput("decode batch: rows missing".into()));
                };
                let (cos, sin) = table.row(i, freqs);
                for head in qi.chunks_exact_mut(hd).chain(ki.chunks_exact_mut(hd)) {
                    self.rope_row(head, cos, sin);
                }
                let device = &self.device;
                let kt = Tensor::from_slice(ki, (nkv, 1, hd), device)?;
                let vt = Tensor::from_slice(vi, (nkv, 1, hd), device)?;
                LayerKv::append(kv, &kt, &vt, seg.max_len)?;
                let Some(l) = kv.as_ref() else {
                    return Err(ShardError::BadInput("key/value cache missing".into()));
                };
                decode_attention(qi, l, nh / nkv, scale, window, cfg.attn_softcap, sinks, oi)?;
            }
        }
        Ok(Tensor::from_vec(out, (n, qw), &self.device)?)
    }

    /// Rope of one head's values at one position, in place: the first `rope_dims`
    /// turned as candle's single-token kernels turn them (the same products and sums,
    /// so the same numbers), the rest left.
    fn rope_row(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.config.rope_dims / 2;
        for (j, (&c, &s)) in cos.iter().zip(sin).take(half).enumerate() {
            let (i1, i2) = match self.config.rope_style {
                RopeStyle::Interleaved => (2 * j, 2 * j + 1),
                RopeStyle::Half => (j, j + half),
            };
            let (a, b) = (x[i1], x[i2]);
            x[i1] = a * c - b * s;
            x[i2] = a * s + b * c;
        }
    }
}

/// Attention of one token (`q`: `[1, heads, 1, head_dim]`, rope applied) over a cache,
/// in plain Rust: scores, softmax and the weighted sum straight over the cache's
/// buffers, heads in parallel once the cache is long. For a single token this replaces
/// a dozen tensor ops (two general matmuls among them) per block. `[1, heads * head_dim]`.
///
/// A `window` keeps the last `window` positions only; `softcap` caps the scores.
#[allow(clippy::too_many_arguments)]
fn decode_attention(
    q: &[f32],
    l: &LayerKv,
    n_rep: usize,
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    use rayon::prelude::*;
    let (nkv, cap, hd) = l.k.dims3()?;
    let nh = nkv * n_rep;
    let total = l.len;
    let first = window.map_or(0, |w| total.saturating_sub(w));
    if q.len() != nh * hd || out.len() != nh * hd {
        return Err(ShardError::BadInput(format!(
            "decode attention: {} query values, {} out, for {nh} heads of {hd}",
            q.len(),
            out.len()
        )));
    }
    let (ks, kl) = l.k.storage_and_layout();
    let Some(v) = &l.v else {
        return Err(ShardError::BadInput(
            "a key-only cache has no values".into(),
        ));
    };
    let (vs, vl) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Err(ShardError::BadInput(
            "decode attention runs on the CPU".into(),
        ));
    };
    let keys = &kc.as_slice::<f32>()?[kl.start_offset()..][..nkv * cap * hd];
    let values = &vc.as_slice::<f32>()?[vl.start_offset()..][..nkv * cap * hd];
    out.fill(0.0);
    // Compiled for AVX2 where the CPU has it: the scores' dots and the weighted sum
    // are most of a decode step's attention (the same numbers: no fused multiply-adds).
    let head = |h: usize, o: &mut [f32]| {
        let base = (h / n_rep) * cap * hd;
        let positions = Positions {
            keys: &keys[base..base + cap * hd],
            values: &values[base..base + cap * hd],
            width: hd,
            first,
            total,
        };
        let query = &q[h * hd..(h + 1) * hd];
        let sink = sinks.map(|s| s[h]);
        crate::kernels::with_vector_isa(
            #[inline(always)]
            || attend(query, &positions, scale, softcap, sink, o),
        )
    };
    // Splitting pays only once the heads have enough positions to go through.
    if (total - first) * nh >= 4096 {
        out.par_chunks_mut(hd)
            .enumerate()
            .for_each(|(h, o)| head(h, o));
    } else {
        for (h, o) in out.chunks_mut(hd).enumerate() {
            head(h, o);
        }
    }
    drop((ks, vs));
    Ok(())
}

/// Which positions each row of a segment's attention scores sees, and how its scores
/// are turned into weights, for [`masked_softmax`].
struct ScoreRows<'a> {
    /// Rows of the segment.
    seq: usize,
    /// The segment's first position (the cache held this many before it).
    first: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    sinks: Option<&'a [f32]>,
}

/// The attention weights of a segment's raw scores (`[kv_heads, n_rep * seq, positions]`,
/// query `q·k` products), in one pass per row on the CPU: scaled, capped, softmax over
/// the positions the row sees (itself and those before, within a window) with the
/// head's sink, zero elsewhere. The tensor ops it replaces (scale, mask, softmax: a
/// pass through memory each, the exponentials one at a time through libm) made
/// attention most of a prompt's cost after a long cached history (a conversation's
/// next turn). Measured on SmolLM2-135M (Q4_1, 2 cores), 83 prompt rows after 1,354
/// cached positions through the 30 blocks: 257 ms with the tensor ops, 172 ms with
/// this; 90 ms after no history. What is left is the two products, at ~100 GFLOP/s.
fn masked_softmax(att: &Tensor, r: &ScoreRows) -> Result<Tensor> {
    use rayon::prelude::*;
    let (groups, rows, total) = att.dims3()?;
    let mut x = att.flatten_all()?.to_vec1::<f32>()?;
    x.par_chunks_mut(total).enumerate().for_each(|(n, row)| {
        // Compiled for AVX2 where the CPU has it.
        crate::kernels::with_vector_isa(
            #[inline(always)]
            || softmax_row(n, row, r),
        )
    });
    Ok(Tensor::from_vec(x, (groups, rows, total), att.device())?)
}

/// Row `n` of [`masked_softmax`], in place: loops without a dependence from one
/// element to the next (sums and maxima in eight lanes), so they compile to vector code.
#[inline(always)]
fn softmax_row(n: usize, row: &mut [f32], r: &ScoreRows) {
    let (i, head) = (n % r.seq, n / r.seq);
    let last = r.first + i;
    let lo = r.window.map_or(0, |w| (last + 1).saturating_sub(w));
    row[last + 1..].fill(0.0);
    row[..lo].fill(0.0);
    let seen = &mut row[lo..=last];
    for s in seen.iter_mut() {
        *s *= r.scale;
    }
    if let Some(c) = r.softcap {
        for s in seen.iter_mut() {
            *s = c * (*s / c).tanh();
        }
    }
    let sink = r.sinks.map(|s| s[head]);
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
/// x86-64): with it the forward measured in [`masked_softmax`] took 205 ms, with this
/// 172 ms. Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2, a degree-6 Taylor
/// polynomial for e^r, and 2^n put in the exponent's bits; below -87 (where e^x is
/// under f32's least normal) it gives e^-87. Decode steps use it too, so a position's
/// numbers do not depend on whether it came in a prompt or a step more than the
/// products' order makes them.
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

/// One KV head's cached positions, `first..total` of them seen.
struct Positions<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    width: usize,
    first: usize,
    total: usize,
}

/// One query head's attention over `at`, added into `out` (zeroed by the caller): plain
/// loops, inlined into the caller's instruction set (an iterator's `fold` stayed a
/// function of its own, compiled for the baseline: measured, a third of a server's
/// time in a batched decode went to the scores' loop left that way).
#[inline(always)]
fn attend(
    query: &[f32],
    at: &Positions,
    scale: f32,
    softcap: Option<f32>,
    sink: Option<f32>,
    out: &mut [f32],
) {
    let hd = at.width;
    let mut scores = Vec::with_capacity(at.total - at.first);
    let mut max = f32::NEG_INFINITY;
    for t in at.first..at.total {
        let s = dot(query, &at.keys[t * hd..(t + 1) * hd]) * scale;
        let s = match softcap {
            Some(c) => c * (s / c).tanh(),
            None => s,
        };
        max = max.max(s);
        scores.push(s);
    }
    if let Some(s) = sink {
        max = max.max(s);
    }
    let mut sum = sink.map_or(0.0, |s| exp_at_most_zero(s - max));
    for s in scores.iter_mut() {
        *s = exp_at_most_zero(*s - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    for (i, &p) in scores.iter().enumerate() {
        let p = p * inv;
        let t = at.first + i;
        let row = &at.values[t * hd..(t + 1) * hd];
        for (o, v) in out.iter_mut().zip(row) {
            *o += p * v;
        }
    }
}

/// Dot product in eight independent lanes (which the compiler turns into vector code).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rope factors of a segment's rows as plain numbers (`[seq, freqs]` each, row after
/// row), for [`Span::decode_batch`].
#[derive(Clone)]
pub(super) struct RopeRows {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
}

impl RopeRows {
    /// Row `i`'s cos and sin factors.
    fn row(&self, i: usize, freqs: usize) -> (&[f32], &[f32]) {
        (
            &self.cos[i * freqs..(i + 1) * freqs],
            &self.sin[i * freqs..(i + 1) * freqs],
        )
    }
}

/// One session's rows in a batch: how many, and their rope tables and causal mask.
pub(super) struct Segment {
    /// For a segment computed row by row (a decode step, or the short run of a verify
    /// step: `Span::row_by_row`), its rope factors as plain numbers.
    pub(super) rows: Option<RopeRows>,
    /// Rope tables and window mask of the sliding-window layers, for models with them.
    pub(super) local: Option<LocalRope>,
    pub(super) seq: usize,
    /// The session's longest sequence, which caps its cache's growth.
    pub(super) max_len: usize,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) mask: Option<Tensor>,
}

/// The sliding-window layers' rope tables and mask for one segment.
pub(super) struct LocalRope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// `[seq, pos + seq]`, the window applied; `None` where the decode path, which
    /// applies the window itself, takes the row.
    pub(super) mask: Option<Tensor>,
    /// For a segment computed row by row, its local rope factors as plain numbers.
    pub(super) rows: Option<RopeRows>,
}

/// `[seq, pos + seq]`: 0 where query `i` (at position `pos + i`) may see key `j`,
/// minus infinity where `j` lies in its future or, with a `window`, `window` or more
/// positions back.
pub(super) fn causal_mask(
    seq: usize,
    pos: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = pos + seq;
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                let seen = j <= pos + i && window.is_none_or(|w| pos + i - j < w);
                if seen {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (seq, total), device)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Rows see themselves and the positions before them (within a window), and their
    /// weights are those of a plain softmax.
    #[test]
    fn masked_softmax_weighs_the_positions_each_row_sees() -> Result<()> {
        let (seq, first, total) = (3, 2, 5);
        let raw: Vec<f32> = (0..2 * seq * total).map(|i| (i % 7) as f32 * 0.3).collect();
        let att = Tensor::from_vec(raw.clone(), (1, 2 * seq, total), &Device::Cpu)?;
        for window in [None, Some(2)] {
            let rows = ScoreRows {
                seq,
                first,
                window,
                scale: 0.5,
                softcap: None,
                sinks: None,
            };
            let got = masked_softmax(&att, &rows)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (n, row) in got.chunks(total).enumerate() {
                let last = first + n % seq;
                let lo = window.map_or(0, |w| last + 1 - w.min(last + 1));
                let scores: Vec<f32> = (lo..=last).map(|j| raw[n * total + j] * 0.5).collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, &w) in row.iter().enumerate() {
                    let want = if (lo..=last).contains(&j) {
                        (raw[n * total + j] * 0.5 - max).exp() / sum
                    } else {
                        0.0
                    };
                    assert!(
                        (w - want).abs() < 1e-6,
                        "row {n} position {j}: {w} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }
}
