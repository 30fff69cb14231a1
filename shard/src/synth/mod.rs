//! Models with random weights in the shape of real ones, for speed tests of models too
//! large to ship (`shoal make-model`).
//!
//! Speed depends on the shape (widths, heads, blocks) and the weight format, not on the
//! values, so a Llama-3-8B-shaped file of random Q4_0 blocks decodes exactly as fast as
//! the real one. The values are drawn so activations stay finite (weights of standard
//! deviation about 1/sqrt(fan-in), unit norms). The tokenizer and chat template come
//! from a donor GGUF (by default the project's default model), so the vocabulary is the
//! donor's; a shape's own vocabulary size is kept only in [`Shape::vocab`] for
//! reference.
//!
//! GGUF output is one file, written tensor by tensor as the values are drawn
//! (`gguf`); safetensors output is a directory with one file per block
//! (`safetensors`). Either way memory stays at about one block's size.

use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;
use rand::{Rng, RngExt, SeedableRng};
use rayon::prelude::*;

use crate::{Arch, Experts, Latent, ModelFile, Result, ShardError, TextCodec};

mod gguf;
mod safetensors;

/// The shape of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// Preset name.
    pub name: &'static str,
    /// Model family (what `general.architecture` says).
    pub arch: Arch,
    /// Model width.
    pub hidden: usize,
    /// MLP width (of dense blocks).
    pub ffn: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head (not always `hidden / heads`: Qwen3's is 128 throughout).
    pub head_dim: usize,
    /// Transformer blocks.
    pub blocks: usize,
    /// The real model's vocabulary (the file gets the donor's).
    pub vocab: usize,
    /// Rope base.
    pub rope_theta: f32,
    /// Context length.
    pub context: usize,
    /// Experts of every block, for a mixture of experts.
    pub experts: Option<Experts>,
    /// Sliding-window size of the local layers (Gemma, gpt-oss), 0 for none.
    pub window: usize,
    /// YaRN rope scaling: factor and original context (gpt-oss).
    pub yarn: Option<(f32, usize)>,
    /// Leading blocks with a dense MLP before the experts begin (GLM-4.5).
    pub dense_lead: usize,
    /// Dimensions of each head rope turns; 0 for all.
    pub rope_dims: usize,
    /// Multi-head latent attention (DeepSeek).
    pub latent: Option<LatentShape>,
}

/// DeepSeek's latent attention as a file holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentShape {
    /// The ranks and head widths of the attention.
    pub attn: Latent,
    /// As llama.cpp's converter writes it now, for its MLA path: `W_kb` and `W_vb`
    /// apart (`attn_k_b`, `attn_v_b`), the query head's width in `key_length_mla`.
    /// Otherwise as older files: one `attn_kv_b`.
    pub mla: bool,
    /// YaRN's `mscale_all_dim`, which scales attention by `(1 + 0.1 m ln factor)^2`.
    pub mscale_all_dim: f32,
}

const fn dense(
    name: &'static str,
    arch: Arch,
    [hidden, ffn, heads, kv_heads, head_dim, blocks]: [usize; 6],
    vocab: usize,
    rope_theta: f32,
    context: usize,
) -> Shape {
    Shape {
        name,
        arch,
        hidden,
        ffn,
        heads,
        kv_heads,
        head_dim,
        blocks,
        vocab,
        rope_theta,
        context,
        experts: None,
        window: 0,
        yarn: None,
        dense_lead: 0,
        rope_dims: 0,
        latent: None,
    }
}

/// gpt-oss: experts, a window and YaRN (factor 32 over 4,096 positions).
const fn gpt_oss(shape: Shape, count: usize, window: usize) -> Shape {
    let width = shape.hidden;
    Shape {
        window,
        yarn: Some((32.0, 4096)),
        ..moe(shape, count, 4, width)
    }
}

const fn windowed(shape: Shape, window: usize) -> Shape {
    Shape { window, ..shape }
}

const fn moe(shape: Shape, count: usize, used: usize, ffn: usize) -> Shape {
    Shape {
        experts: Some(Experts {
            count,
            used,
            ffn,
            normalize: true,
            sigmoid: false,
            scale: 1.0,
            shared: 0,
            groups: 0,
            groups_used: 0,
        }),
        ..shape
    }
}

