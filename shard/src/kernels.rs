//! Quantised matrix products on the CPU: the hot path of every block.
//!
//! candle 0.11 runs Q4_1 (the default model's format) through a scalar loop, and it runs
//! every quantised product on a thread pool whose workers spin for 25,000 rounds after
//! each product, which steals the cores from the other servers of a swarm sharing a
//! machine (measured in issue 5: 70% of a local decode went to candle's scalar
//! `vec_dot_unopt`). These kernels take over for the GGUF formats we meet most (Q4_0,
//! Q4_1, Q8_0): weights stay in GGUF's own block layout, activations are quantised to
//! 8 bits per 32-value block (as ggml's Q8_0/Q8_1), and each block
//! product runs in integer arithmetic with AVX2 (`maddubs`) where the CPU has it, in
//! plain Rust elsewhere.
//!
//! Several activation rows (a prefill chunk, or the steps of concurrent sessions batched
//! together) share each weight block loaded: a weight row is read from memory once for up
//! to four activation rows, which is what makes batching pay on a memory-bound decode.
//! Work is split over output rows on a [rayon] pool whose idle workers sleep instead of
//! spinning (`SHOAL_THREADS` sets its size; default: every core).

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantisation block, in every format here.
const QK: usize = 32;

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

    /// Bytes of one block of 32 values.
    const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 2 + QK / 2,
            Self::Q4_1 => 4 + QK / 2,
            Self::Q8_0 => 2 + QK,
        }
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

/// A weight matrix `[rows, cols]` in a GGUF block format, row-major, as in the file.
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

