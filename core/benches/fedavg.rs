#![allow(clippy::unwrap_used, clippy::expect_used)]
//! FedAvg throughput over 10 updates of 10 M parameters, next to a plain copy of the same
//! bytes in the same run. Run with `cargo bench -p consilium-core --bench fedavg`.

use consilium_core::aggregate::{ServerState, Strategy, Tensor, Update, Weights, aggregate};
use std::time::Instant;

const PARAMS: usize = 10_000_000;
const SITES: usize = 10;
const REPEATS: usize = 5;

fn weights(seed: f32) -> Weights {
    let data: Vec<f32> = (0..PARAMS)
        .map(|i| seed + (i % 1000) as f32 * 1e-3)
        .collect();
    [("w".to_string(), Tensor::new(vec![PARAMS], data))]
        .into_iter()
        .collect()
}

fn best_of(mut f: impl FnMut() -> f32) -> (f64, f32) {
    let mut best = f64::INFINITY;
    let mut sink = 0.0;
    for _ in 0..REPEATS {
        let t = Instant::now();
        sink += f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, sink)
}

fn main() {
    let global = weights(0.0);
    let updates: Vec<Update> = (0..SITES)
        .map(|i| Update {
            weights: weights(i as f32),
            samples: 100 + i as u64,
            loss_before: None,
            loss_after: None,
            steps: None,
        })
        .collect();
    let bytes = (SITES * PARAMS * 4) as f64;

    // Baseline: copy every update's bytes once (what any aggregation must at least read).
    let mut dst = vec![0f32; PARAMS];
    let (copy, s1) = best_of(|| {
        for u in &updates {
            dst.copy_from_slice(&u.weights["w"].data);
        }
        dst[PARAMS / 2]
    });
    let (avg, s2) = best_of(|| {
        let out = aggregate(
            &Strategy::FedAvg,
            &global,
            &updates,
            &mut ServerState::default(),
        )
        .map(|a| a.weights)
        .unwrap_or_default();
        out["w"].data[PARAMS / 2]
    });
    let gbs = |secs: f64| bytes / secs / 1e9;
    println!(
        "updates: {SITES} × {PARAMS} f32 parameters ({:.0} MB read per aggregation)",
        bytes / 1e6
    );
    println!("plain copy: {:.2} GB/s ({:.1} ms)", gbs(copy), copy * 1e3);
    println!("FedAvg:     {:.2} GB/s ({:.1} ms)", gbs(avg), avg * 1e3);
    println!(
        "FedAvg / copy: {:.2}  (goal ≥ 0.5)   [checksum {:.1}]",
        copy / avg,
        s1 + s2
    );
}
