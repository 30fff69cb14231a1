//! GGUF files of random weights, written as they are drawn.
//!
//! The tensors are planned first (name, shape, type, how to fill them), which is all
//! the header needs; then each tensor's bytes are drawn, written and dropped. Memory
//! stays at the largest tensor (a block's stack of experts), so a file as large as the
//! disk allows can be written on a machine with a few GB.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use rand::Rng;

use super::{
    block_matrices, fill, ggml_bytes, GgufWeights, Shape, DECISIVE_HEAD, EMBEDDING_WEIGHT,
    GEMMA_POST_NORM,
};
use crate::gguf::{TensorType, Widened, MXFP4_VALUES};
use crate::{Arch, Result, ShardError};

/// How a planned tensor's values are made.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Random, of standard deviation about `std`, from `seed`.
    Random { std: f32, seed: u64 },
    /// Every value the same (norm weights).
    Constant(f32),
}

/// A tensor of the file, before its values exist.
#[derive(Debug)]
struct Planned {
    name: String,
    /// Outermost first: `[n]`, `[rows, cols]`, or `[experts, rows, cols]`.
    dims: Vec<usize>,
    dtype: TensorType,
    fill: Fill,
    /// The block it belongs to, for progress.
    block: Option<usize>,
}

impl Planned {
    /// A matrix (or a stack of `experts`) in `dtype` where its blocks divide `cols`,
    /// else Q8_0 or F16, as llama.cpp's quantiser falls back.
    fn matrix(
        name: String,
        experts: Option<usize>,
        [rows, cols]: [usize; 2],
        dtype: impl Into<TensorType>,
        fill: Fill,
    ) -> Planned {
        let dtype = dtype.into();
        let dtype = if cols.is_multiple_of(dtype.stored_block().0) {
            dtype
        } else if cols.is_multiple_of(32) {
            TensorType::Candle(GgmlDType::Q8_0)
        } else {
            TensorType::Candle(GgmlDType::F16)
        };
        let mut dims = experts.map_or(Vec::new(), |n| vec![n]);
        dims.extend([rows, cols]);
        Planned {
            name,
            dims,
            dtype,
            fill,
            block: None,
        }
    }

    /// A vector of F32 values (norms, biases, sinks).
    fn vector(name: String, n: usize, fill: Fill) -> Planned {
        Planned {
            name,
            dims: vec![n],
            dtype: TensorType::Candle(GgmlDType::F32),
            fill,
            block: None,
        }
    }

    fn bytes_len(&self) -> usize {
        self.dtype.stored_bytes(self.dims.iter().product())
    }

    /// The tensor's bytes. A stack of experts draws each from its own seed.
    fn bytes(&self) -> Result<Vec<u8>> {
        let cols = *self.dims.last().unwrap_or(&1);
        match self.fill {
            Fill::Constant(v) => {
                let n: usize = self.dims.iter().product();
                Ok(v.to_le_bytes().repeat(n))
            }
            Fill::Random { std, seed } => {
                let draw = |rows, seed| match self.dtype {
                    TensorType::Candle(t) => ggml_bytes(rows, cols, t, std, seed),
                    TensorType::Widened(Widened::Mxfp4) => Ok(mxfp4_bytes(rows * cols, std, seed)),
                    TensorType::Widened(other) => Err(ShardError::BadInput(format!(
                        "make-model does not write {other:?}"
                    ))),
                };
                match self.dims[..] {
                    [n, rows, _] => Ok((0..n)
                        .map(|e| draw(rows, seed ^ ((e as u64 + 1) << 40)))
                        .collect::<Result<Vec<_>>>()?
                        .concat()),
                    _ => draw(self.dims.iter().product::<usize>() / cols, seed),
                }
            }
        }
    }
}