impl QMatrix {
    /// Takes a 2-d quantised tensor in a format these kernels run; `None` otherwise.
    pub(crate) fn from_qtensor(q: &QTensor) -> Option<Self> {
        let format = QFormat::from_ggml(q.dtype())?;
        let (rows, cols) = q.shape().dims2().ok()?;
        if cols % QK != 0 {
            return None;
        }
        let data = q.data().ok()?.into_owned();
        (data.len() == rows * cols / QK * format.block_bytes()).then_some(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    /// Stacks matrices that read the same input (q, k and v; gate and up) into one, so
    /// one product serves them all. `None` when their formats or widths differ.
    pub(crate) fn stack(parts: &[&QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols)
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

    /// Row `i` as f32 values (an embedding lookup).
    pub(crate) fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        let bb = self.format.block_bytes();
        let kb = self.cols / QK;
        let row = &self.data[i * kb * bb..(i + 1) * kb * bb];
        for (blk, out) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            let d = f16_le(blk, 0);
            match self.format {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let (min, qs) = match self.format {
                        QFormat::Q4_0 => (-8.0 * d, &blk[2..]),
                        _ => (f16_le(blk, 2), &blk[4..]),
                    };
                    for (j, &q) in qs.iter().enumerate() {
                        out[j] = d * f32::from(q & 0x0F) + min;
                        out[j + QK / 2] = d * f32::from(q >> 4) + min;
                    }
                }
                QFormat::Q8_0 => {
                    for (o, &q) in out.iter_mut().zip(&blk[2..]) {
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
        // Output transposed, [rows, m], so each task owns one contiguous stretch.
        let mut out_t = vec![0f32; self.rows * m];
        let threads = pool().current_num_threads();
        // A few tasks per thread balance the load; tiny tasks would cost more to hand out.
        let tile = self.rows.div_ceil(threads * 4).max(16);
        let run = |out_t: &mut [f32]| {
            out_t
                .par_chunks_mut(tile * m)
                .enumerate()
                .for_each(|(t, chunk)| {
                    // One token: four weight rows at once, four independent sums in
                    // flight; several tokens: two rows, each block shared by up to 8.
                    let group = if m == 1 { 4 } else { 2 };
                    for (j, out) in chunk.chunks_mut(group * m).enumerate() {
                        self.row_products(t * tile + j * group, &xq, out);
                    }
                });
        };
        on_pool(|| run(&mut out_t));
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * self.rows];
        for (i, col) in out_t.chunks_exact(m).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                out[r * self.rows + i] = v;
            }
        }
        out
    }

    /// Dot products of weight rows `first..first + out.len() / m` with every row of
    /// `xq`, into `out` (`[rows, m]`).
    fn row_products(&self, first: usize, xq: &QRows, out: &mut [f32]) {
        let m = xq.m;
        let n_rows = out.len() / m;
        let row_bytes = self.cols / QK * self.format.block_bytes();
        let w = &self.data[first * row_bytes..(first + n_rows) * row_bytes];
        #[cfg(target_arch = "x86_64")]
        match x86_level() {
            // SAFETY (both): the CPU has the features the kernel is compiled for (checked
            // by `x86_level`); `w` holds `n_rows` rows and `out` `n_rows * m` values
            // (both checked by the slicing).
            X86Level::Vnni => {
                unsafe { vnni_kernels::products(self.format, w, row_bytes, xq, out) };
                return;
            }
            X86Level::Avx2 => {
                unsafe { avx2_kernels::products(self.format, w, row_bytes, xq, out) };
                return;
            }
            X86Level::None => {}
        }
        for (row, out) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
            scalar_products(self.format, row, xq, 0, out);
        }
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

/// The portable kernel: the same arithmetic as the AVX2 one, one value at a time.
fn scalar_products(format: QFormat, w: &[u8], xq: &QRows, r0: usize, out: &mut [f32]) {
    let bb = format.block_bytes();
    for (i, o) in out.iter_mut().enumerate() {
        let r = r0 + i;
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(bb).enumerate() {
            let xb = &xq.qs[(r * xq.kb + b) * QK..][..QK];
            let (dx, sx) = (xq.d[r * xq.kb + b], xq.s[r * xq.kb + b]);
            let dw = f16_le(blk, 0);
            let (dot, offset) = match format {
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    let qs = if format == QFormat::Q4_0 {
                        &blk[2..]
                    } else {
                        &blk[4..]
                    };
                    let mut dot = 0i32;
                    for (j, &q) in qs.iter().enumerate() {
                        dot += i32::from(q & 0x0F) * i32::from(xb[j]);
                        dot += i32::from(q >> 4) * i32::from(xb[j + QK / 2]);
                    }
                    let offset = if format == QFormat::Q4_0 {
                        -8.0 * dw * sx
                    } else {
                        f16_le(blk, 2) * sx
                    };
                    (dot, offset)
                }
                QFormat::Q8_0 => {
                    let dot = blk[2..]
                        .iter()
                        .zip(xb)
                        .map(|(&a, &b)| i32::from(a as i8) * i32::from(b))
                        .sum();
                    (dot, 0.0)
                }
            };
            acc += dw * dx * dot as f32 + offset;
        }
        *o = acc;
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

            use super::super::{QFormat, QRows, QK};

            $dot


            /// Dot products of the weight rows in `w` (`row_bytes` each) with every row of
            /// `xq`, into `out` (`[rows, m]`), in tiles of up to 4 weight rows by 4 activation
            /// rows, so each block loaded serves several products.
            ///
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C; `w` must hold whole rows of `xq.kb`
            /// blocks of `format`, and `out` one value per weight row and activation row.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn products(
                format: QFormat,
                w: &[u8],
                row_bytes: usize,
                xq: &QRows,
                out: &mut [f32],
            ) {
                let m = xq.m;
                let rows = w.len() / row_bytes;
                assert!(out.len() >= rows * m && row_bytes >= xq.kb * format.block_bytes());
                macro_rules! tile {
                    ($w:literal, $r:literal, $row:expr, $r0:expr) => {
                        // SAFETY: rows $row..$row + $w of `w` and activation rows
                        // $r0..$r0 + $r exist (loop bounds below); the CPU check is the caller's.
                        unsafe {
                            let wp = w.as_ptr().add($row * row_bytes);
                            let op = out.as_mut_ptr().add($row * m + $r0);
                            match format {
                                QFormat::Q4_0 => kernel::<0, $w, $r>(wp, row_bytes, xq, $r0, op, m),
                                QFormat::Q4_1 => kernel::<1, $w, $r>(wp, row_bytes, xq, $r0, op, m),
                                QFormat::Q8_0 => kernel::<2, $w, $r>(wp, row_bytes, xq, $r0, op, m),
                            }
                        }
                    };
                }
                let mut row = 0;
                while row < rows {
                    let left = rows - row;
                    if m == 1 {
                        if left >= 4 {
                            tile!(4, 1, row, 0);
                            row += 4;
                        } else {
                            tile!(1, 1, row, 0);
                            row += 1;
                        }
                        continue;
                    }
                    let wide = left >= 2;
                    let mut r0 = 0;
                    while r0 < m {
                        match (wide, m - r0) {
                            (true, 1) => tile!(2, 1, row, r0),
                            (true, 2) => tile!(2, 2, row, r0),
                            (true, 3) => tile!(2, 3, row, r0),
                            (true, _) => tile!(2, 4, row, r0),
                            (false, 1) => tile!(1, 1, row, r0),
                            (false, 2) => tile!(1, 2, row, r0),
                            (false, 3) => tile!(1, 3, row, r0),
                            (false, _) => tile!(1, 4, row, r0),
                        }
                        r0 += 4;
                    }
                    row += if wide { 2 } else { 1 };
                }
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn f16_at(p: *const u8) -> f32 {
                // SAFETY: the caller guarantees two readable bytes at `p`.
                let bits = unsafe { p.cast::<u16>().read_unaligned() };
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
            }

            /// 16 bytes of nibbles as 32 bytes: low nibbles are values 0..16, high ones 16..32.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn nibbles(p: *const u8) -> __m256i {
                // SAFETY: the caller guarantees 16 readable bytes at `p`.
                let b = unsafe { _mm_loadu_si128(p.cast()) };
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(b, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                _mm256_set_m128i(hi, lo)
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }

            /// `F`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0. `W` weight rows (from `w`, `row_bytes`
            /// apart) times `R` activation rows (from `r0`); results go to `out[i * m + r]`.
            ///
            /// # Safety
            /// AVX2, FMA and F16C; `W` rows of `xq.kb` blocks at `w`; rows `r0..r0 + R` in `xq`;
            /// `out[i * m + r]` writable for every `i < W`, `r < R`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn kernel<const F: u8, const W: usize, const R: usize>(
                w: *const u8,
                row_bytes: usize,
                xq: &QRows,
                r0: usize,
                out: *mut f32,
                m: usize,
            ) {
                let format = match F {
                    0 => QFormat::Q4_0,
                    1 => QFormat::Q4_1,
                    _ => QFormat::Q8_0,
                };
                let bb = format.block_bytes();
                let kb = xq.kb;
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                let mut offset = [[0f32; R]; W];
                let qp = xq.qs.as_ptr();
                // SAFETY: every pointer below stays inside the W rows at `w` or inside rows
                // r0..r0 + R of `xq`, as the caller promised.
                unsafe {
                    for b in 0..kb {
                        // Weights as unsigned bytes, their scales, offsets and (Q8_0) signs.
                        let mut u = [_mm256_setzero_si256(); W];
                        let mut signs = [_mm256_setzero_si256(); W];
                        let mut dw = [0f32; W];
                        let mut wo = [0f32; W];
                        for i in 0..W {
                            let blk = w.add(i * row_bytes + b * bb);
                            dw[i] = f16_at(blk);
                            match F {
                                0 => {
                                    u[i] = nibbles(blk.add(2));
                                    wo[i] = -8.0 * dw[i];
                                }
                                1 => {
                                    u[i] = nibbles(blk.add(4));
                                    wo[i] = f16_at(blk.add(2));
                                }
                                _ => {
                                    let q = _mm256_loadu_si256(blk.add(2).cast());
                                    u[i] = _mm256_sign_epi8(q, q);
                                    signs[i] = q;
                                }
                            }
                        }
                        for r in 0..R {
                            let at = (r0 + r) * kb + b;
                            let x = _mm256_loadu_si256(qp.add(at * QK).cast());
                            let dx = *xq.d.get_unchecked(at);
                            let sx = *xq.s.get_unchecked(at);
                            for i in 0..W {
                                // maddubs wants unsigned × signed: move Q8_0's signs onto x.
                                let x = if F == 2 {
                                    _mm256_sign_epi8(x, signs[i])
                                } else {
                                    x
                                };
                                let dot = _mm256_cvtepi32_ps(dot_u8_i8(u[i], x));
                                acc[i][r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw[i] * dx), acc[i][r]);
                                if F != 2 {
                                    offset[i][r] += wo[i] * sx;
                                }
                            }
                        }
                    }
                    for i in 0..W {
                        for r in 0..R {
                            *out.add(i * m + r) = hsum(acc[i][r]) + offset[i][r];
                        }
                    }
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
    /// f32 product (the exact answer for the quantised weights).
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
        // The portable kernel computes the same thing, to rounding.
        let xq = QRows::quantise(&xs, m, cols);
        let kb = cols / QK;
        let bb = mat.format.block_bytes();
        for row in [0, rows / 2, rows - 1] {
            let mut fast = vec![0f32; m];
            mat.row_products(row, &xq, &mut fast);
            let mut four = vec![0f32; 4 * m];
            let first = row.min(rows - 4);
            mat.row_products(first, &xq, &mut four);
            assert_eq!(&four[(row - first) * m..][..m], &fast[..], "tiles agree");
            // The AVX2 kernel (which the VNNI one replaces where the CPU has it) gives
            // the same integer dots, so the same floats.
            #[cfg(target_arch = "x86_64")]
            if x86_level() != X86Level::None {
                let row_bytes = kb * bb;
                let w = &mat.data[row * row_bytes..(row + 1) * row_bytes];
                let mut avx2 = vec![0f32; m];
                // SAFETY: the CPU has AVX2, FMA and F16C (checked); one row, m outputs.
                unsafe { avx2_kernels::products(mat.format, w, row_bytes, &xq, &mut avx2) };
                assert_eq!(avx2, fast, "AVX2 and {:?} kernels differ", x86_level());
            }
            let mut slow = vec![0f32; m];
            scalar_products(
                mat.format,
                &mat.data[row * kb * bb..(row + 1) * kb * bb],
                &xq,
                0,
                &mut slow,
            );
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
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
        let w = Tensor::randn(0f32, 1.0, (5, 64), &dev)?;
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
        let b = Tensor::randn(0f32, 1.0, (24, 64), &dev)?;
        let qa = packed(&QTensor::quantize(&a, GgmlDType::Q4_1)?);
        let qb = packed(&QTensor::quantize(&b, GgmlDType::Q4_1)?);
        let both = QMatrix::stack(&[&qa, &qb]).expect("same format and width");
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let got = both.matmul(&x, 2);
        let (ya, yb) = (qa.matmul(&x, 2), qb.matmul(&x, 2));
        for r in 0..2 {
            assert_eq!(&got[r * 64..r * 64 + 40], &ya[r * 40..(r + 1) * 40]);
            assert_eq!(&got[r * 64 + 40..(r + 1) * 64], &yb[r * 24..(r + 1) * 24]);
        }
        let q8 = packed(&QTensor::quantize(&b, GgmlDType::Q8_0)?);
        assert!(QMatrix::stack(&[&qa, &q8]).is_none(), "formats differ");
        Ok(())
    }
}
