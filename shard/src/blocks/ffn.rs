//! A block's feed-forward network: one gated MLP, or a mixture of them (experts).
//!
//! ```text
//! mlp(h) = Wdown · (act(Wgate · h) * Wup · h)      act: SiLU, tanh-GELU (Gemma), or
//!                                                  gpt-oss's clamped swiglu_oai
//! moe(h) = Σ over the k experts e the router ranks highest for h:  s · p_e · mlp_e(h)
//!          (+ mlp_shared(h) where the family has a shared expert)
//!          p = softmax(Wrouter · h + b) over all experts, or sigmoid of each logit;
//!          ranked by p (+ a selection bias: GLM-4.5, DeepSeek-V3), among the experts
//!          of the best groups only (DeepSeek-V3), renormalised over the k chosen
//!          when the family does, scaled by s (GLM-4.5, DeepSeek-V3: 2.5; else 1)
//! ```

use candle_core::{Device, Tensor};

use super::attention::dot;
use crate::file::{Linear, ModelFile};
use crate::{Experts, Result, ShardError};

/// Linear layers that read the same input: one stacked product when our kernels run
/// them all (one pass over the input, one hand-out of work to the threads), else one
/// product each.
pub(super) enum Projection {
    Stacked { linear: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projection {
    /// One layer whose output is several side by side, of these widths (Phi-3's fused
    /// QKV and gate-up matrices).
    pub(super) fn split(linear: Linear, widths: Vec<usize>) -> Result<Self> {
        let total = linear.out_features()?;
        if widths.iter().sum::<usize>() != total {
            return Err(ShardError::BadInput(format!(
                "a fused projection of width {total} cannot split into {widths:?}"
            )));
        }
        Ok(Projection::Stacked { linear, widths })
    }

    pub(super) fn new(parts: Vec<Linear>) -> Result<Self> {
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

    pub(super) fn is_row_exact(&self) -> bool {
        match self {
            Projection::Stacked { linear, .. } => linear.is_row_exact(),
            Projection::Separate(layers) => layers.iter().all(Linear::is_row_exact),
        }
    }

    /// One output per layer, in order.
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
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

/// How a gated MLP combines its gate `g` and up `u` projections.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Activation {
    /// `silu(g) * u` (SwiGLU).
    Silu,
    /// `gelu_tanh(g) * u` (Gemma).
    GeluTanh,
    /// gpt-oss's `swiglu_oai`: `g' = min(g, 7)`, `u' = clamp(u, -7, 7)`,
    /// `g' * sigmoid(1.702 g') * (u' + 1)`.
    SwigluOai,
}

/// A gated MLP.
pub(super) struct Mlp {
    /// Wgate, Wup.
    gate_up: Projection,
    down: Linear,
    activation: Activation,
}

impl Mlp {
    fn new(gate: Linear, up: Linear, down: Linear, activation: Activation) -> Result<Self> {
        Ok(Mlp {
            gate_up: Projection::new(vec![gate, up])?,
            down,
            activation,
        })
    }

    fn is_row_exact(&self) -> bool {
        self.gate_up.is_row_exact() && self.down.is_row_exact()
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let [g, u]: [Tensor; 2] = self
            .gate_up
            .forward(h)?
            .try_into()
            .map_err(|_| ShardError::BadInput("gate and up projections".into()))?;
        let h = match self.activation {
            Activation::Silu => (candle_nn::ops::silu(&g)? * u)?,
            Activation::GeluTanh => (g.gelu()? * u)?,
            Activation::SwigluOai => {
                const LIMIT: f64 = 7.0;
                const ALPHA: f64 = 1.702;
                let g = g.clamp(f64::NEG_INFINITY, LIMIT)?;
                let u = u.clamp(-LIMIT, LIMIT)?;
                let gated = (&g * candle_nn::ops::sigmoid(&(&g * ALPHA)?)?)?;
                (gated * (u + 1.0)?)?
            }
        };
        Ok(self.down.forward(&h)?)
    }
}

/// A block's feed-forward network.
pub(super) enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

impl Ffn {
    /// Loads block `i`'s network: experts when the file has a router for the block
    /// (`ffn_gate_inp`), else one MLP.
    pub(super) fn load(file: &ModelFile, i: usize, device: &Device) -> Result<Self> {
        let p = |n: &str| format!("blk.{i}.{n}");
        let experts =
            (file.config().experts.clone()).filter(|_| file.has(&p("ffn_gate_inp.weight")));
        let cfg = file.config();
        Ok(match experts {
            Some(experts) => Ffn::Moe(Moe::load(file, i, experts, device)?),
            // Phi-3: gate and up in one matrix, gate first.
            None if cfg.arch.fused() => Ffn::Dense(Mlp {
                gate_up: Projection::split(
                    file.linear(&p("ffn_up"), false, device)?,
                    vec![cfg.ffn, cfg.ffn],
                )?,
                down: file.linear(&p("ffn_down"), false, device)?,
                activation: Activation::Silu,
            }),
            None => Ffn::Dense(Mlp::new(
                file.linear(&p("ffn_gate"), false, device)?,
                file.linear(&p("ffn_up"), false, device)?,
                file.linear(&p("ffn_down"), false, device)?,
                if cfg.arch.gemma() {
                    Activation::GeluTanh
                } else {
                    Activation::Silu
                },
            )?),
        })
    }

    pub(super) fn is_row_exact(&self) -> bool {
        match self {
            Ffn::Dense(m) => m.is_row_exact(),
            Ffn::Moe(m) => {
                m.experts.iter().all(Mlp::is_row_exact)
                    && m.shared.as_ref().is_none_or(Mlp::is_row_exact)
            }
        }
    }

    /// `margins`, when given, is lowered for each row to the router's margin in this
    /// block (see [`crate::Span::forward_traced`]).
    pub(super) fn forward(&self, h: &Tensor, margins: Option<&mut [f32]>) -> Result<Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(h),
            Ffn::Moe(m) => m.forward(h, margins),
        }
    }
}

/// A mixture of experts. All of a block's experts live with the block (a server holding
/// the block holds them all), so routing is exact and local.
pub(super) struct Moe {
    /// The router, `[count, hidden]` row-major f32: scored in plain Rust, row by row, so
    /// a row's choice of experts is the same alone or in a batch.
    router: Vec<f32>,
    /// The router's bias, one per expert (gpt-oss).
    router_bias: Option<Vec<f32>>,
    /// Added to the probabilities to choose experts, not to weight them (GLM-4.5's
    /// `exp_probs_b`).
    selection_bias: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    /// The expert every token runs through (GLM-4.5).
    shared: Option<Mlp>,
    config: Experts,
}

impl Moe {
    fn load(file: &ModelFile, i: usize, config: Experts, device: &Device) -> Result<Self> {
        let p = |n: &str| format!("blk.{i}.{n}");
        let router = file
            .dense(&p("ffn_gate_inp.weight"), &Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?;
        let (count, hidden) = router.dims2()?;
        if count != config.count || hidden != file.config().hidden {
            return Err(ShardError::BadInput(format!(
                "block {i}'s router is [{count}, {hidden}], expected [{}, {}]",
                config.count,
                file.config().hidden
            )));
        }
        let router = router.flatten_all()?.to_vec1::<f32>()?;
        let vector = |name: &str| -> Result<Option<Tensor>> {
            if !file.has(name) {
                return Ok(None);
            }
            Ok(Some(
                file.dense(name, &Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?,
            ))
        };
        let values = |name: &str| -> Result<Option<Vec<f32>>> {
            match vector(name)? {
                Some(b) => Ok(Some(b.flatten_all()?.to_vec1::<f32>()?)),
                None => Ok(None),
            }
        };
        let router_bias = values(&p("ffn_gate_inp.bias"))?;
        let selection_bias = values(&p("exp_probs_b.bias"))?;
        let shared = if config.shared > 0 {
            Some(Mlp::new(
                file.linear(&p("ffn_gate_shexp"), false, device)?,
                file.linear(&p("ffn_up_shexp"), false, device)?,
                file.linear(&p("ffn_down_shexp"), false, device)?,
                Activation::Silu,
            )?)
        } else {
            None
        };
        // Experts with their biases (gpt-oss: `[experts, width]`, a row each).
        let experts = |name: &str| -> Result<Vec<Linear>> {
            let layers = file.experts(&p(name), device)?;
            match vector(&p(&format!("{name}.bias")))? {
                None => Ok(layers),
                Some(b) => layers
                    .into_iter()
                    .enumerate()
                    .map(|(e, l)| Ok(l.with_bias(b.get(e)?.to_device(device)?)))
                    .collect(),
            }
        };
        let gates = experts("ffn_gate_exps")?;
        let ups = experts("ffn_up_exps")?;
        let downs = experts("ffn_down_exps")?;
        let activation = if file.config().arch == crate::Arch::GptOss {
            Activation::SwigluOai
        } else {
            Activation::Silu
        };
        if gates.len() != count || ups.len() != count || downs.len() != count {
            return Err(ShardError::BadInput(format!(
                "block {i} holds {}/{}/{} gate/up/down experts for a router of {count}",
                gates.len(),
                ups.len(),
                downs.len()
            )));
        }
        let experts = gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((g, u), d)| Mlp::new(g, u, d, activation))
            .collect::<Result<_>>()?;
        Ok(Moe {
            router,
            router_bias,
            selection_bias,
            experts,
            shared,
            config,
        })
    }

    /// The experts each row of `h` (`[rows, hidden]`, f32 values) goes to, with their
    /// weights: per expert, the rows it serves in ascending order. `margins[row]` is
    /// lowered to how far, in logits, the last chosen expert is from the first one left
    /// out.
    fn route(
        &self,
        h: &[f32],
        hidden: usize,
        mut margins: Option<&mut [f32]>,
    ) -> Vec<Vec<(u32, f32)>> {
        let count = self.config.count;
        let mut groups: Vec<Vec<(u32, f32)>> = vec![Vec::new(); count];
        for (row, x) in h.chunks_exact(hidden).enumerate() {
            let mut logits: Vec<f32> = self
                .router
                .chunks_exact(hidden)
                .map(|w| dot(x, w))
                .collect();
            if let Some(b) = &self.router_bias {
                for (l, b) in logits.iter_mut().zip(b) {
                    *l += b;
                }
            }
            // Probabilities: a softmax over every expert, or each logit's sigmoid.
            let probs: Vec<f32> = if self.config.sigmoid {
                logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect()
            } else {
                let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
                let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f32 = exps.iter().sum();
                exps.iter().map(|e| e / total).collect()
            };
            // Experts are chosen by probability plus the selection bias, if any; the
            // `used` best, ties to the lower index.
            let biased: Vec<f32>;
            let score: &[f32] = match &self.selection_bias {
                Some(b) => {
                    biased = probs.iter().zip(b).map(|(p, b)| p + b).collect();
                    &biased
                }
                None => &probs,
            };
            // Group-limited routing: experts of the groups whose two best scores sum
            // highest only (llama.cpp's, for DeepSeek).
            let grouped: Vec<f32>;
            let mut group_gap = f32::INFINITY;
            let score: &[f32] = match self.group_limited(score) {
                Some((masked, gap)) => {
                    (grouped, group_gap) = (masked, gap);
                    &grouped
                }
                None => score,
            };
            let mut order: Vec<usize> = (0..count).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            if let (Some(m), Some(&last), Some(&next)) = (
                margins.as_deref_mut(),
                order.get(self.config.used - 1),
                order.get(self.config.used),
            ) {
                // In logits: how far the logits must move, in all, to change the
                // choice. For a softmax, the two logits' gap. For sigmoid scores, the
                // cheaper of moving the last chosen one's logit down to where its score
                // (bias included) meets the next one's, or that one's up; for other
                // scores (probabilities plus a bias, or group-limited), their gap over
                // the steepest slope of a probability in its logit (1/4), a lower bound.
                let gap = if !score[next].is_finite() {
                    f32::INFINITY
                } else if self.config.sigmoid {
                    let bias = |e: usize| self.selection_bias.as_ref().map_or(0.0, |b| b[e]);
                    let inverse = |p: f32| {
                        if p > 0.0 && p < 1.0 {
                            (p / (1.0 - p)).ln()
                        } else if p <= 0.0 {
                            f32::NEG_INFINITY
                        } else {
                            f32::INFINITY
                        }
                    };
                    let down = logits[last] - inverse(score[next] - bias(last));
                    let up = inverse(score[last] - bias(next)) - logits[next];
                    down.min(up)
                } else if self.selection_bias.is_some() || group_gap.is_finite() {
                    (score[last] - score[next]) * 4.0
                } else {
                    logits[last] - logits[next]
                };
                // The groups' sums of scores: each score moves at most a quarter as
                // fast as its logit.
                m[row] = m[row].min(gap).min(group_gap * 4.0);
            }
            order.truncate(self.config.used);
            // llama.cpp keeps the sum off zero.
            let chosen = order
                .iter()
                .map(|&e| probs[e])
                .sum::<f32>()
                .max(6.103_515_6e-5);
            for e in order {
                let w = if self.config.normalize {
                    probs[e] / chosen
                } else {
                    probs[e]
                };
                groups[e].push((row as u32, w * self.config.scale));
            }
        }
        groups
    }

    /// For group-limited routing, `score` with the experts of every group but the
    /// `groups_used` whose two best scores sum highest (ties to the lower group) set to
    /// minus infinity, and the gap between the last group kept and the first left out.
    fn group_limited(&self, score: &[f32]) -> Option<(Vec<f32>, f32)> {
        let (groups, used) = (self.config.groups, self.config.groups_used);
        if groups <= 1 || used >= groups {
            return None;
        }
        let sums: Vec<f32> = score
            .chunks_exact(score.len() / groups)
            .map(|g| {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &x in g {
                    if x > a {
                        (a, b) = (x, a);
                    } else if x > b {
                        b = x;
                    }
                }
                if g.len() == 1 {
                    a
                } else {
                    a + b
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..groups).collect();
        order.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]).then(a.cmp(&b)));
        let mut masked = vec![f32::NEG_INFINITY; score.len()];
        let per = score.len() / groups;
        for &g in &order[..used] {
            masked[g * per..(g + 1) * per].copy_from_slice(&score[g * per..(g + 1) * per]);
        }
        Some((masked, sums[order[used - 1]] - sums[order[used]]))
    }

