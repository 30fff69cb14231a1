//! Opening model files: GGUF, or a Hugging Face directory of config.json + safetensors.
//!
//! Opening reads only the header (metadata and the tensor table); weights are read on
//! demand, tensor by tensor, from a memory map, so a [`crate::Span`] touches only the
//! pages of its own blocks. Tensor names follow GGUF's convention (`blk.3.attn_q.weight`)
//! everywhere in this crate and are translated for safetensors.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::config::{Arch, Experts, HfConfig, Latent, ModelConfig, SlidingWindow, Yarn};
use crate::error::candle_message;
use crate::gguf::{Gguf, TensorEntry, TensorType};
use crate::kernels::{QFormat, QMatrix};
use crate::kquants::{BlockRows, SuperMatrix};
use crate::manifest::Manifest;
use crate::{Result, ShardError};

/// How the weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// A single GGUF file (quantised or not).
    Gguf,
    /// A Hugging Face directory: config.json and one or more .safetensors files.
    Safetensors,
}

enum Inner {
    Gguf {
        /// The whole file, mapped; tensors are copied out of it one by one.
        mmap: memmap2::Mmap,
        gguf: Gguf,
        /// For a file of part of a model's tensors (fetched from the swarm): the whole
        /// model's manifest, and its table (read once), which gives the model's sizes.
        part_of: Option<PartOf>,
    },
    Safetensors {
        st: candle_core::safetensors::MmapedSafetensors,
        /// Names present in the checkpoint, for tied-embedding detection.
        names: std::collections::HashSet<String>,
    },
}

/// The model a file of some of its tensors is part of.
struct PartOf {
    manifest: Arc<Manifest>,
    /// The whole model's tensor table, from the manifest's header.
    tensors: HashMap<String, TensorEntry>,
}

/// An opened model: its shape, its id, and access to its tensors.
pub struct ModelFile {
    path: PathBuf,
    config: ModelConfig,
    /// A GGUF file's id comes from its manifest, computed on first use (it reads the
    /// whole file once; see [`crate::manifest`]).
    id: std::sync::OnceLock<String>,
    /// A whole GGUF file's manifest, once computed or read.
    manifest: std::sync::OnceLock<Arc<Manifest>>,
    inner: Inner,
    /// Compute 16-bit checkpoints in this type whatever the device (see
    /// [`ModelFile::with_compute_dtype`]).
    dtype_override: Option<DType>,
}

/// A linear layer: a (possibly quantised) weight and an optional bias.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

#[derive(Clone, Debug)]
enum Weight {
    /// Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 and the 4-bit table types on the CPU: our own
    /// kernels ([`crate::kernels`]).
    Packed(Arc<QMatrix>),
    /// K-quants on the CPU ([`crate::kquants`]): Q4_K, Q5_K and Q6_K on our own kernels,
    /// Q2_K and Q3_K on candle's block dot products, over weights held once.
    Blocks(Arc<dyn BlockRows>),
    /// Everything else (other GGUF formats, dense safetensors, GPU devices): candle.
    Candle(QMatMul),
}

impl Linear {
    /// A layer over an already loaded quantised tensor.
    pub(crate) fn packed(weight: Arc<QMatrix>) -> Self {
        Self {
            weight: Weight::Packed(weight),
            bias: None,
        }
    }

    /// One layer computing all of `parts` (which read the same input) side by side, when
    /// they all run on our kernels in one format; `None` otherwise.
    pub(crate) fn stack(parts: &[&Linear]) -> Option<Linear> {
        let bias = match parts.iter().filter(|p| p.bias.is_some()).count() {
            0 => None,
            n if n == parts.len() => {
                let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
                Some(Tensor::cat(&biases, 0).ok()?)
            }
            _ => return None,
        };
        let packed: Option<Vec<&QMatrix>> = parts
            .iter()
            .map(|p| match &p.weight {
                Weight::Packed(q) => Some(q.as_ref()),
                Weight::Blocks(_) | Weight::Candle(_) => None,
            })
            .collect();
        let weight = match packed {
            Some(weights) => Weight::Packed(Arc::new(QMatrix::stack(&weights)?)),
            None => {
                let weights: Vec<&SuperMatrix> = parts
                    .iter()
                    .map(|p| match &p.weight {
                        Weight::Blocks(b) => b.as_super(),
                        Weight::Packed(_) | Weight::Candle(_) => None,
                    })
                    .collect::<Option<_>>()?;
                Weight::Blocks(Arc::new(SuperMatrix::stack(&weights)?))
            }
        };
        Some(Linear { weight, bias })
    }

