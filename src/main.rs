//! The `chatstream` command line: `serve` (ChatStream's HTTP API), `generate` (one answer,
//! streamed to stdout or as JSON), `chat` (a console conversation) and `bench` (forward-pass
//! speed on a real or synthetic model). Errors print one line and exit non-zero.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use chatstream::backend::cpu::q8act::{self, Activations};
use chatstream::backend::cpu::Cpu;
use chatstream::backend::cuda::Cuda;
use chatstream::backend::{Backend, KvDtype};
use chatstream::engine::forward::{Logits, RunState, Transformer, MAX_BATCH};
use chatstream::engine::generate::{Engine, GenerateRequest, Generator, PREFILL_CHUNK};
use chatstream::engine::kv_cache::KvCache;
use chatstream::model::dequant::GgmlType;
use chatstream::model::synthetic::synthetic;
use chatstream::model::weights::Tensor;
use chatstream::model::{ModelConfig, Weights};
use chatstream::server::guard::ConnLimits;
use chatstream::server::loadgen::{self, LoadSpec};
use chatstream::server::model::{ChatModel, GenParams, MockChat, MockMode, ModelChat};
use chatstream::server::redis_store::RedisStore;
use chatstream::server::roles::Roles;
use chatstream::server::session::SessionStore;
use chatstream::server::{ChatStream, ServerConfig};
use chatstream::{ChatMessage, Model, SamplingParams};

/// Where `scripts/fetch-model.sh` puts the default model.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "chatstream",
    version,
    about = "Streaming chat for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate one answer and stream it to stdout.
    Generate(GenerateArgs),
    /// Chat with the model in the console, keeping the conversation.
    Chat(ChatArgs),
    /// Serve ChatStream's HTTP API.
    Serve(Box<ServeArgs>),
    /// Measure prefill and decode speed of the forward pass (a real or a synthetic model).
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Load-test a running server instead (host:port): concurrent streamed chat completions
    /// (--decode-tokens long) at each of --levels, reporting aggregate tokens/s, time to
    /// first token and queue wait.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent streams for --url; in process, sequences per coalesced decode step (each
    /// level runs --decode-tokens steps, the levels taking turns 32 steps at a time; one
    /// sequence is always measured).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    levels: Vec<usize>,
    /// Chats per stream at each level, for --url.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// With --url, instead of the levels: time to first token of a conversation's second
    /// turn after a first user message of about this many tokens (the first turn cached
    /// under a prompt_cache_key), against the same prompt sent cold; --rounds of each.
    #[arg(long, requires = "url")]
    second_turn: Option<usize>,
    /// The user message of each chat, for --url.
    #[arg(long, default_value = "Write a short story about a lighthouse keeper.")]
    prompt: String,
    /// The server's --api-key, for --url (`@FILE` reads it from a file).
    #[arg(long, env = "CHATSTREAM_API_KEY")]
    api_key: Option<String>,
    /// A model folder or .gguf file (default: the fetched SmolLM2 model).
    #[arg(long, env = "CHATSTREAM_MODEL", default_value = DEFAULT_MODEL, conflicts_with = "synthetic")]
    model: PathBuf,
    /// A random-weight model of a named shape instead: smollm2-135m, llama-3.2-1b, tiny.
    #[arg(long)]
    synthetic: Option<String>,
    /// How the synthetic model's matrices are stored: f32, f16, bf16, q8_0, q4_0 or q4_1
    /// (as a GGUF file of that type holds them).
    #[arg(long, default_value = "f32", requires = "synthetic")]
    synthetic_format: GgmlType,
    /// Where to run: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens to decode (batch 1) after the prompt; with --url, the length of each answer.
    #[arg(long, default_value_t = 256)]
    decode_tokens: usize,
    /// Tokens already in each sequence's cache when the timed decode steps start (in
    /// process): attention then reads this many positions and more.
    #[arg(long, default_value_t = 16)]
    decode_after: usize,
    /// Memory bandwidth in GB/s to report decode's share of (default 4800, an H200, on CUDA).
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
    #[command(flatten)]
    activations: ActivationArgs,
}

