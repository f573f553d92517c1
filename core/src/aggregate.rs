//! Aggregation strategies: pure functions from the global model and the sites' updates to
//! the next global model. Weights are named tensors of `f32`, flattened row-major.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::manifest::AggregationSpec;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Tensor { shape, data }
    }
    pub fn zeros_like(&self) -> Self {
        Tensor {
            shape: self.shape.clone(),
            data: vec![0.0; self.data.len()],
        }
    }
}

pub type Weights = BTreeMap<String, Tensor>;

/// One site's update for a round.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub weights: Weights,
    /// Training samples behind it (FedAvg's weight).
    pub samples: u64,
    /// The site's training loss on the incoming global model and after local training
    /// (FedCostWAvg weighs by the improvement).
    pub loss_before: Option<f64>,
    pub loss_after: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Strategy {
    /// Sample-weighted mean (McMahan et al. 2017).
    FedAvg,
    /// FedAvg with an Adam step on the server (Reddi et al. 2021).
    FedAdam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
    /// FedAvg with a Yogi step on the server (Reddi et al. 2021).
    FedYogi {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
    /// FedAvg except batch-norm parameters, which stay local (Li et al. 2021).
    FedBn,
    /// Weights by data size and by the loss improvement (Mächler et al. 2021).
    FedCostWAvg { alpha: f64 },
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise mean without the `beta` fraction of extremes on each side.
    TrimmedMean { beta: f64 },
    /// The one update closest to its `n - f - 2` nearest neighbours (Blanchard et al. 2017).
    Krum { f: usize },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("there are no updates to aggregate")]
    NoUpdates,
    #[error("update {index} does not match the global model: {reason}")]
    Mismatch { index: usize, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// The server optimiser's moments for FedAdam and FedYogi, kept between rounds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    pub m: Weights,
    pub v: Weights,
}

impl Strategy {
    /// The strategy a training plan names, with its parameters or their defaults.
    pub fn from_spec(spec: &AggregationSpec) -> Result<Strategy, AggregateError> {
        let mut problems = Vec::new();
        crate::plan::parse_strategy(spec, &mut problems)
            .ok_or_else(|| AggregateError::Invalid(problems.join("; ")))
    }
}

/// Batch-norm parameters and statistics, by the names the models use.
pub fn is_batch_norm(name: &str) -> bool {
    name.split('.')
        .any(|part| part.starts_with("bn") || part == "norm" || part.ends_with("_bn"))
}

/// Shapes always; values only when `values` (the weighted means check their output instead,
/// which reads the data once rather than twice).
fn check(global: &Weights, updates: &[Update], values: bool) -> Result<(), AggregateError> {
    if updates.is_empty() {
        return Err(AggregateError::NoUpdates);
    }
    for (index, u) in updates.iter().enumerate() {
        if u.weights.len() != global.len() {
            return Err(AggregateError::Mismatch {
                index,
                reason: format!("{} tensors, expected {}", u.weights.len(), global.len()),
            });
        }
        for (name, g) in global {
            match u.weights.get(name) {
                None => {
                    return Err(AggregateError::Mismatch {
                        index,
                        reason: format!("tensor {name} is missing"),
                    });
                }
                Some(t) if t.shape != g.shape || t.data.len() != g.data.len() => {
                    return Err(AggregateError::Mismatch {
                        index,
                        reason: format!(
                            "tensor {name} has shape {:?}, expected {:?}",
                            t.shape, g.shape
                        ),
                    });
                }
                Some(t) if values && t.data.iter().any(|x| !x.is_finite()) => {
                    return Err(AggregateError::Mismatch {
                        index,
                        reason: format!("tensor {name} holds a value that is not finite"),
                    });
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

const CHUNK: usize = 2048;

/// `out = Σ coef_i · x_i`, a chunk at a time so that each input is read once and the
/// output written once (memory-bound, close to a copy's speed).
pub fn weighted_sum(inputs: &[&[f32]], coefs: &[f32], out: &mut [f32]) {
    let mut acc = [0f32; CHUNK];
    let mut start = 0;
    while start < out.len() {
        let end = (start + CHUNK).min(out.len());
        let acc = &mut acc[..end - start];
        acc.fill(0.0);
        for (x, &c) in inputs.iter().zip(coefs) {
            for (a, v) in acc.iter_mut().zip(&x[start..end]) {
                *a += c * v;
            }
        }
        out[start..end].copy_from_slice(acc);
        start = end;
    }
}

fn weighted_mean(
    global: &Weights,
    updates: &[Update],
    coefs: &[f64],
    keep_global: impl Fn(&str) -> bool,
) -> Weights {
    let total: f64 = coefs.iter().sum();
    let norm: Vec<f32> = coefs.iter().map(|c| (c / total) as f32).collect();
    global
        .iter()
        .map(|(name, g)| {
            if keep_global(name) {
                return (name.clone(), g.clone());
            }
            let inputs: Vec<&[f32]> = updates
                .iter()
                .map(|u| u.weights[name].data.as_slice())
                .collect();
            let mut out = g.zeros_like();
            weighted_sum(&inputs, &norm, &mut out.data);
            (name.clone(), out)
        })
        .collect()
}

fn sample_weights(updates: &[Update]) -> Result<Vec<f64>, AggregateError> {
    let w: Vec<f64> = updates.iter().map(|u| u.samples as f64).collect();
    if w.iter().sum::<f64>() <= 0.0 {
        return Err(AggregateError::Invalid(
            "the updates report no training samples".into(),
        ));
    }
    Ok(w)
}

fn coordinate_wise(
    global: &Weights,
    updates: &[Update],
    reduce: impl Fn(&mut [f32]) -> f32,
) -> Weights {
    global
        .iter()
        .map(|(name, g)| {
            let mut column = vec![0f32; updates.len()];
            let data = (0..g.data.len())
                .map(|i| {
                    for (c, u) in column.iter_mut().zip(updates) {
                        *c = u.weights[name].data[i];
                    }
                    reduce(&mut column)
                })
                .collect();
            (name.clone(), Tensor::new(g.shape.clone(), data))
        })
        .collect()
}

fn sort(v: &mut [f32]) {
    v.sort_by(|a, b| a.total_cmp(b));
}

fn squared_distance(a: &Weights, b: &Weights) -> f64 {
    a.iter()
        .map(|(name, t)| {
            t.data
                .iter()
                .zip(&b[name].data)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
        })
        .sum()
}

/// The next global model. `state` carries FedAdam's and FedYogi's moments between rounds.
pub fn aggregate(
    strategy: &Strategy,
    global: &Weights,
    updates: &[Update],
    state: &mut ServerState,
) -> Result<Weights, AggregateError> {
    let weighted_mean_based = matches!(
        strategy,
        Strategy::FedAvg | Strategy::FedBn | Strategy::FedCostWAvg { .. }
    );
    check(global, updates, !weighted_mean_based)?;
    let out = aggregate_checked(strategy, global, updates, state)?;
    if weighted_mean_based && out.values().any(|t| t.data.iter().any(|x| !x.is_finite())) {
        // Some input was not finite: find it to say which (the rare, slow path).
        check(global, updates, true)?;
        return Err(AggregateError::Invalid(
            "the aggregate is not finite".into(),
        ));
    }
    Ok(out)
}

fn aggregate_checked(
    strategy: &Strategy,
    global: &Weights,
    updates: &[Update],
    state: &mut ServerState,
) -> Result<Weights, AggregateError> {
    match strategy {
        Strategy::FedAvg => Ok(weighted_mean(
            global,
            updates,
            &sample_weights(updates)?,
            |_| false,
        )),
        Strategy::FedBn => Ok(weighted_mean(
            global,
            updates,
            &sample_weights(updates)?,
            is_batch_norm,
        )),
        Strategy::FedCostWAvg { alpha } => {
            let n = sample_weights(updates)?;
            let n_total: f64 = n.iter().sum();
            let ratios: Vec<f64> = updates
                .iter()
                .map(|u| match (u.loss_before, u.loss_after) {
                    (Some(b), Some(a)) if a > 0.0 && b.is_finite() && a.is_finite() => b / a,
                    _ => 1.0,
                })
                .collect();
            let r_total: f64 = ratios.iter().sum();
            let coefs: Vec<f64> = n
                .iter()
                .zip(&ratios)
                .map(|(ni, ri)| alpha * ni / n_total + (1.0 - alpha) * ri / r_total)
                .collect();
            Ok(weighted_mean(global, updates, &coefs, |_| false))
        }
        Strategy::FedAdam {
            lr,
            beta1,
            beta2,
            tau,
        }
        | Strategy::FedYogi {
            lr,
            beta1,
            beta2,
            tau,
        } => {
            let yogi = matches!(strategy, Strategy::FedYogi { .. });
            let avg = weighted_mean(global, updates, &sample_weights(updates)?, |_| false);
            let mut next = Weights::new();
            for (name, g) in global {
                let m = state
                    .m
                    .entry(name.clone())
                    .or_insert_with(|| g.zeros_like());
                // Yogi and Adam start the second moment at τ² (Reddi et al., algorithm 2).
                let v = state
                    .v
                    .entry(name.clone())
                    .or_insert_with(|| Tensor::new(g.shape.clone(), vec![tau * tau; g.data.len()]));
                let mut out = g.clone();
                for i in 0..g.data.len() {
                    let delta = avg[name].data[i] - g.data[i];
                    m.data[i] = beta1 * m.data[i] + (1.0 - beta1) * delta;
                    let d2 = delta * delta;
                    v.data[i] = if yogi {
                        v.data[i] - (1.0 - beta2) * d2 * (v.data[i] - d2).signum()
                    } else {
                        beta2 * v.data[i] + (1.0 - beta2) * d2
                    };
                    out.data[i] = g.data[i] + lr * m.data[i] / (v.data[i].max(0.0).sqrt() + tau);
                }
                next.insert(name.clone(), out);
            }
            Ok(next)
        }
        Strategy::Median => Ok(coordinate_wise(global, updates, |c| {
            sort(c);
            let n = c.len();
            if n % 2 == 1 {
                c[n / 2]
            } else {
                (c[n / 2 - 1] + c[n / 2]) / 2.0
            }
        })),
        Strategy::TrimmedMean { beta } => {
            let k = (beta * updates.len() as f64).floor() as usize;
            if 2 * k >= updates.len() {
                return Err(AggregateError::Invalid(format!(
                    "trimming {k} of {} updates on each side leaves none",
                    updates.len()
                )));
            }
            Ok(coordinate_wise(global, updates, |c| {
                sort(c);
                let kept = &c[k..c.len() - k];
                kept.iter().sum::<f32>() / kept.len() as f32
            }))
        }
        Strategy::Krum { f } => {
            let n = updates.len();
            if n < 2 * f + 3 {
                return Err(AggregateError::Invalid(format!(
                    "Krum with f = {f} needs at least {} updates, got {n}",
                    2 * f + 3
                )));
            }
            let mut best = (f64::INFINITY, 0);
            for i in 0..n {
                let mut d: Vec<f64> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| squared_distance(&updates[i].weights, &updates[j].weights))
                    .collect();
                d.sort_by(|a, b| a.total_cmp(b));
                let score: f64 = d.iter().take(n - f - 2).sum();
                if score < best.0 {
                    best = (score, i);
                }
            }
            Ok(updates[best.1].weights.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(pairs: &[(&str, &[f32])]) -> Weights {
        pairs
            .iter()
            .map(|(n, d)| (n.to_string(), Tensor::new(vec![d.len()], d.to_vec())))
            .collect()
    }
    fn up(data: &[f32], samples: u64) -> Update {
        Update {
            weights: w(&[("w", data)]),
            samples,
            loss_before: None,
            loss_after: None,
        }
    }
    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }
    fn run(s: Strategy, g: &[f32], ups: &[Update]) -> Vec<f32> {
        aggregate(&s, &w(&[("w", g)]), ups, &mut ServerState::default()).unwrap()["w"]
            .data
            .clone()
    }

    #[test]
    fn fedavg_weighs_by_samples() {
        // (1·100 + 4·300) / 400 = 3.25 ; (2·100 + 0·300) / 400 = 0.5
        close(
            &run(
                Strategy::FedAvg,
                &[0.0, 0.0],
                &[up(&[1.0, 2.0], 100), up(&[4.0, 0.0], 300)],
            ),
            &[3.25, 0.5],
        );
    }

    #[test]
    fn weighted_sum_spans_chunks() {
        let n = CHUNK * 2 + 7;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b = vec![1.0f32; n];
        let mut out = vec![0.0; n];
        weighted_sum(&[&a, &b], &[0.5, 2.0], &mut out);
        assert_eq!(out[0], 2.0);
        assert_eq!(out[n - 1], (n - 1) as f32 * 0.5 + 2.0);
    }

    #[test]
    fn fedbn_keeps_batch_norm_local() {
        let g = w(&[("conv1.weight", &[0.0]), ("bn1.weight", &[9.0])]);
        let u = |a: f32, b: f32, n| Update {
            weights: w(&[("conv1.weight", &[a]), ("bn1.weight", &[b])]),
            samples: n,
            loss_before: None,
            loss_after: None,
        };
        let out = aggregate(
            &Strategy::FedBn,
            &g,
            &[u(1.0, 5.0, 1), u(3.0, 7.0, 1)],
            &mut ServerState::default(),
        )
        .unwrap();
        assert_eq!(out["conv1.weight"].data, vec![2.0]);
        assert_eq!(out["bn1.weight"].data, vec![9.0]);
    }

    #[test]
    fn fedcostwavg_rewards_improvement() {
        // Sizes 1:3 → 0.25, 0.75. Improvements 2.0/1.0 = 2 and 1.0/1.0 = 1 → 2/3, 1/3.
        // α = 0.5: site A 0.5·0.25 + 0.5·(2/3) = 0.458333; site B 0.5·0.75 + 0.5·(1/3) = 0.541667.
        let a = Update {
            loss_before: Some(2.0),
            loss_after: Some(1.0),
            ..up(&[1.0], 100)
        };
        let b = Update {
            loss_before: Some(1.0),
            loss_after: Some(1.0),
            ..up(&[0.0], 300)
        };
        close(
            &run(Strategy::FedCostWAvg { alpha: 0.5 }, &[0.0], &[a, b]),
            &[0.458_333],
        );
    }

    #[test]
    fn fedadam_first_step_by_hand() {
        // Δ = 1 - 0 = 1; m = 0.1·1 = 0.1; v = 0.99·τ² + 0.01·1 = 0.01000099 (τ = 0.001)
        // x = 0 + 0.1 · 0.1 / (sqrt(0.01000099) + 0.001) = 0.0990050…
        let s = Strategy::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.001,
        };
        let out = run(s, &[0.0], &[up(&[1.0], 1)]);
        let expected = 0.1 * 0.1 / ((0.99f32 * 1e-6 + 0.01).sqrt() + 0.001);
        close(&out, &[expected]);
        assert!((out[0] - 0.099_005).abs() < 1e-5);
    }

    #[test]
    fn fedyogi_first_step_by_hand() {
        // v = τ² - 0.01·1·sign(τ² - 1) = 1e-6 + 0.01 = 0.010001 ; x = 0.1·0.1 / (0.1000050 + 0.001) = 0.0990049…
        let s = Strategy::FedYogi {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.001,
        };
        let out = run(s, &[0.0], &[up(&[1.0], 1)]);
        close(&out, &[0.01 / (0.010_001f32.sqrt() + 0.001)]);
    }

    #[test]
    fn server_moments_carry_over_rounds() {
        let s = Strategy::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.001,
        };
        let mut state = ServerState::default();
        let g1 = aggregate(&s, &w(&[("w", &[0.0])]), &[up(&[1.0], 1)], &mut state).unwrap();
        assert!((state.m["w"].data[0] - 0.1).abs() < 1e-6);
        aggregate(&s, &g1, &[up(&[1.0], 1)], &mut state).unwrap();
        // m = 0.9·0.1 + 0.1·(1 - 0.0990050) = 0.1800995
        assert!(
            (state.m["w"].data[0] - 0.180_099_5).abs() < 1e-5,
            "{:?}",
            state.m["w"]
        );
    }

    #[test]
    fn median_and_trimmed_mean_resist_an_outlier() {
        let ups = [up(&[1.0], 1), up(&[2.0], 1), up(&[3.0], 1), up(&[100.0], 1)];
        close(&run(Strategy::Median, &[0.0], &ups), &[2.5]);
        close(&run(Strategy::Median, &[0.0], &ups[..3]), &[2.0]);
        // β = 0.25 of 4 trims one on each side: mean(2, 3) = 2.5
        close(
            &run(Strategy::TrimmedMean { beta: 0.25 }, &[0.0], &ups),
            &[2.5],
        );
        assert!(
            aggregate(
                &Strategy::TrimmedMean { beta: 0.5 },
                &w(&[("w", &[0.0])]),
                &ups[..2],
                &mut ServerState::default()
            )
            .is_err()
        );
    }

    #[test]
    fn krum_picks_the_most_central_update() {
        // n = 5, f = 1: each scores the sum of its 2 nearest squared distances.
        // 0: {1, 1} → 2 ; 1: {1, 1} → 2 (0 and 2) … the byzantine 50 scores far more.
        let ups = [
            up(&[0.0], 1),
            up(&[1.0], 1),
            up(&[2.0], 1),
            up(&[3.0], 1),
            up(&[50.0], 1),
        ];
        let out = run(Strategy::Krum { f: 1 }, &[0.0], &ups);
        // Scores: 0 → 1+4 = 5 ; 1 → 1+1 = 2 ; 2 → 1+1 = 2 ; 3 → 1+4 = 5 ; 50 → 47²+48² . First minimum: update 1.
        assert_eq!(out, vec![1.0]);
        assert!(
            aggregate(
                &Strategy::Krum { f: 2 },
                &w(&[("w", &[0.0])]),
                &ups,
                &mut ServerState::default()
            )
            .is_err()
        );
    }

    #[test]
    fn mismatched_updates_are_refused() {
        let g = w(&[("w", &[0.0, 0.0])]);
        let err = aggregate(
            &Strategy::FedAvg,
            &g,
            &[up(&[1.0], 1)],
            &mut ServerState::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        let err = aggregate(
            &Strategy::FedAvg,
            &g,
            &[up(&[f32::NAN, 0.0], 1)],
            &mut ServerState::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not finite"));
        assert_eq!(
            aggregate(&Strategy::FedAvg, &g, &[], &mut ServerState::default()).unwrap_err(),
            AggregateError::NoUpdates
        );
    }

    #[test]
    fn strategies_from_plans() {
        let spec = |s: &str, p: serde_json::Value| AggregationSpec {
            strategy: s.into(),
            min_sites: None,
            parameters: serde_json::from_value(p).unwrap(),
        };
        assert_eq!(
            Strategy::from_spec(&spec("krum", serde_json::json!({"f": 2}))).unwrap(),
            Strategy::Krum { f: 2 }
        );
        assert!(
            Strategy::from_spec(&spec("fedsgd", serde_json::json!({})))
                .unwrap_err()
                .to_string()
                .contains("aggregation.strategy must be one of")
        );
        assert!(
            Strategy::from_spec(&spec("trimmed_mean", serde_json::json!({"beta": 0.7}))).is_err()
        );
    }
}
