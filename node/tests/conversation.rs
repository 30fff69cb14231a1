//! Conversations that remember: the gateway keeps a conversation's session open on its
//! servers between turns and sends only each turn's new tokens, so the time to first
//! token stays flat as the history grows, and the answers are the ones a gateway that
//! resends the whole history gives. Kept sessions go when the conversation is deleted,
//! when idle too long, and when a server needs the room for another client.

mod common;

use std::time::Duration;

use common::gateway::*;
use common::*;
use serde_json::{json, Value};

/// Turns of the conversation.
const TURNS: usize = 12;
/// Most tokens an answer may take.
const ANSWER_TOKENS: usize = 40;
/// The ids the conversation is held under, three times over.
const CONVERSATIONS: [&str; 3] = ["chat-a", "chat-b", "chat-c"];
/// Longest a streamed answer may stall.
const HUNG: Duration = Duration::from_secs(120);

const TOPICS: [&str; TURNS] = [
    "my small vegetable garden behind the house",
    "the old bicycle I am repairing in the shed",
    "a trip by train along the coast next spring",
    "learning to bake bread with a sourdough starter",
    "the birds that visit the feeder every morning",
    "a book about the history of lighthouses",
    "teaching my nephew to play chess on weekends",
    "building a bookshelf from reclaimed oak boards",
    "the river walk I take after work most evenings",
    "planning a picnic for twenty people in the park",
    "a jigsaw puzzle of a harbour with a thousand pieces",
    "the choir I joined that sings on Thursday nights",
];

/// A question of about 50 tokens on turn `turn`'s topic (with the template's and the
/// answer's, about 100 tokens a turn).
fn question(turn: usize) -> String {
    format!(
        "Let me tell you about {}. It has taken a lot of my time lately, and I keep \
         wondering how to enjoy it more. What is one simple piece of advice you would give \
         me about it?",
        TOPICS[turn]
    )
}