/// How CPU products with 4- and 8-bit weights take their inputs.
#[derive(Args)]
struct ActivationArgs {
    /// How CPU products with Q4_0/Q4_1/Q8_0 weights take their inputs. int16: quantized per
    /// 32-value block to int16 on CPUs with AVX-512 VNNI, decode steps and prompts alike,
    /// about 1.5x as fast as f32 there at decode and 1.9x at prefill, the logits within
    /// 0.0044 of the goldens (their tolerance is 0.01) and greedy answers unchanged; the f32
    /// path elsewhere. f32: exact. int8: decode steps and prompts of up to 16 tokens, as
    /// llama.cpp does, about twice as fast as f32 with AVX-512 VNNI (and faster with AVX2
    /// alone), the logits move by up to about 1. All measured in
    /// tests/quantized_activations.rs.
    #[arg(
        long,
        env = "CHATSTREAM_ACTIVATIONS",
        value_enum,
        default_value_t = Activations::Int16
    )]
    activations: Activations,
    /// The same as --activations int8.
    #[arg(long, env = "CHATSTREAM_INT8_ACTIVATIONS", conflicts_with_all = ["activations", "int16_activations"])]
    int8_activations: bool,
    /// The same as --activations int16.
    #[arg(
        long,
        env = "CHATSTREAM_INT16_ACTIVATIONS",
        conflicts_with = "activations"
    )]
    int16_activations: bool,
}

impl ActivationArgs {
    /// Sets the CPU products' activations for this process.
    fn apply(&self) {
        q8act::set_activations(match (self.int8_activations, self.int16_activations) {
            (true, _) => Activations::Int8,
            (_, true) => Activations::Int16,
            _ => self.activations,
        });
    }
}

/// Prefill and decode timings of one backend, as a JSON object.
fn bench_on<B: Backend>(
    backend: B,
    cfg: &ModelConfig,
    weights: &Weights,
    a: &BenchArgs,
) -> Result<serde_json::Value> {
    let t = Transformer::new(backend, cfg, weights);
    let max = t.max_positions();
    let decode_after = a.decode_after.max(1);
    if a.prompt_len > max || decode_after + 1 + a.decode_tokens > max {
        bail!(
            "--prompt-len {} and --decode-after {} + 1 + --decode-tokens {} must fit the model's {max} positions",
            a.prompt_len,
            decode_after,
            a.decode_tokens
        );
    }
    let tokens = |n: usize| -> Vec<u32> {
        (0..n.max(1))
            .map(|i| (i * 7919 % cfg.vocab_size) as u32)
            .collect()
    };
    let prompt = tokens(a.prompt_len);
    let mut st = RunState::new(&t, PREFILL_CHUNK, 1);
    let mut kv = KvCache::new(&t.backend, cfg, prompt.len());
    let mut prefill_s = Vec::new();
    for _ in 0..3 {
        kv.truncate(0);
        let t0 = Instant::now();
        t.backend
            .within(|| t.prefill(&mut st, &mut kv, &prompt))
            .expect("prefill");
        t.backend.argmax(st.logits(), 0..cfg.vocab_size); // waits for the device
        prefill_s.push(t0.elapsed().as_secs_f64());
    }
    prefill_s.sort_by(f64::total_cmp);
    let (decode_tps, batched) = decode_levels(&t, &tokens(decode_after), a);
    let on_gpu = t.backend.memory().is_some();
    // What one decode step reads: the CPU reads quantized blocks where the file had them,
    // CUDA keeps such matrices as 16-bit floats.
    let tensor_bytes = |w: &Tensor| match (&w.quant, on_gpu) {
        (Some(q), false) => q.qs.len() + 8 * q.scales.len(),
        (Some(_), true) => 2 * w.elements(),
        (None, _) => 4 * w.elements(),
    };
    let weight_bytes: usize = weights
        .layers
        .iter()
        .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
        .chain([weights.output()])
        .map(tensor_bytes)
        .sum();
    let avg_pos = decode_after + a.decode_tokens / 2;
    let bytes_per_token = weight_bytes + 2 * 4 * avg_pos * cfg.n_layers * cfg.kv_dim();
    let bandwidth = a.bandwidth_gbs.or(on_gpu.then_some(4800.0));
    Ok(serde_json::json!({
        "device": t.backend.name(),
        "prefill_tokens": prompt.len(),
        "prefill_tokens_per_s": prompt.len() as f64 / prefill_s[1],
        "decode_tokens": a.decode_tokens,
        "decode_after": decode_after,
        "decode_tokens_per_s": decode_tps,
        "bytes_per_decode_token": bytes_per_token,
        "decode_bandwidth_share": bandwidth.map(|gbs| decode_tps * bytes_per_token as f64 / (gbs * 1e9)),
        "batched_decode": batched,
    }))
}

