//! LAN discovery: servers started with no bootstrap address on one LAN find each other
//! by mDNS and form one working swarm.
//!
//! The LAN is two network namespaces joined by a veth pair (mDNS skips the loopback
//! interface, and the machine's own network may drop multicast). Creating namespaces
//! needs root; where that is not allowed the test says so and skips, unless
//! `SHOAL_REQUIRE_NETNS` is set (`.ci/run` sets it).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Two namespaces joined by a veth pair, removed when dropped.
struct Lan {
    names: [String; 2],
}

impl Lan {
    /// `None` where namespaces cannot be made here.
    fn new() -> Option<Lan> {
        let id = std::process::id() % 100_000;
        let names = [format!("shoal-lan-a{id}"), format!("shoal-lan-b{id}")];
        let (va, vb) = (format!("sla{id}"), format!("slb{id}"));
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), names[0].clone()],
            vec!["netns".into(), "add".into(), names[1].clone()],
            format!("link add {va} type veth peer name {vb}")
                .split(' ')
                .map(String::from)
                .collect(),
            vec![
                "link".into(),
                "set".into(),
                va.clone(),
                "netns".into(),
                names[0].clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                vb.clone(),
                "netns".into(),
                names[1].clone(),
            ],
        ];
        let lan = Lan {
            names: names.clone(),
        };
        for args in steps {
            let ok = Command::new("ip")
                .args(&args)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
        }
        for (ns, dev, ip) in [
            (&names[0], &va, "10.77.0.1/24"),
            (&names[1], &vb, "10.77.0.2/24"),
        ] {
            for args in [
                vec!["addr", "add", ip, "dev", dev],
                vec!["link", "set", dev, "up"],
                vec!["link", "set", "lo", "up"],
                // mDNS sends to 224.0.0.251 on every non-loopback interface.
                vec!["route", "add", "224.0.0.0/4", "dev", dev],
            ] {
                let ok = Command::new("ip")
                    .args(["-n", ns.as_str()])
                    .args(&args)
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "ip -n {ns} {args:?} failed");
            }
        }
        Some(lan)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

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
    let Some(lan) = Lan::new() else {
        assert!(
            std::env::var_os("SHOAL_REQUIRE_NETNS").is_none(),
            "SHOAL_REQUIRE_NETNS is set but network namespaces cannot be made here (needs root and iproute2)"
        );
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and `ip`)");
        return;
    };
    let (a_ns, b_ns) = (lan.names[0].as_str(), lan.names[1].as_str());
    let a = serve_in(a_ns, "10.77.0.1", "0..15", &[]);
    let b = serve_in(b_ns, "10.77.0.2", "15..30", &[]);
    // A third server on the same LAN that does not take part: it stays on its own.
    let hermit = serve_in(b_ns, "10.77.0.2", "0..30", &["--no-mdns"]);

    let m = model();
    let m = m.to_str().expect("path");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let out = shoal_in(a_ns, &["status", "--json", "--bootstrap", &a.addr]);
        assert!(out.status.success(), "{out:?}");
        let listed = String::from_utf8_lossy(&out.stdout).to_string();
        if listed.contains(&b.peer) || std::time::Instant::now() > deadline {
            break listed;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
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
