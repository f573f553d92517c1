#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SecAgg+ cost for a 1 M-parameter model: one site's masking time and bytes sent, and the
//! server's unmasking time, for 3, 10 and 100 sites (complete neighbourhoods up to 21 sites, a
//! ring of 20 neighbours beyond; the plan's default threshold), next to quantising alone and to the plain update's bytes.
//! Run with `cargo bench -p consilium-core --features secagg --bench secagg`.

use consilium_core::secagg::*;
use rand::SeedableRng;
use rand::rngs::OsRng;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;
use uuid::Uuid;

const PARAMS: usize = 1_000_000;

fn main() {
    let ctx = Context {
        run: Uuid::new_v4(),
        round: 1,
    };
    let values: Vec<f32> = (0..PARAMS)
        .map(|i| ((i % 101) as f32 - 50.0) * 1e-3)
        .collect();
    println!(
        "{PARAMS} parameters; plain update {} bytes (f32)",
        PARAMS * 4
    );
    println!(
        "| sites | neighbours | threshold | quantise (ms) | mask, one site (ms) | unmask, server (ms) | bytes sent per site | / plain |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in [3usize, 10, 100] {
        // The plan's defaults: 20 neighbours, a majority of the k + 1 share holders.
        let plan = consilium_core::plan::SecureAggregation {
            clip: 1.0,
            threshold: None,
            neighbours: 20,
            stage_seconds: 60,
        };
        let k = plan.degree(n);
        let t = plan.threshold_of(k);
        let mut graph_rng = rand_chacha::ChaCha20Rng::seed_from_u64(n as u64);
        let graph = neighbourhoods(n, k, &mut graph_rng);
        let secrets: Vec<SiteSecrets> = (0..n).map(|_| SiteSecrets::generate(&mut OsRng)).collect();
        let keys: BTreeMap<SiteIndex, PublicKeys> = (0..n)
            .map(|i| (i as SiteIndex, secrets[i].public()))
            .collect();
        let of = |i: SiteIndex| -> Vec<(SiteIndex, PublicKeys)> {
            graph[&i].iter().map(|j| (*j, keys[j])).collect()
        };
        let mut held: BTreeMap<SiteIndex, Vec<HeldShare>> = BTreeMap::new();
        let mut seeds = Vec::new();
        let mut share_bytes = 0usize;
        for i in 0..n as SiteIndex {
            let (seed, shares) =
                share_keys(&ctx, i, &secrets[i as usize], &of(i), t, &mut OsRng).unwrap();
            seeds.push(seed);
            for s in shares {
                if i == 0 {
                    share_bytes += s.ciphertext.len() + 12 + 8;
                }
                let h = open_share(&ctx, s.to, &secrets[s.to as usize], &keys[&i], &s).unwrap();
                held.entry(s.to).or_default().push(h);
            }
        }
        let started = Instant::now();
        let (q, _) = quantise(&values, 1.0 / n as f64, 1.0);
        let quantise_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut masked = BTreeMap::new();
        let mut mask_ms = 0.0;
        for i in 0..n as SiteIndex {
            let started = Instant::now();
            let m = mask(
                &ctx,
                i,
                &secrets[i as usize],
                &seeds[i as usize],
                &of(i),
                &q,
            )
            .unwrap();
            if i == 0 {
                mask_ms = started.elapsed().as_secs_f64() * 1e3;
            }
            masked.insert(i, m);
        }
        let survivors: BTreeSet<SiteIndex> = masked.keys().copied().collect();
        let reveals: BTreeMap<SiteIndex, Vec<Reveal>> = held
            .iter()
            .map(|(i, h)| (*i, reveal(h, &survivors, &BTreeSet::new()).unwrap()))
            .collect();
        let reveal_bytes: usize = reveals[&0].iter().map(|_| 4 + 33).sum();
        let started = Instant::now();
        let sum = unmask(&ctx, &graph, &keys, &masked, &reveals, t).unwrap();
        let unmask_ms = started.elapsed().as_secs_f64() * 1e3;
        let mean = dequantise(&sum, 1.0);
        assert!(
            (mean[7] - values[7]).abs() < 1e-6,
            "{} vs {}",
            mean[7],
            values[7]
        );
        // Keys (two of 32 bytes), shares, the masked input (4 bytes a parameter), reveals.
        let sent = 64 + share_bytes + PARAMS * 4 + reveal_bytes;
        println!(
            "| {n} | {k} | {t} | {quantise_ms:.1} | {mask_ms:.1} | {unmask_ms:.1} | {sent} | {:.4} |",
            sent as f64 / (PARAMS * 4) as f64
        );
    }
}
