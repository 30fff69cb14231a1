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
    /// How a token's raw bytes are found, for streaming text out (see [`TextStream`]).
    pieces: Pieces,
}

/// How one token's raw bytes are found, so text can be streamed out byte-exactly: a
/// character may be split across tokens, and a model may emit a lone byte that never
/// completes one. Read off the tokenizer's decoder.
enum Pieces {
    /// Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): each character of a token stands
    /// for one byte (GPT-2's byte-to-character table, inverted here); a token with a
    /// character outside the table (an added token, say) stands for its own UTF-8.
    ByteLevel(HashMap<char, u8>),
    /// SentencePiece-style (Llama 2, Mistral, Gemma): `▁` is a space and `<0xHH>` one
    /// byte; `strip_first_space`: the decoder drops the text's first leading space.
    SentencePiece {
        /// The decoder ends with a `Strip` of one leading space.
        strip_first_space: bool,
    },
    /// Another decoder: the text is decoded anew as tokens arrive (slower, exact).
    Other,
}

impl Pieces {
    /// What `decoder` (a tokenizer.json `decoder` value) does.
    fn of(decoder: &Json) -> Pieces {
        let kind = |d: &Json| d.get("type").and_then(Json::as_str).map(str::to_string);
        match kind(decoder).as_deref() {
            Some("ByteLevel") => Pieces::ByteLevel(gpt2_char_bytes()),
            Some("Sequence") => {
                let steps: Vec<&Json> = decoder
                    .get("decoders")
                    .and_then(Json::as_array)
                    .map(|a| a.iter().collect())
                    .unwrap_or_default();
                let has = |t: &str| steps.iter().any(|d| kind(d).as_deref() == Some(t));
                let spaces = steps.iter().any(|d| {
                    kind(d).as_deref() == Some("Replace")
                        && d.pointer("/pattern/String").and_then(Json::as_str) == Some("\u{2581}")
                        && d.get("content").and_then(Json::as_str) == Some(" ")
                });
                let strip = steps.iter().any(|d| {
                    kind(d).as_deref() == Some("Strip")
                        && d.get("content").and_then(Json::as_str) == Some(" ")
                        && d.get("start").and_then(Json::as_u64) == Some(1)
                        && d.get("stop").and_then(Json::as_u64) == Some(0)
                });
                let known = steps.iter().all(|d| {
                    matches!(
                        kind(d).as_deref(),
                        Some("Replace" | "ByteFallback" | "Fuse" | "Strip")
                    )
                });
                if has("ByteFallback") && spaces && known {
                    Pieces::SentencePiece {
                        strip_first_space: strip,
                    }
                } else {
                    Pieces::Other
                }
            }
            _ => Pieces::Other,
        }
    }
}

