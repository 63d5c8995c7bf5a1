//! Security checks over real sockets: the role layer on every route (a table over every API
//! name × every role, so a new route that skips it fails here), CORS answering only
//! configured origins and never `*` with credentials, no path escaping the embedded static
//! files, forged or unknown session ids getting a fresh session (never someone else's), and
//! a flood of new sessions held at `max_sessions` with memory bounded.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatstream::server::model::{MockChat, MockMode};
use chatstream::server::roles::{Roles, API_NAMES};
use chatstream::server::{ServerConfig, ROUTES};
use common::client::{chat, request, TestServer};
use serde_json::{json, Map, Value};

/// The flood test measures the whole process's memory: the tests here run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn echo() -> Arc<MockChat> {
    Arc::new(MockChat::new(MockMode::Echo, Duration::ZERO))
}

/// APIs outside the role layer, by design: probes, and the OpenAI API (its own API key).
const OUTSIDE_ROLES: &[&str] = &["health", "ready", "openai_chat", "openai_models"];

#[test]
fn every_route_is_under_the_role_layer_for_every_role() {
    let _serial = serial();
    // One program role per API name, each allowed that API only, plus one allowed nothing.
    let mut roles = Map::new();
    for api in API_NAMES {
        roles.insert(
            format!("only_{api}"),
            json!({"apis": {"allow": [api], "auth_method": "header_phrase", "header_phrase": format!("phrase-{api}"), "use_session": false}}),
        );
    }
    roles.insert(
        "nothing".into(),
        json!({"apis": {"allow": [], "auth_method": "header_phrase", "header_phrase": "phrase-none", "use_session": false}}),
    );
    let cfg = ServerConfig {
        roles: Roles::from_json(&Value::Object(roles)).unwrap(),
        ..ServerConfig::default()
    };
    let s = TestServer::start(cfg, echo());
    // A program's request without a header phrase.
    let without_phrase = |method: &str, path: &str| {
        request(
            s.addr,
            method,
            path,
            &[("X-FastSession-Skip", "skip")],
            b"{}",
        )
    };
    let mut checked = 0;
    for (path, method, api) in ROUTES {
        if OUTSIDE_ROLES.contains(api) {
            continue;
        }
        assert!(
            API_NAMES.contains(api),
            "route {path} has API name {api} that no role can name"
        );
        let phrases = API_NAMES.iter().map(|a| (*a, format!("phrase-{a}")));
        for (role_api, phrase) in phrases.chain([("", "phrase-none".to_string())]) {
            let headers = [
                ("X-FastSession-Skip", "skip"),
                ("X-ChatStream-Auth-Header", phrase.as_str()),
            ];
            let r = request(s.addr, method.as_str(), path, &headers, b"{}");
            if role_api == *api {
                assert_ne!(r.status, 403, "{path} denied to the role allowed {api}");
            } else {
                assert_eq!(
                    r.status, 403,
                    "{path} ({api}) open to the role allowed {role_api:?}"
                );
                assert_eq!(r.json()["detail"], "Denied on role layer.");
            }
            checked += 1;
        }
        // No phrase, or a wrong one: no program role at all.
        let r = without_phrase(method.as_str(), path);
        assert_eq!(r.status, 403, "{path} open without a role");
        let wrong = [
            ("X-FastSession-Skip", "skip"),
            ("X-ChatStream-Auth-Header", "phrase-chat"),
        ];
        assert_eq!(
            request(s.addr, method.as_str(), path, &wrong, b"{}").status,
            403
        );
    }
    assert!(checked >= API_NAMES.len() * API_NAMES.len(), "{checked}");
    for api in OUTSIDE_ROLES {
        let (path, method, _) = ROUTES.iter().find(|r| r.2 == *api).unwrap();
        let r = without_phrase(method.as_str(), path);
        assert_ne!(r.status, 403, "{path}");
    }
}