    /// The same layer with a bias added to its output.
    pub(crate) fn with_bias(self, bias: Tensor) -> Linear {
        Linear {
            bias: Some(bias),
            ..self
        }
    }

    /// True when each row of a product comes out the same whatever other rows share the
    /// product (our kernels); candle's dense matmul blocks many rows differently.
    pub(crate) fn is_row_exact(&self) -> bool {
        matches!(self.weight, Weight::Packed(_) | Weight::Blocks(_))
    }

    /// Output width.
    pub(crate) fn out_features(&self) -> candle_core::Result<usize> {
        match &self.weight {
            Weight::Packed(q) => Ok(q.rows()),
            Weight::Blocks(b) => Ok(b.rows()),
            Weight::Candle(QMatMul::QTensor(q)) => Ok(q.shape().dims2()?.0),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => Ok(t.dims2()?.0),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Weight::Packed(q) => rows_forward(x, q.cols(), q.rows(), |x, m| q.matmul(x, m))?,
            Weight::Blocks(b) => {
                let cols = x.dims().last().copied().unwrap_or(0);
                rows_forward(x, cols, b.rows(), |x, m| b.matmul(x, m))?
            }
            Weight::Candle(w) => w.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x · Wᵀ` over the last dimension of `x` (which must be `cols` wide) by `product`
/// (`[m, cols]` rows in, `[m, rows]` out), reading `x` in place on the CPU.
fn rows_forward(
    x: &Tensor,
    cols: usize,
    rows: usize,
    product: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = dims.last().copied().unwrap_or(0);
    if k != cols {
        candle_core::bail!("linear layer of width {cols} fed {:?}", x.dims());
    }
    let m = x.elem_count() / k.max(1);
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("our quantised kernels run on the CPU only");
        };
        let all = cpu.as_slice::<f32>()?;
        product(&all[layout.start_offset()..][..m * k], m)
    };
    if let Some(last) = dims.last_mut() {
        *last = rows;
    }
    Tensor::from_vec(y, dims, x.device())
}

/// The weight of a GGUF matrix from its stored bytes (`dims`: rows, columns). On the
/// CPU the 4-bit table types (IQ4_NL, IQ4_XS, MXFP4) run on [`QFormat::Table4`], at
/// their own size; elsewhere, or where that cannot hold them, they load widened (see
/// [`qtensor_from_bytes`]).
fn gguf_weight(
    ty: crate::gguf::TensorType,
    bytes: &[u8],
    dims: Vec<usize>,
    device: &Device,
) -> Result<Weight> {
    if let (crate::gguf::TensorType::Widened(w), true, &[rows, cols]) =
        (ty, device.is_cpu(), dims.as_slice())
    {
        if let Some((blocks, table)) = crate::gguf::to_table4(w, bytes) {
            if let Some(m) = QMatrix::from_blocks(QFormat::Table4(table), &blocks, rows, cols) {
                return Ok(Weight::Packed(Arc::new(m)));
            }
        }
    }
    cpu_weight(qtensor_from_bytes(ty, bytes, dims, device)?, device)
}

/// The weight for a quantised matrix on `device`: our kernels or K-quant blocks on the
/// CPU where they take its type, else candle's product.
fn cpu_weight(q: QTensor, device: &Device) -> Result<Weight> {
    if device.is_cpu() {
        if let Some(packed) = QMatrix::from_qtensor(&q) {
            return Ok(Weight::Packed(Arc::new(packed)));
        }
        if let Some(blocks) = crate::kquants::from_qtensor(&q) {
            return Ok(Weight::Blocks(blocks));
        }
    }
    Ok(Weight::Candle(QMatMul::from_qtensor(q)?))
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("path", &self.path)
            .field("id", &self.id)
            .field("config", &self.config)
            .finish()
    }
}

impl ModelFile {
    /// Makes a safetensors checkpoint's dense weights load in `dtype` on any device
    /// (normally: f32 on the CPU, their own 16-bit type on a GPU, see
    /// [`crate::device::compute_dtype`]). For checking on a CPU the numerics a GPU
    /// will run; GGUF files are unaffected.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.dtype_override = Some(dtype);
        self
    }

    /// Opens a GGUF file or a Hugging Face model directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|source| ShardError::Open {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            Self::open_hf_dir(path)
        } else {
            Self::open_gguf(path)
        }
    }

    /// A tensor this file does not hold: not in the model, or in a part of it held
    /// elsewhere.
    fn missing(&self, name: &str) -> ShardError {
        let reason = match &self.inner {
            Inner::Gguf {
                part_of: Some(_), ..
            } if self.has(name) => {
                format!("tensor {name} is not in this file, which holds part of the model")
            }
            _ => format!("no tensor {name}"),
        };
        Self::bad(&self.path, reason)
    }

    fn bad(path: &Path, reason: impl Into<String>) -> ShardError {
        ShardError::BadModel {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn open_gguf(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|source| ShardError::Open {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; a file truncated underneath us would raise SIGBUS,
        // the usual caveat of mapping model files, accepted by every engine that does it.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ShardError::Open {
            path: path.clone(),
            source,
        })?;
        // Reads the header and checks every tensor's type and extent before anything
        // loads.
        let gguf = Gguf::read(&mmap).map_err(|e| Self::bad(&path, e))?;
        // A file of part of a model names the model; the model's manifest beside it
        // gives the whole table (sizes, which tensors the model has) and its shape.
        let part_of = match gguf.metadata.get(crate::gguf::PART_OF_KEY) {
            Some(gguf_file::Value::String(id)) => {
                let m = Manifest::for_file(&path).map_err(|e| Self::bad(&path, e.to_string()))?;
                let got = m.id().map_err(|e| Self::bad(&path, e.to_string()))?;
                if &got != id {
                    return Err(Self::bad(
                        &path,
                        format!("part of model {id}, but the manifest beside it is model {got}'s"),
                    ));
                }
                Some((Arc::new(m), id.clone()))
            }
            _ => None,
        };
        let whole = match &part_of {
            Some((m, _)) => Some(m.table().map_err(|e| Self::bad(&path, e.to_string()))?),
            None => None,
        };
        let mut config = gguf_config(whole.as_ref().unwrap_or(&gguf)).map_err(|e| match e {
            ShardError::BadModel { reason, .. } => Self::bad(&path, reason),
            other => Self::bad(&path, other.to_string()),
        })?;
        if let Some(t) = gguf.tensors.get("rope_freqs.weight") {
            let t = gguf_qtensor(&gguf, &mmap, t, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| {
                    Self::bad(&path, format!("rope_freqs.weight: {}", candle_message(&e)))
                })?;
            config.rope_freq_factors = Some(t);
            config.validate().map_err(|e| Self::bad(&path, e))?;
        }
        let id = std::sync::OnceLock::new();
        let part_of = match (part_of, whole) {
            (Some((manifest, part_id)), Some(whole)) => {
                let _ = id.set(part_id);
                Some(PartOf {
                    manifest,
                    tensors: whole.tensors,
                })
            }
            _ => None,
        };
        Ok(ModelFile {
            path,
            config,
            id,
            manifest: std::sync::OnceLock::new(),
            inner: Inner::Gguf {
                mmap,
                gguf,
                part_of,
            },
            dtype_override: None,
        })
    }

    /// A model known only by its manifest (fetched from the swarm, no tensor held yet):
    /// its shape, id and sizes, for planning what to fetch. Loading any tensor from it
    /// is an error.
    pub fn of_manifest(manifest: Arc<Manifest>) -> Result<Self> {
        let id = manifest
            .id()
            .map_err(|e| ShardError::BadInput(e.to_string()))?;
        let path = PathBuf::from(format!("{id} (not fetched)"));
        let whole = manifest
            .table()
            .map_err(|e| Self::bad(&path, e.to_string()))?;
        let config = gguf_config(&whole)?;
        let empty = memmap2::MmapOptions::new()
            .len(1)
            .map_anon()
            .and_then(|m| m.make_read_only())
            .map_err(|source| ShardError::Open {
                path: path.clone(),
                source,
            })?;
        let part_of = PartOf {
            manifest,
            tensors: whole.tensors,
        };
        let held = Gguf {
            metadata: whole.metadata,
            tensors: HashMap::new(),
            data_offset: 0,
            version: whole.version,
            kv: whole.kv,
            table_bytes: 0..0,
            alignment: whole.alignment,
        };
        Ok(ModelFile {
            path,
            config,
            id: std::sync::OnceLock::from(id),
            manifest: std::sync::OnceLock::new(),
            inner: Inner::Gguf {
                mmap: empty,
                gguf: held,
                part_of: Some(part_of),
            },
            dtype_override: None,
        })
    }

    fn open_hf_dir(path: PathBuf) -> Result<Self> {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| Self::bad(&path, format!("cannot read config.json ({e})")))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| Self::bad(&path, format!("config.json: {e}")))?;
        let mut config = hf.to_config().map_err(|e| Self::bad(&path, e))?;
        config.validate().map_err(|e| Self::bad(&path, e))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
            .map_err(|source| ShardError::Open {
                path: path.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Self::bad(&path, "no .safetensors file in the directory"));
        }
        // SAFETY: read-only maps of files we do not modify (see open_gguf).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| Self::bad(&path, format!("unreadable safetensors ({e})")))?;
        let mut table: Vec<String> = st
            .tensors()
            .iter()
            .map(|(n, v)| format!("{n}:{:?}:{:?}", v.shape(), v.dtype()))
            .collect();
        table.sort();
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        if config.name.is_empty() {
            config.name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        let id = std::sync::OnceLock::from(id_from(&config, &format!("{:016x}", fnv1a(&table))));
        Ok(ModelFile {
            path,
            config,
            id,
            manifest: std::sync::OnceLock::new(),
            inner: Inner::Safetensors { st, names },
            dtype_override: None,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// A short id that names this exact model (shape and tensor table): servers and
    /// clients must agree on it to work together.
    pub fn id(&self) -> &str {
        self.id.get_or_init(|| match self.manifest() {
            Ok(m) => m.id().unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: no model id from its manifest: {e}",
                    self.path.display()
                );
                String::new()
            }),
            Err(e) => {
                tracing::warn!("{}: no manifest: {e}", self.path.display());
                String::new()
            }
        })
    }

    /// The model's manifest (GGUF files only): for a whole file, kept beside it or
    /// computed from it (reading it all once); for a part of a model, the model's.
    pub fn manifest(&self) -> Result<Arc<Manifest>> {
        match &self.inner {
            Inner::Gguf {
                part_of: Some(p), ..
            } => Ok(p.manifest.clone()),
            Inner::Gguf { .. } => {
                if let Some(m) = self.manifest.get() {
                    return Ok(m.clone());
                }
                let m = Arc::new(
                    Manifest::for_file(&self.path)
                        .map_err(|e| Self::bad(&self.path, e.to_string()))?,
                );
                Ok(self.manifest.get_or_init(|| m).clone())
            }
            Inner::Safetensors { .. } => Err(Self::bad(
                &self.path,
                "only GGUF files have a manifest (weights are shared from GGUF files)",
            )),
        }
    }

    /// The names of the model's tensors this file holds (all of them for a whole file).
    pub fn held_tensors(&self) -> Vec<String> {
        match &self.inner {
            Inner::Gguf { gguf, .. } => gguf.tensors.keys().cloned().collect(),
            Inner::Safetensors { names, .. } => names.iter().cloned().collect(),
        }
    }

    /// The stored bytes of tensor `name`, if this file holds it (GGUF files only).
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        match &self.inner {
            Inner::Gguf { mmap, gguf, .. } => gguf.tensors.get(name).map(|t| gguf.data(mmap, t)),
            Inner::Safetensors { .. } => None,
        }
    }

    /// The whole model's tensor table: the file's own, or for a part its model's.
    fn table(&self) -> Option<&HashMap<String, TensorEntry>> {
        match &self.inner {
            Inner::Gguf {
                part_of: Some(p), ..
            } => Some(&p.tensors),
            Inner::Gguf { gguf, .. } => Some(&gguf.tensors),
            Inner::Safetensors { .. } => None,
        }
    }

    /// Path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Storage format.
    pub fn format(&self) -> WeightFormat {
        match self.inner {
            Inner::Gguf { .. } => WeightFormat::Gguf,
            Inner::Safetensors { .. } => WeightFormat::Safetensors,
        }
    }

    /// GGUF metadata, for the tokenizer and chat template; `None` for safetensors.
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match &self.inner {
            Inner::Gguf { gguf, .. } => Some(&gguf.metadata),
            Inner::Safetensors { .. } => None,
        }
    }

    /// Bytes the weights of block `i` take once loaded (quantised size for GGUF, f32 for
    /// safetensors, which are widened on load).
    pub fn block_bytes(&self, i: usize) -> u64 {
        self.weighed_block_bytes(i, |_| (1, 1))
    }

    /// Bytes of block `i`'s weights one token reads: every tensor but the experts, and
    /// of the experts only the share a token uses (`used / count`). What a decode step
    /// costs, where [`ModelFile::block_bytes`] is what holding the block costs.
    pub fn block_active_bytes(&self, i: usize) -> u64 {
        let share = match &self.config.experts {
            Some(e) => (e.used as u64, e.count as u64),
            None => (1, 1),
        };
        self.weighed_block_bytes(i, |name| {
            if name.contains("_exps.") {
                share
            } else {
                (1, 1)
            }
        })
    }

    /// Weights of the whole model, and those one token computes with (all but the
    /// experts it does not use): `(total, active)`.
    pub fn params(&self) -> (u64, u64) {
        let sizes: Vec<(String, u64)> = match &self.inner {
            Inner::Gguf { .. } => self
                .table()
                .into_iter()
                .flatten()
                .map(|(n, t)| (n.clone(), t.elems() as u64))
                .collect(),
            Inner::Safetensors { st, .. } => st
                .tensors()
                .into_iter()
                .map(|(n, v)| (n, v.shape().iter().product::<usize>() as u64))
                .collect(),
        };
        let total = sizes.iter().map(|(_, n)| n).sum();
        let active = match &self.config.experts {
            None => total,
            Some(e) => sizes
                .iter()
                .map(|(name, n)| {
                    if name.contains("_exps.") {
                        n * e.used as u64 / e.count as u64
                    } else {
                        *n
                    }
                })
                .sum(),
        };
        (total, active)
    }

    /// Bytes of block `i`'s tensors, each counted for the fraction `share(name)` gives
    /// (numerator, denominator).
    fn weighed_block_bytes(&self, i: usize, share: impl Fn(&str) -> (u64, u64)) -> u64 {
        let sizes: Vec<(String, u64)> = match &self.inner {
            Inner::Gguf { .. } => {
                let prefix = format!("blk.{i}.");
                self.table()
                    .into_iter()
                    .flatten()
                    .filter(|(n, _)| n.starts_with(&prefix))
                    .map(|(n, t)| (n.clone(), t.ty.loaded_bytes(t.elems()) as u64))
                    .collect()
            }
            Inner::Safetensors { st, .. } => {
                let prefix = format!("model.layers.{i}.");
                st.tensors()
                    .into_iter()
                    .filter(|(n, _)| n.starts_with(&prefix))
                    .map(|(n, v)| (n, v.shape().iter().product::<usize>() as u64 * 4))
                    .collect()
            }
        };
        sizes
            .iter()
            .map(|(name, bytes)| {
                let (num, den) = share(name);
                bytes * num / den
            })
            .sum()
    }

    /// Drops the mapped file pages this process touched while copying tensors out, so
    /// they stop counting as this process's resident memory (the copies are what the
    /// model uses; the kernel keeps the file cached for others).
    pub fn release_pages(&self) {
        if let Inner::Gguf { mmap, .. } = &self.inner {
            // SAFETY: the map is private and read-only; after DONTNEED a later read sees
            // the file's bytes again, which is all this crate ever reads from it.
            let _ = unsafe { mmap.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// True when the file holds a tensor of this (GGUF-style) name.
    pub(crate) fn has(&self, name: &str) -> bool {
        match &self.inner {
            Inner::Gguf { .. } => self.table().is_some_and(|t| t.contains_key(name)),
            Inner::Safetensors { names, .. } => names.contains(&hf_name(name)),
        }
    }

    /// Loads a tensor as a quantised tensor (GGUF) or converts it to one holding f32
    /// (safetensors), for matmuls and embeddings.
    pub(crate) fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        match &self.inner {
            Inner::Gguf { mmap, gguf, .. } => {
                let t = gguf.tensors.get(name).ok_or_else(|| self.missing(name))?;
                gguf_qtensor(gguf, mmap, t, device).map_err(|e| {
                    Self::bad(&self.path, format!("tensor {name}: {}", candle_message(&e)))
                })
            }
            Inner::Safetensors { .. } => {
                let t = self.dense(name, device)?;
                Ok(QTensor::quantize(
                    &t,
                    candle_core::quantized::GgmlDType::F32,
                )?)
            }
        }
    }

    /// Loads a tensor as dense f32.
    pub(crate) fn dense(&self, name: &str, device: &Device) -> Result<Tensor> {
        match &self.inner {
            Inner::Gguf { .. } => Ok(self.qtensor(name, device)?.dequantize(device)?),
            Inner::Safetensors { st, .. } => {
                let hf = hf_name(name);
                // On the CPU bf16 and f16 are widened to f32: candle has no fast bf16
                // CPU kernel (DESIGN.md), and f32 keeps a span equal to the one-process
                // result. A GPU keeps them as they are.
                let t = st
                    .load(&hf, device)
                    .map_err(|e| Self::bad(&self.path, format!("tensor {hf}: {e}")))?;
                let want = self
                    .dtype_override
                    .unwrap_or_else(|| crate::device::compute_dtype(device, t.dtype()));
                Ok(t.to_dtype(want)?)
            }
        }
    }

    /// Loads a linear layer `name.weight` (+ `name.bias` if `bias`).
    pub(crate) fn linear(&self, name: &str, bias: bool, device: &Device) -> Result<Linear> {
        let weight = match &self.inner {
            Inner::Gguf { mmap, gguf, .. } => {
                let full = format!("{name}.weight");
                let t = gguf.tensors.get(&full).ok_or_else(|| self.missing(&full))?;
                gguf_weight(t.ty, gguf.data(mmap, t), t.dims.clone(), device)
                    .map_err(|e| Self::bad(&self.path, format!("tensor {full}: {e}")))?
            }
            Inner::Safetensors { .. } => Weight::Candle(QMatMul::Tensor(
                self.dense(&format!("{name}.weight"), device)?,
            )),
        };
        let bias = if bias {
            Some(self.dense(&format!("{name}.bias"), device)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Loads the experts of a stacked expert tensor (`blk.N.ffn_up_exps`: GGUF shape
    /// `[experts, out, in]`), one linear layer each. Each expert is cut straight out of
    /// the mapped file, so the stack is never held whole beside its parts.
    pub(crate) fn experts(&self, name: &str, device: &Device) -> Result<Vec<Linear>> {
        let name = format!("{name}.weight");
        let Inner::Gguf { mmap, gguf, .. } = &self.inner else {
            return Err(Self::bad(
                &self.path,
                format!("{name}: experts load from GGUF files only"),
            ));
        };
        let info = gguf.tensors.get(&name).ok_or_else(|| self.missing(&name))?;
        let &[count, rows, cols] = info.dims.as_slice() else {
            return Err(Self::bad(
                &self.path,
                format!("{name} has shape {:?}, not [experts, out, in]", info.dims),
            ));
        };
        let per = info.ty.stored_bytes(rows * cols);
        let all = gguf.data(mmap, info);
        (0..count)
            .map(|e| {
                let bytes = &all[e * per..(e + 1) * per];
                Ok(Linear {
                    weight: gguf_weight(info.ty, bytes, vec![rows, cols], device)?,
                    bias: None,
                })
            })
            .collect()
    }

    /// Loads a linear layer from an already loaded quantised tensor (tied embeddings).
    pub(crate) fn linear_from(q: Arc<QTensor>) -> Result<Linear> {
        Ok(Linear {
            weight: Weight::Candle(QMatMul::from_arc(q)?),
            bias: None,
        })
    }
}

/// Translates a GGUF tensor name (`blk.3.attn_q.weight`) to its Hugging Face checkpoint
/// name (`model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return gguf.to_string();
    };
    let (module, suffix) = tail.rsplit_once('.').unwrap_or((tail, ""));
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => other,
    };
    format!("model.layers.{layer}.{hf_module}.{suffix}")
}

