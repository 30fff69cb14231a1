//! Churn: servers leave and join every few seconds while generations run: at least 20,
//! and on until the swarm has changed at least six times (fast machines finish 20 early).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

const PROMPTS: [&str; 4] = [
    "Name three animals that live in the ocean.",
    "Why do leaves change colour in autumn?",
    "Give me a tip for learning to cook.",
    "What is a prime number?",
];
const TOKENS: &str = "16";

fn generate(prompt: &str, extra: &[&str]) -> Value {
    generate_json(
        &[
            &["--chat", "--prompt", prompt, "--max-tokens", TOKENS][..],
            extra,
        ]
        .concat(),
    )
}

#[test]
fn no_generation_is_lost_under_churn() {
    let m = model();
    let references: Vec<Value> = PROMPTS.iter().map(|p| generate(p, &["--local"])).collect();

    let spans = ["0..10", "10..20", "20..30"];
    let first = serve(&m, spans[0], None);
    let boot = first.addr.clone();
    let mut initial = vec![(0usize, first)];
    for (i, s) in spans.iter().enumerate() {
        for _ in 0..if i == 0 { 1 } else { 2 } {
            initial.push((i, serve(&m, s, Some(&boot))));
        }
    }
    wait_for_servers(&boot, initial.len());
    // (span index, server) of every live server, shared with the clients for bootstrap.
    let live: Arc<Mutex<Vec<(usize, Server)>>> = Arc::new(Mutex::new(initial));
    let done = Arc::new(AtomicBool::new(false));
    let events = Arc::new(Mutex::new(Vec::<String>::new()));

    let churn = {
        let (live, done, events, m) = (live.clone(), done.clone(), events.clone(), m.clone());
        std::thread::spawn(move || {
            let mut round = 0usize;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(3));
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let span = (round / 2) % 3;
                if round.is_multiple_of(2) {
                    // A server of this span leaves (never the last one of its span).
                    let mut l = live.lock().expect("lock");
                    let of_span: Vec<usize> = (0..l.len()).filter(|&i| l[i].0 == span).collect();
                    if of_span.len() >= 2 {
                        let (_, mut victim) = l.remove(of_span[0]);
                        let _ = victim.child.kill();
                        events
                            .lock()
                            .expect("lock")
                            .push(format!("{} left ({})", victim.peer, spans[span]));
                    }
                } else {
                    // A new server joins for this span.
                    let boot = live
                        .lock()
                        .expect("lock")
                        .last()
                        .map(|s| s.1.addr.clone())
                        .expect("live");
                    let s = serve(&m, spans[span], Some(&boot));
                    events
                        .lock()
                        .expect("lock")
                        .push(format!("{} joined ({})", s.peer, spans[span]));
                    live.lock().expect("lock").push((span, s));
                }
                round += 1;
            }
        })
    };

    let clients: Vec<_> = (0..2)
        .map(|c| {
            let (live, references, events) = (live.clone(), references.clone(), events.clone());
            std::thread::spawn(move || {
                let mut reroutes = 0;
                let mut g = 0;
                while g < 10 || (events.lock().expect("lock").len() < 6 && g < 60) {
                    let k = (c + g) % PROMPTS.len();
                    let boot = live
                        .lock()
                        .expect("lock")
                        .last()
                        .map(|s| s.1.addr.clone())
                        .expect("live");
                    let out = generate(PROMPTS[k], &["--bootstrap", &boot]);
                    assert_eq!(
                        out["completion_tokens"], references[k]["completion_tokens"],
                        "client {c}, generation {g}: output differs from the undisturbed run"
                    );
                    reroutes += out["reroutes"].as_array().map(Vec::len).unwrap_or(0);
                    g += 1;
                }
                (g, reroutes)
            })
        })
        .collect();
    let (mut generations, mut reroutes) = (0, 0);
    let mut failures = Vec::new();
    for c in clients {
        match c.join() {
            Ok((g, r)) => {
                generations += g;
                reroutes += r;
            }
            Err(e) => failures.push(e),
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = churn.join();
    let events = events.lock().expect("lock").clone();
    eprintln!(
        "churn: {} events, {generations} generations, {reroutes} re-routes:\n  {}",
        events.len(),
        events.join("\n  ")
    );
    if let Some(e) = failures.pop() {
        std::panic::resume_unwind(e);
    }
    assert!(
        events.len() >= 6,
        "too little churn to mean anything: {events:?}"
    );
}
