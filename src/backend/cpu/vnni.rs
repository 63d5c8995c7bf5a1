//! Quantized activations on CPUs with AVX-512 VNNI (`--activations int16`, the server's
//! default, and `--activations int8`): the 4- and 8-bit matrices re-laid with their rows
//! interleaved by 16, so that one `vpdpbusd` takes 4 values of one block from each of 16
//! rows against 4 int8 inputs (64 multiply-adds), and each block's scaling is one vector
//! operation for all 16 rows. The f32 kernels must scale every row's block on its own; here
//! a block of 16 rows costs each input 8 integer dot products, 3 integer adds and 4 float
//! operations, against 32 FMAs. The inputs are quantized per block exactly as `q8act` does
//! (the same rounding, whose accuracy `tests/quantized_activations.rs` measures); only the
//! order of the float sums differs. With int16 inputs (15 bits a value against int8's 7:
//! the logits stay within the goldens' tolerance), one `vpdpwssd` takes 2 values from each
//! of 16 rows (32 multiply-adds): 16 integer dot products a block and input. With int16,
//! prompts go through these kernels too (any number of inputs, 4 at a time: twice as fast
//! as prefill's f32 SGEMM); int8 takes products of up to 16 inputs, since its rounding
//! moves the logits too far over a whole prompt. When the CPU backend holds a matrix in
//! this layout alone, its rows are widened back from the records (embedding lookups, and
//! prefill once the activations are set back to f32 or to int8 for more than 16 inputs).
//! x86-64 only (the module is compiled there alone).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;
use rayon::prelude::*;

use super::quant::MAX_ROWS;
use crate::model::arena::HugeBuf;
use crate::model::dequant::{BlockFormat, QuantMatrix, QK};

/// Rows per group: the 16 lanes of an AVX-512 register.
const LANES: usize = 16;

/// A 4- or 8-bit matrix with its rows interleaved by 16 (see the module doc): one record
/// of 64-byte lines for each group of 16 rows and each block, group after group, so that a
/// product reads a single stream. A record holds the block's bytes as dwords (4 for 4-bit
/// blocks, whose byte j holds values j and j + 16; 8 for 8-bit ones), dword t of the 16 rows
/// in line t; then one line of the 16 rows' scales as f16 and their minimums as f16 (4-bit)
/// or the sums of their block's values as i16 (8-bit: undoes the +128 that makes the inputs
/// unsigned). GGUF stores scales and minimums as f16, so they fit exactly; a matrix whose
/// do not is left to the other kernels.
pub struct Interleaved {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    records: HugeBuf<u8>,
}

/// Whether this CPU has the instructions (and the OS keeps the AVX-512 registers).
pub fn detected() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

impl Interleaved {
    /// `w` re-laid, for 4- and 8-bit matrices whose rows are a multiple of 16 and whose
    /// scales and minimums are f16 values (else `None`).
    pub fn new(w: &QuantMatrix) -> Option<Interleaved> {
        let f16 = |v: f32| f16::from_f32(v).to_f32() == v;
        let q8 = w.format == BlockFormat::Q8;
        if !w.format.scaled()
            || !w.rows.is_multiple_of(LANES)
            || !w
                .scales
                .iter()
                .chain(if q8 { &[][..] } else { &w.mins })
                .all(|&v| f16(v))
        {
            return None;
        }
        let (nb, bb) = (w.cols / QK, w.format.bytes());
        let record = record_bytes(w.format);
        let records = HugeBuf::filled(w.rows / LANES * nb * record, |records| {
            // record i: group i / nb, block i % nb
            records
                .par_chunks_mut(record)
                .enumerate()
                .for_each(|(i, rec)| {
                    let block = |r: usize| ((i / nb) * LANES + r) * nb + i % nb;
                    let (values, params) = rec.split_at_mut(bb * LANES);
                    for (t, line) in values.chunks_exact_mut(64).enumerate() {
                        for (r, dword) in line.chunks_exact_mut(4).enumerate() {
                            let at = block(r) * bb + 4 * t;
                            dword.copy_from_slice(&w.qs[at..at + 4]);
                        }
                    }
                    let (scales, extra) = params.split_at_mut(2 * LANES);
                    let pairs = scales.chunks_exact_mut(2).zip(extra.chunks_exact_mut(2));
                    for (r, (s, e)) in pairs.enumerate() {
                        s.copy_from_slice(&f16::from_f32(w.scales[block(r)]).to_le_bytes());
                        e.copy_from_slice(&if q8 {
                            let at = block(r) * bb;
                            let sum: i32 = w.qs[at..at + bb].iter().map(|&q| q as i8 as i32).sum();
                            (sum as i16).to_le_bytes()
                        } else {
                            f16::from_f32(w.mins[block(r)]).to_le_bytes()
                        });
                    }
                })
        });
        reserve_inputs(w.cols);
        Some(Interleaved {
            format: w.format,
            rows: w.rows,
            cols: w.cols,
            records,
        })
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows r0.. as f32 (`out.len() / cols` of them): the floats
    /// `QuantMatrix::dequantize_rows` gives for the matrix this was made from.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let (nb, block) = self.blocks_from(r0, out.len());
        super::quant::dequantize_blocks_by(self.format, out, nb, block);
    }

