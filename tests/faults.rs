//! Fault injection: a test-only wrapper model (it lives here, not in the library, so no
//! release build carries it) makes the engine fail or panic at a chosen step of a chosen
//! request. The request ends with `unknown_error_occurred` exactly once, its client gets a
//! clear end (an error chunk or SSE error event), the worker gets a fresh generator and the
//! pool keeps its size, the slot is freed, a request running beside it is unaffected, and
//! the session's history is as before the failed turn. On the real model the replaced
//! worker still gives the golden answer.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatstream::server::model::{
    ChatModel, ChatWorker, GenParams, GenStats, MockChat, MockMode, ModelChat,
};
use chatstream::server::roles::Roles;
use chatstream::server::{FinishOutcome, ServerConfig};
use chatstream::ChatMessage;
use common::client::{chat, completions, final_answer, open, request, TestServer};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Panic,
    Error,
}

/// Wraps a model; its `request`-th generation (1-based, over all workers) fails at its
/// `step`-th piece of text.
struct Faulty {
    inner: Arc<dyn ChatModel>,
    request: usize,
    step: usize,
    fault: Fault,
    started: Arc<AtomicUsize>,
}

struct FaultyWorker {
    inner: Box<dyn ChatWorker>,
    request: usize,
    step: usize,
    fault: Fault,
    started: Arc<AtomicUsize>,
}

impl ChatModel for Faulty {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn device(&self) -> String {
        self.inner.device()
    }
    fn render(&self, m: &[ChatMessage]) -> Result<String, String> {
        self.inner.render(m)
    }
    fn count_tokens(&self, p: &str) -> Result<usize, String> {
        self.inner.count_tokens(p)
    }
    fn new_worker(&self) -> Box<dyn ChatWorker> {
        Box::new(FaultyWorker {
            inner: self.inner.new_worker(),
            request: self.request,
            step: self.step,
            fault: self.fault,
            started: Arc::clone(&self.started),
        })
    }
}

impl ChatWorker for FaultyWorker {
    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
        session: Option<&str>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats, String> {
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        if n != self.request {
            return self.inner.generate(prompt, params, session, on_text);
        }
        let (mut pieces, mut failed) = (0, false);
        let fault = self.fault;
        let step = self.step;
        let result = self.inner.generate(prompt, params, session, &mut |piece| {
            pieces += 1;
            if pieces == step {
                if fault == Fault::Panic {
                    panic!("injected fault at step {step}");
                }
                failed = true;
                return false;
            }
            on_text(piece)
        });
        if failed {
            return Err(format!("injected fault at step {step}"));
        }
        result
    }
}

fn faulty(inner: Arc<dyn ChatModel>, request: usize, step: usize, fault: Fault) -> Arc<Faulty> {
    Arc::new(Faulty {
        inner,
        request,
        step,
        fault,
        started: Arc::new(AtomicUsize::new(0)),
    })
}

fn cfg(concurrency: usize) -> ServerConfig {
    ServerConfig {
        concurrency,
        max_queue: 4,
        roles: Roles::open(),
        ..ServerConfig::default()
    }
}

fn prompt_of(s: &TestServer, cookie: &str) -> String {
    request(s.addr, "GET", "/get_prompt", &[("Cookie", cookie)], b"").json()["prompt"]
        .as_str()
        .unwrap()
        .to_string()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_failing_or_panicking_turn_ends_cleanly_and_everything_else_goes_on() {
    for fault in [Fault::Panic, Fault::Error] {
        let echo = Arc::new(MockChat::new(MockMode::Echo, Duration::from_millis(5)));
        // Request 2 (the second turn of the conversation) fails at its 3rd piece.
        let s = TestServer::start(cfg(2), faulty(echo, 2, 3, fault));
        let first = chat(s.addr, None, &json!({"user_input": "alpha one"}));
        let cookie = first.cookie().unwrap();
        assert_eq!(final_answer(&first.text()), "alpha one");

        let body = json!({"user_input": "beta two three four five"});
        let failed = chat(s.addr, Some(&cookie), &body).text();
        assert!(failed.ends_with("<::EOS::>"), "{fault:?}: {failed}");
        let last = final_answer(&failed);
        assert!(
            last.starts_with("beta two ") && last.contains("[error: "),
            "{fault:?}: {last}"
        );
        // A request on the other worker, and later ones, are unaffected.
        let other = chat(s.addr, None, &json!({"user_input": "gamma"}));
        assert_eq!(final_answer(&other.text()), "gamma");
        s.wait_idle();
        let outcomes = s.outcomes();
        let errors = outcomes
            .iter()
            .filter(|o| **o == FinishOutcome::UnknownErrorOccurred)
            .count();
        assert_eq!((errors, outcomes.len()), (1, 3), "{fault:?}: {outcomes:?}");

        // The history is as before the failed turn, and the session is free.
        let prompt = prompt_of(&s, &cookie);
        assert!(
            prompt.contains("alpha") && !prompt.contains("beta"),
            "{prompt}"
        );
        let next = chat(s.addr, Some(&cookie), &json!({"user_input": "delta"}));
        assert_eq!(final_answer(&next.text()), "delta");
        let prompt = prompt_of(&s, &cookie);
        assert!(prompt.contains("alpha") && prompt.contains("delta") && !prompt.contains("beta"));

        // The pool kept its size: two answers run at once.
        let long = json!({"user_input": "x ".repeat(60)});
        let streams: Vec<_> = (0..2)
            .map(|_| {
                open(
                    s.addr,
                    "POST",
                    "/chat_stream",
                    &[],
                    long.to_string().as_bytes(),
                )
            })
            .collect();
        wait_for("two answers at once", || s.cs.pool.load().processing == 2);
        for st in streams {
            st.finish();
        }
        s.wait_idle();
    }
}

#[test]
fn an_sse_stream_that_fails_ends_with_an_error_event_and_done() {
    for fault in [Fault::Panic, Fault::Error] {
        let echo = Arc::new(MockChat::new(MockMode::Echo, Duration::from_millis(1)));
        let s = TestServer::start(cfg(1), faulty(echo, 1, 2, fault));
        let body = json!({"messages": [{"role": "user", "content": "one two three four"}], "stream": true});
        let r = completions(s.addr, &[], &body);
        let text = r.text();
        assert!(
            text.contains("\"type\":\"server_error\""),
            "{fault:?}: {text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        s.wait_idle();
        let m = request(s.addr, "GET", "/metrics", &[], b"").text();
        assert!(m.contains("outcome=\"unknown_error_occurred\"} 1"), "{m}");
        // The one worker serves the next request.
        let body = json!({"messages": [{"role": "user", "content": "after"}]});
        let r = completions(s.addr, &[], &body);
        assert_eq!(r.json()["choices"][0]["message"]["content"], "after");
        s.wait_idle(); // and its slot is freed
    }
}

#[test]
fn on_the_real_model_a_replaced_worker_gives_the_golden_answer() {
    let golden = common::read_json(common::fixtures().join("smollm2/golden.json"));
    let conv = &golden["conversations"][0];
    let engine = common::engine(common::default_model());
    let model = Arc::new(ModelChat::new(engine, 1024, Some(64 << 20)));
    let s = TestServer::start(cfg(1), faulty(model, 1, 3, Fault::Panic));
    let body = json!({"messages": conv["messages"], "max_tokens": 48, "temperature": 0});
    let r = completions(s.addr, &[], &body);
    assert_eq!(r.status, 500, "{}", r.text());
    let r = completions(s.addr, &[], &body);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        conv["greedy"]["text"],
        "after the panic"
    );
}
