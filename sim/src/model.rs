//! Model shapes the simulator knows, and what a block costs to hold and to run.

use serde::Deserialize;

/// The shape of a model, as far as cost goes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Name shown in reports.
    pub name: String,
    /// Transformer blocks.
    pub blocks: u32,
    /// Width of the residual stream (hidden states on the wire are `tokens x hidden`).
    pub hidden: u32,
    /// Weights per block, every expert counted: what holding a block costs.
    pub params_per_block: f64,
    /// Bytes per weight as stored and read (Q4_0 is 4.5 bits: 0.5625).
    pub bytes_per_param: f64,
    /// KV-cache bytes per token per block (2 x kv heads x head dim x 4).
    pub kv_bytes_per_token: f64,
    /// The mixture of experts in each block, if any (part of `params_per_block`).
    #[serde(default)]
    pub experts: Option<ExpertShape>,
}

/// A block's experts, as far as cost goes: a token reads `used` of `count`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertShape {
    /// Experts per block.
    pub count: u32,
    /// Experts each token runs through (shared experts count as dense weights).
    pub used: u32,
    /// Weights of one expert.
    pub params_per_expert: f64,
}

/// Attention weights of one block with `q` query and `kv` key/value widths: Q and O
/// are `hidden x q`, K and V `hidden x kv`.
fn attention_params(hidden: f64, q: f64, kv: f64) -> f64 {
    2.0 * hidden * q + 2.0 * hidden * kv
}

/// Weights of one SwiGLU MLP (or expert) of width `ffn`.
fn mlp_params(hidden: f64, ffn: f64) -> f64 {
    3.0 * hidden * ffn
}

/// A dense Llama-style shape: `[blocks, hidden, q width, kv width, ffn]`.
fn dense(name: &str, [blocks, hidden, q, kv, ffn]: [f64; 5], bytes_per_param: f64) -> ModelShape {
    ModelShape {
        name: name.to_string(),
        blocks: blocks as u32,
        hidden: hidden as u32,
        params_per_block: attention_params(hidden, q, kv) + mlp_params(hidden, ffn),
        bytes_per_param,
        kv_bytes_per_token: 2.0 * kv * 4.0,
        experts: None,
    }
}

/// A mixture of experts: a dense shape whose MLP is `count` experts of width `ffn`
/// (`used` per token) plus `shared` always-used ones, and a router.
fn moe(
    name: &str,
    [blocks, hidden, q, kv]: [f64; 4],
    [count, used, shared]: [u32; 3],
    ffn: f64,
    bytes_per_param: f64,
) -> ModelShape {
    let expert = mlp_params(hidden, ffn);
    let dense_part =
        attention_params(hidden, q, kv) + shared as f64 * expert + count as f64 * hidden;
    ModelShape {
        name: name.to_string(),
        blocks: blocks as u32,
        hidden: hidden as u32,
        params_per_block: dense_part + count as f64 * expert,
        bytes_per_param,
        kv_bytes_per_token: 2.0 * kv * 4.0,
        experts: Some(ExpertShape {
            count,
            used,
            params_per_expert: expert,
        }),
    }
}

/// The presets, from the models' published configs: dense `smollm2-135m` (Q4_1, the
/// default model), `llama-3-8b`, `llama-2-70b`, `llama-3.1-405b` (Q4_0), `qwen3-8b`,
/// `gemma-3-27b` (Q4_K_M, about 4.85 bits a weight); mixtures of experts
/// `qwen3-30b-a3b`, `qwen3-235b-a22b`, `mixtral-8x7b`, `deepseek-v3` (Q4_K_M) and
/// `gpt-oss-20b`, `gpt-oss-120b` (MXFP4 experts, 4.25 bits). DeepSeek-V3's
/// multi-head latent attention is counted as its weights (about 187M a block) and its
/// compressed cache (576 values a token); its three leading dense blocks as MoE blocks.
pub fn preset(name: &str) -> Option<ModelShape> {
    if let Some((_, shape, bpp)) = DENSE.iter().find(|(n, ..)| *n == name) {
        return Some(dense(name, *shape, *bpp));
    }
    let (_, [blocks, hidden, q, kv, count, used, shared, ffn], bpp) =
        MOE.iter().find(|(n, ..)| *n == name)?;
    let experts = [*count as u32, *used as u32, *shared as u32];
    let mut m = moe(name, [*blocks, *hidden, *q, *kv], experts, *ffn, *bpp);
    if name == "deepseek-v3" {
        m.params_per_block += 187e6;
        m.kv_bytes_per_token = 576.0 * 4.0;
    }
    Some(m)
}

const Q4_K_M: f64 = 0.606;
const MXFP4: f64 = 0.531;

/// Dense presets: `[blocks, hidden, q width, kv width, ffn]`, bytes per weight.
const DENSE: &[(&str, [f64; 5], f64)] = &[
    ("smollm2-135m", [30.0, 576.0, 576.0, 192.0, 1536.0], 0.625),
    (
        "llama-3-8b",
        [32.0, 4096.0, 4096.0, 1024.0, 14336.0],
        0.5625,
    ),
    (
        "llama-2-70b",
        [80.0, 8192.0, 8192.0, 1024.0, 28672.0],
        0.5625,
    ),
    (
        "llama-3.1-405b",
        [126.0, 16384.0, 16384.0, 1024.0, 53248.0],
        0.5625,
    ),
    ("qwen3-8b", [36.0, 4096.0, 4096.0, 1024.0, 12288.0], Q4_K_M),
    (
        "gemma-3-27b",
        [62.0, 5376.0, 4096.0, 2048.0, 21504.0],
        Q4_K_M,
    ),
];

