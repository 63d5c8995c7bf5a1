//! The fast CPU ops over plain slices: SIMD dot products (AVX2+FMA detected at run time,
//! NEON on aarch64, portable fallback), a row-parallel matrix-vector product for decode, a
//! cache-blocked SGEMM split across rayon threads for prefill, the element-wise and RoPE ops,
//! and attention (prefill, and batched decode over several sequences' caches in one dispatch).
//! Each has an obviously-correct twin in `naive.rs` that the tests compare against.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::backend::{AttnShape, RopeShape};
use crate::model::config::MAX_HEAD_DIM;

type DotFn = fn(&[f32], &[f32]) -> f32;

/// The dot product chosen once for this CPU.
fn dot_kernel() -> DotFn {
    static K: OnceLock<DotFn> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return dot_avx2_entry;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return neon::dot_entry;
            }
        }
        dot_portable
    })
}

/// The dot product of two equal-length slices, with the best SIMD the CPU has.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_kernel()(a, b)
}

/// Portable axpy (plain multiply-add: `mul_add` without hardware FMA is a slow libm call).
pub fn axpy_portable(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    use std::arch::x86_64::*;
    let n = y.len().min(x.len());
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
        _mm256_storeu_ps(py.add(i), r);
        i += 8;
    }
    while i < n {
        *py.add(i) += a * *px.add(i);
        i += 1;
    }
}

/// Eight independent accumulators so the compiler can vectorise and pipeline.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: selected only when AVX2 and FMA were detected at run time.
    unsafe { dot_avx2(a, b) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(pa.add(i + 8 * j));
            let y = _mm256_loadu_ps(pb.add(i + 8 * j));
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let hi = _mm256_extractf128_ps(s, 1);
    let q = _mm_add_ps(_mm256_castps256_ps128(s), hi);
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    let mut total = _mm_cvtss_f32(q);
    while i < n {
        total += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    total
}

/// A raw pointer that may cross threads; each thread writes a disjoint part.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: used only to hand disjoint output regions to rayon tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// out (n, m) = x (n, k) @ w (m, k)^T. Few rows (decode): `matmul_few_rows`. More rows
/// (prefill): blocked SGEMM, the output columns split between threads so each reads only its
/// share of `w`.
pub fn matmul(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    assert!(
        out.len() >= n * m && x.len() >= n * k && w.len() >= m * k,
        "matmul: buffer too small"
    );
    if n <= FEW_ROWS {
        return matmul_few_rows(out, x, w, n, k, m);
    }
    let per = gemm_task_columns(m);
    let outp = SendPtr(out.as_mut_ptr());
    (0..m.div_ceil(per)).into_par_iter().for_each(|b| {
        let j0 = b * per;
        let mb = per.min(m - j0);
        let c = outp;
        // SAFETY: w[j0..j0 + mb] holds mb rows of k; out (n, m) was checked above, and each
        // task writes only its own columns.
        unsafe { sgemm_rows(n, k, mb, x, &w[j0 * k..(j0 + mb) * k], c.0.add(j0), m) };
    });
}

/// Output columns per SGEMM task for m of them: about two tasks per thread, whole cache
/// lines of each output row apiece.
pub(super) fn gemm_task_columns(m: usize) -> usize {
    let blocks = (rayon::current_num_threads() * 2)
        .min(m.div_ceil(64))
        .max(1);
    m.div_ceil(blocks).next_multiple_of(16).min(m)
}

/// out[i * ld + j] = x row i . w row j, for x (n, k) and w (mb, k), by SGEMM (`w` read as its
/// transpose).
///
/// # Safety
/// `out` must be valid for writes of n rows of `ld` floats, the first `mb` of each.
pub(super) unsafe fn sgemm_rows(
    n: usize,
    k: usize,
    mb: usize,
    x: &[f32],
    w: &[f32],
    out: *mut f32,
    ld: usize,
) {
    assert!(
        x.len() >= n * k && w.len() >= mb * k && ld >= mb,
        "sgemm_rows: shape"
    );
    // SAFETY: the strides describe x (n, k) row-major and w (mb, k) read as its transpose,
    // both inside the slices checked above; out is the caller's.
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            mb,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            out,
            ld as isize,
            1,
        );
    }
}

/// Up to this many rows (decode, batched decode), each weight row is read once and dotted
/// with every input row while it is in cache; SGEMM's packing would copy the whole matrix.
const FEW_ROWS: usize = 16;

