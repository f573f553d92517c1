//! A class-conditional variational autoencoder (candle): the preview generator for sites with
//! enough images per class. Encoder and decoder are small fully connected networks over the
//! flattened image and the one-hot class; the decoder, fed a normal sample and a class, draws
//! a new image of that class.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap, linear};

use crate::preview::PreviewImage;
use crate::train::{DpStep, Rng};

/// Classes with at least this many training images each get the VAE; otherwise the
/// PCA-Gaussian fallback.
pub const MIN_PER_CLASS: usize = 40;

/// Optimiser steps (batches of 32) a preview trains for.
pub const STEPS: usize = consilium_core::preview::GENERATOR_STEPS as usize;

/// One training image: its class, its pixels in [0, 1], and its patient (the unit of privacy).
pub type Example<'a> = (u32, &'a [f32], &'a str);

pub struct Cvae {
    enc: Linear,
    mu: Linear,
    log_var: Linear,
    dec1: Linear,
    dec2: Linear,
    latent: usize,
}

impl Cvae {
    pub fn new(
        vb: VarBuilder,
        pixels: usize,
        classes: usize,
        hidden: usize,
        latent: usize,
    ) -> candle_core::Result<Self> {
        Ok(Cvae {
            enc: linear(pixels + classes, hidden, vb.pp("enc"))?,
            mu: linear(hidden, latent, vb.pp("mu"))?,
            log_var: linear(hidden, latent, vb.pp("log_var"))?,
            dec1: linear(latent + classes, hidden, vb.pp("dec1"))?,
            dec2: linear(hidden, pixels, vb.pp("dec2"))?,
            latent,
        })
    }

    /// `layer(a)`; with a trace, plus a zero variable whose gradient is then the gradient at
    /// the layer's output, kept with the layer's input (for the per-patient norms of DP-SGD).
    fn layer(
        &self,
        l: &Linear,
        a: &Tensor,
        trace: &mut Option<Trace>,
    ) -> candle_core::Result<Tensor> {
        let z = l.forward(a)?;
        let Some(t) = trace else { return Ok(z) };
        let probe = Var::zeros(z.shape(), z.dtype(), z.device())?;
        let z = (z + probe.as_tensor())?;
        t.push((a.detach(), probe));
        Ok(z)
    }

    fn encode(
        &self,
        x: &Tensor,
        y: &Tensor,
        trace: &mut Option<Trace>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let h = self
            .layer(&self.enc, &Tensor::cat(&[x, y], 1)?, trace)?
            .relu()?;
        Ok((
            self.layer(&self.mu, &h, trace)?,
            self.layer(&self.log_var, &h, trace)?,
        ))
    }

    /// Pixel logits for latent codes `z` of classes `y` (one-hot).
    fn decode(
        &self,
        z: &Tensor,
        y: &Tensor,
        trace: &mut Option<Trace>,
    ) -> candle_core::Result<Tensor> {
        let h = self
            .layer(&self.dec1, &Tensor::cat(&[z, y], 1)?, trace)?
            .relu()?;
        self.layer(&self.dec2, &h, trace)
    }

