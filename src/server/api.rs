//! The cheap endpoints, answered on the acceptor thread without waiting on any worker:
//! clear_context, get_prompt, set/get_generation_params, get_load, set_feedback,
//! get_resource_usage, /metrics, and the web UI's two files.

use std::sync::Arc;

use serde_json::{json, Value};
use tiny_http::Request;

use super::http::{self, BodyError};
use super::metrics::EngineGauges;
use super::model::GenParams;
use super::session::{Session, StoreDown};
use super::ChatStream;
use crate::model::ChatMessage;

/// The caller's session, if its cookie names a live one (never creates one).
fn session_of(cs: &ChatStream, req: &Request) -> Result<Option<(String, Session)>, StoreDown> {
    let Some(sid) = http::cookie(req, "sid") else {
        return Ok(None);
    };
    Ok(cs.sessions.load(&sid)?.map(|s| (sid, s)))
}

/// `POST /clear_context`: forgets the conversation.
pub fn clear_context(cs: &Arc<ChatStream>, req: Request) {
    let cleared = session_of(cs, &req).and_then(|found| match found {
        Some((sid, mut s)) => {
            s.turns.clear();
            cs.sessions.save(&sid, s)
        }
        None => Ok(()),
    });
    if let Err(e) = cleared {
        return cs.store_down(req, &e);
    }
    cs.reply_json(
        req,
        200,
        &json!({"success": true, "message": "Context successfully cleared"}),
        vec![],
    );
}

/// `GET /get_prompt`: the prompt the next turn would start from, percent-encoded.
pub fn get_prompt(cs: &Arc<ChatStream>, req: Request) {
    let turns = match session_of(cs, &req) {
        Ok(found) => found.map(|(_, s)| s.turns).unwrap_or_default(),
        Err(e) => return cs.store_down(req, &e),
    };
    let messages: Vec<ChatMessage> = turns
        .iter()
        .flat_map(|t| {
            [
                ChatMessage::new("user", &t.user),
                ChatMessage::new("assistant", &t.assistant),
            ]
        })
        .collect();
    match cs.model.render(&messages) {
        Ok(p) => cs.reply_json(
            req,
            200,
            &json!({"prompt": http::percent_encode(&p)}),
            vec![],
        ),
        Err(e) => cs.reply_error(req, 500, "template", &e),
    }
}

fn params_json(p: &GenParams) -> Value {
    json!({
        "temperature": p.sampling.temperature,
        "top_k": p.sampling.top_k,
        "top_p": p.sampling.top_p,
        "min_p": p.sampling.min_p,
        "repetition_penalty": p.sampling.repetition_penalty,
        "seed": p.sampling.seed,
        "max_new_tokens": p.max_new_tokens,
    })
}

/// `GET /get_generation_params`: this session's settings (the defaults without a session).
pub fn get_generation_params(cs: &Arc<ChatStream>, req: Request) {
    let p = match session_of(cs, &req) {
        Ok(found) => found.map_or_else(|| cs.cfg.default_params.clone(), |(_, s)| s.params),
        Err(e) => return cs.store_down(req, &e),
    };
    cs.reply_json(req, 200, &params_json(&p), vec![]);
}

