//! The privacy accountant: what a number of steps of the sampled Gaussian mechanism (DP-SGD with
//! Poisson sampling) costs, in Rényi differential privacy (Mironov, Talwar and Zhang 2019, "Rényi
//! Differential Privacy of the Sampled Gaussian Mechanism"), converted to (ε, δ).
//!
//! Rényi costs add up: over the steps of one training, over the rounds of a run, and across runs
//! on the same data, order by order. ε does not add up; it is computed from the summed Rényi
//! values at the end. Two conversions are reported: the classic one (Mironov 2017, Proposition 3:
//! ε = R(α) + log(1/δ)/(α − 1)) and the tighter one of Balle et al. 2020 ("Hypothesis Testing
//! Interpretations and Renyi Differential Privacy", Theorem 21), which Opacus uses; each takes the
//! best order. Pure arithmetic: no I/O, builds for wasm.

use serde::{Deserialize, Serialize};

/// The orders the accountant tracks unless told otherwise (those of Opacus and TensorFlow
/// Privacy): 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

/// Rényi costs per order: the ledger's unit (they add up across steps, rounds and runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct RdpCost {
    pub orders: Vec<f64>,
    /// The cost at each order, in nats; infinite where the mechanism has no bound there.
    pub rdp: Vec<f64>,
}

/// (ε, δ) with the order it was reached at.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Epsilon {
    pub epsilon: f64,
    pub order: f64,
}

/// Why a cost cannot be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    #[error("the sampling rate must lie in [0, 1]; it is {0}")]
    SamplingRate(f64),
    #[error("the noise multiplier must be a finite number ≥ 0; it is {0}")]
    NoiseMultiplier(f64),
    #[error("δ must lie strictly between 0 and 1; it is {0}")]
    Delta(f64),
    #[error("every order must be a number above 1; {0} is not")]
    Order(f64),
    #[error("two costs over different orders cannot be added")]
    Orders,
    #[error(
        "no noise multiplier up to {0} meets ε = {1} (the target is too small for this many steps)"
    )]
    Unreachable(f64, f64),
}

impl RdpCost {
    /// Nothing spent yet, at these orders.
    pub fn zero(orders: &[f64]) -> Self {
        RdpCost {
            orders: orders.to_vec(),
            rdp: vec![0.0; orders.len()],
        }
    }

    /// `steps` steps of the sampled Gaussian mechanism: each example in a batch with
    /// probability `q`, the sum of clipped gradients noised with σ × the clipping norm.
    pub fn sampled_gaussian(
        q: f64,
        sigma: f64,
        steps: u64,
        orders: &[f64],
    ) -> Result<Self, PrivacyError> {
        if !(0.0..=1.0).contains(&q) {
            return Err(PrivacyError::SamplingRate(q));
        }
        if !(sigma.is_finite() && sigma >= 0.0) {
            return Err(PrivacyError::NoiseMultiplier(sigma));
        }
        let mut rdp = Vec::with_capacity(orders.len());
        for &a in orders {
            if !(a.is_finite() && a > 1.0) {
                return Err(PrivacyError::Order(a));
            }
            rdp.push(rdp_step(q, sigma, a) * steps as f64);
        }
        Ok(RdpCost {
            orders: orders.to_vec(),
            rdp,
        })
    }

    /// The two costs together (composition: order by order, the costs add).
    pub fn plus(&self, other: &RdpCost) -> Result<RdpCost, PrivacyError> {
        if self.orders != other.orders {
            return Err(PrivacyError::Orders);
        }
        Ok(RdpCost {
            orders: self.orders.clone(),
            rdp: self
                .rdp
                .iter()
                .zip(&other.rdp)
                .map(|(a, b)| a + b)
                .collect(),
        })
    }

    /// ε at δ by the classic conversion, at the best order.
    pub fn epsilon_classic(&self, delta: f64) -> Result<Epsilon, PrivacyError> {
        check_delta(delta)?;
        Ok(self.best(|a, r| r + (1.0 / delta).ln() / (a - 1.0)))
    }