/// DeepSeek's layout: latent attention (q_lora, kv_lora, nope, rope, v), YaRN, dense
/// leading blocks, routed experts beside shared ones.
#[allow(clippy::too_many_arguments)]
const fn deepseek(
    shape: Shape,
    [q_lora, kv_lora, nope, rope, v]: [usize; 5],
    experts: Experts,
    dense_lead: usize,
    yarn: (f32, usize),
    mscale_all_dim: f32,
    mla: bool,
) -> Shape {
    Shape {
        experts: Some(experts),
        dense_lead,
        rope_dims: rope,
        yarn: Some(yarn),
        latent: Some(LatentShape {
            attn: Latent {
                q_lora,
                kv_lora,
                nope,
                v,
            },
            mla,
            mscale_all_dim,
        }),
        ..shape
    }
}

/// The shapes `shoal make-model` knows: real models' (from their published configs),
/// and `tiny-*` ones of each family for tests (widths that every quantisation's blocks
/// divide).
#[rustfmt::skip]
pub const SHAPES: &[Shape] = &[
    //    name               family          [hidden, ffn, heads, kv, head_dim, blocks]  vocab  rope base  context
    dense("smollm2-135m",    Arch::Llama,    [576, 1536, 9, 3, 64, 30],        49152,   100_000.0, 8192),
    dense("llama2-7b",       Arch::Llama,    [4096, 11008, 32, 32, 128, 32],   32000,   10_000.0,  4096),
    dense("llama3-8b",       Arch::Llama,    [4096, 14336, 32, 8, 128, 32],    128_256, 500_000.0, 8192),
    dense("llama2-13b",      Arch::Llama,    [5120, 13824, 40, 40, 128, 40],   32000,   10_000.0,  4096),
    dense("llama3-70b",      Arch::Llama,    [8192, 28672, 64, 8, 128, 80],    128_256, 500_000.0, 8192),
    dense("qwen3-8b",        Arch::Qwen3,    [4096, 12288, 32, 8, 128, 36],    151_936, 1e6,       40960),
    dense("phi-4",           Arch::Phi3,     [5120, 17920, 40, 10, 128, 40],   100_352, 250_000.0, 16384),
    //    ... with experts: count, used per token, width
    moe(dense("qwen3-30b-a3b",   Arch::Qwen3Moe, [2048, 6144, 32, 4, 128, 48],  151_936, 1e6, 40960), 128, 8, 768),
    moe(dense("qwen3-235b-a22b", Arch::Qwen3Moe, [4096, 12288, 64, 4, 128, 94], 151_936, 1e6, 40960), 128, 8, 1536),
    moe(dense("mixtral-8x7b",    Arch::Llama,    [4096, 14336, 32, 8, 128, 32], 32000,   1e6, 32768), 8, 2, 14336),
    //    ... with a sliding window
    windowed(dense("gemma-3-27b", Arch::Gemma3, [5376, 21504, 32, 16, 128, 62], 262_144, 1e6, 131_072), 1024),
    //    ... both (experts: count; 4 used, of the model's width)
    gpt_oss(dense("gpt-oss-20b",  Arch::GptOss, [2880, 2880, 64, 8, 64, 24], 201_088, 150_000.0, 131_072), 32, 128),
    gpt_oss(dense("gpt-oss-120b", Arch::GptOss, [2880, 2880, 64, 8, 64, 36], 201_088, 150_000.0, 131_072), 128, 128),
    //    ... latent attention: [q_lora, kv_lora, nope, rope, v], experts, dense leading blocks, YaRN, mscale_all_dim
    deepseek(dense("deepseek-v3", Arch::DeepSeek2, [7168, 18432, 128, 1, 192, 61], 129_280, 10_000.0, 163_840),
        [1536, 512, 128, 64, 128],
        Experts { count: 256, used: 8, ffn: 2048, normalize: true, sigmoid: true, scale: 2.5, shared: 1, groups: 8, groups_used: 4 },
        3, (40.0, 4096), 1.0, true),
    // Tiny ones for tests. Windows of 8 positions, so a short test crosses them; six
    // Gemma 3 blocks, so one is global.
    dense("tiny-llama",      Arch::Llama,    [256, 512, 4, 2, 64, 4],          49152,   10_000.0,  4096),
    dense("tiny-qwen3",      Arch::Qwen3,    [256, 512, 4, 2, 128, 4],         49152,   1e6,       4096),
    dense("tiny-phi4",       Arch::Phi3,     [256, 512, 4, 2, 64, 4],          49152,   10_000.0,  4096),
    moe(dense("tiny-qwen3moe", Arch::Qwen3Moe, [256, 512, 4, 2, 128, 4], 49152, 1e6, 4096), 16, 4, 256),
    moe(dense("tiny-mixtral",  Arch::Llama,    [256, 512, 4, 2, 64, 4],  49152, 1e6, 4096), 8, 2, 512),
    windowed(dense("tiny-gemma2", Arch::Gemma2, [256, 512, 4, 2, 64, 4], 49152, 10_000.0, 4096), 8),
    windowed(dense("tiny-gemma3", Arch::Gemma3, [256, 512, 4, 2, 64, 6], 49152, 1e6, 4096), 8),
    // GLM-4.5's layout: a dense first block, 2 of 8 sigmoid-routed experts (scaled 2.5)
    // beside a shared one, biases on Q/K/V, rope over half of each head.
    Shape {
        experts: Some(Experts { count: 8, used: 2, ffn: 128, normalize: true, sigmoid: true, scale: 2.5, shared: 1, groups: 0, groups_used: 0 }),
        dense_lead: 1,
        rope_dims: 32,
        ..dense("tiny-glm4moe", Arch::Glm4Moe, [256, 512, 4, 2, 64, 4], 49152, 1e6, 4096)
    },
    // 2 of 8 experts: a random router's near-ties (which two implementations may break
    // differently) grow with the experts to choose among; 8 keeps them few.
    Shape { experts: Some(Experts { count: 8, used: 2, ffn: 256, normalize: true, sigmoid: false, scale: 1.0, shared: 0, groups: 0, groups_used: 0 }),
        ..gpt_oss(dense("tiny-gpt-oss", Arch::GptOss, [256, 256, 4, 2, 64, 4], 49152, 150_000.0, 4096), 8, 8) },
    // DeepSeek-V3's layout as llama.cpp's converter writes it now: 2 of 8 sigmoid-routed
    // experts from the best 2 of 4 groups, a shared one, a dense first block, YaRN.
    deepseek(dense("tiny-deepseek2", Arch::DeepSeek2, [256, 512, 4, 1, 96, 4], 49152, 10_000.0, 4096),
        [128, 128, 64, 32, 64],
        Experts { count: 8, used: 2, ffn: 128, normalize: true, sigmoid: true, scale: 2.5, shared: 1, groups: 4, groups_used: 2 },
        1, (40.0, 4096), 1.0, true),
    // DeepSeek-V2-Lite's, as older files hold it: one query matrix, one attn_kv_b,
    // softmax routing without renormalising, two shared experts.
    deepseek(dense("tiny-deepseek2-lite", Arch::DeepSeek2, [256, 512, 4, 4, 96, 4], 49152, 10_000.0, 4096),
        [0, 128, 64, 32, 64],
        Experts { count: 8, used: 2, ffn: 128, normalize: false, sigmoid: false, scale: 1.0, shared: 2, groups: 0, groups_used: 0 },
        1, (40.0, 4096), 0.707, false),
];

