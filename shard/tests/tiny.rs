//! Tiny Llama-family models written by the tests themselves, in GGUF and in Hugging Face
//! safetensors form, checked two ways:
//! - a model split into spans computes what the whole model computes in one piece;
//! - our blocks agree with candle-transformers' independent implementations
//!   (`quantized_llama` for GGUF, `llama` for safetensors) on every position.

use std::path::Path;

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use shard::{Head, KvCache, ModelFile, Span};

mod common;
use common::*;

/// Writes a tiny Hugging Face directory (config.json + model.safetensors) in `dtype`.
fn write_hf(dir: &Path, dtype: DType, tied: bool) -> Result<()> {
    write_hf_arch(dir, dtype, tied, false)
}

/// [`write_hf`] for Llama, or for Qwen2 (`qwen2`: biases on Q, K and V).
fn write_hf_arch(dir: &Path, dtype: DType, tied: bool, qwen2: bool) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut map = std::collections::HashMap::new();
    for (name, t) in weights(tied)? {
        map.insert(shard::hf_name(&name), t.to_dtype(dtype)?);
    }
    if qwen2 {
        let mut rng = StdRng::seed_from_u64(2);
        for i in 0..LAYERS {
            for (proj, width) in [("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)] {
                let b = randn(&mut rng, width * HEAD_DIM, 0.5)?;
                map.insert(
                    format!("model.layers.{i}.self_attn.{proj}_proj.bias"),
                    b.to_dtype(dtype)?,
                );
            }
        }
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": EPS, "rope_theta": THETA, "max_position_embeddings": 256,
        "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2
    });
    if qwen2 {
        config["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        config["model_type"] = serde_json::json!("qwen2");
        config["sliding_window"] = serde_json::json!(256);
        config["max_window_layers"] = serde_json::json!(LAYERS);
        config["use_sliding_window"] = serde_json::json!(false);
        config["hidden_act"] = serde_json::json!("silu");
    }
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(())
}

const PROMPT: [u32; 7] = [1, 17, 42, 5, 88, 23, 60];
const DECODE: [u32; 3] = [9, 71, 33];

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Runs the prompt then three decode steps through the given spans in order (each span
/// with its own cache, like servers of a chain); returns the final hidden states of
/// every step, concatenated `[prompt + decode, hidden]`.
fn run_chain(head: &Head, spans: &[Span]) -> Result<Tensor> {
    let mut caches: Vec<_> = spans.iter().map(|s| s.new_cache(64)).collect();
    let mut outs = Vec::new();
    let mut step = |ids: &[u32]| -> Result<()> {
        let mut h = head.embed(ids)?;
        for (s, c) in spans.iter().zip(caches.iter_mut()) {
            h = s.forward(&h, c)?;
        }
        outs.push(h);
        Ok(())
    };
    step(&PROMPT)?;
    for t in DECODE {
        step(&[t])?;
    }
    Ok(Tensor::cat(&outs, 0)?)
}

fn check_spans_match_whole(file: &ModelFile) -> Result<()> {
    let dev = Device::Cpu;
    let head = Head::load(file, &dev)?;
    let whole = run_chain(&head, &[Span::load(file, 0, LAYERS, &dev, |_, _| {})?])?;
    for cuts in [vec![0, 2, 4], vec![0, 1, 3, 4], vec![0, 1, 2, 3, 4]] {
        let spans: Vec<Span> = cuts
            .windows(2)
            .map(|w| Span::load(file, w[0], w[1], &dev, |_, _| {}))
            .collect::<Result<_, _>>()?;
        let split = run_chain(&head, &spans)?;
        let d = max_diff(&whole, &split)?;
        assert!(
            d <= 1e-5,
            "spans {cuts:?} differ from the whole model by {d}"
        );
    }
    // A session may run a sub-span of what a server loaded.
    let big = Span::load(file, 0, LAYERS, &dev, |_, _| {})?;
    let mut c1 = big.new_cache_for(0, 3, 64)?;
    let mut c2 = big.new_cache_for(3, 4, 64)?;
    let h = big.forward(&head.embed(&PROMPT)?, &mut c1)?;
    let h = big.forward(&h, &mut c2)?;
    let d = max_diff(&whole.i(0..PROMPT.len())?, &h)?;
    assert!(d <= 1e-5, "sub-span caches differ by {d}");
    Ok(())
}

#[test]
fn gguf_spans_equal_the_whole_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (dtype, tied) in [
        (GgmlDType::Q8_0, false),
        (GgmlDType::Q4_0, true),
        (GgmlDType::F16, false),
    ] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        write_gguf(&path, dtype, tied)?;
        check_spans_match_whole(&ModelFile::open(&path)?)?;
    }
    Ok(())
}

