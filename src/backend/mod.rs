//! The `Backend` trait: the handful of ops the forward pass is written against, over device
//! buffers the backend owns. `cpu` implements it with rayon; a CUDA backend implements the
//! same trait, so `engine::forward` is written once for both.

pub mod cpu;
pub mod cuda;

use std::ops::Range;

use crate::model::weights::Tensor;

/// Shape of one attention call: `n_tokens` queries at positions `pos0..pos0 + n_tokens`,
/// each attending causally to cache positions `0..=pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query tokens in this call.
    pub n_tokens: usize,
    /// Position of the first query token.
    pub pos0: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (query head `h` reads kv head `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// How a KV cache stores keys and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvDtype {
    /// As computed: exact.
    #[default]
    F32,
    /// Rounded to IEEE half floats: half the memory and the reading (not exact).
    F16,
}

impl KvDtype {
    /// Bytes one stored value takes.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// Shape of one RoPE call: `n_tokens` rows of `n_heads` heads starting at position `pos0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    /// Rows (tokens).
    pub n_tokens: usize,
    /// Heads per row.
    pub n_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Position of the first row.
    pub pos0: usize,
}

/// The compute ops of the forward pass. Buffers are row-major f32; every op states its
/// shapes; none allocates.
pub trait Backend: Send + Sync {
    /// An activation buffer on the device.
    type Buf: Send;
    /// A read-only weight (matrix or vector) on the device, shared between workers.
    type Weight: Send + Sync;

    /// A human-readable device name for logs.
    fn name(&self) -> String;
    /// Places a host tensor on the device.
    fn upload(&self, t: &Tensor) -> Self::Weight;
    /// Readies an uploaded matrix that `matmul` will take, at start-up rather than in a
    /// request (a layout of the backend's own, say, which may replace the uploaded one); by
    /// default nothing.
    fn prepare(&self, _w: &mut Self::Weight) {}
    /// A zeroed buffer of `len` floats.
    fn alloc(&self, len: usize) -> Self::Buf;
    /// Whether KV caches on this backend can store `dtype` (f32 everywhere).
    fn stores_kv(&self, dtype: KvDtype) -> bool {
        dtype == KvDtype::F32
    }
    /// A zeroed KV-cache buffer of `len` values stored as `dtype`, which `stores_kv` took.
    fn alloc_kv(&self, len: usize, dtype: KvDtype) -> Self::Buf {
        assert!(
            self.stores_kv(dtype),
            "KV caches here do not store {dtype:?}"
        );
        self.alloc(len)
    }
    /// Writes `len` floats from `src[src_off..]` into a KV-cache buffer at `dst_off`, in the
    /// cache's own type.
    fn append_kv(
        &self,
        cache: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        len: usize,
    ) {
        self.copy(cache, dst_off, src, src_off, len);
    }
    /// Copies `len` floats from `src[src_off..]` to `dst[dst_off..]`.
    fn copy(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        len: usize,
    );
    /// Reads the floats `at` of a buffer back to the host, into `out` (replacing its contents).
    fn read(&self, buf: &Self::Buf, at: Range<usize>, out: &mut Vec<f32>);

    /// out (ids.len(), dim) = rows `ids` of table (vocab, dim).
    fn embed(&self, out: &mut Self::Buf, table: &Self::Weight, ids: &[u32]);
    /// out (n, dim) = x / rms(x) * w, row-wise.
    fn rmsnorm(&self, out: &mut Self::Buf, x: &Self::Buf, w: &Self::Weight, n: usize, eps: f32);
    /// out (n, m) = x (n, k) @ w (m, k)^T.
    fn matmul(&self, out: &mut Self::Buf, x: &Self::Buf, w: &Self::Weight, n: usize);
    /// outs[i] = x @ ws[i]^T (each as `matmul`) for three matrices that take the same input
    /// (q, k and v): by default three `matmul`s; a backend may run them as one pass.
    fn matmul3(&self, outs: [&mut Self::Buf; 3], x: &Self::Buf, ws: [&Self::Weight; 3], n: usize) {
        for (out, w) in outs.into_iter().zip(ws) {
            self.matmul(out, x, w, n);
        }
    }
    /// gate (n, width) = silu(x @ w_gate^T) * (x @ w_up^T), the MLP's first half, with `up`
    /// as scratch: by default two `matmul`s and `silu_mul`; a backend may run it as one pass.
    #[allow(clippy::too_many_arguments)]
    fn gate_up(
        &self,
        gate: &mut Self::Buf,
        up: &mut Self::Buf,
        x: &Self::Buf,
        [w_gate, w_up]: [&Self::Weight; 2],
        n: usize,
        width: usize,
    ) {
        self.matmul(gate, x, w_gate, n);
        self.matmul(up, x, w_up, n);
        self.silu_mul(gate, up, n * width);
    }
    /// x (n, m) += b (m), row-wise.
    fn add_bias(&self, x: &mut Self::Buf, b: &Self::Weight, n: usize);
    /// Rotates pairs (i, i + head_dim/2) of each head by the angles of its position;
    /// `cos`/`sin` are (max_pos, head_dim/2) tables.
    fn rope(&self, x: &mut Self::Buf, cos: &Self::Weight, sin: &Self::Weight, s: RopeShape);
    /// out (n_tokens, n_heads * head_dim) = causal softmax(q k^T / sqrt(d)) v over the cache
    /// k, v (positions, n_kv_heads * head_dim).
    fn attention(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: AttnShape,
    );
    /// Batched decode attention: row i of q (rows, n_heads * head_dim), at position
    /// `pos[i]` of its own sequence, attends over positions 0..=pos[i] of that sequence's
    /// cache `kv(i) = (k, v)`, into row i of out. `s.n_tokens` and `s.pos0` are not used.
    /// `scratch` is two one-row buffers (n_heads * head_dim) for the default, which runs
    /// `attention` row by row.
    fn attention_rows<'c>(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        kv: &dyn Fn(usize) -> (&'c Self::Buf, &'c Self::Buf),
        pos: &[usize],
        s: AttnShape,
        scratch: [&mut Self::Buf; 2],
    ) {
        let q_dim = s.n_heads * s.head_dim;
        let [row_q, row_att] = scratch;
        for (i, &p) in pos.iter().enumerate() {
            let (k, v) = kv(i);
            self.copy(row_q, 0, q, i * q_dim, q_dim);
            let one = AttnShape {
                n_tokens: 1,
                pos0: p,
                ..s
            };
            self.attention(row_att, row_q, k, v, one);
            self.copy(out, i * q_dim, row_att, 0, q_dim);
        }
    }
    /// gate (len) = silu(gate) * up.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize);
    /// x (len) += y.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize);
    /// Index, within `at`, of the largest of the values `x[at]` (lowest on ties); `None` if
    /// any is NaN or infinite. Greedy decode uses it so the logits need not come back to the
    /// host.
    fn argmax(&self, x: &Self::Buf, at: Range<usize>) -> Option<u32>;
    /// Device memory (free, total) in bytes, for a device with its own memory.
    fn memory(&self) -> Option<(usize, usize)> {
        None
    }
    /// Runs `f`, a whole forward pass, where this backend's ops start fastest. By default in
    /// place; the CPU backend runs it inside its thread pool, so that each op splits its
    /// work among the pool's threads without waking them from outside (a few microseconds
    /// per op, and a decode step has hundreds of ops).
    fn within<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }
}

/// CUDA kernel sources embedded by `build.rs` from `kernels/*.cu`.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
