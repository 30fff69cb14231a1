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
//! GGUF output is one file, built in memory (about the file's size); safetensors output
//! is a directory with one file per block, so memory stays at one block's size.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use half::{bf16, f16};
use rand::{Rng, RngExt, SeedableRng};
use rayon::prelude::*;

use crate::{ModelFile, Result, ShardError, TextCodec};

/// The shape of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// Preset name.
    pub name: &'static str,
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub ffn: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Transformer blocks.
    pub blocks: usize,
    /// The real model's vocabulary (the file gets the donor's).
    pub vocab: usize,
    /// Rope base.
    pub rope_theta: f32,
    /// Context length.
    pub context: usize,
}

/// The shapes `shoal make-model` knows.
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "smollm2-135m",
        hidden: 576,
        ffn: 1536,
        heads: 9,
        kv_heads: 3,
        blocks: 30,
        vocab: 49152,
        rope_theta: 100_000.0,
        context: 8192,
    },
    Shape {
        name: "llama2-7b",
        hidden: 4096,
        ffn: 11008,
        heads: 32,
        kv_heads: 32,
        blocks: 32,
        vocab: 32000,
        rope_theta: 10_000.0,
        context: 4096,
    },
    Shape {
        name: "llama3-8b",
        hidden: 4096,
        ffn: 14336,
        heads: 32,
        kv_heads: 8,
        blocks: 32,
        vocab: 128_256,
        rope_theta: 500_000.0,
        context: 8192,
    },
    Shape {
        name: "llama2-13b",
        hidden: 5120,
        ffn: 13824,
        heads: 40,
        kv_heads: 40,
        blocks: 40,
        vocab: 32000,
        rope_theta: 10_000.0,
        context: 4096,
    },
    Shape {
        name: "llama3-70b",
        hidden: 8192,
        ffn: 28672,
        heads: 64,
        kv_heads: 8,
        blocks: 80,
        vocab: 128_256,
        rope_theta: 500_000.0,
        context: 8192,
    },
];

/// A preset by name; hyphens do not matter (`llama-3-8b` is `llama3-8b`).
pub fn shape(name: &str) -> Option<Shape> {
    let bare = |s: &str| s.replace('-', "").to_ascii_lowercase();
    SHAPES.iter().find(|s| bare(s.name) == bare(name)).cloned()
}

/// How the weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthFormat {
    /// GGUF, matrices in Q4_0.
    GgufQ4_0,
    /// GGUF, matrices in Q8_0.
    GgufQ8_0,
    /// GGUF, matrices in F16.
    GgufF16,
    /// A Hugging Face directory of bf16 safetensors.
    SafetensorsBf16,
    /// A Hugging Face directory of f16 safetensors.
    SafetensorsF16,
}

impl SynthFormat {
    /// The format for a weight type (`q4_0`, `q8_0`, `f16`, `bf16`), written where
    /// `out` says: GGUF for a `.gguf` file, safetensors otherwise (bf16 has no GGUF
    /// form here).
    pub fn for_dtype(dtype: &str, out: &std::path::Path) -> std::result::Result<Self, String> {
        let gguf = out.extension().is_some_and(|e| e == "gguf");
        Ok(match (dtype.to_ascii_lowercase().as_str(), gguf) {
            ("q4_0", true) => SynthFormat::GgufQ4_0,
            ("q8_0", true) => SynthFormat::GgufQ8_0,
            ("f16", true) => SynthFormat::GgufF16,
            ("f16", false) => SynthFormat::SafetensorsF16,
            ("bf16", false) => SynthFormat::SafetensorsBf16,
            ("q4_0" | "q8_0", false) => {
                return Err(format!(
                    "--dtype {dtype} is written as GGUF: give --out a .gguf file"
                ))
            }
            ("bf16", true) => {
                return Err("--dtype bf16 is written as safetensors: give --out a directory".into())
            }
            _ => {
                return Err(format!(
                    "unknown --dtype `{dtype}`: q4_0, q8_0, f16 or bf16"
                ))
            }
        })
    }
}

impl FromStr for SynthFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "gguf-q4_0" => SynthFormat::GgufQ4_0,
            "gguf-q8_0" => SynthFormat::GgufQ8_0,
            "gguf-f16" => SynthFormat::GgufF16,
            "safetensors-bf16" => SynthFormat::SafetensorsBf16,
            "safetensors-f16" => SynthFormat::SafetensorsF16,
            _ => {
                return Err(format!(
                "unknown format `{s}`: gguf-q4_0, gguf-q8_0, gguf-f16, safetensors-bf16 or safetensors-f16"
            ))
            }
        })
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

