//! The CUDA backend: `Backend` over device buffers (`CudaSlice<f32>`), with the hand-written
//! kernels of `kernels/*.cu` (compiled by NVRTC at start-up for the device's compute
//! capability, or built-in PTX from nvcc). Weights are uploaded once and shared read-only:
//! matrices the file stores as 16-bit floats stay as stored (F16, BF16), quantized ones are
//! widened to F16, f32 ones stay f32. Products of up to `GEMV_MAX_TOKENS` tokens (decode)
//! run in `kernels/matmul.cu`'s kernel, which reads each weight once for all tokens at the
//! memory's speed; larger ones (prefill) in cuBLAS SGEMM, 16-bit matrices widened a slice
//! at a time. All kernels are loaded at start-up, so a bad kernel fails there, not on the
//! first request. A failed launch panics the calling worker, which
//! the pool catches and reports as `unknown_error_occurred`.

pub mod probe;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::kernels::{KERNEL_COMMON, KERNEL_PTX, KERNEL_SOURCES};
use super::{AttnShape, Backend, RopeShape};
use crate::model::dequant::{BlockFormat, QuantMatrix};
use crate::model::weights::Tensor;
pub use probe::{nvrtc_available, probe, CudaUnavailable};

/// Threads per block of the attention kernel (kernels/attention.cu's ATT_THREADS).
const ATT_THREADS: u32 = 128;

/// Most tokens a product takes in the hand-written kernel (kernels/matmul.cu's
/// GEMV_MAX_TOKENS); more go to cuBLAS.
const GEMV_MAX_TOKENS: usize = 8;
/// Warps per block of that kernel (GEMV_WARPS), one output row each.
const GEMV_WARPS: u32 = 8;
/// Most values of a 16-bit matrix widened to f32 at once for SGEMM (128 MiB of f32).
const WIDEN_MAX: usize = 32 << 20;

/// A weight's values on the device, as stored.
pub enum GpuData {
    /// 32-bit floats.
    F32(CudaSlice<f32>),
    /// IEEE half floats, as their bits.
    F16(CudaSlice<u16>),
    /// bfloat16, as their bits.
    Bf16(CudaSlice<u16>),
}

impl GpuData {
    /// The suffix of the kernels that read this storage (`gemv3_f16`, ...).
    fn suffix(&self) -> &'static str {
        match self {
            GpuData::F32(_) => "f32",
            GpuData::F16(_) => "f16",
            GpuData::Bf16(_) => "bf16",
        }
    }

    /// Pushes the device pointer as the next kernel argument.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        match self {
            GpuData::F32(d) => b.arg(d),
            GpuData::F16(d) | GpuData::Bf16(d) => b.arg(d),
        };
    }
}

/// A weight on the device with its matrix shape.
pub struct GpuTensor {
    /// Values, row-major.
    pub data: GpuData,
    /// Rows (first dimension).
    pub rows: usize,
    /// Columns (product of the others).
    pub cols: usize,
}

impl GpuTensor {
    /// The values of a vector (norm weights, biases, RoPE tables), which are always f32.
    fn f32(&self) -> &CudaSlice<f32> {
        match &self.data {
            GpuData::F32(d) => d,
            _ => panic!("a 16-bit weight where the kernel reads f32"),
        }
    }
}

