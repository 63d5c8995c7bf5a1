//! Step coalescing: workers that are decoding at the same moment send their next-token steps
//! to one engine thread, which runs them as a single batched forward pass (the weights are
//! read once for all of them) and answers each on its own reply channel. Each worker keeps
//! its request from start to end; only the decode step is shared. A worker lends its KV cache
//! and its logits buffer with the step and gets both back, the logits filled, on its own
//! `Lane`: no step allocates.
//!
//! A greedy answer is handed to the engine thread for good (`Batcher::follow`): the thread
//! picks each next token itself (the largest logit), sends it to the worker and runs it in
//! its next pass at once, so the worker's detokenizing and streaming overlap the next pass
//! instead of every row's pass waiting for them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};

use crate::backend::Backend;

use super::error::InferenceError;
use super::forward::RunState;
use super::generate::Engine;
use super::kv_cache::KvCache;

/// How long the engine thread waits for the other decoding workers to send their steps.
const GATHER: Duration = Duration::from_millis(2);

/// What the engine thread sends a worker: a token it picked for a followed answer, or the
/// lent cache and buffer back.
enum Event<B: Backend> {
    Token(u32),
    Back(Reply<B>),
}

/// A step's answer: the lent cache and buffer, and the sender to answer the next step on.
struct Reply<B: Backend> {
    kv: KvCache<B>,
    logits: Vec<f32>,
    result: Result<(), InferenceError>,
    lane: Sender<Event<B>>,
}

struct Step<B: Backend> {
    token: u32,
    kv: KvCache<B>,
    logits: Vec<f32>,
    reply: Sender<Event<B>>,
    /// Set for an answer the engine thread follows from pass to pass.
    follow: Option<Follow>,
}

/// A greedy answer the engine thread keeps from pass to pass.
struct Follow {
    /// Tokens the worker still wants.
    left: usize,
    /// Tokens picked so far in this answer (the step a non-finite error names).
    step: usize,
    /// Keep going past end-of-turn tokens.
    ignore_eos: bool,
    /// Set by the worker when it ends the answer itself (a stop string, a client gone).
    stop: Arc<AtomicBool>,
    /// The pass's pick for this row: `None` for non-finite logits.
    picked: Option<u32>,
    /// Counts the worker as decoding until the row ends.
    _decoding: Decoding,
}

/// A worker's reply channel, made once and used for each of its steps. Its sender travels
/// with each step and comes back with the answer, so that a step the engine thread drops
/// (had it died) ends the worker's wait instead of leaving it waiting for good.
pub struct Lane<B: Backend> {
    tx: Option<Sender<Event<B>>>,
    rx: Receiver<Event<B>>,
    stop: Arc<AtomicBool>,
}

impl<B: Backend> Default for Lane<B> {
    fn default() -> Lane<B> {
        // unbounded: a followed answer's tokens may come faster than the worker streams them
        let (tx, rx) = unbounded();
        Lane {
            tx: Some(tx),
            rx,
            stop: Arc::default(),
        }
    }
}

fn lost() -> InferenceError {
    InferenceError::Decode("the engine thread stopped".into())
}

impl<B: Backend> Lane<B> {
    /// Waits for the engine thread's next event: `Some` token picked for a followed answer,
    /// or `None` once the lent cache and buffer are back in `kv` and `logits` (with the
    /// step's result).
    pub fn next(
        &mut self,
        kv: &mut KvCache<B>,
        logits: &mut Vec<f32>,
    ) -> Result<Option<u32>, InferenceError> {
        match self.rx.recv().map_err(|_| lost())? {
            Event::Token(id) => Ok(Some(id)),
            Event::Back(back) => {
                (*kv, *logits, self.tx) = (back.kv, back.logits, Some(back.lane));
                back.result.map(|()| None)
            }
        }
    }

