//! The client side of a model: token embeddings in, final norm and LM head out.
//!
//! It loads three tensors and no block. When the file has no `output.weight`, the LM head
//! is the embedding matrix itself (tied embeddings, as in SmolLM2), shared, not copied.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::file::{Linear, ModelFile, WeightFormat};
use crate::kernels::QMatrix;
use crate::{ModelConfig, Result, ShardError};

enum Embedding {
    /// GGUF in a format our kernels run: rows are dequantised on lookup, and a tied LM
    /// head computes on the same bytes.
    Packed(Arc<QMatrix>),
    /// Other GGUF formats: rows are dequantised on lookup, the matrix stays quantised.
    Quantized(Arc<QTensor>),
    /// Safetensors: a dense f32 matrix.
    Dense(Tensor),
}

/// Embeddings, final norm and LM head.
pub struct Head {
    embedding: Embedding,
    norm: Tensor,
    lm_head: Linear,
    config: ModelConfig,
    device: Device,
}

impl Head {
    /// Loads the client-side tensors of `file`.
    pub fn load(file: &ModelFile, device: &Device) -> Result<Head> {
        let config = file.config().clone();
        // Gemma 2 always ties its LM head to the embeddings, as llama.cpp does.
        let tied = !file.has("output.weight") || config.arch == crate::Arch::Gemma2;
        let (embedding, lm_head) = match file.format() {
            WeightFormat::Gguf => {
                let q = file.qtensor("token_embd.weight", device)?;
                let packed = QMatrix::from_qtensor(&q).filter(|_| device.is_cpu());
                let (embedding, tied_head) = match packed {
                    Some(p) => {
                        let p = Arc::new(p);
                        (Embedding::Packed(p.clone()), Linear::packed(p))
                    }
                    None => {
                        let q = Arc::new(q);
                        (Embedding::Quantized(q.clone()), ModelFile::linear_from(q)?)
                    }
                };
                let head = if tied {
                    tied_head
                } else {
                    file.linear("output", false, device)?
                };
                (embedding, head)
            }
            WeightFormat::Safetensors => {
                let e = file.dense("token_embd.weight", device)?;
                let head = if tied {
                    ModelFile::linear_from(Arc::new(QTensor::quantize(
                        &e,
                        candle_core::quantized::GgmlDType::F32,
                    )?))?
                } else {
                    file.linear("output", false, device)?
                };
                (Embedding::Dense(e), head)
            }
        };
        Ok(Head {
            embedding,
            norm: file.dense("output_norm.weight", device)?,
            lm_head,
            config,
            device: device.clone(),
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Hidden states `[ids.len(), hidden]` for the given token ids.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab) {
            return Err(ShardError::BadInput(format!(
                "token id {bad} outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        let t = || Tensor::new(ids, &self.device);
        let rows = match &self.embedding {
            Embedding::Packed(q) => {
                let hidden = q.cols();
                let mut rows = vec![0f32; ids.len() * hidden];
                for (&id, row) in ids.iter().zip(rows.chunks_exact_mut(hidden)) {
                    q.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(rows, (ids.len(), hidden), &self.device)?
            }
            Embedding::Quantized(q) => q.embedding(&t()?)?,
            Embedding::Dense(e) => e.index_select(&t()?, 0)?,
        };
        // Gemma scales its embeddings by sqrt(width) (llama.cpp does it in f32 too).
        Ok(if self.config.arch.gemma() {
            (rows * (self.config.hidden as f64).sqrt())?
        } else {
            rows
        })
    }

    /// Logits `[tokens, vocab]` for every row of `hidden` (`[tokens, hidden]`).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // Hidden states from a span on a GPU (a local generation there) come to the
        // head's device first; on the same device this is a cheap clone.
        let hidden = hidden.to_device(&self.device)?;
        crate::kernels::on_pool(|| {
            let h = candle_nn::ops::rms_norm(&hidden, &self.norm, self.config.rms_eps as f32)?;
            let logits = self.lm_head.forward(&h)?;
            // Gemma 2 soft-caps its logits: cap * tanh(logits / cap).
            Ok(match self.config.final_softcap {
                Some(c) => ((logits / c as f64)?.tanh()? * c as f64)?,
                None => logits,
            })
        })
    }

    /// Logits of the last row of `hidden`, as a vector.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let n = hidden.dim(0)?;
        if n == 0 {
            return Err(ShardError::BadInput("no hidden states".into()));
        }
        let last = hidden.narrow(0, n - 1, 1)?;
        Ok(self.logits(&last)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