#[test]
fn safetensors_spans_equal_the_whole_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (dtype, tied) in [
        (DType::F32, false),
        (DType::BF16, true),
        (DType::F16, false),
    ] {
        let path = dir.path().join(format!("tiny-{dtype:?}"));
        write_hf(&path, dtype, tied)?;
        check_spans_match_whole(&ModelFile::open(&path)?)?;
    }
    Ok(())
}

/// Three sessions at different positions, stepped as one batch (one of them with
/// several tokens), give what each gives stepped alone.
fn check_batch_matches_separate(file: &ModelFile, tol: f32) -> Result<()> {
    let dev = Device::Cpu;
    let head = Head::load(file, &dev)?;
    let span = Span::load(file, 0, LAYERS, &dev, |_, _| {})?;
    let histories: [&[u32]; 3] = [&PROMPT, &PROMPT[..2], &DECODE];
    // Each session's cache after its history, and the batch of `steps` over them.
    let primed = || -> Result<Vec<KvCache>> {
        let mut caches = Vec::new();
        for history in histories {
            let mut cache = span.new_cache(64);
            span.forward(&head.embed(history)?, &mut cache)?;
            caches.push(cache);
        }
        Ok(caches)
    };
    let batch = |steps: &[&[u32]], caches: &mut Vec<KvCache>| -> Result<Vec<Tensor>> {
        let inputs: Vec<Tensor> = steps
            .iter()
            .map(|s| head.embed(s))
            .collect::<Result<_, _>>()?;
        Ok(span.forward_batch(inputs.iter().zip(caches.iter_mut()).collect())?)
    };
    let steps: [&[u32]; 3] = [&[9], &[4, 50, 61], &[12]];
    let mut alone = Vec::new();
    for (mut cache, step) in primed()?.into_iter().zip(steps) {
        alone.push(span.forward(&head.embed(step)?, &mut cache)?);
    }
    let mut batch_caches = primed()?;
    let batched = batch(&steps, &mut batch_caches)?;
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        let d = max_diff(a, b)?;
        assert!(d <= tol, "session {i}: batched differs from alone by {d}");
    }
    for (cache, (history, step)) in batch_caches.iter().zip(histories.iter().zip(steps)) {
        assert_eq!(cache.len(), history.len() + step.len());
    }
    // Every session one token: the plain-Rust decode path (rope, cache and attention
    // from slices). Sessions 0 and 2 took the general tensor path in the mixed batch
    // above, with the same steps: the two paths must agree.
    let decoded = batch(&[&[9], &[4], &[12]], &mut primed()?)?;
    for i in [0, 2] {
        let d = max_diff(&decoded[i], &batched[i])?;
        assert!(
            d <= tol,
            "session {i}: decode path differs from general by {d}"
        );
    }
    // Caches over different blocks cannot share a batch.
    let mut c1 = span.new_cache_for(0, 2, 64)?;
    let mut c2 = span.new_cache(64);
    let x = head.embed(&[1])?;
    assert!(span
        .forward_batch(vec![(&x, &mut c1), (&x, &mut c2)])
        .is_err());
    Ok(())
}

