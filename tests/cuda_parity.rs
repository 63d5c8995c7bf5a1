//! The CUDA backend against the CPU backend: every kernel on random inputs of realistic sizes
//! (max abs error reported), a whole forward pass on the tiny fixtures and, when the model file
//! is there, SmolLM2. Without a usable GPU each device test prints `skipped: no CUDA device`
//! and passes. The kernels' NVRTC compilation is checked whenever NVRTC loads, GPU or not.

mod common;

use std::sync::OnceLock;

use chatstream::backend::cpu::{AlignedBuf, Cpu};
use chatstream::backend::cuda::{
    compile_kernel, defines, half_bits, nvrtc_available, Cuda, FUNCTIONS,
};
use chatstream::backend::kernels::KERNEL_SOURCES;
use chatstream::backend::{AttnShape, Backend, RopeShape};
use chatstream::engine::forward::{Logits, RunState, Transformer};
use chatstream::engine::kv_cache::KvCache;
use chatstream::model::dequant::GgmlType;
use chatstream::model::synthetic::matrix_as;
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
    g.upload_f32(v)
}

/// A random (rows, cols) matrix stored as `format` (`synthetic::matrix_as`).
fn stored(rows: usize, cols: usize, seed: u64, format: GgmlType) -> Tensor {
    matrix_as(format, rows, cols, rand_vec(rows * cols, seed))
}

/// Whether the GPU keeps `format` other than as stored: quantized blocks are widened to f16,
/// which rounds each weight by up to 2^-11 (f32 and 16-bit floats are used exactly on both
/// sides, only the order of the sums differs).
fn rounded_on_gpu(format: GgmlType) -> bool {
    matches!(format, GgmlType::Q4_1 | GgmlType::Q4_0 | GgmlType::Q8_0)
}

/// How far a whole model's logits on the GPU may be from the CPU's with weights in `format`:
/// for rounded formats, the golden tolerance of the quantized formats.
fn tol(format: GgmlType) -> f32 {
    if rounded_on_gpu(format) {
        1e-2
    } else {
        1e-3
    }
}

/// The same for a product whose CPU result is `want`: the rounding's error grows with the
/// values, so for rounded formats it is taken relative to the largest of them. Measured on an
/// H200 (random inputs in [-1, 1]): at most 4.6e-4 of the value for gate_up's silu(g) * u
/// (0.118 at 259), 0.012 for products of width 2048.
fn product_tol(format: GgmlType, want: &[f32]) -> f32 {
    if !rounded_on_gpu(format) {
        return 1e-3;
    }
    let largest = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    1.5e-3 * largest
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
    for arch in ["compute_80", "compute_90"] {
        let ptx: Vec<String> = KERNEL_SOURCES
            .iter()
            .map(|(stem, src)| match compile_kernel(src, arch) {
                Ok(p) => p.to_src(),
                Err(e) => panic!("{stem}.cu does not compile for {arch}:\n{e}"),
            })
            .collect();
        for f in FUNCTIONS {
            let n = ptx.iter().filter(|p| defines(p, f)).count();
            assert_eq!(n, 1, "kernel {f} is defined in {n} files for {arch}");
        }
    }
}

