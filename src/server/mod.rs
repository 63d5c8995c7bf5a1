//! The HTTP server: `ChatStream` (configuration, model, worker pool, sessions) and the
//! acceptor that routes each request. Cheap endpoints are answered on the acceptor thread;
//! a chat turn is admitted into the pool or refused at once. `serve` binds and runs it.

pub mod api;
pub mod chat;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Method, Request};

use metrics::Metrics;
use model::{ChatModel, GenParams};
use pool::Pool;
use session::{MemoryStore, SessionStore};

pub use chat::{FinishCallback, FinishOutcome};

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
            },
            name: "node:0".into(),
            session_idle_ttl: Duration::from_secs(3600),
            max_sessions: 10_000,
            secure_cookies: false,
            max_body_bytes: 1 << 20,
            feedback_file: None,
            ui_title: "chatstream".into(),
            ui_welcome: "Ask me anything.".into(),
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
    /// Serialises appends to the feedback file.
    feedback_lock: Mutex<()>,
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

    /// Starts `cfg.concurrency` workers for `model`.
    pub fn new(cfg: ServerConfig, model: Arc<dyn ChatModel>) -> Arc<ChatStream> {
        let workers = (0..cfg.concurrency.max(1))
            .map(|_| model.new_worker())
            .collect();
        let pool = Pool::new(workers, cfg.max_queue);
        let sessions = Arc::new(MemoryStore::new(cfg.session_idle_ttl, cfg.max_sessions));
        Arc::new(ChatStream {
            cfg,
            model,
            pool,
            sessions,
            metrics: Metrics::default(),
            feedback_lock: Mutex::new(()),
        })
    }

    /// Routes one request: unknown paths are 404, wrong methods 405.
    pub fn handle(self: &Arc<Self>, req: Request) {
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let get = *req.method() == Method::Get;
        let post = *req.method() == Method::Post;
        match (path.as_str(), get, post) {
            ("/chat_stream", _, true) => self.handle_chat_stream_request(req, None, None),
            ("/clear_context", _, true) => api::clear_context(self, req),
            ("/get_prompt", true, _) => api::get_prompt(self, req),
            ("/set_generation_params", _, true) => api::set_generation_params(self, req),
            ("/get_generation_params", true, _) => api::get_generation_params(self, req),
            ("/get_load", true, _) => api::get_load(self, req),
            ("/set_feedback", _, true) => api::set_feedback(self, req),
            ("/get_resource_usage", true, _) => api::get_resource_usage(self, req),
            ("/metrics", true, _) => api::metrics(self, req),
            ("/", true, _) | ("/index.html", true, _) => api::webui_index(self, req),
            ("/chatstream.js", true, _) => api::webui_js(self, req),
            ("/health", true, _) => {
                http::respond_json(req, 200, &serde_json::json!({"status": "ok"}), vec![])
            }
            (p, _, _) if ROUTES.contains(&p) => {
                let m = req.method().to_string();
                http::respond_error(
                    req,
                    405,
                    "method_not_allowed",
                    &format!("{m} is not allowed on {p}"),
                )
            }
            (p, _, _) => http::respond_error(req, 404, "not_found", &format!("no such path: {p}")),
        }
    }
}

const ROUTES: &[&str] = &[
    "/chat_stream",
    "/clear_context",
    "/get_prompt",
    "/set_generation_params",
    "/get_generation_params",
    "/get_load",
    "/set_feedback",
    "/get_resource_usage",
    "/metrics",
    "/health",
    "/",
    "/index.html",
    "/chatstream.js",
];

/// A running server.
pub struct ServerHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    acceptor: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops accepting and waits for the acceptor thread.
    pub fn shutdown(mut self) {
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

/// Binds `addr` and serves `cs` on one acceptor thread.
pub fn serve(cs: Arc<ChatStream>, addr: &str) -> std::io::Result<ServerHandle> {
    let server = Arc::new(tiny_http::Server::http(addr).map_err(std::io::Error::other)?);
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("not an IP listener"))?;
    let s = Arc::clone(&server);
    let acceptor = std::thread::Builder::new()
        .name("acceptor".into())
        .spawn(move || {
            for req in s.incoming_requests() {
                cs.handle(req);
            }
        })?;
    Ok(ServerHandle {
        addr,
        server,
        acceptor: Some(acceptor),
    })
}