/// One CUDA device: context, stream, cuBLAS handle and the kernel table.
pub struct Cuda {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    /// cuBLAS's handle must not be used by two threads at once (decode steps run on the
    /// engine thread while workers prefill): the lock holds it for one call, which only
    /// queues the work.
    blas: Mutex<CudaBlas>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Whether small products take the hand-written kernel (else cuBLAS: set
    /// CHATSTREAM_CUDA_MATMUL=cublas to compare).
    gemv: bool,
}

/// Whether compiled PTX `ptx` holds kernel `name`.
pub fn defines(ptx: &str, name: &str) -> bool {
    ptx.contains(&format!(".entry {name}("))
}

/// Every kernel the backend launches, by function name.
pub const FUNCTIONS: &[&str] = &[
    "add_f32",
    "silu_mul_f32",
    "add_bias_f32",
    "embed_f32",
    "embed_f16",
    "embed_bf16",
    "gemv3_f32",
    "gemv3_f16",
    "gemv3_bf16",
    "gate_up_f32",
    "gate_up_f16",
    "gate_up_bf16",
    "widen_f16",
    "widen_bf16",
    "rmsnorm_f32",
    "rope_half_f32",
    "attention_f32",
    "argmax_f32",
];

/// Compiles one kernel file with NVRTC for `arch` (e.g. "compute_90").
pub fn compile_kernel(source: &str, arch: &'static str) -> Result<Ptx, String> {
    let src = format!("{KERNEL_COMMON}\n{source}");
    let opts = CompileOptions {
        arch: Some(arch),
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts).map_err(|e| e.to_string())
}

/// The NVRTC architecture name for a compute capability.
fn arch_name(major: i32, minor: i32) -> &'static str {
    // NVRTC wants a 'static str; the table covers every capability cudarc's CUDA 13 supports.
    match (major, minor) {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (10, 3) => "compute_103",
        (12, 0) => "compute_120",
        (12, 1) => "compute_121",
        _ => "compute_75",
    }
}

fn fail(e: impl std::fmt::Display) -> CudaUnavailable {
    CudaUnavailable::Driver(e.to_string())
}

impl Cuda {
    /// Opens device `ordinal` and loads every kernel.
    pub fn new(ordinal: usize) -> Result<Cuda, CudaUnavailable> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(fail)?;
        let name = ctx.name().map_err(fail)?;
        let (major, minor) = ctx.compute_capability().map_err(fail)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(fail)?;
        let mut funcs = HashMap::new();
        for (stem, source) in KERNEL_SOURCES {
            let ptx = match KERNEL_PTX.iter().find(|(s, _)| s == stem) {
                Some((_, ptx)) => Ptx::from_src(*ptx),
                None => compile_kernel(source, arch_name(major, minor))
                    .map_err(|e| CudaUnavailable::Kernels(format!("{stem}.cu: {e}")))?,
            };
            let text = ptx.to_src();
            let module = ctx
                .load_module(ptx)
                .map_err(|e| CudaUnavailable::Kernels(format!("{stem}.cu: {e}")))?;
            for f in FUNCTIONS {
                if defines(&text, f) {
                    let func = module
                        .load_function(f)
                        .map_err(|e| CudaUnavailable::Kernels(format!("{f}: {e}")))?;
                    funcs.insert(*f, func);
                }
            }
        }
        if let Some(missing) = FUNCTIONS.iter().find(|f| !funcs.contains_key(*f)) {
            return Err(CudaUnavailable::Kernels(format!(
                "kernel {missing} not found in kernels/*.cu"
            )));
        }
        Ok(Cuda {
            ordinal,
            name: format!("{name} (sm_{major}{minor})"),
            stream,
            blas: Mutex::new(blas),
            funcs,
            gemv: std::env::var("CHATSTREAM_CUDA_MATMUL").as_deref() != Ok("cublas"),
        })
    }

    /// A device buffer holding `v`.
    pub fn upload_f32(&self, v: &[f32]) -> CudaSlice<f32> {
        self.stream.clone_htod(v).expect("uploading to the device")
    }

    /// Whether `matmul` of `n` tokens with `w` takes the hand-written kernel.
    fn takes_gemv(&self, w: &GpuTensor, n: usize) -> bool {
        self.gemv && n <= GEMV_MAX_TOKENS && w.cols.is_multiple_of(8)
    }

    /// outs[i] (n, ws[i].rows) = x (n, k) ws[i]^T for up to three matrices of one storage
    /// type and width, in one launch of `kernels/matmul.cu`'s `gemv3`; `ms[i]` = 0 marks a
    /// slot unused (its pointers are never touched). The outputs are passed as shared
    /// references, so that `matmul` can fill the unused slots with its one output; the
    /// kernel's writes are ordered with every other use by the one stream.
    fn gemv3(
        &self,
        outs: [&CudaSlice<f32>; 3],
        ws: [&GpuTensor; 3],
        ms: [usize; 3],
        x: &CudaSlice<f32>,
        n: usize,
    ) {
        let rows: usize = ms.iter().sum();
        let name = format!("gemv3_{}", ws[0].data.suffix());
        let mut b = self.stream.launch_builder(&self.funcs[name.as_str()]);
        for o in outs {
            b.arg(o);
        }
        for w in ws {
            w.data.push(&mut b);
        }
        let (m0, m1, m2, n, k) = (
            ms[0] as i32,
            ms[1] as i32,
            ms[2] as i32,
            n as i32,
            ws[0].cols as i32,
        );
        b.arg(&m0).arg(&m1).arg(&m2).arg(x).arg(&n).arg(&k);
        // SAFETY: the arguments are gemv3's, in its order; outs[i] holds n x ms[i] floats, x
        // n x k, and every used weight ms[i] x k of the kernel's storage type.
        unsafe { b.launch(gemv_grid(rows)) }
            .unwrap_or_else(|e| panic!("CUDA launch of {name}: {e}"));
    }

    /// SGEMM out (n, m) = x (n, k) w^T for f32 weights `w` (m, k) (cuBLAS is column-major:
    /// out^T (m, n) = w^T' x^T, A = w read transposed with lda = k, B = x with ldb = k), into
    /// the columns `rows` of out.
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: Range<usize>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: rows.len() as i32,
            n: n as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: k as i32,
            ldb: k as i32,
            beta: 0.0f32,
            ldc: m as i32,
        };
        let mut c = out.slice_mut(rows.start..);
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: w holds rows.len() x k floats, x n x k, and out (n, m) from column
        // rows.start on holds the (rows.len(), n) column-major block with ldc = m.
        unsafe { blas.gemm(cfg, w, x, &mut c) }.expect("cuBLAS sgemm");
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) {
        self.stream.synchronize().expect("CUDA synchronize");
    }
}

