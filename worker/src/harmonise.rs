//! HarmoFL's amplitude normalisation (Jiang et al. 2022, in the review's table of answers to
//! data heterogeneity): scanners and protocols differ most in an image's amplitude spectrum
//! (contrast, brightness, sharpness) and least in its phase (where the anatomy is), so every
//! image's low-frequency amplitudes are replaced by one shared spectrum and its phase kept.
//!
//! The shared spectrum travels with the model as the tensor `AMPLITUDE` (amplitudes of the
//! `size × size` discrete Fourier transform divided by `size²`, in the transform's own order):
//! the initial model's is zero; in its first job each site fills in its training split's mean
//! spectrum, and the server averages them as it averages running batch-norm statistics; from
//! then on every site normalises to that average, which no training step changes.

use candle_core::Tensor;
use consilium_core::plan::Plan;
use rayon::prelude::*;
use rustfft::FftPlanner;
use rustfft::num_complex::Complex64;

use crate::data::Sample;
use crate::train::{Net, Result, TrainError};

/// The model's tensor holding the shared amplitude spectrum (a running statistic: averaged by
/// the server, never trained).
pub const AMPLITUDE: &str = "amp_norm.running_amplitude";

/// The 2-D discrete Fourier transform of a `size × size` image (row-major), forward or inverse
/// (unscaled both ways).
fn transform(data: &mut [Complex64], size: usize, inverse: bool) {
    let mut planner = FftPlanner::new();
    let fft = if inverse {
        planner.plan_fft_inverse(size)
    } else {
        planner.plan_fft_forward(size)
    };
    for row in data.chunks_mut(size) {
        fft.process(row);
    }
    let mut column = vec![Complex64::default(); size];
    for x in 0..size {
        for (y, c) in column.iter_mut().enumerate() {
            *c = data[y * size + x];
        }
        fft.process(&mut column);
        for (y, c) in column.iter().enumerate() {
            data[y * size + x] = *c;
        }
    }
}

fn spectrum(img: &[f32], size: usize) -> Vec<Complex64> {
    let mut data: Vec<Complex64> = img
        .iter()
        .map(|&v| Complex64::new(f64::from(v), 0.0))
        .collect();
    transform(&mut data, size, false);
    data
}

/// An image's amplitude spectrum, divided by `size²` (so that its first value is the image's
/// mean).
pub fn amplitude(img: &[f32], size: usize) -> Vec<f32> {
    let n = (size * size) as f64;
    spectrum(img, size)
        .iter()
        .map(|c| (c.norm() / n) as f32)
        .collect()
}

/// The mean amplitude spectrum of `images` (zero when there are none).
pub fn mean_amplitude<'a>(images: impl Iterator<Item = &'a [f32]>, size: usize) -> Vec<f32> {
    let mut sum = vec![0f64; size * size];
    let mut count = 0usize;
    for img in images {
        for (s, a) in sum.iter_mut().zip(amplitude(img, size)) {
            *s += f64::from(a);
        }
        count += 1;
    }
    sum.iter()
        .map(|s| (s / count.max(1) as f64) as f32)
        .collect()
}

/// Whether the frequency `(u, v)` of a `size`-point transform lies in the low band: both
/// signed frequencies at most `⌊size · band⌋` (HarmoFL's centred square after `fftshift`;
/// `band` 0 is the mean alone, 0.5 the whole spectrum).
fn in_band(u: usize, v: usize, size: usize, band: f32) -> bool {
    let b = (size as f32 * band).floor() as usize;
    let signed = |f: usize| f.min(size - f);
    signed(u) <= b && signed(v) <= b
}

/// `img` with its low-band amplitudes replaced by `target`'s (an `amplitude` spectrum) and
/// every phase kept.
pub fn harmonise(img: &[f32], size: usize, target: &[f32], band: f32) -> Vec<f32> {
    let n = (size * size) as f64;
    let mut data = spectrum(img, size);
    for v in 0..size {
        for u in 0..size {
            if !in_band(u, v, size, band) {
                continue;
            }
            let i = v * size + u;
            let phase = if data[i].norm() > 0.0 {
                data[i].arg()
            } else {
                0.0
            };
            data[i] = Complex64::from_polar(f64::from(target[i]) * n, phase);
        }
    }
    transform(&mut data, size, true);
    data.iter().map(|c| (c.re / n) as f32).collect()
}

