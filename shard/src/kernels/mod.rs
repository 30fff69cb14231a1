//! Quantised matrix products on the CPU: the hot path of every block.
//!
//! candle 0.11 runs Q4_1 (the default model's format) through a scalar loop, and it runs
//! every quantised product on a thread pool whose workers spin for 25,000 rounds after
//! each product, which steals the cores from the other servers of a swarm sharing a
//! machine (measured in issue 5: 70% of a local decode went to candle's scalar
//! `vec_dot_unopt`). These kernels take over for the GGUF formats of 32-value blocks
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the 4-bit table types; K-quant files keep many
//! tensors in Q5_0 and Q8_0). Activations are quantised to 8 bits per 32-value block (as
//! ggml's Q8_0/Q8_1) and each block product runs in integer arithmetic: AVX-VNNI or
//! AVX-512 VNNI (`vpdpbusd`) or AVX2 (`maddubs`) where the CPU has them, plain Rust
//! elsewhere.
//!
//! Weights are repacked at load into *octets* of 8 rows, laid out in *lanes*: per block,
//! each 32-byte vector holds 4 consecutive values of each of the 8 rows (bytes `4i..4i+4`
//! are row `i`'s), so one `vpdpbusd` against 4 activation bytes broadcast to every lane
//! adds 4 products to each row's own 32-bit lane, and after the block's 8 such steps lane
//! `i` is row `i`'s integer dot product: no horizontal reduction. 4-bit formats keep two
//! values per byte (the low nibbles of a vector are values `4v..4v+4`, the high ones
//! `16+4v..`, as in GGUF); Q5_0/Q5_1 add 32 bytes of fifth bits (byte `4i+t`, bit `c`:
//! row `i`'s value `4c+t`), which two shifts and a mask put in place; Q8_0 is stored plus
//! 128 (unsigned, as `vpdpbusd` wants; the 128s come off through the activation sums).
//! Then the 8 rows' f16 scales (and, for Q4_1 and Q5_1, 8 mins), applied with one vector
//! multiply.
//!
//! A product takes the activation rows up to 8 at a time (4 for the K-quants' super-blocks):
//! each weight block is unpacked once and used for all of them, so a batch (a prompt, or the steps of concurrent
//! sessions) costs much less per row than one row alone. Every row is computed the same
//! way whatever the other rows of the product are, so a session's numbers do not depend
//! on whom it is batched with. Work is split over octets on a [rayon] pool whose idle
//! workers sleep instead of spinning (`SHOAL_THREADS` sets its size; default: every core).

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

pub(crate) mod attend;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
use x86::{avx2_kernels, vnni512_kernels, vnni_kernels, x86_level, X86Level};

/// Which encoding of `vpdpbusd` this CPU has (see [`X86Level::Vnni`]).
#[cfg(target_arch = "x86_64")]
fn avx_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::is_x86_feature_detected!("avxvnni"))
}

/// Values per quantisation block, in every format here.
const QK: usize = 32;

/// Rows packed together.
pub(crate) const OCTET: usize = 8;

/// Bytes of one lanes vector: 4 values of each of the 8 rows of an octet.
pub(crate) const LANES: usize = 32;

/// Where a Q5_0/Q5_1 octet block's fifth bits start (after its 4 vectors of nibbles).
const FIFTH: usize = 4 * LANES;

/// A GGUF block format these kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QFormat {
    /// f16 scale, 32 unsigned nibbles; value = d * (q - 8).
    Q4_0,
    /// f16 scale, f16 min, 32 unsigned nibbles; value = d * q + m.
    Q4_1,
    /// f16 scale, 32-bit word of fifth bits, 32 unsigned nibbles; value = d * (q - 16).
    Q5_0,
    /// f16 scale, f16 min, fifth bits, 32 nibbles; value = d * q + m.
    Q5_1,
    /// f16 scale, 32 signed bytes; value = d * q.
    Q8_0,
    /// f16 scale, 32 nibbles indexing a table of 16 signed bytes; value = `d * table[q]`:
    /// IQ4_NL, IQ4_XS (its 32-value sub-blocks, each with its own scale) and MXFP4 (its
    /// power-of-two scales, where f16 holds them), as [`crate::gguf`] rewrites them.
    Table4(Table),
}

/// The value tables of [`QFormat::Table4`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Table {
    /// IQ4_NL's non-linear table (IQ4_XS too).
    Iq4Nl,
    /// MXFP4's E2M1 values, doubled.
    Mxfp4,
}

