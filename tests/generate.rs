//! The generation loop on the tiny model: max_new_tokens, cancellation from the text
//! callback, seeded sampling, context overflow, and stop strings.

mod common;

use chatstream::backend::cpu::Cpu;
use chatstream::engine::generate::{Engine, FinishReason, GenerateRequest, Generator};
use chatstream::engine::InferenceError;
use chatstream::SamplingParams;

fn req(prompt: Vec<u32>, n: usize, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt,
        max_new_tokens: n,
        sampling,
        stop: vec![],
        ignore_eos: true,
    }
}

fn tiny() -> Generator<Cpu> {
    Generator::new(common::engine(common::fixtures().join("tiny-llama")), 64)
}

#[test]
fn stops_at_max_new_tokens() {
    let mut g = tiny();
    let out = g
        .generate(
            &req(vec![0, 304, 503], 5, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(
        (out.token_ids.len(), out.finish_reason),
        (5, FinishReason::Length)
    );
}

#[test]
fn a_false_callback_cancels_within_one_token() {
    let mut g = tiny();
    let mut pieces = 0;
    let out = g
        .generate(
            &req(vec![0, 304, 503], 50, SamplingParams::default()),
            &mut |_| {
                pieces += 1;
                false
            },
        )
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(pieces, 1);
    assert!(out.token_ids.len() < 50);
}

#[test]
fn same_seed_same_tokens_and_different_seed_differs() {
    let mut g = tiny();
    let p = |seed| SamplingParams {
        temperature: 1.5,
        seed: Some(seed),
        ..Default::default()
    };
    let a = g
        .generate(&req(vec![0, 304], 30, p(1)), &mut |_| true)
        .unwrap()
        .token_ids;
    let b = g
        .generate(&req(vec![0, 304], 30, p(1)), &mut |_| true)
        .unwrap()
        .token_ids;
    let c = g
        .generate(&req(vec![0, 304], 30, p(2)), &mut |_| true)
        .unwrap()
        .token_ids;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let mut g = tiny();
    let e = g
        .generate(&req(vec![5; 64], 4, SamplingParams::default()), &mut |_| {
            true
        })
        .unwrap_err();
    assert_eq!(e, InferenceError::ContextOverflow { len: 65, max: 64 });
    // A full cache ends the answer with "length", not an error.
    let out = g
        .generate(
            &req(vec![5; 60], 10, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(
        out.token_ids.len(),
        5,
        "4 cached steps, then the last token is sampled"
    );
}

#[test]
fn stop_string_cuts_the_text_and_is_never_sent() {
    let mut g = tiny();
    let full = g
        .generate(
            &req(vec![0, 304, 503], 20, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    // Stop on a piece of the greedy text that begins after its first character.
    let cut = full.text.char_indices().nth(3).unwrap().0;
    let stop: String = full.text[cut..].chars().take(2).collect();
    let mut r = req(vec![0, 304, 503], 20, SamplingParams::default());
    r.stop = vec![stop.clone()];
    let mut streamed = String::new();
    let out = g.generate(&r, &mut |p| {
        streamed.push_str(p);
        true
    });
    let out = out.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, full.text[..full.text.find(&stop).unwrap()]);
    assert_eq!(streamed, out.text);
}

#[test]
fn a_prompt_extending_the_cached_tokens_prefills_only_the_rest_and_gives_the_same_tokens() {
    let mut warm = tiny();
    let first = vec![0, 304, 503, 316, 289];
    let a = warm
        .generate(
            &req(first.clone(), 6, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(a.cached_prompt_tokens, 0);
    // the next turn: the whole first exchange plus new tokens
    let mut second = first.clone();
    second.extend(&a.token_ids);
    second.extend([90, 351, 12]);
    let w = warm
        .generate(
            &req(second.clone(), 8, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    let cold = tiny()
        .generate(
            &req(second.clone(), 8, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(w.token_ids, cold.token_ids);
    // the last sampled token of the first answer was never run, so it is not cached
    assert_eq!(w.cached_prompt_tokens, first.len() + a.token_ids.len() - 1);
    // a diverging prompt reuses only the shared part
    let mut other = first[..3].to_vec();
    other.extend([7, 8, 9]);
    let d = warm
        .generate(
            &req(other.clone(), 4, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(d.cached_prompt_tokens, 3);
    assert_eq!(
        d.token_ids,
        tiny()
            .generate(&req(other, 4, SamplingParams::default()), &mut |_| true)
            .unwrap()
            .token_ids
    );
}

#[test]
fn coalesced_decode_steps_give_each_sequence_its_own_tokens() {
    let prompts: Vec<Vec<u32>> = vec![
        vec![0, 304, 503],
        vec![0, 45, 373, 438, 271],
        vec![0, 90],
        vec![0, 351, 12, 7],
    ];
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            tiny()
                .generate(&req(p.clone(), 20, SamplingParams::default()), &mut |_| {
                    true
                })
                .unwrap()
                .token_ids
        })
        .collect();
    let engine = common::engine(common::fixtures().join("tiny-llama"));
    engine.enable_batching(8);
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (engine, p) = (engine.clone(), p.clone());
            std::thread::spawn(move || {
                let mut g = Generator::new(engine, 64);
                g.generate(&req(p, 20, SamplingParams::default()), &mut |_| true)
                    .unwrap()
                    .token_ids
            })
        })
        .collect();
    let batched: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(batched, solo);
    let stats = engine.batcher().unwrap().stats();
    let (passes, steps) = (
        stats.passes.load(std::sync::atomic::Ordering::Relaxed),
        stats.steps.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(
        steps > passes,
        "no step was coalesced: {steps} steps in {passes} passes"
    );
}

/// Decode steps an engine with batching on has run: all, and those workers ran alone.
fn decode_steps(engine: &Engine<Cpu>) -> (usize, usize) {
    let stats = engine.batcher().unwrap().stats();
    let load = |n: &std::sync::atomic::AtomicUsize| n.load(std::sync::atomic::Ordering::Relaxed);
    (load(&stats.steps), load(&stats.solo))
}

#[test]
fn a_repeated_prompt_joins_the_others_decode_with_its_last_token_and_gives_the_same_tokens() {
    let engine = common::engine(common::fixtures().join("tiny-llama"));
    engine.enable_batching(4);
    let steps = || decode_steps(&engine);
    let mut warm = Generator::new(engine.clone(), 64);
    let prompt = vec![0, 304, 503, 316];
    // another worker decoding (the engine thread waits for it a moment each pass)
    let other = engine.batcher().unwrap().decoding();
    let sampled = SamplingParams {
        temperature: 0.8,
        seed: Some(7),
        ..SamplingParams::default()
    };
    for sampling in [SamplingParams::default(), sampled] {
        let cold = tiny()
            .generate(&req(prompt.clone(), 6, sampling), &mut |_| true)
            .unwrap();
        warm.generate(&req(prompt.clone(), 6, sampling), &mut |_| true)
            .unwrap();
        let (all, solo) = steps();
        let again = warm
            .generate(&req(prompt.clone(), 6, sampling), &mut |_| true)
            .unwrap();
        assert_eq!(again.cached_prompt_tokens, prompt.len() - 1);
        assert_eq!(again.token_ids, cold.token_ids);
        // the prompt's last token and five decode steps, all through the engine thread
        assert_eq!(steps(), (all + 6, solo));
    }
    // alone, the generator runs its steps itself, with the same tokens
    drop(other);
    let (all, solo) = steps();
    let alone = warm
        .generate(
            &req(prompt.clone(), 6, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    let cold = tiny()
        .generate(&req(prompt, 6, SamplingParams::default()), &mut |_| true)
        .unwrap();
    assert_eq!(alone.token_ids, cold.token_ids);
    // five decode steps, none through the engine thread (the prompt token is prefill)
    assert_eq!(steps(), (all + 5, solo + 5));
}

#[test]
fn a_greedy_answer_the_engine_thread_follows_ends_as_one_decoded_alone() {
    let engine = common::engine(common::fixtures().join("tiny-llama"));
    engine.enable_batching(4);
    let engine_steps = || {
        let (all, solo) = decode_steps(&engine);
        all - solo
    };
    // another worker decoding, so that a greedy answer is handed to the engine thread
    let _other = engine.batcher().unwrap().decoding();
    let prompt = vec![0, 304, 503];
    let reference = tiny()
        .generate(
            &req(prompt.clone(), 24, SamplingParams::default()),
            &mut |_| true,
        )
        .unwrap();
    let middle: String = reference.text.chars().skip(6).take(3).collect();
    let stopping = GenerateRequest {
        stop: vec![middle],
        ..req(prompt.clone(), 24, SamplingParams::default())
    };
    // (request, context length, pieces the client takes before it goes away)
    let cases = [
        (
            req(prompt.clone(), 24, SamplingParams::default()),
            64,
            usize::MAX,
        ),
        (stopping, 64, usize::MAX),
        (req(prompt.clone(), 24, SamplingParams::default()), 64, 3),
        (
            req(prompt.clone(), 24, SamplingParams::default()),
            12,
            usize::MAX,
        ),
    ];
    for (r, context, pieces) in cases {
        let run = |g: &mut Generator<_>| {
            let mut taken = 0;
            g.generate(&r, &mut |_| {
                taken += 1;
                if taken == 3 {
                    // a slow client: the engine thread runs ahead meanwhile
                    std::thread::sleep(std::time::Duration::from_millis(30));
                }
                taken < pieces
            })
            .unwrap()
        };
        let alone = run(&mut Generator::new(tiny().engine().clone(), context));
        let mut g = Generator::new(engine.clone(), context);
        let before = engine_steps();
        let followed = run(&mut g);
        assert_eq!(
            (&followed.token_ids, &followed.text, followed.finish_reason),
            (&alone.token_ids, &alone.text, alone.finish_reason)
        );
        assert!(
            engine_steps() >= before + followed.token_ids.len() - 1,
            "the steps did not go through the engine thread"
        );
        // a regenerate: the prompt cached but for its last token, from which the engine
        // thread follows the answer
        let mut again = Generator::new(engine.clone(), context);
        run(&mut again);
        let before = engine_steps();
        let regenerated = run(&mut again);
        assert_eq!(regenerated.cached_prompt_tokens, prompt.len() - 1);
        assert_eq!(
            (&regenerated.token_ids, &regenerated.text),
            (&alone.token_ids, &alone.text)
        );
        assert_eq!(regenerated.finish_reason, alone.finish_reason);
        assert!(engine_steps() >= before + regenerated.token_ids.len());
        // the cache holds exactly the tokens of the answer: a next turn reuses them all
        let mut next = prompt.clone();
        next.extend(&followed.token_ids);
        next.push(45);
        let turn = req(next, 4, SamplingParams::default());
        let warm = g.generate(&turn, &mut |_| true);
        let cold = Generator::new(tiny().engine().clone(), context).generate(&turn, &mut |_| true);
        match (warm, cold) {
            (Ok(warm), Ok(cold)) => {
                assert_eq!(warm.token_ids, cold.token_ids);
                assert_eq!(warm.cached_prompt_tokens, turn.prompt_ids.len() - 2);
            }
            (warm, cold) => assert_eq!(warm.is_err(), cold.is_err()),
        }
    }
}
