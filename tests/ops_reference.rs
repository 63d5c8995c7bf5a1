//! Each fast CPU op against its naive reference op on random inputs of realistic sizes
//! (SmolLM2's shapes), reporting the max abs error and where it occurred.

mod common;

use chatstream::backend::cpu::{naive, ops};
use chatstream::backend::{AttnShape, RopeShape};
use chatstream::model::dequant::GgmlType;
use common::{assert_close, rand_vec};

#[test]
fn dot_matches_portable_and_naive() {
    for n in [0, 1, 7, 8, 31, 32, 33, 576, 1536] {
        let (a, b) = (rand_vec(n, 1), rand_vec(n, 2));
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert_close(
            &format!("dot n={n}"),
            &[ops::dot(&a, &b)],
            &[want as f32],
            1e-4,
        );
        assert_close(
            &format!("dot_portable n={n}"),
            &[ops::dot_portable(&a, &b)],
            &[want as f32],
            1e-4,
        );
    }
}

#[test]
fn matmul_matches_naive_for_decode_and_prefill_shapes() {
    for (n, k, m) in [
        (1, 576, 192),
        (1, 1536, 576),
        (3, 64, 176),
        (17, 576, 1536),
        (64, 576, 576),
    ] {
        let (x, w) = (rand_vec(n * k, 3), rand_vec(m * k, 4));
        let (mut fast, mut slow) = (vec![0.0; n * m], vec![0.0; n * m]);
        ops::matmul(&mut fast, &x, &w, n, k, m);
        naive::matmul(&mut slow, &x, &w, n, k, m);
        assert_close(&format!("matmul {n}x{k}x{m}"), &fast, &slow, 1e-4);
    }
}

#[test]
fn rmsnorm_matches_naive() {
    let (n, dim) = (5, 576);
    let (x, w) = (rand_vec(n * dim, 5), rand_vec(dim, 6));
    let (mut fast, mut slow) = (vec![0.0; n * dim], vec![0.0; n * dim]);
    ops::rmsnorm(&mut fast, &x, &w, n, 1e-5);
    naive::rmsnorm(&mut slow, &x, &w, n, 1e-5);
    assert_close("rmsnorm", &fast, &slow, 1e-5);
}