/// Every tensor of a model of shape `s`, in file order.
fn plan(s: &Shape, vocab: usize, weights: GgufWeights, seed: u64) -> Vec<Planned> {
    let plain = 1.0 / (s.hidden as f32).sqrt();
    let ones = |name: String, n: usize| Planned::vector(name, n, Fill::Constant(1.0));
    let random = |std, seed| Fill::Random { std, seed };
    let mut out = vec![
        Planned::matrix(
            "token_embd.weight".into(),
            None,
            [vocab, s.hidden],
            // A tied embedding is the LM head too, typed as one (as llama.cpp's
            // quantiser does).
            weights.type_for(
                if s.arch.gemma() {
                    "output.weight"
                } else {
                    "token_embd.weight"
                },
                None,
                s.blocks,
            ),
            random(plain * EMBEDDING_WEIGHT, seed),
        ),
        ones("output_norm.weight".into(), s.hidden),
    ];
    // Gemma ties its LM head to the embeddings (llama.cpp ignores an output.weight in
    // a Gemma 2 file); the embeddings' scale keeps its logits decisive.
    if !s.arch.gemma() {
        out.push(Planned::matrix(
            "output.weight".into(),
            None,
            [vocab, s.hidden],
            weights.type_for("output.weight", None, s.blocks),
            random(plain * DECISIVE_HEAD, seed + 1),
        ));
    }
    for i in 0..s.blocks {
        let first = out.len();
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        let b = |n: &str| format!("blk.{i}.{n}.bias");
        // Biases and other small vectors: F32, small values, seeds apart from the
        // matrices'.
        let small = |k: u64| -> Fill { random(0.1, seed + 100 * (i as u64 + 1) + k) };
        let experts = s.experts.as_ref().filter(|_| i >= s.dense_lead);
        out.push(ones(p("attn_norm"), s.hidden));
        // gpt-oss and GLM-4.5 name their MLP's norm for the attention it follows.
        let ffn_norm = if matches!(s.arch, Arch::GptOss | Arch::Glm4Moe) {
            "post_attention_norm"
        } else {
            "ffn_norm"
        };
        out.push(ones(p(ffn_norm), s.hidden));
        let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        if s.arch == Arch::GptOss {
            // Biases on every projection and router, and a sink logit per head.
            let v = |name, n, k: u64| Planned::vector(name, n, small(50 + k));
            out.push(v(b("attn_q"), q, 0));
            out.push(v(b("attn_k"), kv, 1));
            out.push(v(b("attn_v"), kv, 2));
            out.push(v(b("attn_output"), s.hidden, 3));
            out.push(v(p("attn_sinks"), s.heads, 4));
            if let Some(e) = experts {
                out.push(v(b("ffn_gate_inp"), e.count, 5));
                let m = |name, width, k: u64| {
                    Planned::matrix(name, None, [e.count, width], GgmlDType::F32, small(50 + k))
                };
                out.push(m(b("ffn_gate_exps"), e.ffn, 6));
                out.push(m(b("ffn_up_exps"), e.ffn, 7));
                out.push(m(b("ffn_down_exps"), s.hidden, 8));
            }
        }
        if s.arch.qk_norm() {
            out.push(ones(p("attn_q_norm"), s.head_dim));
            out.push(ones(p("attn_k_norm"), s.head_dim));
        }
        if s.arch.gemma() {
            // GGUF stores Gemma's norms with the +1 of its (1 + w) already added.
            let post = |name| Planned::vector(name, s.hidden, Fill::Constant(GEMMA_POST_NORM));
            out.push(post(p("post_attention_norm")));
            out.push(post(p("post_ffw_norm")));
        }
        if s.arch == Arch::Glm4Moe {
            out.push(Planned::vector(b("attn_q"), q, small(60)));
            out.push(Planned::vector(b("attn_k"), kv, small(61)));
            out.push(Planned::vector(b("attn_v"), kv, small(62)));
        }
        if let Some(l) = &s.latent {
            if l.attn.q_lora > 0 {
                out.push(ones(p("attn_q_a_norm"), l.attn.q_lora));
            }
            out.push(ones(p("attn_kv_a_norm"), l.attn.kv_lora));
        }
        // The selection bias of sigmoid routers (GLM-4.5, DeepSeek-V3).
        if let Some(e) = experts.filter(|e| e.sigmoid) {
            out.push(Planned::vector(b("exp_probs_b"), e.count, small(63)));
        }
        if let Some(e) = experts {
            // Routers stay F32, as llama.cpp's quantiser leaves them.
            out.push(Planned::matrix(
                p("ffn_gate_inp"),
                None,
                [e.count, s.hidden],
                GgmlDType::F32,
                random(plain, seed + 100 * (i as u64 + 1) + 99),
            ));
        }
        for (j, m) in block_matrices(s, i).into_iter().enumerate() {
            let dtype = match weights {
                GgufWeights::Mxfp4Moe if m.experts.is_some() => TensorType::Widened(Widened::Mxfp4),
                _ => TensorType::Candle(weights.type_for(&m.name, Some(i), s.blocks)),
            };
            let std = 1.0 / (m.cols as f32).sqrt();
            let seed = seed + 100 * (i as u64 + 1) + j as u64;
            out.push(Planned::matrix(
                m.name,
                m.experts,
                [m.rows, m.cols],
                dtype,
                random(std, seed),
            ));
        }
        for t in &mut out[first..] {
            t.block = Some(i);
        }
    }
    out
}