/// One streamed turn of `messages` through the gateway at `url`.
fn turn(url: &str, messages: &[Value], conversation: Option<&str>) -> Streamed {
    let mut body = json!({
        "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    if let Some(id) = conversation {
        body["conversation"] = json!(id);
    }
    stream_chat(url, &body, HUNG).unwrap_or_else(|e| panic!("a turn failed: {e}"))
}

/// Sessions open on each server of the swarm.
fn sessions(boot: &str) -> Vec<u64> {
    status(boot)["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| s["sessions"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn a_long_conversation_keeps_its_first_token_time_and_its_answers() {
    let m = model();
    let a = serve_with(&m, &["--blocks", "0..15"], None);
    let b = serve_with(&m, &["--blocks", "15..30"], Some(&a.addr));
    wait_for_servers(&a.addr, 2);
    let warm = start_api(&a.addr, &[]);
    let cold = start_api(&a.addr, &["--keep-conversations", "0"]);
    // Each gateway's first request finds the route and connects: not part of a turn.
    let hello = [json!({"role": "user", "content": "Hello."})];
    turn(&warm.url, &hello, Some("warm-up"));
    turn(&cold.url, &hello, None);
    let (status, _) = raw_http(&warm.url, "DELETE", "/v1/conversations/warm-up", "");
    assert_eq!(status, 200, "deleting the warm-up conversation");

    // The same conversation three times over, turn by turn, each under its own id: a
    // turn's time is the best of three (this machine's two cores also run both servers
    // and both gateways, and one sample of a turn varies by ~20%).
    let mut messages: Vec<Value> = Vec::new();
    let mut rows = Vec::new();
    for t in 0..TURNS {
        messages.push(json!({"role": "user", "content": question(t)}));
        let resent = turn(&cold.url, &messages, None);
        let resent_cached = resent.usage["prompt_tokens_details"]["cached_tokens"].as_u64();
        assert_eq!(
            resent_cached,
            Some(0),
            "a gateway keeping nothing reused tokens"
        );
        let mut best = Duration::MAX;
        let mut reused = Vec::new();
        for id in CONVERSATIONS {
            let kept = turn(&warm.url, &messages, Some(id));
            assert_eq!(
                kept.text,
                resent.text,
                "turn {} of {id}: the answer with the kept session differs from the one with the whole history resent",
                t + 1
            );
            reused.push(
                kept.usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .expect("cached tokens"),
            );
            best = best.min(kept.first_piece);
        }
        let prompt = resent.usage["prompt_tokens"].as_u64().expect("usage");
        let cached = reused.iter().copied().min().unwrap_or(0);
        rows.push((prompt, cached, best, resent.first_piece));
        messages.push(json!({"role": "assistant", "content": resent.text}));
    }
    eprintln!("turn  prompt  cached  first token kept  first token resent");
    for (t, (prompt, cached, kept, resent)) in rows.iter().enumerate() {
        eprintln!(
            "{:>4}  {prompt:>6}  {cached:>6}  {:>13.0} ms  {:>15.0} ms",
            t + 1,
            kept.as_secs_f64() * 1e3,
            resent.as_secs_f64() * 1e3
        );
    }
    // Every turn after the first found the session of the one before, holding at least
    // that turn's whole prompt.
    assert_eq!(rows[0].1, 0, "the first turn had nothing to reuse");
    for t in 1..TURNS {
        assert!(
            rows[t].1 >= rows[t - 1].0,
            "turn {}: {} tokens reused, the previous prompt alone was {}",
            t + 1,
            rows[t].1,
            rows[t - 1].0
        );
    }
    let (first, last) = (rows[0].2.as_secs_f64(), rows[TURNS - 1].2.as_secs_f64());
    // (Attention over the history is what still grows: on this 135M model and 2 cores,
    // 83 prompt rows took 151 ms through the 30 blocks after 1,052 cached positions,
    // 90 ms after none.)
    let resent = rows[TURNS - 1].3.as_secs_f64() / rows[0].3.as_secs_f64();
    eprintln!(
        "last turn's first token against the first's: {:.2}x kept, {resent:.2}x resent",
        last / first
    );
    assert!(
        last <= 1.5 * first,
        "the last turn's first token took {:.0} ms, the first's {:.0} ms: over 1.5x",
        last * 1e3,
        first * 1e3
    );

    // Deleting the conversations frees their sessions on both servers; the gateway
    // that keeps nothing has closed its own.
    assert!(
        sessions(&a.addr)
            .iter()
            .all(|&n| n == CONVERSATIONS.len() as u64),
        "each kept conversation holds a session on each server: {:?}",
        sessions(&a.addr)
    );
    for id in CONVERSATIONS {
        let path = format!("/v1/conversations/{id}");
        let (status, body) = raw_http(&warm.url, "DELETE", &path, "");
        assert_eq!(status, 200, "{body}");
        let (status, body) = raw_http(&warm.url, "DELETE", &path, "");
        assert_eq!(status, 404, "deleted twice: {body}");
    }
    wait_until("every session closed", Duration::from_secs(30), || {
        let open = sessions(&a.addr);
        if open.iter().all(|n| *n == 0) {
            Ok(())
        } else {
            Err(format!("{open:?}"))
        }
    });
    drop((a, b));
}

/// A server short of cache drops the sessions a gateway keeps between turns, least
/// recently used first, to open another client's session; the gateway's next turn of a
/// conversation whose session went opens a fresh one and answers as before.
#[test]
fn kept_sessions_make_way_for_another_client() {
    let m = model();
    let a = serve_with(
        &m,
        &["--blocks", "0..30", "--max-cache-tokens", "400"],
        None,
    );
    wait_for_servers(&a.addr, 1);
    let api = start_api(&a.addr, &[]);
    let ask = |id: &str, q: &str| {
        let messages = [json!({"role": "user", "content": q})];
        let body = json!({
            "messages": messages, "max_tokens": 60, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true}, "conversation": id,
        });
        let s = stream_chat(&api.url, &body, HUNG).unwrap_or_else(|e| panic!("{id}: {e}"));
        (messages, s)
    };
    // Three conversations kept: each holds its ~100 tokens on the server.
    let mut first = Vec::new();
    for (id, q) in [
        ("one", "Name a fruit."),
        ("two", "Name a tree."),
        ("three", "Name a bird."),
    ] {
        first.push((id, ask(id, q)));
    }
    let kept = wait_until("three sessions kept", Duration::from_secs(20), || {
        let s = sessions(&a.addr);
        if s == [3] {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    eprintln!("sessions kept: {kept:?}");
    // Another client asks for ~190 tokens: fewer are free, and the gateway holds more
    // than its share (half the cache, with two clients); the asker stays within its own.
    let other = generate_json(&[
        "--bootstrap",
        &a.addr,
        "--chat",
        "--prompt",
        "Count from one to fifty.",
        "--max-tokens",
        "150",
    ]);
    assert!(
        !other["completion_tokens"]
            .as_array()
            .expect("tokens")
            .is_empty(),
        "{other}"
    );
    let left = sessions(&a.addr);
    assert!(
        left[0] < 3,
        "no kept session made way for the other client: {left:?}"
    );
    // The oldest went: its next turn starts afresh and still answers; the newest is
    // still kept and reused.
    for (id, (messages, s)) in [&first[0], &first[2]] {
        let mut messages = messages.to_vec();
        messages.push(json!({"role": "assistant", "content": s.text}));
        messages.push(json!({"role": "user", "content": "And another?"}));
        let body = json!({
            "messages": messages, "max_tokens": 8, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true}, "conversation": id,
        });
        let next = stream_chat(&api.url, &body, HUNG).unwrap_or_else(|e| panic!("{id}: {e}"));
        let cached = next.usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached tokens");
        assert!(!next.text.is_empty(), "{id}: no answer");
        match *id {
            "one" => assert_eq!(cached, 0, "the oldest conversation's session was kept"),
            _ => assert!(cached > 0, "the newest conversation's session went"),
        }
    }
    drop(a);
}

/// A kept session unused for `--conversation-idle` seconds is closed on its servers.
#[test]
fn an_idle_conversation_frees_its_session() {
    let m = model();
    let a = serve_with(&m, &["--blocks", "0..30"], None);
    wait_for_servers(&a.addr, 1);
    let api = start_api(&a.addr, &["--conversation-idle", "2"]);
    let messages = [json!({"role": "user", "content": "Name a colour."})];
    turn(&api.url, &messages, Some("idle"));
    assert_eq!(sessions(&a.addr), [1], "the conversation's session kept");
    let kept = std::time::Instant::now();
    wait_until(
        "the idle session closed",
        Duration::from_secs(20),
        || match sessions(&a.addr)[..] {
            [0] => Ok(()),
            ref n => Err(format!("{n:?}")),
        },
    );
    let after = kept.elapsed();
    assert!(
        after >= Duration::from_secs(2),
        "closed after {after:?}, not idle long enough"
    );
    let (status, _) = raw_http(&api.url, "DELETE", "/v1/conversations/idle", "");
    assert_eq!(status, 404, "an idle conversation was forgotten");
}