    /// ε at δ by the conversion of Balle et al. 2020 (tighter), at the best order.
    pub fn epsilon(&self, delta: f64) -> Result<Epsilon, PrivacyError> {
        check_delta(delta)?;
        Ok(self.best(|a, r| r + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0)))
    }

    fn best(&self, eps: impl Fn(f64, f64) -> f64) -> Epsilon {
        let mut out = Epsilon {
            epsilon: f64::INFINITY,
            order: f64::NAN,
        };
        for (&a, &r) in self.orders.iter().zip(&self.rdp) {
            let e = eps(a, r).max(0.0);
            if e < out.epsilon {
                out = Epsilon {
                    epsilon: e,
                    order: a,
                };
            }
        }
        out
    }
}

fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(PrivacyError::Delta(delta))
    }
}

/// The smallest noise multiplier (to three significant digits) with which `steps` steps at
/// sampling rate `q` cost at most `epsilon` at `delta` (the tighter conversion).
pub fn noise_for(
    q: f64,
    steps: u64,
    epsilon: f64,
    delta: f64,
    orders: &[f64],
) -> Result<f64, PrivacyError> {
    check_delta(delta)?;
    let cost = |sigma: f64| -> Result<f64, PrivacyError> {
        Ok(RdpCost::sampled_gaussian(q, sigma, steps, orders)?
            .epsilon(delta)?
            .epsilon)
    };
    const MAX: f64 = 1000.0;
    if cost(MAX)? > epsilon {
        return Err(PrivacyError::Unreachable(MAX, epsilon));
    }
    let (mut low, mut high) = (0.0, MAX);
    while high - low > 1e-4 * high.max(1e-3) {
        let mid = 0.5 * (low + high);
        if cost(mid)? > epsilon {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(high)
}

/// The Rényi cost of one step at order `a`.
fn rdp_step(q: f64, sigma: f64, a: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return a / (2.0 * sigma * sigma);
    }
    let log_a = if a.fract() == 0.0 {
        log_a_int(q, sigma, a as u64)
    } else {
        log_a_frac(q, sigma, a)
    };
    log_a / (a - 1.0)
}

/// log(e^x + e^y) without overflow.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x > y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    a + (b - a).exp().ln_1p()
}

/// log(e^x − e^y), for x ≥ y.
fn log_sub(x: f64, y: f64) -> f64 {
    if y == f64::NEG_INFINITY {
        return x;
    }
    if x <= y {
        return f64::NEG_INFINITY;
    }
    x + (-(y - x).exp()).ln_1p()
}

/// log C(n, k) for integers.
fn log_binom(n: u64, k: u64) -> f64 {
    libm::lgamma(n as f64 + 1.0) - libm::lgamma(k as f64 + 1.0) - libm::lgamma((n - k) as f64 + 1.0)
}

/// log erfc(x), accurate where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        return r.ln();
    }
    // The asymptotic series of erfc for large x.
    let x2 = x * x;
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln()
        + (1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2)).ln()
}

/// Mironov et al. 2019, for an integer order: a binomial expansion.
fn log_a_int(q: f64, sigma: f64, a: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=a {
        let fi = i as f64;
        let coef = log_binom(a, i) + fi * q.ln() + (a - i) as f64 * (-q).ln_1p();
        log_a = log_add(log_a, coef + (fi * fi - fi) / (2.0 * sigma * sigma));
    }
    log_a
}

