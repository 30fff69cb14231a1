//! The default model (SmolLM2-135M-Instruct, GGUF Q4_1) in one process, checked against
//! an independent implementation and for its tokenizer's behaviour.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use shard::{ChatMessage, Head, ModelFile, Span, TextCodec};

fn model() -> PathBuf {
    match std::env::var_os("SHOAL_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => node::model_cache::default_model().expect("default model (fetched with pip)"),
    }
}

/// candle-transformers' `quantized_llama` on `path`, token by token: logits `[1, vocab]`
/// per position. `exact` dequantises every weight to f32 first, so activations are not
/// rounded to 8 bits either: the model's exact function, to f32 rounding.
fn reference_logits(path: &std::path::Path, ids: &[u32], exact: bool) -> Result<Vec<Tensor>> {
    let path = path.to_path_buf();
    let ids = ids.to_vec();
    // candle reads CANDLE_DEQUANTIZE_ALL once per thread, at its first quantised layer:
    // a fresh thread sees the value set here.
    std::thread::spawn(move || -> Result<Vec<Tensor>> {
        if exact {
            std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        }
        let dev = Device::Cpu;
        let mut f = std::fs::File::open(&path)?;
        let ct = gguf_file::Content::read(&mut f)?;
        let mut model = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            ct, &mut f, &dev,
        )?;
        if exact {
            std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
        }
        let mut rows = Vec::new();
        for (pos, &id) in ids.iter().enumerate() {
            rows.push(model.forward(&Tensor::new(&[id], &dev)?.unsqueeze(0)?, pos)?);
        }
        Ok(rows)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("reference thread panicked"))?
}

/// Root mean square of `a - b`.
fn rms_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(a.sub(b)?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?)
}

/// Positions where the exact model prefers its top token by more than `margin`: there,
/// any implementation of the quantised model must pick the same token.
fn clear_choices(exact: &Tensor, margin: f32) -> Result<Vec<(usize, u32)>> {
    let mut out = Vec::new();
    for (pos, row) in exact.to_vec2::<f32>()?.iter().enumerate() {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        if row[idx[0]] - row[idx[1]] > margin {
            out.push((pos, idx[0] as u32));
        }
    }
    Ok(out)
}

/// Logits at every position of a chat prompt, ours (token by token, and as one prefill)
/// against the exact model (candle-transformers' `quantized_llama` on dequantised
/// weights) and against `quantized_llama` on the quantised weights.
///
/// Every quantised implementation rounds activations to 8 bits per block of 32 (ggml's
/// Q8_0/Q8_1), which moves logits by about one unit on this model and flips near-ties;
/// ours must stay as close to the exact model as candle's kernels do, and pick the exact
/// model's token wherever it is clearly ahead.
#[test]
fn logits_agree_with_the_exact_model() -> Result<()> {
    let path = model();
    let file = ModelFile::open(&path)?;
    let text = TextCodec::from_model(&file)?;
    let prompt = text.render_chat(&[ChatMessage::new(
        "user",
        "Name three colours of the rainbow.",
    )])?;
    let ids = text.encode(&prompt, true)?;
    let dev = Device::Cpu;
    let head = Head::load(&file, &dev)?;
    let n = file.config().n_layers;
    let span = Span::load(&file, 0, n, &dev, |_, _| {})?;

    let exact = Tensor::cat(&reference_logits(&path, &ids, true)?, 0)?;
    let candle_q = Tensor::cat(&reference_logits(&path, &ids, false)?, 0)?;
    let mut cache = span.new_cache(ids.len());
    let mut rows = Vec::new();
    for &id in &ids {
        rows.push(head.logits(&span.forward(&head.embed(&[id])?, &mut cache)?)?);
    }
    let stepwise = Tensor::cat(&rows, 0)?;
    let mut cache = span.new_cache(ids.len());
    let prefill = head.logits(&span.forward(&head.embed(&ids)?, &mut cache)?)?;

    let ours = rms_diff(&stepwise, &exact)?;
    let theirs = rms_diff(&candle_q, &exact)?;
    let ours_prefill = rms_diff(&prefill, &exact)?;
    let clear = clear_choices(&exact, 0.5)?;
    eprintln!(
        "{} positions, {} clear choices; rms diff from the exact model: ours {ours:.3} \
         (prefill {ours_prefill:.3}), candle's quantised kernels {theirs:.3}",
        ids.len(),
        clear.len()
    );
    assert!(
        clear.len() * 2 >= ids.len(),
        "too few clear choices to test"
    );
    for (name, logits) in [("token by token", &stepwise), ("prefill", &prefill)] {
        let picked = logits.argmax(1)?.to_vec1::<u32>()?;
        for &(pos, token) in &clear {
            assert_eq!(picked[pos], token, "{name}: position {pos}");
        }
    }
    assert!(
        ours <= theirs * 1.5 && ours_prefill <= theirs * 1.5,
        "ours {ours} / prefill {ours_prefill} vs candle's {theirs}"
    );
    Ok(())
}

#[test]
fn tokenizer_round_trips_and_follows_smollm_rules() -> Result<()> {
    let file = ModelFile::open(model())?;
    let text = TextCodec::from_model(&file)?;
    for s in [
        "Hello, world!",
        "  leading spaces and trailing ones  ",
        "Numbers: 12345 and 3.14159",
        "Ünïcödé — “quotes” and emoji 🐟🐠",
        "code:\n\tfn main() { println!(\"hi\"); }\n",
    ] {
        let ids = text.encode(s, false)?;
        assert_eq!(text.decode(&ids)?, s, "round trip of {s:?}");
    }
    // SmolLM2's pre-tokenizer splits digits one by one.
    let digits = text.encode("2024", false)?;
    assert_eq!(digits.len(), 4, "{digits:?}");
    // Chat markup is one special token each; the template adds the default system turn.
    let chat = text.render_chat(&[ChatMessage::new("user", "hi")])?;
    assert!(chat.starts_with("<|im_start|>system\n"), "{chat:?}");
    assert!(chat.ends_with("<|im_start|>assistant\n"), "{chat:?}");
    let ids = text.encode(&chat, true)?;
    assert_eq!(ids[0], 1, "<|im_start|> is token 1");
    assert!(text.is_stop(2), "<|im_end|> ends a turn");
    // Streaming decode gives the same text as a whole decode, piece by piece.
    let s = "Ünïcödé 🐟 text";
    let ids = text.encode(s, false)?;
    let mut stream = text.stream();
    let mut out = String::new();
    for id in ids {
        if let Some(p) = stream.push(id)? {
            out.push_str(&p);
        }
    }
    assert_eq!(out, s);
    Ok(())
}