/// Tensor `t` of a GGUF file, as candle holds it (widened types as Q8_0).
fn gguf_qtensor(
    gguf: &Gguf,
    file: &[u8],
    t: &TensorEntry,
    device: &Device,
) -> candle_core::Result<QTensor> {
    qtensor_from_bytes(t.ty, gguf.data(file, t), t.dims.clone(), device)
}

/// A tensor of `dims` from its stored bytes. Widened types become Q8_0, or f32 where
/// Q8_0's f16 scales cannot hold theirs.
fn qtensor_from_bytes(
    ty: TensorType,
    bytes: &[u8],
    dims: Vec<usize>,
    device: &Device,
) -> candle_core::Result<QTensor> {
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    match ty {
        TensorType::Candle(d) => qtensor_from_ggml(d, bytes, dims, device),
        TensorType::Widened(w) => match crate::gguf::widen_to_q8_0(w, bytes) {
            Some(q8) => qtensor_from_ggml(GgmlDType::Q8_0, &q8, dims, device),
            None => {
                let values = crate::gguf::dequantize_widened(w, bytes);
                let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                qtensor_from_ggml(GgmlDType::F32, &raw, dims, device)
            }
        },
    }
}

pub(crate) fn gguf_config(gguf: &Gguf) -> Result<ModelConfig> {
    let md = &gguf.metadata;
    let bad = |reason: String| ShardError::BadModel {
        path: PathBuf::new(),
        reason,
    };
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad("no general.architecture in the GGUF metadata".into()))?;
    let Some(arch) = Arch::from_gguf_name(&arch_name) else {
        return Err(ShardError::UnsupportedArch { arch: arch_name });
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let get_u = |k: &str| -> Result<usize> {
        md.get(&key(k))
            .ok_or_else(|| bad(format!("GGUF metadata lacks {}", key(k))))?
            .to_u64()
            .map(|v| v as usize)
            .or_else(|_| {
                md[&key(k)]
                    .to_u32()
                    .map(|v| v as usize)
                    .map_err(|e| bad(format!("{}: {e}", key(k))))
            })
    };
    let get_f = |k: &str, default: f32| -> f32 {
        md.get(&key(k))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(default)
    };
    // GLM-4.5 counts its multi-token-prediction blocks among the blocks; generation
    // runs the others (llama.cpp does the same).
    let n_layers = get_u("block_count")? - get_u("nextn_predict_layers").unwrap_or(0);
    let hidden = get_u("embedding_length")?;
    let n_heads = get_u("attention.head_count")?;
    let mut n_kv_heads = get_u("attention.head_count_kv").unwrap_or(n_heads);
    let mut head_dim = get_u("attention.key_length")
        .or_else(|_| get_u("rope.dimension_count"))
        .unwrap_or(hidden / n_heads.max(1));
    // DeepSeek's latent attention. Files converted for llama.cpp's MLA path give the
    // query head's width as key_length_mla (key_length is then the cached row's,
    // compressed vector and rope key); older ones give it as key_length. Either way
    // one compressed vector per token is cached here.
    let latent = if arch == Arch::DeepSeek2 {
        let mla = get_u("attention.key_length_mla").unwrap_or(0) > 0
            && get_u("attention.value_length_mla").unwrap_or(0) > 0;
        let (k, v) = if mla {
            (
                get_u("attention.key_length_mla")?,
                get_u("attention.value_length_mla")?,
            )
        } else {
            (head_dim, get_u("attention.value_length")?)
        };
        let rope = get_u("rope.dimension_count")?;
        head_dim = k;
        n_kv_heads = 1;
        Some(Latent {
            q_lora: get_u("attention.q_lora_rank").unwrap_or(0),
            kv_lora: get_u("attention.kv_lora_rank")?,
            nope: k.saturating_sub(rope),
            v,
        })
    } else {
        None
    };
    // DeepSeek files without leading dense blocks may leave the dense width out.
    let ffn = match get_u("feed_forward_length") {
        Err(_) if arch == Arch::DeepSeek2 => 0,
        other => other?,
    };
    let vocab = match gguf.tensors.get("token_embd.weight") {
        Some(info) => info.dims.first().copied().unwrap_or(0),
        None => return Err(bad("no token_embd.weight tensor".into())),
    };
    // Experts: Mixtral (`llama`) and Qwen3-MoE name their count and how many each token
    // uses; Qwen3-MoE gives an expert's width apart from the (unused) dense one.
    let experts = match get_u("expert_count") {
        Ok(count) if count > 0 => Some(Experts {
            count,
            used: get_u("expert_used_count")?,
            ffn: get_u("expert_feed_forward_length").unwrap_or(ffn),
            // Mixtral and Qwen3-MoE renormalise; gpt-oss's softmax over the chosen
            // logits alone is the same; GLM-4.5 says.
            normalize: md
                .get(&key("expert_weights_norm"))
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(arch != Arch::DeepSeek2),
            // llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID is 2; GLM-4.5 defaults to it.
            sigmoid: match md
                .get(&key("expert_gating_func"))
                .and_then(|v| v.to_u32().ok())
            {
                Some(f) => f == 2,
                None => arch == Arch::Glm4Moe,
            },
            // 0 (or absent) means no scaling, as in llama.cpp.
            scale: Some(get_f("expert_weights_scale", 0.0))
                .filter(|&s| s != 0.0)
                .unwrap_or(1.0),
            shared: get_u("expert_shared_count").unwrap_or(0),
            groups: get_u("expert_group_count").unwrap_or(0),
            groups_used: get_u("expert_group_used_count").unwrap_or(0),
        }),
        _ => None,
    };
    let name = md
        .get("general.name")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| arch_name.clone());
    // Gemma: which layers attend over a window, and how scores are scaled and capped
    // (llama.cpp's hparams for LLM_ARCH_GEMMA2 / GEMMA3: the 27B models scale by
    // width / heads, the others by the head width).
    let sliding_window = match arch {
        Arch::Gemma2 | Arch::Gemma3 | Arch::GptOss => Some(SlidingWindow {
            size: get_u("attention.sliding_window")?,
            pattern: if arch == Arch::Gemma3 { 6 } else { 2 },
            local_rope_theta: (arch == Arch::Gemma3).then_some(10_000.0),
        }),
        _ => None,
    };
    let cap = |k: &str| md.get(&key(k)).and_then(|v| v.to_f32().ok());
    let scaling = md
        .get(&key("rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    let rope_scale = match scaling {
        Some("linear") => get_f("rope.scaling.factor", 1.0),
        _ => 1.0,
    };
    let factor = get_f("rope.scaling.factor", 1.0);
    let yarn = match scaling {
        // DeepSeek: llama.cpp ignores the file's betas, and cancels the rope's
        // magnitude correction (the attention scale carries it, below).
        Some("yarn") if arch == Arch::DeepSeek2 => Some(Yarn {
            factor,
            original_context: get_u("rope.scaling.original_context_length")
                .or_else(|_| get_u("context_length"))?,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attn_factor: 1.0 / (1.0 + 0.1 * factor.ln()),
        }),
        Some("yarn") => Some(Yarn {
            factor,
            original_context: get_u("rope.scaling.original_context_length")?,
            beta_fast: get_f("rope.scaling.yarn_beta_fast", 32.0),
            beta_slow: get_f("rope.scaling.yarn_beta_slow", 1.0),
            attn_factor: 1.0,
        }),
        _ => None,
    };
    let attn_scale = match arch {
        Arch::Gemma2 | Arch::Gemma3 => {
            let is_27b = n_layers == if arch == Arch::Gemma2 { 46 } else { 62 };
            let width = if is_27b {
                hidden / n_heads.max(1)
            } else {
                head_dim
            };
            Some(1.0 / (width as f32).sqrt())
        }
        // DeepSeek: 1/sqrt(query head) times YaRN's attention factor squared, whose
        // log multiplier the file stores divided by 10 (llama.cpp's deepseek2 graph).
        Arch::DeepSeek2 => {
            let log_mul = get_f("rope.scaling.yarn_log_multiplier", 0.0) / 0.1;
            let mscale = match &yarn {
                Some(y) if y.factor > 1.0 => 1.0 + 0.1 * log_mul * y.factor.ln(),
                _ => 1.0,
            };
            Some(mscale * mscale / (head_dim as f32).sqrt())
        }
        _ => None,
    };
    if arch == Arch::Phi3 && gguf.tensors.contains_key("rope_factors_long.weight") {
        return Err(bad(
            "this Phi-3 file uses LongRoPE (rope_factors_long), which this version does not run"
                .into(),
        ));
    }
    let config = ModelConfig {
        arch,
        name,
        n_layers,
        hidden,
        ffn,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab,
        rope_theta: get_f("rope.freq_base", 10_000.0),
        rope_style: arch.gguf_rope_style(),
        // Llama 3.1 files carry these as a tensor; open_gguf reads it.
        rope_freq_factors: None,
        rms_eps: get_f("attention.layer_norm_rms_epsilon", 1e-5) as f64,
        max_seq_len: get_u("context_length").unwrap_or(4096),
        qkv_bias: gguf.tensors.contains_key("blk.0.attn_q.bias"),
        experts,
        sliding_window,
        attn_scale,
        attn_softcap: cap("attn_logit_softcapping").filter(|_| arch == Arch::Gemma2),
        final_softcap: cap("final_logit_softcapping").filter(|_| arch == Arch::Gemma2),
        rope_scale,
        yarn,
        attn_sinks: gguf.tensors.contains_key("blk.0.attn_sinks.weight"),
        attn_output_bias: gguf.tensors.contains_key("blk.0.attn_output.bias"),
        rope_dims: get_u("rope.dimension_count")
            .unwrap_or(head_dim)
            .min(head_dim),
        latent,
    };
    config.validate().map_err(bad)?;
    Ok(config)
}

/// FNV-1a over the lines of a sorted tensor table (names, shapes, types): a
/// Hugging Face directory's id (GGUF files are named by their manifest's hash).
fn fnv1a(table: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for line in table {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A model id: the model's name and shape for people, then `hash`, which names the
/// exact bytes (a manifest's hash; see [`crate::manifest`]).
pub(crate) fn id_from(config: &ModelConfig, hash: &str) -> String {
    let slug: String = config
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{}-{}x{}-{hash}",
        slug.trim_matches('-'),
        config.n_layers,
        config.hidden
    )
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn maps_gguf_names_to_hf() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight"),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias"),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight"),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
    }
}
