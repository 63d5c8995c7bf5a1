//! Speed of the CPU ops on SmolLM2's shapes: the decode matrix-vector product in f32 and from
//! Q4_1/Q8_0 blocks (memory-bound, reported as bytes of weights per second), the prefill GEMM,
//! attention at a long position, RMSNorm, and drawing a token from the vocabulary.

use std::time::Duration;

use chatstream::backend::cpu::{ops, quant};
use chatstream::backend::AttnShape;
use chatstream::engine::sampler::{Sampler, SamplingParams};
use chatstream::model::dequant::{GgmlType, QuantMatrix};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn vals(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn bench_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("ops");
    g.measurement_time(Duration::from_secs(5));
    for (k, m) in [(576, 1536), (1536, 576), (576, 49152)] {
        let (x, w, mut out) = (vals(k), vals(k * m), vec![0f32; m]);
        g.throughput(Throughput::Bytes((k * m * 4) as u64));
        g.bench_function(format!("matvec_{k}x{m}"), |b| {
            b.iter(|| ops::matmul(&mut out, &x, &w, 1, k, m))
        });
    }
    for (ty, name) in [(GgmlType::Q4_1, "q4_1"), (GgmlType::Q8_0, "q8_0")] {
        let (k, m) = (576, 1536);
        let block = ty.byte_len(32).unwrap();
        let bytes: Vec<u8> = (0..m * k / 32 * block)
            .map(|i| if i % block < 4 { 0x20 } else { (i * 31) as u8 })
            .collect();
        let q = QuantMatrix::from_ggml(ty, &bytes, m, k).unwrap();
        let (x, mut out) = (vals(k), vec![0f32; m]);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("matvec_{name}_{k}x{m}"), |b| {
            b.iter(|| quant::matvec_q(&mut out, &x, &q))
        });
    }
    let (n, k, m) = (256, 576, 1536);
    let (x, w, mut out) = (vals(n * k), vals(k * m), vec![0f32; n * m]);
    g.throughput(Throughput::Elements((2 * n * k * m) as u64));
    g.bench_function("gemm_256x576x1536_flops", |b| {
        b.iter(|| ops::matmul(&mut out, &x, &w, n, k, m))
    });

    let s = AttnShape {
        n_tokens: 1,
        pos0: 1023,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let (q, kc, vc, mut o) = (
        vals(9 * 64),
        vals(1024 * 192),
        vals(1024 * 192),
        vec![0f32; 9 * 64],
    );
    g.throughput(Throughput::Bytes((2 * 1024 * 192 * 4) as u64));
    g.bench_function("attention_decode_pos1023", |b| {
        b.iter(|| ops::attention(&mut o, &q, &kc, &vc, s))
    });

    let (x, w, mut out) = (vals(576), vals(576), vec![0f32; 576]);
    g.throughput(Throughput::Elements(576));
    g.bench_function("rmsnorm_576", |b| {
        b.iter(|| ops::rmsnorm(&mut out, &x, &w, 1, 1e-5))
    });

    // One token drawn from SmolLM2's vocabulary: temperature alone, then with top-p, then
    // with top-k. The logits are peaked, as a model's mostly are: 1 token in 1,000 stands 10
    // above the rest, so top-p keeps a few dozen. Last, flat logits (all within 1 of each
    // other), where top-p 0.9 keeps most of the vocabulary.
    let peaked: Vec<f32> = vals(49152)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 4.0 + if i % 1000 == 7 { 10.0 } else { 0.0 })
        .collect();
    let flat = vals(49152);
    g.throughput(Throughput::Elements(1));
    for (name, logits, top_p, top_k) in [
        ("sample_t0.7", &peaked, 1.0, 0),
        ("sample_t0.7_top_p0.9", &peaked, 0.9, 0),
        ("sample_t0.7_top_k50", &peaked, 1.0, 50),
        ("sample_flat_t0.7_top_p0.9", &flat, 0.9, 0),
    ] {
        let params = SamplingParams {
            temperature: 0.7,
            top_p,
            top_k,
            seed: Some(1),
            ..Default::default()
        };
        let mut sampler = Sampler::new(params, logits.len());
        let mut work = logits.clone();
        g.bench_function(name, |b| {
            b.iter(|| {
                work.copy_from_slice(logits);
                sampler.sample(&mut work, &[], 0).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_ops);
criterion_main!(benches);
