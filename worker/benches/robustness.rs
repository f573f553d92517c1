//! Robustness of the aggregation strategies under attack: the demo task (synthetic
//! chest-radiograph phantoms, lesion or not, small CNN) at five sites, one of which attacks
//! (`core::attack`), for every strategy × attack on an IID and a label-skewed split. It
//! prints the final model's accuracy on a held-out test set of its own and the attacker's
//! mean share of the models (the lineage's weight), next to the clean FedAvg run of the same
//! split as the baseline.
//!
//! `cargo bench -p consilium-worker --bench robustness [-- ROUNDS [IMAGES]]` (10 rounds, 100
//! images per site by default; README,
//! "Robustness benchmark"). Training is the site worker's own (`Net::train`); aggregation is
//! the server's (`aggregate`). Each site trains with a fixed seed, so a run repeats exactly.

use consilium_core::aggregate::{ServerState, Strategy, Tensor, Update, Weights, aggregate};
use consilium_core::attack::Attack;
use consilium_core::manifest::TrainingPlanManifest;
use consilium_core::plan::Plan;
use consilium_worker::data::Sample;
use consilium_worker::synthetic::{SiteProfile, phantom};
use consilium_worker::train::{NamedWeights, Net, Rng, device};
use rand::SeedableRng;

const SITES: usize = 5;
const SIZE: usize = 28;

fn plan(rounds: u32) -> anyhow::Result<Plan> {
    let m: TrainingPlanManifest = serde_json::from_value(serde_json::json!({
        "model": {"architecture": "small_cnn", "num_classes": 2},
        "preprocessing": {"image_size": SIZE, "normalisation": "zscore"},
        "optimiser": {"name": "adamw", "learning_rate": 0.003, "weight_decay": 0.0001},
        "local_epochs": 1, "batch_size": 16, "rounds": rounds,
        "aggregation": {"strategy": "fedavg"},
        "seed": 1
    }))?;
    m.parse().map_err(|p| anyhow::anyhow!("{}", p.join("; ")))
}

/// Site `i`'s scanner (they differ as the demo's hospitals do) and case mix.
fn profile(i: usize, lesion_fraction: f64, seed: u64) -> SiteProfile {
    SiteProfile {
        images: 0,
        lesion_fraction,
        gain: [1.0, 0.85, 1.1, 0.9, 1.0][i % SITES],
        offset: [0.0, 0.08, -0.05, 0.04, 0.0][i % SITES],
        noise: [0.1, 0.15, 0.1, 0.2, 0.12][i % SITES],
        blur: [0, 0, 1, 0, 1][i % SITES],
        seed,
    }
}

fn samples(images: usize, p: &SiteProfile) -> Vec<Sample> {
    let mut rng = Rng::new(p.seed);
    (0..images)
        .map(|i| {
            let lesion = rng.unit() < p.lesion_fraction;
            Sample {
                pixels: phantom(SIZE, lesion, p, &mut rng),
                label: u32::from(lesion),
                mask: None,
                source: format!("site {} image {i}", p.seed),
                holdout: false,
                unit: format!("{}-{i}", p.seed),
            }
        })
        .collect()
}

fn to_core(w: NamedWeights) -> Weights {
    w.into_iter()
        .map(|(k, (shape, data))| (k, Tensor::new(shape, data)))
        .collect()
}

fn to_net(w: &Weights) -> NamedWeights {
    w.iter()
        .map(|(k, t)| (k.clone(), (t.shape.clone(), t.data.clone())))
        .collect()
}

struct Outcome {
    accuracy: f64,
    /// The attacker's mean share over the rounds.
    attacker_weight: f64,
}