#[test]
fn rope_table_matches_rope_slow() {
    let (head_dim, n_heads, n_tokens, pos0) = (64, 9, 4, 1000);
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (1.0 / 100000f64.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..pos0 + n_tokens {
        for &f in &inv {
            let a = p as f64 * f as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let s = RopeShape {
        n_tokens,
        n_heads,
        head_dim,
        pos0,
    };
    let x = rand_vec(n_tokens * n_heads * head_dim, 7);
    let (mut fast, mut slow) = (x.clone(), x);
    ops::rope_half(&mut fast, &cos, &sin, s);
    naive::rope_slow(&mut slow, &inv, s);
    assert_close("rope", &fast, &slow, 1e-5);
}

/// Query heads per KV head 1, 3, 4, 8 and 16 (tasks take up to 8 heads that share a KV
/// head); head sizes 64 and 128 (the SIMD routines with the head in registers) and 24 (the
/// general one).
const ATTN_SHAPES: [(usize, usize, usize); 6] = [
    (9, 3, 64),
    (4, 4, 64),
    (16, 2, 64),
    (8, 2, 128),
    (16, 1, 24),
    (6, 2, 24),
];

/// An attention call: its shape, q, k (scaled up, for sharp scores) and v.
struct AttnCase {
    s: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Prefill and decode calls of every shape in `ATTN_SHAPES`. At 1,301 positions one token is
/// a decode step split into spans of 512.
fn attention_cases() -> Vec<AttnCase> {
    let mut cases = Vec::new();
    for (n_heads, n_kv_heads, head_dim) in ATTN_SHAPES {
        for (n_tokens, pos0) in [(1, 0), (1, 300), (1, 1300), (12, 0), (7, 40)] {
            let s = AttnShape {
                n_tokens,
                pos0,
                n_heads,
                n_kv_heads,
                head_dim,
            };
            let cache = (pos0 + n_tokens) * n_kv_heads * head_dim;
            cases.push(AttnCase {
                s,
                q: rand_vec(n_tokens * n_heads * head_dim, 8),
                k: rand_vec(cache, 9).iter().map(|x| x * 4.0).collect(),
                v: rand_vec(cache, 10),
            });
        }
    }
    cases
}

/// A batched decode step: rows at positions `pos` of their own sequences, each with its own
/// cache (keys scaled up; longer than used); one long enough to be split into spans.
struct RowsCase {
    s: AttnShape,
    pos: [usize; 4],
    q: Vec<f32>,
    caches: Vec<(Vec<f32>, Vec<f32>)>,
}

fn rows_case((n_heads, n_kv_heads, head_dim): (usize, usize, usize)) -> RowsCase {
    let pos = [0usize, 130, 1100, 37];
    let caches = pos
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let len = (p + 5) * n_kv_heads * head_dim;
            let k = rand_vec(len, 20 + i as u64)
                .iter()
                .map(|x| x * 4.0)
                .collect();
            (k, rand_vec(len, 30 + i as u64))
        })
        .collect();
    let s = AttnShape {
        n_tokens: pos.len(),
        pos0: 0,
        n_heads,
        n_kv_heads,
        head_dim,
    };
    let q = rand_vec(pos.len() * n_heads * head_dim, 40);
    RowsCase { s, pos, q, caches }
}

#[test]
fn attention_matches_naive_for_prefill_and_decode() {
    for AttnCase { s, q, k, v } in attention_cases() {
        let mut slow = vec![0.0; q.len()];
        naive::attention(&mut slow, &q, &k, &v, s);
        for simd in ops::attention_simd() {
            let mut fast = vec![0.0; q.len()];
            ops::attention_using(simd, &mut fast, &q, &k, &v, s);
            assert_close(&format!("attention {simd:?} {s:?}"), &fast, &slow, 1e-5);
        }
    }
}

/// `x` rounded to IEEE halves: their bits, and their values as f32s.
fn halves(x: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    (
        h.iter().map(|v| v.to_bits()).collect(),
        h.iter().map(|v| v.to_f32()).collect(),
    )
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
}

#[test]
fn attention_over_an_f16_cache_is_attention_over_its_values_widened() {
    for AttnCase { s, q, k, v } in attention_cases() {
        let ((k16, k32), (v16, v32)) = (halves(&k), halves(&v));
        for simd in ops::attention_simd() {
            let (mut wide, mut half) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            ops::attention_using(simd, &mut wide, &q, &k32, &v32, s);
            ops::attention_using(simd, &mut half, &q, &k16, &v16, s);
            assert!(same_bits(&half, &wide), "attention {simd:?} {s:?}");
        }
    }
    for shape in ATTN_SHAPES {
        let RowsCase { s, pos, q, caches } = rows_case(shape);
        let caches: Vec<_> = caches.iter().map(|(k, v)| (halves(k), halves(v))).collect();
        let kv16: Vec<(&[u16], &[u16])> =
            caches.iter().map(|(k, v)| (&k.0[..], &v.0[..])).collect();
        let kv32: Vec<(&[f32], &[f32])> =
            caches.iter().map(|(k, v)| (&k.1[..], &v.1[..])).collect();
        let (mut wide, mut half) = (vec![0.0; q.len()], vec![0.0; q.len()]);
        ops::attention_rows(&mut wide, &q, &kv32, &pos, s);
        ops::attention_rows(&mut half, &q, &kv16, &pos, s);
        assert!(same_bits(&half, &wide), "attention_rows {s:?}");
    }
}

#[test]
fn batched_decode_attention_matches_naive_row_by_row() {
    for shape in ATTN_SHAPES {
        let (n_heads, n_kv_heads, head_dim) = shape;
        let q_dim = n_heads * head_dim;
        let RowsCase { s, pos, q, caches } = rows_case(shape);
        let kv: Vec<(&[f32], &[f32])> = caches
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let mut fast = vec![0.0; q.len()];
        ops::attention_rows(&mut fast, &q, &kv, &pos, s);
        for (i, &p) in pos.iter().enumerate() {
            let one = AttnShape {
                n_tokens: 1,
                pos0: p,
                ..s
            };
            let mut slow = vec![0.0; q_dim];
            naive::attention(
                &mut slow,
                &q[i * q_dim..(i + 1) * q_dim],
                kv[i].0,
                kv[i].1,
                one,
            );
            let got = &fast[i * q_dim..(i + 1) * q_dim];
            assert_close(
                &format!("attention_rows {n_heads}/{n_kv_heads}x{head_dim} row {i}"),
                got,
                &slow,
                1e-5,
            );
            // the same bits when the row is alone in the step
            let mut alone = vec![0.0; q_dim];
            let qi = &q[i * q_dim..(i + 1) * q_dim];
            ops::attention_rows(&mut alone, qi, &kv[i..i + 1], &pos[i..i + 1], s);
            assert!(
                alone
                    .iter()
                    .zip(got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "attention_rows {n_heads}/{n_kv_heads}x{head_dim}: row {i} differs alone"
            );
        }
    }
}

#[test]
fn softmax_matches_naive() {
    let x: Vec<f32> = rand_vec(49152, 11).iter().map(|v| v * 30.0).collect();
    let (mut fast, mut slow) = (x.clone(), x);
    ops::softmax(&mut fast);
    naive::softmax(&mut slow);
    assert_close("softmax", &fast, &slow, 1e-6);
}

#[test]
fn vector_exp_is_within_2_ulp_and_every_width_agrees() {
    use chatstream::backend::cpu::vexp;
    // a million points over e^x's normal range, and the edges
    let mut xs: Vec<f32> = (0..1_000_000)
        .map(|i| -87.3 + 175.3 * i as f32 / 1e6)
        .collect();
    xs.extend([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 88.0, -87.33]);
    for &x in &xs {
        let (got, want) = (vexp::exp(x), (x as f64).exp());
        let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
        assert!(ulp <= 2, "exp({x}) = {got}, want {want} ({ulp} ulp)");
    }
    assert!(vexp::exp(f32::NAN).is_nan());
    assert!(vexp::exp(-1000.0) < 1.2e-38 && vexp::exp(-1000.0) >= 0.0);
    assert!(vexp::exp(1000.0).is_finite() && vexp::exp(1000.0) > 1e38);
    // the vector forms give the same bits as the one-value form, tails of every length
    // included (the edge values last)
    let m = 0.75;
    let want: Vec<f32> = xs.iter().map(|&x| vexp::exp(x - m)).collect();
    for (simd, cut) in ops::attention_simd()
        .into_iter()
        .flat_map(|s| (0..16).map(move |c| (s, c)))
    {
        let (xs, want) = (&xs[cut..], &want[cut..]);
        let mut got = xs.to_vec();
        // SAFETY: attention_simd lists only what this CPU has.
        unsafe {
            match simd {
                #[cfg(target_arch = "x86_64")]
                ops::Simd::Avx512 => vexp::exp_minus16(&mut got, m),
                #[cfg(target_arch = "x86_64")]
                ops::Simd::Avx2 => vexp::exp_minus8(&mut got, m),
                #[cfg(target_arch = "aarch64")]
                ops::Simd::Neon => vexp::exp_minus4(&mut got, m),
                _ => continue,
            }
        }
        let same = got
            .iter()
            .zip(want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        assert!(
            same,
            "{simd:?}, {} values: vector exp differs from the one-value form",
            xs.len()
        );
    }
}

#[test]
fn silu_mul_matches_naive_with_every_instruction_set() {
    let n = 1536 * 3 + 5;
    let gate: Vec<f32> = rand_vec(n, 41).iter().map(|v| v * 12.0).collect();
    let up = rand_vec(n, 42);
    let want: Vec<f32> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32)
        .collect();
    for simd in ops::attention_simd() {
        let mut got = gate.clone();
        ops::silu_mul_using(simd, &mut got, &up);
        assert_close(&format!("silu_mul {simd:?}"), &got, &want, 1e-5);
    }
}

/// GGML blocks of random Q8_0 / Q4_0 / Q4_1 data, or F16 / BF16 values in -1..1, for a
/// (rows, cols) matrix.
fn random_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let vals = || rand_vec(rows * cols, seed).into_iter();
    match ty {
        GgmlType::F16 => {
            return vals()
                .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                .collect()
        }
        GgmlType::BF16 => {
            return vals()
                .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                .collect()
        }
        _ => {}
    }
    let n = ty.byte_len(rows * cols).unwrap();
    let block = n / (rows * cols / 32);
    let raw = rand_vec(n, seed);
    let mut bytes: Vec<u8> = raw.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
    for b in bytes.chunks_exact_mut(block) {
        // small finite f16 scale (and minimum)
        let (s5, s7) = (b[5] as f32, b[7] as f32);
        b[..2].copy_from_slice(&half::f16::from_f32(0.01 + s5 / 5000.0).to_le_bytes());
        if ty == GgmlType::Q4_1 {
            b[2..4].copy_from_slice(&half::f16::from_f32(-0.05 + s7 / 2000.0).to_le_bytes());
        }
    }
    bytes
}

/// Every storage type the CPU keeps compact (`QuantMatrix`).
const ALL_COMPACT: [GgmlType; 5] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::F16,
    GgmlType::BF16,
];

#[test]
fn quantized_matvec_matches_the_dequantized_naive_product() {
    use chatstream::backend::cpu::quant;
    use chatstream::model::dequant::{dequantize, BlockFormat, QuantMatrix};
    for ty in ALL_COMPACT {
        for (rows, cols) in [(192, 576), (576, 1536), (33, 64)] {
            let bytes = random_blocks(ty, rows, cols, 21);
            let q = QuantMatrix::from_ggml(ty, &bytes, rows, cols).unwrap();
            let mut w = vec![0f32; rows * cols];
            dequantize(ty, &bytes, &mut w);
            let x = rand_vec(cols, 22);
            let (mut fast, mut slow) = (vec![0.0; rows], vec![0.0; rows]);
            quant::matvec_q(&mut fast, &x, &q);
            naive::matmul(&mut slow, &x, &w, 1, cols, rows);
            assert_close(&format!("{ty:?} matvec {rows}x{cols}"), &fast, &slow, 1e-4);
            if !q.format.scaled() {
                continue; // the one-row kernels take 4- and 8-bit blocks only
            }
            let (qs, nb) = (q.row_bytes(), cols / 32);
            let xsum: Vec<f32> = x.chunks(32).map(|c| c.iter().sum()).collect();
            for (name, q4, q8) in quant::matvec_kernels() {
                let dots: Vec<f32> = (0..rows)
                    .map(|r| {
                        let (row, sc, mn) = (
                            &q.qs[r * qs..(r + 1) * qs],
                            &q.scales[r * nb..(r + 1) * nb],
                            &q.mins[r * nb..(r + 1) * nb],
                        );
                        if q.format == BlockFormat::Q8 {
                            q8(row, sc, &x)
                        } else {
                            q4(row, sc, mn, &x, &xsum)
                        }
                    })
                    .collect();
                assert_close(&format!("{ty:?} {name} {rows}x{cols}"), &dots, &slow, 1e-4);
            }
        }
    }
}

#[test]
fn quantized_few_row_matmul_matches_the_dequantized_naive_product() {
    use chatstream::backend::cpu::quant;
    use chatstream::model::dequant::{dequantize, QuantMatrix};
    for ty in ALL_COMPACT {
        // an odd number of rows: the kernels' last row goes alone
        let (rows, cols) = (101, 576);
        let bytes = random_blocks(ty, rows, cols, 31);
        let q = QuantMatrix::from_ggml(ty, &bytes, rows, cols).unwrap();
        let mut w = vec![0f32; rows * cols];
        dequantize(ty, &bytes, &mut w);
        for n in [1, 2, 3, 4, 5, 8, 9, quant::MAX_ROWS] {
            let x = rand_vec(n * cols, 32);
            let (mut fast, mut slow) = (vec![0.0; n * rows], vec![0.0; n * rows]);
            quant::matmul_q(&mut fast, &x, &q, n);
            naive::matmul(&mut slow, &x, &w, n, cols, rows);
            assert_close(&format!("{ty:?} matmul_q n={n}"), &fast, &slow, 1e-4);
            for (name, kernel) in quant::rows_kernels() {
                let mut got = vec![0.0; rows * n];
                kernel(q.format, &q.qs, &q.scales, &q.mins, &x, cols, n, &mut got);
                assert_close(
                    &format!("{ty:?} rows kernel {name} n={n}"),
                    &got,
                    &slow,
                    1e-4,
                );
                // each input's sums are the same bits whatever else shares the call
                for i in 0..n {
                    let mut alone = vec![0.0; rows];
                    let xi = &x[i * cols..(i + 1) * cols];
                    kernel(q.format, &q.qs, &q.scales, &q.mins, xi, cols, 1, &mut alone);
                    let batched = &got[i * rows..(i + 1) * rows];
                    assert!(
                        batched
                            .iter()
                            .zip(&alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{ty:?} rows kernel {name}: input {i} of {n} differs from itself alone"
                    );
                }
            }
        }
    }
}

#[test]
fn products_of_one_input_in_one_pass_equal_separate_products() {
    use chatstream::backend::cpu::quant;
    use chatstream::model::dequant::QuantMatrix;
    let cols = 576;
    let matrix = |ty, rows, seed| {
        QuantMatrix::from_ggml(ty, &random_blocks(ty, rows, cols, seed), rows, cols).unwrap()
    };
    // q, k and v of different formats and heights (k shorter than a task); gate and up
    let qkv = [
        matrix(GgmlType::Q4_1, 576, 1),
        matrix(GgmlType::Q8_0, 48, 2),
        matrix(GgmlType::F16, 192, 3),
    ];
    let [gate, up] = [GgmlType::Q4_0, GgmlType::Q8_0].map(|ty| matrix(ty, 1536, 4));
    for n in [1, 2, 5, quant::MAX_ROWS] {
        let x = rand_vec(n * cols, 33);
        let alone = |w: &QuantMatrix| {
            let mut out = vec![f32::NAN; n * w.rows];
            quant::matmul_q(&mut out, &x, w, n);
            out
        };
        let mut outs = qkv.each_ref().map(|w| vec![f32::NAN; n * w.rows]);
        let [a, b, c] = &mut outs;
        let [wa, wb, wc] = qkv.each_ref();
        quant::products(&x, n, [(a, wa), (b, wb), (c, wc)], false);
        for (got, w) in outs.iter().zip(&qkv) {
            assert_eq!(got, &alone(w), "n={n}: {:?} {} rows", w.format, w.rows);
        }
        let (mut g, mut u) = (vec![f32::NAN; n * 1536], vec![f32::NAN; n * 1536]);
        quant::products(&x, n, [(&mut g, &gate), (&mut u, &up)], true);
        let mut want = alone(&gate);
        ops::silu_mul(&mut want, &alone(&up));
        assert_eq!(g, want, "n={n}: silu(gate) * up");
    }
}

#[test]
fn quantized_prefill_matmul_equals_sgemm_on_the_dequantized_weights() {
    use chatstream::backend::cpu::quant;
    use chatstream::model::dequant::{dequantize, QuantMatrix};
    // 8192 columns: on a few threads, each one's share of rows spans several panels
    for (rows, cols) in [(101, 576), (1000, 8192)] {
        for ty in ALL_COMPACT {
            let bytes = random_blocks(ty, rows, cols, 41);
            let q = QuantMatrix::from_ggml(ty, &bytes, rows, cols).unwrap();
            let mut w = vec![0f32; rows * cols];
            dequantize(ty, &bytes, &mut w);
            for n in [17, 64] {
                let x = rand_vec(n * cols, 42);
                let (mut got, mut want) = (vec![0.0; n * rows], vec![0.0; n * rows]);
                quant::matmul_q_gemm(&mut got, &x, &q, n);
                ops::matmul(&mut want, &x, &w, n, cols, rows);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?} {rows}x{cols} n={n}: not the f32 SGEMM's bits"
                );
            }
        }
    }
}
