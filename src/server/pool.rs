//! Admission and the worker pool: a fixed set of `concurrency` worker threads, each owning
//! its generator, fed through a crossbeam channel. At most `concurrency + max_queue`
//! requests are in the system; past that `try_submit` refuses at once. A panicking job is
//! caught, so a worker never dies (it gets a fresh generator) and its slot is always released.
//!
//! Each submitted job has a `Ticket`: it tells the job's place in the queue, and lets a
//! waiting job be abandoned (its client left), which frees its place at once; a worker that
//! later takes an abandoned job drops it unrun. The pool also notes when the engine last made
//! progress (a job started or ended, or a handler reported a token), for `/ready`.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::model::{ChatModel, ChatWorker};

/// Work for one worker: runs with that worker's generator.
pub type Job = Box<dyn FnOnce(&mut dyn ChatWorker) + Send>;

/// Live counts, shared with the status endpoints.
#[derive(Debug)]
pub struct Load {
    in_system: AtomicUsize,
    processing: AtomicUsize,
    /// Requests admitted since the start.
    admitted: AtomicU64,
    /// Sequence numbers of the submitted jobs not yet started, in submission order.
    queued: Mutex<BTreeSet<u64>>,
    next_seq: AtomicU64,
    /// When the pool was made; `last_progress_ms` counts from here.
    epoch: Instant,
    last_progress_ms: AtomicU64,
}

impl Load {
    fn new() -> Load {
        Load {
            in_system: AtomicUsize::new(0),
            processing: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
            queued: Mutex::new(BTreeSet::new()),
            next_seq: AtomicU64::new(0),
            epoch: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
        }
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.queued.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn progress(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_progress_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

/// A submitted job's place: its position while it waits, and the way to give it up.
#[derive(Debug)]
pub struct Ticket {
    seq: u64,
    state: AtomicU8,
    load: Arc<Load>,
}

impl Ticket {
    /// 1 for the next job a worker takes, and so on; `None` once started or abandoned.
    pub fn position(&self) -> Option<usize> {
        if self.state.load(Ordering::SeqCst) != QUEUED {
            return None;
        }
        let queued = self.load.queued();
        queued
            .contains(&self.seq)
            .then(|| queued.range(..self.seq).count() + 1)
    }

    /// Gives up a job that has not started: its place is freed now and no worker will run
    /// it. False if a worker already took it.
    pub fn abandon(&self) -> bool {
        let won = self.leave_queue(ABANDONED);
        if won {
            self.load.in_system.fetch_sub(1, Ordering::SeqCst);
        }
        won
    }

    /// Claims the job for a worker; false if it was abandoned.
    fn start(&self) -> bool {
        self.leave_queue(STARTED)
    }

    /// Moves a waiting job to `state` (exactly one of start and abandon wins).
    fn leave_queue(&self, state: u8) -> bool {
        let won = self
            .state
            .compare_exchange(QUEUED, state, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if won {
            self.load.queued().remove(&self.seq);
        }
        won
    }
}

/// A snapshot of the pool's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// Requests being generated.
    pub processing: usize,
    /// Requests admitted and waiting for a worker.
    pub waiting: usize,
    /// Requests admitted since the start.
    pub admitted_total: u64,
}

/// The worker pool.
pub struct Pool {
    tx: Option<Sender<(Arc<Ticket>, Job)>>,
    load: Arc<Load>,
    concurrency: usize,
    max_queue: usize,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `concurrency` worker threads, each with a generator of `model`. A worker whose
    /// request panicked gets a fresh generator (its old state may be inconsistent), so the
    /// pool keeps its size.
    pub fn new(model: Arc<dyn ChatModel>, concurrency: usize, max_queue: usize) -> Pool {
        let (tx, rx): (Sender<(Arc<Ticket>, Job)>, Receiver<_>) = unbounded();
        let load = Arc::new(Load::new());
        let workers = (0..concurrency)
            .map(|i| {
                let (rx, load, model) = (rx.clone(), Arc::clone(&load), Arc::clone(&model));
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        let mut w = model.new_worker();
                        for (ticket, job) in rx.iter() {
                            if !ticket.start() {
                                continue; // abandoned: its place is already free
                            }
                            load.progress();
                            load.processing.fetch_add(1, Ordering::SeqCst);
                            if catch_unwind(AssertUnwindSafe(|| job(w.as_mut()))).is_err() {
                                log!("worker-{i}: a request panicked; the worker starts afresh");
                                w = model.new_worker();
                            }
                            load.progress();
                            load.processing.fetch_sub(1, Ordering::SeqCst);
                            load.in_system.fetch_sub(1, Ordering::SeqCst);
                        }
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        Pool {
            tx: Some(tx),
            load,
            concurrency,
            max_queue,
            workers,
        }
    }

    /// Takes a place in the system if fewer than `concurrency + max_queue` requests are
    /// in it; `None` means refuse at once. The place is freed if the admission is dropped
    /// without submitting a job.
    pub fn try_admit(&self) -> Option<Admission<'_>> {
        let limit = self.concurrency + self.max_queue;
        self.load
            .in_system
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|before| {
                self.load.admitted.fetch_add(1, Ordering::SeqCst);
                if before == 0 {
                    self.load.progress(); // the stall clock starts with the work
                }
            })
            .map(|_| Admission {
                pool: self,
                submitted: false,
            })
    }

    /// The current load.
    pub fn load(&self) -> LoadSnapshot {
        let in_system = self.load.in_system.load(Ordering::SeqCst);
        let processing = self.load.processing.load(Ordering::SeqCst).min(in_system);
        LoadSnapshot {
            processing,
            waiting: in_system - processing,
            admitted_total: self.load.admitted.load(Ordering::SeqCst),
        }
    }

    /// Notes that the engine made progress (a token came out).
    pub fn progress(&self) {
        self.load.progress();
    }

    /// Whether work is pending and the engine made no progress for `timeout`.
    pub fn stalled(&self, timeout: Duration) -> bool {
        let idle = self.load.in_system.load(Ordering::SeqCst) == 0;
        let now = self.load.epoch.elapsed().as_millis() as u64;
        let last = self.load.last_progress_ms.load(Ordering::Relaxed);
        !idle && now.saturating_sub(last) > timeout.as_millis() as u64
    }

    /// Workers (the most requests generated at once).
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Waiting room size.
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A place in the pool, held between admission and submitting the job.
pub struct Admission<'a> {
    pool: &'a Pool,
    submitted: bool,
}

impl Admission<'_> {
    /// Queues the job for the next free worker.
    pub fn submit(mut self, job: Job) -> Arc<Ticket> {
        let load = &self.pool.load;
        let seq = load.next_seq.fetch_add(1, Ordering::SeqCst);
        let ticket = Arc::new(Ticket {
            seq,
            state: AtomicU8::new(QUEUED),
            load: Arc::clone(load),
        });
        load.queued().insert(seq);
        if let Some(tx) = &self.pool.tx {
            if tx.send((Arc::clone(&ticket), job)).is_ok() {
                self.submitted = true;
            }
        }
        if !self.submitted {
            load.queued().remove(&seq);
        }
        ticket
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.submitted {
            self.pool.load.in_system.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
