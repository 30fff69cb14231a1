//! Failover: servers die mid-generation and the generation goes on, unchanged.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PROMPT: &str = "Write a short story about a lighthouse keeper and a storm.";
const TOKENS: &str = "40";

fn local_reference() -> Value {
    generate_json(&[
        "--local",
        "--chat",
        "--prompt",
        PROMPT,
        "--max-tokens",
        TOKENS,
    ])
}

/// Bytes of text the first `n` completion tokens decode to.
fn text_len_of_first(m: &std::path::Path, reference: &Value, n: usize) -> usize {
    let file = shard::ModelFile::open(m).expect("model");
    let text = shard::TextCodec::from_model(&file).expect("tokenizer");
    let ids: Vec<u32> = reference["completion_tokens"]
        .as_array()
        .expect("ids")
        .iter()
        .take(n)
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    text.decode(&ids).expect("decode").len()
}

/// Two servers of each of two spans of `m`, the first the bootstrap: its address and
/// the servers, once all are listed.
fn two_replicas(m: &std::path::Path, first: &str, second: &str) -> (String, Vec<Server>) {
    let a = serve(m, first, None);
    let boot = a.addr.clone();
    let mut servers = vec![a];
    for blocks in [first, second, second] {
        servers.push(serve(m, blocks, Some(&boot)));
    }
    wait_for_servers(&boot, servers.len());
    (boot, servers)
}

/// Kills a server at once (SIGKILL): it has no chance to tell anyone.
fn kill(s: &mut Server) {
    s.child.kill().expect("kill");
}

/// Stops a server as Ctrl-C does (SIGINT).
fn interrupt(s: &mut Server) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &s.child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success(), "kill -INT failed");
}

/// Runs a streaming generation through `bootstrap`; once `stop_after` bytes of text
/// have arrived, stops the server at position `hop` of the route with `stop`. Returns
/// the text, the route lines seen on stderr, the time from the stop to the next text,
/// the stopped server's peer id and the client's log.
fn generate_and_stop(
    m: &std::path::Path,
    bootstrap: &str,
    servers: &mut [Server],
    hop: usize,
    stop_after: usize,
    stop: fn(&mut Server),
) -> (String, Vec<String>, Duration, String, String) {
    generate_and_stop_with(m, bootstrap, servers, hop, stop_after, stop, PROMPT, &[])
}

/// [`generate_and_stop`] of `prompt`, with `extra` arguments for `shoal generate`.
#[allow(clippy::too_many_arguments)]
fn generate_and_stop_with(
    m: &std::path::Path,
    bootstrap: &str,
    servers: &mut [Server],
    hop: usize,
    stop_after: usize,
    stop: fn(&mut Server),
    prompt: &str,
    extra: &[&str],
) -> (String, Vec<String>, Duration, String, String) {
    let mut child = shoal()
        .args([
            "generate",
            "--chat",
            "--prompt",
            prompt,
            "--max-tokens",
            TOKENS,
            "--bootstrap",
            bootstrap,
            "--model",
        ])
        .arg(m)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn generate");
    let mut stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let (route_tx, route_rx) = mpsc::channel::<String>();
    let err_thread = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("route ") {
                let _ = route_tx.send(line.clone());
            }
            all.push(line);
        }
        all
    });
    let first_route = route_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a route line on stderr");
    let victim_peer = first_route
        .split_whitespace()
        .nth(hop + 1)
        .and_then(|h| h.split_once('['))
        .map(|(p, _)| p.to_string())
        .unwrap_or_else(|| panic!("no hop {hop} in {first_route:?}"));
    let (bytes_tx, bytes_rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || bytes_tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    let mut text = Vec::new();
    let mut killed_at: Option<Instant> = None;
    let mut next_after_kill: Option<Duration> = None;
    let deadline = Instant::now() + Duration::from_secs(240);
    while let Ok((at, chunk)) =
        bytes_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        text.extend_from_slice(&chunk);
        if let Some(k) = killed_at {
            next_after_kill.get_or_insert(at.duration_since(k));
        } else if text.len() >= stop_after {
            let victim = servers
                .iter_mut()
                .find(|s| s.peer == victim_peer)
                .expect("victim is one of ours");
            stop(victim);
            killed_at = Some(Instant::now());
        }
    }
    let status = child.wait().expect("wait");
    let log = err_thread.join().expect("stderr").join("\n");
    assert!(status.success(), "generation failed:\n{log}");
    let routes: Vec<String> = log
        .lines()
        .filter(|l| l.starts_with("route "))
        .map(str::to_string)
        .collect();
    (
        String::from_utf8(text).expect("utf-8"),
        routes,
        next_after_kill.expect("text after the kill"),
        victim_peer,
        log,
    )
}

