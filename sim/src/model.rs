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
    /// Weights per block.
    pub params_per_block: f64,
    /// Bytes per weight as stored and read (Q4_0 is 4.5 bits: 0.5625).
    pub bytes_per_param: f64,
    /// KV-cache bytes per token per block (2 x kv heads x head dim x 4).
    pub kv_bytes_per_token: f64,
}

/// Weights of one Llama-style block: Q and O are `hidden^2`, K and V `hidden x kv`,
/// the SwiGLU MLP three `hidden x ffn` matrices.
fn block_params(hidden: f64, kv: f64, ffn: f64) -> f64 {
    2.0 * hidden * hidden + 2.0 * hidden * kv + 3.0 * hidden * ffn
}

/// The presets: `smollm2-135m` (Q4_1, the default model), `llama-3-8b`, `llama-2-70b`,
/// `llama-3.1-405b` (Q4_0 shapes).
pub fn preset(name: &str) -> Option<ModelShape> {
    let (blocks, hidden, kv, ffn, bpp) = match name {
        "smollm2-135m" => (30, 576.0, 192.0, 1536.0, 0.625),
        "llama-3-8b" => (32, 4096.0, 1024.0, 14336.0, 0.5625),
        "llama-2-70b" => (80, 8192.0, 1024.0, 28672.0, 0.5625),
        "llama-3.1-405b" => (126, 16384.0, 1024.0, 53248.0, 0.5625),
        _ => return None,
    };
    Some(ModelShape {
        name: name.to_string(),
        blocks,
        hidden: hidden as u32,
        params_per_block: block_params(hidden, kv, ffn),
        bytes_per_param: bpp,
        kv_bytes_per_token: 2.0 * kv * 4.0,
    })
}

/// Names accepted by [`preset`].
pub const PRESETS: [&str; 4] = [
    "smollm2-135m",
    "llama-3-8b",
    "llama-2-70b",
    "llama-3.1-405b",
];

impl ModelShape {
    /// Bytes of one block's weights.
    pub fn block_bytes(&self) -> f64 {
        self.params_per_block * self.bytes_per_param
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
        // The default model's block is ~2.2 MB in Q4_1, as the real file says.
        let b = preset("smollm2-135m").expect("preset").block_bytes();
        assert!((b / 2.21e6 - 1.0).abs() < 0.02, "{b}");
    }
}
