// Causal attention over the KV cache, for decode (one query token) and prefill (many):
// out = softmax(q k^T / sqrt(d)) v over positions 0..=pos0+t, GQA (query head h reads kv head
// h / (n_heads / n_kv_heads)).
// Thread mapping: one block of ATT_THREADS threads per (token, head). Keys are taken in tiles
// of ATT_THREADS: each thread scores one key of the tile, the block finds the tile's maximum
// and sum (online softmax, rescaling what was accumulated), then each thread accumulates up to
// two output dimensions (head_dim <= 2 * ATT_THREADS = 256) over the tile's values.
#define ATT_THREADS 128

extern "C" __global__ void attention_f32(float* out, const float* q, const float* k, const float* v,
                                         int n_heads, int n_kv_heads, int head_dim, int pos0) {
    __shared__ float qs[2 * ATT_THREADS];
    __shared__ float p[ATT_THREADS];
    __shared__ float red[33];
    int th = blockIdx.x;
    int t = th / n_heads, h = th % n_heads;
    int kv_dim = n_kv_heads * head_dim;
    int koff = (h / (n_heads / n_kv_heads)) * head_dim;
    int positions = pos0 + t + 1;
    const float* qh = q + (size_t)th * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = qh[d];
    __syncthreads();
    float scale = 1.0f / sqrtf((float)head_dim);
    float m = -INF_F, l = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    int d0 = threadIdx.x, d1 = threadIdx.x + ATT_THREADS;
    for (int j0 = 0; j0 < positions; j0 += ATT_THREADS) {
        int j = j0 + threadIdx.x;
        float s = -INF_F;
        if (j < positions) {
            const float* kj = k + (size_t)j * kv_dim + koff;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++) dot += qs[d] * kj[d];
            s = dot * scale;
        }
        float new_m = fmaxf(m, block_max(s, red));
        float pj = j < positions ? expf(s - new_m) : 0.0f;
        p[threadIdx.x] = pj;
        float tile_sum = block_sum(pj, red);  // also orders the write of p before the reads
        float r = expf(m - new_m);
        l = l * r + tile_sum;
        acc0 *= r;
        acc1 *= r;
        m = new_m;
        int nj = min(ATT_THREADS, positions - j0);
        for (int jj = 0; jj < nj; jj++) {
            const float* vj = v + (size_t)(j0 + jj) * kv_dim + koff;
            float pp = p[jj];
            if (d0 < head_dim) acc0 += pp * vj[d0];
            if (d1 < head_dim) acc1 += pp * vj[d1];
        }
        __syncthreads();
    }
    float* o = out + (size_t)th * head_dim;
    if (d0 < head_dim) o[d0] = acc0 / l;
    if (d1 < head_dim) o[d1] = acc1 / l;
}
