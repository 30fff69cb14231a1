//! A hostile client against a live server: absurd lengths, wrong shapes, unknown
//! sessions and too many sessions each get a clear error; undecodable frames get the
//! sender disconnected and, past a threshold, banned; and a well-behaved generation
//! running through the same server meanwhile gives exactly its usual output.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use libp2p::{Multiaddr, PeerId};
use protocol::{
    BlockSpan, ErrorInfo, ErrorKind, Frame, HiddenState, OpenSession, Request, Response, Step,
    StepFailed, WireDType,
};
use shoal_node::net::{self, NetConfig, Network};
use tokio::sync::mpsc;

fn client_net() -> Network {
    let (net, _inbound) = net::start(NetConfig {
        listen: vec![],
        dht_server: false,
        shaping: None,
        swarm_key: None,
        identity: None,
        mdns: false,
        relay: None,
    })
    .expect("network");
    net
}

/// The hostile client's view of one server.
struct Probe {
    net: Network,
    server: PeerId,
    addr: Multiaddr,
    reports: mpsc::UnboundedReceiver<StepFailed>,
    model_id: String,
    hidden: usize,
}

impl Probe {
    async fn ask(&self, request: Request) -> Response {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.net
                .request(self.server, vec![self.addr.clone()], request),
        )
        .await
        .expect("an answer within 10 s")
        .expect("the request went through")
    }

    /// Opens a session; the server's refusal if it refuses.
    async fn open(&self, session: u64, span: BlockSpan, max_len: u32) -> Result<(), ErrorInfo> {
        let open = Request::Open(OpenSession {
            session,
            model_id: self.model_id.clone(),
            span,
            max_len,
            wire_dtype: WireDType::F32,
        });
        match self.ask(open).await {
            Response::Opened { .. } => Ok(()),
            Response::Error(e) => Err(e),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// Sends a step on the data plane and waits for the failure report it must cause.
    async fn refused_step(&mut self, step: Step) -> ErrorInfo {
        let index = step.step;
        self.net
            .send(self.server, vec![self.addr.clone()], Frame::Step(step))
            .await
            .expect("sent");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let report = tokio::time::timeout_at(deadline, self.reports.recv())
                .await
                .expect("a failure report within 10 s")
                .expect("reports");
            if report.step == index {
                return report.error;
            }
        }
    }

    fn step(&self, session: u64, index: u64, position: u32, hidden: HiddenState) -> Step {
        Step {
            session,
            step: index,
            position,
            hidden,
            next: vec![],
            reply_to: self.net.peer_id().to_string(),
        }
    }
}