/// The GPU's copy of a quantized matrix (no GPU needed): every value the f32 one rounded to
/// f16, over several of the conversion's row slices and a short last one.
#[test]
fn quantized_matrices_go_to_the_gpu_as_their_values_in_f16() {
    for format in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let w = stored(300, 576, 51, format);
        let want: Vec<u16> = w
            .to_f32()
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        assert_eq!(half_bits(w.quant.as_deref().unwrap()), want, "{format:?}");
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

    for format in [GgmlType::F16, GgmlType::BF16] {
        let table = stored(1000, 64, 8, format);
        let mut cpu = Cpu.alloc(4 * 64);
        Cpu.embed(&mut cpu, &Cpu.upload(&table), &ids);
        let mut out = g.alloc(4 * 64);
        g.embed(&mut out, &g.upload(&table), &ids);
        assert_close(
            &format!("embed {format:?}"),
            &down(g, &out, 4 * 64),
            &cpu,
            0.0,
        );
    }

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

/// Products in every storage the GPU keeps, at the token counts of decode (the hand-written
/// kernel, up to 8) and of prefill (cuBLAS, 16-bit matrices widened), with q/k/v in one
/// launch and the MLP's gate and up fused; the last shape is larger than one widened slice.
#[test]
fn products_in_every_storage_match_cpu() {
    let Some(g) = gpu() else { return };
    // (k, m); k = 100 is neither whole blocks nor a multiple of 8: f32, through cuBLAS
    let shapes = [(576, 1536), (1536, 576), (2048, 8192), (200, 64), (100, 64)];
    for format in [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q4_1] {
        for (k, m) in shapes {
            let w = stored(m, k, 21, format);
            let (cw, gw) = (Cpu.upload(&w), g.upload(&w));
            for n in [1, 2, 3, 8, 9, 40] {
                let x = rand_vec(n * k, 22 + n as u64);
                let mut cpu = Cpu.alloc(n * m);
                Cpu.matmul(&mut cpu, &host(&x), &cw, n);
                let mut out = g.alloc(n * m);
                g.matmul(&mut out, &up(g, &x), &gw, n);
                let what = format!("matmul {format:?} n={n} k={k} m={m}");
                assert_close(
                    &what,
                    &down(g, &out, n * m),
                    &cpu,
                    product_tol(format, &cpu),
                );
            }
        }
        let (k, h, kv) = (576, 1536, 192);
        let ws = [
            stored(k, k, 31, format),
            stored(kv, k, 32, format),
            stored(kv, k, 33, format),
        ];
        let (cws, gws) = (
            ws.each_ref().map(|w| Cpu.upload(w)),
            ws.each_ref().map(|w| g.upload(w)),
        );
        let w_gate_up = [stored(h, k, 34, format), stored(h, k, 35, format)];
        let (cgu, ggu) = (
            w_gate_up.each_ref().map(|w| Cpu.upload(w)),
            w_gate_up.each_ref().map(|w| g.upload(w)),
        );
        for n in [1, 4, 8, 12] {
            let x = rand_vec(n * k, 36);
            let (hx, gx) = (host(&x), up(g, &x));
            let widths = [k, kv, kv];
            let mut cpu = widths.map(|m| Cpu.alloc(n * m));
            let [c0, c1, c2] = &mut cpu;
            Cpu.matmul3([c0, c1, c2], &hx, cws.each_ref(), n);
            let mut gpu_out = widths.map(|m| g.alloc(n * m));
            let [o0, o1, o2] = &mut gpu_out;
            g.matmul3([o0, o1, o2], &gx, gws.each_ref(), n);
            for (i, m) in widths.into_iter().enumerate() {
                let what = format!("matmul3 {format:?} n={n} output {i}");
                assert_close(
                    &what,
                    &down(g, &gpu_out[i], n * m),
                    &cpu[i],
                    product_tol(format, &cpu[i]),
                );
            }

            let (mut cg, mut cu) = (Cpu.alloc(n * h), Cpu.alloc(n * h));
            Cpu.gate_up(&mut cg, &mut cu, &hx, cgu.each_ref(), n, h);
            let (mut gg, mut gu) = (g.alloc(n * h), g.alloc(n * h));
            g.gate_up(&mut gg, &mut gu, &gx, ggu.each_ref(), n, h);
            let what = format!("gate_up {format:?} n={n}");
            assert_close(&what, &down(g, &gg, n * h), &cg, product_tol(format, &cg));
        }
    }
    // A matrix of more values than one widened slice (32M): prefill's product takes it in two.
    let (k, m, n) = (576, 65536, 9);
    let w = stored(m, k, 41, GgmlType::BF16);
    let x = rand_vec(n * k, 42);
    let mut cpu = Cpu.alloc(n * m);
    Cpu.matmul(&mut cpu, &host(&x), &Cpu.upload(&w), n);
    let mut out = g.alloc(n * m);
    g.matmul(&mut out, &up(g, &x), &g.upload(&w), n);
    assert_close(
        "matmul BF16 in two slices",
        &down(g, &out, n * m),
        &cpu,
        1e-3,
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
    all_logits(&Transformer::new(b, cfg, w), tokens)
}

/// Every position's logits after one pass over `tokens`.
fn all_logits<B: Backend>(t: &Transformer<B>, tokens: &[u32]) -> Vec<f32> {
    let n = tokens.len();
    let mut st = RunState::new(t, n, n);
    let mut kv = KvCache::new(&t.backend, &t.cfg, n + 8);
    t.forward(&mut st, &mut kv, tokens, Logits::All, None)
        .unwrap();
    let mut out = Vec::new();
    t.backend
        .read(st.logits(), 0..n * t.cfg.vocab_size, &mut out);
    out
}

/// The last position's logits after a pass over the first `prefill` tokens and decode steps
/// (one token a pass) over the rest.
fn stepped_logits<B: Backend>(t: &Transformer<B>, tokens: &[u32], prefill: usize) -> Vec<f32> {
    let n = tokens.len();
    let mut st = RunState::new(t, n, 1);
    let mut kv = KvCache::new(&t.backend, &t.cfg, n + 8);
    t.forward(&mut st, &mut kv, &tokens[..prefill], Logits::Last, None)
        .unwrap();
    for tok in &tokens[prefill..] {
        t.forward(
            &mut st,
            &mut kv,
            std::slice::from_ref(tok),
            Logits::Last,
            None,
        )
        .unwrap();
    }
    let mut out = Vec::new();
    t.backend.read(st.logits(), 0..t.cfg.vocab_size, &mut out);
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
    use chatstream::model::synthetic::synthetic;
    // f32, 16-bit floats kept as stored, and Q4_1 as the default GGUF holds it (the CPU reads
    // its blocks, CUDA widens them to f16)
    for (shape, format) in [
        ("smollm2-135m", GgmlType::F32),
        ("smollm2-135m", GgmlType::Q4_1),
        ("smollm2-135m", GgmlType::F16),
        ("llama-3.2-1b", GgmlType::F32),
        ("llama-3.2-1b", GgmlType::BF16),
    ] {
        let (cfg, w) = synthetic(shape, 7, format).unwrap();
        let tokens: Vec<u32> = (0..9)
            .map(|i| (i * 7919 + 11) % cfg.vocab_size as u32)
            .collect();
        let cpu = logits_of(Cpu, &cfg, &w, &tokens);
        let gt = Transformer::new(Cuda::new(0).unwrap(), &cfg, &w);
        let what = format!("{shape} {format:?} synthetic");
        assert_close(
            &format!("{what} logits"),
            &all_logits(&gt, &tokens),
            &cpu,
            tol(format),
        );
        // decode steps take the hand-written product kernel, prefill cuBLAS
        let last = &cpu[(tokens.len() - 1) * cfg.vocab_size..];
        let stepped = stepped_logits(&gt, &tokens, 4);
        assert_close(&format!("{what} decode steps"), &stepped, last, tol(format));
    }
}

/// A coalesced decode step on the GPU (the server's engine thread: projections over all rows
/// in one product, attention per row against its own cache) against each sequence decoded
/// alone on the CPU, for sequences of different lengths, in f32 and in 16-bit weights.
#[test]
fn batched_decode_matches_each_sequence_alone() {
    if gpu().is_none() {
        return;
    }
    use chatstream::model::synthetic::synthetic;
    let tiny = Model::load(&common::fixtures().join("tiny-llama")).unwrap();
    let f16 = synthetic("smollm2-135m", 9, GgmlType::F16).unwrap();
    for (what, cfg, w) in [
        ("tiny-llama", &tiny.config, &tiny.weights),
        ("smollm2-135m F16", &f16.0, &f16.1),
    ] {
        let vocab = cfg.vocab_size as u32;
        let seqs: Vec<Vec<u32>> = [3usize, 12, 7]
            .iter()
            .enumerate()
            .map(|(s, &len)| {
                (0..=len as u32)
                    .map(|i| (i * 31 + s as u32 * 101 + 1) % vocab)
                    .collect()
            })
            .collect();
        let gt = Transformer::new(Cuda::new(0).unwrap(), cfg, w);
        let mut st = RunState::new(&gt, 16, seqs.len());
        let mut kvs: Vec<_> = seqs
            .iter()
            .map(|s| {
                let mut kv = KvCache::new(&gt.backend, &gt.cfg, 32);
                let prompt = &s[..s.len() - 1];
                gt.forward(&mut st, &mut kv, prompt, Logits::Last, None)
                    .unwrap();
                kv
            })
            .collect();
        let next: Vec<u32> = seqs.iter().map(|s| *s.last().unwrap()).collect();
        gt.forward_batch(&mut st, &mut kvs, &next).unwrap();
        let mut batched = Vec::new();
        gt.backend
            .read(st.logits(), 0..seqs.len() * cfg.vocab_size, &mut batched);

        let ct = Transformer::new(Cpu, cfg, w);
        for (i, s) in seqs.iter().enumerate() {
            let alone = stepped_logits(&ct, s, s.len() - 1);
            let row = &batched[i * cfg.vocab_size..(i + 1) * cfg.vocab_size];
            assert_close(&format!("{what} batched row {i}"), row, &alone, 1e-3);
        }
    }
}
