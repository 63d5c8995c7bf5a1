//! The model's weights as host tensors (f32, or a matrix kept compact as its file stores
//! it), loaded from either source through one name table: Hugging Face names are used
//! verbatim at the loading boundary, `gguf_name` maps each to llama.cpp's. Every expected
//! tensor is checked by name, shape and dtype, and an error names the tensor. GGUF's
//! permuted Q/K rows are undone here, in one place.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::arena::HugeBuf;
use super::config::ModelConfig;
use super::dequant::{dequantize, GgmlType, QuantMatrix};
use super::error::LoadError;
use super::gguf::GgufFile;

/// A row-major tensor: f32 values, or a matrix kept compact (a GGUF file's 4/8-bit blocks,
/// or F16/BF16 as stored), in huge pages where the system gives them (`HugeBuf`). The data
/// is shared, so a CPU backend "uploads" it by reference and workers never copy weights.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Shape, outermost first (a linear weight is `[out_features, in_features]`).
    pub shape: Vec<usize>,
    /// The values; empty when `quant` holds the matrix.
    pub data: HugeBuf<f32>,
    /// The matrix in its compact form, when the file stored it as 4/8-bit blocks or 16-bit
    /// floats. Only this is kept (2-8x smaller than f32): the CPU reads it in every product,
    /// and `to_f32` widens it for a backend that needs f32.
    pub quant: Option<Arc<QuantMatrix>>,
}

impl Default for Tensor {
    /// No values (what a model's weights leave behind once a backend holds them).
    fn default() -> Tensor {
        Tensor {
            shape: Vec::new(),
            data: HugeBuf::empty(),
            quant: None,
        }
    }
}

impl Tensor {
    /// A tensor from its shape and values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape,
            data: data.into(),
            quant: None,
        }
    }

    /// A matrix held in its compact form only.
    pub fn blocks(q: QuantMatrix) -> Tensor {
        Tensor {
            shape: vec![q.rows, q.cols],
            data: HugeBuf::empty(),
            quant: Some(Arc::new(q)),
        }
    }

    /// The values as f32: borrowed, or widened from the compact form (a new buffer).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &self.quant {
            Some(q) => {
                let mut out = vec![0f32; q.rows * q.cols];
                q.dequantize_rows(0, &mut out);
                Cow::Owned(out)
            }
            None => Cow::Borrowed(&self.data[..]),
        }
    }

    /// Number of values.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of a matrix (the first dimension).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Columns of a matrix (the product of the other dimensions).
    pub fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

/// One decoder layer's weights, named as inside the forward pass.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// input_layernorm (dim)
    pub attn_norm: Tensor,
    /// q_proj (q_dim, dim)
    pub wq: Tensor,
    /// k_proj (kv_dim, dim)
    pub wk: Tensor,
    /// v_proj (kv_dim, dim)
    pub wv: Tensor,
    /// q/k/v biases (Qwen2): (q_dim), (kv_dim), (kv_dim)
    pub bqkv: Option<[Tensor; 3]>,
    /// o_proj (dim, q_dim)
    pub wo: Tensor,
    /// post_attention_layernorm (dim)
    pub ffn_norm: Tensor,
    /// gate_proj (hidden, dim)
    pub w_gate: Tensor,
    /// up_proj (hidden, dim)
    pub w_up: Tensor,
    /// down_proj (dim, hidden)
    pub w_down: Tensor,
}

/// All weights of a model.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    /// embed_tokens (vocab, dim)
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final norm (dim)
    pub norm: Tensor,
    /// Output head (vocab, dim); `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
}

