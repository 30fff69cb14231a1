//! Quantised matrix products on the CPU: the hot path of every block.
//!
//! candle 0.11 runs Q4_1 (the default model's format) through a scalar loop, and it runs
//! every quantised product on a thread pool whose workers spin for 25,000 rounds after
//! each product, which steals the cores from the other servers of a swarm sharing a
//! machine (measured in issue 5: 70% of a local decode went to candle's scalar
//! `vec_dot_unopt`). These kernels take over for the GGUF formats we meet most (Q4_0,
//! Q4_1, Q8_0). Activations are quantised to 8 bits per 32-value block (as ggml's
//! Q8_0/Q8_1) and each block product runs in integer arithmetic: AVX-VNNI (`vpdpbusd`)
//! or AVX2 (`maddubs`) where the CPU has them, plain Rust elsewhere.
//!
//! Weights are repacked at load into *octets*: for each group of 8 rows and each block,
//! the 8 rows' quants side by side, then their 8 f16 scales (and, for Q4_1, 8 mins). A
//! product then unpacks two rows' nibbles per instruction, reduces the 8 rows' integer
//! dot products into one vector, and applies 8 scales with one vector multiply, where
//! GGUF's row-major layout needs a scalar conversion, broadcast and multiply per row and
//! block. Every row is computed the same way whatever the other rows of the product
//! are, so a session's numbers do not depend on whom it is batched with.
//! Work is split over octets on a [rayon] pool whose idle workers sleep instead of
//! spinning (`SHOAL_THREADS` sets its size; default: every core).

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantisation block, in every format here.
const QK: usize = 32;

/// Rows packed together.
const OCTET: usize = 8;

/// A GGUF block format these kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QFormat {
    /// f16 scale, 32 unsigned nibbles; value = d * (q - 8).
    Q4_0,
    /// f16 scale, f16 min, 32 unsigned nibbles; value = d * q + m.
    Q4_1,
    /// f16 scale, 32 signed bytes; value = d * q.
    Q8_0,
}

impl QFormat {
    fn from_ggml(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one GGUF block of 32 values.
    const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 2 + QK / 2,
            Self::Q4_1 => 4 + QK / 2,
            Self::Q8_0 => 2 + QK,
        }
    }

    /// Bytes of one block's quants.
    const fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => QK / 2,
            Self::Q8_0 => QK,
        }
    }

    /// Where the quants start in a GGUF block (after the scale, and Q4_1's min).
    const fn quant_offset(self) -> usize {
        self.block_bytes() - self.quant_bytes()
    }

    /// Bytes of one block of an octet: 8 rows' quants, 8 scales, (Q4_1) 8 mins.
    const fn octet_bytes(self) -> usize {
        OCTET * self.block_bytes()
    }
}

/// Threads the products use: `SHOAL_THREADS`, else every core.
pub fn threads() -> usize {
    std::env::var("SHOAL_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The pool the products run on, of [`threads`] threads.
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads())
            .thread_name(|i| format!("shoal-math-{i}"))
            .build()
            .unwrap_or_else(|_| {
                // Only fails when the OS refuses threads; one thread is still correct.
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread pool")
            })
    })
}

/// Runs `f` on the pool, so the products inside it hand work to the other threads
/// without first waking one to take the whole call over (once per forward, not per
/// product).
pub fn on_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        pool().install(f)
    }
}

/// A weight matrix `[rows, cols]` in a GGUF block format, repacked into octets (see the
/// module documentation); rows past `rows` in the last octet are zero.
#[derive(Clone)]
pub(crate) struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {}x{})", self.format, self.rows, self.cols)
    }
}

/// One row's block in an octet: its scale, its offset term per unit of activation sum
/// (`-8 d` for Q4_0, the min for Q4_1, 0 for Q8_0) and its quants.
struct RowBlock<'a> {
    d: f32,
    offset: f32,
    qs: &'a [u8],
}

