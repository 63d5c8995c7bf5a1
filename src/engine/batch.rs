//! Step coalescing: workers that are decoding at the same moment send their next-token steps
//! to one engine thread, which runs them as a single batched forward pass (the weights are
//! read once for all of them) and answers each on its own reply channel. Each worker keeps
//! its request from start to end; only the decode step is shared. A worker lends its KV cache
//! and its logits buffer with the step and gets both back, the logits filled, on its own
//! `Lane`: no step allocates.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::backend::Backend;

use super::error::InferenceError;
use super::forward::RunState;
use super::generate::Engine;
use super::kv_cache::KvCache;

/// How long the engine thread waits for the other decoding workers to send their steps.
const GATHER: Duration = Duration::from_millis(2);

/// A step's answer: the lent cache and buffer, and the sender to answer the next step on.
struct Reply<B: Backend> {
    kv: KvCache<B>,
    logits: Vec<f32>,
    result: Result<(), InferenceError>,
    lane: Sender<Reply<B>>,
}

struct Step<B: Backend> {
    token: u32,
    kv: KvCache<B>,
    logits: Vec<f32>,
    reply: Sender<Reply<B>>,
}

/// A worker's reply channel, made once and used for each of its steps. Its sender travels
/// with each step and comes back with the answer, so that a step the engine thread drops
/// (had it died) ends the worker's wait instead of leaving it waiting for good.
pub struct Lane<B: Backend> {
    tx: Option<Sender<Reply<B>>>,
    rx: Receiver<Reply<B>>,
}

impl<B: Backend> Default for Lane<B> {
    fn default() -> Lane<B> {
        let (tx, rx) = bounded(1);
        Lane { tx: Some(tx), rx }
    }
}

/// The handle workers use to submit decode steps.
pub struct Batcher<B: Backend> {
    tx: Sender<Step<B>>,
    decoding: Arc<AtomicUsize>,
    stats: Arc<BatchStats>,
}

/// How much coalescing happened.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Decode passes run: batched ones, and steps a worker decoding alone ran itself.
    pub passes: AtomicUsize,
    /// Decode steps (rows) they carried.
    pub steps: AtomicUsize,
    /// Of those, the steps workers ran alone.
    pub solo: AtomicUsize,
}

/// Marks a worker as decoding while it lives (the engine thread waits for those).
pub struct Decoding<'a>(&'a AtomicUsize);

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<B: Backend + 'static> Batcher<B> {
    /// Starts the engine thread for `engine`, batching up to `max_batch` steps. The thread
    /// ends when the engine is dropped.
    pub fn start(engine: Weak<Engine<B>>, max_batch: usize) -> Batcher<B> {
        let (tx, rx) = unbounded();
        let decoding = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(BatchStats::default());
        let (d, st) = (Arc::clone(&decoding), Arc::clone(&stats));
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(engine, rx, d, st, max_batch.max(1)))
            .expect("spawning the engine thread");
        Batcher {
            tx,
            decoding,
            stats,
        }
    }

    /// Passes run and steps carried so far.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Counts the caller as decoding until the guard drops.
    pub fn decoding(&self) -> Decoding<'_> {
        self.decoding.fetch_add(1, Ordering::SeqCst);
        Decoding(&self.decoding)
    }

    /// Workers decoding now (holding a `decoding` guard).
    pub fn decoding_now(&self) -> usize {
        self.decoding.load(Ordering::SeqCst)
    }

    /// Counts a step a worker decoding alone ran itself (a pass of one row).
    pub fn record_solo(&self) {
        for n in [&self.stats.passes, &self.stats.steps, &self.stats.solo] {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs one decode step of `token` on the sequence in `kv`, answered on `lane`; leaves
    /// its logits in `logits`.
    pub fn step(
        &self,
        lane: &mut Lane<B>,
        token: u32,
        kv: &mut KvCache<B>,
        logits: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        let lost = || InferenceError::Decode("the engine thread stopped".into());
        // none: an earlier step never came back
        let reply = lane.tx.take().ok_or_else(lost)?;
        self.tx
            .send(Step {
                token,
                kv: std::mem::replace(kv, KvCache::placeholder()),
                logits: std::mem::take(logits),
                reply,
            })
            .map_err(|_| lost())?;
        let back = lane.rx.recv().map_err(|_| lost())?;
        (*kv, *logits, lane.tx) = (back.kv, back.logits, Some(back.lane));
        back.result
    }
}

fn run<B: Backend>(
    engine: Weak<Engine<B>>,
    rx: Receiver<Step<B>>,
    decoding: Arc<AtomicUsize>,
    stats: Arc<BatchStats>,
    max_batch: usize,
) {
    let mut state: Option<RunState<B>> = None;
    // reused from pass to pass
    let mut batch: Vec<Step<B>> = Vec::with_capacity(max_batch);
    let (mut tokens, mut kvs) = (Vec::with_capacity(max_batch), Vec::with_capacity(max_batch));
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let deadline = Instant::now() + GATHER;
        while batch.len() < max_batch && batch.len() < decoding.load(Ordering::SeqCst) {
            match rx.recv_deadline(deadline) {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        stats.passes.fetch_add(1, Ordering::Relaxed);
        stats.steps.fetch_add(batch.len(), Ordering::Relaxed);
        let t = &engine.transformer;
        let st = state.get_or_insert_with(|| RunState::new(t, max_batch, max_batch));
        tokens.clear();
        tokens.extend(batch.iter().map(|s| s.token));
        kvs.clear();
        kvs.extend(
            batch
                .iter_mut()
                .map(|s| std::mem::replace(&mut s.kv, KvCache::placeholder())),
        );
        let vocab = t.cfg.vocab_size;
        let result = catch_unwind(AssertUnwindSafe(|| {
            t.backend.within(|| {
                t.forward_batch(st, &mut kvs, &tokens)?;
                // each row straight into its step's buffer
                for (i, step) in batch.iter_mut().enumerate() {
                    t.backend
                        .read(st.logits(), i * vocab..(i + 1) * vocab, &mut step.logits);
                }
                Ok(())
            })
        }))
        .unwrap_or_else(|_| {
            Err(InferenceError::Decode(
                "the batched forward pass panicked".into(),
            ))
        });
        // Every row is copied before the first reply goes: a woken worker would take the
        // core the copies run on.
        for (mut step, kv) in batch.drain(..).zip(kvs.drain(..)) {
            if result.is_err() {
                step.logits.clear();
            }
            let lane = step.reply.clone();
            let _ = step.reply.send(Reply {
                kv,
                logits: step.logits,
                result: result.clone(),
                lane,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn a_step_the_engine_thread_drops_ends_in_an_error_not_a_wait() {
        // no engine behind the batcher: its thread takes the first step, finds the engine
        // gone and ends, dropping the step
        let batcher: Batcher<Cpu> = Batcher::start(Weak::new(), 4);
        let (done, finished) = bounded(1);
        std::thread::spawn(move || {
            let mut lane = Lane::default();
            let (mut kv, mut logits) = (KvCache::placeholder(), Vec::new());
            let first = batcher.step(&mut lane, 1, &mut kv, &mut logits);
            let second = batcher.step(&mut lane, 1, &mut kv, &mut logits);
            let _ = done.send((first.is_err(), second.is_err()));
        });
        let got = finished.recv_timeout(Duration::from_secs(10));
        assert_eq!(got, Ok((true, true)), "the worker still waits");
    }
}