impl Table {
    /// The 16 values.
    pub(crate) fn values(self) -> &'static [i8; 16] {
        match self {
            Table::Iq4Nl => &crate::gguf::IQ4NL_VALUES,
            Table::Mxfp4 => &crate::gguf::MXFP4_VALUES,
        }
    }
}

impl QFormat {
    fn from_ggml(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one GGUF block of 32 values.
    const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 2 + QK / 2,
            Self::Q4_1 => 4 + QK / 2,
            Self::Q5_0 => 2 + 4 + QK / 2,
            Self::Q5_1 => 4 + 4 + QK / 2,
            Self::Q8_0 => 2 + QK,
            Self::Table4(_) => 2 + QK / 2,
        }
    }

    /// Bytes of one block's quants (for Q5_0/Q5_1 the fifth bits' word included).
    const fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Table4(_) => QK / 2,
            Self::Q5_0 | Self::Q5_1 => 4 + QK / 2,
            Self::Q8_0 => QK,
        }
    }

    /// Whether the block has a min (and so an octet 8 mins after its scales).
    const fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    /// Whether values have a fifth bit, kept apart from the nibbles.
    const fn has_fifth_bit(self) -> bool {
        matches!(self, Self::Q5_0 | Self::Q5_1)
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

/// A product over octets of weight rows: `octet(o, out)` writes octet `o`'s 8 rows by
/// the `m` activation rows into `out` (`[m, 8]`); the octets are shared out over the
/// pool and the result comes back as `[m, rows]`, row-major.
pub(crate) fn octets_matmul(
    rows: usize,
    m: usize,
    octet: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let octets = rows.div_ceil(OCTET);
    // Each octet's results, [octets, m, 8], so each task owns one contiguous stretch.
    let mut parts = vec![0f32; octets * m * OCTET];
    let threads = pool().current_num_threads();
    // A few tasks per thread balance the load; tiny tasks would cost more to hand out.
    let per_task = octets.div_ceil(threads * 4).max(2);
    let run = |parts: &mut [f32]| {
        parts
            .par_chunks_mut(per_task * OCTET * m)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (j, out) in chunk.chunks_mut(OCTET * m).enumerate() {
                    octet(t * per_task + j, out);
                }
            });
    };
    on_pool(|| run(&mut parts));
    if m == 1 {
        parts.truncate(rows);
        return parts;
    }
    let mut out = vec![0f32; m * rows];
    for (o, part) in parts.chunks_exact(m * OCTET).enumerate() {
        let width = OCTET.min(rows - o * OCTET);
        for (r, values) in part.chunks_exact(OCTET).enumerate() {
            out[r * rows + o * OCTET..][..width].copy_from_slice(&values[..width]);
        }
    }
    out
}

/// A super-block octet (`kind`'s layout) by every row of `xk` into `out` (`[m, 8]`) on
/// this CPU's vector kernels; false where there are none (the caller runs the portable
/// one).
pub(crate) fn super_products(
    kind: crate::kquants::Super,
    octet: &[u8],
    xk: &crate::kquants::Q8KRows,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    match x86_level() {
        // SAFETY (both): the CPU has the features the kernel is compiled for (checked by
        // `x86_level`); the kernel checks the slices' lengths.
        X86Level::Vnni => {
            if avx_vnni() {
                unsafe { vnni_kernels::super_products(kind, octet, xk, out) };
            } else {
                unsafe { vnni512_kernels::super_products(kind, octet, xk, out) };
            }
            return true;
        }
        X86Level::Avx2 => {
            unsafe { avx2_kernels::super_products(kind, octet, xk, out) };
            return true;
        }
        X86Level::None => {}
    }
    let _ = (kind, octet, xk, out);
    false
}

/// Tests: super-block octet `o` on the AVX2 kernel gives `best` (what the best kernel
/// of this CPU gave), where the CPU has AVX2.
#[cfg(test)]
pub(crate) fn check_super_levels_agree(
    kind: crate::kquants::Super,
    data: &[u8],
    o: usize,
    xk: &crate::kquants::Q8KRows,
    best: &[f32],
) {
    #[cfg(target_arch = "x86_64")]
    if x86_level() != X86Level::None {
        let bytes = xk.nb * kind.octet_bytes();
        let octet = &data[o * bytes..(o + 1) * bytes];
        let mut avx2 = vec![0f32; best.len()];
        // SAFETY: the CPU has AVX2, FMA and F16C (checked).
        unsafe { avx2_kernels::super_products(kind, octet, xk, &mut avx2) };
        assert_eq!(
            avx2,
            best,
            "AVX2 and {:?} {kind:?} kernels differ",
            x86_level()
        );
    }
    let _ = (kind, data, o, xk, best);
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

/// One row's block in an octet: its scale, its min (Q4_1, Q5_1; else 0), and where its
/// values lie (the octet block and the row's lane).
struct RowBlock<'a> {
    d: f32,
    min: f32,
    chunk: &'a [u8],
    lane: usize,
}