    /// Every row through its experts. The rows of a batch (several sessions' tokens)
    /// are grouped by expert, so each expert's weights are read once per batch, and a
    /// row's outputs are summed in expert order, so it comes out the same alone or in
    /// any batch.
    fn forward(&self, h: &Tensor, margins: Option<&mut [f32]>) -> Result<Tensor> {
        let (_, hidden) = h.dims2()?;
        let dtype = h.dtype();
        let values = h
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let groups = self.route(&values, hidden, margins);
        let mut out = if h.device().is_cpu() && dtype == candle_core::DType::F32 {
            self.mix_on_cpu(h, groups)?
        } else {
            self.mix(h, groups)?
        };
        if let Some(shared) = &self.shared {
            out = (out + shared.forward(h)?)?;
        }
        Ok(out)
    }

    /// The chosen experts' outputs, weighted and summed per row in expert order, on
    /// tensors (any device and type).
    fn mix(&self, h: &Tensor, groups: Vec<Vec<(u32, f32)>>) -> Result<Tensor> {
        let (rows, hidden) = h.dims2()?;
        let dtype = h.dtype();
        let mut out = Tensor::zeros((rows, hidden), dtype, h.device())?;
        for (expert, group) in self.experts.iter().zip(groups) {
            if group.is_empty() {
                continue;
            }
            let (ids, weights): (Vec<u32>, Vec<f32>) = group.into_iter().unzip();
            let n = ids.len();
            let ids = Tensor::from_vec(ids, n, h.device())?;
            let weights = Tensor::from_vec(weights, (n, 1), h.device())?.to_dtype(dtype)?;
            let x = if n == rows {
                h.clone()
            } else {
                h.index_select(&ids, 0)?
            };
            let y = expert.forward(&x)?.broadcast_mul(&weights)?;
            out = out.index_add(&ids, &y, 0)?;
        }
        Ok(out)
    }

