//! Sharing what a node holds: answers to [`WeightsRequest`]s, one per stream, within an
//! upload rate and a number of transfers at once.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use protocol::{ErrorInfo, ErrorKind, WeightsRequest, WeightsResponse};
use shard::manifest::Manifest;
use shard::ModelFile;

use crate::net::codec::{read_frame, write_frame};
use crate::net::Network;

/// How much a node gives.
#[derive(Clone, Copy, Debug)]
pub struct ShareLimits {
    /// Upload rate for weights, bytes per second; `None`: no limit.
    pub bytes_per_second: Option<u64>,
    /// Transfers served at once; more are told to try another peer (busy).
    pub max_transfers: usize,
    /// Testing only: corrupt every chunk sent (a lying peer, to be caught and banned).
    pub corrupt: bool,
}

/// What a node shares: its model's manifest and the tensors of the file it holds (the
/// whole model, or a part of it fetched from the swarm). The file changes when a
/// server moves to another span.
pub struct Sharing {
    model_id: String,
    manifest: Arc<Manifest>,
    manifest_bytes: Vec<u8>,
    file: RwLock<Arc<ModelFile>>,
    limits: ShareLimits,
    /// When the upload link is next free: sends are paced to the rate.
    next_free: Mutex<Instant>,
    transfers: Arc<tokio::sync::Semaphore>,
}

/// Longest wait for a request once a stream is open.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a response may take to write (a chunk at the paced rate, on a slow link).
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

impl Sharing {
    /// Shares `file` (a whole GGUF file, or a part of a model with its manifest).
    pub fn new(file: Arc<ModelFile>, limits: ShareLimits) -> anyhow::Result<Arc<Sharing>> {
        let manifest = file.manifest()?;
        Ok(Arc::new(Sharing {
            model_id: file.id().to_string(),
            manifest_bytes: manifest.encode(),
            manifest,
            file: RwLock::new(file),
            limits,
            next_free: Mutex::new(Instant::now()),
            transfers: Arc::new(tokio::sync::Semaphore::new(limits.max_transfers.max(1))),
        }))
    }

    /// Shares `file` from now on (a server that moved: its new part).
    pub fn replace_file(&self, file: Arc<ModelFile>) {
        *self.file.write().unwrap_or_else(|p| p.into_inner()) = file;
    }

