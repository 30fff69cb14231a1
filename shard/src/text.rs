//! Text in and out: the tokenizer and the chat template.
//!
//! From a Hugging Face directory, `tokenizer.json` is used as it is. From a GGUF file,
//! an equivalent `tokenizers` pipeline is built from the metadata:
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE from the vocabulary and merges, with
//!   the pre-tokenizer rules named by `tokenizer.ggml.pre` (SmolLM2's `smollm` splits
//!   digits one by one before GPT-2's rules; Llama 3 and Qwen2 have their own regexes).
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE (Llama 2, TinyLlama,
//!   Mistral): merges are derived from the scores, as Hugging Face's converter does,
//!   with `▁` for spaces and byte fallback.
//!
//! Tokens of type control (3) and user-defined (4) are registered as special tokens, so
//! chat markup such as `<|im_start|>` in a rendered template becomes one token.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use crate::{ModelFile, Result, ShardError};

/// One message of a chat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Tokenizer, special tokens and chat template of a model.
pub struct TextCodec {
    tokenizer: Tokenizer,
    /// Prepend BOS ourselves (GGUF); tokenizer.json pipelines add it in their post-processor.
    add_bos: bool,
    bos: Option<(u32, String)>,
    eos_text: String,
    /// Every id that ends a generation (EOS, end-of-turn).
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("add_bos", &self.add_bos)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn text_err(e: impl std::fmt::Display) -> ShardError {
    ShardError::Text(e.to_string())
}

impl TextCodec {
    /// Loads the tokenizer and template that belong to `file`.
    pub fn from_model(file: &ModelFile) -> Result<Self> {
        match file.gguf_metadata() {
            Some(md) => from_gguf(md),
            None => from_hf_dir(file.path()),
        }
    }

    /// Token ids of `text`; `add_bos` prepends the model's BOS where the model wants one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let has_bos = self
            .bos
            .as_ref()
            .is_some_and(|(_, t)| !t.is_empty() && text.starts_with(t.as_str()));
        let enc = self
            .tokenizer
            .encode(text, add_bos && !self.add_bos && !has_bos)
            .map_err(text_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let (Some((bos, _)), false) = (&self.bos, has_bos) {
                ids.push(*bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(text_err)
    }

    /// An incremental decoder: feed ids one by one, get text as soon as it is whole
    /// (a multi-byte character split across tokens is held back until complete).
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            inner: self.tokenizer.decode_stream(true),
        }
    }

    /// True when `id` ends a generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// Ids that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// True when the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template, ready for the assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ShardError::Text("the model has no chat template; use a plain prompt".into())
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        // Hugging Face templates are Jinja as Python runs it: string methods such as
        // .strip() and .startswith(), and a raise_exception helper.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("chat template refused the messages: {msg}"),
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Templates use this for a "today is" line; a fixed, honest answer keeps
            // generations reproducible.
            "unknown date".to_string()
        });
        env.add_template("chat", template).map_err(text_err)?;
        let tmpl = env.get_template("chat").map_err(text_err)?;
        let bos = self.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos,
            eos_token => self.eos_text.clone(),
        })
        .map_err(text_err)
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` (for a directory made from a GGUF
    /// model's tokenizer; BOS is not added by its pipeline).
    pub fn tokenizer_json(&self) -> Result<String> {
        self.tokenizer.to_string(false).map_err(text_err)
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// Incremental detokenizer, see [`TextCodec::stream`].
pub struct TextStream<'a> {
    inner: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl TextStream<'_> {
    /// Feeds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(text_err)
    }
}

fn md_str<'a>(md: &'a HashMap<String, Value>, k: &str) -> Option<&'a String> {
    md.get(k).and_then(|v| v.to_string().ok())
}

fn md_u32(md: &HashMap<String, Value>, k: &str) -> Option<u32> {
    md.get(k).and_then(|v| v.to_u32().ok())
}

fn md_strings(md: &HashMap<String, Value>, k: &str) -> Result<Vec<String>> {
    let v = md
        .get(k)
        .ok_or_else(|| text_err(format!("GGUF has no {k}")))?
        .to_vec()
        .map_err(text_err)?;
    v.iter()
        .map(|x| x.to_string().cloned().map_err(text_err))
        .collect()
}

/// GPT-2's split rules (also what `use_regex` in the ByteLevel pre-tokenizer applies).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn from_gguf(md: &HashMap<String, Value>) -> Result<TextCodec> {
    let model = md_str(md, "tokenizer.ggml.model")
        .cloned()
        .ok_or_else(|| text_err("GGUF has no tokenizer (tokenizer.ggml.model)"))?;
    let tokens = md_strings(md, "tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type").map(|v| v.to_vec()) {
        Some(Ok(v)) => v.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let pipeline = match model.as_str() {
        "gpt2" => {
            let merges: Vec<Json> = md_strings(md, "tokenizer.ggml.merges")?
                .iter()
                .filter_map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
                .collect();
            let pre = md_str(md, "tokenizer.ggml.pre")
                .map(String::as_str)
                .unwrap_or("default");
            let pre_tokenizer = match pre {
                "smollm" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                "llama-bpe" | "llama3" | "smaug-bpe" => {
                    json!({"type": "Sequence", "pretokenizers": [
                    split(LLAMA3_REGEX), byte_level(false)]})
                }
                "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                    split(QWEN2_REGEX), byte_level(false)]}),
                "default" | "gpt2" | "gpt-2" => byte_level(true),
                other => {
                    tracing::warn!(
                        pre = other,
                        "unknown GGUF pre-tokenizer; using GPT-2's rules"
                    );
                    byte_level(true)
                }
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added, "normalizer": null,
                "pre_tokenizer": pre_tokenizer, "post_processor": null,
                "decoder": byte_level(true),
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": merges}
            })
        }
        "llama" => {
            let scores: Vec<f32> = match md.get("tokenizer.ggml.scores").map(|v| v.to_vec()) {
                Some(Ok(v)) => v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect(),
                _ => vec![0.0; tokens.len()],
            };
            let merges = spm_merges(&tokens, &types, &scores);
            let space_prefix = md
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(true);
            let mut normalizers = vec![];
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            );
            let unk = md_u32(md, "tokenizer.ggml.unknown_token_id")
                .and_then(|i| tokens.get(i as usize).cloned());
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null, "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": merges}
            })
        }
        other => {
            return Err(text_err(format!(
                "GGUF tokenizer model {other:?} is not supported (gpt2 and llama are)"
            )))
        }
    };
    let tokenizer: Tokenizer = pipeline
        .to_string()
        .parse()
        .map_err(|e| text_err(format!("building the GGUF tokenizer: {e}")))?;
    let token_text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
    let bos_id = md_u32(md, "tokenizer.ggml.bos_token_id");
    let eos_id = md_u32(md, "tokenizer.ggml.eos_token_id");
    let eot_id = md_u32(md, "tokenizer.ggml.eot_token_id");
    let mut stop_ids: Vec<u32> = [eos_id, eot_id].into_iter().flatten().collect();
    // Chat models often end a turn with a token other than EOS; stop on those too.
    for marker in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
        if let Some(id) = tokenizer.token_to_id(marker) {
            stop_ids.push(id);
        }
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(TextCodec {
        add_bos: md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama"),
        bos: bos_id.and_then(|i| token_text(Some(i)).map(|t| (i, t))),
        eos_text: token_text(eos_id).unwrap_or_default(),
        stop_ids,
        chat_template: md_str(md, "tokenizer.chat_template").cloned(),
        tokenizer,
    })
}

/// SentencePiece BPE merges from scores: every way to split a vocabulary piece into two
/// pieces is a merge, ranked by the score of the merged piece (best first), which is how
/// SentencePiece picks the next pair to merge.
fn spm_merges(tokens: &[String], types: &[i32], scores: &[f32]) -> Vec<Json> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(1) != 1 {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(cut);
            if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) {
                merges.push((scores.get(id).copied().unwrap_or(0.0), ia, ib, a, b));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    merges.into_iter().map(|m| json!([m.3, m.4])).collect()
}

fn from_hf_dir(dir: &std::path::Path) -> Result<TextCodec> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| text_err(format!("{}: {e}", tok_path.display())))?;
    let cfg: Json = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Json::Null);
    let token_field = |k: &str| -> Option<String> {
        match cfg.get(k)? {
            Json::String(s) => Some(s.clone()),
            v => v.get("content")?.as_str().map(str::to_string),
        }
    };
    let chat_template = match cfg.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    let bos_text = token_field("bos_token");
    let eos_text = token_field("eos_token").unwrap_or_default();
    let mut stop_ids: Vec<u32> = tokenizer.token_to_id(&eos_text).into_iter().collect();
    let gen: Json = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Json::Null);
    match gen.get("eos_token_id") {
        Some(Json::Number(n)) => stop_ids.extend(n.as_u64().map(|x| x as u32)),
        Some(Json::Array(a)) => {
            stop_ids.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
        }
        _ => {}
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(TextCodec {
        add_bos: false,
        bos: bos_text.and_then(|t| tokenizer.token_to_id(&t).map(|i| (i, t))),
        eos_text,
        stop_ids,
        chat_template,
        tokenizer,
    })
}
