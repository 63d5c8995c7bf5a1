//! The OpenAI-compatible API over real sockets: SSE streaming with usage, non-streamed JSON,
//! parameters and their errors in OpenAI's shape, the API key, /v1/models, and the real
//! model answering as `generate` does; the requests count in /metrics like /chat_stream's.
//! Also /ready turning 503 while draining.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatstream::server::model::{ChatModel, GenParams, MockChat, MockMode, ModelChat};
use chatstream::server::roles::Roles;
use chatstream::server::ServerConfig;
use chatstream::SamplingParams;
use common::client::{open, request, TestServer};
use serde_json::{json, Value};

fn server(api_key: Option<&str>, model: Arc<dyn ChatModel>) -> TestServer {
    let cfg = ServerConfig {
        concurrency: 1,
        max_queue: 1,
        roles: Roles::open(),
        api_key: api_key.map(str::to_string),
        default_params: GenParams {
            sampling: SamplingParams::default(),
            max_new_tokens: 32,
            stop: vec![],
        },
        ..ServerConfig::default()
    };
    TestServer::start(cfg, model)
}

fn echo() -> Arc<dyn ChatModel> {
    Arc::new(MockChat::new(MockMode::Echo, Duration::from_millis(1)))
}

fn post(s: &TestServer, key: Option<&str>, body: &Value) -> common::client::Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    request(
        s.addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string().as_bytes(),
    )
}

fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn streams_sse_chunks_with_finish_reason_usage_and_done() {
    let s = server(None, echo());
    let r = post(
        &s,
        None,
        &json!({"messages": [{"role": "user", "content": "one two three"}], "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
    assert_eq!(r.header("Cache-Control"), Some("no-cache"));
    let ev = events(&r.text());
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "one two three");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 3);
    s.wait_idle();
    let m = request(s.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        m.contains("chatstream_requests_finished_total{node=\"node:0\",outcome=\"success\"} 1"),
        "{m}"
    );
}

#[test]
fn non_streamed_answer_stop_strings_and_length() {
    let s = server(None, echo());
    let r = post(
        &s,
        None,
        &json!({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "alpha beta gamma"}]}], "stop": " gamma"}),
    );
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": "alpha beta"})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let v = post(
        &s,
        None,
        &json!({"messages": [{"role": "user", "content": "a b c d"}], "max_tokens": 2}),
    )
    .json();
    assert_eq!(
        (
            v["choices"][0]["finish_reason"].as_str(),
            v["usage"]["completion_tokens"].as_u64()
        ),
        (Some("length"), Some(2))
    );
}

#[test]
fn bad_requests_get_openai_errors_and_the_key_is_required() {
    let s = server(Some("k3y"), echo());
    let ok = json!({"messages": [{"role": "user", "content": "hi"}]});
    for key in [None, Some("wrong"), Some("k3yy")] {
        let r = post(&s, key, &ok);
        assert_eq!(r.status, 401, "{key:?}");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(request(s.addr, "GET", "/v1/models", &[], b"").status, 401);
    let models = request(
        s.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer k3y")],
        b"",
    )
    .json();
    assert_eq!(models["data"][0]["id"], "mock-echo");
    for (body, param) in [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
            "n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}),
            "presence_penalty",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "stop": 5}),
            "stop",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
            "stream",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "prompt_cache_key": 7}),
            "prompt_cache_key",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "user": "u".repeat(257)}),
            "user",
        ),
    ] {
        let r = post(&s, Some("k3y"), &body);
        assert_eq!(r.status, 400, "{body}");
        let e = &r.json()["error"];
        assert_eq!(
            (e["type"].as_str(), e["param"].as_str()),
            (Some("invalid_request_error"), Some(param)),
            "{body}"
        );
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    let r = post(
        &s,
        Some("k3y"),
        &json!({"messages": [{"role": "user", "content": "x"}], "unknown_field": 1, "top_k": 5}),
    );
    assert_eq!(r.status, 200, "unknown fields are ignored");
}

#[test]
fn ready_turns_503_while_draining() {
    let s = server(None, echo());
    assert_eq!(request(s.addr, "GET", "/ready", &[], b"").status, 200);
    s.cs.start_draining();
    assert_eq!(request(s.addr, "GET", "/ready", &[], b"").status, 503);
    assert_eq!(request(s.addr, "GET", "/health", &[], b"").status, 200);
    assert_eq!(
        post(
            &s,
            None,
            &json!({"messages": [{"role": "user", "content": "x"}]})
        )
        .status,
        503
    );
}

