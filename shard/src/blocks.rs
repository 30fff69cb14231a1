//! A span of transformer blocks and its per-session KV cache.
//!
//! The math of one Llama-family block (as in the Llama paper and Hugging Face's
//! `modeling_llama.py`), with the residual connections written out:
//!
//! ```text
//! h   = x + Wo · attention(rope(Wq · rms(x)), rope(Wk · rms(x)), Wv · rms(x))
//! out = h + Wdown · (silu(Wgate · rms(h)) * Wup · rms(h))
//! ```
//!
//! Hidden states are `[tokens, hidden]` f32 tensors for one sequence; the position of
//! the first token is the cache's length, so a span cannot be fed out of order.

use candle_core::{DType, Device, Tensor};

use crate::file::{Linear, ModelFile};
use crate::{ModelConfig, Result, RopeStyle, ShardError};

/// One transformer block's weights.
struct Block {
    attn_norm: Tensor,
    /// Wq, Wk, Wv.
    qkv: Projection,
    wo: Linear,
    ffn_norm: Tensor,
    /// Wgate, Wup.
    gate_up: Projection,
    down: Linear,
}

/// Linear layers that read the same input: one stacked product when our kernels run
/// them all (one pass over the input, one hand-out of work to the threads), else one
/// product each.
enum Projection {
    Stacked { linear: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projection {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let refs: Vec<&Linear> = parts.iter().collect();
        Ok(match Linear::stack(&refs) {
            Some(linear) => Projection::Stacked {
                widths: parts
                    .iter()
                    .map(|p| p.out_features())
                    .collect::<candle_core::Result<_>>()?,
                linear,
            },
            None => Projection::Separate(parts),
        })
    }

    fn is_row_exact(&self) -> bool {
        match self {
            Projection::Stacked { linear, .. } => linear.is_row_exact(),
            Projection::Separate(layers) => layers.iter().all(Linear::is_row_exact),
        }
    }

    /// One output per layer, in order.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Projection::Stacked { linear, widths } => {
                let y = linear.forward(x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(candle_core::D::Minus1, at, w);
                        at += w;
                        part
                    })
                    .collect()
            }
            Projection::Separate(layers) => layers.iter().map(|l| l.forward(x)).collect(),
        }
    }
}

/// The keys and values one session has seen, for every block of a span.
#[derive(Debug)]
pub struct KvCache {
    /// First block this cache covers (a session may use a sub-span of a server's span).
    start: usize,
    /// Per block: keys and values.
    layers: Vec<Option<LayerKv>>,
    /// Tokens held (the position of the next token).
    len: usize,
    /// Longest sequence this cache may grow to.
    max_len: usize,
}

impl KvCache {
    /// Tokens held so far: the position the next token will take.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when no token has been seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Longest sequence allowed.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    /// Blocks `[start, end)` this cache covers.
    pub fn blocks(&self) -> (usize, usize) {
        (self.start, self.start + self.layers.len())
    }
    /// Bytes held by keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }
}

