//! HTTP fuzzing over real sockets: generated requests (random methods, paths, headers incl.
//! 64 KB ones and duplicate or conflicting Content-Length / Transfer-Encoding, bodies with
//! invalid UTF-8, deep nesting, huge numbers, NaN, wrong types for every field of every
//! endpoint, truncated requests) against a running server behind its connection guard.
//! Every answer must be a well-formed HTTP response with a 2xx or 4xx status (a truncated
//! request, whose client gives up, may get none); afterwards the server still serves, its load is back to zero and
//! no request ended in an unknown error. `FUZZ_CASES` sets the count (CI: 300;
//! `scripts/soak.sh`: 10,000), and the status counts are printed.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatstream::server::guard::ConnLimits;
use chatstream::server::model::{MockChat, MockMode};
use chatstream::server::roles::Roles;
use chatstream::server::{bind, ChatStream, ServerConfig};
use common::client::request;
use proptest::prelude::*;
use serde_json::{json, Value};

const PATHS: &[&str] = &[
    "/chat_stream",
    "/clear_context",
    "/get_prompt",
    "/set_generation_params",
    "/get_generation_params",
    "/get_load",
    "/set_feedback",
    "/get_resource_usage",
    "/metrics",
    "/",
    "/index.html",
    "/chatstream.js",
    "/health",
    "/ready",
    "/v1/chat/completions",
    "/v1/models",
    "/../../etc/passwd",
    "/chatstream.js/../../Cargo.toml",
    "/%2e%2e/%00",
    "/v1/chat/completions?x=1",
    "//",
    "*",
];

const FIELDS: &[&str] = &[
    "user_input",
    "regenerate",
    "stream",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "stream_options",
    "max_new_tokens",
    "is_like",
    "message_id",
    "form_data",
    "role",
    "content",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        ".{0,12}".prop_map(Value::from),
        Just(json!("delta")),
        Just(json!("user")),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..4).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A body: a JSON object of the endpoints' fields with values of any type, a valid chat, or
/// bytes no parser should accept.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec((prop::sample::select(FIELDS), json_value()), 0..6).prop_map(|kv| {
            let obj: serde_json::Map<String, Value> =
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            Value::Object(obj).to_string().into_bytes()
        }),
        1 => ".{0,20}".prop_map(|t| json!({"user_input": t}).to_string().into_bytes()),
        1 => ".{0,20}".prop_map(|t| json!({"messages": [{"role": "user", "content": t}], "stream": true, "max_tokens": 4}).to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => Just(b"\xff\xfe{\"user_input\": \"\xc3\x28\"}".to_vec()),
        1 => (1usize..5000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()),
        1 => Just(br#"{"temperature": NaN, "top_p": Infinity}"#.to_vec()),
        1 => Just(br#"{"max_tokens": 1e400, "seed": 123456789012345678901234567890}"#.to_vec()),
        1 => Just(br#"{"user_input": "x", "user_input": 5}"#.to_vec()),
    ]
}

#[derive(Debug, Clone)]
enum Framing {
    Length,
    NoLength,
    Duplicate,
    Conflicting,
    Chunked,
    LengthAndChunked,
    TooShort,
}

#[derive(Debug, Clone)]
struct Raw {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
    big_header: bool,
    truncate_at: Option<usize>,
}

fn raw() -> impl Strategy<Value = Raw> {
    let method = prop_oneof![
        4 => prop::sample::select(vec!["GET", "POST"]).prop_map(str::to_string),
        1 => prop::sample::select(vec!["PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE", "CONNECT"]).prop_map(str::to_string),
        1 => "[A-Za-z]{1,10}",
    ];
    let path = prop_oneof![
        4 => prop::sample::select(PATHS).prop_map(str::to_string),
        1 => "/[ -~]{0,40}".prop_map(|p| p.replace(' ', "%20")),
    ];
    let header = prop_oneof![
        ("[A-Za-z-]{1,20}", "[ -~]{0,40}"),
        (Just("Cookie".to_string()), "sid=[a-f0-9]{0,32}"),
        (Just("Origin".to_string()), "https?://[a-z.]{1,20}"),
        (
            Just("X-FastSession-Skip".to_string()),
            Just("skip".to_string())
        ),
        (Just("Authorization".to_string()), "Bearer [ -~]{0,20}"),
        (Just("Expect".to_string()), Just("100-continue".to_string())),
        (Just("Content-Type".to_string()), "[ -~]{0,30}"),
    ];
    let framing = prop_oneof![
        6 => Just(Framing::Length),
        1 => Just(Framing::NoLength),
        1 => Just(Framing::Duplicate),
        1 => Just(Framing::Conflicting),
        1 => Just(Framing::Chunked),
        1 => Just(Framing::LengthAndChunked),
        1 => Just(Framing::TooShort),
    ];
    (
        method,
        path,
        prop::collection::vec(header, 0..5),
        body(),
        framing,
        prop::bool::weighted(0.05),
        prop::option::weighted(0.1, 0usize..200),
    )
        .prop_map(
            |(method, path, headers, body, framing, big_header, truncate_at)| Raw {
                method,
                path,
                headers,
                body,
                framing,
                big_header,
                truncate_at,
            },
        )
}

impl Raw {
    fn bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n",
            self.method, self.path
        );
        for (k, v) in &self.headers {
            head += &format!("{k}: {v}\r\n");
        }
        if self.big_header {
            head += &format!("X-Big: {}\r\n", "a".repeat(64 << 10));
        }
        let n = self.body.len();
        head += &match self.framing {
            Framing::Length => format!("Content-Length: {n}\r\n"),
            Framing::NoLength => String::new(),
            Framing::Duplicate => format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"),
            Framing::Conflicting => format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1),
            Framing::Chunked => "Transfer-Encoding: chunked\r\n".into(),
            Framing::LengthAndChunked => {
                format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n")
            }
            Framing::TooShort => format!("Content-Length: {}\r\n", n + 10),
        };
        let mut out = head.into_bytes();
        out.extend(b"\r\n");
        out.extend(&self.body);
        if let Some(at) = self.truncate_at {
            out.truncate(at);
        }
        out
    }

    /// Whether the server may rightly close without an answer: the request never completed.
    fn may_go_unanswered(&self) -> bool {
        self.truncate_at.is_some() || matches!(self.framing, Framing::TooShort)
    }
}

