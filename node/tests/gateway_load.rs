//! The gateway under more requests than it runs at once: they wait in a queue, then are
//! turned away with a 429 and a `Retry-After`; a client that hangs up gives its turn to
//! the next; `/metrics` shows the queue and the time to first token.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::gateway::*;
use common::*;
use serde_json::Value;

/// Sends a POST of `body` to `path` and returns the open connection (to read the answer
/// from, or to hang up by dropping it).
fn post(url: &str, path: &str, body: &str) -> TcpStream {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    s
}

/// The status line's code, the headers (lower-cased names) and the body of an answer.
fn answer(s: TcpStream) -> (u16, Vec<(String, String)>, String) {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut body = String::new();
    std::io::Read::read_to_string(&mut r, &mut body).expect("body");
    (status, headers, body)
}

/// The value of the metric line `name` (no labels) in the gateway's `/metrics`.
fn metric(url: &str, name: &str) -> f64 {
    let (_, text) = raw_http(url, "GET", "/metrics", "");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn a_full_gateway_queues_then_refuses_with_retry_after() {
    let m = model();
    // One server 100 ms away: a long answer holds its turn for seconds.
    let a = serve_with(&m, &["--blocks", "0..30", "--emulate-rtt-ms", "100"], None);
    wait_for_servers(&a.addr, 1);
    let api = start_api(&a.addr, &["--max-running", "1", "--max-queued", "1"]);
    let chat = |max_tokens: usize, stream: bool| {
        serde_json::json!({
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream, "speculate": "off",
        })
        .to_string()
    };
    // The first request takes the one turn; its first piece shows it running.
    let first = post(&api.url, "/v1/chat/completions", &chat(400, true));
    let mut first = BufReader::new(first);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.contains("\"content\":\"\"") {
        seen.clear();
        first.read_line(&mut seen).expect("a streamed line");
    }
    // The second waits in the queue...
    let second = std::thread::spawn({
        let url = api.url.clone();
        let body = chat(4, false);
        move || answer(post(&url, "/v1/chat/completions", &body))
    });
    let queued_by = wait_until("one request queued", Duration::from_secs(30), || {
        let q = metric(&api.url, "shoal_queued_requests");
        if q == 1.0 {
            Ok(std::time::Instant::now())
        } else {
            Err(format!("{q} queued"))
        }
    });
    // ...and the third finds the queue full: 429, a Retry-After, OpenAI's error shape;
    // on the Anthropic endpoint, Anthropic's.
    let (status, headers, body) = answer(post(&api.url, "/v1/chat/completions", &chat(4, false)));
    assert_eq!(status, 429, "{body}");
    let retry: u64 = headers
        .iter()
        .find(|(k, _)| k == "retry-after")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {headers:?}"));
    assert!(retry >= 1, "Retry-After: {retry}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let (_, models) = raw_http(&api.url, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&models).expect("models");
    let messages = serde_json::json!({
        "model": models["data"][0]["id"], "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let (status, _, body) = answer(post(&api.url, "/v1/messages", &messages.to_string()));
    assert_eq!(status, 429, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    // Hanging up gives the turn to the one waiting, which is answered.
    let waited = queued_by.elapsed().as_secs_f64();
    drop(first);
    let (status, _, body) = second.join().expect("second request");
    assert_eq!(status, 200, "{body}");
    assert_eq!(metric(&api.url, "shoal_queued_requests"), 0.0);
    // Its time to first token (the only one: the others were cancelled or refused)
    // counts its wait for a turn, then the prompt's round trip of 100 ms.
    let count = metric(&api.url, "shoal_time_to_first_token_seconds_count");
    let sum = metric(&api.url, "shoal_time_to_first_token_seconds_sum");
    assert_eq!(count, 1.0, "first tokens timed");
    assert!(
        sum >= waited + 0.1,
        "the queued request waited over {waited:.3} s, yet its first token came {sum:.3} s after it arrived"
    );
    drop(a);
}

/// A plain (not streamed) request whose client hangs up mid-generation is cancelled:
/// the gateway stops generating and closes its sessions on the servers, rather than
/// finishing an answer nobody will read.
#[test]
fn a_plain_request_whose_client_hangs_up_is_cancelled() {
    let m = model();
    // One server 100 ms away: 300 tokens take over 30 s.
    let a = serve_with(&m, &["--blocks", "0..30", "--emulate-rtt-ms", "100"], None);
    wait_for_servers(&a.addr, 1);
    let api = start_api(&a.addr, &[]);
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 300, "temperature": 0, "speculate": "off",
    })
    .to_string();
    let client = post(&api.url, "/v1/chat/completions", &body);
    // Waits until the server holds `want` sessions.
    let sessions = |what: &str, want: u64, within: u64| {
        wait_until(what, Duration::from_secs(within), || {
            match status(&a.addr)["servers"][0]["sessions"].as_u64() {
                Some(n) if n == want => Ok(()),
                n => Err(format!("{n:?} sessions")),
            }
        })
    };
    sessions("the generation running", 1, 30);
    std::thread::sleep(Duration::from_secs(2));
    drop(client);
    let hung_up = std::time::Instant::now();
    sessions("the session closed", 0, 10);
    let (_, swarm) = raw_http(&api.url, "GET", "/api/swarm", "");
    let swarm: Value = serde_json::from_str(&swarm).expect("JSON");
    assert_eq!(
        swarm["requests"][0]["state"], "cancelled",
        "{:#}",
        swarm["requests"]
    );
    eprintln!("cancelled {:?} after the client hung up", hung_up.elapsed());
    drop(a);
}