/// GPT-2's table from the characters of byte-level tokens to the bytes they stand for:
/// printable Latin-1 bytes stand for themselves, the other 68 bytes for the characters
/// from U+0100 on, in byte order.
fn gpt2_char_bytes() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(0xFF + next).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
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
            codec: self,
            pending: Vec::new(),
            at_start: true,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// The raw bytes token `id` stands for; `None` for special tokens (left out of
    /// text, as [`TextCodec::decode`] leaves them out) and unknown ids.
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.tokenizer.id_to_token(id)?;
        if self
            .tokenizer
            .get_added_vocabulary()
            .is_special_token(&token)
        {
            return None;
        }
        match &self.pieces {
            Pieces::ByteLevel(table) => Some(
                token
                    .chars()
                    .map(|c| table.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| token.into_bytes()),
            ),
            Pieces::SentencePiece { .. } => Some(match spm_byte(&token) {
                Some(b) => vec![b],
                None => token.replace('\u{2581}', " ").into_bytes(),
            }),
            Pieces::Other => None,
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

/// Incremental detokenizer, see [`TextCodec::stream`]. It works on the bytes tokens
/// stand for: whole characters go out at once, the bytes of one split across tokens wait
/// until it completes, bytes that can never form a character go out as U+FFFD at once,
/// and [`TextStream::finish`] replaces whatever is still incomplete at the end. So a
/// model that emits a lone byte-fallback token never stops a generation (tokenizers'
/// own `DecodeStream` failed on one with "Invalid prefix encountered"), and the pieces
/// put together are the text.
pub struct TextStream<'a> {
    codec: &'a TextCodec,
    /// Bytes of a character not complete yet.
    pending: Vec<u8>,
    /// Nothing has gone out yet (a SentencePiece decoder drops the first leading space).
    at_start: bool,
    /// Only for [`Pieces::Other`]: every id so far, and how many bytes of their decoded
    /// text have gone out.
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream<'_> {
    /// Feeds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if matches!(self.codec.pieces, Pieces::Other) {
            return self.push_decoding(id);
        }
        if let Some(bytes) = self.codec.token_bytes(id) {
            self.pending.extend_from_slice(&bytes);
        }
        let whole = drain_utf8(&mut self.pending, false);
        let text = self.start(whole);
        Ok((!text.is_empty()).then_some(text))
    }

    /// Ends the stream: the bytes still waiting for the rest of a character, as U+FFFD.
    pub fn finish(mut self) -> String {
        if matches!(self.codec.pieces, Pieces::Other) {
            // What the decoder held back, as it decodes it.
            return self
                .codec
                .decode(&self.ids)
                .ok()
                .and_then(|t| t.get(self.emitted..).map(str::to_string))
                .unwrap_or_default();
        }
        let rest = drain_utf8(&mut self.pending, true);
        self.start(rest)
    }

    /// `text` about to go out, with the first leading space dropped where the decoder
    /// drops it.
    fn start(&mut self, mut text: String) -> String {
        if self.at_start && !text.is_empty() {
            self.at_start = false;
            if matches!(
                self.codec.pieces,
                Pieces::SentencePiece {
                    strip_first_space: true
                }
            ) && text.starts_with(' ')
            {
                text.remove(0);
            }
        }
        text
    }

    /// [`TextStream::push`] for decoders whose bytes per token are not known: decodes
    /// every id so far and passes on what is new, once it does not end in U+FFFD (the
    /// mark of a character not complete yet). Quadratic in the length; only tokenizers
    /// of kinds Shoal does not build from GGUF get here.
    fn push_decoding(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.codec.decode(&self.ids)?;
        if text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let new = match text.get(self.emitted..) {
            Some(new) if !new.is_empty() => new.to_string(),
            _ => return Ok(None),
        };
        self.emitted = text.len();
        Ok(Some(new))
    }
}

