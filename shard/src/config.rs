//! The shape of a model, read from GGUF metadata or a Hugging Face config.json.

use serde::Deserialize;

/// Model families implemented by [`crate::Span`]. All share RMSNorm, rotary embeddings,
/// grouped-query attention and SwiGLU feed-forward networks (one MLP, or a mixture of
/// experts); they differ in biases, norms and rope layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM2, TinyLlama, Mistral, and Mixtral (GGUF files name them all
    /// `llama`; Mixtral's blocks hold experts).
    Llama,
    /// Qwen2: biases on the Q, K and V projections.
    Qwen2,
    /// Qwen3: no biases; RMSNorm over each query and key head before rope.
    Qwen3,
    /// Qwen3's mixture of experts (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention,
    /// experts in every block.
    Qwen3Moe,
    /// Phi-3 and Phi-4: Llama's block with Q, K and V in one matrix and gate and up in
    /// another, NEOX rope.
    Phi3,
    /// Gemma 2: embeddings scaled by sqrt(width), RMSNorm after attention and after the
    /// MLP too, a tanh-GELU gated MLP, every other layer attending over a sliding
    /// window, and attention and final logits soft-capped.
    Gemma2,
    /// Gemma 3: Gemma 2 without soft-capping, with Qwen3's per-head Q/K norms, five
    /// sliding-window layers (rope base 10,000) to each global one.
    Gemma3,
    /// gpt-oss: a mixture of experts with biases everywhere (Q, K, V, output, router,
    /// experts), a learned "sink" logit per head in every softmax, every other layer
    /// over a 128-token window, YaRN rope, and experts that clamp their gate and up
    /// values (`swiglu_oai`), weighted by a softmax over the chosen experts only.
    GptOss,
    /// GLM-4.5 and GLM-4.5-Air: Q/K/V biases, rope over part of each head, leading
    /// dense blocks, then experts chosen by a sigmoid router (with a selection bias)
    /// beside a shared expert every token runs through; a multi-token-prediction block
    /// at the end that plain generation skips.
    Glm4Moe,
    /// DeepSeek-V2/V3/R1 and Kimi K2: multi-head latent attention ([`Latent`]: keys
    /// and values cached as one compressed vector per token), YaRN rope, leading dense
    /// blocks, then routed experts (softmax, or sigmoid with a selection bias and
    /// group-limited choice) beside shared ones.
    DeepSeek2,
}

impl Arch {
    /// The name GGUF files give it (`general.architecture`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Phi3 => "phi3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::GptOss => "gpt-oss",
            Arch::Glm4Moe => "glm4moe",
            Arch::DeepSeek2 => "deepseek2",
        }
    }

    /// The family of a GGUF `general.architecture`, if this crate runs it.
    pub fn from_gguf_name(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "qwen3moe" => Arch::Qwen3Moe,
            "phi3" => Arch::Phi3,
            "gemma2" => Arch::Gemma2,
            "gemma3" => Arch::Gemma3,
            "gpt-oss" => Arch::GptOss,
            "glm4moe" => Arch::Glm4Moe,
            "deepseek2" => Arch::DeepSeek2,
            _ => return None,
        })
    }

    /// How its rope pairs dimensions in GGUF files (llama.cpp's `llama_model_rope_type`).
    pub fn gguf_rope_style(self) -> RopeStyle {
        match self {
            Arch::Llama | Arch::DeepSeek2 => RopeStyle::Interleaved,
            Arch::Qwen2
            | Arch::Qwen3
            | Arch::Qwen3Moe
            | Arch::Phi3
            | Arch::Gemma2
            | Arch::Gemma3
            | Arch::GptOss
            | Arch::Glm4Moe => RopeStyle::Half,
        }
    }

    /// True when each query and key head is RMS-normalised before rope.
    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3)
    }

    /// True for the Gemma family's layout: scaled embeddings, norms after attention and
    /// after the MLP, tanh-GELU.
    pub fn gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// True when Q, K and V come from one matrix (`attn_qkv`) and the MLP's gate and
    /// up from one (`ffn_up`, gate first).
    pub fn fused(self) -> bool {
        self == Arch::Phi3
    }
}

