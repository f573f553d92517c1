//! The models a training plan can name, as candle-nn modules: the classifiers `small_cnn` and
//! `resnet`, and the segmentation model `unet`.

use candle_core::backprop::GradStore;
use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Conv2dConfig, Init, Linear, VarBuilder, linear};
use consilium_core::conv::{Convolution, Pool2x2, TransposedConv2x2};
use consilium_core::norm::{BatchNorm2d, BatchStats};
use consilium_core::plan::{ModelConfig, Norm, UNetParams, Upsampling};
use rayon::prelude::*;

/// A convolution layer with candle-nn's parameters (names, shapes, initialisation), computed
/// by `consilium_core::conv`: im2col and GEMM on CPU, candle's kernels elsewhere.
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    fn from(layer: candle_nn::Conv2d, cfg: Conv2dConfig) -> Self {
        Conv2d {
            weight: layer.weight().clone(),
            bias: layer.bias().cloned(),
            padding: cfg.padding,
            stride: cfg.stride,
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        consilium_core::conv::conv2d(
            xs,
            &self.weight,
            self.bias.as_ref(),
            self.padding,
            self.stride,
        )
    }
}

fn conv2d(cin: usize, cout: usize, k: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    Ok(Conv2d::from(candle_nn::conv2d(cin, cout, k, cfg, vb)?, cfg))
}

fn conv2d_no_bias(
    cin: usize,
    cout: usize,
    k: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d::from(
        candle_nn::conv2d_no_bias(cin, cout, k, cfg, vb)?,
        cfg,
    ))
}

/// Batch normalisation with candle-nn's parameters (names, initialisation, momentum 0.1):
/// trained on CPU by `consilium_core::norm` (the batch statistics, the affine map and an
/// optional ReLU in one pass each way), otherwise — evaluation, other devices — by candle-nn.
pub struct BatchNorm {
    /// The same parameters as a candle-nn module.
    candle: candle_nn::BatchNorm,
    running_mean: Var,
    running_var: Var,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

const BN_MOMENTUM: f64 = 0.1;

fn batch_norm(channels: usize, eps: f64, vb: VarBuilder) -> Result<BatchNorm> {
    let running_mean =
        Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.))?)?;
    let running_var =
        Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.))?)?;
    let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
    let candle = candle_nn::BatchNorm::new(
        channels,
        running_mean.as_tensor().clone(),
        running_var.as_tensor().clone(),
        weight.clone(),
        bias.clone(),
        eps,
    )?;
    Ok(BatchNorm {
        candle,
        running_mean,
        running_var,
        weight,
        bias,
        eps,
    })
}

impl BatchNorm {
    /// Normalises `xs`, then applies a ReLU when `relu`. In training, by the batch's
    /// statistics, which also update the running averages.
    fn forward(&self, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !(train && consilium_core::conv::cpu_kernels(xs)) {
            // candle-nn's: evaluation, and training on other devices.
            let ys = self.candle.forward_t(xs, train)?;
            return if relu { ys.relu() } else { Ok(ys) };
        }
        let (ys, stats) =
            consilium_core::norm::batch_norm_train(xs, &self.weight, &self.bias, self.eps, relu)?;
        self.update_running(stats)?;
        Ok(ys)
    }

    /// Blends a training batch's statistics into the running averages.
    fn update_running(&self, stats: BatchStats) -> Result<()> {
        let channels = stats.mean.len();
        let dev = self.running_mean.device();
        let mean = Tensor::from_vec(stats.mean, channels, dev)?;
        let var = Tensor::from_vec(stats.var, channels, dev)?;
        // The running variance is the unbiased estimate, as PyTorch's and candle-nn's.
        let unbiased = stats.count as f64 / (stats.count.max(2) - 1) as f64;
        let blend = |running: &Var, batch: Tensor, scale: f64| {
            running.set(
                &((running.as_tensor() * (1.0 - BN_MOMENTUM))? + (batch * (BN_MOMENTUM * scale))?)?,
            )
        };
        blend(&self.running_mean, mean, 1.0)?;
        blend(&self.running_var, var, unbiased)
    }
}