/// A preset by name; hyphens do not matter (`llama-3-8b` is `llama3-8b`).
pub fn shape(name: &str) -> Option<Shape> {
    let bare = |s: &str| s.replace('-', "").to_ascii_lowercase();
    SHAPES.iter().find(|s| bare(s.name) == bare(name)).cloned()
}

/// How a GGUF file's tensors are typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufWeights {
    /// Every matrix in one type (norms and routers stay F32, as llama.cpp keeps them).
    Uniform(GgmlDType),
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the LM head and for the value and
    /// down projections of the first and last eighth of the blocks and every third
    /// block between (its `use_more_bits`).
    Q4KM,
    /// llama.cpp's MXFP4_MOE: experts in MXFP4 (gpt-oss's own format), every other
    /// matrix Q8_0.
    Mxfp4Moe,
}

impl GgufWeights {
    /// The type of matrix `name` (GGUF name, block `block` of `blocks` if in one).
    fn type_for(self, name: &str, block: Option<usize>, blocks: usize) -> GgmlDType {
        match self {
            GgufWeights::Uniform(t) => t,
            GgufWeights::Mxfp4Moe => GgmlDType::Q8_0,
            GgufWeights::Q4KM => {
                let more_bits =
                    |i: usize| i < blocks / 8 || i >= 7 * blocks / 8 || (i - blocks / 8) % 3 == 2;
                let wide = name.contains("attn_v.") || name.contains("ffn_down");
                match block {
                    None if name == "output.weight" => GgmlDType::Q6K,
                    Some(i) if wide && more_bits(i) => GgmlDType::Q6K,
                    _ => GgmlDType::Q4K,
                }
            }
        }
    }
}