/// One federated run: `sites[SITES - 1]` attacks with `attack`, if any.
fn run(
    plan: &Plan,
    strategy: &Strategy,
    sites: &[Vec<Sample>],
    test: &[Sample],
    attack: Option<&Attack>,
) -> anyhow::Result<Outcome> {
    let dev = device();
    let net = Net::new(plan, &dev)?;
    let mut global = to_core(net.weights()?);
    let mut state = ServerState::default();
    let mut shares = Vec::new();
    let attacker = SITES - 1;
    let flipped: Vec<Sample> = sites[attacker]
        .iter()
        .map(|s| Sample {
            label: Attack::LabelFlip {}.label(s.label, 2),
            ..s.clone()
        })
        .collect();
    let mut noise = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..plan.rounds {
        let mut trained = Vec::new();
        for (i, data) in sites.iter().enumerate() {
            let data = match attack {
                Some(Attack::LabelFlip {}) if i == attacker => &flipped,
                _ => data,
            };
            let refs: Vec<&Sample> = data.iter().collect();
            net.set_weights(&to_net(&global))?;
            net.train(&refs, plan, (u64::from(round) << 8) | i as u64)?;
            trained.push(to_core(net.weights()?));
        }
        if let Some(a) = attack {
            let honest: Vec<&Weights> = trained[..attacker].iter().collect();
            let sent = a.tamper(&global, &trained[attacker], &honest, SITES, 1, &mut noise);
            trained[attacker] = sent;
        }
        let updates: Vec<Update> = trained
            .into_iter()
            .zip(sites)
            .map(|(weights, data)| Update {
                weights,
                samples: data.len() as u64,
                loss_before: None,
                loss_after: None,
                steps: None,
            })
            .collect();
        let out = aggregate(strategy, &global, &updates, &mut state)?;
        shares.push(out.sites[attacker].weight);
        global = out.weights;
    }
    net.set_weights(&to_net(&global))?;
    let refs: Vec<&Sample> = test.iter().collect();
    let m = net.evaluate(&refs, plan)?;
    Ok(Outcome {
        // A model whose weights are no longer finite predicts nothing right.
        accuracy: if m.accuracy.is_finite() {
            m.accuracy
        } else {
            0.0
        },
        attacker_weight: shares.iter().sum::<f64>() / shares.len().max(1) as f64,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rounds: u32 = args.first().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let images: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(100);
    let plan = plan(rounds)?;
    let strategies: Vec<(&str, Strategy)> = vec![
        ("fedavg", Strategy::FedAvg),
        ("median", Strategy::Median),
        ("trimmed_mean", Strategy::TrimmedMean { beta: 0.2 }),
        ("krum", Strategy::Krum { f: 1 }),
        ("multi_krum", Strategy::MultiKrum { f: 1, m: None }),
        ("dos", Strategy::Dos { temperature: 1.0 }),
    ];
    let attacks: Vec<(&str, Option<Attack>)> = vec![
        ("none (clean)", None),
        ("sign flip", Some(Attack::SignFlip {})),
        ("scaling ×10", Some(Attack::Scaling { factor: 10.0 })),
        ("scaling ×100", Some(Attack::Scaling { factor: 100.0 })),
        ("noise σ = 10", Some(Attack::Noise { sigma: 10.0 })),
        ("label flip", Some(Attack::LabelFlip {})),
        (
            "a little is enough",
            Some(Attack::LittleIsEnough { z: None }),
        ),
        ("inner product", Some(Attack::InnerProduct { epsilon: 0.5 })),
    ];
    // A balanced test set from every site's scanner, of its own seeds.
    let test: Vec<Sample> = (0..SITES)
        .flat_map(|i| samples(80, &profile(i, 0.5, 1000 + i as u64)))
        .collect();
    let splits: Vec<(&str, Vec<f64>)> = vec![
        ("IID (every site half lesions)", vec![0.5; SITES]),
        (
            "label-skewed (lesions 10, 30, 50, 70, 90 % by site; the attacker's 90 %)",
            vec![0.1, 0.3, 0.5, 0.7, 0.9],
        ),
    ];
    println!(
        "Robustness: {SITES} sites of {images} images ({SIZE}×{SIZE}, scanners as different as the demo's), site 5 attacks; small CNN, AdamW 0.003, batch 16, {rounds} rounds of 1 local epoch; test set {} images. Accuracy on the test set (the attacker's mean share of the model in brackets). Bulyan needs 4f + 3 = 7 sites for f = 1: not run with 5.",
        test.len()
    );
    for (name, fractions) in &splits {
        let sites: Vec<Vec<Sample>> = fractions
            .iter()
            .enumerate()
            .map(|(i, &f)| samples(images, &profile(i, f, 11 + i as u64)))
            .collect();
        println!("\n{name}\n");
        println!(
            "| attack | {} |",
            strategies
                .iter()
                .map(|s| s.0)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!("|---|{}", "---|".repeat(strategies.len()));
        let mut baseline = None;
        for (attack_name, attack) in &attacks {
            let mut cells = Vec::new();
            let mut best = 0.0f64;
            for (_, strategy) in &strategies {
                let o = run(&plan, strategy, &sites, &test, attack.as_ref())?;
                best = best.max(o.accuracy);
                if attack.is_none() && matches!(strategy, Strategy::FedAvg) {
                    baseline = Some(o.accuracy);
                }
                cells.push(format!("{:.3} ({:.2})", o.accuracy, o.attacker_weight));
            }
            let gap = baseline.map_or(String::new(), |b| {
                format!(" best {:+.1} points from clean FedAvg", (best - b) * 100.0)
            });
            println!("| {attack_name} | {} |{gap}", cells.join(" | "));
        }
    }
    Ok(())
}