/// out (n, m) = x (n, k) @ w (m, k)^T for small n: weight rows split between threads, each
/// row dotted with all n inputs (decode is memory-bound: every thread streams its own rows).
fn matmul_few_rows(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    let outp = SendPtr(out.as_mut_ptr());
    let rows_per_task = (m / (rayon::current_num_threads() * 8)).clamp(16, 512);
    (0..m.div_ceil(rows_per_task))
        .into_par_iter()
        .for_each(|c| {
            let o = outp;
            for r in c * rows_per_task..((c + 1) * rows_per_task).min(m) {
                let wr = &w[r * k..(r + 1) * k];
                for i in 0..n {
                    // SAFETY: out holds n * m floats (checked above); (i, r) is written only by
                    // the task that owns row r.
                    unsafe { *o.0.add(i * m + r) = dot(&x[i * k..(i + 1) * k], wr) };
                }
            }
        });
}

/// out (n, dim) = x / sqrt(mean(x^2) + eps) * w, row by row (Hugging Face's LlamaRMSNorm).
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], n: usize, eps: f32) {
    let dim = w.len();
    for (o, x) in out[..n * dim]
        .chunks_exact_mut(dim)
        .zip(x.chunks_exact(dim))
    {
        let scale = 1.0 / (dot(x, x) / dim as f32 + eps).sqrt();
        for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
            *o = w * (x * scale);
        }
    }
}

/// RoPE with Hugging Face's half-split pairing (`rope_half`): dimension i of each head is
/// rotated together with i + head_dim/2. `cos`/`sin` are (positions, head_dim/2).
pub fn rope_half(x: &mut [f32], cos: &[f32], sin: &[f32], s: RopeShape) {
    let half = s.head_dim / 2;
    let width = s.n_heads * s.head_dim;
    for (t, row) in x[..s.n_tokens * width].chunks_exact_mut(width).enumerate() {
        let p = (s.pos0 + t) * half;
        let (c, sn) = (&cos[p..p + half], &sin[p..p + half]);
        for head in row.chunks_exact_mut(s.head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c[i] - x1 * sn[i];
                b[i] = x1 * c[i] + x0 * sn[i];
            }
        }
    }
}

/// Keys scored per tile of the attention loop.
const KEY_TILE: usize = 128;

/// Causal attention: out = softmax(q k^T / sqrt(d)) v over positions 0..=pos, one task per
/// token and group of query heads that share a KV head (see `attend`); one token (a decode
/// step) over more than `SPAN` positions is split as in `attention_rows`.
pub fn attention<E: KvElem>(out: &mut [f32], q: &[f32], k: &[E], v: &[E], s: AttnShape) {
    attention_using(best_simd(), out, q, k, v, s);
}

/// A type of cached key and value the attention routines read: `f32`, or `u16` for the bits
/// of an IEEE half (an f16 KV cache), widened exactly as it is loaded.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Whether the values are halves.
    const HALF: bool;
    /// `src` as f32s: itself, or widened into `buf`.
    fn floats<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElem for f32 {
    const HALF: bool = false;

    fn floats<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for u16 {
    const HALF: bool = true;

    fn floats<'a>(src: &'a [u16], buf: &'a mut [f32]) -> &'a [f32] {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let out = &mut buf[..src.len()];
        src.reinterpret_cast::<half::f16>()
            .convert_to_f32_slice(out);
        out
    }
}

/// An instruction set the attention routines can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// 16-lane vectors (head sizes 64 and 128; others go to AVX2).
    Avx512,
    /// 8-lane vectors with FMA.
    Avx2,
    /// 4-lane vectors (aarch64).
    Neon,
    /// Plain loops.
    Portable,
}

/// The instruction sets this CPU can run attention with, best first (the tests check each).
pub fn attention_simd() -> Vec<Simd> {
    let mut all = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            all.push(Simd::Avx512);
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            all.push(Simd::Avx2);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            all.push(Simd::Neon);
        }
    }
    all.push(Simd::Portable);
    all
}

/// The best of `attention_simd`, found once (attention runs in every layer of every step).
fn best_simd() -> Simd {
    static BEST: OnceLock<Simd> = OnceLock::new();
    *BEST.get_or_init(|| attention_simd()[0])
}

/// `attention` with the given instruction set (one `attention_simd` gave).
pub fn attention_using<E: KvElem>(
    simd: Simd,
    out: &mut [f32],
    q: &[f32],
    k: &[E],
    v: &[E],
    s: AttnShape,
) {
    let attend = attend_kernel::<E>(simd, s.head_dim);
    attention_tasks(out, q, s, attend, s.n_tokens, s.n_tokens == 1, |t| {
        (k, v, s.pos0 + t + 1)
    });
}

/// Most rows `attention_rows` takes (one per sequence of a batched decode step).
pub const MAX_ATTN_ROWS: usize = 64;

