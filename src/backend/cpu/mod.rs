//! The CPU backend: `Backend` over host `AlignedBuf`s (f32s from a cache-line boundary),
//! calling the rayon/SIMD ops in `ops.rs`. Weights are shared by reference (`Tensor` data is
//! a shared `HugeBuf`), never copied. `naive.rs` holds the reference ops the tests compare
//! against.

mod buf;
pub mod naive;
pub mod ops;
pub mod q8act;
pub mod quant;
pub mod vexp;
#[cfg(target_arch = "x86_64")]
pub mod vnni;

use std::ops::{Deref, Range};
#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{AttnShape, Backend, KvDtype, RopeShape};
use crate::model::dequant::QuantMatrix;
use crate::model::weights::Tensor;
pub use buf::AlignedBuf;

/// A weight as the CPU backend holds it: the model's tensor (shared, never copied) and, for
/// quantized activations (`--activations int16|int8`) on a CPU with AVX-512 VNNI, its rows
/// interleaved for the `vnni.rs` kernels. `prepare` makes that layout when the activations
/// are quantized at load time, and drops the row-major matrix then (the records hold every
/// value: lookups and prefill widen rows from them); otherwise the layout waits for the
/// first quantized product and both are kept.
pub struct CpuWeight {
    /// `quant` is `None` once `interleaved` alone holds the matrix.
    tensor: Tensor,
    #[cfg(target_arch = "x86_64")]
    interleaved: OnceLock<Option<vnni::Interleaved>>,
}

impl CpuWeight {
    /// The interleaved layout, when quantized activations are on and this CPU and matrix
    /// take it.
    #[cfg(target_arch = "x86_64")]
    fn interleaved(&self) -> Option<&vnni::Interleaved> {
        if q8act::activations() == q8act::Activations::F32 {
            return None;
        }
        self.interleaved
            .get_or_init(|| {
                let q = self.tensor.quant.as_ref()?;
                vnni::detected()
                    .then(|| vnni::Interleaved::new(q))
                    .flatten()
            })
            .as_ref()
    }

    /// The interleaved layout, whatever the activations now (None where it was never made).
    #[cfg(target_arch = "x86_64")]
    fn interleaved_made(&self) -> Option<&vnni::Interleaved> {
        self.interleaved.get()?.as_ref()
    }

    /// Rows r0.. of a matrix as f32 (`out.len() / cols` of them), from whichever layout holds
    /// it: the same floats either way.
    fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        if let Some(q) = &self.quant {
            return q.dequantize_rows(r0, out);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(il) = self.interleaved_made() {
            return il.dequantize_rows(r0, out);
        }
        let at = r0 * self.cols();
        out.copy_from_slice(&self.data[at..at + out.len()]);
    }

    /// The compact matrix, when `quant::products` takes a product of `n` inputs with it.
    fn compact_for(&self, n: usize) -> Option<&QuantMatrix> {
        self.quant.as_deref().filter(|q| quant::takes(q, n))
    }

    /// The interleaved layout, when a product of `n` inputs can use it: any n with int16
    /// inputs (prompts too: within the goldens' tolerance, `tests/quantized_activations.rs`),
    /// up to `quant::MAX_ROWS` with int8 ones (over a whole prompt their rounding moved the
    /// logits past that test's bound of 1).
    #[cfg(target_arch = "x86_64")]
    fn interleaved_for(&self, n: usize) -> Option<&vnni::Interleaved> {
        let int16 = q8act::activations() == q8act::Activations::Int16;
        (int16 || n <= quant::MAX_ROWS)
            .then(|| self.interleaved())
            .flatten()
    }
}

impl From<Tensor> for CpuWeight {
    fn from(tensor: Tensor) -> CpuWeight {
        CpuWeight {
            tensor,
            #[cfg(target_arch = "x86_64")]
            interleaved: OnceLock::new(),
        }
    }
}