/// The normalisation after a convolution that the plan names: batch normalisation, or group
/// normalisation (candle-nn's, any device), which uses no statistics but the image's own.
enum Normaliser {
    Batch(BatchNorm),
    Group(candle_nn::GroupNorm),
}

impl Normaliser {
    /// `name` is the batch-norm layer's: a group-norm layer's starts with `gn` instead, so that
    /// FedBN and the initialisation tell them apart.
    fn new(norm: Norm, channels: usize, name: &str, vb: &VarBuilder) -> Result<Self> {
        Ok(match norm {
            Norm::Batch => Normaliser::Batch(batch_norm(channels, 1e-5, vb.pp(name))?),
            Norm::Group => Normaliser::Group(candle_nn::group_norm(
                Norm::groups(channels),
                channels,
                1e-5,
                vb.pp(name.replacen("bn", "gn", 1)),
            )?),
        })
    }

    fn forward(&self, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        match self {
            Normaliser::Batch(bn) => bn.forward(xs, train, relu),
            Normaliser::Group(gn) => {
                let ys = gn.forward(xs)?;
                if relu { ys.relu() } else { Ok(ys) }
            }
        }
    }
}

/// conv(1→32, 3×3) → ReLU → max-pool 2 → conv(32→64, 3×3) → ReLU → max-pool 2 → linear.
pub struct SmallCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc: Linear,
}

impl SmallCnn {
    /// `channels`: the output channels of the two convolutions (`model.hyper_parameters`).
    pub fn new(vb: VarBuilder, size: usize, classes: usize, channels: [usize; 2]) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let [c1, c2] = channels;
        let conv1 = conv2d(1, c1, 3, cfg, vb.pp("conv1"))?;
        let conv2 = conv2d(c1, c2, 3, cfg, vb.pp("conv2"))?;
        let side = size / 4;
        let fc = linear(c2 * side * side, classes, vb.pp("fc"))?;
        Ok(SmallCnn { conv1, conv2, fc })
    }
}

impl ModuleT for SmallCnn {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor> {
        // Pooling before the ReLU gives the same values (both are monotone) on a quarter of
        // the data.
        let pool = consilium_core::conv::max_pool2x2_relu;
        let xs = pool(&self.conv1.forward(xs)?)?;
        let xs = pool(&self.conv2.forward(&xs)?)?;
        self.fc.forward(&xs.flatten_from(1)?)
    }
}

struct BasicBlock {
    conv1: Conv2d,
    bn1: Normaliser,
    conv2: Conv2d,
    bn2: Normaliser,
    shortcut: Option<(Conv2d, Normaliser)>,
}

impl BasicBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, stride: usize, norm: Norm) -> Result<Self> {
        let c3 = |stride| Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let conv1 = conv2d_no_bias(cin, cout, 3, c3(stride), vb.pp("conv1"))?;
        let bn1 = Normaliser::new(norm, cout, "bn1", &vb)?;
        let conv2 = conv2d_no_bias(cout, cout, 3, c3(1), vb.pp("conv2"))?;
        let bn2 = Normaliser::new(norm, cout, "bn2", &vb)?;
        let shortcut = if stride != 1 || cin != cout {
            let cfg = Conv2dConfig {
                stride,
                ..Default::default()
            };
            Some((
                conv2d_no_bias(cin, cout, 1, cfg, vb.pp("down"))?,
                Normaliser::new(norm, cout, "bn_down", &vb)?,
            ))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1,
            bn1,
            conv2,
            bn2,
            shortcut,
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = self.bn1.forward(&self.conv1.forward(xs)?, train, true)?;
        let ys = self.bn2.forward(&self.conv2.forward(&ys)?, train, false)?;
        let skip = match &self.shortcut {
            Some((conv, bn)) => bn.forward(&conv.forward(xs)?, train, false)?,
            None => xs.clone(),
        };
        (ys + skip)?.relu()
    }
}