    /// [`Self::mix`] for f32 rows on the CPU, the weighting and sums in plain Rust (the
    /// same products and sums, so the same numbers): the tensor version runs about ten
    /// ops around each chosen expert's products, and remakes the output at each one,
    /// some 4,000 ops per token on a 48-block, 8-of-128-expert model.
    fn mix_on_cpu(&self, h: &Tensor, groups: Vec<Vec<(u32, f32)>>) -> Result<Tensor> {
        use rayon::prelude::*;
        let (rows, hidden) = h.dims2()?;
        let chosen: Vec<(&Mlp, Vec<u32>, Vec<f32>)> = self
            .experts
            .iter()
            .zip(groups)
            .filter(|(_, group)| !group.is_empty())
            .map(|(expert, group)| {
                let (ids, weights) = group.into_iter().unzip();
                (expert, ids, weights)
            })
            .collect();
        // The chosen experts side by side on the pool (each thread streaming its own
        // expert's weights, where one small product at a time split over the threads
        // pays a hand-out per product), then summed in expert order.
        let outputs: Vec<Result<Vec<f32>>> = chosen
            .par_iter()
            .map(|(expert, ids, _)| {
                let n = ids.len();
                // A group of every row lists them in order (rows are routed in order).
                let x = if n == rows {
                    h.clone()
                } else {
                    h.index_select(&Tensor::from_slice(ids, n, h.device())?, 0)?
                };
                Ok(expert.forward(&x)?.flatten_all()?.to_vec1::<f32>()?)
            })
            .collect();
        let mut out = vec![0f32; rows * hidden];
        for ((_, ids, weights), y) in chosen.iter().zip(outputs) {
            let y = y?;
            for ((&id, &w), y) in ids.iter().zip(weights).zip(y.chunks_exact(hidden)) {
                let row = &mut out[id as usize * hidden..][..hidden];
                for (o, v) in row.iter_mut().zip(y) {
                    *o += v * w;
                }
            }
        }
        Ok(Tensor::from_vec(out, (rows, hidden), h.device())?)
    }
}
