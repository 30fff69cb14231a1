//! Fetching a part of a model from the peers that hold it: every chunk from whichever
//! peer holding its tensor has the fewest requests in flight, up to
//! [`PER_PEER`] each, checked against the manifest before it is written; a peer that
//! sends a bad chunk is banned for the rest of the fetch and the chunk taken from
//! another. The part is written in place (`.part`), each chunk recorded in a journal
//! once written, so a fetch that stops resumes with the chunks it had (checked again).

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use libp2p::{Multiaddr, PeerId};
use protocol::{ErrorKind, WeightsRequest, WeightsResponse};
use shard::manifest::{Manifest, ManifestError};

use super::store::PartStore;
use crate::net::codec::{read_frame, write_frame};
use crate::net::Network;

/// A peer that may hold the model.
#[derive(Clone, Debug)]
pub struct Source {
    /// Its peer id.
    pub peer: PeerId,
    /// Where to dial it (from its announcement).
    pub addrs: Vec<Multiaddr>,
}

/// Requests in flight to one peer at most.
const PER_PEER: usize = 4;

/// Requests in flight in all.
const IN_FLIGHT: usize = 16;

/// Longest wait for one answer (a 4 MiB chunk at a slow peer's paced rate).
const ASK_TIMEOUT: Duration = Duration::from_secs(120);

/// Failed requests in a row after which a peer is given up on.
const FAILURES: u32 = 3;

/// Sends `req` to `source` on a stream of its own and reads the answer.
async fn ask(
    net: &Network,
    source: &Source,
    req: &WeightsRequest,
) -> anyhow::Result<WeightsResponse> {
    let exchange = async {
        let mut stream = net
            .open_stream(source.peer, &source.addrs, protocol::WEIGHTS_PROTOCOL)
            .await?;
        write_frame(&mut stream, req).await?;
        let r: WeightsResponse = read_frame(&mut stream).await?;
        anyhow::Ok(r)
    };
    tokio::time::timeout(ASK_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            anyhow!(
                "no answer from {} in {}s",
                source.peer,
                ASK_TIMEOUT.as_secs()
            )
        })?
}

/// Model `model_id`'s manifest, from the first of `sources` that gives one hashing to
/// the id (one that gives another is skipped, with a warning).
pub async fn fetch_manifest(
    net: &Network,
    sources: &[Source],
    model_id: &str,
) -> anyhow::Result<Arc<Manifest>> {
    let mut why = Vec::new();
    for s in sources {
        let req = WeightsRequest::Manifest {
            model_id: model_id.to_string(),
        };
        match ask(net, s, &req).await {
            Ok(WeightsResponse::Manifest(bytes)) => match Manifest::decode_for(&bytes, model_id) {
                Ok(m) => return Ok(Arc::new(m)),
                Err(e) => {
                    tracing::warn!(peer = %s.peer, "a bad manifest: {e}");
                    why.push(format!("{}: {e}", s.peer));
                }
            },
            Ok(WeightsResponse::Error(e)) => why.push(format!("{}: {e}", s.peer)),
            Ok(_) => why.push(format!("{}: an answer that is not a manifest", s.peer)),
            Err(e) => why.push(format!("{}: {e:#}", s.peer)),
        }
    }
    bail!(
        "no peer gave the manifest of model {model_id}: {}",
        if why.is_empty() {
            "no peer serves it".to_string()
        } else {
            why.join("; ")
        }
    )
}

/// One chunk to fetch: its tensor, index, and where it goes in the part file.
#[derive(Clone, Debug)]
struct Chunk {
    tensor: String,
    index: u32,
    at: u64,
    len: u64,
}

/// What one peer holds and how it has done.
struct Peer {
    source: Source,
    all: bool,
    tensors: HashSet<String>,
    in_flight: usize,
    failures: u32,
    /// Banned (a bad chunk) or given up on (failing): asked nothing more.
    out: bool,
    /// Sent a bad chunk.
    banned: bool,
}

