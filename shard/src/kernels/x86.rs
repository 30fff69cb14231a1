//! The x86 kernels: the instruction set picked at run time, and the kernels stamped out
//! once per set (AVX2, AVX-VNNI, AVX-512 VNNI on 256-bit vectors) from one macro, so
//! all compute the same integers.

use std::sync::OnceLock;

/// The best kernel set this x86 CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum X86Level {
    None,
    Avx2,
    /// AVX-VNNI, or AVX-512 VNNI with AVX-512VL (its instruction on 256-bit vectors):
    /// the same `vpdpbusd`, in the encoding the CPU has.
    Vnni,
}

pub(super) fn x86_level() -> X86Level {
    static LEVEL: OnceLock<X86Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        let vnni = avx2 && std::is_x86_feature_detected!("avxvnni");
        // Zen 4 and the Xeons since Ice Lake have AVX-512 VNNI but some not AVX-VNNI.
        let vnni512 = avx2
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl");
        // SHOAL_KERNELS=avx2 or =portable picks a lesser set, to compare or to debug.
        match std::env::var("SHOAL_KERNELS").as_deref() {
            Ok("portable") => X86Level::None,
            Ok("avx2") if avx2 => X86Level::Avx2,
            _ if vnni || vnni512 => X86Level::Vnni,
            _ if avx2 => X86Level::Avx2,
            _ => X86Level::None,
        }
    })
}

/// `f`, inlined into a function compiled for AVX2 (so its loops vectorise with it).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn avx2<T>(f: impl FnOnce() -> T) -> T {
    f()
}