/// Attention over the last `size` positions only, in the layers `pattern` picks: a
/// layer `i` is local when `i % pattern < pattern - 1` (llama.cpp's SWA pattern: Gemma 3
/// has five local layers to each global one, Gemma 2 one to one).
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Positions a local layer sees, its own included.
    pub size: usize,
    /// Layers per repeat of the pattern (the last of each repeat is global).
    pub pattern: usize,
    /// Rope base of the local layers, unscaled, when it differs from the global one
    /// (Gemma 3); `None`: the local layers rope as the global ones do.
    pub local_rope_theta: Option<f32>,
}

impl SlidingWindow {
    /// True when layer `i` attends over the window only.
    pub fn is_local(&self, i: usize) -> bool {
        self.pattern == 0 || i % self.pattern < self.pattern - 1
    }
}

/// A mixture of experts in place of a block's MLP (Mixtral, Qwen3-MoE): a router scores
/// every expert for each token, the `used` best run, and their outputs are summed,
/// weighted by the router's softmax probabilities (renormalised over the chosen ones
/// when `normalize`), as llama.cpp's `build_moe_ffn` does for these families.
///
/// With `groups` (DeepSeek-V3), experts are chosen only from the `groups_used` groups
/// (of `count / groups` consecutive experts) whose two best scores sum highest.
#[derive(Clone, Debug, PartialEq)]
pub struct Experts {
    /// Experts per block.
    pub count: usize,
    /// Experts each token runs through.
    pub used: usize,
    /// Width of one expert's MLP.
    pub ffn: usize,
    /// Renormalise the chosen experts' probabilities to sum to one. (A softmax over
    /// the chosen experts' logits alone, gpt-oss's SOFTMAX_WEIGHT gating in llama.cpp,
    /// is the same thing.)
    pub normalize: bool,
    /// Router probabilities by sigmoid of each logit (GLM-4.5, DeepSeek-V3) instead of
    /// a softmax over all.
    pub sigmoid: bool,
    /// What the chosen experts' weights are multiplied by (1 for none).
    pub scale: f32,
    /// Experts every token runs through, beside the routed ones (one MLP of
    /// `shared * ffn` width).
    pub shared: usize,
    /// Groups the experts fall into for group-limited routing; 0 or 1 for none.
    pub groups: usize,
    /// Groups a token's experts may come from.
    pub groups_used: usize,
}

/// YaRN rope scaling (gpt-oss, DeepSeek): frequencies blend between interpolated
/// (divided by `factor`) and original across a band of dimensions set by `beta_fast`
/// and `beta_slow`, and cos/sin are scaled by `attn_factor * (1 + 0.1 ln(factor))`, as
/// ggml's `rope_yarn` does.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    /// How many times the trained context the model is stretched to.
    pub factor: f32,
    /// Context length the model was trained with before scaling.
    pub original_context: usize,
    /// YaRN's fast boundary: dimensions rotating more often than this many times over
    /// the trained context keep their frequency.
    pub beta_fast: f32,
    /// YaRN's slow boundary: dimensions rotating fewer times than this are interpolated
    /// fully.
    pub beta_slow: f32,
    /// llama.cpp's `attn_factor`: 1, except for DeepSeek, where it cancels the
    /// magnitude (`1 / (1 + 0.1 ln(factor))`) because the attention scale carries it.
    pub attn_factor: f32,
}