/// Aggregate decode tokens/s of `a.levels` sequences per step, as the server runs them: one
/// alone (`forward`), more coalesced into one pass (`forward_batch`). Each sequence has its
/// own cache after `prompt`, and each step takes every row's argmax. The levels take turns
/// 32 steps at a time, so that they see the same phases of a shared machine's speed. One
/// sequence is always measured: its tokens/s comes first, and each level's `over_one` is
/// over it.
fn decode_levels<B: Backend>(
    t: &Transformer<B>,
    prompt: &[u32],
    a: &BenchArgs,
) -> (f64, serde_json::Value) {
    let vocab = t.cfg.vocab_size;
    let mut counts: Vec<usize> = a.levels.iter().map(|&n| n.clamp(1, MAX_BATCH)).collect();
    if !counts.contains(&1) {
        counts.insert(0, 1);
    }
    let mut levels: Vec<_> = counts
        .iter()
        .map(|&n| {
            let mut st = RunState::new(t, PREFILL_CHUNK, n);
            let kvs: Vec<KvCache<B>> = (0..n)
                .map(|_| {
                    let mut kv =
                        KvCache::new(&t.backend, &t.cfg, prompt.len() + a.decode_tokens + 1);
                    t.prefill(&mut st, &mut kv, prompt).expect("prefill");
                    kv
                })
                .collect();
            (st, kvs, vec![0u32; n], Duration::ZERO)
        })
        .collect();
    for from in (0..a.decode_tokens).step_by(32) {
        for (st, kvs, next, time) in &mut levels {
            let t0 = Instant::now();
            for _ in from..(from + 32).min(a.decode_tokens) {
                t.backend
                    .within(|| match &mut kvs[..] {
                        [kv] => t.forward(st, kv, next, Logits::Last, None),
                        kvs => t.forward_batch(st, kvs, next),
                    })
                    .expect("decode");
                for (i, id) in next.iter_mut().enumerate() {
                    *id = t
                        .backend
                        .argmax(st.logits(), i * vocab..(i + 1) * vocab)
                        .unwrap_or(0);
                }
            }
            *time += t0.elapsed();
        }
    }
    let rates: Vec<f64> = levels
        .iter()
        .map(|(_, kvs, _, time)| match time.as_secs_f64() {
            0.0 => 0.0,
            secs => (kvs.len() * a.decode_tokens) as f64 / secs,
        })
        .collect();
    let one = rates[counts.iter().position(|&n| n == 1).unwrap_or(0)];
    let levels = counts
        .iter()
        .zip(&rates)
        .map(|(&n, &rate)| {
            serde_json::json!({
                "sequences": n,
                "tokens_per_s": rate,
                "over_one": (one > 0.0).then(|| rate / one),
            })
        })
        .collect();
    (one, levels)
}

/// An `--api-key` value: the key, or `@FILE` to read it from a file.
fn api_key(arg: &Option<String>) -> Result<Option<String>> {
    Ok(match arg {
        Some(k) if k.starts_with('@') => Some(
            std::fs::read_to_string(&k[1..])
                .with_context(|| format!("reading the API key from {}", &k[1..]))?
                .trim()
                .to_string(),
        ),
        other => other.clone(),
    })
}

