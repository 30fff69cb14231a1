//! Volunteers behind home routers: servers behind NATs are reached through relays and,
//! where the NATs allow, by hole punching; a relayed chain survives its relay dying.
//!
//! Built with network namespaces: a "public" network (a bridge) holding the relays and
//! each home router's outside, and homes behind routers that masquerade (iptables) and
//! drop whatever comes in unasked, as home routers do. The public network uses 11.77.0.x:
//! AutoNAT only trusts global addresses, and these namespaces reach nothing outside
//! themselves. The namespaces come from `common::netns`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::netns::{namespaces, Nat};
use common::*;

/// `shoal ARGS` in namespace `ns`, logging to a file, waiting for its `listening` line.
fn start_in(ns: &str, args: &[&str], what: &str) -> Server {
    let log = std::env::temp_dir().join(format!("shoal-nat-{}-{what}.log", std::process::id()));
    let rust_log =
        std::env::var("SHOAL_NAT_SERVER_LOG").unwrap_or("info,shoal_node::net=debug".into());
    start_in_namespace(
        ns,
        args,
        &[("RUST_LOG", &rust_log), ("SHOAL_NO_MDNS", "true")],
        log,
    )
}

/// A relay on the public network.
fn relay_in(ns: &str, ip: &str, what: &str) -> Server {
    start_in(
        ns,
        &["relay", "--listen", &format!("/ip4/{ip}/udp/4001/quic-v1")],
        what,
    )
}

/// A server at home, serving `blocks`, joining through `bootstrap`.
fn home_server(ns: &str, blocks: &str, bootstrap: &[&str], what: &str) -> Server {
    let m = model();
    let mut args = vec![
        "serve",
        "--model",
        m.to_str().expect("path"),
        "--blocks",
        blocks,
        "--listen",
        "/ip4/0.0.0.0/udp/0/quic-v1",
    ];
    for b in bootstrap {
        args.extend(["--bootstrap", b]);
    }
    start_in(ns, &args, what)
}

/// Waits until `server` has logged `needle` `times` times (at most `limit`).
fn wait_for_log(server: &Server, needle: &str, times: usize, limit: Duration) {
    wait_until(&format!("{needle:?} (x{times}) logged"), limit, || {
        let log = server.log_text();
        if log.matches(needle).count() >= times {
            Ok(())
        } else {
            Err(format!("log:\n{log}"))
        }
    });
}

const PROMPT: [&str; 5] = [
    "--chat",
    "--prompt",
    "Name three colours.",
    "--max-tokens",
    "24",
];

/// `generate --local` with [`PROMPT`] (here, outside the namespaces).
fn reference(max_tokens: &str) -> serde_json::Value {
    generate_json(&[
        "--local", PROMPT[0], PROMPT[1], PROMPT[2], PROMPT[3], max_tokens,
    ])
}

