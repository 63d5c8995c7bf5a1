//! Products straight from compact matrices (`QuantMatrix`: 4- and 8-bit blocks, or 16-bit
//! floats). Decode: one input (4/8-bit with AVX2: per block, `scale * sum(q * x) + min *
//! sum(x)`, with the block sums of `x` computed once per call) or several (batched decode:
//! each block widened to f32 once and dotted with every input). Prefill: rows widened a
//! panel at a time for SGEMM. f32 activations and accumulation, so the result equals the
//! dequantized f32 product up to rounding. AVX-512 and AVX2+FMA+F16C kernels are chosen at
//! run time, NEON on aarch64; the portable ones are plain loops.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::model::dequant::{BlockFormat, QuantMatrix, QK};

/// One row of 4-bit blocks against x: `(qs, scales, mins, x, block sums of x)`.
pub type Q4Fn = fn(&[u8], &[f32], &[f32], &[f32], &[f32]) -> f32;
/// One row of 8-bit blocks against x: `(qs, scales, x)`.
pub type Q8Fn = fn(&[u8], &[f32], &[f32]) -> f32;
/// Consecutive weight rows against n inputs: `(format, qs, scales, mins, x, cols, n,
/// out)`. `qs`, `scales` and `mins` start at the first row; input i starts at `x[i * cols]`;
/// `out[i * rows + r]` receives row r dotted with input i, for `rows = out.len() / n` (input
/// after input, as `matmul_q`'s output). The loop over rows is inside the kernel (a call per
/// row cost 24% over the bare kernel; now 9-11%).
pub type RowsFn = fn(BlockFormat, &[u8], &[f32], &[f32], &[f32], usize, usize, &mut [f32]);

/// `BlockFormat`s as the SIMD kernels' const parameter.
const Q4: u8 = BlockFormat::Q4 as u8;
const Q8: u8 = BlockFormat::Q8 as u8;
const F16: u8 = BlockFormat::F16 as u8;
const BF16: u8 = BlockFormat::Bf16 as u8;

/// The `BlockFormat` of a kernel's const parameter.
const fn format_of(f: u8) -> BlockFormat {
    match f {
        Q4 => BlockFormat::Q4,
        Q8 => BlockFormat::Q8,
        F16 => BlockFormat::F16,
        _ => BlockFormat::Bf16,
    }
}

/// `scales[from..]` and `mins[from..]` for format `F` (the float formats have none: the
/// empty slices as given).
///
/// # Safety
/// For the 4- and 8-bit formats, `from` must be at most the slices' lengths.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn params_from<'a, const F: u8>(
    scales: &'a [f32],
    mins: &'a [f32],
    from: usize,
) -> (&'a [f32], &'a [f32]) {
    if format_of(F).scaled() {
        // SAFETY: the caller's.
        unsafe { (scales.get_unchecked(from..), mins.get_unchecked(from..)) }
    } else {
        (scales, mins)
    }
}

/// Block i's scale and minimum for format `F` (0 for the float formats, which have none).
///
/// # Safety
/// For the 4- and 8-bit formats, `scales` and `mins` must hold block i.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn scale_min<const F: u8>(scales: &[f32], mins: &[f32], i: usize) -> (f32, f32) {
    if format_of(F).scaled() {
        // SAFETY: the caller's.
        unsafe { (*scales.get_unchecked(i), *mins.get_unchecked(i)) }
    } else {
        (0.0, 0.0)
    }
}

struct Kernels {
    q4: Q4Fn,
    q8: Q8Fn,
    rows: RowsFn,
    /// Whether one input goes through `rows` too (faster with AVX-512).
    matvec_by_rows: bool,
}

fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        let (name, rows) = rows_kernels()[0];
        let matvec_by_rows = name == "avx512" || name == "neon";
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::detected() {
                return Kernels {
                    q4: avx2::q4_entry,
                    q8: avx2::q8_entry,
                    rows,
                    matvec_by_rows,
                };
            }
        }
        Kernels {
            q4: dot_q4_portable,
            q8: dot_q8_portable,
            rows,
            matvec_by_rows,
        }
    })
}

/// Every one-row dot product pair (4-bit, 8-bit) this CPU can run, with its name (the tests
/// check each against the naive product).
pub fn matvec_kernels() -> Vec<(&'static str, Q4Fn, Q8Fn)> {
    let mut all: Vec<(&'static str, Q4Fn, Q8Fn)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::detected() {
            all.push(("avx2", avx2::q4_entry, avx2::q8_entry));
        }
    }
    all.push(("portable", dot_q4_portable, dot_q8_portable));
    all
}

/// Every kernel for one weight row against several inputs that this CPU can run, best
/// first, with its name (the tests check each against the naive product).
pub fn rows_kernels() -> Vec<(&'static str, RowsFn)> {
    let mut all: Vec<(&'static str, RowsFn)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::detected() {
            all.push(("avx512", avx512::rows_entry));
        }
        if avx2::detected() {
            all.push(("avx2", avx2::rows_entry));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if neon::detected() {
            all.push(("neon", neon::rows_entry));
        }
    }
    all.push(("portable", rows_portable));
    all
}

/// One row of 4-bit blocks against `x`: sum over blocks of
/// `scale * sum(q * x) + min * xsum` (low nibbles are values 0..16, high ones 16..32).
pub fn dot_q4_portable(qs: &[u8], scales: &[f32], mins: &[f32], x: &[f32], xsum: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, ((blk, &d), &m)) in qs.chunks_exact(16).zip(scales).zip(mins).enumerate() {
        let xb = &x[b * QK..(b + 1) * QK];
        let mut s = 0f32;
        for (j, &q) in blk.iter().enumerate() {
            s += (q & 0x0f) as f32 * xb[j] + (q >> 4) as f32 * xb[j + 16];
        }
        total += d * s + m * xsum[b];
    }
    total
}

