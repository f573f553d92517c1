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
    /// FedNova's effective local steps `a_i` of this site (`fednova_steps`); needed by
    /// `FedNova` only.
    pub steps: Option<f64>,
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
    /// Normalised averaging (Wang et al. 2020): each site's change divided by its effective
    /// local steps `a_i`, averaged by samples, then scaled by the sample-weighted mean of the
    /// `a_i` — so a site that takes more local steps (more data, more epochs) no longer pulls
    /// the model towards its own optimum. Running batch-norm statistics are averaged as
    /// FedAvg does.
    FedNova,
    /// Stochastic controlled averaging (Karimireddy et al. 2020): every site corrects each
    /// local gradient by `c − c_i`, the server's control variate less its own, so that a site
    /// whose data differ drifts less towards its own optimum; the model is then averaged as
    /// FedAvg does (server learning rate 1). The control variates are `scaffold_controls`'.
    Scaffold,
    /// Weights by data size and by the loss improvement (Mächler et al. 2021).
    FedCostWAvg { alpha: f64 },
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise mean without the `beta` fraction of extremes on each side.
    TrimmedMean { beta: f64 },
    /// The one update closest to its `n - f - 2` nearest neighbours (Blanchard et al. 2017).
    Krum { f: usize },
    /// The sample-weighted mean of the `m` updates with the best Krum scores (Blanchard et
    /// al. 2017); `m` defaults to `n - f`.
    MultiKrum { f: usize, m: Option<usize> },
    /// Krum picks `n - 2f` updates one by one; then, per coordinate, the mean of the
    /// `n - 4f` of them closest to their median (El Mhamdi et al. 2018). Needs `n ≥ 4f + 3`.
    Bulyan { f: usize },
    /// Distance-based outlier suppression (Alkhunaizi et al. 2022): COPOD outlier scores of
    /// the sites' rows in the cosine and the Euclidean distance matrices of their updates,
    /// averaged; the weights are the softmax of the negative scores over `temperature`, and
    /// every change is bounded at the round's median change norm before it is weighted.
    Dos { temperature: f64 },
}

impl Strategy {
    /// The fewest updates a round needs for the strategy to tolerate its `f` bad sites (and for
    /// Multi-Krum to average its `m`).
    pub fn min_updates(&self) -> usize {
        match self {
            Strategy::Krum { f } => 2 * f + 3,
            Strategy::MultiKrum { f, m } => (2 * f + 3).max(m.unwrap_or(0)),
            Strategy::Bulyan { f } => 4 * f + 3,
            _ => 1,
        }
    }

    /// Whether the strategy weighs the sites by how their updates look (their weights and
    /// scores say who was suppressed) rather than by their samples alone.
    pub fn is_robust(&self) -> bool {
        matches!(
            self,
            Strategy::Median
                | Strategy::TrimmedMean { .. }
                | Strategy::Krum { .. }
                | Strategy::MultiKrum { .. }
                | Strategy::Bulyan { .. }
                | Strategy::Dos { .. }
        )
    }
}

/// Rounds in a row a robust strategy must down-weight a site before it is flagged.
pub const FLAG_AFTER_ROUNDS: usize = 3;

/// Which updates the strategy down-weighted: a robust strategy's share below half the round's
/// median share (never for FedAvg and its kin, whose shares only follow the samples; never for
/// Krum, whose median share is 0, since it keeps one update by design).
pub fn down_weighted(strategy: &Strategy, sites: &[SiteWeight]) -> Vec<bool> {
    let mut shares: Vec<f64> = sites.iter().map(|s| s.weight).collect();
    shares.sort_by(|a, b| a.total_cmp(b));
    let n = shares.len();
    let median = match n {
        0 => 0.0,
        _ if n % 2 == 1 => shares[n / 2],
        _ => (shares[n / 2 - 1] + shares[n / 2]) / 2.0,
    };
    sites
        .iter()
        .map(|s| strategy.is_robust() && s.weight < median / 2.0)
        .collect()
}

/// What one site's update counted for in a round, in the order of the updates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteWeight {
    /// The strategy's outlier score, higher for a more suspect update: Krum's sum of squared
    /// distances to the nearest neighbours (Krum, Multi-Krum, Bulyan), DOS's COPOD score, the
    /// fraction of coordinates in which the update was trimmed away (median, trimmed mean).
    /// None for the strategies that do not score (FedAvg and its kin).
    pub score: Option<f64>,
    /// Its share of the new model, from 0 (excluded) to 1; the shares of a round sum to 1
    /// (for the coordinate-wise strategies, the mean share over the coordinates).
    pub weight: f64,
}

/// The next global model and what each update counted for.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregated {
    pub weights: Weights,
    pub sites: Vec<SiteWeight>,
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

/// What the server keeps between rounds: FedAdam's and FedYogi's moments, and where SCAFFOLD's
/// control variates and the sites' corrections for the next round are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    pub m: Weights,
    pub v: Weights,
    /// SCAFFOLD: SHA-256 of the control variates in the artifact store (safetensors, the
    /// server's as `server/<name>`, site `id`'s as `site/<id>/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controls: Option<String>,
    /// SCAFFOLD: each site's correction `c − c_i` for the next round (site id → SHA-256 of
    /// the safetensors in the artifact store), sent with its training job.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub corrections: BTreeMap<String, String>,
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

/// Running statistics: weights the model keeps but training does not change by gradient
/// (FedProx's term and SCAFFOLD's correction leave them out, FedNova averages them as FedAvg
/// does): batch norm's mean and variance, amplitude normalisation's mean spectrum.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("running_amplitude")
}