/// Batched decode attention: row i of q, at position `pos[i]` of its own sequence, attends
/// over positions 0..=pos[i] of that sequence's cache `kv[i] = (k, v)`; out row i. One task
/// per row and group of query heads that share a KV head. `s.n_tokens` and `s.pos0` are not
/// used.
pub fn attention_rows<E: KvElem>(
    out: &mut [f32],
    q: &[f32],
    kv: &[(&[E], &[E])],
    pos: &[usize],
    s: AttnShape,
) {
    let rows = kv.len();
    assert!(
        rows == pos.len() && rows <= MAX_ATTN_ROWS,
        "attention_rows: rows"
    );
    let attend = attend_kernel::<E>(best_simd(), s.head_dim);
    attention_tasks(out, q, s, attend, rows, true, |r| {
        (kv[r].0, kv[r].1, pos[r] + 1)
    });
}

/// Positions one decode attention task covers at most: a longer row is split into spans of
/// this many positions, run as separate tasks and merged by their log-sum-exp, so that one
/// sequence's decode step (a task per KV head) keeps every thread busy. The spans depend
/// only on the row's own length, so a row's result is the same alone or in a batch.
/// (Prefill of several tokens has a task per token already, and is not split.)
const SPAN: usize = 4 * KEY_TILE;

thread_local! {
    /// Each split task's output and log-sum-exps (reused: no allocation per step).
    static SPLIT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `rows` rows of query heads split into tasks of heads that share a KV head, each run by
/// `attend`; `row(r)` gives row r's keys, values and number of positions. With `split`, rows
/// longer than `SPAN` positions are split too.
fn attention_tasks<'a, E: KvElem>(
    out: &mut [f32],
    q: &[f32],
    s: AttnShape,
    attend: AttendFn<E>,
    rows: usize,
    split: bool,
    row: impl Fn(usize) -> (&'a [E], &'a [E], usize) + Sync,
) {
    let heads = heads_per_task(&s);
    let width = heads * s.head_dim;
    let tasks = rows * s.n_heads / heads;
    let task = |i: usize| {
        let first = i * heads;
        let (r, h) = (first / s.n_heads, first % s.n_heads);
        let (k, v, positions) = row(r);
        (k, v, positions, h)
    };
    let parts = if split {
        (0..rows)
            .map(|r| row(r).2.div_ceil(SPAN))
            .max()
            .unwrap_or(1)
    } else {
        1
    };
    if parts <= 1 {
        out[..tasks * width]
            .par_chunks_mut(width)
            .zip(q.par_chunks(width))
            .enumerate()
            .for_each(|(i, (o, qg))| {
                let (k, v, positions, h) = task(i);
                let mut lse = [0f32; MAX_GROUP];
                attend(o, &mut lse, qg, k, v, HeadAttn::of(&s, h, positions));
            });
        return;
    }
    // Taken out, not borrowed: while this thread waits, rayon may run another call on it.
    let mut spans = SPLIT.take();
    let stride = width + heads;
    spans.clear();
    spans.resize(tasks * parts * stride, 0.0);
    let kv_dim = s.n_kv_heads * s.head_dim;
    spans
        .par_chunks_mut(stride)
        .enumerate()
        .for_each(|(i, buf)| {
            let (t, part) = (i / parts, i % parts);
            let (k, v, positions, h) = task(t);
            let (p0, p1) = (part * SPAN, ((part + 1) * SPAN).min(positions));
            let (o, lse) = buf.split_at_mut(width);
            if p0 >= p1 {
                lse.fill(f32::NEG_INFINITY); // an empty span weighs nothing
                return;
            }
            let qg = &q[t * width..(t + 1) * width];
            let (k, v) = (&k[p0 * kv_dim..], &v[p0 * kv_dim..]);
            attend(o, lse, qg, k, v, HeadAttn::of(&s, h, p1 - p0));
        });
    let d = s.head_dim;
    out[..tasks * width]
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(t, o)| {
            let spans = &spans[t * parts * stride..(t + 1) * parts * stride];
            for (hh, o) in o.chunks_exact_mut(d).enumerate() {
                let top = spans
                    .chunks_exact(stride)
                    .map(|b| b[width + hh])
                    .fold(f32::NEG_INFINITY, f32::max);
                o.fill(0.0);
                let mut total = 0f32;
                for b in spans.chunks_exact(stride) {
                    let w = (b[width + hh] - top).exp();
                    if w > 0.0 {
                        total += w;
                        axpy_portable(o, w, &b[hh * d..(hh + 1) * d]);
                    }
                }
                let inv = 1.0 / total;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        });
    SPLIT.set(spans);
}

/// Query heads one attention task takes at most.
const MAX_GROUP: usize = 8;

/// Heads per attention task: the largest divisor of the GQA group size (query heads per KV
/// head) up to `MAX_GROUP`, so that a task's heads share one KV head and read it once.
fn heads_per_task(s: &AttnShape) -> usize {
    let group = s.n_heads / s.n_kv_heads;
    (1..=MAX_GROUP.min(group))
        .rev()
        .find(|&c| group.is_multiple_of(c))
        .unwrap_or(1)
}

