//! A class-conditional variational autoencoder (candle): the preview generator for sites with
//! enough images per class. Encoder and decoder are small fully connected networks over the
//! flattened image and the one-hot class; the decoder, fed a normal sample and a class, draws
//! a new image of that class.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap, linear};

use crate::preview::PreviewImage;
use crate::train::Rng;

/// Classes with at least this many training images each get the VAE; otherwise the
/// PCA-Gaussian fallback.
pub const MIN_PER_CLASS: usize = 40;

/// Optimiser steps (batches of 32) a preview trains for.
pub const STEPS: usize = 300;

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

    fn encode(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let h = self.enc.forward(&Tensor::cat(&[x, y], 1)?)?.relu()?;
        Ok((self.mu.forward(&h)?, self.log_var.forward(&h)?))
    }

    /// Pixel logits for latent codes `z` of classes `y` (one-hot).
    fn decode(&self, z: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.dec1.forward(&Tensor::cat(&[z, y], 1)?)?.relu()?;
        self.dec2.forward(&h)
    }

    /// The negative evidence lower bound per image: reconstruction (binary cross-entropy on
    /// the [0, 1] pixels, from logits, numerically stable) plus the KL divergence to N(0, I).
    fn loss(&self, x: &Tensor, y: &Tensor, eps: &Tensor) -> candle_core::Result<Tensor> {
        let (mu, log_var) = self.encode(x, y)?;
        let z = (&mu + (log_var.affine(0.5, 0.0)?.exp()? * eps)?)?;
        let l = self.decode(&z, y)?;
        let bce = ((l.relu()? - (&l * x)?)? + (l.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let recon = bce.sum(D::Minus1)?;
        let kl = ((mu.sqr()? + log_var.exp()?)? - log_var)?
            .affine(1.0, -1.0)?
            .sum(D::Minus1)?
            .affine(0.5, 0.0)?;
        (recon + kl)?.mean_all()
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

fn one_hot(labels: &[usize], classes: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut v = vec![0f32; labels.len() * classes];
    for (i, l) in labels.iter().enumerate() {
        v[i * classes + l] = 1.0;
    }
    Tensor::from_vec(v, (labels.len(), classes), device)
}

/// Trains a VAE on `train` (label, pixels in [0, 1]) and draws `per_class` images of each
/// class, in class order.
pub fn generate(
    train: &[(u32, &[f32])],
    per_class: usize,
    steps: usize,
    seed: u64,
) -> candle_core::Result<Vec<PreviewImage>> {
    let device = Device::Cpu;
    let mut labels: Vec<u32> = train.iter().map(|(l, _)| *l).collect();
    labels.sort_unstable();
    labels.dedup();
    let index = |l: u32| labels.iter().position(|x| *x == l).unwrap_or(0);
    let pixels = train.first().map_or(0, |(_, p)| p.len());
    let classes = labels.len();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = Cvae::new(vb, pixels, classes, 128, 16)?;
    let mut rng = Rng::new(seed);
    init(&varmap, &mut rng)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let batch = 32.min(train.len()).max(1);
    let mut step = 0;
    while step < steps {
        rng.shuffle(&mut order);
        for chunk in order.chunks(batch) {
            let mut x = Vec::with_capacity(chunk.len() * pixels);
            for i in chunk {
                x.extend_from_slice(train[*i].1);
            }
            let x = Tensor::from_vec(x, (chunk.len(), pixels), &device)?;
            let ys: Vec<usize> = chunk.iter().map(|i| index(train[*i].0)).collect();
            let y = one_hot(&ys, classes, &device)?;
            let eps = normals(&mut rng, (chunk.len(), model.latent), &device)?;
            let loss = model.loss(&x, &y, &eps)?;
            opt.backward_step(&loss)?;
            step += 1;
            if step >= steps {
                break;
            }
        }
    }
    let mut out = Vec::new();
    for (c, label) in labels.iter().enumerate() {
        let z = normals(&mut rng, (per_class, model.latent), &device)?;
        let y = one_hot(&vec![c; per_class], classes, &device)?;
        let images = candle_nn::ops::sigmoid(&model.decode(&z, &y)?)?.to_vec2::<f32>()?;
        out.extend(images.into_iter().map(|pixels| PreviewImage {
            label: *label,
            pixels,
        }));
    }
    Ok(out)
}