impl Deref for CpuWeight {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

/// Runs the forward pass on the host CPU with rayon's global thread pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = AlignedBuf;
    type Weight = CpuWeight;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, t: &Tensor) -> CpuWeight {
        t.clone().into()
    }

    /// Makes the interleaved layout now, when quantized activations are on, and drops the
    /// row-major matrix it replaces (else the layout waits for the first quantized product).
    fn prepare(&self, w: &mut CpuWeight) {
        #[cfg(target_arch = "x86_64")]
        if w.interleaved().is_some() {
            w.tensor.quant = None;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = w;
    }

    fn alloc(&self, len: usize) -> AlignedBuf {
        AlignedBuf::zeroed(len)
    }

    fn stores_kv(&self, _dtype: KvDtype) -> bool {
        true
    }

    fn alloc_kv(&self, len: usize, dtype: KvDtype) -> AlignedBuf {
        match dtype {
            KvDtype::F32 => AlignedBuf::zeroed(len),
            KvDtype::F16 => AlignedBuf::halves(len),
        }
    }

    fn append_kv(
        &self,
        cache: &mut AlignedBuf,
        dst_off: usize,
        src: &AlignedBuf,
        src_off: usize,
        len: usize,
    ) {
        let from = &src[src_off..src_off + len];
        match cache.as_halves_mut() {
            Some(h) => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                let to = &mut h[dst_off..dst_off + len];
                to.reinterpret_cast_mut::<half::f16>()
                    .convert_from_f32_slice(from);
            }
            None => cache[dst_off..dst_off + len].copy_from_slice(from),
        }
    }

    fn copy(
        &self,
        dst: &mut AlignedBuf,
        dst_off: usize,
        src: &AlignedBuf,
        src_off: usize,
        len: usize,
    ) {
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
    }

    fn read(&self, buf: &AlignedBuf, at: Range<usize>, out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(&buf[at]);
    }

    fn embed(&self, out: &mut AlignedBuf, table: &CpuWeight, ids: &[u32]) {
        let dim = table.cols();
        for (o, &id) in out.chunks_exact_mut(dim).zip(ids) {
            table.dequantize_rows(id as usize, o);
        }
    }

    fn rmsnorm(&self, out: &mut AlignedBuf, x: &AlignedBuf, w: &CpuWeight, n: usize, eps: f32) {
        ops::rmsnorm(out, x, &w.data, n, eps);
    }

    fn matmul(&self, out: &mut AlignedBuf, x: &AlignedBuf, w: &CpuWeight, n: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some(il) = w.interleaved_for(n) {
            return vnni::matmul(out, x, il, n);
        }
        #[cfg(target_arch = "x86_64")]
        if let (None, Some(il)) = (&w.quant, w.interleaved_made()) {
            // many inputs, or the activations set to f32 after loading
            let widen = |r0: usize, panel: &mut [f32]| il.widen_rows(r0, panel);
            return quant::gemm_widened(out, x, n, il.rows(), il.cols(), widen);
        }
        match (&w.quant, n) {
            (Some(q), 1) => quant::matvec_q(out, x, q),
            (Some(q), n) if n <= quant::MAX_ROWS => quant::matmul_q(out, x, q, n),
            (Some(q), n) => quant::matmul_q_gemm(out, x, q, n),
            (None, n) => ops::matmul(out, x, &w.data, n, w.cols(), w.rows()),
        }
    }

    fn matmul3(&self, outs: [&mut AlignedBuf; 3], x: &AlignedBuf, ws: [&CpuWeight; 3], n: usize) {
        #[cfg(target_arch = "x86_64")]
        if let [Some(a), Some(b), Some(c)] = ws.map(|w| w.interleaved_for(n)) {
            let [q, k, v] = outs;
            return vnni::products(x, n, [(q, a), (k, b), (v, c)], false);
        }
        if let [Some(a), Some(b), Some(c)] = ws.map(|w| w.compact_for(n)) {
            let [q, k, v] = outs;
            return quant::products(x, n, [(q, a), (k, b), (v, c)], false);
        }
        for (out, w) in outs.into_iter().zip(ws) {
            self.matmul(out, x, w, n);
        }
    }

    fn gate_up(
        &self,
        gate: &mut AlignedBuf,
        up: &mut AlignedBuf,
        x: &AlignedBuf,
        [w_gate, w_up]: [&CpuWeight; 2],
        n: usize,
        width: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(g), Some(u)) = (w_gate.interleaved_for(n), w_up.interleaved_for(n)) {
            if g.rows() == u.rows() {
                return vnni::products(x, n, [(gate, g), (up, u)], true);
            }
        }
        if let (Some(g), Some(u)) = (w_gate.compact_for(n), w_up.compact_for(n)) {
            if g.rows == u.rows {
                return quant::products(x, n, [(gate, g), (up, u)], true);
            }
        }
        self.matmul(gate, x, w_gate, n);
        self.matmul(up, x, w_up, n);
        self.silu_mul(gate, up, n * width);
    }

    fn add_bias(&self, x: &mut AlignedBuf, b: &CpuWeight, n: usize) {
        let m = b.data.len();
        for row in x[..n * m].chunks_exact_mut(m) {
            ops::add(row, &b.data);
        }
    }

    fn rope(&self, x: &mut AlignedBuf, cos: &CpuWeight, sin: &CpuWeight, s: RopeShape) {
        ops::rope_half(x, &cos.data, &sin.data, s);
    }

    fn attention(
        &self,
        out: &mut AlignedBuf,
        q: &AlignedBuf,
        k: &AlignedBuf,
        v: &AlignedBuf,
        s: AttnShape,
    ) {
        match (k.as_halves(), v.as_halves()) {
            (Some(k), Some(v)) => ops::attention(out, q, k, v, s),
            _ => ops::attention::<f32>(out, q, k, v, s),
        }
    }

    fn attention_rows<'c>(
        &self,
        out: &mut AlignedBuf,
        q: &AlignedBuf,
        kv: &dyn Fn(usize) -> (&'c AlignedBuf, &'c AlignedBuf),
        pos: &[usize],
        s: AttnShape,
        _scratch: [&mut AlignedBuf; 2],
    ) {
        let n = pos.len();
        if n > 0 && kv(0).0.as_halves().is_some() {
            let mut rows: [(&[u16], &[u16]); ops::MAX_ATTN_ROWS] = [(&[], &[]); ops::MAX_ATTN_ROWS];
            for (i, r) in rows.iter_mut().enumerate().take(n) {
                let (k, v) = kv(i);
                // a cache of f32s among halves reads as empty and fails the shape check
                *r = (k.as_halves().unwrap_or(&[]), v.as_halves().unwrap_or(&[]));
            }
            return ops::attention_rows(out, q, &rows[..n], pos, s);
        }
        let mut rows: [(&[f32], &[f32]); ops::MAX_ATTN_ROWS] = [(&[], &[]); ops::MAX_ATTN_ROWS];
        for (i, r) in rows.iter_mut().enumerate().take(n) {
            let (k, v) = kv(i);
            *r = (k, v);
        }
        ops::attention_rows(out, q, &rows[..n], pos, s);
    }

    fn silu_mul(&self, gate: &mut AlignedBuf, up: &AlignedBuf, len: usize) {
        // One exp per value: a batched step's few thousand are worth splitting.
        const CHUNK: usize = 2048;
        gate[..len]
            .par_chunks_mut(CHUNK)
            .zip(up[..len].par_chunks(CHUNK))
            .for_each(|(g, u)| ops::silu_mul(g, u));
    }

    fn add(&self, x: &mut AlignedBuf, y: &AlignedBuf, len: usize) {
        ops::add(&mut x[..len], &y[..len]);
    }

    fn within<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        rayon::scope(|_| f())
    }

    fn argmax(&self, x: &AlignedBuf, at: Range<usize>) -> Option<u32> {
        crate::engine::sampler::argmax_finite(&x[at])
    }
}