    /// `dequantize_rows` with AVX-512 (the floats of the row-major matrix's SGEMM panels).
    pub fn widen_rows(&self, r0: usize, out: &mut [f32]) {
        let (nb, block) = self.blocks_from(r0, out.len());
        super::quant::widen_blocks_by(self.format, out, nb, block);
    }

    /// Blocks a row, and block b of row r0 + r (for rows r0.. as `len` floats hold), gathered
    /// from the records.
    fn blocks_from(
        &self,
        r0: usize,
        len: usize,
    ) -> (usize, impl Fn(usize, usize) -> super::quant::Block + '_) {
        let (nb, bb) = (self.cols / QK, self.format.bytes());
        let record = record_bytes(self.format);
        assert!(
            len.is_multiple_of(self.cols) && r0 + len / self.cols <= self.rows,
            "Interleaved: rows out of range"
        );
        let block = move |r: usize, b: usize| {
            let (r, mut q) = (r0 + r, [0u8; QK]);
            let at = ((r / LANES) * nb + b) * record;
            let (rec, lane) = (&self.records[at..at + record], r % LANES);
            for (dword, line) in q[..bb].chunks_exact_mut(4).zip(rec.chunks_exact(64)) {
                dword.copy_from_slice(&line[4 * lane..4 * lane + 4]);
            }
            let params = &rec[bb * LANES..];
            // (the const conversion inlines; the other checks the CPU on every call)
            let half = |at: usize| f16::from_le_bytes([params[at], params[at + 1]]).to_f32_const();
            let m = match self.format {
                BlockFormat::Q8 => 0.0,
                _ => half(2 * LANES + 2 * lane),
            };
            (q, half(2 * lane), m)
        };
        (nb, block)
    }
}

/// Bytes of one (group, block) record: the values' lines, then scales and minimums or sums.
const fn record_bytes(format: BlockFormat) -> usize {
    (format.bytes() / 4 + 1) * 64
}

/// n inputs quantized per block: signed values, and the same + 128 as unsigned bytes when
/// an 8-bit matrix takes them; scales and exact block sums; input after input; kept per
/// thread so that no token allocates.
#[derive(Default)]
struct QuantInputs {
    q: Vec<i8>,
    unsigned: Vec<i8>,
    wide: Vec<i16>,
    d: Vec<f32>,
    sum: Vec<f32>,
}

thread_local! {
    static INPUTS: Cell<QuantInputs> = Cell::default();
}

/// Widest input every pool thread's `INPUTS` already holds room for (`reserve_inputs`).
static RESERVED_COLS: AtomicUsize = AtomicUsize::new(0);

