//! Admission and the worker pool: a fixed set of `concurrency` worker threads, each owning
//! its generator, fed through a crossbeam channel. At most `concurrency + max_queue`
//! requests are in the system; past that `try_submit` refuses at once. A panicking job is
//! caught, so a worker never dies and its slot is always released.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::model::ChatWorker;

/// Work for one worker: runs with that worker's generator.
pub type Job = Box<dyn FnOnce(&mut dyn ChatWorker) + Send>;

/// Live counts, shared with the status endpoints.
#[derive(Debug, Default)]
pub struct Load {
    in_system: AtomicUsize,
    processing: AtomicUsize,
}

/// A snapshot of the pool's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// Requests being generated.
    pub processing: usize,
    /// Requests admitted and waiting for a worker.
    pub waiting: usize,
}

/// The worker pool.
pub struct Pool {
    tx: Option<Sender<Job>>,
    load: Arc<Load>,
    concurrency: usize,
    max_queue: usize,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts one thread per worker.
    pub fn new(workers: Vec<Box<dyn ChatWorker>>, max_queue: usize) -> Pool {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = unbounded();
        let load = Arc::new(Load::default());
        let concurrency = workers.len();
        let workers = workers
            .into_iter()
            .enumerate()
            .map(|(i, mut w)| {
                let (rx, load) = (rx.clone(), Arc::clone(&load));
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        for job in rx.iter() {
                            load.processing.fetch_add(1, Ordering::SeqCst);
                            if catch_unwind(AssertUnwindSafe(|| job(w.as_mut()))).is_err() {
                                eprintln!("chatstream: worker-{i}: a request panicked; the worker goes on");
                            }
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
        }
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
    pub fn submit(mut self, job: Job) {
        if let Some(tx) = &self.pool.tx {
            if tx.send(job).is_ok() {
                self.submitted = true;
            }
        }
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.submitted {
            self.pool.load.in_system.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
