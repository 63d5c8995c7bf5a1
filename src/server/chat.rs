//! `/chat_stream`: validate the body, resolve the session and lock it for one turn, fit the
//! history into the context, admit into the pool (or refuse at once), then, on a worker,
//! stream the answer as ChatStream does (each chunk the whole answer so far + `<::EOS::>`,
//! or only the new text with `"stream": "delta"`), save the turn, and report exactly one
//! `FinishOutcome` to the log and the caller's callback.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use tiny_http::Request;

use crate::engine::generate::FinishReason;
use crate::model::ChatMessage;

use super::http::{self, header, BodyError, ChunkedStream};
use super::metrics::RequestTimes;
use super::model::{ChatWorker, GenParams, GenStats};
use super::roles::Role;
use super::session::{new_session_id, Session, SessionStore, Turn};
use super::{is_program, ChatStream};

/// ChatStream's end-of-chunk marker.
pub const EOS_MARK: &str = "<::EOS::>";

/// How an admitted request ended (reported exactly once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishOutcome {
    /// The whole answer was written to the client.
    Success,
    /// A write failed after streaming began.
    ClientDisconnectedWhileStreaming,
    /// The client was gone before the first chunk.
    ClientDisconnectedBeforeStreaming,
    /// Anything else (the detail is logged).
    UnknownErrorOccurred,
}

impl FinishOutcome {
    /// ChatStream's name for the outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishOutcome::Success => "success",
            FinishOutcome::ClientDisconnectedWhileStreaming => {
                "client_disconnected_while_streaming"
            }
            FinishOutcome::ClientDisconnectedBeforeStreaming => {
                "client_disconnected_before_streaming"
            }
            FinishOutcome::UnknownErrorOccurred => "unknown_error_occurred",
        }
    }
}

/// The outcome of a streamed answer: whether everything was delivered, how many chunks
/// were, and how generation ended.
pub(super) fn outcome_of(
    delivered: bool,
    chunks: usize,
    result: &Result<GenStats, String>,
) -> FinishOutcome {
    match result {
        _ if !delivered && chunks == 0 => FinishOutcome::ClientDisconnectedBeforeStreaming,
        _ if !delivered => FinishOutcome::ClientDisconnectedWhileStreaming,
        Ok(GenStats {
            finish: FinishReason::Stop | FinishReason::Length,
            ..
        }) => FinishOutcome::Success,
        Ok(_) | Err(_) => FinishOutcome::UnknownErrorOccurred,
    }
}

/// A panic caught in a generation: re-raised once the client has had its last chunk, so that
/// the pool gives the worker a fresh generator.
pub(super) type Panic = Box<dyn std::any::Any + Send>;

/// Runs `worker.generate`, turning a panic into an error plus the panic to re-raise.
pub(super) fn generate_caught(
    worker: &mut dyn ChatWorker,
    prompt: &str,
    params: &GenParams,
    session: Option<&str>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> (Result<GenStats, String>, Option<Panic>) {
    match catch_unwind(AssertUnwindSafe(|| {
        worker.generate(prompt, params, session, on_text)
    })) {
        Ok(result) => (result, None),
        Err(p) => (Err("internal error".to_string()), Some(p)),
    }
}

/// Called once per admitted request with its outcome.
pub type FinishCallback = Box<dyn FnOnce(FinishOutcome) + Send>;

/// A validated `/chat_stream` body.
struct ChatBody {
    user_input: Option<String>,
    regenerate: bool,
    delta: bool,
}

fn parse_body(body: &[u8]) -> Result<ChatBody, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("body must be a JSON object")?;
    let user_input = match obj.get("user_input") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("user_input must be a string".into()),
    };
    let regenerate = match obj.get("regenerate") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("regenerate must be a boolean".into()),
    };
    let delta = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "delta" => true,
        Some(Value::String(s)) if s == "full" => false,
        Some(_) => return Err("stream must be \"full\" or \"delta\"".into()),
    };
    if !regenerate && user_input.as_deref().is_none_or(|s| s.trim().is_empty()) {
        return Err("user_input must be a non-empty string".into());
    }
    Ok(ChatBody {
        user_input,
        regenerate,
        delta,
    })
}