/// Gives every pool thread's `INPUTS` room for `MAX_ROWS` inputs of `cols` values, so that
/// no product allocates, whichever thread runs it first.
fn reserve_inputs(cols: usize) {
    if RESERVED_COLS.fetch_max(cols, Ordering::AcqRel) >= cols {
        return;
    }
    let (values, blocks) = (MAX_ROWS * cols, MAX_ROWS * cols / QK);
    rayon::broadcast(|_| {
        let mut x = INPUTS.take();
        let room = |len: usize, want: usize| want.saturating_sub(len);
        x.q.reserve(room(x.q.len(), values));
        x.unsigned.reserve(room(x.unsigned.len(), values));
        x.wide.reserve(room(x.wide.len(), values));
        x.d.reserve(room(x.d.len(), blocks));
        x.sum.reserve(room(x.sum.len(), blocks));
        INPUTS.set(x);
    });
}

/// Most inputs one pass over the weights takes (accumulators and widened blocks fill the
/// 32 registers).
const GROUP: usize = 8;

/// The same with int16 inputs, whose blocks widen to 16 registers.
const GROUP16: usize = 4;

/// out (n, rows) = x (n, cols) @ W^T with int8 inputs (int16 when `q8act` says so), for
/// any n (the CPU backend gives it at most 16 int8 inputs).
pub fn matmul(out: &mut [f32], x: &[f32], w: &Interleaved, n: usize) {
    products(x, n, [(out, w)], false);
}

/// `K` products of one input x (n, cols), `(out, W)` each as in `matmul`, in one pass: x
/// quantized once, and one set of tasks over all the matrices' row groups (q, k and v;
/// gate and up). With `glu` (K = 2, matrices of the same shape), the first output becomes
/// silu(first) * second, each task scaling the rows it computed (the MLP's first half).
pub fn products<const K: usize>(
    x: &[f32],
    n: usize,
    products: [(&mut [f32], &Interleaved); K],
    glu: bool,
) {
    let wide = super::q8act::activations() == super::q8act::Activations::Int16;
    products_in(x, n, products, glu, wide);
}

/// `products`, with int16 inputs (`wide`) or int8 ones.
fn products_in<const K: usize>(
    x: &[f32],
    n: usize,
    products: [(&mut [f32], &Interleaved); K],
    glu: bool,
    wide: bool,
) {
    assert!(detected(), "vnni::products: no AVX-512 VNNI");
    let ws = products.each_ref().map(|&(_, w)| w);
    let cols = ws[0].cols;
    // Taken out, not borrowed: while this thread waits for the tasks below, rayon may run
    // another product on it (a second forward pass in the pool, a worker's beside the engine
    // thread's), which takes its own.
    let mut taken = INPUTS.take();
    {
        let xq = &mut taken;
        // SAFETY (both): AVX-512 detected (asserted above).
        if wide {
            quantize(
                &x[..n * cols],
                &mut xq.wide,
                &mut xq.d,
                &mut xq.sum,
                x86::quantize_block16,
            );
        } else {
            quantize(
                &x[..n * cols],
                &mut xq.q,
                &mut xq.d,
                &mut xq.sum,
                x86::quantize_block,
            );
        }
        if !wide && ws.iter().any(|w| w.format == BlockFormat::Q8) {
            // `vpdpbusd` takes unsigned bytes on one side: the 8-bit matrices' inputs + 128
            xq.unsigned.clear();
            xq.unsigned
                .extend(xq.q.iter().map(|&v| (v as u8 ^ 0x80) as i8));
        }
        let xq = &*xq;
        let outs = products.map(|(out, w)| (out, w.rows, w.cols));
        super::quant::par_products(outs, x.len(), n, glu, |m, rows, out| {
            let group = if wide { GROUP16 } else { GROUP };
            for g in rows.start / LANES..rows.end / LANES {
                for i0 in (0..n).step_by(group) {
                    let k = (n - i0).min(group);
                    // SAFETY: VNNI detected (asserted above); every index lies inside the
                    // matrix and `xq` by construction; out holds n * rows floats and this
                    // task alone writes rows g * 16.. g * 16 + 16 of it.
                    unsafe { x86::group_entry(ws[m], g, xq, i0, k, wide, out.0) };
                }
            }
        });
    }
    INPUTS.set(taken);
}