impl Peer {
    fn holds(&self, tensor: &str) -> bool {
        !self.out && (self.all || self.tensors.contains(tensor))
    }
}

/// The shared state of one fetch's workers.
struct State {
    queue: VecDeque<Chunk>,
    peers: Vec<Peer>,
    in_flight: usize,
    fetched_bytes: u64,
    error: Option<String>,
}

/// How a fetch went.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The complete part.
    pub path: PathBuf,
    /// Bytes fetched from peers now (not those found from an earlier try).
    pub fetched_bytes: u64,
    /// Chunks already there from an earlier, interrupted fetch.
    pub resumed_chunks: usize,
    /// Peers banned for bad chunks.
    pub banned: Vec<PeerId>,
}

/// Fetches the tensors `names` of `manifest`'s model from `sources` into the part
/// `label` of `store` (a GGUF file of those tensors), unless it is there already.
pub async fn fetch_part(
    net: &Network,
    manifest: &Arc<Manifest>,
    names: &[String],
    sources: &[Source],
    store: &PartStore,
    label: &str,
) -> anyhow::Result<Fetched> {
    let model_id = manifest.id()?;
    let path = store.path(&model_id, label);
    if store.complete(&path).is_some() {
        return Ok(Fetched {
            path,
            fetched_bytes: 0,
            resumed_chunks: 0,
            banned: Vec::new(),
        });
    }
    let layout = manifest.part_layout(names)?;
    let (part, journal) = PartStore::in_progress(&path);
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    store.make_room(layout.len.saturating_sub(have), std::slice::from_ref(&path))?;
    store.prepare(&path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    if have != layout.len {
        file.set_len(layout.len)?;
    }
    file.write_all_at(&layout.header, 0)?;
    // Every chunk of the part, less those the journal says were written and that check.
    let mut all = Vec::new();
    for name in names {
        let t = manifest
            .tensor(name)
            .with_context(|| format!("model {model_id} has no tensor {name}"))?;
        let base = layout.offsets[name];
        for index in 0..t.hashes.len() as u32 {
            let (start, len) = manifest.chunk_range(name, index)?;
            all.push(Chunk {
                tensor: name.clone(),
                index,
                at: base + start,
                len,
            });
        }
    }
    let written = read_journal(&journal);
    let mut queue = VecDeque::new();
    let mut resumed = 0;
    let mut resumed_bytes = 0u64;
    let mut buf = Vec::new();
    for c in all {
        if written.contains(&(c.tensor.clone(), c.index)) {
            buf.resize(c.len as usize, 0);
            if file.read_exact_at(&mut buf, c.at).is_ok()
                && manifest.check_chunk(&c.tensor, c.index, &buf).is_ok()
            {
                resumed += 1;
                resumed_bytes += c.len;
                continue;
            }
        }
        queue.push_back(c);
    }
    drop(buf);
    let total_bytes: u64 = queue.iter().map(|c| c.len).sum();
    if resumed > 0 {
        tracing::info!(
            "resuming {label} of {model_id}: {resumed} chunks ({} MiB) already here, {} to fetch ({} MiB)",
            resumed_bytes >> 20,
            queue.len(),
            total_bytes >> 20
        );
    }
    let journal_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&journal)
        .with_context(|| format!("cannot write {}", journal.display()))?;
    // Which tensors each source holds.
    let holdings = WeightsRequest::Holdings {
        model_id: model_id.clone(),
    };
    let asked = futures::future::join_all(sources.iter().map(|s| ask(net, s, &holdings))).await;
    let mut peers = Vec::new();
    for (s, r) in sources.iter().zip(asked) {
        match r {
            Ok(WeightsResponse::Holdings { all, tensors }) => peers.push(Peer {
                source: s.clone(),
                all,
                tensors: tensors.into_iter().collect(),
                in_flight: 0,
                failures: 0,
                out: false,
                banned: false,
            }),
            Ok(WeightsResponse::Error(e)) => tracing::debug!(peer = %s.peer, "holds nothing: {e}"),
            Ok(_) => tracing::debug!(peer = %s.peer, "an answer that is not its holdings"),
            Err(e) => tracing::debug!(peer = %s.peer, "no holdings: {e:#}"),
        }
    }
    if let Some(c) = queue
        .iter()
        .find(|c| !peers.iter().any(|p| p.holds(&c.tensor)))
    {
        bail!(
            "no peer of the swarm holds tensor {} of model {model_id} ({} peers asked)",
            c.tensor,
            sources.len()
        );
    }
    let state = Mutex::new(State {
        queue,
        peers,
        in_flight: 0,
        fetched_bytes: 0,
        error: None,
    });
    let started = Instant::now();
    let workers = IN_FLIGHT.min(PER_PEER * sources.len().max(1));
    let journal_lock = Mutex::new(&journal_file);
    let run = futures::future::join_all(
        (0..workers).map(|_| worker(net, manifest, &model_id, &state, &file, &journal_lock)),
    );
    let done = std::sync::atomic::AtomicBool::new(false);
    let progress = report(&state, total_bytes, started, label, &done);
    let (results, ()) = tokio::join!(
        async {
            let r = run.await;
            done.store(true, std::sync::atomic::Ordering::Release);
            r
        },
        progress
    );
    let state = state.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = state.error {
        bail!("fetching {label} of {model_id}: {e}");
    }
    for r in results {
        r?;
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(&part, &path)?;
    manifest.keep_beside(&path)?;
    let _ = std::fs::remove_file(&journal);
    let banned: Vec<PeerId> = state
        .peers
        .iter()
        .filter(|p| p.banned)
        .map(|p| p.source.peer)
        .collect();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "fetched {label} of {model_id}: {} MiB in {secs:.1}s ({:.1} MiB/s) from {} peers{}",
        state.fetched_bytes >> 20,
        state.fetched_bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
        state.peers.iter().filter(|p| !p.out).count(),
        if resumed > 0 {
            format!(", {resumed} chunks were already here")
        } else {
            String::new()
        }
    );
    Ok(Fetched {
        path,
        fetched_bytes: state.fetched_bytes,
        resumed_chunks: resumed,
        banned,
    })
}

