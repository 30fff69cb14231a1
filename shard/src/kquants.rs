//! Products with K-quant weights (Q2_K to Q6_K) on the CPU, over weights held once.
//!
//! Q4_K, Q5_K and Q6_K, the types of today's most common downloads, run on kernels of
//! our own ([`SuperMatrix`]): repacked at load into octets in lanes as [`crate::kernels`]
//! does for the 32-value formats (see [`q4k_octet`], [`q6k_octet`]), each weight block
//! unpacked once for up to 4 activation rows, with the same Q8_K activations (8 bits per
//! 256 values, as ggml quantises them for these types) and integer arithmetic as ggml's
//! product, so its rows equal candle's to rounding. Q2_K and Q3_K run on candle's
//! per-block dot products (AVX2 where the CPU has it), driven here: each output one
//! block dot of one weight row and one activation row. Either way a row comes out the
//! same whatever other rows share the product, and work is split over weight rows on
//! [`crate::kernels::pool`].
//!
//! Not candle's own product: for these types it repacks a Q4_K matrix (and, for batches
//! of rows, a Q6_K one) into tiles the first time it is used, and keeps the tiles beside
//! the original, a second copy of the weights that grows as a mixture of experts first
//! uses each expert. Measured: two nodes serving 24 of a Qwen3-30B-A3B Q4_K_M file's 48
//! blocks each, with `--memory-budget 10.75G`, peaked at 12.1 GB and 11.3 GB resident
//! after 32 tokens, over the budget, and growing as more experts were touched.

use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ2K, BlockQ3K, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use crate::kernels::{LANES, OCTET};

