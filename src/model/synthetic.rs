//! Random-weight models of named shapes, built in memory: benchmark hardware or check
//! CPU/GPU parity at a real model's size without downloading it. Weights are drawn from a
//! seeded generator (normal-ish, std 0.02), norms start at 1; the config matches the shape.

use super::config::{Arch, Llama3RopeScaling, ModelConfig};
use super::dequant::{quantize, GgmlType, QuantMatrix};
use super::weights::{LayerWeights, Tensor, Weights};

/// Shapes `synthetic` knows.
pub const SHAPES: &[&str] = &["smollm2-135m", "llama-3.2-1b", "tiny"];

/// The config of a named shape.
pub fn shape_config(shape: &str) -> Result<ModelConfig, String> {
    let base = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        n_layers: 30,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        rope_freq_factors: None,
    };
    match shape {
        "smollm2-135m" => Ok(base),
        "llama-3.2-1b" => Ok(ModelConfig {
            vocab_size: 128256,
            hidden_size: 2048,
            intermediate_size: 8192,
            n_layers: 16,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 64,
            rope_theta: 500000.0,
            rope_scaling: Some(Llama3RopeScaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            max_position_embeddings: 131072,
            ..base
        }),
        "tiny" => Ok(ModelConfig {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 176,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            max_position_embeddings: 256,
            ..base
        }),
        other => Err(format!(
            "unknown shape '{other}' (known: {})",
            SHAPES.join(", ")
        )),
    }
}

struct Rng(u64);

impl Rng {
    /// Roughly normal values (sum of four uniforms), scaled to `std`.
    fn fill(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let mut s = 0f32;
                for _ in 0..4 {
                    self.0 = self
                        .0
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    s += (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                s * std * 1.732
            })
            .collect()
    }
}

/// A (rows, cols) matrix of `values` stored as `format`: quantized as a GGUF file would hold
/// it, or f32 where its rows are not whole blocks (as norms are) or `format` is F32.
pub fn matrix_as(format: GgmlType, rows: usize, cols: usize, values: Vec<f32>) -> Tensor {
    let compact = (format != GgmlType::F32)
        .then(|| quantize(format, &values))
        .flatten()
        .and_then(|bytes| QuantMatrix::from_ggml(format, &bytes, rows, cols));
    match compact {
        Some(m) => Tensor::blocks(m),
        None => Tensor::new(vec![rows, cols], values),
    }
}

/// A model of `shape` with random weights from `seed`, its matrices stored as `format`
/// (quantized as a GGUF file would hold them; a matrix whose rows are not whole blocks
/// stays f32, as norms do).
pub fn synthetic(
    shape: &str,
    seed: u64,
    format: GgmlType,
) -> Result<(ModelConfig, Weights), String> {
    let c = shape_config(shape)?;
    let mut rng = Rng(seed);
    let (d, h, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let mut t = |shape: &[usize]| {
        let values = rng.fill(shape.iter().product(), 0.02);
        matrix_as(format, shape[0], shape[1], values)
    };
    let ones = |n: usize| Tensor::new(vec![n], vec![1.0; n]);
    let layers = (0..c.n_layers)
        .map(|_| LayerWeights {
            attn_norm: ones(d),
            wq: t(&[q, d]),
            wk: t(&[kv, d]),
            wv: t(&[kv, d]),
            bqkv: None,
            wo: t(&[d, q]),
            ffn_norm: ones(d),
            w_gate: t(&[h, d]),
            w_up: t(&[h, d]),
            w_down: t(&[d, h]),
        })
        .collect();
    let embed = t(&[c.vocab_size, d]);
    Ok((
        c,
        Weights {
            embed,
            layers,
            norm: ones(d),
            lm_head: None,
        },
    ))
}
