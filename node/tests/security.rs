//! Private swarms: only nodes holding the swarm key can join or reach one.

mod common;

use std::time::Duration;

use common::*;

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

/// Runs a `shoal` command that must fail; its stderr.
fn fails(args: &[&str]) -> String {
    let mut cmd = shoal();
    cmd.args(args);
    let (out, took) = run(cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{args:?} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("{args:?} failed after {took:?}: {stderr}");
    stderr
}

/// A generation with `args` (a way to reach the swarm), checked against the same
/// generation in one process; its JSON.
fn answers_as_one_process(args: &[&str]) -> serde_json::Value {
    let prompt = ["--prompt", "The capital of France is", "--max-tokens", "6"];
    let local = generate_json(&[&["--local"][..], &prompt[..]].concat());
    let swarm = generate_json(&[args, &prompt[..]].concat());
    assert_eq!(swarm["text"], local["text"], "{args:?}");
    swarm
}

#[test]
fn only_holders_of_the_swarm_key_can_join_or_reach_a_private_swarm() {
    let m = model();
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("swarm.key");
    let other = dir.path().join("other.key");
    let key_s = key.to_str().expect("path");
    let other_s = other.to_str().expect("path");
    for k in [key_s, other_s] {
        let mut cmd = shoal();
        cmd.args(["keygen", "--out", k]);
        let (out, _) = run(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "{out:?}");
    }
    let text = std::fs::read_to_string(&key).expect("key file");
    assert!(text.starts_with("/key/swarm/psk/1.0.0/"), "{text}");
    assert_ne!(text, std::fs::read_to_string(&other).expect("other key"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is readable by others: {mode:o}");
    }
    assert!(fails(&["keygen", "--out", key_s]).contains("exists"));

    // A private swarm of two servers, over TCP.
    let a = serve_with(
        &m,
        &["--blocks", "0..15", "--listen", TCP, "--swarm-key", key_s],
        None,
    );
    assert!(a.addr.contains("/tcp/"), "{}", a.addr);
    let _b = serve_with(
        &m,
        &["--blocks", "15..30", "--listen", TCP, "--swarm-key", key_s],
        Some(&a.addr),
    );
    // With the key, a client gets the same answer as one process alone.
    let private = answers_as_one_process(&["--bootstrap", &a.addr, "--swarm-key", key_s]);
    assert_eq!(private["route"].as_array().map(Vec::len), Some(2));

    // Without the key, or with another one, nothing gets in.
    let short = ["--connect-timeout", "5"];
    for key_args in [&[][..], &["--swarm-key", other_s][..]] {
        let e = fails(&[&["status", "--bootstrap", &a.addr][..], key_args, &short].concat());
        assert!(
            e.contains("cannot connect") || e.contains("no answer"),
            "{e}"
        );
        let e = fails(
            &[
                &["generate", "--prompt", "hi", "--bootstrap", &a.addr][..],
                &["--model", m.to_str().expect("path")][..],
                key_args,
                &short,
            ]
            .concat(),
        );
        assert!(
            e.contains("cannot connect") || e.contains("no answer"),
            "{e}"
        );
        let mut serve = shoal();
        serve
            .args(["serve", "--blocks", "0..15", "--listen", TCP, "--model"])
            .arg(&m)
            .args(["--bootstrap", &a.addr])
            .args(key_args)
            .args(short);
        let (out, _) = run(serve, Duration::from_secs(60));
        assert!(!out.status.success(), "a server joined without the key");
    }
    // And a private node cannot reach an open swarm either.
    let open = serve_with(&m, &["--blocks", "0..30", "--listen", TCP], None);
    let e = fails(&[
        "status",
        "--bootstrap",
        &open.addr,
        "--swarm-key",
        key_s,
        "--connect-timeout",
        "5",
    ]);
    assert!(
        e.contains("cannot connect") || e.contains("no answer"),
        "{e}"
    );
    // QUIC cannot carry the key: a private node refuses to listen on it.
    let m_s = m.to_str().expect("path");
    let e = fails(&[
        "serve",
        "--model",
        m_s,
        "--blocks",
        "0..15",
        "--swarm-key",
        key_s,
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
    ]);
    assert!(e.contains("TCP only"), "{e}");
}

#[test]
fn a_server_with_an_allow_list_serves_only_those_clients() {
    let m = model();
    let dir = tempfile::tempdir().expect("temp dir");
    let identity = dir.path().join("client.key");
    let mut cmd = shoal();
    cmd.args(["keygen", "--identity", "--out"]).arg(&identity);
    let (out, _) = run(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let peer = said
        .split("peer id ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no peer id in {said:?}"))
        .to_string();
    let allow = dir.path().join("allow.txt");
    std::fs::write(
        &allow,
        format!("# who may use this server\n\n{peer}  # the test\n"),
    )
    .expect("allow list");
    let identity_s = identity.to_str().expect("path");
    let allow_s = allow.to_str().expect("path");
    let a = serve_with(&m, &["--blocks", "0..30", "--allow-peers", allow_s], None);

    // The listed client, with its identity: served.
    answers_as_one_process(&["--bootstrap", &a.addr, "--identity", identity_s]);
    // Anyone else: refused, and told why.
    let e = fails(&[
        "generate",
        "--model",
        m.to_str().expect("path"),
        "--bootstrap",
        &a.addr,
        "--prompt",
        "hi",
        "--route-timeout",
        "3",
    ]);
    assert!(e.contains("--allow-peers"), "{e}");
    // A swarm key is not an identity: a clear error.
    let key = dir.path().join("swarm.key");
    let mut cmd = shoal();
    cmd.args(["keygen", "--out"]).arg(&key);
    assert!(run(cmd, Duration::from_secs(30)).0.status.success());
    let e = fails(&[
        "generate",
        "--model",
        m.to_str().expect("path"),
        "--bootstrap",
        &a.addr,
        "--prompt",
        "hi",
        "--identity",
        key.to_str().expect("path"),
    ]);
    assert!(e.contains("not a node identity"), "{e}");
}
