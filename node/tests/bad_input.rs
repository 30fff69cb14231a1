//! Bad input gets a clear error, in bounded time, never a panic.

mod common;

use std::time::Duration;

use common::*;

fn fails_with(mut cmd: std::process::Command, needle: &str, limit: Duration) -> Duration {
    cmd.env("RUST_LOG", "off");
    let (out, took) = run(cmd, limit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail; stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    took
}

#[test]
fn missing_and_corrupt_model_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = shoal();
    cmd.args(["generate", "--local", "--prompt", "hi", "--model"])
        .arg(dir.path().join("missing.gguf"));
    fails_with(cmd, "cannot open model", Duration::from_secs(30));

    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, vec![0x47u8; 4096]).expect("write");
    let mut cmd = shoal();
    cmd.args(["serve", "--blocks", "0..2", "--model"])
        .arg(&corrupt);
    fails_with(cmd, "not a GGUF file", Duration::from_secs(30));

    // A download cut short: the real model's first 40 MB.
    let bytes = std::fs::read(model()).expect("model");
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..40 << 20]).expect("write");
    let mut cmd = shoal();
    cmd.args(["generate", "--local", "--prompt", "hi", "--model"])
        .arg(&truncated);
    fails_with(cmd, "truncated", Duration::from_secs(30));
}

/// The real model with `find` (which must occur once) replaced by `with`.
fn patched_model(find: &[u8], with: &[u8]) -> Vec<u8> {
    let mut bytes = std::fs::read(model()).expect("model");
    let at: Vec<usize> = bytes
        .windows(find.len())
        .enumerate()
        .filter(|(_, w)| *w == find)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{find:?} occurs {} times", at.len());
    bytes[at[0]..at[0] + with.len()].copy_from_slice(with);
    bytes
}

/// A GGUF string: u64 length, then the bytes.
fn gguf_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// Files that are not models, or models this version cannot run, are refused with one
/// line that names the file and the problem, never a backtrace (even with
/// RUST_BACKTRACE set, when candle attaches one to its errors) and before anything
/// loads.
#[test]
fn unusable_model_files_get_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![(
        "notes.txt",
        b"# Not a model\nJust some text that someone passed as --model.\n".repeat(100),
        "not a GGUF file",
    )];
    let whole = std::fs::read(model()).expect("model");
    cases.push((
        "header-cut.gguf",
        whole[..1 << 20].to_vec(),
        "truncated or damaged",
    ));
    // general.architecture = "llama" -> "xyzzy".
    let mut arch_key = gguf_str("general.architecture");
    arch_key.extend_from_slice(&8u32.to_le_bytes());
    let mut unknown_arch = arch_key.clone();
    arch_key.extend_from_slice(&gguf_str("llama"));
    unknown_arch.extend_from_slice(&gguf_str("xyzzy"));
    cases.push((
        "xyzzy.gguf",
        patched_model(&arch_key, &unknown_arch),
        "unsupported architecture \"xyzzy\"",
    ));
    // The token embeddings' type (Q8_0 here: 8) -> 16 (IQ2_XXS, which needs kernels
    // this version lacks).
    let mut info = gguf_str("token_embd.weight");
    info.extend_from_slice(&2u32.to_le_bytes());
    info.extend_from_slice(&576u64.to_le_bytes());
    info.extend_from_slice(&49152u64.to_le_bytes());
    let ty = info.len();
    let found = whole
        .windows(ty + 4)
        .find(|w| w.starts_with(&info))
        .expect("token_embd.weight's tensor info");
    let mut unknown_type = info.clone();
    unknown_type.extend_from_slice(&16u32.to_le_bytes());
    cases.push((
        "iq2_xxs.gguf",
        patched_model(found, &unknown_type),
        "type IQ2_XXS (ggml type 16)",
    ));
    for (name, bytes, needle) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        let mut cmd = shoal();
        cmd.args(["generate", "--local", "--prompt", "hi", "--model"])
            .arg(&path)
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "off");
        let (out, _) = run(cmd, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name} should fail; stderr: {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{name}: expected {needle:?} in: {stderr}"
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{name}: not one line: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(name),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn span_outside_the_model() {
    for blocks in ["25..31", "30..40"] {
        let mut cmd = shoal();
        cmd.args(["serve", "--blocks", blocks, "--model"])
            .arg(model());
        fails_with(cmd, "outside the model", Duration::from_secs(30));
    }
    let mut cmd = shoal();
    cmd.args(["serve", "--blocks", "5..5", "--model"])
        .arg(model());
    fails_with(cmd, "is empty", Duration::from_secs(30));
}

#[test]
fn bootstrap_nobody_answers_fails_in_bounded_time() {
    // Ports that were just free: nothing listens there.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let tcp_port = tcp.local_addr().expect("addr").port();
    drop(tcp);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let udp_port = udp.local_addr().expect("addr").port();
    drop(udp);
    let peer = "12D3KooWPMKUhPx9QCH2cwrqxGqZ3LxkqMaLMC34epFwbpUxpa3i";
    for addr in [
        format!("/ip4/127.0.0.1/tcp/{tcp_port}/p2p/{peer}"),
        format!("/ip4/127.0.0.1/udp/{udp_port}/quic-v1/p2p/{peer}"),
        format!("/ip4/127.0.0.1/udp/{udp_port}/quic-v1"),
    ] {
        for sub in [
            &["generate", "--prompt", "hi"][..],
            &["serve", "--blocks", "0..2"][..],
        ] {
            let mut cmd = shoal();
            cmd.args(sub)
                .args(["--connect-timeout", "3", "--bootstrap", &addr, "--model"])
                .arg(model());
            let took = fails_with(
                cmd,
                "could not reach any bootstrap node",
                Duration::from_secs(30),
            );
            assert!(
                took < Duration::from_secs(15),
                "{sub:?} took {took:?} for {addr}"
            );
        }
    }
}

#[test]
fn prompt_longer_than_the_context() {
    // SmolLM2's context is 8192 tokens; each " alpha" is at least one token.
    let prompt = " alpha".repeat(9000);
    let mut cmd = shoal();
    cmd.args([
        "generate",
        "--local",
        "--max-tokens",
        "4",
        "--prompt",
        &prompt,
        "--model",
    ])
    .arg(model());
    fails_with(
        cmd,
        "longer than the model's context",
        Duration::from_secs(60),
    );
}

#[test]
fn generate_without_a_swarm_says_what_to_do() {
    let mut cmd = shoal();
    cmd.args(["generate", "--prompt", "hi", "--model"])
        .arg(model());
    fails_with(cmd, "no --bootstrap address", Duration::from_secs(30));
}
