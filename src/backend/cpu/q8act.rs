//! Int8 activations (`--activations int8`, opt-in), as llama.cpp does: the input vector is
//! quantized per 32-value block to int8 with one f32 scale, and each weight block is dotted
//! with it in integers. With AVX-512 VNNI every product of up to 16 inputs goes through
//! `vnni.rs` (rows interleaved by 16); elsewhere the one-input decode matvec is here (AVX2
//! `maddubs`: 32 products in a handful of instructions, against a dozen for the AVX2 f32
//! path; with AVX-512 alone the f32 rows kernel is the faster one, measured side by side;
//! NEON widening multiplies on aarch64, speed not measured). Not exact: the activation
//! rounding moves the logits a little, so it is off by default and its error is measured in
//! `tests/quantized_activations.rs` (the f32 path is what the golden tests hold to their
//! tolerances). This module also holds the process's choice of activations
//! (`Activations`): int16 ones exist only in `vnni.rs`.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::model::dequant::{BlockFormat, QuantMatrix, QK};

/// How the CPU's products with Q4_0/Q4_1/Q8_0 weights take their inputs: decode steps
/// (up to 16 inputs) and, with `Int16`, prompts too. The library starts with `F32`; the
/// server and `bench` default to `Int16` (`--activations`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Activations {
    /// As they are, in f32 (the exact path the golden tests hold to their tolerances).
    F32,
    /// Quantized per 32-value block to int16, on CPUs with AVX-512 VNNI (`vnni.rs`; f32
    /// elsewhere), prompts too: decode about 1.5x as fast there and prefill about 1.9x, the
    /// logits move by a few thousandths (within the goldens' tolerance).
    Int16,
    /// Quantized per 32-value block to int8, decode steps only: about twice as fast, the
    /// logits move by up to about 1.
    Int8,
}

static MODE: AtomicU8 = AtomicU8::new(Activations::F32 as u8);

/// Sets how this process's products take their inputs.
pub fn set_activations(a: Activations) {
    MODE.store(a as u8, Ordering::Relaxed);
}

/// How this process's products take their inputs.
pub fn activations() -> Activations {
    match MODE.load(Ordering::Relaxed) {
        m if m == Activations::Int16 as u8 => Activations::Int16,
        m if m == Activations::Int8 as u8 => Activations::Int8,
        _ => Activations::F32,
    }
}

/// Whether int8 activations are on.
pub fn enabled() -> bool {
    activations() == Activations::Int8
}

/// Most blocks per row (rows up to 32768 wide), kept on the stack: no allocation per token.
const MAX_BLOCKS: usize = 1024;

/// `x` quantized per block: `x[i] ~ d[i / 32] * q[i]`, plus the exact f32 block sums (for
/// the 4-bit format's per-block minimum).
struct QuantX {
    q: [i8; MAX_BLOCKS * QK],
    d: [f32; MAX_BLOCKS],
    sum: [f32; MAX_BLOCKS],
}

fn quantize(x: &[f32], out: &mut QuantX) {
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        (out.d[b], out.sum[b]) = quantize_block(xb, &mut out.q[b * QK..(b + 1) * QK]);
    }
}

/// 1.5 * 2^23: adding it and taking it away rounds |v| < 2^22 to an integer, ties to even,
/// without a libm call per value.
pub(super) const ROUND: f32 = 12_582_912.0;

/// One block of 32 values to int8, `xb[j] ~ d * q[j]` with `d = max |x| / 127`, rounded to
/// the nearest integer, ties to even (as `vnni.rs`'s AVX-512 version, which the int8 kernel
/// uses where it runs): returns `d` and the f32 sum of the block.
pub(super) fn quantize_block(xb: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(xb) {
        *q = ((v * id + ROUND) - ROUND) as i8;
    }
    (d, xb.iter().sum())
}

type DotFn = fn(&[u8], &[f32], &[f32], &QuantX, usize) -> f32;

fn dot_fn(eight_bit: bool) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return if eight_bit {
                avx2::q8_entry
            } else {
                avx2::q4_entry
            };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            return if eight_bit {
                neon::q8_entry
            } else {
                neon::q4_entry
            };
        }
    }
    if eight_bit {
        dot_q8_portable
    } else {
        dot_q4_portable
    }
}