fn bench(a: BenchArgs) -> Result<()> {
    if let Some(url) = &a.url {
        let spec = LoadSpec {
            addr: loadgen::resolve(url).map_err(anyhow::Error::msg)?,
            prompt: a.prompt.clone(),
            max_new_tokens: a.decode_tokens,
            rounds: a.rounds.max(1),
            api_key: api_key(&a.api_key)?,
        };
        if let Some(tokens) = a.second_turn {
            println!("{}", loadgen::second_turn(&spec, tokens));
            return Ok(());
        }
        for &n in &a.levels {
            println!("{}", loadgen::run_level(&spec, n.max(1)));
        }
        return Ok(());
    }
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up threads")?;
    }
    a.activations.apply();
    let (cfg, weights, name) = match &a.synthetic {
        Some(shape) => {
            let (c, w) = synthetic(shape, 1, a.synthetic_format).map_err(anyhow::Error::msg)?;
            let format = format!("{:?}", a.synthetic_format).to_lowercase();
            (c, w, format!("synthetic:{shape}:{format}"))
        }
        None => {
            let m =
                Model::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
            (m.config, m.weights, m.name)
        }
    };
    let mut result = match a.device.as_str() {
        "cpu" => bench_on(Cpu, &cfg, &weights, &a),
        "auto" => match Cuda::new(0) {
            Ok(g) => bench_on(g, &cfg, &weights, &a),
            Err(e) => {
                eprintln!("chatstream: running on CPU: {e}");
                bench_on(Cpu, &cfg, &weights, &a)
            }
        },
        d => match cuda_ordinal(d) {
            Some(n) => bench_on(
                Cuda::new(n).with_context(|| format!("--device {d}"))?,
                &cfg,
                &weights,
                &a,
            ),
            None => bail!("--device must be auto, cpu, cuda or cuda:N, got {d:?}"),
        },
    }?;
    result["model"] = name.into();
    println!("{result}");
    Ok(())
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Serve without a model: ChatStream's mock responses (round, echo or long).
    #[arg(long, env = "CHATSTREAM_MOCK", num_args = 0..=1, default_missing_value = "round", value_enum)]
    mock: Option<MockMode>,
    /// Delay per mock word, in milliseconds.
    #[arg(long, env = "CHATSTREAM_MOCK_TOKEN_DELAY_MS", default_value_t = 50)]
    mock_token_delay_ms: u64,
    /// Address to listen on.
    #[arg(long, env = "CHATSTREAM_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "CHATSTREAM_PORT", default_value_t = 8000)]
    port: u16,
    /// Answers generated at once (worker threads).
    #[arg(long, env = "CHATSTREAM_CONCURRENCY", default_value_t = 2)]
    concurrency: usize,
    /// Requests that may wait for a worker (0: no waiting room).
    #[arg(long, env = "CHATSTREAM_MAX_QUEUE", default_value_t = 5)]
    max_queue: usize,
    /// Status of the too-many-requests answer: 200 (as ChatStream) or 429.
    #[arg(long, env = "CHATSTREAM_TOO_MANY_REQUESTS_STATUS", default_value_t = 200, value_parser = parse_refusal_status)]
    too_many_requests_status: u16,
    /// Default most new tokens per answer.
    #[arg(long, env = "CHATSTREAM_MAX_NEW_TOKENS", default_value_t = 256)]
    max_new_tokens: usize,
    /// Default temperature (0 = greedy).
    #[arg(long, env = "CHATSTREAM_TEMPERATURE", default_value_t = 0.0)]
    temperature: f32,
    /// Default top-k (0 = off).
    #[arg(long, env = "CHATSTREAM_TOP_K", default_value_t = 0)]
    top_k: usize,
    /// Default top-p (1 = off).
    #[arg(long, env = "CHATSTREAM_TOP_P", default_value_t = 1.0)]
    top_p: f32,
    /// Default min-p (0 = off).
    #[arg(long, env = "CHATSTREAM_MIN_P", default_value_t = 0.0)]
    min_p: f32,
    /// Default repetition penalty (1 = off).
    #[arg(long, env = "CHATSTREAM_REPETITION_PENALTY", default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Node name shown by get_load.
    #[arg(long, env = "CHATSTREAM_NAME", default_value = "node:0")]
    name: String,
    /// Seconds a session may stay idle before it is forgotten.
    #[arg(long, env = "CHATSTREAM_SESSION_IDLE_TTL", default_value_t = 3600)]
    session_idle_ttl: u64,
    /// Where sessions live: `memory` (this process) or `redis://HOST:PORT/DB` (shared by
    /// replicas; the KV caches stay local).
    #[arg(long, env = "CHATSTREAM_SESSION_STORE", default_value = "memory")]
    session_store: String,
    /// Most sessions held (the least recently used is evicted).
    #[arg(long, env = "CHATSTREAM_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    /// Mark the session cookie Secure (behind HTTPS).
    #[arg(long, env = "CHATSTREAM_SECURE_COOKIES")]
    secure_cookies: bool,
    /// Append set_feedback records to this file as JSON lines.
    #[arg(long, env = "CHATSTREAM_FEEDBACK_FILE")]
    feedback_file: Option<PathBuf>,
    /// ChatStream's client_roles dictionary as a JSON file (default: browsers may use the web
    /// UI, chat_stream, clear_context and set_feedback).
    #[arg(long, env = "CHATSTREAM_ROLES")]
    roles: Option<PathBuf>,
    /// MiB of memory for keeping sessions' KV caches between turns (default: a quarter of
    /// the free memory of the device).
    #[arg(long, env = "CHATSTREAM_KV_CACHE_BUDGET")]
    kv_cache_budget: Option<usize>,
    /// An origin allowed to call the API from a browser (repeatable; `*` for any).
    #[arg(
        long = "cors-origin",
        env = "CHATSTREAM_CORS_ORIGIN",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// Require `Authorization: Bearer KEY` on the OpenAI API (/v1/*); `@FILE` reads the key
    /// from a file.
    #[arg(long, env = "CHATSTREAM_API_KEY")]
    api_key: Option<String>,
    /// Seconds a request may wait in the queue; past that it gets the too-many-requests answer.
    #[arg(long, env = "CHATSTREAM_MAX_QUEUE_WAIT")]
    max_queue_wait: Option<f64>,
    /// Seconds running answers may take to finish after Ctrl-C or SIGTERM (the rest are then
    /// cancelled with a final chunk or event).
    #[arg(
        long,
        visible_alias = "drain-timeout",
        env = "CHATSTREAM_SHUTDOWN_GRACE",
        default_value_t = 30
    )]
    shutdown_grace: u64,
    /// Most open connections; past it the longest-idle one is closed, or, when none is idle,
    /// the newcomer gets a fast 503.
    #[arg(long, env = "CHATSTREAM_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a client may take to send a request's head (from its first byte).
    #[arg(long, env = "CHATSTREAM_HEADER_TIMEOUT", default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a client may take to send a request's body.
    #[arg(long, env = "CHATSTREAM_BODY_TIMEOUT", default_value_t = 30.0)]
    body_timeout: f64,
    /// Seconds a client may take no bytes of its answer before it counts as gone.
    #[arg(long, env = "CHATSTREAM_WRITE_TIMEOUT", default_value_t = 30.0)]
    write_timeout: f64,
    /// Seconds a connection with no request in flight stays open.
    #[arg(long, env = "CHATSTREAM_KEEP_ALIVE_TIMEOUT", default_value_t = 60.0)]
    keep_alive_timeout: f64,
    /// Seconds without a new token, while work is pending, after which /ready answers 503
    /// (0 = never).
    #[arg(long, env = "CHATSTREAM_STALL_TIMEOUT", default_value_t = 120.0)]
    stall_timeout: f64,
    /// Title of the web UI.
    #[arg(long, env = "CHATSTREAM_UI_TITLE", default_value = "chatstream")]
    ui_title: String,
    /// Welcome text of the web UI.
    #[arg(
        long,
        env = "CHATSTREAM_UI_WELCOME",
        default_value = "Ask me anything."
    )]
    ui_welcome: String,
}

