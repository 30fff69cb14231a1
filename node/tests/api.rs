//! `shoal api` driven by the official `openai` Python package (from PyPI) against a
//! 3-node loopback swarm, and its error responses checked raw.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The `openai` package, installed with pip into the cache on first use.
fn openai_package() -> PathBuf {
    let dir = shoal_node::model_cache::cache_dir().join("openai-py-3.57.0");
    if !dir.join("openai").exists() {
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .arg("openai==3.57.0")
            .status()
            .expect("python3 -m pip");
        assert!(status.success(), "pip could not install openai");
    }
    dir
}

/// A `shoal api` process, killed when dropped.
struct Api {
    child: Child,
    url: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_api(bootstrap: &str, extra: &[&str]) -> Api {
    let log = std::env::temp_dir().join(format!("shoal-api-test-{}.log", std::process::id()));
    let mut child = shoal()
        .args([
            "api",
            "--listen",
            "127.0.0.1:0",
            "--bootstrap",
            bootstrap,
            "--model",
        ])
        .arg(model())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn shoal api");
    let line = first_line(&mut child, &log, "shoal api");
    let url = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Api { child, url }
}

/// One raw HTTP request; the status and the JSON body.
fn http(url: &str, path: &str, body: &str) -> (u16, Value) {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    let status: u16 = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    let json = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

#[test]
fn openai_client_gets_completions_from_the_swarm() {
    let m = model();
    let a = serve(&m, "0..10", None);
    let b = serve(&m, "10..20", Some(&a.addr));
    let c = serve(&m, "20..30", Some(&a.addr));
    let api = start_api(&a.addr, &[]);
    let package = openai_package();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/api/openai_client.py");
    let (out, _) = run(
        {
            let mut cmd = std::process::Command::new("python3");
            cmd.arg(&script).arg(&api.url).env("PYTHONPATH", &package);
            cmd
        },
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "the openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON from the script");
    eprintln!("{r:#}");

    // Non-streamed: the reference answer, ended by the model, with honest usage.
    let plain = &r["plain"];
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["role"], "assistant");
    assert_eq!(plain["finish_reason"], "stop");
    let text = plain["text"].as_str().expect("text");
    assert!(text.contains("Paris"), "{text:?}");
    let usage: Vec<u64> = serde_json::from_value(plain["usage"].clone()).expect("usage");
    assert!(
        usage[0] > 10 && usage[1] > 0 && usage[2] == usage[0] + usage[1],
        "{usage:?}"
    );

    // Streamed: the same text in pieces, one role chunk, the same finish and usage.
    let stream = &r["stream"];
    assert_eq!(
        stream["text"], plain["text"],
        "greedy stream equals the plain answer"
    );
    assert_eq!(stream["finish_reason"], "stop");
    assert_eq!(stream["roles"], serde_json::json!(["assistant"]));
    assert_eq!(stream["usage"], plain["usage"]);
    assert!(stream["chunks"].as_u64().expect("chunks") > 3);

    // max_tokens cuts the answer: finish_reason "length".
    assert_eq!(r["short"]["finish_reason"], "length");
    assert_eq!(r["short"]["completion_tokens"], 3);
    assert_eq!(r["completion"]["completion_tokens"], 8);
    assert_eq!(r["completion"]["finish_reason"], "length");
    assert_eq!(r["unknown_model"]["status"], 404);
    assert_eq!(r["unknown_model"]["code"], "model_not_found");

    // Errors, raw: bad JSON, unknown model, a prompt longer than the context.
    let (status, body) = http(&api.url, "/v1/chat/completions", "{not json");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, body) = http(
        &api.url,
        "/v1/chat/completions",
        r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, "model_not_found".into())
    );
    let long = "word ".repeat(9000);
    let (status, body) = http(
        &api.url,
        "/v1/completions",
        &serde_json::json!({"prompt": long, "max_tokens": 4}).to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    drop((a, b, c));
}

#[test]
fn no_route_is_a_503() {
    let m = model();
    // Blocks 10..30 have no server.
    let a = serve(&m, "0..10", None);
    let api = start_api(&a.addr, &["--route-timeout", "2"]);
    let (status, body) = http(
        &api.url,
        "/v1/completions",
        r#"{"prompt":"Hello","max_tokens":2}"#,
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_route");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("10..30"),
        "{body}"
    );
}

/// Sessions on the swarm's servers, by `shoal status`.
fn sessions(bootstrap: &str) -> Vec<u64> {
    status(bootstrap)["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| s["sessions"].as_u64().expect("sessions"))
        .collect()
}

#[test]
fn a_client_that_hangs_up_frees_its_sessions() {
    let m = model();
    let a = serve(&m, "0..30", None);
    let api = start_api(&a.addr, &[]);
    let addr = api.url.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    // Counting goes on and on: without the hang-up this would run for most of a minute.
    let body = r#"{"prompt":"1, 2, 3, 4, 5, 6,","max_tokens":7000,"temperature":0,"stream":true}"#;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data:").count() < 5 {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(sessions(&a.addr), vec![1], "the generation holds a session");
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = sessions(&a.addr);
        if now == vec![0] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions still open 15 s after the client hung up: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
