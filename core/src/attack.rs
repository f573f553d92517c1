//! Attacks on federated training, for `consilium simulate` and the robustness benchmark only:
//! they show what a poisoned or broken site does to each aggregation strategy. No site worker
//! can be told to run one (the worker's configuration and command line have no such setting).
//!
//! Every attack but the label flip rewrites the update a site sends: from its honestly trained
//! weights `w`, the global model `g` and, for the two that need them, the honest sites' updates
//! of the round (the strongest attacker of the papers, who knows them).

use serde::{Deserialize, Serialize};

use crate::aggregate::{Tensor, Weights};

/// `[sites.attack]` of a simulated site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Attack {
    /// Sends `g - (w - g)`: the change reversed. (Written `{}` so that a stray setting is
    /// refused, not ignored.)
    SignFlip {},
    /// Sends `g + factor·(w - g)` (`factor` 10).
    Scaling {
        #[serde(default = "ten")]
        factor: f64,
    },
    /// Sends `g` plus Gaussian noise of standard deviation `sigma` (10) per parameter.
    Noise {
        #[serde(default = "ten")]
        sigma: f64,
    },
    /// Trains on flipped labels, `y → C - 1 - y`: a mislabelled dataset.
    LabelFlip {},
    /// "A little is enough" (Baruch et al. 2019): per parameter, the honest changes' mean plus
    /// `z` of their standard deviations; `z` defaults to the paper's largest that the
    /// majority still counts, Φ⁻¹((n - s)/n) with s = ⌊n/2 + 1⌋ - f.
    LittleIsEnough {
        #[serde(default)]
        z: Option<f64>,
    },
    /// Inner-product manipulation (Xie et al. 2020): `-epsilon` (0.5) times the honest changes'
    /// mean, so that the aggregate's step points against the honest direction.
    InnerProduct {
        #[serde(default = "half")]
        epsilon: f64,
    },
}

fn ten() -> f64 {
    10.0
}
fn half() -> f64 {
    0.5
}

impl Attack {
    /// What it is, for the report and the audit trail.
    pub fn describe(&self) -> String {
        match self {
            Attack::SignFlip {} => "sign flip".into(),
            Attack::Scaling { factor } => format!("scaling ×{factor}"),
            Attack::Noise { sigma } => format!("Gaussian noise (σ = {sigma})"),
            Attack::LabelFlip {} => "label flip (y → C−1−y)".into(),
            Attack::LittleIsEnough { z: Some(z) } => format!("a little is enough (z = {z})"),
            Attack::LittleIsEnough { z: None } => "a little is enough".into(),
            Attack::InnerProduct { epsilon } => {
                format!("inner-product manipulation (ε = {epsilon})")
            }
        }
    }

    /// Whether the attacker needs the honest sites' updates of the round.
    pub fn needs_honest(&self) -> bool {
        matches!(
            self,
            Attack::LittleIsEnough { .. } | Attack::InnerProduct { .. }
        )
    }

    /// What is wrong with its settings, if anything.
    pub fn problem(&self) -> Option<String> {
        let bad = |x: f64| !x.is_finite();
        match self {
            Attack::Scaling { factor } if bad(*factor) => {
                Some(format!("scaling's factor must be a number, not {factor}"))
            }
            Attack::Noise { sigma } if bad(*sigma) || *sigma <= 0.0 => {
                Some(format!("noise's sigma must be above 0, not {sigma}"))
            }
            Attack::LittleIsEnough { z: Some(z) } if bad(*z) => {
                Some(format!("little_is_enough's z must be a number, not {z}"))
            }
            Attack::InnerProduct { epsilon } if bad(*epsilon) || *epsilon <= 0.0 => Some(format!(
                "inner_product's epsilon must be above 0, not {epsilon}"
            )),
            _ => None,
        }
    }

    /// The label a label-flipping site trains on.
    pub fn label(&self, label: u32, classes: u32) -> u32 {
        match self {
            Attack::LabelFlip {} if label < classes => classes - 1 - label,
            _ => label,
        }
    }

    /// The update the attacker sends instead of its trained weights `own`. `honest` holds the
    /// honest sites' updates of the round (only read by the attacks that need them), `sites`
    /// and `attackers` count the round's updates and attackers (for the default z), `rng` the
    /// noise's generator (a simulation's: nothing here is secret).
    pub fn tamper(
        &self,
        global: &Weights,
        own: &Weights,
        honest: &[&Weights],
        sites: usize,
        attackers: usize,
        rng: &mut dyn rand::RngCore,
    ) -> Weights {
        let map = |f: &mut dyn FnMut(&str, usize, f32) -> f32| -> Weights {
            global
                .iter()
                .map(|(name, g)| {
                    let data = g
                        .data
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| f(name, i, x))
                        .collect();
                    (name.clone(), Tensor::new(g.shape.clone(), data))
                })
                .collect()
        };
        let change = |name: &str, i: usize, w: &Weights| w[name].data[i] - global[name].data[i];
        match self {
            Attack::SignFlip {} => map(&mut |name, i, g| g - change(name, i, own)),
            Attack::Scaling { factor } => {
                let factor = *factor as f32;
                map(&mut |name, i, g| g + factor * change(name, i, own))
            }
            Attack::Noise { sigma } => {
                let mut out = global.clone();
                for t in out.values_mut() {
                    let mut noise = vec![0f32; t.data.len()];
                    crate::noise::gaussian(rng, *sigma, &mut noise);
                    for (x, e) in t.data.iter_mut().zip(noise) {
                        *x += e;
                    }
                }
                out
            }
            Attack::LabelFlip {} => own.clone(),
            Attack::LittleIsEnough { .. } | Attack::InnerProduct { .. } if honest.is_empty() => {
                // Alone, the attacker knows only its own change: it stands in for the honest.
                self.tamper(global, own, &[own], sites, attackers, rng)
            }
            Attack::LittleIsEnough { z } => {
                let z = z.unwrap_or_else(|| little_is_enough_z(sites, attackers)) as f32;
                let n = honest.len() as f32;
                map(&mut |name, i, g| {
                    let changes = honest.iter().map(|w| change(name, i, w));
                    let mean = changes.clone().sum::<f32>() / n;
                    let var = changes.map(|d| (d - mean).powi(2)).sum::<f32>() / n;
                    g + mean + z * var.sqrt()
                })
            }
            Attack::InnerProduct { epsilon } => {
                let (e, n) = (*epsilon as f32, honest.len() as f32);
                map(&mut |name, i, g| {
                    let mean = honest.iter().map(|w| change(name, i, w)).sum::<f32>() / n;
                    g - e * mean
                })
            }
        }
    }
}