/// A small ResNet: a 3×3 stem, residual stages of `widths` (each after the first halves the
/// resolution), global average pooling, a linear classifier; batch or group normalisation
/// after each convolution.
pub struct ResNet {
    stem: Conv2d,
    bn: Normaliser,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl ResNet {
    pub fn new(vb: VarBuilder, widths: &[usize], norm: Norm, classes: usize) -> Result<Self> {
        let first = widths.first().copied().unwrap_or(16);
        let stem = conv2d_no_bias(
            1,
            first,
            3,
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            vb.pp("stem"),
        )?;
        let bn = Normaliser::new(norm, first, "bn_stem", &vb)?;
        let mut blocks = Vec::new();
        let mut cin = first;
        for (i, &w) in widths.iter().enumerate() {
            blocks.push(BasicBlock::new(
                vb.pp(format!("layer{i}")),
                cin,
                w,
                if i == 0 { 1 } else { 2 },
                norm,
            )?);
            cin = w;
        }
        let fc = linear(cin, classes, vb.pp("fc"))?;
        Ok(ResNet {
            stem,
            bn,
            blocks,
            fc,
        })
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut ys = self.bn.forward(&self.stem.forward(xs)?, train, true)?;
        for b in &self.blocks {
            ys = b.forward_t(&ys, train)?;
        }
        self.fc.forward(&ys.mean(3)?.mean(2)?)
    }
}

/// Two 3×3 convolutions, each normalised and followed by a ReLU: one level of a U-Net.
struct DoubleConv {
    conv1: Conv2d,
    bn1: Normaliser,
    conv2: Conv2d,
    bn2: Normaliser,
}

impl DoubleConv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, norm: Norm) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(DoubleConv {
            conv1: conv2d_no_bias(cin, cout, 3, cfg, vb.pp("conv1"))?,
            bn1: Normaliser::new(norm, cout, "bn1", &vb)?,
            conv2: conv2d_no_bias(cout, cout, 3, cfg, vb.pp("conv2"))?,
            bn2: Normaliser::new(norm, cout, "bn2", &vb)?,
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = self.bn1.forward(&self.conv1.forward(xs)?, train, true)?;
        self.bn2.forward(&self.conv2.forward(&ys)?, train, true)
    }
}

/// How a U-Net's decoder doubles the resolution.
enum Up {
    /// A 2×2 transposed convolution with stride 2, weight `(in, out, 2, 2)` as PyTorch's
    /// `ConvTranspose2d`. Each input pixel alone makes its 2×2 output block, so it is one
    /// matrix multiply of the pixels by the weight (`consilium_core::conv::transposed_conv2x2`).
    Transposed { weight: Tensor, bias: Tensor },
    /// Nearest-neighbour doubling, then a 3×3 convolution.
    Resize(Conv2d),
}

