//! ChatStream's HTTP API over real sockets on 127.0.0.1:0, against the mock model (and one
//! test on the real default model): every endpoint's happy and error paths, admission, the
//! four finish outcomes, sessions, and bad input.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatstream::server::model::{
    ChatModel, ChatWorker, GenParams, GenStats, MockChat, MockMode, ModelChat,
};
use chatstream::server::roles::Roles;
use chatstream::server::{FinishOutcome, ServerConfig};
use chatstream::SamplingParams;
use common::client::{self, chat, final_answer, request, TestServer};
use serde_json::json;

/// A configuration whose roles allow every API (the role layer has its own tests).
fn cfg(concurrency: usize, max_queue: usize, max_new_tokens: usize) -> ServerConfig {
    ServerConfig {
        concurrency,
        max_queue,
        roles: Roles::open(),
        default_params: GenParams {
            sampling: SamplingParams::default(),
            max_new_tokens,
            stop: vec![],
        },
        ..ServerConfig::default()
    }
}

fn mock(mode: MockMode, delay_ms: u64) -> Arc<dyn ChatModel> {
    Arc::new(MockChat::new(mode, Duration::from_millis(delay_ms)))
}

#[test]
fn chat_stream_streams_chatstream_chunks_and_keeps_history() {
    let s = TestServer::start(cfg(2, 5, 64), mock(MockMode::Round, 1));
    let r = chat(s.addr, None, &json!({"user_input": "hello"}));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/plain; charset=utf-8"));
    assert!(r
        .header("X-ChatStream-Last-Generated-Message-Id")
        .is_some_and(|id| id.len() == 32));
    let set_cookie = r.header("Set-Cookie").unwrap();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"),
        "{set_cookie}"
    );
    let body = r.text();
    let chunks: Vec<&str> = body.split_inclusive("<::EOS::>").collect();
    assert!(chunks.len() > 3 && chunks.iter().all(|c| c.ends_with("<::EOS::>")));
    // each chunk is the whole answer so far
    for w in chunks.windows(2) {
        assert!(w[1].starts_with(w[0].trim_end_matches("<::EOS::>")));
    }
    assert_eq!(
        final_answer(&body),
        "Hello! I am a mock model. こんにちは 🌊"
    );

    let cookie = r.cookie().unwrap();
    let r2 = chat(
        s.addr,
        Some(&cookie),
        &json!({"user_input": "again", "stream": "delta"}),
    );
    assert!(
        r2.header("Set-Cookie").is_none(),
        "an existing session keeps its cookie"
    );
    let delta: String = r2.text().split("<::EOS::>").collect();
    assert_eq!(delta, "This answer streams one word at a time.");

    let p = request(s.addr, "GET", "/get_prompt", &[("Cookie", &cookie)], b"").json();
    let prompt = p["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("User%3A%20hello") && prompt.contains("User%3A%20again"),
        "{prompt}"
    );
    s.wait_idle();
    assert_eq!(s.outcomes(), vec![FinishOutcome::Success; 2]);
}