/// Everything a worker needs to run one turn.
struct TurnJob {
    cs: Arc<ChatStream>,
    sid: String,
    new_cookie: bool,
    session: Session,
    user: String,
    prompt: String,
    message_id: String,
    delta: bool,
    /// A program's throw-away session: its KV cache is not kept.
    ephemeral: bool,
}

/// Unlocks the session and reports the outcome when dropped, so a panic still does both.
pub(super) struct TurnGuard {
    sessions: Arc<dyn SessionStore>,
    /// The locked session; taken when unlocked, so it is unlocked exactly once.
    sid: Option<String>,
    /// A throw-away session (a program's turn): removed instead of unlocked.
    ephemeral: bool,
    /// Whether the request was admitted (only then is an outcome reported).
    reports: bool,
    pub(super) outcome: FinishOutcome,
    callback: Option<FinishCallback>,
    cs: Arc<ChatStream>,
    pub(super) admitted: Instant,
    /// New, prompt and cached prompt tokens.
    pub(super) tokens: [usize; 3],
    pub(super) times: RequestTimes,
    /// When the first and the latest piece of the answer went out.
    first_piece: Option<Instant>,
    last_piece: Option<Instant>,
}

impl TurnGuard {
    /// The guard of an admitted request without a session (OpenAI API).
    pub(super) fn stateless(cs: &Arc<ChatStream>, callback: Option<FinishCallback>) -> TurnGuard {
        TurnGuard {
            sessions: Arc::clone(&cs.sessions),
            sid: None,
            ephemeral: false,
            reports: true,
            outcome: FinishOutcome::UnknownErrorOccurred,
            callback,
            cs: Arc::clone(cs),
            admitted: Instant::now(),
            tokens: [0; 3],
            times: RequestTimes::default(),
            first_piece: None,
            last_piece: None,
        }
    }

    /// Notes that a piece of the answer went out: the engine made progress, and the gap
    /// since the last piece is an inter-token latency.
    pub(super) fn piece_out(&mut self) {
        let now = Instant::now();
        self.cs.pool.progress();
        match self.last_piece {
            Some(prev) => self.cs.metrics.inter_token((now - prev).as_secs_f64()),
            None => self.first_piece = Some(now),
        }
        self.last_piece = Some(now);
    }

    /// Ends the session's turn (before the last byte goes out, so that a client that reads
    /// the end and sends its next turn at once finds the session free and up to date).
    fn unlock(&mut self) {
        if let Some(sid) = self.sid.take() {
            if self.ephemeral {
                self.sessions.remove(&sid);
            } else {
                self.sessions.unlock(&sid);
            }
        }
    }
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        self.unlock();
        if !self.reports {
            return;
        }
        log!(
            "finished outcome={} tokens={} prompt_tokens={} cached_tokens={} duration_ms={}",
            self.outcome.as_str(),
            self.tokens[0],
            self.tokens[1],
            self.tokens[2],
            self.admitted.elapsed().as_millis()
        );
        let total = self.admitted.elapsed().as_secs_f64();
        if let (Some(first), Some(last)) = (self.first_piece, self.last_piece) {
            self.times.ttft = Some((first - self.admitted).as_secs_f64());
            if self.tokens[0] > 1 {
                self.times.tpot = Some((last - first).as_secs_f64() / (self.tokens[0] - 1) as f64);
            }
        }
        self.cs
            .metrics
            .finished(self.outcome, self.tokens, self.times, total);
        if let Some(cb) = self.callback.take() {
            let outcome = self.outcome;
            if catch_unwind(AssertUnwindSafe(|| cb(outcome))).is_err() {
                log!(
                    "the finish callback panicked (outcome={})",
                    outcome.as_str()
                );
            }
        }
    }
}