/// A matrix of quantised rows whose product with f32 activations this module computes.
pub(crate) trait BlockRows: Send + Sync + std::fmt::Debug {
    /// Output features.
    fn rows(&self) -> usize;
    /// `x` (`[m, cols]` row-major) times the matrix transposed: `[m, rows]` row-major.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32>;
    /// This matrix as one on our own kernels, where it is one (to stack it with others).
    fn as_super(&self) -> Option<&SuperMatrix> {
        None
    }
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
        GgmlDType::Q4K => SuperMatrix::from_bytes(Super::Q4K, &bytes, rows, cols)
            .map(|m| Arc::new(m) as Arc<dyn BlockRows>),
        GgmlDType::Q5K => SuperMatrix::from_bytes(Super::Q5K, &bytes, rows, cols)
            .map(|m| Arc::new(m) as Arc<dyn BlockRows>),
        GgmlDType::Q6K => SuperMatrix::from_bytes(Super::Q6K, &bytes, rows, cols)
            .map(|m| Arc::new(m) as Arc<dyn BlockRows>),
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

/// Values per super-block of the K-quants.
pub(crate) const QK_K: usize = 256;
/// Values per Q4_K sub-block (one scale and one min each).
const SUB: usize = 32;
/// Bytes of one GGUF Q4_K block: d, dmin (f16), 12 bytes of 6-bit scales and mins, 128
/// bytes of nibbles.
const Q4K_BLOCK: usize = 2 + 2 + 12 + QK_K / 2;

/// Where each part of a Q4_K or Q5_K (`five`) octet block starts. Per 64 values `g`, one
/// stretch: the 8 rows' nibbles in lanes (as [`crate::kernels`] lays out 32-value
/// blocks), 8 vectors `v` whose bytes `4i..4i+4` are row `i`'s GGUF bytes `32g + 4v..`
/// (low nibbles: values `64g + 4v..`, sub-block `2g`; high ones `64g + 32 + 4v..`,
/// sub-block `2g + 1`); for Q5_K the two sub-blocks' fifth bits, a vector each, laid out
/// as Q5_0's (byte `4i + t`, bit `k`: row `i`'s value `4k + t` of the sub-block); then
/// the two sub-blocks' 8 scales, then their 8 mins. After the 4 stretches, 8 d and 8
/// dmin. A product reads the block front to back, one stream (the scales apart from the
/// nibbles cost a cache miss each: measured 3x slower on Q6_K's equivalent).
pub(crate) mod q4k_octet {
    use super::{LANES, OCTET, QK_K};
    /// Bytes of one 64-value stretch.
    const fn stretch(five: bool) -> usize {
        OCTET * 32 + if five { 2 * LANES } else { 0 } + 4 * OCTET
    }
    /// Where stretch `g` (values `64g..64g + 64`) starts: its nibbles.
    pub(crate) const fn group(five: bool, g: usize) -> usize {
        g * stretch(five)
    }
    /// Q5_K: the fifth bits of stretch `g`'s sub-block `2g + h`.
    pub(crate) const fn fifth(g: usize, h: usize) -> usize {
        group(true, g) + OCTET * 32 + h * LANES
    }
    /// Sub-block `j`'s 8 rows' 6-bit scales, one byte each.
    pub(crate) const fn scales(five: bool, j: usize) -> usize {
        group(five, j / 2) + OCTET * 32 + if five { 2 * LANES } else { 0 } + (j % 2) * OCTET
    }
    /// Sub-block `j`'s 8 rows' 6-bit mins.
    pub(crate) const fn mins(five: bool, j: usize) -> usize {
        scales(five, j) + 2 * OCTET
    }
    /// 8 f16 super-block scales.
    pub(crate) const fn d(five: bool) -> usize {
        group(five, QK_K / 64)
    }
    /// 8 f16 super-block min scales.
    pub(crate) const fn dmin(five: bool) -> usize {
        d(five) + 2 * OCTET
    }
    /// Bytes of one octet block.
    pub(crate) const fn bytes(five: bool) -> usize {
        dmin(five) + 2 * OCTET
    }
}

/// Bytes of one GGUF Q5_K block: Q4_K's, with 32 bytes of fifth bits before the nibbles.
const Q5K_BLOCK: usize = Q4K_BLOCK + QK_K / 8;

/// Bytes of one GGUF Q6_K block: 128 bytes of low nibbles, 64 of high bit pairs, 16
/// signed 8-bit scales (one per 16 values), f16 d.
const Q6K_BLOCK: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// Where each part of a Q6_K octet block starts. Per 32 values `n`, one stretch: the 8
/// rows' low nibbles in lanes, 4 vectors `v` whose byte `4i + t` holds row `i`'s value
/// `32n + 4v + t` (low nibble) and `32n + 16 + 4v + t` (high); their high bit pairs, 2
/// vectors `h` whose byte `4i + t` holds the pairs of values `32n + 16h + 4k + t` for `k`
/// in 0..4 (bits `2k`, `2k + 1`); then the two 16-value sub-blocks' 8 scales. After the 8
/// stretches, 8 f16 d. Read front to back, one stream (see [`q4k_octet`]).
pub(crate) mod q6k_octet {
    use super::{OCTET, QK_K};
    /// Bytes of one 32-value stretch.
    const UNIT: usize = OCTET * 16 + OCTET * 8 + 2 * OCTET;
    /// Where stretch `n` (values `32n..32n + 32`) starts: its nibbles.
    pub(crate) const fn unit(n: usize) -> usize {
        n * UNIT
    }
    /// Stretch `n`'s high bit pairs vector `h`.
    pub(crate) const fn high(n: usize, h: usize) -> usize {
        unit(n) + OCTET * 16 + h * 32
    }
    /// The 8 rows' signed scales of 16-value sub-block `g`.
    pub(crate) const fn scales(g: usize) -> usize {
        unit(g / 2) + OCTET * 24 + (g % 2) * OCTET
    }
    /// 8 f16 super-block scales.
    pub(crate) const D: usize = unit(QK_K / 32);
    /// Bytes of one octet block.
    pub(crate) const BYTES: usize = D + 2 * OCTET;
}

/// Where row `i`'s byte of Q4_K/Q5_K value `v` lies in an octet block, whether the value
/// is its high nibble, and (Q5_K) where its fifth bit lies (byte and bit).
fn q4k_at(five: bool, i: usize, v: usize) -> (usize, bool, (usize, u32)) {
    let (g, w) = (v / 64, v % 64);
    let l = w % 32;
    let t = 4 * i + l % 4;
    (
        q4k_octet::group(five, g) + (l / 4) * LANES + t,
        w >= 32,
        (q4k_octet::fifth(g, w / 32) + t, (l / 4) as u32),
    )
}

/// Where row `i`'s low nibble of Q6_K value `v` lies in an octet block (and whether it is
/// the high nibble of its byte), and where its bit pair lies (byte and shift).
fn q6k_at(i: usize, v: usize) -> ((usize, bool), (usize, u32)) {
    let (n, w) = (v / 32, v % 32);
    let (h, l) = (w / 16, w % 16);
    let t = 4 * i + l % 4;
    (
        (q6k_octet::unit(n) + (l / 4) * LANES + t, h == 1),
        (q6k_octet::high(n, h) + t, 2 * (l / 4) as u32),
    )
}

/// Sub-block `j`'s 6-bit scale and min from a Q4_K/Q5_K block's 12 packed bytes.
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The super-block types with kernels of our own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Super {
    /// Q4_K (see [`q4k_octet`]).
    Q4K,
    /// Q5_K (see [`q4k_octet`]).
    Q5K,
    /// Q6_K (see [`q6k_octet`]).
    Q6K,
}

impl Super {
    /// Bytes of one GGUF block.
    fn block_bytes(self) -> usize {
        match self {
            Super::Q4K => Q4K_BLOCK,
            Super::Q5K => Q5K_BLOCK,
            Super::Q6K => Q6K_BLOCK,
        }
    }

