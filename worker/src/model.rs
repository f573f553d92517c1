//! The models a training plan can name, as candle-nn modules: `small_cnn` and `resnet`.

use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Conv2dConfig, Init, Linear, VarBuilder, linear};
use consilium_core::plan::ModelConfig;

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
        let channels = stats.mean.len();
        let dev = xs.device();
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
        blend(&self.running_var, var, unbiased)?;
        Ok(ys)
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
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    shortcut: Option<(Conv2d, BatchNorm)>,
}

impl BasicBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, stride: usize) -> Result<Self> {
        let c3 = |stride| Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let conv1 = conv2d_no_bias(cin, cout, 3, c3(stride), vb.pp("conv1"))?;
        let bn1 = batch_norm(cout, 1e-5, vb.pp("bn1"))?;
        let conv2 = conv2d_no_bias(cout, cout, 3, c3(1), vb.pp("conv2"))?;
        let bn2 = batch_norm(cout, 1e-5, vb.pp("bn2"))?;
        let shortcut = if stride != 1 || cin != cout {
            let cfg = Conv2dConfig {
                stride,
                ..Default::default()
            };
            Some((
                conv2d_no_bias(cin, cout, 1, cfg, vb.pp("down"))?,
                batch_norm(cout, 1e-5, vb.pp("bn_down"))?,
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
/// resolution), global average pooling, a linear classifier.
pub struct ResNet {
    stem: Conv2d,
    bn: BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl ResNet {
    pub fn new(vb: VarBuilder, widths: &[usize], classes: usize) -> Result<Self> {
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
        let bn = batch_norm(first, 1e-5, vb.pp("bn_stem"))?;
        let mut blocks = Vec::new();
        let mut cin = first;
        for (i, &w) in widths.iter().enumerate() {
            blocks.push(BasicBlock::new(
                vb.pp(format!("layer{i}")),
                cin,
                w,
                if i == 0 { 1 } else { 2 },
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

pub enum Model {
    SmallCnn(SmallCnn),
    ResNet(ResNet),
}

impl ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Model::SmallCnn(m) => m.forward_t(xs, train),
            Model::ResNet(m) => m.forward_t(xs, train),
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
        ModelConfig::ResNet(hp) => Model::ResNet(ResNet::new(vb, &hp.widths, classes)?),
    })
}
