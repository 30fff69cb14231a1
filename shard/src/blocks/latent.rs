//! DeepSeek's multi-head latent attention (see [`crate::Latent`]), as llama.cpp's MLA
//! path computes it:
//!
//! ```text
//! q      = Wq · h   or   Wq_b · rms(Wq_a · h)          per head: [q_nope ; q_rope]
//! [c ; k_rope] = Wkv_a · h,   c = rms(c)               one per token, shared by heads
//! cached row   = [c ; rope(k_rope)]
//! head h:  query = [W_kb[h]ᵀ q_nope ; rope(q_rope)]    scored against every cached row
//!          out   = W_vb[h] · Σ_t softmax(scale · query · row_t) c_t
//! ```
//!
//! Scoring in the compressed space equals scoring the decompressed keys, since
//! `q_nope · (W_kb[h] c) = (W_kb[h]ᵀ q_nope) · c`; so the cache holds one row of
//! `kv_lora + rope` values per token and block, not a key and a value per head.

use candle_core::{Device, Tensor};

use super::cache::LayerKv;
use super::{Segment, Span};
use crate::file::{Linear, ModelFile};
use crate::{Latent, Result, ShardError};

/// How a block makes its queries.
enum Query {
    /// One matrix (DeepSeek-V2-Lite).
    Direct(Linear),
    /// Through a low-rank bottleneck with a norm: `Wq_b · rms(Wq_a · h)`.
    LowRank { a: Linear, norm: Tensor, b: Linear },
}

/// A block's latent attention weights (its output projection is the block's).
pub(super) struct LatentAttention {
    query: Query,
    /// `[kv_lora + rope, hidden]`: the compressed vector, then the rope key.
    kv_a: Linear,
    kv_norm: Tensor,
    /// Per head, `[nope, kv_lora]`: takes a query's nope part into the compressed space.
    k_b: Tensor,
    /// Per head, `[kv_lora, v]`: takes an attention-weighted compressed vector to the
    /// head's value.
    v_b: Tensor,
    dims: Latent,
}

impl LatentAttention {
    /// Block `i`'s weights, from either layout llama.cpp reads: `attn_k_b` and
    /// `attn_v_b` (files converted for its MLA path), or one `attn_kv_b` (older files).
    pub(super) fn load(file: &ModelFile, i: usize, device: &Device) -> Result<Self> {
        let cfg = file.config();
        let dims = cfg
            .latent
            .clone()
            .ok_or_else(|| ShardError::BadInput("not a latent-attention model".into()))?;
        let p = |n: &str| format!("blk.{i}.{n}");
        let heads = cfg.n_heads;
        let query = if dims.q_lora > 0 {
            Query::LowRank {
                a: file.linear(&p("attn_q_a"), false, device)?,
                norm: file.dense(&p("attn_q_a_norm.weight"), device)?,
                b: file.linear(&p("attn_q_b"), false, device)?,
            }
        } else {
            Query::Direct(file.linear(&p("attn_q"), false, device)?)
        };
        let shaped = |t: Tensor, want: [usize; 3], name: &str| -> Result<Tensor> {
            if t.dims() != want {
                return Err(ShardError::BadInput(format!(
                    "{name} has shape {:?}, expected {want:?}",
                    t.dims()
                )));
            }
            Ok(t)
        };
        let (k_b, v_b) = if file.has(&p("attn_k_b.weight")) {
            let k = file.dense(&p("attn_k_b.weight"), device)?;
            let v = file.dense(&p("attn_v_b.weight"), device)?;
            let k = shaped(k, [heads, dims.kv_lora, dims.nope], "attn_k_b")?;
            let v = shaped(v, [heads, dims.v, dims.kv_lora], "attn_v_b")?;
            (k.transpose(1, 2)?, v.transpose(1, 2)?)
        } else {
            // Per head, the key's rows then the value's.
            let kv = file.dense(&p("attn_kv_b.weight"), device)?;
            let width = dims.nope + dims.v;
            let kv = kv.reshape((heads, width, dims.kv_lora)).map_err(|_| {
                ShardError::BadInput(format!(
                    "attn_kv_b of block {i} has shape {:?}, expected [{}, {}]",
                    kv.dims(),
                    heads * width,
                    dims.kv_lora
                ))
            })?;
            (
                kv.narrow(1, 0, dims.nope)?,
                kv.narrow(1, dims.nope, dims.v)?.transpose(1, 2)?,
            )
        };
        Ok(LatentAttention {
            query,
            kv_a: file.linear(&p("attn_kv_a_mqa"), false, device)?,
            kv_norm: file.dense(&p("attn_kv_a_norm.weight"), device)?,
            k_b: k_b.contiguous()?,
            v_b: v_b.contiguous()?,
            dims,
        })
    }