    /// Ends a followed answer (if the engine thread still holds it) and takes the cache and
    /// buffer back; tokens picked after the worker stopped are dropped. Nothing to do when
    /// nothing is lent.
    pub fn settle(
        &mut self,
        kv: &mut KvCache<B>,
        logits: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        self.stop.store(true, Ordering::SeqCst);
        while self.tx.is_none() {
            if let Err(e) = self.next(kv, logits) {
                // the cache is back unless the engine thread is gone
                if self.tx.is_none() {
                    return Err(e);
                }
            }
        }
        Ok(())
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

/// Counts a worker as decoding while it lives (the engine thread waits for those). It
/// travels with a followed answer and drops when the engine thread ends it.
pub struct Decoding(Arc<AtomicUsize>);

impl Drop for Decoding {
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
    pub fn decoding(&self) -> Decoding {
        self.decoding.fetch_add(1, Ordering::SeqCst);
        Decoding(Arc::clone(&self.decoding))
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
        self.send(lane, token, kv, logits, None)?;
        while lane.next(kv, logits)?.is_some() {}
        Ok(())
    }

    /// Hands a greedy answer to the engine thread from `token` on: it picks up to `left`
    /// more tokens, each sent on `lane` (`Lane::next`), ending early at an end-of-turn id
    /// (unless `ignore_eos`), a full cache or `Lane::settle`. `picked` tokens came before;
    /// `decoding` counts the worker until the answer ends.
    #[allow(clippy::too_many_arguments)]
    pub fn follow(
        &self,
        lane: &mut Lane<B>,
        token: u32,
        kv: &mut KvCache<B>,
        logits: &mut Vec<f32>,
        decoding: Decoding,
        left: usize,
        picked: usize,
        ignore_eos: bool,
    ) -> Result<(), InferenceError> {
        lane.stop.store(false, Ordering::SeqCst);
        let follow = Follow {
            left,
            step: picked,
            ignore_eos,
            stop: Arc::clone(&lane.stop),
            picked: None,
            _decoding: decoding,
        };
        self.send(lane, token, kv, logits, Some(follow))
    }

    fn send(
        &self,
        lane: &mut Lane<B>,
        token: u32,
        kv: &mut KvCache<B>,
        logits: &mut Vec<f32>,
        follow: Option<Follow>,
    ) -> Result<(), InferenceError> {
        // none: an earlier step never came back
        let reply = lane.tx.take().ok_or_else(lost)?;
        self.tx
            .send(Step {
                token,
                kv: std::mem::replace(kv, KvCache::placeholder()),
                logits: std::mem::take(logits),
                reply,
                follow,
            })
            .map_err(|_| lost())
    }
}

/// Sends a row's cache and buffer back with `result`.
fn give_back<B: Backend>(step: Step<B>, result: Result<(), InferenceError>) {
    let lane = step.reply.clone();
    let _ = step.reply.send(Event::Back(Reply {
        kv: step.kv,
        logits: step.logits,
        result,
        lane,
    }));
}

fn run<B: Backend>(
    engine: Weak<Engine<B>>,
    rx: Receiver<Step<B>>,
    decoding: Arc<AtomicUsize>,
    stats: Arc<BatchStats>,
    max_batch: usize,
) {
    let mut state: Option<RunState<B>> = None;
    // reused from pass to pass: the rows of the next pass (followed answers stay in it)
    let mut rows: Vec<Step<B>> = Vec::with_capacity(max_batch);
    let mut next: Vec<Step<B>> = Vec::with_capacity(max_batch);
    let (mut tokens, mut kvs) = (Vec::with_capacity(max_batch), Vec::with_capacity(max_batch));
    loop {
        if rows.is_empty() {
            match rx.recv() {
                Ok(first) => rows.push(first),
                Err(_) => return,
            }
        }
        // the steps already sent, then those the other decoding workers are about to send
        let deadline = Instant::now() + GATHER;
        while rows.len() < max_batch {
            let got = match rx.try_recv() {
                Ok(s) => s,
                Err(_) if rows.len() < decoding.load(Ordering::SeqCst) => {
                    match rx.recv_deadline(deadline) {
                        Ok(s) => s,
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            rows.push(got);
        }
        // followed answers their workers ended meanwhile
        for row in rows.extract_if(.., |r| {
            r.follow
                .as_ref()
                .is_some_and(|f| f.stop.load(Ordering::SeqCst))
        }) {
            give_back(row, Ok(()));
        }
        if rows.is_empty() {
            continue;
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        stats.passes.fetch_add(1, Ordering::Relaxed);
        stats.steps.fetch_add(rows.len(), Ordering::Relaxed);
        let t = &engine.transformer;
        let st = state.get_or_insert_with(|| RunState::new(t, max_batch, max_batch));
        tokens.clear();
        tokens.extend(rows.iter().map(|s| s.token));
        kvs.clear();
        kvs.extend(
            rows.iter_mut()
                .map(|s| std::mem::replace(&mut s.kv, KvCache::placeholder())),
        );
        let vocab = t.cfg.vocab_size;
        let result = catch_unwind(AssertUnwindSafe(|| {
            t.backend.within(|| {
                t.forward_batch(st, &mut kvs, &tokens)?;
                // each row straight into its step's buffer, or its pick made here
                for (i, row) in rows.iter_mut().enumerate() {
                    let at = i * vocab..(i + 1) * vocab;
                    match &mut row.follow {
                        Some(f) => f.picked = t.backend.argmax(st.logits(), at),
                        None => t.backend.read(st.logits(), at, &mut row.logits),
                    }
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
        let stop_ids = &engine.model.stop_token_ids;
        for (mut row, kv) in rows.drain(..).zip(kvs.drain(..)) {
            row.kv = kv;
            if result.is_err() {
                row.logits.clear();
                give_back(row, result.clone());
                continue;
            }
            let Some(f) = row.follow.as_mut() else {
                give_back(row, Ok(()));
                continue;
            };
            let Some(id) = f.picked else {
                let step = f.step;
                give_back(row, Err(InferenceError::NonFiniteLogits { step }));
                continue;
            };
            f.step += 1;
            f.left -= 1;
            let more = f.left > 0
                && (f.ignore_eos || !stop_ids.contains(&id))
                && row.kv.len() < row.kv.capacity();
            if row.reply.send(Event::Token(id)).is_err() {
                // the worker is gone: its cache goes with the row
                continue;
            }
            row.token = id;
            if more {
                next.push(row);
            } else {
                give_back(row, Ok(()));
            }
        }
        std::mem::swap(&mut rows, &mut next);
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
        let (done, finished) = crossbeam_channel::bounded(1);
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
