//! The generation loop: `Engine` (a model on a backend, shared by workers) and `Generator`
//! (one worker's buffers and KV cache). A request's prompt is prefilled in chunks, then
//! tokens are sampled and decoded one at a time, streamed as text through a callback that
//! can cancel, until an end-of-turn token, a stop string, `max_new_tokens` or a full cache.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::backend::{Backend, KvDtype};
use crate::model::Model;

use super::batch::{Batcher, Lane};
use super::detok::Detokenizer;
use super::error::InferenceError;
use super::forward::{Logits, RunState, Transformer};
use super::kv_cache::SeqCache;
use super::sampler::{Sampler, SamplingParams};
use super::stop::StopStrings;

/// Prompt tokens per forward call during prefill (long prompts are chunked).
pub const PREFILL_CHUNK: usize = 256;

/// A model loaded on a backend; read-only and shared by every worker.
pub struct Engine<B: Backend> {
    /// Tokenizer, template, config and stop ids.
    pub model: Model,
    /// The weights on the backend.
    pub transformer: Transformer<B>,
    /// When set, decode steps of concurrent generators are coalesced into batches.
    batcher: OnceLock<Batcher<B>>,
    kv_dtype: KvDtype,
}

impl<B: Backend + 'static> Engine<B> {
    /// Puts `model` on `backend`. The model's own weights are dropped once the backend holds
    /// them: the CPU backend may have re-laid a matrix, and a GPU's copy needs no host one.
    pub fn new(mut model: Model, backend: B) -> Engine<B> {
        let weights = std::mem::take(&mut model.weights);
        let transformer = Transformer::new(backend, &model.config, &weights);
        drop(weights);
        Engine {
            model,
            transformer,
            batcher: OnceLock::new(),
            kv_dtype: KvDtype::F32,
        }
    }

    /// Has its generators store their KV caches as `dtype`; an error where the backend
    /// cannot.
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Result<Engine<B>, String> {
        let backend = &self.transformer.backend;
        if !backend.stores_kv(dtype) {
            return Err(format!(
                "{} cannot store KV caches as {dtype:?}",
                backend.name()
            ));
        }
        self.kv_dtype = dtype;
        Ok(self)
    }

    /// How its generators store their KV caches.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// The step coalescer, when batching is on.
    pub fn batcher(&self) -> Option<&Batcher<B>> {
        self.batcher.get()
    }

    /// Coalesces the decode steps of this engine's generators, up to `max_batch` at once
    /// (a server with several workers turns this on).
    pub fn enable_batching(self: &Arc<Self>, max_batch: usize) {
        self.batcher
            .get_or_init(|| Batcher::start(Arc::downgrade(self), max_batch));
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt, already tokenized.
    pub prompt_ids: Vec<u32>,
    /// Most new tokens to produce.
    pub max_new_tokens: usize,
    /// How to choose each token.
    pub sampling: SamplingParams,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Keep going past end-of-turn tokens.
    pub ignore_eos: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_new_tokens` or the context length was reached.
    Length,
    /// The text callback asked to stop (the client went away).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    /// New token ids (an end-of-turn token that ended generation is the last entry).
    pub token_ids: Vec<u32>,
    /// The text sent through the callback, concatenated.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens whose keys and values were already cached (not prefilled again).
    pub cached_prompt_tokens: usize,
    /// Prompt tokens prefilled per second (the uncached ones, including the first logits).
    pub prefill_tokens_per_s: f64,
    /// New tokens per second after the first.
    pub decode_tokens_per_s: f64,
}

/// One worker's generation state: activation buffers, KV cache and scratch, all allocated
/// once and reused by every request.
pub struct Generator<B: Backend> {
    engine: Arc<Engine<B>>,
    state: RunState<B>,
    cache: SeqCache<B>,
    logits: Vec<f32>,
    context: Vec<u32>,
    lane: Lane<B>,
}

impl<B: Backend + 'static> Generator<B> {
    /// A generator whose cache holds up to `context_len` tokens (capped by the model).
    pub fn new(engine: Arc<Engine<B>>, context_len: usize) -> Generator<B> {
        let t = &engine.transformer;
        let capacity = context_len.clamp(1, t.max_positions());
        let state = RunState::new(t, PREFILL_CHUNK, 1);
        let cache = SeqCache::new(&t.backend, &t.cfg, capacity, engine.kv_dtype);
        let vocab = t.cfg.vocab_size;
        Generator {
            state,
            cache,
            logits: Vec::with_capacity(vocab),
            context: Vec::with_capacity(capacity),
            lane: Lane::default(),
            engine,
        }
    }

    /// The engine this generator runs.
    pub fn engine(&self) -> &Arc<Engine<B>> {
        &self.engine
    }

    /// Tokens the cache can hold.
    pub fn context_len(&self) -> usize {
        self.cache.kv.capacity()
    }

    /// The KV cache and the ids it holds (to swap a session's cache in and out).
    pub fn cache_mut(&mut self) -> &mut SeqCache<B> {
        &mut self.cache
    }

    /// Generates an answer to `req`, passing each final piece of text to `on_text`; when it
    /// returns `false` generation stops with `FinishReason::Cancelled`.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateOutput, InferenceError> {
        req.sampling.validate()?;
        let engine = Arc::clone(&self.engine);
        let (model, t) = (&engine.model, &engine.transformer);
        let prompt_len = req.prompt_ids.len();
        if prompt_len == 0 {
            return Err(InferenceError::EmptyPrompt);
        }
        if prompt_len >= self.cache.kv.capacity() {
            return Err(InferenceError::ContextOverflow {
                len: prompt_len + 1,
                max: self.cache.kv.capacity(),
            });
        }
        let mut sampler = Sampler::new(req.sampling, t.cfg.vocab_size);
        let greedy = req.sampling.temperature == 0.0 && req.sampling.repetition_penalty == 1.0;
        let mut detok = Detokenizer::new(&model.tokenizer, true);
        let mut stops = StopStrings::new(&req.stop);
        let mut text = String::new();
        let mut emit = |piece: &str, text: &mut String| {
            text.push_str(piece);
            piece.is_empty() || on_text(piece)
        };
        self.context.clear();
        self.context.extend_from_slice(&req.prompt_ids);
        // Keys and values of a prefix this cache already holds are not computed again.
        let reused = self.cache.reuse_prefix(&req.prompt_ids);

        let batcher = engine.batcher.get();
        let t0 = Instant::now();
        // Logits of a batched step come back to the host; a solo pass leaves them on the device.
        let mut on_host = false;
        // set once the engine thread picks this answer's tokens (`Batcher::follow`)
        let mut followed = false;
        let mut decoding = match (batcher, &req.prompt_ids[reused..]) {
            // A prompt whose prefix was cached but for its last token (a repeated system
            // prompt, a regenerate) joins the others' decode step instead of running a pass
            // of its own beside it; a greedy answer stays with the engine thread from there.
            (Some(b), &[last]) if (last as usize) < t.cfg.vocab_size && b.decoding_now() > 0 => {
                let decoding = b.decoding();
                let (kv, logits) = (&mut self.cache.kv, &mut self.logits);
                if greedy && req.max_new_tokens > 0 {
                    let n = req.max_new_tokens;
                    b.follow(
                        &mut self.lane,
                        last,
                        kv,
                        logits,
                        decoding,
                        n,
                        0,
                        req.ignore_eos,
                    )?;
                    followed = true;
                    None
                } else {
                    b.step(&mut self.lane, last, kv, logits)?;
                    on_host = true;
                    Some(decoding)
                }
            }
            (_, rest) => {
                let (st, kv) = (&mut self.state, &mut self.cache.kv);
                t.backend.within(|| t.prefill(st, kv, rest))?;
                batcher.map(Batcher::decoding)
            }
        };
        let mut prefill_s = t0.elapsed().as_secs_f64();
        let mut t1 = Instant::now();
        let mut finish = FinishReason::Length;
        let mut stopped_by_string = false;
        let mut new_ids = Vec::new();
        let mut failed = None;
        for step in 0..req.max_new_tokens {
            let id = if followed {
                match self.lane.next(&mut self.cache.kv, &mut self.logits)? {
                    Some(id) => id,
                    // the engine thread ended it: the cache is full
                    None => break,
                }
            } else if on_host && greedy {
                super::sampler::argmax_finite(&self.logits)
                    .ok_or(InferenceError::NonFiniteLogits { step })?
            } else if greedy {
                // Only the winning id comes back from the device.
                t.backend
                    .argmax(self.state.logits(), 0..t.cfg.vocab_size)
                    .ok_or(InferenceError::NonFiniteLogits { step })?
            } else {
                if !on_host {
                    t.backend
                        .read(self.state.logits(), 0..t.cfg.vocab_size, &mut self.logits);
                }
                sampler.sample(&mut self.logits, &self.context, step)?
            };
            if step == 0 && followed {
                // a prompt the engine thread follows from its last token ends here
                prefill_s = t0.elapsed().as_secs_f64();
                t1 = Instant::now();
            }
            new_ids.push(id);
            self.context.push(id);
            if !req.ignore_eos && model.stop_token_ids.contains(&id) {
                finish = FinishReason::Stop;
                break;
            }
            let piece = match detok.push(id) {
                Ok(piece) => piece,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if let Some(piece) = piece {
                let check = stops.push(&piece);
                if !emit(&check.emit, &mut text) {
                    finish = FinishReason::Cancelled;
                    break;
                }
                if check.stopped {
                    finish = FinishReason::Stop;
                    stopped_by_string = true;
                    break;
                }
            }
            if followed {
                // the engine thread ends the answer at the length and at a full cache too
                if step + 1 == req.max_new_tokens {
                    break;
                }
                continue;
            }
            if step + 1 == req.max_new_tokens || self.cache.kv.len() == self.cache.kv.capacity() {
                break;
            }
            // A step joins the others' on the engine thread; alone, it runs here (a hand-off
            // to the engine thread and back saved). A greedy answer stays with the engine
            // thread, which picks its tokens without waiting for this worker.
            match (batcher, decoding.take()) {
                (Some(b), Some(d)) if b.decoding_now() > 1 && greedy => {
                    let left = req.max_new_tokens - step - 1;
                    let (kv, logits) = (&mut self.cache.kv, &mut self.logits);
                    b.follow(
                        &mut self.lane,
                        id,
                        kv,
                        logits,
                        d,
                        left,
                        step + 1,
                        req.ignore_eos,
                    )?;
                    followed = true;
                }
                (Some(b), d) if b.decoding_now() > 1 => {
                    decoding = d;
                    b.step(&mut self.lane, id, &mut self.cache.kv, &mut self.logits)?;
                    on_host = true;
                }
                (_, d) => {
                    decoding = d;
                    if let Some(b) = batcher {
                        b.record_solo();
                    }
                    let (st, kv) = (&mut self.state, &mut self.cache.kv);
                    t.backend
                        .within(|| t.forward(st, kv, &[id], Logits::Last, None))?;
                    on_host = false;
                }
            }
        }
        if followed {
            self.lane.settle(&mut self.cache.kv, &mut self.logits)?;
            // tokens the engine thread ran after the answer ended
            self.cache
                .kv
                .truncate(self.cache.kv.len().min(self.context.len() - 1));
        }
        drop(decoding);
        if let Some(e) = failed {
            return Err(e);
        }
        if finish != FinishReason::Cancelled && !stopped_by_string {
            // Text held back for a split character or a possible stop string is final now.
            let check = stops.push(&detok.flush()?.unwrap_or_default());
            let tail = if check.stopped {
                finish = FinishReason::Stop;
                check.emit
            } else {
                check.emit + &stops.flush()
            };
            if !emit(&tail, &mut text) {
                finish = FinishReason::Cancelled;
            }
        }
        let decode_s = t1.elapsed().as_secs_f64();
        let decoded = new_ids.len().saturating_sub(1);
        let held = self.cache.kv.len();
        self.cache
            .ids
            .extend_from_slice(&self.context[reused..held]);
        Ok(GenerateOutput {
            token_ids: new_ids,
            text,
            finish_reason: finish,
            cached_prompt_tokens: reused,
            prefill_tokens_per_s: (prompt_len - reused) as f64 / prefill_s.max(1e-9),
            decode_tokens_per_s: if decoded > 0 {
                decoded as f64 / decode_s.max(1e-9)
            } else {
                0.0
            },
        })
    }
}