impl RowBlock<'_> {
    /// Value `j` of the block as the integer the kernels multiply: for Q4_0, Q5_0, Q8_0
    /// and the tables the signed value (`d * q` is the weight), for Q4_1 and Q5_1 the
    /// unsigned one (`d * q + min`).
    fn q(&self, format: QFormat, j: usize) -> i32 {
        let byte = self.chunk[(j % 16 / 4) * LANES + 4 * self.lane + j % 4];
        let nibble = if j < QK / 2 { byte & 0x0F } else { byte >> 4 };
        let fifth = || i32::from(self.chunk[FIFTH + 4 * self.lane + j % 4] >> (j / 4) & 1) << 4;
        match format {
            QFormat::Q8_0 => {
                i32::from((self.chunk[(j / 4) * LANES + 4 * self.lane + j % 4] ^ 0x80) as i8)
            }
            QFormat::Table4(t) => i32::from(t.values()[usize::from(nibble)]),
            QFormat::Q4_0 => i32::from(nibble) - 8,
            QFormat::Q4_1 => i32::from(nibble),
            QFormat::Q5_0 => (i32::from(nibble) | fifth()) - 16,
            QFormat::Q5_1 => i32::from(nibble) | fifth(),
        }
    }
}

impl QMatrix {
    /// Takes a 2-d quantised tensor in a format these kernels run; `None` otherwise.
    pub(crate) fn from_qtensor(q: &QTensor) -> Option<Self> {
        let format = QFormat::from_ggml(q.dtype())?;
        let (rows, cols) = q.shape().dims2().ok()?;
        Self::from_blocks(format, &q.data().ok()?, rows, cols)
    }