/// Merges the fields of `v` into `p`, checking each field's type and range.
pub fn merge_params(p: &GenParams, v: &Value, max_new_cap: usize) -> Result<GenParams, String> {
    let obj = v.as_object().ok_or("body must be a JSON object")?;
    let mut out = p.clone();
    let num = |k: &str, x: &Value| {
        x.as_f64()
            .filter(|f| f.is_finite())
            .ok_or(format!("{k} must be a number"))
    };
    let int = |k: &str, x: &Value| {
        x.as_u64()
            .ok_or(format!("{k} must be a non-negative integer"))
    };
    for (k, x) in obj {
        match k.as_str() {
            "temperature" => out.sampling.temperature = num(k, x)? as f32,
            "top_p" => out.sampling.top_p = num(k, x)? as f32,
            "min_p" => out.sampling.min_p = num(k, x)? as f32,
            "repetition_penalty" => out.sampling.repetition_penalty = num(k, x)? as f32,
            "top_k" => out.sampling.top_k = int(k, x)? as usize,
            "seed" => out.sampling.seed = if x.is_null() { None } else { Some(int(k, x)?) },
            "max_new_tokens" => {
                let n = int(k, x)? as usize;
                if n == 0 || n > max_new_cap {
                    return Err(format!(
                        "max_new_tokens must be in [1, {max_new_cap}], got {n}"
                    ));
                }
                out.max_new_tokens = n;
            }
            "do_sample" => {
                if x.as_bool() == Some(false) {
                    out.sampling.temperature = 0.0;
                } else if !x.is_boolean() {
                    return Err("do_sample must be a boolean".into());
                }
            }
            other => return Err(format!("unknown generation parameter '{other}'")),
        }
    }
    out.sampling.validate().map_err(|e| e.to_string())?;
    Ok(out)
}

/// `POST /set_generation_params`: merges the given fields into the session's settings.
pub fn set_generation_params(cs: &Arc<ChatStream>, mut req: Request) {
    let body = match http::read_body(&mut req, cs.cfg.max_body_bytes) {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return cs.reply_error(req, 413, "payload_too_large", "body too large")
        }
        Err(BodyError::Io) => return,
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return cs.reply_error(
                req,
                400,
                "bad_request",
                &format!("body is not valid JSON: {e}"),
            )
        }
    };
    let found = session_of(cs, &req).and_then(|found| match found {
        Some((sid, s)) => Ok((sid, s, false)),
        None => {
            let sid = cs.sessions.create(cs.cfg.default_params.clone())?;
            let s = cs
                .sessions
                .load(&sid)?
                .ok_or_else(|| StoreDown("a session vanished as it was made".into()))?;
            Ok((sid, s, true))
        }
    });
    let (sid, mut s, new) = match found {
        Ok(f) => f,
        Err(e) => return cs.store_down(req, &e),
    };
    match merge_params(&s.params, &v, cs.cfg.context_len.saturating_sub(1).max(1)) {
        Ok(p) => {
            s.params = p;
            let body = params_json(&s.params);
            if let Err(e) = cs.sessions.save(&sid, s) {
                return cs.store_down(req, &e);
            }
            let mut headers = vec![];
            if new {
                headers.push(http::header("Set-Cookie", &cs.session_cookie(&sid)));
            }
            cs.reply_json(
                req,
                200,
                &json!({"success": true, "generation_params": body}),
                headers,
            );
        }
        Err(msg) => cs.reply_error(req, 400, "bad_request", &msg),
    }
}

/// `GET /get_load`: the pool's true numbers, as ChatStream reports them.
pub fn get_load(cs: &Arc<ChatStream>, req: Request) {
    let l = cs.pool.load();
    let body = json!({"chatstream_workers": [{
        "name": cs.cfg.name,
        "processing": l.processing,
        "waiting": l.waiting,
        "max_processing": cs.pool.concurrency(),
        "max_waiting": cs.pool.max_queue(),
    }]});
    cs.reply_json(req, 200, &body, vec![]);
}

/// Reads a JSON body, answering 400/413 itself when it cannot.
fn json_body(cs: &ChatStream, req: &mut Request) -> Result<Value, (u16, &'static str, String)> {
    let body = match http::read_body(req, cs.cfg.max_body_bytes) {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return Err((
                413,
                "payload_too_large",
                format!("request body exceeds {} bytes", cs.cfg.max_body_bytes),
            ))
        }
        Err(BodyError::Io) => return Err((400, "bad_request", "could not read the body".into())),
    };
    serde_json::from_slice(&body)
        .map_err(|e| (400, "bad_request", format!("body is not valid JSON: {e}")))
}