/// One block's keys and values for one session: `[kv_heads, capacity, head_dim]`
/// buffers whose first `len` positions are filled. They grow by doubling (up to the
/// session's length), so appending a token copies that token only, where concatenating
/// would copy the whole cache at every step of every block.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// Appends `k` and `v` (`[kv_heads, seq, head_dim]`) to the cache in `slot` (made or
    /// grown as needed, to at most `max_len` positions unless more are needed) and
    /// returns views of everything held, `[kv_heads, len, head_dim]`.
    fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        max_len: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (nkv, seq, hd) = k.dims3()?;
        let (len, cap) = match slot {
            Some(l) => (l.len, l.k.dim(1)?),
            None => (0, 0),
        };
        if len + seq > cap {
            let new_cap = (cap * 2).max(64).min(max_len).max(len + seq);
            let nk = Tensor::zeros((nkv, new_cap, hd), k.dtype(), k.device())?;
            let nv = Tensor::zeros((nkv, new_cap, hd), v.dtype(), v.device())?;
            if let Some(old) = slot.take() {
                if old.len > 0 {
                    nk.slice_set(&old.k.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                    nv.slice_set(&old.v.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                }
            }
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let Some(l) = slot.as_mut() else {
            candle_core::bail!("key/value cache missing");
        };
        l.k.slice_set(&k.contiguous()?, 1, l.len)?;
        l.v.slice_set(&v.contiguous()?, 1, l.len)?;
        l.len += seq;
        Ok((l.k.narrow(1, 0, l.len)?, l.v.narrow(1, 0, l.len)?))
    }
}

/// The blocks `[start, end)` of a model, loaded and ready to run.
pub struct Span {
    start: usize,
    end: usize,
    blocks: Vec<Block>,
    config: ModelConfig,
    /// Rope frequencies per pair, Llama 3.1 scaling already applied.
    inv_freq: Vec<f32>,
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
            let block = Block {
                attn_norm: file.dense(&p("attn_norm.weight"), device)?,
                qkv: Projection::new(vec![
                    file.linear(&p("attn_q"), cfg.qkv_bias, device)?,
                    file.linear(&p("attn_k"), cfg.qkv_bias, device)?,
                    file.linear(&p("attn_v"), cfg.qkv_bias, device)?,
                ])?,
                wo: file.linear(&p("attn_output"), false, device)?,
                ffn_norm: file.dense(&p("ffn_norm.weight"), device)?,
                gate_up: Projection::new(vec![
                    file.linear(&p("ffn_gate"), false, device)?,
                    file.linear(&p("ffn_up"), false, device)?,
                ])?,
                down: file.linear(&p("ffn_down"), false, device)?,
            };
            blocks.push(block);
            // Block by block, not once at the end: the file's pages read for a block
            // count as this process's memory until released, and a span's worth of
            // them on top of its copies doubled the peak (8 blocks of an 8B Q4_0
            // model: 2.02 GB peak for 1.07 GB resident after).
            file.release_pages();
            progress(i + 1 - start, end - start);
        }
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|j| {
                let f = 1.0 / cfg.rope_theta.powf(2.0 * j as f32 / cfg.head_dim as f32);
                match &cfg.rope_freq_factors {
                    Some(div) => f / div[j],
                    None => f,
                }
            })
            .collect();
        // The norms load in the compute type (dense tensors, like the weights of a
        // safetensors checkpoint; f32 for GGUF).
        let dtype = blocks.first().map_or(DType::F32, |b| b.attn_norm.dtype());
        Ok(Span {
            start,
            end,
            blocks,
            config: cfg,
            inv_freq,
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

    /// True when [`Span::forward_batch`] gives each session bit for bit what
    /// [`Span::forward`] gives it alone: every weight runs on our kernels. Otherwise
    /// (dense safetensors weights on candle's matmul) a batch changes the rounding, and a
    /// server that must replay a session exactly after a failover should not batch.
    pub fn batches_exactly(&self) -> bool {
        self.blocks.iter().all(|b| {
            b.qkv.is_row_exact()
                && b.wo.is_row_exact()
                && b.gate_up.is_row_exact()
                && b.down.is_row_exact()
        })
    }

    /// Runs several sessions' inputs through the span as one batch: the rows of all of
    /// them go through each weight matrix together (each weight block is read once for
    /// all), and each session attends over its own cache. Outputs come in input order
    /// and equal what [`Span::forward`] gives each alone (exactly when
    /// [`Span::batches_exactly`], to rounding otherwise). Every cache must cover the same
    /// blocks.
    pub fn forward_batch(&self, items: Vec<(&Tensor, &mut KvCache)>) -> Result<Vec<Tensor>> {
        crate::kernels::on_pool(|| self.forward_batch_on_pool(items))
    }

    fn forward_batch_on_pool(
        &self,
        mut items: Vec<(&Tensor, &mut KvCache)>,
    ) -> Result<Vec<Tensor>> {
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
            let (cos, sin) = self.rope_tables(pos, seq)?;
            let mask = if seq > 1 {
                Some(causal_mask(seq, pos, &self.device)?.to_dtype(self.dtype)?)
            } else {
                None
            };
            segments.push(Segment {
                seq,
                max_len: cache.max_len,
                cos,
                sin,
                mask,
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
            x = self.block_forward(block, &x, &segments, &mut kvs)?;
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

    fn rope_tables(&self, pos: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for t in pos..pos + seq {
            for f in &self.inv_freq {
                let a = t as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, half), &self.device)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, (seq, half), &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
            RopeStyle::Half => candle_nn::rotary_emb::rope(x, cos, sin),
        }
    }

    /// One block over the rows of every segment: projections and MLP on all rows at
    /// once, attention per segment over its own cache.
    fn block_forward(
        &self,
        b: &Block,
        x: &Tensor,
        segments: &[Segment],
        kvs: &mut [&mut Option<LayerKv>],
    ) -> Result<Tensor> {
        let eps = self.config.rms_eps as f32;

        // Attention.
        let h = candle_nn::ops::rms_norm(x, &b.attn_norm, eps)?;
        let [q, k, v]: [Tensor; 3] = b
            .qkv
            .forward(&h)?
            .try_into()
            .map_err(|_| ShardError::BadInput("q, k and v projections".into()))?;
        let o = if segments.len() == 1 {
            self.attention(q, k, v, &segments[0], kvs[0])?
        } else {
            let mut outs = Vec::with_capacity(segments.len());
            let mut row = 0;
            for (seg, kv) in segments.iter().zip(kvs.iter_mut()) {
                let part = |t: &Tensor| t.narrow(0, row, seg.seq);
                outs.push(self.attention(part(&q)?, part(&k)?, part(&v)?, seg, kv)?);
                row += seg.seq;
            }
            Tensor::cat(&outs, 0)?
        };
        let x = (x + b.wo.forward(&o)?)?;

        // MLP (SwiGLU).
        let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, eps)?;
        let [g, u]: [Tensor; 2] = b
            .gate_up
            .forward(&h)?
            .try_into()
            .map_err(|_| ShardError::BadInput("gate and up projections".into()))?;
        let m = b.down.forward(&(candle_nn::ops::silu(&g)? * u)?)?;
        Ok((x + m)?)
    }

    /// Attention of one segment's `q`, `k`, `v` (`[seq, heads * head_dim]`) over its cache,
    /// which it extends: `[seq, heads * head_dim]`.
    fn attention(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        seg: &Segment,
        kv: &mut Option<LayerKv>,
    ) -> Result<Tensor> {
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
        let q = self.rope(&q, &seg.cos, &seg.sin)?;
        let k = self.rope(&k, &seg.cos, &seg.sin)?.squeeze(0)?;
        let (k, v) = LayerKv::append(kv, &k, &v, seg.max_len)?;
        let scale = 1.0 / (hd as f64).sqrt();
        if seq == 1 && q.device().is_cpu() && q.dtype() == DType::F32 {
            if let Some(l) = kv.as_ref() {
                return decode_attention(&q, l, nh / nkv, scale as f32);
            }
        }
        let total = k.dim(1)?;
        // Grouped-query attention without copying K/V: the n_rep query heads that share
        // one KV head are stacked along the token axis, [nkv, n_rep * seq, hd].
        let n_rep = nh / nkv;
        let q = q.reshape((nkv, n_rep * seq, hd))?;
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match &seg.mask {
            Some(m) => att
                .reshape((nkv, n_rep, seq, total))?
                .broadcast_add(m)?
                .reshape((nkv, n_rep * seq, total))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        Ok(att
            .matmul(&v)?
            .reshape((nh, seq, hd))?
            .transpose(0, 1)?
            .reshape((seq, nh * hd))?)
    }
}

/// Attention of one token (`q`: `[1, heads, 1, head_dim]`, rope applied) over a cache,
/// in plain Rust: scores, softmax and the weighted sum straight over the cache's
/// buffers, heads in parallel once the cache is long. For a single token this replaces
/// a dozen tensor ops (two general matmuls among them) per block. `[1, heads * head_dim]`.
fn decode_attention(q: &Tensor, l: &LayerKv, n_rep: usize, scale: f32) -> Result<Tensor> {
    use rayon::prelude::*;
    let (nkv, cap, hd) = l.k.dims3()?;
    let nh = nkv * n_rep;
    let total = l.len;
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let (ks, kl) = l.k.storage_and_layout();
    let (vs, vl) = l.v.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Err(ShardError::BadInput(
            "decode attention runs on the CPU".into(),
        ));
    };
    let keys = &kc.as_slice::<f32>()?[kl.start_offset()..][..nkv * cap * hd];
    let values = &vc.as_slice::<f32>()?[vl.start_offset()..][..nkv * cap * hd];
    let mut out = vec![0f32; nh * hd];
    let head = |h: usize, o: &mut [f32]| {
        let base = (h / n_rep) * cap * hd;
        let qh = &q[h * hd..(h + 1) * hd];
        let mut scores: Vec<f32> = (0..total)
            .map(|t| dot(qh, &keys[base + t * hd..base + (t + 1) * hd]) * scale)
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (t, p) in scores.iter().enumerate() {
            let p = p * inv;
            let row = &values[base + t * hd..base + (t + 1) * hd];
            for (o, v) in o.iter_mut().zip(row) {
                *o += p * v;
            }
        }
    };
    // Splitting pays only once the heads have enough positions to go through.
    if total * nh >= 4096 {
        out.par_chunks_mut(hd)
            .enumerate()
            .for_each(|(h, o)| head(h, o));
    } else {
        for (h, o) in out.chunks_mut(hd).enumerate() {
            head(h, o);
        }
    }
    drop((ks, vs));
    Ok(Tensor::from_vec(out, (1, nh * hd), l.k.device())?)
}

/// Dot product in eight independent lanes (which the compiler turns into vector code).
fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// One session's rows in a batch: how many, and their rope tables and causal mask.
struct Segment {
    seq: usize,
    /// The session's longest sequence, which caps its cache's growth.
    max_len: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

/// `[seq, pos + seq]`: 0 where query `i` (at position `pos + i`) may see key `j`,
/// minus infinity where `j` lies in its future.
fn causal_mask(seq: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = pos + seq;
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (seq, total), device)
}