/// One row of 8-bit blocks against `x`: sum over blocks of `scale * sum(q * x)`.
pub fn dot_q8_portable(qs: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, (blk, &d)) in qs.chunks_exact(32).zip(scales).enumerate() {
        let s: f32 = blk
            .iter()
            .zip(&x[b * QK..(b + 1) * QK])
            .map(|(&q, &xv)| (q as i8) as f32 * xv)
            .sum();
        total += d * s;
    }
    total
}

/// Defines, in an instruction set's module, `rows_entry` (a `RowsFn`) and `rows`, the loop
/// over weight rows around that module's `row::<R, N, E>` (R rows against N inputs, 8-bit
/// blocks or not), inside one `target_feature` function so that `row` inlines. Inputs go
/// `$group` at a time (two accumulators each, in registers); `$n` lists 1..=$group. Up to
/// `$pair` inputs, rows go two at a time: each input's values are loaded once for both, and
/// one input gets four independent FMA chains instead of two. Each row's sums are the same
/// either way (same operations in the same order). `$l1`: the weights are prefetched into
/// L1, else into L2 (`prefetch_ahead`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! rows_loop {
    ($features:literal, $l1:literal, $group:literal, $pair:literal, $($n:literal),+) => {
        #[allow(clippy::too_many_arguments)]
        pub fn rows_entry(
            format: crate::model::dequant::BlockFormat,
            qs: &[u8],
            scales: &[f32],
            mins: &[f32],
            x: &[f32],
            cols: usize,
            n: usize,
            out: &mut [f32],
        ) {
            super::check_rows(format, qs, scales, mins, x, cols, n, out.len());
            for g in (0..n).step_by($group) {
                let kernel: super::GroupFn = match (format as u8, (n - g).min($group)) {
                    $(
                        (super::Q4, $n) => rows::<$n, { super::Q4 }>,
                        (super::Q8, $n) => rows::<$n, { super::Q8 }>,
                        (super::F16, $n) => rows::<$n, { super::F16 }>,
                        (_, $n) => rows::<$n, { super::BF16 }>,
                    )+
                    _ => unreachable!("a group holds 1..={} inputs", $group),
                };
                // SAFETY: selected only when `detected()` found the module's instruction
                // set; lengths checked above.
                unsafe { kernel(qs, scales, mins, &x[g * cols..], cols, n, g, out) }
            }
        }

        /// Inputs g..g + N against every row (see `RowsFn`).
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        unsafe fn rows<const N: usize, const F: u8>(
            qs: &[u8],
            scales: &[f32],
            mins: &[f32],
            x: &[f32],
            cols: usize,
            n: usize,
            g: usize,
            out: &mut [f32],
        ) {
            let nb = cols / super::QK;
            let rb = nb * super::format_of(F).bytes();
            let rows = out.len() / n;
            let mut r = 0;
            let mut put = |r: usize, sums: &[f32; N]| {
                for (i, &v) in sums.iter().enumerate() {
                    *out.get_unchecked_mut((g + i) * rows + r) = v;
                }
            };
            if N <= $pair {
                while r + 2 <= rows {
                    super::prefetch_ahead(qs, r * rb, (r + 2) * rb, $l1);
                    let (sc, mn) = super::params_from::<F>(scales, mins, r * nb);
                    let sums = row::<2, N, F>(
                        qs.get_unchecked(r * rb..),
                        sc,
                        mn,
                        nb,
                        x,
                        cols,
                    );
                    put(r, &sums[0]);
                    put(r + 1, &sums[1]);
                    r += 2;
                }
            }
            for r in r..rows {
                super::prefetch_ahead(qs, r * rb, (r + 1) * rb, $l1);
                let (sc, mn) = super::params_from::<F>(scales, mins, r * nb);
                let [sums] = row::<1, N, F>(
                    qs.get_unchecked(r * rb..),
                    sc,
                    mn,
                    nb,
                    x,
                    cols,
                );
                put(r, &sums);
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    pub(in crate::backend::cpu) fn detected() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::backend::cpu) unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    pub fn q4_entry(qs: &[u8], scales: &[f32], mins: &[f32], x: &[f32], xsum: &[f32]) -> f32 {
        assert!(
            qs.len() >= scales.len() * 16
                && x.len() >= scales.len() * 32
                && mins.len() >= scales.len()
                && xsum.len() >= scales.len()
        );
        // SAFETY: selected only when AVX2 and FMA were detected; lengths checked above.
        unsafe { q4(qs, scales, mins, x, xsum) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4(qs: &[u8], scales: &[f32], mins: &[f32], x: &[f32], xsum: &[f32]) -> f32 {
        let mask = _mm_set1_epi8(0x0f);
        let mut acc = _mm256_setzero_ps();
        let mut macc = 0f32;
        for b in 0..scales.len() {
            let raw = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let xp = x.as_ptr().add(b * 32);
            let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            let mut s = _mm256_mul_ps(f(lo), _mm256_loadu_ps(xp));
            s = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xp.add(8)), s);
            s = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(xp.add(16)), s);
            s = _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xp.add(24)), s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(*scales.get_unchecked(b)), s, acc);
            macc += *mins.get_unchecked(b) * *xsum.get_unchecked(b);
        }
        hsum(acc) + macc
    }

    // Never two rows at a time: the 16 registers cannot hold two rows' widened blocks (8
    // vectors) beside the accumulators.
    rows_loop!("avx2,fma,f16c", true, 4, 0, 1, 2, 3, 4);

    /// R rows (`nb` blocks each, one after the other) against N inputs: each block is
    /// widened to f32 once, then dotted with every input.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row<const R: usize, const N: usize, const F: u8>(
        qs: &[u8],
        scales: &[f32],
        mins: &[f32],
        nb: usize,
        x: &[f32],
        cols: usize,
    ) -> [[f32; N]; R] {
        let mut acc = [[[_mm256_setzero_ps(); 2]; N]; R];
        let mask = _mm_set1_epi8(0x0f);
        let rb = nb * super::format_of(F).bytes();
        for b in 0..nb {
            let w: [[__m256; 4]; R] = std::array::from_fn(|k| {
                let (d, m) = super::scale_min::<F>(scales, mins, k * nb + b);
                widen::<F>(qs.as_ptr().add(k * rb), d, m, b, mask)
            });
            for i in 0..N {
                let xp = x.as_ptr().add(i * cols + b * 32);
                let xv = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(xp.add(o)));
                for (a, w) in acc.iter_mut().zip(&w) {
                    let a = &mut a[i];
                    a[0] = _mm256_fmadd_ps(w[0], xv[0], a[0]);
                    a[1] = _mm256_fmadd_ps(w[1], xv[1], a[1]);
                    a[0] = _mm256_fmadd_ps(w[2], xv[2], a[0]);
                    a[1] = _mm256_fmadd_ps(w[3], xv[3], a[1]);
                }
            }
        }
        acc.map(|a| a.map(|a| hsum(_mm256_add_ps(a[0], a[1]))))
    }

    /// Block b of a row as four f32 vectors of its 32 weights (`d * q + min` for 4-bit
    /// blocks, `d * q` for 8-bit ones, the 16-bit floats widened).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen<const F: u8>(
        qs: *const u8,
        d: f32,
        m: f32,
        b: usize,
        mask: __m128i,
    ) -> [__m256; 4] {
        let d = _mm256_set1_ps(d);
        if F == super::F16 {
            let p = qs.add(b * 64) as *const __m128i;
            [0, 1, 2, 3].map(|j| _mm256_cvtph_ps(_mm_loadu_si128(p.add(j))))
        } else if F == super::BF16 {
            // a bfloat16 is the high half of the f32 of the same value
            let p = qs.add(b * 64) as *const __m128i;
            [0, 1, 2, 3].map(|j| {
                let u = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(j)));
                _mm256_castsi256_ps(_mm256_slli_epi32(u, 16))
            })
        } else if F == super::Q8 {
            let p = qs.add(b * 32) as *const __m128i;
            let (a, c) = (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)));
            let f = |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
            [f(a), f(_mm_srli_si128(a, 8)), f(c), f(_mm_srli_si128(c, 8))]
        } else {
            let m = _mm256_set1_ps(m);
            let raw = _mm_loadu_si128(qs.add(b * 16) as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let f = |v: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), d, m);
            [
                f(lo),
                f(_mm_srli_si128(lo, 8)),
                f(hi),
                f(_mm_srli_si128(hi, 8)),
            ]
        }
    }

    pub fn q8_entry(qs: &[u8], scales: &[f32], x: &[f32]) -> f32 {
        assert!(qs.len() >= scales.len() * 32 && x.len() >= scales.len() * 32);
        // SAFETY: selected only when AVX2 and FMA were detected; lengths checked above.
        unsafe { q8(qs, scales, x) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8(qs: &[u8], scales: &[f32], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for b in 0..scales.len() {
            let p = qs.as_ptr().add(b * 32) as *const __m128i;
            let (a, c) = (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)));
            let xp = x.as_ptr().add(b * 32);
            let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            let mut s = _mm256_mul_ps(f(a), _mm256_loadu_ps(xp));
            s = _mm256_fmadd_ps(f(_mm_srli_si128(a, 8)), _mm256_loadu_ps(xp.add(8)), s);
            s = _mm256_fmadd_ps(f(c), _mm256_loadu_ps(xp.add(16)), s);
            s = _mm256_fmadd_ps(f(_mm_srli_si128(c, 8)), _mm256_loadu_ps(xp.add(24)), s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(*scales.get_unchecked(b)), s, acc);
        }
        hsum(acc)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub fn detected() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    // Inputs 4 at a time, as with AVX2 and NEON: 8 at once (one row at a time) read each
    // row's 8 inputs again from L2 once they outgrow L1 (8 x 8192 f32 in a 1B model's down
    // projection); 4 at a time read a tile's weights again instead, a tenth of the bytes.
    rows_loop!("avx512f", false, 4, 4, 1, 2, 3, 4);

    /// R rows (`nb` blocks each, one after the other) against N inputs: each block is
    /// widened to two 16-lane f32 vectors once, then dotted with every input.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn row<const R: usize, const N: usize, const F: u8>(
        qs: &[u8],
        scales: &[f32],
        mins: &[f32],
        nb: usize,
        x: &[f32],
        cols: usize,
    ) -> [[f32; N]; R] {
        let mut acc = [[[_mm512_setzero_ps(); 2]; N]; R];
        let rb = nb * super::format_of(F).bytes();
        for b in 0..nb {
            let w: [[__m512; 2]; R] = std::array::from_fn(|k| {
                let (d, m) = super::scale_min::<F>(scales, mins, k * nb + b);
                widen::<F>(qs.as_ptr().add(k * rb), d, m, b)
            });
            for i in 0..N {
                let xp = x.as_ptr().add(i * cols + b * 32);
                let xv = [_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16))];
                for (a, w) in acc.iter_mut().zip(&w) {
                    let a = &mut a[i];
                    a[0] = _mm512_fmadd_ps(w[0], xv[0], a[0]);
                    a[1] = _mm512_fmadd_ps(w[1], xv[1], a[1]);
                }
            }
        }
        // All the R x N sums in one fold (`hsums16`: 45 vector instructions for 16 sums,
        // against 8 a sum alone); the vectors past R x N are zeros.
        const { assert!(R * N <= 16) };
        let v: [__m512; 16] = std::array::from_fn(|j| match acc.get(j / N) {
            Some(a) if j < R * N => _mm512_add_ps(a[j % N][0], a[j % N][1]),
            _ => _mm512_setzero_ps(),
        });
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), crate::backend::cpu::ops::hsums16(&v));
        std::array::from_fn(|k| std::array::from_fn(|i| sums[k * N + i]))
    }

    /// `w.dequantize_rows(r0, out)`, a block at a time through `widen` (the same floats).
    pub(super) fn widen_rows(w: &super::QuantMatrix, r0: usize, out: &mut [f32]) {
        let nb = w.cols / super::QK;
        let first = r0 * nb;
        let blocks = out.len() / super::QK;
        assert!(
            (first + blocks) * w.format.bytes() <= w.qs.len()
                && (!w.format.scaled() || first + blocks <= w.scales.len().min(w.mins.len())),
            "widen_rows: shape"
        );
        // SAFETY: AVX-512F was detected (the only caller checks); blocks first.. lie inside
        // the matrix and out holds 32 floats for each.
        unsafe {
            match w.format as u8 {
                super::Q4 => widen_blocks::<{ super::Q4 }>(w, first, out),
                super::Q8 => widen_blocks::<{ super::Q8 }>(w, first, out),
                super::F16 => widen_blocks::<{ super::F16 }>(w, first, out),
                _ => widen_blocks::<{ super::BF16 }>(w, first, out),
            }
        }
    }

    /// `super::widen_blocks_by` for a 4- or 8-bit format.
    pub(super) fn widen_blocks_by(
        format: super::BlockFormat,
        out: &mut [f32],
        nb: usize,
        block: impl Fn(usize, usize) -> super::Block,
    ) {
        // SAFETY: AVX-512F was detected (the only caller checks); each block's bytes are an
        // array of 32, as many as an 8-bit block reads.
        unsafe {
            match format as u8 {
                super::Q4 => widen_each::<{ super::Q4 }>(out, nb, block),
                _ => widen_each::<{ super::Q8 }>(out, nb, block),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn widen_each<const F: u8>(
        out: &mut [f32],
        nb: usize,
        block: impl Fn(usize, usize) -> super::Block,
    ) {
        for (r, row) in out.chunks_exact_mut(nb * super::QK).enumerate() {
            for (b, o) in row.chunks_exact_mut(super::QK).enumerate() {
                let (q, d, m) = block(r, b);
                let [lo, hi] = widen::<F>(q.as_ptr(), d, m, 0);
                _mm512_storeu_ps(o.as_mut_ptr(), lo);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), hi);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn widen_blocks<const F: u8>(w: &super::QuantMatrix, first: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(super::QK).enumerate() {
            let i = first + b;
            let (d, m) = super::scale_min::<F>(&w.scales, &w.mins, i);
            let [lo, hi] = widen::<F>(w.qs.as_ptr(), d, m, i);
            _mm512_storeu_ps(o.as_mut_ptr(), lo);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), hi);
        }
    }

    /// Block b of a row as two f32 vectors of its 32 weights. A 4-bit block's values come
    /// from a 16-entry table of `d * q + min` (`vpermps` by nibble): the same floats as
    /// converting each nibble, in fewer instructions (one core, measured side by side: 1.83
    /// against 2.24 ns per block with one input, 3.46 against 3.87 with four).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn widen<const F: u8>(qs: *const u8, d: f32, m: f32, b: usize) -> [__m512; 2] {
        let d = _mm512_set1_ps(d);
        if F == super::F16 {
            let p = qs.add(b * 64) as *const __m256i;
            [0, 1].map(|j| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(j))))
        } else if F == super::BF16 {
            // a bfloat16 is the high half of the f32 of the same value
            let p = qs.add(b * 64) as *const __m256i;
            [0, 1].map(|j| {
                let u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(j)));
                _mm512_castsi512_ps(_mm512_slli_epi32(u, 16))
            })
        } else if F == super::Q8 {
            let p = qs.add(b * 32) as *const __m128i;
            let f = |v: __m128i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d);
            [f(_mm_loadu_si128(p)), f(_mm_loadu_si128(p.add(1)))]
        } else {
            // The block's 16 values `d * q + min`, looked up by nibble: byte j holds
            // q[j] (low nibble) and q[j + 16] (high), one byte per 32-bit lane. vpermps
            // reads only an index's low 4 bits: the low nibble needs no mask.
            let levels = _mm512_setr_ps(
                0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
            );
            let table = _mm512_fmadd_ps(levels, d, _mm512_set1_ps(m));
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(b * 16) as *const __m128i));
            [
                _mm512_permutexvar_ps(bytes, table),
                _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table),
            ]
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    use std::arch::aarch64::*;

    pub fn detected() -> bool {
        std::arch::is_aarch64_feature_detected!("neon")
    }

    rows_loop!("neon", false, 4, 2, 1, 2, 3, 4);

    /// R rows (`nb` blocks each, one after the other) against N inputs: each block is
    /// widened to eight 4-lane f32 vectors once, then dotted with every input.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn row<const R: usize, const N: usize, const F: u8>(
        qs: &[u8],
        scales: &[f32],
        mins: &[f32],
        nb: usize,
        x: &[f32],
        cols: usize,
    ) -> [[f32; N]; R] {
        let mut acc = [[[vdupq_n_f32(0.0); 2]; N]; R];
        let rb = nb * super::format_of(F).bytes();
        for b in 0..nb {
            let w: [[float32x4_t; 8]; R] = std::array::from_fn(|k| {
                let (d, m) = super::scale_min::<F>(scales, mins, k * nb + b);
                widen::<F>(qs.as_ptr().add(k * rb), d, m, b)
            });
            for i in 0..N {
                let xp = x.as_ptr().add(i * cols + b * 32);
                for j in 0..8 {
                    let xv = vld1q_f32(xp.add(4 * j));
                    for (a, w) in acc.iter_mut().zip(&w) {
                        a[i][j % 2] = vfmaq_f32(a[i][j % 2], w[j], xv);
                    }
                }
            }
        }
        acc.map(|a| a.map(|a| vaddvq_f32(vaddq_f32(a[0], a[1]))))
    }

    /// Four IEEE half floats (one in the low 16 bits of each lane) as f32, exactly. Rust's
    /// NEON half-float conversions are not stable yet, so in integers: the exponent and
    /// mantissa bits moved up 13 places read as an f32 2^112 times too small (subnormal
    /// halves included), infinities and NaNs take the all-ones exponent, then the sign.
    /// The same bits as `half`'s conversion for every half (the test below).
    #[inline]
    #[target_feature(enable = "neon")]
    pub(in crate::backend::cpu) unsafe fn f16_to_f32(h: uint32x4_t) -> float32x4_t {
        let em = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7fff)));
        let scaled = vmulq_f32(
            vreinterpretq_f32_u32(em),
            vdupq_n_f32(f32::from_bits(0x7780_0000)),
        );
        let special = vcgeq_u32(em, vdupq_n_u32(0x7c00 << 13));
        // a NaN comes out quiet, as from the hardware's conversions
        let nan = vcgtq_u32(em, vdupq_n_u32(0x7c00 << 13));
        let quiet = vandq_u32(nan, vdupq_n_u32(0x0040_0000));
        let inf_nan = vorrq_u32(vorrq_u32(em, quiet), vdupq_n_u32(0x7f80_0000));
        let magnitude = vbslq_u32(special, inf_nan, vreinterpretq_u32_f32(scaled));
        let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
        vreinterpretq_f32_u32(vorrq_u32(magnitude, sign))
    }

    #[cfg(test)]
    #[test]
    fn f16_to_f32_is_exact_for_every_half() {
        for bits in (0..=u16::MAX).step_by(4) {
            let h: [u32; 4] = std::array::from_fn(|i| (bits + i as u16) as u32);
            let mut got = [0f32; 4];
            // SAFETY: NEON is always present on aarch64.
            unsafe { vst1q_f32(got.as_mut_ptr(), f16_to_f32(vld1q_u32(h.as_ptr()))) };
            for (g, &h) in got.iter().zip(&h) {
                let want = half::f16::from_bits(h as u16).to_f32();
                assert_eq!(g.to_bits(), want.to_bits(), "half {h:#06x}");
            }
        }
    }

    /// Block b of a row as eight f32 vectors of its 32 weights (`d * q + min` for 4-bit
    /// blocks, `d * q` for 8-bit ones, the 16-bit floats widened).
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn widen<const F: u8>(qs: *const u8, d: f32, m: f32, b: usize) -> [float32x4_t; 8] {
        let d = vdupq_n_f32(d);
        if F == super::F16 {
            let p = qs.add(b * 64) as *const u16;
            std::array::from_fn(|j| f16_to_f32(vmovl_u16(vld1_u16(p.add(4 * j)))))
        } else if F == super::BF16 {
            // a bfloat16 is the high half of the f32 of the same value
            let p = qs.add(b * 64) as *const u16;
            std::array::from_fn(|j| {
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.add(4 * j))))
            })
        } else if F == super::Q8 {
            let p = qs.add(b * 32) as *const i8;
            let f = |v: int8x16_t| {
                let (l, h) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
                [
                    vmovl_s16(vget_low_s16(l)),
                    vmovl_high_s16(l),
                    vmovl_s16(vget_low_s16(h)),
                    vmovl_high_s16(h),
                ]
                .map(|i| vmulq_f32(vcvtq_f32_s32(i), d))
            };
            let ([a0, a1, a2, a3], [c0, c1, c2, c3]) = (f(vld1q_s8(p)), f(vld1q_s8(p.add(16))));
            [a0, a1, a2, a3, c0, c1, c2, c3]
        } else {
            // byte j holds q[j] (low nibble) and q[j + 16] (high)
            let m = vdupq_n_f32(m);
            let raw = vld1q_u8(qs.add(b * 16));
            let f = |v: uint8x16_t| {
                let (l, h) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
                [
                    vmovl_u16(vget_low_u16(l)),
                    vmovl_high_u16(l),
                    vmovl_u16(vget_low_u16(h)),
                    vmovl_high_u16(h),
                ]
                .map(|u| vfmaq_f32(m, vcvtq_f32_u32(u), d))
            };
            let [a0, a1, a2, a3] = f(vandq_u8(raw, vdupq_n_u8(0x0f)));
            let [c0, c1, c2, c3] = f(vshrq_n_u8::<4>(raw));
            [a0, a1, a2, a3, c0, c1, c2, c3]
        }
    }
}

