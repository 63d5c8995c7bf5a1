//! What the server generates with: `ChatModel` (shared: renders prompts, counts tokens,
//! makes workers) and `ChatWorker` (one per pool thread: generates). Implemented by a real
//! model on a backend and by ChatStream's mock mode (no model, words with a delay).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::Backend;
use crate::engine::generate::{Engine, FinishReason, GenerateRequest, Generator};
use crate::engine::kv_cache::SeqCache;
use crate::engine::stop::StopStrings;
use crate::model::{ChatMessage, ChatTemplate};
use crate::SamplingParams;

use super::kv_pool::KvPool;

/// Generation settings of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenParams {
    /// Sampling.
    pub sampling: SamplingParams,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Strings that end the answer (OpenAI's `stop`).
    pub stop: Vec<String>,
}

/// How one generation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenStats {
    /// Why it ended.
    pub finish: FinishReason,
    /// New tokens produced.
    pub tokens: usize,
    /// Prompt tokens, and how many of them came from a kept KV cache.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused, not prefilled.
    pub cached_tokens: usize,
}

/// A model the server can chat with.
pub trait ChatModel: Send + Sync {
    /// A name for logs and `/v1/models`.
    fn name(&self) -> String;
    /// The device it runs on.
    fn device(&self) -> String;
    /// Renders the conversation with the generation prompt.
    fn render(&self, messages: &[ChatMessage]) -> Result<String, String>;
    /// Tokens the rendered prompt takes.
    fn count_tokens(&self, prompt: &str) -> Result<usize, String>;
    /// A generator for one worker thread.
    fn new_worker(&self) -> Box<dyn ChatWorker>;
    /// Memory of the GPUs in use: `{"device", "free_bytes", "used_bytes", "total_bytes"}`.
    fn gpus(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }
    /// Bytes of KV cache allocated: the workers' caches and the sessions' kept ones.
    fn kv_cache_bytes(&self) -> usize {
        0
    }
    /// Coalesced decode passes run so far, and the decode steps they carried.
    fn decode_batches(&self) -> (usize, usize) {
        (0, 0)
    }
}

/// One worker's generator.
pub trait ChatWorker: Send {
    /// Generates an answer to `prompt`, passing text pieces to `on_text` (false = stop).
    /// `session`, when given, names the conversation so its KV cache can be kept for the
    /// next turn.
    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
        session: Option<&str>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats, String>;
}

/// A real model on a backend.
pub struct ModelChat<B: Backend> {
    engine: Arc<Engine<B>>,
    context_len: usize,
    pool: Arc<Mutex<KvPool<B>>>,
    /// Bytes of one KV cache, and the live workers (each owns one).
    per_cache: usize,
    workers: Arc<AtomicUsize>,
}

/// Most decode steps coalesced into one forward pass.
const MAX_BATCH: usize = 16;

/// Share of the free memory session KV caches may use when no budget is given.
const DEFAULT_KV_SHARE: f64 = 0.25;

impl<B: Backend + 'static> ModelChat<B> {
    /// Wraps an engine; each KV cache holds `context_len` tokens, and sessions' caches are
    /// kept between turns within `kv_budget_bytes` (default: a quarter of the free memory
    /// of the device, or of the host).
    pub fn new(
        engine: Arc<Engine<B>>,
        context_len: usize,
        kv_budget_bytes: Option<usize>,
    ) -> ModelChat<B> {
        let t = &engine.transformer;
        let capacity = context_len.clamp(1, t.max_positions());
        let per_cache = SeqCache::<B>::bytes(&t.cfg, capacity, engine.kv_dtype()).max(1);
        let budget = kv_budget_bytes.unwrap_or_else(|| {
            let free = t
                .backend
                .memory()
                .map(|(free, _)| free)
                .or_else(host_available_bytes)
                .unwrap_or(0);
            (free as f64 * DEFAULT_KV_SHARE) as usize
        });
        let pool = Arc::new(Mutex::new(KvPool::new(budget / per_cache, 2)));
        // Workers decoding at the same moment share one batched forward pass per step.
        engine.enable_batching(MAX_BATCH);
        ModelChat {
            engine,
            context_len,
            pool,
            per_cache,
            workers: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// `MemAvailable` of the host, in bytes.
fn host_available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<usize>()
        .ok()
        .map(|kb| kb * 1024)
}

/// A worker on a real model: its generator plus access to the sessions' KV caches.
struct ModelWorker<B: Backend> {
    gen: Generator<B>,
    pool: Arc<Mutex<KvPool<B>>>,
    /// The model's count of live workers (each holds one KV cache).
    live: Arc<AtomicUsize>,
}

impl<B: Backend> Drop for ModelWorker<B> {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: Backend + 'static> ChatModel for ModelChat<B> {
    fn name(&self) -> String {
        self.engine.model.name.clone()
    }
    fn device(&self) -> String {
        self.engine.transformer.backend.name()
    }
    fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        self.engine
            .model
            .template
            .render(messages, true)
            .map_err(|e| e.to_string())
    }
    fn count_tokens(&self, prompt: &str) -> Result<usize, String> {
        self.engine
            .model
            .tokenizer
            .encode(prompt, false)
            .map(|ids| ids.len())
    }
    fn new_worker(&self) -> Box<dyn ChatWorker> {
        self.workers.fetch_add(1, Ordering::Relaxed);
        Box::new(ModelWorker {
            gen: Generator::new(Arc::clone(&self.engine), self.context_len),
            pool: Arc::clone(&self.pool),
            live: Arc::clone(&self.workers),
        })
    }
    fn kv_cache_bytes(&self) -> usize {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        (self.workers.load(Ordering::Relaxed) + pool.caches_held()) * self.per_cache
    }
    fn decode_batches(&self) -> (usize, usize) {
        self.engine.batcher().map_or((0, 0), |b| {
            let s = b.stats();
            (
                s.passes.load(Ordering::Relaxed),
                s.steps.load(Ordering::Relaxed),
            )
        })
    }
    fn gpus(&self) -> Vec<serde_json::Value> {
        let b = &self.engine.transformer.backend;
        b.memory()
            .map(|(free, total)| {
                serde_json::json!({"device": b.name(), "free_bytes": free, "used_bytes": total - free, "total_bytes": total})
            })
            .into_iter()
            .collect()
    }
}

