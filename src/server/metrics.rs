//! Prometheus metrics: counters of finished requests by outcome, refusals, generated tokens
//! and coalesced decode passes and their rows; gauges of processing, waiting and KV-cache
//! bytes, the model's load time and the build; histograms of queue wait, time to first
//! token, time per output token, inter-token latency and request duration; rendered in the
//! Prometheus text exposition format.

use std::fmt::Write as _;
use std::sync::Mutex;

use super::chat::FinishOutcome;
use super::pool::LoadSnapshot;

const OUTCOMES: [FinishOutcome; 4] = [
    FinishOutcome::Success,
    FinishOutcome::ClientDisconnectedWhileStreaming,
    FinishOutcome::ClientDisconnectedBeforeStreaming,
    FinishOutcome::UnknownErrorOccurred,
];

/// What the model reports for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineGauges {
    /// KV-cache memory in use.
    pub kv_bytes: usize,
    /// Coalesced decode passes, and the decode steps they carried.
    pub decode_batches: (usize, usize),
}

/// A histogram with fixed upper bounds in seconds.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, node: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{node=\"{node}\",le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{node=\"{node}\",le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{node=\"{node}\"}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{node=\"{node}\"}} {}", self.count);
    }
}

const WAIT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const TOKEN_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0];
const DURATION_BOUNDS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

#[derive(Debug)]
struct Inner {
    finished: [u64; 4],
    rejected: u64,
    tokens: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    /// Moving average of a request's time from admission to its end, in seconds.
    recent_request_s: f64,
    queue_wait: Histogram,
    ttft: Histogram,
    tpot: Histogram,
    inter_token: Histogram,
    duration: Histogram,
    model_load_s: f64,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                finished: [0; 4],
                rejected: 0,
                tokens: 0,
                prompt_tokens: 0,
                cached_tokens: 0,
                recent_request_s: 0.0,
                queue_wait: Histogram::new(WAIT_BOUNDS),
                ttft: Histogram::new(WAIT_BOUNDS),
                tpot: Histogram::new(TOKEN_BOUNDS),
                inter_token: Histogram::new(TOKEN_BOUNDS),
                duration: Histogram::new(DURATION_BOUNDS),
                model_load_s: 0.0,
            }),
        }
    }
}

/// Timings of one finished request, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTimes {
    /// Admission to the start on a worker.
    pub queue_wait: f64,
    /// Admission to the first chunk, if one was sent.
    pub ttft: Option<f64>,
    /// Mean time per token after the first, if more than one.
    pub tpot: Option<f64>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the seconds the model took to load.
    pub fn set_model_load_seconds(&self, s: f64) {
        self.lock().model_load_s = s;
    }

    /// Records the gap between two pieces of one answer.
    pub fn inter_token(&self, s: f64) {
        self.lock().inter_token.observe(s);
    }

    /// Counts a too-many-requests refusal.
    pub fn rejected(&self) {
        self.lock().rejected += 1;
    }

    /// Records a finished request: new tokens, prompt tokens and those of them reused from a
    /// kept KV cache.
    pub fn finished(
        &self,
        outcome: FinishOutcome,
        tokens: [usize; 3],
        t: RequestTimes,
        total_s: f64,
    ) {
        let mut m = self.lock();
        m.recent_request_s = if m.recent_request_s == 0.0 {
            total_s
        } else {
            0.8 * m.recent_request_s + 0.2 * total_s
        };
        let i = OUTCOMES.iter().position(|&o| o == outcome).unwrap_or(3);
        m.finished[i] += 1;
        m.tokens += tokens[0] as u64;
        m.prompt_tokens += tokens[1] as u64;
        m.cached_tokens += tokens[2] as u64;
        m.queue_wait.observe(t.queue_wait);
        m.duration.observe(total_s);
        if let Some(v) = t.ttft {
            m.ttft.observe(v);
        }
        if let Some(v) = t.tpot {
            m.tpot.observe(v);
        }
    }

    /// Seconds a refused client should wait: the requests ahead of it (`waiting`, plus itself)
    /// spread over `workers`, at the recent time per request; at least 1.
    pub fn retry_after(&self, waiting: usize, workers: usize) -> u64 {
        let per_request = self.lock().recent_request_s;
        let rounds = (waiting + 1) as f64 / workers.max(1) as f64;
        (rounds * per_request).ceil().max(1.0) as u64
    }

    /// The Prometheus text exposition.
    pub fn render(&self, node: &str, load: LoadSnapshot, engine: EngineGauges) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP chatstream_build_info The running build.\n# TYPE chatstream_build_info gauge\nchatstream_build_info{{node=\"{node}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out.push_str(
            "# HELP chatstream_requests_finished_total Admitted requests that ended, by outcome.\n",
        );
        out.push_str("# TYPE chatstream_requests_finished_total counter\n");
        for (o, n) in OUTCOMES.iter().zip(m.finished) {
            let _ = writeln!(
                out,
                "chatstream_requests_finished_total{{node=\"{node}\",outcome=\"{}\"}} {n}",
                o.as_str()
            );
        }
        let gauges: [(&str, &str, &str, f64); 11] = [
            (
                "chatstream_requests_admitted_total",
                "counter",
                "Requests admitted (each ends with exactly one finished outcome).",
                load.admitted_total as f64,
            ),
            (
                "chatstream_requests_rejected_total",
                "counter",
                "Requests refused as too many.",
                m.rejected as f64,
            ),
            (
                "chatstream_generated_tokens_total",
                "counter",
                "New tokens generated.",
                m.tokens as f64,
            ),
            (
                "chatstream_prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                m.prompt_tokens as f64,
            ),
            (
                "chatstream_cached_prompt_tokens_total",
                "counter",
                "Prompt tokens reused from kept KV caches.",
                m.cached_tokens as f64,
            ),
            (
                "chatstream_processing",
                "gauge",
                "Requests being generated.",
                load.processing as f64,
            ),
            (
                "chatstream_waiting",
                "gauge",
                "Requests waiting for a worker.",
                load.waiting as f64,
            ),
            (
                "chatstream_kv_cache_bytes",
                "gauge",
                "KV-cache memory in use (workers' caches and sessions' kept ones).",
                engine.kv_bytes as f64,
            ),
            (
                "chatstream_decode_batches_total",
                "counter",
                "Decode passes (one forward pass for the next token of every decoding request; a request decoding alone runs its own).",
                engine.decode_batches.0 as f64,
            ),
            (
                "chatstream_decode_batch_rows_total",
                "counter",
                "Decode steps those passes carried (divided by the passes: the mean batch size).",
                engine.decode_batches.1 as f64,
            ),
            (
                "chatstream_model_load_seconds",
                "gauge",
                "Seconds the model took to load.",
                m.model_load_s,
            ),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{node}\"}} {v}"
            );
        }
        m.queue_wait.render(
            &mut out,
            "chatstream_queue_wait_seconds",
            "Time from admission to a worker.",
            node,
        );
        m.ttft.render(
            &mut out,
            "chatstream_time_to_first_token_seconds",
            "Time from admission to the first chunk.",
            node,
        );
        m.tpot.render(
            &mut out,
            "chatstream_time_per_output_token_seconds",
            "Mean time per token after the first.",
            node,
        );
        m.inter_token.render(
            &mut out,
            "chatstream_inter_token_latency_seconds",
            "Time between two pieces of one answer.",
            node,
        );
        m.duration.render(
            &mut out,
            "chatstream_request_duration_seconds",
            "Time from admission to the end of a request.",
            node,
        );
        out
    }
}