    /// Bytes of one octet block.
    pub(crate) fn octet_bytes(self) -> usize {
        match self {
            Super::Q4K => q4k_octet::bytes(false),
            Super::Q5K => q4k_octet::bytes(true),
            Super::Q6K => q6k_octet::BYTES,
        }
    }

    /// Whether values have a fifth bit (Q5_K).
    pub(crate) fn five(self) -> bool {
        self == Super::Q5K
    }
}

/// A Q4_K, Q5_K or Q6_K matrix `[rows, cols]` repacked into octets (see [`q4k_octet`],
/// [`q6k_octet`]); rows past `rows` in the last octet are zero.
#[derive(Debug)]
pub(crate) struct SuperMatrix {
    kind: Super,
    rows: usize,
    cols: usize,
    pub(crate) data: Vec<u8>,
}

impl SuperMatrix {
    pub(crate) fn from_bytes(kind: Super, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let bb = kind.block_bytes();
        if cols == 0 || !cols.is_multiple_of(QK_K) || bytes.len() != rows * cols / QK_K * bb {
            return None;
        }
        let nb = cols / QK_K;
        let ob = kind.octet_bytes();
        let mut data = vec![0u8; rows.div_ceil(OCTET) * nb * ob];
        for row in 0..rows {
            let (o, i) = (row / OCTET, row % OCTET);
            for b in 0..nb {
                let src = &bytes[(row * nb + b) * bb..][..bb];
                let dst = &mut data[(o * nb + b) * ob..][..ob];
                match kind {
                    Super::Q4K | Super::Q5K => {
                        // GGUF: d, dmin, 12 bytes of scales and mins, (Q5_K: 32 bytes of
                        // fifth bits), 128 bytes of nibbles.
                        let five = kind.five();
                        let qs = &src[bb - QK_K / 2..];
                        for (j, &q) in qs.iter().enumerate() {
                            // Byte j holds values 64(j/32) + j%32 and 32 above.
                            let (at, _, _) = q4k_at(five, i, 64 * (j / 32) + j % 32);
                            dst[at] = q;
                        }
                        if five {
                            let qh = &src[16..48];
                            for v in 0..QK_K {
                                let (g, h, l) = (v / 64, v % 64 / 32, v % 32);
                                if qh[l] >> (2 * g + h) & 1 == 1 {
                                    let (_, _, (at, bit)) = q4k_at(five, i, v);
                                    dst[at] |= 1 << bit;
                                }
                            }
                        }
                        for j in 0..QK_K / SUB {
                            let (sc, m) = scale_min(j, &src[4..16]);
                            dst[q4k_octet::scales(five, j) + i] = sc;
                            dst[q4k_octet::mins(five, j) + i] = m;
                        }
                        dst[q4k_octet::d(five) + 2 * i..][..2].copy_from_slice(&src[..2]);
                        dst[q4k_octet::dmin(five) + 2 * i..][..2].copy_from_slice(&src[2..4]);
                    }
                    Super::Q6K => {
                        // GGUF: ql[128], qh[64], scales[16] (i8), d (f16).
                        let (ql, qh) = (&src[..128], &src[128..192]);
                        for v in 0..QK_K {
                            let q = q6(ql, qh, v);
                            let ((at, high), (bits, shift)) = q6k_at(i, v);
                            dst[at] |= if high { (q & 0x0F) << 4 } else { q & 0x0F };
                            dst[bits] |= (q >> 4) << shift;
                        }
                        for g in 0..QK_K / 16 {
                            dst[q6k_octet::scales(g) + i] = src[192 + g];
                        }
                        dst[q6k_octet::D + 2 * i..][..2].copy_from_slice(&src[208..210]);
                    }
                }
            }
        }
        Some(Self {
            kind,
            rows,
            cols,
            data,
        })
    }