    /// True when a row's projections do not depend on the other rows of its batch.
    /// The per-head products with `W_kb` and `W_vb` run on candle's batched matmul,
    /// whose rounding depends on the batch; so not.
    pub(super) fn is_row_exact(&self) -> bool {
        false
    }

    /// Queries (`[rows, heads * (nope + rope)]`) and compressed rows (`[rows, kv_lora +
    /// rope]`, the compressed part normalised, rope not yet applied) of `h`.
    pub(super) fn project(&self, h: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let q = match &self.query {
            Query::Direct(q) => q.forward(h)?,
            Query::LowRank { a, norm, b } => {
                b.forward(&candle_nn::ops::rms_norm(&a.forward(h)?, norm, eps)?)?
            }
        };
        let kv = self.kv_a.forward(h)?;
        let c = kv.narrow(1, 0, self.dims.kv_lora)?.contiguous()?;
        let c = candle_nn::ops::rms_norm(&c, &self.kv_norm, eps)?;
        let rope = kv.narrow(1, self.dims.kv_lora, kv.dim(1)? - self.dims.kv_lora)?;
        Ok((q, Tensor::cat(&[&c, &rope], 1)?))
    }
}

impl Span {
    /// Latent attention of one segment's queries and compressed rows (from
    /// [`LatentAttention::project`]) over its cache, which it extends:
    /// `[seq, heads * v]`.
    pub(super) fn latent_attention(
        &self,
        a: &LatentAttention,
        q: Tensor,
        rows: Tensor,
        seg: &Segment,
        kv: &mut Option<LayerKv>,
    ) -> Result<Tensor> {
        let (seq, heads) = (seg.seq, self.config.n_heads);
        let (nope, rope, lora) = (a.dims.nope, self.config.rope_dims, a.dims.kv_lora);
        // [seq, heads * (nope + rope)] -> [heads, seq, nope + rope]
        let q = q
            .reshape((seq, heads, nope + rope))?
            .transpose(0, 1)?
            .contiguous()?;
        let q_rope = q.narrow(2, nope, rope)?.contiguous()?.unsqueeze(0)?;
        let q_rope = self.rope(&q_rope, &seg.cos, &seg.sin)?.squeeze(0)?;
        // Each head's nope part into the compressed space: [heads, seq, kv_lora].
        let q_lat = q.narrow(2, 0, nope)?.contiguous()?.matmul(&a.k_b)?;
        let query = Tensor::cat(&[&q_lat, &q_rope], 2)?;
        // The rows' rope keys turned, then the rows cached.
        let k_rope = rows
            .narrow(1, lora, rope)?
            .contiguous()?
            .reshape((1, 1, seq, rope))?;
        let k_rope = self
            .rope(&k_rope, &seg.cos, &seg.sin)?
            .reshape((seq, rope))?;
        let rows = Tensor::cat(&[&rows.narrow(1, 0, lora)?, &k_rope], 1)?.unsqueeze(0)?;
        let keys = LayerKv::append_keys(kv, &rows, seg.max_len)?;
        let total = keys.dim(1)?;
        // One key row for every head: [1, heads * seq, width] against [1, total, width].
        let width = lora + rope;
        let scale = self
            .config
            .attn_scale
            .unwrap_or(1.0 / (self.config.head_dim as f32).sqrt());
        let query = query.reshape((1, heads * seq, width))?;
        let att = (query.matmul(&keys.t()?)? * scale as f64)?;
        let att = match &seg.mask {
            Some(m) => att
                .reshape((heads, seq, total))?
                .broadcast_add(m)?
                .reshape((1, heads * seq, total))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        // The compressed rows are the values; each head takes its sum out through W_vb.
        let out = att.matmul(&keys.narrow(2, 0, lora)?.contiguous()?)?;
        let out = out.reshape((heads, seq, lora))?.matmul(&a.v_b)?;
        Ok(out.transpose(0, 1)?.reshape((seq, heads * a.dims.v))?)
    }
}
