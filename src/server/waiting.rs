//! The waiting room of streamed (SSE) requests: while an admitted request waits for a
//! worker, its event stream is already open and a comment line `: queue position N` goes out
//! every `PING_EVERY`. A failed ping is a disconnect: the request is abandoned at once (its
//! place in the pool is freed, no worker runs it) and reported as
//! `client_disconnected_before_streaming`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::chat::{FinishOutcome, TurnGuard};
use super::http::ChunkedStream;
use super::pool::Ticket;

/// How often a waiting stream is pinged.
pub const PING_EVERY: Duration = Duration::from_secs(1);

/// What a waiting request hands to its worker: the open stream and its turn guard.
pub(super) struct Queued {
    pub stream: ChunkedStream,
    pub guard: TurnGuard,
}

/// One waiting request, shared by the waiting room and the job that will run it.
pub(super) struct Waiter {
    /// Taken by the job when it starts, or by the room when the client leaves first.
    slot: Mutex<Option<Queued>>,
    /// Set when a ping failed after a worker had already claimed the job.
    gone: AtomicBool,
}

impl Waiter {
    pub fn new(stream: ChunkedStream, guard: TurnGuard) -> Arc<Waiter> {
        Arc::new(Waiter {
            slot: Mutex::new(Some(Queued { stream, guard })),
            gone: AtomicBool::new(false),
        })
    }

    fn slot(&self) -> MutexGuard<'_, Option<Queued>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For the job when a worker starts it: the stream and guard, or `None` when the client
    /// left while waiting (then reported here).
    pub fn start(&self) -> Option<Queued> {
        let mut queued = self.slot().take()?;
        if self.gone.load(Ordering::SeqCst) {
            queued.guard.outcome = FinishOutcome::ClientDisconnectedBeforeStreaming;
            return None;
        }
        Some(queued)
    }
}

type Entries = Mutex<Vec<(Arc<Ticket>, Arc<Waiter>)>>;

/// The set of waiting streams and the thread that pings them.
pub struct WaitingRoom {
    entries: Arc<Entries>,
}

impl Default for WaitingRoom {
    fn default() -> Self {
        let entries: Arc<Entries> = Arc::default();
        let weak = Arc::downgrade(&entries);
        let spawned = std::thread::Builder::new()
            .name("waiting-room".into())
            .spawn(move || ping_loop(weak));
        if let Err(e) = spawned {
            log!("no waiting-room thread ({e}); queued streams get no pings");
        }
        WaitingRoom { entries }
    }
}

impl WaitingRoom {
    /// Adds a waiting request; it is pinged from the next round on (one that a worker takes
    /// at once never is).
    pub(super) fn enter(&self, ticket: Arc<Ticket>, waiter: Arc<Waiter>) {
        lock(&self.entries).push((ticket, waiter));
    }
}

fn lock(entries: &Entries) -> MutexGuard<'_, Vec<(Arc<Ticket>, Arc<Waiter>)>> {
    entries.lock().unwrap_or_else(|e| e.into_inner())
}

fn ping_loop(entries: Weak<Entries>) {
    loop {
        std::thread::sleep(PING_EVERY);
        let Some(entries) = entries.upgrade() else {
            return; // the server is gone
        };
        let mut list = std::mem::take(&mut *lock(&entries));
        let dropped = ping(&mut list);
        lock(&entries).extend(list);
        // Reported here, outside every lock (a finish callback may take its time).
        drop(dropped);
    }
}

/// Pings every entry still waiting; keeps those, and returns the guards of the requests whose
/// client has left (dropping them reports the outcome).
fn ping(list: &mut Vec<(Arc<Ticket>, Arc<Waiter>)>) -> Vec<TurnGuard> {
    let mut dropped = Vec::new();
    list.retain(|(ticket, waiter)| {
        let Some(position) = ticket.position() else {
            return false; // started (or abandoned): no longer waiting
        };
        let mut slot = waiter.slot();
        let Some(queued) = slot.as_mut() else {
            return false;
        };
        let line = format!(": queue position {position}\n\n");
        if queued.stream.chunk(line.as_bytes()).is_ok() {
            return true;
        }
        if ticket.abandon() {
            if let Some(mut q) = slot.take() {
                q.guard.outcome = FinishOutcome::ClientDisconnectedBeforeStreaming;
                dropped.push(q.guard);
            }
        } else {
            waiter.gone.store(true, Ordering::SeqCst);
        }
        false
    });
    dropped
}