#[test]
fn batched_sessions_equal_separate_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F16] {
        let path = dir.path().join(format!("batch-{dtype:?}.gguf"));
        write_gguf(&path, dtype, true)?;
        // Our kernels compute each row the same way in any batch: equal. candle's dense
        // matmul blocks a many-row product differently: equal to rounding.
        let tol = if dtype == GgmlDType::F16 { 1e-4 } else { 0.0 };
        check_batch_matches_separate(&ModelFile::open(&path)?, tol)?;
    }
    let path = dir.path().join("batch-hf");
    write_hf(&path, DType::F32, false)?;
    check_batch_matches_separate(&ModelFile::open(&path)?, 1e-4)
}

/// Our logits at every position, from a prefill and from token-by-token decoding.
fn our_logits(file: &ModelFile, ids: &[u32]) -> Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let head = Head::load(file, &dev)?;
    let span = Span::load(file, 0, LAYERS, &dev, |_, _| {})?;
    let mut cache = span.new_cache(64);
    let prefill = head.logits(&span.forward(&head.embed(ids)?, &mut cache)?)?;
    let mut cache = span.new_cache(64);
    let mut rows = Vec::new();
    for &id in ids {
        rows.push(head.logits(&span.forward(&head.embed(&[id])?, &mut cache)?)?);
    }
    Ok((prefill, Tensor::cat(&rows, 0)?))
}

fn assert_agree(name: &str, ours: &Tensor, reference: &Tensor, tol: f32) -> Result<()> {
    let d = max_diff(ours, reference)?;
    let a = ours.argmax(1)?.to_vec1::<u32>()?;
    let b = reference.argmax(1)?.to_vec1::<u32>()?;
    assert_eq!(a, b, "{name}: argmax differs (max abs diff {d})");
    assert!(d <= tol, "{name}: max abs diff {d} > {tol}");
    Ok(())
}

#[test]
fn gguf_agrees_with_candle_quantized_llama() -> Result<()> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let dir = tempfile::tempdir()?;
    let ids: Vec<u32> = PROMPT.iter().chain(DECODE.iter()).copied().collect();
    for (dtype, tied) in [
        (GgmlDType::Q8_0, false),
        (GgmlDType::F32, true),
        (GgmlDType::Q4_0, false),
    ] {
        let path = dir.path().join(format!("ref-{dtype:?}.gguf"));
        write_gguf(&path, dtype, tied)?;
        let mut f = std::fs::File::open(&path)?;
        let ct = gguf_file::Content::read(&mut f)?;
        let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu)?;
        let mut rows = Vec::new();
        for (pos, &id) in ids.iter().enumerate() {
            let x = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
            rows.push(reference.forward(&x, pos)?);
        }
        let reference = Tensor::cat(&rows, 0)?;
        let (prefill, stepwise) = our_logits(&ModelFile::open(&path)?, &ids)?;
        // Token by token, both quantise activations as ggml does; our kernels sum in
        // another order (products agree to ~1e-5), which can flip the 8-bit rounding of
        // an activation a few blocks later: close, not equal. Unquantised: equal.
        let tol = if dtype == GgmlDType::F32 { 1e-3 } else { 0.25 };
        assert_agree(&format!("{dtype:?} stepwise"), &stepwise, &reference, tol)?;
        // A prefill multiplies many rows at once, which candle quantises differently
        // from a single row; the result stays close.
        let tol = if dtype == GgmlDType::F32 { 1e-3 } else { 0.25 };
        assert_agree(&format!("{dtype:?} prefill"), &prefill, &reference, tol)?;
    }
    Ok(())
}

