//! Golden test on the real model, SmolLM2-135M-Instruct loaded from its Q4_1 GGUF (the file
//! `scripts/fetch-model.sh` fetches), against `../shared/fixtures/smollm2/golden.json`: the
//! rendered prompt and its token ids identical, the top-10 logits of the last prompt position
//! within 1e-2 and in the same order, and the greedy answers identical; with the KV cache in
//! f32 and in f16 (`--kv-cache-dtype f16`, decoding through the engine thread's batched
//! steps).

mod common;

use chatstream::backend::cpu::Cpu;
use chatstream::backend::{Backend, KvDtype};
use chatstream::engine::forward::RunState;
use chatstream::engine::generate::{FinishReason, GenerateRequest, Generator};
use chatstream::engine::kv_cache::KvCache;
use chatstream::{ChatMessage, SamplingParams};
use common::*;

const TOL: f32 = 1e-2;

#[test]
fn smollm2_gguf_matches_transformers() {
    matches_transformers(KvDtype::F32);
}

#[test]
fn smollm2_gguf_with_an_f16_kv_cache_matches_transformers() {
    matches_transformers(KvDtype::F16);
}

fn matches_transformers(dtype: KvDtype) {
    let golden = read_json(fixtures().join("smollm2/golden.json"));
    let engine = engine_storing(default_model(), dtype);
    engine.enable_batching(4);
    // with another worker counted as decoding, the f16 run's steps go through the engine
    // thread's batched pass (the f32 run's, alone, through the solo one)
    let batcher = engine.batcher().unwrap();
    let _other = (dtype == KvDtype::F16).then(|| batcher.decoding());
    let (model, t) = (&engine.model, &engine.transformer);
    assert_eq!(
        model.template.source,
        golden["model_config"]["chat_template"].as_str().unwrap()
    );
    let mut gen = Generator::new(engine.clone(), 1024);
    for conv in golden["conversations"].as_array().unwrap() {
        let name = conv["name"].as_str().unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(conv["messages"].clone()).unwrap();
        assert_eq!(
            model.template.render(&messages, true).unwrap(),
            conv["prompt_text"].as_str().unwrap(),
            "{name}: prompt text"
        );
        let prompt = model.encode_chat(&messages).unwrap();
        assert_eq!(prompt, ids(&conv["prompt_token_ids"]), "{name}: prompt ids");

        let mut st = RunState::new(t, 256, 1);
        let mut kv = KvCache::of(&Cpu, &t.cfg, 1024, dtype);
        t.prefill(&mut st, &mut kv, &prompt).unwrap();
        let mut logits = Vec::new();
        Cpu.read(st.logits(), 0..t.cfg.vocab_size, &mut logits);
        let top: Vec<(u32, f32)> = conv["last_position_top10"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["id"].as_u64().unwrap() as u32,
                    e["logit"].as_f64().unwrap() as f32,
                )
            })
            .collect();
        let worst = top
            .iter()
            .map(|&(id, want)| (logits[id as usize] - want).abs())
            .fold(0f32, f32::max);
        eprintln!("{name} ({dtype:?} KV cache): top-10 logits within {worst:.5}");
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        for (rank, &(id, want)) in top.iter().enumerate() {
            assert_close(
                &format!("{name}: logit of top-{rank} id {id}"),
                &logits[id as usize..id as usize + 1],
                &[want],
                TOL,
            );
            // Same order wherever the golden gap to the next is clearly above the tolerance.
            if rank + 1 < top.len() && top[rank].1 - top[rank + 1].1 > 2.0 * TOL {
                let ours = order.iter().position(|&x| x == id).unwrap();
                let next = order.iter().position(|&x| x == top[rank + 1].0).unwrap();
                assert!(
                    ours < next,
                    "{name}: id {id} should rank above id {}",
                    top[rank + 1].0
                );
            }
        }
        assert_eq!(order[0], top[0].0, "{name}: argmax");

        let g = &conv["greedy"];
        let req = GenerateRequest {
            prompt_ids: prompt,
            max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize,
            sampling: SamplingParams::default(),
            stop: vec![],
            ignore_eos: false,
        };
        let mut streamed = String::new();
        let out = gen.generate(&req, &mut |p| {
            streamed.push_str(p);
            true
        });
        let out = out.unwrap();
        assert_eq!(
            out.token_ids,
            ids(&g["new_token_ids"]),
            "{name}: greedy ids"
        );
        assert_eq!(out.text, g["text"].as_str().unwrap(), "{name}: greedy text");
        assert_eq!(streamed, out.text);
        let want_reason = if g["stopped_at_eos"].as_bool().unwrap() {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        assert_eq!(out.finish_reason, want_reason, "{name}");
    }
}