impl ChatStream {
    /// The library entry for `/chat_stream`: `body` is a body the caller already read (or
    /// `None` to read it here); `callback` is called exactly once if the request is admitted.
    pub fn handle_chat_stream_request(
        self: &Arc<Self>,
        mut req: Request,
        body: Option<Vec<u8>>,
        callback: Option<FinishCallback>,
    ) {
        if !self.allowed(&req, "chat_stream") {
            return self.forbidden(req);
        }
        if self.is_draining() {
            let body = json!({"error": "draining", "message": "the server is shutting down; retry on another replica"});
            return self.reply_json(req, 503, &body, vec![header("Retry-After", "5")]);
        }
        let body = match body {
            Some(b) => b,
            None => match http::read_body(&mut req, self.cfg.max_body_bytes) {
                Ok(b) => b,
                Err(BodyError::TooLarge) => {
                    let msg = format!("request body exceeds {} bytes", self.cfg.max_body_bytes);
                    return self.reply_error(req, 413, "payload_too_large", &msg);
                }
                Err(BodyError::Io) => return,
            },
        };
        let body = match parse_body(&body) {
            Ok(b) => b,
            Err(msg) => return self.reply_error(req, 400, "bad_request", &msg),
        };
        // Programs keep no session: their turn runs in a throw-away one.
        let ephemeral = is_program(&req);
        let existing = match http::cookie(&req, "sid").filter(|_| !ephemeral) {
            Some(sid) => match self.sessions.load(&sid) {
                Ok(found) => found.map(|_| sid),
                Err(e) => return self.store_down(req, &e),
            },
            None => None,
        };
        let new_cookie = existing.is_none() && !ephemeral;
        let sid = match existing {
            Some(sid) => sid,
            None => match self.sessions.create(self.cfg.default_params.clone()) {
                Ok(sid) => sid,
                Err(e) => return self.store_down(req, &e),
            },
        };
        // A UI pass phrase typed as a message grants its role; it is never stored or logged.
        let phrase_role = match (&body.user_input, ephemeral || body.regenerate) {
            (Some(text), false) => self.cfg.roles.by_ui_phrase(text),
            _ => None,
        };
        if let Some(role) = phrase_role {
            return self.grant_role(req, &sid, new_cookie, role);
        }
        // Not admitted yet: nothing to report until then.
        let mut guard = TurnGuard::stateless(self, None);
        guard.ephemeral = ephemeral;
        guard.reports = false;
        let locked = match self.sessions.try_lock(&sid) {
            Ok(locked) => locked,
            Err(e) => return self.store_down(req, &e),
        };
        if !locked {
            let msg = "a generation is already running in this session; wait for it to finish";
            return self.reply_error(req, 409, "conflict", msg);
        }
        guard.sid = Some(sid.clone());
        let job = match self.prepare_turn(&sid, new_cookie, body) {
            Ok(job) => TurnJob { ephemeral, ..job },
            Err((status, code, msg)) => {
                guard.unlock();
                return self.reply_error(req, status, code, &msg);
            }
        };
        let Some(admission) = self.pool.try_admit() else {
            guard.unlock();
            let retry = self.retry_after();
            let status = self.cfg.too_many_requests_status;
            self.metrics.rejected();
            return self.reply_json(
                req,
                status,
                &json!({"error": "too_many_requests"}),
                vec![header("Retry-After", &retry)],
            );
        };
        // From here the request is admitted: the guard reports its outcome exactly once.
        guard.callback = callback;
        guard.admitted = Instant::now();
        guard.reports = true;
        admission.submit(Box::new(move |worker: &mut dyn ChatWorker| {
            run_turn(worker, req, job, guard)
        }));
    }

