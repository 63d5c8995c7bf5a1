//! Naive reference ops: the obvious loops, f64 accumulation, no threads, no SIMD. They
//! exist to check the fast ops in `ops.rs` (tests and proptests compare the two) and are
//! never used for serving.

use crate::backend::{AttnShape, RopeShape};

/// out (n, m) = x (n, k) @ w (m, k)^T.
pub fn matmul(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    for i in 0..n {
        for j in 0..m {
            let s: f64 = (0..k)
                .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                .sum();
            out[i * m + j] = s as f32;
        }
    }
}

/// Row-wise RMSNorm.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], n: usize, eps: f32) {
    let dim = w.len();
    for r in 0..n {
        let row = &x[r * dim..(r + 1) * dim];
        let ms: f64 = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let scale = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..dim {
            out[r * dim + i] = (w[i] as f64 * row[i] as f64 * scale) as f32;
        }
    }
}

/// RoPE computed from the inverse frequencies directly, angle by angle (`rope` vs `rope_slow`).
pub fn rope_slow(x: &mut [f32], inv_freq: &[f32], s: RopeShape) {
    let half = s.head_dim / 2;
    for t in 0..s.n_tokens {
        let pos = (s.pos0 + t) as f64;
        for h in 0..s.n_heads {
            let base = (t * s.n_heads + h) * s.head_dim;
            for i in 0..half {
                let angle = pos * inv_freq[i] as f64;
                let (x0, x1) = (x[base + i] as f64, x[base + i + half] as f64);
                x[base + i] = (x0 * angle.cos() - x1 * angle.sin()) as f32;
                x[base + i + half] = (x1 * angle.cos() + x0 * angle.sin()) as f32;
            }
        }
    }
}

/// Causal attention with an explicit score vector and a two-pass softmax.
pub fn attention(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    let d = s.head_dim;
    let kv_dim = s.n_kv_heads * d;
    let group = s.n_heads / s.n_kv_heads;
    for t in 0..s.n_tokens {
        let pos = s.pos0 + t;
        for h in 0..s.n_heads {
            let qo = (t * s.n_heads + h) * d;
            let ko = (h / group) * d;
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..d)
                        .map(|i| q[qo + i] as f64 * k[j * kv_dim + ko + i] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..d {
                let acc: f64 = (0..=pos)
                    .map(|j| e[j] * v[j * kv_dim + ko + i] as f64)
                    .sum();
                out[qo + i] = (acc / sum) as f32;
            }
        }
    }
}

/// Softmax in f64.
pub fn softmax(x: &mut [f32]) {
    let max = x
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    for (o, e) in x.iter_mut().zip(e) {
        *o = (e / sum) as f32;
    }
}