/// Launches kernel `$name` of `$self` with `$cfg` and the given arguments, in order.
macro_rules! launch {
    ($self:ident, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut b = $self.stream.launch_builder(&$self.funcs[$name]);
        $(b.arg($arg);)+
        // SAFETY: every call site passes the argument list its kernel declares, with buffers
        // sized by the shapes the forward pass checked.
        unsafe { b.launch($cfg) }.unwrap_or_else(|e| panic!("CUDA launch of {}: {e}", $name));
    }};
}

/// A quantized matrix's values as IEEE half floats (their bits), widened a few rows at a time:
/// no f32 copy of the whole matrix (2 GB for a large model's embedding) is made on the way.
pub fn half_bits(q: &QuantMatrix) -> Vec<u16> {
    let chunk_rows = ((1 << 16) / q.cols).clamp(1, q.rows.max(1));
    let mut out = Vec::with_capacity(q.rows * q.cols);
    let mut wide = vec![0f32; chunk_rows * q.cols];
    for r0 in (0..q.rows).step_by(chunk_rows) {
        let rows = &mut wide[..chunk_rows.min(q.rows - r0) * q.cols];
        q.dequantize_rows(r0, rows);
        out.extend(rows.iter().map(|&v| half::f16::from_f32(v).to_bits()));
    }
    out
}