impl QMatrix {
    /// Takes a 2-d quantised tensor in a format these kernels run; `None` otherwise.
    pub(crate) fn from_qtensor(q: &QTensor) -> Option<Self> {
        let format = QFormat::from_ggml(q.dtype())?;
        let (rows, cols) = q.shape().dims2().ok()?;
        if cols % QK != 0 || rows == 0 {
            return None;
        }
        let raw = q.data().ok()?;
        let kb = cols / QK;
        let bb = format.block_bytes();
        if raw.len() != rows * kb * bb {
            return None;
        }
        let (qb, qo, ob) = (
            format.quant_bytes(),
            format.quant_offset(),
            format.octet_bytes(),
        );
        let mut data = vec![0u8; rows.div_ceil(OCTET) * kb * ob];
        for row in 0..rows {
            let (o, i) = (row / OCTET, row % OCTET);
            for b in 0..kb {
                let src = &raw[(row * kb + b) * bb..][..bb];
                let dst = &mut data[(o * kb + b) * ob..][..ob];
                dst[i * qb..(i + 1) * qb].copy_from_slice(&src[qo..]);
                let scales = OCTET * qb;
                dst[scales + 2 * i..scales + 2 * i + 2].copy_from_slice(&src[..2]);
                if format == QFormat::Q4_1 {
                    let mins = scales + 2 * OCTET;
                    dst[mins + 2 * i..mins + 2 * i + 2].copy_from_slice(&src[2..4]);
                }
            }
        }
        Some(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    /// Stacks matrices that read the same input (q, k and v; gate and up) into one, so
    /// one product serves them all. `None` when their formats or widths differ, or when
    /// a part other than the last does not fill its octets.
    pub(crate) fn stack(parts: &[&QMatrix]) -> Option<Self> {
        let (first, rest) = parts.split_first()?;
        let n = parts.len();
        if rest
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols)
            || parts[..n - 1].iter().any(|p| p.rows % OCTET != 0)
        {
            return None;
        }
        Some(Self {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        })
    }

    /// Output width.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Row `row`'s block `b`.
    fn row_block(&self, row: usize, b: usize) -> RowBlock<'_> {
        let f = self.format;
        let (qb, ob, kb) = (f.quant_bytes(), f.octet_bytes(), self.cols / QK);
        let (o, i) = (row / OCTET, row % OCTET);
        let chunk = &self.data[(o * kb + b) * ob..][..ob];
        let scales = OCTET * qb;
        let d = f16_le(chunk, scales + 2 * i);
        let offset = match f {
            QFormat::Q4_0 => -8.0 * d,
            QFormat::Q4_1 => f16_le(chunk, scales + 2 * OCTET + 2 * i),
            QFormat::Q8_0 => 0.0,
        };
        RowBlock {
            d,
            offset,
            qs: &chunk[i * qb..(i + 1) * qb],
        }
    }

