//! Batch normalisation in training mode, optionally followed by a ReLU, as one node of
//! candle's autograd graph on CPU.
//!
//! candle-nn's `BatchNorm` builds it from nine whole-tensor operations (a transposed copy, two
//! means, a subtraction, a square, a division, a multiply, an add, and the copy back), and its
//! backward pass from many more, each allocating and zero-filling a tensor the size of the
//! activations. Here the forward pass is two reads of the input (mean, then variance) and one
//! write; the backward pass two reads and one write, with the closed-form gradient.

use crate::conv::{contiguous_f32, cpu_kernels, vectorised, with_values};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// One batch's per-channel mean and (biased) variance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    /// Values per channel: batch × height × width.
    pub count: usize,
}

/// `x` (N, C, H, W) normalised per channel by the batch's mean and variance, then scaled by
/// `weight` and shifted by `bias` (C each), then — when `relu` — cut at 0. Returns the output
/// and the batch's statistics (for the running averages). For f32 tensors on the CPU
/// (`conv::cpu_kernels`).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let (n, c, h, w) = x.dims4()?;
    if weight.dims1()? != c || bias.dims1()? != c {
        bail!("batch_norm: the input has {c} channels, the weight and bias must have as many")
    }
    if !cpu_kernels(x) {
        bail!("batch_norm: these kernels take f32 tensors on the CPU (elsewhere, use candle-nn's)")
    }
    let BatchNorm2d(op) = BatchNorm2d::new((n, c, h, w), eps, relu);
    let stats = op.stats.clone();
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let stats = match stats.lock() {
        Ok(s) => s.clone(),
        Err(_) => bail!("batch_norm: the statistics were lost"),
    };
    Ok((y, stats))
}

/// Lanes that a sum is split over: a float sum in order cannot vectorise (each add waits for
/// the one before), sixteen independent ones can.
const LANES: usize = 16;

