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

/// The x86 kernels, stamped out once per instruction set: `$features` is the
/// `target_feature` list and `$dot` the 32-byte unsigned x signed dot product (eight
/// sums of four products each).
macro_rules! x86_kernels {
    ($name:ident, $features:literal, $dot:item) => {
        mod $name {
            use std::arch::x86_64::*;

            use crate::kernels::{QFormat, QRows, OCTET, QK};

            /// The table argument of the kernels of formats without one.
            const NO_TABLE: [i8; 16] = [0; 16];
            use crate::kquants::{q4k_octet, q6k_octet, Q8KRows, Super, QK_K};

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
                            QFormat::Q4_0 => kernel::<0>(octet.as_ptr(), xq, r, &NO_TABLE),
                            QFormat::Q4_1 => kernel::<1>(octet.as_ptr(), xq, r, &NO_TABLE),
                            QFormat::Q8_0 => kernel::<2>(octet.as_ptr(), xq, r, &NO_TABLE),
                            QFormat::Q5_0 => kernel::<3>(octet.as_ptr(), xq, r, &NO_TABLE),
                            QFormat::Q5_1 => kernel::<4>(octet.as_ptr(), xq, r, &NO_TABLE),
                            QFormat::Table4(t) => kernel::<5>(octet.as_ptr(), xq, r, t.values()),
                        }
                    };
                    for (i, v) in sums.iter().enumerate() {
                        out[i * m + r] = *v;
                    }
                }
            }

            /// One super-block octet of `kind` (`xk.nb` octet blocks) by every row of
            /// `xk`, into `out` (`[8, m]`).
            ///
            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn super_products(kind: Super, octet: &[u8], xk: &Q8KRows, out: &mut [f32]) {
                // SAFETY: the same CPU features; each kernel checks its slices.
                unsafe {
                    match kind {
                        Super::Q4K => q4k_products(octet, xk, out),
                        Super::Q6K => q6k_products(octet, xk, out),
                    }
                }
            }

            /// Q6_K: one octet (see [`q6k_octet`]) by every row of `xk`, into `out`
            /// (`[8, m]`). Per 32 values, the 8 rows' unsigned 6-bit values (32 above
            /// the signed ones) dotted with the activations, the dots of each 16 kept
            /// apart and multiplied by their scales; the 32s come off through the
            /// activations' sums of 16: ggml's integers for Q6_K x Q8_K.
            ///
            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            unsafe fn q6k_products(octet: &[u8], xk: &Q8KRows, out: &mut [f32]) {
                let (m, nb) = (xk.m, xk.nb);
                assert!(octet.len() >= nb * q6k_octet::BYTES);
                assert!(out.len() >= OCTET * m && xk.qs.len() >= m * nb * QK_K);
                assert!(xk.bsums.len() >= m * nb * 16 && xk.d.len() >= m * nb);
                let mask = _mm256_set1_epi8(0x0F);
                let pairs = _mm256_set1_epi8(0x03);
                for r in 0..m {
                    let mut acc = _mm256_setzero_ps();
                    for b in 0..nb {
                        let at = r * nb + b;
                        // SAFETY: every pointer stays inside octet block `b` or inside
                        // row `r`'s super-block `b` of `xk`, as checked above.
                        unsafe {
                            let c = octet.as_ptr().add(b * q6k_octet::BYTES);
                            let x = xk.qs.as_ptr().add(at * QK_K);
                            let mut isum = _mm256_setzero_si256();
                            for half in 0..2 {
                                // The four chunks of 32 values of this half, for 8 rows.
                                let mut dots = [[_mm256_setzero_si256(); 8]; 4];
                                let xs: [__m256i; 4] = std::array::from_fn(|k| {
                                    _mm256_loadu_si256(x.add(128 * half + 32 * k).cast())
                                });
                                for i in 0..OCTET {
                                    let ql = c.add(i * QK_K / 2 + 64 * half);
                                    let qh = _mm256_loadu_si256(c.add(q6k_octet::HIGH + i * QK_K / 4 + 32 * half).cast());
                                    let ql0 = _mm256_loadu_si256(ql.cast());
                                    let ql1 = _mm256_loadu_si256(ql.add(32).cast());
                                    let h = |shift: i32| {
                                        let bits = match shift {
                                            0 => qh,
                                            2 => _mm256_srli_epi16(qh, 2),
                                            4 => _mm256_srli_epi16(qh, 4),
                                            _ => _mm256_srli_epi16(qh, 6),
                                        };
                                        _mm256_slli_epi16(_mm256_and_si256(bits, pairs), 4)
                                    };
                                    let q = [
                                        _mm256_or_si256(_mm256_and_si256(ql0, mask), h(0)),
                                        _mm256_or_si256(_mm256_and_si256(ql1, mask), h(2)),
                                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), mask), h(4)),
                                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), mask), h(6)),
                                    ];
                                    for k in 0..4 {
                                        dots[k][i] = dot_u8_i8(q[k], xs[k]);
                                    }
                                }
                                for (k, d) in dots.iter().enumerate() {
                                    // Each row's dot of values 0-15 and of 16-31 apart.
                                    let (first, second) = reduce8_halves(*d);
                                    let g = 8 * half + 2 * k;
                                    let sc = c.add(q6k_octet::SCALES + g * OCTET);
                                    let s0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(sc.cast()));
                                    let s1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(sc.add(OCTET).cast()));
                                    isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(first, s0));
                                    isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(second, s1));
                                }
                            }
                            // The 32s: Σ scale x (sum of the 16 activations), times 32.
                            let mut offset = _mm256_setzero_si256();
                            for g in 0..QK_K / 16 {
                                let sc = c.add(q6k_octet::SCALES + g * OCTET);
                                let s = _mm256_cvtepi8_epi32(_mm_loadl_epi64(sc.cast()));
                                let bsum = _mm256_set1_epi32(*xk.bsums.get_unchecked(at * 16 + g));
                                offset = _mm256_add_epi32(offset, _mm256_mullo_epi32(s, bsum));
                            }
                            let total = _mm256_sub_epi32(isum, _mm256_slli_epi32(offset, 5));
                            let dx = _mm256_set1_ps(*xk.d.get_unchecked(at));
                            let d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(c.add(q6k_octet::D).cast())), dx);
                            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(total), acc);
                        }
                    }
                    let mut sums = [0f32; 8];
                    // SAFETY: 8 floats into an array of 8.
                    unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), acc) };
                    for (i, v) in sums.iter().enumerate() {
                        out[i * m + r] = *v;
                    }
                }
            }

            /// Of 8 vectors of 8 i32 lanes, each vector's sum of lanes 0-3 and sum of
            /// lanes 4-7 (a dot product's first and second 16 bytes), as two vectors
            /// (lane i: vector i's).
            #[inline]
            #[target_feature(enable = $features)]
            fn reduce8_halves(v: [__m256i; 8]) -> (__m256i, __m256i) {
                let a = _mm256_hadd_epi32(v[0], v[1]);
                let b = _mm256_hadd_epi32(v[2], v[3]);
                let c = _mm256_hadd_epi32(v[4], v[5]);
                let d = _mm256_hadd_epi32(v[6], v[7]);
                // [lanes 0-3 sums of v0..v3 | lanes 4-7 sums of v0..v3], and of v4..v7.
                let lo = _mm256_hadd_epi32(a, b);
                let hi = _mm256_hadd_epi32(c, d);
                (
                    _mm256_permute2x128_si256(lo, hi, 0x20),
                    _mm256_permute2x128_si256(lo, hi, 0x31),
                )
            }

            /// Q4_K: one octet (`nb` octet blocks, see [`q4k_octet`]) by every row of
            /// `xk`, into `out` (`[8, m]`). Per sub-block of 32, the 8 rows' integer
            /// dots with the activations, times their 6-bit scales, summed over the
            /// super-block; the mins against the activations' sums of 32; then the f16
            /// super-block scales: ggml's arithmetic for Q4_K x Q8_K.
            ///
            /// # Safety
            /// The CPU must support the features this module is compiled for.
            #[target_feature(enable = $features)]
            unsafe fn q4k_products(octet: &[u8], xk: &Q8KRows, out: &mut [f32]) {
                let (m, nb) = (xk.m, xk.nb);
                assert!(octet.len() >= nb * q4k_octet::BYTES);
                assert!(out.len() >= OCTET * m && xk.qs.len() >= m * nb * QK_K);
                assert!(xk.bsums.len() >= m * nb * 16 && xk.d.len() >= m * nb);
                let mask = _mm256_set1_epi8(0x0F);
                for r in 0..m {
                    let mut acc = _mm256_setzero_ps();
                    for b in 0..nb {
                        let at = r * nb + b;
                        // SAFETY: every pointer stays inside octet block `b` or inside
                        // row `r`'s super-block `b` of `xk`, as checked above.
                        unsafe {
                            let c = octet.as_ptr().add(b * q4k_octet::BYTES);
                            let x = xk.qs.as_ptr().add(at * QK_K);
                            // Per row, the scaled dots of every sub-block: each pair of
                            // products (maddubs, at most 2 x 15 x 127) times its 6-bit
                            // scale (madd), so the block needs one reduction, not eight.
                            let mut rows = [_mm256_setzero_si256(); 8];
                            for g in 0..QK_K / 64 {
                                let x_lo = _mm256_loadu_si256(x.add(64 * g).cast());
                                let x_hi = _mm256_loadu_si256(x.add(64 * g + 32).cast());
                                let scales = c.add(q4k_octet::SCALES + 2 * g * OCTET);
                                for (i, row) in rows.iter_mut().enumerate() {
                                    let v = _mm256_loadu_si256(c.add(i * QK_K / 2 + 32 * g).cast());
                                    let lo = _mm256_maddubs_epi16(_mm256_and_si256(v, mask), x_lo);
                                    let hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), x_hi);
                                    let s_lo = _mm256_set1_epi16(i16::from(*scales.add(i)));
                                    let s_hi = _mm256_set1_epi16(i16::from(*scales.add(OCTET + i)));
                                    let both = _mm256_add_epi32(_mm256_madd_epi16(lo, s_lo), _mm256_madd_epi16(hi, s_hi));
                                    *row = _mm256_add_epi32(*row, both);
                                }
                            }
                            let isum = reduce8(rows);
                            let mut msum = _mm256_setzero_si256();
                            for j in 0..QK_K / 32 {
                                let mins = c.add(q4k_octet::MINS + j * OCTET);
                                let mj = _mm256_cvtepu8_epi32(_mm_loadl_epi64(mins.cast()));
                                let sum32 = *xk.bsums.get_unchecked(at * 16 + 2 * j)
                                    + *xk.bsums.get_unchecked(at * 16 + 2 * j + 1);
                                let sj = _mm256_set1_epi32(sum32);
                                msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(mj, sj));
                            }
                            let dx = _mm256_set1_ps(*xk.d.get_unchecked(at));
                            let d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(c.add(q4k_octet::D).cast())), dx);
                            let dmin = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(c.add(q4k_octet::DMIN).cast())), dx);
                            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc);
                            acc = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(msum), acc);
                        }
                    }
                    let mut sums = [0f32; 8];
                    // SAFETY: 8 floats into an array of 8.
                    unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), acc) };
                    for (i, v) in sums.iter().enumerate() {
                        out[i * m + r] = *v;
                    }
                }
            }

            /// The 32 bits of `bits` as 32 bytes, 16 where the bit is set and 0 where it
            /// is not: the fifth bits of a Q5_0/Q5_1 block, ready to OR into its nibbles.
            #[inline]
            #[target_feature(enable = $features)]
            fn fifth_bits(bits: u32) -> __m256i {
                // Byte j takes byte j / 8 of the word, keeps bit j % 8 and tests it.
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(bits as i32),
                    _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
                );
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
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

            /// `F`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0, 3 = Q5_0, 4 = Q5_1, 5 = a 4-bit
            /// table type, whose nibbles are looked up in `table` (one byte shuffle) and
            /// then multiplied as Q8_0's signed bytes are. One octet by activation row
            /// `r`: the 8 rows' results.
            ///
            /// # Safety
            /// The features of this module; `octet` points at `xq.kb` octet blocks of the format; row `r`
            /// exists in `xq`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn kernel<const F: u8>(octet: *const u8, xq: &QRows, r: usize, table: &[i8; 16]) -> [f32; 8] {
                let format = match F {
                    0 => QFormat::Q4_0,
                    1 => QFormat::Q4_1,
                    3 => QFormat::Q5_0,
                    4 => QFormat::Q5_1,
                    // Every table has the same layout.
                    5 => QFormat::Table4(crate::kernels::Table::Iq4Nl),
                    _ => QFormat::Q8_0,
                };
                let (qb, ob) = (format.quant_bytes(), format.octet_bytes());
                // Nibbles of two rows per 32-byte load: 16 bytes a row, in every 4- and
                // 5-bit format.
                let nb = QK / 2;
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = _mm256_setzero_ps();
                // SAFETY: every pointer stays inside the octet's `kb` blocks or inside
                // row `r` of `xq`, as the caller promised.
                unsafe {
                    let values = _mm256_broadcastsi128_si256(_mm_loadu_si128(table.as_ptr().cast()));
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
                                let v = _mm256_loadu_si256(c.add(2 * p * nb).cast());
                                let lo = _mm256_and_si256(v, mask);
                                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                                let mut u0 = _mm256_permute2x128_si256(lo, hi, 0x20);
                                let mut u1 = _mm256_permute2x128_si256(lo, hi, 0x31);
                                if F >= 3 {
                                    let high = c.add(OCTET * nb).cast::<u32>();
                                    u0 = _mm256_or_si256(u0, fifth_bits(high.add(2 * p).read_unaligned()));
                                    u1 = _mm256_or_si256(u1, fifth_bits(high.add(2 * p + 1).read_unaligned()));
                                }
                                if F == 5 {
                                    for (j, u) in [u0, u1].into_iter().enumerate() {
                                        let w = _mm256_shuffle_epi8(values, u);
                                        let (u, xs) = (_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                                        dots[2 * p + j] = dot_u8_i8(u, xs);
                                    }
                                } else {
                                    dots[2 * p] = dot_u8_i8(u0, x);
                                    dots[2 * p + 1] = dot_u8_i8(u1, x);
                                }
                            }
                        }
                        let sums = _mm256_cvtepi32_ps(reduce8(dots));
                        let scales = c.add(OCTET * qb);
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.cast()));
                        let dx = _mm256_set1_ps(*xq.d.get_unchecked(at));
                        acc = _mm256_fmadd_ps(sums, _mm256_mul_ps(d, dx), acc);
                        if F != 2 && F != 5 {
                            let offset = if F == 0 || F == 3 {
                                _mm256_mul_ps(d, _mm256_set1_ps(if F == 0 { -8.0 } else { -16.0 }))
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
pub(super) mod avx2_kernels {
    x86_kernels!(
        k,
        "avx2,fma,f16c",
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn dot_u8_i8(u: __m256i, x: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
        }
    );
    pub(crate) use k::{products, super_products};
}

/// AVX-VNNI (Zen 4 and later, Alder Lake and later): one `vpdpbusd` per 32-byte dot
/// product instead of two instructions, with no 16-bit intermediate.
pub(super) mod vnni_kernels {
    x86_kernels!(
        k,
        "avx2,fma,f16c,avxvnni",
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
        fn dot_u8_i8(u: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x)
        }
    );
    pub(crate) use k::{products, super_products};
}

/// AVX-512 VNNI's `vpdpbusd` on 256-bit vectors (needs AVX-512VL): for CPUs with
/// AVX-512 VNNI but not AVX-VNNI (Zen 4's EPYCs among them).
pub(super) mod vnni512_kernels {
    x86_kernels!(
        k,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        fn dot_u8_i8(u: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
        }
    );
    pub(crate) use k::{products, super_products};
}