    fn file(&self) -> Arc<ModelFile> {
        self.file.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `bytes` more may go out within the rate.
    async fn pace(&self, bytes: usize) {
        let Some(rate) = self.limits.bytes_per_second.filter(|&r| r > 0) else {
            return;
        };
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }

    fn refuse(kind: ErrorKind, message: impl Into<String>) -> WeightsResponse {
        WeightsResponse::Error(ErrorInfo::new(kind, message))
    }

    /// The answer to `req`.
    async fn answer(&self, req: WeightsRequest) -> WeightsResponse {
        let model = match &req {
            WeightsRequest::Manifest { model_id }
            | WeightsRequest::Holdings { model_id }
            | WeightsRequest::Chunk { model_id, .. } => model_id,
        };
        if model != &self.model_id {
            return Self::refuse(
                ErrorKind::NotHeld,
                format!("this node holds model {}, not {model}", self.model_id),
            );
        }
        match req {
            WeightsRequest::Manifest { .. } => {
                self.pace(self.manifest_bytes.len()).await;
                WeightsResponse::Manifest(self.manifest_bytes.clone())
            }
            WeightsRequest::Holdings { .. } => {
                let file = self.file();
                let mut held = file.held_tensors();
                let all = held.len() == self.manifest.tensors().len();
                if all {
                    held.clear();
                }
                held.sort();
                WeightsResponse::Holdings { all, tensors: held }
            }
            WeightsRequest::Chunk { tensor, index, .. } => {
                let (start, len) = match self.manifest.chunk_range(&tensor, index) {
                    Ok(r) => r,
                    Err(e) => return Self::refuse(ErrorKind::BadRequest, e.to_string()),
                };
                let file = self.file();
                let Some(bytes) = file.tensor_bytes(&tensor) else {
                    return Self::refuse(
                        ErrorKind::NotHeld,
                        format!(
                            "tensor {tensor} is not held here (this node holds part of the model)"
                        ),
                    );
                };
                let Some(piece) = bytes.get(start as usize..(start + len) as usize) else {
                    return Self::refuse(
                        ErrorKind::Internal,
                        format!("tensor {tensor} is shorter here than the manifest says"),
                    );
                };
                let mut piece = piece.to_vec();
                if self.limits.corrupt {
                    if let Some(b) = piece.first_mut() {
                        *b ^= 0x5a;
                    }
                }
                self.pace(piece.len()).await;
                WeightsResponse::Chunk(piece)
            }
        }
    }
}

/// Answers the weights requests other peers send this node: the returned future runs
/// until the network stops (the caller spawns it).
pub fn share(
    net: &Network,
    sharing: Arc<Sharing>,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut incoming = net.accept_streams(protocol::WEIGHTS_PROTOCOL)?;
    Ok(async move {
        while let Some((peer, mut stream)) = incoming.next().await {
            let sharing = sharing.clone();
            tokio::spawn(async move {
                let permit = sharing.transfers.clone().try_acquire_owned();
                let req: WeightsRequest =
                    match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut stream)).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "an unreadable weights request: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                let response = match permit {
                    Ok(_held) => {
                        let r = sharing.answer(req).await;
                        let write = write_frame(&mut stream, &r);
                        if let Err(e) = tokio::time::timeout(WRITE_TIMEOUT, write).await {
                            tracing::debug!(%peer, "sending weights timed out: {e}");
                        }
                        return;
                    }
                    Err(_) => Sharing::refuse(
                        ErrorKind::Busy,
                        "this node is sending as many weights as it may: try another",
                    ),
                };
                let _ =
                    tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut stream, &response)).await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A part of the default model holding block 1 (and the small tensors every span
    /// holds), cut from the whole file as a fetch would write it.
    fn part_of_default(dir: &std::path::Path) -> anyhow::Result<(ModelFile, Vec<String>)> {
        let whole = ModelFile::open(crate::model_cache::default_model()?)?;
        let manifest = whole.manifest()?;
        let names = crate::weights::span_tensors(&manifest, 1, 2);
        let layout = manifest.part_layout(&names)?;
        let path = dir.join("part.gguf");
        let f = std::fs::File::create(&path)?;
        f.set_len(layout.len)?;
        f.write_all_at(&layout.header, 0)?;
        for n in &names {
            let bytes = whole.tensor_bytes(n).expect("the whole file holds it");
            f.write_all_at(bytes, layout.offsets[n])?;
        }
        drop(f);
        manifest.keep_beside(&path)?;
        Ok((ModelFile::open(&path)?, names))
    }

    fn refusal(r: WeightsResponse) -> ErrorInfo {
        match r {
            WeightsResponse::Error(e) => e,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn what_is_not_held_is_refused_clearly() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (part, names) = part_of_default(dir.path())?;
        let id = part.id().to_string();
        let manifest = part.manifest()?;
        let limits = ShareLimits {
            bytes_per_second: None,
            max_transfers: 2,
            corrupt: false,
        };
        let sharing = Sharing::new(Arc::new(part), limits)?;
        let chunk = |tensor: &str, index| WeightsRequest::Chunk {
            model_id: id.clone(),
            tensor: tensor.into(),
            index,
        };
        // A tensor of another block: not held here, said so.
        let e = refusal(sharing.answer(chunk("blk.0.attn_q.weight", 0)).await);
        assert_eq!(e.kind, ErrorKind::NotHeld);
        assert!(e.message.contains("not held here"), "{e}");
        // Another model: not held either.
        let other = WeightsRequest::Manifest {
            model_id: "another-1x1-00".into(),
        };
        let e = refusal(sharing.answer(other).await);
        assert_eq!(e.kind, ErrorKind::NotHeld);
        // A chunk past a tensor's end, or of no tensor: a bad request.
        let held = names
            .iter()
            .find(|n| n.starts_with("blk.1."))
            .expect("a tensor of block 1");
        for req in [chunk(held, 99), chunk("no.such.tensor", 0)] {
            let e = refusal(sharing.answer(req).await);
            assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
            assert!(e.message.contains("no chunk"), "{e}");
        }
        // What it holds: the right bytes, and its holdings are its part.
        match sharing.answer(chunk(held, 0)).await {
            WeightsResponse::Chunk(bytes) => manifest.check_chunk(held, 0, &bytes)?,
            other => panic!("no chunk: {other:?}"),
        }
        let holdings = WeightsRequest::Holdings {
            model_id: id.clone(),
        };
        match sharing.answer(holdings).await {
            WeightsResponse::Holdings { all, tensors } => {
                let mut want = names.clone();
                want.sort();
                assert!(!all);
                assert_eq!(tensors, want);
            }
            other => panic!("no holdings: {other:?}"),
        }
        Ok(())
    }
}