    /// Records `role` on the session and answers with ChatStream's grant message.
    fn grant_role(self: &Arc<Self>, req: Request, sid: &str, new_cookie: bool, role: &Role) {
        let granted = self.sessions.load(sid).and_then(|found| match found {
            Some(mut session) => {
                session.role = Some(role.name.clone());
                self.sessions.save(sid, session)
            }
            None => Ok(()),
        });
        if let Err(e) = granted {
            return self.store_down(req, &e);
        }
        let mut headers = vec![http::header("Content-Type", "text/plain; charset=utf-8")];
        if new_cookie {
            headers.push(http::header("Set-Cookie", &self.session_cookie(sid)));
        }
        if role.enable_dev_tool {
            headers.push(http::header("X-ChatStream-API-DevTool-Enabled", "enabled"));
        }
        let text = format!("New role: '{}' has been granted{EOS_MARK}", role.name);
        let mut resp = tiny_http::Response::from_string(text);
        for h in headers {
            resp.add_header(h);
        }
        self.respond(req, resp.boxed());
    }

    /// The `Retry-After` value (seconds) for a refusal now.
    pub fn retry_after(&self) -> String {
        self.metrics
            .retry_after(self.pool.load().waiting, self.pool.concurrency())
            .to_string()
    }

    /// Whether an admitted request waited past `--max-queue-wait` (it is then refused as
    /// too many instead of started).
    pub(super) fn waited_too_long(&self, guard: &TurnGuard) -> bool {
        let waited = guard.admitted.elapsed();
        let late = self.cfg.max_queue_wait.is_some_and(|max| waited > max);
        if late {
            self.metrics.rejected();
            log!(
                "refused after {} ms in the queue (--max-queue-wait)",
                waited.as_millis()
            );
        }
        late
    }

    /// The `Set-Cookie` value for session `sid`.
    pub fn session_cookie(&self, sid: &str) -> String {
        let secure = if self.cfg.secure_cookies {
            "; Secure"
        } else {
            ""
        };
        format!("sid={sid}; Path=/; HttpOnly; SameSite=Lax{secure}")
    }

    /// Builds the prompt for this turn: the session's history (oldest turns dropped until
    /// it fits `context_len - max_new_tokens`) plus the new message.
    fn prepare_turn(
        self: &Arc<Self>,
        sid: &str,
        new_cookie: bool,
        body: ChatBody,
    ) -> Result<TurnJob, (u16, &'static str, String)> {
        let mut session = self
            .sessions
            .load(sid)
            .map_err(|e| (503, "session_store_unavailable", e.to_string()))?
            .ok_or((500, "session_lost", "the session expired".to_string()))?;
        let user = if body.regenerate {
            let last = session.turns.pop().ok_or((
                400,
                "bad_request",
                "nothing to regenerate: the history is empty".to_string(),
            ))?;
            last.user
        } else {
            body.user_input.unwrap_or_default()
        };
        let budget = self
            .cfg
            .context_len
            .saturating_sub(session.params.max_new_tokens);
        let mut skip = 0;
        let prompt = loop {
            let messages = to_messages(&session.turns[skip..], &user);
            let prompt = self
                .model
                .render(&messages)
                .map_err(|e| (400, "bad_request", e))?;
            let n = self
                .model
                .count_tokens(&prompt)
                .map_err(|e| (500, "tokenizer", e))?;
            if n <= budget {
                break prompt;
            }
            if skip == session.turns.len() {
                let msg = format!(
                    "the message takes {n} tokens with the chat template, but at most {budget} fit \
                     (context {} minus max_new_tokens {})",
                    self.cfg.context_len, session.params.max_new_tokens
                );
                return Err((400, "prompt_too_long", msg));
            }
            skip += 1;
        };
        Ok(TurnJob {
            cs: Arc::clone(self),
            sid: sid.to_string(),
            new_cookie,
            session,
            user,
            prompt,
            message_id: new_session_id(),
            delta: body.delta,
            ephemeral: false,
        })
    }
}