/// How the weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthFormat {
    /// One GGUF file.
    Gguf(GgufWeights),
    /// A Hugging Face directory of bf16 safetensors.
    SafetensorsBf16,
    /// A Hugging Face directory of f16 safetensors.
    SafetensorsF16,
}

/// The `--dtype` names for GGUF files and what they mean.
const GGUF_DTYPES: &[(&str, GgufWeights)] = &[
    ("f32", GgufWeights::Uniform(GgmlDType::F32)),
    ("f16", GgufWeights::Uniform(GgmlDType::F16)),
    ("bf16", GgufWeights::Uniform(GgmlDType::BF16)),
    ("q8_0", GgufWeights::Uniform(GgmlDType::Q8_0)),
    ("q5_0", GgufWeights::Uniform(GgmlDType::Q5_0)),
    ("q5_1", GgufWeights::Uniform(GgmlDType::Q5_1)),
    ("q4_0", GgufWeights::Uniform(GgmlDType::Q4_0)),
    ("q4_1", GgufWeights::Uniform(GgmlDType::Q4_1)),
    ("q6_k", GgufWeights::Uniform(GgmlDType::Q6K)),
    ("q5_k", GgufWeights::Uniform(GgmlDType::Q5K)),
    ("q4_k", GgufWeights::Uniform(GgmlDType::Q4K)),
    ("q4_k_m", GgufWeights::Q4KM),
    ("mxfp4_moe", GgufWeights::Mxfp4Moe),
];

impl SynthFormat {
    /// The format for a weight type (`q4_0`, `q4_k_m`, `f16`, `bf16`, ...), written
    /// where `out` says: GGUF for a `.gguf` file, safetensors (f16 or bf16) otherwise.
    pub fn for_dtype(dtype: &str, out: &std::path::Path) -> std::result::Result<Self, String> {
        let gguf = out.extension().is_some_and(|e| e == "gguf");
        let lower = dtype.to_ascii_lowercase();
        if !gguf {
            return match lower.as_str() {
                "f16" => Ok(SynthFormat::SafetensorsF16),
                "bf16" => Ok(SynthFormat::SafetensorsBf16),
                _ if GGUF_DTYPES.iter().any(|(n, _)| *n == lower) => Err(format!(
                    "--dtype {dtype} is written as GGUF: give --out a .gguf file"
                )),
                _ => Err(format!("unknown --dtype `{dtype}`: {}", dtype_names())),
            };
        }
        GGUF_DTYPES
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|&(_, w)| SynthFormat::Gguf(w))
            .ok_or_else(|| format!("unknown --dtype `{dtype}`: {}", dtype_names()))
    }
}

/// Every `--dtype` name, for messages.
pub fn dtype_names() -> String {
    let names: Vec<&str> = GGUF_DTYPES.iter().map(|(n, _)| *n).collect();
    format!("{} (GGUF), f16 or bf16 (safetensors)", names.join(", "))
}

impl FromStr for SynthFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || {
            format!(
                "unknown format `{s}`: gguf-<dtype> ({}), safetensors-bf16 or safetensors-f16",
                dtype_names()
            )
        };
        match s {
            "safetensors-bf16" => Ok(SynthFormat::SafetensorsBf16),
            "safetensors-f16" => Ok(SynthFormat::SafetensorsF16),
            _ => {
                let dtype = s.strip_prefix("gguf-").ok_or_else(bad)?;
                SynthFormat::for_dtype(dtype, Path::new("x.gguf")).map_err(|_| bad())
            }
        }
    }
}