impl Up {
    fn new(vb: VarBuilder, cin: usize, cout: usize, upsampling: Upsampling) -> Result<Self> {
        Ok(match upsampling {
            Upsampling::Transposed => Up::Transposed {
                weight: vb.get_with_hints(
                    (cin, cout, 2, 2),
                    "weight",
                    candle_nn::init::DEFAULT_KAIMING_NORMAL,
                )?,
                bias: vb.get_with_hints(cout, "bias", Init::Const(0.))?,
            },
            Upsampling::Resize => {
                let cfg = Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                Up::Resize(conv2d(cin, cout, 3, cfg, vb)?)
            }
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Up::Transposed { weight, bias } => {
                consilium_core::conv::transposed_conv2x2(xs, weight, bias)
            }
            Up::Resize(conv) => {
                let (_, _, h, w) = xs.dims4()?;
                conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
            }
        }
    }
}

/// A 2-D U-Net: an encoder level per width (two 3×3 convolutions, 2×2 max-pooling to the
/// next), a decoder level per width but the last (upsampling, concatenation with the
/// encoder's output at that resolution, two 3×3 convolutions), and a 1×1 convolution to a
/// score per class and pixel: `(N, 1, S, S)` in, `(N, classes, S, S)` out. Layers: `enc0` …,
/// then from the deepest `up{i}` and `dec{i}`, and `head`.
pub struct UNet {
    encoder: Vec<DoubleConv>,
    decoder: Vec<(Up, DoubleConv)>,
    head: Conv2d,
}

impl UNet {
    pub fn new(vb: VarBuilder, hp: &UNetParams, classes: usize) -> Result<Self> {
        let widths = &hp.widths;
        let mut encoder = Vec::new();
        let mut cin = 1;
        for (i, &w) in widths.iter().enumerate() {
            encoder.push(DoubleConv::new(vb.pp(format!("enc{i}")), cin, w, hp.norm)?);
            cin = w;
        }
        let mut decoder = Vec::new();
        for i in (0..widths.len().saturating_sub(1)).rev() {
            let (below, here) = (widths[i + 1], widths[i]);
            decoder.push((
                Up::new(vb.pp(format!("up{i}")), below, here, hp.upsampling)?,
                DoubleConv::new(vb.pp(format!("dec{i}")), 2 * here, here, hp.norm)?,
            ));
        }
        let first = widths.first().copied().unwrap_or(1);
        let head = conv2d(first, classes, 1, Conv2dConfig::default(), vb.pp("head"))?;
        Ok(UNet {
            encoder,
            decoder,
            head,
        })
    }
}

impl ModuleT for UNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut skips = Vec::new();
        let mut ys = xs.clone();
        for (i, level) in self.encoder.iter().enumerate() {
            if i > 0 {
                let pooled = consilium_core::conv::max_pool2x2(&ys)?;
                skips.push(std::mem::replace(&mut ys, pooled));
            }
            ys = level.forward_t(&ys, train)?;
        }
        for (up, level) in &self.decoder {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("a U-Net level without its skip".into()))?;
            ys = level.forward_t(&Tensor::cat(&[&skip, &up.forward(&ys)?], 1)?, train)?;
        }
        self.head.forward(&ys)
    }
}

/// A tensor's values (f32, as the CPU kernels take them).
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Adds `g` into the gradient of `t` in `grads`.
fn add_gradient(grads: &mut GradStore, t: &Tensor, g: Vec<f32>) -> Result<()> {
    let g = Tensor::from_vec(g, t.shape(), t.device())?;
    let sum = match grads.remove(t) {
        Some(before) => (before + g)?,
        None => g,
    };
    grads.insert(t, sum);
    Ok(())
}

type Shape4 = (usize, usize, usize, usize);

/// A 3×3 convolution, batch normalisation and ReLU as the hand-differentiated pass computes
/// them: what the backward pass needs of the forward one.
struct ConvBnRelu<'a> {
    layer: (&'a Conv2d, &'a BatchNorm),
    conv: Convolution,
    wm: Vec<f32>,
    bn: BatchNorm2d,
    gamma: Vec<f32>,
    stats: BatchStats,
    /// The convolution's output, normalised into `out`.
    pre: Vec<f32>,
    out: Vec<f32>,
    shape: Shape4,
}

impl<'a> ConvBnRelu<'a> {
    /// Also blends the batch's statistics into the running averages, as candle's pass does.
    fn forward(conv: &'a Conv2d, bn: &'a BatchNorm, x: &[f32], shape: Shape4) -> Result<Self> {
        let op = Convolution::new(
            shape,
            conv.weight.dims4()?,
            conv.padding,
            conv.stride,
            false,
        )?;
        let wm = op.matrix(&values(&conv.weight)?, None)?;
        let pre = op.forward(x, &wm)?;
        let out_shape = op.output();
        let norm = BatchNorm2d::new(out_shape, bn.eps, true);
        let gamma = values(&bn.weight)?;
        let (out, stats) = norm.forward(&pre, &gamma, &values(&bn.bias)?)?;
        bn.update_running(stats.clone())?;
        Ok(ConvBnRelu {
            layer: (conv, bn),
            conv: op,
            wm,
            bn: norm,
            gamma,
            stats,
            pre,
            out,
            shape: out_shape,
        })
    }

