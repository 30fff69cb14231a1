//! A span of transformer blocks and its per-session KV cache.
//!
//! The math of one Llama-family block (as in the Llama paper and Hugging Face's
//! `modeling_llama.py`), with the residual connections written out:
//!
//! ```text
//! h   = x + Wo · attention(rope(Wq · rms(x)), rope(Wk · rms(x)), Wv · rms(x))
//! out = h + ffn(rms(h))
//! ```
//!
//! Qwen3 normalises each query and key head (RMSNorm over the head) before rope; `ffn`
//! is one MLP or a mixture of experts ([`ffn`]).
//!
//! In candle-transformers' order: [`cache`] (a session's keys and values), [`attention`],
//! [`ffn`] (MLP or experts), and here the block and the span (`load`, `forward`).
//!
//! Hidden states are `[tokens, hidden]` f32 tensors for one sequence; the position of
//! the first token is the cache's length, so a span cannot be fed out of order.

use candle_core::{DType, Device, Tensor};

mod attention;
mod cache;
mod ffn;
mod latent;

pub use cache::KvCache;

use attention::{causal_mask, LocalRope, RopeRows, Segment};
use cache::LayerKv;
use ffn::{Ffn, Projection};
use latent::LatentAttention;

use crate::file::{Linear, ModelFile};
use crate::{ModelConfig, Result, ShardError};

/// How a block makes its queries, keys and values.
enum Attn {
    /// Projections to query, key and value heads.
    Heads {
        /// Wq, Wk, Wv.
        qkv: Projection,
        /// Per-head RMSNorm weights of queries and keys (Qwen3, Gemma 3).
        qk_norm: Option<(Tensor, Tensor)>,
    },
    /// Multi-head latent attention (DeepSeek).
    Latent(LatentAttention),
}

impl Attn {
    fn is_row_exact(&self) -> bool {
        match self {
            Attn::Heads { qkv, .. } => qkv.is_row_exact(),
            Attn::Latent(l) => l.is_row_exact(),
        }
    }
}

/// One transformer block's weights.
struct Block {
    attn_norm: Tensor,
    attn: Attn,
    wo: Linear,
    ffn_norm: Tensor,
    ffn: Ffn,
    /// RMSNorm weights applied to the attention's and the MLP's outputs before they
    /// join the residual stream (Gemma).
    post_norms: Option<(Tensor, Tensor)>,
    /// True when this layer attends over the sliding window only (with its own rope).
    local: bool,
    /// Per query head, the learned logit that joins every softmax (gpt-oss).
    sinks: Option<Vec<f32>>,
}

/// Rows of a segment continuing a sequence that are computed one at a time (see
/// `Span::rows_one_by_one`); a longer segment is a prompt chunk, computed as one.
pub(crate) const ROWS_ONE_BY_ONE: usize = 32;

/// The blocks `[start, end)` of a model, loaded and ready to run.
pub struct Span {
    start: usize,
    end: usize,
    blocks: Vec<Block>,
    config: ModelConfig,
    /// Rope frequencies per pair, Llama 3.1 scaling already applied.
    inv_freq: Vec<f32>,
    /// What cos and sin are multiplied by (YaRN's magnitude correction; else 1).
    rope_mscale: f32,
    /// The sliding-window layers' own rope frequencies (unscaled), for models whose
    /// local layers rope differently from the global ones.
    local_rope: Option<Vec<f32>>,
    device: Device,
    /// The type the blocks compute in (see [`crate::device::compute_dtype`]); inputs
    /// are cast to it and outputs back to f32.
    dtype: DType,
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Span({}..{} of {})",
            self.start, self.end, self.config.name
        )
    }
}