    /// The negative evidence lower bound of each image: reconstruction (binary cross-entropy
    /// on the [0, 1] pixels, from logits, numerically stable) plus the KL divergence to N(0, I).
    fn losses(
        &self,
        x: &Tensor,
        y: &Tensor,
        eps: &Tensor,
        trace: &mut Option<Trace>,
    ) -> candle_core::Result<Tensor> {
        let (mu, log_var) = self.encode(x, y, trace)?;
        let z = (&mu + (log_var.affine(0.5, 0.0)?.exp()? * eps)?)?;
        let l = self.decode(&z, y, trace)?;
        let bce = ((l.relu()? - (&l * x)?)? + (l.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let recon = bce.sum(D::Minus1)?;
        let kl = ((mu.sqr()? + log_var.exp()?)? - log_var)?
            .affine(1.0, -1.0)?
            .sum(D::Minus1)?
            .affine(0.5, 0.0)?;
        recon + kl
    }

    fn loss(&self, x: &Tensor, y: &Tensor, eps: &Tensor) -> candle_core::Result<Tensor> {
        self.losses(x, y, eps, &mut None)?.mean_all()
    }
}

/// The images of a list of indices: pixels, one-hot classes and the reparameterisation's
/// normals.
type BatchOf<'a> = dyn Fn(&[usize], &mut Rng) -> candle_core::Result<(Tensor, Tensor, Tensor)> + 'a;

/// Each fully connected layer's input and the probe whose gradient is its output's.
type Trace = Vec<(Tensor, Var)>;

/// Each patient's gradient norm over every weight and bias, without a gradient per patient
/// ("ghost" norms): a layer's weight gradient for patient i is Σ_j δ_j a_jᵀ over the patient's
/// images j (δ the gradient at the layer's output, a its input) and its bias gradient Σ_j δ_j,
/// so its squared norm is Σ_{j,k} (δ_j·δ_k)(a_j·a_k + 1), read off the images' Gram matrices.
/// `members` is patients × images, 1 where the image is the patient's.
fn patient_norms(
    trace: &Trace,
    grads: &GradStore,
    members: &Tensor,
) -> candle_core::Result<Vec<f32>> {
    let mut total: Option<Tensor> = None;
    for (a, probe) in trace {
        let Some(d) = grads.get(probe) else { continue };
        let gram = (d.matmul(&d.t()?)? * (a.matmul(&a.t()?)? + 1.0)?)?;
        let norms2 = (members.matmul(&gram)? * members)?.sum(1)?;
        total = Some(match total {
            Some(t) => (t + norms2)?,
            None => norms2,
        });
    }
    match total {
        Some(t) => t.sqrt()?.to_vec1::<f32>(),
        None => Ok(vec![0.0; members.dim(0)?]),
    }
}

/// `n` standard normal values from our seeded generator (candle's CPU generator can't be
/// seeded), so that a preview is reproducible.
fn normals(rng: &mut Rng, shape: (usize, usize), device: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.normal() as f32)
        .collect();
    Tensor::from_vec(v, shape, device)
}

/// Re-initialises every weight from `rng` (uniform in ±1/√fan-in, as candle's default), in
/// name order, for the same reason.
fn init(varmap: &VarMap, rng: &mut Rng) -> candle_core::Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let fan_in = dims.last().copied().unwrap_or(1).max(1) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
            .collect();
        var.set(&Tensor::from_vec(v, dims.as_slice(), var.device())?)?;
    }
    Ok(())
}

/// The sum over `sampled` patients of each one's gradient clipped to `max_norm`, in two passes
/// over the batch: the first gives each patient's gradient norm (`patient_norms`), the second
/// the gradient of the loss with each patient's images weighted by its clipping factor. A
/// patient's loss is the mean over its images.
fn clipped_sum(
    model: &Cvae,
    sampled: &[&Vec<usize>],
    rng: &mut Rng,
    batch_of: &BatchOf,
    max_norm: f64,
) -> candle_core::Result<GradStore> {
    let images: Vec<usize> = sampled.iter().flat_map(|u| u.iter().copied()).collect();
    let n = images.len();
    let mut members = vec![0f32; sampled.len() * n];
    let mut per_image = Vec::with_capacity(n);
    let mut at = 0;
    for (i, unit) in sampled.iter().enumerate() {
        for _ in unit.iter() {
            members[i * n + at] = 1.0;
            per_image.push((i, 1.0 / unit.len() as f32));
            at += 1;
        }
    }
    let device = Device::Cpu;
    let members = Tensor::from_vec(members, (sampled.len(), n), &device)?;
    let (x, y, eps) = batch_of(&images, rng)?;
    let weights = |w: &dyn Fn(usize) -> f32| {
        Tensor::from_vec(
            per_image
                .iter()
                .map(|(i, m)| m * w(*i))
                .collect::<Vec<f32>>(),
            n,
            &device,
        )
    };
    let mut trace = Some(Trace::new());
    let first = (model.losses(&x, &y, &eps, &mut trace)? * weights(&|_| 1.0)?)?.sum_all()?;
    let grads = first.backward()?;
    let norms = patient_norms(&trace.unwrap_or_default(), &grads, &members)?;
    let scale: Vec<f32> = norms
        .iter()
        .map(|g| (max_norm as f32 / g.max(1e-12)).min(1.0))
        .collect();
    let second = (model.losses(&x, &y, &eps, &mut None)? * weights(&|i| scale[i])?)?.sum_all()?;
    second.backward()
}