#[test]
fn servers_behind_nats_are_reached_through_a_relay_and_by_hole_punching() {
    let Some(n) = namespaces('p', true, |n| {
        n.public_host("rl", "11.77.0.1")
            && n.public_host("cl", "11.77.0.30")
            && n.home("h1", "11.77.0.11", "192.168.1", Nat::Friendly)
            && n.home("h2", "11.77.0.12", "192.168.2", Nat::Friendly)
    }) else {
        return;
    };
    let started = Instant::now();
    let relay = relay_in(&n.name("rl"), "11.77.0.1", "relay");
    let h1 = home_server(&n.name("h1"), "0..15", &[&relay.addr], "home1");
    let h2 = home_server(&n.name("h2"), "15..30", &[&relay.addr], "home2");
    // Each home finds out it cannot be dialled and takes a slot on the relay.
    for h in [&h1, &h2] {
        wait_for_log(
            h,
            "reachable through a relay at",
            1,
            Duration::from_secs(60),
        );
    }
    eprintln!("both homes relayed after {:?}", started.elapsed());
    let m = model();
    let out = {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.name("cl")])
            .arg(env!("CARGO_BIN_EXE_shoal"))
            .args(["generate", "--json", "--bootstrap", &relay.addr, "--model"])
            .arg(&m)
            .args(PROMPT)
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_NAT_CLIENT_LOG").unwrap_or("info".into()),
            )
            .env("SHOAL_NO_MDNS", "true");
        run(cmd, Duration::from_secs(120)).0
    };
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "generation failed:\n{log}");
    let swarm: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        swarm["completion_tokens"],
        reference(PROMPT[4])["completion_tokens"],
        "{log}"
    );

    // Which hops went how.
    let link = |peer: &str| -> String {
        swarm["route"]
            .as_array()
            .expect("route")
            .iter()
            .find(|r| r["peer"] == peer)
            .map(|r| r["link"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|| panic!("{peer} not in the route {}", swarm["route"]))
    };
    let punched = |s: &Server, other: &str| {
        s.log_text()
            .lines()
            .any(|l| l.contains("direct connection by hole punching") && l.contains(other))
    };
    let relayed_to = |s: &Server, other: &str| {
        s.log_text()
            .lines()
            .any(|l| l.contains("connected through a relay") && l.contains(other))
    };
    // The homes met through the relay when the first step went from one to the other;
    // their hole punch runs beside the generation (24 tokens take about a second here)
    // and may finish after it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(punched(&h1, &h2.peer) || punched(&h2, &h1.peer)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let between = if punched(&h1, &h2.peer) || punched(&h2, &h1.peer) {
        "hole-punched"
    } else if relayed_to(&h1, &h2.peer) {
        "relayed"
    } else {
        "unknown"
    };
    eprintln!(
        "hops: client -> home1: {}; home1 -> home2: {between}; home2 -> client: {}",
        link(&h1.peer),
        link(&h2.peer)
    );
    // Nobody can dial into a home: the first contact with each went through the relay
    // (the homes' logs show it), and the public client was then reached directly by
    // hole punching, as were the homes by each other through port-keeping NATs.
    for (h, other) in [(&h1, &h2.peer), (&h2, &h1.peer)] {
        assert!(
            relayed_to(h, other),
            "no relayed connection between the homes:\n{}",
            h.log_text()
        );
    }
    assert_eq!(link(&h1.peer), "hole-punched", "{log}");
    assert_eq!(link(&h2.peer), "hole-punched", "{log}");
    assert_eq!(
        between,
        "hole-punched",
        "{}\n{}",
        h1.log_text(),
        h2.log_text()
    );
    // And `shoal status` tells the homes are relayed. (It once missed them: the relay's
    // routing table still held the homes, from before they found their NATs, and the
    // status client's requests waited on Kademlia's dials to their private addresses.)
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &n.name("cl")])
        .arg(env!("CARGO_BIN_EXE_shoal"))
        .args(["status", "--json", "--bootstrap", &relay.addr])
        .env(
            "RUST_LOG",
            std::env::var("SHOAL_NAT_CLIENT_LOG").unwrap_or("warn".into()),
        );
    let out = run(cmd, Duration::from_secs(60)).0;
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    for h in [&h1, &h2] {
        let row = status["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .find(|s| s["peer_id"] == h.peer.as_str())
            .unwrap_or_else(|| panic!("{} not listed: {status}\n{said}", h.peer));
        assert_eq!(row["reachability"], "relayed", "{row}");
    }
    drop((h1, h2, relay, n));
}

/// Reads a child's stderr lines as they come, forwarding those starting with "route ".
fn watch_routes(child: &mut Child) -> (mpsc::Receiver<String>, std::thread::JoinHandle<String>) {
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("route ") {
                let _ = tx.send(line.clone());
            }
            all.push(line);
        }
        all.join("\n")
    });
    (rx, t)
}