/// Where query heads read the cache: their KV head's offset in a cache row, the cache row
/// width, the head size, how many positions they attend over, and the score scale.
#[derive(Clone, Copy)]
struct HeadAttn {
    off: usize,
    kv_dim: usize,
    head_dim: usize,
    positions: usize,
    scale: f32,
}

impl HeadAttn {
    /// For query head `head` (and the ones after it in its task).
    fn of(s: &AttnShape, head: usize, positions: usize) -> HeadAttn {
        let d = s.head_dim;
        HeadAttn {
            off: head / (s.n_heads / s.n_kv_heads) * d,
            kv_dim: s.n_kv_heads * d,
            head_dim: d,
            positions,
            scale: 1.0 / (d as f32).sqrt(),
        }
    }
}

/// `(out, lse, q, k, v, a)`: the heads of `q` over positions `0..a.positions` of `k` and
/// `v`; each head's output goes to `out` and the log of its softmax denominator (with the
/// maximum score added back) to `lse`, which is what `attention_tasks` needs to merge the
/// parts of a split row.
type AttendFn<E> = fn(&mut [f32], &mut [f32], &[f32], &[E], &[E], HeadAttn);

/// The attention routine for an instruction set and head size, chosen once per call (not
/// per key).
fn attend_kernel<E: KvElem>(simd: Simd, head_dim: usize) -> AttendFn<E> {
    #[cfg(target_arch = "x86_64")]
    {
        match (simd, head_dim) {
            (Simd::Avx512, 64) => return attend_avx512_entry::<4, E>,
            (Simd::Avx512, 128) => return attend_avx512_entry::<8, E>,
            (Simd::Avx2, 64) => return attend_avx2_entry::<8, E>,
            (Simd::Avx2, 128) => return attend_avx2_entry::<16, E>,
            (Simd::Avx512 | Simd::Avx2, _) => return attend_avx2_entry::<0, E>,
            _ => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        match (simd, head_dim) {
            (Simd::Neon, 64) => return neon::attend_entry::<16, E>,
            (Simd::Neon, 128) => return neon::attend_entry::<32, E>,
            (Simd::Neon, _) => return neon::attend_entry::<0, E>,
            _ => {}
        }
    }
    let _ = (simd, head_dim);
    |o, lse, qh, k, v, a| attend(o, lse, qh, k, v, a, dot_portable, axpy_portable)
}

/// The bounds the SIMD attention routines rely on: every key and value row read lies inside
/// k and v, and a head of `lanes * vectors` values when `vectors` is not 0.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn check_attend<E>(o: &[f32], lse: &[f32], q: &[f32], k: &[E], v: &[E], a: HeadAttn, width: usize) {
    assert!(
        (width == 0 || a.head_dim == width)
            && o.len() >= q.len()
            && lse.len() >= q.len() / a.head_dim
            && q.len().is_multiple_of(a.head_dim)
            && a.off + a.head_dim <= a.kv_dim
            && k.len() >= a.positions * a.kv_dim
            && v.len() >= a.positions * a.kv_dim,
        "attention: shape"
    );
}

/// `V` is the head size in 8-lane vectors (0: any size).
#[cfg(target_arch = "x86_64")]
fn attend_avx2_entry<const V: usize, E: KvElem>(
    o: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[E],
    v: &[E],
    a: HeadAttn,
) {
    check_attend(o, lse, q, k, v, a, 8 * V);
    // SAFETY: selected only when AVX2, FMA and F16C were detected at run time (or
    // AVX-512F, which has them); shapes checked.
    unsafe {
        if V == 0 {
            attend_avx2_any(o, lse, q, k, v, a)
        } else {
            attend_avx2::<V, E>(o, lse, q, k, v, a)
        }
    }
}

/// `V` is the head size in 16-lane vectors.
#[cfg(target_arch = "x86_64")]
fn attend_avx512_entry<const V: usize, E: KvElem>(
    o: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[E],
    v: &[E],
    a: HeadAttn,
) {
    check_attend(o, lse, q, k, v, a, 16 * V);
    // SAFETY: selected only when AVX-512F was detected at run time; shapes checked.
    unsafe { attend_avx512::<V, E>(o, lse, q, k, v, a) }
}

/// `attend` with AVX2 dot products and axpys, for any head size.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2_any<E: KvElem>(
    o: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[E],
    v: &[E],
    a: HeadAttn,
) {
    // SAFETY (both closures): this function runs only where AVX2 and FMA exist.
    attend(
        o,
        lse,
        q,
        k,
        v,
        a,
        |x, y| unsafe { dot_avx2(x, y) },
        |y, s, x| unsafe { axpy_avx2(y, s, x) },
    )
}