/// The x86 kernels, stamped out once per instruction set: `$features` is the
/// `target_feature` list, `$vnni` whether its dot step has no saturation, and `$dot`
/// that step, `dpb(acc, u, x)`: 32 unsigned bytes times 32 signed ones, each lane of
/// `acc` (8 x i32) plus the sum of its 4 products.
macro_rules! x86_kernels {
    ($name:ident, $features:literal, $vnni:literal, $dot:item) => {
        mod $name {
            use std::arch::x86_64::*;

            use crate::kernels::{QFormat, QRows, FIFTH, LANES, OCTET, QK};
            use crate::kquants::{q4k_octet, q6k_octet, Q8KRows, Super, QK_K};

            $dot

            /// Whether the 8-bit signed formats (Q8_0, the tables) run as unsigned bytes
            /// (128 above the value; `vpdpbusd` has no saturation to fear) rather than
            /// through AVX2's sign trick.
            const VNNI: bool = $vnni;

            /// The most activation rows one pass over a 32-value weight block serves
            /// (8 measured 4% faster than 4 on a prompt; more would spill registers).
            const TILE: usize = 8;

            /// The same for a super-block: its tiles keep 16 unpacked vectors live.
            const SUPER_TILE: usize = 4;

            /// Rows the next tile takes: the largest of `most`, 4, 2, 1 not over `left`.
            fn tile_len(left: usize, most: usize) -> usize {
                [most, 4, 2].into_iter().find(|&n| n <= left).unwrap_or(1)
            }

            /// Dot products of one octet (`kb` octet blocks) with every row of `xq`, into
            /// `out` (`[m, 8]`): the rows 8 at a time, then 4, 2, 1.
            ///
            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn products(format: QFormat, octet: &[u8], xq: &QRows, out: &mut [f32]) {
                let m = xq.m;
                assert!(octet.len() >= xq.kb * format.octet_bytes());
                assert!(out.len() >= OCTET * m && xq.qs.len() >= m * xq.kb * QK);
                assert!(xq.d.len() >= m * xq.kb && xq.s.len() >= m * xq.kb && xq.isum.len() >= m * xq.kb);
                let values = match format {
                    QFormat::Table4(t) => *t.values(),
                    _ => [0; 16],
                };
                let mut r = 0;
                while r < m {
                    let n = tile_len(m - r, TILE);
                    // SAFETY: the bounds were checked above; the CPU check is the
                    // caller's.
                    unsafe {
                        match format {
                            QFormat::Q4_0 => rows::<0>(octet.as_ptr(), xq, r, n, &values, out),
                            QFormat::Q4_1 => rows::<1>(octet.as_ptr(), xq, r, n, &values, out),
                            QFormat::Q8_0 => rows::<2>(octet.as_ptr(), xq, r, n, &values, out),
                            QFormat::Q5_0 => rows::<3>(octet.as_ptr(), xq, r, n, &values, out),
                            QFormat::Q5_1 => rows::<4>(octet.as_ptr(), xq, r, n, &values, out),
                            QFormat::Table4(_) => rows::<5>(octet.as_ptr(), xq, r, n, &values, out),
                        }
                    }
                    r += n;
                }
            }

            /// [`tile`] for `n` (1, 2, 4 or 8) rows from `r`.
            ///
            /// # Safety
            /// As [`tile`].
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn rows<const F: u8>(octet: *const u8, xq: &QRows, r: usize, n: usize, table: &[i8; 16], out: &mut [f32]) {
                // SAFETY: passed on.
                unsafe {
                    match n {
                        8 => tile::<F, 8>(octet, xq, r, table, out),
                        4 => tile::<F, 4>(octet, xq, r, table, out),
                        2 => tile::<F, 2>(octet, xq, r, table, out),
                        _ => tile::<F, 1>(octet, xq, r, table, out),
                    }
                }
            }

            /// `F`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0, 3 = Q5_0, 4 = Q5_1, 5 = a 4-bit table
            /// type (nibbles looked up in `table` with one byte shuffle). One octet by
            /// activation rows `r..r + R`, into their columns of `out` (`[m, 8]`): per
            /// block, the 8 rows' values unpacked once into 8 lanes vectors, then for each
            /// activation row 8 dot steps against its broadcast bytes, the offset taken
            /// off in integers (ggml's order), and the scales applied.
            ///
            /// # Safety
            /// The features of this module; `octet` points at `xq.kb` octet blocks of the
            /// format; rows `r..r + R` exist in `xq` (its vectors as long as `products`
            /// checks) and columns `r..r + R` in `out`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<const F: u8, const R: usize>(octet: *const u8, xq: &QRows, r: usize, table: &[i8; 16], out: &mut [f32]) {
                let format = match F {
                    0 => QFormat::Q4_0,
                    1 => QFormat::Q4_1,
                    3 => QFormat::Q5_0,
                    4 => QFormat::Q5_1,
                    // Every table has the same layout.
                    5 => QFormat::Table4(crate::kernels::Table::Iq4Nl),
                    _ => QFormat::Q8_0,
                };
                let (qb, ob, kb) = (format.quant_bytes(), format.octet_bytes(), xq.kb);
                // Signed weights on AVX2: |w| against x carrying w's signs.
                let signed = !VNNI && (F == 2 || F == 5);
                // What the integer dot carries above the weights' own: the offset of
                // Q4_0 (8) and Q5_0 (16), and VNNI's 128 on the signed formats.
                let shift = match F {
                    0 => 3,
                    3 => 4,
                    2 | 5 if VNNI => 7,
                    _ => 0,
                };
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                // SAFETY: every pointer stays inside the octet's `kb` blocks or inside
                // rows `r..r + R` of `xq`, as the caller promised.
                unsafe {
                    let mut table = _mm256_broadcastsi128_si256(_mm_loadu_si128(table.as_ptr().cast()));
                    if VNNI {
                        table = _mm256_xor_si256(table, _mm256_set1_epi8(-128));
                    }
                    for b in 0..kb {
                        let c = octet.add(b * ob);
                        prefetch(c, ob);
                        let mut u = [_mm256_setzero_si256(); 8];
                        if F == 2 {
                            for (v, u) in u.iter_mut().enumerate() {
                                *u = _mm256_loadu_si256(c.add(v * LANES).cast());
                                if !VNNI {
                                    *u = _mm256_xor_si256(*u, _mm256_set1_epi8(-128));
                                }
                            }
                        } else {
                            for v in 0..4 {
                                let q = _mm256_loadu_si256(c.add(v * LANES).cast());
                                u[v] = _mm256_and_si256(q, mask);
                                u[v + 4] = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                            }
                            if F == 3 || F == 4 {
                                let h = _mm256_loadu_si256(c.add(FIFTH).cast());
                                for (k, u) in u.iter_mut().enumerate() {
                                    *u = _mm256_or_si256(*u, fifth_bits(h, k));
                                }
                            }
                            if F == 5 {
                                for u in u.iter_mut() {
                                    *u = _mm256_shuffle_epi8(table, *u);
                                }
                            }
                        }
                        let scales = c.add(OCTET * qb);
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.cast()));
                        // Q4_1 and Q5_1: the 8 mins after the scales (the other formats'
                        // blocks end at their scales).
                        let mins = if F == 1 || F == 4 {
                            _mm256_cvtph_ps(_mm_loadu_si128(scales.add(2 * OCTET).cast()))
                        } else {
                            _mm256_setzero_ps()
                        };
                        for (k, acc) in acc.iter_mut().enumerate() {
                            let at = (r + k) * kb + b;
                            let x = xq.qs.as_ptr().add(at * QK).cast::<i32>();
                            let mut dots = [_mm256_setzero_si256(); 2];
                            for (j, u) in u.iter().enumerate() {
                                let xj = _mm256_set1_epi32(x.add(j).read_unaligned());
                                let dot = &mut dots[j % 2];
                                *dot = if signed {
                                    dpb(*dot, _mm256_sign_epi8(*u, *u), _mm256_sign_epi8(xj, *u))
                                } else {
                                    dpb(*dot, *u, xj)
                                };
                            }
                            let mut dot = _mm256_add_epi32(dots[0], dots[1]);
                            if shift > 0 {
                                let off = *xq.isum.get_unchecked(at) << shift;
                                dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(off));
                            }
                            let dx = _mm256_set1_ps(*xq.d.get_unchecked(at));
                            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, dx), *acc);
                            if F == 1 || F == 4 {
                                let sx = _mm256_set1_ps(*xq.s.get_unchecked(at));
                                *acc = _mm256_fmadd_ps(mins, sx, *acc);
                            }
                        }
                    }
                }
                store_tile(&acc, r, out);
            }

            /// One super-block octet of `kind` (`xk.nb` octet blocks) by every row of
            /// `xk`, into `out` (`[m, 8]`): the rows 4 at a time, then 2, then 1.
            ///
            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn super_products(kind: Super, octet: &[u8], xk: &Q8KRows, out: &mut [f32]) {
                let (m, nb) = (xk.m, xk.nb);
                assert!(octet.len() >= nb * kind.octet_bytes());
                assert!(out.len() >= OCTET * m && xk.qs.len() >= m * nb * QK_K);
                assert!(xk.bsums.len() >= m * nb * 16 && xk.d.len() >= m * nb);
                let mut r = 0;
                while r < m {
                    let n = tile_len(m - r, SUPER_TILE);
                    // SAFETY: the bounds were checked above; the CPU check is the
                    // caller's.
                    unsafe {
                        match (kind, n) {
                            (Super::Q4K, 4) => q4k_tile::<4, false>(octet.as_ptr(), xk, r, out),
                            (Super::Q4K, 2) => q4k_tile::<2, false>(octet.as_ptr(), xk, r, out),
                            (Super::Q4K, _) => q4k_tile::<1, false>(octet.as_ptr(), xk, r, out),
                            (Super::Q5K, 4) => q4k_tile::<4, true>(octet.as_ptr(), xk, r, out),
                            (Super::Q5K, 2) => q4k_tile::<2, true>(octet.as_ptr(), xk, r, out),
                            (Super::Q5K, _) => q4k_tile::<1, true>(octet.as_ptr(), xk, r, out),
                            (Super::Q6K, 4) => q6k_tile::<4>(octet.as_ptr(), xk, r, out),
                            (Super::Q6K, 2) => q6k_tile::<2>(octet.as_ptr(), xk, r, out),
                            (Super::Q6K, _) => q6k_tile::<1>(octet.as_ptr(), xk, r, out),
                        }
                    }
                    r += n;
                }
            }

            /// Writes `acc[k]` (the 8 rows' results for activation row `r + k`) into
            /// `out` (`[m, 8]`).
            #[inline]
            #[target_feature(enable = $features)]
            fn store_tile<const R: usize>(acc: &[__m256; R], r: usize, out: &mut [f32]) {
                let out = &mut out[OCTET * r..OCTET * (r + R)];
                for (acc, out) in acc.iter().zip(out.chunks_exact_mut(OCTET)) {
                    // SAFETY: 8 floats into a slice of 8.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *acc) };
                }
            }

            /// Q6_K: one octet (see [`q6k_octet`]) by activation rows `r..r + R`. Per 32
            /// values, the 8 rows' unsigned 6-bit values (32 above the signed ones)
            /// unpacked once into 8 lanes vectors, then per activation row the dots of
            /// each 16 values, less 32 times the activations' sum of those 16, times
            /// their scales: ggml's integers for Q6_K x Q8_K.
            ///
            /// # Safety
            /// The features of this module; `octet` holds `xk.nb` octet blocks; rows
            /// `r..r + R` exist in `xk` and their columns in `out` (as
            /// `super_products` checks).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn q6k_tile<const R: usize>(octet: *const u8, xk: &Q8KRows, r: usize, out: &mut [f32]) {
                let nb = xk.nb;
                let mask = _mm256_set1_epi8(0x0F);
                let pair = _mm256_set1_epi8(0x30);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    // SAFETY: every pointer stays inside octet block `b` or inside rows
                    // `r..r + R`'s super-block `b` of `xk`, as the caller promised.
                    unsafe {
                        let c = octet.add(b * q6k_octet::BYTES);
                        prefetch(c, q6k_octet::BYTES);
                        let mut isum = [_mm256_setzero_si256(); R];
                        for n in 0..QK_K / 32 {
                            let mut u = [_mm256_setzero_si256(); 8];
                            for v in 0..4 {
                                let q = _mm256_loadu_si256(c.add(q6k_octet::unit(n) + v * LANES).cast());
                                u[v] = _mm256_and_si256(q, mask);
                                u[v + 4] = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                            }
                            for h in 0..2 {
                                let bits = _mm256_loadu_si256(c.add(q6k_octet::high(n, h)).cast());
                                // Pair k of each byte to bits 4 and 5.
                                let pairs = [
                                    _mm256_slli_epi16(bits, 4),
                                    _mm256_slli_epi16(bits, 2),
                                    bits,
                                    _mm256_srli_epi16(bits, 2),
                                ];
                                for (k, p) in pairs.into_iter().enumerate() {
                                    u[4 * h + k] = _mm256_or_si256(u[4 * h + k], _mm256_and_si256(p, pair));
                                }
                            }
                            let s0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(c.add(q6k_octet::scales(2 * n)).cast()));
                            let s1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(c.add(q6k_octet::scales(2 * n + 1)).cast()));
                            for (k, isum) in isum.iter_mut().enumerate() {
                                let at = (r + k) * nb + b;
                                let x = xk.qs.as_ptr().add(at * QK_K + 32 * n).cast::<i32>();
                                let mut dots = [_mm256_setzero_si256(); 4];
                                for (j, u) in u.iter().enumerate() {
                                    let xj = _mm256_set1_epi32(x.add(j).read_unaligned());
                                    let dot = &mut dots[2 * (j / 4) + j % 2];
                                    *dot = dpb(*dot, *u, xj);
                                }
                                let bsum = |g: usize| _mm256_set1_epi32(32 * *xk.bsums.get_unchecked(at * 16 + g));
                                let first = _mm256_sub_epi32(_mm256_add_epi32(dots[0], dots[1]), bsum(2 * n));
                                let second = _mm256_sub_epi32(_mm256_add_epi32(dots[2], dots[3]), bsum(2 * n + 1));
                                let scaled = _mm256_add_epi32(_mm256_mullo_epi32(first, s0), _mm256_mullo_epi32(second, s1));
                                *isum = _mm256_add_epi32(*isum, scaled);
                            }
                        }
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(c.add(q6k_octet::D).cast()));
                        for (k, acc) in acc.iter_mut().enumerate() {
                            let dx = _mm256_set1_ps(*xk.d.get_unchecked((r + k) * nb + b));
                            *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(isum[k]), *acc);
                        }
                    }
                }
                store_tile(&acc, r, out);
            }

            /// Q4_K, or Q5_K where `FIVE`: one octet (see [`q4k_octet`]) by activation rows
            /// `r..r + R`. Per 64 values, the 8 rows' nibbles (and fifth bits) unpacked
            /// once into 16 lanes vectors, then per
            /// activation row each sub-block's dots times its 6-bit scales, summed over
            /// the super-block; the mins against the activations' sums of 32; then the
            /// f16 super-block scales: ggml's arithmetic for Q4_K (Q5_K) x Q8_K.
            ///
            /// # Safety
            /// As [`q6k_tile`], for Q4_K octet blocks.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn q4k_tile<const R: usize, const FIVE: bool>(octet: *const u8, xk: &Q8KRows, r: usize, out: &mut [f32]) {
                let nb = xk.nb;
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    // SAFETY: every pointer stays inside octet block `b` or inside rows
                    // `r..r + R`'s super-block `b` of `xk`, as the caller promised.
                    unsafe {
                        let c = octet.add(b * q4k_octet::bytes(FIVE));
                        prefetch(c, q4k_octet::bytes(FIVE));
                        let mut isum = [_mm256_setzero_si256(); R];
                        for g in 0..QK_K / 64 {
                            let mut lo = [_mm256_setzero_si256(); 8];
                            let mut hi = [_mm256_setzero_si256(); 8];
                            for v in 0..8 {
                                let q = _mm256_loadu_si256(c.add(q4k_octet::group(FIVE, g) + v * LANES).cast());
                                lo[v] = _mm256_and_si256(q, mask);
                                hi[v] = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                            }
                            if FIVE {
                                let h_lo = _mm256_loadu_si256(c.add(q4k_octet::fifth(g, 0)).cast());
                                let h_hi = _mm256_loadu_si256(c.add(q4k_octet::fifth(g, 1)).cast());
                                for v in 0..8 {
                                    lo[v] = _mm256_or_si256(lo[v], fifth_bits(h_lo, v));
                                    hi[v] = _mm256_or_si256(hi[v], fifth_bits(h_hi, v));
                                }
                            }
                            let s_lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(c.add(q4k_octet::scales(FIVE, 2 * g)).cast()));
                            let s_hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(c.add(q4k_octet::scales(FIVE, 2 * g + 1)).cast()));
                            for (k, isum) in isum.iter_mut().enumerate() {
                                let at = (r + k) * nb + b;
                                let x = xk.qs.as_ptr().add(at * QK_K + 64 * g).cast::<i32>();
                                let mut dots = [_mm256_setzero_si256(); 4];
                                for v in 0..8 {
                                    let x_lo = _mm256_set1_epi32(x.add(v).read_unaligned());
                                    let x_hi = _mm256_set1_epi32(x.add(8 + v).read_unaligned());
                                    dots[v % 2] = dpb(dots[v % 2], lo[v], x_lo);
                                    dots[2 + v % 2] = dpb(dots[2 + v % 2], hi[v], x_hi);
                                }
                                let first = _mm256_mullo_epi32(_mm256_add_epi32(dots[0], dots[1]), s_lo);
                                let second = _mm256_mullo_epi32(_mm256_add_epi32(dots[2], dots[3]), s_hi);
                                *isum = _mm256_add_epi32(*isum, _mm256_add_epi32(first, second));
                            }
                        }
                        let mins: [__m256i; QK_K / 32] = std::array::from_fn(|j| {
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(c.add(q4k_octet::mins(FIVE, j)).cast()))
                        });
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(c.add(q4k_octet::d(FIVE)).cast()));
                        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(c.add(q4k_octet::dmin(FIVE)).cast()));
                        for (k, acc) in acc.iter_mut().enumerate() {
                            let at = (r + k) * nb + b;
                            let mut msum = _mm256_setzero_si256();
                            for (j, mj) in mins.iter().enumerate() {
                                let sum32 = *xk.bsums.get_unchecked(at * 16 + 2 * j)
                                    + *xk.bsums.get_unchecked(at * 16 + 2 * j + 1);
                                msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(*mj, _mm256_set1_epi32(sum32)));
                            }
                            let dx = _mm256_set1_ps(*xk.d.get_unchecked(at));
                            *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(isum[k]), *acc);
                            *acc = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(msum), *acc);
                        }
                    }
                }
                store_tile(&acc, r, out);
            }

            /// Bytes ahead of the block being computed that [`prefetch`] asks for.
            const AHEAD: usize = 4096;

            /// Asks for the `len` bytes [`AHEAD`] of `at` to come into the cache. With
            /// several activation rows a weight block's products take long enough that
            /// the loop keeps too few loads in flight for the hardware prefetchers to
            /// hide memory's latency (measured: a tile of 4 rows over a 4096x4096 Q8_0
            /// matrix took 3x a single row, the next tile over the then cached weights
            /// 1.1x). Prefetches past the end of the weights are harmless (they never
            /// fault).
            #[inline]
            #[target_feature(enable = $features)]
            fn prefetch(at: *const u8, len: usize) {
                let ahead = at.wrapping_add(AHEAD);
                for line in (0..len).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                }
            }

            /// Lanes vector `k`'s fifth bits (bit `k` of each byte of `h`, see
            /// [`crate::kernels`]) as 16 or 0 in each byte, ready to OR into its nibbles.
            #[inline]
            #[target_feature(enable = $features)]
            fn fifth_bits(h: __m256i, k: usize) -> __m256i {
                let bits = _mm256_and_si256(h, _mm256_set1_epi8(1 << k));
                // Bit k to bit 4, within each byte (the mask keeps shifts from crossing).
                match k {
                    0 => _mm256_slli_epi16(bits, 4),
                    1 => _mm256_slli_epi16(bits, 3),
                    2 => _mm256_slli_epi16(bits, 2),
                    3 => _mm256_slli_epi16(bits, 1),
                    4 => bits,
                    5 => _mm256_srli_epi16(bits, 1),
                    6 => _mm256_srli_epi16(bits, 2),
                    _ => _mm256_srli_epi16(bits, 3),
                }
            }

        }
    };
}

