//! Gaussian noise for DP-SGD, drawn from the generator the caller passes (the worker passes one
//! seeded from the operating system; never one anybody else can seed). Here rather than in the
//! worker so that it is compiled optimised in every build: a step's noise is one normal value
//! per weight, and a private preview draws tens of millions of them.

/// Fills `out` with independent normal values of mean 0 and standard deviation `std`
/// (Box–Muller, both values of each pair used).
pub fn gaussian(rng: &mut dyn rand::RngCore, std: f64, out: &mut [f32]) {
    use rand::Rng;
    for pair in out.chunks_mut(2) {
        let u1: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.r#gen::<f64>();
        let r = std * (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        pair[0] = (r * c) as f32;
        if let Some(second) = pair.get_mut(1) {
            *second = (r * s) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_noise_has_the_asked_spread() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut v = vec![0f32; 200_001];
        super::gaussian(&mut rng, 3.0, &mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var.sqrt() - 3.0).abs() < 0.03, "{}", var.sqrt());
        assert!(v[200_000] != 0.0, "the odd last value is drawn too");
    }
}
