//! `ModelConfig`: the hyper-parameters of a Llama-family model, read from a Hugging Face
//! `config.json` (both the transformers 5 `rope_parameters` layout and the older top-level
//! `rope_theta`/`rope_scaling`) or from GGUF metadata. Also owns the RoPE frequency table,
//! including llama3 scaling. It does not read weights.

use serde_json::Value;

use super::error::LoadError;
use super::gguf::{GgufFile, MetaValue};

/// The widest attention head the engine supports (attention keeps one head on the stack).
pub const MAX_HEAD_DIM: usize = 256;

/// Which member of the Llama family; they differ only in details the forward pass reads
/// from the config (q/k/v bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM, and other `LlamaForCausalLM` models.
    Llama,
    /// Mistral (Llama layout, no sliding window used here).
    Mistral,
    /// Qwen2 (q/k/v projections carry a bias).
    Qwen2,
}

impl Arch {
    /// Maps a `model_type` (HF) or `general.architecture` (GGUF) name; anything else is refused.
    pub fn from_name(name: &str) -> Result<Arch, LoadError> {
        match name {
            "llama" | "smollm" | "LlamaForCausalLM" => Ok(Arch::Llama),
            "mistral" | "MistralForCausalLM" => Ok(Arch::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
            other => Err(LoadError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// Llama 3's frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall scale of low frequencies.
    pub factor: f64,
    /// Wavelength threshold factor below which frequencies are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelength threshold factor above which frequencies are kept.
    pub high_freq_factor: f64,
    /// Context length the model was trained with before scaling.
    pub original_max_position_embeddings: f64,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional llama3 RoPE scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Per-frequency divisors baked into some GGUF files (`rope_freqs.weight`, llama3).
    pub rope_freq_factors: Option<Vec<f32>>,
}

fn get_usize(v: &Value, key: &str) -> Result<usize, LoadError> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| LoadError::Config(format!("config.json: missing or invalid '{key}'")))
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` value.
    pub fn from_hf_json(v: &Value) -> Result<ModelConfig, LoadError> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| LoadError::Config("config.json: missing 'model_type'".into()))?;
        let arch = Arch::from_name(model_type)?;
        let hidden_size = get_usize(v, "hidden_size")?;
        let n_heads = get_usize(v, "num_attention_heads")?;
        let n_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map_or(n_heads, |x| x as usize);
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None if n_heads > 0 => hidden_size / n_heads,
            None => 0,
        };
        // transformers 5 nests RoPE settings in `rope_parameters`; older folders keep
        // `rope_theta` and `rope_scaling` at the top level.
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = rope
            .and_then(|r| get_f64(r, "rope_theta"))
            .or_else(|| get_f64(v, "rope_theta"))
            .unwrap_or(10000.0);
        let scaling = rope.or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_scaling = match scaling {
            Some(s) => parse_rope_scaling(s)?,
            None => None,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: get_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size")?,
            n_layers: get_usize(v, "num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: get_f64(v, "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(v, "max_position_embeddings")?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: arch == Arch::Qwen2
                || v.get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            rope_freq_factors: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a GGUF file's `<arch>.*` metadata. Ties the output head to the embedding when
    /// the file has no `output.weight`.
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig, LoadError> {
        let arch_name = f
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| LoadError::Config("GGUF: missing 'general.architecture'".into()))?;
        let arch = Arch::from_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| {
            f.get(&key(k))
                .and_then(MetaValue::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| LoadError::Config(format!("GGUF: missing or invalid '{}'", key(k))))
        };
        let float = |k: &str| f.get(&key(k)).and_then(MetaValue::as_f64);
        let hidden_size = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(e) => f
                .get("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array)
                .map(<[MetaValue]>::len)
                .ok_or(e)?,
        };
        let head_dim = int("rope.dimension_count")
            .or_else(|_| int("attention.key_length"))
            .unwrap_or(hidden_size.checked_div(n_heads).unwrap_or(0));
        if let Some(kind) = f.get(&key("rope.scaling.type")).and_then(MetaValue::as_str) {
            if kind != "none" {
                return Err(LoadError::Config(format!(
                    "GGUF: unsupported rope scaling '{kind}'"
                )));
            }
        }
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            n_layers: int("block_count")?,
            n_heads,
            n_kv_heads: int("attention.head_count_kv").unwrap_or(n_heads),
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_scaling: None,
            max_position_embeddings: int("context_length")?,
            tie_word_embeddings: !f.tensors.contains_key("output.weight"),
            attention_bias: arch == Arch::Qwen2,
            rope_freq_factors: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |what: String| Err(LoadError::Config(what));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.n_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > MAX_HEAD_DIM {
            return bad(format!(
                "head_dim must be even, positive and at most {MAX_HEAD_DIM}, got {}",
                self.head_dim
            ));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        Ok(())
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies, `head_dim / 2` of them, with llama3 scaling applied.
    /// Computed in f64 and rounded once, as transformers' f32 table is to within an ulp.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / d);
                let f = match &self.rope_scaling {
                    Some(s) => llama3_scale(f, s),
                    None => f,
                };
                let factor = self.rope_freq_factors.as_ref().and_then(|r| r.get(i));
                (f / factor.map_or(1.0, |&x| x as f64)) as f32
            })
            .collect()
    }
}

fn parse_rope_scaling(s: &Value) -> Result<Option<Llama3RopeScaling>, LoadError> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = |k: &str| {
                get_f64(s, k)
                    .ok_or_else(|| LoadError::Config(format!("rope scaling: missing '{k}'")))
            };
            Ok(Some(Llama3RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")?,
            }))
        }
        other => Err(LoadError::Config(format!(
            "unsupported rope scaling type '{other}' (supported: default, llama3)"
        ))),
    }
}

/// transformers' `_compute_llama3_parameters` for one frequency.
fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen > low_wavelen {
        freq / s.factor
    } else if wavelen < high_wavelen {
        freq
    } else {
        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_rope_layouts() {
        let new = serde_json::json!({"model_type":"llama","hidden_size":64,"num_attention_heads":4,
            "num_key_value_heads":2,"intermediate_size":176,"num_hidden_layers":2,"vocab_size":512,
            "max_position_embeddings":256,"rope_parameters":{"rope_theta":500.0,"rope_type":"default"}});
        assert_eq!(ModelConfig::from_hf_json(&new).unwrap().rope_theta, 500.0);
        let mut old = new.clone();
        old.as_object_mut().unwrap().remove("rope_parameters");
        old["rope_theta"] = 1e6.into();
        old["rope_scaling"] = serde_json::Value::Null;
        let c = ModelConfig::from_hf_json(&old).unwrap();
        assert_eq!((c.rope_theta, c.head_dim, c.rope_scaling), (1e6, 16, None));
    }

    #[test]
    fn refuses_unknown_architecture_by_name() {
        let v = serde_json::json!({"model_type":"gpt_neox"});
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("gpt_neox"), "{e}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_scales_low_frequencies() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        assert_eq!(llama3_scale(1.0, &s), 1.0);
        let low = 2.0 * std::f64::consts::PI / 100_000.0;
        assert!((llama3_scale(low, &s) - low / 8.0).abs() < 1e-15);
    }
}
