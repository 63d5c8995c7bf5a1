// Element-wise ops: residual add, SiLU*mul, bias add and the embedding gather.
// Thread mapping: one thread per output element, 256 threads per block, a 1-D grid covering
// the element count; memory-bound, so each thread does one coalesced load/store pair.

extern "C" __global__ void add_f32(float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// gate = silu(gate) * up, silu(g) = g / (1 + e^-g)
extern "C" __global__ void silu_mul_f32(float* gate, const float* up, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x (rows, m) += b (m)
extern "C" __global__ void add_bias_f32(float* x, const float* b, int rows, int m) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * m) x[i] += b[i % m];
}

// out (n, dim) = table[ids[row]], the table stored as W (common.cuh)
template <typename W>
__device__ void embed(float* out, const typename W::T* table, const unsigned int* ids, int n, int dim) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n * dim) {
        int row = i / dim;
        out[i] = W::at(table, (size_t)ids[row] * dim + (i % dim));
    }
}

extern "C" __global__ void embed_f32(float* out, const float* table, const unsigned int* ids, int n, int dim) {
    embed<WF32>(out, table, ids, n, dim);
}
extern "C" __global__ void embed_f16(float* out, const unsigned short* table, const unsigned int* ids, int n, int dim) {
    embed<WF16>(out, table, ids, n, dim);
}
extern "C" __global__ void embed_bf16(float* out, const unsigned short* table, const unsigned int* ids, int n, int dim) {
    embed<WBF16>(out, table, ids, n, dim);
}