/// Baruch et al.'s z for `n` sites of which `f` attack: Φ⁻¹((n - s)/n), s = ⌊n/2 + 1⌋ - f
/// (0 where that leaves no room).
pub fn little_is_enough_z(n: usize, f: usize) -> f64 {
    let s = (n / 2 + 1).saturating_sub(f);
    let p = (n.saturating_sub(s)) as f64 / n.max(1) as f64;
    if p <= 0.0 || p >= 1.0 {
        return 0.0;
    }
    // Φ⁻¹ by bisection on Φ(x) = erfc(-x/√2)/2.
    let (mut lo, mut hi) = (-10.0f64, 10.0f64);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if libm::erfc(-mid / std::f64::consts::SQRT_2) / 2.0 < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn w(d: &[f32]) -> Weights {
        [("w".to_string(), Tensor::new(vec![d.len()], d.to_vec()))]
            .into_iter()
            .collect()
    }

    fn tamper(a: Attack, own: &[f32], honest: &[&[f32]]) -> Vec<f32> {
        let honest: Vec<Weights> = honest.iter().map(|h| w(h)).collect();
        let refs: Vec<&Weights> = honest.iter().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        a.tamper(&w(&[1.0, 1.0]), &w(own), &refs, 5, 1, &mut rng)["w"]
            .data
            .clone()
    }

    #[test]
    fn attacks_by_hand() {
        // Global (1, 1); the attacker trained to (2, 0.5): its change is (1, -0.5).
        assert_eq!(tamper(Attack::SignFlip {}, &[2.0, 0.5], &[]), [0.0, 1.5]);
        assert_eq!(
            tamper(Attack::Scaling { factor: 10.0 }, &[2.0, 0.5], &[]),
            [11.0, -4.0]
        );
        // Honest changes (1, 0) and (3, 2): mean (2, 1), standard deviation (1, 1).
        assert_eq!(
            tamper(
                Attack::LittleIsEnough { z: Some(1.5) },
                &[2.0, 0.5],
                &[&[2.0, 1.0], &[4.0, 3.0]]
            ),
            [1.0 + 2.0 + 1.5, 1.0 + 1.0 + 1.5]
        );
        assert_eq!(
            tamper(
                Attack::InnerProduct { epsilon: 0.5 },
                &[2.0, 0.5],
                &[&[2.0, 1.0], &[4.0, 3.0]]
            ),
            [0.0, 0.5]
        );
        assert_eq!(Attack::LabelFlip {}.label(0, 2), 1);
        assert_eq!(Attack::LabelFlip {}.label(1, 3), 1);
        assert_eq!(Attack::SignFlip {}.label(1, 2), 1);
        // σ = 10 noise: far from the global model, a different draw per parameter.
        let noisy = tamper(Attack::Noise { sigma: 10.0 }, &[2.0, 0.5], &[]);
        assert!(noisy[0] != noisy[1] && noisy.iter().any(|x| (x - 1.0).abs() > 1.0));
    }

    #[test]
    fn the_default_z_is_baruchs() {
        // n = 50, f = 12 (the paper's example): s = 26 - 12 = 14, Φ⁻¹(36/50) = 0.5828.
        assert!((little_is_enough_z(50, 12) - 0.582_842).abs() < 1e-4);
        // n = 5, f = 1: s = 2, Φ⁻¹(3/5) = 0.2533.
        assert!((little_is_enough_z(5, 1) - 0.253_347).abs() < 1e-4);
    }

    #[test]
    fn attacks_are_read_from_toml_tables() {
        let a: Attack = serde_json::from_value(serde_json::json!({"kind": "scaling"})).unwrap();
        assert_eq!(a, Attack::Scaling { factor: 10.0 });
        let a: Attack =
            serde_json::from_value(serde_json::json!({"kind": "inner_product", "epsilon": 2}))
                .unwrap();
        assert_eq!(a, Attack::InnerProduct { epsilon: 2.0 });
        assert!(
            serde_json::from_value::<Attack>(serde_json::json!({"kind": "sign_flip", "x": 1}))
                .is_err()
        );
        assert!(Attack::Noise { sigma: 0.0 }.problem().is_some());
    }
}
