//! Attention: rope, and grouped-query attention over a session's cache: on the CPU by
//! [`kernels::attend`], the same numbers for a row however its tokens were grouped;
//! elsewhere by tensor products.

use candle_core::{DType, Device, Tensor};

use super::cache::LayerKv;
use super::{Block, Span};
use crate::kernels::{self, attend::CacheAttention};
use crate::{Result, RopeStyle, ShardError};

impl Span {
    /// True when attention runs in [`kernels::attend`] over caches with their keys
    /// transposed (on the CPU in f32), rather than in tensor products with a mask.
    pub(super) fn attends_in_rust(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
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
    /// On the CPU in f32 every row, a prompt's or a decode step's, goes through
    /// [`kernels::attend`], whose numbers for a row do not depend on how the tokens
    /// were grouped into steps: a conversation's kept session gives exactly a resent
    /// history's answers. (With tensor products for prompts and a loop for decode
    /// steps, a 120-token prompt sent whole and token by token differed by up to 25 in
    /// SmolLM2-135M's last hidden state.) Elsewhere (a GPU, f16) tensor products with a
    /// mask, whose rounding depends on the grouping.
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
        let scale = cfg.attn_scale.unwrap_or(1.0 / (hd as f32).sqrt());
        let cap = cfg.attn_softcap;
        if self.attends_in_rust() {
            LayerKv::append_transposed(kv, &k, &v, seg.max_len)?;
            let q = q.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; seq * nh * hd];
            self.cache_attention(&q, seq, kv, window, sinks, &mut out)?;
            return Ok(Tensor::from_vec(out, (seq, nh * hd), &self.device)?);
        }
        let (k, v) = LayerKv::append(kv, &k, &v, seg.max_len)?;
        let total = k.dim(1)?;
        // Grouped-query attention without copying K/V: the n_rep query heads that share
        // one KV head are stacked along the token axis, [nkv, n_rep * seq, hd].
        let n_rep = nh / nkv;
        let q = q.reshape((nkv, n_rep * seq, hd))?;
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
        self.attends_in_rust() && segments.iter().all(|s| s.rows.is_some())
    }

    /// Attention for a batch of segments computed row by row (`q`, `k`, `v`: `[n, heads
    /// * head_dim]`, the segments' rows in order) in plain Rust: rope, the cache append
    /// and [`kernels::attend`] per row straight from slices, where [`Span::attention`]
    /// runs a few tensor ops per segment and block (measured: most of what 8
    /// concurrent sessions cost beyond the weights' products). The arithmetic is the
    /// general path's (candle's rope formulas, unfused), and a lone decode step comes
    /// here too, so a session's numbers do not depend on its batch. A segment of
    /// several rows (a verify step) appends and attends one row after the other,
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
                LayerKv::append_transposed(kv, &kt, &vt, seg.max_len)?;
                self.cache_attention(qi, 1, kv, window, sinks, oi)?;
            }
        }
        Ok(Tensor::from_vec(out, (n, qw), &self.device)?)
    }

    /// Attention of `q` (`[heads][seq][head_dim]`, rope applied) over the cache in `kv`
    /// (keys transposed), whose last `seq` positions are these rows', by
    /// [`kernels::attend`], into `out` (`[seq][heads * head_dim]`).
    fn cache_attention(
        &self,
        q: &[f32],
        seq: usize,
        kv: &Option<LayerKv>,
        window: Option<usize>,
        sinks: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        let cfg = &self.config;
        let Some(l) = kv.as_ref().filter(|l| l.transposed) else {
            return Err(ShardError::BadInput(
                "attention on the CPU needs a cache with its keys transposed".into(),
            ));
        };
        let Some(v) = &l.v else {
            return Err(ShardError::BadInput(
                "a key-only cache has no values".into(),
            ));
        };
        let (nkv, hd, key_stride) = l.k.dims3()?;
        let value_cap = v.dim(1)?;
        let (ks, kl) = l.k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
            return Err(ShardError::BadInput(
                "cache attention runs on the CPU".into(),
            ));
        };
        let keys_t = &kc.as_slice::<f32>()?[kl.start_offset()..];
        let values = &vc.as_slice::<f32>()?[vl.start_offset()..];
        let call = CacheAttention {
            q,
            keys_t,
            key_stride,
            values,
            value_cap,
            heads: cfg.n_heads,
            kv_heads: nkv,
            head_dim: hd,
            seq,
            total: l.len,
            window,
            scale: cfg.attn_scale.unwrap_or(1.0 / (hd as f32).sqrt()),
            softcap: cfg.attn_softcap,
            sinks,
        };
        kernels::attend::attend(&call, out).map_err(ShardError::BadInput)
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
