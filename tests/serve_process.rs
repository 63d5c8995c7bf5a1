//! The real binary as an operator runs it (`chatstream serve`, a child process): the real
//! `openai` Python SDK and `prometheus_client`'s parser against `--mock` and against the
//! default model (`tests/python/sdk_check.py`), /health and /ready while the model loads,
//! and SIGTERM draining running answers, finishing them or cutting them at `--drain-timeout`
//! with a final event, then exiting 0.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::{completions, open, request};
use common::process::{Served, TempPath};
use serde_json::json;

/// The Python that has `openai` and `prometheus_client` (scripts/test.sh makes it).
fn python() -> PathBuf {
    let p = std::env::var_os("CHATSTREAM_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} is missing: scripts/test.sh makes a venv with openai and prometheus_client",
        p.display()
    );
    p
}

const KEY: &str = "sk-test-key";
const SCRAPE: &str = "scrape-phrase";

/// Serves with an API key and a roles file that lets a scraper (header phrase) read /metrics.
fn serve_for_sdk(extra: &[&str]) -> (Served, TempPath) {
    let roles = TempPath::write(
        "roles.json",
        &json!({
            "user": {"apis": {"allow": ["chat_stream"], "auth_method": "nothing", "use_session": true}},
            "scraper": {"apis": {"allow": ["metrics"], "auth_method": "header_phrase", "header_phrase": SCRAPE, "use_session": false}}
        })
        .to_string(),
    );
    let mut args = vec!["--api-key", KEY, "--roles", roles.as_str()];
    args.extend(extra);
    (Served::start(&args), roles)
}

fn run_sdk_check(s: &Served, mode: &str) {
    let out = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_check.py"))
        .args([&format!("http://{}", s.addr), KEY, SCRAPE, mode])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "sdk_check.py {mode} failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
}

#[test]
fn openai_sdk_and_prometheus_parser_against_mock() {
    let (s, _roles) = serve_for_sdk(&["--mock", "echo", "--mock-token-delay-ms", "1"]);
    run_sdk_check(&s, "mock");
}

#[test]
fn openai_sdk_and_prometheus_parser_against_the_real_model() {
    let model = common::default_model();
    let (s, _roles) = serve_for_sdk(&["--model", model.to_str().unwrap(), "--context-len", "512"]);
    run_sdk_check(&s, "real");
}

fn sse_body(max_tokens: usize) -> Vec<u8> {
    json!({"messages": [{"role": "user", "content": "go"}], "stream": true, "max_tokens": max_tokens})
        .to_string()
        .into_bytes()
}

/// A `--mock long` server with two SSE answers of `tokens` running (their first event read).
fn two_running_answers(
    delay_ms: &str,
    drain_timeout: &str,
    tokens: usize,
) -> (Served, Vec<common::client::Stream>) {
    let s = Served::start(&[
        "--mock",
        "long",
        "--mock-token-delay-ms",
        delay_ms,
        "--concurrency",
        "2",
        "--drain-timeout",
        drain_timeout,
    ]);
    let body = sse_body(tokens);
    let mut running: Vec<_> = (0..2)
        .map(|_| open(s.addr, "POST", "/v1/chat/completions", &[], &body))
        .collect();
    for r in &mut running {
        assert!(r.next_chunk().is_some());
    }
    (s, running)
}

