//! The tiny Llama-family model the shard tests write: its shape, its random weights
//! (the same every run) and a GGUF writer.

#![allow(dead_code)]

use std::path::Path;

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Shape, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

pub(crate) const HIDDEN: usize = 64;
pub(crate) const HEADS: usize = 4;
pub(crate) const KV_HEADS: usize = 2;
pub(crate) const HEAD_DIM: usize = HIDDEN / HEADS;
pub(crate) const FFN: usize = 128;
pub(crate) const LAYERS: usize = 4;
pub(crate) const VOCAB: usize = 96;
pub(crate) const EPS: f32 = 1e-5;
pub(crate) const THETA: f32 = 10_000.0;

/// Normal samples drawn from `rng`. The tiny models come from a fixed seed, so every
/// run writes the same ones and a tolerance that holds once holds every time (candle's
/// CPU `randn` cannot be seeded: with fresh weights each run, the bf16 check below drew
/// a model outside its bound about once in a hundred runs).
pub(crate) fn randn(rng: &mut StdRng, shape: impl Into<Shape>, std: f32) -> Result<Tensor> {
    let shape = shape.into();
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            // Box-Muller: two uniforms, one normal.
            let u: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let v: f32 = rng.random();
            std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Random weights of the tiny model (the same every run), by GGUF name, row-major
/// `[out, in]`.
pub(crate) fn weights(tied: bool) -> Result<Vec<(String, Tensor)>> {
    let rng = std::cell::RefCell::new(StdRng::seed_from_u64(1));
    let mut w = Vec::new();
    let mat = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
        randn(&mut rng.borrow_mut(), (rows, cols), scale)
    };
    let norm = || -> Result<Tensor> { Ok((randn(&mut rng.borrow_mut(), HIDDEN, 0.1)? + 1.0)?) };
    w.push(("token_embd.weight".to_string(), mat(VOCAB, HIDDEN, 1.0)?));
    w.push(("output_norm.weight".to_string(), norm()?));
    if !tied {
        w.push(("output.weight".to_string(), mat(VOCAB, HIDDEN, 0.2)?));
    }
    for i in 0..LAYERS {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        w.push((p("attn_norm"), norm()?));
        w.push((p("ffn_norm"), norm()?));
        w.push((p("attn_q"), mat(HEADS * HEAD_DIM, HIDDEN, 0.25)?));
        w.push((p("attn_k"), mat(KV_HEADS * HEAD_DIM, HIDDEN, 0.25)?));
        w.push((p("attn_v"), mat(KV_HEADS * HEAD_DIM, HIDDEN, 0.25)?));
        w.push((p("attn_output"), mat(HIDDEN, HEADS * HEAD_DIM, 0.15)?));
        w.push((p("ffn_gate"), mat(FFN, HIDDEN, 0.2)?));
        w.push((p("ffn_up"), mat(FFN, HIDDEN, 0.2)?));
        w.push((p("ffn_down"), mat(HIDDEN, FFN, 0.15)?));
    }
    Ok(w)
}

/// Writes a tiny GGUF; matrices in `dtype`, norms in f32.
pub(crate) fn write_gguf(path: &Path, dtype: GgmlDType, tied: bool) -> Result<()> {
    write_gguf_with(path, dtype, tied, Vec::new())
}

/// [`write_gguf`] with extra metadata (a tokenizer, say).
pub(crate) fn write_gguf_with(
    path: &Path,
    dtype: GgmlDType,
    tied: bool,
    extra: Vec<(&str, gguf_file::Value)>,
) -> Result<()> {
    let mut qs = Vec::new();
    for (name, t) in weights(tied)? {
        let q = if t.rank() == 2 {
            QTensor::quantize(&t, dtype)?
        } else {
            QTensor::quantize(&t, GgmlDType::F32)?
        };
        qs.push((name, q));
    }
    use gguf_file::Value as V;
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("general.name", V::String("tiny".into())),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(FFN as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.rope.dimension_count", V::U32(HEAD_DIM as u32)),
        ("llama.rope.freq_base", V::F32(THETA)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(EPS)),
        ("llama.context_length", V::U32(256)),
    ];
    let md: Vec<(&str, V)> = md.into_iter().chain(extra).collect();
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}
