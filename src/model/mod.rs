//! Model loading: a Hugging Face folder or a GGUF file becomes one `Model` — config,
//! f32 weights, tokenizer, chat template and the token ids that end a turn. The submodules
//! each own one format or concern; this file only decides which to use and wires them.

pub mod arena;
pub mod config;
pub mod dequant;
pub mod error;
pub mod gguf;
pub mod synthetic;
pub mod template;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use config::ModelConfig;
pub use error::LoadError;
pub use template::{ChatMessage, ChatTemplate, TemplateError};
pub use tokenizer::Tokenizer;
pub use weights::Weights;

use gguf::{GgufFile, MetaValue};
use weights::{load_weights, GgufSource, SafetensorsSource};

/// Special tokens that end an assistant turn in common chat templates.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_turn|>",
];

/// A loaded model, ready for the engine.
pub struct Model {
    /// A short name (folder or file name).
    pub name: String,
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// Weights (f32, or matrices in their compact form); empty once an `Engine` holds the
    /// model, whose backend has its own.
    pub weights: Weights,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
    /// Chat template.
    pub template: ChatTemplate,
    /// Token ids that end generation: the eos ids and the template's end-of-turn token.
    pub stop_token_ids: Vec<u32>,
}

fn read_json(path: &Path) -> Result<Option<Value>, LoadError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| LoadError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoadError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn special_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` as an int or a list of ints.
fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|i| i as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Model {
    /// Loads a Hugging Face folder or a `.gguf` file.
    pub fn load(path: &Path) -> Result<Model, LoadError> {
        if path.is_dir() {
            Self::load_hf_folder(path)
        } else if path.exists() {
            Self::load_gguf(path)
        } else {
            Err(LoadError::MissingFile(path.to_path_buf()))
        }
    }

    fn load_hf_folder(dir: &Path) -> Result<Model, LoadError> {
        let config_path = dir.join("config.json");
        let config_json = read_json(&config_path)?.ok_or(LoadError::MissingFile(config_path))?;
        let config = ModelConfig::from_hf_json(&config_json)?;
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let gen_config = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let bos = special_token(tok_config.get("bos_token"));
        let eos = special_token(tok_config.get("eos_token"));
        let tokenizer =
            Tokenizer::from_file(&dir.join("tokenizer.json"), bos.clone(), eos.clone())?;
        // transformers prefers chat_template.jinja over the tokenizer_config.json key.
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja).map_err(|source| LoadError::Io {
                    path: jinja,
                    source,
                })?,
            )
        } else {
            tok_config
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let template = ChatTemplate::new(source, bos, eos)?;
        let src = SafetensorsSource::open(dir)?;
        let weights = load_weights(&src, &config)?;
        let mut eos_ids = ids(gen_config.get("eos_token_id"));
        eos_ids.extend(ids(config_json.get("eos_token_id")));
        Ok(Self::assemble(
            dir, config, weights, tokenizer, template, eos_ids,
        ))
    }

    fn load_gguf(path: &Path) -> Result<Model, LoadError> {
        let file = GgufFile::open(path)?;
        let mut config = ModelConfig::from_gguf(&file)?;
        let src = GgufSource::new(&file, &config);
        if src.file_has("rope_freqs.weight") {
            let t = src.load_raw("rope_freqs.weight", &[config.head_dim / 2])?;
            config.rope_freq_factors = Some(t.data.to_vec());
        }
        let weights = load_weights(&src, &config)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let source = file
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(str::to_string);
        let template = ChatTemplate::new(
            source,
            tokenizer.bos_token.clone(),
            tokenizer.eos_token.clone(),
        )?;
        let eos_ids = file
            .get("tokenizer.ggml.eos_token_id")
            .and_then(MetaValue::as_u64)
            .map(|i| vec![i as u32])
            .unwrap_or_default();
        Ok(Self::assemble(
            path, config, weights, tokenizer, template, eos_ids,
        ))
    }

    fn assemble(
        path: &Path,
        config: ModelConfig,
        weights: Weights,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        mut stop_token_ids: Vec<u32>,
    ) -> Model {
        if let Some(id) = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
        {
            stop_token_ids.push(id);
        }
        for t in END_OF_TURN_TOKENS {
            if template.source.contains(t) {
                stop_token_ids.extend(tokenizer.token_to_id(t));
            }
        }
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        let name = PathBuf::from(path.file_name().unwrap_or(path.as_os_str()))
            .to_string_lossy()
            .into_owned();
        Model {
            name,
            config,
            weights,
            tokenizer,
            template,
            stop_token_ids,
        }
    }

    /// Renders a conversation with the chat template (generation prompt appended) and
    /// encodes it as `apply_chat_template(tokenize=True)` does: no extra special tokens.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TemplateError> {
        let text = self.template.render(messages, true)?;
        self.tokenizer.encode(&text, false).map_err(TemplateError)
    }
}