#[test]
fn sigterm_lets_running_answers_finish_refuses_new_ones_and_exits_0() {
    let (mut s, running) = two_running_answers("10", "30", 150);
    let body = sse_body(150);
    s.sigterm();
    let t = Instant::now();
    loop {
        let r = request(s.addr, "GET", "/ready", &[], b"");
        if r.status == 503 {
            assert_eq!(r.json()["status"], "draining");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "/ready did not turn 503"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = request(s.addr, "POST", "/v1/chat/completions", &[], &body);
    assert_eq!(refused.status, 503);
    assert!(refused.header("Retry-After").is_some());
    for r in running {
        let text = r.finish().text();
        assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
    let log = s.log();
    assert_eq!(log.matches("outcome=success").count(), 2, "{log}");
    assert!(log.contains("every request accounted for"), "{log}");
}

#[test]
fn sigterm_past_the_drain_timeout_cuts_answers_with_a_final_event_and_exits_0() {
    let (mut s, running) = two_running_answers("20", "1", 1000);
    let t = Instant::now();
    s.sigterm();
    for r in running {
        let text = r.finish().text();
        assert!(
            text.contains("cancelled: the server is shutting down"),
            "{text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(8));
    let log = s.log();
    assert_eq!(
        log.matches("outcome=unknown_error_occurred").count(),
        2,
        "{log}"
    );
}

#[test]
fn health_answers_and_ready_says_loading_before_the_model_is_in() {
    let listener = chatstream::server::bind("127.0.0.1:0", Default::default()).unwrap();
    let addr = listener.addr;
    assert_eq!(request(addr, "GET", "/health", &[], b"").status, 200);
    let ready = request(addr, "GET", "/ready", &[], b"");
    assert_eq!(
        (ready.status, ready.json()["status"].clone()),
        (503, json!("loading"))
    );
    let chat = request(addr, "POST", "/v1/chat/completions", &[], &sse_body(5));
    assert_eq!(chat.status, 503);
    assert!(chat.header("Retry-After").is_some());
    let model = Arc::new(chatstream::server::model::MockChat::new(
        chatstream::server::model::MockMode::Echo,
        Duration::from_millis(1),
    ));
    let cs = chatstream::server::ChatStream::new(Default::default(), model);
    let handle = listener.serve(cs).unwrap();
    assert_eq!(request(addr, "GET", "/ready", &[], b"").status, 200);
    handle.shutdown();
}

#[test]
fn secrets_never_reach_the_log_or_the_prompt() {
    let (ui, hdr, key, wrong) = (
        "ui-secret-4e1f",
        "hdr-secret-9a7c",
        "sk-secret-77d2",
        "sk-wrong-5b3e",
    );
    let roles = TempPath::write(
        "secret-roles.json",
        &json!({
            "user": {"apis": {"allow": ["chat_stream", "get_prompt"], "auth_method": "nothing", "use_session": true}},
            "admin": {"apis": {"allow": "all", "auth_method": "ui_pass_phrase", "ui_pass_phrase": ui, "use_session": true}},
            "bot": {"apis": {"allow": ["chat_stream"], "auth_method": "header_phrase", "header_phrase": hdr, "use_session": false}}
        })
        .to_string(),
    );
    let mut s = Served::start(&[
        "--mock",
        "echo",
        "--mock-token-delay-ms",
        "1",
        "--api-key",
        key,
        "--roles",
        roles.as_str(),
    ]);
    let chat = |cookie: Option<&str>, text: &str| {
        let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
        let body = json!({"user_input": text}).to_string();
        request(s.addr, "POST", "/chat_stream", &headers, body.as_bytes())
    };
    let first = chat(None, "hello");
    let cookie = first.cookie().unwrap();
    let granted = chat(Some(&cookie), ui).text();
    assert!(granted.contains("'admin' has been granted"), "{granted}");
    chat(Some(&cookie), "after the grant");
    let prompt = request(s.addr, "GET", "/get_prompt", &[("Cookie", &cookie)], b"").json()
        ["prompt"]
        .to_string();
    assert!(prompt.contains("after") && !prompt.contains(ui), "{prompt}");
    let bot = [
        ("X-FastSession-Skip", "skip"),
        ("X-ChatStream-Auth-Header", hdr),
    ];
    let body = json!({"user_input": "from the bot"}).to_string();
    assert_eq!(
        request(s.addr, "POST", "/chat_stream", &bot, body.as_bytes()).status,
        200
    );
    let bad = [
        ("X-FastSession-Skip", "skip"),
        ("X-ChatStream-Auth-Header", wrong),
    ];
    assert_eq!(
        request(s.addr, "POST", "/chat_stream", &bad, body.as_bytes()).status,
        403
    );
    let v1 = json!({"messages": [{"role": "user", "content": "x"}]});
    let auth = format!("Bearer {key}");
    assert_eq!(
        completions(s.addr, &[("Authorization", &auth)], &v1).status,
        200
    );
    let auth = format!("Bearer {wrong}");
    assert_eq!(
        completions(s.addr, &[("Authorization", &auth)], &v1).status,
        401
    );
    s.sigterm();
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
    let log = s.log();
    assert!(log.contains("outcome=success"), "{log}");
    for secret in [ui, hdr, key, wrong] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// `chatstream bench --url` against a server with the default roles (which deny programs
/// every ChatStream API) and an API key: every chat is answered at the asked length, and
/// a wrong key is reported as errors, not as speed.
#[test]
fn bench_url_load_tests_a_running_server() {
    let s = Served::start(&["--mock", "long", "--api-key", "k3y", "--concurrency", "2"]);
    let bench = |key: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_chatstream"))
            .args(["bench", "--url", &s.addr.to_string(), "--levels", "1,3"])
            .args(["--rounds", "2", "--decode-tokens", "7", "--api-key", key])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let levels = bench("k3y");
    assert_eq!(levels.len(), 2);
    for (v, n) in levels.iter().zip([1, 3]) {
        assert_eq!(v["concurrency"], n, "{v}");
        assert_eq!(v["errors"], 0, "{v}");
        assert_eq!(v["chats"], 2 * n, "{v}");
        assert_eq!(v["tokens"], 7 * 2 * n, "{v}");
        assert!(v["aggregate_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(
            v["aggregate_decode_tokens_per_s"].as_f64().unwrap() > 0.0,
            "{v}"
        );
        assert!(v["ttft_p50_s"].as_f64().is_some(), "{v}");
    }
    let refused = bench("wrong");
    assert_eq!(refused[0]["chats"], 0);
    assert_eq!(refused[0]["errors"], 2);
    assert!(
        refused[0]["first_error"].as_str().unwrap().contains("401"),
        "{}",
        refused[0]
    );
}

/// `chatstream bench --url --second-turn`: the second turn finds its first turn cached
/// (under the bench's prompt_cache_key, on either worker), and the cold prompt nothing but
/// the first tokens of the chat template and of its system message at most. Times are
/// reported, not asserted.
#[test]
fn bench_url_second_turn_reports_the_cached_history_against_a_cold_prompt() {
    let model = common::default_model();
    let s = Served::start(&[
        "--model",
        model.to_str().unwrap(),
        "--concurrency",
        "2",
        "--context-len",
        "512",
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_chatstream"))
        .args([
            "bench",
            "--url",
            &s.addr.to_string(),
            "--second-turn",
            "200",
        ])
        .args(["--rounds", "2", "--decode-tokens", "8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &v["second_turn"];
    assert_eq!(t["rounds"], 2, "{v}");
    let count = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    // the notes, an answer of up to 8 tokens and the question
    assert!((200..300).contains(&count("prompt_tokens")), "{v}");
    // the first turn's prompt (all but the answer and the question, and the template's
    // markers around them) came from the cache
    assert!(count("cached_tokens") + 40 > count("prompt_tokens"), "{v}");
    assert!(count("cold_cached_tokens") < 16, "{v}");
    assert!(t["ttft_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(t["cold_ttft_s"].as_f64().unwrap() > 0.0, "{v}");
}