/// Σ f(a_i) in `LANES` lanes.
#[inline(always)]
fn lane_sum(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|v| f(*v)).sum();
    for chunk in chunks {
        for i in 0..LANES {
            acc[i] += f(chunk[i]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Σ f(a_i, b_i, c_i) over three slices of one length, of both of `f`'s values, in `LANES`
/// lanes.
#[inline(always)]
fn lanes(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> [f32; 2]) -> [f32; 2] {
    let mut acc = [[0f32; LANES]; 2];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let mut rest = [0f32; 2];
    for ((x, y), z) in ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
    {
        let [p, q] = f(*x, *y, *z);
        rest[0] += p;
        rest[1] += q;
    }
    for ((ca, cb), cc) in ca.zip(cb).zip(cc) {
        for i in 0..LANES {
            let [p, q] = f(ca[i], cb[i], cc[i]);
            acc[0][i] += p;
            acc[1][i] += q;
        }
    }
    [
        acc[0].iter().sum::<f32>() + rest[0],
        acc[1].iter().sum::<f32>() + rest[1],
    ]
}

/// Batch normalisation in training mode (then a ReLU when `relu`) of an (N, C, H, W) batch on
/// values, for a model differentiated by hand: the kernels of `batch_norm_train` without
/// candle's autograd graph.
pub struct BatchNorm2d(BatchNorm);

impl BatchNorm2d {
    pub fn new((n, c, h, w): (usize, usize, usize, usize), eps: f64, relu: bool) -> Self {
        BatchNorm2d(BatchNorm {
            n,
            c,
            h,
            w,
            plane: h * w,
            eps: eps as f32,
            relu,
            stats: Arc::default(),
        })
    }

    fn check(&self, len: usize, gamma: &[f32]) -> Result<()> {
        let op = &self.0;
        if len != op.n * op.c * op.plane || gamma.len() != op.c {
            bail!("batch_norm: the values do not match the batch's shape")
        }
        Ok(())
    }

    /// The output of `x` scaled by `gamma` and shifted by `beta` (C each), and the batch's
    /// statistics.
    pub fn forward(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
    ) -> Result<(Vec<f32>, BatchStats)> {
        self.check(x.len(), gamma)?;
        if beta.len() != gamma.len() {
            bail!("batch_norm: the shift must have one value per channel")
        }
        Ok(self.0.forward_values(x, gamma, beta))
    }

    /// The gradients of the input, `gamma` and `beta` from the output's gradient `dy`, with
    /// the output `y` and the statistics of the forward pass.
    pub fn backward(
        &self,
        stats: &BatchStats,
        x: &[f32],
        gamma: &[f32],
        y: &[f32],
        dy: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        self.check(x.len(), gamma)?;
        self.check(y.len().min(dy.len()), gamma)?;
        if stats.mean.len() != gamma.len() || stats.var.len() != gamma.len() {
            bail!("batch_norm: the statistics do not match the batch's channels")
        }
        Ok(self.0.backward_values(stats, x, gamma, y, dy))
    }
}

struct BatchNorm {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    plane: usize,
    eps: f32,
    relu: bool,
    /// Written by the forward pass: read by the caller and by the backward pass.
    stats: Arc<Mutex<BatchStats>>,
}

impl BatchNorm {
    /// Channel `ch`'s planes in `x`, one per image.
    fn planes<'a>(&self, x: &'a [f32], ch: usize) -> impl Iterator<Item = &'a [f32]> {
        (0..self.n).map(move |i| &x[(i * self.c + ch) * self.plane..][..self.plane])
    }

    fn count(&self) -> usize {
        self.n * self.plane
    }

    fn stats(&self, x: &[f32]) -> BatchStats {
        let m = self.count().max(1) as f64;
        let (mean, var): (Vec<f32>, Vec<f32>) = (0..self.c)
            .into_par_iter()
            .map(|ch| {
                vectorised(
                    #[inline(always)]
                    || {
                        let sum: f64 = self
                            .planes(x, ch)
                            .map(|p| f64::from(lane_sum(p, |v| v)))
                            .sum();
                        let mean = (sum / m) as f32;
                        let sq: f64 = self
                            .planes(x, ch)
                            .map(|p| f64::from(lane_sum(p, |v| (v - mean) * (v - mean))))
                            .sum();
                        (mean, (sq / m) as f32)
                    },
                )
            })
            .unzip();
        BatchStats {
            mean,
            var,
            count: self.count(),
        }
    }

    /// The output of `x` and the batch's statistics.
    fn forward_values(&self, x: &[f32], gamma: &[f32], beta: &[f32]) -> (Vec<f32>, BatchStats) {
        let stats = self.stats(x);
        let scale = self.scale(&stats);
        let floor = if self.relu { 0.0 } else { f32::NEG_INFINITY };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(self.plane.max(1))
            .zip(x.par_chunks(self.plane.max(1)))
            .enumerate()
            .for_each(|(i, (out, input))| {
                let ch = i % self.c;
                let (mean, inv) = scale[ch];
                let (g, b) = (gamma[ch] * inv, beta[ch]);
                vectorised(
                    #[inline(always)]
                    || {
                        for (o, v) in out.iter_mut().zip(input) {
                            *o = ((v - mean) * g + b).max(floor);
                        }
                    },
                )
            });
        (y, stats)
    }

    /// The gradients of the input, the scale and the shift from the output's gradient `dy`
    /// (`y` the output, `stats` the forward pass's).
    fn backward_values(
        &self,
        stats: &BatchStats,
        x: &[f32],
        gamma: &[f32],
        y: &[f32],
        dy: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let scale = self.scale(stats);
        let m = self.count().max(1) as f32;
        // The gradient that passed the ReLU.
        let passed = |y: f32, d: f32| if self.relu && y <= 0.0 { 0.0 } else { d };
        // Per channel: Σ dy and Σ dy · x̂.
        let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = (0..self.c)
            .into_par_iter()
            .map(|ch| {
                let (mean, inv) = scale[ch];
                vectorised(
                    #[inline(always)]
                    || {
                        let (mut sum, mut dot) = (0f64, 0f64);
                        for ((x, y), dy) in self
                            .planes(x, ch)
                            .zip(self.planes(y, ch))
                            .zip(self.planes(dy, ch))
                        {
                            // Σ over the plane of g and of g · x̂, g the gradient past the
                            // ReLU (a zero output had none); x and the output in one zip.
                            let [s, d] = lanes(x, y, dy, |x, y, dy| {
                                let g = passed(y, dy);
                                [g, g * (x - mean) * inv]
                            });
                            sum += f64::from(s);
                            dot += f64::from(d);
                        }
                        (sum as f32, dot as f32)
                    },
                )
            })
            .unzip();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(self.plane.max(1))
            .enumerate()
            .for_each(|(i, out)| {
                let ch = i % self.c;
                let (mean, inv) = scale[ch];
                let k = gamma[ch] * inv;
                let (mb, mg) = (dbeta[ch] / m, dgamma[ch] / m);
                let at = i * self.plane;
                let (x, y, dy) = (
                    &x[at..at + out.len()],
                    &y[at..at + out.len()],
                    &dy[at..at + out.len()],
                );
                vectorised(
                    #[inline(always)]
                    || {
                        for (((o, x), y), dy) in out.iter_mut().zip(x).zip(y).zip(dy) {
                            let xhat = (x - mean) * inv;
                            *o = k * (passed(*y, *dy) - mb - xhat * mg);
                        }
                    },
                )
            });
        (dx, dgamma, dbeta)
    }

    /// Each channel's mean and 1/√(variance + ε).
    fn scale(&self, stats: &BatchStats) -> Vec<(f32, f32)> {
        stats
            .mean
            .iter()
            .zip(&stats.var)
            .map(|(&m, &v)| (m, 1.0 / (v + self.eps).sqrt()))
            .collect()
    }
}

impl candle_core::CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        "consilium-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "batch_norm")?;
        let gamma = contiguous_f32(s2, l2, "batch_norm")?;
        let beta = contiguous_f32(s3, l3, "batch_norm")?;
        let (y, stats) = self.forward_values(x, gamma, beta);
        if let Ok(mut kept) = self.stats.lock() {
            *kept = stats;
        }
        Ok((
            CpuStorage::F32(y),
            Shape::from((self.n, self.c, self.h, self.w)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = match self.stats.lock() {
            Ok(s) => s.clone(),
            Err(_) => bail!("batch_norm: the statistics were lost"),
        };
        let grad = grad.contiguous()?;
        let (dx, dgamma, dbeta) = with_values(x, |x| {
            with_values(weight, |gamma| {
                with_values(res, |y| {
                    with_values(&grad, |dy| self.backward_values(&stats, x, gamma, y, dy))
                })
            })
        })????;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, self.c, dev)?),
            Some(Tensor::from_vec(dbeta, self.c, dev)?),
        ))
    }
}