/// Two replicas per span; the server the client uses dies after at least 8 tokens, at
/// the start, the middle and the end of the chain in turn: the generation completes with
/// exactly the undisturbed output.
#[test]
fn a_server_dying_mid_generation_changes_nothing() {
    let m = model();
    let reference = local_reference();
    let expected = reference["text"].as_str().expect("text").to_string();
    assert_eq!(
        reference["completion_tokens"].as_array().map(Vec::len),
        Some(40)
    );
    let kill_after = text_len_of_first(&m, &reference, 8);

    let first = serve(&m, "0..10", None);
    let boot = first.addr.clone();
    let mut servers = vec![first];
    for blocks in ["0..10", "10..20", "10..20", "20..30", "20..30"] {
        servers.push(serve(&m, blocks, Some(&boot)));
    }
    // The last announcements spread before the first lookup.
    wait_for_servers(&boot, servers.len());
    for (hop, name) in [(0, "start"), (1, "middle"), (2, "end")] {
        // Keep a live bootstrap: the first server may be the one killed.
        let bootstrap = servers
            .iter_mut()
            .find_map(|s| {
                s.child
                    .try_wait()
                    .ok()
                    .flatten()
                    .is_none()
                    .then(|| s.addr.clone())
            })
            .expect("a live server");
        let (text, routes, gap, victim, log) =
            generate_and_stop(&m, &bootstrap, &mut servers, hop, kill_after, kill);
        eprintln!(
            "killed the {name} server {victim}: next text {:.0} ms later; routes: {routes:#?}",
            gap.as_secs_f64() * 1e3
        );
        for line in log.lines().filter(|l| !l.starts_with("route ")) {
            eprintln!("  {line}");
        }
        assert_eq!(
            text.trim_end_matches('\n'),
            expected,
            "output changed after killing the {name} server"
        );
        assert!(
            routes.len() >= 2,
            "no re-route after killing the {name} server: {routes:?}"
        );
        let last = routes.last().expect("route");
        assert!(
            !last.contains(&victim),
            "still routed through the dead server: {last}"
        );
    }
}

/// Ctrl-C on a server mid-generation: it finishes its running step, tells the client to
/// move, leaves the DHT and exits by itself; the client re-routes at once and the
/// output is exactly the undisturbed one.
#[test]
fn a_server_stopped_with_ctrl_c_hands_its_session_over() {
    let m = model();
    let reference = local_reference();
    let expected = reference["text"].as_str().expect("text").to_string();
    let stop_after = text_len_of_first(&m, &reference, 8);
    let first = serve(&m, "0..15", None);
    let boot = first.addr.clone();
    let mut servers = vec![first];
    for blocks in ["15..30", "15..30"] {
        servers.push(serve(&m, blocks, Some(&boot)));
    }
    wait_for_servers(&boot, servers.len());
    let (text, routes, gap, victim, log) =
        generate_and_stop(&m, &boot, &mut servers, 1, stop_after, interrupt);
    eprintln!(
        "interrupted {victim}: next text {:.0} ms later; routes: {routes:#?}\n{log}",
        gap.as_secs_f64() * 1e3
    );
    assert_eq!(text.trim_end_matches('\n'), expected, "output changed");
    assert!(routes.len() >= 2, "no re-route: {routes:?}");
    assert!(
        !routes.last().expect("route").contains(&victim),
        "still routed through the stopped server"
    );
    // The client moved because it was told, not because a step timed out.
    assert!(
        log.contains("the server is shutting down"),
        "the client was not told: {log}"
    );
    // The server exits by itself, cleanly, having handed its session over.
    let stopped = servers.iter_mut().find(|s| s.peer == victim).expect("ours");
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = stopped.child.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit within 20 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let server_log = stopped.log_text();
    assert!(exit.success(), "exit {exit:?}; log:\n{server_log}");
    assert!(
        server_log.contains("1 session(s) handed over"),
        "log:\n{server_log}"
    );
    // Its departure replaced its announcement: not even listed as silent.
    let listed = status(&boot);
    assert!(
        !listed.to_string().contains(&victim),
        "still announced: {listed}"
    );
}

