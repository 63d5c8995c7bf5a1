use chatstream::backend::cpu::q8act::{set_activations, Activations};
use chatstream::backend::cpu::vnni::{matmul, Interleaved};
use chatstream::model::dequant::{quantize, GgmlType, QuantMatrix};
use std::time::Instant;
fn main() {
    set_activations(Activations::Int16);
    let (rows, cols, copies) = (
        1536usize,
        576usize,
        std::env::args()
            .nth(1)
            .map(|s| s.parse().unwrap())
            .unwrap_or(1usize),
    );
    let vals: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let bytes = quantize(GgmlType::Q4_1, &vals).unwrap();
    let w = QuantMatrix::from_ggml(GgmlType::Q4_1, &bytes, rows, cols).unwrap();
    let ils: Vec<Interleaved> = (0..copies).map(|_| Interleaved::new(&w).unwrap()).collect();
    let x: Vec<f32> = (0..16 * cols)
        .map(|i| (i % 13) as f32 * 0.1 - 0.6)
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        for n in [1usize, 2, 4, 8] {
            let mut out = vec![0f32; n * rows];
            let reps = (400_000_000 / (rows * cols * copies)).max(3);
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    for il in &ils {
                        matmul(&mut out, &x, il, n);
                    }
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64 / copies as f64);
            }
            let blocks = (rows * cols / 32) as f64;
            println!(
                "int16 copies {copies} n {n}: {:.3} ns/block, {:.3} ns/block/input",
                best * 1e9 / blocks,
                best * 1e9 / blocks / n as f64
            );
        }
    });
}
