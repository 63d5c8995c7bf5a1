//! The connection guard: the TCP front of the server. tiny_http gives every connection its
//! own thread and reads without a time limit, so it listens on a private Unix socket (in a
//! folder only this user can enter), and this guard accepts the TCP connections and relays each one to it, enforcing:
//!
//! - a cap on open connections: past it, the longest-idle connection is closed to make room,
//!   and when none is idle the newcomer gets a fast 503 (`Retry-After: 1`);
//! - a deadline for a request's head (`head_timeout`, from its first byte; 408 past it) and
//!   its body (`body_timeout`), so a client sending slowly (slowloris) cannot hold a thread;
//! - an idle keep-alive timeout: a connection with no request in flight is closed after
//!   `idle_timeout`, and a client that takes no bytes of its answer for `write_timeout` is
//!   dropped (its generation stops at the next token);
//! - request framing: heads over `max_head_bytes` get 431, malformed heads 400, conflicting
//!   `Content-Length`s 400 and `Transfer-Encoding` 411 (send a length), so no ambiguous
//!   request reaches the server (no request smuggling);
//! - a client that closes its side has left (as nginx takes it): the relay closes the
//!   server's side too, so the server's next write fails and it stops generating at once.
//!
//! Each connection takes three threads (two relaying, one in tiny_http), so the threads stay
//! under `3 * max_connections` plus a fixed few. The relay parses just enough of both
//! directions to know when a request is in flight: request heads and `Content-Length` bodies
//! one way, response heads and bodies (length, chunked or until close) the other.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The guard's limits.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time to send a request's head, from its first byte.
    pub head_timeout: Duration,
    /// Time to send a request's body, from the end of its head.
    pub body_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_head_bytes: usize,
    /// A client that takes no bytes of its answer for this long has left (so a reader that
    /// stalls cannot hold a worker).
    pub write_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 1024,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_head_bytes: 64 << 10,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(100);

/// What the watchdog and the accept loop need to know of one connection.
#[derive(Debug)]
struct ConnState {
    /// Requests sent on to the server whose response has not ended; per request, whether
    /// it was a HEAD (its response has no body).
    in_flight: VecDeque<bool>,
    /// Part of a request (head or body) has arrived but not all of it.
    reading: bool,
    /// When the connection last became idle (nothing in flight, nothing being read).
    idle_since: Instant,
    /// When the request being read must be complete.
    deadline: Option<Instant>,
    /// Being closed by the guard.
    closing: bool,
}

impl ConnState {
    fn idle(&self) -> bool {
        self.in_flight.is_empty() && !self.reading && !self.closing
    }
}

#[derive(Debug)]
struct Conn {
    /// A handle on the client socket, to close it from the watchdog.
    client: TcpStream,
    state: Mutex<ConnState>,
    /// Relay threads still running; the last one out removes the connection.
    threads: AtomicUsize,
}

impl Conn {
    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the client side; the relays notice and end. A last reply is written without
    /// blocking (a client that does not read gets what fits), so closing never waits on one.
    fn close(&self, reply: Option<&[u8]>) {
        self.state().closing = true;
        if let Some(bytes) = reply {
            let _ = self.client.set_nonblocking(true);
            let _ = (&self.client).write(bytes);
        }
        let _ = self.client.shutdown(Shutdown::Both);
    }
}

type Table = Mutex<HashMap<u64, Arc<Conn>>>;

/// Counters of what the guard refused or closed.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Connections refused with 503 at the cap.
    pub refused: AtomicU64,
    /// Idle connections closed to make room at the cap.
    pub evicted: AtomicU64,
    /// Requests whose head or body came too slowly.
    pub timed_out: AtomicU64,
    /// Idle connections closed after the keep-alive timeout.
    pub idle_closed: AtomicU64,
    /// Requests refused for their framing (400, 411, 431).
    pub malformed: AtomicU64,
}

/// The running guard.
pub struct Guard {
    /// The TCP address it listens on.
    pub addr: SocketAddr,
    table: Arc<Table>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// What it refused or closed.
    pub stats: Arc<GuardStats>,
}

/// A private folder (mode 0700) holding the Unix socket of the server behind the guard, so
/// that no other local user can reach the server around the guard; removed when dropped.
pub struct SocketDir(PathBuf);