#[test]
fn cors_answers_configured_origins_and_never_a_wildcard_with_credentials() {
    let _serial = serial();
    let cfg = ServerConfig {
        roles: Roles::open(),
        cors_origins: vec!["https://app.example".into(), "*".into()],
        ..ServerConfig::default()
    };
    let s = TestServer::start(cfg, echo());
    let get = |origin: &str| request(s.addr, "GET", "/health", &[("Origin", origin)], b"");
    let listed = get("https://app.example");
    assert_eq!(
        listed.header("Access-Control-Allow-Origin"),
        Some("https://app.example")
    );
    assert_eq!(
        listed.header("Access-Control-Allow-Credentials"),
        Some("true")
    );
    let other = get("https://evil.example");
    assert_eq!(other.header("Access-Control-Allow-Origin"), Some("*"));
    assert_eq!(other.header("Access-Control-Allow-Credentials"), None);

    let only_listed = ServerConfig {
        roles: Roles::open(),
        cors_origins: vec!["https://app.example".into()],
        ..ServerConfig::default()
    };
    let s = TestServer::start(only_listed, echo());
    let r = request(
        s.addr,
        "GET",
        "/health",
        &[("Origin", "https://evil.example")],
        b"",
    );
    assert_eq!(r.header("Access-Control-Allow-Origin"), None);
    let pre = request(
        s.addr,
        "OPTIONS",
        "/chat_stream",
        &[("Origin", "https://evil.example")],
        b"",
    );
    assert_eq!(pre.status, 403);
}

#[test]
fn no_path_reaches_outside_the_embedded_static_files() {
    let _serial = serial();
    let cfg = ServerConfig {
        roles: Roles::open(),
        ..ServerConfig::default()
    };
    let s = TestServer::start(cfg, echo());
    for path in [
        "/../Cargo.toml",
        "/chatstream.js/../../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/..%2fCargo.toml",
        "/index.html/..",
        "/ui/index.html",
        "/src/main.rs",
        "//etc/passwd",
        "/chatstream.js%00.html",
    ] {
        let r = request(s.addr, "GET", path, &[], b"");
        assert_eq!(r.status, 404, "{path}: {}", r.text());
    }
    let js = request(s.addr, "GET", "/chatstream.js?../../Cargo.toml", &[], b"");
    assert!(!js.text().contains("[package]"));
}

#[test]
fn a_forged_or_unknown_sid_gets_a_fresh_session_never_someone_elses() {
    let _serial = serial();
    let cfg = ServerConfig {
        roles: Roles::open(),
        ..ServerConfig::default()
    };
    let s = TestServer::start(cfg, echo());
    let alice = chat(s.addr, None, &json!({"user_input": "alice-secret"}));
    let alice_cookie = alice.cookie().unwrap();
    let alice_sid = alice_cookie.trim_start_matches("sid=").to_string();
    for forged in [
        "sid=00000000000000000000000000000000".to_string(),
        format!("sid={}", &alice_sid[..31]),
        format!("sid={}0", alice_sid),
        format!("sid={}", alice_sid.to_uppercase()),
        "sid=".to_string(),
        "sid=../../etc".to_string(),
    ] {
        let r = chat(s.addr, Some(&forged), &json!({"user_input": "mallory"}));
        let new = r.cookie().expect("a fresh session");
        assert_ne!(new, alice_cookie);
        assert_ne!(new, forged);
        let p = request(s.addr, "GET", "/get_prompt", &[("Cookie", &new)], b"").json()["prompt"]
            .to_string();
        assert!(
            !p.contains("alice-secret") && p.contains("mallory"),
            "{forged}: {p}"
        );
    }
    let p = request(
        s.addr,
        "GET",
        "/get_prompt",
        &[("Cookie", &alice_cookie)],
        b"",
    )
    .json()["prompt"]
        .to_string();
    assert!(p.contains("alice-secret") && !p.contains("mallory"));
}

fn rss_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_flood_of_new_sessions_stays_at_max_sessions_with_memory_bounded() {
    let _serial = serial();
    let cfg = ServerConfig {
        roles: Roles::open(),
        max_sessions: 500,
        concurrency: 4,
        max_queue: 64,
        ..ServerConfig::default()
    };
    let s = TestServer::start(cfg, echo());
    let flood = |n: usize| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let addr = s.addr;
                std::thread::spawn(move || {
                    for _ in 0..n / 4 {
                        let r = chat(addr, None, &json!({"user_input": "hi"}));
                        assert!(r.cookie().is_some());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    };
    // `scripts/soak.sh` sends 100,000; the store itself is flooded with 100,000 in its unit test.
    let n: usize = std::env::var("FLOOD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000);
    // The first half warms up threads and allocator arenas; the second must not grow memory.
    flood(n / 2);
    assert_eq!(s.cs.sessions.len(), 500);
    let before = rss_kib();
    flood(n - n / 2);
    let after = rss_kib();
    assert_eq!(s.cs.sessions.len(), 500);
    println!("{n} new sessions, max 500: RSS {before} KiB after half, {after} KiB at the end");
    assert!(after <= before + before / 10, "RSS {before} -> {after} KiB");
}