/// One site's part in SCAFFOLD's control variates after a round (`scaffold_controls`).
pub struct ScaffoldSite<'a> {
    /// The site's model after local training, `y_i`.
    pub weights: &'a Weights,
    /// Its effective local steps `a_i` (`fednova_steps`: plain SGD's step count, or what
    /// momentum or the proximal term make of it).
    pub steps: f64,
    /// Its control variate `c_i` before the round; none before its first round (zero).
    pub control: Option<&'a Weights>,
}

/// What a site adds to every gradient in SCAFFOLD: `c − c_i`, for the trained weights of
/// `global` (a missing control variate is zero).
pub fn scaffold_correction(global: &Weights, server: &Weights, site: Option<&Weights>) -> Weights {
    global
        .iter()
        .filter(|(name, _)| !is_running_stat(name))
        .map(|(name, g)| {
            let mut out = g.zeros_like();
            if let Some(c) = server.get(name).filter(|c| c.data.len() == g.data.len()) {
                out.data.copy_from_slice(&c.data);
            }
            if let Some(ci) = site
                .and_then(|s| s.get(name))
                .filter(|c| c.data.len() == g.data.len())
            {
                for (o, c) in out.data.iter_mut().zip(&ci.data) {
                    *o -= c;
                }
            }
            (name.clone(), out)
        })
        .collect()
}