/// `x`'s blocks through `block` (an AVX-512 quantizer) into `q`, their scales into `d` and
/// their sums into `sum`; `block` must be safe to call here.
fn quantize<T: Copy + Default>(
    x: &[f32],
    q: &mut Vec<T>,
    d: &mut Vec<f32>,
    sum: &mut Vec<f32>,
    block: unsafe fn(&[f32], &mut [T]) -> (f32, f32),
) {
    q.resize(x.len(), T::default());
    d.resize(x.len() / QK, 0.0);
    sum.resize(x.len() / QK, 0.0);
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        // SAFETY: the caller's.
        (d[b], sum[b]) = unsafe { block(xb, qb) };
    }
}

mod x86 {
    use std::arch::x86_64::*;

    use super::{Interleaved, QuantInputs};
    use crate::model::dequant::{BlockFormat, QK};

    /// Block `xb` (32 values) as two vectors, its largest magnitude and its sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_of(xb: &[f32]) -> ([__m512; 2], f32, f32) {
        assert!(xb.len() >= QK);
        let v = [
            _mm512_loadu_ps(xb.as_ptr()),
            _mm512_loadu_ps(xb.as_ptr().add(16)),
        ];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        (v, amax, _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1])))
    }

    /// `q8act::quantize_block` (the same values and scale; the sum in another order).
    ///
    /// # Safety
    /// AVX-512F/BW present; `xb` and `q` hold 32 values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_block(xb: &[f32], q: &mut [i8]) -> (f32, f32) {
        assert!(q.len() >= QK);
        let (v, amax, sum) = block_of(xb);
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        for (j, v) in v.into_iter().enumerate() {
            // rounded to the nearest integer, ties to even (the default rounding mode)
            let i = _mm512_cvtps_epi32(_mm512_mul_ps(v, id));
            let bytes = _mm512_cvtsepi32_epi8(i);
            _mm_storeu_si128(q.as_mut_ptr().add(16 * j) as *mut __m128i, bytes);
        }
        (d, sum)
    }

    /// Inputs i0..i0 + n against rows g * 16.. g * 16 + 16 (see `matmul`).
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI present; n in 1..=8; `xq` holds n + i0 quantized inputs of `w.cols`;
    /// `out` holds `(i0 + n) * w.rows` floats.
    pub(super) unsafe fn group_entry(
        w: &Interleaved,
        g: usize,
        xq: &QuantInputs,
        i0: usize,
        n: usize,
        wide: bool,
        out: *mut f32,
    ) {
        macro_rules! pick {
            ($kernel:ident, $($n:literal),+) => {
                match (w.format == BlockFormat::Q8, n) {
                    $(
                        (true, $n) => $kernel::<$n, true>(w, g, xq, i0, out),
                        (false, $n) => $kernel::<$n, false>(w, g, xq, i0, out),
                    )+
                    _ => unreachable!("1..=8 inputs, 1..=4 in int16"),
                }
            };
        }
        // SAFETY: the caller's.
        unsafe {
            if wide {
                pick!(group16, 1, 2, 3, 4)
            } else {
                pick!(group, 1, 2, 3, 4, 5, 6, 7, 8)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group<const N: usize, const Q8: bool>(
        w: &Interleaved,
        g: usize,
        xq: &QuantInputs,
        i0: usize,
        out: *mut f32,
    ) {
        let (cols, nb) = (w.cols, w.cols / QK);
        let mask = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let (p, scale, extra) = record::<Q8>(w, g, b);
            // line t: values 4t..4t + 4 of the block, in every row
            let wv: [__m512i; 8] = if Q8 {
                std::array::from_fn(|t| _mm512_loadu_si512(p.add(t)))
            } else {
                let v: [__m512i; 4] = std::array::from_fn(|t| _mm512_loadu_si512(p.add(t)));
                std::array::from_fn(|t| {
                    if t < 4 {
                        _mm512_and_si512(v[t], mask)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16(v[t - 4], 4), mask)
                    }
                })
            };
            let (mins, sums) = if Q8 {
                let sums = _mm512_slli_epi32(_mm512_cvtepi16_epi32(extra), 7);
                (_mm512_setzero_ps(), sums)
            } else {
                (_mm512_cvtph_ps(extra), _mm512_setzero_si512())
            };
            for (i, a) in acc.iter_mut().enumerate() {
                let xb = (i0 + i) * nb + b;
                let q = if Q8 { &xq.unsigned } else { &xq.q };
                let xp = q.as_ptr().add((i0 + i) * cols + b * QK) as *const i32;
                // four independent chains of two dot products: one chain of eight would
                // wait on the instruction's latency
                let mut dots = [_mm512_setzero_si512(); 4];
                for (t, &wt) in wv.iter().enumerate() {
                    let xt = _mm512_set1_epi32(xp.add(t).read_unaligned());
                    let d = &mut dots[t % 4];
                    *d = if Q8 {
                        _mm512_dpbusd_epi32(*d, xt, wt)
                    } else {
                        _mm512_dpbusd_epi32(*d, wt, xt)
                    };
                }
                // its four chains, as one input's in `group16`
                add_block::<Q8>(a, sum_chains::<1>(dots), sums, scale, mins, xq, xb);
            }
        }
        for (i, &a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add((i0 + i) * w.rows + g * super::LANES), a);
        }
    }

    /// Record (g, b): its lines, its rows' scales, and the line of their minimums (4-bit) or
    /// sums (8-bit); the records ahead are prefetched.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn record<const Q8: bool>(
        w: &Interleaved,
        g: usize,
        b: usize,
    ) -> (*const __m512i, __m512, __m256i) {
        let format = if Q8 { BlockFormat::Q8 } else { BlockFormat::Q4 };
        let (lines, bytes) = (format.bytes() / 4, super::record_bytes(format));
        let at = (g * (w.cols / QK) + b) * bytes;
        crate::backend::cpu::quant::prefetch_ahead(&w.records, at, at + bytes, false);
        let p = w.records.as_ptr().add(at) as *const __m512i;
        let params = p.add(lines) as *const __m256i;
        let scale = _mm512_cvtph_ps(_mm256_loadu_si256(params));
        (p, scale, _mm256_loadu_si256(params.add(1)))
    }

    /// Chains of integer dot products each of N inputs (1..=GROUP16) takes in `group16`: four
    /// for one or two inputs, two for three or four, enough to keep `vpdpwssd` busy past its
    /// latency (measured: 5% faster than four in all with four inputs, one core, L2).
    const fn chains<const N: usize>() -> usize {
        if N <= 2 {
            4
        } else {
            2
        }
    }

    /// `acc + (w . [*x; 16])` in word pairs: `vpdpwssd` with the input's dword broadcast
    /// from memory. Written out because LLVM would otherwise split the intrinsic into
    /// `vpmaddwd`, `vpaddd` and a separate broadcast (three instructions for one) to shorten
    /// a chain of them, which costs more than it saves when several inputs' chains run side
    /// by side.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dpwssd_broadcast(acc: __m512i, w: __m512i, x: *const i32) -> __m512i {
        let mut acc = acc;
        std::arch::asm!(
            "vpdpwssd {acc}, {w}, dword ptr [{x}]{{1to16}}",
            acc = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            x = in(reg) x,
            options(pure, readonly, nostack, preserves_flags),
        );
        acc
    }

    /// The sum of an input's chains (those past `chains::<N>()` are zeros).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_chains<const N: usize>(d: [__m512i; 4]) -> __m512i {
        let two = _mm512_add_epi32(d[0], d[1]);
        if chains::<N>() == 2 {
            two
        } else {
            _mm512_add_epi32(two, _mm512_add_epi32(d[2], d[3]))
        }
    }

    /// Adds input block `xb` to `a`: its integer dot products `dot` (less `sums`, the 8-bit
    /// inputs' +128, with int8), times the rows' scales and the input's; for 4-bit blocks,
    /// plus the rows' minimums times the input's block sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_block<const Q8: bool>(
        a: &mut __m512,
        dot: __m512i,
        sums: __m512i,
        scale: __m512,
        mins: __m512,
        xq: &QuantInputs,
        xb: usize,
    ) {
        let dot = if Q8 { _mm512_sub_epi32(dot, sums) } else { dot };
        let s = _mm512_mul_ps(scale, _mm512_set1_ps(*xq.d.get_unchecked(xb)));
        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, *a);
        if !Q8 {
            *a = _mm512_fmadd_ps(mins, _mm512_set1_ps(*xq.sum.get_unchecked(xb)), *a);
        }
    }

    /// One block of 32 values to int16, `xb[j] ~ d * q[j]` with `d = max |x| / 32767`,
    /// rounded to the nearest integer, ties to even; returns `d` and the f32 sum of the
    /// block. Each four values j..j + 4 are stored as j, j + 2, j + 1, j + 3: the word pairs
    /// `group16` multiplies (see there).
    ///
    /// # Safety
    /// AVX-512F/BW present; `xb` and `q` hold 32 values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_block16(xb: &[f32], q: &mut [i16]) -> (f32, f32) {
        assert!(q.len() >= QK);
        let (v, amax, sum) = block_of(xb);
        let d = amax / 32767.0;
        let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        for (j, v) in v.into_iter().enumerate() {
            // values 0, 2, 1, 3 of each 128-bit lane
            let v = _mm512_permute_ps::<0b11_01_10_00>(v);
            let i = _mm512_cvtps_epi32(_mm512_mul_ps(v, id));
            let words = _mm512_cvtsepi32_epi16(i);
            _mm256_storeu_si256(q.as_mut_ptr().add(16 * j) as *mut __m256i, words);
        }
        (d, sum)
    }

    /// `group` with int16 inputs: each block's values widen to 16 vectors of word pairs,
    /// vector k holding, in each row's lane, the values that the input's dword k (see
    /// `quantize_block16`) pairs with, and one `vpdpwssd` takes each (32 multiply-adds). A
    /// line at a time: its vectors, then every input.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group16<const N: usize, const Q8: bool>(
        w: &Interleaved,
        g: usize,
        xq: &QuantInputs,
        i0: usize,
        out: *mut f32,
    ) {
        let (cols, nb) = (w.cols, w.cols / QK);
        let nibble = _mm512_set1_epi32(0x000f_000f);
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let (p, scale, extra) = record::<Q8>(w, g, b);
            let xp: [*const i32; N] = std::array::from_fn(|i| {
                xq.wide.as_ptr().add((i0 + i) * cols + b * QK) as *const i32
            });
            // Independent chains of dot products (a single chain would wait on the
            // instruction's latency; see `chains`), summed once a block (the integer sums
            // are exact in any order).
            let mut dots = [[_mm512_setzero_si512(); 4]; N];
            let mut dot = |k: usize, wk: __m512i| {
                for (d, &xp) in dots.iter_mut().zip(&xp) {
                    let c = k % chains::<N>();
                    d[c] = dpwssd_broadcast(d[c], wk, xp.add(k));
                }
            };
            if Q8 {
                // line t: bytes 0 and 2, then 1 and 3, sign-extended to words
                for t in 0..8 {
                    let v = _mm512_loadu_si512(p.add(t));
                    dot(2 * t, _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(v)));
                    dot(2 * t + 1, _mm512_srai_epi16::<8>(v));
                }
            } else {
                // line t: the low nibbles of bytes 0 and 2 (values 4t, 4t + 2), of bytes 1
                // and 3, then the high nibbles (values 4t + 16...)
                for t in 0..4 {
                    let v = _mm512_loadu_si512(p.add(t));
                    dot(2 * t, _mm512_and_si512(v, nibble));
                    dot(
                        2 * t + 1,
                        _mm512_and_si512(_mm512_srli_epi32::<8>(v), nibble),
                    );
                    dot(
                        2 * t + 8,
                        _mm512_and_si512(_mm512_srli_epi32::<4>(v), nibble),
                    );
                    dot(
                        2 * t + 9,
                        _mm512_and_si512(_mm512_srli_epi32::<12>(v), nibble),
                    );
                }
            }
            let mins = if Q8 {
                _mm512_setzero_ps()
            } else {
                _mm512_cvtph_ps(extra)
            };
            let none = _mm512_setzero_si512();
            for (i, (a, d)) in acc.iter_mut().zip(dots).enumerate() {
                let xb = (i0 + i) * nb + b;
                add_block::<Q8>(a, sum_chains::<N>(d), none, scale, mins, xq, xb);
            }
        }
        for (i, &a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add((i0 + i) * w.rows + g * super::LANES), a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(format: BlockFormat, rows: usize, cols: usize, seed: u32) -> QuantMatrix {
        super::super::q8act::tests::quant_matrix(format == BlockFormat::Q8, rows, cols, seed)
    }

    /// The int8 (`wide`: int16) product in plain integers, as `q8act`'s portable dot
    /// products compute it.
    fn reference(w: &QuantMatrix, x: &[f32], wide: bool) -> Vec<f32> {
        let (nb, bb) = (w.cols / QK, w.format.bytes());
        let blocks: Vec<(f32, f32, [i32; QK])> = x
            .chunks_exact(QK)
            .map(|xb| {
                let mut q = [0i8; QK];
                let (d, s) = super::super::q8act::quantize_block(xb, &mut q);
                if !wide {
                    return (d, s, q.map(i32::from));
                }
                // as `quantize_block16`, rounded ties to even as `quantize_block` rounds
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 32767.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let round = super::super::q8act::ROUND;
                let q = std::array::from_fn(|j| ((xb[j] * id + round) - round) as i32);
                (d, s, q)
            })
            .collect();
        (0..w.rows)
            .map(|r| {
                (0..nb)
                    .map(|b| {
                        let (d, s, q) = &blocks[b];
                        let blk = &w.qs[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                        let dot: i64 = if w.format == BlockFormat::Q8 {
                            blk.iter()
                                .zip(q)
                                .map(|(&v, &x)| v as i8 as i64 * x as i64)
                                .sum()
                        } else {
                            (0..16)
                                .map(|j| {
                                    (blk[j] & 15) as i64 * q[j] as i64
                                        + (blk[j] >> 4) as i64 * q[j + 16] as i64
                                })
                                .sum()
                        };
                        let min = if w.format == BlockFormat::Q8 {
                            0.0
                        } else {
                            w.mins[r * nb + b] * s
                        };
                        w.scales[r * nb + b] * d * dot as f32 + min
                    })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn interleaved_products_equal_the_integer_reference() {
        if !detected() {
            eprintln!("no AVX-512 VNNI here: the int8 and int16 kernels are not used");
            return;
        }
        for wide in [false, true] {
            for format in [BlockFormat::Q4, BlockFormat::Q8] {
                for (rows, cols) in [(16, 32), (48, 96), (64, 576)] {
                    let w = matrix(format, rows, cols, rows as u32 + 3);
                    let il = Interleaved::new(&w).expect("a multiple of 16 rows");
                    for n in [1, 2, 3, 5, 8, 9, 16, 37] {
                        let x: Vec<f32> = (0..n * cols)
                            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                            .collect();
                        let mut out = vec![f32::NAN; n * rows];
                        products_in(&x, n, [(&mut out, &il)], false, wide);
                        for i in 0..n {
                            let want = reference(&w, &x[i * cols..(i + 1) * cols], wide);
                            for (r, (&got, &want)) in out[i * rows..].iter().zip(&want).enumerate()
                            {
                                assert!(
                                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                                    "{format:?} int16 {wide} {rows}x{cols} n={n} input {i} row \
                                     {r}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_in_one_pass_equal_separate_products() {
        if !detected() {
            eprintln!("no AVX-512 VNNI here: the int8 and int16 kernels are not used");
            return;
        }
        let cols = 96;
        // q, k and v of mixed formats and heights; gate and up of one shape
        let [a, b, c] = [
            (BlockFormat::Q4, 48),
            (BlockFormat::Q8, 16),
            (BlockFormat::Q4, 32),
        ]
        .map(|(f, rows)| Interleaved::new(&matrix(f, rows, cols, rows as u32)).unwrap());
        let [gate, up] = [BlockFormat::Q8, BlockFormat::Q4]
            .map(|f| Interleaved::new(&matrix(f, 64, cols, 7)).unwrap());
        for (n, wide) in [1, 3, 9, 16, 37]
            .into_iter()
            .flat_map(|n| [(n, false), (n, true)])
        {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 29 % 89) as f32 - 44.0) / 13.0)
                .collect();
            let alone = |w: &Interleaved| {
                let mut out = vec![f32::NAN; n * w.rows];
                products_in(&x, n, [(&mut out, w)], false, wide);
                out
            };
            let mut outs = [&a, &b, &c].map(|w| vec![f32::NAN; n * w.rows]);
            let [oa, ob, oc] = &mut outs;
            products_in(&x, n, [(oa, &a), (ob, &b), (oc, &c)], false, wide);
            for (got, w) in outs.iter().zip([&a, &b, &c]) {
                assert_eq!(got, &alone(w), "n={n} int16 {wide}: {} rows", w.rows);
            }
            let (mut g, mut u) = (vec![f32::NAN; n * 64], vec![f32::NAN; n * 64]);
            products_in(&x, n, [(&mut g, &gate), (&mut u, &up)], true, wide);
            let mut want = alone(&gate);
            crate::backend::cpu::ops::silu_mul(&mut want, &alone(&up));
            assert_eq!(g, want, "n={n} int16 {wide}: silu(gate) * up");
        }
    }

    #[test]
    fn interleaved_rows_widen_to_the_row_major_floats() {
        // runs without VNNI too: the layout and its widening need only AVX-512 (or none)
        for format in [BlockFormat::Q4, BlockFormat::Q8] {
            let (rows, cols) = (48, 96);
            let w = matrix(format, rows, cols, 11);
            let il = Interleaved::new(&w).expect("a multiple of 16 rows");
            for (r0, count) in [(0, 48), (5, 1), (15, 2), (16, 16), (31, 17), (47, 1)] {
                let (mut got, mut want) = (vec![f32::NAN; count * cols], vec![0f32; count * cols]);
                il.dequantize_rows(r0, &mut got);
                w.dequantize_rows(r0, &mut want);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{format:?} rows {r0}+{count}");
            }
            // the SGEMM panels (AVX-512 widening where the CPU has it) through prefill's
            // product: the same outputs as from the row-major matrix
            let n = 19;
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 13 % 71) as f32 - 35.0) / 9.0)
                .collect();
            let (mut got, mut want) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
            let widen = |r0: usize, panel: &mut [f32]| il.widen_rows(r0, panel);
            super::super::quant::gemm_widened(&mut got, &x, n, rows, cols, widen);
            super::super::quant::matmul_q_gemm(&mut want, &x, &w, n);
            assert_eq!(
                got, want,
                "{format:?}: prefill from the interleaved records"
            );
        }
    }

    #[test]
    fn only_scaled_matrices_of_whole_row_groups_and_f16_scales_are_interleaved() {
        assert!(Interleaved::new(&matrix(BlockFormat::Q4, 24, 64, 1)).is_none());
        assert!(Interleaved::new(&matrix(BlockFormat::Q8, 32, 64, 1)).is_some());
        let f16 = QuantMatrix {
            format: BlockFormat::F16,
            rows: 16,
            cols: 32,
            qs: vec![0u8; 16 * 64].into(),
            scales: Vec::new().into(),
            mins: Vec::new().into(),
        };
        assert!(Interleaved::new(&f16).is_none());
        let mut wide = matrix(BlockFormat::Q4, 16, 32, 1);
        wide.scales = vec![1.0 + f32::EPSILON; 16].into();
        assert!(
            Interleaved::new(&wide).is_none(),
            "a scale that f16 cannot hold"
        );
    }
}
