//! The HTTP server: `ChatStream` (configuration, model, worker pool, sessions) and the
//! acceptor that routes each request. Cheap endpoints are answered on the acceptor thread;
//! a chat turn is admitted into the pool or refused at once. `serve` binds and runs it.

/// Prints one log line carrying the node name (`--name`), so replicas can be told apart.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("chatstream: node={} {}", $crate::server::node(), format_args!($($arg)*))
    };
}

pub mod api;
pub mod chat;
pub mod guard;
pub mod http;
pub mod kv_pool;
pub mod loadgen;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod pool;
pub mod redis_store;
pub mod roles;
pub mod session;
pub mod waiting;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Method, Request};

use guard::{ConnLimits, Guard, SocketDir};
use metrics::Metrics;
use model::{ChatModel, GenParams};
use pool::Pool;
use roles::{Role, Roles};
use session::{MemoryStore, SessionStore};

pub use chat::{FinishCallback, FinishOutcome};

static NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The node name log lines carry: the first server's `--name` in this process.
pub fn node() -> &'static str {
    NODE.get().map_or("node:0", String::as_str)
}

/// Server settings (the `serve` options).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Worker threads: the most answers generated at once.
    pub concurrency: usize,
    /// Requests that may wait for a worker; 0 means none.
    pub max_queue: usize,
    /// Status of the too-many-requests answer (200 as ChatStream, or 429).
    pub too_many_requests_status: u16,
    /// Tokens of context per conversation (prompt plus answer).
    pub context_len: usize,
    /// Default generation settings of a new session.
    pub default_params: GenParams,
    /// Node name reported by `get_load`.
    pub name: String,
    /// Sessions idle this long are forgotten.
    pub session_idle_ttl: Duration,
    /// Most sessions held.
    pub max_sessions: usize,
    /// Mark the session cookie `Secure`.
    pub secure_cookies: bool,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Where `set_feedback` appends its JSON lines (none: kept nowhere).
    pub feedback_file: Option<PathBuf>,
    /// Title of the web UI.
    pub ui_title: String,
    /// Welcome text of the web UI.
    pub ui_welcome: String,
    /// Who may call which API.
    pub roles: Roles,
    /// Origins allowed to call the API from a browser (`*` for any).
    pub cors_origins: Vec<String>,
    /// When set, `/v1/*` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// A request that waited this long without starting is refused as too many.
    pub max_queue_wait: Option<Duration>,
    /// `/ready` fails when work is pending and no token came out for this long.
    pub stall_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            concurrency: 2,
            max_queue: 5,
            too_many_requests_status: 200,
            context_len: 2048,
            default_params: GenParams {
                sampling: crate::SamplingParams::default(),
                max_new_tokens: 256,
                stop: vec![],
            },
            name: "node:0".into(),
            session_idle_ttl: Duration::from_secs(3600),
            max_sessions: 10_000,
            secure_cookies: false,
            max_body_bytes: 1 << 20,
            feedback_file: None,
            ui_title: "chatstream".into(),
            ui_welcome: "Ask me anything.".into(),
            roles: Roles::default(),
            cors_origins: Vec::new(),
            api_key: None,
            max_queue_wait: None,
            stall_timeout: Some(Duration::from_secs(120)),
        }
    }
}

/// The server's state, shared by the acceptor and the workers.
pub struct ChatStream {
    /// Settings.
    pub cfg: ServerConfig,
    /// The model.
    pub model: Arc<dyn ChatModel>,
    /// Workers and admission.
    pub pool: Pool,
    /// Conversations.
    pub sessions: Arc<dyn SessionStore>,
    /// Counters and histograms for `/metrics`.
    pub metrics: Metrics,
    /// Streams waiting for a worker, pinged with their place.
    waiting: waiting::WaitingRoom,
    /// Serialises appends to the feedback file.
    feedback_lock: Mutex<()>,
    /// Set when shutting down: new turns are refused with 503.
    draining: AtomicBool,
    /// Set when the shutdown grace period is over: running answers stop at their next piece.
    cancelling: AtomicBool,
}

impl ChatStream {
    /// Appends one JSON line to the feedback file, if one is configured.
    pub fn record_feedback(&self, line: &serde_json::Value) -> std::io::Result<()> {
        use std::io::Write;
        let Some(path) = &self.cfg.feedback_file else {
            return Ok(());
        };
        let _guard = self.feedback_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")
    }

    /// Starts `cfg.concurrency` workers for `model`, with sessions in this process's memory.
    pub fn new(cfg: ServerConfig, model: Arc<dyn ChatModel>) -> Arc<ChatStream> {
        let sessions = Arc::new(MemoryStore::new(cfg.session_idle_ttl, cfg.max_sessions));
        ChatStream::with_sessions(cfg, model, sessions)
    }