/// The largest of `x` (NaNs ignored), in 8 independent lanes.
fn max_of(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&m)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

/// The sum of `x`, in 8 independent lanes.
fn sum_of(x: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (s, &v) in s.iter_mut().zip(c) {
            *s += v;
        }
    }
    chunks.remainder().iter().chain(&s).sum()
}

/// `attend` for heads of `V` SIMD vectors, the query heads of a KV head taken together (as
/// many as half the `$regs` vector registers hold, at least one): each key and value row is
/// loaded once for all of them, and the heads' output accumulators stay in registers across
/// all the keys. One body for each instruction set: its vector type, lane count and
/// intrinsics.
macro_rules! attend_in_registers {
    ($name:ident, $arch:literal, $features:literal, $regs:literal, $vec:ty, $lanes:literal,
     $load:path, $loadh:path, $store:path, $set1:path, $zero:path, $fmadd:path, $mul:path, $add:path,
     $hsums:path, $exp_minus:path) => {
        #[cfg(target_arch = $arch)]
        #[target_feature(enable = $features)]
        unsafe fn $name<const V: usize, E: KvElem>(
            o: &mut [f32],
            lse: &mut [f32],
            q: &[f32],
            k: &[E],
            v: &[E],
            a: HeadAttn,
        ) {
            /// `$lanes` cached values from `p` as f32s (halves widened: exact).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load_kv<E: KvElem>(p: *const E) -> $vec {
                if E::HALF {
                    $loadh(p.cast())
                } else {
                    $load(p.cast())
                }
            }

            /// Query heads `G` of V vectors each (`q` and `o` start at the first).
            #[target_feature(enable = $features)]
            unsafe fn heads<const V: usize, const G: usize, E: KvElem>(
                o: *mut f32,
                lse: *mut f32,
                q: *const f32,
                k: &[E],
                v: &[E],
                a: &HeadAttn,
            ) {
                let d = V * $lanes;
                let mut scores = [[0f32; KEY_TILE]; G];
                let mut acc: [[$vec; V]; G] = [[$zero(); V]; G];
                let (mut max, mut sum) = ([f32::NEG_INFINITY; G], [0f32; G]);
                // the queries stay in registers when they fit beside the accumulators
                let q_in_regs = 2 * G * V <= $regs;
                let qv: [[$vec; V]; G] = std::array::from_fn(|g| {
                    std::array::from_fn(|i| {
                        if q_in_regs {
                            $load(q.add(g * d + $lanes * i))
                        } else {
                            $zero()
                        }
                    })
                });
                // Each key's products for a head, one vector a key, summed across lanes
                // `$lanes` keys at a time (`$hsums`: far fewer instructions than a
                // horizontal sum per key).
                let mut parts = [[$zero(); $lanes]; G];
                let scale = $set1(a.scale);
                for j0 in (0..a.positions).step_by(KEY_TILE) {
                    let len = KEY_TILE.min(a.positions - j0);
                    // the tile's scores, each key row loaded once for the G heads
                    for jj in 0..len {
                        let kp = k.as_ptr().add((j0 + jj) * a.kv_dim + a.off);
                        crate::backend::cpu::ops::prefetch_values(
                            kp.wrapping_add(crate::backend::cpu::ops::PREFETCH_KEYS * a.kv_dim),
                            d,
                        );
                        let kv: [$vec; V] = std::array::from_fn(|i| load_kv(kp.add($lanes * i)));
                        for (g, part) in parts.iter_mut().enumerate() {
                            let qi = |i: usize| {
                                if q_in_regs {
                                    qv[g][i]
                                } else {
                                    $load(q.add(g * d + $lanes * i))
                                }
                            };
                            let (mut s0, mut s1) = ($zero(), $zero());
                            for i in (0..V).step_by(2) {
                                s0 = $fmadd(qi(i), kv[i], s0);
                                if i + 1 < V {
                                    s1 = $fmadd(qi(i + 1), kv[i + 1], s1);
                                }
                            }
                            part[jj % $lanes] = $add(s0, s1);
                        }
                        let first = jj - jj % $lanes;
                        if jj + 1 - first == $lanes || jj + 1 == len {
                            // Lanes past `jj` hold an earlier group's keys: stored past the
                            // tile's length, where nothing reads them (a tile is whole
                            // vectors long, so the store stays inside `scores`).
                            const { assert!(KEY_TILE % $lanes == 0) };
                            for (part, sc) in parts.iter().zip(scores.iter_mut()) {
                                let sc = &mut sc[first..first + $lanes];
                                $store(sc.as_mut_ptr(), $mul($hsums(part), scale));
                            }
                        }
                    }
                    for g in 0..G {
                        let tile = &mut scores[g][..len];
                        let tile_max = max_of(tile);
                        if tile_max > max[g] {
                            // Rescale what was accumulated under the old maximum.
                            let mut r = [max[g]];
                            $exp_minus(&mut r, tile_max);
                            let r = r[0];
                            sum[g] *= r;
                            let rv = $set1(r);
                            acc[g].iter_mut().for_each(|x| *x = $mul(*x, rv));
                            max[g] = tile_max;
                        }
                        // the tile's probabilities, all its exps at once
                        $exp_minus(tile, max[g]);
                        sum[g] += sum_of(tile);
                    }
                    // each value row loaded once for the G heads
                    for jj in 0..len {
                        let vp = v.as_ptr().add((j0 + jj) * a.kv_dim + a.off);
                        crate::backend::cpu::ops::prefetch_values(
                            vp.wrapping_add(crate::backend::cpu::ops::PREFETCH_KEYS * a.kv_dim),
                            d,
                        );
                        let vv: [$vec; V] = std::array::from_fn(|i| load_kv(vp.add($lanes * i)));
                        for (acc, sc) in acc.iter_mut().zip(&scores) {
                            let p = $set1(sc[jj]);
                            for (x, &vv) in acc.iter_mut().zip(&vv) {
                                *x = $fmadd(p, vv, *x);
                            }
                        }
                    }
                }
                for (g, acc) in acc.iter().enumerate() {
                    *lse.add(g) = max[g] + sum[g].ln();
                    let inv = $set1(1.0 / sum[g]);
                    for (i, x) in acc.iter().enumerate() {
                        $store(o.add(g * d + $lanes * i), $mul(*x, inv));
                    }
                }
            }

            let d = V * $lanes;
            let n = q.len() / d;
            let most = ($regs / 2 / V.max(1)).clamp(1, 4);
            let mut h = 0;
            while h < n {
                let g = (n - h).min(most);
                let (op, qp) = (o.as_mut_ptr().add(h * d), q.as_ptr().add(h * d));
                let lp = lse.as_mut_ptr().add(h);
                match g {
                    1 => heads::<V, 1, E>(op, lp, qp, k, v, &a),
                    2 => heads::<V, 2, E>(op, lp, qp, k, v, &a),
                    3 => heads::<V, 3, E>(op, lp, qp, k, v, &a),
                    _ => heads::<V, 4, E>(op, lp, qp, k, v, &a),
                }
                h += g;
            }
        }
    };
}