impl Span {
    /// Loads blocks `[start, end)`; `progress(done, total)` is called after each block.
    pub fn load(
        file: &ModelFile,
        start: usize,
        end: usize,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Span> {
        let cfg = file.config().clone();
        if start >= end || end > cfg.n_layers {
            return Err(ShardError::BadSpan {
                start,
                end,
                blocks: cfg.n_layers,
            });
        }
        let mut blocks = Vec::with_capacity(end - start);
        for i in start..end {
            let p = |n: &str| format!("blk.{i}.{n}");
            let attn = if cfg.latent.is_some() {
                Attn::Latent(LatentAttention::load(file, i, device)?)
            } else {
                let qkv = if cfg.arch.fused() {
                    let kv = cfg.n_kv_heads * cfg.head_dim;
                    Projection::split(
                        file.linear(&p("attn_qkv"), cfg.qkv_bias, device)?,
                        vec![cfg.n_heads * cfg.head_dim, kv, kv],
                    )?
                } else {
                    Projection::new(vec![
                        file.linear(&p("attn_q"), cfg.qkv_bias, device)?,
                        file.linear(&p("attn_k"), cfg.qkv_bias, device)?,
                        file.linear(&p("attn_v"), cfg.qkv_bias, device)?,
                    ])?
                };
                let qk_norm = if cfg.arch.qk_norm() {
                    Some((
                        file.dense(&p("attn_q_norm.weight"), device)?,
                        file.dense(&p("attn_k_norm.weight"), device)?,
                    ))
                } else {
                    None
                };
                Attn::Heads { qkv, qk_norm }
            };
            let block = Block {
                attn_norm: file.dense(&p("attn_norm.weight"), device)?,
                attn,
                wo: file.linear(&p("attn_output"), cfg.attn_output_bias, device)?,
                // gpt-oss and GLM-4.5 name their MLP's norm for the attention it
                // follows.
                ffn_norm: file.dense(
                    &p(
                        if matches!(cfg.arch, crate::Arch::GptOss | crate::Arch::Glm4Moe) {
                            "post_attention_norm.weight"
                        } else {
                            "ffn_norm.weight"
                        },
                    ),
                    device,
                )?,
                ffn: Ffn::load(file, i, device)?,
                post_norms: if cfg.arch.gemma() {
                    Some((
                        file.dense(&p("post_attention_norm.weight"), device)?,
                        file.dense(&p("post_ffw_norm.weight"), device)?,
                    ))
                } else {
                    None
                },
                local: cfg.sliding_window.as_ref().is_some_and(|w| w.is_local(i)),
                sinks: if cfg.attn_sinks {
                    let s = file.dense(&p("attn_sinks.weight"), &Device::Cpu)?;
                    Some(s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                } else {
                    None
                },
            };
            blocks.push(block);
            // Block by block, not once at the end: the file's pages read for a block
            // count as this process's memory until released, and a span's worth of
            // them on top of its copies doubled the peak (8 blocks of an 8B Q4_0
            // model: 2.02 GB peak for 1.07 GB resident after).
            file.release_pages();
            progress(i + 1 - start, end - start);
        }
        let freqs = |theta: f32, scale: f32| -> Vec<f32> {
            (0..cfg.rope_dims / 2)
                .map(|j| {
                    let f = 1.0 / theta.powf(2.0 * j as f32 / cfg.rope_dims as f32) / scale;
                    match &cfg.rope_freq_factors {
                        Some(div) => f / div[j],
                        None => f,
                    }
                })
                .collect()
        };
        let mut inv_freq = freqs(cfg.rope_theta, cfg.rope_scale);
        let mut rope_mscale = 1.0;
        if let Some(yarn) = &cfg.yarn {
            let (per_pair, mscale) = yarn.scales(cfg.rope_dims, cfg.rope_theta);
            for (f, s) in inv_freq.iter_mut().zip(per_pair) {
                *f *= s;
            }
            rope_mscale = mscale;
        }
        // Local layers with their own unscaled base (llama.cpp's
        // rope_freq_base_train_swa / rope_freq_scale_train_swa for Gemma 3); the others
        // share the global rope's tables.
        let local_rope = cfg
            .sliding_window
            .as_ref()
            .and_then(|w| w.local_rope_theta)
            .map(|theta| freqs(theta, 1.0));
        // The norms load in the compute type (dense tensors, like the weights of a
        // safetensors checkpoint; f32 for GGUF).
        let dtype = blocks.first().map_or(DType::F32, |b| b.attn_norm.dtype());
        Ok(Span {
            start,
            end,
            blocks,
            config: cfg,
            inv_freq,
            rope_mscale,
            local_rope,
            device: device.clone(),
            dtype,
        })
    }

    /// First block.
    pub fn start(&self) -> usize {
        self.start
    }
    /// One past the last block.
    pub fn end(&self) -> usize {
        self.end
    }
    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// The type its blocks compute in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for one session over the whole span, of at most `max_len` tokens.
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache {
            start: self.start,
            layers: (self.start..self.end).map(|_| None).collect(),
            len: 0,
            max_len,
        }
    }

    /// An empty cache for a session that runs only blocks `[start, end)` of this span.
    pub fn new_cache_for(&self, start: usize, end: usize, max_len: usize) -> Result<KvCache> {
        if start >= end || start < self.start || end > self.end {
            return Err(ShardError::BadSpan {
                start,
                end,
                blocks: self.config.n_layers,
            });
        }
        Ok(KvCache {
            start,
            layers: (start..end).map(|_| None).collect(),
            len: 0,
            max_len,
        })
    }

    /// Runs a throw-away token through every block, so quantised weights are repacked
    /// now (candle does it on first use) and not on a user's first token.
    pub fn warm_up(&self) -> Result<()> {
        let mut cache = self.new_cache(1);
        let x = Tensor::zeros((1, self.config.hidden), DType::F32, &self.device)?;
        self.forward(&x, &mut cache)?;
        Ok(())
    }

    /// Runs `x` (`[tokens, hidden]`, positions `cache.len()..`) through the span,
    /// appending to the cache. Returns the output hidden states, same shape.
    pub fn forward(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let mut out = self.forward_batch(vec![(x, cache)])?;
        out.pop()
            .ok_or_else(|| ShardError::BadInput("no output".into()))
    }

    /// [`Span::forward`], also returning for each row how close its routing came to a
    /// tie: the smallest gap, over the span's mixture-of-experts blocks, between the
    /// router logits of the last expert chosen and the first left out (infinity without
    /// experts). Two correct implementations may route a row differently where this is
    /// within their rounding, as they may pick different tokens at near-equal logits;
    /// comparisons with another implementation use it to tell such rows apart.
    pub fn forward_traced(&self, x: &Tensor, cache: &mut KvCache) -> Result<(Tensor, Vec<f32>)> {
        let mut margins = vec![f32::INFINITY; x.dim(0)?];
        let mut out = crate::kernels::on_pool(|| {
            self.forward_batch_on_pool(vec![(x, cache)], Some(&mut margins))
        })?;
        let out = out
            .pop()
            .ok_or_else(|| ShardError::BadInput("no output".into()))?;
        Ok((out, margins))
    }

    /// True when [`Span::forward_batch`] gives each session bit for bit what
    /// [`Span::forward`] gives it alone: every weight runs on our kernels. Otherwise
    /// (dense safetensors weights on candle's matmul) a batch changes the rounding, and a
    /// server that must replay a session exactly after a failover should not batch.
    pub fn batches_exactly(&self) -> bool {
        self.blocks
            .iter()
            .all(|b| b.attn.is_row_exact() && b.wo.is_row_exact() && b.ffn.is_row_exact())
    }

    /// Runs several sessions' inputs through the span as one batch: the rows of all of
    /// them go through each weight matrix together (each weight block is read once for
    /// all), and each session attends over its own cache. Outputs come in input order
    /// and equal what [`Span::forward`] gives each alone (exactly when
    /// [`Span::batches_exactly`], to rounding otherwise). Every cache must cover the same
    /// blocks.
    pub fn forward_batch(&self, items: Vec<(&Tensor, &mut KvCache)>) -> Result<Vec<Tensor>> {
        crate::kernels::on_pool(|| self.forward_batch_on_pool(items, None))
    }

    /// True when `x` is a short run of rows continuing a sequence (a verify step of
    /// speculative decoding, at most [`ROWS_ONE_BY_ONE`] rows). Such a run must give
    /// each row exactly what a decode step gives its token: computed as one segment,
    /// attention and the rest sum in other orders, and measured on the default model
    /// the rows drifted from one-token steps by up to a few units of the hidden state
    /// over 30 blocks, enough to turn a near-tie, so greedy text would change.
    fn continues_in_short_run(&self, x: &Tensor, cache: &KvCache) -> bool {
        let rows = x.dims().first().copied().unwrap_or(0);
        cache.len > 0 && (2..=ROWS_ONE_BY_ONE).contains(&rows)
    }

    /// True when a short run goes through the batch with its rows' projections
    /// together and its attention row after row ([`Span::decode_batch`]), each row's
    /// numbers those of a decode step: every weight on our row-exact kernels, and
    /// attention of query heads over a cache in plain Rust. Otherwise (latent
    /// attention, candle's matmuls, a GPU) the run is computed one row at a time,
    /// through the whole span per row.
    fn verifies_in_one_pass(&self) -> bool {
        self.attends_in_rust()
            && self.batches_exactly()
            && self
                .blocks
                .iter()
                .all(|b| matches!(b.attn, Attn::Heads { .. }))
    }

    /// True when a segment's attention takes a mask: tensor products (a GPU, f16) or
    /// latent attention do; [`kernels::attend`](crate::kernels::attend), which runs every
    /// other attention on the CPU, sees to the causal order and windows itself.
    fn needs_masks(&self) -> bool {
        !self.attends_in_rust()
            || self
                .blocks
                .iter()
                .any(|b| matches!(b.attn, Attn::Latent(_)))
    }

    /// True when the segment `x` is computed row by row within the batch.
    fn row_by_row(&self, x: &Tensor, cache: &KvCache) -> bool {
        let rows = x.dims().first().copied().unwrap_or(0);
        rows == 1 || (self.continues_in_short_run(x, cache) && self.verifies_in_one_pass())
    }

    /// True when the segment `x` must run alone, one row at a time through the span.
    fn rows_one_by_one(&self, x: &Tensor, cache: &KvCache) -> bool {
        self.continues_in_short_run(x, cache) && !self.verifies_in_one_pass()
    }

    fn forward_batch_on_pool(
        &self,
        mut items: Vec<(&Tensor, &mut KvCache)>,
        mut margins: Option<&mut Vec<f32>>,
    ) -> Result<Vec<Tensor>> {
        if margins.is_none() && items.iter().any(|(x, c)| self.rows_one_by_one(x, c)) {
            // Those go row by row; the rest as one batch; outputs in input order.
            let mut outputs: Vec<Option<Tensor>> = vec![None; items.len()];
            let (mut batch, mut batch_at, mut one_by_one) = (Vec::new(), Vec::new(), Vec::new());
            for (i, (x, c)) in items.into_iter().enumerate() {
                if self.rows_one_by_one(x, c) {
                    one_by_one.push((i, x, c));
                } else {
                    batch_at.push(i);
                    batch.push((x, c));
                }
            }
            let outs = self.forward_batch_on_pool(batch, None)?;
            for (i, o) in batch_at.into_iter().zip(outs) {
                outputs[i] = Some(o);
            }
            for (i, x, cache) in one_by_one {
                let mut rows = Vec::with_capacity(x.dim(0)?);
                for r in 0..x.dim(0)? {
                    let row = x.narrow(0, r, 1)?;
                    let mut out = self.forward_batch_on_pool(vec![(&row, &mut *cache)], None)?;
                    rows.push(
                        out.pop()
                            .ok_or_else(|| ShardError::BadInput("no output".into()))?,
                    );
                }
                outputs[i] = Some(Tensor::cat(&rows, 0)?);
            }
            return outputs
                .into_iter()
                .map(|o| o.ok_or_else(|| ShardError::BadInput("no output".into())))
                .collect();
        }
        let Some((_, first_cache)) = items.first() else {
            return Ok(Vec::new());
        };
        let (first, last) = first_cache.blocks();
        if first < self.start || last > self.end {
            return Err(ShardError::BadInput("cache belongs to another span".into()));
        }
        let mut segments = Vec::with_capacity(items.len());
        let mut xs = Vec::with_capacity(items.len());
        for (x, cache) in &items {
            let (seq, hidden) = x.dims2().map_err(|_| {
                ShardError::BadInput(format!("hidden states of shape {:?}", x.dims()))
            })?;
            if hidden != self.config.hidden || seq == 0 {
                return Err(ShardError::BadInput(format!(
                    "hidden states of shape [{seq}, {hidden}], expected [tokens >= 1, {}]",
                    self.config.hidden
                )));
            }
            if cache.blocks() != (first, last) {
                return Err(ShardError::BadInput(
                    "a batch's caches must cover the same blocks".into(),
                ));
            }
            let pos = cache.len;
            if pos + seq > cache.max_len {
                return Err(ShardError::TooLong {
                    len: pos + seq,
                    max: cache.max_len,
                });
            }
            let row_by_row = self.row_by_row(x, cache);
            let (cos, sin, rows) =
                self.rope_tables(&self.inv_freq, self.rope_mscale, pos, seq, row_by_row)?;
            let local = match &self.config.sliding_window {
                Some(w) => {
                    let (cos, sin, rows) = match &self.local_rope {
                        Some(freqs) => self.rope_tables(freqs, 1.0, pos, seq, row_by_row)?,
                        None => (cos.clone(), sin.clone(), rows.clone()),
                    };
                    // The CPU's attention applies the window itself.
                    let mask = if !self.needs_masks() {
                        None
                    } else {
                        let m = causal_mask(seq, pos, Some(w.size), &self.device)?;
                        Some(m.to_dtype(self.dtype)?)
                    };
                    Some(LocalRope {
                        cos,
                        sin,
                        mask,
                        rows,
                    })
                }
                None => None,
            };
            let mask = if seq > 1 && self.needs_masks() {
                Some(causal_mask(seq, pos, None, &self.device)?.to_dtype(self.dtype)?)
            } else {
                None
            };
            segments.push(Segment {
                seq,
                max_len: cache.max_len,
                rows,
                cos,
                sin,
                mask,
                local,
            });
            xs.push(x.to_dtype(self.dtype)?.to_device(&self.device)?);
        }
        let blocks = &self.blocks[first - self.start..last - self.start];
        let mut x = if xs.len() == 1 {
            xs.swap_remove(0)
        } else {
            Tensor::cat(&xs, 0)?
        };
        for (j, block) in blocks.iter().enumerate() {
            let mut kvs: Vec<&mut Option<LayerKv>> =
                items.iter_mut().map(|(_, c)| &mut c.layers[j]).collect();
            x = self.block_forward(block, &x, &segments, &mut kvs, margins.as_deref_mut())?;
        }
        let x = x.to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(items.len());
        let mut row = 0;
        for ((_, cache), seg) in items.iter_mut().zip(&segments) {
            cache.len += seg.seq;
            out.push(if segments.len() == 1 {
                x.clone()
            } else {
                x.narrow(0, row, seg.seq)?
            });
            row += seg.seq;
        }
        Ok(out)
    }

    /// Rope tables for positions `pos..pos + seq`, `[seq, freqs]` each (times `mscale`),
    /// and for a segment computed row by row the same numbers as plain rows too (for
    /// [`Span::decode_batch`]).
    fn rope_tables(
        &self,
        inv_freq: &[f32],
        mscale: f32,
        pos: usize,
        seq: usize,
        row_by_row: bool,
    ) -> Result<(Tensor, Tensor, Option<RopeRows>)> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for t in pos..pos + seq {
            for f in inv_freq {
                let a = t as f32 * f;
                cos.push(a.cos() * mscale);
                sin.push(a.sin() * mscale);
            }
        }
        let rows = row_by_row.then(|| RopeRows {
            cos: cos.clone(),
            sin: sin.clone(),
        });
        Ok((
            Tensor::from_vec(cos, (seq, half), &self.device)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, (seq, half), &self.device)?.to_dtype(self.dtype)?,
            rows,
        ))
    }

    /// One block over the rows of every segment: projections and MLP on all rows at
    /// once, attention per segment over its own cache.
    fn block_forward(
        &self,
        b: &Block,
        x: &Tensor,
        segments: &[Segment],
        kvs: &mut [&mut Option<LayerKv>],
        margins: Option<&mut Vec<f32>>,
    ) -> Result<Tensor> {
        let eps = self.config.rms_eps as f32;

        // Attention.
        let h = candle_nn::ops::rms_norm(x, &b.attn_norm, eps)?;
        // Projections over every row; attention per segment, over its own cache.
        let o = match &b.attn {
            Attn::Heads { qkv, qk_norm } => {
                let [q, k, v]: [Tensor; 3] = qkv
                    .forward(&h)?
                    .try_into()
                    .map_err(|_| ShardError::BadInput("q, k and v projections".into()))?;
                let (q, k) = match qk_norm {
                    Some((qn, kn)) => {
                        let hd = self.config.head_dim;
                        let per_head = |t: Tensor, w: &Tensor| -> candle_core::Result<Tensor> {
                            let (rows, width) = t.dims2()?;
                            let t = t.contiguous()?.reshape((rows, width / hd, hd))?;
                            candle_nn::ops::rms_norm(&t, w, eps)?.reshape((rows, width))
                        };
                        (per_head(q, qn)?, per_head(k, kn)?)
                    }
                    None => (q, k),
                };
                if self.decodes_batch_in_rust(segments) {
                    self.decode_batch(&q, &k, &v, segments, kvs, b)?
                } else {
                    per_segment(segments, kvs, &[q, k, v], |[q, k, v], seg, kv| {
                        if seg.seq > 1 && self.decodes_batch_in_rust(std::slice::from_ref(seg)) {
                            // A verify step's run beside a prompt chunk: still row by row.
                            self.decode_batch(&q, &k, &v, std::slice::from_ref(seg), &mut [kv], b)
                        } else {
                            self.attention(q, k, v, seg, kv, b)
                        }
                    })?
                }
            }
            Attn::Latent(l) => {
                let (q, rows) = l.project(&h, eps)?;
                per_segment(segments, kvs, &[q, rows], |[q, rows], seg, kv| {
                    self.latent_attention(l, q, rows, seg, kv)
                })?
            }
        };
        let mut o = b.wo.forward(&o)?;
        if let Some((after_attention, _)) = &b.post_norms {
            o = candle_nn::ops::rms_norm(&o, after_attention, eps)?;
        }
        let x = (x + o)?;

        // Feed-forward: one MLP or experts.
        let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, eps)?;
        let mut m = b.ffn.forward(&h, margins.map(|m| m.as_mut_slice()))?;
        if let Some((_, after_mlp)) = &b.post_norms {
            m = candle_nn::ops::rms_norm(&m, after_mlp, eps)?;
        }
        Ok((x + m)?)
    }
}

/// Runs `f` on each segment's rows of `parts` (row-aligned tensors of every segment's
/// rows) with its cache, and stacks the outputs in segment order.
fn per_segment<const N: usize>(
    segments: &[Segment],
    kvs: &mut [&mut Option<LayerKv>],
    parts: &[Tensor; N],
    mut f: impl FnMut([Tensor; N], &Segment, &mut Option<LayerKv>) -> Result<Tensor>,
) -> Result<Tensor> {
    if let ([seg], [kv]) = (segments, &mut *kvs) {
        return f(parts.clone(), seg, kv);
    }
    let mut outs = Vec::with_capacity(segments.len());
    let mut row = 0;
    for (seg, kv) in segments.iter().zip(kvs.iter_mut()) {
        let mut cut = Vec::with_capacity(N);
        for t in parts {
            cut.push(t.narrow(0, row, seg.seq)?);
        }
        let cut: [Tensor; N] = cut
            .try_into()
            .map_err(|_| ShardError::BadInput("segment parts".into()))?;
        outs.push(f(cut, seg, kv)?);
        row += seg.seq;
    }
    Ok(Tensor::cat(&outs, 0)?)
}
