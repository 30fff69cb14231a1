//! A bounded soak of the gateway: 16 concurrent streamed chats through `shoal api` on a
//! 4-server swarm (two replicas of each span) while one server is killed and restarted
//! every 20 s. Every request must end with its undisturbed answer or a clear error
//! (none hangs), no session may be left on a server afterwards, and the gateway's
//! memory must stay flat. The gateway keeps sessions between chats, as it does by
//! default: a kept session's answers must equal a fresh one's too.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::gateway::*;
use common::*;

/// How long the chats go on, and how often a server is killed.
const SOAK: Duration = Duration::from_secs(150);
const KILL_EVERY: Duration = Duration::from_secs(20);
/// Concurrent chats.
const CHATS: usize = 16;
/// Longest a request may take before it counts as hung.
const HUNG: Duration = Duration::from_secs(60);

const QUESTIONS: [&str; 4] = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colours.",
    "What do bees make?",
    "Say hello in Spanish.",
];

/// How a streamed chat ended: its text, or the error it reported.
fn streamed_chat(url: &str, question: &str) -> Result<String, String> {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 32, "temperature": 0, "stream": true, "speculate": "off",
    });
    stream_chat(url, &body, HUNG).map(|s| s.text)
}

/// The gateway process's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn sixteen_chats_through_servers_killed_and_restarted() {
    let m = model();
    let spans = ["0..15", "0..15", "15..30", "15..30"];
    let first = serve_with(&m, &["--blocks", spans[0]], None);
    let boot = first.addr.clone();
    let mut servers = vec![Some(first)];
    for s in &spans[1..] {
        servers.push(Some(serve_with(&m, &["--blocks", s], Some(&boot))));
    }
    wait_for_servers(&boot, 4);
    // Sessions kept between chats as by default (a question asked again takes the
    // session kept from its last asking and computes only what its prompt adds),
    // freed 5 s after their last use so that none is left at the end.
    let api = start_api(&boot, &["--conversation-idle", "5"]);
    let gateway = api.child.id();
    // The undisturbed answers.
    let expected: Vec<String> = QUESTIONS
        .iter()
        .map(|q| streamed_chat(&api.url, q).expect("an undisturbed answer"))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new((
        0usize,
        Vec::<String>::new(),
        Vec::<String>::new(),
    )));
    let chats: Vec<_> = (0..CHATS)
        .map(|i| {
            let (url, stop, outcomes) = (api.url.clone(), stop.clone(), outcomes.clone());
            let (question, want) = (QUESTIONS[i % 4], expected[i % 4].clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let got = streamed_chat(&url, question);
                    let took = started.elapsed();
                    let mut o = outcomes.lock().expect("outcomes");
                    match got {
                        Ok(text) if text == want => o.0 += 1,
                        Ok(text) => o.1.push(format!("{question:?}: {text:?}, not {want:?}")),
                        Err(e) if took < HUNG => o.2.push(e),
                        Err(e) => o.1.push(format!("hung {took:?}: {e}")),
                    }
                }
            })
        })
        .collect();

    // One server at a time, never both replicas of a span: killed, then restarted.
    let started = Instant::now();
    let mut memory = Vec::new();
    let mut victim = 1;
    let mut kills = 0;
    let mut next_kill = started + KILL_EVERY;
    while started.elapsed() < SOAK {
        memory.push((started.elapsed(), rss_kib(gateway)));
        if Instant::now() >= next_kill {
            if let Some(server) = servers[victim].take() {
                drop(server);
                kills += 1;
            }
            std::thread::sleep(Duration::from_secs(2));
            servers[victim] = Some(serve_with(&m, &["--blocks", spans[victim]], Some(&boot)));
            victim = victim % 3 + 1;
            next_kill += KILL_EVERY;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    for c in chats {
        c.join().expect("a chat thread");
    }
    let (answered, wrong, errors) = outcomes.lock().expect("outcomes").clone();
    eprintln!(
        "{answered} answers as undisturbed, {} clear errors: {errors:?}",
        errors.len()
    );
    assert!(wrong.is_empty(), "answers that differ or hung: {wrong:#?}");
    assert!(answered >= CHATS * 4, "only {answered} answers in {SOAK:?}");
    assert!(
        errors.len() * 10 <= answered,
        "{} errors against {answered} answers: {errors:?}",
        errors.len()
    );
    // No session left on any server.
    wait_until("every session closed", Duration::from_secs(30), || {
        let open: Vec<u64> = status(&boot)["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .map(|s| s["sessions"].as_u64().unwrap_or(0))
            .collect();
        if open.iter().all(|n| *n == 0) {
            Ok(())
        } else {
            Err(format!("{open:?}"))
        }
    });
    // Servers did leave under the chats: the gateway failed over.
    let (_, metrics) = raw_http(&api.url, "GET", "/metrics", "");
    let reroutes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("shoal_reroutes_total ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shoal_reroutes_total in\n{metrics}"));
    eprintln!("{reroutes} failovers");
    assert!(reroutes >= 1.0, "no chat ever failed over");
    // Each kill interrupts at most the chats then running, once each (a kept session
    // reports the failovers of its own turn only, not those of the turns before).
    assert!(
        reroutes <= (kills * CHATS) as f64,
        "{reroutes} failovers counted for {kills} servers killed under {CHATS} chats"
    );
    // The gateway's memory, its first minute against its last.
    let minute = |from: Duration, to: Duration| {
        let kib: Vec<f64> = memory
            .iter()
            .filter(|(at, _)| (from..to).contains(at))
            .map(|(_, k)| *k as f64)
            .collect();
        kib.iter().sum::<f64>() / kib.len().max(1) as f64
    };
    let first = minute(Duration::ZERO, Duration::from_secs(60));
    let last = minute(SOAK - Duration::from_secs(60), SOAK);
    eprintln!("gateway memory: {first:.0} KiB in the first minute, {last:.0} KiB in the last");
    assert!(
        last <= first * 1.10,
        "the gateway grew from {first:.0} to {last:.0} KiB"
    );
    drop(servers);
}