/// How many keys ahead attention asks the cache for key and value rows. Each sequence's
/// cache streams from memory: four sequences at 1,000 positions took 11 against 15 ms a
/// step without it (SmolLM2's shape, 2 cores, alternating binaries).
const PREFETCH_KEYS: usize = 8;

/// Asks the cache for the `len` values from `p` (x86; elsewhere the hardware prefetcher
/// alone).
#[inline(always)]
fn prefetch_values<E>(p: *const E, len: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch(p as *const u8, std::mem::size_of::<E>() * len, false);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// One prefetch for every 64 bytes of `bytes` from `p`: into L1 (`prefetcht0`) with `l1`,
/// else into L2 (`prefetcht1`). Which is faster depends on the kernel: see
/// `quant::prefetch_ahead`. Attention's keys and values go into L2: four sequences decoding
/// at 64 to 576 positions gave 1-18% more tokens a second in 7 of 7 alternations (2 cores).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch(p: *const u8, bytes: usize, l1: bool) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    for off in (0..bytes).step_by(64) {
        let at = p.wrapping_add(off) as *const i8;
        // SAFETY: a prefetch only hints the cache and never faults; `wrapping_add` keeps
        // the address arithmetic defined past the end of the buffer.
        unsafe {
            if l1 {
                _mm_prefetch::<_MM_HINT_T0>(at)
            } else {
                _mm_prefetch::<_MM_HINT_T1>(at)
            }
        }
    }
}

/// Lane j of the result: the sum of the 16 lanes of `v[j]` (pairs of vectors interleaved
/// and added, then pairs of those, then across the 128-bit quarters). Each vector's lanes
/// are added in the same order whatever the other vectors hold.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn hsums16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // per quarter: (a0+a2, b0+b2, a1+a3, b1+b3) for a = v[2i], b = v[2i + 1]
    let p: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
    });
    // per quarter: the quarter's sums of v[4i..4i + 4]
    let q: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (p[2 * i], p[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
        )
    });
    // quarters: q[2i]'s sums over quarters 0+1 and 2+3, then q[2i + 1]'s
    let h: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (q[2 * i], q[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    });
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(h[0], h[1]),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(h[0], h[1]),
    )
}

/// Lane j of the result: the sum of the 8 lanes of `v[j]` (as `hsums16`, with two halves).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsums8(v: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let p: [__m256; 4] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b))
    });
    let q: [__m256; 2] = std::array::from_fn(|i| {
        let (a, b) = (p[2 * i], p[2 * i + 1]);
        _mm256_add_ps(
            _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
        )
    });
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(q[0], q[1]),
        _mm256_permute2f128_ps::<0x31>(q[0], q[1]),
    )
}