/// Random MXFP4 blocks of `n` values of standard deviation about `std`: per 32
/// values a power-of-two scale (E8M0) and 16 bytes of random 4-bit indices into the
/// E2M1 values.
fn mxfp4_bytes(n: usize, std: f32, seed: u64) -> Vec<u8> {
    let mean_square = MXFP4_VALUES
        .iter()
        .map(|&v| f32::from(v).powi(2))
        .sum::<f32>()
        / MXFP4_VALUES.len() as f32;
    // The table holds doubled values: a block's values are table * 2^(e - 128).
    let e = (128.0 + (std / mean_square.sqrt()).log2().round()).clamp(1.0, 254.0) as u8;
    fill(n / 32, seed, |rng| {
        let mut b = [0u8; 17];
        b[0] = e;
        rng.fill_bytes(&mut b[1..]);
        b
    })
    .concat()
}

/// The file's metadata: the shape under `{arch}.*` keys as llama.cpp names them, and
/// the donor's tokenizer.
fn metadata(s: &Shape, vocab: usize, donor: &HashMap<String, Value>) -> Vec<(String, Value)> {
    let arch = s.arch.gguf_name();
    let u = |n: usize| Value::U32(n as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(format!("random {} ({} blocks)", s.name, s.blocks)),
        ),
    ];
    // Latent attention (DeepSeek): files for llama.cpp's MLA path give the cached
    // row's width as key_length and the query head's as key_length_mla.
    let (kv_heads, key, value) = match &s.latent {
        Some(l) if l.mla => (1, l.attn.kv_lora + s.rope_dims, l.attn.kv_lora),
        Some(l) => (s.heads, s.head_dim, l.attn.v),
        None => (s.kv_heads, s.head_dim, s.head_dim),
    };
    let mut keyed = vec![
        ("block_count", u(s.blocks)),
        ("embedding_length", u(s.hidden)),
        ("feed_forward_length", u(s.ffn)),
        ("attention.head_count", u(s.heads)),
        ("attention.head_count_kv", u(kv_heads)),
        ("attention.key_length", u(key)),
        ("attention.value_length", u(value)),
        (
            "rope.dimension_count",
            u(if s.rope_dims > 0 {
                s.rope_dims
            } else {
                s.head_dim
            }),
        ),
        ("rope.freq_base", Value::F32(s.rope_theta)),
        ("attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("context_length", u(s.context)),
        ("vocab_size", u(vocab)),
    ];
    if s.window > 0 {
        keyed.push(("attention.sliding_window", u(s.window)));
    }
    if let Some((factor, original)) = s.yarn {
        keyed.push(("rope.scaling.type", Value::String("yarn".into())));
        keyed.push(("rope.scaling.factor", Value::F32(factor)));
        keyed.push(("rope.scaling.original_context_length", u(original)));
    }
    if s.arch == Arch::Gemma2 {
        // Gemma 2's published caps.
        keyed.push(("attn_logit_softcapping", Value::F32(50.0)));
        keyed.push(("final_logit_softcapping", Value::F32(30.0)));
    }
    if let Some(l) = &s.latent {
        keyed.push(("attention.q_lora_rank", u(l.attn.q_lora)));
        keyed.push(("attention.kv_lora_rank", u(l.attn.kv_lora)));
        if l.mla {
            keyed.push(("attention.key_length_mla", u(s.head_dim)));
            keyed.push(("attention.value_length_mla", u(l.attn.v)));
        }
        // Stored a tenth of mscale_all_dim, as llama.cpp's converter does.
        keyed.push((
            "rope.scaling.yarn_log_multiplier",
            Value::F32(0.1 * l.mscale_all_dim),
        ));
    }
    if let Some(e) = &s.experts {
        if s.arch == Arch::DeepSeek2 {
            keyed.push(("expert_shared_count", u(e.shared)));
            keyed.push(("leading_dense_block_count", u(s.dense_lead)));
            keyed.push(("expert_weights_scale", Value::F32(e.scale)));
            keyed.push(("expert_weights_norm", Value::Bool(e.normalize)));
            keyed.push(("expert_gating_func", u(if e.sigmoid { 2 } else { 1 })));
            keyed.push(("expert_group_count", u(e.groups)));
            keyed.push(("expert_group_used_count", u(e.groups_used)));
        }
        if s.arch == Arch::Glm4Moe {
            keyed.push(("expert_shared_count", u(e.shared)));
            keyed.push(("leading_dense_block_count", u(s.dense_lead)));
            keyed.push(("expert_weights_scale", Value::F32(e.scale)));
            keyed.push(("expert_weights_norm", Value::Bool(e.normalize)));
            // llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID.
            keyed.push(("expert_gating_func", u(if e.sigmoid { 2 } else { 1 })));
            keyed.push(("nextn_predict_layers", u(0)));
        }
        keyed.push(("expert_count", u(e.count)));
        keyed.push(("expert_used_count", u(e.used)));
        if s.arch != Arch::Llama {
            keyed.push(("expert_feed_forward_length", u(e.ffn)));
        }
    }
    md.extend(keyed.into_iter().map(|(k, v)| (format!("{arch}.{k}"), v)));
    let mut keys: Vec<&String> = donor
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    keys.sort();
    for k in keys {
        md.push((k.clone(), donor[k].clone()));
    }
    md
}

