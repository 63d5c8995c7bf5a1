//! The OpenAI-compatible API: `POST /v1/chat/completions` (streamed as server-sent events or
//! answered as one JSON object) and `GET /v1/models`, stateless (no session), through the
//! same admission, worker pool, finish callbacks and metrics as `/chat_stream` (the router
//! checks the API key before either handler runs). Errors use
//! OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. With `--api-key`, every
//! `/v1` request needs `Authorization: Bearer <key>` (compared in constant time).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tiny_http::Request;

use super::chat::{generate_caught, outcome_of, FinishOutcome, TurnGuard};
use super::http::{self, header, BodyError, ChunkedStream};
use super::model::{ChatWorker, GenParams, GenStats};
use super::session::new_session_id;
use super::waiting::Waiter;
use super::ChatStream;
use crate::engine::generate::FinishReason;
use crate::model::ChatMessage;

/// Answers with OpenAI's error shape.
fn error(
    cs: &ChatStream,
    req: Request,
    status: u16,
    kind: &str,
    param: Option<&str>,
    message: &str,
) {
    cs.reply_json(req, status, &error_body(kind, param, message), vec![]);
}

fn error_body(kind: &str, param: Option<&str>, message: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": Value::Null}})
}

/// Whether the request carries the configured API key (always, when none is configured).
pub fn authorized(cs: &ChatStream, req: &Request) -> bool {
    let Some(key) = &cs.cfg.api_key else {
        return true;
    };
    let given = http::header_value(req, "Authorization").unwrap_or_default();
    let given = given.strip_prefix("Bearer ").unwrap_or("").as_bytes();
    let key = key.as_bytes();
    // constant time in the key's length and content
    let mut diff = given.len() ^ key.len();
    for (i, &k) in key.iter().enumerate() {
        diff |= (k ^ given.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// The 401 for a missing or wrong API key.
pub fn unauthorized(cs: &ChatStream, req: Request) {
    error(
        cs,
        req,
        401,
        "invalid_request_error",
        None,
        "missing or wrong API key (Authorization: Bearer ...)",
    );
}

/// `GET /v1/models`.
pub fn models(cs: &Arc<ChatStream>, req: Request) {
    let body = json!({"object": "list", "data": [{"id": cs.model.name(), "object": "model", "created": 0, "owned_by": "chatstream"}]});
    cs.reply_json(req, 200, &body, vec![]);
}

/// A validated chat completion request.
struct Completion {
    messages: Vec<ChatMessage>,
    params: GenParams,
    stream: bool,
    include_usage: bool,
    /// `prompt_cache_key` (or else `user`): the pool keeps the conversation's KV cache under
    /// it between requests, as it keeps a ChatStream session's, whichever worker runs them.
    cache_key: Option<String>,
}

/// The longest `prompt_cache_key` or `user` taken.
const MAX_CACHE_KEY: usize = 256;

type Invalid = (Option<&'static str>, String);

fn parse(v: &Value, defaults: &GenParams, max_tokens_cap: usize) -> Result<Completion, Invalid> {
    let obj = v
        .as_object()
        .ok_or((None, "the body must be a JSON object".into()))?;
    let bad = |p: &'static str, m: &str| Err((Some(p), m.to_string()));
    let messages = match obj.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .map(|m| {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .filter(|r| ["system", "user", "assistant"].contains(r));
                let content = match m.get("content") {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Option<String>>(),
                    _ => None,
                };
                match (role, content) {
                    (Some(r), Some(c)) => Ok(ChatMessage::new(r, &c)),
                    _ => Err((
                        Some("messages"),
                        "each message needs a role (system, user or assistant) and text content"
                            .to_string(),
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return bad("messages", "messages must be a non-empty array"),
    };
    let num = |k: &'static str| -> Result<Option<f32>, Invalid> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .map(|f| Some(f as f32))
                .ok_or((Some(k), format!("{k} must be a number"))),
        }
    };
    let int = |k: &'static str| -> Result<Option<u64>, Invalid> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(Some)
                .ok_or((Some(k), format!("{k} must be a non-negative integer"))),
        }
    };
    if int("n")?.is_some_and(|n| n != 1) {
        return bad("n", "only n = 1 is supported");
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if num(k)?.is_some_and(|p| p != 0.0) {
            let msg = format!("{k} is not supported (use repetition_penalty, Hugging Face's multiplicative penalty)");
            return Err((Some(k), msg));
        }
    }
    let mut sampling = defaults.sampling;
    if let Some(t) = num("temperature")? {
        sampling.temperature = t;
    }
    if let Some(p) = num("top_p")? {
        sampling.top_p = p;
    }
    if let Some(p) = num("min_p")? {
        sampling.min_p = p;
    }
    if let Some(r) = num("repetition_penalty")? {
        sampling.repetition_penalty = r;
    }
    if let Some(k) = int("top_k")? {
        sampling.top_k = k as usize;
    }
    sampling.seed = int("seed")?;
    sampling.validate().map_err(|e| (None, e.to_string()))?;
    let max_new_tokens = match (int("max_completion_tokens")?, int("max_tokens")?) {
        (Some(n), _) | (None, Some(n)) => n as usize,
        (None, None) => defaults.max_new_tokens,
    };
    if max_new_tokens == 0 || max_new_tokens > max_tokens_cap {
        return bad(
            "max_tokens",
            &format!("max_tokens must be in [1, {max_tokens_cap}], got {max_new_tokens}"),
        );
    }
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or((
                Some("stop"),
                "stop must be a string or a list of strings".to_string(),
            ))?,
        Some(_) => return bad("stop", "stop must be a string or a list of up to 4 strings"),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return bad("stream", "stream must be a boolean"),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut cache_key = None;
    for p in ["prompt_cache_key", "user"] {
        match obj.get(p) {
            None | Some(Value::Null) => {}
            Some(Value::String(k)) if k.len() <= MAX_CACHE_KEY => {
                if cache_key.is_none() && !k.is_empty() {
                    cache_key = Some(k.clone());
                }
            }
            Some(_) => {
                let msg = format!("{p} must be a string of at most {MAX_CACHE_KEY} bytes");
                return Err((Some(p), msg));
            }
        }
    }
    Ok(Completion {
        messages,
        params: GenParams {
            sampling,
            max_new_tokens,
            stop,
        },
        stream,
        include_usage,
        cache_key,
    })
}

/// `POST /v1/chat/completions`.
pub fn chat_completions(cs: &Arc<ChatStream>, mut req: Request) {
    if cs.is_draining() {
        let msg = "the server is shutting down; retry on another replica";
        let body = error_body("server_error", None, msg);
        return cs.reply_json(req, 503, &body, vec![header("Retry-After", "5")]);
    }
    let body = match http::read_body(&mut req, cs.cfg.max_body_bytes) {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            let msg = format!("request body exceeds {} bytes", cs.cfg.max_body_bytes);
            return error(cs, req, 413, "invalid_request_error", None, &msg);
        }
        Err(BodyError::Io) => return,
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                cs,
                req,
                400,
                "invalid_request_error",
                None,
                &format!("the body is not valid JSON: {e}"),
            )
        }
    };
    let cap = cs.cfg.context_len.saturating_sub(1).max(1);
    let c = match parse(&v, &cs.cfg.default_params, cap) {
        Ok(c) => c,
        Err((param, msg)) => return error(cs, req, 400, "invalid_request_error", param, &msg),
    };
    let prompt = match cs.model.render(&c.messages) {
        Ok(p) => p,
        Err(e) => return error(cs, req, 400, "invalid_request_error", Some("messages"), &e),
    };
    let budget = cs.cfg.context_len.saturating_sub(c.params.max_new_tokens);
    match cs.model.count_tokens(&prompt) {
        Ok(n) if n > budget => {
            let msg = format!("the messages take {n} tokens, but at most {budget} fit (context {} minus max_tokens {})", cs.cfg.context_len, c.params.max_new_tokens);
            return error(
                cs,
                req,
                400,
                "invalid_request_error",
                Some("messages"),
                &msg,
            );
        }
        Ok(_) => {}
        Err(e) => return error(cs, req, 500, "server_error", None, &e),
    }
    let Some(admission) = cs.pool.try_admit() else {
        cs.metrics.rejected();
        return too_many(cs, req);
    };
    let mut guard = TurnGuard::stateless(cs, None);
    let job_cs = Arc::clone(cs);
    if !c.stream {
        admission.submit(Box::new(move |worker: &mut dyn ChatWorker| {
            run(worker, Reply::Json(req), job_cs, c, prompt, guard)
        }));
        return;
    }
    // A stream opens now, so that it can be pinged with its place while it waits.
    let mut headers = vec![("Content-Type", "text/event-stream".to_string())];
    headers.extend(cs.cors_headers(&req));
    let Ok(stream) = ChunkedStream::start(req, 200, &headers) else {
        guard.outcome = FinishOutcome::ClientDisconnectedBeforeStreaming;
        return;
    };
    let waiter = Waiter::new(stream, guard);
    let job_waiter = Arc::clone(&waiter);
    let ticket = admission.submit(Box::new(move |worker: &mut dyn ChatWorker| {
        if let Some(q) = job_waiter.start() {
            run(worker, Reply::Stream(q.stream), job_cs, c, prompt, q.guard)
        }
    }));
    cs.waiting.enter(ticket, waiter);
}

/// Where an answer goes: an open event stream, or a request answered with one JSON body.
enum Reply {
    Stream(ChunkedStream),
    Json(Request),
}

/// OpenAI's 429, with a Retry-After from the queue and the recent time per request.
fn too_many(cs: &ChatStream, req: Request) {
    cs.reply_json(
        req,
        429,
        &too_many_body(),
        vec![header("Retry-After", &cs.retry_after())],
    );
}

fn too_many_body() -> Value {
    json!({"error": {"message": "too many requests; retry later", "type": "rate_limit_error", "param": null, "code": "too_many_requests"}})
}

fn chunk_json(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn run(
    worker: &mut dyn ChatWorker,
    reply: Reply,
    cs: Arc<ChatStream>,
    c: Completion,
    prompt: String,
    mut guard: TurnGuard,
) {
    let late = cs.waited_too_long(&guard);
    let (mut stream, req) = match reply {
        Reply::Json(req) if late => return too_many(&cs, req),
        Reply::Stream(s) if late => {
            let _ =
                s.finish_with(format!("data: {}\n\ndata: [DONE]\n\n", too_many_body()).as_bytes());
            return;
        }
        Reply::Stream(s) => (Some(s), None),
        Reply::Json(req) => (None, Some(req)),
    };
    let started = Instant::now();
    guard.times.queue_wait = started.duration_since(guard.admitted).as_secs_f64();
    let id = format!("chatcmpl-{}", new_session_id());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = cs.model.name();
    if let Some(s) = stream.as_mut() {
        let first = chunk_json(
            &id,
            created,
            &model,
            json!({"role": "assistant", "content": ""}),
            None,
        );
        let _ = s.chunk(format!("data: {first}\n\n").as_bytes());
    }
    let (mut text, mut chunks, mut gone) = (String::new(), 0usize, false);
    // in a namespace of its own: ChatStream's session ids are hex
    let cache_key = c.cache_key.as_ref().map(|k| format!("openai:{k}"));
    let (result, panic) = generate_caught(
        worker,
        &prompt,
        &c.params,
        cache_key.as_deref(),
        &mut |piece| {
            if cs.is_cancelling() {
                return false;
            }
            text.push_str(piece);
            guard.piece_out();
            if let Some(s) = stream.as_mut() {
                let ev = chunk_json(&id, created, &model, json!({"content": piece}), None);
                if s.chunk(format!("data: {ev}\n\n").as_bytes()).is_err() {
                    gone = true;
                    return false;
                }
                chunks += 1;
            }
            true
        },
    );
    let cancelled = matches!(
        result,
        Ok(GenStats {
            finish: FinishReason::Cancelled,
            ..
        })
    ) && !gone;
    let result = match result {
        Ok(_) if cancelled => Err("cancelled: the server is shutting down".to_string()),
        other => other,
    };
    let (finish, usage) = match &result {
        Ok(GenStats {
            finish,
            tokens,
            prompt_tokens,
            cached_tokens,
        }) => {
            guard.tokens = [*tokens, *prompt_tokens, *cached_tokens];
            let reason = if *finish == FinishReason::Length {
                "length"
            } else {
                "stop"
            };
            (
                reason,
                // as OpenAI reports prompt caching: the prompt tokens not prefilled again
                json!({"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens,
                    "prompt_tokens_details": {"cached_tokens": cached_tokens}}),
            )
        }
        Err(_) => ("stop", Value::Null),
    };
    match (stream, &result) {
        (Some(s), _) => {
            let mut events = String::new();
            match &result {
                Ok(_) => {
                    events += &format!(
                        "data: {}\n\n",
                        chunk_json(&id, created, &model, json!({}), Some(finish))
                    );
                    if c.include_usage {
                        let u = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage});
                        events += &format!("data: {u}\n\n");
                    }
                }
                Err(e) => {
                    log!("generation failed: {e}");
                    let err = error_body("server_error", None, e);
                    events += &format!("data: {err}\n\n");
                }
            }
            events += "data: [DONE]\n\n";
            let delivered = !gone && s.finish_with(events.as_bytes()).is_ok();
            guard.outcome = outcome_of(delivered, chunks, &result);
        }
        (None, Ok(_)) => {
            let body = json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage});
            if let Some(r) = req {
                cs.reply_json(r, 200, &body, vec![]);
            }
            guard.outcome = FinishOutcome::Success;
        }
        (None, Err(e)) => {
            log!("generation failed: {e}");
            if let Some(r) = req {
                error(&cs, r, 500, "server_error", None, e);
            }
            guard.outcome = FinishOutcome::UnknownErrorOccurred;
        }
    }
    if let Some(p) = panic {
        drop(guard); // reported before the worker is replaced
        std::panic::resume_unwind(p);
    }
}