    /// The input's gradient (when `want_dx`) from the output's, `x` the input.
    fn backward(
        &self,
        x: &[f32],
        dout: &[f32],
        want_dx: bool,
        grads: &mut GradStore,
    ) -> Result<Option<Vec<f32>>> {
        let (conv, bn) = self.layer;
        let (dpre, dgamma, dbeta) =
            self.bn
                .backward(&self.stats, &self.pre, &self.gamma, &self.out, dout)?;
        add_gradient(grads, &bn.weight, dgamma)?;
        add_gradient(grads, &bn.bias, dbeta)?;
        let (dx, dwm) = self.conv.backward(x, &self.wm, &dpre, want_dx)?;
        add_gradient(grads, &conv.weight, self.conv.split(&dwm).0)?;
        Ok(dx)
    }
}

/// A level's two convolutions.
struct Level<'a> {
    first: ConvBnRelu<'a>,
    second: ConvBnRelu<'a>,
}

impl<'a> Level<'a> {
    /// Batch-normalised levels only (`UNet::gradients` checks that first).
    fn forward(block: &'a DoubleConv, x: &[f32], shape: Shape4) -> Result<Self> {
        let (Normaliser::Batch(bn1), Normaliser::Batch(bn2)) = (&block.bn1, &block.bn2) else {
            return Err(uncovered());
        };
        let first = ConvBnRelu::forward(&block.conv1, bn1, x, shape)?;
        let second = ConvBnRelu::forward(&block.conv2, bn2, &first.out, first.shape)?;
        Ok(Level { first, second })
    }

    fn out(&self) -> (&[f32], Shape4) {
        (&self.second.out, self.second.shape)
    }

    fn backward(
        &self,
        x: &[f32],
        dout: &[f32],
        want_dx: bool,
        grads: &mut GradStore,
    ) -> Result<Option<Vec<f32>>> {
        let dmid = self
            .second
            .backward(&self.first.out, dout, true, grads)?
            .ok_or_else(|| candle_core::Error::Msg("a U-Net level lost its gradient".into()))?;
        self.first.backward(x, &dmid, want_dx, grads)
    }
}

/// An encoder level's input after 2×2 max-pooling (none at the first level).
type Pooled = Option<(Pool2x2, Vec<f32>)>;

/// A decoder level: the upsampling and its weight, the concatenation it made, the level.
type Upward<'a> = (TransposedConv2x2, Vec<f32>, Vec<f32>, Level<'a>);

/// `a` (N, A, H, W) and `b` (N, B, H, W) concatenated along the channels, image by image.
fn concat(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let (ia, ib) = (a.len() / n.max(1), b.len() / n.max(1));
    let mut out = vec![0f32; a.len() + b.len()];
    out.par_chunks_mut((ia + ib).max(1))
        .zip(a.par_chunks(ia.max(1)).zip(b.par_chunks(ib.max(1))))
        .for_each(|(o, (a, b))| {
            o[..ia].copy_from_slice(a);
            o[ia..].copy_from_slice(b);
        });
    out
}

/// The adjoint of `concat`: the gradient of (N, A·plane) and the rest, image by image.
fn split_channels(d: &[f32], n: usize, first: usize) -> (Vec<f32>, Vec<f32>) {
    let image = d.len() / n.max(1);
    let (mut a, mut b) = (vec![0f32; n * first], vec![0f32; n * (image - first)]);
    a.par_chunks_mut(first.max(1))
        .zip(b.par_chunks_mut((image - first).max(1)))
        .zip(d.par_chunks(image.max(1)))
        .for_each(|((a, b), d)| {
            a.copy_from_slice(&d[..first]);
            b.copy_from_slice(&d[first..]);
        });
    (a, b)
}

/// The error of a layer that `UNet::gradients` does not differentiate (it checks first).
fn uncovered() -> candle_core::Error {
    candle_core::Error::Msg("a U-Net layer the hand-differentiated pass does not cover".into())
}

/// `sum += more`, element by element.
fn add_into(sum: &mut [f32], more: &[f32]) {
    sum.par_chunks_mut(4096)
        .zip(more.par_chunks(4096))
        .for_each(|(s, m)| s.iter_mut().zip(m).for_each(|(s, m)| *s += m));
}