    /// Stacks matrices that read the same input (gate and up; q, k and v) into one, so
    /// one product (and one quantising of the input) serves them all. `None` when their
    /// types or widths differ, or when a part other than the last does not fill its
    /// octets.
    pub(crate) fn stack(parts: &[&SuperMatrix]) -> Option<Self> {
        let parts: Vec<_> = parts
            .iter()
            .map(|p| (p.kind, p.rows, p.cols, &p.data[..]))
            .collect();
        let (kind, rows, cols, data) = crate::kernels::stack_octets(&parts)?;
        Some(Self {
            kind,
            rows,
            cols,
            data,
        })
    }

    /// The portable kernel: row `row` by activation row `r`, the arithmetic of the
    /// vector kernels one value at a time.
    pub(crate) fn scalar_product(&self, row: usize, xk: &Q8KRows, r: usize) -> f32 {
        let nb = self.cols / QK_K;
        let ob = self.kind.octet_bytes();
        let (o, i) = (row / OCTET, row % OCTET);
        let mut acc = 0f32;
        for b in 0..nb {
            let c = &self.data[(o * nb + b) * ob..][..ob];
            let at = r * nb + b;
            let x = &xk.qs[at * QK_K..][..QK_K];
            acc = match self.kind {
                Super::Q4K | Super::Q5K => {
                    let five = self.kind.five();
                    let (mut isum, mut msum) = (0i32, 0i32);
                    for j in 0..QK_K / SUB {
                        let dot: i32 = (j * SUB..(j + 1) * SUB)
                            .map(|v| {
                                let (at, high, (fat, bit)) = q4k_at(five, i, v);
                                let mut q = if high { c[at] >> 4 } else { c[at] & 0x0F };
                                if five {
                                    q |= (c[fat] >> bit & 1) << 4;
                                }
                                i32::from(q) * i32::from(x[v])
                            })
                            .sum();
                        isum += i32::from(c[q4k_octet::scales(five, j) + i]) * dot;
                        let sum32 = xk.bsums[at * 16 + 2 * j] + xk.bsums[at * 16 + 2 * j + 1];
                        msum += i32::from(c[q4k_octet::mins(five, j) + i]) * sum32;
                    }
                    let d = f16_at(c, q4k_octet::d(five) + 2 * i) * xk.d[at];
                    let dmin = f16_at(c, q4k_octet::dmin(five) + 2 * i) * xk.d[at];
                    (-dmin).mul_add(msum as f32, d.mul_add(isum as f32, acc))
                }
                Super::Q6K => {
                    let mut isum = 0i32;
                    for g in 0..QK_K / 16 {
                        let sc = i32::from(c[q6k_octet::scales(g) + i] as i8);
                        let dot: i32 = (16 * g..16 * (g + 1))
                            .map(|v| {
                                let ((at, high), (bits, shift)) = q6k_at(i, v);
                                let low = if high { c[at] >> 4 } else { c[at] & 0x0F };
                                let q = low | ((c[bits] >> shift) & 3) << 4;
                                i32::from(q) * i32::from(x[v])
                            })
                            .sum();
                        isum += sc * (dot - 32 * xk.bsums[at * 16 + g]);
                    }
                    (f16_at(c, q6k_octet::D + 2 * i) * xk.d[at]).mul_add(isum as f32, acc)
                }
            };
        }
        acc
    }

