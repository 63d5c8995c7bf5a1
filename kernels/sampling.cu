// Logits-side ops, so greedy decode copies one id back instead of the whole vocabulary.
// argmax: one block of 1024 threads; each thread scans a strided share of the logits, then a
// shared-memory tree reduction keeps the largest value (the lowest index on ties, as
// torch.argmax). A NaN or infinite logit makes the result 0xFFFFFFFF (an error, not a token).

extern "C" __global__ void argmax_f32(unsigned int* out, const float* x, int n) {
    __shared__ float bv[1024];
    __shared__ int bi[1024];
    __shared__ int bad;
    int tid = threadIdx.x;
    if (tid == 0) bad = 0;
    __syncthreads();
    float best = -INF_F;
    int idx = 0x7fffffff;
    for (int i = tid; i < n; i += blockDim.x) {
        float v = x[i];
        if (!isfinite(v)) bad = 1;
        if (v > best || (v == best && i < idx)) { best = v; idx = i; }
    }
    bv[tid] = best;
    bi[tid] = idx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) {
            float ov = bv[tid + s];
            int oi = bi[tid + s];
            if (ov > bv[tid] || (ov == bv[tid] && oi < bi[tid])) { bv[tid] = ov; bi[tid] = oi; }
        }
        __syncthreads();
    }
    if (tid == 0) out[0] = bad ? 0xFFFFFFFFu : (unsigned int)bi[0];
}