impl SocketDir {
    /// Makes a fresh folder in the temporary folder.
    pub fn new() -> std::io::Result<SocketDir> {
        use std::os::unix::fs::DirBuilderExt;
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 8];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
        let name = format!(
            "chatstream-{}-{n}-{:x}",
            std::process::id(),
            u64::from_le_bytes(nonce)
        );
        let dir = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(SocketDir(dir))
    }

    /// The socket's path.
    pub fn socket(&self) -> PathBuf {
        self.0.join("http.sock")
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Guard {
    /// Starts accepting on `listener`, relaying to the server listening on `upstream`.
    pub fn start(
        listener: TcpListener,
        upstream: PathBuf,
        limits: ConnLimits,
    ) -> std::io::Result<Guard> {
        let addr = listener.local_addr()?;
        let table: Arc<Table> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(GuardStats::default());
        let acceptor = {
            let (table, stop, stats, limits) = (
                Arc::clone(&table),
                Arc::clone(&stop),
                Arc::clone(&stats),
                limits.clone(),
            );
            std::thread::Builder::new()
                .name("guard-accept".into())
                .spawn(move || accept_loop(listener, upstream, limits, table, stop, stats))?
        };
        let watchdog = {
            let (table, stop, stats) = (Arc::clone(&table), Arc::clone(&stop), Arc::clone(&stats));
            std::thread::Builder::new()
                .name("guard-watchdog".into())
                .spawn(move || watchdog(limits, table, stop, stats))?
        };
        Ok(Guard {
            addr,
            table,
            stop,
            threads: vec![acceptor, watchdog],
            stats,
        })
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let conns: Vec<_> = lock(&self.table).values().cloned().collect();
        for c in conns {
            c.close(None);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock(table: &Table) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    listener: TcpListener,
    upstream: PathBuf,
    limits: ConnLimits,
    table: Arc<Table>,
    stop: Arc<AtomicBool>,
    stats: Arc<GuardStats>,
) {
    let mut next_id = 0u64;
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            // Out of file descriptors or the like: back off instead of spinning.
            std::thread::sleep(TICK);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = client.set_write_timeout(Some(limits.write_timeout));
        if !make_room(&table, limits.max_connections, &stats) {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
            let reply = error_reply(503, "the server has too many open connections");
            let _ = (&client).write_all(&reply);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = UnixStream::connect(&upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let Ok(handle) = client.try_clone() else {
            continue;
        };
        let conn = Arc::new(Conn {
            client: handle,
            state: Mutex::new(ConnState {
                in_flight: VecDeque::new(),
                reading: false,
                idle_since: Instant::now(),
                deadline: None,
                closing: false,
            }),
            threads: AtomicUsize::new(2),
        });
        next_id += 1;
        let id = next_id;
        lock(&table).insert(id, Arc::clone(&conn));
        if let Err(e) = spawn_relays(id, client, server, conn, &table, &limits, &stats) {
            log!("could not start a connection's threads: {e}");
            lock(&table).remove(&id);
        }
    }
}

/// Whether a new connection fits: under the cap, or after closing the longest-idle one.
fn make_room(table: &Table, max: usize, stats: &GuardStats) -> bool {
    let t = lock(table);
    let open: Vec<_> = t.values().filter(|c| !c.state().closing).collect();
    if open.len() < max {
        return true;
    }
    let victim = open
        .iter()
        .filter_map(|c| {
            let st = c.state();
            st.idle().then_some((st.idle_since, Arc::clone(c)))
        })
        .min_by_key(|(since, _)| *since);
    match victim {
        Some((_, c)) => {
            stats.evicted.fetch_add(1, Ordering::Relaxed);
            c.close(None);
            true
        }
        None => false,
    }
}

fn spawn_relays(
    id: u64,
    client: TcpStream,
    server: UnixStream,
    conn: Arc<Conn>,
    table: &Arc<Table>,
    limits: &ConnLimits,
    stats: &Arc<GuardStats>,
) -> std::io::Result<()> {
    let (client2, server2) = (client.try_clone()?, server.try_clone()?);
    let finish = {
        let table = Arc::clone(table);
        move |conn: &Conn| {
            if conn.threads.fetch_sub(1, Ordering::SeqCst) == 1 {
                lock(&table).remove(&id);
            }
        }
    };
    let finish2 = finish.clone();
    let (c1, c2) = (Arc::clone(&conn), conn);
    let (limits, stats) = (limits.clone(), Arc::clone(stats));
    std::thread::Builder::new()
        .name("conn-in".into())
        .spawn(move || {
            relay_requests(client, server, &c1, &limits, &stats);
            finish(&c1);
        })?;
    std::thread::Builder::new()
        .name("conn-out".into())
        .spawn(move || {
            relay_responses(server2, client2, &c2);
            finish2(&c2);
        })?;
    Ok(())
}

/// Client to server: request heads are checked, bodies counted, deadlines set.
fn relay_requests(
    mut client: TcpStream,
    mut server: UnixStream,
    conn: &Conn,
    limits: &ConnLimits,
    stats: &GuardStats,
) {
    let mut head: Vec<u8> = Vec::new();
    let mut body_left = 0u64;
    let mut buf = vec![0u8; 16 << 10];
    'read: loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            if body_left > 0 {
                let take = (body_left as usize).min(data.len());
                if server.write_all(&data[..take]).is_err() {
                    break 'read;
                }
                body_left -= take as u64;
                data = &data[take..];
                if body_left == 0 {
                    let mut st = conn.state();
                    st.reading = false;
                    st.deadline = None;
                }
                continue;
            }
            // A request head: gather it up to the blank line.
            if head.is_empty() {
                let mut st = conn.state();
                st.reading = true;
                st.deadline = Some(Instant::now() + limits.head_timeout);
            }
            let before = head.len();
            head.extend_from_slice(data);
            let Some(end) = find_head_end(&head, before) else {
                if head.len() > limits.max_head_bytes {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    conn.close(Some(&error_reply(431, "request head too large")));
                    break 'read;
                }
                continue 'read;
            };
            let used = end - before;
            head.truncate(end);
            let request = match check_head(&head, limits.max_head_bytes) {
                Ok(r) => r,
                Err((status, msg)) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    conn.close(Some(&error_reply(status, msg)));
                    break 'read;
                }
            };
            {
                let mut st = conn.state();
                st.in_flight.push_back(request.is_head);
                st.reading = request.body_len > 0;
                st.deadline = st.reading.then(|| Instant::now() + limits.body_timeout);
            }
            if server.write_all(&head).is_err() {
                break 'read;
            }
            head.clear();
            body_left = request.body_len;
            data = &data[used..];
        }
    }
    // The client is gone (or done sending, which HTTP clients do only when they leave, as
    // nginx also takes it): what is in flight is abandoned, so the server's next write fails
    // and it notices the disconnect at once.
    let _ = server.shutdown(Shutdown::Both);
}

