//! The connection guard in front of tiny_http, over real sockets: a slow request head gets
//! 408 and is closed at the head deadline (slowloris), an idle keep-alive connection is
//! closed after its timeout, past the connection cap the longest-idle connection makes room
//! and, when none is idle, the newcomer gets a fast 503; with 1,000 idle connections open a
//! new request is served within 1 s and the thread count stays bounded; ambiguous framing
//! (conflicting Content-Length, Transfer-Encoding, huge heads) is refused before the server;
//! keep-alive and pipelined requests pass through; a client leaving mid-stream is detected;
//! a client that sends a too-large body whole before reading still gets its 413.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatstream::server::guard::ConnLimits;
use chatstream::server::model::{MockChat, MockMode};
use chatstream::server::roles::Roles;
use chatstream::server::{bind, ChatStream, ServerConfig, ServerHandle};
use common::client::{open, request};
use serde_json::json;

fn start(limits: ConnLimits, mode: MockMode, delay_ms: u64) -> (Arc<ChatStream>, ServerHandle) {
    let cfg = ServerConfig {
        roles: Roles::open(),
        ..ServerConfig::default()
    };
    let cs = ChatStream::new(
        cfg,
        Arc::new(MockChat::new(mode, Duration::from_millis(delay_ms))),
    );
    let h = bind("127.0.0.1:0", limits)
        .unwrap()
        .serve(Arc::clone(&cs))
        .unwrap();
    (cs, h)
}