pub(super) fn write_gguf(
    s: &Shape,
    vocab: usize,
    weights: GgufWeights,
    out: &Path,
    donor: &HashMap<String, Value>,
    seed: u64,
    progress: &mut impl FnMut(usize, usize),
) -> Result<()> {
    let io = |source| ShardError::Open {
        path: out.to_path_buf(),
        source,
    };
    let tensors = plan(s, vocab, weights, seed);
    let file = std::fs::File::create(out).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    write_header(&mut w, &metadata(s, vocab, donor), &tensors).map_err(io)?;
    for (k, t) in tensors.iter().enumerate() {
        let bytes = t.bytes()?;
        debug_assert_eq!(bytes.len(), t.bytes_len());
        w.write_all(&bytes).map_err(io)?;
        w.write_all(&vec![0u8; padding(bytes.len())]).map_err(io)?;
        let block_done = tensors.get(k + 1).is_none_or(|n| n.block != t.block);
        if let (Some(i), true) = (t.block, block_done) {
            progress(i + 1, s.blocks);
        }
    }
    w.flush().map_err(io)
}

/// GGUF aligns every tensor's data to this many bytes (the default `general.alignment`).
const ALIGNMENT: usize = 32;

fn padding(len: usize) -> usize {
    (ALIGNMENT - len % ALIGNMENT) % ALIGNMENT
}

