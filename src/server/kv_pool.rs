//! Session KV reuse: a pool of per-session KV caches (with the token ids each holds) kept
//! between turns within a memory budget, least recently used evicted first. A worker swaps a
//! session's cache in before its turn and back out after, so the next turn of a conversation
//! prefills only its new tokens. An evicted session still works: it prefills from scratch.

use crate::backend::Backend;
use crate::engine::kv_cache::SeqCache;

/// Caches by session id, plus spare caches to hand back to workers.
pub struct KvPool<B: Backend> {
    entries: Vec<(String, SeqCache<B>, u64)>,
    spares: Vec<SeqCache<B>>,
    max_entries: usize,
    max_spares: usize,
    tick: u64,
}

impl<B: Backend> KvPool<B> {
    /// A pool holding at most `max_entries` session caches and `max_spares` spare ones.
    pub fn new(max_entries: usize, max_spares: usize) -> KvPool<B> {
        KvPool {
            entries: Vec::new(),
            spares: Vec::new(),
            max_entries,
            max_spares,
            tick: 0,
        }
    }

    /// Caches held: sessions' and spares.
    pub fn caches_held(&self) -> usize {
        self.entries.len() + self.spares.len()
    }

    /// Takes the session's cache out of the pool, if it is there.
    pub fn take(&mut self, session: &str) -> Option<SeqCache<B>> {
        let i = self.entries.iter().position(|(k, _, _)| k == session)?;
        Some(self.entries.swap_remove(i).1)
    }

    /// Keeps `cache` as the session's, evicting the least recently used beyond the budget.
    pub fn put(&mut self, session: &str, cache: SeqCache<B>) {
        self.tick += 1;
        self.entries.retain(|(k, _, _)| k != session);
        self.entries.push((session.to_string(), cache, self.tick));
        while self.entries.len() > self.max_entries {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].2)
                .expect("non-empty");
            let (_, evicted, _) = self.entries.swap_remove(oldest);
            self.put_spare(evicted);
        }
    }

    /// A spare cache (contents irrelevant), if one is kept.
    pub fn spare(&mut self) -> Option<SeqCache<B>> {
        self.spares.pop()
    }

    /// Keeps `cache` for reuse as a spare (or frees it when enough are kept).
    pub fn put_spare(&mut self, mut cache: SeqCache<B>) {
        if self.spares.len() < self.max_spares {
            cache.ids.clear();
            cache.kv.truncate(0);
            self.spares.push(cache);
        }
    }
}
