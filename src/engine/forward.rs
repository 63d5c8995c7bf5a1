//! The transformer forward pass, written once, top to bottom, generic over a `Backend`:
//! embed -> per layer {rmsnorm; q,k,v (+bias); rope; append to KV cache; attention; o;
//! residual; rmsnorm; gate, up; silu*mul; down; residual} -> final norm -> logits.
//! `RunState` holds every activation buffer, allocated once; nothing is allocated per token.

use crate::backend::{AttnShape, Backend, RopeShape};
use crate::model::weights::{Tensor, Weights};
use crate::model::ModelConfig;

use super::error::InferenceError;
use super::kv_cache::KvCache;

/// Longest position the RoPE tables cover when a model claims a huge context.
const MAX_ROPE_POSITIONS: usize = 1 << 17;

/// Most sequences one `forward_batch` call takes.
pub const MAX_BATCH: usize = 64;

/// One decoder layer's weights on the device.
struct Layer<B: Backend> {
    attn_norm: B::Weight,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    bqkv: Option<[B::Weight; 3]>,
    wo: B::Weight,
    ffn_norm: B::Weight,
    w_gate: B::Weight,
    w_up: B::Weight,
    w_down: B::Weight,
}

/// A model's weights on a backend, shared read-only by every worker.
pub struct Transformer<B: Backend> {
    /// The backend the weights live on.
    pub backend: B,
    /// The model's shape.
    pub cfg: ModelConfig,
    embed: B::Weight, // (vocab, dim)
    layers: Vec<Layer<B>>,
    norm: B::Weight,           // (dim)
    output: Option<B::Weight>, // (vocab, dim); `None` when tied to `embed`
    rope_cos: B::Weight,       // (max_pos, head_dim / 2)
    rope_sin: B::Weight,       // (max_pos, head_dim / 2)
    max_pos: usize,
}

/// Activation buffers for up to `max_tokens` tokens per call.
pub struct RunState<B: Backend> {
    max_tokens: usize,
    logit_rows: usize,
    x: B::Buf,       // (max_tokens, dim) residual stream
    xb: B::Buf,      // (max_tokens, dim) normed input / projection output
    q: B::Buf,       // (max_tokens, q_dim)
    k: B::Buf,       // (max_tokens, kv_dim)
    v: B::Buf,       // (max_tokens, kv_dim)
    att: B::Buf,     // (max_tokens, q_dim) attention output
    hb: B::Buf,      // (max_tokens, hidden) gate, then silu(gate) * up
    hb2: B::Buf,     // (max_tokens, hidden) up
    last: B::Buf,    // (logit_rows, dim) rows the logits are computed from
    logits: B::Buf,  // (logit_rows, vocab)
    row_q: B::Buf,   // (q_dim) one row of q (batched decode)
    row_k: B::Buf,   // (kv_dim) one row of k (batched decode)
    row_att: B::Buf, // (q_dim) one row of attention output (batched decode)
}

/// Which positions of a call get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token of the call (tests and scoring); needs `logit_rows >= n`.
    All,
}

impl<B: Backend> RunState<B> {
    /// Buffers for calls of up to `max_tokens` tokens, with logits for up to `logit_rows`.
    pub fn new(t: &Transformer<B>, max_tokens: usize, logit_rows: usize) -> RunState<B> {
        let c = &t.cfg;
        let b = &t.backend;
        let n = max_tokens.max(1);
        let rows = logit_rows.clamp(1, n);
        RunState {
            max_tokens: n,
            logit_rows: rows,
            x: b.alloc(n * c.hidden_size),
            xb: b.alloc(n * c.hidden_size),
            q: b.alloc(n * c.q_dim()),
            k: b.alloc(n * c.kv_dim()),
            v: b.alloc(n * c.kv_dim()),
            att: b.alloc(n * c.q_dim()),
            hb: b.alloc(n * c.intermediate_size),
            hb2: b.alloc(n * c.intermediate_size),
            last: b.alloc(rows * c.hidden_size),
            logits: b.alloc(rows * c.vocab_size),
            row_q: b.alloc(c.q_dim()),
            row_k: b.alloc(c.kv_dim()),
            row_att: b.alloc(c.q_dim()),
        }
    }

