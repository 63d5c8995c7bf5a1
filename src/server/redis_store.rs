//! Sessions in Redis, shared by every replica (`--session-store redis://HOST:PORT/DB`): each
//! session is one JSON value (history, generation params, granted role) under
//! `chatstream:session:<id>`, written whole in one `SET` (a turn never half-writes it) and
//! kept for `--session-idle-ttl` after its last use. One turn at a time per session is a
//! Redis lock, `SET chatstream:lock:<id> <token> NX PX`, released only by its owner (a
//! compare-and-delete script) and expiring by itself if a replica dies mid-turn.
//!
//! When Redis cannot be reached every call returns `StoreDown` (the handlers answer 503 with
//! `Retry-After`); the connection is made again on the next call, so the store recovers by
//! itself when Redis returns.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use redis::{Client, Connection, RedisError, RedisResult, Script};

use super::model::GenParams;
use super::session::{new_session_id, Session, SessionStore, StoreDown};

/// How long connecting, and each command, may take before Redis counts as unreachable.
const TIMEOUT: Duration = Duration::from_secs(1);

/// A lock outlives no turn: past this a dead replica's lock frees itself.
const LOCK_TTL: Duration = Duration::from_secs(600);

const SESSION_KEY: &str = "chatstream:session:";
const LOCK_KEY: &str = "chatstream:lock:";

/// Deletes the lock only if it still holds our token.
const UNLOCK: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// The Redis session store.
pub struct RedisStore {
    client: Client,
    conn: Mutex<Option<Connection>>,
    idle_ttl: Duration,
    /// This replica's lock tokens, by session id.
    tokens: Mutex<HashMap<String, String>>,
    unlock: Script,
}

impl RedisStore {
    /// A store on `url` (`redis://HOST:PORT/DB`); sessions live `idle_ttl` after their last
    /// use. Connects lazily: a Redis that is down now only makes calls fail until it is up.
    pub fn new(url: &str, idle_ttl: Duration) -> Result<RedisStore, String> {
        let client = Client::open(url).map_err(|e| format!("--session-store {url}: {e}"))?;
        Ok(RedisStore {
            client,
            conn: Mutex::new(None),
            idle_ttl,
            tokens: Mutex::default(),
            unlock: Script::new(UNLOCK),
        })
    }

    fn connection(&self) -> MutexGuard<'_, Option<Connection>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the connection (made first if there is none); a connection that failed
    /// is dropped, to be made again next time.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Result<T, StoreDown> {
        let mut slot = self.connection();
        if slot.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(TIMEOUT)
                .and_then(|c| {
                    c.set_read_timeout(Some(TIMEOUT))?;
                    c.set_write_timeout(Some(TIMEOUT))?;
                    Ok(c)
                })
                .map_err(down)?;
            *slot = Some(conn);
        }
        let conn = slot.as_mut().expect("connected above");
        f(conn).map_err(|e| {
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                *slot = None;
            }
            down(e)
        })
    }

    fn ttl_ms(&self) -> u64 {
        self.idle_ttl.as_millis().max(1) as u64
    }

    /// `SET key value <NX|XX> PX ttl`: whether it was set.
    fn set(&self, key: &str, value: &str, when: &str, ttl_ms: u64) -> Result<bool, StoreDown> {
        let set = self.with(|c| {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg(when)
                .arg("PX")
                .arg(ttl_ms)
                .query::<Option<String>>(c)
        })?;
        Ok(set.is_some())
    }

    fn tokens(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn down(e: RedisError) -> StoreDown {
    StoreDown(e.to_string())
}

fn to_json(s: &Session) -> String {
    serde_json::to_string(s).expect("a session serialises")
}

impl SessionStore for RedisStore {
    fn create(&self, params: GenParams) -> Result<String, StoreDown> {
        let session = Session {
            turns: Vec::new(),
            params,
            role: None,
        };
        let id = new_session_id();
        self.set(
            &format!("{SESSION_KEY}{id}"),
            &to_json(&session),
            "NX",
            self.ttl_ms(),
        )?;
        Ok(id)
    }

    fn load(&self, id: &str) -> Result<Option<Session>, StoreDown> {
        let key = format!("{SESSION_KEY}{id}");
        let ttl = self.ttl_ms();
        let json = self.with(|c| {
            redis::cmd("GETEX")
                .arg(&key)
                .arg("PX")
                .arg(ttl)
                .query::<Option<String>>(c)
        })?;
        // A value that does not parse (another version, or tampering) is no session.
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    fn save(&self, id: &str, session: Session) -> Result<(), StoreDown> {
        // XX: a session that expired meanwhile is not brought back.
        self.set(
            &format!("{SESSION_KEY}{id}"),
            &to_json(&session),
            "XX",
            self.ttl_ms(),
        )?;
        Ok(())
    }

    fn try_lock(&self, id: &str) -> Result<bool, StoreDown> {
        let token = new_session_id();
        let ttl = LOCK_TTL.as_millis() as u64;
        let locked = self.set(&format!("{LOCK_KEY}{id}"), &token, "NX", ttl)?;
        if locked {
            self.tokens().insert(id.to_string(), token);
        }
        Ok(locked)
    }

    fn unlock(&self, id: &str) {
        let Some(token) = self.tokens().remove(id) else {
            return;
        };
        let key = format!("{LOCK_KEY}{id}");
        let result = self.with(|c| self.unlock.key(&key).arg(&token).invoke::<i64>(c));
        if let Err(e) = result {
            log!("could not release a session lock (it expires by itself): {e}");
        }
    }

    fn remove(&self, id: &str) {
        self.tokens().remove(id);
        let keys = [format!("{SESSION_KEY}{id}"), format!("{LOCK_KEY}{id}")];
        if let Err(e) = self.with(|c| redis::cmd("DEL").arg(&keys).query::<i64>(c)) {
            log!("could not remove a session (it expires by itself): {e}");
        }
    }

    fn len(&self) -> usize {
        let pattern = format!("{SESSION_KEY}*");
        self.with(|c| {
            let mut n = 0;
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                n += keys.len();
                if next == 0 {
                    return Ok(n);
                }
                cursor = next;
            }
        })
        .unwrap_or(0)
    }

    fn health(&self) -> Result<(), StoreDown> {
        self.with(|c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }
}