/// Raw GGML bytes of a random `[rows, cols]` matrix in `dtype`.
fn ggml_matrix(rows: usize, cols: usize, dtype: GgmlDType, seed: u64) -> Result<QTensor> {
    let std = 1.0 / (cols as f32).sqrt();
    let n = rows * cols;
    let bytes: Vec<u8> = match dtype {
        GgmlDType::Q4_0 => {
            // Per 32 weights: an f16 scale, then 16 bytes of 4-bit values (-8..7).
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
        other => {
            return Err(ShardError::BadInput(format!(
                "no random {other:?} matrices"
            )))
        }
    };
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        &bytes,
        vec![rows, cols],
        &Device::Cpu,
    )?)
}

/// `(name, rows, cols)` of every matrix of block `i`, GGUF names.
fn block_matrices(s: &Shape, i: usize) -> Vec<(String, usize, usize)> {
    let hd = s.hidden / s.heads;
    let p = |n: &str| format!("blk.{i}.{n}.weight");
    vec![
        (p("attn_q"), s.heads * hd, s.hidden),
        (p("attn_k"), s.kv_heads * hd, s.hidden),
        (p("attn_v"), s.kv_heads * hd, s.hidden),
        (p("attn_output"), s.hidden, s.heads * hd),
        (p("ffn_gate"), s.ffn, s.hidden),
        (p("ffn_up"), s.ffn, s.hidden),
        (p("ffn_down"), s.hidden, s.ffn),
    ]
}

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
    if s.blocks == 0 || !s.hidden.is_multiple_of(s.heads) || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(ShardError::BadInput(format!("not a usable shape: {s:?}")));
    }
    let md = donor
        .gguf_metadata()
        .ok_or_else(|| ShardError::BadInput("the tokenizer donor must be a GGUF file".into()))?;
    let vocab = TextCodec::from_model(donor)?.vocab_size();
    match format {
        SynthFormat::GgufQ4_0 | SynthFormat::GgufQ8_0 | SynthFormat::GgufF16 => {
            let dtype = match format {
                SynthFormat::GgufQ4_0 => GgmlDType::Q4_0,
                SynthFormat::GgufQ8_0 => GgmlDType::Q8_0,
                _ => GgmlDType::F16,
            };
            write_gguf(&s, vocab, dtype, out, md, seed, &mut progress)
        }
        SynthFormat::SafetensorsBf16 | SynthFormat::SafetensorsF16 => {
            let bf = format == SynthFormat::SafetensorsBf16;
            write_safetensors(&s, vocab, bf, out, donor, seed, &mut progress)
        }
    }
}

