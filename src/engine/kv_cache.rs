//! `KvCache`: per-layer key and value rows for one sequence, on the backend's device,
//! allocated once at its full capacity. The forward pass appends; `truncate` rewinds (to
//! reuse a shared prefix). `SeqCache` pairs a cache with the token ids it holds, so a new
//! prompt that extends them only prefills the rest.

use crate::backend::{Backend, KvDtype};
use crate::model::ModelConfig;

/// Keys and values of one sequence.
pub struct KvCache<B: Backend> {
    /// Per layer: keys (capacity, kv_dim).
    pub k: Vec<B::Buf>,
    /// Per layer: values (capacity, kv_dim).
    pub v: Vec<B::Buf>,
    capacity: usize,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An f32 cache for up to `capacity` positions.
    pub fn new(backend: &B, cfg: &ModelConfig, capacity: usize) -> KvCache<B> {
        KvCache::of(backend, cfg, capacity, KvDtype::F32)
    }

    /// A cache for up to `capacity` positions stored as `dtype` (which the backend stores).
    pub fn of(backend: &B, cfg: &ModelConfig, capacity: usize, dtype: KvDtype) -> KvCache<B> {
        let n = capacity * cfg.kv_dim();
        let layer = || backend.alloc_kv(n, dtype);
        KvCache {
            k: (0..cfg.n_layers).map(|_| layer()).collect(),
            v: (0..cfg.n_layers).map(|_| layer()).collect(),
            capacity,
            len: 0,
        }
    }

    /// A cache with no storage, standing in while the real one is lent to the batcher.
    pub fn placeholder() -> KvCache<B> {
        KvCache {
            k: Vec::new(),
            v: Vec::new(),
            capacity: 0,
            len: 0,
        }
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets positions from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Records that `n` more positions were written.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.capacity);
    }
}

/// A KV cache and the token ids whose keys and values it holds (in order).
pub struct SeqCache<B: Backend> {
    /// The keys and values.
    pub kv: KvCache<B>,
    /// `ids[i]` is the token at position `i` of `kv`.
    pub ids: Vec<u32>,
}

impl<B: Backend> SeqCache<B> {
    /// An empty cache for `capacity` positions, stored as `dtype`.
    pub fn new(backend: &B, cfg: &ModelConfig, capacity: usize, dtype: KvDtype) -> SeqCache<B> {
        SeqCache {
            kv: KvCache::of(backend, cfg, capacity, dtype),
            ids: Vec::with_capacity(capacity),
        }
    }

    /// Keeps the longest prefix shared with `prompt`, leaving at least one prompt token to
    /// run (its logits are needed); returns how many positions were kept.
    pub fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        let shared = self
            .ids
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = shared
            .min(prompt.len().saturating_sub(1))
            .min(self.kv.len());
        self.kv.truncate(keep);
        self.ids.truncate(keep);
        keep
    }

    /// Bytes of device memory a cache of this shape takes.
    pub fn bytes(cfg: &ModelConfig, capacity: usize, dtype: KvDtype) -> usize {
        2 * cfg.n_layers * capacity * cfg.kv_dim() * dtype.bytes()
    }
}