    /// Starts `cfg.concurrency` workers for `model`, with sessions in `sessions` (e.g. Redis,
    /// shared by several replicas).
    pub fn with_sessions(
        cfg: ServerConfig,
        model: Arc<dyn ChatModel>,
        sessions: Arc<dyn SessionStore>,
    ) -> Arc<ChatStream> {
        let _ = NODE.set(cfg.name.clone());
        let pool = Pool::new(Arc::clone(&model), cfg.concurrency.max(1), cfg.max_queue);
        Arc::new(ChatStream {
            cfg,
            model,
            pool,
            sessions,
            metrics: Metrics::default(),
            waiting: waiting::WaitingRoom::default(),
            feedback_lock: Mutex::new(()),
            draining: AtomicBool::new(false),
            cancelling: AtomicBool::new(false),
        })
    }

    /// Routes one request: unknown paths are 404, wrong methods 405, APIs the caller's role
    /// does not allow 403.
    pub fn handle(self: &Arc<Self>, req: Request) {
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let Some((_, method, api)) = ROUTES.iter().find(|r| r.0 == path) else {
            return self.reply_error(req, 404, "not_found", &format!("no such path: {path}"));
        };
        let api = *api;
        if *req.method() == Method::Options {
            return self.preflight(req);
        }
        if req.method() != method {
            let msg = format!("{} is not allowed on {path} (use {method})", req.method());
            return self.reply_error(req, 405, "method_not_allowed", &msg);
        }
        match api {
            "chat_stream" => return self.handle_chat_stream_request(req, None, None),
            // The OpenAI API has its own auth (--api-key), not the role layer.
            "openai_chat" | "openai_models" if !openai::authorized(self, &req) => {
                return openai::unauthorized(self, req)
            }
            "openai_chat" => return openai::chat_completions(self, req),
            "openai_models" => return openai::models(self, req),
            _ => {}
        }
        if !self.allowed(&req, api) {
            return self.forbidden(req);
        }
        match api {
            "clear_context" => api::clear_context(self, req),
            "get_prompt" => api::get_prompt(self, req),
            "set_generation_params" => api::set_generation_params(self, req),
            "get_generation_params" => api::get_generation_params(self, req),
            "get_load" => api::get_load(self, req),
            "set_feedback" => api::set_feedback(self, req),
            "get_resource_usage" => api::get_resource_usage(self, req),
            "metrics" => api::metrics(self, req),
            "webui_index" => api::webui_index(self, req),
            "webui_js" => api::webui_js(self, req),
            "ready" => self.ready(req),
            _ => self.reply_json(req, 200, &serde_json::json!({"status": "ok"}), vec![]),
        }
    }

    /// The caller's role: for programs (`X-FastSession-Skip: skip`) the one their
    /// `X-ChatStream-Auth-Header` phrase names, else the default program role; for browsers
    /// the role granted to their session, else the default browser role.
    pub fn caller_role(&self, req: &Request) -> Option<&Role> {
        let roles = &self.cfg.roles;
        if is_program(req) {
            return match http::header_value(req, "X-ChatStream-Auth-Header") {
                Some(phrase) => roles.by_header_phrase(&phrase),
                None => roles.default_role(false),
            };
        }
        let granted = http::cookie(req, "sid")
            .and_then(|sid| self.sessions.load(&sid).ok().flatten())
            .and_then(|s| s.role);
        match granted {
            Some(name) => roles.get(&name),
            None => roles.default_role(true),
        }
    }

    /// CORS headers for a request whose `Origin` is one of `--cors-origin`: that origin, with
    /// credentials (the session cookie). With `*` any other origin gets `*` and no
    /// credentials, so a wildcard never lets another site use a visitor's session.
    pub fn cors_headers(&self, req: &Request) -> Vec<(&'static str, String)> {
        let Some(origin) = http::header_value(req, "Origin") else {
            return vec![];
        };
        let origins = &self.cfg.cors_origins;
        let mut headers = if origins.contains(&origin) {
            vec![
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true".into()),
            ]
        } else if origins.iter().any(|o| o == "*") {
            vec![("Access-Control-Allow-Origin", "*".into())]
        } else {
            return vec![];
        };
        headers.push((
            "Access-Control-Expose-Headers",
            "X-ChatStream-Last-Generated-Message-Id, X-ChatStream-API-DevTool-Enabled, Retry-After"
                .into(),
        ));
        headers.push(("Vary", "Origin".into()));
        headers
    }

    /// Sends `resp` with the node name and the request's CORS headers added; a client that has
    /// gone is no error.
    pub fn respond(&self, req: Request, mut resp: tiny_http::ResponseBox) {
        resp.add_header(http::header("X-ChatStream-Node", &self.cfg.name));
        for (k, v) in self.cors_headers(&req) {
            resp.add_header(http::header(k, &v));
        }
        let _ = req.respond(resp);
    }