/// A long session: the cache grows (64, 128, then the session's 160 positions) while
/// stepping token by token, and every position still agrees with candle's reference.
/// Midway it waits as a conversation's session does between turns: its limit shrunk
/// to the tokens it holds (its buffers cut to them), then raised again.
#[test]
fn growing_caches_agree_with_candle_quantized_llama() -> Result<()> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("long.gguf");
    write_gguf(&path, GgmlDType::F32, true)?;
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % VOCAB as u32).collect();
    let mut f = std::fs::File::open(&path)?;
    let ct = gguf_file::Content::read(&mut f)?;
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu)?;
    let file = ModelFile::open(&path)?;
    let head = Head::load(&file, &Device::Cpu)?;
    let span = Span::load(&file, 0, LAYERS, &Device::Cpu, |_, _| {})?;
    let mut cache = span.new_cache(160);
    for (pos, &id) in ids.iter().enumerate() {
        if pos == 100 {
            let before = cache.bytes();
            assert!(cache.set_max_len(99).is_err(), "below the tokens held");
            cache.set_max_len(100)?;
            assert!(
                cache.bytes() < before,
                "{} bytes, {before} before",
                cache.bytes()
            );
            let e = span
                .forward(&head.embed(&[id])?, &mut cache)
                .expect_err("past the limit");
            assert!(e.to_string().contains("exceeds the limit"), "{e}");
            cache.set_max_len(160)?;
        }
        let x = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
        let want = reference.forward(&x, pos)?;
        let got = head.logits(&span.forward(&head.embed(&[id])?, &mut cache)?)?;
        let d = max_diff(&got, &want)?;
        assert!(d <= 1e-3, "position {pos}: max abs diff {d}");
    }
    assert_eq!(cache.len(), 150);
    Ok(())
}

#[test]
fn safetensors_agrees_with_candle_llama() -> Result<()> {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let dir = tempfile::tempdir()?;
    let ids: Vec<u32> = PROMPT.iter().chain(DECODE.iter()).copied().collect();
    for tied in [false, true] {
        let path = dir.path().join(format!("ref-{tied}"));
        write_hf(&path, DType::F32, tied)?;
        let cfg: LlamaConfig =
            serde_json::from_str(&std::fs::read_to_string(path.join("config.json"))?)?;
        let cfg = cfg.into_config(false);
        // SAFETY: a file this test just wrote and nobody modifies.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[path.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )?
        };
        let model = Llama::load(vb, &cfg)?;
        let mut cache = Cache::new(true, DType::F32, &cfg, &Device::Cpu)?;
        let mut rows = Vec::new();
        for (pos, &id) in ids.iter().enumerate() {
            let x = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
            rows.push(model.forward(&x, pos, &mut cache)?);
        }
        let reference = Tensor::cat(&rows, 0)?;
        let (prefill, stepwise) = our_logits(&ModelFile::open(&path)?, &ids)?;
        assert_agree(
            &format!("tied={tied} stepwise"),
            &stepwise,
            &reference,
            1e-3,
        )?;
        assert_agree(&format!("tied={tied} prefill"), &prefill, &reference, 1e-3)?;
    }
    Ok(())
}

/// The checkpoint a test wrote into `dir`, for candle-transformers' models.
fn checkpoint(dir: &Path) -> Result<candle_nn::VarBuilder<'static>> {
    // SAFETY: a file this test just wrote and nobody modifies.
    Ok(unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    })
}

/// Our logits (prefill and step by step) against a reference model fed one token at a
/// time (`step(token, position)` gives its logits), on every position of PROMPT and
/// DECODE.
fn agrees_with_stepwise(
    name: &str,
    file: &ModelFile,
    mut step: impl FnMut(&Tensor, usize) -> candle_core::Result<Tensor>,
) -> Result<()> {
    let ids: Vec<u32> = PROMPT.iter().chain(DECODE.iter()).copied().collect();
    let mut rows = Vec::new();
    for (pos, &id) in ids.iter().enumerate() {
        let x = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
        rows.push(step(&x, pos)?.flatten_to(1)?);
    }
    let reference = Tensor::cat(&rows, 0)?;
    let (prefill, stepwise) = our_logits(file, &ids)?;
    assert_agree(&format!("{name} stepwise"), &stepwise, &reference, 1e-3)?;
    assert_agree(&format!("{name} prefill"), &prefill, &reference, 1e-3)?;
    Ok(())
}

