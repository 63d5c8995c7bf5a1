//! e^x for 16, 8 or 4 lanes at once (the Cephes polynomial for single precision: within 2 ulp
//! of the exact value wherever e^x is a normal f32; clamped outside), for the exps of
//! attention's softmax and of SiLU: a libm call per value cost more than the dot products
//! around it.

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Below this e^x is under f32's smallest normal (the result is then 2^-126, not 0).
const LO: f32 = -87.336_54;
/// Above this e^x overflows f32 (the result is then e^88.02, not infinity).
const HI: f32 = 88.02;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two, so that `x - n ln 2` loses no bits.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// e^r - 1 - r ~ r^2 * P(r) on |r| <= ln2 / 2.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// e^x, one value: the same steps as the vector forms (for tails and the portable path).
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let x = x.clamp(LO, HI);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let p = P.iter().skip(1).fold(P[0], |p, &c| p.mul_add(r, c));
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x[i] = e^(x[i] - m)` for every value, with the widest vectors this CPU has (the same
/// bits as `exp` whichever it takes).
pub fn exp_minus(x: &mut [f32], m: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected.
            return unsafe { exp_minus16(x, m) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected.
            return unsafe { exp_minus8(x, m) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            // SAFETY: NEON was detected.
            return unsafe { exp_minus4(x, m) };
        }
    }
    x.iter_mut().for_each(|v| *v = exp(*v - m));
}

/// e^x in each of 16 lanes (NaN stays NaN).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp16(x: __m512) -> __m512 {
    // max/min return their second operand when one is NaN: x goes second to keep it.
    let x = _mm512_min_ps(_mm512_set1_ps(HI), _mm512_max_ps(_mm512_set1_ps(LO), x));
    let n = _mm512_roundscale_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        _MM_FROUND_TO_NEAREST_INT,
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let y = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let scale = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)),
        23,
    );
    _mm512_mul_ps(y, _mm512_castsi512_ps(scale))
}

/// e^x in each of 8 lanes (NaN stays NaN).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_set1_ps(HI), _mm256_max_ps(_mm256_set1_ps(LO), x));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let scale = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(scale))
}

/// `x[i] = e^(x[i] - m)` for every value, 16 lanes at a time.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_minus16(x: &mut [f32], m: f32) {
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        let v = _mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), _mm512_set1_ps(m));
        _mm512_storeu_ps(c.as_mut_ptr(), exp16(v));
    }
    // The tail in one masked vector too: `exp` alone calls libm for each `mul_add` where
    // the build has no FMA (a fifth of attention's time went there).
    let rest = chunks.into_remainder();
    let k = ((1u32 << rest.len()) - 1) as __mmask16;
    let v = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, rest.as_ptr()), _mm512_set1_ps(m));
    _mm512_mask_storeu_ps(rest.as_mut_ptr(), k, exp16(v));
}

/// `x[i] = e^(x[i] - m)` for every value, 8 lanes at a time.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_minus8(x: &mut [f32], m: f32) {
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), _mm256_set1_ps(m));
        _mm256_storeu_ps(c.as_mut_ptr(), exp8(v));
    }
    // the tail through a vector as well (see `exp_minus16`)
    let rest = chunks.into_remainder();
    let mut t = [0f32; 8];
    t[..rest.len()].copy_from_slice(rest);
    let v = _mm256_sub_ps(_mm256_loadu_ps(t.as_ptr()), _mm256_set1_ps(m));
    _mm256_storeu_ps(t.as_mut_ptr(), exp8(v));
    rest.copy_from_slice(&t[..rest.len()]);
}

/// e^x in each of 4 lanes (NaN stays NaN: NEON's min and max return it).
///
/// # Safety
/// The CPU must have NEON.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
pub unsafe fn exp4(x: float32x4_t) -> float32x4_t {
    let x = vminq_f32(vdupq_n_f32(HI), vmaxq_f32(vdupq_n_f32(LO), x));
    let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(LOG2E)));
    let r = vfmsq_f32(x, n, vdupq_n_f32(LN2_HI));
    let r = vfmsq_f32(r, n, vdupq_n_f32(LN2_LO));
    let mut p = vdupq_n_f32(P[0]);
    for c in &P[1..] {
        p = vfmaq_f32(vdupq_n_f32(*c), p, r);
    }
    let y = vaddq_f32(vfmaq_f32(r, p, vmulq_f32(r, r)), vdupq_n_f32(1.0));
    let scale = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
    vmulq_f32(y, vreinterpretq_f32_s32(scale))
}

/// `x[i] = e^(x[i] - m)` for every value, 4 lanes at a time.
///
/// # Safety
/// The CPU must have NEON.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
pub unsafe fn exp_minus4(x: &mut [f32], m: f32) {
    let mut chunks = x.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = vsubq_f32(vld1q_f32(c.as_ptr()), vdupq_n_f32(m));
        vst1q_f32(c.as_mut_ptr(), exp4(v));
    }
    // the tail through a vector as well (see `exp_minus16`)
    let rest = chunks.into_remainder();
    let mut t = [0f32; 4];
    t[..rest.len()].copy_from_slice(rest);
    vst1q_f32(
        t.as_mut_ptr(),
        exp4(vsubq_f32(vld1q_f32(t.as_ptr()), vdupq_n_f32(m))),
    );
    rest.copy_from_slice(&t[..rest.len()]);
}