    /// Answers with a JSON body and extra headers.
    pub fn reply_json(
        &self,
        req: Request,
        status: u16,
        body: &serde_json::Value,
        headers: Vec<tiny_http::Header>,
    ) {
        let mut resp = tiny_http::Response::from_string(body.to_string())
            .with_status_code(status)
            .with_header(http::header("Content-Type", "application/json"));
        for h in headers {
            resp.add_header(h);
        }
        self.respond(req, resp.boxed());
    }

    /// A 4xx/5xx with `{"error": code, "message": message}` (a 503 with `Retry-After`).
    pub fn reply_error(&self, req: Request, status: u16, code: &str, message: &str) {
        let retry = (status == 503).then(|| http::header("Retry-After", "5"));
        self.reply_json(
            req,
            status,
            &serde_json::json!({"error": code, "message": message}),
            retry.into_iter().collect(),
        );
    }

    /// The 503 for a request that needs the session store while it is unreachable.
    pub fn store_down(&self, req: Request, e: &session::StoreDown) {
        self.reply_error(req, 503, "session_store_unavailable", &e.to_string());
    }

    /// ChatStream's refusal on the role layer.
    pub fn forbidden(&self, req: Request) {
        let body = serde_json::json!({"success": false, "message": "Forbidden", "detail": "Denied on role layer."});
        self.reply_json(req, 403, &body, vec![]);
    }

    /// Answers a CORS preflight for an allowed origin (204), or refuses it (403).
    fn preflight(&self, req: Request) {
        if self.cors_headers(&req).is_empty() {
            return self.reply_error(req, 403, "cors", "origin not allowed (see --cors-origin)");
        }
        let resp = tiny_http::Response::empty(204)
            .with_header(http::header(
                "Access-Control-Allow-Methods",
                "GET, POST, OPTIONS",
            ))
            .with_header(http::header(
                "Access-Control-Allow-Headers",
                "Content-Type, X-ChatStream-Auth-Header, X-FastSession-Skip",
            ))
            .with_header(http::header("Access-Control-Max-Age", "600"));
        self.respond(req, resp.boxed());
    }

    /// Stops admitting new turns (they get 503); running ones go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stops every running answer at its next piece, with a final chunk or event saying why
    /// (their callbacks still fire).
    pub fn cancel_running(&self) {
        self.cancelling.store(true, Ordering::SeqCst);
    }

    /// Whether running answers are being cancelled.
    pub fn is_cancelling(&self) -> bool {
        self.cancelling.load(Ordering::SeqCst)
    }

