//! The error type of the inference layer: what can go wrong once a model is loaded.

/// Why a generation could not go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferenceError {
    /// The logits held NaN or an infinity: a numerical fault, never sampled from.
    #[error("non-finite logits at step {step} (NaN or infinity)")]
    NonFiniteLogits {
        /// Generation step (0 = the first new token).
        step: usize,
    },
    /// The sequence would exceed the context the cache was sized for.
    #[error("sequence of {len} tokens exceeds the context length {max}")]
    ContextOverflow {
        /// Tokens the sequence would hold.
        len: usize,
        /// Capacity.
        max: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary ({vocab})")]
    BadToken {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Nothing to run.
    #[error("empty prompt")]
    EmptyPrompt,
    /// Sampling parameters out of range.
    #[error("invalid sampling parameter: {0}")]
    BadParams(String),
    /// The tokenizer could not decode the output.
    #[error("detokenizer: {0}")]
    Decode(String),
}