impl UNet {
    /// One training step's loss (cross-entropy plus soft Dice, `consilium_core::loss::dice_ce`)
    /// and the gradient of every weight, differentiated by hand on the CPU kernels: no autograd
    /// graph, so no tensor per operation and no zero-filled gradient for each. Also updates the
    /// batch-norm running averages, as `forward_t(x, true)` does. None where it does not apply
    /// (group normalisation, resize upsampling, or other than f32 on the CPU): candle's
    /// autograd differentiates those. `x` is (N, 1, S, S), `targets` (N, S, S) classes.
    pub fn gradients(
        &self,
        x: &Tensor,
        targets: &Tensor,
        smooth: f64,
    ) -> Result<Option<(f32, GradStore)>> {
        let batch_norm = |b: &DoubleConv| {
            matches!(
                (&b.bn1, &b.bn2),
                (Normaliser::Batch(_), Normaliser::Batch(_))
            )
        };
        let covered = self.encoder.iter().all(batch_norm)
            && self
                .decoder
                .iter()
                .all(|(up, b)| matches!(up, Up::Transposed { .. }) && batch_norm(b));
        if !(covered && consilium_core::conv::cpu_kernels(x)) {
            return Ok(None);
        }
        let input = values(x)?;
        let mut shape = x.dims4()?;
        let n = shape.0;
        // Forward, keeping what the backward pass reads.
        let mut encoder: Vec<(Pooled, Level)> = Vec::new();
        for (i, block) in self.encoder.iter().enumerate() {
            let pooled = match encoder.last() {
                Some((_, below)) if i > 0 => {
                    let (out, out_shape) = below.out();
                    let pool = Pool2x2::new(out_shape, false);
                    let pooled = pool.forward(out)?;
                    shape = pool.output();
                    Some((pool, pooled))
                }
                _ => None,
            };
            let level_in = pooled
                .as_ref()
                .map_or(input.as_slice(), |(_, p)| p.as_slice());
            let level = Level::forward(block, level_in, shape)?;
            shape = level.second.shape;
            encoder.push((pooled, level));
        }
        let mut decoder: Vec<Upward> = Vec::new();
        for (j, (up, block)) in self.decoder.iter().enumerate() {
            let Up::Transposed { weight, bias } = up else {
                return Err(uncovered());
            };
            let skip = encoder
                .get(self.encoder.len().wrapping_sub(2 + j))
                .map(|(_, level)| level.out())
                .ok_or_else(|| candle_core::Error::Msg("a U-Net level without its skip".into()))?;
            let (below, below_shape) = match decoder.last() {
                Some((.., level)) => level.out(),
                None => encoder
                    .last()
                    .map(|(_, level)| level.out())
                    .ok_or_else(|| candle_core::Error::Msg("a U-Net without levels".into()))?,
            };
            let (wc, o, _, _) = weight.dims4()?;
            let op = TransposedConv2x2::new(below_shape, (wc, o))?;
            let w = values(weight)?;
            let upsampled = op.forward(below, &w, &values(bias)?)?;
            let cat = concat(skip.0, &upsampled, n);
            let (_, sc, sh, sw) = skip.1;
            let level = Level::forward(block, &cat, (n, sc + o, sh, sw))?;
            decoder.push((op, w, cat, level));
        }
        let (last, last_shape) = decoder
            .last()
            .map(|(.., level)| level.out())
            .ok_or_else(|| candle_core::Error::Msg("a U-Net needs two levels".into()))?;
        let head = Convolution::new(last_shape, self.head.weight.dims4()?, 0, 1, true)?;
        let head_bias = self
            .head
            .bias
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("the U-Net's head has no bias".into()))?;
        let head_wm = head.matrix(&values(&self.head.weight)?, Some(&values(head_bias)?))?;
        let logits = head.forward(last, &head_wm)?;
        let (_, classes, h, w) = head.output();
        let targets = targets.flatten_all()?.to_vec1::<u32>()?;
        let (loss, dlogits) =
            consilium_core::loss::dice_ce(&logits, &targets, (n, classes, h * w), smooth)?;