/// AVX2 + FMA + F16C: `maddubs` (pairs into i16) then `madd` (into i32). Pair sums stay
/// below i16's limit: a weight byte is at most 63 (6-bit) or 128 (|Q8_0|, through the
/// sign trick), an activation byte at most 128 in magnitude.
pub(super) mod avx2_kernels {
    x86_kernels!(
        k,
        "avx2,fma,f16c",
        false,
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn dpb(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
            let pairs = _mm256_maddubs_epi16(u, x);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    );
    pub(crate) use k::{products, super_products};
}

/// AVX-VNNI (Zen 4 and later, Alder Lake and later): one `vpdpbusd` per 32-byte dot
/// step instead of three instructions, with no 16-bit intermediate.
pub(super) mod vnni_kernels {
    x86_kernels!(
        k,
        "avx2,fma,f16c,avxvnni",
        true,
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
        fn dpb(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(acc, u, x)
        }
    );
    pub(crate) use k::{products, super_products};
}

/// AVX-512 VNNI's `vpdpbusd` on 256-bit vectors (needs AVX-512VL, which also gives the
/// compiler 32 vector registers): for CPUs with AVX-512 VNNI but not AVX-VNNI (Zen 4's
/// EPYCs among them).
pub(super) mod vnni512_kernels {
    x86_kernels!(
        k,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        true,
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        fn dpb(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, u, x)
        }
    );
    pub(crate) use k::{products, super_products};
}
