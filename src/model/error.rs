//! The error type of the loading layer: every way a model folder or file can be unusable,
//! each variant naming the file, tensor or field at fault.

use std::path::PathBuf;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("malformed JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A required file is missing from a model folder.
    #[error("{0} not found (expected a Hugging Face model folder or a .gguf file)")]
    MissingFile(PathBuf),
    /// The model's architecture is not one this engine runs.
    #[error("unsupported architecture '{0}' (supported: llama, mistral, qwen2, smollm)")]
    UnsupportedArchitecture(String),
    /// A configuration field is missing or out of range.
    #[error("bad model configuration: {0}")]
    Config(String),
    /// An expected tensor is absent.
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    /// A tensor has the wrong shape.
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    BadShape {
        /// Tensor name.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a type this engine cannot read.
    #[error("tensor '{name}' has unsupported dtype {dtype}")]
    BadDtype {
        /// Tensor name.
        name: String,
        /// The dtype as the file names it.
        dtype: String,
    },
    /// The file is truncated or structurally invalid.
    #[error("corrupt model file {path}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The tokenizer could not be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template does not compile.
    #[error("chat template: {0}")]
    Template(String),
}
