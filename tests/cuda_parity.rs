//! The CUDA backend against the CPU backend: every kernel on random inputs of realistic sizes
//! (max abs error reported), a whole forward pass on the tiny fixtures and, when the model file
//! is there, SmolLM2. Without a usable GPU each device test prints `skipped: no CUDA device`
//! and passes. The kernels' NVRTC compilation is checked whenever NVRTC loads, GPU or not.

mod common;

use std::sync::OnceLock;

use chatstream::backend::cpu::{AlignedBuf, Cpu};
use chatstream::backend::cuda::{compile_kernel, nvrtc_available, Cuda};
use chatstream::backend::kernels::KERNEL_SOURCES;
use chatstream::backend::{AttnShape, Backend, RopeShape};
use chatstream::engine::forward::{Logits, RunState, Transformer};
use chatstream::engine::kv_cache::KvCache;
use chatstream::model::weights::Tensor;
use chatstream::model::{ModelConfig, Weights};
use chatstream::Model;
use common::{assert_close, rand_vec};

fn gpu() -> Option<&'static Cuda> {
    static GPU: OnceLock<Option<Cuda>> = OnceLock::new();
    let g = GPU.get_or_init(|| match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    });
    if g.is_none() {
        println!("skipped: no CUDA device");
    }
    g.as_ref()
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::new(shape.to_vec(), rand_vec(shape.iter().product(), seed))
}

fn up(g: &Cuda, v: &[f32]) -> <Cuda as Backend>::Buf {
    let mut b = g.alloc(v.len());
    let t = Tensor::new(vec![v.len()], v.to_vec());
    let w = g.upload(&t);
    g.copy(&mut b, 0, &w.data, 0, v.len());
    b
}

/// `v` in a CPU backend buffer.
fn host(v: &[f32]) -> AlignedBuf {
    AlignedBuf::from(v)
}

fn down(g: &Cuda, b: &<Cuda as Backend>::Buf, n: usize) -> Vec<f32> {
    let mut out = Vec::new();
    g.read(b, 0..n, &mut out);
    out
}

#[test]
fn kernels_compile_with_nvrtc() {
    if !nvrtc_available() {
        println!("skipped: NVRTC not found");
        return;
    }
    for (stem, src) in KERNEL_SOURCES {
        for arch in ["compute_80", "compute_90"] {
            if let Err(e) = compile_kernel(src, arch) {
                panic!("{stem}.cu does not compile for {arch}:\n{e}");
            }
        }
    }
}

#[test]
fn matmul_rmsnorm_and_elementwise_match_cpu() {
    let Some(g) = gpu() else { return };
    for (n, k, m) in [
        (1, 576, 1536),
        (1, 1536, 576),
        (37, 576, 192),
        (512, 576, 1536),
    ] {
        let (x, w) = (rand_vec(n * k, 1), tensor(&[m, k], 2));
        let mut cpu = Cpu.alloc(n * m);
        Cpu.matmul(&mut cpu, &host(&x), &Cpu.upload(&w), n);
        let mut out = g.alloc(n * m);
        g.matmul(&mut out, &up(g, &x), &g.upload(&w), n);
        assert_close(
            &format!("matmul {n}x{k}x{m}"),
            &down(g, &out, n * m),
            &cpu,
            1e-3,
        );
    }
    let (n, dim) = (7, 576);
    let (x, w) = (rand_vec(n * dim, 3), tensor(&[dim], 4));
    let mut cpu = Cpu.alloc(n * dim);
    Cpu.rmsnorm(&mut cpu, &host(&x), &Cpu.upload(&w), n, 1e-5);
    let mut out = g.alloc(n * dim);
    g.rmsnorm(&mut out, &up(g, &x), &g.upload(&w), n, 1e-5);
    assert_close("rmsnorm", &down(g, &out, n * dim), &cpu, 1e-5);

    let len = 3 * 1536;
    let (a, b) = (rand_vec(len, 5), rand_vec(len, 6));
    let (mut ca, mut ga) = (host(&a), up(g, &a));
    Cpu.silu_mul(&mut ca, &host(&b), len);
    g.silu_mul(&mut ga, &up(g, &b), len);
    assert_close("silu_mul", &down(g, &ga, len), &ca, 1e-6);
    let (mut ca, mut ga) = (host(&a), up(g, &a));
    Cpu.add(&mut ca, &host(&b), len);
    g.add(&mut ga, &up(g, &b), len);
    assert_close("add", &down(g, &ga, len), &ca, 1e-6);
    let bias = tensor(&[1536], 7);
    let (mut ca, mut ga) = (host(&a), up(g, &a));
    Cpu.add_bias(&mut ca, &Cpu.upload(&bias), 3);
    g.add_bias(&mut ga, &g.upload(&bias), 3);
    assert_close("add_bias", &down(g, &ga, len), &ca, 1e-6);

    let table = tensor(&[1000, 64], 8);
    let ids = [3u32, 999, 0, 3];
    let mut cpu = Cpu.alloc(4 * 64);
    Cpu.embed(&mut cpu, &Cpu.upload(&table), &ids);
    let mut out = g.alloc(4 * 64);
    g.embed(&mut out, &g.upload(&table), &ids);
    assert_close("embed", &down(g, &out, 4 * 64), &cpu, 0.0);

    let mut logits = rand_vec(49152, 9);
    logits[31337] = 5.0;
    assert_eq!(g.argmax(&up(g, &logits), 0..49152), Some(31337));
    logits[7] = f32::NAN;
    assert_eq!(
        g.argmax(&up(g, &logits), 0..49152),
        None,
        "NaN is an error, not a token"
    );
}

