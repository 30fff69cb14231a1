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
