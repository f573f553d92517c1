//! Local training and evaluation with candle: deterministic initialisation from the plan's
//! seed, SGD with momentum or AdamW, the FedProx proximal term, and held-out metrics. A
//! classifier trains on cross-entropy; a segmentation model (`unet`) on cross-entropy over its
//! pixels plus the soft Dice loss of its foreground classes, and is scored by Dice, IoU and
//! HD95 (`consilium_core::segmentation`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use consilium_core::plan::{
    Augmentation, Initialisation, Normalisation, Optimiser, Plan, ROTATE_DEGREES, Segmentation,
    Statistics,
};
use consilium_core::protocol::Metrics;
use consilium_core::segmentation::Tally;
use std::collections::HashMap;

use crate::data::Sample;
use crate::model::{self, Model};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Plan(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("the model weights are unreadable: {0}")]
    Weights(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// The variables training changes, by name.
type Trainable = Vec<(String, Var)>;

/// Weights by name: shape and row-major values.
pub type NamedWeights = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// A seeded stream (ChaCha8, from `rand_chacha`) so that initialisation, shuffling and
/// augmentation reproduce exactly. Never for anything secret: noise that protects an update
/// comes from the operating system's generator (see `job::protect`).
pub struct Rng(rand_chacha::ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        Rng(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// A stream seeded from the operating system's generator: unpredictable by anybody.
    pub fn from_entropy() -> Self {
        use rand::SeedableRng;
        Rng(rand_chacha::ChaCha8Rng::from_entropy())
    }

    pub fn next_u64(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        rand::Rng::r#gen::<f64>(&mut self.0)
    }
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Normalises one image in place as the plan says (`statistics`: `Normalisation::Dataset`'s,
/// the identity without them).
pub fn normalise(img: &mut [f32], normalisation: Normalisation, statistics: Option<Statistics>) {
    match normalisation {
        Normalisation::None => {}
        Normalisation::Dataset => {
            if let Some(s) = statistics {
                let sd = s.std.max(1e-6);
                img.iter_mut().for_each(|v| *v = (*v - s.mean) / sd);
            }
        }
        Normalisation::Zscore => {
            let mean = img.iter().sum::<f32>() / img.len().max(1) as f32;
            let var = img.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / img.len().max(1) as f32;
            let sd = var.sqrt().max(1e-6);
            img.iter_mut().for_each(|v| *v = (*v - mean) / sd);
        }
        Normalisation::Minmax => {
            let (lo, hi) = img
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(*v), hi.max(*v))
                });
            let range = (hi - lo).max(1e-6);
            img.iter_mut().for_each(|v| *v = (*v - lo) / range);
        }
    }
}

/// `img` (`side` × `side`, row-major) rotated by `degrees` about its centre, bilinear, with
/// the corners that come from outside the image black.
pub fn rotate(img: &[f32], side: usize, degrees: f32) -> Vec<f32> {
    let (sin, cos) = degrees.to_radians().sin_cos();
    let c = (side as f32 - 1.0) / 2.0;
    let at = |x: isize, y: isize| -> f32 {
        if x < 0 || y < 0 || x >= side as isize || y >= side as isize {
            0.0
        } else {
            img[y as usize * side + x as usize]
        }
    };
    let mut out = vec![0.0; side * side];
    for y in 0..side {
        for x in 0..side {
            // The source of this pixel: the inverse rotation of its position.
            let (dx, dy) = (x as f32 - c, y as f32 - c);
            let sx = cos * dx + sin * dy + c;
            let sy = -sin * dx + cos * dy + c;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            out[y * side + x] = at(x0, y0) * (1.0 - fx) * (1.0 - fy)
                + at(x0 + 1, y0) * fx * (1.0 - fy)
                + at(x0, y0 + 1) * (1.0 - fx) * fy
                + at(x0 + 1, y0 + 1) * fx * fy;
        }
    }
    out
}

/// The device training runs on: the first CUDA GPU when built with `cuda` and one is
/// present, else the CPU.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

pub struct Net {
    pub varmap: VarMap,
    pub model: Model,
    pub size: usize,
    pub device: Device,
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().map(|d| d.clone()).unwrap_or_default();
    let mut v: Vec<(String, Var)> = data.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

use consilium_core::aggregate::is_running_stat;

impl Net {
    /// The plan's model, initialised from its seed: every site starts from the same weights.
    pub fn new(plan: &Plan, device: &Device) -> Result<Net> {
        let size = plan.image_size;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        if plan.amplitude.is_some() {
            // The sites' mean amplitude spectrum (`harmonise`): zero until a site sets it.
            vb.get_with_hints(
                (size, size),
                crate::harmonise::AMPLITUDE,
                candle_nn::Init::Const(0.),
            )?;
        }
        let model = model::build(&plan.model, plan.num_classes, size, vb)?;
        let net = Net {
            varmap,
            model,
            size,
            device: device.clone(),
        };
        net.initialise(plan.seed, plan.initialisation)?;
        Ok(net)
    }

    /// The plan's weights (Kaiming uniform with zero biases, or PyTorch's defaults), unit
    /// batch- and group-norm scales and zero shifts, from `seed`.
    fn initialise(&self, seed: u64, init: Initialisation) -> Result<()> {
        let mut rng = Rng::new(seed);
        let vars = sorted_vars(&self.varmap);
        // A layer's fan-in, from its weight: the product of all but the first dimension.
        let fan_in = |weight: &str| {
            vars.iter()
                .find(|(n, _)| n == weight)
                .map(|(_, v)| v.shape().dims().iter().skip(1).product::<usize>().max(1))
        };
        for (name, var) in &vars {
            let shape = var.shape().clone();
            let n = shape.elem_count();
            let is_bn = name
                .split('.')
                .any(|p| p.starts_with("bn") || p.starts_with("gn"));
            let values: Vec<f32> = if name == crate::harmonise::AMPLITUDE {
                vec![0.0; n]
            } else if name.ends_with("running_var") || (is_bn && name.ends_with("weight")) {
                vec![1.0; n]
            } else if name.ends_with("bias") || name.ends_with("running_mean") {
                let weight = format!("{}weight", name.trim_end_matches("bias"));
                match (init, fan_in(&weight)) {
                    (Initialisation::Pytorch, Some(f)) if !is_bn => {
                        let bound = 1.0 / (f as f64).sqrt();
                        (0..n)
                            .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
                            .collect()
                    }
                    _ => vec![0.0; n],
                }
            } else {
                let fan_in: usize = shape.dims().iter().skip(1).product::<usize>().max(1);
                let bound = match init {
                    Initialisation::Kaiming => (6.0 / fan_in as f64).sqrt(),
                    Initialisation::Pytorch => 1.0 / (fan_in as f64).sqrt(),
                };
                (0..n)
                    .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            };
            var.set(&Tensor::from_vec(values, shape, &self.device)?)?;
        }
        Ok(())
    }

    /// The weights as safetensors bytes.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        self.to_safetensors_without(|_| false)
    }

    /// The weights as safetensors, without those `leave_out` names (partial sharing: the
    /// layers that stay at the site are not in what is sent).
    pub fn to_safetensors_without(&self, leave_out: impl Fn(&str) -> bool) -> Result<Vec<u8>> {
        let tensors: Vec<(String, Tensor)> = sorted_vars(&self.varmap)
            .into_iter()
            .filter(|(n, _)| !leave_out(n))
            .map(|(n, v)| (n, v.as_tensor().to_device(&Device::Cpu)))
            .map(|(n, t)| t.map(|t| (n, t)))
            .collect::<candle_core::Result<_>>()?;
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
            .map_err(|e| TrainError::Weights(e.to_string()))
    }

    /// Loads weights (safetensors bytes); every tensor of the model must be there with its shape.
    pub fn load_safetensors(&self, bytes: &[u8], keep_local: impl Fn(&str) -> bool) -> Result<()> {
        let loaded = candle_core::safetensors::load_buffer(bytes, &self.device)?;
        for (name, var) in sorted_vars(&self.varmap) {
            if keep_local(&name) {
                continue;
            }
            let t = loaded
                .get(&name)
                .ok_or_else(|| TrainError::Weights(format!("tensor {name} is missing")))?;
            if t.shape() != var.shape() {
                return Err(TrainError::Weights(format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    t.shape(),
                    var.shape()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// A batch as tensors: each image augmented (training only, from `aug`) and normalised
    /// as the plan says.
    fn batch(
        &self,
        samples: &[&Sample],
        plan: &Plan,
        mut aug: Option<(&mut Rng, &[Augmentation])>,
    ) -> Result<(Tensor, Tensor)> {
        if plan.normalisation == Normalisation::Dataset && plan.statistics.is_none() {
            return Err(TrainError::Plan(
                "dataset normalisation needs the training split's statistics (Plan::with_statistics)".into(),
            ));
        }
        let s = self.size;
        let mut pixels = Vec::with_capacity(samples.len() * s * s);
        let mut classes: Vec<u32> = Vec::new();
        for sample in samples {
            let mut img = sample.pixels.clone();
            let mut mask = match &plan.segmentation {
                Some(seg) => Some(mask_classes(sample, seg)?),
                None => None,
            };
            if let Some((rng, augmentations)) = aug.as_mut() {
                for a in augmentations.iter() {
                    match a {
                        Augmentation::Flip => {
                            if rng.unit() < 0.5 {
                                for row in img.chunks_mut(s) {
                                    row.reverse();
                                }
                                for row in mask.iter_mut().flat_map(|m| m.chunks_mut(s)) {
                                    row.reverse();
                                }
                            }
                        }
                        Augmentation::Rotate => {
                            let degrees = (rng.unit() * 2.0 - 1.0) as f32 * ROTATE_DEGREES;
                            img = rotate(&img, s, degrees);
                        }
                    }
                }
            }
            normalise(&mut img, plan.normalisation, plan.statistics);
            pixels.extend(img);
            classes.extend(mask.unwrap_or_default());
        }
        let x = Tensor::from_vec(pixels, (samples.len(), 1, s, s), &self.device)?;
        let y = if plan.segmentation.is_some() {
            Tensor::from_vec(classes, (samples.len(), s, s), &self.device)?
        } else {
            Tensor::from_vec(
                samples.iter().map(|s| s.label).collect::<Vec<u32>>(),
                samples.len(),
                &self.device,
            )?
        };
        Ok((x, y))
    }

    /// The training loss of a batch's outputs against its targets: cross-entropy for a
    /// classifier; for segmentation, cross-entropy over every pixel plus the soft Dice loss
    /// (1 − the mean over the foreground classes of 2 Σ p·t / (Σ p + Σ t), over the whole
    /// batch, smoothed by 1e-5), as MONAI's `DiceCELoss` with the background left out of the
    /// Dice term.
    fn loss(&self, logits: &Tensor, y: &Tensor, plan: &Plan) -> Result<Tensor> {
        let Some(seg) = &plan.segmentation else {
            return Ok(candle_nn::loss::cross_entropy(logits, y)?);
        };
        let classes = seg.values.len();
        let (n, _, h, w) = logits.dims4()?;
        let flat = logits
            .permute((0, 2, 3, 1))?
            .reshape((n * h * w, classes))?;
        let targets = y.flatten_all()?;
        let ce = candle_nn::loss::cross_entropy(&flat, &targets)?;
        // candle-nn's `softmax_last_dim` has no backward pass: through it the Dice term would
        // add to the loss's value but not to its gradient.
        let probs = candle_nn::ops::softmax(&flat, candle_core::D::Minus1)?;
        let one_hot = candle_nn::encoding::one_hot(targets, classes, 1f32, 0f32)?;
        let foreground = |t: &Tensor| t.narrow(1, 1, classes - 1);
        let (p, t) = (foreground(&probs)?, foreground(&one_hot)?);
        let overlap = (&p * &t)?.sum(0)?;
        let total = (p.sum(0)? + t.sum(0)?)?;
        let dice = (((overlap * 2.0)? + DICE_SMOOTH)? / (total + DICE_SMOOTH)?)?;
        Ok((ce + (1.0 - dice.mean_all()?)?)?)
    }

    /// Loss, accuracy and AUROC on `samples` (evaluation mode); for segmentation the loss,
    /// the share of pixels labelled right and the Dice, IoU and HD95 scores.
    pub fn evaluate(&self, samples: &[&Sample], plan: &Plan) -> Result<Metrics> {
        if plan.segmentation.is_some() {
            return self.evaluate_segmentation(samples, plan);
        }
        let classes = plan.num_classes;
        let mut loss_sum = 0.0;
        let mut correct = 0u64;
        let mut scores: Vec<(Vec<f32>, u32)> = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(256) {
            let (x, y) = self.batch(chunk, plan, None)?;
            let logits = self.model.forward_t(&x, false)?;
            loss_sum += f64::from(candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?)
                * chunk.len() as f64;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
            for (p, s) in probs.into_iter().zip(chunk) {
                let best = p
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                correct += u64::from(best == s.label as usize);
                scores.push((p, s.label));
            }
        }
        let n = samples.len().max(1) as f64;
        Ok(Metrics {
            loss: loss_sum / n,
            accuracy: correct as f64 / n,
            auroc: auroc(&scores, classes),
            samples: samples.len() as u64,
            segmentation: None,
        })
    }

    fn evaluate_segmentation(&self, samples: &[&Sample], plan: &Plan) -> Result<Metrics> {
        let s = self.size;
        let mut tally = Tally::new(plan.num_classes, s);
        let (mut loss_sum, mut right, mut pixels) = (0.0, 0u64, 0u64);
        for chunk in samples.chunks(32) {
            let (x, y) = self.batch(chunk, plan, None)?;
            let logits = self.model.forward_t(&x, false)?;
            loss_sum +=
                f64::from(self.loss(&logits, &y, plan)?.to_scalar::<f32>()?) * chunk.len() as f64;
            let predicted = logits
                .argmax(1)?
                .to_dtype(DType::U8)?
                .flatten_all()?
                .to_vec1::<u8>()?;
            let reference = y.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
            for (p, r) in predicted.chunks(s * s).zip(reference.chunks(s * s)) {
                tally.add(p, r);
                right += p.iter().zip(r).filter(|(a, b)| a == b).count() as u64;
                pixels += p.len() as u64;
            }
        }
        Ok(Metrics {
            loss: loss_sum / samples.len().max(1) as f64,
            accuracy: right as f64 / pixels.max(1) as f64,
            auroc: None,
            samples: samples.len() as u64,
            segmentation: Some(tally.scores()),
        })
    }

    /// The weights training changes (running statistics excluded), by name.
    fn trainable_vars(&self) -> Trainable {
        sorted_vars(&self.varmap)
            .into_iter()
            .filter(|(n, _)| !is_running_stat(n))
            .collect()
    }

    /// The weights training changes, by name, with a copy of
    /// their incoming values for the FedProx term. The copy is outside the graph: `detach`
    /// alone shares their storage, which the optimiser updates in place, and `copy` alone keeps
    /// the copy in the graph; either way the proximal term's gradient would be zero.
    fn trainable(&self) -> Result<(Trainable, Vec<Tensor>)> {
        let trainable = self.trainable_vars();
        let anchor = trainable
            .iter()
            .map(|(_, v)| v.as_tensor().copy().map(|t| t.detach()))
            .collect::<candle_core::Result<_>>()?;
        Ok((trainable, anchor))
    }

    /// Trains for the plan's local epochs, from the weights loaded (the round's incoming model,
    /// which FedProx's term pulls towards). Returns the mean loss of the first and of the last
    /// epoch.
    pub fn train(&self, samples: &[&Sample], plan: &Plan, seed: u64) -> Result<(f64, f64)> {
        self.train_corrected(samples, plan, seed, None)
    }

    /// SCAFFOLD's correction `c − c_i` (safetensors, from the server) as tensors in the order
    /// of the trained weights; every trained weight must have one of its shape.
    pub fn correction(&self, bytes: &[u8]) -> Result<Vec<Tensor>> {
        let loaded = candle_core::safetensors::load_buffer(bytes, &self.device)?;
        let trainable = self.trainable_vars();
        trainable
            .iter()
            .map(|(name, var)| {
                let t = loaded.get(name).ok_or_else(|| {
                    TrainError::Weights(format!("the SCAFFOLD correction has no tensor {name}"))
                })?;
                if t.shape() != var.shape() {
                    return Err(TrainError::Weights(format!(
                        "the SCAFFOLD correction's tensor {name} has shape {:?}, expected {:?}",
                        t.shape(),
                        var.shape()
                    )));
                }
                Ok(t.to_dtype(DType::F32)?)
            })
            .collect()
    }

    /// `train`, with `correction` (SCAFFOLD's `c − c_i`, from `Net::correction`) added to
    /// every gradient of the trained weights.
    pub fn train_corrected(
        &self,
        samples: &[&Sample],
        plan: &Plan,
        seed: u64,
        correction: Option<&[Tensor]>,
    ) -> Result<(f64, f64)> {
        let (trainable, anchor) = self.trainable()?;
        let mu = plan.proximal_mu;
        self.train_proximal(samples, plan, seed, correction, (trainable, anchor), mu)
    }

    /// Trains only the weights `only` picks, for `epochs` epochs of the plan's optimiser and
    /// batches without a proximal term; the others stay as they are. FLOP's layers that stay
    /// at the site, fitted to the round's incoming shared layers (`aggregation.local_fit_epochs`).
    pub fn train_only(
        &self,
        samples: &[&Sample],
        plan: &Plan,
        (epochs, seed): (u32, u64),
        only: impl Fn(&str) -> bool,
    ) -> Result<(f64, f64)> {
        let trainable: Trainable = self
            .trainable_vars()
            .into_iter()
            .filter(|(name, _)| only(name))
            .collect();
        let plan = Plan {
            local_epochs: epochs,
            ..plan.clone()
        };
        self.train_proximal(samples, &plan, seed, None, (trainable, Vec::new()), 0.0)
    }

    /// Ditto's personal model (Li et al. 2021): the plan's optimiser and epochs on this site's
    /// samples, pulled towards `global` (the round's global weights) by the proximal term
    /// `lambda/2 · ‖v − w‖²` in place of FedProx's.
    pub fn train_towards(
        &self,
        samples: &[&Sample],
        plan: &Plan,
        seed: u64,
        global: &NamedWeights,
        lambda: f64,
    ) -> Result<(f64, f64)> {
        let trainable = self.trainable_vars();
        let anchor = trainable
            .iter()
            .map(|(name, var)| match global.get(name) {
                Some((shape, data)) if shape.as_slice() == var.dims() => Ok(Tensor::from_vec(
                    data.clone(),
                    shape.as_slice(),
                    &self.device,
                )?),
                _ => Err(TrainError::Weights(format!(
                    "the global model has no tensor {name} of shape {:?}",
                    var.dims()
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        self.train_proximal(samples, plan, seed, None, (trainable, anchor), lambda)
    }

    fn train_proximal(
        &self,
        samples: &[&Sample],
        plan: &Plan,
        seed: u64,
        correction: Option<&[Tensor]>,
        (trainable, anchor): (Trainable, Vec<Tensor>),
        mu: f64,
    ) -> Result<(f64, f64)> {
        if samples.is_empty() {
            return Err(TrainError::Plan(
                "there are no training samples at this site".into(),
            ));
        }
        let mut optimiser = Opt::new(plan, trainable.iter().map(|(_, v)| v.clone()).collect())?;
        let mut rng = Rng::new(seed);
        let mut order: Vec<usize> = (0..samples.len()).collect();
        let batch = plan.batch_size.max(1);
        let (mut first, mut last) = (0.0, 0.0);
        for epoch in 0..plan.local_epochs.max(1) {
            rng.shuffle(&mut order);
            let mut sum = 0.0;
            let mut aug = Rng::new(rng.next_u64());
            for idx in order.chunks(batch) {
                let chunk: Vec<&Sample> = idx.iter().map(|&i| samples[i]).collect();
                let augment = (!plan.augmentations.is_empty())
                    .then_some((&mut aug, plan.augmentations.as_slice()));
                let (x, y) = self.batch(&chunk, plan, augment)?;
                let (loss, mut grads) = self.gradients(&x, &y, plan, (&trainable, &anchor, mu))?;
                sum += f64::from(loss) * chunk.len() as f64;
                if let Some(c) = correction {
                    for ((_, var), add) in trainable.iter().zip(c) {
                        if let Some(g) = grads.remove(var.as_tensor()) {
                            grads.insert(var.as_tensor(), (g + add)?);
                        }
                    }
                }
                optimiser.step(&grads)?;
            }
            let mean = sum / samples.len() as f64;
            if epoch == 0 {
                first = mean;
            }
            last = mean;
        }
        Ok((first, last))
    }

    /// One batch's training loss and the gradients of the weights, with the proximal term
    /// `mu/2 · ‖w − anchor‖²` of the `trainable` weights added when `mu > 0`. A U-Net with
    /// batch normalisation on the CPU is differentiated by hand (`UNet::gradients`); every
    /// other model by candle's autograd.
    fn gradients(
        &self,
        x: &Tensor,
        y: &Tensor,
        plan: &Plan,
        (trainable, anchor, mu): (&Trainable, &[Tensor], f64),
    ) -> Result<(f32, GradStore)> {
        if let (Model::UNet(unet), Some(_)) = (&self.model, &plan.segmentation)
            && let Some((loss, mut grads)) = unet.gradients(x, y, DICE_SMOOTH)?
        {
            if mu > 0.0 {
                for ((_, v), a) in trainable.iter().zip(anchor) {
                    let g = ((v.as_tensor() - a)? * mu)?;
                    let sum = match grads.remove(v.as_tensor()) {
                        Some(before) => (before + g)?,
                        None => g,
                    };
                    grads.insert(v.as_tensor(), sum);
                }
            }
            return Ok((loss, grads));
        }
        let logits = self.model.forward_t(x, true)?;
        let mut loss = self.loss(&logits, y, plan)?;
        let value = loss.to_scalar::<f32>()?;
        if mu > 0.0 {
            let mut prox = Tensor::zeros((), DType::F32, &self.device)?;
            for ((_, v), g) in trainable.iter().zip(anchor) {
                prox = (prox + (v.as_tensor() - g)?.sqr()?.sum_all()?)?;
            }
            loss = (loss + (prox * (mu / 2.0))?)?;
        }
        Ok((value, loss.backward()?))
    }

    /// Trains with DP-SGD (Abadi et al. 2016) for `dp.steps` steps: each step takes every
    /// patient (unit of privacy) with probability `dp.sampling_rate` (Poisson sampling, the
    /// sampling the accountant assumes), computes each sampled patient's gradient over all of
    /// their images, clips it to `dp.max_grad_norm`, adds Gaussian noise of
    /// `dp.noise_multiplier × max_grad_norm` to the sum and divides by the expected batch size.
    /// The sampling and the noise come from the operating system's generator: the plan's seed
    /// (which the server knows) drives only augmentation, so neither who was sampled nor the
    /// noise can be reconstructed. FedProx's proximal term is added after the noise (it does not
    /// depend on the data). Returns the mean loss of the sampled patients over the first and
    /// the last tenth of the steps.
    pub fn train_dp(
        &self,
        samples: &[&Sample],
        plan: &Plan,
        seed: u64,
        dp: &DpStep,
    ) -> Result<(f64, f64)> {
        let mut units: std::collections::BTreeMap<&str, Vec<&Sample>> = Default::default();
        for s in samples {
            units.entry(s.unit.as_str()).or_default().push(s);
        }
        let units: Vec<Vec<&Sample>> = units.into_values().collect();
        if units.is_empty() {
            return Err(TrainError::Plan(
                "there are no training samples at this site".into(),
            ));
        }
        let (trainable, anchor) = self.trainable()?;
        let mut optimiser = Opt::new(plan, trainable.iter().map(|(_, v)| v.clone()).collect())?;
        let mut secret = Rng::from_entropy();
        let mut aug = Rng::new(seed);
        let expected_batch = (dp.sampling_rate * units.len() as f64).max(1e-12);
        let std = dp.noise_multiplier * dp.max_grad_norm;
        let tenth = (dp.steps / 10).max(1);
        let (mut first, mut last) = ((0.0, 0u64), (0.0, 0u64));
        for step in 0..dp.steps {
            // Who is in this step (the OS generator) and their inputs (augmentation in a fixed
            // order), then each sampled patient's clipped gradient, patients in parallel (each
            // is a batch of one, which the kernels do not split across threads), summed in
            // the order drawn.
            let mut inputs = Vec::new();
            for unit in units.iter().filter(|_| secret.unit() < dp.sampling_rate) {
                let augment = (!plan.augmentations.is_empty())
                    .then_some((&mut aug, plan.augmentations.as_slice()));
                inputs.push(self.batch(unit, plan, augment)?);
            }
            let clipped: Vec<(f64, Vec<Option<Tensor>>)> = {
                use rayon::prelude::*;
                inputs
                    .par_iter()
                    .map(|(x, y)| self.clipped_gradient(x, y, &trainable, dp.max_grad_norm))
                    .collect::<Result<_>>()?
            };
            let mut grads = Vec::with_capacity(clipped.len());
            for (value, g) in clipped {
                if step < tenth {
                    first = (first.0 + value, first.1 + 1);
                }
                if step + tenth >= dp.steps {
                    last = (last.0 + value, last.1 + 1);
                }
                grads.push(g);
            }
            let vars: Vec<&Var> = trainable.iter().map(|(_, v)| v).collect();
            let mean = noisy_mean(grads, &vars, std, expected_batch, &mut secret)?;
            let mut noisy = GradStore::default();
            for ((var, mut g), w0) in vars.iter().zip(mean).zip(&anchor) {
                if plan.proximal_mu > 0.0 {
                    g = (g + ((var.as_tensor() - w0)? * plan.proximal_mu)?)?;
                }
                noisy.insert(var.as_tensor(), g);
            }
            optimiser.step(&noisy)?;
        }
        let mean = |(s, n): (f64, u64)| if n == 0 { f64::NAN } else { s / n as f64 };
        Ok((mean(first), mean(last)))
    }

    /// One patient's loss and gradient of the trainable weights, clipped to `max_norm` in L2
    /// over all of them together.
    fn clipped_gradient(
        &self,
        x: &Tensor,
        y: &Tensor,
        trainable: &[(String, Var)],
        max_norm: f64,
    ) -> Result<(f64, Vec<Option<Tensor>>)> {
        let logits = self.model.forward_t(x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        let grads = loss.backward()?;
        let vars: Vec<&Var> = trainable.iter().map(|(_, v)| v).collect();
        Ok((value, clip(&grads, &vars, max_norm)?))
    }

    /// All weights by name, on the CPU, as f32 vectors.
    pub fn weights(&self) -> Result<NamedWeights> {
        let mut out = HashMap::new();
        for (name, var) in sorted_vars(&self.varmap) {
            let t = var.as_tensor().to_device(&Device::Cpu)?;
            out.insert(
                name,
                (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?),
            );
        }
        Ok(out)
    }

    pub fn set_weights(&self, weights: &NamedWeights) -> Result<()> {
        for (name, var) in sorted_vars(&self.varmap) {
            if let Some((shape, data)) = weights.get(&name) {
                var.set(&Tensor::from_vec(
                    data.clone(),
                    shape.as_slice(),
                    &self.device,
                )?)?;
            }
        }
        Ok(())
    }
}

enum Opt {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Opt {
    fn new(plan: &Plan, vars: Vec<Var>) -> Result<Self> {
        Ok(match plan.optimiser {
            Optimiser::AdamW {
                learning_rate,
                weight_decay,
            } => Opt::AdamW(AdamW::new(
                vars,
                ParamsAdamW {
                    lr: learning_rate,
                    weight_decay,
                    ..Default::default()
                },
            )?),
            Optimiser::Sgd {
                learning_rate,
                momentum,
                weight_decay,
            } => Opt::Sgd(Sgd::new(vars, learning_rate, momentum, weight_decay)?),
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Opt::Sgd(o) => o.step(grads),
            Opt::AdamW(o) => Ok(o.step(grads)?),
        }
    }
}

/// The gradients of `vars` in `grads`, scaled together so that their L2 norm over all of them
/// is at most `max_norm` (one patient's contribution to a DP-SGD step; `None` where a variable
/// got no gradient).
pub(crate) fn clip(
    grads: &GradStore,
    vars: &[&Var],
    max_norm: f64,
) -> candle_core::Result<Vec<Option<Tensor>>> {
    let per_var: Vec<Option<&Tensor>> = vars.iter().map(|v| grads.get(v)).collect();
    let mut norm2 = 0f64;
    for g in per_var.iter().flatten() {
        norm2 += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    let scale = (max_norm / norm2.sqrt().max(1e-12)).min(1.0);
    per_var
        .into_iter()
        .map(|g| g.map(|g| g * scale).transpose())
        .collect()
}

/// One DP-SGD step's gradient of each of `vars`: the patients' clipped gradients summed in
/// the order given, plus Gaussian noise of standard deviation `std` per coordinate from
/// `secret` (the operating system's generator), over the expected batch size.
pub(crate) fn noisy_mean(
    clipped: Vec<Vec<Option<Tensor>>>,
    vars: &[&Var],
    std: f64,
    expected_batch: f64,
    secret: &mut Rng,
) -> candle_core::Result<Vec<Tensor>> {
    let mut sum: Vec<Option<Tensor>> = vec![None; vars.len()];
    for grads in clipped {
        for (acc, g) in sum.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            *acc = Some(match acc.take() {
                Some(a) => (a + g)?,
                None => g,
            });
        }
    }
    vars.iter()
        .zip(sum)
        .map(|(var, acc)| {
            let shape = var.shape().clone();
            let mut noise = vec![0f32; shape.elem_count()];
            consilium_core::noise::gaussian(&mut secret.0, std, &mut noise);
            let mut g = Tensor::from_vec(noise, shape, var.device())?;
            if let Some(a) = acc {
                g = (g + a)?;
            }
            g / expected_batch.max(1e-12)
        })
        .collect()
}

/// One round of DP-SGD at a site: how each step is sampled and protected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpStep {
    /// Each patient's chance of being in a step's batch.
    pub sampling_rate: f64,
    /// σ: the noise's standard deviation over the clipping norm.
    pub noise_multiplier: f64,
    /// C: each patient's gradient is clipped to this L2 norm.
    pub max_grad_norm: f64,
    pub steps: u64,
}

/// SGD with (heavy-ball) momentum and L2 weight decay, as PyTorch's `torch.optim.SGD`.
struct Sgd {
    vars: Vec<Var>,
    velocity: Vec<Option<Tensor>>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    fn new(vars: Vec<Var>, lr: f64, momentum: f64, weight_decay: f64) -> Result<Self> {
        let velocity = vars.iter().map(|_| None).collect();
        Ok(Sgd {
            vars,
            velocity,
            lr,
            momentum,
            weight_decay,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (var, vel) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            let mut g = g.clone();
            if self.weight_decay > 0.0 {
                g = (g + (var.as_tensor() * self.weight_decay)?)?;
            }
            let step = if self.momentum > 0.0 {
                let v = match vel.take() {
                    Some(v) => ((v * self.momentum)? + &g)?,
                    None => g,
                };
                *vel = Some(v.clone());
                v
            } else {
                g
            };
            var.set(&(var.as_tensor() - (step * self.lr)?)?)?;
        }
        Ok(())
    }
}

/// The soft Dice loss's smoothing (MONAI's default `smooth_nr` and `smooth_dr`).
const DICE_SMOOTH: f64 = 1e-5;

/// A sample's mask as the plan's classes; an error names a value the plan does not.
pub fn mask_classes(sample: &Sample, seg: &Segmentation) -> Result<Vec<u32>> {
    let mask = sample.mask.as_ref().ok_or_else(|| {
        TrainError::Plan(format!(
            "{} has no mask, and the plan trains a segmentation model: declare the site's dataset with masks = true",
            sample.source
        ))
    })?;
    mask.iter()
        .map(|&v| {
            seg.class_of(v).map(u32::from).ok_or_else(|| {
                TrainError::Plan(format!(
                    "{}'s mask has the value {v}, which the plan's model.labels does not name (it names {})",
                    sample.source,
                    seg.values
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        })
        .collect()
}

/// One-vs-rest AUROC averaged over classes (binary: the positive class), by the rank
/// statistic with ties counted half. None when no class has both positives and negatives, or
/// when a score is not a number (a diverged model's softmax of infinite logits), which ranks
/// nothing.
pub fn auroc(scores: &[(Vec<f32>, u32)], classes: usize) -> Option<f64> {
    if scores.iter().any(|(p, _)| p.iter().any(|v| v.is_nan())) {
        return None;
    }
    let targets: Vec<usize> = if classes == 2 {
        vec![1]
    } else {
        (0..classes).collect()
    };
    let mut aucs = Vec::new();
    for c in targets {
        let mut pairs: Vec<(f32, bool)> = scores
            .iter()
            .map(|(p, l)| (p.get(c).copied().unwrap_or(0.0), *l as usize == c))
            .collect();
        let pos = pairs.iter().filter(|p| p.1).count();
        let neg = pairs.len() - pos;
        if pos == 0 || neg == 0 {
            continue;
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut rank_sum = 0.0;
        let mut i = 0;
        while i < pairs.len() {
            let mut j = i;
            while j < pairs.len() && pairs[j].0.total_cmp(&pairs[i].0).is_eq() {
                j += 1;
            }
            let avg_rank = (i + j + 1) as f64 / 2.0; // ranks i+1 ..= j
            rank_sum += avg_rank * pairs[i..j].iter().filter(|p| p.1).count() as f64;
            i = j;
        }
        aucs.push((rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64);
    }
    (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A U-Net plan: widths [4, 8, 16], `norm` and `upsampling` as named, 3 classes, 16 × 16.
    fn unet_plan(norm: &str, upsampling: &str) -> Plan {
        let manifest: consilium_core::manifest::TrainingPlanManifest =
            serde_json::from_value(serde_json::json!({
                "model": {
                    "architecture": "unet",
                    "num_classes": 3,
                    "hyper_parameters": {"widths": [4, 8, 16], "norm": norm, "upsampling": upsampling},
                    "labels": {"0": "background", "1": "lesion", "2": "oedema"}
                },
                "preprocessing": {"image_size": 16},
                "optimiser": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9},
                "local_epochs": 1, "batch_size": 3, "rounds": 1,
                "aggregation": {"strategy": "fedavg"}, "seed": 5
            }))
            .unwrap();
        manifest.parse().unwrap()
    }

    /// The hand-differentiated U-Net step against candle's autograd on the same weights and
    /// batch (candle's is checked against central differences in `model`): the same loss,
    /// every weight's gradient with the proximal term, and the same running averages after.
    #[test]
    fn hand_differentiated_unet_step_matches_candles_autograd() {
        let plan = unet_plan("batch", "transposed");
        let (by_hand, by_candle) = (
            Net::new(&plan, &Device::Cpu).unwrap(),
            Net::new(&plan, &Device::Cpu).unwrap(),
        );
        let mut rng = Rng::new(3);
        let x: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.normal() as f32).collect();
        let y: Vec<u32> = (0..3 * 16 * 16)
            .map(|_| (rng.unit() * 3.0) as u32)
            .collect();
        let x = Tensor::from_vec(x, (3, 1, 16, 16), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(y, (3, 16, 16), &Device::Cpu).unwrap();
        let mu = 0.5;
        let prox = |net: &Net| {
            let trainable = net.trainable_vars();
            // An anchor away from the weights, so that the proximal term has a gradient.
            let anchor: Vec<Tensor> = trainable
                .iter()
                .map(|(_, v)| (v.as_tensor() + 0.25).unwrap().detach())
                .collect();
            (trainable, anchor)
        };
        let Model::UNet(unet) = &by_hand.model else {
            panic!("a U-Net plan builds a U-Net")
        };
        assert!(unet.gradients(&x, &y, DICE_SMOOTH).unwrap().is_some());
        // That call updated the running averages once: start again from a fresh net.
        let by_hand = Net::new(&plan, &Device::Cpu).unwrap();
        let (trainable, anchor) = prox(&by_hand);
        let (hand_loss, hand) = by_hand
            .gradients(&x, &y, &plan, (&trainable, &anchor, mu))
            .unwrap();
        let (trainable_c, anchor_c) = prox(&by_candle);
        let logits = by_candle.model.forward_t(&x, true).unwrap();
        let loss = by_candle.loss(&logits, &y, &plan).unwrap();
        let candle_loss = loss.to_scalar::<f32>().unwrap();
        let mut with_prox = loss;
        for ((_, v), a) in trainable_c.iter().zip(&anchor_c) {
            let term = ((v.as_tensor() - a)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                * (mu / 2.0))
                .unwrap();
            with_prox = (with_prox + term).unwrap();
        }
        let candle = with_prox.backward().unwrap();
        assert!(
            (hand_loss - candle_loss).abs() < 1e-5,
            "{hand_loss} vs {candle_loss}"
        );
        let vars = |net: &Net| sorted_vars(&net.varmap);
        let mut compared = 0;
        for ((name, h), (_, c)) in vars(&by_hand).iter().zip(vars(&by_candle).iter()) {
            if is_running_stat(name) {
                let (h, c) = (values_of(h.as_tensor()), values_of(c.as_tensor()));
                assert!(close(&h, &c, 1e-5), "{name}: {h:?} vs {c:?}");
                continue;
            }
            let (h, c) = (
                values_of(
                    hand.get(h)
                        .unwrap_or_else(|| panic!("no gradient for {name}")),
                ),
                values_of(candle.get(c).unwrap()),
            );
            assert!(close(&h, &c, 1e-4), "{name}: {h:?} vs {c:?}");
            compared += 1;
        }
        // 3 levels of 2 convolutions and 2 batch norms (weight, scale, shift: 3 each), 2 decoder
        // levels likewise plus the upsampling's weight and bias, and the head's weight and bias.
        assert_eq!(compared, 5 * 6 + 2 * 2 + 2);
    }

    /// Where the hand pass does not apply, candle's autograd still trains the U-Net.
    #[test]
    fn unets_the_hand_pass_does_not_cover_fall_back_to_autograd() {
        for (norm, upsampling) in [("group", "transposed"), ("batch", "resize")] {
            let plan = unet_plan(norm, upsampling);
            let net = Net::new(&plan, &Device::Cpu).unwrap();
            let Model::UNet(unet) = &net.model else {
                panic!("a U-Net plan builds a U-Net")
            };
            let x = Tensor::ones((2, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
            let y = Tensor::ones((2, 16, 16), DType::U32, &Device::Cpu).unwrap();
            assert!(unet.gradients(&x, &y, DICE_SMOOTH).unwrap().is_none());
            let trainable = net.trainable_vars();
            let (_, grads) = net
                .gradients(&x, &y, &plan, (&trainable, &[], 0.0))
                .unwrap();
            assert!(trainable.iter().all(|(_, v)| grads.get(v).is_some()));
        }
    }

    fn values_of(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Whether `a` and `b` agree within `tol` of the larger one's largest magnitude.
    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        let scale = a.iter().chain(b).fold(1e-3f32, |m, v| m.max(v.abs()));
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * scale)
    }

    #[test]
    fn auroc_by_hand() {
        let s = |p: f32, l| (vec![1.0 - p, p], l);
        // Perfect ranking → 1; reversed → 0; one tie between a positive and a negative → 0.5 for that pair.
        assert_eq!(auroc(&[s(0.1, 0), s(0.9, 1)], 2), Some(1.0));
        assert_eq!(auroc(&[s(0.9, 0), s(0.1, 1)], 2), Some(0.0));
        // pos {0.8, 0.4}, neg {0.4, 0.2}: pairs (0.8>0.4)1 (0.8>0.2)1 (0.4=0.4)0.5 (0.4>0.2)1 → 3.5/4
        assert_eq!(
            auroc(&[s(0.8, 1), s(0.4, 1), s(0.4, 0), s(0.2, 0)], 2),
            Some(0.875)
        );
        assert_eq!(auroc(&[s(0.8, 1)], 2), None);
    }

    /// A diverged model's softmax gives NaN scores; the tie scan once never advanced past them
    /// (NaN ≠ NaN), so the site's evaluation spun forever and the round never heard from it.
    #[test]
    fn auroc_of_scores_that_are_not_numbers_ends() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let nan = |l| (vec![f32::NAN, f32::NAN], l);
            tx.send((
                auroc(&[nan(0), nan(1), nan(1)], 2),
                auroc(&[(vec![0.5, f32::NAN], 0), (vec![0.2, 0.8], 1)], 2),
                auroc(&[(vec![f32::NAN; 3], 0), (vec![f32::NAN; 3], 2)], 3),
            ))
            .expect("the test waits for the answer");
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("auroc returns on NaN scores");
        assert_eq!(got, (None, None, None));
        // Infinite scores still rank (equal ones tie).
        let inf = |p: f32, l| (vec![-p, p], l);
        assert_eq!(
            auroc(
                &[inf(f32::INFINITY, 1), inf(f32::INFINITY, 0), inf(0.0, 0)],
                2
            ),
            Some(0.75)
        );
    }

    #[test]
    fn rng_is_reproducible() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(
            (0..5).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..5).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
        let mean: f64 = (0..10_000).map(|_| Rng::new(1).unit()).sum::<f64>();
        assert!(mean > 0.0);
    }
}