/// The end of a head (just past its blank line), searching from near `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    buf[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| start + i + 4)
}

struct RequestHead {
    body_len: u64,
    is_head: bool,
}

/// Checks a request head's framing.
fn check_head(head: &[u8], max: usize) -> Result<RequestHead, (u16, &'static str)> {
    if head.len() > max {
        return Err((431, "request head too large"));
    }
    let text = std::str::from_utf8(head).map_err(|_| (400, "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if parts.len() != 3 || !token(parts[0]) || parts[1].is_empty() {
        return Err((400, "malformed request line"));
    }
    if parts[2] != "HTTP/1.1" && parts[2] != "HTTP/1.0" {
        return Err((400, "only HTTP/1.0 and HTTP/1.1 are served"));
    }
    let mut length: Option<u64> = None;
    for h in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = h.split_once(':').ok_or((400, "malformed header line"))?;
        if !token(name) {
            return Err((400, "malformed header name"));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err((411, "send the body with a Content-Length"));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or((400, "invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err((400, "conflicting Content-Length headers"));
            }
            length = Some(n);
        }
    }
    Ok(RequestHead {
        body_len: length.unwrap_or(0),
        is_head: parts[0] == "HEAD",
    })
}

fn error_reply(status: u16, message: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        411 => "Length Required",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let (code, retry) = match status {
        503 => ("too_many_connections".to_string(), "Retry-After: 1\r\n"),
        _ => (reason.to_lowercase().replace(' ', "_"), ""),
    };
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{retry}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Where the relay is in a response.
enum Out {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    Trailer(Vec<u8>),
    UntilClose,
}

/// Server to client: bytes go straight through; response ends are noted.
fn relay_responses(mut server: UnixStream, mut client: TcpStream, conn: &Conn) {
    let mut out = Out::Head(Vec::new());
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
        let mut data = &buf[..n];
        while !data.is_empty() {
            let (next, used, ended) =
                step(std::mem::replace(&mut out, Out::UntilClose), data, conn);
            out = next;
            data = &data[used..];
            if ended {
                let mut st = conn.state();
                st.in_flight.pop_front();
                if st.in_flight.is_empty() && !st.reading {
                    st.idle_since = Instant::now();
                }
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// Advances the response parser over `data`: the next state, bytes used, and whether a
/// response ended.
fn step(out: Out, data: &[u8], conn: &Conn) -> (Out, usize, bool) {
    match out {
        Out::Head(mut h) => {
            let before = h.len();
            h.extend_from_slice(data);
            let Some(end) = find_head_end(&h, before) else {
                return (Out::Head(h), data.len(), false);
            };
            let used = end - before;
            h.truncate(end);
            let text = String::from_utf8_lossy(&h);
            let status: u16 = text
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            if (100..200).contains(&status) {
                return (Out::Head(Vec::new()), used, false); // an interim response
            }
            let is_head = conn.state().in_flight.front().copied().unwrap_or(false);
            let header = |name: &str| {
                text.split("\r\n").find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_ascii_lowercase())
                })
            };
            if is_head || status == 204 || status == 304 {
                return (Out::Head(Vec::new()), used, true);
            }
            if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                return (Out::ChunkSize(Vec::new()), used, false);
            }
            match header("content-length").and_then(|v| v.parse::<u64>().ok()) {
                Some(0) => (Out::Head(Vec::new()), used, true),
                Some(n) => (Out::Body(n), used, false),
                None => (Out::UntilClose, used, false),
            }
        }
        Out::Body(left) => {
            let take = left.min(data.len() as u64);
            if take == left {
                (Out::Head(Vec::new()), take as usize, true)
            } else {
                (Out::Body(left - take), take as usize, false)
            }
        }
        Out::ChunkSize(mut line) => match data.iter().position(|&b| b == b'\n') {
            None => {
                line.extend_from_slice(data);
                (Out::ChunkSize(line), data.len(), false)
            }
            Some(i) => {
                line.extend_from_slice(&data[..i]);
                let text = String::from_utf8_lossy(&line);
                let size = text.trim().split(';').next().unwrap_or("");
                let size = u64::from_str_radix(size.trim(), 16).unwrap_or(0);
                if size == 0 {
                    (Out::Trailer(Vec::new()), i + 1, false)
                } else {
                    (Out::ChunkData(size + 2), i + 1, false) // the data and its CRLF
                }
            }
        },
        Out::ChunkData(left) => {
            let take = left.min(data.len() as u64);
            if take == left {
                (Out::ChunkSize(Vec::new()), take as usize, false)
            } else {
                (Out::ChunkData(left - take), take as usize, false)
            }
        }
        Out::Trailer(mut line) => match data.iter().position(|&b| b == b'\n') {
            None => {
                line.extend_from_slice(data);
                (Out::Trailer(line), data.len(), false)
            }
            Some(i) => {
                line.extend_from_slice(&data[..i]);
                if line.iter().all(|&b| b == b'\r') {
                    (Out::Head(Vec::new()), i + 1, true)
                } else {
                    (Out::Trailer(Vec::new()), i + 1, false)
                }
            }
        },
        Out::UntilClose => (Out::UntilClose, data.len(), false),
    }
}

fn watchdog(limits: ConnLimits, table: Arc<Table>, stop: Arc<AtomicBool>, stats: Arc<GuardStats>) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(TICK);
        let now = Instant::now();
        let conns: Vec<_> = lock(&table).values().cloned().collect();
        for c in conns {
            let (late, idle_too_long, answering) = {
                let st = c.state();
                if st.closing {
                    continue;
                }
                (
                    st.deadline.is_some_and(|d| now > d),
                    st.idle() && now.duration_since(st.idle_since) > limits.idle_timeout,
                    !st.in_flight.is_empty(),
                )
            };
            if late {
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
                // A 408 only when no response is going out on this connection.
                let reply = (!answering).then(|| error_reply(408, "the request came too slowly"));
                c.close(reply.as_deref());
            } else if idle_too_long {
                stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                c.close(None);
            }
        }
    }
}