#[test]
fn rope_and_attention_match_cpu() {
    let Some(g) = gpu() else { return };
    let (n_heads, n_kv, hd) = (9, 3, 64);
    let half = hd / 2;
    let max_pos = 1200;
    let cos = tensor(&[max_pos, half], 10);
    let sin = tensor(&[max_pos, half], 11);
    for (n_tokens, pos0) in [(1, 0), (1, 1000), (13, 0), (64, 300)] {
        let s = RopeShape {
            n_tokens,
            n_heads,
            head_dim: hd,
            pos0,
        };
        let x = rand_vec(n_tokens * n_heads * hd, 12);
        let mut cpu = host(&x);
        Cpu.rope(&mut cpu, &Cpu.upload(&cos), &Cpu.upload(&sin), s);
        let mut gx = up(g, &x);
        g.rope(&mut gx, &g.upload(&cos), &g.upload(&sin), s);
        assert_close(
            &format!("rope n={n_tokens} pos0={pos0}"),
            &down(g, &gx, x.len()),
            &cpu,
            1e-6,
        );

        let a = AttnShape {
            n_tokens,
            pos0,
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let positions = pos0 + n_tokens;
        let q = rand_vec(n_tokens * n_heads * hd, 13);
        let k: Vec<f32> = rand_vec(positions * n_kv * hd, 14)
            .iter()
            .map(|v| v * 3.0)
            .collect();
        let v = rand_vec(positions * n_kv * hd, 15);
        let mut cpu = Cpu.alloc(q.len());
        Cpu.attention(&mut cpu, &host(&q), &host(&k), &host(&v), a);
        let mut out = g.alloc(q.len());
        g.attention(&mut out, &up(g, &q), &up(g, &k), &up(g, &v), a);
        assert_close(
            &format!("attention n={n_tokens} pos0={pos0}"),
            &down(g, &out, q.len()),
            &cpu,
            1e-4,
        );
    }
}

fn logits_of<B: Backend>(b: B, cfg: &ModelConfig, w: &Weights, tokens: &[u32]) -> Vec<f32> {
    let t = Transformer::new(b, cfg, w);
    let n = tokens.len();
    let mut st = RunState::new(&t, n, n);
    let mut kv = KvCache::new(&t.backend, &t.cfg, n + 8);
    t.forward(&mut st, &mut kv, tokens, Logits::All, None)
        .unwrap();
    let mut out = Vec::new();
    t.backend
        .read(st.logits(), 0..n * t.cfg.vocab_size, &mut out);
    out
}

fn forward_logits<B: Backend>(b: B, model: &Model, tokens: &[u32]) -> Vec<f32> {
    logits_of(b, &model.config, &model.weights, tokens)
}

#[test]
fn whole_forward_pass_matches_cpu() {
    if gpu().is_none() {
        return;
    }
    for name in ["tiny-llama", "tiny-qwen2"] {
        let model = Model::load(&common::fixtures().join(name)).unwrap();
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 512).collect();
        let cpu = forward_logits(Cpu, &model, &tokens);
        let gpu_logits = forward_logits(Cuda::new(0).unwrap(), &model, &tokens);
        assert_close(&format!("{name} logits"), &gpu_logits, &cpu, 1e-3);
    }
    let path = std::env::var_os("CHATSTREAM_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.exists() {
        println!("SmolLM2 parity: model file not here, tiny fixtures only");
        return;
    }
    let model = Model::load(&path).unwrap();
    let tokens = model
        .encode_chat(&[chatstream::ChatMessage::new(
            "user",
            "What is the capital of France?",
        )])
        .unwrap();
    let cpu = forward_logits(Cpu, &model, &tokens);
    let gpu_logits = forward_logits(Cuda::new(0).unwrap(), &model, &tokens);
    assert_close("smollm2 logits", &gpu_logits, &cpu, 2e-2);
}