    /// Row `i` as f32 values (an embedding lookup).
    pub(crate) fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        for (b, out) in out.chunks_exact_mut(QK).enumerate() {
            let RowBlock { d, offset, qs } = self.row_block(i, b);
            match self.format {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    for (j, &q) in qs.iter().enumerate() {
                        out[j] = d * f32::from(q & 0x0F) + offset;
                        out[j + QK / 2] = d * f32::from(q >> 4) + offset;
                    }
                }
                QFormat::Q8_0 => {
                    for (o, &q) in out.iter_mut().zip(qs) {
                        *o = d * f32::from(q as i8);
                    }
                }
            }
        }
    }

    /// `x · selfᵀ` for `m` rows of `x` (`[m, cols]`, row-major): `[m, rows]`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        let xq = QRows::quantise(x, m, self.cols);
        let octets = self.rows.div_ceil(OCTET);
        // Output transposed and padded to whole octets, [octets * 8, m], so each task
        // owns one contiguous stretch.
        let mut out_t = vec![0f32; octets * OCTET * m];
        let threads = pool().current_num_threads();
        // A few tasks per thread balance the load; tiny tasks would cost more to hand out.
        let per_task = octets.div_ceil(threads * 4).max(2);
        let run = |out_t: &mut [f32]| {
            out_t
                .par_chunks_mut(per_task * OCTET * m)
                .enumerate()
                .for_each(|(t, chunk)| {
                    for (j, out) in chunk.chunks_mut(OCTET * m).enumerate() {
                        self.octet_products(t * per_task + j, &xq, out);
                    }
                });
        };
        on_pool(|| run(&mut out_t));
        let mut out = vec![0f32; m * self.rows];
        if m == 1 {
            out.copy_from_slice(&out_t[..self.rows]);
            return out;
        }
        for (i, col) in out_t.chunks_exact(m).take(self.rows).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                out[r * self.rows + i] = v;
            }
        }
        out
    }

    /// Dot products of octet `o`'s 8 rows with every row of `xq`, into `out`
    /// (`[8, m]`).
    fn octet_products(&self, o: usize, xq: &QRows, out: &mut [f32]) {
        let ob = self.format.octet_bytes();
        let octet = &self.data[o * xq.kb * ob..(o + 1) * xq.kb * ob];
        #[cfg(target_arch = "x86_64")]
        match x86_level() {
            // SAFETY (both): the CPU has the features the kernel is compiled for (checked
            // by `x86_level`); `octet` holds `kb` octet blocks and `out` 8 * m values
            // (both checked by the slicing above and by `products`).
            X86Level::Vnni => {
                unsafe { vnni_kernels::products(self.format, octet, xq, out) };
                return;
            }
            X86Level::Avx2 => {
                unsafe { avx2_kernels::products(self.format, octet, xq, out) };
                return;
            }
            X86Level::None => {}
        }
        for i in 0..OCTET {
            let row = o * OCTET + i;
            for r in 0..xq.m {
                out[i * xq.m + r] = if row < self.rows {
                    self.scalar_product(row, xq, r)
                } else {
                    0.0
                };
            }
        }
    }

    /// The portable kernel: one row by one activation row, the same arithmetic as the
    /// vector kernels (integer dot per block, then scale and offset), one value at a time.
    fn scalar_product(&self, row: usize, xq: &QRows, r: usize) -> f32 {
        let mut acc = 0f32;
        for b in 0..xq.kb {
            let RowBlock { d, offset, qs } = self.row_block(row, b);
            let at = r * xq.kb + b;
            let xb = &xq.qs[at * QK..][..QK];
            let dot: i32 = match self.format {
                QFormat::Q4_0 | QFormat::Q4_1 => qs
                    .iter()
                    .enumerate()
                    .map(|(j, &q)| {
                        i32::from(q & 0x0F) * i32::from(xb[j])
                            + i32::from(q >> 4) * i32::from(xb[j + QK / 2])
                    })
                    .sum(),
                QFormat::Q8_0 => qs
                    .iter()
                    .zip(xb)
                    .map(|(&a, &b)| i32::from(a as i8) * i32::from(b))
                    .sum(),
            };
            acc += dot as f32 * (d * xq.d[at]) + offset * xq.s[at];
        }
        acc
    }
}

/// Reads the little-endian f16 at `at`.
fn f16_le(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The best kernel set this x86 CPU runs.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum X86Level {
    None,
    Avx2,
    Vnni,
}

#[cfg(target_arch = "x86_64")]
fn x86_level() -> X86Level {
    static LEVEL: OnceLock<X86Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        let vnni = avx2 && std::is_x86_feature_detected!("avxvnni");
        // SHOAL_KERNELS=avx2 or =portable picks a lesser set, to compare or to debug.
        match std::env::var("SHOAL_KERNELS").as_deref() {
            Ok("portable") => X86Level::None,
            Ok("avx2") if avx2 => X86Level::Avx2,
            _ if vnni => X86Level::Vnni,
            _ if avx2 => X86Level::Avx2,
            _ => X86Level::None,
        }
    })
}