impl Yarn {
    /// Per pair of dimensions, what its base frequency is multiplied by; and the
    /// cos/sin magnitude.
    pub fn scales(&self, head_dim: usize, theta: f32) -> (Vec<f32>, f32) {
        let dims = head_dim as f32;
        let corr = |beta: f32| {
            dims * (self.original_context as f32 / (beta * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * theta.ln())
        };
        let low = corr(self.beta_fast).floor().max(0.0);
        let high = corr(self.beta_slow).ceil().min(dims - 1.0);
        let freq_scale = 1.0 / self.factor;
        let per_pair = (0..head_dim / 2)
            .map(|j| {
                let y = (j as f32 - low) / (high - low).max(0.001);
                let mix = 1.0 - y.clamp(0.0, 1.0);
                freq_scale * (1.0 - mix) + mix
            })
            .collect();
        (
            per_pair,
            self.attn_factor * (1.0 + 0.1 * (1.0 / freq_scale).ln()),
        )
    }
}

/// DeepSeek's multi-head latent attention. Each token's keys and values come from one
/// compressed vector `c` (`kv_lora` wide, RMS-normalised) and one rope key `k_rope`
/// (`rope` wide) shared by every head; a head's query is `nope + rope` wide. The cache
/// holds `[c ; k_rope]` per token. Attention runs in the compressed space: a head's
/// query's `nope` part is taken through that head's slice of `W_kb` into `kv_lora`
/// dimensions, scored against `c` (plus rope part against `k_rope`), the weighted sum
/// of `c` taken through the head's `W_vb` to `v` dimensions (llama.cpp's MLA path).
#[derive(Clone, Debug, PartialEq)]
pub struct Latent {
    /// Rank of the query's low-rank projection (`attn_q_a`, `attn_q_b`); 0 when the
    /// query is one matrix (`attn_q`, DeepSeek-V2-Lite).
    pub q_lora: usize,
    /// Width of the compressed key/value vector.
    pub kv_lora: usize,
    /// Dimensions of a query or key head that rope does not turn (`rope_dims` do).
    pub nope: usize,
    /// Width of a value head.
    pub v: usize,
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: llama.cpp's "normal" rope. GGUF converters permute Llama's
    /// Q and K weights so that this layout is right for GGUF Llama files.
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face's `rotate_half`, and llama.cpp's NEOX rope
    /// (used for Qwen2 in GGUF).
    Half,
}

/// The numbers that define a Llama-family model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub arch: Arch,
    /// Human-readable name from the file, if any.
    pub name: String,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP.
    pub ffn: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Rope base frequency.
    pub rope_theta: f32,
    /// Rope dimension pairing.
    pub rope_style: RopeStyle,
    /// Per-frequency divisors (Llama 3.1 rope scaling), one per pair, if the model has them.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Context length the model was trained for.
    pub max_seq_len: usize,
    /// True when Q, K and V projections carry biases.
    pub qkv_bias: bool,
    /// The mixture of experts of blocks that have one (`None`: every block is dense).
    pub experts: Option<Experts>,
    /// Sliding-window attention of some layers (Gemma).
    pub sliding_window: Option<SlidingWindow>,
    /// Scale of attention scores, when not 1/sqrt(head_dim) (Gemma's
    /// query_pre_attn_scalar).
    pub attn_scale: Option<f32>,
    /// Attention scores soft-capped to ±this: `cap * tanh(score / cap)` (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Logits soft-capped the same way (Gemma 2).
    pub final_softcap: Option<f32>,
    /// Divides the positions the global layers' rope sees (linear rope scaling,
    /// Gemma 3's factor 8); 1 for none.
    pub rope_scale: f32,
    /// YaRN rope scaling, for models trained with it.
    pub yarn: Option<Yarn>,
    /// A learned per-head logit that joins every softmax of attention (gpt-oss).
    pub attn_sinks: bool,
    /// The attention's output projection has a bias (gpt-oss).
    pub attn_output_bias: bool,
    /// Dimensions of each head that rope turns (the first ones); `head_dim` for all.
    pub rope_dims: usize,
    /// Multi-head latent attention (DeepSeek); `head_dim` is then a query head's width
    /// (`nope + rope_dims`) and `n_kv_heads` 1 (one compressed vector per token).
    pub latent: Option<Latent>,
}

