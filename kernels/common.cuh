// Shared device helpers, prepended to every kernel file before NVRTC compiles it.
// Block reductions assume blockDim.x is a multiple of 32 and at most 1024; `red` is a
// __shared__ float[33] owned by the caller; every thread of the block must call them.
#ifndef CHATSTREAM_COMMON_CUH
#define CHATSTREAM_COMMON_CUH
#define INF_F __int_as_float(0x7f800000)

// How a weight matrix is stored: f32, or 16-bit floats carried as their bits (unsigned
// short): IEEE half, widened by the conversion instruction (so NVRTC needs no header), or
// bfloat16, the top half of an f32. Each gives one value (`at`) or eight (`load8`, from an
// index that is a multiple of 8: one 16-byte load for 16-bit, two for f32).
struct WF32 {
    typedef float T;
    static __device__ __forceinline__ float at(const float* w, size_t i) { return w[i]; }
    static __device__ __forceinline__ void load8(const float* w, float* o) {
        float4 a = __ldg((const float4*)w), b = __ldg((const float4*)w + 1);
        o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
        o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
    }
};

__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// 16-bit storage: bfloat16 when BF, else IEEE half.
template <bool BF>
struct W16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float Widen(unsigned short h) {
        return BF ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
    }
    static __device__ __forceinline__ float at(const unsigned short* w, size_t i) { return Widen(w[i]); }
    static __device__ __forceinline__ void load8(const unsigned short* w, float* o) {
        uint4 v = __ldg((const uint4*)w);
        unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            o[2 * j] = Widen((unsigned short)(u[j] & 0xffff));
            o[2 * j + 1] = Widen((unsigned short)(u[j] >> 16));
        }
    }
};
typedef W16<false> WF16;
typedef W16<true> WBF16;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum over the block, returned to every thread.
__device__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? red[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) red[32] = v;
    }
    __syncthreads();
    return red[32];
}

// Maximum over the block, returned to every thread.
__device__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? red[lane] : -INF_F;
        v = warp_max(v);
        if (lane == 0) red[32] = v;
    }
    __syncthreads();
    return red[32];
}
#endif