fn parse_refusal_status(s: &str) -> Result<u16, String> {
    match s {
        "200" => Ok(200),
        "429" => Ok(429),
        _ => Err(format!("must be 200 or 429, got {s}")),
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    // The name goes into a header, log lines and metric labels.
    if a.name.is_empty()
        || !a
            .name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        bail!(
            "--name must be printable ASCII without spaces, quotes or backslashes, got {:?}",
            a.name
        );
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: None,
    };
    sampling.validate()?;
    let roles = match &a.roles {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", path.display()))?;
            Roles::from_json(&v)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}", path.display()))?
        }
        None => Roles::default(),
    };
    for w in &roles.warnings {
        eprintln!("chatstream: warning: {w}");
    }
    let cfg = ServerConfig {
        concurrency: a.concurrency.max(1),
        max_queue: a.max_queue,
        too_many_requests_status: a.too_many_requests_status,
        context_len: a.model.context_len,
        default_params: GenParams {
            sampling,
            max_new_tokens: a.max_new_tokens,
            stop: vec![],
        },
        name: a.name.clone(),
        session_idle_ttl: Duration::from_secs(a.session_idle_ttl),
        max_sessions: a.max_sessions,
        secure_cookies: a.secure_cookies,
        feedback_file: a.feedback_file.clone(),
        ui_title: a.ui_title.clone(),
        ui_welcome: a.ui_welcome.clone(),
        roles,
        cors_origins: a.cors_origins.clone(),
        max_queue_wait: a.max_queue_wait.map(Duration::from_secs_f64),
        stall_timeout: (a.stall_timeout > 0.0).then(|| Duration::from_secs_f64(a.stall_timeout)),
        api_key: api_key(&a.api_key)?,
        ..ServerConfig::default()
    };
    let sessions: Option<Arc<dyn SessionStore>> = match a.session_store.as_str() {
        "memory" => None,
        url if url.starts_with("redis://") => {
            let store = RedisStore::new(url, Duration::from_secs(a.session_idle_ttl))
                .map_err(anyhow::Error::msg)?;
            if let Err(e) = store.health() {
                eprintln!("chatstream: warning: {e}; session requests get 503 until it answers");
            }
            Some(Arc::new(store))
        }
        other => bail!("--session-store must be memory or redis://HOST:PORT/DB, got {other:?}"),
    };
    let kv_budget = a.kv_cache_budget.map(|mb| mb << 20);
    // Bound before loading, so that /health answers and /ready says "loading" meanwhile.
    let limits = ConnLimits {
        max_connections: a.max_connections.max(1),
        head_timeout: Duration::from_secs_f64(a.header_timeout),
        body_timeout: Duration::from_secs_f64(a.body_timeout),
        idle_timeout: Duration::from_secs_f64(a.keep_alive_timeout),
        write_timeout: Duration::from_secs_f64(a.write_timeout),
        ..ConnLimits::default()
    };
    let listener = chatstream::server::bind(&format!("{}:{}", a.host, a.port), limits)
        .with_context(|| format!("binding {}:{}", a.host, a.port))?;
    let load_started = Instant::now();
    let model: Arc<dyn ChatModel> = match a.mock {
        Some(mode) => Arc::new(MockChat::new(
            mode,
            Duration::from_millis(a.mock_token_delay_ms),
        )),
        None => match load(&a.model)? {
            Loaded::Cpu(g) => Arc::new(ModelChat::new(
                Arc::clone(g.engine()),
                a.model.context_len,
                kv_budget,
            )),
            Loaded::Cuda(g) => Arc::new(ModelChat::new(
                Arc::clone(g.engine()),
                a.model.context_len,
                kv_budget,
            )),
        },
    };
    let (name, device) = (model.name(), model.device());
    let cs = match sessions {
        Some(store) => ChatStream::with_sessions(cfg, model, store),
        None => ChatStream::new(cfg, model),
    };
    cs.metrics
        .set_model_load_seconds(load_started.elapsed().as_secs_f64());
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let handle = listener
        .serve(Arc::clone(&cs))
        .context("starting the server threads")?;
    eprintln!(
        "chatstream: ready on http://{} model={name} device={device} concurrency={} max_queue={} context_len={} kv_cache={} name={}",
        handle.addr, a.concurrency.max(1), a.max_queue, a.model.context_len,
        format!("{:?}", a.model.kv_cache_dtype).to_lowercase(), a.name
    );
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "chatstream: node={} shutting down: no new turns; waiting up to {}s for running ones",
        a.name, a.shutdown_grace
    );
    cs.start_draining();
    let mut finished = cs.wait_idle(Duration::from_secs(a.shutdown_grace));
    if !finished {
        // Past the grace period: stop the rest with a final chunk, and let their callbacks run.
        cs.cancel_running();
        finished = cs.wait_idle(Duration::from_secs(5));
    }
    handle.shutdown();
    eprintln!(
        "chatstream: node={} stopped ({})",
        a.name,
        if finished {
            "every request accounted for"
        } else {
            "requests still running"
        }
    );
    Ok(())
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long, env = "CHATSTREAM_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, env = "CHATSTREAM_THREADS")]
    threads: Option<usize>,
    /// Where to run: auto (CUDA when usable, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "CHATSTREAM_DEVICE", default_value = "auto")]
    device: String,
    /// Tokens of context (prompt plus answer) to allocate the KV cache for.
    #[arg(long, env = "CHATSTREAM_CONTEXT_LEN", default_value_t = 4096)]
    context_len: usize,
    #[command(flatten)]
    activations: ActivationArgs,
    /// How KV caches store keys and values: f32 (exact) or f16 (CPU only: half the memory,
    /// so twice the sessions in the budget, and attention reads half as much; the logits
    /// move a little, measured in tests/golden_smollm2.rs).
    #[arg(long, env = "CHATSTREAM_KV_CACHE_DTYPE", value_enum, default_value_t = KvDtype::F32)]
    kv_cache_dtype: KvDtype,
}

