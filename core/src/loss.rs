//! The segmentation training loss on values, with its gradient: for a model differentiated by
//! hand, where candle would build it from a dozen whole-tensor operations (a permute, the
//! softmax, a one-hot encoding, narrows, products and sums), each one a node of the graph.

use crate::conv::vectorised;
use candle_core::{Result, bail};
use rayon::prelude::*;

/// One image's share of the loss: Σ −log p(target) over its pixels, and per class Σ p·t, Σ p
/// and Σ t.
#[derive(Clone, Debug, Default)]
struct Sums {
    nll: f64,
    overlap: Vec<f64>,
    predicted: Vec<f64>,
    reference: Vec<f64>,
}

impl Sums {
    fn add(mut self, other: &Sums) -> Sums {
        self.nll += other.nll;
        for (a, b) in [
            (&mut self.overlap, &other.overlap),
            (&mut self.predicted, &other.predicted),
            (&mut self.reference, &other.reference),
        ] {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        self
    }
}

/// Cross-entropy over every pixel plus the soft Dice loss of the foreground classes: `1 −` the
/// mean over classes 1.. of `(2 Σ p·t + smooth) / (Σ p + Σ t + smooth)`, each sum over the
/// whole batch (MONAI's `DiceCELoss` with the background left out of the Dice term), of
/// `logits` (N, K, H, W) against `targets` (N, H, W, each below K). Returns the loss and its
/// gradient with respect to the logits.
pub fn dice_ce(
    logits: &[f32],
    targets: &[u32],
    (n, k, plane): (usize, usize, usize),
    smooth: f64,
) -> Result<(f32, Vec<f32>)> {
    if k < 2 {
        bail!("dice_ce: a segmentation needs the background and at least one class, not {k}")
    }
    if logits.len() != n * k * plane || targets.len() != n * plane {
        bail!("dice_ce: the logits or the targets do not match the batch's shape")
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= k) {
        bail!("dice_ce: a target class {t} where the model has {k} classes")
    }
    let image = k * plane;
    // First the softmax of each pixel (kept, for the gradient) and each image's sums.
    let mut grad = logits.to_vec();
    let sums = grad
        .par_chunks_mut(image.max(1))
        .zip(targets.par_chunks(plane.max(1)))
        .map(|(p, t)| {
            vectorised(
                #[inline(always)]
                || softmax(p, t, k, plane),
            )
        })
        .collect::<Vec<Sums>>();
    let zero = Sums {
        overlap: vec![0.0; k],
        predicted: vec![0.0; k],
        reference: vec![0.0; k],
        ..Sums::default()
    };
    let total = sums.iter().fold(zero, Sums::add);
    let count = (n * plane).max(1) as f64;
    let foreground = (k - 1) as f64;
    let mut dice = 0.0;
    // ∂loss/∂p_c at a pixel is `on[c]` where the target is c, plus `off[c]`.
    let (mut on, mut off) = (vec![0f32; k], vec![0f32; k]);
    for c in 1..k {
        let overlap = 2.0 * total.overlap[c] + smooth;
        let denominator = total.predicted[c] + total.reference[c] + smooth;
        dice += overlap / denominator;
        on[c] = (-2.0 / denominator / foreground) as f32;
        off[c] = (overlap / (denominator * denominator) / foreground) as f32;
    }
    let loss = total.nll / count + 1.0 - dice / foreground;
    let inv_count = (1.0 / count) as f32;
    grad.par_chunks_mut(image.max(1))
        .zip(targets.par_chunks(plane.max(1)))
        .for_each(|(p, t)| {
            vectorised(
                #[inline(always)]
                || backward(p, t, (&on, &off), k, inv_count),
            )
        });
    Ok((loss as f32, grad))
}

/// Replaces one image's logits (K planes) by their softmax over the classes, and returns the
/// image's sums.
#[inline(always)]
fn softmax(p: &mut [f32], t: &[u32], k: usize, plane: usize) -> Sums {
    let mut max = p[..plane].to_vec();
    for c in 1..k {
        for (m, v) in max.iter_mut().zip(&p[c * plane..(c + 1) * plane]) {
            *m = m.max(*v);
        }
    }
    // −log p(target) = log Σ exp(l − max) − (l_target − max).
    let mut nll = 0f64;
    let mut total = vec![0f32; plane];
    for (q, &target) in t.iter().enumerate() {
        nll -= f64::from(p[target as usize * plane + q] - max[q]);
    }
    for c in 0..k {
        for ((v, m), s) in p[c * plane..(c + 1) * plane]
            .iter_mut()
            .zip(&max)
            .zip(total.iter_mut())
        {
            *v = (*v - m).exp();
            *s += *v;
        }
    }
    nll += total.iter().map(|s| f64::from(s.ln())).sum::<f64>();
    let mut sums = Sums {
        nll,
        overlap: vec![0.0; k],
        predicted: vec![0.0; k],
        reference: vec![0.0; k],
    };
    for c in 0..k {
        let probs = &mut p[c * plane..(c + 1) * plane];
        for (v, s) in probs.iter_mut().zip(&total) {
            *v /= s;
        }
        sums.predicted[c] = f64::from(probs.iter().sum::<f32>());
    }
    for (q, &target) in t.iter().enumerate() {
        let c = target as usize;
        sums.overlap[c] += f64::from(p[c * plane + q]);
        sums.reference[c] += 1.0;
    }
    sums
}

/// Replaces one image's probabilities (K planes) by the loss's gradient with respect to its
/// logits: through the softmax, `p_j (g_j − Σ_c p_c g_c)` for the Dice term's `g = ∂/∂p`, plus
/// the cross-entropy's `(p_j − [j = target]) / pixels`.
#[inline(always)]
fn backward(p: &mut [f32], t: &[u32], (on, off): (&[f32], &[f32]), k: usize, inv_count: f32) {
    let plane = t.len();
    let dice_grad = |c: usize, q: usize| off[c] + if t[q] as usize == c { on[c] } else { 0.0 };
    let mut mean = vec![0f32; plane];
    for c in 0..k {
        for (q, (m, v)) in mean
            .iter_mut()
            .zip(&p[c * plane..(c + 1) * plane])
            .enumerate()
        {
            *m += v * dice_grad(c, q);
        }
    }
    for c in 0..k {
        for (q, (v, m)) in p[c * plane..(c + 1) * plane]
            .iter_mut()
            .zip(&mean)
            .enumerate()
        {
            let hot = if t[q] as usize == c { 1.0 } else { 0.0 };
            *v = *v * (dice_grad(c, q) - m) + (*v - hot) * inv_count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pixel_by_hand() {
        // Two classes, logits (0, 0): p = (½, ½); target 1. CE = ln 2; Dice of class 1 =
        // (2·½ + s)/(½ + 1 + s) = 2/3 with s = 0; loss = ln 2 + 1/3.
        let (loss, grad) = dice_ce(&[0.0, 0.0], &[1], (1, 2, 1), 0.0).unwrap();
        assert!(
            (f64::from(loss) - (2f64.ln() + 1.0 / 3.0)).abs() < 1e-6,
            "{loss}"
        );
        // ∂/∂p₁ of −Dice = −(2/D − 2O/D²) = −(2/1.5 − 1/2.25) = −8/9; ∂/∂l₁ = p₁p₀(−8/9) =
        // −2/9, plus CE's p₁ − 1 = −½; ∂/∂l₀ the opposite (the softmax's gradients sum to 0).
        let want = -2.0 / 9.0 - 0.5;
        assert!((f64::from(grad[1]) - want).abs() < 1e-6, "{grad:?}");
        assert!((f64::from(grad[0]) + want).abs() < 1e-6, "{grad:?}");
    }

    #[test]
    fn gradient_matches_central_differences() {
        let (n, k, plane) = (2, 3, 5);
        let logits: Vec<f32> = (0..n * k * plane)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let targets: Vec<u32> = (0..n * plane).map(|i| (i * 7 % 3) as u32).collect();
        let (_, grad) = dice_ce(&logits, &targets, (n, k, plane), 1e-5).unwrap();
        let h = 1e-2;
        for i in 0..logits.len() {
            let at = |d: f32| {
                let mut l = logits.clone();
                l[i] += d;
                f64::from(dice_ce(&l, &targets, (n, k, plane), 1e-5).unwrap().0)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(grad[i])).abs() < 2e-3,
                "logit {i}: {numeric} by differences, {} computed",
                grad[i]
            );
        }
    }

    #[test]
    fn bad_shapes_and_classes_are_errors() {
        let e = dice_ce(&[0.0; 4], &[0, 2], (1, 2, 2), 0.0).unwrap_err();
        assert!(e.to_string().contains("target class 2"), "{e}");
        assert!(dice_ce(&[0.0; 3], &[0, 1], (1, 2, 2), 0.0).is_err());
        assert!(dice_ce(&[0.0; 2], &[0, 0], (1, 1, 2), 0.0).is_err());
    }
}
