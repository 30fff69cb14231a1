//! `shoal api`'s Anthropic Messages endpoint driven by the official `anthropic` Python
//! package (from PyPI), and the OpenAI endpoints' log-probabilities checked against
//! `shoal generate --top-logits`, on a 2-node loopback swarm.

mod common;

use common::gateway::*;
use common::*;
use serde_json::Value;

#[test]
fn the_anthropic_client_gets_answers_and_errors_in_its_shape() {
    let m = model();
    let a = serve(&m, "0..15", None);
    let b = serve(&m, "15..30", Some(&a.addr));
    wait_for_servers(&a.addr, 2);
    let api = start_api(&a.addr, &[]);
    let (_, models) = raw_http(&api.url, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&models).expect("models");
    let name = models["data"][0]["id"]
        .as_str()
        .expect("model id")
        .to_string();
    let package = python_package("anthropic", "2.14.0", "anthropic");
    let r = api_script(
        "anthropic_client.py",
        &[api.url.as_ref(), name.as_ref()],
        &package,
    );

    // The same answer as the OpenAI endpoint gives, greedy.
    let (status, chat) = http(
        &api.url,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"What is the capital of France? Answer in one sentence."}],"max_tokens":24,"temperature":0}"#,
    );
    assert_eq!(status, 200, "{chat}");
    let plain = &r["plain"];
    assert_eq!(plain["text"], chat["choices"][0]["message"]["content"]);
    assert!(plain["text"].as_str().expect("text").contains("Paris"));
    assert_eq!(
        (&plain["type"], &plain["role"]),
        (&"message".into(), &"assistant".into())
    );
    assert_eq!(plain["stop_reason"], "end_turn");
    assert_eq!(
        plain["usage"],
        serde_json::json!([
            chat["usage"]["prompt_tokens"],
            chat["usage"]["completion_tokens"]
        ])
    );
    // Streamed: the same text in several pieces, the same end and usage.
    let stream = &r["stream"];
    assert_eq!(stream["text"], plain["text"]);
    assert_eq!(stream["final_text"], plain["text"]);
    assert!(stream["pieces"].as_u64() > Some(2), "{stream}");
    assert_eq!(stream["stop_reason"], "end_turn");
    assert_eq!(stream["usage"], plain["usage"]);
    // Cut by max_tokens, and by a stop sequence (not part of the text).
    assert_eq!(r["short"]["stop_reason"], "max_tokens");
    assert_eq!(r["short"]["output_tokens"], 3);
    let cut = &r["stop_sequence"];
    assert_eq!(cut["stop_reason"], "stop_sequence");
    assert_eq!(cut["stop_sequence"], "Paris");
    let full = plain["text"].as_str().expect("text");
    assert_eq!(
        cut["text"].as_str().expect("text"),
        &full[..full.find("Paris").expect("Paris")]
    );
    // A system prompt is part of the prompt.
    assert!(
        r["system"]["input_tokens"].as_u64() > plain["usage"][0].as_u64().map(|n| n / 2),
        "{r}"
    );
    // Errors in Anthropic's shape, raised as the package's own exceptions.
    assert_eq!(
        r["unknown_model"],
        serde_json::json!({"status": 404, "type": "not_found_error"})
    );
    assert_eq!(r["image"]["status"], 400);
    assert_eq!(r["image"]["type"], "invalid_request_error");
    let (status, body) = http(&api.url, "/v1/messages", "{not json");
    assert_eq!(status, 400);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    drop((a, b));
}

#[test]
fn logprobs_are_the_log_softmax_of_the_logits_generate_reports() {
    let m = model();
    let a = serve(&m, "0..15", None);
    let b = serve(&m, "15..30", Some(&a.addr));
    wait_for_servers(&a.addr, 2);
    let api = start_api(&a.addr, &[]);
    let question = "Name three colours.";
    let reference = generate_json(&[
        "--bootstrap",
        &a.addr,
        "--chat",
        "--prompt",
        question,
        "--max-tokens",
        "12",
        "--top-logits",
        "5",
    ]);
    let logits = reference["top_logits"].as_array().expect("top_logits");
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 5,
    });
    let (status, chat) = http(&api.url, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{chat}");
    let content = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content");
    let tokens = reference["completion_tokens"].as_array().expect("tokens");
    assert_eq!(
        content.len(),
        tokens.len(),
        "one entry per completion token"
    );
    for (i, (entry, top)) in content.iter().zip(logits).enumerate() {
        let top = top.as_array().expect("top");
        let alternatives = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(alternatives.len(), 5);
        // Greedy: the token chosen is the most likely, and its log-probability the
        // first alternative's.
        assert_eq!(entry["logprob"], alternatives[0]["logprob"], "token {i}");
        let lp = |k: usize| alternatives[k]["logprob"].as_f64().expect("logprob");
        let logit = |k: usize| top[k][1].as_f64().expect("logit");
        for k in 1..5 {
            // A log-softmax keeps the logits' differences.
            let (got, want) = (lp(0) - lp(k), logit(0) - logit(k));
            assert!(
                (got - want).abs() < 1e-3,
                "token {i}, alternative {k}: {got} vs {want}"
            );
        }
        assert!(lp(0) <= 0.0 && lp(0) > -30.0, "token {i}: {}", lp(0));
        let text = entry["token"].as_str().expect("token");
        assert_eq!(
            entry["bytes"],
            serde_json::json!(text.as_bytes()),
            "token {i}: bytes are the token's text"
        );
    }
    // The completions endpoint: OpenAI's older shape, the same numbers.
    let body = serde_json::json!({
        "prompt": "The colours of the rainbow are", "max_tokens": 6, "temperature": 0,
        "logprobs": 3,
    });
    let (status, text) = http(&api.url, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{text}");
    let lp = &text["choices"][0]["logprobs"];
    let n = lp["tokens"].as_array().expect("tokens").len();
    assert_eq!(
        n,
        text["usage"]["completion_tokens"].as_u64().expect("usage") as usize
    );
    assert_eq!(lp["token_logprobs"].as_array().expect("logprobs").len(), n);
    assert_eq!(lp["text_offset"][0], 0);
    let joined: String = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token"))
        .collect();
    assert_eq!(joined, text["choices"][0]["text"].as_str().expect("text"));
    // Without asking, none; too many alternatives, a 400.
    let (_, plain) = http(
        &api.url,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#,
    );
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
    let (status, _) = http(
        &api.url,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"logprobs":true,"top_logprobs":50}"#,
    );
    assert_eq!(status, 400);
    drop((a, b));
}
