// RMSNorm, row-wise: out = w * (x / sqrt(mean(x^2) + eps)).
// Thread mapping: one block of 256 threads per row; each thread strides over the row,
// the sum of squares is reduced across the block, then each thread writes its elements.

extern "C" __global__ void rmsnorm_f32(float* out, const float* x, const float* w, int dim, float eps) {
    __shared__ float red[33];
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* o = out + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i] * xr[i];
    s = block_sum(s, red);
    float scale = 1.0f / sqrtf(s / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = w[i] * (xr[i] * scale);
}