/// 8 IEEE halves from `p`, widened (exactly).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_halves8(p: *const u16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// 16 IEEE halves from `p`, widened (exactly).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_halves16(p: *const u16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

attend_in_registers!(
    attend_avx2,
    "x86_64",
    "avx2,fma,f16c",
    16,
    std::arch::x86_64::__m256,
    8,
    std::arch::x86_64::_mm256_loadu_ps,
    load_halves8,
    std::arch::x86_64::_mm256_storeu_ps,
    std::arch::x86_64::_mm256_set1_ps,
    std::arch::x86_64::_mm256_setzero_ps,
    std::arch::x86_64::_mm256_fmadd_ps,
    std::arch::x86_64::_mm256_mul_ps,
    std::arch::x86_64::_mm256_add_ps,
    hsums8,
    super::vexp::exp_minus8
);

attend_in_registers!(
    attend_avx512,
    "x86_64",
    "avx512f",
    32,
    std::arch::x86_64::__m512,
    16,
    std::arch::x86_64::_mm512_loadu_ps,
    load_halves16,
    std::arch::x86_64::_mm512_storeu_ps,
    std::arch::x86_64::_mm512_set1_ps,
    std::arch::x86_64::_mm512_setzero_ps,
    std::arch::x86_64::_mm512_fmadd_ps,
    std::arch::x86_64::_mm512_mul_ps,
    std::arch::x86_64::_mm512_add_ps,
    hsums16,
    super::vexp::exp_minus16
);

/// Query heads `q` (heads, d) that share one KV head, over their positions, with the dot
/// and axpy given (inlined into each SIMD variant). Keys are taken in tiles; each head
/// scores the tile and then the running maximum, sum and output are rescaled once per tile
/// (online softmax), so only one tile of scores per head sits on the stack and nothing is
/// allocated. A tile of keys and values is read from memory by the first head and from
/// cache by the others.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend<E: KvElem>(
    o: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[E],
    v: &[E],
    a: HeadAttn,
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(&mut [f32], f32, &[f32]),
) {
    let d = a.head_dim;
    let heads = q.len() / d;
    let mut acc = [0f32; MAX_GROUP * MAX_HEAD_DIM];
    // a cached row widened to f32s (halves only)
    let mut row_buf = [0f32; MAX_HEAD_DIM];
    let mut scores = [0f32; KEY_TILE];
    let mut max = [f32::NEG_INFINITY; MAX_GROUP];
    let mut sum = [0f32; MAX_GROUP];
    for j0 in (0..a.positions).step_by(KEY_TILE) {
        let tile = &mut scores[..KEY_TILE.min(a.positions - j0)];
        for h in 0..heads {
            let (qh, acc) = (&q[h * d..(h + 1) * d], &mut acc[h * d..(h + 1) * d]);
            let mut tile_max = f32::NEG_INFINITY;
            for (jj, sc) in tile.iter_mut().enumerate() {
                let row = (j0 + jj) * a.kv_dim + a.off;
                *sc = dot(qh, E::floats(&k[row..row + d], &mut row_buf)) * a.scale;
                tile_max = tile_max.max(*sc);
            }
            if tile_max > max[h] {
                // Rescale what was accumulated under the old maximum.
                let r = (max[h] - tile_max).exp();
                sum[h] *= r;
                acc.iter_mut().for_each(|a| *a *= r);
                max[h] = tile_max;
            }
            for (jj, &sc) in tile.iter().enumerate() {
                let p = (sc - max[h]).exp();
                sum[h] += p;
                let row = (j0 + jj) * a.kv_dim + a.off;
                axpy(acc, p, E::floats(&v[row..row + d], &mut row_buf));
            }
        }
    }
    for (h, o) in o.chunks_exact_mut(d).enumerate() {
        lse[h] = max[h] + sum[h].ln();
        let inv = 1.0 / sum[h];
        for (o, a) in o.iter_mut().zip(&acc[h * d..(h + 1) * d]) {
            *o = a * inv;
        }
    }
}

/// gate = silu(gate) * up, where silu(x) = x / (1 + e^-x), with the vector exp of the best
/// instruction set this CPU has.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_using(best_simd(), gate, up);
}

/// `silu_mul` with the given instruction set (one `attention_simd` gave).
pub fn silu_mul_using(simd: Simd, gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (gate, up) = (&mut gate[..n], &up[..n]);
    let done = match simd {
        // SAFETY: `attention_simd` lists only what the CPU has; the loops stay in bounds.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { silu_mul_avx512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { silu_mul_avx2(gate, up) },
        #[cfg(target_arch = "aarch64")]
        Simd::Neon => unsafe { neon::silu_mul(gate, up) },
        _ => 0,
    };
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = *g / (1.0 + super::vexp::exp(-*g)) * u;
    }
}