/// The chunks a journal records as written: `tensor<TAB>index` lines.
fn read_journal(path: &Path) -> HashSet<(String, u32)> {
    let Ok(f) = std::fs::File::open(path) else {
        return HashSet::new();
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            let (t, i) = l.split_once('\t')?;
            Some((t.to_string(), i.parse().ok()?))
        })
        .collect()
}

/// Takes chunks off the queue until it is empty (or the fetch failed), each from the
/// least busy peer that holds its tensor.
async fn worker(
    net: &Network,
    manifest: &Manifest,
    model_id: &str,
    state: &Mutex<State>,
    file: &std::fs::File,
    journal: &Mutex<&std::fs::File>,
) -> anyhow::Result<()> {
    loop {
        let pick = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            if s.error.is_some() {
                return Ok(());
            }
            let Some(chunk) = s.queue.pop_front() else {
                return Ok(());
            };
            let best = s
                .peers
                .iter()
                .enumerate()
                .filter(|(_, p)| p.holds(&chunk.tensor) && p.in_flight < PER_PEER)
                .min_by_key(|(_, p)| p.in_flight)
                .map(|(i, _)| i);
            match best {
                Some(i) => {
                    s.peers[i].in_flight += 1;
                    s.in_flight += 1;
                    Some((chunk, i, s.peers[i].source.clone()))
                }
                None if !s.peers.iter().any(|p| p.holds(&chunk.tensor)) => {
                    s.error = Some(format!(
                        "no peer left that holds tensor {} (the others were banned or failed)",
                        chunk.tensor
                    ));
                    return Ok(());
                }
                None => {
                    // Every peer holding it is busy: let another request finish.
                    s.queue.push_front(chunk);
                    None
                }
            }
        };
        let Some((chunk, i, source)) = pick else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let req = WeightsRequest::Chunk {
            model_id: model_id.to_string(),
            tensor: chunk.tensor.clone(),
            index: chunk.index,
        };
        let answer = ask(net, &source, &req).await;
        let outcome = match answer {
            Ok(WeightsResponse::Chunk(bytes)) => {
                match manifest.check_chunk(&chunk.tensor, chunk.index, &bytes) {
                    Ok(()) => {
                        let write = tokio::task::block_in_place(|| {
                            file.write_all_at(&bytes, chunk.at)?;
                            let j = journal.lock().unwrap_or_else(|p| p.into_inner());
                            let mut f: &std::fs::File = &j;
                            writeln!(f, "{}\t{}", chunk.tensor, chunk.index)
                        });
                        write.with_context(|| "writing the part")?;
                        Outcome::Done(bytes.len() as u64)
                    }
                    Err(
                        e @ (ManifestError::WrongHash { .. } | ManifestError::WrongSize { .. }),
                    ) => Outcome::Bad(e.to_string()),
                    Err(e) => Outcome::Failed(e.to_string()),
                }
            }
            Ok(WeightsResponse::Error(e)) if e.kind == ErrorKind::Busy => Outcome::Busy,
            Ok(WeightsResponse::Error(e)) if e.kind == ErrorKind::NotHeld => {
                Outcome::NotHeld(e.to_string())
            }
            Ok(WeightsResponse::Error(e)) => Outcome::Failed(e.to_string()),
            Ok(_) => Outcome::Bad("an answer that is not a chunk".into()),
            Err(e) => Outcome::Failed(format!("{e:#}")),
        };
        let retry = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.in_flight -= 1;
            let p = &mut s.peers[i];
            p.in_flight -= 1;
            let retry = match outcome {
                Outcome::Done(n) => {
                    p.failures = 0;
                    s.fetched_bytes += n;
                    false
                }
                Outcome::Bad(why) => {
                    tracing::warn!(
                        peer = %p.source.peer,
                        "banned for the rest of this fetch: it sent a bad chunk ({why})"
                    );
                    p.out = true;
                    p.banned = true;
                    true
                }
                Outcome::NotHeld(why) => {
                    tracing::debug!(peer = %p.source.peer, "does not hold {}: {why}", chunk.tensor);
                    p.tensors.remove(&chunk.tensor);
                    p.all = false;
                    true
                }
                Outcome::Busy => true,
                Outcome::Failed(why) => {
                    p.failures += 1;
                    tracing::debug!(peer = %p.source.peer, "a chunk request failed: {why}");
                    if p.failures >= FAILURES {
                        tracing::warn!(peer = %p.source.peer, "given up on after {FAILURES} failures: {why}");
                        p.out = true;
                    }
                    true
                }
            };
            if retry {
                s.queue.push_back(chunk);
            }
            retry
        };
        if !retry {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What came of one chunk request.
enum Outcome {
    Done(u64),
    Bad(String),
    NotHeld(String),
    Busy,
    Failed(String),
}

/// Shows the fetch's progress (bytes, rate, time left) until `done`: a line rewritten
/// in place on a terminal, a log line every few seconds otherwise.
async fn report(
    state: &Mutex<State>,
    total: u64,
    started: Instant,
    label: &str,
    done: &std::sync::atomic::AtomicBool,
) {
    let terminal = std::io::stderr().is_terminal();
    let mut last_log = Instant::now();
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (got, peers) = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            (s.fetched_bytes, s.peers.iter().filter(|p| !p.out).count())
        };
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = got as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0}s", (total.saturating_sub(got)) as f64 / rate)
        } else {
            "?".into()
        };
        let line = format!(
            "fetching {label}: {} / {} MiB, {:.1} MiB/s, {eta} left, from {peers} peers",
            got >> 20,
            total >> 20,
            rate / (1 << 20) as f64
        );
        if terminal {
            eprint!("\r{line}   ");
        } else if last_log.elapsed() >= Duration::from_secs(3) {
            tracing::info!("{line}");
            last_log = Instant::now();
        }
    }
    if terminal {
        eprintln!();
    }
}
