//! Golden tests on the two tiny random models of `../shared/fixtures` (Hugging Face folders):
//! logits of every sequence and the hidden states of each stage within 1e-4 of transformers,
//! greedy continuations identical, the chat template rendered byte for byte, and the
//! tokenizer's ids and decoded texts equal.

mod common;

use chatstream::backend::cpu::Cpu;
use chatstream::backend::Backend;
use chatstream::engine::forward::{Logits, RunState};
use chatstream::engine::generate::Generator;
use chatstream::engine::kv_cache::KvCache;
use chatstream::ChatMessage;
use common::*;
use serde_json::Value;

const TOL: f32 = 1e-4;

fn check_model(name: &str) {
    let dir = fixtures().join(name);
    let golden = read_json(dir.join("golden.json"));
    let engine = engine(dir);
    let t = &engine.transformer;
    let vocab = t.cfg.vocab_size;
    let mut gen = Generator::new(engine.clone(), 256);

    for seq in golden["sequences"].as_array().unwrap() {
        let tokens = ids(&seq["token_ids"]);
        let n = tokens.len();
        let what = format!("{name} len {n}");
        let mut st = RunState::new(t, n, n);
        let mut kv = KvCache::new(&Cpu, &t.cfg, 256);
        let mut trace = Vec::new();
        t.forward(&mut st, &mut kv, &tokens, Logits::All, Some(&mut trace))
            .unwrap();
        let mut logits = Vec::new();
        Cpu.read(st.logits(), 0..n * vocab, &mut logits);
        assert_close(
            &format!("{what} last logits"),
            &logits[(n - 1) * vocab..],
            &floats(&seq["last_position_logits"]),
            TOL,
        );
        if let Some(all) = seq.get("all_position_logits") {
            let want: Vec<f32> = all.as_array().unwrap().iter().flat_map(floats).collect();
            assert_close(&format!("{what} all logits"), &logits, &want, TOL);
            let stages = [
                "embedding_output",
                "hidden_after_layer0",
                "hidden_after_layer1_before_final_norm",
            ];
            for (i, stage) in stages.iter().enumerate() {
                let want: Vec<f32> = seq[stage]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(floats)
                    .collect();
                assert_close(&format!("{what} {stage}"), &trace[i], &want, TOL);
            }
        }
        let g = &seq["greedy_20"];
        assert_eq!(
            greedy(&mut gen, tokens, 20),
            ids(&g["new_token_ids"]),
            "{what} greedy_20"
        );
    }

    let ex = &golden["chat_template_example"];
    let messages: Vec<ChatMessage> = serde_json::from_value(ex["messages"].clone()).unwrap();
    let model = &engine.model;
    assert_eq!(
        model.template.render(&messages, true).unwrap(),
        ex["rendered_text"].as_str().unwrap()
    );
    let prompt = model.encode_chat(&messages).unwrap();
    assert_eq!(prompt, ids(&ex["token_ids"]), "{name} chat token ids");
    let text = ex["rendered_text"].as_str().unwrap();
    assert_eq!(
        model.tokenizer.encode(text, true).unwrap(),
        ids(&ex["encode_with_add_special_tokens_true"])
    );
    let mut st = RunState::new(t, 256, 1);
    let mut kv = KvCache::new(&Cpu, &t.cfg, 256);
    t.prefill(&mut st, &mut kv, &prompt).unwrap();
    let mut logits = Vec::new();
    Cpu.read(st.logits(), 0..vocab, &mut logits);
    for e in ex["last_position_top5"].as_array().unwrap() {
        let id = e["id"].as_u64().unwrap() as usize;
        assert_close(
            &format!("{name} chat top5 id {id}"),
            &logits[id..id + 1],
            &[e["logit"].as_f64().unwrap() as f32],
            TOL,
        );
    }
    assert_eq!(
        greedy(&mut gen, prompt, 20),
        ids(&ex["greedy_20"]["new_token_ids"]),
        "{name} chat greedy_20"
    );

    for case in golden["tokenizer_cases"].as_array().unwrap() {
        check_tokenizer_case(model, case);
    }
}

fn check_tokenizer_case(model: &chatstream::Model, case: &Value) {
    let text = case["text"].as_str().unwrap();
    let tok = &model.tokenizer;
    assert_eq!(
        tok.encode(text, true).unwrap(),
        ids(&case["ids_add_special_tokens_true"]),
        "{text:?}"
    );
    let plain = ids(&case["ids_add_special_tokens_false"]);
    assert_eq!(tok.encode(text, false).unwrap(), plain, "{text:?}");
    let tokens: Vec<String> = plain.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    let want: Vec<String> = serde_json::from_value(case["tokens"].clone()).unwrap();
    assert_eq!(tokens, want, "{text:?} tokens");
    let with = ids(&case["ids_add_special_tokens_true"]);
    assert_eq!(
        tok.decode(&with, false).unwrap(),
        case["decode_skip_special_tokens_false"].as_str().unwrap()
    );
    assert_eq!(
        tok.decode(&with, true).unwrap(),
        case["decode_skip_special_tokens_true"].as_str().unwrap()
    );
}

#[test]
fn tiny_llama_matches_transformers() {
    check_model("tiny-llama");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_model("tiny-qwen2");
}