    /// Most tokens one `forward` call takes.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The logits buffer: (rows, vocab) as the last `forward` left it.
    pub fn logits(&self) -> &B::Buf {
        &self.logits
    }
}

impl<B: Backend> Transformer<B> {
    /// Uploads `w` to `backend` and builds the RoPE tables.
    pub fn new(backend: B, cfg: &ModelConfig, w: &Weights) -> Transformer<B> {
        let up = |t: &Tensor| backend.upload(t);
        // a matrix that `matmul` takes
        let matrix = |t: &Tensor| {
            let mut w = backend.upload(t);
            backend.prepare(&mut w);
            w
        };
        let layers = w
            .layers
            .iter()
            .map(|l| Layer {
                attn_norm: up(&l.attn_norm),
                wq: matrix(&l.wq),
                wk: matrix(&l.wk),
                wv: matrix(&l.wv),
                bqkv: l.bqkv.as_ref().map(|[a, b, c]| [up(a), up(b), up(c)]),
                wo: matrix(&l.wo),
                ffn_norm: up(&l.ffn_norm),
                w_gate: matrix(&l.w_gate),
                w_up: matrix(&l.w_up),
                w_down: matrix(&l.w_down),
            })
            .collect();
        let max_pos = cfg.max_position_embeddings.min(MAX_ROPE_POSITIONS);
        let (cos, sin) = rope_tables(cfg, max_pos);
        Transformer {
            // a tied table is uploaded once, as the output head (lookups read it too)
            embed: match w.lm_head {
                Some(_) => up(&w.embed),
                None => matrix(&w.embed),
            },
            layers,
            norm: up(&w.norm),
            output: w.lm_head.as_ref().map(matrix),
            rope_cos: up(&cos),
            rope_sin: up(&sin),
            max_pos,
            cfg: cfg.clone(),
            backend,
        }
    }