/// `silu_mul` on whole 16-value chunks; how many values it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = gate.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        let (g, u) = (
            _mm512_loadu_ps(gate.as_ptr().add(i)),
            _mm512_loadu_ps(up.as_ptr().add(i)),
        );
        let e = super::vexp::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        let s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
        _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(s, u));
    }
    n
}

/// `silu_mul` on whole 8-value chunks; how many values it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = gate.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let (g, u) = (
            _mm256_loadu_ps(gate.as_ptr().add(i)),
            _mm256_loadu_ps(up.as_ptr().add(i)),
        );
        let e = super::vexp::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        let s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(s, u));
    }
    n
}

/// x += y.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Softmax in place, in f32 with the maximum subtracted first.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// The NEON forms (aarch64, where NEON is always present): 4-lane dot product, axpy,
/// attention and SiLU.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{check_attend, max_of, sum_of, HeadAttn, KvElem, KEY_TILE};

    pub(super) fn dot_entry(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: selected only when NEON was detected; the loop stays in bounds.
        unsafe { dot(a, b) }
    }

    /// Four accumulators of 4 lanes, then the tail one value at a time.
    #[target_feature(enable = "neon")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = vfmaq_f32(
                    *acc,
                    vld1q_f32(pa.add(i + 4 * j)),
                    vld1q_f32(pb.add(i + 4 * j)),
                );
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
            i += 4;
        }
        let mut total = vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ));
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    /// y += a * x.
    #[target_feature(enable = "neon")]
    unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let va = vdupq_n_f32(a);
        let mut i = 0;
        while i + 4 <= n {
            vst1q_f32(
                py.add(i),
                vfmaq_f32(vld1q_f32(py.add(i)), va, vld1q_f32(px.add(i))),
            );
            i += 4;
        }
        while i < n {
            *py.add(i) += a * *px.add(i);
            i += 1;
        }
    }

    /// `V` is the head size in 4-lane vectors (0: any size).
    pub(super) fn attend_entry<const V: usize, E: KvElem>(
        o: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[E],
        v: &[E],
        a: HeadAttn,
    ) {
        check_attend(o, lse, q, k, v, a, 4 * V);
        // SAFETY: selected only when NEON was detected at run time; shapes checked.
        unsafe {
            if V == 0 {
                attend_any(o, lse, q, k, v, a)
            } else {
                attend::<V, E>(o, lse, q, k, v, a)
            }
        }
    }

    /// `attend` with NEON dot products and axpys, for any head size.
    #[target_feature(enable = "neon")]
    unsafe fn attend_any<E: KvElem>(
        o: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[E],
        v: &[E],
        a: HeadAttn,
    ) {
        // SAFETY (both closures): this function runs only where NEON exists.
        super::attend(
            o,
            lse,
            q,
            k,
            v,
            a,
            |x, y| unsafe { dot(x, y) },
            |y, s, x| unsafe { axpy(y, s, x) },
        )
    }

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn zero() -> float32x4_t {
        vdupq_n_f32(0.0)
    }

    /// a * b + c, in the argument order of the x86 forms.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn fmadd(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        vfmaq_f32(c, a, b)
    }

    /// 4 IEEE halves from `p`, widened (exactly, in integers: see `quant`).
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load_halves4(p: *const u16) -> float32x4_t {
        crate::backend::cpu::quant::neon::f16_to_f32(vmovl_u16(vld1_u16(p)))
    }

    /// Lane j of the result: the sum of the 4 lanes of `v[j]` (pairwise adds).
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn hsums4(v: &[float32x4_t; 4]) -> float32x4_t {
        vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]))
    }

    attend_in_registers!(
        attend,
        "aarch64",
        "neon",
        32,
        float32x4_t,
        4,
        vld1q_f32,
        load_halves4,
        vst1q_f32,
        vdupq_n_f32,
        zero,
        fmadd,
        vmulq_f32,
        vaddq_f32,
        hsums4,
        crate::backend::cpu::vexp::exp_minus4
    );

    /// `silu_mul` on whole 4-value chunks; how many values it did.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) -> usize {
        let n = gate.len() / 4 * 4;
        for i in (0..n).step_by(4) {
            let (g, u) = (
                vld1q_f32(gate.as_ptr().add(i)),
                vld1q_f32(up.as_ptr().add(i)),
            );
            let e = crate::backend::cpu::vexp::exp4(vnegq_f32(g));
            let s = vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0), e));
            vst1q_f32(gate.as_mut_ptr().add(i), vmulq_f32(s, u));
        }
        n
    }
}
