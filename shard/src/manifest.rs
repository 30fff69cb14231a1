//! A model's manifest: what names exactly one set of bytes, so that a piece of a model
//! fetched from any peer can be checked.
//!
//! A manifest is a GGUF file's header (magic, version, metadata and tensor table, byte
//! for byte) and, for every tensor, the SHA-256 of each [`CHUNK_BYTES`] piece of its
//! stored bytes (the last piece shorter). The model id is the model's name and shape and
//! the first 128 bits of the SHA-256 of the manifest's encoding ([`Manifest::id`]): an
//! id names one manifest, and through its hashes every byte of every tensor.
//!
//! Computing one reads the whole file (SHA-256 with the CPU's SHA instructions where it
//! has them, chunks hashed in parallel), so it is kept beside the file
//! ([`Manifest::for_file`]) and recomputed only when the file's length or modification
//! time changes. A file of some of a model's tensors (a span downloaded from the swarm)
//! keeps the whole model's manifest beside it instead, and names the model in its own
//! metadata (`shoal.part_of`).

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use candle_core::quantized::gguf_file;

use crate::gguf::{whole_header, Gguf, SubsetLayout, PART_OF_KEY};

/// Bytes of a tensor each hash covers (the last chunk of a tensor may be shorter). Big
/// enough that a 40 GB model has ~10,000 hashes (320 KB of manifest), small enough that
/// a bad chunk costs a few MB to fetch again.
pub const CHUNK_BYTES: u64 = 4 << 20;

/// The manifest's encoding is bounded: a header of megabytes of metadata (a tokenizer's
/// vocabulary) and a few hashes per tensor.
const MAX_MANIFEST_BYTES: usize = 256 << 20;

/// The hashes of one tensor's stored bytes, chunk by chunk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorChunks {
    /// The tensor's name in the file.
    pub name: String,
    /// Its stored size in bytes.
    pub bytes: u64,
    /// SHA-256 of each [`CHUNK_BYTES`] piece, in order.
    pub hashes: Vec<[u8; 32]>,
}

/// A manifest as kept beside a file, with the file's length and modification time.
#[derive(Serialize, Deserialize)]
enum Kept {
    /// Beside a whole model file: the manifest's encoding.
    Whole {
        len: u64,
        mtime: u128,
        manifest: Vec<u8>,
    },
    /// Beside a part: the manifest less the metadata the part's header holds.
    Part {
        len: u64,
        mtime: u128,
        n_tensors: u64,
        table: Vec<u8>,
        header_len: u64,
        chunk_bytes: u64,
        tensors: Vec<TensorChunks>,
    },
}

/// A model's header and the hashes of all its tensors (see the module's docs).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The file's bytes before its tensor data.
    header: Vec<u8>,
    /// Bytes per hashed chunk.
    chunk_bytes: u64,
    /// Every tensor of the header's table, sorted by name.
    tensors: Vec<TensorChunks>,
}

/// Why a chunk or a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The bytes do not decode as a manifest, or its parts disagree.
    #[error("not a valid manifest: {0}")]
    Invalid(String),
    /// The manifest is valid but names another model.
    #[error("the manifest hashes to model {got}, not the {want} asked for")]
    WrongId {
        /// The id asked for.
        want: String,
        /// The id the manifest hashes to.
        got: String,
    },
    /// No such tensor or chunk in the model.
    #[error("model has no chunk {index} of tensor {tensor}")]
    NoSuchChunk {
        /// The tensor named.
        tensor: String,
        /// The chunk asked for.
        index: u32,
    },
    /// A chunk of the wrong length.
    #[error("chunk {index} of {tensor} is {got} bytes, not {want}")]
    WrongSize {
        /// Its tensor.
        tensor: String,
        /// Its index.
        index: u32,
        /// The length the manifest gives it.
        want: u64,
        /// The length that came.
        got: u64,
    },
    /// A chunk whose bytes do not hash to the manifest's hash.
    #[error("chunk {index} of {tensor} does not match the model's hash")]
    WrongHash {
        /// Its tensor.
        tensor: String,
        /// Its index.
        index: u32,
    },
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MANIFEST_BYTES>()
}

