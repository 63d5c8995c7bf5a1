//! No heap allocation in the token loop: after a warm-up, decode steps of one sequence
//! (`forward`) and of four coalesced (`forward_batch`), with each row's argmax, allocate
//! nothing on any thread, on the default model's Q4_1/Q8_0 blocks, with and without int8
//! activations, and on a float model (the tiny f32 fixture). A global allocator counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chatstream::backend::cpu::{q8act, Cpu};
use chatstream::backend::Backend;
use chatstream::engine::forward::{Logits, RunState, Transformer};
use chatstream::engine::kv_cache::KvCache;
use chatstream::Model;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by `steps` decode steps of one sequence and of four, after as many
/// steps of each to warm up.
fn allocations_in_decode(model: &Model, steps: usize) -> usize {
    let t = Transformer::new(Cpu, &model.config, &model.weights);
    let vocab = t.cfg.vocab_size;
    let mut st = RunState::new(&t, 64, 4);
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let mut kvs: Vec<KvCache<Cpu>> = (0..4)
        .map(|i| {
            let mut kv = KvCache::new(&Cpu, &t.cfg, 64);
            t.prefill(&mut st, &mut kv, &prompt[..8 + i]).unwrap();
            kv
        })
        .collect();
    let mut next = [1u32; 4];
    let mut run = |steps: usize| {
        for _ in 0..steps {
            Cpu.within(|| t.forward(&mut st, &mut kvs[0], &next[..1], Logits::Last, None))
                .unwrap();
            next[0] = Cpu.argmax(st.logits(), 0..vocab).unwrap();
            Cpu.within(|| t.forward_batch(&mut st, &mut kvs, &next))
                .unwrap();
            for (i, id) in next.iter_mut().enumerate() {
                *id = Cpu.argmax(st.logits(), i * vocab..(i + 1) * vocab).unwrap();
            }
        }
    };
    run(steps);
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    run(steps);
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

#[test]
fn decode_steps_allocate_nothing() {
    let tiny = Model::load(&common::fixtures().join("tiny-llama")).unwrap();
    assert_eq!(allocations_in_decode(&tiny, 4), 0, "tiny f32 model");
    let smol = Model::load(&common::default_model()).unwrap();
    assert_eq!(allocations_in_decode(&smol, 4), 0, "SmolLM2 Q4_1");
    q8act::set_enabled(true);
    let int8 = allocations_in_decode(&smol, 4);
    q8act::set_enabled(false);
    assert_eq!(int8, 0, "SmolLM2 Q4_1, int8 activations");
}