#[derive(Args)]
struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed for sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-turn tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The user's message.
    #[arg(
        long,
        conflicts_with = "messages",
        required_unless_present = "messages"
    )]
    prompt: Option<String>,
    /// A JSON file with an array of {"role","content"} messages.
    #[arg(long)]
    messages: Option<PathBuf>,
    /// A system message put first.
    #[arg(long)]
    system: Option<String>,
    /// Feed --prompt as raw text, without the chat template.
    #[arg(long, requires = "prompt")]
    raw: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message for the conversation.
    #[arg(long)]
    system: Option<String>,
}

/// A model loaded on the backend `--device` chose.
#[allow(
    clippy::large_enum_variant,
    reason = "one value per process, moved once"
)]
enum Loaded {
    Cpu(Generator<Cpu>),
    Cuda(Generator<Cuda>),
}

/// Parses `cuda` / `cuda:N` into a device ordinal.
fn cuda_ordinal(device: &str) -> Option<usize> {
    match device.strip_prefix("cuda") {
        Some("") => Some(0),
        Some(rest) => rest.strip_prefix(':')?.parse().ok(),
        None => None,
    }
}

fn load(args: &ModelArgs) -> Result<Loaded> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up threads")?;
    }
    args.activations.apply();
    // An explicit CUDA device is opened first (fail fast); `auto` looks for one after the
    // model loaded, so a bad model path is the one error reported.
    let mut gpu = match args.device.as_str() {
        "cpu" | "auto" => None,
        d => match cuda_ordinal(d) {
            Some(n) => Some(Cuda::new(n).with_context(|| format!("--device {d}"))?),
            None => bail!("--device must be auto, cpu, cuda or cuda:N, got {d:?}"),
        },
    };
    let model =
        Model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    if args.device == "auto" {
        match Cuda::new(0) {
            Ok(g) => gpu = Some(g),
            Err(e) => eprintln!("chatstream: running on CPU: {e}"),
        }
    }
    let dtype = args.kv_cache_dtype;
    let kv = |e: String| anyhow!("--kv-cache-dtype: {e}");
    Ok(match gpu {
        Some(g) => Loaded::Cuda(Generator::new(
            Arc::new(Engine::new(model, g).with_kv_dtype(dtype).map_err(kv)?),
            args.context_len,
        )),
        None => Loaded::Cpu(Generator::new(
            Arc::new(Engine::new(model, Cpu).with_kv_dtype(dtype).map_err(kv)?),
            args.context_len,
        )),
    })
}