/// SCAFFOLD's control variates after a round (Karimireddy et al. 2020, algorithm 1 with
/// option II). Each site that trained from `global` (x) gets
/// `c_i⁺ = c_i − c + (x − y_i) / (a_i η)`, its mean corrected gradient over the round, and the
/// server `c⁺ = c + (1/N) Σ (c_i⁺ − c_i)` over the `sites_in_run` sites N (those that did not
/// report keep theirs). The server computes them from what it has already, so no site sends
/// more than its update. Returns the sites' new control variates, in `trained`'s order, and
/// the server's.
pub fn scaffold_controls(
    global: &Weights,
    trained: &[ScaffoldSite<'_>],
    server: &Weights,
    sites_in_run: usize,
    learning_rate: f64,
) -> Result<(Vec<Weights>, Weights), AggregateError> {
    if !(learning_rate.is_finite() && learning_rate > 0.0) {
        return Err(AggregateError::Invalid(format!(
            "SCAFFOLD needs a positive learning rate, not {learning_rate}"
        )));
    }
    if sites_in_run < trained.len() || sites_in_run == 0 {
        return Err(AggregateError::Invalid(format!(
            "{} sites trained in a run of {sites_in_run}",
            trained.len()
        )));
    }
    let mut next_server = scaffold_correction(global, server, None);
    let mut sites = Vec::with_capacity(trained.len());
    for (index, t) in trained.iter().enumerate() {
        if !(t.steps.is_finite() && t.steps > 0.0) {
            return Err(AggregateError::Mismatch {
                index,
                reason: format!("SCAFFOLD needs the site's local steps, not {}", t.steps),
            });
        }
        let scale = (1.0 / (t.steps * learning_rate)) as f32;
        let correction = scaffold_correction(global, server, t.control);
        let mut ci_next = Weights::new();
        for (name, corr) in &correction {
            let (x, y) = match (global.get(name), t.weights.get(name)) {
                (Some(x), Some(y)) if y.data.len() == x.data.len() => (x, y),
                _ => {
                    return Err(AggregateError::Mismatch {
                        index,
                        reason: format!("tensor {name} is missing or has another shape"),
                    });
                }
            };
            let mut out = x.zeros_like();
            let old = t.control.and_then(|c| c.get(name));
            let mut c_next = next_server.get_mut(name);
            for i in 0..out.data.len() {
                // c_i − c + (x − y_i)/(a_i η) = −(c − c_i) + (x − y_i)/(a_i η)
                let v = -corr.data[i] + (x.data[i] - y.data[i]) * scale;
                if !v.is_finite() {
                    return Err(AggregateError::Mismatch {
                        index,
                        reason: format!("tensor {name} gives a control variate that is not finite"),
                    });
                }
                out.data[i] = v;
                let before = old.map_or(0.0, |o| o.data.get(i).copied().unwrap_or(0.0));
                if let Some(c) = c_next.as_deref_mut() {
                    c.data[i] += (v - before) / sites_in_run as f32;
                }
            }
            ci_next.insert(name.clone(), out);
        }
        sites.push(ci_next);
    }
    Ok((sites, next_server))
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

/// `coefs` scaled to sum to 1, as each site's weight without a score.
fn shares(coefs: &[f64]) -> Vec<SiteWeight> {
    let total: f64 = coefs.iter().sum();
    coefs
        .iter()
        .map(|c| SiteWeight {
            score: None,
            weight: c / total,
        })
        .collect()
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

/// FedNova's effective local steps `a_i` of a site that took `steps` optimiser steps (Wang
/// et al. 2020, their Table 1): `τ` for plain SGD; `[τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)` with
/// heavy-ball momentum `ρ`; `[1 − (1 − ημ)^τ] / (ημ)` with FedProx's proximal term (`eta_mu`:
/// the learning rate times μ). The plan refuses momentum and the proximal term together.
pub fn fednova_steps(steps: u64, momentum: f64, eta_mu: f64) -> f64 {
    let tau = steps as f64;
    let exp = i32::try_from(steps).unwrap_or(i32::MAX);
    if momentum > 0.0 {
        (tau - momentum * (1.0 - momentum.powi(exp)) / (1.0 - momentum)) / (1.0 - momentum)
    } else if eta_mu > 0.0 {
        (1.0 - (1.0 - eta_mu).powi(exp)) / eta_mu
    } else {
        tau
    }
}

fn fednova(global: &Weights, updates: &[Update]) -> Result<Aggregated, AggregateError> {
    let n = sample_weights(updates)?;
    let total: f64 = n.iter().sum();
    let p: Vec<f64> = n.iter().map(|x| x / total).collect();
    let a: Vec<f64> = updates
        .iter()
        .enumerate()
        .map(|(index, u)| {
            u.steps
                .filter(|s| s.is_finite() && *s > 0.0)
                .ok_or_else(|| AggregateError::Mismatch {
                    index,
                    reason: "FedNova needs the site's local steps, and none were given".into(),
                })
        })
        .collect::<Result<_, _>>()?;
    let tau_eff: f64 = p.iter().zip(&a).map(|(p, a)| p * a).sum();
    // w = g + τ_eff Σ p_i (w_i − g)/a_i = (1 − Σc) g + Σ c_i w_i, with c_i = τ_eff p_i / a_i.
    let c: Vec<f64> = p.iter().zip(&a).map(|(p, a)| tau_eff * p / a).collect();
    let keep = 1.0 - c.iter().sum::<f64>();
    let weights = global
        .iter()
        .map(|(name, g)| {
            let (on_global, on_sites) = if is_running_stat(name) {
                (0.0, &p)
            } else {
                (keep, &c)
            };
            let mut inputs: Vec<&[f32]> = vec![g.data.as_slice()];
            inputs.extend(updates.iter().map(|u| u.weights[name].data.as_slice()));
            let coefs: Vec<f32> = std::iter::once(on_global as f32)
                .chain(on_sites.iter().map(|x| *x as f32))
                .collect();
            let mut out = g.zeros_like();
            weighted_sum(&inputs, &coefs, &mut out.data);
            (name.clone(), out)
        })
        .collect();
    Ok(Aggregated {
        weights,
        sites: shares(&c),
    })
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

/// Reduces every coordinate over the updates. `reduce` gets the coordinate's values sorted
/// with the index of the update each came from, and returns the value and the range of
/// sorted positions that made it (each counting equally); `uses` sums each update's share.
fn coordinate_wise(
    global: &Weights,
    updates: &[&Weights],
    reduce: impl Fn(&[(f32, usize)]) -> (f32, std::ops::Range<usize>),
    uses: &mut [f64],
) -> Weights {
    let mut column = vec![(0f32, 0usize); updates.len()];
    let mut coordinates = 0usize;
    let out = global
        .iter()
        .map(|(name, g)| {
            let data = (0..g.data.len())
                .map(|i| {
                    for (j, (c, u)) in column.iter_mut().zip(updates).enumerate() {
                        *c = (u[name].data[i], j);
                    }
                    column.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    let (value, kept) = reduce(&column);
                    let share = 1.0 / kept.len() as f64;
                    for &(_, j) in &column[kept] {
                        uses[j] += share;
                    }
                    value
                })
                .collect();
            coordinates += g.data.len();
            (name.clone(), Tensor::new(g.shape.clone(), data))
        })
        .collect();
    for u in uses.iter_mut() {
        *u /= coordinates.max(1) as f64;
    }
    out
}

/// The mean of the sorted positions `kept`.
fn mean_of(c: &[(f32, usize)], kept: std::ops::Range<usize>) -> (f32, std::ops::Range<usize>) {
    let v = c[kept.clone()].iter().map(|x| x.0).sum::<f32>() / kept.len() as f32;
    (v, kept)
}

/// The coordinate-wise strategies' weights: the mean share, and as the score the fraction of
/// coordinates in which the update did not count.
fn coordinate_weights(uses: Vec<f64>, kept_per_coordinate: usize) -> Vec<SiteWeight> {
    let full = 1.0 / kept_per_coordinate as f64;
    uses.into_iter()
        .map(|share| SiteWeight {
            score: Some((1.0 - share / full).clamp(0.0, 1.0)),
            weight: share,
        })
        .collect()
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

/// The pairwise squared Euclidean distances of the updates (symmetric, zero diagonal).
fn squared_distances(updates: &[&Weights]) -> Vec<Vec<f64>> {
    let n = updates.len();
    let mut d = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let x = squared_distance(updates[i], updates[j]);
            d[i][j] = x;
            d[j][i] = x;
        }
    }
    d
}

/// Krum's score of each of `among` (indices into `d`): the sum of its `among.len() - f - 2`
/// smallest squared distances to the others of `among`.
fn krum_scores(d: &[Vec<f64>], among: &[usize], f: usize) -> Vec<f64> {
    // At least the nearest one, so that the last of Bulyan's picks still tell near from far.
    let keep = among.len().saturating_sub(f + 2).max(1);
    among
        .iter()
        .map(|&i| {
            let mut row: Vec<f64> = among
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| d[i][j])
                .collect();
            row.sort_by(|a, b| a.total_cmp(b));
            row.iter().take(keep).sum()
        })
        .collect()
}

/// The position of the smallest value (the first of equals).
fn argmin(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if x.total_cmp(&v[best]).is_lt() {
            best = i;
        }
    }
    best
}

fn need(n: usize, at_least: usize, what: &str) -> Result<(), AggregateError> {
    if n < at_least {
        return Err(AggregateError::Invalid(format!(
            "{what} needs at least {at_least} updates, got {n}: lower f or wait for more sites (aggregation.min_sites)"
        )));
    }
    Ok(())
}

/// COPOD (Li et al. 2020), the outlier score of each row of `x` (rows are samples, columns
/// features): per column, the tail probabilities from the empirical distribution functions,
/// the tail the column's skewness points to, summed over the columns as -ln p.
pub fn copod(x: &[Vec<f64>]) -> Vec<f64> {
    let n = x.len();
    let columns = x.first().map_or(0, Vec::len);
    let mut scores = vec![0.0; n];
    for j in 0..columns {
        let col: Vec<f64> = x.iter().map(|r| r[j]).collect();
        let ecdf = |v: f64, right: bool| {
            let count = col
                .iter()
                .filter(|&&c| if right { c >= v } else { c <= v })
                .count();
            count as f64 / n as f64
        };
        let mean = col.iter().sum::<f64>() / n as f64;
        let m2 = col.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n as f64;
        let m3 = col.iter().map(|c| (c - mean).powi(3)).sum::<f64>() / n as f64;
        // The sign of the sample skewness, 0 for a symmetric or constant column.
        let skew = if m2 > 1e-300 { m3 / m2.powf(1.5) } else { 0.0 };
        let sign = if skew.abs() < 1e-12 {
            0.0
        } else {
            skew.signum()
        };
        for (i, &v) in col.iter().enumerate() {
            let left = -ecdf(v, false).ln();
            let right = -ecdf(v, true).ln();
            let skewed = match sign {
                s if s < 0.0 => left,
                s if s > 0.0 => right,
                _ => left + right,
            };
            scores[i] += skewed.max((left + right) / 2.0);
        }
    }
    scores
}

/// DOS's score of each update: COPOD of its row in the Euclidean and in the cosine distance
/// matrix of the updates' changes to the global model, averaged.
fn dos_scores(global: &Weights, updates: &[&Weights]) -> Vec<f64> {
    let n = updates.len();
    let mut dot = vec![vec![0.0f64; n]; n];
    for (name, g) in global {
        for i in 0..n {
            for j in i..n {
                let a = &updates[i][name].data;
                let b = &updates[j][name].data;
                let s: f64 = a
                    .iter()
                    .zip(b)
                    .zip(&g.data)
                    .map(|((x, y), z)| f64::from(x - z) * f64::from(y - z))
                    .sum();
                dot[i][j] += s;
                if i != j {
                    dot[j][i] += s;
                }
            }
        }
    }
    let norm: Vec<f64> = (0..n).map(|i| dot[i][i].max(0.0).sqrt()).collect();
    let euclidean: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (dot[i][i] + dot[j][j] - 2.0 * dot[i][j]).max(0.0).sqrt())
                .collect()
        })
        .collect();
    let cosine: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    let denominator = norm[i] * norm[j];
                    if denominator > 0.0 {
                        1.0 - dot[i][j] / denominator
                    } else {
                        // A zero change points nowhere: as far as can be from any direction.
                        if i == j { 0.0 } else { 1.0 }
                    }
                })
                .collect()
        })
        .collect();
    copod(&euclidean)
        .into_iter()
        .zip(copod(&cosine))
        .map(|(e, c)| (e + c) / 2.0)
        .collect()
}