/// Random numbers for one tensor, drawn in parallel from per-chunk generators seeded
/// from `seed` (the same seed gives the same file).
fn fill<T: Send>(
    n: usize,
    seed: u64,
    make: impl Fn(&mut rand::rngs::StdRng) -> T + Sync,
) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    let mut out: Vec<T> = Vec::with_capacity(n);
    let chunks: Vec<Vec<T>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9e37_79b9));
            let len = CHUNK.min(n - c * CHUNK);
            (0..len).map(|_| make(&mut rng)).collect()
        })
        .collect();
    for c in chunks {
        out.extend(c);
    }
    out
}

/// A value of standard deviation about `std` (uniform, which is enough for speed).
fn value(rng: &mut rand::rngs::StdRng, std: f32) -> f32 {
    (rng.random::<f32>() * 2.0 - 1.0) * std * 1.732
}

/// Raw GGML bytes of a random `[rows, cols]` matrix in `dtype` (whose blocks must
/// divide `cols`), values of standard deviation about `std`.
fn ggml_bytes(rows: usize, cols: usize, dtype: GgmlDType, std: f32, seed: u64) -> Result<Vec<u8>> {
    let n = rows * cols;
    Ok(match dtype {
        // Q4_0, Q8_0 and F16 straight from random bytes (fast for big shapes): per 32
        // weights an f16 scale, then the quantised values.
        GgmlDType::Q4_0 => {
            let d = f16::from_f32(std / 4.6).to_le_bytes();
            fill(n / 32, seed, |rng| {
                let mut b = [0u8; 18];
                b[..2].copy_from_slice(&d);
                rng.fill_bytes(&mut b[2..]);
                b
            })
            .concat()
        }
        GgmlDType::Q8_0 => {
            let d = f16::from_f32(std / 73.9).to_le_bytes();
            fill(n / 32, seed, |rng| {
                let mut b = [0u8; 34];
                b[..2].copy_from_slice(&d);
                rng.fill_bytes(&mut b[2..]);
                b
            })
            .concat()
        }
        GgmlDType::F16 => {
            fill(n, seed, |rng| f16::from_f32(value(rng, std)).to_le_bytes()).concat()
        }
        GgmlDType::F32 => fill(n, seed, |rng| value(rng, std).to_le_bytes()).concat(),
        // The rest through candle's quantisers, from f32 values: in bands of rows on
        // every core (rows quantise independently, and a band's bytes are its rows').
        other => {
            let values = fill(n, seed, |rng| value(rng, std));
            const BAND: usize = 64;
            let bands = values
                .par_chunks(BAND * cols)
                .map(|band| -> Result<Vec<u8>> {
                    let t = candle_core::Tensor::from_slice(
                        band,
                        (band.len() / cols, cols),
                        &Device::Cpu,
                    )?;
                    Ok(QTensor::quantize(&t, other)?.data()?.into_owned())
                })
                .collect::<Result<Vec<_>>>()?;
            bands.concat()
        }
    })
}

/// One matrix (or stack of experts) of a block: GGUF name, experts, rows, cols.
struct Matrix {
    name: String,
    experts: Option<usize>,
    rows: usize,
    cols: usize,
}