        // Backward, from the head down.
        let mut grads = GradStore::default();
        let (dlast, dhead) = head.backward(last, &head_wm, &dlogits, true)?;
        let (dweight, dbias) = head.split(&dhead);
        add_gradient(&mut grads, &self.head.weight, dweight)?;
        add_gradient(&mut grads, head_bias, dbias.unwrap_or_default())?;
        let missing = || candle_core::Error::Msg("a U-Net layer lost its gradient".into());
        let mut dout = dlast.ok_or_else(missing)?;
        // The gradients of the encoder's outputs that the skips pass back, deepest first.
        let mut dskips = Vec::new();
        for (j, (op, w, cat, level)) in decoder.iter().enumerate().rev() {
            let dcat = level
                .backward(cat, &dout, true, &mut grads)?
                .ok_or_else(missing)?;
            let (_, skip_shape) = encoder[self.encoder.len() - 2 - j].1.out();
            let (dskip, dup) = split_channels(&dcat, n, skip_shape.1 * skip_shape.2 * skip_shape.3);
            dskips.push(dskip);
            let below = match j.checked_sub(1) {
                Some(k) => decoder[k].3.out().0,
                None => encoder.last().map(|(_, l)| l.out().0).ok_or_else(missing)?,
            };
            let up_grads = op.backward(below, w, &dup, true)?;
            let Up::Transposed { weight, bias } = &self.decoder[j].0 else {
                return Err(uncovered());
            };
            add_gradient(&mut grads, weight, up_grads.weight)?;
            add_gradient(&mut grads, bias, up_grads.bias)?;
            dout = up_grads.input.ok_or_else(missing)?;
        }
        // dskips now run from the shallowest level's skip to the deepest's.
        for (i, (pooled, level)) in encoder.iter().enumerate().rev() {
            if i + 1 < encoder.len() {
                let dskip = dskips.get(i).ok_or_else(missing)?;
                add_into(&mut dout, dskip);
            }
            let level_in = match (pooled, i.checked_sub(1)) {
                (Some((_, p)), _) => p.as_slice(),
                _ => input.as_slice(),
            };
            let dx = level.backward(level_in, &dout, i > 0, &mut grads)?;
            if let (Some((pool, p)), Some(below)) = (pooled, i.checked_sub(1)) {
                let below_out = encoder[below].1.out().0;
                dout = pool.backward(below_out, p, &dx.ok_or_else(missing)?)?;
            }
        }
        Ok(Some((loss, grads)))
    }
}

pub enum Model {
    SmallCnn(SmallCnn),
    ResNet(ResNet),
    UNet(UNet),
}

impl ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Model::SmallCnn(m) => m.forward_t(xs, train),
            Model::ResNet(m) => m.forward_t(xs, train),
            Model::UNet(m) => m.forward_t(xs, train),
        }
    }
}