/// The same on a mixture of experts (issue 17): a server holding half the blocks, with
/// all their experts, dies mid-generation; its replica takes over with exactly the
/// undisturbed output.
#[test]
fn a_server_dying_mid_generation_on_experts_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("moe.gguf");
    let mut cmd = shoal();
    cmd.args([
        "make-model",
        "--shape",
        "tiny-qwen3moe",
        "--dtype",
        "q4_k_m",
    ])
    .arg("--out")
    .arg(&m)
    .arg("--tokenizer-from")
    .arg(model());
    let (out, _) = run(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "make-model failed");
    let ms = m.to_string_lossy();
    let reference = generate_json(&[
        "--model",
        &ms,
        "--local",
        "--chat",
        "--prompt",
        PROMPT,
        "--max-tokens",
        TOKENS,
    ]);
    let expected = reference["text"].as_str().expect("text").to_string();
    let n = reference["completion_tokens"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(n >= 16, "the reference stopped after {n} tokens");
    let kill_after = text_len_of_first(&m, &reference, 8);

    let (boot, mut servers) = two_replicas(&m, "0..2", "2..4");
    // The second hop dies, so the bootstrap server lives.
    let (text, routes, gap, victim, _log) =
        generate_and_stop(&m, &boot, &mut servers, 1, kill_after, kill);
    eprintln!(
        "killed {victim}: next text {:.0} ms later; routes: {routes:#?}",
        gap.as_secs_f64() * 1e3
    );
    assert_eq!(
        text.trim_end_matches('\n'),
        expected,
        "output changed after killing a server"
    );
    assert!(routes.len() >= 2, "no re-route: {routes:?}");
    assert!(
        !routes.last().expect("route").contains(&victim),
        "still routed through the dead server"
    );
}

/// Speculative decoding through a chain whose second server dies mid-generation: the
/// failover replays only accepted positions (the client cut its kept hidden states when
/// drafts were rejected), and the output is exactly the one-token-at-a-time one.
#[test]
fn a_server_dying_during_speculative_decoding_changes_nothing() {
    let m = model();
    // An answer that repeats its prompt: drafts are accepted many at a time.
    let prompt = "Repeat this paragraph exactly: The lighthouse keeper climbed the hundred steps every evening, lit the great lamp, wound the clockwork that turned it, and sat by the window to watch the ships pass safely along the rocky coast.";
    let reference = generate_json(&[
        "--local",
        "--chat",
        "--prompt",
        prompt,
        "--max-tokens",
        TOKENS,
    ]);
    let expected = reference["text"].as_str().expect("text").to_string();
    let kill_after = text_len_of_first(&m, &reference, 8);
    let (boot, mut servers) = two_replicas(&m, "0..15", "15..30");
    let (text, routes, gap, victim, log) = generate_and_stop_with(
        &m,
        &boot,
        &mut servers,
        1,
        kill_after,
        kill,
        prompt,
        &["--speculate", "ngram"],
    );
    eprintln!(
        "killed {victim}: next text {:.0} ms later; routes: {routes:#?}\n{log}",
        gap.as_secs_f64() * 1e3
    );
    assert_eq!(
        text.trim_end_matches('\n'),
        expected,
        "output changed after killing a server during speculative decoding"
    );
    assert!(routes.len() >= 2, "no re-route: {routes:?}");
    // Drafts were verified (and some accepted) in this generation.
    let accepted: usize = log
        .split("drafts: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no drafts reported:\n{log}"));
    assert!(accepted > 0, "no draft accepted:\n{log}");
}