/// How far past the weights being read the kernels ask for the next ones. The hardware
/// prefetcher alone left one-input decode waiting on memory about a third of the time: with
/// this, SmolLM2's decode steps ran 1.15-1.6x as fast at one sequence and 1.1-1.3x at four
/// (2 cores, alternating in one process; 2048 to 8192 bytes did about as well).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the weight bytes `PREFETCH_AHEAD` past `qs[from..to]`, one request a cache
/// line, into L1 with `l1`, else into L2 (x86; elsewhere the hardware prefetcher alone).
/// The AVX-512 and VNNI kernels take L2, the AVX2 ones L1. Measured from memory on a Zen 4
/// (a 1536x576 matrix x 100 or 150, alternating builds): with 2 threads, into L2, the
/// AVX-512 kernels' F16/BF16 rows streamed at 25-30 GB/s against 15-16, Q8_0 rows took
/// 1.05-1.08 against 1.17-2.0 ns a block, and the interleaved records 0.55-0.64 against
/// 0.76-0.81 with one input (F16/BF16 SmolLM2 decode 1.6-1.8x as fast, the default path's
/// 1.07x); on one thread, AVX-512 F16 rows 3.3-3.5 against 7.1-7.4 ns a block, but the
/// AVX2 kernel's 3.0-3.4 against 2.5-2.7 (4- and 8-bit rows about even either way).
#[inline(always)]
pub(super) fn prefetch_ahead(qs: &[u8], from: usize, to: usize, l1: bool) {
    #[cfg(target_arch = "x86_64")]
    super::ops::prefetch(
        qs.as_ptr().wrapping_add(from + PREFETCH_AHEAD),
        to - from,
        l1,
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (qs, from, to, l1);
}

/// One SIMD kernel for a number of inputs and a block format, called on inputs g.. of n:
/// `(qs, scales, mins, x, cols, n, g, out)` (see `RowsFn`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
type GroupFn = unsafe fn(&[u8], &[f32], &[f32], &[f32], usize, usize, usize, &mut [f32]);

/// The bounds every SIMD rows kernel relies on (see `RowsFn`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::too_many_arguments)]
fn check_rows(
    format: BlockFormat,
    qs: &[u8],
    scales: &[f32],
    mins: &[f32],
    x: &[f32],
    cols: usize,
    n: usize,
    out: usize,
) {
    assert!(
        (1..=MAX_ROWS).contains(&n) && out.is_multiple_of(n) && cols.is_multiple_of(QK),
        "rows kernel: shape"
    );
    let blocks = out / n * (cols / QK);
    assert!(
        (!format.scaled() || (scales.len() >= blocks && mins.len() >= blocks))
            && x.len() >= n * cols
            && qs.len() >= blocks * format.bytes(),
        "rows kernel: lengths"
    );
}

/// Most input rows `matmul_q` takes at once (one accumulator each).
pub const MAX_ROWS: usize = 16;

/// Weight rows one kernel call covers in `matmul_q` (its results stay on the stack).
const TILE: usize = 32;

/// out (n, rows) = x (n, cols) @ W^T for a compact W and n <= MAX_ROWS (batched decode):
/// each block is widened to f32 once and dotted with all n inputs, so the weights are read
/// from memory once per step whatever n is.
pub fn matmul_q(out: &mut [f32], x: &[f32], w: &QuantMatrix, n: usize) {
    products(x, n, [(out, w)], false);
}

/// Whether `matmul_q` (and `products`) is what a product of `w` with n inputs runs on: n in
/// 1..=MAX_ROWS, except single inputs that `matvec_q` gives other kernels (int8 activations,
/// or a row at a time where the CPU's kernels prefer it).
pub fn takes(w: &QuantMatrix, n: usize) -> bool {
    (1..=MAX_ROWS).contains(&n)
        && (n > 1 || !w.format.scaled() || kernels().matvec_by_rows && !super::q8act::enabled())
}

/// `K` products of one input x (n, cols), `(out, W)` each as in `matmul_q`, in one set of
/// tasks (q, k and v; gate and up). With `glu` (K = 2, matrices of the same shape), the
/// first output becomes silu(first) * second, each task scaling the rows it computed.
pub fn products<const K: usize>(
    x: &[f32],
    n: usize,
    products: [(&mut [f32], &QuantMatrix); K],
    glu: bool,
) {
    assert!(n <= MAX_ROWS, "products: {n} inputs");
    let ws = products.each_ref().map(|&(_, w)| w);
    let outs = products.map(|(out, w)| (out, w.rows, w.cols));
    par_products(outs, x.len(), n, glu, |m, rows, o| {
        let w = ws[m];
        let mut tile = [0f32; TILE * MAX_ROWS];
        for r0 in rows.clone().step_by(TILE) {
            let r1 = (r0 + TILE).min(rows.end);
            let len = r1 - r0;
            let tile = &mut tile[..len * n];
            let (qs, scales, mins) = row_slices(w, r0, r1);
            (kernels().rows)(w.format, qs, scales, mins, x, w.cols, n, tile);
            for (i, sums) in tile.chunks_exact(len).enumerate() {
                // SAFETY: out holds n * rows floats; rows r0..r1 of each input are
                // written only by the task that owns them.
                unsafe {
                    std::ptr::copy_nonoverlapping(sums.as_ptr(), o.0.add(i * w.rows + r0), len)
                };
            }
        }
    });
}

/// Runs `task(m, rows, out)`, which computes rows `rows` of product m for n inputs into
/// `out` (the output `outs[m]`: `(out, rows, cols)` of each product, all of `cols`
/// columns, whose input holds `x_len` floats), in parallel over all the products' rows
/// split into tasks of whole 16-row groups (no output cache line is written from two
/// cores). With `glu` (two products of one shape), each task computes its rows of both,
/// then makes the first silu(first) * second there.
pub(super) fn par_products<const K: usize>(
    outs: [(&mut [f32], usize, usize); K],
    x_len: usize,
    n: usize,
    glu: bool,
    task: impl Fn(usize, std::ops::Range<usize>, super::ops::SendPtr) + Sync,
) {
    let cols = outs[0].2;
    assert!(
        x_len >= n * cols
            && outs
                .iter()
                .all(|(out, rows, c)| *c == cols && out.len() >= n * rows)
            && (!glu || K == 2 && outs[0].1 == outs[1].1),
        "products: shape"
    );
    if n == 0 {
        return;
    }
    let rows = outs.each_ref().map(|o| o.1);
    let ptrs = outs.map(|(out, _, _)| super::ops::SendPtr(out.as_mut_ptr()));
    let total: usize = if glu { rows[0] } else { rows.iter().sum() };
    let per_task = (total / (rayon::current_num_threads() * 8))
        .clamp(16, 256)
        .next_multiple_of(16);
    let tasks = rows.map(|r| r.div_ceil(per_task));
    let all = if glu { tasks[0] } else { tasks.iter().sum() };
    (0..all).into_par_iter().for_each(|mut t| {
        let mut m = 0;
        while !glu && t >= tasks[m] {
            t -= tasks[m];
            m += 1;
        }
        let range = t * per_task..((t + 1) * per_task).min(rows[m]);
        task(m, range.clone(), ptrs[m]);
        if glu {
            task(1, range.clone(), ptrs[1]);
            // SAFETY: this task alone wrote these rows of both outputs (above), which hold
            // n * rows floats each (asserted).
            unsafe { silu_rows(ptrs[0], ptrs[1], rows[0], n, range) };
        }
    });
}

/// gate = silu(gate) * up on rows `rows` of each of n inputs, in outputs `width` wide.
///
/// # Safety
/// Both outputs hold n * width floats, and no other thread touches these rows meanwhile.
unsafe fn silu_rows(
    gate: super::ops::SendPtr,
    up: super::ops::SendPtr,
    width: usize,
    n: usize,
    rows: std::ops::Range<usize>,
) {
    for i in 0..n {
        let at = i * width + rows.start;
        // SAFETY: the caller's.
        let (g, u) = unsafe {
            (
                std::slice::from_raw_parts_mut(gate.0.add(at), rows.len()),
                std::slice::from_raw_parts(up.0.add(at), rows.len()),
            )
        };
        super::ops::silu_mul(g, u);
    }
}

/// Rows r0..r1 of `w`: their packed values, scales and minimums (none for the float
/// formats).
fn row_slices(w: &QuantMatrix, r0: usize, r1: usize) -> (&[u8], &[f32], &[f32]) {
    let (nb, rb) = (w.cols / QK, w.row_bytes());
    let qs = &w.qs[r0 * rb..r1 * rb];
    match w.format.scaled() {
        true => (qs, &w.scales[r0 * nb..r1 * nb], &w.mins[r0 * nb..r1 * nb]),
        false => (qs, &[], &[]),
    }
}

/// Bytes of f32 weight rows each thread widens at a time in `matmul_q_gemm`. SGEMM packs
/// its input rows again for every panel, so small panels cost time: on SmolLM2, 64-row
/// panels prefilled at 390-400 tokens/s, 512 rows at 450-465 (alternating, one process).
const PANEL_BYTES: usize = 4 << 20;

thread_local! {
    /// Each thread's panel of widened weight rows, kept between calls.
    static PANEL_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// out (n, rows) = x (n, cols) @ W^T for many inputs (prefill): each task widens its weight
/// rows to f32 a panel at a time and multiplies them by SGEMM, so the f32 matrix never
/// exists whole. The widening is one pass over the weights per call, against n multiply-adds
/// per weight in the SGEMM, and gives the very floats of dequantizing the file.
pub fn matmul_q_gemm(out: &mut [f32], x: &[f32], w: &QuantMatrix, n: usize) {
    gemm_widened(out, x, n, w.rows, w.cols, |r0, panel| {
        widen_rows(w, r0, panel)
    });
}

/// `matmul_q_gemm` for a `rows x cols` matrix of any layout: `widen(r0, panel)` writes rows
/// r0.. as f32 (`panel.len() / cols` of them).
pub fn gemm_widened(
    out: &mut [f32],
    x: &[f32],
    n: usize,
    rows: usize,
    cols: usize,
    widen: impl Fn(usize, &mut [f32]) + Sync,
) {
    let (k, m) = (cols, rows);
    assert!(
        x.len() >= n * k && out.len() >= n * m,
        "matmul_q_gemm: shape"
    );
    let per = super::ops::gemm_task_columns(m);
    let outp = super::ops::SendPtr(out.as_mut_ptr());
    (0..m.div_ceil(per)).into_par_iter().for_each(|b| {
        let c = outp;
        PANEL_BUF.with_borrow_mut(|buf| {
            let panel_rows = (PANEL_BYTES / (4 * k)).max(16);
            buf.resize(panel_rows * k, 0.0);
            let end = ((b + 1) * per).min(m);
            for j0 in (b * per..end).step_by(panel_rows) {
                let mb = panel_rows.min(end - j0);
                let panel = &mut buf[..mb * k];
                widen(j0, panel);
                // SAFETY: out holds n rows of m floats (checked above); this task writes
                // only columns j0..j0 + mb of its own share.
                unsafe { super::ops::sgemm_rows(n, k, mb, x, panel, c.0.add(j0), m) };
            }
        });
    });
}

/// `w.dequantize_rows(r0, out)`, with AVX-512 where the CPU has it.
fn widen_rows(w: &QuantMatrix, r0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::detected() {
            return avx512::widen_rows(w, r0, out);
        }
    }
    w.dequantize_rows(r0, out)
}

/// The packed values of a 4- or 8-bit block (the first `format.bytes()`), its scale and its
/// minimum.
#[cfg(target_arch = "x86_64")]
pub type Block = ([u8; QK], f32, f32);

/// `widen_rows` for a matrix laid out otherwise (`vnni::Interleaved`, x86-64 only): rows of
/// `nb` blocks, block b of row r (32 floats at `out[(r * nb + b) * 32..]`) from
/// `block(r, b)`, with AVX-512 where the CPU has it (the same floats as `widen_rows` gives
/// for the same blocks).
#[cfg(target_arch = "x86_64")]
pub(super) fn widen_blocks_by(
    format: BlockFormat,
    out: &mut [f32],
    nb: usize,
    block: impl Fn(usize, usize) -> Block,
) {
    assert!(format.scaled(), "widen_blocks_by: a 4- or 8-bit format");
    if avx512::detected() {
        return avx512::widen_blocks_by(format, out, nb, block);
    }
    dequantize_blocks_by(format, out, nb, block)
}

/// `widen_blocks_by` in plain loops: the floats of `QuantMatrix::dequantize_rows` for the
/// same blocks.
#[cfg(target_arch = "x86_64")]
pub(super) fn dequantize_blocks_by(
    format: BlockFormat,
    out: &mut [f32],
    nb: usize,
    block: impl Fn(usize, usize) -> Block,
) {
    for (r, row) in out.chunks_exact_mut(nb * QK).enumerate() {
        for (b, o) in row.chunks_exact_mut(QK).enumerate() {
            let (q, d, m) = block(r, b);
            format.widen(&q[..format.bytes()], d, m, o);
        }
    }
}

/// Rows against n inputs (see `RowsFn`): each block is widened to f32 once, then dotted
/// with every input.
#[allow(clippy::too_many_arguments)]
pub fn rows_portable(
    format: BlockFormat,
    qs: &[u8],
    scales: &[f32],
    mins: &[f32],
    x: &[f32],
    cols: usize,
    n: usize,
    out: &mut [f32],
) {
    assert!(n <= MAX_ROWS, "rows kernel: shape");
    let (nb, bb) = (cols / QK, format.bytes());
    let rows = out.len() / n;
    let mut block = [0f32; QK];
    for r in 0..rows {
        let mut acc = [0f32; MAX_ROWS];
        for b in 0..nb {
            let i = r * nb + b;
            let (d, m) = format.params(scales, mins, i);
            format.widen(&qs[i * bb..(i + 1) * bb], d, m, &mut block);
            for (i, a) in acc[..n].iter_mut().enumerate() {
                let xb = &x[i * cols + b * QK..i * cols + (b + 1) * QK];
                *a += block.iter().zip(xb).map(|(w, x)| w * x).sum::<f32>();
            }
        }
        for (i, &a) in acc[..n].iter().enumerate() {
            out[i * rows + r] = a;
        }
    }
}

/// Most blocks per row whose sums of `x` are kept on the stack (rows up to 32768 wide).
const MAX_BLOCKS: usize = 1024;

/// out (rows) = W x for a compact W, rows split between rayon threads. With AVX-512 the
/// one-input case of the batched kernel is the faster one (measured on one core: 2.5
/// against 3.7 ns per block); with AVX2 the dot product below, which takes each block's
/// minimum through the block sums of x (the float formats go through the batched kernel).
pub fn matvec_q(out: &mut [f32], x: &[f32], w: &QuantMatrix) {
    if takes(w, 1) {
        return matmul_q(out, x, w, 1);
    }
    if super::q8act::enabled() {
        return super::q8act::matvec(out, x, w);
    }
    let k = kernels();
    let nb = w.cols / QK;
    assert!(
        nb <= MAX_BLOCKS && x.len() >= w.cols && out.len() >= w.rows,
        "matvec_q: shape"
    );
    let mut xsum = [0f32; MAX_BLOCKS];
    for (s, xb) in xsum.iter_mut().zip(x[..w.cols].chunks_exact(QK)) {
        *s = xb.iter().sum();
    }
    let xsum = &xsum[..nb];
    let rb = w.row_bytes();
    par_rows(&mut out[..w.rows], |r| {
        prefetch_ahead(&w.qs, r * rb, (r + 1) * rb, true);
        let (qs, sc) = (&w.qs[r * rb..(r + 1) * rb], &w.scales[r * nb..(r + 1) * nb]);
        if w.format == BlockFormat::Q8 {
            (k.q8)(qs, sc, x)
        } else {
            (k.q4)(qs, sc, &w.mins[r * nb..(r + 1) * nb], x, xsum)
        }
    });
}

/// `out[r] = row(r)` for every row, rows split between rayon threads in chunks.
pub(super) fn par_rows(out: &mut [f32], row: impl Fn(usize) -> f32 + Sync) {
    let rows_per_task = (out.len() / (rayon::current_num_threads() * 8)).clamp(16, 512);
    out.par_chunks_mut(rows_per_task)
        .enumerate()
        .for_each(|(c, o)| {
            for (j, o) in o.iter_mut().enumerate() {
                *o = row(c * rows_per_task + j);
            }
        });
}
