//! Sessions: the `SessionStore` interface (load, save, lock a session for one turn) and its
//! in-memory implementation with idle expiry and a bound on the count (the least recently
//! used session is evicted first). Ids are opaque random 128-bit values from the OS. A
//! shared store (Redis) can implement the same trait without touching the handlers.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::model::GenParams;

/// One exchange of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The user's message.
    pub user: String,
    /// The answer (as far as it was sent).
    pub assistant: String,
    /// Id of the answer (`X-ChatStream-Last-Generated-Message-Id`).
    pub message_id: String,
}

/// A user's conversation and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// Earlier exchanges, oldest first.
    pub turns: Vec<Turn>,
    /// Generation settings (merged by `set_generation_params`).
    pub params: GenParams,
    /// The role granted by a UI pass phrase (`None`: the default role).
    pub role: Option<String>,
}

/// Where sessions live.
pub trait SessionStore: Send + Sync {
    /// A new empty session; returns its id.
    fn create(&self, params: GenParams) -> String;
    /// A copy of the session, if it exists (and refreshes its idle timer).
    fn load(&self, id: &str) -> Option<Session>;
    /// Replaces the session's contents (if it still exists).
    fn save(&self, id: &str, session: Session);
    /// Marks the session busy for one turn; false if it already is (or is gone).
    fn try_lock(&self, id: &str) -> bool;
    /// Ends the turn.
    fn unlock(&self, id: &str);
    /// Forgets a session.
    fn remove(&self, id: &str);
    /// Sessions held.
    fn len(&self) -> usize;
    /// Whether no session is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Entry {
    session: Session,
    busy: bool,
    last_used: Instant,
}

/// Sessions in this process's memory.
pub struct MemoryStore {
    map: Mutex<HashMap<String, Entry>>,
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
            map: Mutex::new(HashMap::new()),
            idle_ttl,
            max_sessions: max_sessions.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SessionStore for MemoryStore {
    fn create(&self, params: GenParams) -> String {
        let id = new_session_id();
        let mut map = self.lock();
        let now = Instant::now();
        map.retain(|_, e| e.busy || now.duration_since(e.last_used) < self.idle_ttl);
        while map.len() >= self.max_sessions {
            let oldest = map
                .iter()
                .filter(|(_, e)| !e.busy)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            id.clone(),
            Entry {
                session: Session {
                    turns: Vec::new(),
                    params,
                    role: None,
                },
                busy: false,
                last_used: now,
            },
        );
        id
    }

    fn load(&self, id: &str) -> Option<Session> {
        let mut map = self.lock();
        let e = map.get_mut(id)?;
        if !e.busy && e.last_used.elapsed() >= self.idle_ttl {
            map.remove(id);
            return None;
        }
        e.last_used = Instant::now();
        Some(e.session.clone())
    }

    fn save(&self, id: &str, session: Session) {
        if let Some(e) = self.lock().get_mut(id) {
            e.session = session;
            e.last_used = Instant::now();
        }
    }

    fn try_lock(&self, id: &str) -> bool {
        match self.lock().get_mut(id) {
            Some(e) if !e.busy => {
                e.busy = true;
                true
            }
            _ => false,
        }
    }

    fn unlock(&self, id: &str) {
        if let Some(e) = self.lock().get_mut(id) {
            e.busy = false;
            e.last_used = Instant::now();
        }
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    fn len(&self) -> usize {
        self.lock().len()
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
        let a = s.create(params());
        let b = s.create(params());
        s.load(&a);
        let c = s.create(params());
        assert_eq!(s.len(), 2);
        assert!(s.load(&b).is_none() && s.load(&a).is_some() && s.load(&c).is_some());
    }

    #[test]
    fn idle_sessions_expire_and_locks_are_exclusive() {
        let s = MemoryStore::new(Duration::from_millis(30), 10);
        let a = s.create(params());
        assert!(s.try_lock(&a) && !s.try_lock(&a));
        s.unlock(&a);
        std::thread::sleep(Duration::from_millis(40));
        assert!(s.load(&a).is_none());
    }
}
