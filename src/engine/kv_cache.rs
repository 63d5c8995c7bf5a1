//! `KvCache`: per-layer key and value rows for one sequence, on the backend's device,
//! allocated once at its full capacity. The forward pass appends; `truncate` rewinds (to
//! reuse a shared prefix).

use crate::backend::Backend;
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
    /// A cache for up to `capacity` positions.
    pub fn new(backend: &B, cfg: &ModelConfig, capacity: usize) -> KvCache<B> {
        let n = capacity * cfg.kv_dim();
        KvCache {
            k: (0..cfg.n_layers).map(|_| backend.alloc(n)).collect(),
            v: (0..cfg.n_layers).map(|_| backend.alloc(n)).collect(),
            capacity,
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