/// The next global model, and what each update counted for. `state` carries FedAdam's and
/// FedYogi's moments between rounds.
pub fn aggregate(
    strategy: &Strategy,
    global: &Weights,
    updates: &[Update],
    state: &mut ServerState,
) -> Result<Aggregated, AggregateError> {
    let weighted_mean_based = matches!(
        strategy,
        Strategy::FedAvg
            | Strategy::FedBn
            | Strategy::FedNova
            | Strategy::Scaffold
            | Strategy::FedCostWAvg { .. }
    );
    check(global, updates, !weighted_mean_based)?;
    let out = aggregate_checked(strategy, global, updates, state)?;
    if weighted_mean_based
        && out
            .weights
            .values()
            .any(|t| t.data.iter().any(|x| !x.is_finite()))
    {
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
) -> Result<Aggregated, AggregateError> {
    let n = updates.len();
    let all: Vec<&Weights> = updates.iter().map(|u| &u.weights).collect();
    let mean = |coefs: Vec<f64>, keep_global: &dyn Fn(&str) -> bool| Aggregated {
        weights: weighted_mean(global, updates, &coefs, keep_global),
        sites: shares(&coefs),
    };
    match strategy {
        Strategy::FedAvg | Strategy::Scaffold => Ok(mean(sample_weights(updates)?, &|_| false)),
        Strategy::FedBn => Ok(mean(sample_weights(updates)?, &is_batch_norm)),
        Strategy::FedNova => fednova(global, updates),
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
            Ok(mean(coefs, &|_| false))
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
            let coefs = sample_weights(updates)?;
            let avg = weighted_mean(global, updates, &coefs, |_| false);
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
            Ok(Aggregated {
                weights: next,
                sites: shares(&coefs),
            })
        }
        Strategy::Median => {
            let kept = if n % 2 == 1 { 1 } else { 2 };
            let mut uses = vec![0.0; n];
            let weights = coordinate_wise(
                global,
                &all,
                |c| {
                    let n = c.len();
                    if n % 2 == 1 {
                        (c[n / 2].0, n / 2..n / 2 + 1)
                    } else {
                        ((c[n / 2 - 1].0 + c[n / 2].0) / 2.0, n / 2 - 1..n / 2 + 1)
                    }
                },
                &mut uses,
            );
            Ok(Aggregated {
                weights,
                sites: coordinate_weights(uses, kept),
            })
        }
        Strategy::TrimmedMean { beta } => {
            let k = (beta * n as f64).floor() as usize;
            if 2 * k >= n {
                return Err(AggregateError::Invalid(format!(
                    "trimming {k} of {n} updates on each side leaves none"
                )));
            }
            let mut uses = vec![0.0; n];
            let weights = coordinate_wise(global, &all, |c| mean_of(c, k..c.len() - k), &mut uses);
            Ok(Aggregated {
                weights,
                sites: coordinate_weights(uses, n - 2 * k),
            })
        }
        Strategy::Krum { f } => {
            need(n, strategy.min_updates(), &format!("Krum with f = {f}"))?;
            let d = squared_distances(&all);
            let scores = krum_scores(&d, &(0..n).collect::<Vec<_>>(), *f);
            let best = argmin(&scores);
            Ok(Aggregated {
                weights: updates[best].weights.clone(),
                sites: scores
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| SiteWeight {
                        score: Some(s),
                        weight: if i == best { 1.0 } else { 0.0 },
                    })
                    .collect(),
            })
        }
        Strategy::MultiKrum { f, m } => {
            need(
                n,
                strategy.min_updates(),
                &format!("Multi-Krum with f = {f}"),
            )?;
            let m = m.unwrap_or(n - f);
            if m == 0 || m > n {
                return Err(AggregateError::Invalid(format!(
                    "Multi-Krum cannot average m = {m} of {n} updates: m must be 1 to {n}"
                )));
            }
            let d = squared_distances(&all);
            let scores = krum_scores(&d, &(0..n).collect::<Vec<_>>(), *f);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
            let samples = sample_weights(updates)?;
            let mut coefs = vec![0.0; n];
            for &i in &order[..m] {
                coefs[i] = samples[i];
            }
            if coefs.iter().sum::<f64>() <= 0.0 {
                // The chosen updates report no samples: count them equally.
                for &i in &order[..m] {
                    coefs[i] = 1.0;
                }
            }
            let mut out = mean(coefs, &|_| false);
            for (w, s) in out.sites.iter_mut().zip(scores) {
                w.score = Some(s);
            }
            Ok(out)
        }
        Strategy::Bulyan { f } => {
            need(n, strategy.min_updates(), &format!("Bulyan with f = {f}"))?;
            let d = squared_distances(&all);
            let first = krum_scores(&d, &(0..n).collect::<Vec<_>>(), *f);
            // Krum picks θ = n - 2f updates, each from those left.
            let mut left: Vec<usize> = (0..n).collect();
            let mut chosen = Vec::new();
            while chosen.len() < n - 2 * f {
                let scores = krum_scores(&d, &left, *f);
                chosen.push(left.remove(argmin(&scores)));
            }
            chosen.sort_unstable();
            let picked: Vec<&Weights> = chosen.iter().map(|&i| all[i]).collect();
            let theta = chosen.len();
            let beta = theta - 2 * f;
            let mut uses = vec![0.0; theta];
            let weights = coordinate_wise(
                global,
                &picked,
                |c| {
                    // The β values closest to the median: a window of β sorted values.
                    let median = if theta % 2 == 1 {
                        c[theta / 2].0
                    } else {
                        (c[theta / 2 - 1].0 + c[theta / 2].0) / 2.0
                    };
                    let mut start = 0;
                    let mut best = f32::INFINITY;
                    for s in 0..=theta - beta {
                        let spread = (c[s].0 - median)
                            .abs()
                            .max((c[s + beta - 1].0 - median).abs());
                        if spread < best {
                            best = spread;
                            start = s;
                        }
                    }
                    mean_of(c, start..start + beta)
                },
                &mut uses,
            );
            let mut sites: Vec<SiteWeight> = first
                .into_iter()
                .map(|s| SiteWeight {
                    score: Some(s),
                    weight: 0.0,
                })
                .collect();
            for (k, &i) in chosen.iter().enumerate() {
                sites[i].weight = uses[k];
            }
            Ok(Aggregated { weights, sites })
        }
        Strategy::Dos { temperature } => {
            let scores = dos_scores(global, &all);
            let lowest = scores.iter().copied().fold(f64::INFINITY, f64::min);
            let e: Vec<f64> = scores
                .iter()
                .map(|s| (-(s - lowest) / temperature).exp())
                .collect();
            // The softmax never reaches 0: bound every change at the round's median change
            // norm, so that a scaled update cannot make up in size what it lost in weight.
            let bounded = bounded_at_median_norm(global, updates);
            let mut out = Aggregated {
                weights: weighted_mean(global, &bounded, &e, |_| false),
                sites: shares(&e),
            };
            for (w, s) in out.sites.iter_mut().zip(scores) {
                w.score = Some(s);
            }
            Ok(out)
        }
    }
}