/// Mixture-of-experts presets: `[blocks, hidden, q width, kv width, experts, used,
/// shared, expert ffn]`, bytes per weight (DeepSeek-V3's attention is added apart).
#[rustfmt::skip]
const MOE: &[(&str, [f64; 8], f64)] = &[
    ("qwen3-30b-a3b", [48.0, 2048.0, 4096.0, 512.0, 128.0, 8.0, 0.0, 768.0], Q4_K_M),
    ("qwen3-235b-a22b", [94.0, 4096.0, 8192.0, 512.0, 128.0, 8.0, 0.0, 1536.0], Q4_K_M),
    ("mixtral-8x7b", [32.0, 4096.0, 4096.0, 1024.0, 8.0, 2.0, 0.0, 14336.0], Q4_K_M),
    ("gpt-oss-20b", [24.0, 2880.0, 4096.0, 512.0, 32.0, 4.0, 0.0, 2880.0], MXFP4),
    ("gpt-oss-120b", [36.0, 2880.0, 4096.0, 512.0, 128.0, 4.0, 0.0, 2880.0], MXFP4),
    ("deepseek-v3", [61.0, 7168.0, 0.0, 0.0, 256.0, 8.0, 1.0, 2048.0], Q4_K_M),
];

/// Names accepted by [`preset`].
pub const PRESETS: [&str; 12] = [
    "smollm2-135m",
    "llama-3-8b",
    "llama-2-70b",
    "llama-3.1-405b",
    "qwen3-8b",
    "gemma-3-27b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b",
    "mixtral-8x7b",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "deepseek-v3",
];

impl ModelShape {
    /// Bytes of one block's weights: what holding it costs.
    pub fn block_bytes(&self) -> f64 {
        self.params_per_block * self.bytes_per_param
    }

    /// Blocks a node with `memory_bytes` holds, each with room for `cache_tokens` of KV
    /// cache: `coordinator::budget`'s decision, the one `shoal serve --memory-budget`
    /// makes.
    pub fn blocks_in(&self, memory_bytes: u64, cache_tokens: usize) -> usize {
        let block = coordinator::budget::BlockCost {
            weight_bytes: self.block_bytes() as u64,
            kv_bytes_per_token: self.kv_bytes_per_token as u64,
        };
        let overhead = coordinator::budget::node_overhead(block.weight_bytes);
        coordinator::budget::blocks_for_budget(memory_bytes, overhead, block, cache_tokens)
    }

    /// Weights of one block that `tokens` tokens run through together: everything
    /// but the experts, and the experts at least one of them uses (each token picks
    /// `used` of `count`, taken as independent: `count * (1 - (1 - used/count)^tokens)`).
    /// A decode step of one token reads the active weights only.
    pub fn params_read(&self, tokens: u32) -> f64 {
        match &self.experts {
            None => self.params_per_block,
            Some(e) => {
                let all = e.count as f64 * e.params_per_expert;
                let untouched = (1.0 - e.used as f64 / e.count as f64).powi(tokens.max(1) as i32);
                self.params_per_block - all + all * (1.0 - untouched)
            }
        }
    }

    /// Weights one token computes with in a block: the dense ones and `used` experts.
    pub fn params_per_token(&self) -> f64 {
        match &self.experts {
            None => self.params_per_block,
            Some(e) => self.params_per_block - (e.count - e.used) as f64 * e.params_per_expert,
        }
    }

    /// Bytes of hidden states for `tokens` tokens in f32.
    pub fn hidden_bytes(&self, tokens: u32) -> f64 {
        tokens as f64 * self.hidden as f64 * 4.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_sizes() {
        // Total weights within a few percent of the published parameter counts (the
        // embeddings and LM head, not counted here, are the rest).
        let total = |n: &str| {
            let m = preset(n).expect("preset");
            m.params_per_block * m.blocks as f64
        };
        assert!((total("smollm2-135m") / 106e6 - 1.0).abs() < 0.05);
        assert!((total("llama-3-8b") / 6.98e9 - 1.0).abs() < 0.05);
        assert!((total("llama-2-70b") / 68.4e9 - 1.0).abs() < 0.05);
        assert!((total("llama-3.1-405b") / 401.6e9 - 1.0).abs() < 0.05);
        // Mixtures of experts: total and active weights as published (less embeddings).
        assert!((total("qwen3-30b-a3b") / 29.9e9 - 1.0).abs() < 0.05);
        assert!((total("qwen3-235b-a22b") / 233e9 - 1.0).abs() < 0.05);
        assert!((total("mixtral-8x7b") / 46.4e9 - 1.0).abs() < 0.05);
        assert!((total("gpt-oss-120b") / 115e9 - 1.0).abs() < 0.05);
        assert!((total("deepseek-v3") / 671e9 - 1.0).abs() < 0.05);
        let active = |n: &str| {
            let m = preset(n).expect("preset");
            m.params_per_token() * m.blocks as f64
        };
        assert!((active("qwen3-30b-a3b") / 2.73e9 - 1.0).abs() < 0.05);
        assert!((active("mixtral-8x7b") / 12.6e9 - 1.0).abs() < 0.05);
        assert!((active("deepseek-v3") / 36e9 - 1.0).abs() < 0.08);
        // One token reads the active weights; a long prompt nearly all of them.
        let m = preset("qwen3-30b-a3b").expect("preset");
        assert_eq!(m.params_read(1), m.params_per_token());
        assert!(m.params_read(512) > 0.99 * m.params_per_block);
        assert!(PRESETS.iter().all(|n| preset(n).is_some()));
        // The default model's block is ~2.2 MB in Q4_1, as the real file says.
        let b = preset("smollm2-135m").expect("preset").block_bytes();
        assert!((b / 2.21e6 - 1.0).abs() < 0.02, "{b}");
    }
}