#[test]
fn tiny_goldens_on_gpu() {
    if gpu().is_none() {
        return;
    }
    use chatstream::engine::generate::{Engine, GenerateRequest, Generator};
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = common::fixtures().join(name);
        let golden = common::read_json(dir.join("golden.json"));
        let engine = std::sync::Arc::new(Engine::new(
            Model::load(&dir).unwrap(),
            Cuda::new(0).unwrap(),
        ));
        let mut gen = Generator::new(engine.clone(), 256);
        for seq in golden["sequences"].as_array().unwrap() {
            let tokens = common::ids(&seq["token_ids"]);
            let t = &engine.transformer;
            let mut st = RunState::new(t, tokens.len(), 1);
            let mut kv = KvCache::new(&t.backend, &t.cfg, 256);
            t.forward(&mut st, &mut kv, &tokens, Logits::Last, None)
                .unwrap();
            let mut logits = Vec::new();
            t.backend
                .read(st.logits(), 0..t.cfg.vocab_size, &mut logits);
            let want = common::floats(&seq["last_position_logits"]);
            assert_close(
                &format!("{name} len {} last logits on GPU", tokens.len()),
                &logits,
                &want,
                1e-3,
            );
            let req = GenerateRequest {
                prompt_ids: tokens,
                max_new_tokens: 20,
                sampling: Default::default(),
                stop: vec![],
                ignore_eos: true,
            };
            let out = gen.generate(&req, &mut |_| true).unwrap();
            assert_eq!(
                out.token_ids,
                common::ids(&seq["greedy_20"]["new_token_ids"]),
                "{name} greedy_20 on GPU"
            );
        }
    }
}

#[test]
fn synthetic_shapes_match_cpu() {
    if gpu().is_none() {
        return;
    }
    use chatstream::model::dequant::GgmlType;
    use chatstream::model::synthetic::synthetic;
    // f32, and Q4_1 as the default GGUF holds it (the CPU reads its blocks, CUDA widens them)
    for (shape, format) in [
        ("smollm2-135m", GgmlType::F32),
        ("smollm2-135m", GgmlType::Q4_1),
        ("llama-3.2-1b", GgmlType::F32),
    ] {
        let (cfg, w) = synthetic(shape, 7, format).unwrap();
        let tokens: Vec<u32> = (0..9)
            .map(|i| (i * 7919 + 11) % cfg.vocab_size as u32)
            .collect();
        let cpu = logits_of(Cpu, &cfg, &w, &tokens);
        let gpu_logits = logits_of(Cuda::new(0).unwrap(), &cfg, &w, &tokens);
        assert_close(
            &format!("{shape} {format:?} synthetic logits"),
            &gpu_logits,
            &cpu,
            1e-3,
        );
    }
}
