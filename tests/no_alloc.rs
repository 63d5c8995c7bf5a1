//! No heap allocation in the token loop: after a warm-up step, decode steps of one sequence
//! (`forward`) and of four coalesced (`forward_batch`), with each row's argmax, allocate
//! nothing on any thread (but a block of rayon's job queue now and then), on the default
//! model's Q4_1/Q8_0 blocks, with and without int8 activations, and on a float model (the
//! tiny f32 fixture). A global allocator counts.

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

/// Allocations made by `steps` decode steps of one sequence and of four, after a warm-up of
/// `warm` steps of each.
fn allocations_in_decode(model: &Model, warm: usize, steps: usize) -> usize {
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
    run(warm);
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    run(steps);
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

/// Steps counted in each case: 32 passes, each injected into the thread pool from outside.
/// rayon's injector queue allocates a block every 63 jobs, so the count may cross one block.
const STEPS: usize = 16;

/// What rayon's queue may allocate in `STEPS` steps (see there).
const RAYON_QUEUE: usize = 1;

#[test]
fn decode_steps_allocate_nothing() {
    // one warm-up step: the buffers the int8 kernel keeps per thread were made at start-up
    // on every pool thread, not by the first product a thread happens to run
    let warm = 1;
    let tiny = Model::load(&common::fixtures().join("tiny-llama")).unwrap();
    let n = allocations_in_decode(&tiny, warm, STEPS);
    assert!(n <= RAYON_QUEUE, "tiny f32 model: {n} allocations");
    let smol = Model::load(&common::default_model()).unwrap();
    let n = allocations_in_decode(&smol, warm, STEPS);
    assert!(n <= RAYON_QUEUE, "SmolLM2 Q4_1: {n} allocations");
    for a in [q8act::Activations::Int8, q8act::Activations::Int16] {
        q8act::set_activations(a);
        let n = allocations_in_decode(&smol, warm, STEPS);
        q8act::set_activations(q8act::Activations::F32);
        assert!(
            n <= RAYON_QUEUE,
            "SmolLM2 Q4_1, {a:?} activations: {n} allocations"
        );
    }
}
