//! LAN discovery: servers started with no bootstrap address on one LAN find each other
//! by mDNS and form one working swarm.
//!
//! The LAN is two network namespaces on one bridge (mDNS skips the loopback interface,
//! and the machine's own network may drop multicast), made by `common::netns`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::namespaces;
use common::*;

/// `shoal serve` inside namespace `ns`, listening on `ip`, with no bootstrap.
fn serve_in(ns: &str, ip: &str, blocks: &str, extra: &[&str]) -> Server {
    let log = std::env::temp_dir().join(format!("shoal-lan-{}-{blocks}.log", std::process::id()));
    let m = model();
    let listen = format!("/ip4/{ip}/udp/0/quic-v1");
    let mut args = vec![
        "serve",
        "--blocks",
        blocks,
        "--model",
        m.to_str().expect("path"),
        "--listen",
        &listen,
    ];
    args.extend(extra);
    start_in_namespace(ns, &args, &[("RUST_LOG", "info")], log)
}

/// A `shoal` command inside namespace `ns`; its output.
fn shoal_in(ns: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("RUST_LOG", "warn");
    run(cmd, Duration::from_secs(120)).0
}

#[test]
fn servers_on_one_lan_find_each_other_without_a_bootstrap() {
    let Some(lan) = namespaces('l', false, |n| {
        n.lan_host("a", "10.77.0.1") && n.lan_host("b", "10.77.0.2")
    }) else {
        return;
    };
    let (a_ns, b_ns) = (lan.name("a"), lan.name("b"));
    let (a_ns, b_ns) = (a_ns.as_str(), b_ns.as_str());
    let a = serve_in(a_ns, "10.77.0.1", "0..15", &[]);
    let b = serve_in(b_ns, "10.77.0.2", "15..30", &[]);
    // A third server on the same LAN that does not take part: it stays on its own.
    let hermit = serve_in(b_ns, "10.77.0.2", "0..30", &["--no-mdns"]);

    let m = model();
    let m = m.to_str().expect("path");
    let listed = wait_until("B found by A on the LAN", Duration::from_secs(30), || {
        let out = shoal_in(a_ns, &["status", "--json", "--bootstrap", &a.addr]);
        assert!(out.status.success(), "{out:?}");
        let listed = String::from_utf8_lossy(&out.stdout).to_string();
        if listed.contains(&b.peer) {
            Ok(listed)
        } else {
            Err(listed)
        }
    });
    assert!(
        listed.contains(&a.peer) && listed.contains(&b.peer),
        "{listed}"
    );
    assert!(
        !listed.contains(&hermit.peer),
        "--no-mdns was found: {listed}"
    );

    // One working swarm: a generation through A uses B for the second half, and gives
    // what one process gives.
    let args = [
        "--model",
        m,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--json",
    ];
    let local: serde_json::Value = serde_json::from_slice(
        &shoal_in(a_ns, &[&["generate", "--local"][..], &args[..]].concat()).stdout,
    )
    .expect("local JSON");
    let out = shoal_in(
        a_ns,
        &[&["generate", "--bootstrap", &a.addr][..], &args[..]].concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let swarm: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(swarm["completion_tokens"], local["completion_tokens"]);
    assert!(
        swarm["route"].to_string().contains(&b.peer),
        "{}",
        swarm["route"]
    );
    // A client on the LAN needs no bootstrap address either.
    let out = shoal_in(a_ns, &[&["generate"][..], &args[..]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(found["completion_tokens"], local["completion_tokens"]);
    drop((a, b, hermit));
}