/// out (rows) = W x with int8 activations, rows split between rayon threads.
pub fn matvec(out: &mut [f32], x: &[f32], w: &QuantMatrix) {
    let nb = w.cols / QK;
    assert!(
        nb <= MAX_BLOCKS && x.len() >= w.cols && out.len() >= w.rows,
        "q8act::matvec: shape"
    );
    let mut xq = QuantX {
        q: [0; MAX_BLOCKS * QK],
        d: [0.0; MAX_BLOCKS],
        sum: [0.0; MAX_BLOCKS],
    };
    quantize(&x[..w.cols], &mut xq);
    let xq = &xq;
    let dot = dot_fn(w.format == BlockFormat::Q8);
    let rb = w.row_bytes();
    super::quant::par_rows(&mut out[..w.rows], |r| {
        super::quant::prefetch_ahead(&w.qs, r * rb, (r + 1) * rb, true);
        let qs = &w.qs[r * rb..(r + 1) * rb];
        let sc = &w.scales[r * nb..(r + 1) * nb];
        dot(qs, sc, &w.mins[r * nb..(r + 1) * nb], xq, nb)
    });
}

/// 4-bit blocks (low nibbles are values 0..16, high ones 16..32) against int8 `x`.
fn dot_q4_portable(qs: &[u8], scales: &[f32], mins: &[f32], x: &QuantX, nb: usize) -> f32 {
    let mut total = 0f32;
    for b in 0..nb {
        let blk = &qs[b * 16..(b + 1) * 16];
        let xb = &x.q[b * QK..(b + 1) * QK];
        let s: i32 = blk
            .iter()
            .enumerate()
            .map(|(i, &v)| (v & 0x0f) as i32 * xb[i] as i32 + (v >> 4) as i32 * xb[i + 16] as i32)
            .sum();
        total += scales[b] * x.d[b] * s as f32 + mins[b] * x.sum[b];
    }
    total
}

