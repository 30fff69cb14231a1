//! A model that emits lone bytes, or characters split across tokens, never stops a
//! generation (issue 17): what `shoal generate` streams and what `--json` says agree,
//! and bytes that never become a character are replaced (U+FFFD).

mod common;

use std::time::Duration;

use common::*;

/// A random-weight model sampled at temperature 1 picks tokens almost uniformly from the
/// default model's 49,152: among them the 128 lone bytes 0x80-0xFF and many pieces of
/// multi-byte characters, which 1,500 tokens are all but sure to include (the test
/// checks they did). Both runs use the same seeds, so they emit the same tokens.
#[test]
fn tokens_that_split_characters_stream_and_never_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("random.gguf");
    let mut cmd = shoal();
    cmd.args(["make-model", "--shape", "smollm2-135m", "--blocks", "2"])
        .args(["--dtype", "q8_0", "--seed", "7", "--out"])
        .arg(&m)
        .arg("--tokenizer-from")
        .arg(model());
    let (out, _) = run(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "make-model failed");

    let args = |json: bool| {
        let mut cmd = shoal();
        cmd.args([
            "generate",
            "--local",
            "--prompt",
            "Hi",
            "--max-tokens",
            "1500",
        ])
        .args(["--temperature", "1", "--seed", "3", "--model"])
        .arg(&m)
        .env("RUST_LOG", "warn");
        if json {
            cmd.arg("--json");
        }
        let (out, _) = run(cmd, Duration::from_secs(300));
        assert!(
            out.status.success(),
            "generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let streamed = String::from_utf8(args(false)).expect("streamed text is UTF-8");
    let streamed = streamed.strip_suffix('\n').unwrap_or(&streamed);
    let json: serde_json::Value =
        serde_json::from_slice(&args(true)).expect("one JSON object on stdout");
    assert_eq!(
        json["text"].as_str(),
        Some(streamed),
        "streamed and --json differ"
    );

    // The case under test happened: tokens that are not text on their own.
    let file = shard::ModelFile::open(&m).expect("model");
    let codec = shard::TextCodec::from_model(&file).expect("tokenizer");
    let ids: Vec<u32> = json["completion_tokens"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    let partial = ids
        .iter()
        .filter(|id| {
            codec
                .decode(&[**id])
                .is_ok_and(|t| t.contains(char::REPLACEMENT_CHARACTER))
        })
        .count();
    eprintln!(
        "{} tokens, {partial} of them not text on their own; {} U+FFFD in the text",
        ids.len(),
        streamed.matches(char::REPLACEMENT_CHARACTER).count()
    );
    assert!(
        partial > 0,
        "no token split a character: nothing was tested"
    );
}
