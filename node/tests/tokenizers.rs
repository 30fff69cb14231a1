//! Prompt token ids equal llama.cpp's for the tokenizers of the models Shoal runs
//! (issue 17): the byte-level BPE pre-tokenizers GGUF files name (`tokenizer.ggml.pre`:
//! `qwen2` for Qwen2/Qwen3, `llama-bpe` for Llama 3 and GLM, `deepseek-v3`, `gpt-4o`
//! for gpt-oss, `smollm`, `gpt-2`, `default`) on the default model's vocabulary, and SentencePiece
//! vocabularies (Gemma: no space prefix; Phi-3 and Llama 2: one) on a vocabulary the
//! test writes. Each is compared on the same texts: contractions, digits, case runs,
//! punctuation, whitespace runs, accents, CJK, scripts of every kind, emoji, code.

mod common;

use std::path::Path;

use common::*;
use shard::candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use shard::candle_core::{DType, Device, Tensor};

type Value = gguf_file::Value;

const TEXTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'LL say it's fine; we'd've known, DON'T you think?",
    "1234567890 and 3.14159, 1,000,000 or 42nd",
    "HelloWorld camelCase XMLHttpRequest ALLCAPS MiXeD",
    "Wait... what?!?! (yes) [no] {maybe} <tag> a->b == c",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows\r\n",
    "multiple     spaces   between  words",
    "naïve café résumé Zoë über straße",
    "Ελληνικά κείμενα και русский текст",
    "日本語のテキストとカタカナ、漢字",
    "中文字符和标点符号。",
    "한국어 문장입니다",
    "العربية والأرقام ١٢٣",
    "emoji 👍🏽 🎉🎉 and flags 🇫🇷",
    "combining e\u{301} and a\u{308}",
    "fn main() { println!(\"hi {}\", x_1); } // code",
    "https://example.org/path?q=1&r=two#frag",
    "’curly’ “quotes” — dashes – and … ellipsis",
    "x",
    " ",
    "\n",
];

/// The reference tokenization of `TEXTS` by llama.cpp.
fn llama_cpp_ids(model: &Path) -> Vec<Vec<u64>> {
    let input = serde_json::to_vec(TEXTS).expect("json");
    let ids = llama_cpp_json("llama_cpp_tokenize.py", &[model.as_os_str()], Some(&input));
    serde_json::from_value(ids).expect("lists of ids")
}

/// Compares Shoal's prompt tokenization of every text with llama.cpp's.
fn check(name: &str, model: &Path) {
    let file = shard::ModelFile::open(model).expect("open");
    let codec = shard::TextCodec::from_model(&file).expect("tokenizer");
    let reference = llama_cpp_ids(model);
    let mut wrong = Vec::new();
    for (text, theirs) in TEXTS.iter().zip(&reference) {
        let ours: Vec<u64> = codec
            .encode(text, true)
            .expect("encode")
            .into_iter()
            .map(u64::from)
            .collect();
        if &ours != theirs {
            wrong.push(format!(
                "{text:?}:\n  shoal     {ours:?}\n  llama.cpp {theirs:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{name}: {} of {} texts tokenized differently:\n{}",
        wrong.len(),
        TEXTS.len(),
        wrong.join("\n")
    );
    eprintln!("{name}: {} texts agree", TEXTS.len());
}

/// A GGUF file holding `tokenizer` metadata and the least of a model around it (one
/// zero embedding matrix): enough for llama.cpp to load its vocabulary and for Shoal to
/// open it.
fn write_vocab_file(path: &Path, tokenizer: Vec<(String, Value)>, vocab: usize) {
    let u = Value::U32;
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("vocabulary".into())),
        ("llama.block_count".into(), u(1)),
        ("llama.embedding_length".into(), u(64)),
        ("llama.feed_forward_length".into(), u(128)),
        ("llama.attention.head_count".into(), u(1)),
        ("llama.attention.head_count_kv".into(), u(1)),
        ("llama.rope.dimension_count".into(), u(64)),
        ("llama.context_length".into(), u(256)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
    ];
    md.extend(tokenizer);
    let embedding = QTensor::quantize(
        &Tensor::zeros((vocab, 64), DType::F32, &Device::Cpu).expect("zeros"),
        GgmlDType::F32,
    )
    .expect("tensor");
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).expect("create");
    gguf_file::write(&mut f, &md_refs, &[("token_embd.weight", &embedding)]).expect("write");
}

/// The default model's byte-level BPE vocabulary under each pre-tokenizer name.
#[test]
fn byte_level_bpe_pre_tokenizers_match_llama_cpp() {
    let donor = shard::ModelFile::open(model()).expect("default model");
    let md = donor.gguf_metadata().expect("GGUF");
    let vocab = shard::TextCodec::from_model(&donor)
        .expect("tokenizer")
        .vocab_size();
    let dir = tempfile::tempdir().expect("tempdir");
    for pre in [
        "qwen2",
        "llama-bpe",
        "deepseek-v3",
        "gpt-4o",
        "smollm",
        "gpt-2",
        "default",
    ] {
        let mut tokenizer: Vec<(String, Value)> = md
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") && *k != "tokenizer.chat_template")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tokenizer.retain(|(k, _)| k != "tokenizer.ggml.pre");
        tokenizer.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        tokenizer.sort_by(|a, b| a.0.cmp(&b.0));
        let path = dir.path().join(format!("{pre}.gguf"));
        write_vocab_file(&path, tokenizer, vocab);
        check(pre, &path);
    }
}

/// A SentencePiece vocabulary: control tokens, the 256 byte-fallback tokens, and
/// pieces (every prefix-marked word of the texts and its pieces up to 6 characters,
/// longer pieces scoring higher), so merges, byte fallback and unknown characters all
/// occur.
fn spm_tokenizer(space_prefix: bool) -> (Vec<(String, Value)>, usize) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let mut pieces: Vec<String> = Vec::new();
    for text in TEXTS {
        for word in text.split(' ').filter(|w| !w.is_empty()) {
            let marked: Vec<char> = format!("\u{2581}{word}").chars().collect();
            for len in 1..=marked.len().min(6) {
                for start in 0..=marked.len() - len {
                    let piece: String = marked[start..start + len].iter().collect();
                    // Leave some characters to byte fallback.
                    if piece.chars().any(|c| c == '🎉' || c == '한') {
                        continue;
                    }
                    if !pieces.contains(&piece) && !tokens.contains(&piece) {
                        pieces.push(piece);
                    }
                }
            }
        }
    }
    let first_piece = tokens.len();
    let mut scores: Vec<f32> = vec![0.0; first_piece];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push(p.clone());
        types.push(1);
        scores.push(p.chars().count() as f32 - i as f32 * 1e-4);
    }
    let n = tokens.len();
    let md = vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        (
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(space_prefix),
        ),
    ];
    (md, n)
}

/// SentencePiece vocabularies with and without the space prefix.
#[test]
fn sentencepiece_vocabularies_match_llama_cpp() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, prefix) in [
        ("spm, space prefix (phi-3)", true),
        ("spm, none (gemma)", false),
    ] {
        let (md, n) = spm_tokenizer(prefix);
        let path = dir.path().join(format!("spm-{prefix}.gguf"));
        write_vocab_file(&path, md, n);
        check(name, &path);
    }
}