fn to_messages(turns: &[Turn], user: &str) -> Vec<ChatMessage> {
    let mut m: Vec<ChatMessage> = turns
        .iter()
        .flat_map(|t| {
            [
                ChatMessage::new("user", &t.user),
                ChatMessage::new("assistant", &t.assistant),
            ]
        })
        .collect();
    m.push(ChatMessage::new("user", user));
    m
}

/// On a worker: stream the answer, save the turn, set the outcome (the guard reports it).
fn run_turn(worker: &mut dyn ChatWorker, req: Request, job: TurnJob, mut guard: TurnGuard) {
    if job.cs.is_cancelling() {
        let body = json!({"error": "draining", "message": "the server is shutting down; retry on another replica"});
        job.cs
            .reply_json(req, 503, &body, vec![header("Retry-After", "5")]);
        return;
    }
    if job.cs.waited_too_long(&guard) {
        let retry = job.cs.retry_after();
        let status = job.cs.cfg.too_many_requests_status;
        job.cs.reply_json(
            req,
            status,
            &json!({"error": "too_many_requests"}),
            vec![header("Retry-After", &retry)],
        );
        return;
    }
    let started = Instant::now();
    guard.times.queue_wait = started.duration_since(guard.admitted).as_secs_f64();
    let mut headers = vec![
        ("Content-Type", "text/plain; charset=utf-8".to_string()),
        (
            "X-ChatStream-Last-Generated-Message-Id",
            job.message_id.clone(),
        ),
    ];
    if job.new_cookie {
        headers.push(("Set-Cookie", job.cs.session_cookie(&job.sid)));
    }
    headers.extend(job.cs.cors_headers(&req));
    let Ok(mut stream) = ChunkedStream::start(req, 200, &headers) else {
        guard.outcome = FinishOutcome::ClientDisconnectedBeforeStreaming;
        return;
    };
    let (mut answer, mut chunks, mut gone) = (String::new(), 0usize, false);
    let params: &GenParams = &job.session.params;
    let session = (!job.ephemeral).then_some(job.sid.as_str());
    let (result, panic) = generate_caught(worker, &job.prompt, params, session, &mut |piece| {
        if job.cs.is_cancelling() {
            return false;
        }
        answer.push_str(piece);
        let body = if job.delta { piece } else { answer.as_str() };
        if stream
            .chunk(format!("{body}{EOS_MARK}").as_bytes())
            .is_err()
        {
            gone = true;
            answer.truncate(answer.len() - piece.len());
            return false;
        }
        chunks += 1;
        guard.piece_out();
        true
    });
    if let Ok(stats) = &result {
        guard.tokens = [stats.tokens, stats.prompt_tokens, stats.cached_tokens];
    }
    // An error, or a cancellation at shutdown, ends the stream with a last chunk saying so.
    let note = match &result {
        Err(e) => {
            log!("generation failed: {e}");
            Some(format!("error: {e}"))
        }
        Ok(GenStats {
            finish: FinishReason::Cancelled,
            ..
        }) if !gone => Some("cancelled: the server is shutting down".into()),
        _ => None,
    };
    if let (Some(note), false) = (note, gone) {
        let body = if job.delta {
            format!("\n\n[{note}]")
        } else {
            format!("{answer}\n\n[{note}]")
        };
        gone = stream
            .chunk(format!("{body}{EOS_MARK}").as_bytes())
            .is_err();
    }
    // A turn that failed is not kept: the history stays as it was before it.
    if chunks > 0 && result.is_ok() {
        let mut session = job.session;
        session.turns.push(Turn {
            user: job.user,
            assistant: answer,
            message_id: job.message_id,
        });
        // One write of the whole session: the history never holds half a turn.
        if let Err(e) = job.cs.sessions.save(&job.sid, session) {
            log!("the turn was answered but not saved: {e}");
        }
    }
    guard.unlock();
    let delivered = !gone && stream.finish().is_ok();
    guard.outcome = outcome_of(delivered, chunks, &result);
    if let Some(p) = panic {
        drop(guard); // reported before the worker is replaced
        std::panic::resume_unwind(p);
    }
}