/// Mironov et al. 2019, for a fractional order: two converging series.
fn log_a_frac(q: f64, sigma: f64, a: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let mut coef = 1.0f64; // C(a, i), real a, built term by term (its sign alternates past a)
    let mut i = 0u32;
    loop {
        let fi = f64::from(i);
        let j = a - fi;
        let log_coef = coef.abs().ln();
        let log_t0 = log_coef + fi * q.ln() + j * (-q).ln_1p();
        let log_t1 = log_coef + j * q.ln() + fi * (-q).ln_1p();
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_s0.max(log_s1) < -30.0 || i > 10_000 {
            break;
        }
        coef *= (a - fi) / (fi + 1.0);
        i += 1;
    }
    log_add(log_a0, log_a1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn three_digits(got: f64, want: f64) {
        let rounded = |v: f64| {
            let scale = 10f64.powi(2 - v.abs().log10().floor() as i32);
            (v * scale).round() / scale
        };
        assert_eq!(rounded(got), rounded(want), "got {got}, published {want}");
    }

    /// Opacus's documented example (opacus/accountants/analysis/rdp.py): 10 steps at q = 1e-5,
    /// σ = 1.0, then 4 steps at q = 1e-4, σ = 3.0; δ = 1e-5, orders 2–32.
    #[test]
    fn the_opacus_example() {
        let orders: Vec<f64> = (2..=32).map(f64::from).collect();
        let cost = RdpCost::sampled_gaussian(1e-5, 1.0, 10, &orders)
            .unwrap()
            .plus(&RdpCost::sampled_gaussian(1e-4, 3.0, 4, &orders).unwrap())
            .unwrap();
        let e = cost.epsilon(1e-5).unwrap();
        three_digits(e.epsilon, 0.336);
        assert_eq!(e.order, 23.0);
    }

    /// TensorFlow Privacy's and Opacus's MNIST figures (60,000 examples, batch 256, δ = 1e-5,
    /// `compute_dp_sgd_privacy`'s classic conversion and step count).
    #[test]
    fn the_mnist_tables() {
        let q = 256.0 / 60_000.0;
        let steps = |epochs: f64| (epochs * 60_000.0 / 256.0).ceil() as u64;
        for (sigma, epochs, published) in [(1.1, 60.0, 3.01), (1.3, 15.0, 1.19), (0.7, 45.0, 7.10)]
        {
            let cost =
                RdpCost::sampled_gaussian(q, sigma, steps(epochs), &default_orders()).unwrap();
            let classic = cost.epsilon_classic(1e-5).unwrap().epsilon;
            three_digits(classic, published);
            // The tighter conversion never reports more.
            assert!(cost.epsilon(1e-5).unwrap().epsilon <= classic);
        }
    }

    #[test]
    fn costs_compose_and_noise_is_found_for_a_target() {
        let orders = default_orders();
        let one = RdpCost::sampled_gaussian(0.01, 1.0, 100, &orders).unwrap();
        let two = RdpCost::sampled_gaussian(0.01, 1.0, 200, &orders).unwrap();
        let sum = one.plus(&one).unwrap();
        for (a, b) in sum.rdp.iter().zip(&two.rdp) {
            assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} vs {b}");
        }
        let sigma = noise_for(0.01, 1000, 3.0, 1e-5, &orders).unwrap();
        let reached = RdpCost::sampled_gaussian(0.01, sigma, 1000, &orders)
            .unwrap()
            .epsilon(1e-5)
            .unwrap()
            .epsilon;
        assert!(
            reached <= 3.0 && reached > 2.95,
            "σ {sigma} gives ε {reached}"
        );
        assert!(matches!(
            noise_for(1.0, 1_000_000, 1e-6, 1e-5, &orders),
            Err(PrivacyError::Unreachable(..))
        ));
    }

    #[test]
    fn nonsense_is_refused() {
        let orders = default_orders();
        assert_eq!(
            RdpCost::sampled_gaussian(1.5, 1.0, 1, &orders),
            Err(PrivacyError::SamplingRate(1.5))
        );
        assert!(RdpCost::sampled_gaussian(0.1, -1.0, 1, &orders).is_err());
        assert!(RdpCost::sampled_gaussian(0.1, 1.0, 1, &[1.0]).is_err());
        let cost = RdpCost::sampled_gaussian(0.1, 1.0, 1, &orders).unwrap();
        assert_eq!(cost.epsilon(0.0), Err(PrivacyError::Delta(0.0)));
        // No noise: no bound.
        let free = RdpCost::sampled_gaussian(0.1, 0.0, 1, &orders).unwrap();
        assert!(free.epsilon(1e-5).unwrap().epsilon.is_infinite());
    }
}