/// The site's samples as the plan's amplitude normalisation shows them to the model (none
/// without it): normalised to the model's mean spectrum or, while no site has set that (the
/// run's first job here), to this site's training split's, which is then set in `net` and so
/// goes to the server with the site's update.
pub fn site_samples(net: &Net, plan: &Plan, samples: &[Sample]) -> Result<Option<Vec<Sample>>> {
    let Some(a) = plan.amplitude else {
        return Ok(None);
    };
    let size = plan.image_size;
    let var = net
        .varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Weights("the model's variables are unavailable".into()))?
        .get(AMPLITUDE)
        .cloned()
        .ok_or_else(|| {
            TrainError::Plan(format!(
                "the plan asks for amplitude normalisation and the model has no {AMPLITUDE}"
            ))
        })?;
    let mut target = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    if target.len() != size * size {
        return Err(TrainError::Weights(format!(
            "{AMPLITUDE} holds {} values, not the {size} × {size} of the plan's images",
            target.len()
        )));
    }
    if target.iter().all(|v| *v == 0.0) {
        target = mean_amplitude(
            samples
                .iter()
                .filter(|s| !s.holdout)
                .map(|s| s.pixels.as_slice()),
            size,
        );
        var.set(&Tensor::from_vec(
            target.clone(),
            (size, size),
            &net.device,
        )?)?;
    }
    Ok(Some(
        samples
            .par_iter()
            .map(|s| Sample {
                pixels: harmonise(&s.pixels, size, &target, a.band),
                label: s.label,
                mask: s.mask.clone(),
                source: s.source.clone(),
                holdout: s.holdout,
                unit: s.unit.clone(),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "{i}: {x} against {y}");
        }
    }

    #[test]
    fn amplitude_of_an_impulse_is_flat_and_starts_with_the_mean() {
        // A single bright pixel has every frequency at amplitude 1, over size² = 4.
        close(&amplitude(&[1.0, 0.0, 0.0, 0.0], 2), &[0.25; 4], 1e-7);
        // A constant image is its mean alone.
        let flat = amplitude(&[0.5; 9], 3);
        close(&flat, &[0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1e-7);
        // Hand-computed: [[1, 2], [3, 4]] → |F| = [10, 2, 4, 0] / 4.
        close(
            &amplitude(&[1.0, 2.0, 3.0, 4.0], 2),
            &[2.5, 0.5, 1.0, 0.0],
            1e-6,
        );
    }

    #[test]
    fn the_whole_band_takes_the_target_spectrum_and_keeps_the_phase() {
        let size = 8;
        let a: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32) / 11.0).collect();
        let b: Vec<f32> = (0..64).map(|i| ((i * 13 % 7) as f32) / 9.0 + 0.2).collect();
        let target = amplitude(&b, size);
        let out = harmonise(&a, size, &target, 0.5);
        close(&amplitude(&out, size), &target, 1e-5);
        // The phase is a's wherever a's amplitude is not zero.
        let (pa, po) = (spectrum(&a, size), spectrum(&out, size));
        for (x, y) in pa.iter().zip(&po) {
            if x.norm() > 1e-6 && y.norm() > 1e-6 {
                let d = (x.arg() - y.arg()).rem_euclid(std::f64::consts::TAU);
                assert!(d.min(std::f64::consts::TAU - d) < 1e-4, "{x} {y}");
            }
        }
        // Its own spectrum leaves an image as it is.
        close(&harmonise(&a, size, &amplitude(&a, size), 0.5), &a, 1e-5);
    }

    #[test]
    fn band_zero_moves_the_mean_only_and_a_narrow_band_leaves_high_frequencies() {
        let size = 6;
        let img: Vec<f32> = (0..36).map(|i| ((i * 7 % 5) as f32) / 5.0).collect();
        let mut target = amplitude(&img, size);
        target[0] = 0.9; // a brighter scanner's mean
        let out = harmonise(&img, size, &target, 0.0);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&out) - 0.9).abs() < 1e-5, "{}", mean(&out));
        let shift = mean(&out) - mean(&img);
        close(
            &out,
            &img.iter().map(|v| v + shift).collect::<Vec<_>>(),
            1e-5,
        );
        // Band 0.2 of 6 points (⌊1.2⌋ = 1): signed frequencies up to 1 take the target, the rest keep theirs.
        let flat = vec![0.0f32; 36];
        let out = harmonise(&img, size, &flat, 0.2);
        let (before, after) = (amplitude(&img, size), amplitude(&out, size));
        for v in 0..size {
            for u in 0..size {
                let i = v * size + u;
                if in_band(u, v, size, 0.2) {
                    assert!(after[i].abs() < 1e-6, "({u}, {v})");
                } else {
                    assert!((after[i] - before[i]).abs() < 1e-5, "({u}, {v})");
                }
            }
        }
        assert!(in_band(5, 1, size, 0.2) && !in_band(2, 0, size, 0.2));
    }

    #[test]
    fn the_mean_spectrum_averages_the_images() {
        let size = 4;
        let a: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        let b = vec![0.25f32; 16];
        let (sa, sb) = (amplitude(&a, size), amplitude(&b, size));
        let mean = mean_amplitude([a.as_slice(), b.as_slice()].into_iter(), size);
        close(
            &mean,
            &sa.iter()
                .zip(&sb)
                .map(|(x, y)| (x + y) / 2.0)
                .collect::<Vec<_>>(),
            1e-7,
        );
        assert_eq!(mean_amplitude(std::iter::empty(), 2), vec![0.0; 4]);
    }
}
