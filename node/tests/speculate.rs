//! Speculative decoding: drafts verified in one pass through the chain give exactly the
//! text of decoding one token at a time, locally and through a swarm.

mod common;

use common::*;

/// A prompt whose answer repeats its context, where prompt lookup drafts well.
const PROMPT: &str = "Repeat this paragraph exactly, word for word: The lighthouse keeper climbed the hundred steps every evening, lit the great lamp, wound the clockwork that turned it, and sat by the window to watch the ships pass safely along the rocky coast until morning came.";

#[test]
fn drafts_verified_through_the_swarm_change_no_token() {
    let m = model();
    let a = serve(&m, "0..10", None);
    let b = serve(&m, "10..20", Some(&a.addr));
    let c = serve(&m, "20..30", Some(&a.addr));
    wait_for_servers(&a.addr, 3);
    let args = ["--chat", "--prompt", PROMPT, "--max-tokens", "48"];
    let plain = generate_json(&[&args[..], &["--local", "--speculate", "off"]].concat());
    assert_eq!(plain["drafts"]["drafted"], 0, "{plain}");
    for (name, extra) in [
        ("local", vec!["--local", "--speculate", "ngram"]),
        (
            "swarm",
            vec!["--bootstrap", &a.addr, "--speculate", "ngram"],
        ),
    ] {
        let spec = generate_json(&[&args[..], &extra[..]].concat());
        assert_eq!(
            ids(&spec, "completion_tokens"),
            ids(&plain, "completion_tokens"),
            "{name}: speculative decoding changed the text"
        );
        assert_eq!(spec["text"], plain["text"]);
        let accepted = spec["drafts"]["accepted"].as_u64().expect("accepted");
        let steps = spec["drafts"]["steps"].as_u64().expect("steps");
        eprintln!("{name}: {}", spec["drafts"]);
        assert!(
            accepted > 0 && steps > 0,
            "{name}: no draft accepted: {spec}"
        );
    }
    // Sampled, with a seed: the same text twice (drafts pass the sampler's own rule;
    // its distribution is checked in shard's sampling tests).
    let sampled = [
        "--bootstrap",
        &a.addr,
        "--speculate",
        "ngram",
        "--temperature",
        "0.7",
        "--seed",
        "5",
    ];
    let once = generate_json(&[&args[..], &sampled[..]].concat());
    let twice = generate_json(&[&args[..], &sampled[..]].concat());
    assert_eq!(
        ids(&once, "completion_tokens"),
        ids(&twice, "completion_tokens")
    );
    assert!(once["drafts"]["drafted"].as_u64() > Some(0), "{once}");
    drop((a, b, c));
}

/// A verify step's rows are computed exactly as its tokens fed one at a time: the same
/// bits through all of the default model's blocks. (Computed as one segment, they
/// drifted from one-token steps by up to 8.9 in the hidden state after 30 blocks with a
/// 90-token context: enough to turn a near-tie.)
#[test]
fn a_verify_step_computes_as_its_tokens_one_at_a_time() {
    use shard::candle_core::Device;
    let file = shard::ModelFile::open(model()).expect("model");
    let n = file.config().n_layers;
    let span = shard::Span::load(&file, 0, n, &Device::Cpu, |_, _| {}).expect("span");
    let head = shard::Head::load(&file, &Device::Cpu).expect("head");
    let prompt: Vec<u32> = (0..90u32).map(|i| (i * 37 % 1000) + 100).collect();
    let more: Vec<u32> = vec![300, 1700, 4200, 500, 880];
    let primed = || {
        let mut c = span.new_cache(256);
        span.forward(&head.embed(&prompt).expect("embed"), &mut c)
            .expect("prompt");
        c
    };
    let mut one = primed();
    let singles: Vec<Vec<f32>> = more
        .iter()
        .map(|t| {
            let x = head.embed(&[*t]).expect("embed");
            let h = span.forward(&x, &mut one).expect("step");
            h.flatten_all().and_then(|h| h.to_vec1()).expect("row")
        })
        .collect();
    let mut batch = primed();
    let x = head.embed(&more).expect("embed");
    let rows: Vec<Vec<f32>> = span
        .forward(&x, &mut batch)
        .and_then(|h| Ok(h.to_vec2()?))
        .expect("verify step");
    for (i, (a, b)) in singles.iter().zip(&rows).enumerate() {
        assert!(
            a == b,
            "row {i} of the verify step differs from its token fed alone"
        );
    }
    // The same in a server's batch: beside another session's decode step (rows of
    // single-token steps) and beside another session's prompt chunk.
    let chunk = head.embed(&prompt[..40]).expect("embed");
    let one_more = head.embed(&[77]).expect("embed");
    let besides = [
        ("a decode step", &one_more, primed()),
        ("a prompt chunk", &chunk, span.new_cache(256)),
    ];
    for (what, beside, mut theirs) in besides {
        let mut mine = primed();
        let out = span
            .forward_batch(vec![(&x, &mut mine), (beside, &mut theirs)])
            .expect("batch");
        let rows: Vec<Vec<f32>> = out[0].to_vec2().expect("rows");
        for (i, (a, b)) in singles.iter().zip(&rows).enumerate() {
            assert!(
                a == b,
                "row {i} of the verify step, batched with {what} of another session, differs from its token fed alone"
            );
        }
    }
}