    /// Whether the server is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Waits until no turn is running or waiting, at most `grace`; true if it got there.
    pub fn wait_idle(&self, grace: Duration) -> bool {
        let deadline = std::time::Instant::now() + grace;
        loop {
            let l = self.pool.load();
            if l.processing == 0 && l.waiting == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/ready`: 200, or 503 while draining, when the engine is stalled or when the session
    /// store cannot be reached.
    fn ready(&self, req: Request) {
        let stalled = || self.cfg.stall_timeout.is_some_and(|t| self.pool.stalled(t));
        let status = if self.is_draining() {
            "draining"
        } else if stalled() {
            "stalled"
        } else if self.sessions.health().is_err() {
            "session_store_unavailable"
        } else {
            return self.reply_json(req, 200, &serde_json::json!({"status": "ok"}), vec![]);
        };
        let body = serde_json::json!({"status": status});
        self.reply_json(req, 503, &body, vec![http::header("Retry-After", "5")]);
    }

    /// Whether the caller's role allows `api` (`health` and `ready` are always allowed).
    pub fn allowed(&self, req: &Request, api: &str) -> bool {
        matches!(api, "health" | "ready") || self.caller_role(req).is_some_and(|r| r.allows(api))
    }
}

/// Whether the request comes from a program that keeps no session.
pub fn is_program(req: &Request) -> bool {
    http::header_value(req, "X-FastSession-Skip").is_some_and(|v| v.eq_ignore_ascii_case("skip"))
}

/// Every path: (path, method, API name for the role layer).
pub const ROUTES: &[(&str, Method, &str)] = &[
    ("/chat_stream", Method::Post, "chat_stream"),
    ("/clear_context", Method::Post, "clear_context"),
    ("/get_prompt", Method::Get, "get_prompt"),
    (
        "/set_generation_params",
        Method::Post,
        "set_generation_params",
    ),
    (
        "/get_generation_params",
        Method::Get,
        "get_generation_params",
    ),
    ("/get_load", Method::Get, "get_load"),
    ("/set_feedback", Method::Post, "set_feedback"),
    ("/get_resource_usage", Method::Get, "get_resource_usage"),
    ("/metrics", Method::Get, "metrics"),
    ("/", Method::Get, "webui_index"),
    ("/index.html", Method::Get, "webui_index"),
    ("/chatstream.js", Method::Get, "webui_js"),
    ("/health", Method::Get, "health"),
    ("/ready", Method::Get, "ready"),
    ("/v1/chat/completions", Method::Post, "openai_chat"),
    ("/v1/models", Method::Get, "openai_models"),
];

/// Threads that read request bodies and answer the cheap endpoints.
const FRONT_THREADS: usize = 8;

/// A running server.
pub struct ServerHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// The connection guard in front of tiny_http.
    pub guard: Guard,
    server: Arc<tiny_http::Server>,
    acceptor: Option<JoinHandle<()>>,
    /// Last, so that the server is gone before its socket's folder is removed.
    _dir: SocketDir,
}

impl ServerHandle {
    /// Stops accepting and waits for the acceptor thread.
    pub fn shutdown(mut self) {
        self.guard.stop();
        self.server.unblock();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }

    /// Blocks until the acceptor ends.
    pub fn join(mut self) {
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// A bound socket, answered while the model loads: `/health` is 200, everything else 503
/// with `Retry-After` (`/ready` says `loading`), until `serve` takes it over.
pub struct Listener {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    guard: Option<Guard>,
    server: Arc<tiny_http::Server>,
    dir: Option<SocketDir>,
    loading: Arc<AtomicBool>,
    answerer: Option<JoinHandle<()>>,
}

/// Binds `addr` with the connection guard's `limits` in front, and answers as loading until
/// `Listener::serve`.
pub fn bind(addr: &str, limits: ConnLimits) -> std::io::Result<Listener> {
    let tcp = std::net::TcpListener::bind(addr)?;
    let dir = SocketDir::new()?;
    let unix = std::os::unix::net::UnixListener::bind(dir.socket())?;
    let server =
        Arc::new(tiny_http::Server::from_listener(unix, None).map_err(std::io::Error::other)?);
    let guard = Guard::start(tcp, dir.socket(), limits)?;
    let addr = guard.addr;
    let loading = Arc::new(AtomicBool::new(true));
    let (s, l) = (Arc::clone(&server), Arc::clone(&loading));
    let answerer = std::thread::Builder::new()
        .name("loading".into())
        .spawn(move || {
            while l.load(Ordering::SeqCst) {
                match s.recv_timeout(Duration::from_millis(50)) {
                    Ok(Some(req)) => answer_loading(req),
                    Ok(None) => {}
                    Err(_) => return,
                }
            }
        })?;
    Ok(Listener {
        addr,
        guard: Some(guard),
        dir: Some(dir),
        server,
        loading,
        answerer: Some(answerer),
    })
}

fn answer_loading(req: Request) {
    let (status, body) = match req.url() {
        "/health" => (200, serde_json::json!({"status": "ok"})),
        "/ready" => (503, serde_json::json!({"status": "loading"})),
        _ => (
            503,
            serde_json::json!({"error": "loading", "message": "the model is loading; retry shortly"}),
        ),
    };
    let resp = tiny_http::Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(http::header("Content-Type", "application/json"))
        .with_header(http::header("Retry-After", "5"));
    let _ = req.respond(resp);
}

/// Binds `addr` (with the default connection limits) and serves `cs`.
pub fn serve(cs: Arc<ChatStream>, addr: &str) -> std::io::Result<ServerHandle> {
    bind(addr, ConnLimits::default())?.serve(cs)
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.loading.store(false, Ordering::SeqCst);
        if let Some(t) = self.answerer.take() {
            let _ = t.join();
        }
    }
}

impl Listener {
    /// Stops answering as loading and serves `cs`.
    pub fn serve(mut self, cs: Arc<ChatStream>) -> std::io::Result<ServerHandle> {
        drop(self.answerer.take().map(|t| {
            self.loading.store(false, Ordering::SeqCst);
            t.join()
        }));
        let (server, addr) = (Arc::clone(&self.server), self.addr);
        // The acceptor hands each request to a few front threads, so that one client sending
        // its body slowly holds up one front thread, not every request behind it.
        let (tx, rx) = crossbeam_channel::unbounded::<Request>();
        for i in 0..FRONT_THREADS {
            let (rx, cs) = (rx.clone(), Arc::clone(&cs));
            std::thread::Builder::new()
                .name(format!("front-{i}"))
                .spawn(move || {
                    for req in rx.iter() {
                        cs.handle(req);
                    }
                })?;
        }
        let s = Arc::clone(&server);
        let acceptor = std::thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    if tx.send(req).is_err() {
                        break;
                    }
                }
            })?;
        let guard = self.guard.take().expect("a listener serves once");
        let dir = self.dir.take().expect("a listener serves once");
        Ok(ServerHandle {
            addr,
            guard,
            server,
            acceptor: Some(acceptor),
            _dir: dir,
        })
    }
}
