//! chatstream: a streaming chat server for pre-trained Llama-family language models.
//!
//! The library owns the model loading (`model`), the inference engine (`engine`) and the
//! compute backends (`backend`). The binary in `main.rs` is a thin CLI over this API.

pub mod backend;
pub mod engine;
pub mod model;
pub mod server;

pub use engine::generate::{FinishReason, GenerateOutput, GenerateRequest, Generator};
pub use engine::sampler::SamplingParams;
pub use model::{ChatMessage, Model};