    /// A matrix `[rows, cols]` from its GGUF blocks of `format`, row after row.
    pub(crate) fn from_blocks(
        format: QFormat,
        raw: &[u8],
        rows: usize,
        cols: usize,
    ) -> Option<Self> {
        if !cols.is_multiple_of(QK) || rows == 0 {
            return None;
        }
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
                let lane = |v: usize, t: usize| v * LANES + 4 * i + t;
                match format {
                    QFormat::Q8_0 => {
                        for (j, &q) in src[qo..].iter().enumerate() {
                            dst[lane(j / 4, j % 4)] = q ^ 0x80;
                        }
                    }
                    _ => {
                        // GGUF: [d, (m), (qh: u32), qs: 16].
                        let nibbles = &src[bb - QK / 2..];
                        for (j, &q) in nibbles.iter().enumerate() {
                            dst[lane(j / 4, j % 4)] = q;
                        }
                        if format.has_fifth_bit() {
                            let qh = u32::from_le_bytes([
                                src[qo],
                                src[qo + 1],
                                src[qo + 2],
                                src[qo + 3],
                            ]);
                            for j in 0..QK {
                                if qh >> j & 1 == 1 {
                                    dst[FIFTH + 4 * i + j % 4] |= 1 << (j / 4);
                                }
                            }
                        }
                    }
                }
                let scales = OCTET * qb;
                dst[scales + 2 * i..scales + 2 * i + 2].copy_from_slice(&src[..2]);
                if format.has_min() {
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
        let parts: Vec<_> = parts
            .iter()
            .map(|p| (p.format, p.rows, p.cols, &p.data[..]))
            .collect();
        let (format, rows, cols, data) = stack_octets(&parts)?;
        Some(Self {
            format,
            rows,
            cols,
            data,
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
        let (ob, kb) = (f.octet_bytes(), self.cols / QK);
        let (o, i) = (row / OCTET, row % OCTET);
        let chunk = &self.data[(o * kb + b) * ob..][..ob];
        let scales = OCTET * f.quant_bytes();
        RowBlock {
            d: f16_le(chunk, scales + 2 * i),
            min: if f.has_min() {
                f16_le(chunk, scales + 2 * OCTET + 2 * i)
            } else {
                0.0
            },
            chunk,
            lane: i,
        }
    }

    /// Row `i` as f32 values (an embedding lookup).
    pub(crate) fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        for (b, out) in out.chunks_exact_mut(QK).enumerate() {
            let block = self.row_block(i, b);
            for (j, o) in out.iter_mut().enumerate() {
                *o = block.d * block.q(self.format, j) as f32 + block.min;
            }
        }
    }

    /// `x · selfᵀ` for `m` rows of `x` (`[m, cols]`, row-major): `[m, rows]`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        let xq = QRows::quantise(x, m, self.cols);
        octets_matmul(self.rows, m, |o, out| self.octet_products(o, &xq, out))
    }

    /// Dot products of octet `o`'s 8 rows with every row of `xq`, into `out`
    /// (`[m, 8]`).
    fn octet_products(&self, o: usize, xq: &QRows, out: &mut [f32]) {
        let ob = self.format.octet_bytes();
        let octet = &self.data[o * xq.kb * ob..(o + 1) * xq.kb * ob];
        #[cfg(target_arch = "x86_64")]
        match x86_level() {
            // SAFETY (both): the CPU has the features the kernel is compiled for (checked
            // by `x86_level`); `octet` holds `kb` octet blocks and `out` 8 * m values
            // (both checked by the slicing above and by `products`).
            X86Level::Vnni => {
                if avx_vnni() {
                    unsafe { vnni_kernels::products(self.format, octet, xq, out) };
                } else {
                    unsafe { vnni512_kernels::products(self.format, octet, xq, out) };
                }
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
                out[r * OCTET + i] = if row < self.rows {
                    self.scalar_product(row, xq, r)
                } else {
                    0.0
                };
            }
        }
    }

    /// The portable kernel: one row by one activation row, the same arithmetic as the
    /// vector kernels (integer dot per block, then scale, then min), one value at a time.
    fn scalar_product(&self, row: usize, xq: &QRows, r: usize) -> f32 {
        let mut acc = 0f32;
        for b in 0..xq.kb {
            let block = self.row_block(row, b);
            let at = r * xq.kb + b;
            let xb = &xq.qs[at * QK..][..QK];
            let dot: i32 = xb
                .iter()
                .enumerate()
                .map(|(j, &x)| block.q(self.format, j) * i32::from(x))
                .sum();
            acc = (dot as f32).mul_add(block.d * xq.d[at], acc);
            if self.format.has_min() {
                acc = block.min.mul_add(xq.s[at], acc);
            }
        }
        acc
    }
}

/// Runs `f` compiled for AVX2 where the CPU has it (plain code otherwise): for the
/// activations' quantising, whose rounding is a library call without SSE4.1 and a few
/// vector instructions with it (the same numbers either way).
pub(crate) fn with_vector_isa<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(target_arch = "x86_64")]
    if x86_level() != X86Level::None {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked by `x86_level`).
        return unsafe { x86::avx2(f) };
    }
    f()
}

/// Matrices of octets stacked into one, `(kind, rows, cols, data)` each: `None` unless
/// all have one kind and width and every part but the last fills its octets (so rows
/// stay where each part's product expects them).
pub(crate) fn stack_octets<K: Copy + PartialEq>(
    parts: &[(K, usize, usize, &[u8])],
) -> Option<(K, usize, usize, Vec<u8>)> {
    let (&(kind, _, cols, _), _) = parts.split_first()?;
    let n = parts.len();
    if parts.iter().any(|p| p.0 != kind || p.2 != cols)
        || parts[..n - 1].iter().any(|p| p.1 % OCTET != 0)
    {
        return None;
    }
    let rows = parts.iter().map(|p| p.1).sum();
    Some((
        kind,
        rows,
        cols,
        parts.iter().flat_map(|p| p.3.iter().copied()).collect(),
    ))
}

/// Reads the little-endian f16 at `at`.
fn f16_le(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
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
    /// `[m, kb]` `d * Σq`, for the formats with a min (Q4_1, Q5_1).
    s: Vec<f32>,
    /// `[m, kb]` `Σq`: for the kernels' offsets (Q4_0's 8, Q5_0's 16, the 128 that makes
    /// Q8_0 unsigned).
    isum: Vec<i32>,
}