impl Manifest {
    /// The manifest of the GGUF file whose bytes are `file`: its header, and the hash of
    /// every chunk of every tensor (hashed in parallel on [`crate::kernels::pool`]).
    pub fn of_gguf(file: &[u8]) -> Result<Manifest, ManifestError> {
        let gguf = Gguf::read(file).map_err(ManifestError::Invalid)?;
        Self::hash(file, &gguf)
    }

    fn hash(file: &[u8], gguf: &Gguf) -> Result<Manifest, ManifestError> {
        let mut names: Vec<&String> = gguf.tensors.keys().collect();
        names.sort();
        // Every chunk of every tensor as one list, so the threads share the work evenly.
        let mut jobs = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let data = gguf.data(file, &gguf.tensors[*name]);
            for (c, piece) in data.chunks(CHUNK_BYTES as usize).enumerate() {
                jobs.push((i, c, piece));
            }
        }
        let hashes: Vec<[u8; 32]> = crate::kernels::on_pool(|| {
            jobs.par_iter().map(|(_, _, piece)| sha256(piece)).collect()
        });
        let mut tensors: Vec<TensorChunks> = names
            .iter()
            .map(|name| TensorChunks {
                name: (*name).clone(),
                bytes: gguf.data(file, &gguf.tensors[*name]).len() as u64,
                hashes: Vec::new(),
            })
            .collect();
        for ((i, _, _), h) in jobs.iter().zip(hashes) {
            tensors[*i].hashes.push(h);
        }
        Ok(Manifest {
            header: file[..gguf.data_offset as usize].to_vec(),
            chunk_bytes: CHUNK_BYTES,
            tensors,
        })
    }

    /// The manifest of the GGUF file at `path`, from the copy kept beside it when that
    /// still describes the file, else computed (reading the whole file) and kept there
    /// when the directory is writable. A file of some of a model's tensors has no
    /// manifest of its own: its model's is beside it (written when it was fetched).
    pub fn for_file(path: &Path) -> Result<Manifest, ManifestError> {
        if let Some(m) = Self::kept(path) {
            return Ok(m);
        }
        let file = std::fs::File::open(path)
            .map_err(|e| ManifestError::Invalid(format!("{}: {e}", path.display())))?;
        // SAFETY: a read-only map of a file we do not modify (see `ModelFile::open`).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| ManifestError::Invalid(format!("{}: {e}", path.display())))?;
        let gguf = Gguf::read(&map).map_err(ManifestError::Invalid)?;
        if gguf.metadata.contains_key(PART_OF_KEY) {
            return Err(ManifestError::Invalid(format!(
                "{} holds part of a model and its model's manifest is missing beside it ({})",
                path.display(),
                Self::sidecar(path).display()
            )));
        }
        let started = std::time::Instant::now();
        tracing::info!(
            "hashing {} ({} MiB) for its manifest, once: the model's id names its bytes",
            path.display(),
            map.len() >> 20
        );
        let m = Self::hash(&map, &gguf)?;
        tracing::info!(
            "hashed {} ({} MiB) in {:.1}s for its manifest",
            path.display(),
            map.len() >> 20,
            started.elapsed().as_secs_f64()
        );
        if let Err(e) = m.keep_beside(path) {
            tracing::debug!("cannot keep the manifest beside {}: {e}", path.display());
        }
        Ok(m)
    }

    /// Where the manifest of the file at `path` is kept.
    pub fn sidecar(path: &Path) -> PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".shoal-manifest");
        path.with_file_name(name)
    }

    /// The file's length and modification time, which a kept manifest must match.
    fn stamp(path: &Path) -> Option<(u64, u128)> {
        let meta = std::fs::metadata(path).ok()?;
        let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        Some((meta.len(), mtime.as_nanos()))
    }

    /// The manifest kept beside `path`, if it was written for the file as it is now.
    fn kept(path: &Path) -> Option<Manifest> {
        let bytes = std::fs::read(Self::sidecar(path)).ok()?;
        let (kept, _): (Kept, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode_config()).ok()?;
        let stamp = Self::stamp(path)?;
        match kept {
            Kept::Whole {
                len,
                mtime,
                manifest,
            } if (len, mtime) == stamp => Self::decode(&manifest).ok(),
            Kept::Part {
                len,
                mtime,
                n_tensors,
                table,
                header_len,
                chunk_bytes,
                tensors,
            } if (len, mtime) == stamp => {
                // The model's header, rebuilt from the part's (the same metadata) and
                // the model's table; its id must be the one the part names.
                let file = std::fs::File::open(path).ok()?;
                // SAFETY: a read-only map of a file we do not modify.
                let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
                let part = Gguf::read_header(&map).ok()?;
                let Some(gguf_file::Value::String(id)) = part.metadata.get(PART_OF_KEY) else {
                    return None;
                };
                let header = whole_header(&map, &part, id, n_tensors, &table, header_len)?;
                let m = Manifest {
                    header,
                    chunk_bytes,
                    tensors,
                };
                let m = Self::decode(&m.encode()).ok()?;
                (m.id().ok()? == *id).then_some(m)
            }
            _ => None,
        }
    }

    /// Keeps this manifest beside the file at `path` (which it describes, or of whose
    /// model `path` holds a part), stamped with the file's length and time. Beside a
    /// part, the model's metadata is not kept twice: the part's header holds it, and
    /// only the model's tensor table and hashes are kept.
    pub fn keep_beside(&self, path: &Path) -> std::io::Result<()> {
        let Some((len, mtime)) = Self::stamp(path) else {
            return Err(std::io::Error::other("the file has no length or time"));
        };
        let is_part = {
            let file = std::fs::File::open(path)?;
            // SAFETY: a read-only map of a file we do not modify.
            let map = unsafe { memmap2::Mmap::map(&file) }?;
            Gguf::read_header(&map)
                .map(|g| g.metadata.contains_key(PART_OF_KEY))
                .unwrap_or(false)
        };
        let kept = if is_part {
            let whole = self.table().map_err(std::io::Error::other)?;
            Kept::Part {
                len,
                mtime,
                n_tensors: whole.tensors.len() as u64,
                table: self.header[whole.table_bytes.clone()].to_vec(),
                header_len: self.header.len() as u64,
                chunk_bytes: self.chunk_bytes,
                tensors: self.tensors.clone(),
            }
        } else {
            Kept::Whole {
                len,
                mtime,
                manifest: self.encode(),
            }
        };
        let bytes = bincode::serde::encode_to_vec(&kept, bincode_config())
            .map_err(std::io::Error::other)?;
        // Written aside and renamed: a reader never sees half a manifest.
        let target = Self::sidecar(path);
        let mut part = target.clone().into_os_string();
        part.push(format!(".part-{}", std::process::id()));
        std::fs::write(&part, bytes)?;
        std::fs::rename(&part, &target)
    }

    /// The manifest as bytes (what peers exchange and the id hashes).
    pub fn encode(&self) -> Vec<u8> {
        // A manifest is built from a header and hashes within the limit: encoding an
        // in-memory value of plain fields cannot fail below it.
        bincode::serde::encode_to_vec(self, bincode_config()).unwrap_or_default()
    }

    /// Decodes a manifest and checks that its parts agree: the header reads as GGUF and
    /// its tensor table is exactly the hashed tensors, each with the right number of
    /// chunks for its size.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let (m, used): (Manifest, usize) =
            bincode::serde::decode_from_slice(bytes, bincode_config())
                .map_err(|e| ManifestError::Invalid(e.to_string()))?;
        if used != bytes.len() {
            return Err(ManifestError::Invalid("bytes after the manifest".into()));
        }
        if m.chunk_bytes == 0 || m.chunk_bytes > 1 << 30 {
            return Err(ManifestError::Invalid(format!(
                "chunks of {} bytes",
                m.chunk_bytes
            )));
        }
        let gguf = m.table()?;
        if gguf.tensors.len() != m.tensors.len() {
            return Err(ManifestError::Invalid(format!(
                "{} tensors in the header, {} hashed",
                gguf.tensors.len(),
                m.tensors.len()
            )));
        }
        for (i, t) in m.tensors.iter().enumerate() {
            if i > 0 && m.tensors[i - 1].name >= t.name {
                return Err(ManifestError::Invalid("tensors out of order".into()));
            }
            let Some(entry) = gguf.tensors.get(&t.name) else {
                return Err(ManifestError::Invalid(format!(
                    "{} is hashed but not in the header",
                    t.name
                )));
            };
            let bytes = entry.ty.stored_bytes(entry.elems()) as u64;
            if t.bytes != bytes || t.hashes.len() as u64 != bytes.div_ceil(m.chunk_bytes) {
                return Err(ManifestError::Invalid(format!(
                    "{}: {} bytes in {} chunks, where the header gives {bytes} bytes",
                    t.name,
                    t.bytes,
                    t.hashes.len()
                )));
            }
        }
        Ok(m)
    }

    /// Decodes a manifest that must be model `id`'s.
    pub fn decode_for(bytes: &[u8], id: &str) -> Result<Manifest, ManifestError> {
        let m = Self::decode(bytes)?;
        let got = m.id()?;
        if got != id {
            return Err(ManifestError::WrongId {
                want: id.to_string(),
                got,
            });
        }
        Ok(m)
    }

    /// The header, read (tensor data is not part of a manifest).
    pub(crate) fn table(&self) -> Result<Gguf, ManifestError> {
        Gguf::read_header(&self.header).map_err(ManifestError::Invalid)
    }

    /// The header's bytes.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// The model's id: its name and shape, then 128 bits of the manifest's hash.
    pub fn id(&self) -> Result<String, ManifestError> {
        let gguf = self.table()?;
        let config =
            crate::file::gguf_config(&gguf).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        let hash = sha256(&self.encode());
        Ok(crate::file::id_from(&config, &hex(&hash[..16])))
    }

    /// Every tensor's hashes, sorted by name.
    pub fn tensors(&self) -> &[TensorChunks] {
        &self.tensors
    }

    /// The tensor `name`, if the model has it.
    pub fn tensor(&self, name: &str) -> Option<&TensorChunks> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Where chunk `index` of `tensor` lies in the tensor's bytes: `(start, len)`.
    pub fn chunk_range(&self, tensor: &str, index: u32) -> Result<(u64, u64), ManifestError> {
        let missing = || ManifestError::NoSuchChunk {
            tensor: tensor.to_string(),
            index,
        };
        let t = self.tensor(tensor).ok_or_else(missing)?;
        if index as usize >= t.hashes.len() {
            return Err(missing());
        }
        let start = index as u64 * self.chunk_bytes;
        Ok((start, (t.bytes - start).min(self.chunk_bytes)))
    }

    /// Checks chunk `index` of `tensor`: its length and its hash.
    pub fn check_chunk(&self, tensor: &str, index: u32, bytes: &[u8]) -> Result<(), ManifestError> {
        let (_, len) = self.chunk_range(tensor, index)?;
        if bytes.len() as u64 != len {
            return Err(ManifestError::WrongSize {
                tensor: tensor.to_string(),
                index,
                want: len,
                got: bytes.len() as u64,
            });
        }
        let t = self
            .tensor(tensor)
            .ok_or_else(|| ManifestError::NoSuchChunk {
                tensor: tensor.to_string(),
                index,
            })?;
        if sha256(bytes) != t.hashes[index as usize] {
            return Err(ManifestError::WrongHash {
                tensor: tensor.to_string(),
                index,
            });
        }
        Ok(())
    }

    /// The layout of a GGUF file holding only the tensors `names` (sorted as given) of
    /// this model, naming the model as the one it is part of.
    pub fn part_layout(&self, names: &[String]) -> Result<PartLayout, ManifestError> {
        let id = self.id()?;
        let SubsetLayout {
            header,
            offsets,
            len,
        } = self
            .table()?
            .subset_header(&self.header, names, &id)
            .map_err(ManifestError::Invalid)?;
        Ok(PartLayout {
            header,
            offsets,
            len,
        })
    }
}

/// Where things go in a file of some of a model's tensors ([`Manifest::part_layout`]).
#[derive(Debug, Clone)]
pub struct PartLayout {
    /// The file's first bytes, up to its tensor data.
    pub header: Vec<u8>,
    /// Where each tensor's data starts in the file.
    pub offsets: std::collections::HashMap<String, u64>,
    /// The file's length.
    pub len: u64,
}