/// Builds the model a plan names (its configuration already checked by the plan's parser).
pub fn build(
    config: &ModelConfig,
    classes: usize,
    size: usize,
    vb: VarBuilder,
) -> std::result::Result<Model, crate::train::TrainError> {
    Ok(match config {
        ModelConfig::SmallCnn(hp) => {
            Model::SmallCnn(SmallCnn::new(vb, size, classes, hp.channels)?)
        }
        ModelConfig::ResNet(hp) => Model::ResNet(ResNet::new(vb, &hp.widths, hp.norm, classes)?),
        ModelConfig::UNet(hp) => Model::UNet(UNet::new(vb, hp, classes)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn resnet(norm: Norm) -> (VarMap, ResNet) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = ResNet::new(vb, &[4, 8], norm, 2).unwrap();
        (varmap, net)
    }

    /// Deterministic values in [-1, 1) (candle's own random tensors are not seeded).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::train::Rng::new(seed);
        (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect()
    }

    #[test]
    fn transposed_convolution_matches_candles() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(values(2 * 3 * 4 * 5, 1), (2, 3, 4, 5), &dev).unwrap();
        let w = Tensor::from_vec(values(3 * 6 * 2 * 2, 2), (3, 6, 2, 2), &dev).unwrap();
        let b = Tensor::from_vec(values(6, 3), 6, &dev).unwrap();
        let ours = consilium_core::conv::transposed_conv2x2(&x, &w, &b).unwrap();
        let reference = x
            .conv_transpose2d(&w, 0, 0, 2, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), &[2, 6, 8, 10]);
        let diff = (ours - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    /// The U-Net's gradients (the fast convolution and pooling kernels, batch normalisation,
    /// the transposed convolution, the skip concatenation) against central differences of its
    /// loss, for both kinds of upsampling.
    #[test]
    fn unet_gradients_match_finite_differences() {
        for upsampling in [Upsampling::Transposed, Upsampling::Resize] {
            let dev = Device::Cpu;
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let hp = UNetParams {
                widths: vec![3, 4],
                norm: Norm::Group,
                upsampling,
            };
            let net = UNet::new(vb, &hp, 2).unwrap();
            let mut vars: Vec<(String, Var)> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (_, v)) in vars.iter().enumerate() {
                let t = Tensor::from_vec(values(v.elem_count(), 10 + i as u64), v.shape(), &dev)
                    .unwrap();
                v.set(&t).unwrap();
            }
            let x = Tensor::from_vec(values(2 * 8 * 8, 99), (2, 1, 8, 8), &dev).unwrap();
            let target = Tensor::from_vec(values(2 * 2 * 8 * 8, 7), (2, 2, 8, 8), &dev).unwrap();
            // A smooth loss of every output: Σ out · target.
            let loss = |net: &UNet| {
                (net.forward_t(&x, true).unwrap() * &target)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let grads = loss(&net).backward().unwrap();
            let mut checked = 0;
            for (name, var) in &vars {
                let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
                let grad = grad.to_vec1::<f32>().unwrap();
                let base = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for k in [0, base.len() / 2, base.len() - 1] {
                    let at = |delta: f32| {
                        let mut v = base.clone();
                        v[k] += delta;
                        var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                            .unwrap();
                        f64::from(loss(&net).to_scalar::<f32>().unwrap())
                    };
                    let eps = 1e-3;
                    let numeric = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev).unwrap())
                        .unwrap();
                    let analytic = f64::from(grad[k]);
                    assert!(
                        (numeric - analytic).abs() <= 2e-2 * (1.0 + analytic.abs()),
                        "{upsampling:?} {name}[{k}]: numeric {numeric}, autograd {analytic}"
                    );
                    checked += 1;
                }
            }
            assert!(checked >= 3 * 20, "{checked}");
        }
    }

    #[test]
    fn unet_outputs_a_score_per_class_and_pixel() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = UNet::new(vb, &UNetParams::default(), 3).unwrap();
        let x = Tensor::zeros((2, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[2, 3, 16, 16]);
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        for n in [
            "enc2.conv1.weight",
            "up1.weight",
            "up0.bias",
            "dec0.bn2.running_mean",
            "head.weight",
        ] {
            assert!(names.iter().any(|m| m == n), "{n}: {names:?}");
        }
    }

    /// What DP-SGD's per-patient clipping rests on: with group normalisation an image's output
    /// is the same alone as beside other patients' images, and the model keeps no statistics;
    /// batch normalisation mixes the batch and keeps running averages of it.
    #[test]
    fn group_norm_keeps_each_image_to_itself() {
        let images = Tensor::randn(0f32, 1.0, (4, 1, 16, 16), &Device::Cpu).unwrap();
        let alone = |net: &ResNet| {
            let one = net
                .forward_t(&images.narrow(0, 0, 1).unwrap(), true)
                .unwrap();
            let all = net
                .forward_t(&images, true)
                .unwrap()
                .narrow(0, 0, 1)
                .unwrap();
            (one - all)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let (vars, group) = resnet(Norm::Group);
        assert!(alone(&group) < 1e-5);
        let names: Vec<String> = vars.data().lock().unwrap().keys().cloned().collect();
        assert!(names.iter().all(|n| !n.contains("running")), "{names:?}");
        assert!(
            names.iter().any(|n| n == "layer1.gn_down.weight"),
            "{names:?}"
        );
        let (vars, batch) = resnet(Norm::Batch);
        assert!(alone(&batch) > 1e-3);
        let data = vars.data().lock().unwrap();
        assert!(data.keys().any(|n| n.ends_with("running_mean")));
    }
}