/// Activation rows quantised to 8 bits per block of 32: `x ≈ d * q`.
struct QRows {
    m: usize,
    /// Blocks per row.
    kb: usize,
    /// `[m, cols]` quantised values.
    qs: Vec<i8>,
    /// `[m, kb]` scales.
    d: Vec<f32>,
    /// `[m, kb]` `d * Σq`, for the formats with an offset (Q4_0's -8, Q4_1's min).
    s: Vec<f32>,
}

impl QRows {
    fn quantise(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / QK;
        let mut qs = vec![0i8; m * k];
        let mut d = Vec::with_capacity(m * kb);
        let mut s = Vec::with_capacity(m * kb);
        for (xb, qb) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                // |v * inv| <= 127, so the cast cannot saturate.
                *q = (v * inv).round() as i8;
                sum += i32::from(*q);
            }
            // ggml (and so llama.cpp and candle) keeps the scale as f16: so do we, so
            // that our products round as theirs do.
            let scale = f16::from_f32(scale).to_f32();
            d.push(scale);
            s.push(scale * sum as f32);
        }
        Self { m, kb, qs, d, s }
    }
}

/// The x86 kernels, stamped out once per instruction set: `$features` is the
/// `target_feature` list and `$dot` the 32-byte unsigned x signed dot product (eight
/// sums of four products each).
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($name:ident, $features:literal, $dot:item) => {
        mod $name {
            use std::arch::x86_64::*;

            use super::super::{QFormat, QRows, OCTET, QK};

            $dot

            /// Dot products of one octet (`kb` octet blocks) with every row of `xq`, into
            /// `out` (`[8, m]`).
            ///
            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn products(format: QFormat, octet: &[u8], xq: &QRows, out: &mut [f32]) {
                let m = xq.m;
                assert!(octet.len() >= xq.kb * format.octet_bytes());
                assert!(out.len() >= OCTET * m && xq.qs.len() >= m * xq.kb * QK);
                for r in 0..m {
                    // SAFETY: the bounds were checked above; the CPU check is the
                    // caller's.
                    let sums = unsafe {
                        match format {
                            QFormat::Q4_0 => kernel::<0>(octet.as_ptr(), xq, r),
                            QFormat::Q4_1 => kernel::<1>(octet.as_ptr(), xq, r),
                            QFormat::Q8_0 => kernel::<2>(octet.as_ptr(), xq, r),
                        }
                    };
                    for (i, v) in sums.iter().enumerate() {
                        out[i * m + r] = *v;
                    }
                }
            }

            /// Sums of the 8 lanes of each of 8 vectors, as one vector (lane i = sum of
            /// `v[i]`).
            #[inline]
            #[target_feature(enable = $features)]
            fn reduce8(v: [__m256i; 8]) -> __m256i {
                let a = _mm256_hadd_epi32(v[0], v[1]);
                let b = _mm256_hadd_epi32(v[2], v[3]);
                let c = _mm256_hadd_epi32(v[4], v[5]);
                let d = _mm256_hadd_epi32(v[6], v[7]);
                // Lane-halves: [0..3 of rows 0-3 | 4..7 of rows 0-3], and rows 4-7.
                let lo = _mm256_hadd_epi32(a, b);
                let hi = _mm256_hadd_epi32(c, d);
                let first = _mm256_permute2x128_si256(lo, hi, 0x20);
                let second = _mm256_permute2x128_si256(lo, hi, 0x31);
                _mm256_add_epi32(first, second)
            }

            /// `F`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0. One octet by activation row `r`: the
            /// 8 rows' results.
            ///
            /// # Safety
            /// The features of this module; `octet` points at `xq.kb` octet blocks of the format; row `r`
            /// exists in `xq`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn kernel<const F: u8>(octet: *const u8, xq: &QRows, r: usize) -> [f32; 8] {
                let format = match F {
                    0 => QFormat::Q4_0,
                    1 => QFormat::Q4_1,
                    _ => QFormat::Q8_0,
                };
                let (qb, ob) = (format.quant_bytes(), format.octet_bytes());
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = _mm256_setzero_ps();
                // SAFETY: every pointer stays inside the octet's `kb` blocks or inside
                // row `r` of `xq`, as the caller promised.
                unsafe {
                    for b in 0..xq.kb {
                        let c = octet.add(b * ob);
                        let at = r * xq.kb + b;
                        let x = _mm256_loadu_si256(xq.qs.as_ptr().add(at * QK).cast());
                        let mut dots = [_mm256_setzero_si256(); 8];
                        for p in 0..4 {
                            if F == 2 {
                                for j in 0..2 {
                                    let w = _mm256_loadu_si256(c.add((2 * p + j) * qb).cast());
                                    // unsigned × signed: |w| and x with w's signs.
                                    let u = _mm256_sign_epi8(w, w);
                                    dots[2 * p + j] = dot_u8_i8(u, _mm256_sign_epi8(x, w));
                                }
                            } else {
                                // Rows 2p and 2p+1: their 16 bytes of nibbles each.
                                let v = _mm256_loadu_si256(c.add(2 * p * qb).cast());
                                let lo = _mm256_and_si256(v, mask);
                                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                                let u0 = _mm256_permute2x128_si256(lo, hi, 0x20);
                                let u1 = _mm256_permute2x128_si256(lo, hi, 0x31);
                                dots[2 * p] = dot_u8_i8(u0, x);
                                dots[2 * p + 1] = dot_u8_i8(u1, x);
                            }
                        }
                        let sums = _mm256_cvtepi32_ps(reduce8(dots));
                        let scales = c.add(OCTET * qb);
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.cast()));
                        let dx = _mm256_set1_ps(*xq.d.get_unchecked(at));
                        acc = _mm256_fmadd_ps(sums, _mm256_mul_ps(d, dx), acc);
                        if F != 2 {
                            let offset = if F == 0 {
                                _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
                            } else {
                                _mm256_cvtph_ps(_mm_loadu_si128(scales.add(2 * OCTET).cast()))
                            };
                            let sx = _mm256_set1_ps(*xq.s.get_unchecked(at));
                            acc = _mm256_fmadd_ps(offset, sx, acc);
                        }
                    }
                    let mut out = [0f32; 8];
                    _mm256_storeu_ps(out.as_mut_ptr(), acc);
                    out
                }
            }
        }
    };
}