fn one_hot(labels: &[usize], classes: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut v = vec![0f32; labels.len() * classes];
    for (i, l) in labels.iter().enumerate() {
        v[i * classes + l] = 1.0;
    }
    Tensor::from_vec(v, (labels.len(), classes), device)
}

/// Trains a VAE on `train` and draws `per_class` images of each class, in class order: for
/// `steps` batches of 32 images, or with `dp`, by DP-SGD over the patients (Poisson sampling and
/// the noise from the operating system's generator, each patient's gradient clipped).
pub fn generate(
    train: &[Example],
    per_class: usize,
    steps: usize,
    seed: u64,
    dp: Option<&DpStep>,
) -> candle_core::Result<Vec<PreviewImage>> {
    let device = Device::Cpu;
    let mut labels: Vec<u32> = train.iter().map(|(l, _, _)| *l).collect();
    labels.sort_unstable();
    labels.dedup();
    let index = |l: u32| labels.iter().position(|x| *x == l).unwrap_or(0);
    let pixels = train.first().map_or(0, |(_, p, _)| p.len());
    let classes = labels.len();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = Cvae::new(vb, pixels, classes, 128, 16)?;
    let mut rng = Rng::new(seed);
    init(&varmap, &mut rng)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    // The images of `chunk`: pixels, one-hot classes and the reparameterisation's normals.
    let batch_of =
        |chunk: &[usize], rng: &mut Rng| -> candle_core::Result<(Tensor, Tensor, Tensor)> {
            let mut x = Vec::with_capacity(chunk.len() * pixels);
            for i in chunk {
                x.extend_from_slice(train[*i].1);
            }
            let x = Tensor::from_vec(x, (chunk.len(), pixels), &device)?;
            let ys: Vec<usize> = chunk.iter().map(|i| index(train[*i].0)).collect();
            let y = one_hot(&ys, classes, &device)?;
            let eps = normals(rng, (chunk.len(), model.latent), &device)?;
            Ok((x, y, eps))
        };
    match dp {
        Some(dp) => {
            let mut units: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
            for (i, (_, _, unit)) in train.iter().enumerate() {
                units.entry(unit).or_default().push(i);
            }
            let units: Vec<Vec<usize>> = units.into_values().collect();
            let vars = varmap.all_vars();
            let mut secret = Rng::from_entropy();
            let expected_batch = dp.sampling_rate * units.len() as f64;
            let std = dp.noise_multiplier * dp.max_grad_norm;
            for _ in 0..dp.steps {
                // Who is in this step, by the operating system's generator.
                let sampled: Vec<&Vec<usize>> = units
                    .iter()
                    .filter(|_| secret.unit() < dp.sampling_rate)
                    .collect();
                let mut grads = match sampled.is_empty() {
                    true => GradStore::default(),
                    false => clipped_sum(&model, &sampled, &mut rng, &batch_of, dp.max_grad_norm)?,
                };
                let noisy = {
                    let refs: Vec<&Var> = vars.iter().collect();
                    let clipped = vec![refs.iter().map(|v| grads.remove(v.as_tensor())).collect()];
                    crate::train::noisy_mean(clipped, &refs, std, expected_batch, &mut secret)?
                };
                let mut step = GradStore::default();
                for (var, g) in vars.iter().zip(noisy) {
                    step.insert(var.as_tensor(), g);
                }
                opt.step(&step)?;
            }
        }
        None => {
            let mut order: Vec<usize> = (0..train.len()).collect();
            let batch = 32.min(train.len()).max(1);
            let mut step = 0;
            while step < steps {
                rng.shuffle(&mut order);
                for chunk in order.chunks(batch) {
                    let (x, y, eps) = batch_of(chunk, &mut rng)?;
                    let loss = model.loss(&x, &y, &eps)?;
                    opt.backward_step(&loss)?;
                    step += 1;
                    if step >= steps {
                        break;
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for (c, label) in labels.iter().enumerate() {
        let z = normals(&mut rng, (per_class, model.latent), &device)?;
        let y = one_hot(&vec![c; per_class], classes, &device)?;
        let images =
            candle_nn::ops::sigmoid(&model.decode(&z, &y, &mut None)?)?.to_vec2::<f32>()?;
        out.extend(images.into_iter().map(|pixels| PreviewImage {
            label: *label,
            pixels,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two-pass clipped sum equals clipping each patient's own gradient and adding them up
    /// (the direct way, one backward pass per patient), with patients of one and of several
    /// images, some clipped and some not.
    #[test]
    fn ghost_clipping_matches_each_patients_own_clipped_gradient() {
        let device = Device::Cpu;
        let (pixels, classes) = (12, 2);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let model = Cvae::new(vb, pixels, classes, 8, 3).unwrap();
        let mut rng = Rng::new(5);
        init(&varmap, &mut rng).unwrap();
        let images: Vec<Vec<f32>> = (0..7)
            .map(|_| (0..pixels).map(|_| rng.unit() as f32).collect())
            .collect();
        let labels = [0usize, 1, 1, 0, 1, 0, 0];
        let eps_all: Vec<Vec<f32>> = (0..7)
            .map(|_| (0..3).map(|_| rng.normal() as f32).collect())
            .collect();
        // The same reparameterisation noise per image either way.
        let batch_of = |chunk: &[usize], _: &mut Rng| {
            let x: Vec<f32> = chunk.iter().flat_map(|i| images[*i].clone()).collect();
            let e: Vec<f32> = chunk.iter().flat_map(|i| eps_all[*i].clone()).collect();
            let ys: Vec<usize> = chunk.iter().map(|i| labels[*i]).collect();
            Ok((
                Tensor::from_vec(x, (chunk.len(), pixels), &device)?,
                one_hot(&ys, classes, &device)?,
                Tensor::from_vec(e, (chunk.len(), 3), &device)?,
            ))
        };
        let patients: Vec<Vec<usize>> = vec![vec![0], vec![1, 2, 3], vec![4], vec![5, 6]];
        let sampled: Vec<&Vec<usize>> = patients.iter().collect();
        let vars = varmap.all_vars();
        let refs: Vec<&Var> = vars.iter().collect();
        // Norms of the patients' gradients, to pick a clipping norm that clips some of them.
        let mut direct = Vec::new();
        let mut norms = Vec::new();
        for p in &patients {
            let (x, y, e) = batch_of(p, &mut rng).unwrap();
            let loss = model
                .losses(&x, &y, &e, &mut None)
                .unwrap()
                .mean_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let n2: f32 = refs
                .iter()
                .filter_map(|v| g.get(v.as_tensor()))
                .map(|t| {
                    t.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .sum();
            norms.push(n2.sqrt());
            direct.push(g);
        }
        let mut sorted = norms.clone();
        sorted.sort_by(f32::total_cmp);
        let c = f64::from((sorted[1] + sorted[2]) / 2.0);
        let mut ghost = clipped_sum(&model, &sampled, &mut rng, &batch_of, c).unwrap();
        for v in &refs {
            let mut want: Option<Tensor> = None;
            for (g, n) in direct.iter().zip(&norms) {
                let Some(t) = g.get(v.as_tensor()) else {
                    continue;
                };
                let t = (t * f64::from((c as f32 / n).min(1.0))).unwrap();
                want = Some(match want {
                    Some(w) => (w + t).unwrap(),
                    None => t,
                });
            }
            let want = want
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = ghost.remove(v.as_tensor()).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-4 * a.abs().max(1e-2), "{a} vs {b}");
            }
        }
    }
}