/// 8-bit blocks against int8 `x`.
fn dot_q8_portable(qs: &[u8], scales: &[f32], _mins: &[f32], x: &QuantX, nb: usize) -> f32 {
    let mut total = 0f32;
    for b in 0..nb {
        let s: i32 = qs[b * QK..(b + 1) * QK]
            .iter()
            .zip(&x.q[b * QK..(b + 1) * QK])
            .map(|(&w, &v)| (w as i8) as i32 * v as i32)
            .sum();
        total += scales[b] * x.d[b] * s as f32;
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::quant::avx2::hsum;
    use super::QuantX;

    pub fn q4_entry(qs: &[u8], scales: &[f32], mins: &[f32], x: &QuantX, nb: usize) -> f32 {
        assert!(qs.len() >= nb * 16 && scales.len() >= nb && mins.len() >= nb);
        assert!(nb <= x.d.len());
        // SAFETY: selected only when AVX2 and FMA were detected; lengths checked above.
        unsafe { q4(qs, scales, mins, x, nb) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4(qs: &[u8], scales: &[f32], mins: &[f32], x: &QuantX, nb: usize) -> f32 {
        let mask = _mm_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut macc = 0f32;
        for b in 0..nb {
            let raw = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            // 32 unsigned weights in value order: lo are values 0..16, hi 16..32
            let w = _mm256_set_m128i(hi, lo);
            let xv = _mm256_loadu_si256(x.q.as_ptr().add(b * 32) as *const __m256i);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
            let d = *scales.get_unchecked(b) * *x.d.get_unchecked(b);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
            macc += *mins.get_unchecked(b) * *x.sum.get_unchecked(b);
        }
        hsum(acc) + macc
    }

    pub fn q8_entry(qs: &[u8], scales: &[f32], _mins: &[f32], x: &QuantX, nb: usize) -> f32 {
        assert!(qs.len() >= nb * 32 && scales.len() >= nb && nb <= x.d.len());
        // SAFETY: selected only when AVX2 and FMA were detected; lengths checked above.
        unsafe { q8(qs, scales, x, nb) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8(qs: &[u8], scales: &[f32], x: &QuantX, nb: usize) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let w = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            let xv = _mm256_loadu_si256(x.q.as_ptr().add(b * 32) as *const __m256i);
            // maddubs takes unsigned x signed: |w| times x with w's sign moved onto it
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
            let p = _mm256_madd_epi16(p, ones);
            let d = *scales.get_unchecked(b) * *x.d.get_unchecked(b);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
        }
        hsum(acc)
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::QuantX;

    pub fn q4_entry(qs: &[u8], scales: &[f32], mins: &[f32], x: &QuantX, nb: usize) -> f32 {
        assert!(qs.len() >= nb * 16 && scales.len() >= nb && mins.len() >= nb);
        assert!(nb <= x.d.len());
        // SAFETY: selected only when NEON was detected; lengths checked above.
        unsafe { dot::<false>(qs, scales, mins, x, nb) }
    }

    pub fn q8_entry(qs: &[u8], scales: &[f32], mins: &[f32], x: &QuantX, nb: usize) -> f32 {
        assert!(qs.len() >= nb * 32 && scales.len() >= nb && nb <= x.d.len());
        // SAFETY: selected only when NEON was detected; lengths checked above.
        unsafe { dot::<true>(qs, scales, mins, x, nb) }
    }

    /// Blocks of 8-bit (`E`) or 4-bit weights against int8 `x`: the block's 32 products by
    /// widening multiplies to 16 bits, summed pairwise into four 32-bit lanes (exact), then
    /// scaled in f32.
    #[target_feature(enable = "neon")]
    unsafe fn dot<const E: bool>(
        qs: &[u8],
        scales: &[f32],
        mins: &[f32],
        x: &QuantX,
        nb: usize,
    ) -> f32 {
        let mut acc = vdupq_n_f32(0.0);
        let mut macc = 0f32;
        for b in 0..nb {
            let (w0, w1) = if E {
                let p = qs.as_ptr().add(b * 32) as *const i8;
                (vld1q_s8(p), vld1q_s8(p.add(16)))
            } else {
                // values 0..16 are the low nibbles, 16..32 the high ones: both fit in i8
                let raw = vld1q_u8(qs.as_ptr().add(b * 16));
                (
                    vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f))),
                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw)),
                )
            };
            let xp = x.q.as_ptr().add(b * 32);
            let (x0, x1) = (vld1q_s8(xp), vld1q_s8(xp.add(16)));
            let mut s = vdupq_n_s32(0);
            s = vpadalq_s16(s, vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
            s = vpadalq_s16(s, vmull_high_s8(w0, x0));
            s = vpadalq_s16(s, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
            s = vpadalq_s16(s, vmull_high_s8(w1, x1));
            let d = *scales.get_unchecked(b) * *x.d.get_unchecked(b);
            acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vdupq_n_f32(d));
            if !E {
                macc += *mins.get_unchecked(b) * *x.sum.get_unchecked(b);
            }
        }
        vaddvq_f32(acc) + macc
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A 4- or 8-bit test matrix, its scales and minimums f16 values as in GGUF (`vnni.rs`
    /// takes only those).
    pub(in crate::backend::cpu) fn quant_matrix(
        eight_bit: bool,
        rows: usize,
        cols: usize,
        seed: u32,
    ) -> QuantMatrix {
        let h = |v: f32| half::f16::from_f32(v).to_f32();
        let nb = cols / QK;
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as u8
        };
        let rb = if eight_bit { nb * 32 } else { nb * 16 };
        QuantMatrix {
            rows,
            cols,
            format: if eight_bit {
                BlockFormat::Q8
            } else {
                BlockFormat::Q4
            },
            qs: (0..rows * rb).map(|_| next()).collect(),
            scales: (0..rows * nb)
                .map(|i| h(0.01 + (i % 7) as f32 * 0.003))
                .collect(),
            mins: (0..rows * nb)
                .map(|i| {
                    if eight_bit {
                        0.0
                    } else {
                        h(-0.05 + (i % 5) as f32 * 0.01)
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn simd_kernels_equal_the_portable_ones_and_stay_near_f32() {
        let (rows, cols) = (64, 576);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        for eight_bit in [false, true] {
            let w = quant_matrix(eight_bit, rows, cols, 7);
            let mut exact = vec![0f32; rows];
            super::super::quant::matvec_q(&mut exact, &x, &w);
            let mut xq = Box::new(QuantX {
                q: [0; MAX_BLOCKS * QK],
                d: [0.0; MAX_BLOCKS],
                sum: [0.0; MAX_BLOCKS],
            });
            quantize(&x, &mut xq);
            let nb = cols / QK;
            let rb = w.row_bytes();
            for (r, &e) in exact.iter().enumerate() {
                let qs = &w.qs[r * rb..(r + 1) * rb];
                let sc = &w.scales[r * nb..(r + 1) * nb];
                let mn = &w.mins[r * nb..(r + 1) * nb];
                let fast = dot_fn(eight_bit)(qs, sc, mn, &xq, nb);
                let portable = if eight_bit {
                    dot_q8_portable
                } else {
                    dot_q4_portable
                }(qs, sc, mn, &xq, nb);
                assert!(
                    (fast - portable).abs() <= 1e-4 * portable.abs().max(1.0),
                    "{fast} vs {portable}"
                );
                // Each activation moves by at most half its block's step d, so the error is at
                // most sum over blocks of scale * d / 2 * sum |q|.
                let bound: f32 = (0..nb)
                    .map(|b| {
                        let q: f32 = if eight_bit {
                            qs[b * 32..(b + 1) * 32]
                                .iter()
                                .map(|&v| (v as i8).unsigned_abs() as f32)
                                .sum()
                        } else {
                            qs[b * 16..(b + 1) * 16]
                                .iter()
                                .map(|&v| (v & 15) as f32 + (v >> 4) as f32)
                                .sum()
                        };
                        sc[b] * xq.d[b] / 2.0 * q
                    })
                    .sum();
                assert!(
                    (fast - e).abs() <= bound * 1.001 + 1e-4,
                    "row {r}: {fast} vs exact {e}, bound {bound}"
                );
            }
        }
    }
}