/// AVX2 + FMA + F16C: `maddubs` (pairs into i16) then `madd` (into i32). Pair sums stay
/// below i16's limit: a weight byte is at most 15 (4-bit) or 128 (|Q8_0|), an
/// activation byte at most 127 in magnitude.
#[cfg(target_arch = "x86_64")]
mod avx2_kernels {
    x86_kernels!(
        k,
        "avx2,fma,f16c",
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn dot_u8_i8(u: __m256i, x: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
        }
    );
    pub(super) use k::products;
}

/// AVX-VNNI (Zen 4 and later, Alder Lake and later): one `vpdpbusd` per 32-byte dot
/// product instead of two instructions, with no 16-bit intermediate.
#[cfg(target_arch = "x86_64")]
mod vnni_kernels {
    x86_kernels!(
        k,
        "avx2,fma,f16c,avxvnni",
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
        fn dot_u8_i8(u: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x)
        }
    );
    pub(super) use k::products;
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn packed(q: &QTensor) -> QMatrix {
        QMatrix::from_qtensor(q).expect("a format our kernels run")
    }

    /// Random weights quantised by candle, and our product against candle's dequantised
    /// f32 product (the exact answer for the quantised weights); then the portable, AVX2
    /// and best kernels against each other.
    fn check(dtype: GgmlDType, rows: usize, cols: usize, m: usize) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
        let q = QTensor::quantize(&w, dtype)?;
        let wq = q.dequantize(&dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, cols), &dev)?;
        let want = x.matmul(&wq.t()?)?;
        let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
        let mat = packed(&q);
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let got = mat.matmul(&xs, m);
        // Activations are rounded to 8 bits: the error grows like sqrt(cols).
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 0.02 * scale,
                "{dtype:?} {rows}x{cols} m={m}: element {i}: {a} vs {b} (scale {scale})"
            );
        }
        let xq = QRows::quantise(&xs, m, cols);
        for o in [0, rows.div_ceil(OCTET) - 1] {
            let mut fast = vec![0f32; OCTET * m];
            mat.octet_products(o, &xq, &mut fast);
            // The AVX2 kernel (which the VNNI one replaces where the CPU has it) gives
            // the same integer dots, so the same floats.
            #[cfg(target_arch = "x86_64")]
            if x86_level() != X86Level::None {
                let ob = mat.format.octet_bytes();
                let octet = &mat.data[o * xq.kb * ob..(o + 1) * xq.kb * ob];
                let mut avx2 = vec![0f32; OCTET * m];
                // SAFETY: the CPU has AVX2, FMA and F16C (checked).
                unsafe { avx2_kernels::products(mat.format, octet, &xq, &mut avx2) };
                assert_eq!(avx2, fast, "AVX2 and {:?} kernels differ", x86_level());
            }
            for i in 0..OCTET {
                let row = o * OCTET + i;
                for r in 0..m {
                    let (a, b) = (
                        fast[i * m + r],
                        if row < rows {
                            mat.scalar_product(row, &xq, r)
                        } else {
                            0.0
                        },
                    );
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
        }
        // A row comes out the same alone as in a batch.
        if m > 1 {
            let alone = mat.matmul(&xs[..cols], 1);
            assert_eq!(&alone[..], &got[..rows], "row 0 alone vs batched");
        }
        Ok(())
    }

    #[test]
    fn products_match_dequantised_weights() -> candle_core::Result<()> {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for m in [1, 3, 4, 7] {
                check(dtype, 100, 256, m)?;
            }
            check(dtype, 1536, 576, 2)?;
        }
        Ok(())
    }

    #[test]
    fn rows_dequantise_like_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (13, 64), &dev)?;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype)?;
            let want: Vec<Vec<f32>> = q.dequantize(&dev)?.to_vec2()?;
            let mat = packed(&q);
            for (i, want) in want.iter().enumerate() {
                let mut got = vec![0f32; 64];
                mat.dequantize_row(i, &mut got);
                assert_eq!(&got, want, "{dtype:?} row {i}");
            }
        }
        Ok(())
    }

    #[test]
    fn stacked_matrices_give_the_concatenated_product() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (40, 64), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (20, 64), &dev)?;
        let qa = packed(&QTensor::quantize(&a, GgmlDType::Q4_1)?);
        let qb = packed(&QTensor::quantize(&b, GgmlDType::Q4_1)?);
        let both = QMatrix::stack(&[&qa, &qb]).expect("same format and width");
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let got = both.matmul(&x, 2);
        let (ya, yb) = (qa.matmul(&x, 2), qb.matmul(&x, 2));
        for r in 0..2 {
            assert_eq!(&got[r * 60..r * 60 + 40], &ya[r * 40..(r + 1) * 40]);
            assert_eq!(&got[r * 60 + 40..(r + 1) * 60], &yb[r * 20..(r + 1) * 20]);
        }
        let q8 = packed(&QTensor::quantize(&b, GgmlDType::Q8_0)?);
        assert!(QMatrix::stack(&[&qa, &q8]).is_none(), "formats differ");
        assert!(
            QMatrix::stack(&[&qb, &qa]).is_none(),
            "a first part of 20 rows does not fill its octets"
        );
        Ok(())
    }
}