/// A SentencePiece byte-fallback token, `<0xHH>`, as its byte.
fn spm_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// Takes the text out of the front of `buf`: whole characters as they are, each
/// sequence that can never be a character as one U+FFFD (as `String::from_utf8_lossy`
/// does), and, unless `at_end`, leaves a character's incomplete start in `buf`.
fn drain_utf8(buf: &mut Vec<u8>, at_end: bool) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &bad[n..];
                    }
                    None if at_end => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = bad;
                        break;
                    }
                }
            }
        }
    }
    *buf = rest.to_vec();
    out
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
/// gpt-4o's (o200k) split, which gpt-oss and Llama 4 use (llama.cpp's GPT4O).
const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek-V3's three successive splits (llama.cpp's DEEPSEEK3_LLM): numbers of up
/// to three digits, runs of CJK ideographs and kana, then words and punctuation.
const DEEPSEEK3_REGEXES: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
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
                "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "falcon3" | "falcon-h1"
                | "pixtral" | "midm-2.0" | "lfm2" => {
                    json!({"type": "Sequence", "pretokenizers": [
                    split(LLAMA3_REGEX), byte_level(false)]})
                }
                "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                    split(QWEN2_REGEX), byte_level(false)]}),
                "gpt-4o" | "llama4" => json!({"type": "Sequence", "pretokenizers": [
                    split(GPT4O_REGEX), byte_level(false)]}),
                "deepseek-v3" => json!({"type": "Sequence", "pretokenizers": [
                    split(DEEPSEEK3_REGEXES[0]), split(DEEPSEEK3_REGEXES[1]),
                    split(DEEPSEEK3_REGEXES[2]), byte_level(false)]}),
                "gpt2" | "gpt-2" => byte_level(true),
                // llama.cpp's rules for a file that names none (LLAMA_VOCAB_PRE_TYPE_DEFAULT).
                "default" => json!({"type": "Sequence", "pretokenizers": [
                    split(r"[\p{P}\$\+<=>\^~\|]+"),
                    split(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"),
                    split(r"\p{N}+"),
                    split("[0-9][0-9][0-9]"),
                    byte_level(false)]}),
                other => {
                    tracing::warn!(
                        pre = other,
                        "unknown GGUF pre-tokenizer; using GPT-2's rules"
                    );
                    byte_level(true)
                }
            };
            // llama.cpp's Llama 3 family looks a whole pre-tokenized word up in the
            // vocabulary before merging (as Hugging Face's Llama 3 tokenizer.json does
            // with `ignore_merges`): a word that is one entry but that the merge rules
            // cannot build is one token, not several. The names are llama.cpp's
            // (llama-vocab.cpp: the pre-tokenizers of type LLAMA3).
            let ignore_merges = matches!(
                pre,
                "llama3"
                    | "llama-v3"
                    | "llama-bpe"
                    | "falcon3"
                    | "falcon-h1"
                    | "pixtral"
                    | "midm-2.0"
                    | "lfm2"
            );
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added, "normalizer": null,
                "pre_tokenizer": pre_tokenizer, "post_processor": null,
                "decoder": byte_level(true),
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": ignore_merges,
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
        pieces: Pieces::of(&pipeline["decoder"]),
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
        pieces: serde_json::to_value(tokenizer.get_decoder())
            .map(|d| Pieces::of(&d))
            .unwrap_or(Pieces::Other),
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[String]) -> Value {
        Value::Array(v.iter().cloned().map(Value::String).collect())
    }

    /// A byte-level BPE tokenizer whose tokens are the 256 bytes (no merges) and one
    /// special token, built from GGUF metadata as a model's would be.
    fn byte_level_codec() -> TextCodec {
        byte_level_codec_with("default", &[])
    }

    /// [`byte_level_codec`] with the pre-tokenizer `pre` and `extra` tokens after the
    /// special one.
    fn byte_level_codec_with(pre: &str, extra: &[&str]) -> TextCodec {
        let table = gpt2_char_bytes();
        let mut by_byte: Vec<(u8, char)> = table.iter().map(|(c, b)| (*b, *c)).collect();
        by_byte.sort();
        let mut tokens: Vec<String> = by_byte.iter().map(|(_, c)| c.to_string()).collect();
        tokens.push("<|end|>".into());
        let mut types = vec![Value::I32(1); 256];
        types.push(Value::I32(3));
        for t in extra {
            tokens.push(t.to_string());
            types.push(Value::I32(1));
        }
        let md = HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            ("tokenizer.ggml.tokens".into(), strings(&tokens)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
            ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ]);
        from_gguf(&md).expect("byte-level tokenizer")
    }

    /// A word that is one vocabulary entry but that no merge builds: one token with the
    /// Llama 3 pre-tokenizer (llama.cpp looks the whole word up first), bytes with
    /// GPT-2's.
    #[test]
    fn llama3_takes_whole_words_from_the_vocabulary() {
        let whole = |pre: &str| {
            let codec = byte_level_codec_with(pre, &["hello"]);
            let id = codec.tokenizer.token_to_id("hello").expect("hello");
            (codec.encode("hello", false).expect("encode"), id)
        };
        for pre in ["llama-bpe", "llama3"] {
            let (ids, hello) = whole(pre);
            assert_eq!(ids, [hello], "{pre}");
        }
        let (ids, _) = whole("gpt2");
        assert_eq!(ids, "hello".bytes().map(u32::from).collect::<Vec<_>>());
    }

    /// A SentencePiece tokenizer with byte fallback: the 256 byte tokens and a few
    /// pieces.
    fn sentencepiece_codec() -> TextCodec {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(Value::I32(6));
        }
        for piece in ["\u{2581}", "h", "i", "\u{2581}h", "\u{2581}hi"] {
            tokens.push(piece.into());
            types.push(Value::I32(1));
        }
        let scores = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
        let md = HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            ("tokenizer.ggml.tokens".into(), strings(&tokens)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        ]);
        from_gguf(&md).expect("sentencepiece tokenizer")
    }

    /// Everything `ids` streams out, finish included, piece by piece.
    fn streamed(codec: &TextCodec, ids: &[u32]) -> Vec<String> {
        let mut s = codec.stream();
        let mut out: Vec<String> = ids
            .iter()
            .map(|id| s.push(*id).expect("push").unwrap_or_default())
            .collect();
        out.push(s.finish());
        out
    }

    #[test]
    fn byte_level_text_streams_as_whole_characters() {
        let codec = byte_level_codec();
        assert!(matches!(codec.pieces, Pieces::ByteLevel(_)));
        // A byte's token id is the byte here.
        let ids = |bytes: &[u8]| bytes.iter().map(|b| *b as u32).collect::<Vec<u32>>();
        // A character split over three tokens goes out when complete.
        let zhong = "中".as_bytes();
        assert_eq!(streamed(&codec, &ids(zhong)), ["", "", "中", ""]);
        // Valid text streams to exactly what a whole decode gives; special tokens are
        // left out of both.
        let mut text_ids = ids("héllo 中文, wörld!".as_bytes());
        text_ids.insert(3, 256);
        assert_eq!(
            streamed(&codec, &text_ids).concat(),
            codec.decode(&text_ids).expect("decode")
        );
        // A lone lead byte followed by a letter: replaced at once, never an error.
        assert_eq!(
            streamed(&codec, &ids(&[b'a', 0xE4, b'b'])),
            ["a", "", "\u{FFFD}b", ""]
        );
        // Ending on half a character: the rest is replaced at the end.
        assert_eq!(
            streamed(&codec, &ids(&[b'a', 0xE4, 0xB8])),
            ["a", "", "", "\u{FFFD}"]
        );
        // A stray continuation byte.
        assert_eq!(streamed(&codec, &ids(&[0xB8, b'c'])), ["\u{FFFD}", "c", ""]);
    }

    #[test]
    fn sentencepiece_text_streams_with_byte_fallback() {
        let codec = sentencepiece_codec();
        assert!(matches!(
            codec.pieces,
            Pieces::SentencePiece {
                strip_first_space: true
            }
        ));
        let id = |t: &str| codec.tokenizer.token_to_id(t).expect("token");
        let byte = |b: u8| id(&format!("<0x{b:02X}>"));
        let mut ids = vec![id("\u{2581}hi"), id("\u{2581}h")];
        ids.extend("中".bytes().map(byte));
        ids.push(id("i"));
        // The decoder drops the text's first leading space; the pieces agree with it.
        let pieces = streamed(&codec, &ids);
        assert_eq!(pieces, ["hi", " h", "", "", "中", "i", ""]);
        assert_eq!(pieces.concat(), codec.decode(&ids).expect("decode"));
        // A generation that ends on the first byte of a character.
        assert_eq!(
            streamed(&codec, &[id("\u{2581}hi"), byte(0xE4)]),
            ["hi", "", "\u{FFFD}"]
        );
        // Byte tokens that never make characters, between text: tokenizers' own
        // DecodeStream fails on this one ("Invalid prefix encountered while decoding
        // stream"; found by fuzzing it, ~4% of random sequences of such tokens fail).
        // Each sequence that cannot be a character goes out as one U+FFFD.
        let mut ids: Vec<u32> = [0x21, 0xF8, 0xAB, 0xEB, 0x88].map(byte).to_vec();
        ids.push(id("h"));
        ids.extend([0xEB, 0x0E, 0x28].map(byte));
        assert_eq!(
            streamed(&codec, &ids).concat(),
            "!\u{FFFD}\u{FFFD}\u{FFFD}h\u{FFFD}\u{E}("
        );
    }
}