impl<B: Backend + 'static> ModelWorker<B> {
    fn pool(&self) -> std::sync::MutexGuard<'_, KvPool<B>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B: Backend + 'static> ChatWorker for ModelWorker<B> {
    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
        session: Option<&str>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats, String> {
        let prompt_ids = self.gen.engine().model.tokenizer.encode(prompt, false)?;
        let req = GenerateRequest {
            prompt_ids,
            max_new_tokens: params.max_new_tokens,
            sampling: params.sampling,
            stop: params.stop.clone(),
            ignore_eos: false,
        };
        if let Some(key) = session {
            let taken = self.pool().take(key);
            if let Some(mut cache) = taken {
                std::mem::swap(self.gen.cache_mut(), &mut cache);
                self.pool().put_spare(cache);
            }
        }
        let result = self.gen.generate(&req, on_text);
        let prompt_tokens = req.prompt_ids.len();
        if let Some(key) = session {
            let spare = self.pool().spare();
            let spare = spare.unwrap_or_else(|| {
                let t = &self.gen.engine().transformer;
                let dtype = self.gen.engine().kv_dtype();
                SeqCache::new(&t.backend, &t.cfg, self.gen.context_len(), dtype)
            });
            let mine = std::mem::replace(self.gen.cache_mut(), spare);
            self.pool().put(key, mine);
        }
        result
            .map(|o| GenStats {
                finish: o.finish_reason,
                tokens: o.token_ids.len(),
                prompt_tokens,
                cached_tokens: o.cached_prompt_tokens,
            })
            .map_err(|e| e.to_string())
    }
}

/// ChatStream's mock response modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MockMode {
    /// Cycles through a few canned answers, one per turn of the conversation.
    Round,
    /// Repeats the user's last message.
    Echo,
    /// A long answer (for load tests).
    Long,
}

/// No model: answers word by word after a fixed delay per word.
pub struct MockChat {
    mode: MockMode,
    delay: Duration,
    template: ChatTemplate,
}

impl MockChat {
    /// A mock with `delay` per word.
    pub fn new(mode: MockMode, delay: Duration) -> MockChat {
        MockChat {
            mode,
            delay,
            template: ChatTemplate::new(None, None, None).expect("fallback template compiles"),
        }
    }
}

const ROUND_ANSWERS: &[&str] = &[
    "Hello! I am a mock model. こんにちは 🌊",
    "This answer streams one word at a time.",
    "Mock mode needs no model and starts at once.",
];

struct MockWorker {
    mode: MockMode,
    delay: Duration,
}

impl ChatModel for MockChat {
    fn name(&self) -> String {
        format!("mock-{:?}", self.mode).to_lowercase()
    }
    fn device(&self) -> String {
        "none (mock)".into()
    }
    fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        self.template
            .render(messages, true)
            .map_err(|e| e.to_string())
    }
    fn count_tokens(&self, prompt: &str) -> Result<usize, String> {
        Ok(prompt.split_whitespace().count())
    }
    fn new_worker(&self) -> Box<dyn ChatWorker> {
        Box::new(MockWorker {
            mode: self.mode,
            delay: self.delay,
        })
    }
}

impl ChatWorker for MockWorker {
    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
        _session: Option<&str>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats, String> {
        let answer = match self.mode {
            // The n-th user message of a conversation gets the n-th canned answer.
            MockMode::Round => {
                let turn = prompt.matches("User: ").count().saturating_sub(1);
                ROUND_ANSWERS[turn % ROUND_ANSWERS.len()].to_string()
            }
            MockMode::Echo => last_user_message(prompt).to_string(),
            MockMode::Long => "The quick brown fox jumps over the lazy dog. ".repeat(200),
        };
        let mut words = answer.split_inclusive(' ').peekable();
        let mut tokens = 0;
        let prompt_tokens = prompt.split_whitespace().count();
        let mut stops = StopStrings::new(&params.stop);
        let stats = |finish, tokens| GenStats {
            finish,
            tokens,
            prompt_tokens,
            cached_tokens: 0,
        };
        while tokens < params.max_new_tokens {
            let Some(word) = words.next() else { break };
            std::thread::sleep(self.delay);
            tokens += 1;
            let check = stops.push(word);
            if (!check.emit.is_empty() && !on_text(&check.emit)) || check.stopped {
                let finish = if check.stopped {
                    FinishReason::Stop
                } else {
                    FinishReason::Cancelled
                };
                return Ok(stats(finish, tokens));
            }
        }
        let rest = stops.flush();
        if !rest.is_empty() && !on_text(&rest) {
            return Ok(stats(FinishReason::Cancelled, tokens));
        }
        let finish = if words.peek().is_some() {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        Ok(stats(finish, tokens))
    }
}

/// The text of the last `User:` message in a prompt rendered with the fallback template.
fn last_user_message(prompt: &str) -> &str {
    let start = prompt.rfind("User: ").map_or(0, |i| i + "User: ".len());
    let rest = &prompt[start..];
    rest.find("\n\n").map_or(rest, |end| &rest[..end])
}
