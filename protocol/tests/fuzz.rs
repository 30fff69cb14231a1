//! Fuzzing every decoder of the wire protocol, on stable Rust.
//!
//! cargo-fuzz needs a nightly toolchain, which this project does not assume; this is a
//! mutation fuzzer of our own instead. It starts from the committed corpus in
//! `protocol/fuzz/corpus/<target>/` (valid encodings of every message kind), mutates
//! inputs the way libFuzzer's default mutators do (bit flips, bytes set to values that
//! mean something to bincode such as the varint markers 251..=254, truncation,
//! insertion, deletion, duplication, splicing two inputs, huge lengths written in place)
//! and feeds each to the decoder. A target fails if the decoder panics, or if a message
//! it accepts does not survive a second trip through the codec unchanged.
//!
//! Each target runs for `SHOAL_FUZZ_SECONDS` (default 3: CI runs this bounded), and
//! prints how many inputs it ran. An input that fails is written to
//! `target/fuzz-failures/` and printed in hex; add it to the corpus once fixed.
//! `cargo test -p shoal-protocol --test fuzz -- --ignored` rewrites the seed corpus from
//! [`seeds`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use protocol::*;

/// A fast deterministic generator (xorshift64*), seeded per target so a run can be
/// repeated with `SHOAL_FUZZ_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Byte values with a meaning to bincode's varint encoding (251: u16 follows, 252: u32,
/// 253: u64, 254: u128) and the usual edges.
const INTERESTING: [u8; 10] = [0, 1, 2, 0x7f, 0x80, 251, 252, 253, 254, 0xff];

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            3 => v.truncate(rng.below(len + 1)),
            4 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                v.drain(at..at + n);
            }
            6 => {
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let copy = v[at..at + n].to_vec();
                let to = rng.below(len + 1);
                v.splice(to..to, copy);
            }
            8 => {
                // A huge length or count where one may be read.
                let at = rng.below(len + 1);
                let mut big = vec![253];
                big.extend_from_slice(&(rng.next() | 1 << 40).to_le_bytes());
                let end = (at + big.len()).min(len);
                v.splice(at..end, big);
            }
            _ => {
                let at = rng.below(len + 1);
                v.insert(at, INTERESTING[rng.below(INTERESTING.len())]);
            }
        }
    }
    v
}

/// A decoder under test: whether it accepted the input, or an error text if the input
/// broke a property (a panic is caught by the runner).
type Target = fn(&[u8]) -> Result<bool, String>;

/// Decodes `T`; if that works, the message must encode and decode again to the same
/// bytes (compared as encodings, so NaNs in floats compare equal).
fn round_trip<T>(bytes: &[u8]) -> Result<Option<T>, String>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let Ok(msg) = decode::<T>(bytes) else {
        return Ok(None);
    };
    let once = encode(&msg).map_err(|e| format!("accepted but cannot re-encode: {e}"))?;
    let again: T = decode(&once).map_err(|e| format!("re-encoding does not decode: {e}"))?;
    let twice = encode(&again).map_err(|e| format!("cannot re-encode twice: {e}"))?;
    if once != twice {
        return Err("a message changed on a second trip through the codec".into());
    }
    Ok(Some(msg))
}

/// What a server does with a hidden state it receives: validate, then read.
fn use_hidden(h: &HiddenState) {
    if h.validate().is_ok() {
        let values = h.to_f32().expect("a validated hidden state converts");
        assert_eq!(Ok(values.len()), h.elem_count().map_err(|e| e.to_string()));
    }
}

fn request(bytes: &[u8]) -> Result<bool, String> {
    round_trip::<Request>(bytes).map(|m| m.is_some())
}

fn frame(bytes: &[u8]) -> Result<bool, String> {
    let msg = round_trip::<Frame>(bytes)?;
    match &msg {
        Some(Frame::Step(s)) => use_hidden(&s.hidden),
        Some(Frame::Output(o)) => use_hidden(&o.hidden),
        _ => {}
    }
    Ok(msg.is_some())
}

fn response(bytes: &[u8]) -> Result<bool, String> {
    round_trip::<Response>(bytes).map(|m| m.is_some())
}

fn announcement(bytes: &[u8]) -> Result<bool, String> {
    round_trip::<Announcement>(bytes).map(|m| m.is_some())
}

/// A byte stream of frames as a peer may send it: each header is checked against the
/// limit before its body is taken.
fn frames(bytes: &[u8]) -> Result<bool, String> {
    let mut rest = bytes;
    let mut any = false;
    while let Some((header, after)) = rest.split_first_chunk::<4>() {
        let Ok(len) = decode_frame_len(*header) else {
            break;
        };
        if after.len() < len {
            break;
        }
        any |= frame(&after[..len])?;
        rest = &after[len..];
    }
    Ok(any)
}

fn hidden(n: usize, dtype: WireDType) -> HiddenState {
    let values: Vec<f32> = (0..n * 4).map(|i| i as f32 * 0.5 - 3.0).collect();
    HiddenState::from_f32(&values, vec![n as u32, 4], dtype)
}