fn generate<B: Backend + 'static>(a: GenerateArgs, mut gen: Generator<B>) -> Result<()> {
    let model = &gen.engine().model;
    let prompt_ids = if a.raw {
        let text = a.prompt.as_deref().unwrap_or_default();
        model
            .tokenizer
            .encode(text, true)
            .map_err(anyhow::Error::msg)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        match (&a.prompt, &a.messages) {
            (Some(p), _) => messages.push(ChatMessage::new("user", p)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let m: Vec<ChatMessage> = serde_json::from_str(&text).with_context(|| {
                    format!("{}: expected [{{\"role\",\"content\"}}]", path.display())
                })?;
                messages.extend(m);
            }
            (None, None) => bail!("give --prompt or --messages"),
        }
        model.encode_chat(&messages)?
    };
    let req = GenerateRequest {
        prompt_ids,
        max_new_tokens: a.sampling.max_new_tokens,
        sampling: a.sampling.params(),
        stop: a.sampling.stop.clone(),
        ignore_eos: a.sampling.ignore_eos,
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let out = gen.generate(&req, &mut |piece| {
        if json {
            return true;
        }
        let mut lock = stdout.lock();
        // A closed stdout (e.g. piped into `head`) ends generation quietly.
        lock.write_all(piece.as_bytes())
            .and_then(|_| lock.flush())
            .is_ok()
    })?;
    if json {
        let v = serde_json::json!({
            "prompt_token_ids": req.prompt_ids,
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason.as_str(),
            "prefill_tokens_per_s": out.prefill_tokens_per_s,
            "decode_tokens_per_s": out.decode_tokens_per_s,
        });
        println!("{v}");
    } else {
        println!();
    }
    Ok(())
}

