//! The inference engine: the forward pass (generic over a `Backend`), its KV cache, the
//! sampler, incremental detokenizing, stop conditions and the generation loop that ties
//! them together. Nothing here knows about HTTP.

pub mod batch;
pub mod detok;
pub mod error;
pub mod forward;
pub mod generate;
pub mod kv_cache;
pub mod sampler;
pub mod stop;

pub use error::InferenceError;