impl QRows {
    fn quantise(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / QK;
        let mut qs = vec![0i8; m * k];
        let mut d = Vec::with_capacity(m * kb);
        let mut s = Vec::with_capacity(m * kb);
        let mut isum = Vec::with_capacity(m * kb);
        let blocks = x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK));
        with_vector_isa(
            #[inline(always)]
            || {
                for (xb, qb) in blocks {
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
                    isum.push(sum);
                }
            },
        );
        Self {
            m,
            kb,
            qs,
            d,
            s,
            isum,
        }
    }
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
            check_octet_kernels(&mat, &xq, o);
        }
        // A row comes out the same alone as in a batch.
        if m > 1 {
            let alone = mat.matmul(&xs[..cols], 1);
            assert_eq!(&alone[..], &got[..rows], "row 0 alone vs batched");
        }
        Ok(())
    }

    /// Octet `o` by every row of `xq` on the best kernel of this CPU: equal to the AVX2
    /// kernel's (which the VNNI ones replace where the CPU has them: the same integer
    /// dots, so the same floats), and to the portable kernel's to rounding (zero for the
    /// padding rows past the matrix).
    fn check_octet_kernels(mat: &QMatrix, xq: &QRows, o: usize) {
        let m = xq.m;
        let mut fast = vec![0f32; OCTET * m];
        mat.octet_products(o, xq, &mut fast);
        #[cfg(target_arch = "x86_64")]
        if x86_level() != X86Level::None {
            let ob = mat.format.octet_bytes();
            let octet = &mat.data[o * xq.kb * ob..(o + 1) * xq.kb * ob];
            let mut avx2 = vec![0f32; OCTET * m];
            // SAFETY: the CPU has AVX2, FMA and F16C (checked).
            unsafe { avx2_kernels::products(mat.format, octet, xq, &mut avx2) };
            let f = mat.format;
            assert_eq!(
                avx2,
                fast,
                "{f:?}: AVX2 and {:?} kernels differ",
                x86_level()
            );
        }
        for i in 0..OCTET {
            let row = o * OCTET + i;
            for r in 0..m {
                let want = if row < mat.rows {
                    mat.scalar_product(row, xq, r)
                } else {
                    0.0
                };
                let got = fast[r * OCTET + i];
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{:?} octet {o} row {i} x {r}: {got} vs {want}",
                    mat.format
                );
            }
        }
    }

    #[test]
    fn products_match_dequantised_weights() -> candle_core::Result<()> {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            for m in [1, 3, 4, 7, 8, 11] {
                check(dtype, 100, 256, m)?;
            }
            check(dtype, 1536, 576, 2)?;
        }
        Ok(())
    }

    /// The 4-bit table formats (IQ4_NL's and MXFP4's tables): random blocks, our product
    /// against the exact one over their values, and the portable, AVX2 and best kernels
    /// against each other, one row or several.
    #[test]
    fn table_formats_match_their_values() {
        let (rows, cols) = (19, 256);
        let kb = cols / QK;
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for table in [Table::Iq4Nl, Table::Mxfp4] {
            let mut raw = Vec::new();
            let mut w = vec![0f32; rows * cols];
            for row in 0..rows {
                for b in 0..kb {
                    let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
                    raw.extend_from_slice(&d.to_le_bytes());
                    let qs: Vec<u8> = (0..QK / 2).map(|_| next() as u8).collect();
                    for (j, q) in qs.iter().enumerate() {
                        let at = row * cols + b * QK;
                        w[at + j] = d.to_f32() * f32::from(table.values()[usize::from(q & 0x0F)]);
                        w[at + j + QK / 2] =
                            d.to_f32() * f32::from(table.values()[usize::from(q >> 4)]);
                    }
                    raw.extend_from_slice(&qs);
                }
            }
            let mat =
                QMatrix::from_blocks(QFormat::Table4(table), &raw, rows, cols).expect("packs");
            for m in [1, 3, 11] {
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| ((i * 29 % 97) as f32 - 48.0) / 11.0)
                    .collect();
                let got = mat.matmul(&x, m);
                for r in 0..m {
                    for i in 0..rows {
                        let want: f32 = (0..cols).map(|k| w[i * cols + k] * x[r * cols + k]).sum();
                        let scale = (0..cols)
                            .map(|k| (w[i * cols + k] * x[r * cols + k]).abs())
                            .sum::<f32>();
                        let v = got[r * rows + i];
                        assert!(
                            (v - want).abs() <= 0.02 * scale.max(1e-3),
                            "{table:?} {r},{i}: {v} vs {want}"
                        );
                    }
                }
                let xq = QRows::quantise(&x, m, cols);
                for o in 0..rows.div_ceil(OCTET) {
                    check_octet_kernels(&mat, &xq, o);
                }
                let mut row = vec![0f32; cols];
                mat.dequantize_row(5, &mut row);
                assert_eq!(&row[..], &w[5 * cols..6 * cols], "{table:?} row 5");
            }
        }
    }

    #[test]
    fn rows_dequantise_like_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (13, 64), &dev)?;
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
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