#[test]
fn a_relayed_chain_survives_its_relay_dying() {
    // Every home (the client's too) behind a symmetric NAT: no hole punching, so the
    // whole chain runs through relays.
    let Some(n) = namespaces('k', true, |n| {
        n.public_host("ra", "11.77.0.1")
            && n.public_host("rb", "11.77.0.2")
            && n.home("h1", "11.77.0.11", "192.168.1", Nat::Symmetric)
            && n.home("h2", "11.77.0.12", "192.168.2", Nat::Symmetric)
            && n.home("c", "11.77.0.13", "192.168.3", Nat::Symmetric)
    }) else {
        return;
    };
    let ra = relay_in(&n.name("ra"), "11.77.0.1", "relay-a");
    let rb = start_in(
        &n.name("rb"),
        &[
            "relay",
            "--listen",
            "/ip4/11.77.0.2/udp/4001/quic-v1",
            "--bootstrap",
            &ra.addr,
        ],
        "relay-b",
    );
    let boots = [ra.addr.as_str(), rb.addr.as_str()];
    let h1 = home_server(&n.name("h1"), "0..15", &boots, "home1-sym");
    let h2 = home_server(&n.name("h2"), "15..30", &boots, "home2-sym");
    // A slot on each relay.
    for h in [&h1, &h2] {
        wait_for_log(
            h,
            "reachable through a relay at",
            2,
            Duration::from_secs(90),
        );
    }
    let tokens = "160";
    let expected = reference(tokens);
    let m = model();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &n.name("c")])
        .arg(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "generate",
            "--json",
            "--bootstrap",
            boots[0],
            "--bootstrap",
            boots[1],
            // Planning through relays right after the homes got their slots once took
            // longer than the default 20 s here (the client gave up before any route).
            "--route-timeout",
            "60",
        ])
        .arg("--model")
        .arg(&m)
        .args(&PROMPT[..4])
        .arg(tokens)
        .env(
            "RUST_LOG",
            std::env::var("SHOAL_NAT_CLIENT_LOG").unwrap_or("info".into()),
        )
        .env("SHOAL_NO_MDNS", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (routes, err_thread) = watch_routes(&mut child);
    let Ok(first) = routes.recv_timeout(Duration::from_secs(90)) else {
        let _ = child.kill();
        panic!(
            "no route line on stderr; the client said:\n{}",
            err_thread.join().expect("stderr")
        );
    };
    // The relay the client reaches the first server through: kill it mid-generation.
    let used = first
        .split("(relayed:")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("the first hop is not relayed: {first}"))
        .to_string();
    let (mut victim, survivor) = if used == ra.peer { (ra, rb) } else { (rb, ra) };
    assert_eq!(victim.peer, used, "{first}");
    std::thread::sleep(Duration::from_millis(300));
    let _ = victim.child.kill();
    let _ = victim.child.wait();
    let killed_at = Instant::now();
    let stdout = child.stdout.take().expect("stdout");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if killed_at.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the generation did not finish within 120 s of the relay's death");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = killed_at.elapsed();
    let log = err_thread.join().expect("stderr");
    assert!(status.success(), "generation failed:\n{log}");
    let swarm: serde_json::Value = serde_json::from_reader(stdout).expect("JSON");
    eprintln!(
        "killed relay {}; the generation ended {:.1} s later; routes:\n{}",
        victim.peer,
        took.as_secs_f64(),
        log.lines()
            .filter(|l| l.starts_with("route "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Quickly: the ends of a dead relay's connections notice in 10-15 s (QUIC's idle
    // timeout); a step passed into one just before was lost without an error, and the
    // client waited a minute for it (1 run in 2) until servers told of it.
    assert!(
        took < Duration::from_secs(45),
        "the generation took {took:?} after the relay's death:\n{log}"
    );
    // Nothing lost: the text is the one-process text, and the client moved off the dead
    // relay.
    assert_eq!(
        swarm["completion_tokens"], expected["completion_tokens"],
        "{log}"
    );
    assert!(
        !swarm["reroutes"].as_array().expect("reroutes").is_empty(),
        "no re-route after the relay died: {log}"
    );
    let last = swarm["route"].to_string();
    assert!(
        !last.contains(&victim.peer),
        "still through the dead relay: {last}"
    );
    assert!(last.contains("relayed:"), "{last}");
    drop((h1, h2, survivor, n));
}