#[test]
fn ready_turns_503_when_no_token_comes_out_for_the_stall_timeout() {
    let cfg = ServerConfig {
        stall_timeout: Some(Duration::from_millis(300)),
        roles: Roles::open(),
        ..ServerConfig::default()
    };
    // One word after 1.5 s: a stall of the engine as /ready sees it.
    let slow = Arc::new(MockChat::new(MockMode::Echo, Duration::from_millis(1500)));
    let s = TestServer::start(cfg, slow);
    assert_eq!(request(s.addr, "GET", "/ready", &[], b"").status, 200);
    let addr = s.addr;
    let pending = std::thread::spawn(move || {
        let body = json!({"messages": [{"role": "user", "content": "x"}]}).to_string();
        request(addr, "POST", "/v1/chat/completions", &[], body.as_bytes()).status
    });
    let t = Instant::now();
    let stalled = loop {
        let r = request(s.addr, "GET", "/ready", &[], b"");
        if r.status == 503 {
            break r;
        }
        assert!(t.elapsed() < Duration::from_millis(1400), "never stalled");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(stalled.json()["status"], "stalled");
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(pending.join().unwrap(), 200);
    s.wait_idle();
    assert_eq!(request(s.addr, "GET", "/ready", &[], b"").status, 200);
}

#[test]
fn real_model_answers_as_generate_does() {
    let golden = common::read_json(common::fixtures().join("smollm2/golden.json"));
    let conv = &golden["conversations"][0];
    let engine = common::engine(common::default_model());
    let s = server(None, Arc::new(ModelChat::new(engine, 1024, Some(64 << 20))));
    let v = post(
        &s,
        None,
        &json!({"messages": conv["messages"], "max_tokens": 48, "temperature": 0}),
    )
    .json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        conv["greedy"]["text"]
    );
    assert_eq!(v["usage"]["prompt_tokens"], conv["prompt_len"]);
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{v}"
    );
    // Every token after the first came from a decode pass; alone, the worker ran each itself,
    // one row a pass.
    s.wait_idle();
    let m = request(s.addr, "GET", "/metrics", &[], b"").text();
    let counter = |name: &str| -> u64 {
        let line = format!("{name}{{node=\"node:0\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{name} missing: {m}"))
            .parse()
            .unwrap()
    };
    let rows = counter("chatstream_decode_batch_rows_total");
    assert_eq!(rows + 1, v["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(counter("chatstream_decode_batches_total"), rows);

    // The same request again: the one worker holds the prompt's keys and values, so all but
    // its last token (whose logits start the answer) come from the cache, and so does the
    // answer.
    let again = post(
        &s,
        None,
        &json!({"messages": conv["messages"], "max_tokens": 48, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}}),
    );
    let chunks: Vec<Value> = events(&again.text())
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage = &chunks.last().unwrap()["usage"];
    let prompt_len = conv["prompt_len"].as_u64().unwrap();
    assert_eq!(usage["prompt_tokens"], prompt_len, "{usage}");
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        prompt_len - 1,
        "{usage}"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, conv["greedy"]["text"].as_str().unwrap());
}

#[test]
fn a_prompt_cache_key_keeps_the_conversation_cached_while_other_requests_run() {
    let golden = common::read_json(common::fixtures().join("smollm2/golden.json"));
    let (conv, other) = (&golden["conversations"][0], &golden["conversations"][1]);
    let engine = common::engine(common::default_model());
    // room for 5 caches of 1,024 positions (45 MiB each)
    let s = server(
        None,
        Arc::new(ModelChat::new(engine, 1024, Some(256 << 20))),
    );
    let ask = |messages: &Value, key: Option<&str>| {
        let mut body = json!({"messages": messages, "max_tokens": 48, "temperature": 0});
        if let Some(k) = key {
            body["prompt_cache_key"] = json!(k);
        }
        post(&s, None, &body).json()
    };
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].clone();
    assert_eq!(cached(&ask(&conv["messages"], Some("conv-1"))), 0);
    // another conversation takes the one worker's cache meanwhile
    let v = ask(&other["messages"], None);
    assert_eq!(
        v["choices"][0]["message"]["content"],
        other["greedy"]["text"]
    );
    // the key's cache comes back from the pool: all but the prompt's last token
    let v = ask(&conv["messages"], Some("conv-1"));
    assert_eq!(cached(&v), conv["prompt_len"].as_u64().unwrap() - 1, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        conv["greedy"]["text"]
    );
    // without a prompt_cache_key, `user` is the key
    let by_user = |messages: &Value| {
        let body = json!({"messages": messages, "max_tokens": 1, "user": "u-2"});
        cached(&post(&s, None, &body).json())
    };
    by_user(&other["messages"]);
    ask(&conv["messages"], None);
    let other_len = other["prompt_len"].as_u64().unwrap();
    assert_eq!(by_user(&other["messages"]), other_len - 1);
    // with both, prompt_cache_key is the key
    let body = json!({"messages": conv["messages"], "max_tokens": 1, "user": "u-2",
        "prompt_cache_key": "conv-1"});
    let v = post(&s, None, &body).json();
    assert_eq!(cached(&v), conv["prompt_len"].as_u64().unwrap() - 1, "{v}");
}