fn chat<B: Backend + 'static>(a: ChatArgs, mut gen: Generator<B>) -> Result<()> {
    let mut history = Vec::new();
    if let Some(s) = &a.system {
        history.push(ChatMessage::new("system", s));
    }
    eprintln!(
        "chatstream: {} loaded. Type a message; an empty line or Ctrl-D quits, /clear forgets.",
        gen.engine().model.name
    );
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line == "/clear" {
            history.truncate(usize::from(a.system.is_some()));
            continue;
        }
        history.push(ChatMessage::new("user", line));
        let prompt_ids = gen.engine().model.encode_chat(&history)?;
        let req = GenerateRequest {
            prompt_ids,
            max_new_tokens: a.sampling.max_new_tokens,
            sampling: a.sampling.params(),
            stop: a.sampling.stop.clone(),
            ignore_eos: a.sampling.ignore_eos,
        };
        let out = gen.generate(&req, &mut |piece| {
            let mut lock = stdout.lock();
            lock.write_all(piece.as_bytes())
                .and_then(|_| lock.flush())
                .is_ok()
        });
        println!();
        match out {
            Ok(out) => history.push(ChatMessage::new("assistant", &out.text)),
            Err(e) => {
                history.pop();
                eprintln!("error: {e}");
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Generate(a) => load(&a.model).and_then(|g| match g {
            Loaded::Cpu(g) => generate(a, g),
            Loaded::Cuda(g) => generate(a, g),
        }),
        Cmd::Chat(a) => load(&a.model).and_then(|g| match g {
            Loaded::Cpu(g) => chat(a, g),
            Loaded::Cuda(g) => chat(a, g),
        }),
        Cmd::Serve(a) => serve(*a),
        Cmd::Bench(a) => bench(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatstream: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
