// Shared device helpers, prepended to every kernel file before NVRTC compiles it.
// Block reductions assume blockDim.x is a multiple of 32 and at most 1024; `red` is a
// __shared__ float[33] owned by the caller; every thread of the block must call them.
#ifndef CHATSTREAM_COMMON_CUH
#define CHATSTREAM_COMMON_CUH
#define INF_F __int_as_float(0x7f800000)

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