#[test]
fn a_queued_stream_is_pinged_with_its_place_and_dropped_at_once_when_its_client_leaves() {
    let cfg = ServerConfig {
        concurrency: 1,
        max_queue: 2,
        roles: Roles::open(),
        ..ServerConfig::default()
    };
    let long = Arc::new(MockChat::new(MockMode::Long, Duration::from_millis(20)));
    let s = TestServer::start(cfg, long);
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 250})
            .to_string();
    let open = || open(s.addr, "POST", "/v1/chat/completions", &[], body.as_bytes());
    let mut busy = open();
    let first = String::from_utf8(busy.next_chunk().unwrap()).unwrap();
    assert!(first.contains("\"role\":\"assistant\""), "{first}");
    let mut second = open();
    assert_eq!(second.status, 200);
    assert_eq!(second.header("X-Accel-Buffering"), Some("no"));
    let ping = String::from_utf8(second.next_chunk().unwrap()).unwrap();
    assert_eq!(ping, ": queue position 1\n\n");
    let mut third = open();
    let ping = String::from_utf8(third.next_chunk().unwrap()).unwrap();
    assert_eq!(ping, ": queue position 2\n\n");

    // The second client leaves: its place is freed while the first answer still runs.
    drop(second);
    let t = Instant::now();
    while s.cs.pool.load().waiting != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the queued client was not dropped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.cs.pool.load().processing, 1);
    // Reported just after its place is freed.
    let reported = (0..100).any(|_| {
        let m = request(s.addr, "GET", "/metrics", &[], b"").text();
        std::thread::sleep(Duration::from_millis(10));
        m.contains("outcome=\"client_disconnected_before_streaming\"} 1")
    });
    assert!(reported);
    // The third moves up, then streams its answer once the first is done.
    let moved_up = std::iter::from_fn(|| third.next_chunk())
        .map(|c| String::from_utf8(c).unwrap())
        .take_while(|c| c.starts_with(':'))
        .any(|c| c == ": queue position 1\n\n");
    assert!(moved_up);
    let rest = third.finish().text();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    busy.finish();
    s.wait_idle();
    let metrics = request(s.addr, "GET", "/metrics", &[], b"").text();
    // The dropped request never reached the one worker (it was busy all along).
    assert!(metrics.contains("outcome=\"success\"} 2"), "{metrics}");
    assert!(metrics.contains("outcome=\"client_disconnected_before_streaming\"} 1"));
}

/// Parses an SSE body as the spec says: events end at a blank line; `data:` lines of one
/// event join with newlines; comment lines (`:`) are ignored.
fn sse_data(body: &str) -> Vec<String> {
    let mut events = Vec::new();
    for block in body.split("\n\n").filter(|b| !b.is_empty()) {
        let data: Vec<&str> = block
            .lines()
            .filter(|l| !l.starts_with(':'))
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|v| v.strip_prefix(' ').unwrap_or(v))
            .collect();
        if !data.is_empty() {
            events.push(data.join("\n"));
        }
    }
    events
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(40))]
    #[test]
    fn sse_framing_round_trips_any_text(words in proptest::collection::vec(
        "(data:|\\[DONE\\]|[a-z\"\\\\:{}é🌊\\t]{1,8})", 1..12)) {
        let s = server(None, echo());
        let text = words.join(" ");
        let r = post(&s, None, &json!({"messages": [{"role": "user", "content": text}], "stream": true}));
        let events = sse_data(&r.text());
        proptest::prop_assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let mut got = String::new();
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e).unwrap();
            got += v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        }
        proptest::prop_assert_eq!(got, text);
    }
}
