//! `shoal api` driven by the official `openai` Python package (from PyPI) against a
//! 3-node loopback swarm, and its error responses checked raw; its dashboard opened in
//! headless Chromium; its metrics and the servers' read by Prometheus' own parser.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use common::gateway::*;
use common::*;
use serde_json::Value;

/// The `openai` package, installed with pip into the cache on first use.
fn openai_package() -> PathBuf {
    python_package("openai", "3.57.0", "openai")
}

#[test]
fn openai_client_gets_completions_from_the_swarm() {
    let m = model();
    let a = serve(&m, "0..10", None);
    let b = serve(&m, "10..20", Some(&a.addr));
    let c = serve(&m, "20..30", Some(&a.addr));
    let api = start_api(&a.addr, &[]);
    let package = openai_package();
    let r = api_script("openai_client.py", &[api.url.as_ref()], &package);

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

    // Concurrent requests are served together (each started before any ended), and
    // batching with each other changes no answer.
    assert_eq!(
        r["concurrent"]["overlap"], true,
        "four concurrent requests were served one after another"
    );
    for t in r["concurrent"]["texts"].as_array().expect("texts") {
        assert_eq!(t, &plain["text"]);
    }

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
    wait_until(
        "the session freed after the client hung up",
        Duration::from_secs(15),
        || match sessions(&a.addr) {
            now if now == vec![0] => Ok(()),
            now => Err(format!("sessions open: {now:?}")),
        },
    );
}

