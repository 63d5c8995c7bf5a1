//! The cheap ChatStream endpoints, answered on the acceptor thread without waiting on any
//! worker: clear_context, get_prompt, set/get_generation_params, get_load.

use std::sync::Arc;

use serde_json::{json, Value};
use tiny_http::Request;

use super::http::{self, BodyError};
use super::model::GenParams;
use super::session::Session;
use super::ChatStream;
use crate::model::ChatMessage;

/// The caller's session, if its cookie names a live one (never creates one).
fn session_of(cs: &ChatStream, req: &Request) -> Option<(String, Session)> {
    let sid = http::cookie(req, "sid")?;
    let s = cs.sessions.load(&sid)?;
    Some((sid, s))
}

/// `POST /clear_context`: forgets the conversation.
pub fn clear_context(cs: &Arc<ChatStream>, req: Request) {
    if let Some((sid, mut s)) = session_of(cs, &req) {
        s.turns.clear();
        cs.sessions.save(&sid, s);
    }
    http::respond_json(
        req,
        200,
        &json!({"success": true, "message": "Context successfully cleared"}),
        vec![],
    );
}

/// `GET /get_prompt`: the prompt the next turn would start from, percent-encoded.
pub fn get_prompt(cs: &Arc<ChatStream>, req: Request) {
    let turns = session_of(cs, &req)
        .map(|(_, s)| s.turns)
        .unwrap_or_default();
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
        Ok(p) => http::respond_json(
            req,
            200,
            &json!({"prompt": http::percent_encode(&p)}),
            vec![],
        ),
        Err(e) => http::respond_error(req, 500, "template", &e),
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
    let p = session_of(cs, &req).map_or_else(|| cs.cfg.default_params.clone(), |(_, s)| s.params);
    http::respond_json(req, 200, &params_json(&p), vec![]);
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
            return http::respond_error(req, 413, "payload_too_large", "body too large")
        }
        Err(BodyError::Io) => return,
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return http::respond_error(
                req,
                400,
                "bad_request",
                &format!("body is not valid JSON: {e}"),
            )
        }
    };
    let (sid, mut s, new) = match session_of(cs, &req) {
        Some((sid, s)) => (sid, s, false),
        None => {
            let sid = cs.sessions.create(cs.cfg.default_params.clone());
            let s = cs.sessions.load(&sid).expect("just created");
            (sid, s, true)
        }
    };
    match merge_params(&s.params, &v, cs.cfg.context_len.saturating_sub(1).max(1)) {
        Ok(p) => {
            s.params = p;
            let body = params_json(&s.params);
            cs.sessions.save(&sid, s);
            let mut headers = vec![];
            if new {
                let secure = if cs.cfg.secure_cookies {
                    "; Secure"
                } else {
                    ""
                };
                headers.push(http::header(
                    "Set-Cookie",
                    &format!("sid={sid}; Path=/; HttpOnly; SameSite=Lax{secure}"),
                ));
            }
            http::respond_json(
                req,
                200,
                &json!({"success": true, "generation_params": body}),
                headers,
            );
        }
        Err(msg) => http::respond_error(req, 400, "bad_request", &msg),
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
    http::respond_json(req, 200, &body, vec![]);
}
