//! Products with K-quant weights (Q2_K to Q6_K) on the CPU: candle's per-block dot
//! products (AVX2 where the CPU has it), driven here, over weights held once.
//!
//! candle 0.11's own product for these types repacks a Q4_K matrix (and, for batches of
//! rows, a Q6_K one) into tiles the first time it is used, and keeps the tiles beside the
//! original: a second copy of the weights that grows as a mixture of experts first uses
//! each expert. Measured: two nodes serving 24 of a Qwen3-30B-A3B Q4_K_M file's 48 blocks
//! each, with `--memory-budget 10.75G`, peaked at 12.1 GB and 11.3 GB resident after 32
//! tokens, over the budget, and growing as more experts were touched. Here a matrix is
//! one `Vec` of candle's block type, built from the file's bytes at load.
//!
//! Activations are quantised per row as ggml does for these types (Q8_K: 8 bits per 256
//! values), and each output is one block dot product of one weight row and one
//! activation row, so a row comes out the same whatever other rows share the product.
//! Work is split over chunks of weight rows on [`crate::kernels::pool`].

use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

/// A matrix of quantised rows whose product with f32 activations this module computes.
pub(crate) trait BlockRows: Send + Sync + std::fmt::Debug {
    /// Output features.
    fn rows(&self) -> usize;
    /// `x` (`[m, cols]` row-major) times the matrix transposed: `[m, rows]` row-major.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32>;
}

/// A row-major matrix of blocks of type `T`.
#[derive(Debug)]
struct Blocks<T> {
    blocks: Vec<T>,
    rows: usize,
    cols: usize,
}

/// The matrix of a 2-D K-quant tensor, or `None` for other types and shapes.
pub(crate) fn from_qtensor(q: &QTensor) -> Option<Arc<dyn BlockRows>> {
    let (rows, cols) = q.shape().dims2().ok()?;
    let bytes = q.data().ok()?;
    match q.dtype() {
        GgmlDType::Q2K => Blocks::<BlockQ2K>::from_bytes(&bytes, rows, cols),
        GgmlDType::Q3K => Blocks::<BlockQ3K>::from_bytes(&bytes, rows, cols),
        GgmlDType::Q4K => Blocks::<BlockQ4K>::from_bytes(&bytes, rows, cols),
        GgmlDType::Q5K => Blocks::<BlockQ5K>::from_bytes(&bytes, rows, cols),
        GgmlDType::Q6K => Blocks::<BlockQ6K>::from_bytes(&bytes, rows, cols),
        _ => None,
    }
}

impl<T: GgmlType + std::fmt::Debug + 'static> Blocks<T> {
    fn from_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Arc<dyn BlockRows>> {
        if cols == 0 || !cols.is_multiple_of(T::BLCK_SIZE) {
            return None;
        }
        let n = rows * cols / T::BLCK_SIZE;
        if bytes.len() != n * std::mem::size_of::<T>() {
            return None;
        }
        let mut blocks = vec![T::zeros(); n];
        // SAFETY: candle's block types are `#[repr(C)]` structs of integers and f16s
        // whose size it asserts equals ggml's block (any bytes are a valid value), and
        // `blocks` holds exactly `bytes.len()` bytes of them.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                blocks.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
        }
        Some(Arc::new(Blocks { blocks, rows, cols }))
    }
}

/// Weight rows one task computes.
const CHUNK: usize = 32;

impl<T: GgmlType + std::fmt::Debug + 'static> BlockRows for Blocks<T> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let per_row = self.cols / T::BLCK_SIZE;
        let per_x = self.cols / T::VecDotType::BLCK_SIZE;
        let mut xq = vec![T::VecDotType::zeros(); m * per_x];
        for (row, q) in x.chunks_exact(self.cols).zip(xq.chunks_exact_mut(per_x)) {
            T::VecDotType::from_float(row, q);
        }
        // Each task: its chunk of weight rows against every activation row, `[m, chunk]`.
        let parts: Vec<Vec<f32>> = crate::kernels::pool().install(|| {
            self.blocks
                .par_chunks(per_row * CHUNK)
                .map(|weights| {
                    let mut out = Vec::with_capacity(m * weights.len() / per_row);
                    for xr in xq.chunks_exact(per_x) {
                        for w in weights.chunks_exact(per_row) {
                            out.push(T::vec_dot(self.cols, w, xr));
                        }
                    }
                    out
                })
                .collect()
        });
        let mut y = vec![0f32; m * self.rows];
        for (c, part) in parts.iter().enumerate() {
            let width = part.len() / m.max(1);
            for (i, values) in part.chunks_exact(width.max(1)).enumerate() {
                y[i * self.rows + c * CHUNK..][..width].copy_from_slice(values);
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    /// The same numbers as candle's own product (ggml's arithmetic: Q8_K activations),
    /// for every K-quant and a ragged last chunk of rows, one row or several.
    #[test]
    fn equals_candles_product() {
        let d = Device::Cpu;
        for dtype in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            for m in [1, 5] {
                let (rows, cols) = (72, 512);
                let w = Tensor::randn(0f32, 0.05, (rows, cols), &d).expect("w");
                let x = Tensor::randn(0f32, 1.0, (m, cols), &d).expect("x");
                let q = QTensor::quantize(&w, dtype).expect("quantize");
                let ours = from_qtensor(&q).expect("K-quant");
                let xs = x.flatten_all().expect("x").to_vec1::<f32>().expect("x");
                let y = ours.matmul(&xs, m);
                let theirs = candle_core::quantized::QMatMul::from_qtensor(q)
                    .expect("qmatmul")
                    .forward(&x)
                    .expect("forward")
                    .flatten_all()
                    .expect("y")
                    .to_vec1::<f32>()
                    .expect("y");
                let worst = y
                    .iter()
                    .zip(&theirs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{dtype:?} m={m}: off by {worst}");
            }
        }
    }
}
