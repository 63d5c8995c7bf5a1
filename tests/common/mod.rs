//! Shared helpers for the integration tests: where the fixtures and the default model are,
//! JSON access, and max-abs-error comparison that reports where it failed.
#![allow(dead_code)]

pub mod client;
pub mod process;

use std::path::PathBuf;
use std::sync::Arc;

use chatstream::backend::cpu::Cpu;
use chatstream::backend::KvDtype;
use chatstream::engine::generate::{Engine, GenerateRequest, Generator};
use chatstream::{Model, SamplingParams};
use serde_json::Value;

/// `$CHATSTREAM_FIXTURES`, or `../shared/fixtures` beside the crate.
pub fn fixtures() -> PathBuf {
    std::env::var_os("CHATSTREAM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"))
}

/// The default model that `scripts/fetch-model.sh` fetches (or `$CHATSTREAM_MODEL`).
pub fn default_model() -> PathBuf {
    let p = std::env::var_os("CHATSTREAM_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Asserts `got` matches `want` within `tol` (max abs), naming the first bad index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d > worst || d.is_nan() {
            (worst, at) = (d, i);
        }
    }
    assert!(
        worst <= tol,
        "{what}: max abs error {worst} > {tol} at index {at} (got {}, want {})",
        got[at],
        want[at]
    );
    println!("{what}: max abs error {worst:.3e} (tolerance {tol:.0e})");
}

pub fn engine(path: PathBuf) -> Arc<Engine<Cpu>> {
    engine_storing(path, KvDtype::F32)
}

/// As `engine`, its generators' KV caches stored as `dtype`.
pub fn engine_storing(path: PathBuf, dtype: KvDtype) -> Arc<Engine<Cpu>> {
    let model = Model::load(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    Arc::new(Engine::new(model, Cpu).with_kv_dtype(dtype).unwrap())
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `n` greedy tokens after `prompt` (end of sequence ignored).
pub fn greedy(gen: &mut Generator<Cpu>, prompt: Vec<u32>, n: usize) -> Vec<u32> {
    let req = GenerateRequest {
        prompt_ids: prompt,
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        stop: vec![],
        ignore_eos: true,
    };
    gen.generate(&req, &mut |_| true).unwrap().token_ids
}