#[test]
fn admission_streams_seven_and_refuses_two_at_once() {
    for status in [200u16, 429] {
        let s = TestServer::start(
            ServerConfig {
                too_many_requests_status: status,
                ..cfg(2, 5, 6)
            },
            mock(MockMode::Long, 100),
        );
        let addr = s.addr;
        let handles: Vec<_> = (0..9)
            .map(|_| {
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let st =
                        client::open(addr, "POST", "/chat_stream", &[], br#"{"user_input":"hi"}"#);
                    let head_at = started.elapsed();
                    (head_at, st.finish())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let refused: Vec<_> = results
            .iter()
            .filter(|(_, r)| r.header("Retry-After").is_some())
            .collect();
        let streamed = results
            .iter()
            .filter(|(_, r)| r.text().ends_with("<::EOS::>"))
            .count();
        assert_eq!((streamed, refused.len()), (7, 2), "status {status}");
        for (at, r) in refused {
            assert_eq!(r.status, status);
            assert_eq!(r.json(), json!({"error": "too_many_requests"}));
            assert!(*at < Duration::from_millis(500), "refusal took {at:?}");
        }
        s.wait_idle();
        assert_eq!(s.outcomes().len(), 7, "one callback per admitted request");
        assert!(s.outcomes().iter().all(|o| *o == FinishOutcome::Success));
    }
}

#[test]
fn get_load_reports_true_numbers() {
    let s = TestServer::start(cfg(1, 3, 50), mock(MockMode::Long, 50));
    let addr = s.addr;
    let running = client::open(addr, "POST", "/chat_stream", &[], br#"{"user_input":"a"}"#);
    let queued: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                client::open(addr, "POST", "/chat_stream", &[], br#"{"user_input":"b"}"#).finish()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let load = request(addr, "GET", "/get_load", &[], b"").json();
    assert_eq!(
        load,
        json!({"chatstream_workers": [{"name": "node:0", "processing": 1, "waiting": 2, "max_processing": 1, "max_waiting": 3}]})
    );
    drop(running);
    for q in queued {
        q.join().unwrap();
    }
    s.wait_idle();
    let load = request(addr, "GET", "/get_load", &[], b"").json();
    assert_eq!(
        (
            load["chatstream_workers"][0]["processing"].as_u64(),
            load["chatstream_workers"][0]["waiting"].as_u64()
        ),
        (Some(0), Some(0))
    );
}

#[test]
fn a_client_closing_mid_stream_frees_its_worker_for_the_next() {
    let s = TestServer::start(cfg(1, 1, 200), mock(MockMode::Long, 40));
    let addr = s.addr;
    let mut first = client::open(addr, "POST", "/chat_stream", &[], br#"{"user_input":"a"}"#);
    let cookie = first
        .header("Set-Cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    first.next_chunk().unwrap();
    let waiting = std::thread::spawn(move || {
        let mut st = client::open(addr, "POST", "/chat_stream", &[], br#"{"user_input":"b"}"#);
        st.next_chunk().unwrap();
        Instant::now()
    });
    std::thread::sleep(Duration::from_millis(200));
    let closed_at = Instant::now();
    drop(first);
    let started_at = waiting.join().unwrap();
    // 200 words at 40 ms would hold the worker 8 s; it is free within a few word steps.
    let gap = started_at.duration_since(closed_at);
    assert!(
        gap < Duration::from_millis(1000),
        "the waiting request started {gap:?} after the close"
    );
    s.wait_idle();
    let o = s.outcomes();
    assert_eq!(
        o.iter()
            .filter(|&&x| x == FinishOutcome::ClientDisconnectedWhileStreaming)
            .count(),
        2,
        "{o:?}"
    );
    // the cut answer stays in the history as far as it was sent
    let prompt = request(addr, "GET", "/get_prompt", &[("Cookie", &cookie)], b"").json()["prompt"]
        .to_string();
    assert!(prompt.contains("Assistant%3A%20The%20quick"), "{prompt}");
}

#[test]
fn a_client_leaving_while_queued_gets_no_generation() {
    let s = TestServer::start(cfg(1, 1, 8), mock(MockMode::Long, 50));
    let addr = s.addr;
    let first = std::thread::spawn(move || chat(addr, None, &json!({"user_input": "a"})));
    std::thread::sleep(Duration::from_millis(100));
    let mut leaver = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut leaver, b"POST /chat_stream HTTP/1.1\r\nHost: t\r\nContent-Length: 18\r\n\r\n{\"user_input\":\"b\"}").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(leaver);
    let r = first.join().unwrap();
    assert_eq!(final_answer(&r.text()).split_whitespace().count(), 8);
    s.wait_idle();
    let o = s.outcomes();
    assert_eq!(
        o,
        vec![
            FinishOutcome::Success,
            FinishOutcome::ClientDisconnectedBeforeStreaming
        ]
    );
}

/// A model whose generation fails after one piece.
struct Failing;
struct FailingWorker;
impl ChatModel for Failing {
    fn name(&self) -> String {
        "failing".into()
    }
    fn device(&self) -> String {
        "none".into()
    }
    fn render(&self, m: &[chatstream::ChatMessage]) -> Result<String, String> {
        Ok(m.iter().map(|m| m.content.as_str()).collect())
    }
    fn count_tokens(&self, p: &str) -> Result<usize, String> {
        Ok(p.len())
    }
    fn new_worker(&self) -> Box<dyn ChatWorker> {
        Box::new(FailingWorker)
    }
}
impl ChatWorker for FailingWorker {
    fn generate(
        &mut self,
        prompt: &str,
        _: &GenParams,
        _: Option<&str>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats, String> {
        if prompt.contains("panic") {
            panic!("injected panic");
        }
        on_text("partial");
        Err("injected failure".into())
    }
}

#[test]
fn a_failing_or_panicking_generation_is_unknown_error_once_and_the_worker_survives() {
    let s = TestServer::start(cfg(1, 1, 8), Arc::new(Failing));
    let r = chat(s.addr, None, &json!({"user_input": "x"}));
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("[error: injected failure]"),
        "{}",
        r.text()
    );
    let cookie = r.cookie().unwrap();
    // a panic mid-turn still frees the slot and unlocks the session
    let r = chat(s.addr, Some(&cookie), &json!({"user_input": "panic"}));
    assert_eq!(r.status, 200);
    s.wait_idle();
    let r = chat(s.addr, Some(&cookie), &json!({"user_input": "y"}));
    assert_eq!(r.status, 200, "the session is not left locked");
    s.wait_idle();
    assert_eq!(s.outcomes(), vec![FinishOutcome::UnknownErrorOccurred; 3]);
}

#[test]
fn sessions_are_isolated_and_regenerate_clear_and_conflict_work() {
    let s = TestServer::start(cfg(2, 5, 64), mock(MockMode::Echo, 1));
    let a = chat(s.addr, None, &json!({"user_input": "alpha"}));
    let b = chat(s.addr, None, &json!({"user_input": "beta"}));
    let (ca, cb) = (a.cookie().unwrap(), b.cookie().unwrap());
    assert_ne!(ca, cb);
    let pa =
        request(s.addr, "GET", "/get_prompt", &[("Cookie", &ca)], b"").json()["prompt"].to_string();
    assert!(pa.contains("alpha") && !pa.contains("beta"));

    // regenerate replaces the last answer under a new message id
    let again = chat(s.addr, Some(&ca), &json!({"regenerate": true}));
    assert_eq!(final_answer(&again.text()), "alpha");
    assert_ne!(
        again.header("X-ChatStream-Last-Generated-Message-Id"),
        a.header("X-ChatStream-Last-Generated-Message-Id")
    );
    let pa =
        request(s.addr, "GET", "/get_prompt", &[("Cookie", &ca)], b"").json()["prompt"].to_string();
    assert_eq!(
        pa.matches("alpha").count(),
        2,
        "one user message and one answer: {pa}"
    );

    // clear, then regenerate has nothing to work on
    let r = request(s.addr, "POST", "/clear_context", &[("Cookie", &ca)], b"");
    assert_eq!(
        r.json(),
        json!({"success": true, "message": "Context successfully cleared"})
    );
    let r = chat(s.addr, Some(&ca), &json!({"regenerate": true}));
    assert_eq!(r.status, 400);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("history is empty"));

    // a forged sid gets a fresh session, not someone else's
    let forged = chat(s.addr, Some("sid=0000"), &json!({"user_input": "gamma"}));
    assert!(forged.cookie().is_some_and(|c| c != "sid=0000"));

    // a second turn while one runs in the same session is a 409
    let slow = TestServer::start(cfg(2, 5, 40), mock(MockMode::Long, 30));
    let first = chat(
        slow.addr,
        None,
        &json!({"user_input": "x", "stream": "delta"}),
    );
    let cookie = first.cookie().unwrap();
    let addr = slow.addr;
    let c2 = cookie.clone();
    let running =
        std::thread::spawn(move || chat(addr, Some(&c2), &json!({"user_input": "long one"})));
    std::thread::sleep(Duration::from_millis(150));
    let conflict = chat(
        slow.addr,
        Some(&cookie),
        &json!({"user_input": "meanwhile"}),
    );
    assert_eq!(conflict.status, 409, "{}", conflict.text());
    assert_eq!(running.join().unwrap().status, 200);
}

#[test]
fn generation_params_merge_and_validate() {
    let s = TestServer::start(cfg(1, 1, 64), mock(MockMode::Echo, 1));
    let r = request(
        s.addr,
        "POST",
        "/set_generation_params",
        &[],
        br#"{"temperature": 0.7}"#,
    );
    assert_eq!(r.status, 200);
    let cookie = r.cookie().unwrap();
    let r = request(
        s.addr,
        "POST",
        "/set_generation_params",
        &[("Cookie", &cookie)],
        br#"{"top_k": 40}"#,
    );
    assert_eq!(r.status, 200);
    let params_of = |cookie: &str| {
        request(
            s.addr,
            "GET",
            "/get_generation_params",
            &[("Cookie", cookie)],
            b"",
        )
        .json()
    };
    let p = params_of(&cookie);
    assert_eq!(
        (
            p["temperature"].as_f64().unwrap() as f32,
            p["top_k"].as_u64()
        ),
        (0.7, Some(40)),
        "merged, not replaced"
    );
    for (body, needle) in [
        (r#"{"top_p": 1.5}"#, "top_p must be in (0, 1], got 1.5"),
        (r#"{"temperature": "hot"}"#, "temperature must be a number"),
        (r#"{"max_new_tokens": 0}"#, "max_new_tokens must be in [1, "),
        (r#"{"bogus": 1}"#, "unknown generation parameter 'bogus'"),
        ("[1]", "body must be a JSON object"),
    ] {
        let r = request(
            s.addr,
            "POST",
            "/set_generation_params",
            &[("Cookie", &cookie)],
            body.as_bytes(),
        );
        assert_eq!(r.status, 400, "{body}");
        assert!(
            r.json()["message"].as_str().unwrap().contains(needle),
            "{body}: {}",
            r.text()
        );
    }
    let p2 = params_of(&cookie);
    assert_eq!(p, p2, "a refused update changes nothing");
    let defaults = request(s.addr, "GET", "/get_generation_params", &[], b"");
    assert!(defaults.cookie().is_none(), "reading creates no session");
    assert_eq!(s.cs.sessions.len(), 1);
}

#[test]
fn bad_input_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let s = TestServer::start(cfg(1, 1, 8), mock(MockMode::Echo, 1));
    let big = vec![b'a'; 2 << 20];
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("POST", "/chat_stream", b"not json".to_vec(), 400),
        (
            "POST",
            "/chat_stream",
            br#"{"user_input": 5}"#.to_vec(),
            400,
        ),
        (
            "POST",
            "/chat_stream",
            br#"{"regenerate": "yes"}"#.to_vec(),
            400,
        ),
        ("POST", "/chat_stream", b"{}".to_vec(), 400),
        (
            "POST",
            "/chat_stream",
            br#"{"user_input": "x", "stream": 3}"#.to_vec(),
            400,
        ),
        ("POST", "/chat_stream", big, 413),
        ("GET", "/no/such/path", vec![], 404),
        ("GET", "/chat_stream", vec![], 405),
        ("POST", "/get_load", vec![], 405),
    ];
    for (method, path, body, status) in cases {
        let r = request(s.addr, method, path, &[], &body);
        assert_eq!(r.status, status, "{method} {path}");
        assert!(r.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = chat(s.addr, None, &json!({"user_input": "still here"}));
    assert_eq!(final_answer(&r.text()), "still here");
    assert_eq!(request(s.addr, "GET", "/health", &[], b"").status, 200);
    s.wait_idle();
    assert_eq!(
        s.outcomes(),
        vec![FinishOutcome::Success],
        "refused requests get no callback"
    );
}

#[test]
fn history_that_no_longer_fits_drops_whole_oldest_turns() {
    // Mock token counts are words; 40 context - 8 new leaves 32 words of prompt.
    let s = TestServer::start(
        ServerConfig {
            context_len: 40,
            ..cfg(1, 1, 8)
        },
        mock(MockMode::Echo, 0),
    );
    let mut cookie = None;
    for i in 0..6 {
        let r = chat(
            s.addr,
            cookie.as_deref(),
            &json!({"user_input": format!("turn{i} a b c")}),
        );
        assert_eq!(r.status, 200);
        cookie = cookie.or(r.cookie());
    }
    let too_long = "w ".repeat(40);
    let r = chat(s.addr, cookie.as_deref(), &json!({"user_input": too_long}));
    assert_eq!(r.status, 400);
    let msg = r.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("at most 32 fit"), "{msg}");
}

#[test]
fn real_model_streams_the_same_answer_as_generate() {
    let golden = common::read_json(common::fixtures().join("smollm2/golden.json"));
    let conv = &golden["conversations"][0];
    let engine = common::engine(common::default_model());
    let model: Arc<dyn ChatModel> = Arc::new(ModelChat::new(engine, 1024, None));
    let s = TestServer::start(cfg(1, 1, 48), model);
    let r = chat(
        s.addr,
        None,
        &json!({"user_input": conv["messages"][0]["content"]}),
    );
    assert_eq!(
        final_answer(&r.text()),
        conv["greedy"]["text"].as_str().unwrap()
    );
    s.wait_idle();
    assert_eq!(s.outcomes(), vec![FinishOutcome::Success]);
}

#[test]
fn feedback_is_recorded_for_known_answers_only() {
    let file =
        std::env::temp_dir().join(format!("chatstream-feedback-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let s = TestServer::start(
        ServerConfig {
            feedback_file: Some(file.clone()),
            ..cfg(1, 1, 8)
        },
        mock(MockMode::Echo, 0),
    );
    let r = chat(s.addr, None, &json!({"user_input": "rate me"}));
    let (cookie, id) = (
        r.cookie().unwrap(),
        r.header("X-ChatStream-Last-Generated-Message-Id")
            .unwrap()
            .to_string(),
    );
    let send = |body: serde_json::Value| {
        request(
            s.addr,
            "POST",
            "/set_feedback",
            &[("Cookie", &cookie)],
            body.to_string().as_bytes(),
        )
    };
    let ok = send(json!({"is_like": true, "message_id": id, "form_data": {"comment": "good"}}));
    assert_eq!(
        ok.json(),
        json!({"success": true, "message": "Feedback received"})
    );
    assert_eq!(
        send(json!({"is_like": false, "message_id": "nope"})).status,
        404
    );
    assert_eq!(
        send(json!({"is_like": "yes", "message_id": id})).status,
        400
    );
    assert_eq!(send(json!({"is_like": true})).status, 400);
    let lines = std::fs::read_to_string(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let line: serde_json::Value = serde_json::from_str(lines.trim()).unwrap();
    assert_eq!(
        (
            line["is_like"].as_bool(),
            line["user"].as_str(),
            line["form_data"]["comment"].as_str()
        ),
        (Some(true), Some("rate me"), Some("good"))
    );
}

#[test]
fn resource_usage_and_metrics_report_real_numbers() {
    let s = TestServer::start(cfg(1, 0, 4), mock(MockMode::Long, 30));
    let u = request(s.addr, "GET", "/get_resource_usage", &[], b"").json();
    assert!(u["process"]["rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(
        u["host"]["memory_total_bytes"].as_u64().unwrap()
            >= u["host"]["memory_available_bytes"].as_u64().unwrap()
    );
    let addr = s.addr;
    let running = std::thread::spawn(move || chat(addr, None, &json!({"user_input": "a"})));
    std::thread::sleep(Duration::from_millis(50));
    let refused = chat(s.addr, None, &json!({"user_input": "b"}));
    assert_eq!(
        refused.json(),
        json!({"error": "too_many_requests"}),
        "max-queue 0 means no waiting room"
    );
    running.join().unwrap();
    s.wait_idle();
    let m = request(s.addr, "GET", "/metrics", &[], b"");
    assert!(m
        .header("Content-Type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = m.text();
    for line in [
        "chatstream_requests_finished_total{node=\"node:0\",outcome=\"success\"} 1",
        "chatstream_requests_rejected_total{node=\"node:0\"} 1",
        "chatstream_generated_tokens_total{node=\"node:0\"} 4",
        "chatstream_processing{node=\"node:0\"} 0",
        "chatstream_queue_wait_seconds_count{node=\"node:0\"} 1",
        "chatstream_time_to_first_token_seconds_count{node=\"node:0\"} 1",
        "chatstream_time_per_output_token_seconds_count{node=\"node:0\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn default_roles_allow_the_browser_set_and_deny_the_rest() {
    let s = TestServer::start(
        ServerConfig {
            roles: Roles::default(),
            ..cfg(1, 2, 8)
        },
        mock(MockMode::Echo, 0),
    );
    let forbidden =
        json!({"success": false, "message": "Forbidden", "detail": "Denied on role layer."});
    let r = chat(s.addr, None, &json!({"user_input": "hi"}));
    assert_eq!(final_answer(&r.text()), "hi");
    let cookie = r.cookie().unwrap();
    for (method, path) in [
        ("POST", "/clear_context"),
        ("GET", "/"),
        ("GET", "/chatstream.js"),
        ("GET", "/health"),
    ] {
        assert_eq!(
            request(s.addr, method, path, &[("Cookie", &cookie)], b"").status,
            200,
            "{path}"
        );
    }
    for (method, path) in [
        ("GET", "/get_load"),
        ("GET", "/get_prompt"),
        ("POST", "/set_generation_params"),
        ("GET", "/get_resource_usage"),
        ("GET", "/metrics"),
    ] {
        let r = request(s.addr, method, path, &[("Cookie", &cookie)], b"{}");
        assert_eq!((r.status, r.json()), (403, forbidden.clone()), "{path}");
    }
    // programs without a session have no default role here
    let r = request(
        s.addr,
        "POST",
        "/chat_stream",
        &[("X-FastSession-Skip", "skip")],
        br#"{"user_input":"x"}"#,
    );
    assert_eq!(r.status, 403);
}

#[test]
fn header_and_ui_phrases_grant_their_roles_and_wrong_ones_do_not() {
    let roles = Roles::from_json(&json!({
        "user": {"apis": {"allow": ["chat_stream", "webui_index", "webui_js"], "auth_method": "nothing", "use_session": true}},
        "admin": {"apis": {"allow": "all", "auth_method": "ui_pass_phrase_sha256",
            "ui_pass_phrase_sha256": sha256_hex("let me in"), "use_session": true, "enable_dev_tool": true}},
        "bot": {"apis": {"allow": ["chat_stream", "get_load"], "auth_method": "header_phrase_sha256",
            "header_phrase_sha256": sha256_hex("bot-secret"), "use_session": false}}
    }))
    .unwrap();
    let s = TestServer::start(
        ServerConfig {
            roles,
            ..cfg(1, 2, 8)
        },
        mock(MockMode::Echo, 0),
    );

    // header phrase: right one reaches get_load and chats without a session; wrong one does not
    let bot = [
        ("X-FastSession-Skip", "skip"),
        ("X-ChatStream-Auth-Header", "bot-secret"),
    ];
    assert_eq!(request(s.addr, "GET", "/get_load", &bot, b"").status, 200);
    let wrong = [
        ("X-FastSession-Skip", "skip"),
        ("X-ChatStream-Auth-Header", "bot-secreT"),
    ];
    assert_eq!(request(s.addr, "GET", "/get_load", &wrong, b"").status, 403);
    let before = s.cs.sessions.len();
    let r = request(
        s.addr,
        "POST",
        "/chat_stream",
        &bot,
        br#"{"user_input":"from a program"}"#,
    );
    assert_eq!(final_answer(&r.text()), "from a program");
    assert!(r.header("Set-Cookie").is_none());
    s.wait_idle();
    assert_eq!(
        s.cs.sessions.len(),
        before,
        "a program's turn leaves no session behind"
    );

    // UI pass phrase: typed as a message, answered with the grant, never kept in the history
    let r = chat(s.addr, None, &json!({"user_input": "hello"}));
    let cookie = r.cookie().unwrap();
    assert_eq!(
        request(s.addr, "GET", "/get_load", &[("Cookie", &cookie)], b"").status,
        403
    );
    let wrong = chat(s.addr, Some(&cookie), &json!({"user_input": "let me in!"}));
    assert_eq!(
        final_answer(&wrong.text()),
        "let me in!",
        "a wrong phrase is an ordinary message"
    );
    let grant = chat(s.addr, Some(&cookie), &json!({"user_input": "let me in"}));
    assert_eq!(grant.text(), "New role: 'admin' has been granted<::EOS::>");
    assert_eq!(
        grant.header("X-ChatStream-API-DevTool-Enabled"),
        Some("enabled")
    );
    assert_eq!(
        request(s.addr, "GET", "/get_load", &[("Cookie", &cookie)], b"").status,
        200
    );
    let prompt = request(s.addr, "GET", "/get_prompt", &[("Cookie", &cookie)], b"").json()
        ["prompt"]
        .to_string();
    assert!(
        !prompt.contains("let%20me%20in%22") && !prompt.ends_with("let%20me%20in\""),
        "{prompt}"
    );
    assert_eq!(
        prompt.matches("let%20me%20in").count(),
        2,
        "only the wrong phrase (asked and echoed): {prompt}"
    );
}

#[test]
fn cors_allows_listed_origins_only() {
    let cors = vec!["https://app.example".to_string()];
    let s = TestServer::start(
        ServerConfig {
            cors_origins: cors,
            ..cfg(1, 1, 4)
        },
        mock(MockMode::Echo, 0),
    );
    let good = [("Origin", "https://app.example")];
    let r = request(s.addr, "GET", "/get_load", &good, b"");
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        Some("https://app.example")
    );
    assert_eq!(r.header("Access-Control-Allow-Credentials"), Some("true"));
    let r = request(
        s.addr,
        "POST",
        "/chat_stream",
        &good,
        br#"{"user_input":"x"}"#,
    );
    assert_eq!(
        r.header("Access-Control-Allow-Origin"),
        Some("https://app.example"),
        "streams carry it too"
    );
    let r = request(s.addr, "OPTIONS", "/chat_stream", &good, b"");
    assert_eq!(r.status, 204);
    assert!(r
        .header("Access-Control-Allow-Methods")
        .unwrap()
        .contains("POST"));
    let bad = [("Origin", "https://evil.example")];
    assert!(request(s.addr, "GET", "/get_load", &bad, b"")
        .header("Access-Control-Allow-Origin")
        .is_none());
    assert_eq!(
        request(s.addr, "OPTIONS", "/chat_stream", &bad, b"").status,
        403
    );
}

fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let text = request(addr, "GET", "/metrics", &[], b"").text();
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} missing"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_sessions_next_turn_reuses_its_kv_cache_on_any_worker() {
    let engine = common::engine(common::default_model());
    let model: Arc<dyn ChatModel> = Arc::new(ModelChat::new(engine, 1024, Some(256 << 20)));
    let s = TestServer::start(cfg(2, 2, 16), model);
    let r = chat(s.addr, None, &json!({"user_input": "Name three colors."}));
    let cookie = r.cookie().unwrap();
    s.wait_idle();
    let first_prompt = metric(s.addr, "chatstream_prompt_tokens_total");
    assert_eq!(metric(s.addr, "chatstream_cached_prompt_tokens_total"), 0);
    // another session's turn in between, so the next turn may land on either worker
    chat(s.addr, None, &json!({"user_input": "Hello!"}));
    for _ in 0..2 {
        let r = chat(
            s.addr,
            Some(&cookie),
            &json!({"user_input": "And two more?"}),
        );
        assert_eq!(r.status, 200);
        s.wait_idle();
    }
    let cached = metric(s.addr, "chatstream_cached_prompt_tokens_total");
    assert!(
        cached > 2 * first_prompt,
        "cached {cached} tokens, first prompt {first_prompt}"
    );
    // a regenerate reuses everything before the last answer
    let before = metric(s.addr, "chatstream_cached_prompt_tokens_total");
    chat(s.addr, Some(&cookie), &json!({"regenerate": true}));
    s.wait_idle();
    assert!(metric(s.addr, "chatstream_cached_prompt_tokens_total") - before > first_prompt);
}

#[test]
fn a_request_that_waits_past_max_queue_wait_is_refused_and_accounted() {
    let c = ServerConfig {
        max_queue_wait: Some(Duration::from_millis(200)),
        ..cfg(1, 1, 10)
    };
    let s = TestServer::start(c, mock(MockMode::Long, 50));
    let addr = s.addr;
    let first = std::thread::spawn(move || chat(addr, None, &json!({"user_input": "a"})));
    std::thread::sleep(Duration::from_millis(50));
    let late = chat(s.addr, None, &json!({"user_input": "b"}));
    assert_eq!(late.json(), json!({"error": "too_many_requests"}));
    let retry: u64 = late.header("Retry-After").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(
        final_answer(&first.join().unwrap().text())
            .split_whitespace()
            .count(),
        10
    );
    s.wait_idle();
    assert_eq!(
        s.outcomes().len(),
        2,
        "both admitted requests reported once"
    );
    assert_eq!(metric(s.addr, "chatstream_requests_rejected_total"), 1);
}

#[test]
fn cancelling_at_shutdown_ends_running_answers_with_a_last_chunk_and_reports_them() {
    let s = TestServer::start(cfg(1, 1, 200), mock(MockMode::Long, 20));
    let addr = s.addr;
    let running = std::thread::spawn(move || chat(addr, None, &json!({"user_input": "a"})));
    std::thread::sleep(Duration::from_millis(150));
    s.cs.start_draining();
    assert_eq!(
        chat(s.addr, None, &json!({"user_input": "b"})).status,
        503,
        "no new turns while draining"
    );
    s.cs.cancel_running();
    let body = running.join().unwrap().text();
    assert!(
        body.ends_with("[cancelled: the server is shutting down]<::EOS::>"),
        "{body}"
    );
    assert!(s.cs.wait_idle(Duration::from_secs(5)));
    assert_eq!(s.outcomes(), vec![FinishOutcome::UnknownErrorOccurred]);
}