/// A tiny Qwen3 checkpoint: Llama's tensors, no biases, and per-head Q/K RMSNorm
/// weights (`self_attn.q_norm`, `self_attn.k_norm`).
fn write_hf_qwen3(dir: &Path) -> Result<()> {
    write_hf_arch(dir, DType::F32, true, false)?;
    let mut map: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let mut rng = StdRng::seed_from_u64(3);
    for i in 0..LAYERS {
        for norm in ["q_norm", "k_norm"] {
            let w = (randn(&mut rng, HEAD_DIM, 0.2)? + 1.0)?;
            map.insert(format!("model.layers.{i}.self_attn.{norm}.weight"), w);
        }
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB, "rms_norm_eps": EPS, "rope_theta": THETA,
        "max_position_embeddings": 256, "tie_word_embeddings": true, "attention_bias": false,
        "sliding_window": 256, "max_window_layers": LAYERS, "use_sliding_window": false,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(())
}

#[test]
fn qwen3_safetensors_agrees_with_candle_qwen3() -> Result<()> {
    use candle_transformers::models::qwen3::{Config, ModelForCausalLM};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qwen3");
    write_hf_qwen3(&path)?;
    let file = ModelFile::open(&path)?;
    assert_eq!(file.config().arch, shard::Arch::Qwen3);
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(path.join("config.json"))?)?;
    let vb = checkpoint(&path)?;
    let mut model = ModelForCausalLM::new(&cfg, vb)?;
    agrees_with_stepwise("qwen3", &file, |x, pos| model.forward(x, pos))
}

#[test]
fn qwen2_safetensors_agrees_with_candle_qwen2() -> Result<()> {
    use candle_transformers::models::qwen2::{Config, ModelForCausalLM};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qwen2");
    write_hf_arch(&path, DType::F32, true, true)?;
    let file = ModelFile::open(&path)?;
    assert!(file.config().qkv_bias, "Qwen2 has Q/K/V biases");
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(path.join("config.json"))?)?;
    let vb = checkpoint(&path)?;
    let mut model = ModelForCausalLM::new(&cfg, vb)?;
    agrees_with_stepwise("qwen2", &file, |x, pos| model.forward(x, pos))
}

#[test]
fn bad_files_and_spans_get_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = ModelFile::open(dir.path().join("nope.gguf")).expect_err("missing");
    assert!(
        missing.to_string().contains("cannot open model"),
        "{missing}"
    );

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model at all, just some text")?;
    let e = ModelFile::open(&garbage).expect_err("garbage");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");

    let good = dir.path().join("good.gguf");
    write_gguf(&good, GgmlDType::Q8_0, false)?;
    let bytes = std::fs::read(&good)?;
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3])?;
    let e = ModelFile::open(&truncated).expect_err("truncated");
    assert!(e.to_string().contains("truncated"), "{e}");

    let file = ModelFile::open(&good)?;
    for (a, b) in [(0, 5), (3, 3), (4, 6)] {
        let e = Span::load(&file, a, b, &Device::Cpu, |_, _| {}).expect_err("bad span");
        assert!(
            e.to_string().contains("not inside the model's 4 blocks"),
            "{e}"
        );
    }
    let hf = dir.path().join("hf-no-weights");
    std::fs::create_dir_all(&hf)?;
    std::fs::write(hf.join("config.json"), "{\"hidden_size\": 1}")?;
    let e = ModelFile::open(&hf).expect_err("bad config");
    assert!(e.to_string().contains("config.json"), "{e}");

    // Inputs of the wrong width, and sequences past the cache's limit.
    let span = Span::load(&file, 0, 2, &Device::Cpu, |_, _| {})?;
    let mut cache = span.new_cache(4);
    let wrong = Tensor::zeros((2, HIDDEN + 1), DType::F32, &Device::Cpu)?;
    assert!(span.forward(&wrong, &mut cache).is_err());
    let five = Tensor::zeros((5, HIDDEN), DType::F32, &Device::Cpu)?;
    let e = span.forward(&five, &mut cache).expect_err("too long");
    assert!(e.to_string().contains("exceeds the limit of 4"), "{e}");
    Ok(())
}