/// One warp per output row.
fn gemv_grid(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(GEMV_WARPS).max(1), 1, 1),
        block_dim: (32 * GEMV_WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn grid(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Weight = GpuTensor;

    fn name(&self) -> String {
        format!("cuda:{} {}", self.ordinal, self.name)
    }

    fn upload(&self, t: &Tensor) -> GpuTensor {
        let up16 = |bits: &[u16]| self.stream.clone_htod(bits).expect("uploading a weight");
        let data = match t.quant.as_deref() {
            None => GpuData::F32(self.upload_f32(&t.data)),
            Some(q) => {
                let bits = |b: &[u8]| -> Vec<u16> {
                    b.chunks_exact(2)
                        .map(|p| u16::from_le_bytes([p[0], p[1]]))
                        .collect()
                };
                match q.format {
                    BlockFormat::F16 => GpuData::F16(up16(&bits(&q.qs))),
                    BlockFormat::Bf16 => GpuData::Bf16(up16(&bits(&q.qs))),
                    BlockFormat::Q4 | BlockFormat::Q8 => GpuData::F16(up16(&half_bits(q))),
                }
            }
        };
        GpuTensor {
            data,
            rows: t.rows(),
            cols: t.cols(),
        }
    }

    fn alloc(&self, len: usize) -> CudaSlice<f32> {
        self.stream
            .alloc_zeros(len.max(1))
            .expect("allocating device memory")
    }

    fn copy(
        &self,
        dst: &mut CudaSlice<f32>,
        dst_off: usize,
        src: &CudaSlice<f32>,
        src_off: usize,
        len: usize,
    ) {
        let s = src.slice(src_off..src_off + len);
        let mut d = dst.slice_mut(dst_off..dst_off + len);
        self.stream.memcpy_dtod(&s, &mut d).expect("device copy");
    }

    fn read(&self, buf: &CudaSlice<f32>, at: Range<usize>, out: &mut Vec<f32>) {
        *out = self
            .stream
            .clone_dtoh(&buf.slice(at))
            .expect("device to host copy");
    }

    fn embed(&self, out: &mut CudaSlice<f32>, table: &GpuTensor, ids: &[u32]) {
        let d_ids = self.stream.clone_htod(ids).expect("uploading token ids");
        let (n, dim) = (ids.len() as i32, table.cols as i32);
        let name = format!("embed_{}", table.data.suffix());
        let mut b = self.stream.launch_builder(&self.funcs[name.as_str()]);
        b.arg(out);
        table.data.push(&mut b);
        b.arg(&d_ids).arg(&n).arg(&dim);
        // SAFETY: embed's arguments in order; out holds ids.len() x dim floats and every id
        // is a row of the table (the tokenizer's and the engine's checks).
        unsafe { b.launch(grid(ids.len() * table.cols, 256)) }
            .unwrap_or_else(|e| panic!("CUDA launch of {name}: {e}"));
    }

    fn rmsnorm(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &GpuTensor,
        n: usize,
        eps: f32,
    ) {
        let dim = w.rows as i32;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "rmsnorm_f32", cfg, out, x, w.f32(), &dim, &eps);
    }

    fn matmul(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, w: &GpuTensor, n: usize) {
        let (m, k) = (w.rows, w.cols);
        if self.takes_gemv(w, n) {
            return self.gemv3([out, out, out], [w, w, w], [m, 0, 0], x, n);
        }
        let widen = match &w.data {
            GpuData::F32(d) => return self.sgemm(out, x, d, 0..m, m, k, n),
            GpuData::F16(d) | GpuData::Bf16(d) => d,
        };
        let name = format!("widen_{}", w.data.suffix());
        let slice_rows = (WIDEN_MAX / k).clamp(1, m);
        // SAFETY: every value is written by the widening kernel before SGEMM reads it.
        let mut wide =
            unsafe { self.stream.alloc::<f32>(slice_rows * k) }.expect("allocating device memory");
        for r0 in (0..m).step_by(slice_rows) {
            let rows = r0..(r0 + slice_rows).min(m);
            let len = rows.len() * k;
            let src = widen.slice(r0 * k..r0 * k + len);
            launch!(self, name.as_str(), grid(len, 256), &mut wide, &src, &len);
            self.sgemm(out, x, &wide, rows, m, k, n);
        }
    }

    fn matmul3(
        &self,
        outs: [&mut CudaSlice<f32>; 3],
        x: &CudaSlice<f32>,
        ws: [&GpuTensor; 3],
        n: usize,
    ) {
        let same = ws
            .iter()
            .all(|w| w.cols == ws[0].cols && w.data.suffix() == ws[0].data.suffix());
        if same && self.takes_gemv(ws[0], n) {
            let [a, b, c] = outs;
            return self.gemv3([a, b, c], ws, ws.map(|w| w.rows), x, n);
        }
        for (out, w) in outs.into_iter().zip(ws) {
            self.matmul(out, x, w, n);
        }
    }

    fn gate_up(
        &self,
        gate: &mut CudaSlice<f32>,
        up: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        [w_gate, w_up]: [&GpuTensor; 2],
        n: usize,
        width: usize,
    ) {
        let same = w_gate.data.suffix() == w_up.data.suffix();
        if !(same && self.takes_gemv(w_gate, n)) {
            self.matmul(gate, x, w_gate, n);
            self.matmul(up, x, w_up, n);
            return self.silu_mul(gate, up, n * width);
        }
        let name = format!("gate_up_{}", w_gate.data.suffix());
        let mut b = self.stream.launch_builder(&self.funcs[name.as_str()]);
        b.arg(gate);
        w_gate.data.push(&mut b);
        w_up.data.push(&mut b);
        let (n, k, m) = (n as i32, w_gate.cols as i32, width as i32);
        b.arg(x).arg(&n).arg(&k).arg(&m);
        // SAFETY: gate_up's arguments in order; gate holds n x width floats, x n x k, both
        // matrices width x k of the kernel's storage type.
        unsafe { b.launch(gemv_grid(width)) }
            .unwrap_or_else(|e| panic!("CUDA launch of {name}: {e}"));
    }

    fn add_bias(&self, x: &mut CudaSlice<f32>, b: &GpuTensor, n: usize) {
        let (rows, m) = (n as i32, b.rows as i32);
        launch!(
            self,
            "add_bias_f32",
            grid(n * b.rows, 256),
            x,
            b.f32(),
            &rows,
            &m
        );
    }

    fn rope(&self, x: &mut CudaSlice<f32>, cos: &GpuTensor, sin: &GpuTensor, s: RopeShape) {
        let (nt, nh, hd, p0) = (
            s.n_tokens as i32,
            s.n_heads as i32,
            s.head_dim as i32,
            s.pos0 as i32,
        );
        launch!(
            self,
            "rope_half_f32",
            grid(s.n_tokens * s.n_heads * s.head_dim / 2, 256),
            x,
            cos.f32(),
            sin.f32(),
            &nt,
            &nh,
            &hd,
            &p0
        );
    }

    fn attention(
        &self,
        out: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        s: AttnShape,
    ) {
        let (nh, nkv, hd, p0) = (
            s.n_heads as i32,
            s.n_kv_heads as i32,
            s.head_dim as i32,
            s.pos0 as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: ((s.n_tokens * s.n_heads) as u32, 1, 1),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "attention_f32",
            cfg,
            out,
            q,
            k,
            v,
            &nh,
            &nkv,
            &hd,
            &p0
        );
    }

    fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>, len: usize) {
        let n = len as i32;
        launch!(self, "silu_mul_f32", grid(len, 256), gate, up, &n);
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, len: usize) {
        let n = len as i32;
        launch!(self, "add_f32", grid(len, 256), x, y, &n);
    }

    fn memory(&self) -> Option<(usize, usize)> {
        self.stream.context().mem_get_info().ok()
    }

    fn argmax(&self, x: &CudaSlice<f32>, at: Range<usize>) -> Option<u32> {
        let mut out = self
            .stream
            .alloc_zeros::<u32>(1)
            .expect("allocating the argmax result");
        let len = at.len() as i32;
        let x = x.slice(at);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "argmax_f32", cfg, &mut out, &x, &len);
        let id = self.stream.clone_dtoh(&out).expect("reading the argmax")[0];
        (id != u32::MAX).then_some(id)
    }
}
