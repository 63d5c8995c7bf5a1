//! Sessions: the `SessionStore` interface (load, save, lock a session for one turn) and its
//! in-memory implementation with idle expiry and a bound on the count (the least recently
//! used session is evicted first). Ids are opaque random 128-bit values from the OS. A
//! shared store (Redis) can implement the same trait without touching the handlers.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::model::GenParams;

/// One exchange of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// The user's message.
    pub user: String,
    /// The answer (as far as it was sent).
    pub assistant: String,
    /// Id of the answer (`X-ChatStream-Last-Generated-Message-Id`).
    pub message_id: String,
}

/// A user's conversation and settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Earlier exchanges, oldest first.
    pub turns: Vec<Turn>,
    /// Generation settings (merged by `set_generation_params`).
    pub params: GenParams,
    /// The role granted by a UI pass phrase (`None`: the default role).
    pub role: Option<String>,
}

/// The session store cannot be reached (a shared store that is down); the request that
/// needs a session is answered 503 and may be retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the session store is unreachable: {0}")]
pub struct StoreDown(pub String);

/// Where sessions live.
pub trait SessionStore: Send + Sync {
    /// A new empty session; returns its id.
    fn create(&self, params: GenParams) -> Result<String, StoreDown>;
    /// A copy of the session, if it exists (and refreshes its idle timer).
    fn load(&self, id: &str) -> Result<Option<Session>, StoreDown>;
    /// Replaces the session's contents, whole (if it still exists).
    fn save(&self, id: &str, session: Session) -> Result<(), StoreDown>;
    /// Marks the session busy for one turn; false if it already is (or is gone).
    fn try_lock(&self, id: &str) -> Result<bool, StoreDown>;
    /// Ends the turn (best effort: a shared store's lock also expires by itself).
    fn unlock(&self, id: &str);
    /// Forgets a session (best effort).
    fn remove(&self, id: &str);
    /// Sessions held (0 when it cannot tell).
    fn len(&self) -> usize;
    /// Whether no session is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the store can be reached now (for `/ready`).
    fn health(&self) -> Result<(), StoreDown> {
        Ok(())
    }
}

struct Entry {
    session: Session,
    busy: bool,
    last_used: Instant,
    /// Its key in `Sessions::by_use`.
    tick: u64,
}

/// The sessions, with an index by last use so that expiry and eviction take O(log n).
#[derive(Default)]
struct Sessions {
    map: HashMap<String, Entry>,
    by_use: BTreeMap<u64, String>,
    tick: u64,
}

impl Sessions {
    /// Marks `id` used now.
    fn touch(&mut self, id: &str) -> Option<&mut Entry> {
        let e = self.map.get_mut(id)?;
        self.by_use.remove(&e.tick);
        self.tick += 1;
        e.tick = self.tick;
        e.last_used = Instant::now();
        self.by_use.insert(self.tick, id.to_string());
        Some(e)
    }

    fn remove(&mut self, id: &str) {
        if let Some(e) = self.map.remove(id) {
            self.by_use.remove(&e.tick);
        }
    }

    /// Forgets sessions idle past `ttl`, then the least recently used beyond `max - 1`
    /// (busy ones are kept), making room for one more.
    fn make_room(&mut self, ttl: Duration, max: usize) {
        let now = Instant::now();
        let mut skipped = 0;
        while let Some((_, id)) = self.by_use.iter().nth(skipped) {
            let e = &self.map[id];
            let expired = now.duration_since(e.last_used) >= ttl;
            if !expired && self.map.len() < max {
                break;
            }
            if e.busy {
                skipped += 1; // a running turn is never evicted
                if skipped > 64 {
                    break;
                }
                continue;
            }
            let id = id.clone();
            self.remove(&id);
        }
    }
}

/// Sessions in this process's memory.
pub struct MemoryStore {
    inner: Mutex<Sessions>,
    idle_ttl: Duration,
    max_sessions: usize,
}

/// 128 random bits from the OS, as 32 hex digits.
pub fn new_session_id() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom for a session id");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl MemoryStore {
    /// A store that forgets sessions idle for `idle_ttl` and holds at most `max_sessions`.
    pub fn new(idle_ttl: Duration, max_sessions: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::default(),
            idle_ttl,
            max_sessions: max_sessions.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SessionStore for MemoryStore {
    fn create(&self, params: GenParams) -> Result<String, StoreDown> {
        let id = new_session_id();
        let mut s = self.lock();
        s.make_room(self.idle_ttl, self.max_sessions);
        let entry = Entry {
            session: Session {
                turns: Vec::new(),
                params,
                role: None,
            },
            busy: false,
            last_used: Instant::now(),
            tick: 0,
        };
        s.map.insert(id.clone(), entry);
        s.touch(&id);
        Ok(id)
    }

    fn load(&self, id: &str) -> Result<Option<Session>, StoreDown> {
        let mut s = self.lock();
        let Some(e) = s.map.get(id) else {
            return Ok(None);
        };
        if !e.busy && e.last_used.elapsed() >= self.idle_ttl {
            s.remove(id);
            return Ok(None);
        }
        Ok(s.touch(id).map(|e| e.session.clone()))
    }

    fn save(&self, id: &str, session: Session) -> Result<(), StoreDown> {
        if let Some(e) = self.lock().touch(id) {
            e.session = session;
        }
        Ok(())
    }

    fn try_lock(&self, id: &str) -> Result<bool, StoreDown> {
        Ok(match self.lock().map.get_mut(id) {
            Some(e) if !e.busy => {
                e.busy = true;
                true
            }
            _ => false,
        })
    }

    fn unlock(&self, id: &str) {
        if let Some(e) = self.lock().touch(id) {
            e.busy = false;
        }
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    fn params() -> GenParams {
        GenParams {
            sampling: SamplingParams::default(),
            max_new_tokens: 8,
            stop: vec![],
        }
    }

    #[test]
    fn ids_are_random_128_bit_hex() {
        let (a, b) = (new_session_id(), new_session_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn bound_evicts_the_least_recently_used() {
        let s = MemoryStore::new(Duration::from_secs(60), 2);
        let a = s.create(params()).unwrap();
        let b = s.create(params()).unwrap();
        s.load(&a).unwrap();
        let c = s.create(params()).unwrap();
        assert_eq!(s.len(), 2);
        let live = |id: &str| s.load(id).unwrap().is_some();
        assert!(!live(&b) && live(&a) && live(&c));
    }

    #[test]
    fn idle_sessions_expire_and_locks_are_exclusive() {
        let s = MemoryStore::new(Duration::from_millis(30), 10);
        let a = s.create(params()).unwrap();
        assert!(s.try_lock(&a).unwrap() && !s.try_lock(&a).unwrap());
        s.unlock(&a);
        std::thread::sleep(Duration::from_millis(40));
        assert!(s.load(&a).unwrap().is_none());
    }

    #[test]
    fn a_flood_of_new_sessions_stays_at_the_bound_and_keeps_the_busy_one() {
        let s = MemoryStore::new(Duration::from_secs(60), 1000);
        let busy = s.create(params()).unwrap();
        assert!(s.try_lock(&busy).unwrap());
        for _ in 0..100_000 {
            s.create(params()).unwrap();
        }
        assert_eq!(s.len(), 1000);
        let kept = s.load(&busy).unwrap();
        assert!(kept.is_some(), "a running turn's session was evicted");
        let inner = s.lock();
        assert_eq!(inner.by_use.len(), inner.map.len());
    }
}