impl Weights {
    /// The output head: `lm_head`, or the embedding table when tied.
    pub fn output(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// The one table from Hugging Face tensor names to GGUF (llama.cpp) names.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let g = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}"))
}

/// Somewhere tensors can be read from by Hugging Face name.
pub trait TensorSource {
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// Reads the tensor as f32, checking its shape against `shape` and its dtype.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError>;
}

fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<(), LoadError> {
    if found != expected {
        return Err(LoadError::BadShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

/// Loads and checks every tensor the config calls for.
pub fn load_weights(src: &dyn TensorSource, cfg: &ModelConfig) -> Result<Weights, LoadError> {
    let (d, h, q, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let t =
            |suffix: &str, shape: &[usize]| src.load(&format!("model.layers.{i}.{suffix}"), shape);
        let bqkv = if cfg.attention_bias {
            Some([
                t("self_attn.q_proj.bias", &[q])?,
                t("self_attn.k_proj.bias", &[kv])?,
                t("self_attn.v_proj.bias", &[kv])?,
            ])
        } else {
            None
        };
        layers.push(LayerWeights {
            attn_norm: t("input_layernorm.weight", &[d])?,
            wq: t("self_attn.q_proj.weight", &[q, d])?,
            wk: t("self_attn.k_proj.weight", &[kv, d])?,
            wv: t("self_attn.v_proj.weight", &[kv, d])?,
            bqkv,
            wo: t("self_attn.o_proj.weight", &[d, q])?,
            ffn_norm: t("post_attention_layernorm.weight", &[d])?,
            w_gate: t("mlp.gate_proj.weight", &[h, d])?,
            w_up: t("mlp.up_proj.weight", &[h, d])?,
            w_down: t("mlp.down_proj.weight", &[d, h])?,
        });
    }
    let embed = src.load("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
    // A folder may say "untied" yet ship no head (or "tied" and ship one): trust the file.
    let lm_head = if src.contains("lm_head.weight") && !cfg.tie_word_embeddings {
        Some(src.load("lm_head.weight", &[cfg.vocab_size, d])?)
    } else if !cfg.tie_word_embeddings {
        return Err(LoadError::MissingTensor("lm_head.weight".into()));
    } else {
        None
    };
    Ok(Weights {
        embed,
        layers,
        norm: src.load("model.norm.weight", &[d])?,
        lm_head,
    })
}

/// Safetensors files of a Hugging Face folder (one file, or shards with an index).
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Maps `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<SafetensorsSource, LoadError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| LoadError::Io {
                path: index_path.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| LoadError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LoadError::Corrupt {
                    path: index_path.clone(),
                    what: "no weight_map".into(),
                })?;
            let mut shards: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            return Err(LoadError::MissingFile(single));
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let io = |source| LoadError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(&path).map_err(io)?;
            // SAFETY: read-only map of a file we do not modify while it is mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| LoadError::Corrupt {
                path: path.clone(),
                what: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(SafetensorsSource { files, index })
    }
}

impl TensorSource for SafetensorsSource {
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| LoadError::Corrupt {
            path: path.clone(),
            what: e.to_string(),
        })?;
        let view = st
            .tensor(name)
            .map_err(|_| LoadError::MissingTensor(name.into()))?;
        check_shape(name, view.shape(), shape)?;
        let ty = match view.dtype() {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            other => {
                return Err(LoadError::BadDtype {
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        if let [rows, cols] = *shape {
            // F16/BF16 matrices stay as stored; F32 ones become `data` below
            if let Some(q) = QuantMatrix::from_ggml(ty, view.data(), rows, cols) {
                return Ok(Tensor::blocks(q));
            }
        }
        let mut data = vec![0f32; shape.iter().product()];
        dequantize(ty, view.data(), &mut data);
        Ok(Tensor::new(shape.to_vec(), data))
    }
}

/// Tensors of a GGUF file, read by Hugging Face name.
pub struct GgufSource<'a> {
    file: &'a GgufFile,
    n_heads: usize,
    n_kv_heads: usize,
}

impl<'a> GgufSource<'a> {
    /// Wraps a parsed file; head counts are needed to undo the Q/K row permutation.
    pub fn new(file: &'a GgufFile, cfg: &ModelConfig) -> GgufSource<'a> {
        GgufSource {
            file,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
        }
    }
}

impl GgufSource<'_> {
    /// Whether the file has a tensor of this GGUF name.
    pub fn file_has(&self, gguf_name: &str) -> bool {
        self.file.tensors.contains_key(gguf_name)
    }

    /// Reads a tensor by its GGUF name, as stored (no un-permutation).
    pub fn load_raw(&self, gname: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let info = self
            .file
            .tensors
            .get(gname)
            .ok_or_else(|| LoadError::MissingTensor(gname.to_string()))?;
        check_shape(gname, &info.shape, shape)?;
        if GgmlType::from_id(info.raw_type).is_none() {
            return Err(LoadError::BadDtype {
                name: gname.to_string(),
                dtype: format!(
                    "GGML type {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                    info.raw_type
                ),
            });
        }
        let raw = self.file.data(info);
        if let [rows, cols] = *shape {
            if let Some(q) = QuantMatrix::from_ggml(info.dtype, raw, rows, cols) {
                return Ok(Tensor::blocks(q));
            }
        }
        let mut data = vec![0f32; shape.iter().product()];
        dequantize(info.dtype, raw, &mut data);
        Ok(Tensor::new(shape.to_vec(), data))
    }
}

impl TensorSource for GgufSource<'_> {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.tensors.contains_key(&g))
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let gname = gguf_name(name).ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        if !self.file_has(&gname) {
            return Err(LoadError::MissingTensor(format!("{name} (GGUF '{gname}')")));
        }
        let t = self.load_raw(&gname, shape)?;
        // llama.cpp's converter permutes the rows of q_proj and k_proj (weights and biases)
        // so that RoPE can rotate adjacent pairs; our RoPE pairs i with i + head_dim/2 as
        // Hugging Face does, so the permutation is undone here.
        let heads = if name.contains("self_attn.q_proj.") {
            Some(self.n_heads)
        } else if name.contains("self_attn.k_proj.") {
            Some(self.n_kv_heads)
        } else {
            None
        };
        let Some(n_head) = heads else { return Ok(t) };
        let from = unpermuted_order(shape[0], n_head);
        if let Some(q) = &t.quant {
            return Ok(Tensor::blocks(q.permute_rows(&from)));
        }
        let cols = t.cols();
        let data: Vec<f32> = from
            .iter()
            .flat_map(|&r| t.data[r * cols..(r + 1) * cols].iter().copied())
            .collect();
        Ok(Tensor::new(t.shape, data))
    }
}

/// Inverse of llama.cpp's `permute`, as a row order: within each head, Hugging Face row
/// `j * half + i` is GGUF row `2i + j` (i < head_dim/2, j in {0, 1}). Row `r` of the result
/// is row `from[r]` of the GGUF tensor.
pub fn unpermuted_order(rows: usize, n_head: usize) -> Vec<usize> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, within) = (r / head_dim, r % head_dim);
            let (j, i) = (within / half, within % half);
            h * head_dim + 2 * i + j
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_table_covers_a_layer() {
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").unwrap(),
            "blk.12.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            None
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(n_head, 2, half, cols).swapaxes(1, 2)
        let (n_head, head_dim, cols) = (2, 8, 3);
        let rows = n_head * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..head_dim / 2 {
                    let src = h * head_dim + j * head_dim / 2 + i;
                    let dst = h * head_dim + 2 * i + j;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let from = unpermuted_order(rows, n_head);
        let back: Vec<f32> = from
            .iter()
            .flat_map(|&r| gguf[r * cols..(r + 1) * cols].iter().copied())
            .collect();
        assert_eq!(back, hf);
    }
}