/// Every matrix of block `i`.
fn block_matrices(s: &Shape, i: usize) -> Vec<Matrix> {
    let p = |n: &str| format!("blk.{i}.{n}.weight");
    let m = |name: String, experts, rows, cols| Matrix {
        name,
        experts,
        rows,
        cols,
    };
    let hd = s.head_dim;
    let mut out = if let Some(l) = &s.latent {
        latent_matrices(s, l, &p)
    } else if s.arch.fused() {
        vec![m(
            p("attn_qkv"),
            None,
            (s.heads + 2 * s.kv_heads) * hd,
            s.hidden,
        )]
    } else {
        vec![
            m(p("attn_q"), None, s.heads * hd, s.hidden),
            m(p("attn_k"), None, s.kv_heads * hd, s.hidden),
            m(p("attn_v"), None, s.kv_heads * hd, s.hidden),
        ]
    };
    let values = s.latent.as_ref().map_or(hd, |l| l.attn.v);
    out.push(m(p("attn_output"), None, s.hidden, s.heads * values));
    let experts = s.experts.as_ref().filter(|_| i >= s.dense_lead);
    match experts {
        None if s.arch.fused() => out.extend([
            m(p("ffn_up"), None, 2 * s.ffn, s.hidden),
            m(p("ffn_down"), None, s.hidden, s.ffn),
        ]),
        None => out.extend([
            m(p("ffn_gate"), None, s.ffn, s.hidden),
            m(p("ffn_up"), None, s.ffn, s.hidden),
            m(p("ffn_down"), None, s.hidden, s.ffn),
        ]),
        Some(e) => {
            out.extend([
                m(p("ffn_gate_exps"), Some(e.count), e.ffn, s.hidden),
                m(p("ffn_up_exps"), Some(e.count), e.ffn, s.hidden),
                m(p("ffn_down_exps"), Some(e.count), s.hidden, e.ffn),
            ]);
            if e.shared > 0 {
                let w = e.shared * e.ffn;
                out.extend([
                    m(p("ffn_gate_shexp"), None, w, s.hidden),
                    m(p("ffn_up_shexp"), None, w, s.hidden),
                    m(p("ffn_down_shexp"), None, s.hidden, w),
                ]);
            }
        }
    }
    out
}

/// The attention matrices of a latent-attention block (DeepSeek), as llama.cpp names
/// them: the query (one matrix, or low-rank through `attn_q_a`), the compressed
/// key/value and rope key (`attn_kv_a_mqa`), and what takes the compressed vector to
/// each head's keys and values.
fn latent_matrices(s: &Shape, l: &LatentShape, p: &dyn Fn(&str) -> String) -> Vec<Matrix> {
    let m = |name: String, experts, rows, cols| Matrix {
        name,
        experts,
        rows,
        cols,
    };
    let a = &l.attn;
    let query = s.heads * (a.nope + s.rope_dims);
    let mut out = if a.q_lora > 0 {
        vec![
            m(p("attn_q_a"), None, a.q_lora, s.hidden),
            m(p("attn_q_b"), None, query, a.q_lora),
        ]
    } else {
        vec![m(p("attn_q"), None, query, s.hidden)]
    };
    out.push(m(
        p("attn_kv_a_mqa"),
        None,
        a.kv_lora + s.rope_dims,
        s.hidden,
    ));
    if l.mla {
        // Per head: [kv_lora, nope] and [v, kv_lora] (ggml's {nope, kv_lora, heads} and
        // {kv_lora, v, heads}).
        out.push(m(p("attn_k_b"), Some(s.heads), a.kv_lora, a.nope));
        out.push(m(p("attn_v_b"), Some(s.heads), a.v, a.kv_lora));
    } else {
        // Per head, its key's rows then its value's.
        out.push(m(p("attn_kv_b"), None, s.heads * (a.nope + a.v), a.kv_lora));
    }
    out
}

/// The LM head's values are this many times larger than a plain 1/sqrt(fan-in) draw,
/// so random models choose their tokens decisively (logits of standard deviation about
/// 4, as a trained model's; top-2 gaps average about 0.9 over a 49k vocabulary):
/// two correct implementations then agree on greedy tokens, where near-ties would let
/// rounding decide.
const DECISIVE_HEAD: f32 = 4.0;

/// Gemma's norms after attention and MLP carry this weight: its LM head is its
/// embedding matrix, so were the (decisively scaled) embedding to dominate the residual
/// stream, every token would predict itself; blocks that write larger than it keep the
/// model's choices the blocks' own.
const GEMMA_POST_NORM: f32 = 8.0;

/// Token embeddings this many times larger than a plain draw: the residual stream
/// then carries the token strongly through every block, which keeps a mixture of
/// experts' routing clear of near-ties that quantisation noise would flip.
const EMBEDDING_WEIGHT: f32 = 4.0;