    /// The output head: its own matrix, or the embedding table when tied.
    fn output(&self) -> &B::Weight {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    /// Longest sequence the model (and its RoPE tables) supports.
    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// Runs `tokens` at positions `kv.len()..` through the model, appends their keys and
    /// values to `kv`, and leaves logits in `st` (the last token's, or every token's).
    /// `trace`, when given, receives the residual stream after the embedding and after every
    /// layer (for finding the first stage that differs from a reference).
    pub fn forward(
        &self,
        st: &mut RunState<B>,
        kv: &mut KvCache<B>,
        tokens: &[u32],
        logits: Logits,
        mut trace: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<(), InferenceError> {
        let c = &self.cfg;
        let b = &self.backend;
        let n = tokens.len();
        let pos0 = kv.len();
        if n == 0 {
            return Err(InferenceError::EmptyPrompt);
        }
        assert!(
            n <= st.max_tokens,
            "forward: {n} tokens exceed the RunState's {}",
            st.max_tokens
        );
        let end = pos0 + n;
        if end > kv.capacity() || end > self.max_pos {
            return Err(InferenceError::ContextOverflow {
                len: end,
                max: kv.capacity().min(self.max_pos),
            });
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(InferenceError::BadToken {
                id,
                vocab: c.vocab_size,
            });
        }
        let (dim, kv_dim) = (c.hidden_size, c.kv_dim());
        let mut record = |buf: &B::Buf| {
            if let Some(t) = trace.as_deref_mut() {
                let mut v = Vec::new();
                b.read(buf, 0..n * dim, &mut v);
                t.push(v);
            }
        };

        // embed: x = embed_tokens[tokens]
        b.embed(&mut st.x, &self.embed, tokens);
        record(&st.x);
        let rope_q = RopeShape {
            n_tokens: n,
            n_heads: c.n_heads,
            head_dim: c.head_dim,
            pos0,
        };
        let rope_k = RopeShape {
            n_heads: c.n_kv_heads,
            ..rope_q
        };
        let attn = AttnShape {
            n_tokens: n,
            pos0,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        for (l, w) in self.layers.iter().enumerate() {
            // attention block: xb = rmsnorm(x); q, k, v = xb @ wq, wk, wv (+ bias)
            self.qkv(st, w, n);
            // rotate q and k by their positions, then append k, v to the cache
            b.rope(&mut st.q, &self.rope_cos, &self.rope_sin, rope_q);
            b.rope(&mut st.k, &self.rope_cos, &self.rope_sin, rope_k);
            b.append_kv(&mut kv.k[l], pos0 * kv_dim, &st.k, 0, n * kv_dim);
            b.append_kv(&mut kv.v[l], pos0 * kv_dim, &st.v, 0, n * kv_dim);
            // att = causal attention over positions 0..=pos; x += att @ wo; then the MLP
            b.attention(&mut st.att, &st.q, &kv.k[l], &kv.v[l], attn);
            self.out_and_mlp(st, w, n);
            record(&st.x);
        }
        kv.advance(n);

        // final norm and output head, on the rows whose logits are wanted
        let rows = match logits {
            Logits::Last => 1,
            Logits::All => n,
        };
        assert!(
            rows <= st.logit_rows,
            "forward: {rows} logit rows exceed the RunState's {}",
            st.logit_rows
        );
        b.copy(&mut st.last, 0, &st.x, (n - rows) * dim, rows * dim);
        b.rmsnorm(&mut st.xb, &st.last, &self.norm, rows, c.rms_norm_eps);
        b.matmul(&mut st.logits, &st.xb, self.output(), rows);
        Ok(())
    }

    /// Start of a layer: xb = rmsnorm(x); q, k, v = xb @ wq, wk, wv (+ bias), for n rows.
    fn qkv(&self, st: &mut RunState<B>, w: &Layer<B>, n: usize) {
        let (b, eps) = (&self.backend, self.cfg.rms_norm_eps);
        b.rmsnorm(&mut st.xb, &st.x, &w.attn_norm, n, eps);
        b.matmul3(
            [&mut st.q, &mut st.k, &mut st.v],
            &st.xb,
            [&w.wq, &w.wk, &w.wv],
            n,
        );
        if let Some([bq, bk, bv]) = &w.bqkv {
            b.add_bias(&mut st.q, bq, n);
            b.add_bias(&mut st.k, bk, n);
            b.add_bias(&mut st.v, bv, n);
        }
    }

    /// End of a layer: x += att @ wo; xb = rmsnorm(x);
    /// x += (silu(xb @ w_gate) * (xb @ w_up)) @ w_down, for n rows.
    fn out_and_mlp(&self, st: &mut RunState<B>, w: &Layer<B>, n: usize) {
        let (b, c) = (&self.backend, &self.cfg);
        b.matmul(&mut st.xb, &st.att, &w.wo, n);
        b.add(&mut st.x, &st.xb, n * c.hidden_size);
        b.rmsnorm(&mut st.xb, &st.x, &w.ffn_norm, n, c.rms_norm_eps);
        b.gate_up(
            &mut st.hb,
            &mut st.hb2,
            &st.xb,
            [&w.w_gate, &w.w_up],
            n,
            c.intermediate_size,
        );
        b.matmul(&mut st.xb, &st.hb, &w.w_down, n);
        b.add(&mut st.x, &st.xb, n * c.hidden_size);
    }

    /// One decode step for several sequences at once: row `i` is token `tokens[i]` of the
    /// sequence whose cache is `caches[i]`, at position `caches[i].len()`. The projections
    /// and the MLP run as one matrix product over all rows (the weights are read once);
    /// RoPE, the cache append and attention run per row against that row's own cache.
    /// Leaves one row of logits per sequence in `st`.
    pub fn forward_batch(
        &self,
        st: &mut RunState<B>,
        caches: &mut [KvCache<B>],
        tokens: &[u32],
    ) -> Result<(), InferenceError> {
        let c = &self.cfg;
        let b = &self.backend;
        let n = tokens.len();
        assert!(
            n == caches.len() && n <= MAX_BATCH && n <= st.max_tokens && n <= st.logit_rows,
            "forward_batch: {n} rows"
        );
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(InferenceError::BadToken {
                id,
                vocab: c.vocab_size,
            });
        }
        for kv in caches.iter() {
            let end = kv.len() + 1;
            if end > kv.capacity() || end > self.max_pos {
                return Err(InferenceError::ContextOverflow {
                    len: end,
                    max: kv.capacity().min(self.max_pos),
                });
            }
        }
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let mut pos_of = [0usize; MAX_BATCH];
        b.embed(&mut st.x, &self.embed, tokens);
        for (l, w) in self.layers.iter().enumerate() {
            self.qkv(st, w, n);
            for (i, kv) in caches.iter_mut().enumerate() {
                let pos = kv.len();
                pos_of[i] = pos;
                // row i of q and k, rotated by its own position (via the one-row buffers)
                b.copy(&mut st.row_q, 0, &st.q, i * q_dim, q_dim);
                b.copy(&mut st.row_k, 0, &st.k, i * kv_dim, kv_dim);
                let one = RopeShape {
                    n_tokens: 1,
                    n_heads: c.n_heads,
                    head_dim: c.head_dim,
                    pos0: pos,
                };
                b.rope(&mut st.row_q, &self.rope_cos, &self.rope_sin, one);
                b.rope(
                    &mut st.row_k,
                    &self.rope_cos,
                    &self.rope_sin,
                    RopeShape {
                        n_heads: c.n_kv_heads,
                        ..one
                    },
                );
                b.copy(&mut st.q, i * q_dim, &st.row_q, 0, q_dim);
                b.append_kv(&mut kv.k[l], pos * kv_dim, &st.row_k, 0, kv_dim);
                b.append_kv(&mut kv.v[l], pos * kv_dim, &st.v, i * kv_dim, kv_dim);
            }
            let shape = AttnShape {
                n_tokens: n,
                pos0: 0,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
            };
            b.attention_rows(
                &mut st.att,
                &st.q,
                &|i| (&caches[i].k[l], &caches[i].v[l]),
                &pos_of[..n],
                shape,
                [&mut st.row_q, &mut st.row_att],
            );
            self.out_and_mlp(st, w, n);
        }
        for kv in caches.iter_mut() {
            kv.advance(1);
        }
        b.rmsnorm(&mut st.xb, &st.x, &self.norm, n, c.rms_norm_eps);
        b.matmul(&mut st.logits, &st.xb, self.output(), n);
        Ok(())
    }

    /// Runs a prompt of any length through the model in chunks of the RunState's size,
    /// leaving the last token's logits in `st`.
    pub fn prefill(
        &self,
        st: &mut RunState<B>,
        kv: &mut KvCache<B>,
        tokens: &[u32],
    ) -> Result<(), InferenceError> {
        if tokens.is_empty() {
            return Err(InferenceError::EmptyPrompt);
        }
        for chunk in tokens.chunks(st.max_tokens) {
            self.forward(st, kv, chunk, Logits::Last, None)?;
        }
        Ok(())
    }
}

/// cos/sin of `pos * inv_freq[i]` for every position: (max_pos, head_dim / 2) each. The angle
/// is the f32 product, as transformers computes it, and its cosine is rounded once.
fn rope_tables(cfg: &ModelConfig, max_pos: usize) -> (Tensor, Tensor) {
    let inv = cfg.rope_inv_freq();
    let half = inv.len();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for &f in &inv {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (
        Tensor::new(vec![max_pos, half], cos),
        Tensor::new(vec![max_pos, half], sin),
    )
}
