//! Forward-pass speed on the default model (SmolLM2-135M-Instruct, F32 after dequantizing
//! its GGUF), with rayon's default thread count: prefill of a 512-token prompt and decode of
//! 128 tokens after a short prompt, reported separately as tokens/s (criterion's elements/s).
//! Decode excludes the prefill and the first step.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chatstream::backend::cpu::Cpu;
use chatstream::backend::Backend;
use chatstream::engine::forward::{Logits, RunState, Transformer};
use chatstream::engine::generate::PREFILL_CHUNK;
use chatstream::engine::kv_cache::KvCache;
use chatstream::Model;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn model_path() -> PathBuf {
    std::env::var_os("CHATSTREAM_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

fn prompt(t: &Transformer<Cpu>, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (100 + i * 37) as u32 % t.cfg.vocab_size as u32)
        .collect()
}

fn forward(c: &mut Criterion) {
    let model = Model::load(&model_path()).expect("run scripts/fetch-model.sh first");
    let t = Transformer::new(Cpu, &model.config, &model.weights);
    let mut st = RunState::new(&t, PREFILL_CHUNK, 1);
    let mut kv = KvCache::new(&Cpu, &t.cfg, 1024);
    let mut g = c.benchmark_group("forward");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(2));

    let long = prompt(&t, 512);
    g.throughput(Throughput::Elements(long.len() as u64));
    g.bench_function("prefill_512_tokens", |b| {
        b.iter(|| {
            kv.truncate(0);
            t.prefill(&mut st, &mut kv, &long).unwrap();
        })
    });

    const DECODE: usize = 128;
    let short = prompt(&t, 16);
    g.throughput(Throughput::Elements(DECODE as u64));
    g.bench_function("decode_128_tokens", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                kv.truncate(0);
                t.prefill(&mut st, &mut kv, &short).unwrap();
                t.forward(&mut st, &mut kv, &[42], Logits::Last, None)
                    .unwrap();
                let start = Instant::now();
                for i in 0..DECODE {
                    t.forward(&mut st, &mut kv, &[(i * 13 + 7) as u32], Logits::Last, None)
                        .unwrap();
                }
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

/// Coalesced decode steps (`forward_batch`) of 1, 2 and 4 sequences, each with its own
/// cache after a 64-token prompt: elements/s is the aggregate decode tokens/s, so the ratio
/// of the 4-row and the 1-row figures is the scaling four concurrent streams can reach.
fn batched(c: &mut Criterion) {
    let model = Model::load(&model_path()).expect("run scripts/fetch-model.sh first");
    let t = Transformer::new(Cpu, &model.config, &model.weights);
    let mut g = c.benchmark_group("batched_decode");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(2));
    const STEPS: usize = 32;
    for n in [1usize, 2, 4] {
        let mut st = RunState::new(&t, PREFILL_CHUNK, n);
        let mut kvs: Vec<KvCache<Cpu>> = (0..n).map(|_| KvCache::new(&Cpu, &t.cfg, 256)).collect();
        for (i, kv) in kvs.iter_mut().enumerate() {
            t.prefill(&mut st, kv, &prompt(&t, 64 + i)).unwrap();
        }
        g.throughput(Throughput::Elements((n * STEPS) as u64));
        g.bench_function(format!("{n}_rows"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    for (i, kv) in kvs.iter_mut().enumerate() {
                        kv.truncate(64 + i);
                    }
                    let start = Instant::now();
                    for s in 0..STEPS {
                        let tokens: Vec<u32> = (0..n).map(|i| (s * 13 + i * 7) as u32).collect();
                        // as the server's engine thread runs it: inside the thread pool
                        Cpu.within(|| t.forward_batch(&mut st, &mut kvs, &tokens))
                            .unwrap();
                    }
                    total += start.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, forward, batched);
criterion_main!(benches);