/// Valid messages of every kind: the seed corpus.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let step = Step {
        session: 42,
        step: 7,
        position: 19,
        hidden: hidden(2, WireDType::F32),
        next: vec![Hop {
            peer: "12D3KooWAbCdEfGhIjKlMnOpQrStUvWxYz".into(),
            span: BlockSpan::new(10, 20),
            addrs: vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()],
            session: 43,
        }],
        reply_to: "12D3KooWClient".into(),
    };
    let announcement_msg = Announcement {
        peer_id: "12D3KooWServer".into(),
        model_id: "model-1234".into(),
        span: BlockSpan::new(0, 10),
        n_blocks: 30,
        throughput: 120.5,
        free_cache_tokens: 4096,
        sessions: 2,
        max_seq_len: 2048,
        version: "0.1.0".into(),
        public_name: "alpha".into(),
        addrs: vec![
            "/ip4/10.0.0.1/tcp/4001".into(),
            "/ip4/203.0.113.7/udp/4001/quic-v1/p2p/12D3KooWRelay/p2p-circuit".into(),
        ],
        reachability: Reachability::Relayed,
        expires_unix_ms: 1_800_000_000_000,
        params: ModelParams {
            total: 30_500_000_000,
            active: 3_300_000_000,
        },
    };
    let requests = vec![
        Request::Info,
        Request::Open(OpenSession {
            session: 1,
            model_id: "model-1234".into(),
            span: BlockSpan::new(0, 10),
            max_len: 512,
            wire_dtype: WireDType::F16,
        }),
        Request::Close { session: 9 },
        Request::Leaving(StepFailed {
            session: 3,
            step: 4,
            peer: "12D3KooWServer".into(),
            error: ErrorInfo::new(ErrorKind::Leaving, "bye"),
        }),
    ];
    let frames = vec![
        Frame::Step(step.clone()),
        Frame::Step(Step {
            hidden: hidden(1, WireDType::Bf16),
            next: vec![],
            ..step
        }),
        Frame::Output(StepOutput {
            session: 3,
            step: 4,
            position: 5,
            hidden: hidden(3, WireDType::F16),
        }),
        Frame::Failed(StepFailed {
            session: 3,
            step: 4,
            peer: "12D3KooWServer".into(),
            error: ErrorInfo::new(ErrorKind::Unreachable, "next hop gone"),
        }),
    ];
    let responses = vec![
        Response::Info(announcement_msg.clone()),
        Response::Opened {
            session: 1,
            max_len: 512,
        },
        Response::Accepted,
        Response::Error(ErrorInfo::new(ErrorKind::Busy, "full")),
    ];
    let mut out = Vec::new();
    for r in &requests {
        out.push(("request", encode(r).expect("encode")));
    }
    for f in &frames {
        out.push(("frame", encode(f).expect("encode")));
    }
    let mut stream = Vec::new();
    for f in &frames {
        stream.extend(encode_frame(f).expect("frame"));
    }
    out.push(("frames", stream));
    for r in &responses {
        out.push(("response", encode(r).expect("encode")));
    }
    out.push(("announcement", encode(&announcement_msg).expect("encode")));
    out
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The committed corpus of a target.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no corpus at {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("corpus file"))
        .collect();
    assert!(!inputs.is_empty(), "empty corpus at {}", dir.display());
    inputs
}

fn fuzz(name: &str, target: Target) {
    let corpus = corpus(name);
    let secs: f64 = std::env::var("SHOAL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let seed: u64 = std::env::var("SHOAL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0000_0000_0001)
        ^ name.bytes().fold(0u64, |h, b| h.rotate_left(5) ^ b as u64);
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    let mut accepted = 0u64;
    // The corpus itself first: every seed must decode.
    let mut inputs: Vec<Vec<u8>> = corpus.clone();
    loop {
        let input = match inputs.pop() {
            Some(i) => i,
            None => {
                if Instant::now() >= deadline {
                    break;
                }
                let base = &corpus[rng.below(corpus.len())];
                mutate(&mut rng, base, &corpus)
            }
        };
        runs += 1;
        let outcome = catch_unwind(AssertUnwindSafe(|| target(&input)));
        let problem = match outcome {
            Ok(Ok(decoded)) => {
                accepted += u64::from(decoded);
                None
            }
            Ok(Err(e)) => Some(e),
            Err(panic) => Some(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
        if let Some(problem) = problem {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            std::fs::create_dir_all(&dir).expect("failure dir");
            let file = dir.join(format!("{name}-{runs}"));
            std::fs::write(&file, &input).expect("write failure");
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!(
                "fuzz target {name}: {problem} after {runs} inputs; input saved to {}: {hex}",
                file.display()
            );
        }
    }
    eprintln!(
        "fuzz target {name}: {runs} inputs in {secs} s, {accepted} decoded as a message, no failure"
    );
    assert!(runs > corpus.len() as u64, "the fuzzer did not run");
}

#[test]
fn fuzz_request_decoder() {
    fuzz("request", request);
}

#[test]
fn fuzz_frame_decoder() {
    fuzz("frame", frame);
}

#[test]
fn fuzz_response_decoder() {
    fuzz("response", response);
}

#[test]
fn fuzz_announcement_decoder() {
    fuzz("announcement", announcement);
}

#[test]
fn fuzz_frame_stream() {
    fuzz("frames", frames);
}

/// The seeds must decode: the corpus is valid input, so mutations start from the
/// interesting part of the input space.
#[test]
fn every_seed_decodes() {
    for (target, bytes) in seeds() {
        let ok = match target {
            "request" => request(&bytes),
            "frame" => frame(&bytes),
            "response" => response(&bytes),
            "announcement" => announcement(&bytes),
            _ => frames(&bytes),
        };
        let ok = ok == Ok(true);
        assert!(ok, "{target} seed does not decode");
    }
}

/// Rewrites the seed corpus (run by hand after a change to the messages).
#[test]
#[ignore]
fn write_seed_corpus() {
    let mut count: std::collections::HashMap<&str, usize> = Default::default();
    for (target, bytes) in seeds() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        let n = count.entry(target).or_default();
        std::fs::write(dir.join(format!("seed-{n:02}")), bytes).expect("write seed");
        *n += 1;
    }
}