    /// Octet `o`'s 8 rows by every activation row, into `out` (`[m, 8]`).
    pub(crate) fn octet_products(&self, o: usize, xk: &Q8KRows, out: &mut [f32]) {
        let nb = self.cols / QK_K;
        let ob = self.kind.octet_bytes();
        let octet = &self.data[o * nb * ob..(o + 1) * nb * ob];
        if crate::kernels::super_products(self.kind, octet, xk, out) {
            return;
        }
        for i in 0..OCTET {
            let row = o * OCTET + i;
            for r in 0..xk.m {
                out[r * OCTET + i] = if row < self.rows {
                    self.scalar_product(row, xk, r)
                } else {
                    0.0
                };
            }
        }
    }
}

/// Value `v` (0..256) of a Q6_K block as an unsigned 6-bit integer (32 above its signed
/// value), from its low nibbles `ql` and high bit pairs `qh` in GGUF's order: per half
/// of 128 values, `ql[l]` holds values `l` (low) and `l + 64` (high), `ql[l + 32]`
/// values `l + 32` and `l + 96`, and `qh[l]` the high pairs of those four, in that order.
fn q6(ql: &[u8], qh: &[u8], v: usize) -> u8 {
    let (half, w) = (v / 128, v % 128);
    let (k, l) = (w / 32, w % 32);
    let lo = ql[64 * half + l + 32 * (k % 2)];
    let nibble = if k < 2 { lo & 0x0F } else { lo >> 4 };
    let high = (qh[32 * half + l] >> (2 * k)) & 3;
    nibble | (high << 4)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl BlockRows for SuperMatrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn as_super(&self) -> Option<&SuperMatrix> {
        Some(self)
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let xk = Q8KRows::quantise(x, m, self.cols);
        crate::kernels::octets_matmul(self.rows, m, |o, out| self.octet_products(o, &xk, out))
    }
}

/// Activation rows quantised as ggml's Q8_K (and candle's, whose rounding this copies):
/// per 256 values an f32 scale and 256 signed bytes, `x ≈ d * q`.
pub(crate) struct Q8KRows {
    /// Rows.
    pub(crate) m: usize,
    /// Super-blocks per row.
    pub(crate) nb: usize,
    /// `[m, cols]` quantised values.
    pub(crate) qs: Vec<i8>,
    /// `[m, nb]` scales.
    pub(crate) d: Vec<f32>,
    /// `[m, nb, 16]` sums of each 16 quantised values (ggml's `bsums`: for Q4_K's mins
    /// and Q6_K's offset of 32).
    pub(crate) bsums: Vec<i32>,
}

impl Q8KRows {
    pub(crate) fn quantise(x: &[f32], m: usize, cols: usize) -> Self {
        let nb = cols / QK_K;
        let mut qs = vec![0i8; m * cols];
        let mut d = Vec::with_capacity(m * nb);
        let mut bsums = Vec::with_capacity(m * nb * 16);
        let blocks = x.chunks_exact(QK_K).zip(qs.chunks_exact_mut(QK_K));
        crate::kernels::with_vector_isa(
            #[inline(always)]
            || {
                for (xb, qb) in blocks {
                    let (mut max, mut amax) = (0f32, 0f32);
                    for &v in xb {
                        if amax < v.abs() {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    if amax == 0.0 {
                        d.push(0.0);
                    } else {
                        let iscale = -127.0 / max;
                        for (q, &v) in qb.iter_mut().zip(xb) {
                            *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
                        }
                        d.push(1.0 / iscale);
                    }
                    for s in qb.chunks_exact(16) {
                        bsums.push(s.iter().map(|&q| i32::from(q)).sum());
                    }
                }
            },
        );
        Self {
            m,
            nb,
            qs,
            d,
            bsums,
        }
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
            for m in [1, 5, 8] {
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
                // Each row comes out the same alone as in a batch (tiles of 4, 2, 1).
                let last = &xs[(m - 1) * cols..];
                assert_eq!(ours.matmul(last, 1), y[(m - 1) * rows..], "{dtype:?} m={m}");
            }
        }
    }

    /// Stacked super-block matrices give each part's product side by side, and refuse
    /// parts they cannot stack.
    #[test]
    fn stacked_matrices_give_the_concatenated_product() {
        let d = Device::Cpu;
        let cols = 512;
        let quantised = |rows: usize, dtype: GgmlDType| {
            let w = Tensor::randn(0f32, 0.05, (rows, cols), &d).expect("w");
            let bytes = QTensor::quantize(&w, dtype)
                .expect("q")
                .data()
                .expect("b")
                .to_vec();
            let kind = if dtype == GgmlDType::Q4K {
                Super::Q4K
            } else {
                Super::Q6K
            };
            SuperMatrix::from_bytes(kind, &bytes, rows, cols).expect("repacks")
        };
        let (a, b) = (quantised(40, GgmlDType::Q4K), quantised(20, GgmlDType::Q4K));
        let both = SuperMatrix::stack(&[&a, &b]).expect("same type and width");
        let x: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let (got, ya, yb) = (both.matmul(&x, 2), a.matmul(&x, 2), b.matmul(&x, 2));
        for r in 0..2 {
            assert_eq!(&got[r * 60..r * 60 + 40], &ya[r * 40..(r + 1) * 40]);
            assert_eq!(&got[r * 60 + 40..(r + 1) * 60], &yb[r * 20..(r + 1) * 20]);
        }
        let q6 = quantised(40, GgmlDType::Q6K);
        assert!(SuperMatrix::stack(&[&a, &q6]).is_none(), "types differ");
        assert!(
            SuperMatrix::stack(&[&b, &a]).is_none(),
            "20 rows do not fill octets"
        );
    }

    /// Q4_K's and Q6_K's kernels: the portable one, AVX2 and the best this CPU has give
    /// the same rows (the integers are the same; only the last float operations may
    /// round apart), for every octet including a ragged last one.
    #[test]
    fn super_block_kernels_agree() {
        let d = Device::Cpu;
        let (rows, cols) = (75, 768);
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &d).expect("w");
        for (dtype, kind) in [
            (GgmlDType::Q4K, Super::Q4K),
            (GgmlDType::Q5K, Super::Q5K),
            (GgmlDType::Q6K, Super::Q6K),
        ] {
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let bytes = q.data().expect("bytes");
            let mat = SuperMatrix::from_bytes(kind, &bytes, rows, cols).expect("repacks");
            for m in [1, 3] {
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                    .collect();
                let xk = Q8KRows::quantise(&x, m, cols);
                for o in 0..rows.div_ceil(OCTET) {
                    let mut fast = vec![0f32; OCTET * m];
                    mat.octet_products(o, &xk, &mut fast);
                    for i in 0..OCTET {
                        let row = o * OCTET + i;
                        for r in 0..m {
                            let want = if row < rows {
                                mat.scalar_product(row, &xk, r)
                            } else {
                                0.0
                            };
                            let got = fast[r * OCTET + i];
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{kind:?} octet {o} row {i} x {r}: {got} vs {want}"
                            );
                        }
                    }
                    crate::kernels::check_super_levels_agree(kind, &mat.data, o, &xk, &fast);
                }
            }
        }
    }
}