fn write_gguf(
    s: &Shape,
    vocab: usize,
    dtype: GgmlDType,
    out: &Path,
    donor: &HashMap<String, gguf_file::Value>,
    seed: u64,
    progress: &mut impl FnMut(usize, usize),
) -> Result<()> {
    use gguf_file::Value as V;
    let ones = |n: usize| -> Result<QTensor> {
        Ok(QTensor::quantize(
            &candle_core::Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?,
            GgmlDType::F32,
        )?)
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            ggml_matrix(vocab, s.hidden, dtype, seed)?,
        ),
        ("output_norm.weight".into(), ones(s.hidden)?),
        (
            "output.weight".into(),
            ggml_matrix(vocab, s.hidden, dtype, seed + 1)?,
        ),
    ];
    for i in 0..s.blocks {
        tensors.push((format!("blk.{i}.attn_norm.weight"), ones(s.hidden)?));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), ones(s.hidden)?));
        for (j, (name, rows, cols)) in block_matrices(s, i).into_iter().enumerate() {
            let m = ggml_matrix(rows, cols, dtype, seed + 100 * (i as u64 + 1) + j as u64)?;
            tensors.push((name, m));
        }
        progress(i + 1, s.blocks);
    }
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String("llama".into())),
        (
            "general.name".into(),
            V::String(format!("random {} ({} blocks)", s.name, s.blocks)),
        ),
        ("llama.block_count".into(), V::U32(s.blocks as u32)),
        ("llama.embedding_length".into(), V::U32(s.hidden as u32)),
        ("llama.feed_forward_length".into(), V::U32(s.ffn as u32)),
        ("llama.attention.head_count".into(), V::U32(s.heads as u32)),
        (
            "llama.attention.head_count_kv".into(),
            V::U32(s.kv_heads as u32),
        ),
        (
            "llama.rope.dimension_count".into(),
            V::U32((s.hidden / s.heads) as u32),
        ),
        ("llama.rope.freq_base".into(), V::F32(s.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-5),
        ),
        ("llama.context_length".into(), V::U32(s.context as u32)),
        ("llama.vocab_size".into(), V::U32(vocab as u32)),
    ];
    let mut keys: Vec<&String> = donor
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    keys.sort();
    for k in keys {
        md.push((k.clone(), donor[k].clone()));
    }
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f =
        std::io::BufWriter::new(
            std::fs::File::create(out).map_err(|source| ShardError::Open {
                path: out.to_path_buf(),
                source,
            })?,
        );
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    f.flush().map_err(|source| ShardError::Open {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(())
}

fn write_safetensors(
    s: &Shape,
    vocab: usize,
    bf: bool,
    out: &Path,
    donor: &ModelFile,
    seed: u64,
    progress: &mut impl FnMut(usize, usize),
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let io = |source| ShardError::Open {
        path: out.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out).map_err(io)?;
    let dtype = if bf { Dtype::BF16 } else { Dtype::F16 };
    let matrix = |rows: usize, cols: usize, seed: u64| -> Vec<u8> {
        let std = 1.0 / (cols as f32).sqrt();
        if bf {
            fill(rows * cols, seed, |r| {
                bf16::from_f32(value(r, std)).to_le_bytes()
            })
            .concat()
        } else {
            fill(rows * cols, seed, |r| {
                f16::from_f32(value(r, std)).to_le_bytes()
            })
            .concat()
        }
    };
    let ones = |n: usize| -> Vec<u8> {
        let one = if bf {
            bf16::ONE.to_le_bytes()
        } else {
            f16::ONE.to_le_bytes()
        };
        one.repeat(n)
    };
    let save = |file: &str, tensors: Vec<(String, Vec<usize>, Vec<u8>)>| -> Result<()> {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, shape, bytes)| {
                TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ShardError::BadInput(format!("{n}: {e}")))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(views, None, &out.join(file))
            .map_err(|e| ShardError::BadInput(format!("writing {file}: {e}")))
    };
    let hf = crate::hf_name;
    save(
        "model-embeddings.safetensors",
        vec![
            (
                hf("token_embd.weight"),
                vec![vocab, s.hidden],
                matrix(vocab, s.hidden, seed),
            ),
            (hf("output_norm.weight"), vec![s.hidden], ones(s.hidden)),
            (
                hf("output.weight"),
                vec![vocab, s.hidden],
                matrix(vocab, s.hidden, seed + 1),
            ),
        ],
    )?;
    for i in 0..s.blocks {
        let mut tensors = vec![
            (
                hf(&format!("blk.{i}.attn_norm.weight")),
                vec![s.hidden],
                ones(s.hidden),
            ),
            (
                hf(&format!("blk.{i}.ffn_norm.weight")),
                vec![s.hidden],
                ones(s.hidden),
            ),
        ];
        for (j, (name, rows, cols)) in block_matrices(s, i).into_iter().enumerate() {
            let m = matrix(rows, cols, seed + 100 * (i as u64 + 1) + j as u64);
            tensors.push((hf(&name), vec![rows, cols], m));
        }
        save(&format!("model-block-{i:04}.safetensors"), tensors)?;
        progress(i + 1, s.blocks);
    }
    let text = TextCodec::from_model(donor)?;
    let stop = text.stop_ids().first().copied().unwrap_or(0);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.blocks,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": vocab,
        "rope_theta": s.rope_theta,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": s.context,
        "tie_word_embeddings": false,
        "eos_token_id": stop,
        "torch_dtype": if bf { "bfloat16" } else { "float16" },
    });
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        std::fs::write(out.join(name), v.to_string()).map_err(io)
    };
    write_json("config.json", &config)?;
    write_json(
        "generation_config.json",
        &serde_json::json!({"eos_token_id": stop}),
    )?;
    std::fs::write(out.join("tokenizer.json"), text.tokenizer_json()?).map_err(io)?;
    Ok(())
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
        assert_eq!(
            SynthFormat::for_dtype("q4_0", gguf),
            Ok(SynthFormat::GgufQ4_0)
        );
        assert_eq!(
            SynthFormat::for_dtype("Q8_0", gguf),
            Ok(SynthFormat::GgufQ8_0)
        );
        assert_eq!(
            SynthFormat::for_dtype("f16", gguf),
            Ok(SynthFormat::GgufF16)
        );
        assert_eq!(
            SynthFormat::for_dtype("f16", dir),
            Ok(SynthFormat::SafetensorsF16)
        );
        assert_eq!(
            SynthFormat::for_dtype("bf16", dir),
            Ok(SynthFormat::SafetensorsBf16)
        );
        assert!(SynthFormat::for_dtype("q4_0", dir).is_err_and(|e| e.contains(".gguf")));
        assert!(SynthFormat::for_dtype("bf16", gguf).is_err());
        assert!(SynthFormat::for_dtype("int3", gguf).is_err_and(|e| e.contains("q4_0")));
    }
}
