//! A `shoal api` gateway for tests: started on a free port, spoken to raw.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{first_line, model, shoal};

/// A `shoal api` process, killed when dropped.
pub(crate) struct Api {
    pub(crate) child: Child,
    pub(crate) url: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_api(bootstrap: &str, extra: &[&str]) -> Api {
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::env::temp_dir().join(format!("shoal-api-test-{}-{n}.log", std::process::id()));
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

/// One raw HTTP POST of a JSON body; the status and the JSON answer.
pub(crate) fn http(url: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = raw_http(url, "POST", path, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One raw HTTP request; the status and the body.
pub(crate) fn raw_http(url: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// A streamed chat completion as its client saw it.
pub(crate) struct Streamed {
    /// The answer's text, every piece joined.
    pub(crate) text: String,
    /// From sending the request to the first piece of text.
    pub(crate) first_piece: Duration,
    /// The usage chunk (when `stream_options.include_usage` was asked for), else null.
    pub(crate) usage: Value,
}

/// Sends `body` (a chat request with `"stream": true`) to the gateway and reads the
/// answer's events to the end; an error event, a refusal, a read stalled for `hung` or
/// a stream ending without `[DONE]` is an error, with what was seen.
pub(crate) fn stream_chat(url: &str, body: &Value, hung: Duration) -> Result<Streamed, String> {
    use std::io::BufRead;
    let body = body.to_string();
    let addr = url.trim_start_matches("http://");
    let sent = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(hung)).expect("timeout");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| format!("hung: {e}"))?;
    if !status.contains(" 200 ") {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        return Err(format!("{} {rest}", status.trim()));
    }
    let mut text = String::new();
    let mut first_piece = None;
    let mut usage = Value::Null;
    for line in r.lines() {
        let line = line.map_err(|e| format!("hung mid-answer: {e}"))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return Ok(Streamed {
                text,
                first_piece: first_piece.unwrap_or_else(|| sent.elapsed()),
                usage,
            });
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if let Some(e) = v.get("error") {
            return Err(format!("error event: {e}"));
        }
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            if !piece.is_empty() {
                first_piece.get_or_insert_with(|| sent.elapsed());
            }
            text.push_str(piece);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    Err("the stream ended without [DONE]".into())
}

/// Debian's Chromium. Missing, the browser test is skipped with a note, unless
/// `SHOAL_REQUIRE_BROWSER` is set (`.ci/run` installs Chromium and sets it, so CI
/// cannot skip it).
pub(crate) fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("SHOAL_REQUIRE_BROWSER").is_none(),
            "SHOAL_REQUIRE_BROWSER is set but chromium is not installed (apt-get install chromium)"
        );
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium; .ci/run does)");
    }
    found
}

/// Runs `node/tests/api/<script>` (a Python script driving the gateway) with `args` and
/// `pythonpath`; its stdout, parsed as JSON (and printed). Panics with its stderr if it
/// fails.
pub(crate) fn api_script(
    script: &str,
    args: &[&std::ffi::OsStr],
    pythonpath: &std::path::Path,
) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/api")
        .join(script);
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(&path).args(args).env("PYTHONPATH", pythonpath);
    let (out, _) = super::run(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON from the script");
    eprintln!("{r:#}");
    r
}
