// Products with few tokens (decode, up to GEMV_MAX_TOKENS rows of x), weights read as stored
// (f32, f16 or bf16) with f32 accumulation; larger products go through cuBLAS SGEMM, with
// 16-bit weights widened a slice of rows at a time by `widen_*`.
// Thread mapping (gemv): one warp per output row of w, GEMV_WARPS warps a block. Lane l
// reads the row's 8-value chunks l, l + 32, ... (one 16-byte load of 16-bit weights, two of
// f32), multiplies each with the same columns of every token's x (read through the cache,
// shared by all warps), and a warp sum per token ends the row. The weights are read once
// for all tokens, which is what makes decode steps of several sequences cheap.
// k must be a multiple of 8 (the caller takes cuBLAS otherwise).
// gemv3 runs up to three products with the same x in one launch (q, k and v: rows of w0,
// then w1, then w2); gate_up writes silu(x w_gate^T) * (x w_up^T), reading both rows in
// the same warp.
#define GEMV_MAX_TOKENS 8
#define GEMV_WARPS 8

// acc[t] = x[t] . row for t < n, summed over the warp (every lane gets the sums).
template <typename W>
__device__ __forceinline__ void row_dot(float* acc, const typename W::T* row, const float* x, int n, int k) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOKENS; t++) acc[t] = 0.0f;
    for (int c = lane * 8; c < k; c += 32 * 8) {
        float w[8];
        W::load8(row + c, w);
#pragma unroll
        for (int t = 0; t < GEMV_MAX_TOKENS; t++) {
            if (t < n) {
                const float4* xp = (const float4*)(x + (size_t)t * k + c);
                float4 a = __ldg(xp), b = __ldg(xp + 1);
                acc[t] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w
                        + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOKENS; t++) {
        if (t < n) acc[t] = warp_sum(acc[t]);
    }
}

template <typename W>
__device__ void gemv3(float* out0, float* out1, float* out2,
                      const typename W::T* w0, const typename W::T* w1, const typename W::T* w2,
                      int m0, int m1, int m2, const float* x, int n, int k) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    float* out = out0;
    const typename W::T* w = w0;
    int m = m0;
    if (r >= m0) { r -= m0; out = out1; w = w1; m = m1;
        if (r >= m1) { r -= m1; out = out2; w = w2; m = m2; } }
    if (r >= m) return;  // the whole warp leaves together
    float acc[GEMV_MAX_TOKENS];
    row_dot<W>(acc, w + (size_t)r * k, x, n, k);
    if ((threadIdx.x & 31) == 0) {
        for (int t = 0; t < n; t++) out[(size_t)t * m + r] = acc[t];
    }
}

template <typename W>
__device__ void gate_up(float* gate, const typename W::T* wg, const typename W::T* wu,
                        const float* x, int n, int k, int m) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (r >= m) return;
    float g[GEMV_MAX_TOKENS], u[GEMV_MAX_TOKENS];
    row_dot<W>(g, wg + (size_t)r * k, x, n, k);
    row_dot<W>(u, wu + (size_t)r * k, x, n, k);
    if ((threadIdx.x & 31) == 0) {
        for (int t = 0; t < n; t++) gate[(size_t)t * m + r] = g[t] / (1.0f + expf(-g[t])) * u[t];
    }
}

// out (n) = in (n) widened to f32
template <typename W>
__device__ void widen(float* out, const typename W::T* in, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = W::at(in, i);
}

#define GEMV_ENTRY(SUFFIX, W)                                                                   \
    extern "C" __global__ void gemv3_##SUFFIX(float* o0, float* o1, float* o2,                  \
        const W::T* w0, const W::T* w1, const W::T* w2, int m0, int m1, int m2,                 \
        const float* x, int n, int k) { gemv3<W>(o0, o1, o2, w0, w1, w2, m0, m1, m2, x, n, k); } \
    extern "C" __global__ void gate_up_##SUFFIX(float* gate, const W::T* wg, const W::T* wu,    \
        const float* x, int n, int k, int m) { gate_up<W>(gate, wg, wu, x, n, k, m); }
GEMV_ENTRY(f32, WF32)
GEMV_ENTRY(f16, WF16)
GEMV_ENTRY(bf16, WBF16)

extern "C" __global__ void widen_f16(float* out, const unsigned short* in, size_t n) { widen<WF16>(out, in, n); }
extern "C" __global__ void widen_bf16(float* out, const unsigned short* in, size_t n) { widen<WBF16>(out, in, n); }
