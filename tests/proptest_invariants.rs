//! Property tests: softmax sums to 1; RMSNorm gives unit RMS and ignores the input's scale;
//! RoPE keeps each head's norm and is the identity at position 0; temperature 0 is argmax;
//! top-k and top-p samples lie inside their sets; validation accepts exactly at its limits;
//! the detokenizer streams the same text as decoding at once, never splitting a character.

mod common;

use std::sync::OnceLock;

use chatstream::backend::cpu::ops;
use chatstream::backend::RopeShape;
use chatstream::engine::detok::Detokenizer;
use chatstream::engine::sampler::{argmax, Sampler};
use chatstream::model::Tokenizer;
use chatstream::SamplingParams;
use proptest::prelude::*;

fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-30.0f32..30.0, 1..300)
}

fn tiny_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = common::fixtures().join("tiny-llama/tokenizer.json");
        Tokenizer::from_file(&path, Some("<s>".into()), Some("</s>".into())).unwrap()
    })
}

proptest! {
    #[test]
    fn softmax_is_a_distribution(mut x in logits_strategy()) {
        ops::softmax(&mut x);
        let sum: f32 = x.iter().sum();
        prop_assert!((sum - 1.0).abs() < 1e-4, "sum {sum}");
        prop_assert!(x.iter().all(|&p| (0.0..=1.0).contains(&p)));
    }

    #[test]
    fn rmsnorm_has_unit_rms_and_ignores_scale(x in prop::collection::vec(-10.0f32..10.0, 8..128), scale in 0.1f32..50.0) {
        prop_assume!(x.iter().map(|v| v * v).sum::<f32>() > 1e-2);
        let w = vec![1.0; x.len()];
        let mut a = vec![0.0; x.len()];
        let mut b = vec![0.0; x.len()];
        ops::rmsnorm(&mut a, &x, &w, 1, 0.0);
        let scaled: Vec<f32> = x.iter().map(|v| v * scale).collect();
        ops::rmsnorm(&mut b, &scaled, &w, 1, 0.0);
        let rms = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
        prop_assert!((rms - 1.0).abs() < 1e-4, "rms {rms}");
        for (p, q) in a.iter().zip(&b) {
            prop_assert!((p - q).abs() < 1e-4);
        }
    }

    #[test]
    fn rope_keeps_norm_and_is_identity_at_zero(x in prop::collection::vec(-5.0f32..5.0, 32), pos in 0usize..4096) {
        let (head_dim, half) = (16, 8);
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32)).collect();
        let table = |p: usize| -> (Vec<f32>, Vec<f32>) {
            let mut cos = vec![0.0; (p + 1) * half];
            let mut sin = vec![0.0; (p + 1) * half];
            for (i, &f) in inv.iter().enumerate() {
                let a = p as f32 * f;
                cos[p * half + i] = a.cos();
                sin[p * half + i] = a.sin();
            }
            (cos, sin)
        };
        let s = RopeShape { n_tokens: 1, n_heads: 2, head_dim, pos0: pos };
        let (cos, sin) = table(pos);
        let mut y = x.clone();
        ops::rope_half(&mut y, &cos, &sin, s);
        for h in 0..2 {
            let n0: f32 = x[h * 16..(h + 1) * 16].iter().map(|v| v * v).sum();
            let n1: f32 = y[h * 16..(h + 1) * 16].iter().map(|v| v * v).sum();
            prop_assert!((n0 - n1).abs() <= 1e-3 * n0.max(1.0), "{n0} vs {n1}");
        }
        let (cos, sin) = table(0);
        let mut z = x.clone();
        ops::rope_half(&mut z, &cos, &sin, RopeShape { pos0: 0, ..s });
        prop_assert_eq!(z, x);
    }

    #[test]
    fn temperature_zero_is_argmax(x in logits_strategy(), penalty_free_ctx in prop::collection::vec(0u32..1000, 0..5)) {
        let mut s = Sampler::new(SamplingParams::default(), x.len());
        let want = argmax(&x);
        prop_assert_eq!(s.sample(&mut x.clone(), &penalty_free_ctx, 0).unwrap(), want);
    }

    #[test]
    fn top_k_and_top_p_samples_lie_inside_their_sets(x in logits_strategy(), k in 1usize..20, p in 0.05f32..1.0, seed: u64) {
        let mut sorted: Vec<usize> = (0..x.len()).collect();
        sorted.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
        // top-k: one of the k largest
        let params = SamplingParams { temperature: 1.0, top_k: k, seed: Some(seed), ..Default::default() };
        let mut s = Sampler::new(params, x.len());
        let t = s.sample(&mut x.clone(), &[], 0).unwrap() as usize;
        prop_assert!(sorted[..k.min(x.len())].contains(&t));
        // top-p: inside the smallest prefix whose probability reaches p (crossing token kept)
        let mut probs = x.clone();
        ops::softmax(&mut probs);
        let mut cum = 0.0;
        let mut nucleus = Vec::new();
        for &i in &sorted {
            nucleus.push(i);
            cum += probs[i];
            if cum >= p - 1e-5 { break; }
        }
        let params = SamplingParams { temperature: 1.0, top_p: p, seed: Some(seed), ..Default::default() };
        let mut s = Sampler::new(params, x.len());
        let t = s.sample(&mut x.clone(), &[], 0).unwrap() as usize;
        // ties at the boundary may admit one more equal-probability token
        let last = probs[*nucleus.last().unwrap()];
        prop_assert!(nucleus.contains(&t) || (probs[t] - last).abs() < 1e-6, "token {} outside nucleus {:?}", t, nucleus);
    }

    #[test]
    fn validation_accepts_exactly_at_its_limits(eps in 1e-4f32..0.5) {
        let ok = SamplingParams { temperature: 100.0, top_k: 0, top_p: 1.0, min_p: 1.0, repetition_penalty: 10.0, seed: None };
        let valid = |p: SamplingParams| p.validate().is_ok();
        let low = SamplingParams { temperature: 0.0, min_p: 0.0, ..ok };
        prop_assert!(valid(ok) && valid(low));
        let too_far = [
            SamplingParams { temperature: 100.0 + eps * 10.0, ..ok },
            SamplingParams { temperature: -eps, ..ok },
            SamplingParams { top_p: 1.0 + eps, ..ok },
            SamplingParams { top_p: 0.0, ..ok },
            SamplingParams { min_p: 1.0 + eps, ..ok },
            SamplingParams { repetition_penalty: 10.0 + eps * 10.0, ..ok },
            SamplingParams { repetition_penalty: 0.0, ..ok },
        ];
        for p in too_far {
            prop_assert!(!valid(p), "accepted {:?}", p);
        }
    }

    #[test]
    fn detokenizer_streams_what_decoding_at_once_gives(ids in prop::collection::vec(0u32..512, 0..60)) {
        let tok = tiny_tokenizer();
        let mut d = Detokenizer::new(tok, true);
        let mut streamed = String::new();
        for &id in &ids {
            if let Some(piece) = d.push(id).unwrap() {
                // a piece never ends inside a split character (U+FFFD is held back)
                prop_assert!(!piece.ends_with('\u{FFFD}'), "piece {:?}", piece);
                streamed += &piece;
            }
        }
        streamed += &d.flush().unwrap().unwrap_or_default();
        prop_assert_eq!(streamed, tok.decode(&ids, true).unwrap());
    }
}

#[test]
fn japanese_and_emoji_stream_whole() {
    let tok = tiny_tokenizer();
    let text = "日本の川は海へ流れる 🌊🐟 café";
    let ids = tok.encode(text, false).unwrap();
    let mut d = Detokenizer::new(tok, true);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.extend(d.push(id).unwrap());
    }
    pieces.extend(d.flush().unwrap());
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
}
