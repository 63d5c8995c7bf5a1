// RoPE with Hugging Face's half-split pairing (rope_half): dimension i of each head rotates
// with i + head_dim/2 by the angle of its position; cos/sin are (max_pos, head_dim/2) tables
// already holding llama3 scaling. Thread mapping: one thread per (token, head, pair).

extern "C" __global__ void rope_half_f32(float* x, const float* cos_t, const float* sin_t,
                                         int n_tokens, int n_heads, int head_dim, int pos0) {
    int half = head_dim / 2;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_tokens * n_heads * half) return;
    int i = idx % half;
    int th = idx / half;          // token * n_heads + head
    int t = th / n_heads;
    float* h = x + (size_t)th * head_dim;
    size_t p = (size_t)(pos0 + t) * half + i;
    float c = cos_t[p], s = sin_t[p];
    float x0 = h[i], x1 = h[i + half];
    h[i] = x0 * c - x1 * s;
    h[i + half] = x1 * c + x0 * s;
}