#[test]
fn hostile_input_is_refused_and_a_concurrent_generation_is_unchanged() {
    let m = model();
    let file = shard::ModelFile::open(&m).expect("model");
    let (model_id, hidden) = (file.id().to_string(), file.config().hidden);
    let a = serve_with(
        &m,
        &["--blocks", "0..15", "--max-sessions-per-peer", "2"],
        None,
    );
    let _b = serve(&m, "15..30", Some(&a.addr));
    let args = ["--prompt", "1, 2, 3, 4, 5, 6,", "--max-tokens", "300"];
    let reference = generate_json(&[&["--local"][..], &args[..]].concat());
    let boot = a.addr.clone();
    let good = std::thread::spawn(move || {
        let g = generate_json(&[&["--bootstrap", boot.as_str()][..], &args[..]].concat());
        (g, Instant::now())
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let hostile_started = Instant::now();
    rt.block_on(async {
        let net = client_net();
        let addr: Multiaddr = a.addr.parse().expect("addr");
        net.dial(addr.clone(), Duration::from_secs(10))
            .await
            .expect("dial");
        let (tx, reports) = mpsc::unbounded_channel();
        net.on_data(Arc::new(move |m| {
            if let Frame::Failed(f) = m.frame {
                let _ = tx.send(f);
            }
            true
        }));
        let mut p = Probe {
            net,
            server: a.peer.parse().expect("peer id"),
            addr,
            reports,
            model_id,
            hidden,
        };
        let span = BlockSpan::new(0, 15);

        // Sessions: absurd length, wrong model, blocks not served, too many per client.
        let e = p.open(1, span, u32::MAX).await.expect_err("absurd length");
        assert_eq!(e.kind, ErrorKind::TooLong, "{e}");
        let wrong = Request::Open(OpenSession {
            session: 2,
            model_id: "not-this-model".into(),
            span,
            max_len: 16,
            wire_dtype: WireDType::F32,
        });
        assert!(
            matches!(p.ask(wrong).await, Response::Error(e) if e.kind == ErrorKind::WrongModel)
        );
        let e = p
            .open(3, BlockSpan::new(10, 30), 16)
            .await
            .expect_err("span");
        assert_eq!(e.kind, ErrorKind::SpanNotServed, "{e}");
        p.open(10, span, 16).await.expect("first session");
        p.open(11, span, 16).await.expect("second session");
        let e = p.open(12, span, 16).await.expect_err("third session");
        assert_eq!(e.kind, ErrorKind::Busy, "{e}");
        assert!(e.message.contains("per client"), "{e}");
        let e = p.open(10, span, 16).await.expect_err("reused id");
        assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");

        // Steps: wrong width, a shape that lies about its bytes, a jump in position, too
        // many tokens for the session, an unknown session.
        let row = |tokens: usize, width: usize| {
            HiddenState::from_f32(
                &vec![0.5; tokens * width],
                vec![tokens as u32, width as u32],
                WireDType::F32,
            )
        };
        let e = p.refused_step(p.step(10, 1, 0, row(1, 7))).await;
        assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
        assert!(e.message.contains("shape"), "{e}");
        let mut liar = row(1, p.hidden);
        liar.shape = vec![1_000_000, p.hidden as u32];
        let e = p.refused_step(p.step(10, 2, 0, liar)).await;
        assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
        let e = p.refused_step(p.step(10, 3, 500, row(1, p.hidden))).await;
        assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
        assert!(e.message.contains("position"), "{e}");
        let e = p.refused_step(p.step(10, 4, 0, row(17, p.hidden))).await;
        assert_eq!(e.kind, ErrorKind::TooLong, "{e}");
        let e = p
            .refused_step(p.step(987_654, 5, 0, row(1, p.hidden)))
            .await;
        assert_eq!(e.kind, ErrorKind::UnknownSession, "{e}");
        // A valid step on the same session still works after all that.
        p.net
            .send(
                p.server,
                vec![p.addr.clone()],
                Frame::Step(p.step(11, 6, 0, row(1, p.hidden))),
            )
            .await
            .expect("sent");
        let quiet = tokio::time::timeout(Duration::from_millis(500), p.reports.recv()).await;
        assert!(quiet.is_err(), "a valid step was refused: {quiet:?}");

        // Garbage: three undecodable frames, each closing the connection; then a ban.
        let bad = client_net();
        bad.dial(p.addr.clone(), Duration::from_secs(10))
            .await
            .expect("dial");
        let mut junk = 64u32.to_le_bytes().to_vec();
        junk.extend((0..64u8).map(|i| i.wrapping_mul(37)));
        let mut wrong_version = 8u32.to_le_bytes().to_vec();
        wrong_version.extend([9, 9, 0, 0, 0, 0, 0, 0]);
        let huge = u32::MAX.to_le_bytes().to_vec();
        for frame in [junk, wrong_version, huge] {
            let _ = bad.send_raw(p.server, vec![p.addr.clone()], frame).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let after = tokio::time::timeout(
            Duration::from_secs(10),
            bad.request(p.server, vec![p.addr.clone()], Request::Info),
        )
        .await;
        assert!(
            !matches!(after, Ok(Ok(Response::Info(_)))),
            "a peer that sent garbage three times is still answered"
        );
        // The well-behaved probe is not affected.
        assert!(matches!(p.ask(Request::Info).await, Response::Info(_)));

        // A flood of requests: past the per-peer budget they are refused as busy, and
        // once the flood stops the peer is served again.
        let flood = (0..1000).map(|_| p.ask(Request::Info));
        let answers = futures::future::join_all(flood).await;
        let refused = answers
            .iter()
            .filter(|r| {
                matches!(r, Response::Error(e) if e.kind == ErrorKind::Busy
                    && e.message.contains("requests per second"))
            })
            .count();
        let served = answers
            .iter()
            .filter(|r| matches!(r, Response::Info(_)))
            .count();
        assert_eq!(refused + served, 1000);
        assert!(
            refused > 0 && served >= 400,
            "{served} served, {refused} refused"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(matches!(p.ask(Request::Info).await, Response::Info(_)));
    });
    let log = a.log_text();
    assert!(log.contains("banned"), "no ban in the server's log:\n{log}");
    let (generation, finished) = good.join().expect("the good generation");
    assert!(
        finished > hostile_started,
        "the generation ended before the hostile client started: not concurrent"
    );
    assert_eq!(
        generation["text"], reference["text"],
        "the hostile client changed a concurrent generation"
    );
}

/// A server that corrupts its outputs (and claims ten times its speed, to attract
/// clients): a client that does not verify is fooled; one with `--verify-rate 1` catches
/// it on its first step, bans it, redoes the step elsewhere and answers exactly as one
/// process alone would, with no false alarm against the honest servers it goes on to
/// check.
#[test]
fn a_lying_server_is_caught_and_banned_and_the_answer_is_right() {
    let m = model();
    let a = serve(&m, "0..15", None);
    let liar = serve_with(&m, &["--blocks", "15..30", "--debug-lie"], Some(&a.addr));
    let _honest = serve(&m, "15..30", Some(&a.addr));
    let _honest2 = serve(&m, "15..30", Some(&a.addr));
    wait_for_servers(&a.addr, 4);
    let args = ["--prompt", "The capital of France is", "--max-tokens", "12"];
    let reference = generate_json(&[&["--local"][..], &args[..]].concat());

    // Without verification a client that routes through the liar (it claims to be the
    // fastest, so most do) gets a wrong answer.
    let fooled = (0..5)
        .map(|_| generate_json(&[&["--bootstrap", a.addr.as_str()][..], &args[..]].concat()))
        .find(|g| g["route"].to_string().contains(&liar.peer))
        .expect("no client chose the liar in 5 tries");
    assert_ne!(
        fooled["text"], reference["text"],
        "the liar's corruption did not show"
    );

    // With verification the liar is caught wherever it stands: on the chain (compared
    // with a replica, and a third server when they disagree: a failover away from it) or
    // as a replica itself (two others agree against it: banned, no failover). Either way
    // the answer is the honest one and no honest server is accused.
    for _ in 0..3 {
        let mut cmd = shoal();
        cmd.args(["generate", "--model"])
            .arg(model())
            .args([
                "--bootstrap",
                a.addr.as_str(),
                "--verify-rate",
                "1",
                "--json",
            ])
            .args(args)
            .env("RUST_LOG", "warn");
        let (out, _) = run(cmd, Duration::from_secs(120));
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{log}");
        let checked: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(checked["text"], reference["text"], "{log}");
        let reroutes = checked["reroutes"].as_array().expect("reroutes");
        for r in reroutes {
            assert_eq!(
                r["failed_peer"],
                liar.peer.as_str(),
                "an honest server accused: {r}"
            );
            let reason = r["reason"].as_str().unwrap_or("");
            assert!(reason.contains("verification"), "{r}");
        }
        let banned_as_replica = log
            .lines()
            .any(|l| l.contains("a replica's output differs") && l.contains(&liar.peer));
        assert!(
            !reroutes.is_empty() || banned_as_replica,
            "the liar was never caught:\n{log}"
        );
        assert!(!checked["route"].to_string().contains(&liar.peer));
    }
}