impl ModelConfig {
    /// Checks the numbers are coherent, so later tensor math cannot fail on shapes.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.n_layers == 0 || self.hidden == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return Err("zero-sized dimension in the model config".into());
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.rope_dims.is_multiple_of(2)
            || self.rope_dims == 0
            || self.rope_dims > self.head_dim
        {
            return Err(format!(
                "rope over {} of a head's {} dimensions",
                self.rope_dims, self.head_dim
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head dimension {} is odd", self.head_dim));
        }
        if let Some(e) = &self.experts {
            if e.count == 0 || e.used == 0 || e.used > e.count || e.ffn == 0 {
                return Err(format!(
                    "{} of {} experts used per token, of width {}",
                    e.used, e.count, e.ffn
                ));
            }
            if e.groups > 1
                && (!e.count.is_multiple_of(e.groups)
                    || e.groups_used == 0
                    || e.groups_used > e.groups
                    || e.used > e.groups_used * (e.count / e.groups))
            {
                return Err(format!(
                    "{} experts in {} groups, {} groups used, {} experts used",
                    e.count, e.groups, e.groups_used, e.used
                ));
            }
        }
        if let Some(l) = &self.latent {
            if l.kv_lora == 0 || l.v == 0 || l.nope + self.rope_dims != self.head_dim {
                return Err(format!(
                    "latent attention of rank {} with query heads of {} + {} (head {}) and \
                     value heads of {}",
                    l.kv_lora, l.nope, self.rope_dims, self.head_dim, l.v
                ));
            }
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 {
                return Err(format!(
                    "{} rope frequency factors for head dimension {}",
                    f.len(),
                    self.head_dim
                ));
            }
        }
        Ok(())
    }

    /// Bytes of KV cache one token takes across `blocks` blocks, in f32.
    pub fn kv_bytes_per_token(&self, blocks: usize) -> usize {
        match &self.latent {
            Some(l) => blocks * (l.kv_lora + self.rope_dims) * 4,
            None => 2 * blocks * self.n_kv_heads * self.head_dim * 4,
        }
    }
}

/// The fields of a Hugging Face `config.json` this crate reads.
#[derive(Deserialize, Debug)]
pub(crate) struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl HfConfig {
    pub(crate) fn to_config(&self) -> Result<ModelConfig, String> {
        let kind = self
            .model_type
            .clone()
            .or_else(|| self.architectures.first().cloned())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let arch = if kind.starts_with("qwen2") {
            Arch::Qwen2
        } else if kind == "qwen3" || kind.starts_with("qwen3forcausal") {
            Arch::Qwen3
        } else if kind.starts_with("llama") || kind.starts_with("mistral") {
            Arch::Llama
        } else {
            return Err(format!("unsupported architecture {kind:?}"));
        };
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let rope_freq_factors = match &self.rope_scaling {
            Some(v) if v.get("rope_type").or_else(|| v.get("type")) == Some(&"llama3".into()) => {
                Some(llama3_freq_factors(v, head_dim, self.rope_theta)?)
            }
            _ => None,
        };
        Ok(ModelConfig {
            arch,
            name: self.architectures.first().cloned().unwrap_or(kind),
            n_layers: self.num_hidden_layers,
            hidden: self.hidden_size,
            ffn: self.intermediate_size,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            vocab: self.vocab_size,
            rope_theta: self.rope_theta,
            rope_style: RopeStyle::Half,
            rope_freq_factors,
            rms_eps: self.rms_norm_eps,
            max_seq_len: self.max_position_embeddings,
            qkv_bias: self.attention_bias.unwrap_or(arch == Arch::Qwen2),
            experts: None,
            sliding_window: None,
            attn_scale: None,
            attn_softcap: None,
            final_softcap: None,
            rope_scale: 1.0,
            yarn: None,
            attn_sinks: false,
            attn_output_bias: false,
            rope_dims: head_dim,
            latent: None,
        })
    }
}

/// Llama 3.1's rope scaling, as divisors of each pair's frequency (the form GGUF stores
/// in `rope_freqs.weight`): high frequencies are kept, low ones divided by `factor`,
/// and the band between is interpolated (Meta's reference `apply_scaling`).
fn llama3_freq_factors(
    v: &serde_json::Value,
    head_dim: usize,
    theta: f32,
) -> Result<Vec<f32>, String> {
    let get = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope_scaling lacks {k}"))
    };
    let factor = get("factor")?;
    let low = get("low_freq_factor")?;
    let high = get("high_freq_factor")?;
    let old_ctx = get("original_max_position_embeddings")?;
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let scaled = if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            };
            (freq / scaled) as f32
        })
        .collect())
}