/// The updates with every change to `global` longer than the median change (Euclidean norm
/// over all parameters) scaled down to it.
fn bounded_at_median_norm(global: &Weights, updates: &[Update]) -> Vec<Update> {
    let norms: Vec<f64> = updates
        .iter()
        .map(|u| squared_distance(&u.weights, global).sqrt())
        .collect();
    let mut sorted = norms.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    updates
        .iter()
        .zip(norms)
        .map(|(u, norm)| {
            if norm <= median || norm == 0.0 {
                return u.clone();
            }
            let k = (median / norm) as f32;
            let weights = global
                .iter()
                .map(|(name, g)| {
                    let data = g
                        .data
                        .iter()
                        .zip(&u.weights[name].data)
                        .map(|(g, w)| g + k * (w - g))
                        .collect();
                    (name.clone(), Tensor::new(g.shape.clone(), data))
                })
                .collect();
            Update {
                weights,
                ..u.clone()
            }
        })
        .collect()
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
            steps: None,
        }
    }
    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }
    fn run(s: Strategy, g: &[f32], ups: &[Update]) -> Vec<f32> {
        aggregate(&s, &w(&[("w", g)]), ups, &mut ServerState::default())
            .unwrap()
            .weights["w"]
            .data
            .clone()
    }
    fn sites(s: Strategy, ups: &[Update]) -> Vec<SiteWeight> {
        aggregate(&s, &w(&[("w", &[0.0])]), ups, &mut ServerState::default())
            .unwrap()
            .sites
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
            steps: None,
        };
        let out = aggregate(
            &Strategy::FedBn,
            &g,
            &[u(1.0, 5.0, 1), u(3.0, 7.0, 1)],
            &mut ServerState::default(),
        )
        .unwrap();
        assert_eq!(out.weights["conv1.weight"].data, vec![2.0]);
        assert_eq!(out.weights["bn1.weight"].data, vec![9.0]);
    }

    #[test]
    fn fednova_divides_each_change_by_its_local_steps() {
        // Worked by hand. A: 100 images, a = 2 steps, change +2 (1.0 a step). B: 300 images,
        // a = 6 steps, change +3 (0.5 a step). p = 0.25, 0.75; τ_eff = 0.25·2 + 0.75·6 = 5;
        // the mean change a step 0.25·1.0 + 0.75·0.5 = 0.625, so w = g + 5·0.625 = g + 3.125
        // (FedAvg: g + 2.75). The shares c_i = τ_eff p_i / a_i = 0.625 and 0.625: half each.
        // Running statistics are FedAvg's mean: 0.25·1 + 0.75·3 = 2.5.
        let site = |v: f32, stat: f32, samples: u64, steps: f64| Update {
            weights: w(&[("w", &[v]), ("bn1.running_mean", &[stat])]),
            samples,
            loss_before: None,
            loss_after: None,
            steps: Some(steps),
        };
        let global = w(&[("w", &[1.0]), ("bn1.running_mean", &[0.0])]);
        let out = aggregate(
            &Strategy::FedNova,
            &global,
            &[site(3.0, 1.0, 100, 2.0), site(4.0, 3.0, 300, 6.0)],
            &mut ServerState::default(),
        )
        .unwrap();
        close(&out.weights["w"].data, &[4.125]);
        close(&out.weights["bn1.running_mean"].data, &[2.5]);
        for s in &out.sites {
            assert!((s.weight - 0.5).abs() < 1e-9, "{:?}", out.sites);
        }
        // Equal steps: FedNova is FedAvg.
        let same = aggregate(
            &Strategy::FedNova,
            &global,
            &[site(3.0, 1.0, 100, 4.0), site(4.0, 3.0, 300, 4.0)],
            &mut ServerState::default(),
        )
        .unwrap();
        close(&same.weights["w"].data, &[3.75]);
        // Without the steps it says which update lacks them.
        let err = aggregate(
            &Strategy::FedNova,
            &global,
            &[Update {
                steps: None,
                ..site(3.0, 1.0, 100, 2.0)
            }],
            &mut ServerState::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("local steps"), "{err}");
    }

    #[test]
    fn scaffold_controls_follow_option_two_by_hand() {
        // x = [1, 2] and a running statistic (no control variate); c = [0.1, -0.2]; η = 0.1.
        let x = w(&[("w", &[1.0, 2.0]), ("bn.running_mean", &[0.5])]);
        let c = w(&[("w", &[0.1, -0.2])]);
        // Site A: 2 steps, c_A = [0.05, 0]; site B: 4 steps, its first round (c_B = 0).
        let ya = w(&[("w", &[0.8, 2.2]), ("bn.running_mean", &[0.4])]);
        let yb = w(&[("w", &[1.1, 1.9]), ("bn.running_mean", &[0.6])]);
        let ca = w(&[("w", &[0.05, 0.0])]);
        let trained = [
            ScaffoldSite {
                weights: &ya,
                steps: 2.0,
                control: Some(&ca),
            },
            ScaffoldSite {
                weights: &yb,
                steps: 4.0,
                control: None,
            },
        ];
        let (sites, server) = scaffold_controls(&x, &trained, &c, 3, 0.1).unwrap();
        let close = |got: &Weights, want: &[f32]| {
            let g = &got["w"].data;
            assert_eq!(got.len(), 1, "only trained weights: {got:?}");
            for (a, b) in g.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "{g:?} vs {want:?}");
            }
        };
        // c_A⁺ = c_A − c + (x − y_A)/(2 · 0.1) = [0.05 − 0.1 + 1.0, 0 + 0.2 − 1.0].
        close(&sites[0], &[0.95, -0.8]);
        // c_B⁺ = 0 − c + (x − y_B)/(4 · 0.1) = [−0.1 − 0.25, 0.2 + 0.25].
        close(&sites[1], &[-0.35, 0.45]);
        // c⁺ = c + ((c_A⁺ − c_A) + (c_B⁺ − 0)) / 3 (the third site did not report).
        close(
            &server,
            &[0.1 + (0.9 - 0.35) / 3.0, -0.2 + (-0.8 + 0.45) / 3.0],
        );
        // What site A adds to its gradients next round: c⁺ − c_A⁺.
        let next = scaffold_correction(&x, &server, Some(&sites[0]));
        close(&next, &[0.1 + 0.55 / 3.0 - 0.95, -0.2 - 0.35 / 3.0 + 0.8]);
        // Refusals: no steps, no learning rate, more sites than the run has.
        assert!(matches!(
            scaffold_controls(
                &x,
                &[ScaffoldSite {
                    weights: &ya,
                    steps: 0.0,
                    control: None
                }],
                &c,
                3,
                0.1
            ),
            Err(AggregateError::Mismatch { index: 0, .. })
        ));
        assert!(scaffold_controls(&x, &trained, &c, 3, 0.0).is_err());
        assert!(scaffold_controls(&x, &trained, &c, 1, 0.1).is_err());
    }

    #[test]
    fn scaffold_averages_the_model_as_fedavg() {
        let g = w(&[("w", &[0.0])]);
        let ups = [up(&[1.0], 100), up(&[4.0], 300)];
        let mut state = ServerState::default();
        let a = aggregate(&Strategy::Scaffold, &g, &ups, &mut state).unwrap();
        let b = aggregate(&Strategy::FedAvg, &g, &ups, &mut state).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.weights["w"].data, vec![3.25]);
    }

    #[test]
    fn fednova_steps_follow_the_optimiser() {
        // Plain SGD: τ. Momentum 0.9, τ = 10: (10 − 0.9·(1 − 0.9^10)/0.1)/0.1 = 41.381059609.
        // FedProx, ημ = 0.01, τ = 10: (1 − 0.99^10)/0.01 = 9.561792499.
        assert_eq!(fednova_steps(10, 0.0, 0.0), 10.0);
        assert!((fednova_steps(10, 0.9, 0.0) - 41.381_059_609).abs() < 1e-6);
        assert!((fednova_steps(10, 0.0, 0.01) - 9.561_792_499).abs() < 1e-6);
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
        let g1 = aggregate(&s, &w(&[("w", &[0.0])]), &[up(&[1.0], 1)], &mut state)
            .unwrap()
            .weights;
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

    /// 0, 1, 2, 3 and a byzantine 50, one sample each.
    fn four_near_one_far() -> [Update; 5] {
        [0.0, 1.0, 2.0, 3.0, 50.0].map(|x| up(&[x], 1))
    }

    #[test]
    fn krum_picks_the_most_central_update() {
        // n = 5, f = 1: each scores the sum of its 2 nearest squared distances.
        // 0: {1, 1} → 2 ; 1: {1, 1} → 2 (0 and 2) … the byzantine 50 scores far more.
        let ups = four_near_one_far();
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

    fn weights_of(sites: &[SiteWeight]) -> Vec<f64> {
        sites.iter().map(|s| s.weight).collect()
    }
    fn scores_of(sites: &[SiteWeight]) -> Vec<f64> {
        sites.iter().map(|s| s.score.unwrap_or(f64::NAN)).collect()
    }
    fn near(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn every_strategy_says_what_each_site_counted_for() {
        // FedAvg: the sample shares, no score.
        let s = sites(Strategy::FedAvg, &[up(&[1.0], 100), up(&[4.0], 300)]);
        near(&weights_of(&s), &[0.25, 0.75]);
        assert!(s.iter().all(|s| s.score.is_none()));
        // Median of 4: the middle two (2 and 3) each make half of the one coordinate; the
        // others are trimmed away in every coordinate (score 1).
        let ups = [up(&[1.0], 1), up(&[2.0], 1), up(&[3.0], 1), up(&[100.0], 1)];
        let s = sites(Strategy::Median, &ups);
        near(&weights_of(&s), &[0.0, 0.5, 0.5, 0.0]);
        near(&scores_of(&s), &[1.0, 0.0, 0.0, 1.0]);
        // Two coordinates: 100 is the median of the second one (of 1, 100, 0): half its share.
        let two = |a: f32, b: f32| Update {
            weights: w(&[("w", &[a, b])]),
            ..up(&[0.0], 1)
        };
        let s = aggregate(
            &Strategy::Median,
            &w(&[("w", &[0.0, 0.0])]),
            &[two(1.0, 1.0), two(2.0, 100.0), two(3.0, 0.0)],
            &mut ServerState::default(),
        )
        .unwrap();
        assert_eq!(s.weights["w"].data, vec![2.0, 1.0]);
        near(&weights_of(&s.sites), &[0.5, 0.5, 0.0]);
        // Trimmed mean, β = 0.25 of 4: the middle two count 1/2 each.
        let s = sites(Strategy::TrimmedMean { beta: 0.25 }, &ups);
        near(&weights_of(&s), &[0.0, 0.5, 0.5, 0.0]);
        // Below half the median share (1/4 here): the two trimmed away.
        assert_eq!(
            down_weighted(&Strategy::TrimmedMean { beta: 0.25 }, &s),
            [true, false, false, true]
        );
        // FedAvg's small site is not "down-weighted": its share is its samples'.
        let small = sites(
            Strategy::FedAvg,
            &[up(&[1.0], 1), up(&[1.0], 100), up(&[1.0], 100)],
        );
        assert_eq!(
            down_weighted(&Strategy::FedAvg, &small),
            [false, false, false]
        );
    }

    #[test]
    fn multi_krum_averages_the_best_scored() {
        // Krum scores (n = 5, f = 1, the 2 nearest): 0 → 1+4 = 5, 1 → 2, 2 → 2, 3 → 5,
        // 50 → 47²+48² = 4513. m = n - f = 4 keeps all but 50: mean(0, 1, 2, 3) = 1.5.
        let ups = four_near_one_far();
        let s = Strategy::MultiKrum { f: 1, m: None };
        close(&run(s.clone(), &[0.0], &ups), &[1.5]);
        let got = sites(s, &ups);
        near(&scores_of(&got), &[5.0, 2.0, 2.0, 5.0, 4513.0]);
        near(&weights_of(&got), &[0.25, 0.25, 0.25, 0.25, 0.0]);
        // m = 2: the two best (1 and 2), weighted by samples 1:3.
        let mut weighted = ups.clone();
        weighted[2].samples = 3;
        close(
            &run(Strategy::MultiKrum { f: 1, m: Some(2) }, &[0.0], &weighted),
            &[(1.0 + 2.0 * 3.0) / 4.0],
        );
        // Krum itself: weight 1 for the one it picks.
        near(
            &weights_of(&sites(Strategy::Krum { f: 1 }, &ups)),
            &[0.0, 1.0, 0.0, 0.0, 0.0],
        );
    }

    #[test]
    fn bulyan_by_hand() {
        // n = 7, f = 1. Krum (4 nearest) scores: 0 → 1+4+9+16 = 30, 1 → 1+1+4+9 = 15,
        // 2 → 10, 3 → 10, 4 → 15, 5 → 30, 100 → 95²+96²+97²+98² = 37254.
        // Krum picks θ = 5 in turn: 2; then (3 nearest) 3; then (2) 1; then (1) 4; then
        // of {0, 5, 100} (1 nearest: 25, 25, 9025) 0. β = θ - 2f = 3 values closest to the
        // median 2 of {0, 1, 2, 3, 4}: {1, 2, 3}, mean 2, each a third.
        let ups: Vec<Update> = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0]
            .iter()
            .map(|&x| up(&[x], 1))
            .collect();
        close(&run(Strategy::Bulyan { f: 1 }, &[0.0], &ups), &[2.0]);
        let got = sites(Strategy::Bulyan { f: 1 }, &ups);
        near(
            &scores_of(&got),
            &[30.0, 15.0, 10.0, 10.0, 15.0, 30.0, 37254.0],
        );
        let third = 1.0 / 3.0;
        near(
            &weights_of(&got),
            &[0.0, third, third, third, 0.0, 0.0, 0.0],
        );
        let err = aggregate(
            &Strategy::Bulyan { f: 1 },
            &w(&[("w", &[0.0])]),
            &ups[..6],
            &mut ServerState::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("Bulyan with f = 1 needs at least 7 updates, got 6"),
            "{err}"
        );
    }

    #[test]
    fn copod_by_hand() {
        // One right-skewed column 1, 2, 3, 10 (n = 4). Left tails #≤x/n: 1/4, 2/4, 3/4, 1;
        // right tails #≥x/n: 1, 3/4, 2/4, 1/4. The skew is positive, so the right tail
        // counts: -ln → 0, ln(4/3), ln 2, ln 4; the mean of both tails: ln 2, (ln 2 +
        // ln(4/3))/2, the same, ln 2. The larger of the two per row:
        let o = copod(&[vec![1.0], vec![2.0], vec![3.0], vec![10.0]]);
        let (ln2, ln43) = (std::f64::consts::LN_2, (4.0f64 / 3.0).ln());
        near(&o, &[ln2, (ln2 + ln43) / 2.0, ln2, 2.0 * ln2]);
        // A constant column says nothing about anyone.
        near(&copod(&[vec![5.0], vec![5.0], vec![5.0]]), &[0.0, 0.0, 0.0]);
    }

    #[test]
    fn dos_by_hand() {
        // Updates 1, 2, 3, 10 of the global 0. Euclidean distances, rows as samples:
        // [0 1 2 9], [1 0 1 8], [2 1 0 7], [9 8 7 0]. COPOD per column (as in copod_by_hand,
        // column 1 right-skewed with a tie at 1, column 3 left-skewed):
        //   col 0: ln2, .490415, ln2, ln4     col 1: ln(4/3), ln2, ln(4/3), ln4
        //   col 2: ln2, .490415, ln2, ln4     col 3: ln2, .490415, ln2, ln4
        // Rows: 3 ln2 + ln(4/3) = 2.367123, 3·.490415 + ln2 = 2.164392, 2.367123, 4 ln4 = 5.545177.
        // All changes point the same way: cosine distances are all 0, a score of 0.
        // DOS = the mean: 1.183562, 1.082196, 1.183562, 2.772589; softmax of the negatives:
        // e^-s = sqrt(3/32), sqrt(3/8)^3/2 ... = .306186, .338851, .306186, .0625 (sum 1.013723).
        let ups = [up(&[1.0], 1), up(&[2.0], 1), up(&[3.0], 1), up(&[10.0], 1)];
        let got = sites(Strategy::Dos { temperature: 1.0 }, &ups);
        near(&scores_of(&got), &[1.183562, 1.082196, 1.183562, 2.772589]);
        near(&weights_of(&got), &[0.302041, 0.334266, 0.302041, 0.061653]);
        // The changes are bounded at their median norm, 2.5, before weighting: 1, 2, 2.5, 2.5.
        close(
            &run(Strategy::Dos { temperature: 1.0 }, &[0.0], &ups),
            &[0.302041 + 2.0 * 0.334266 + 2.5 * 0.302041 + 2.5 * 0.061653],
        );
        // A sign-flipped site stands out in the cosine matrix too and weighs least.
        let flipped = [
            up(&[1.0, 1.0], 1),
            up(&[1.1, 0.9], 1),
            up(&[0.9, 1.2], 1),
            up(&[1.0, 0.8], 1),
            up(&[-1.0, -1.0], 1),
        ];
        let s = aggregate(
            &Strategy::Dos { temperature: 1.0 },
            &w(&[("w", &[0.0, 0.0])]),
            &flipped,
            &mut ServerState::default(),
        )
        .unwrap()
        .sites;
        let weights = weights_of(&s);
        assert!(
            weights[4] < 0.5 * weights[..4].iter().cloned().fold(1.0, f64::min),
            "{weights:?}"
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
            local_layers: Vec::new(),
            local_fit_epochs: None,
            ditto: None,
            fine_tune_epochs: None,
            fine_tune_layers: Vec::new(),
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
