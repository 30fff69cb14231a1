//! The chat page `shoal api` serves at `/chat`, driven in headless Chromium: a question
//! typed and sent, its streamed answer (the API's answer for the same seed) with the
//! route under it, a long answer stopped with the button; the screenshot is kept as a
//! test artifact.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::gateway::*;
use common::*;

#[test]
fn the_chat_page_streams_answers_shows_routes_and_stops() {
    let Some(chromium) = chromium() else {
        return;
    };
    let m = model();
    // 20 ms links: a long answer takes long enough to stop midway.
    let a = serve_with(&m, &["--blocks", "0..15", "--emulate-rtt-ms", "20"], None);
    let b = serve_with(
        &m,
        &["--blocks", "15..30", "--emulate-rtt-ms", "20"],
        Some(&a.addr),
    );
    wait_for_servers(&a.addr, 2);
    let api = start_api(&a.addr, &[]);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    let shot = dir.join("chat.png");
    let _ = std::fs::remove_file(&shot);
    let package = python_package("websocket-client", "1.9.2", "websocket");
    let r = api_script(
        "chat_page.py",
        &[chromium.as_ref(), api.url.as_ref(), shot.as_ref()],
        &package,
    );

    // The streamed answer is the API's for the same question, seed and settings.
    let (status, api_answer) = http(
        &api.url,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"What is the capital of France? Answer in one sentence."}],"max_tokens":24,"temperature":0,"top_p":1,"seed":7}"#,
    );
    assert_eq!(status, 200, "{api_answer}");
    assert_eq!(r["answer"], api_answer["choices"][0]["message"]["content"]);
    assert!(r["answer"].as_str().expect("answer").contains("Paris"));
    // The route under it: both servers with their spans.
    assert_eq!(
        r["route"],
        serde_json::json!([[a.peer, "0..15"], [b.peer, "15..30"]]),
        "{r}"
    );
    assert_eq!(r["models"].as_array().map(Vec::len), Some(1), "{r}");
    // Stopped midway: some text kept, the Send button back, the request cancelled.
    assert_eq!(r["stop_shown"], true);
    let stopped = r["stopped"].as_str().expect("stopped text");
    assert!(stopped.len() > 20, "{stopped:?}");
    assert_eq!(r["send_back"], true);
    assert_eq!(
        r["stored"], 4,
        "two questions and two answers kept in the browser"
    );
    assert_eq!(r["listed"], 1);
    wait_until(
        "the stopped request counted as cancelled",
        Duration::from_secs(30),
        || {
            let (_, metrics) = raw_http(&api.url, "GET", "/metrics", "");
            metrics
                .lines()
                .find(|l| l.contains(r#"outcome="cancelled""#) && !l.starts_with('#'))
                .map(|_| ())
                .ok_or(metrics)
        },
    );
    let png = std::fs::metadata(&shot).expect("screenshot written");
    assert!(png.len() > 10_000, "screenshot of {} bytes", png.len());
    drop((a, b));
}