/// Writes a model of `shape` (with `blocks` blocks if given) in `format` to `out` (a
/// file for GGUF, a directory for safetensors), with `donor`'s tokenizer.
pub fn write(
    shape: &Shape,
    blocks: Option<usize>,
    format: SynthFormat,
    out: &Path,
    donor: &ModelFile,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    let mut s = shape.clone();
    s.blocks = blocks.unwrap_or(s.blocks);
    if s.blocks == 0 || !s.heads.is_multiple_of(s.kv_heads) || !s.head_dim.is_multiple_of(2) {
        return Err(ShardError::BadInput(format!("not a usable shape: {s:?}")));
    }
    let md = donor
        .gguf_metadata()
        .ok_or_else(|| ShardError::BadInput("the tokenizer donor must be a GGUF file".into()))?;
    let vocab = TextCodec::from_model(donor)?.vocab_size();
    match format {
        SynthFormat::Gguf(weights) => {
            gguf::write_gguf(&s, vocab, weights, out, md, seed, &mut progress)
        }
        SynthFormat::SafetensorsBf16 | SynthFormat::SafetensorsF16 => {
            if s.arch != Arch::Llama || s.experts.is_some() {
                return Err(ShardError::BadInput(format!(
                    "{} is written as GGUF only: give --out a .gguf file",
                    s.name
                )));
            }
            let bf = format == SynthFormat::SafetensorsBf16;
            safetensors::write_safetensors(&s, vocab, bf, out, donor, seed, &mut progress)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_dtypes_have_the_names_people_type() {
        assert_eq!(shape("llama-3-8b").map(|s| s.name), Some("llama3-8b"));
        assert_eq!(shape("Llama-2-13b").map(|s| s.name), Some("llama2-13b"));
        assert!(shape("llama-4-1t").is_none());
        let gguf = std::path::Path::new("m.gguf");
        let dir = std::path::Path::new("m");
        let q = |t| Ok(SynthFormat::Gguf(GgufWeights::Uniform(t)));
        assert_eq!(SynthFormat::for_dtype("q4_0", gguf), q(GgmlDType::Q4_0));
        assert_eq!(SynthFormat::for_dtype("Q8_0", gguf), q(GgmlDType::Q8_0));
        assert_eq!(SynthFormat::for_dtype("f16", gguf), q(GgmlDType::F16));
        assert_eq!(SynthFormat::for_dtype("bf16", gguf), q(GgmlDType::BF16));
        assert_eq!(
            SynthFormat::for_dtype("q4_k_m", gguf),
            Ok(SynthFormat::Gguf(GgufWeights::Q4KM))
        );
        assert_eq!("gguf-q6_k".parse(), q(GgmlDType::Q6K));
        assert_eq!(
            SynthFormat::for_dtype("f16", dir),
            Ok(SynthFormat::SafetensorsF16)
        );
        assert_eq!(
            SynthFormat::for_dtype("bf16", dir),
            Ok(SynthFormat::SafetensorsBf16)
        );
        assert!(SynthFormat::for_dtype("q4_0", dir).is_err_and(|e| e.contains(".gguf")));
        assert!(SynthFormat::for_dtype("int3", gguf).is_err_and(|e| e.contains("q4_k_m")));
        assert!(shape("qwen3-30b-a3b").is_some_and(|s| s.experts.is_some()));
    }

    #[test]
    fn q4_k_m_gives_some_blocks_more_bits() {
        let w = GgufWeights::Q4KM;
        let t = |name: &str, block| w.type_for(name, block, 32);
        assert_eq!(t("output.weight", None), GgmlDType::Q6K);
        assert_eq!(t("token_embd.weight", None), GgmlDType::Q4K);
        assert_eq!(t("blk.0.attn_v.weight", Some(0)), GgmlDType::Q6K);
        assert_eq!(t("blk.0.attn_q.weight", Some(0)), GgmlDType::Q4K);
        // Blocks 4..28: every third from block 6 gets more bits.
        assert_eq!(t("blk.5.ffn_down.weight", Some(5)), GgmlDType::Q4K);
        assert_eq!(t("blk.6.ffn_down_exps.weight", Some(6)), GgmlDType::Q6K);
        assert_eq!(t("blk.31.attn_v.weight", Some(31)), GgmlDType::Q6K);
    }
}
