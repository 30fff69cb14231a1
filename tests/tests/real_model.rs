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

/// Logits at every position of a chat prompt, ours (run token by token, and as one
/// prefill) against candle-transformers' `quantized_llama` on the same file.
#[test]
fn logits_agree_with_candle_quantized_llama() -> Result<()> {
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

    let mut f = std::fs::File::open(&path)?;
    let ct = gguf_file::Content::read(&mut f)?;
    let mut reference =
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev)?;
    let mut cache = span.new_cache(ids.len());
    let mut worst_step = 0f32;
    let mut ref_rows = Vec::new();
    for (pos, &id) in ids.iter().enumerate() {
        let r = reference.forward(&Tensor::new(&[id], &dev)?.unsqueeze(0)?, pos)?;
        let ours = head.logits(&span.forward(&head.embed(&[id])?, &mut cache)?)?;
        let d = ours
            .sub(&r)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        worst_step = worst_step.max(d);
        assert_eq!(
            ours.argmax(1)?.to_vec1::<u32>()?,
            r.argmax(1)?.to_vec1::<u32>()?,
            "position {pos}: argmax differs"
        );
        ref_rows.push(r);
    }
    assert!(
        worst_step < 1e-3,
        "token-by-token max abs diff {worst_step}"
    );

    // One prefill: candle quantises a many-row activation differently from one row, so
    // logits move a little; the predicted token must not.
    let reference = Tensor::cat(&ref_rows, 0)?;
    let mut cache = span.new_cache(ids.len());
    let prefill = head.logits(&span.forward(&head.embed(&ids)?, &mut cache)?)?;
    let d = prefill
        .sub(&reference)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let spread = reference
        .max_keepdim(1)?
        .sub(&reference.min_keepdim(1)?)?
        .flatten_all()?
        .min(0)?
        .to_scalar::<f32>()?;
    eprintln!("{} positions: token-by-token max abs diff {worst_step:e}, prefill {d:.3} (logit range >= {spread:.1})", ids.len());
    assert_eq!(
        prefill.argmax(1)?.to_vec1::<u32>()?,
        reference.argmax(1)?.to_vec1::<u32>()?
    );
    assert!(d < 1.5, "prefill max abs diff {d}");

    // The reference run as one prefill too gives the same last-position logits as ours.
    let mut f = std::fs::File::open(&path)?;
    let ct = gguf_file::Content::read(&mut f)?;
    let mut fresh =
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev)?;
    let r_last = fresh.forward(&Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?, 0)?;
    let ours_last = prefill.narrow(0, ids.len() - 1, 1)?;
    let d_last = ours_last
        .sub(&r_last)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    eprintln!("prefill vs reference prefill, last position: max abs diff {d_last:e}");
    assert!(d_last < 1e-3, "prefill vs reference prefill: {d_last}");
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