/// A SentencePiece-style (Llama 2) tokenizer inside a GGUF: merges come from the scores,
/// spaces become `▁`, unknown characters fall back to byte tokens, and decoding
/// restores the text.
#[test]
fn gguf_sentencepiece_tokenizer() -> Result<()> {
    use gguf_file::Value as V;
    let mut tokens: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    for b in 0..=255u8 {
        tokens.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    // Like a real SentencePiece BPE vocabulary, every piece is two pieces merged, and
    // earlier merges score higher.
    let pieces = [
        "\u{2581}h",
        "ll",
        "or",
        "ld",
        "\u{2581}w",
        "\u{2581}he",
        "llo",
        "orld",
        "\u{2581}hello",
        "\u{2581}world",
        "\u{2581}",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
    ];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push((p.to_string(), -(i as f32), 1));
    }
    let id = |piece: &str| tokens.iter().position(|t| t.0 == piece).expect("piece") as u32;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("spm.gguf");
    let extra = vec![
        ("tokenizer.ggml.model", V::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(tokens.iter().map(|t| V::String(t.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            V::Array(tokens.iter().map(|t| V::F32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            V::Array(tokens.iter().map(|t| V::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.unknown_token_id", V::U32(0)),
    ];
    write_gguf_with(&path, GgmlDType::F32, true, extra)?;
    let text = shard::TextCodec::from_model(&ModelFile::open(&path)?)?;
    let ids = text.encode("hello world", true)?;
    assert_eq!(ids, vec![1, id("\u{2581}hello"), id("\u{2581}world")]);
    assert_eq!(text.decode(&ids)?, "hello world");
    // 'x' is not in the vocabulary: it falls back to its byte.
    let ids = text.encode("hellx", false)?;
    assert_eq!(ids, vec![id("\u{2581}he"), id("ll"), id("<0x78>")]);
    assert_eq!(text.decode(&ids)?, "hellx");
    assert!(text.is_stop(2));
    Ok(())
}

/// What a GPU runs for a 16-bit checkpoint (the blocks compute in bf16, see
/// `shard::device::compute_dtype`), checked on the CPU: every step of a chain stays
/// within bf16 rounding of the f32 result, and the output comes back as f32.
#[test]
fn sixteen_bit_compute_stays_within_rounding_of_f32() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_hf(dir.path(), DType::BF16, false)?;
    let file = ModelFile::open(dir.path())?;
    let half = ModelFile::open(dir.path())?.with_compute_dtype(DType::BF16);
    let head = Head::load(&file, &Device::Cpu)?;
    let whole32 = Span::load(&file, 0, LAYERS, &Device::Cpu, |_, _| {})?;
    let halves16 = [
        Span::load(&half, 0, 2, &Device::Cpu, |_, _| {})?,
        Span::load(&half, 2, LAYERS, &Device::Cpu, |_, _| {})?,
    ];
    assert_eq!(whole32.dtype(), DType::F32);
    assert!(halves16.iter().all(|s| s.dtype() == DType::BF16));
    let exact = run_chain(&head, std::slice::from_ref(&whole32))?;
    let bf16 = run_chain(&head, &halves16)?;
    assert_eq!(bf16.dtype(), DType::F32);
    let rel = (bf16.sub(&exact)?.sqr()?.mean_all()?.to_scalar::<f32>()?
        / exact.sqr()?.mean_all()?.to_scalar::<f32>()?)
    .sqrt();
    // bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per value); a few layers of
    // it stay within a few percent, while a wrong cast or a missing conversion would be
    // off by far more (or fail).
    eprintln!("bf16 vs f32: relative RMS {rel}");
    assert!(rel > 0.0 && rel < 0.05, "relative RMS {rel}");
    Ok(())
}
