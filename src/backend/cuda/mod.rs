//! The CUDA backend: `Backend` over device buffers (`CudaSlice<f32>`), with the hand-written
//! kernels of `kernels/*.cu` (compiled by NVRTC at start-up for the device's compute
//! capability, or built-in PTX from nvcc) and cuBLAS SGEMM for the projections. Weights are
//! uploaded once and shared read-only. All kernels are loaded at start-up, so a bad kernel
//! fails there, not on the first request. A failed launch panics the calling worker, which
//! the pool catches and reports as `unknown_error_occurred`.

pub mod probe;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::kernels::{KERNEL_COMMON, KERNEL_PTX, KERNEL_SOURCES};
use super::{AttnShape, Backend, RopeShape};
use crate::model::weights::Tensor;
pub use probe::{nvrtc_available, probe, CudaUnavailable};

/// Threads per block of the attention kernel (kernels/attention.cu's ATT_THREADS).
const ATT_THREADS: u32 = 128;

/// A weight on the device with its matrix shape.
pub struct GpuTensor {
    /// Values, row-major.
    pub data: CudaSlice<f32>,
    /// Rows (first dimension).
    pub rows: usize,
    /// Columns (product of the others).
    pub cols: usize,
}

/// One CUDA device: context, stream, cuBLAS handle and the kernel table.
pub struct Cuda {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
}

/// Every kernel the backend launches, by function name.
const FUNCTIONS: &[&str] = &[
    "add_f32",
    "silu_mul_f32",
    "add_bias_f32",
    "embed_f32",
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
            let module = ctx
                .load_module(ptx)
                .map_err(|e| CudaUnavailable::Kernels(format!("{stem}.cu: {e}")))?;
            for f in FUNCTIONS {
                if source.contains(&format!("void {f}(")) {
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
            blas,
            funcs,
        })
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) {
        self.stream.synchronize().expect("CUDA synchronize");
    }
}

/// Launches kernel `$name` of `$self` with `$cfg` and the given arguments, in order.
macro_rules! launch {
    ($self:ident, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let mut b = $self.stream.launch_builder(&$self.funcs[$name]);
        $(b.arg($arg);)+
        // SAFETY: every call site passes the argument list its kernel declares, with buffers
        // sized by the shapes the forward pass checked.
        unsafe { b.launch($cfg) }.unwrap_or_else(|e| panic!("CUDA launch of {}: {e}", $name));
    }};
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
        let data = self
            .stream
            .clone_htod(&t.to_f32()[..])
            .expect("uploading a weight");
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
        launch!(
            self,
            "embed_f32",
            grid(ids.len() * table.cols, 256),
            out,
            &table.data,
            &d_ids,
            &n,
            &dim
        );
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
        launch!(self, "rmsnorm_f32", cfg, out, x, &w.data, &dim, &eps);
    }

    fn matmul(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, w: &GpuTensor, n: usize) {
        // Row-major out (n, m) = x (n, k) w^T is column-major out^T (m, n) = w^T' x^T: with
        // cuBLAS's column-major view, A = w read transposed (lda = k), B = x (ldb = k).
        let (m, k) = (w.rows as i32, w.cols as i32);
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m,
            n: n as i32,
            k,
            alpha: 1.0f32,
            lda: k,
            ldb: k,
            beta: 0.0f32,
            ldc: m,
        };
        // SAFETY: the buffers hold (m, k), (n, k) and (n, m) floats, as the RunState sized them.
        unsafe { self.blas.gemm(cfg, &w.data, x, out) }.expect("cuBLAS sgemm");
    }

    fn add_bias(&self, x: &mut CudaSlice<f32>, b: &GpuTensor, n: usize) {
        let (rows, m) = (n as i32, b.rows as i32);
        launch!(
            self,
            "add_bias_f32",
            grid(n * b.rows, 256),
            x,
            &b.data,
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
            &cos.data,
            &sin.data,
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