/// Checks that `bytes` is one well-formed HTTP response (after any 1xx) and returns its
/// status; `None` when there was only a 1xx (or nothing).
fn parse_response(bytes: &[u8], head_request: bool) -> Result<Option<u16>, String> {
    let mut rest = bytes;
    loop {
        if rest.is_empty() {
            return Ok(None);
        }
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no end of head")?;
        let head = std::str::from_utf8(&rest[..end]).map_err(|_| "head not UTF-8")?;
        rest = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or(format!("bad status line {status_line:?}"))?;
        if (100..200).contains(&status) {
            continue;
        }
        let header = |name: &str| {
            head.split("\r\n").skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        if head_request {
            return Ok(Some(status));
        }
        if header("Transfer-Encoding").is_some_and(|v| v.contains("chunked")) {
            let mut b = rest;
            loop {
                let nl = b
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .ok_or("chunk size line")?;
                let size = usize::from_str_radix(
                    std::str::from_utf8(&b[..nl]).map_err(|_| "size")?.trim(),
                    16,
                )
                .map_err(|_| "chunk size")?;
                b = &b[nl + 2..];
                if size == 0 {
                    return (b == b"\r\n")
                        .then_some(Some(status))
                        .ok_or("chunked trailer".into());
                }
                if b.len() < size + 2 || &b[size..size + 2] != b"\r\n" {
                    return Err("truncated chunk".into());
                }
                b = &b[size + 2..];
            }
        }
        return match header("Content-Length") {
            Some(n) if n.parse::<usize>().ok() == Some(rest.len()) => Ok(Some(status)),
            Some(n) => Err(format!("Content-Length {n} but {} bytes", rest.len())),
            None => Ok(Some(status)),
        };
    }
}

fn exchange(addr: SocketAddr, raw: &Raw) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(&raw.bytes());
    if raw.may_go_unanswered() {
        let _ = s.shutdown(Shutdown::Write); // the client gives up on its request
    }
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        // A reset after a complete answer is fine; a time-out is a hang.
        assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "no answer in 20 s to {raw:?}"
        );
    }
    out
}

#[test]
fn fuzzed_requests_get_well_formed_2xx_or_4xx_answers_and_leave_nothing_behind() {
    let cases: u32 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let cfg = ServerConfig {
        concurrency: 2,
        max_queue: 64,
        roles: Roles::open(),
        ..ServerConfig::default()
    };
    let cs = ChatStream::new(cfg, Arc::new(MockChat::new(MockMode::Echo, Duration::ZERO)));
    let limits = ConnLimits {
        head_timeout: Duration::from_secs(2),
        body_timeout: Duration::from_secs(2),
        ..ConnLimits::default()
    };
    let h = bind("127.0.0.1:0", limits)
        .unwrap()
        .serve(Arc::clone(&cs))
        .unwrap();
    let addr = h.addr;
    let counts: Mutex<BTreeMap<String, usize>> = Mutex::default();
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(raw in raw())| {
        let reply = exchange(addr, &raw);
        let status = parse_response(&reply, raw.method == "HEAD")
            .map_err(|e| TestCaseError::fail(format!("{e}: {:?}", String::from_utf8_lossy(&reply))))?;
        let key = match status {
            None => {
                prop_assert!(raw.may_go_unanswered(), "no answer to a complete request: {:?}", raw);
                "none".to_string()
            }
            Some(status) => {
                prop_assert!((200..500).contains(&status), "status {} for {:?}", status, raw);
                status.to_string()
            }
        };
        *counts.lock().unwrap().entry(key).or_default() += 1;
    });
    println!(
        "{cases} fuzzed requests, answers by status: {:?}",
        counts.lock().unwrap()
    );

    // Still serving, and nothing left behind.
    assert_eq!(request(addr, "GET", "/health", &[], b"").status, 200);
    let t = Instant::now();
    while cs.pool.load().processing + cs.pool.load().waiting > 0 || h.guard.connections() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "load {:?}, {} connections",
            cs.pool.load(),
            h.guard.connections()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert!(m.contains("outcome=\"unknown_error_occurred\"} 0"), "{m}");
}