/// `POST /set_feedback`: `{is_like, message_id, form_data}` about an answer of this session.
pub fn set_feedback(cs: &Arc<ChatStream>, mut req: Request) {
    let v = match json_body(cs, &mut req) {
        Ok(v) => v,
        Err((status, code, msg)) => return cs.reply_error(req, status, code, &msg),
    };
    let Some(is_like) = v.get("is_like").and_then(Value::as_bool) else {
        return cs.reply_error(req, 400, "bad_request", "is_like must be a boolean");
    };
    let Some(message_id) = v.get("message_id").and_then(Value::as_str) else {
        return cs.reply_error(req, 400, "bad_request", "message_id must be a string");
    };
    let form_data = v.get("form_data").cloned().unwrap_or(Value::Null);
    if !(form_data.is_null() || form_data.is_object()) {
        return cs.reply_error(req, 400, "bad_request", "form_data must be an object");
    }
    let turn = match session_of(cs, &req) {
        Ok(found) => {
            found.and_then(|(_, s)| s.turns.into_iter().find(|t| t.message_id == message_id))
        }
        Err(e) => return cs.store_down(req, &e),
    };
    let Some(turn) = turn else {
        let msg = format!("no answer with message_id '{message_id}' in this session");
        return cs.reply_error(req, 404, "not_found", &msg);
    };
    let line = json!({
        "time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "message_id": message_id, "is_like": is_like, "form_data": form_data,
        "user": turn.user, "assistant": turn.assistant,
    });
    if let Err(e) = cs.record_feedback(&line) {
        log!("writing feedback: {e}");
        return cs.reply_error(
            req,
            500,
            "feedback_not_saved",
            "the feedback could not be saved",
        );
    }
    cs.reply_json(
        req,
        200,
        &json!({"success": true, "message": "Feedback received"}),
        vec![],
    );
}

/// A `Key:   123 kB` value from a /proc file, in bytes.
fn proc_kb(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// `GET /get_resource_usage`: process and host memory (GPU memory when a GPU is used).
pub fn get_resource_usage(cs: &Arc<ChatStream>, req: Request) {
    let body = json!({
        "name": cs.cfg.name,
        "device": cs.model.device(),
        "process": {"rss_bytes": proc_kb("/proc/self/status", "VmRSS:"), "threads": std::fs::read_dir("/proc/self/task").map(|d| d.count()).ok()},
        "host": {
            "memory_total_bytes": proc_kb("/proc/meminfo", "MemTotal:"),
            "memory_available_bytes": proc_kb("/proc/meminfo", "MemAvailable:"),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        },
        "gpus": cs.model.gpus(),
    });
    cs.reply_json(req, 200, &body, vec![]);
}

/// `GET /metrics`: Prometheus text format.
pub fn metrics(cs: &Arc<ChatStream>, req: Request) {
    let engine = EngineGauges {
        kv_bytes: cs.model.kv_cache_bytes(),
        decode_batches: cs.model.decode_batches(),
    };
    let text = cs.metrics.render(&cs.cfg.name, cs.pool.load(), engine);
    let resp = tiny_http::Response::from_string(text).with_header(http::header(
        "Content-Type",
        "text/plain; version=0.0.4; charset=utf-8",
    ));
    cs.respond(req, resp.boxed());
}

const INDEX_HTML: &str = include_str!("ui/index.html");
const CHATSTREAM_JS: &str = include_str!("ui/chatstream.js");

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `GET /`: the chat page, with `--ui-title` and `--ui-welcome` filled in.
pub fn webui_index(cs: &Arc<ChatStream>, req: Request) {
    let page = INDEX_HTML
        .replace("{{TITLE}}", &html_escape(&cs.cfg.ui_title))
        .replace("{{WELCOME}}", &html_escape(&cs.cfg.ui_welcome));
    let resp = tiny_http::Response::from_string(page)
        .with_header(http::header("Content-Type", "text/html; charset=utf-8"));
    cs.respond(req, resp.boxed());
}

/// `GET /chatstream.js`: the page's script.
pub fn webui_js(cs: &Arc<ChatStream>, req: Request) {
    let resp = tiny_http::Response::from_string(CHATSTREAM_JS).with_header(http::header(
        "Content-Type",
        "text/javascript; charset=utf-8",
    ));
    cs.respond(req, resp.boxed());
}