/// Headless Chromium on `url` with `args` (e.g. `--dump-dom`), given 5 s of page time
/// to run its scripts (time waiting on the network does not count).
fn headless(chromium: &std::path::Path, args: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = std::process::Command::new(chromium);
    // Without the background-networking flags Chromium tries hosts this sandbox
    // cannot reach; --no-sandbox because tests may run as root.
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1400,900",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .arg(url);
    let (out, _) = run(cmd, Duration::from_secs(90));
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `GET /api/swarm`, parsed.
fn swarm_view(api: &Api) -> Value {
    let (status, body) = raw_http(&api.url, "GET", "/api/swarm", "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

#[test]
fn the_dashboard_shows_every_server_in_a_browser() {
    let Some(chromium) = chromium() else {
        return;
    };
    let m = model();
    let a = serve_with(&m, &["--blocks", "0..10", "--name", "alpha"], None);
    let b = serve(&m, "10..30", Some(&a.addr));
    // A name is the operator's free text: it must show as text, never as markup.
    let c = serve_with(
        &m,
        &["--blocks", "0..30", "--name", "<i>gamma</i>"],
        Some(&a.addr),
    );
    let api = start_api(&a.addr, &[]);
    let (status, done) = http(
        &api.url,
        "/v1/completions",
        r#"{"prompt":"The capital of France is","max_tokens":4,"temperature":0}"#,
    );
    assert_eq!(status, 200, "{done}");
    let expected = [(&a, "0..10"), (&b, "10..30"), (&c, "0..30")];
    // The page shows what /api/swarm says: wait until it has found every server.
    let view = wait_until(
        "the gateway finds every server",
        Duration::from_secs(30),
        || {
            let view = swarm_view(&api);
            let answering: Vec<&str> = view["servers"]
                .as_array()
                .expect("servers")
                .iter()
                .filter(|s| !s["rtt_ms"].is_null())
                .filter_map(|s| s["peer_id"].as_str())
                .collect();
            if expected
                .iter()
                .all(|(s, _)| answering.contains(&s.peer.as_str()))
            {
                Ok(view)
            } else {
                Err(view.to_string())
            }
        },
    );
    // 0..10 by alpha and gamma, 10..30 by the second and gamma.
    assert_eq!(view["coverage"], serde_json::json!(vec![2; 30]), "{view}");

    let dom = String::from_utf8(headless(&chromium, &["--dump-dom"], &api.url).stdout)
        .expect("UTF-8 DOM");
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page never rendered:\n{dom}"
    );
    for (server, span) in expected {
        let at = dom
            .find(&format!(r#"data-peer="{}""#, server.peer))
            .unwrap_or_else(|| panic!("peer {} missing from the dashboard:\n{dom}", server.peer));
        let row = &dom[at..at + dom[at..].find("</tr>").expect("row end")];
        assert!(row.contains(&format!(r#"data-span="{span}""#)), "{row}");
        assert!(row.contains(&format!(">{span}<")), "span not shown: {row}");
        assert!(row.contains(">ok<"), "not shown healthy: {row}");
    }
    assert!(dom.contains(">alpha<"), "names are shown");
    assert!(
        dom.contains("&lt;i&gt;gamma&lt;/i&gt;") && !dom.contains("<i>gamma</i>"),
        "a server's name must be escaped"
    );
    let id = done["id"].as_str().expect("id");
    assert!(dom.contains(id), "the request {id} is not listed");

    // The screenshot, kept as an artifact of the test run.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    let shot = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &chromium,
        &[&format!("--screenshot={}", shot.display())],
        &api.url,
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// Every sample of a family parsed by `parse_metrics.py`: (sample name, labels, value).
fn samples<'a>(scrape: &'a Value, family: &str) -> Vec<(&'a str, &'a Value, f64)> {
    scrape["families"][family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family} in {scrape}"))
        .iter()
        .map(|s| {
            (
                s[0].as_str().expect("name"),
                &s[1],
                s[2].as_f64().expect("value"),
            )
        })
        .collect()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(scrape: &Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, family)
        .into_iter()
        .find(|(n, l, _)| *n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, _, v)| v)
        .unwrap_or_else(|| panic!("no {name}{labels:?} in {}", scrape["families"][family]))
}

/// Every scrape of `urls` (the gateway's and the servers' metrics) through the Prometheus
/// parser, `{url: {content_type, families}}`, once the servers (all but the first URL)
/// report no open session: sessions close just after the answer, so this gives the
/// servers a moment to count them (10 s at most).
fn scrape_when_closed(urls: &[String]) -> Value {
    let package = python_package("prometheus-client", "0.26.0", "prometheus_client");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/api/parse_metrics.py");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(&script).args(urls).env("PYTHONPATH", &package);
        let (out, _) = run(cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "the Prometheus parser refused the metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let scrapes: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let open: f64 = urls[1..]
            .iter()
            .map(|u| {
                sample(
                    &scrapes[u],
                    "shoal_sessions_open",
                    "shoal_sessions_open",
                    &[],
                )
            })
            .sum();
        if open == 0.0 || std::time::Instant::now() > deadline {
            return scrapes;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two servers of half the default model each, both serving metrics, and a gateway.
fn two_servers_with_metrics() -> (Server, Server, Api) {
    let m = model();
    let a = serve_with(&m, &["--blocks", "0..15", "--metrics", "127.0.0.1:0"], None);
    let b = serve_with(
        &m,
        &["--blocks", "15..30", "--metrics", "127.0.0.1:0"],
        Some(&a.addr),
    );
    // Keeping nothing between turns: the servers' sessions close as each generation
    // ends, which is what this counts (conversation.rs covers the sessions kept).
    let api = start_api(&a.addr, &["--keep-conversations", "0"]);
    (a, b, api)
}

#[test]
fn metrics_are_openmetrics_and_count_the_work() {
    let (a, b, api) = two_servers_with_metrics();
    // Two generations and one refusal.
    let (s1, text) = http(
        &api.url,
        "/v1/completions",
        r#"{"prompt":"The capital of France is","max_tokens":6,"temperature":0}"#,
    );
    let (s2, chat) = http(
        &api.url,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"Say hi"}],"max_tokens":5,"temperature":0}"#,
    );
    let (s3, _) = http(&api.url, "/v1/chat/completions", "{not json");
    assert_eq!((s1, s2, s3), (200, 200, 400), "{text} {chat}");
    // Steps through the blocks: one prefill chunk, then one per token fed back (the
    // last token is fed back only when the model ended the answer itself).
    let mut steps = 0.0;
    let mut positions = 0.0;
    let (mut prompt, mut completion) = (0.0, 0.0);
    for r in [&text, &chat] {
        let p = r["usage"]["prompt_tokens"].as_f64().expect("usage");
        let c = r["usage"]["completion_tokens"].as_f64().expect("usage");
        let fed = if r["choices"][0]["finish_reason"] == "length" {
            c - 1.0
        } else {
            c
        };
        steps += 1.0 + fed;
        positions += p + fed;
        prompt += p;
        completion += c;
    }

    let urls = [
        format!("{}/metrics", api.url),
        a.metrics.clone().expect("metrics url"),
        b.metrics.clone().expect("metrics url"),
    ];
    let scrapes = scrape_when_closed(&urls);
    eprintln!("{scrapes:#}");

    let gw = &scrapes[&urls[0]];
    assert!(
        gw["content_type"]
            .as_str()
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{}",
        gw["content_type"]
    );
    let value =
        |family: &str, name: &str, labels: &[(&str, &str)]| sample(gw, family, name, labels);
    assert_eq!(
        value(
            "shoal_tokens_generated",
            "shoal_tokens_generated_total",
            &[]
        ),
        completion
    );
    assert_eq!(
        value("shoal_prompt_tokens", "shoal_prompt_tokens_total", &[]),
        prompt
    );
    let requests = |endpoint, outcome| {
        value(
            "shoal_requests",
            "shoal_requests_total",
            &[("endpoint", endpoint), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("completions", "ok"), 1.0);
    assert_eq!(requests("chat.completions", "ok"), 1.0);
    assert_eq!(requests("chat.completions", "rejected"), 1.0);
    assert_eq!(
        gw["families"]["shoal_step_latency_seconds"]["type"],
        "histogram"
    );
    assert_eq!(
        value(
            "shoal_step_latency_seconds",
            "shoal_step_latency_seconds_count",
            &[]
        ),
        steps
    );
    assert_eq!(
        value("shoal_sessions_open", "shoal_sessions_open", &[]),
        0.0
    );
    assert_eq!(value("shoal_reroutes", "shoal_reroutes_total", &[]), 0.0);
    assert_eq!(
        value(
            "shoal_prompt_tokens_cached",
            "shoal_prompt_tokens_cached_total",
            &[]
        ),
        0.0
    );
    assert_eq!(
        value("shoal_conversations_kept", "shoal_conversations_kept", &[]),
        0.0
    );

    // Every step crossed both servers, each over its half of the blocks.
    for url in &urls[1..] {
        let s = &scrapes[url];
        let value = |family: &str, name: &str| sample(s, family, name, &[]);
        assert_eq!(
            value("shoal_steps_served", "shoal_steps_served_total"),
            steps,
            "{url}"
        );
        assert_eq!(
            value("shoal_tokens_processed", "shoal_tokens_processed_total"),
            positions,
            "{url}"
        );
        assert_eq!(
            value(
                "shoal_step_latency_seconds",
                "shoal_step_latency_seconds_count"
            ),
            steps,
            "{url}"
        );
        let buckets: Vec<f64> = samples(s, "shoal_step_latency_seconds")
            .into_iter()
            .filter(|(n, _, _)| n.ends_with("_bucket"))
            .map(|(_, _, v)| v)
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        assert_eq!(buckets.last().copied(), Some(steps), "+Inf bucket");
        assert_eq!(
            value("shoal_sessions_open", "shoal_sessions_open"),
            0.0,
            "{url}"
        );
        assert_eq!(
            value("shoal_cache_tokens_used", "shoal_cache_tokens_used"),
            0.0
        );
        assert!(value("shoal_cache_tokens_limit", "shoal_cache_tokens_limit") > 0.0);
    }
}

/// Concurrent generations through one gateway run as batches on the servers, not one
/// step at a time: the gateway's LM head waits briefly for the rows on their way and
/// each server for the steps due from its last batch's sessions, so sessions that once
/// ran together stay together. (Before that, 8 sessions on a 3-server swarm ran ~2
/// steps per batch on average; now ~7.)
#[test]
fn concurrent_generations_batch_on_the_servers() {
    let (a, b, api) = two_servers_with_metrics();
    let sessions = 6;
    let answers: Vec<_> = (0..sessions)
        .map(|i| {
            let url = api.url.clone();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"prompt":"Chapter {i}. The lighthouse keeper","max_tokens":48,"temperature":0}}"#
                );
                http(&url, "/v1/completions", &body)
            })
        })
        .collect();
    let mut tokens = 0.0;
    for a in answers {
        let (status, answer) = a.join().expect("request thread");
        assert_eq!(status, 200, "{answer}");
        tokens += answer["usage"]["completion_tokens"]
            .as_f64()
            .expect("usage");
    }
    let urls = [
        format!("{}/metrics", api.url),
        a.metrics.clone().expect("metrics url"),
        b.metrics.clone().expect("metrics url"),
    ];
    let scrapes = scrape_when_closed(&urls);
    for url in &urls[1..] {
        let value = |name: &str| sample(&scrapes[url], "shoal_batch_sessions", name, &[]);
        let (steps, batches) = (
            value("shoal_batch_sessions_sum"),
            value("shoal_batch_sessions_count"),
        );
        let mean = steps / batches;
        eprintln!(
            "{url}: {steps} steps of {tokens} tokens in {batches} batches, {mean:.2} per batch"
        );
        assert!(
            mean >= 3.0,
            "{sessions} concurrent sessions ran {mean:.2} steps per batch on {url}"
        );
    }
}
