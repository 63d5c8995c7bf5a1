//! `Tokenizer`: text <-> token ids through Hugging Face's `tokenizers` crate, built either
//! from a folder's `tokenizer.json` or from a GGUF file's `tokenizer.ggml.*` metadata
//! (gpt2-style byte-level BPE), plus the special-token strings templates need. Incremental
//! decoding for streaming lives in `engine::detok`.

use std::path::Path;

use serde_json::{json, Value};

use super::error::LoadError;
use super::gguf::{GgufFile, MetaValue};

/// A loaded tokenizer with its special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The bos token string, if the model has one.
    pub bos_token: Option<String>,
    /// The eos token string, if the model has one.
    pub eos_token: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> LoadError {
    LoadError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads `tokenizer.json` with the special tokens named by `tokenizer_config.json`.
    pub fn from_file(
        path: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Tokenizer, LoadError> {
        if !path.exists() {
            return Err(LoadError::MissingFile(path.to_path_buf()));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| LoadError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer {
            inner,
            bos_token,
            eos_token,
        })
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, LoadError> {
        let spec = gguf_tokenizer_json(f)?;
        let bytes = serde_json::to_vec(&spec.json).map_err(tok_err)?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err)?;
        Ok(Tokenizer {
            inner,
            bos_token: spec.bos,
            eos_token: spec.eos,
        })
    }

    /// Encodes `text`; `add_special_tokens` runs the post-processor (e.g. prepends bos).
    /// Special-token strings written in the text are matched as special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Decodes `ids` to text (invalid UTF-8 becomes U+FFFD); unknown ids are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| e.to_string())
    }

    /// The token strings (byte-level form) of `ids`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// What a GGUF file's tokenizer metadata turns into.
struct GgufTokenizerSpec {
    json: Value,
    bos: Option<String>,
    eos: Option<String>,
}

const GPT2_STYLE: &[&str] = &["default", "gpt2", "smollm", "gpt-2"];
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn regex_then_byte_level(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
    ]})
}

fn strings(f: &GgufFile, key: &str) -> Result<Vec<String>, LoadError> {
    let arr = f
        .get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| LoadError::Tokenizer(format!("GGUF metadata '{key}' missing")))?;
    arr.iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| LoadError::Tokenizer(format!("GGUF metadata '{key}' is not a string array")))
}

fn gguf_tokenizer_json(f: &GgufFile) -> Result<GgufTokenizerSpec, LoadError> {
    let model = f
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(LoadError::Tokenizer(format!(
            "GGUF tokenizer model '{model}' is not supported (supported: gpt2-style byte-level BPE)"
        )));
    }
    let pre = f
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let (normalizer, pre_tokenizer) = if GPT2_STYLE.contains(&pre) {
        (
            Value::Null,
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
        )
    } else if pre == "qwen2" {
        (json!({"type": "NFC"}), regex_then_byte_level(QWEN2_REGEX))
    } else if matches!(pre, "llama-bpe" | "llama3" | "llama-v3") {
        (Value::Null, regex_then_byte_level(LLAMA3_REGEX))
    } else {
        return Err(LoadError::Tokenizer(format!(
            "GGUF pre-tokenizer '{pre}' is not supported (supported: gpt2, smollm, qwen2, llama-bpe)"
        )));
    };
    let tokens = strings(f, "tokenizer.ggml.tokens")?;
    let merges = strings(f, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match f
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
    {
        Some(a) => a
            .iter()
            .map(|v| if let MetaValue::Int(i) = v { *i } else { 1 })
            .collect(),
        None => vec![1; tokens.len()],
    };
    let id = |key: &str| f.get(key).and_then(MetaValue::as_u64).map(|i| i as usize);
    let name_of = |i: Option<usize>| i.and_then(|i| tokens.get(i).cloned());
    let bos = name_of(id("tokenizer.ggml.bos_token_id"));
    let eos = name_of(id("tokenizer.ggml.eos_token_id"));

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
        // 3 = control, 4 = user-defined: matched whole in text, like tokenizer.json's
        // added tokens; only control tokens are "special" (skipped when decoding).
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3}),
            );
        }
    }
    let flag = |key: &str| f.get(key).and_then(MetaValue::as_bool).unwrap_or(false);
    let mut single = Vec::new();
    let mut special = serde_json::Map::new();
    let mut add_special = |name: &Option<String>, key: &str, single: &mut Vec<Value>| {
        if let (Some(n), Some(i)) = (name, id(key)) {
            single.push(json!({"SpecialToken": {"id": n, "type_id": 0}}));
            special.insert(n.clone(), json!({"id": n, "ids": [i], "tokens": [n]}));
        }
    };
    if flag("tokenizer.ggml.add_bos_token") {
        add_special(&bos, "tokenizer.ggml.bos_token_id", &mut single);
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if flag("tokenizer.ggml.add_eos_token") {
        add_special(&eos, "tokenizer.ggml.eos_token_id", &mut single);
    }
    let post = if special.is_empty() {
        Value::Null
    } else {
        let mut pair = single.clone();
        pair.extend(single.iter().map(|p| {
            if p.get("Sequence").is_some() {
                json!({"Sequence": {"id": "B", "type_id": 1}})
            } else {
                p.clone()
            }
        }));
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
    };
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    Ok(GgufTokenizerSpec { json, bos, eos })
}