fn limits() -> ConnLimits {
    ConnLimits {
        max_connections: 8,
        head_timeout: Duration::from_millis(600),
        body_timeout: Duration::from_millis(600),
        idle_timeout: Duration::from_millis(600),
        ..ConnLimits::default()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Everything the server sends until it closes the connection.
fn read_all(mut s: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_slow_request_head_gets_408_at_the_deadline() {
    let (_cs, h) = start(limits(), MockMode::Echo, 1);
    let mut s = connect(h.addr);
    let t = Instant::now();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    // One header byte every 100 ms: each read is quick, the head never ends.
    for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if t.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let reply = read_all(s);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        h.guard
            .stats
            .timed_out
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_slow_body_is_cut_at_its_deadline() {
    let (_cs, h) = start(limits(), MockMode::Echo, 1);
    let mut s = connect(h.addr);
    let t = Instant::now();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let _ = read_all(s);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[test]
fn keep_alive_and_pipelined_requests_pass_and_an_idle_connection_is_closed() {
    let (_cs, h) = start(limits(), MockMode::Echo, 1);
    let mut s = connect(h.addr);
    // Two requests in one write, then a third on the same connection.
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.matches("{\"status\":\"ok\"}").count() < 2 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {got}");
        got += &String::from_utf8_lossy(&buf[..n]);
    }
    let body = json!({"messages": [{"role": "user", "content": "still here"}]}).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let t = Instant::now();
    let rest = read_all(s);
    assert!(rest.contains("still here"), "{rest}");
    // Then the connection, idle, is closed by the keep-alive timeout.
    let idle = t.elapsed();
    assert!(
        idle >= Duration::from_millis(500) && idle < Duration::from_secs(2),
        "{idle:?}"
    );
}

#[test]
fn past_the_cap_an_idle_connection_makes_room_and_else_a_fast_503() {
    let limits = ConnLimits {
        max_connections: 3,
        head_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        ..ConnLimits::default()
    };
    let (_cs, h) = start(limits, MockMode::Echo, 1);
    // Three idle connections: a fourth request closes the oldest and is served.
    let idle: Vec<_> = (0..3).map(|_| connect(h.addr)).collect();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(request(h.addr, "GET", "/health", &[], b"").status, 200);
    let closed = read_all(idle.into_iter().next().unwrap());
    assert_eq!(closed, "");
    // Three connections in the middle of a request head: none is idle, so the next is refused.
    let busy: Vec<_> = (0..3)
        .map(|_| {
            let mut s = connect(h.addr);
            s.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    // time for the server to read their first lines, with room for a loaded machine
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    let refused = request(h.addr, "GET", "/health", &[], b"");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("Retry-After"), Some("1"));
    assert_eq!(refused.json()["error"], "too_many_connections");
    assert!(t.elapsed() < Duration::from_millis(200));
    drop(busy);
}

#[test]
fn with_1000_idle_connections_a_new_request_is_served_within_1s_and_threads_stay_bounded() {
    let cap = 100;
    let limits = ConnLimits {
        max_connections: cap,
        idle_timeout: Duration::from_secs(60),
        ..ConnLimits::default()
    };
    let (_cs, h) = start(limits, MockMode::Echo, 1);
    let before = threads();
    let idle: Vec<_> = (0..1000).map(|_| connect(h.addr)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let r = request(h.addr, "GET", "/health", &[], b"");
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(
        h.guard.connections() <= cap + 1,
        "{}",
        h.guard.connections()
    );
    // Three threads per open connection at most (two relays and tiny_http's), plus slack for
    // the tests running beside this one.
    let grown = threads().saturating_sub(before);
    assert!(grown <= 3 * cap + 60, "{grown} threads more");
    println!("1000 idle connections: {took:?} for a new request, {grown} more threads");
    drop(idle);
}

#[test]
fn ambiguous_or_oversized_framing_is_refused_before_the_server() {
    let (_cs, h) = start(limits(), MockMode::Echo, 1);
    let send = |raw: &[u8]| {
        let mut s = connect(h.addr);
        s.write_all(raw).unwrap();
        read_all(s)
    };
    let r = send(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = send(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 411"), "{r}");
    let r = send(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let mut big = b"GET /health HTTP/1.1\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70 << 10));
    big.extend(b"\r\n\r\n");
    let r = send(&big);
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let r = send(b"GET /health HTTP/2.0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = send(b"\x00\x01garbage\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // And the server still serves.
    assert_eq!(request(h.addr, "GET", "/health", &[], b"").status, 200);
}

#[test]
fn a_body_too_large_gets_its_413_though_the_client_sends_it_all() {
    // The server answers from the Content-Length, before the body; the client, as curl
    // does, sends the whole body before it reads. Its writes must not fail on a reset, and
    // the answer must still be there to read (the body is read and dropped).
    let (cs, h) = start(limits(), MockMode::Echo, 1);
    let len = cs.cfg.max_body_bytes + (8 << 20);
    let mut s = connect(h.addr);
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the answer has come and gone
    let body = vec![b'x'; len];
    for chunk in body.chunks(64 << 10) {
        s.write_all(chunk)
            .expect("the body's bytes are taken, not reset");
    }
    let r = read_all(s);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert_eq!(request(h.addr, "GET", "/health", &[], b"").status, 200);
}

#[test]
fn a_client_leaving_mid_stream_is_detected_through_the_guard() {
    let (cs, h) = start(limits(), MockMode::Long, 20);
    let body =
        json!({"messages": [{"role": "user", "content": "go"}], "stream": true, "max_tokens": 500})
            .to_string();
    let mut s = open(h.addr, "POST", "/v1/chat/completions", &[], body.as_bytes());
    for _ in 0..3 {
        assert!(s.next_chunk().is_some());
    }
    drop(s);
    let t = Instant::now();
    while cs.pool.load().processing != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the worker did not notice"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = request(h.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        m.contains("outcome=\"client_disconnected_while_streaming\"} 1"),
        "{m}"
    );
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_frees_its_worker() {
    let limits = ConnLimits {
        write_timeout: Duration::from_millis(500),
        ..limits()
    };
    let cfg = ServerConfig {
        roles: Roles::open(),
        default_params: chatstream::server::model::GenParams {
            sampling: chatstream::SamplingParams::default(),
            max_new_tokens: 1800,
            stop: vec![],
        },
        ..ServerConfig::default()
    };
    let long = Arc::new(MockChat::new(MockMode::Long, Duration::ZERO));
    let cs = ChatStream::new(cfg, long);
    let h = bind("127.0.0.1:0", limits)
        .unwrap()
        .serve(Arc::clone(&cs))
        .unwrap();
    // Each chunk is the whole answer so far: megabytes the client never reads.
    let mut s = connect(h.addr);
    let body = json!({"user_input": "go"}).to_string();
    let req = format!(
        "POST /chat_stream HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let t = Instant::now();
    while cs.pool.load().processing == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    while cs.pool.load().processing != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the worker is still held by a reader that stalled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = request(h.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        m.contains("outcome=\"client_disconnected_while_streaming\"} 1"),
        "{m}"
    );
    drop(s);
}