/// GGUF version 3's header: magic, counts, metadata, tensor infos (dimensions
/// innermost first, as ggml orders them), and padding up to the data.
fn write_header(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[Planned],
) -> std::io::Result<()> {
    let mut header = Vec::new();
    header.extend(b"GGUF");
    header.extend(3u32.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend(value_type(value).to_le_bytes());
        put_value(&mut header, value)?;
    }
    let mut offset = 0;
    for t in tensors {
        put_string(&mut header, &t.name);
        header.extend((t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            header.extend((d as u64).to_le_bytes());
        }
        let id = crate::gguf::ggml_type_id(t.dtype)
            .ok_or_else(|| std::io::Error::other(format!("{:?} has no ggml type id", t.dtype)))?;
        header.extend(id.to_le_bytes());
        header.extend((offset as u64).to_le_bytes());
        offset += t.bytes_len() + padding(t.bytes_len());
    }
    header.resize(header.len() + padding(header.len()), 0);
    w.write_all(&header)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF's code for a value's type.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An array holds one type; an empty one may name any.
            let ty = items.first().map_or(4, value_type);
            if items.iter().any(|x| value_type(x) != ty) {
                return Err(std::io::Error::other("a metadata array mixes value types"));
            }
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, x)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the streaming writer puts down reads back, through candle's own GGUF
    /// reader, as the tensors and metadata planned.
    #[test]
    fn streamed_files_read_back_as_planned() {
        let mut shape = super::super::shape("tiny-glm4moe").expect("test step");
        shape.blocks = 2;
        let dir = std::env::temp_dir().join(format!("shoal-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test step");
        let path = dir.join("m.gguf");
        let mut donor = HashMap::new();
        donor.insert(
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        );
        let weights = GgufWeights::Q4KM;
        let mut blocks_done = Vec::new();
        write_gguf(&shape, 512, weights, &path, &donor, 7, &mut |d, _| {
            blocks_done.push(d)
        })
        .expect("test step");
        assert_eq!(blocks_done, [1, 2]);
        let mut f = std::fs::File::open(&path).expect("test step");
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).expect("test step");
        let planned = plan(&shape, 512, weights, 7);
        assert_eq!(content.tensor_infos.len(), planned.len());
        for t in &planned {
            let info = &content.tensor_infos[&t.name];
            assert_eq!(info.shape.dims(), &t.dims[..], "{}", t.name);
            assert_eq!(TensorType::Candle(info.ggml_dtype), t.dtype, "{}", t.name);
            let read = content.tensor(&mut f, &t.name, &candle_core::Device::Cpu);
            assert_eq!(
                read.expect("test step").data().expect("test step").as_ref(),
                &t.bytes().expect("test step")[..]
            );
        }
        let md = &content.metadata;
        assert_eq!(md["glm4moe.block_count"].to_u32().expect("test step"), 2);
        assert_eq!(
            md["tokenizer.ggml.tokens"]
                .to_vec()
                .expect("test step")
                .len(),
            2
        );
        std::fs::remove_dir_all(dir).expect("test step");
    }

    /// Random MXFP4 weights have about the spread asked for.
    #[test]
    fn mxfp4_weights_have_the_spread_asked_for() {
        for std in [0.02f32, 0.5] {
            let bytes = mxfp4_bytes(32 * 1024, std, 3);
            let values = crate::gguf::dequantize_widened(Widened::Mxfp4, &bytes);
            let rms = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
            assert!(rms > std / 1.5 && rms < std * 1.5, "{rms} for {std}");
        }
    }
}
