//! The training plan as the worker and the engine run it: every setting of the manifest
//! parsed into what it means ("parse, don't validate").
//!
//! The manifest (`crate::manifest`) is the wire form a committee approves and hashes; it stays
//! as it was written, so that a plan's hash never changes. [`TrainingPlanManifest::parse`]
//! turns it into a [`Plan`], or into the list of every problem it has, in words. A setting the
//! plan accepts has an effect; one that nothing would execute (an unknown name, a parameter a
//! strategy does not take, a feature not built yet) is a problem, refused at submission.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::aggregate::Strategy;
use crate::manifest::{AggregationSpec, ModelSpec, TrainingPlanManifest};

/// The image side when a plan names none: `small_cnn`'s (`resnet`'s is 32).
pub const DEFAULT_IMAGE_SIZE: usize = 28;

/// The most rounds a plan may ask for.
pub const MAX_ROUNDS: u32 = 10_000;
/// The most local epochs per round.
pub const MAX_LOCAL_EPOCHS: u32 = 1_000;
/// The largest batch.
pub const MAX_BATCH_SIZE: u32 = 4_096;
/// The largest image side, in pixels.
pub const MAX_IMAGE_SIZE: u32 = 1_024;
/// The most output classes.
pub const MAX_CLASSES: u32 = 1_000;
/// The widest layer of a model, in channels.
pub const MAX_CHANNELS: usize = 1_024;

/// Every setting a plan may have and its choices, for people writing one (the portal shows it).
pub const CHOICES: &[(&str, &str)] = &[
    (
        "model.architecture",
        "small_cnn, resnet (classifiers), unet (segmentation of image + mask pairs)",
    ),
    ("model.num_classes", "2 to 1000"),
    ("model.initialisation", "kaiming, pytorch (kaiming)"),
    (
        "model.hyper_parameters",
        "small_cnn: channels (two counts, [32, 64]); resnet: widths (one to eight counts, [16, 32, 64]), norm (batch or group, batch); unet: widths (two to six counts, [16, 32, 64]), norm (batch or group, batch), upsampling (transposed or resize, transposed)",
    ),
    (
        "model.labels",
        "unet only, and required: mask value → class name, as many as num_classes; the lowest value is the background",
    ),
    (
        "preprocessing.image_size",
        "8 to 1024 pixels (28 for small_cnn, a multiple of 4; 32 for resnet; 64 for unet, a multiple of 2 for each width after the first)",
    ),
    (
        "preprocessing.normalisation",
        "zscore, minmax, dataset, none (none)",
    ),
    (
        "preprocessing.mean, preprocessing.std",
        "with dataset: the pixel mean and standard deviation (above 0), both or neither (each site's own)",
    ),
    ("preprocessing.augmentations", "flip, rotate (±15°)"),
    (
        "preprocessing.amplitude_normalisation.band",
        "0 to 0.5 (0.1): HarmoFL's low band of the spectrum set to the sites' mean; fedavg, fedbn, fednova, scaffold or fedcostwavg; not with privacy settings",
    ),
    ("optimiser.name", "sgd, adamw"),
    ("optimiser.learning_rate", "above 0"),
    ("optimiser.momentum", "0 to below 1, sgd only"),
    ("optimiser.weight_decay", "0 or more (sgd 0, adamw 0.01)"),
    (
        "optimiser.proximal_mu",
        "0 or more: FedProx's proximal term",
    ),
    ("local_epochs", "1 to 1000"),
    ("batch_size", "1 to 4096"),
    ("rounds", "1 to 10000"),
    (
        "aggregation.strategy",
        "fedavg, fedadam, fedyogi, fedbn, fednova (sgd), scaffold (sgd), fedcostwavg, median, trimmed_mean, krum, multi_krum, bulyan, dos",
    ),
    (
        "aggregation.parameters",
        "fedadam, fedyogi: lr, beta1, beta2, tau; fedcostwavg: alpha; trimmed_mean: beta; krum, bulyan: f; multi_krum: f, m; dos: temperature; others none",
    ),
    (
        "aggregation.local_fit_epochs",
        "1 to 100, with local_layers: epochs that fit the layers kept at each site to the incoming shared ones before the whole model trains and before a version is scored; not with dp_sgd",
    ),
    (
        "aggregation.ditto.lambda",
        "0 to 10000: Ditto, each site's own model pulled towards the global one; not with local_layers, fedbn or dp_sgd",
    ),
    (
        "aggregation.fine_tune_epochs",
        "1 to 100: a site scoring a version first fine-tunes a copy of it on its own training split; not with local_layers, ditto or dp_sgd",
    ),
    (
        "aggregation.fine_tune_layers",
        "the model's layers, with fine_tune_epochs: the layers the fine-tuning trains (every layer)",
    ),
    ("aggregation.min_sites", "1 or more (every site)"),
    (
        "stopping.target_metric",
        "accuracy, auroc (classifiers), dice (unet), loss (with target_value)",
    ),
    ("stopping.patience", "1 or more rounds"),
    ("privacy.clip_norm", "above 0"),
    ("privacy.noise_multiplier", "0 or more, with clip_norm"),
    (
        "privacy.secure_aggregation",
        "true or false; with fedavg (FedProx's proximal_mu too), fedadam or fedyogi",
    ),
    (
        "privacy.secagg",
        "clip (above 0, default 1), threshold (above 0.5 and below 1, default a majority), neighbours (even, 2 to 254, default 20), stage_seconds (5 to 3600, default 60); with secure_aggregation",
    ),
    (
        "privacy.dp_sgd",
        "epsilon (above 0), delta (0 to 0.001), max_grad_norm (above 0), noise_multiplier (optional, above 0); small_cnn, or resnet with norm = group; not with clip_norm",
    ),
    ("seed", "any whole number"),
];

/// The model architectures a worker builds, with their hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// Two 3×3 convolutions (each + ReLU + 2×2 max-pool) and a linear classifier.
    SmallCnn(SmallCnnParams),
    /// A small residual network: a stem, then one basic block per width (stride 2 after the
    /// first), global average pooling and a linear classifier.
    ResNet(ResNetParams),
    /// A 2-D U-Net (Ronneberger et al. 2015) for segmentation: per width a block of two 3×3
    /// convolutions (each normalised, ReLU), 2×2 max-pooling between them on the way down,
    /// on the way up an upsampling and a block over the concatenated skip connection, and a
    /// 1×1 convolution to a score per class and pixel.
    UNet(UNetParams),
}

impl ModelConfig {
    /// The model's layers by the names its weights start with (`<layer>.<tensor>`), in order:
    /// what `aggregation.local_layers` may name.
    pub fn layers(&self) -> Vec<String> {
        match self {
            ModelConfig::SmallCnn(_) => ["conv1", "conv2", "fc"].map(String::from).to_vec(),
            ModelConfig::ResNet(r) => {
                let mut l = vec!["stem".to_string(), "bn_stem".to_string()];
                l.extend((0..r.widths.len()).map(|i| format!("layer{i}")));
                l.push("fc".into());
                l
            }
            ModelConfig::UNet(u) => {
                let depth = u.widths.len();
                let mut l: Vec<String> = (0..depth).map(|i| format!("enc{i}")).collect();
                for i in (0..depth - 1).rev() {
                    l.push(format!("up{i}"));
                    l.push(format!("dec{i}"));
                }
                l.push("head".into());
                l
            }
        }
    }

    /// Whether it labels every pixel (segmentation) rather than the image.
    pub fn segments(&self) -> bool {
        matches!(self, ModelConfig::UNet(_))
    }

    /// Whether the model has batch normalisation (running averages, FedBN's local values).
    pub fn has_batch_norm(&self) -> bool {
        matches!(
            self,
            ModelConfig::ResNet(ResNetParams {
                norm: Norm::Batch,
                ..
            }) | ModelConfig::UNet(UNetParams {
                norm: Norm::Batch,
                ..
            })
        )
    }

    /// Whether DP-SGD can train it: every value it keeps comes from the noised gradients.
    pub fn private_training(&self) -> bool {
        !self.has_batch_norm()
    }
}

/// `model.hyper_parameters` of `small_cnn`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SmallCnnParams {
    /// Output channels of the two convolutions (default `[32, 64]`).
    #[serde(default = "SmallCnnParams::default_channels")]
    pub channels: [usize; 2],
}

impl SmallCnnParams {
    fn default_channels() -> [usize; 2] {
        [32, 64]
    }
}

impl Default for SmallCnnParams {
    fn default() -> Self {
        SmallCnnParams {
            channels: Self::default_channels(),
        }
    }
}

/// `model.hyper_parameters` of `resnet`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResNetParams {
    /// Channels of each stage (default `[16, 32, 64]`; one to eight stages).
    #[serde(default = "ResNetParams::default_widths")]
    pub widths: Vec<usize>,
    /// How activations are normalised after each convolution (default `batch`).
    #[serde(default)]
    pub norm: Norm,
}

/// `model.hyper_parameters.norm` of `resnet`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// Batch normalisation: by the statistics of the batch in training, of running averages
    /// (kept from the training batches) in evaluation.
    #[default]
    Batch,
    /// Group normalisation (Wu and He 2018), as Opacus puts in place of batch normalisation
    /// for DP-SGD: each image is normalised on its own over groups of channels
    /// (`Norm::groups`), with no running averages, so no patient's statistics mix with
    /// another's or leave the site outside the noised gradients.
    Group,
}

impl Norm {
    /// The number of groups of a `channels`-wide group normalisation: gcd(channels, 32),
    /// Opacus's min(32, channels) wherever that divides the channels.
    pub fn groups(channels: usize) -> usize {
        let (mut a, mut b) = (channels.max(1), 32);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
}

impl ResNetParams {
    fn default_widths() -> Vec<usize> {
        vec![16, 32, 64]
    }
}

impl Default for ResNetParams {
    fn default() -> Self {
        ResNetParams {
            widths: Self::default_widths(),
            norm: Norm::Batch,
        }
    }
}

/// `model.hyper_parameters` of `unet`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UNetParams {
    /// Channels at each resolution, full resolution first (default `[16, 32, 64]`; two to
    /// six, so one to five halvings).
    #[serde(default = "UNetParams::default_widths")]
    pub widths: Vec<usize>,
    /// How activations are normalised after each convolution (default `batch`).
    #[serde(default)]
    pub norm: Norm,
    /// How the decoder doubles the resolution (default `transposed`).
    #[serde(default)]
    pub upsampling: Upsampling,
}

impl UNetParams {
    fn default_widths() -> Vec<usize> {
        vec![16, 32, 64]
    }

    /// How many times the encoder halves the image (and the decoder doubles it back).
    pub fn halvings(&self) -> usize {
        self.widths.len().saturating_sub(1)
    }
}

impl Default for UNetParams {
    fn default() -> Self {
        UNetParams {
            widths: Self::default_widths(),
            norm: Norm::Batch,
            upsampling: Upsampling::Transposed,
        }
    }
}

/// `model.hyper_parameters.upsampling` of `unet`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Upsampling {
    /// A 2×2 transposed convolution with stride 2 (learned upsampling).
    #[default]
    Transposed,
    /// Nearest-neighbour doubling, then a 3×3 convolution (no checkerboard artefacts).
    Resize,
}

/// What a segmentation plan's mask values mean (`model.labels`): the values in ascending
/// order are the classes 0, 1, …, the first the background.
#[derive(Clone, Debug, PartialEq)]
pub struct Segmentation {
    /// The mask values, ascending.
    pub values: Vec<u16>,
    /// Each class's name, in the same order.
    pub names: Vec<String>,
}

impl Segmentation {
    /// The class of a mask value, if the plan names it.
    pub fn class_of(&self, value: u16) -> Option<u8> {
        self.values
            .binary_search(&value)
            .ok()
            .and_then(|i| u8::try_from(i).ok())
    }
}

/// The largest number of classes a segmentation plan may name (a class is a byte per pixel).
pub const MAX_SEGMENTATION_CLASSES: usize = 255;

/// The choices of `model.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    SmallCnn,
    Resnet,
    Unet,
}

/// The choices of `preprocessing.normalisation`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Normalisation {
    /// Pixel values as read (in [0, 1]); also what an absent setting means.
    #[default]
    None,
    /// Each image to mean 0 and standard deviation 1.
    Zscore,
    /// Each image stretched to [0, 1] (its darkest pixel 0, its brightest 1).
    Minmax,
    /// Every image by one mean and standard deviation, as PyTorch recipes normalise: the plan's
    /// (`preprocessing.mean`, `std`), or those of the site's own training split.
    Dataset,
}

/// The choices of `model.initialisation`: how the seeded initial weights are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Initialisation {
    /// Kaiming (He) uniform weights, U(±√(6/fan_in)), and zero biases.
    #[default]
    Kaiming,
    /// PyTorch's defaults for `Conv2d` and `Linear`: Kaiming uniform with a = √5, i.e. weights
    /// U(±1/√fan_in), and biases U(±1/√fan_in), so that a recipe from PyTorch starts alike.
    Pytorch,
}

/// HarmoFL's amplitude normalisation (Jiang et al. 2022): every image's amplitudes at
/// frequencies up to `⌊image_size · band⌋` in both directions are the sites' mean spectrum's,
/// its phase its own. The mean spectrum travels with the model (`amp_norm.running_amplitude`):
/// each site's training split's in its first job, averaged by the server like running
/// batch-norm statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AmplitudeNormalisation {
    pub band: f32,
}

/// The default low band of amplitude normalisation (the fraction of the image side).
pub const AMPLITUDE_BAND: f64 = 0.1;

/// The pixel mean and standard deviation `Normalisation::Dataset` uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Statistics {
    pub mean: f32,
    pub std: f32,
}

/// The choices of `preprocessing.augmentations` (applied to training batches only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Augmentation {
    /// A left-right mirror of half of the images.
    Flip,
    /// A rotation of each image by an angle drawn uniformly from ±15°.
    Rotate,
}

/// The largest rotation `Augmentation::Rotate` applies, in degrees.
pub const ROTATE_DEGREES: f32 = 15.0;

/// The local optimiser.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimiser {
    /// SGD with heavy-ball momentum and L2 weight decay (PyTorch's `torch.optim.SGD`).
    Sgd {
        learning_rate: f64,
        momentum: f64,
        weight_decay: f64,
    },
    /// AdamW with decoupled weight decay (default 0.01).
    AdamW {
        learning_rate: f64,
        weight_decay: f64,
    },
}

impl Optimiser {
    pub fn learning_rate(&self) -> f64 {
        match self {
            Optimiser::Sgd { learning_rate, .. } | Optimiser::AdamW { learning_rate, .. } => {
                *learning_rate
            }
        }
    }
}

/// The choices of `optimiser.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OptimiserName {
    Sgd,
    Adamw,
}

/// The choices of `aggregation.strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StrategyName {
    /// Sample-weighted mean. No parameters.
    Fedavg,
    /// FedAvg with a server Adam step. Parameters `lr` (0.01), `beta1` (0.9), `beta2` (0.99),
    /// `tau` (0.001).
    Fedadam,
    /// FedAvg with a server Yogi step. Parameters as FedAdam.
    Fedyogi,
    /// FedAvg except batch-norm parameters, which stay at each site. No parameters.
    Fedbn,
    /// Normalised averaging: each site's change divided by its local SGD steps. No
    /// parameters; needs optimiser `sgd` and no DP-SGD.
    Fednova,
    /// Stochastic controlled averaging: each site corrects its gradients by the server's
    /// control variate less its own. No parameters; needs optimiser `sgd` and no DP-SGD.
    Scaffold,
    /// Weighted by data size and loss improvement. Parameter `alpha` in [0, 1] (0.5).
    Fedcostwavg,
    /// Coordinate-wise median. No parameters.
    Median,
    /// Coordinate-wise mean without the `beta` fraction (0.1, below 0.5) of extremes per side.
    TrimmedMean,
    /// The one update closest to its neighbours, tolerating `f` (1) bad sites.
    Krum,
    /// The sample-weighted mean of the `m` (`n - f`) updates Krum scores best, `f` (1).
    MultiKrum,
    /// Krum's choice of `n - 2f` updates, then per coordinate the mean of the `n - 4f`
    /// closest to their median; `f` (1), at least `4f + 3` sites.
    Bulyan,
    /// Distance-based outlier suppression: COPOD scores of the distances between the
    /// updates, weights by the softmax of the negative scores over `temperature` (1).
    Dos,
}

/// The choices of `stopping.target_metric` (of the global model at the sites' holdout data).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TargetMetric {
    Accuracy,
    Auroc,
    /// Mean Dice over the foreground classes (segmentation plans).
    Dice,
    /// The training loss (cross-entropy; with soft Dice for segmentation): the target is
    /// reached at or below the value.
    Loss,
}

impl TargetMetric {
    pub fn name(self) -> &'static str {
        match self {
            TargetMetric::Accuracy => "accuracy",
            TargetMetric::Auroc => "auroc",
            TargetMetric::Dice => "dice",
            TargetMetric::Loss => "loss",
        }
    }
}

/// When a run stops before its last round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stopping {
    /// The metric that decides (the target's, else accuracy for `patience`).
    pub metric: TargetMetric,
    /// Stop once the global model reaches this value of `metric`.
    pub target: Option<f64>,
    /// Stop after this many rounds without improvement of `metric`.
    pub patience: Option<u32>,
}

/// What a site does to its update before it leaves (the plan's `privacy`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateClipping {
    /// The update's L2 norm is clipped to this.
    pub clip_norm: f64,
    /// Gaussian noise of `noise_multiplier × clip_norm` per coordinate, after clipping.
    pub noise_multiplier: f64,
}

/// DP-SGD at every site (the plan's `privacy.dp_sgd`): the approved per-patient budget and
/// how each step is protected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSgd {
    /// ε per patient over the whole run, at `delta` (the tighter conversion).
    pub epsilon: f64,
    pub delta: f64,
    /// C: each patient's gradient is clipped to this L2 norm.
    pub max_grad_norm: f64,
    /// σ fixed by the plan; `None`: each site derives it from its patient count.
    pub noise_multiplier: Option<f64>,
}

/// Secure aggregation as the plan sets it (`privacy.secure_aggregation`, `privacy.secagg`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SecureAggregation {
    /// Each value of a site's change is clipped to ±`clip` before it is quantised.
    pub clip: f32,
    /// The fraction of the holders of a site's shares (its neighbours and itself) whose shares
    /// rebuild its secrets (`None`: a majority).
    pub threshold: Option<f64>,
    /// k: each site's neighbours in a round of more than k + 1 sites.
    pub neighbours: usize,
    /// How long each exchange after the first waits for the sites.
    pub stage_seconds: u32,
}

/// The fewest sites a secure round can sum: with two, each would learn the other's update
/// from the sum and its own.
pub const SECAGG_MIN_SITES: usize = 3;

impl SecureAggregation {
    /// Each site's neighbours in a round of `sites`.
    pub fn degree(&self, sites: usize) -> usize {
        self.neighbours.min(sites.saturating_sub(1))
    }

    /// t: the shares that rebuild a secret of a site with `k` neighbours, of the k + 1 that
    /// it and its neighbours hold (more than half of them, at least 2).
    pub fn threshold_of(&self, k: usize) -> usize {
        let holders = k + 1;
        let t = match self.threshold {
            Some(f) => (f * holders as f64).ceil() as usize,
            None => holders / 2 + 1,
        };
        t.max(holders / 2 + 1).clamp(2, holders)
    }

    /// The fixed-point step of a round of `sites` whose sites each add Gaussian noise of
    /// standard deviation `noise_per_site`: the sum of the weighted changes (within ±clip,
    /// weights summing to 1) and of every site's noise (kept within 8 standard deviations)
    /// stays inside ±2^31 steps, so the sum modulo 2^32 is exact.
    pub fn step(&self, noise_per_site: f64, sites: usize) -> f64 {
        (f64::from(self.clip) + 8.0 * noise_per_site * (sites as f64).sqrt())
            / f64::from(1u32 << 30)
    }
}

/// δ above this is refused: δ is the chance that the guarantee fails outright, and it must stay
/// far below one patient in a site's population.
pub const MAX_DELTA: f64 = 1e-3;

/// A training plan every worker can run, as parsed from its manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub model: ModelConfig,
    pub initialisation: Initialisation,
    pub num_classes: usize,
    /// The mask values' classes, for a segmentation model (and only then).
    pub segmentation: Option<Segmentation>,
    /// The square side images are resized to.
    pub image_size: usize,
    pub normalisation: Normalisation,
    /// `Normalisation::Dataset`'s mean and standard deviation: the plan's, or none until the
    /// site fills in its training split's (`Plan::with_statistics`).
    pub statistics: Option<Statistics>,
    pub augmentations: Vec<Augmentation>,
    /// HarmoFL's amplitude normalisation, when the plan asks for it.
    pub amplitude: Option<AmplitudeNormalisation>,
    pub optimiser: Optimiser,
    /// FedProx's proximal term μ (0: plain local training).
    pub proximal_mu: f64,
    pub local_epochs: u32,
    pub batch_size: usize,
    pub rounds: u32,
    pub strategy: Strategy,
    /// Partial sharing (FLOP, Yang et al. 2021): the layers that stay at each site, trained
    /// there and never sent; the server aggregates the rest.
    pub local_layers: Vec<String>,
    /// Epochs in which each round first trains only `local_layers`, on the round's incoming
    /// shared layers, before the whole model trains (0: none; FedRep's order, Collins et al.
    /// 2021), so that a site's own layers fit the shared ones they will be used with.
    pub local_fit_epochs: u32,
    /// Ditto's λ (Li et al. 2021): each site's own model, pulled towards the global one by
    /// `λ/2 · ‖v − w‖²`, trained beside it and kept at the site.
    pub ditto: Option<f64>,
    /// Personalisation by local fine-tuning (FedAvg + FT; Wang et al. 2019): epochs in which a
    /// site scoring a version first trains a copy of it (`fine_tune_layers`) on its own training split
    /// (0: none). The copy is scored and dropped; training jobs are unchanged.
    pub fine_tune_epochs: u32,
    /// The layers the fine-tuning trains (empty: every layer).
    pub fine_tune_layers: Vec<String>,
    /// Updates a round needs (the study's site count when the plan does not say).
    pub min_sites: Option<u32>,
    pub stopping: Stopping,
    pub clipping: Option<UpdateClipping>,
    pub dp_sgd: Option<DpSgd>,
    /// Secure aggregation (SecAgg+): the server sees only the sum of the sites' masked changes.
    pub secure_aggregation: Option<SecureAggregation>,
    pub seed: u64,
}

/// Whether the weight `name` (`conv1.weight`, `layer0.bn1.running_mean`, …) belongs to one of
/// the model's `layers`.
fn in_layers(layers: &[String], name: &str) -> bool {
    layers.iter().any(|l| {
        name.strip_prefix(l.as_str())
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

impl Plan {
    /// FedNova's effective local steps of a site with `samples` training images: every epoch
    /// takes `⌈samples / batch_size⌉` steps (the last batch may be short), weighted by the
    /// optimiser as `aggregate::fednova_steps` says.
    pub fn fednova_steps(&self, samples: u64) -> f64 {
        let batch = self.batch_size.max(1) as u64;
        let steps = u64::from(self.local_epochs) * samples.div_ceil(batch);
        let (momentum, lr) = match self.optimiser {
            Optimiser::Sgd {
                learning_rate,
                momentum,
                ..
            } => (momentum, learning_rate),
            Optimiser::AdamW { learning_rate, .. } => (0.0, learning_rate),
        };
        crate::aggregate::fednova_steps(steps, momentum, lr * self.proximal_mu)
    }

    /// Whether the weight `name` belongs to a layer that stays at the site.
    pub fn is_local(&self, name: &str) -> bool {
        in_layers(&self.local_layers, name)
    }

    /// Whether fine-tuning (`fine_tune_epochs`) trains the weight `name`.
    pub fn is_fine_tuned(&self, name: &str) -> bool {
        self.fine_tune_layers.is_empty() || in_layers(&self.fine_tune_layers, name)
    }

    pub fn has(&self, a: Augmentation) -> bool {
        self.augmentations.contains(&a)
    }

    /// The plan with `Normalisation::Dataset`'s statistics filled in from `pixels` (the site's
    /// training images) where the plan does not fix them; unchanged otherwise.
    pub fn with_statistics<'a>(&self, images: impl Iterator<Item = &'a [f32]>) -> Plan {
        if self.normalisation != Normalisation::Dataset || self.statistics.is_some() {
            return self.clone();
        }
        let (mut n, mut sum, mut squares) = (0f64, 0f64, 0f64);
        for img in images {
            for &v in img {
                n += 1.0;
                sum += f64::from(v);
                squares += f64::from(v) * f64::from(v);
            }
        }
        let mean = if n > 0.0 { sum / n } else { 0.0 };
        let var = if n > 0.0 {
            (squares / n - mean * mean).max(0.0)
        } else {
            1.0
        };
        Plan {
            statistics: Some(Statistics {
                mean: mean as f32,
                std: var.sqrt().max(1e-6) as f32,
            }),
            ..self.clone()
        }
    }

    /// What one round of this plan's DP-SGD costs a site whose training split holds
    /// `patients` patients: the batch size over the patients is each patient's chance of being
    /// in a step, an epoch is patients / batch steps, and σ (unless the plan fixes it) is the
    /// smallest that keeps every round of the run within the approved ε. The site trains by it
    /// and the server reserves it in the dataset's ledger before the job goes out: both compute
    /// it here, so a difference is a site that did something else.
    pub fn dp_round(&self, dp: &DpSgd, patients: u64) -> Result<DpRound, DpRoundError> {
        let epochs = u64::from(self.local_epochs.max(1));
        dp_schedule(
            dp,
            patients,
            self.batch_size.max(1) as u64,
            |batch| epochs * patients.div_ceil(batch),
            u64::from(self.rounds.max(1)),
        )
    }
}

/// DP-SGD over `patients` patients with an expected `batch` patients per step: the sampling
/// rate, the steps of one release (`steps(batch)`), σ (the plan's, or the smallest that keeps
/// `releases` such releases within `dp.epsilon`) and the Rényi cost of one release.
pub fn dp_schedule(
    dp: &DpSgd,
    patients: u64,
    batch: u64,
    steps: impl Fn(u64) -> u64,
    releases: u64,
) -> Result<DpRound, DpRoundError> {
    if patients == 0 {
        return Err(DpRoundError::NoPatients);
    }
    if dp.delta >= 1.0 / patients as f64 {
        return Err(DpRoundError::DeltaTooLarge {
            delta: dp.delta,
            patients,
        });
    }
    let batch = batch.max(1);
    let sampling_rate = (batch as f64 / patients as f64).min(1.0);
    let steps = steps(batch);
    let orders = crate::privacy::default_orders();
    let noise_multiplier = match dp.noise_multiplier {
        Some(s) => s,
        None => crate::privacy::noise_for(
            sampling_rate,
            steps * releases.max(1),
            dp.epsilon,
            dp.delta,
            &orders,
        )?,
    };
    let rdp =
        crate::privacy::RdpCost::sampled_gaussian(sampling_rate, noise_multiplier, steps, &orders)?;
    Ok(DpRound {
        patients,
        sampling_rate,
        noise_multiplier,
        steps,
        rdp,
    })
}

/// One round of DP-SGD at one site, as [`Plan::dp_round`] works it out.
#[derive(Clone, Debug, PartialEq)]
pub struct DpRound {
    pub patients: u64,
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    pub steps: u64,
    pub rdp: crate::privacy::RdpCost,
}

/// Why a site cannot train a round of the plan's DP-SGD.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpRoundError {
    #[error("there are no training samples at this site")]
    NoPatients,
    #[error(
        "δ = {delta} is not below 1 / {patients} (this site's patients): a δ that large allows a mechanism that releases one patient's data outright; a smaller δ is needed"
    )]
    DeltaTooLarge { delta: f64, patients: u64 },
    #[error(transparent)]
    Cost(#[from] crate::privacy::PrivacyError),
}

/// Collects problems while the manifest is parsed.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, p: impl Into<String>) {
        self.0.push(p.into());
    }

    /// A name parsed into one of its choices, or a problem naming them all.
    fn choice<T: for<'de> Deserialize<'de>>(
        &mut self,
        field: &str,
        value: &str,
        choices: &str,
    ) -> Option<T> {
        match serde_json::from_value(serde_json::Value::String(value.to_string())) {
            Ok(v) => Some(v),
            Err(_) => {
                self.push(format!("{field} must be {choices}, not {value:?}"));
                None
            }
        }
    }

    fn number(&mut self, field: &str, v: Option<f64>, ok: impl Fn(f64) -> bool, what: &str) {
        if let Some(v) = v
            && !(v.is_finite() && ok(v))
        {
            self.push(format!("{field} must be {what}, not {v}"));
        }
    }
}

impl TrainingPlanManifest {
    /// The plan, or every reason no worker could run it, in words.
    pub fn parse(&self) -> Result<Plan, Vec<String>> {
        let mut p = Problems::default();
        if serde_json::to_value(self).is_ok_and(|v| has_control_text(&v)) {
            p.push("the manifest's text must not contain control characters");
        }
        let model = parse_model(&self.model, &mut p);
        let initialisation = match self.model.initialisation.as_deref() {
            None => Some(Initialisation::Kaiming),
            Some(i) => p.choice("model.initialisation", i, "\"kaiming\" or \"pytorch\""),
        };
        let num_classes = self.model.num_classes;
        if !(2..=MAX_CLASSES).contains(&num_classes) {
            p.push(format!(
                "model.num_classes must be between 2 and {MAX_CLASSES}, not {num_classes}"
            ));
        }
        let pre = &self.preprocessing;
        let image_size = pre.image_size.unwrap_or(match model {
            Some(ModelConfig::ResNet(_)) => 32,
            Some(ModelConfig::UNet(_)) => 64,
            _ => DEFAULT_IMAGE_SIZE as u32,
        });
        if !(8..=MAX_IMAGE_SIZE).contains(&image_size) {
            p.push(format!(
                "preprocessing.image_size must be between 8 and {MAX_IMAGE_SIZE} pixels, not {image_size}"
            ));
        } else if matches!(model, Some(ModelConfig::SmallCnn(_))) && !image_size.is_multiple_of(4) {
            p.push(format!(
                "preprocessing.image_size must be a multiple of 4 for small_cnn (it pools twice), not {image_size}"
            ));
        } else if let Some(ModelConfig::UNet(u)) = &model
            && !image_size.is_multiple_of(1 << u.halvings())
        {
            p.push(format!(
                "preprocessing.image_size must be a multiple of {} for a unet of {} widths (it halves the image {} times and doubles it back), not {image_size}",
                1 << u.halvings(),
                u.widths.len(),
                u.halvings()
            ));
        }
        let segmentation = parse_labels(&self.model, model.as_ref(), &mut p);
        let normalisation = match pre.normalisation.as_deref() {
            None => Some(Normalisation::None),
            Some(n) => p.choice(
                "preprocessing.normalisation",
                n,
                "one of \"zscore\", \"minmax\", \"dataset\" or \"none\"",
            ),
        };
        let statistics = match (pre.mean, pre.std) {
            (None, None) => None,
            (Some(mean), Some(std)) if mean.is_finite() && std.is_finite() && std > 0.0 => {
                Some(Statistics {
                    mean: mean as f32,
                    std: std as f32,
                })
            }
            (Some(_), Some(std)) => {
                p.push(format!(
                    "preprocessing.std must be a number above 0 and mean a number, not {std}"
                ));
                None
            }
            _ => {
                p.push("preprocessing.mean and preprocessing.std go together: give both, or neither (each site then uses its own training split's)");
                None
            }
        };
        if statistics.is_some() && normalisation != Some(Normalisation::Dataset) {
            p.push("preprocessing.mean and std apply to normalisation = \"dataset\" only: remove them, or set it");
        }
        if normalisation == Some(Normalisation::Dataset)
            && statistics.is_none()
            && self.privacy.dp_sgd.is_some()
            && pre.mean.is_none()
        {
            p.push("normalisation = \"dataset\" with privacy.dp_sgd needs preprocessing.mean and std fixed in the plan (public values, as DP-SGD recipes use): a site's own statistics come from its patients' images outside the noised gradients");
        }
        let mut augmentations = Vec::new();
        for (i, a) in pre.augmentations.iter().enumerate() {
            let field = format!("preprocessing.augmentations[{i}]");
            if let Some(a) = p.choice::<Augmentation>(&field, a, "\"flip\" or \"rotate\"") {
                if augmentations.contains(&a) {
                    p.push(format!("{field}: {a:?} is listed twice"));
                }
                augmentations.push(a);
            }
        }
        augmentations.sort();
        augmentations.dedup();

        let optimiser = parse_optimiser(self, &mut p);
        let proximal_mu = self.optimiser.proximal_mu.unwrap_or(0.0);
        p.number(
            "optimiser.proximal_mu",
            self.optimiser.proximal_mu,
            |v| v >= 0.0,
            "a non-negative number",
        );
        for (name, v, max) in [
            ("local_epochs", self.local_epochs, MAX_LOCAL_EPOCHS),
            ("batch_size", self.batch_size, MAX_BATCH_SIZE),
            ("rounds", self.rounds, MAX_ROUNDS),
        ] {
            if v == 0 || v > max {
                p.push(format!("{name} must be between 1 and {max}, not {v}"));
            }
        }
        let strategy = strategy(&self.aggregation, &mut p);
        if self.aggregation.min_sites == Some(0) {
            p.push(
                "aggregation.min_sites must be at least 1 (leave it out to wait for every site)",
            );
        }
        if let (Some(need), Some(min)) = (
            strategy.as_ref().map(Strategy::min_updates),
            self.aggregation.min_sites,
        ) && (min as usize) < need
        {
            p.push(format!(
                "aggregation.strategy {} needs at least {need} updates every round, and aggregation.min_sites = {min} lets a round close with fewer: set min_sites to {need} or more, or lower f",
                self.aggregation.strategy
            ));
        }
        if let (Some(Strategy::FedBn), Some(m)) = (&strategy, &model)
            && !m.has_batch_norm()
        {
            p.push("aggregation.strategy fedbn keeps each site's batch-normalisation parameters at the site, and this model has none (small_cnn, or resnet with norm = \"group\"): use fedavg, or resnet with norm = \"batch\"");
        }
        // FedNova's weighting and SCAFFOLD's control variates count each site's local SGD
        // steps (`Plan::fednova_steps`).
        let counted = match &strategy {
            Some(Strategy::FedNova) => Some((
                "fednova",
                "normalises each site's change by its local SGD steps, and its weighting",
            )),
            Some(Strategy::Scaffold) => Some((
                "scaffold",
                "derives each site's control variate from its change over its local SGD steps, which",
            )),
            _ => None,
        };
        if let Some((name, what)) = counted {
            match &optimiser {
                Some(Optimiser::AdamW { .. }) => p.push(format!("aggregation.strategy {name} {what} is defined for SGD (with momentum, or FedProx's proximal_mu), not adamw: use optimiser.name = \"sgd\"")),
                Some(Optimiser::Sgd { momentum, .. }) if *momentum > 0.0 && proximal_mu > 0.0 => p.push(format!("aggregation.strategy {name} counts local steps for SGD with momentum or with FedProx's proximal_mu, not both at once: drop one of optimiser.momentum and optimiser.proximal_mu")),
                _ => {}
            }
            if self.privacy.dp_sgd.is_some() {
                p.push(format!("aggregation.strategy {name} counts each site's local steps from its data and batch size, and DP-SGD samples its batches at random: use fedavg with privacy.dp_sgd"));
            }
        }
        let local_layers = self.aggregation.local_layers.clone();
        if let Some(m) = &model
            && !local_layers.is_empty()
        {
            let layers = m.layers();
            for l in &local_layers {
                if !layers.contains(l) {
                    p.push(format!(
                        "aggregation.local_layers names {l:?}, which this model does not have: its layers are {}",
                        layers.join(", ")
                    ));
                }
            }
            if layers.iter().all(|l| local_layers.contains(l)) {
                p.push("aggregation.local_layers keeps every layer at the sites, so nothing would be trained together: share at least one layer");
            }
        }
        if !local_layers.is_empty()
            && let Some(s) = &strategy
            && !matches!(
                s,
                Strategy::FedAvg | Strategy::FedBn | Strategy::FedCostWAvg { .. }
            )
        {
            p.push(format!(
                "aggregation.local_layers is for fedavg, fedbn and fedcostwavg, not {}: the others compare, normalise or correct whole updates",
                self.aggregation.strategy
            ));
        }
        let local_fit_epochs = self.aggregation.local_fit_epochs.unwrap_or(0);
        if let Some(n) = self.aggregation.local_fit_epochs {
            if !(1..=100).contains(&n) {
                p.push(format!("aggregation.local_fit_epochs must be from 1 to 100, not {n} (leave it out for none)"));
            }
            if local_layers.is_empty() {
                p.push("aggregation.local_fit_epochs fits the layers kept at each site, and aggregation.local_layers names none: name them (e.g. [\"fc\"]) or leave local_fit_epochs out");
            }
            if self.privacy.dp_sgd.is_some() {
                p.push("aggregation.local_fit_epochs trains the layers kept at each site on its patients outside DP-SGD's noise, and the shared layers then train on top of them: leave it out with privacy.dp_sgd");
            }
        }
        let ditto = self.aggregation.ditto.as_ref().map(|d| d.lambda);
        if let Some(lambda) = ditto {
            if !(lambda.is_finite() && (0.0..=1e4).contains(&lambda)) {
                p.push(format!("aggregation.ditto.lambda must be from 0 (each site's own data alone) to 10000, not {lambda}"));
            }
            if !local_layers.is_empty() || matches!(strategy, Some(Strategy::FedBn)) {
                p.push("aggregation.ditto personalises with a whole model of each site's own, and aggregation.local_layers and fedbn keep parts of the shared one at the site: choose one way to personalise");
            }
            if self.privacy.dp_sgd.is_some() {
                p.push("aggregation.ditto trains each site's own model on its patients outside DP-SGD's noise and reports its held-out scores: use one of them");
            }
        }
        let fine_tune_epochs = self.aggregation.fine_tune_epochs.unwrap_or(0);
        if let Some(n) = self.aggregation.fine_tune_epochs {
            if !(1..=100).contains(&n) {
                p.push(format!("aggregation.fine_tune_epochs must be from 1 to 100, not {n} (leave it out for none)"));
            }
            if !local_layers.is_empty() || ditto.is_some() {
                p.push("aggregation.fine_tune_epochs personalises by fine-tuning a copy of each version at each site, and aggregation.local_layers and ditto keep models or layers of each site's own: choose one way to personalise");
            }
            if let Some(m) = &model {
                let layers = m.layers();
                for l in &self.aggregation.fine_tune_layers {
                    if !layers.contains(l) {
                        p.push(format!(
                            "aggregation.fine_tune_layers names {l:?}, which this model does not have: its layers are {}",
                            layers.join(", ")
                        ));
                    }
                }
            }
            if self.privacy.dp_sgd.is_some() {
                p.push("aggregation.fine_tune_epochs trains on each site's patients outside DP-SGD's noise and reports the held-out scores of what it trained: leave it out with privacy.dp_sgd");
            }
        }
        let fine_tune_layers = self.aggregation.fine_tune_layers.clone();
        if !fine_tune_layers.is_empty() && fine_tune_epochs == 0 {
            p.push("aggregation.fine_tune_layers names the layers fine-tuning trains, and aggregation.fine_tune_epochs is not set: set it (e.g. 3) or leave fine_tune_layers out");
        }
        let amplitude = parse_amplitude(self, strategy.as_ref(), &mut p);
        let stopping = parse_stopping(self, model.as_ref(), &mut p);
        if model.as_ref().is_some_and(ModelConfig::segments) {
            refuse_for_segmentation(self, &augmentations, &mut p);
        }
        let clipping = parse_privacy(self, &mut p);
        let dp_sgd = parse_dp_sgd(self, model.as_ref(), &mut p);
        let secure_aggregation = parse_secagg(self, strategy.as_ref(), &mut p);
        match (
            model,
            normalisation,
            optimiser,
            strategy,
            stopping,
            p.0.is_empty(),
        ) {
            (
                Some(model),
                Some(normalisation),
                Some(optimiser),
                Some(strategy),
                Some(stopping),
                true,
            ) => Ok(Plan {
                model,
                initialisation: initialisation.unwrap_or_default(),
                num_classes: num_classes as usize,
                segmentation,
                image_size: image_size as usize,
                normalisation,
                statistics,
                augmentations,
                amplitude,
                optimiser,
                proximal_mu,
                local_epochs: self.local_epochs,
                batch_size: self.batch_size as usize,
                rounds: self.rounds,
                strategy,
                local_layers,
                local_fit_epochs,
                ditto,
                fine_tune_epochs,
                fine_tune_layers,
                min_sites: self.aggregation.min_sites,
                stopping,
                clipping,
                dp_sgd,
                secure_aggregation,
                seed: self.seed,
            }),
            _ => Err(p.0),
        }
    }

    /// Every reason this manifest can't be run, in words; empty when it is sound.
    pub fn problems(&self) -> Vec<String> {
        self.parse().err().unwrap_or_default()
    }
}

/// Hyper-parameters read into their type: unknown names and wrong values are problems.
fn hyper<T: for<'de> Deserialize<'de> + Default>(
    arch: &str,
    hp: &BTreeMap<String, serde_json::Value>,
    p: &mut Problems,
) -> Option<T> {
    let value = serde_json::Value::Object(hp.clone().into_iter().collect());
    match serde_json::from_value(value) {
        Ok(v) => Some(v),
        Err(e) => {
            p.push(format!("model.hyper_parameters for {arch}: {e}"));
            None
        }
    }
}

fn parse_model(spec: &ModelSpec, p: &mut Problems) -> Option<ModelConfig> {
    let arch = p.choice::<Architecture>(
        "model.architecture",
        &spec.architecture,
        "\"small_cnn\", \"resnet\" or \"unet\"",
    )?;
    let wide = |c: usize| (1..=MAX_CHANNELS).contains(&c);
    match arch {
        Architecture::SmallCnn => {
            let hp: SmallCnnParams = hyper("small_cnn", &spec.hyper_parameters, p)?;
            if !hp.channels.iter().all(|c| wide(*c)) {
                p.push(format!(
                    "model.hyper_parameters.channels must be two channel counts between 1 and {MAX_CHANNELS}"
                ));
                return None;
            }
            Some(ModelConfig::SmallCnn(hp))
        }
        Architecture::Resnet => {
            let hp: ResNetParams = hyper("resnet", &spec.hyper_parameters, p)?;
            if hp.widths.is_empty() || hp.widths.len() > 8 || !hp.widths.iter().all(|c| wide(*c)) {
                p.push(format!(
                    "model.hyper_parameters.widths must be one to eight channel counts between 1 and {MAX_CHANNELS}"
                ));
                return None;
            }
            Some(ModelConfig::ResNet(hp))
        }
        Architecture::Unet => {
            let hp: UNetParams = hyper("unet", &spec.hyper_parameters, p)?;
            if !(2..=6).contains(&hp.widths.len()) || !hp.widths.iter().all(|c| wide(*c)) {
                p.push(format!(
                    "model.hyper_parameters.widths must be two to six channel counts between 1 and {MAX_CHANNELS} (one per resolution, full resolution first)"
                ));
                return None;
            }
            Some(ModelConfig::UNet(hp))
        }
    }
}

/// `model.labels`: required by a segmentation model, refused by a classifier.
fn parse_labels(
    spec: &ModelSpec,
    model: Option<&ModelConfig>,
    p: &mut Problems,
) -> Option<Segmentation> {
    let segments = model.is_some_and(ModelConfig::segments);
    let Some(labels) = &spec.labels else {
        if segments {
            p.push(format!(
                "model.labels is required for unet: name what each mask value means, e.g. {{\"0\" = \"background\", \"1\" = \"lesion\"}}, {} in all (model.num_classes)",
                spec.num_classes
            ));
        }
        return None;
    };
    if !segments {
        if model.is_some() {
            p.push("model.labels names mask values, which only a segmentation model (unet) reads: remove it, or use architecture = \"unet\"");
        }
        return None;
    }
    let mut classes: Vec<(u16, String)> = Vec::new();
    for (value, name) in labels {
        match value.trim().parse::<u16>() {
            Ok(v) if !name.trim().is_empty() => classes.push((v, name.trim().to_string())),
            Ok(_) => p.push(format!(
                "model.labels: mask value {value} needs a class name"
            )),
            Err(_) => p.push(format!(
                "model.labels: {value:?} is not a mask value (a whole number from 0 to 65535)"
            )),
        }
    }
    classes.sort();
    if classes.windows(2).any(|w| w[0].0 == w[1].0) {
        p.push("model.labels names one mask value twice (e.g. \"1\" and \"01\")");
    }
    if classes.len() != labels.len() {
        return None;
    }
    if classes.len() != spec.num_classes as usize {
        p.push(format!(
            "model.labels names {} mask values and model.num_classes is {}: a unet has one class per mask value, the background included",
            classes.len(),
            spec.num_classes
        ));
    }
    if classes.len() > MAX_SEGMENTATION_CLASSES {
        p.push(format!(
            "model.labels may name at most {MAX_SEGMENTATION_CLASSES} mask values"
        ));
        return None;
    }
    Some(Segmentation {
        values: classes.iter().map(|c| c.0).collect(),
        names: classes.into_iter().map(|c| c.1).collect(),
    })
}

/// What a segmentation plan cannot ask for yet, each with the reason.
fn refuse_for_segmentation(
    m: &TrainingPlanManifest,
    augmentations: &[Augmentation],
    p: &mut Problems,
) {
    if augmentations.contains(&Augmentation::Rotate) {
        p.push("preprocessing.augmentations: rotate is not built for segmentation (the mask would have to turn with its image): use flip, or none");
    }
    if m.preprocessing.amplitude_normalisation.is_some() {
        p.push(
            "preprocessing.amplitude_normalisation is not built for segmentation yet: remove it",
        );
    }
    if m.privacy.dp_sgd.is_some() {
        p.push("privacy.dp_sgd is not built for segmentation yet (each patient's gradient over their slices and masks): remove it, or train a classifier");
    }
}

fn parse_optimiser(m: &TrainingPlanManifest, p: &mut Problems) -> Option<Optimiser> {
    let o = &m.optimiser;
    let name = p.choice::<OptimiserName>("optimiser.name", &o.name, "\"sgd\" or \"adamw\"");
    p.number(
        "optimiser.learning_rate",
        Some(o.learning_rate),
        |v| v > 0.0,
        "a positive number",
    );
    p.number(
        "optimiser.momentum",
        o.momentum,
        |v| (0.0..1.0).contains(&v),
        "in [0, 1)",
    );
    p.number(
        "optimiser.weight_decay",
        o.weight_decay,
        |v| v >= 0.0,
        "a non-negative number",
    );
    match name? {
        OptimiserName::Sgd => Some(Optimiser::Sgd {
            learning_rate: o.learning_rate,
            momentum: o.momentum.unwrap_or(0.0),
            weight_decay: o.weight_decay.unwrap_or(0.0),
        }),
        OptimiserName::Adamw => {
            if o.momentum.is_some() {
                p.push(
                    "optimiser.momentum applies to sgd only (adamw keeps its own moment estimates); remove it",
                );
            }
            Some(Optimiser::AdamW {
                learning_rate: o.learning_rate,
                weight_decay: o.weight_decay.unwrap_or(0.01),
            })
        }
    }
}

/// The strategy the plan names with its typed parameters (defaults where absent).
pub fn parse_strategy(spec: &AggregationSpec, p: &mut Vec<String>) -> Option<Strategy> {
    let mut problems = Problems(std::mem::take(p));
    let s = strategy(spec, &mut problems);
    *p = problems.0;
    s
}

/// The tolerated number of bad sites, `f` (1), of the Krum family.
/// `strategy`'s reader of one numeric parameter: key, default, check, what it must be.
type Number<'a> = dyn FnMut(&str, f64, &dyn Fn(f64) -> bool, &str) -> f64 + 'a;

fn sites(num: &mut Number) -> usize {
    num(
        "f",
        1.0,
        &|x| x >= 0.0 && x.fract() == 0.0 && x <= 1000.0,
        "a whole number of sites (0 or more)",
    ) as usize
}

fn strategy(spec: &AggregationSpec, p: &mut Problems) -> Option<Strategy> {
    let name = p.choice::<StrategyName>(
        "aggregation.strategy",
        &spec.strategy,
        "one of \"fedavg\", \"fedadam\", \"fedyogi\", \"fedbn\", \"fednova\", \"scaffold\", \"fedcostwavg\", \"median\", \"trimmed_mean\", \"krum\", \"multi_krum\", \"bulyan\" or \"dos\"",
    )?;
    let takes: &[&str] = match name {
        StrategyName::Fedadam | StrategyName::Fedyogi => &["lr", "beta1", "beta2", "tau"],
        StrategyName::Fedcostwavg => &["alpha"],
        StrategyName::TrimmedMean => &["beta"],
        StrategyName::Krum | StrategyName::Bulyan => &["f"],
        StrategyName::MultiKrum => &["f", "m"],
        StrategyName::Dos => &["temperature"],
        _ => &[],
    };
    let mut sound = true;
    for key in spec.parameters.keys() {
        if !takes.contains(&key.as_str()) {
            sound = false;
            p.push(if takes.is_empty() {
                format!(
                    "aggregation.parameters.{key}: {} takes no parameters",
                    spec.strategy
                )
            } else {
                format!(
                    "aggregation.parameters.{key}: {} takes only {}",
                    spec.strategy,
                    takes.join(", ")
                )
            });
        }
    }
    let mut num = |key: &str, default: f64, ok: &dyn Fn(f64) -> bool, what: &str| -> f64 {
        match spec.parameters.get(key) {
            None => default,
            Some(v) => match v.as_f64().filter(|x| x.is_finite() && ok(*x)) {
                Some(x) => x,
                None => {
                    sound = false;
                    p.push(format!(
                        "aggregation.parameters.{key} must be {what}, not {v}"
                    ));
                    default
                }
            },
        }
    };
    let positive = |x: f64| x > 0.0;
    let unit = |x: f64| (0.0..1.0).contains(&x);
    let strategy = match name {
        StrategyName::Fedavg => Strategy::FedAvg,
        StrategyName::Fedbn => Strategy::FedBn,
        StrategyName::Fednova => Strategy::FedNova,
        StrategyName::Scaffold => Strategy::Scaffold,
        StrategyName::Median => Strategy::Median,
        StrategyName::Fedadam | StrategyName::Fedyogi => {
            let lr = num("lr", 0.01, &positive, "a positive number") as f32;
            let beta1 = num("beta1", 0.9, &unit, "in [0, 1)") as f32;
            let beta2 = num("beta2", 0.99, &unit, "in [0, 1)") as f32;
            let tau = num("tau", 1e-3, &positive, "a positive number") as f32;
            if name == StrategyName::Fedadam {
                Strategy::FedAdam {
                    lr,
                    beta1,
                    beta2,
                    tau,
                }
            } else {
                Strategy::FedYogi {
                    lr,
                    beta1,
                    beta2,
                    tau,
                }
            }
        }
        StrategyName::Fedcostwavg => Strategy::FedCostWAvg {
            alpha: num("alpha", 0.5, &|x| (0.0..=1.0).contains(&x), "in [0, 1]"),
        },
        StrategyName::TrimmedMean => Strategy::TrimmedMean {
            beta: num("beta", 0.1, &|x| (0.0..0.5).contains(&x), "in [0, 0.5)"),
        },
        StrategyName::Krum => Strategy::Krum { f: sites(&mut num) },
        StrategyName::Bulyan => Strategy::Bulyan { f: sites(&mut num) },
        StrategyName::MultiKrum => Strategy::MultiKrum {
            f: sites(&mut num),
            m: spec.parameters.contains_key("m").then(|| {
                num(
                    "m",
                    1.0,
                    &|x| x >= 1.0 && x.fract() == 0.0 && x <= 1000.0,
                    "a whole number of updates (1 or more)",
                ) as usize
            }),
        },
        StrategyName::Dos => Strategy::Dos {
            temperature: num("temperature", 1.0, &positive, "a positive number"),
        },
    };
    sound.then_some(strategy)
}

fn parse_stopping(
    m: &TrainingPlanManifest,
    model: Option<&ModelConfig>,
    p: &mut Problems,
) -> Option<Stopping> {
    let s = &m.stopping;
    let segments = model.is_some_and(ModelConfig::segments);
    let metric = match s.target_metric.as_deref() {
        None if segments => Some(TargetMetric::Dice),
        None => Some(TargetMetric::Accuracy),
        Some(name) => p.choice(
            "stopping.target_metric",
            name,
            "one of \"accuracy\", \"auroc\", \"dice\" or \"loss\"",
        ),
    };
    match (metric, model) {
        (Some(TargetMetric::Dice), Some(m)) if !m.segments() => p.push(
            "stopping.target_metric dice scores segmentation (unet); a classifier stops on accuracy, auroc or loss",
        ),
        (Some(TargetMetric::Auroc | TargetMetric::Accuracy), Some(m)) if m.segments() => p.push(
            "stopping.target_metric for a unet is dice or loss (accuracy and auroc score classifiers)",
        ),
        _ => {}
    }
    if s.target_value.is_some() != s.target_metric.is_some() {
        p.push("stopping.target_metric and stopping.target_value go together");
    }
    match metric {
        Some(TargetMetric::Loss) => p.number(
            "stopping.target_value",
            s.target_value,
            |v| v >= 0.0,
            "a non-negative number",
        ),
        Some(_) => p.number(
            "stopping.target_value",
            s.target_value,
            |v| (0.0..=1.0).contains(&v),
            "between 0 and 1",
        ),
        None => {}
    }
    if s.patience == Some(0) {
        p.push("stopping.patience must be at least 1 round (leave it out to train every round)");
    }
    Some(Stopping {
        metric: metric?,
        target: s.target_value,
        patience: s.patience.filter(|k| *k > 0),
    })
}

fn parse_privacy(m: &TrainingPlanManifest, p: &mut Problems) -> Option<UpdateClipping> {
    let s = &m.privacy;
    p.number(
        "privacy.clip_norm",
        s.clip_norm,
        |v| v > 0.0,
        "a positive number",
    );
    p.number(
        "privacy.noise_multiplier",
        s.noise_multiplier,
        |v| v >= 0.0,
        "a non-negative number",
    );
    match (s.clip_norm, s.noise_multiplier) {
        (Some(clip_norm), noise) => Some(UpdateClipping {
            clip_norm,
            noise_multiplier: noise.unwrap_or(0.0),
        }),
        (None, Some(_)) => {
            p.push("privacy.noise_multiplier needs privacy.clip_norm: noise is scaled to the clipping norm");
            None
        }
        (None, None) => None,
    }
}

/// `preprocessing.amplitude_normalisation`: the band, and what it cannot go with. The sites'
/// spectra reach the server as values in their first update and are averaged there, so only
/// strategies that average every value take it; update clipping, central noise and secure
/// aggregation would scale or mask a spectrum as if it were a change, and DP-SGD leaves a
/// site's spectrum of its patients' images outside the noise.
fn parse_amplitude(
    m: &TrainingPlanManifest,
    strategy: Option<&Strategy>,
    p: &mut Problems,
) -> Option<AmplitudeNormalisation> {
    let spec = m.preprocessing.amplitude_normalisation.as_ref()?;
    let band = spec.band.unwrap_or(AMPLITUDE_BAND);
    if !(band.is_finite() && (0.0..=0.5).contains(&band)) {
        p.push(format!(
            "preprocessing.amplitude_normalisation.band must be from 0 (the mean alone) to 0.5 (the whole spectrum), not {band}"
        ));
    }
    if let Some(s) = strategy
        && !matches!(
            s,
            Strategy::FedAvg
                | Strategy::FedBn
                | Strategy::FedNova
                | Strategy::Scaffold
                | Strategy::FedCostWAvg { .. }
        )
    {
        p.push(format!(
            "preprocessing.amplitude_normalisation is for fedavg, fedbn, fednova, scaffold and fedcostwavg, not {}: the sites' amplitude spectra are averaged with the model, and this strategy steps, ranks or selects values instead",
            m.aggregation.strategy
        ));
    }
    let privacy = [
        (
            m.privacy.dp_sgd.is_some(),
            "privacy.dp_sgd",
            "a site's mean spectrum of its patients' images would leave it outside DP-SGD's noise",
        ),
        (
            m.privacy.clip_norm.is_some() || m.privacy.noise_multiplier.is_some(),
            "privacy.clip_norm and noise_multiplier",
            "the first update's spectrum would be clipped and noised as if it were a change",
        ),
        (
            m.privacy.secure_aggregation,
            "privacy.secure_aggregation",
            "the first update's spectrum would be clipped as if it were a change before it is masked",
        ),
    ];
    for (on, setting, why) in privacy {
        if on {
            p.push(format!(
                "preprocessing.amplitude_normalisation cannot go with {setting}: {why}; remove one of them"
            ));
        }
    }
    Some(AmplitudeNormalisation { band: band as f32 })
}

fn parse_secagg(
    m: &TrainingPlanManifest,
    strategy: Option<&Strategy>,
    p: &mut Problems,
) -> Option<SecureAggregation> {
    let settings = m.privacy.secagg.clone().unwrap_or_default();
    if !m.privacy.secure_aggregation {
        if m.privacy.secagg.is_some() {
            p.push("privacy.secagg tunes secure aggregation, which this plan does not ask for: set privacy.secure_aggregation = true, or remove privacy.secagg");
        }
        return None;
    }
    let before = p.0.len();
    p.number(
        "privacy.secagg.clip",
        settings.clip,
        |v| v > 0.0 && v <= 1e6,
        "above 0 (each value of a site's change is clipped to ±clip before it is masked)",
    );
    p.number(
        "privacy.secagg.threshold",
        settings.threshold,
        |v| v > 0.5 && v < 1.0,
        "above 0.5 and below 1 (the fraction of a site's neighbours whose shares rebuild its secrets: a majority, so that no two groups can rebuild both)",
    );
    if let Some(k) = settings.neighbours
        && (!(2..=254).contains(&k) || k % 2 == 1)
    {
        p.push(format!(
            "privacy.secagg.neighbours must be an even number from 2 to 254 (each site's neighbours in the sparse graph), not {k}"
        ));
    }
    if let Some(s) = settings.stage_seconds
        && !(5..=3600).contains(&s)
    {
        p.push(format!(
            "privacy.secagg.stage_seconds must be 5 to 3600 (how long each exchange waits for the sites), not {s}"
        ));
    }
    if let Some(s) = strategy
        && !matches!(
            s,
            Strategy::FedAvg | Strategy::FedAdam { .. } | Strategy::FedYogi { .. }
        )
    {
        p.push(format!(
            "privacy.secure_aggregation shows the server only the sum of the sites' updates, and aggregation.strategy {} needs each site's own update or keeps a state per site: use fedavg (with optimiser.proximal_mu for FedProx), fedadam or fedyogi",
            m.aggregation.strategy
        ));
    }
    if let Some(q) = m.aggregation.min_sites
        && (q as usize) < SECAGG_MIN_SITES
    {
        p.push(format!(
            "privacy.secure_aggregation needs aggregation.min_sites of at least {SECAGG_MIN_SITES}: with fewer, a site learns another's update from the sum and its own"
        ));
    }
    (p.0.len() == before).then(|| SecureAggregation {
        clip: settings.clip.unwrap_or(1.0) as f32,
        threshold: settings.threshold,
        neighbours: settings.neighbours.unwrap_or(20) as usize,
        stage_seconds: settings.stage_seconds.unwrap_or(60),
    })
}

fn parse_dp_sgd(
    m: &TrainingPlanManifest,
    model: Option<&ModelConfig>,
    p: &mut Problems,
) -> Option<DpSgd> {
    let s = m.privacy.dp_sgd.as_ref()?;
    let before = p.0.len();
    p.number(
        "privacy.dp_sgd.epsilon",
        Some(s.epsilon),
        |v| v > 0.0,
        "a positive number (the privacy budget per patient over the run)",
    );
    p.number(
        "privacy.dp_sgd.delta",
        Some(s.delta),
        |v| v > 0.0 && v <= MAX_DELTA,
        "above 0 and at most 0.001 (typically 1e-5; below 1 / the patients at a site)",
    );
    p.number(
        "privacy.dp_sgd.max_grad_norm",
        Some(s.max_grad_norm),
        |v| v > 0.0,
        "a positive number",
    );
    p.number(
        "privacy.dp_sgd.noise_multiplier",
        s.noise_multiplier,
        |v| v > 0.0,
        "a positive number (leave it out to let each site derive it from the budget)",
    );
    if m.privacy.clip_norm.is_some() || m.privacy.noise_multiplier.is_some() {
        p.push("privacy.dp_sgd replaces privacy.clip_norm and privacy.noise_multiplier: remove those two (DP-SGD clips each patient's gradient and adds noise at every step)");
    }
    if !model.is_none_or(|m| m.private_training()) {
        p.push("privacy.dp_sgd needs a model without batch normalisation: its running averages are computed from the patients' images and would leave the site without noise; set model.hyper_parameters.norm = \"group\" for resnet (group normalisation, as Opacus uses), or use small_cnn");
    }
    (p.0.len() == before).then_some(DpSgd {
        epsilon: s.epsilon,
        delta: s.delta,
        max_grad_norm: s.max_grad_norm,
        noise_multiplier: s.noise_multiplier,
    })
}

fn has_control_text(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.chars().any(char::is_control),
        serde_json::Value::Array(a) => a.iter().any(has_control_text),
        serde_json::Value::Object(o) => o
            .iter()
            .any(|(k, v)| k.chars().any(char::is_control) || has_control_text(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(v: serde_json::Value) -> TrainingPlanManifest {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("manifest: {e}"))
    }

    /// Asserts that the plan is refused with a problem containing `needle`.
    fn refused(m: TrainingPlanManifest, needle: &str) {
        let problems = m.problems();
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "{needle}: {problems:?}"
        );
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model": {"architecture": "small_cnn", "num_classes": 2},
            "optimiser": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
            "local_epochs": 1, "batch_size": 32, "rounds": 5,
            "aggregation": {"strategy": "fedavg"}
        })
    }

    /// A plan as stored before the manifest was typed (the API tests' plan, with a file):
    /// its hash, computed by the code of 23ce638, is unchanged.
    #[test]
    fn an_old_plans_hash_is_unchanged() {
        let m = manifest(serde_json::json!({
            "model": {"architecture": "small_cnn", "num_classes": 2, "hyper_parameters": {"channels": [32, 64]}},
            "preprocessing": {"image_size": 64, "normalisation": "zscore", "augmentations": ["flip"]},
            "optimiser": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9},
            "local_epochs": 1,
            "batch_size": 32,
            "rounds": 5,
            "aggregation": {"strategy": "fedavg", "min_sites": 1},
            "stopping": {"target_metric": "auroc", "target_value": 0.9, "patience": 3},
            "privacy": {"clip_norm": 1.0, "noise_multiplier": 0.5, "secure_aggregation": false},
            "seed": 7
        }));
        let files = vec![(
            "train.py".to_string(),
            crate::hash::sha256_hex(b"print('hello')\n"),
        )];
        assert_eq!(
            crate::manifest::plan_hash(&m, &files).ok().as_deref(),
            Some("b6b879b6b992892ed5f80d781dded3b4d915602c25a96c1c65ceef19fddd5c4b")
        );
        assert!(m.parse().is_ok(), "{:?}", m.problems());
    }

    fn unet() -> serde_json::Value {
        let mut m = base();
        m["model"] = serde_json::json!({
            "architecture": "unet", "num_classes": 3,
            "labels": {"0": "background", "4": "enhancing tumour", "2": "oedema"}
        });
        m
    }

    #[test]
    fn a_segmentation_plan_maps_mask_values_to_classes() {
        let plan = manifest(unet()).parse().unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(plan.model, ModelConfig::UNet(UNetParams::default()));
        assert_eq!(plan.image_size, 64);
        assert_eq!(plan.stopping.metric, TargetMetric::Dice);
        let seg = plan.segmentation.unwrap_or_else(|| panic!("no labels"));
        // Ascending mask values are the classes: 0 → 0, 2 → 1, 4 → 2; 1 is no class.
        assert_eq!(seg.values, vec![0, 2, 4]);
        assert_eq!(seg.names, vec!["background", "oedema", "enhancing tumour"]);
        assert_eq!(
            [0, 1, 2, 4].map(|v| seg.class_of(v)),
            [Some(0), None, Some(1), Some(2)]
        );
        assert_eq!(
            ModelConfig::UNet(UNetParams::default()).layers(),
            ["enc0", "enc1", "enc2", "up1", "dec1", "up0", "dec0", "head"]
        );
        // Hyper-parameters are typed like the other models'.
        let mut m = unet();
        m["model"]["hyper_parameters"] =
            serde_json::json!({"widths": [8, 16], "norm": "group", "upsampling": "resize"});
        m["preprocessing"] = serde_json::json!({"image_size": 30});
        let plan = manifest(m).parse().unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(
            plan.model,
            ModelConfig::UNet(UNetParams {
                widths: vec![8, 16],
                norm: Norm::Group,
                upsampling: Upsampling::Resize
            })
        );
    }

    #[test]
    fn a_segmentation_plan_is_refused_what_it_cannot_mean() {
        let mut m = unet();
        m["model"].as_object_mut().map(|o| o.remove("labels"));
        refused(manifest(m), "model.labels is required for unet");
        let mut m = unet();
        m["model"]["num_classes"] = 2.into();
        refused(
            manifest(m),
            "model.labels names 3 mask values and model.num_classes is 2",
        );
        let mut m = unet();
        m["model"]["labels"] = serde_json::json!({"0": "background", "lesion": "1"});
        refused(manifest(m), "\"lesion\" is not a mask value");
        let mut m = unet();
        m["model"]["labels"] = serde_json::json!({"0": "background", "1": "a", "01": "b"});
        refused(manifest(m), "names one mask value twice");
        let mut m = base();
        m["model"]["labels"] = serde_json::json!({"0": "no", "1": "yes"});
        refused(manifest(m), "which only a segmentation model (unet) reads");
        let mut m = unet();
        m["preprocessing"] = serde_json::json!({"image_size": 66});
        refused(
            manifest(m),
            "must be a multiple of 4 for a unet of 3 widths",
        );
        let mut m = unet();
        m["model"]["hyper_parameters"] = serde_json::json!({"widths": [8]});
        refused(manifest(m), "widths must be two to six channel counts");
        let mut m = unet();
        m["model"]["hyper_parameters"] = serde_json::json!({"upsampling": "bilinear"});
        refused(manifest(m), "unknown variant `bilinear`");
        let mut m = unet();
        m["preprocessing"] = serde_json::json!({"augmentations": ["flip", "rotate"]});
        refused(manifest(m), "rotate is not built for segmentation");
        let mut m = unet();
        m["privacy"] =
            serde_json::json!({"dp_sgd": {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}});
        refused(
            manifest(m),
            "privacy.dp_sgd is not built for segmentation yet",
        );
        let mut m = unet();
        m["stopping"] = serde_json::json!({"target_metric": "auroc", "target_value": 0.9});
        refused(manifest(m), "for a unet is dice or loss");
        let mut m = base();
        m["stopping"] = serde_json::json!({"target_metric": "dice", "target_value": 0.9});
        refused(manifest(m), "dice scores segmentation");
        // A segmentation plan stops on Dice when asked.
        let mut m = unet();
        m["stopping"] = serde_json::json!({"target_metric": "dice", "target_value": 0.8});
        assert!(manifest(m).parse().is_ok());
    }

    #[test]
    fn a_plain_plan_parses_with_its_defaults() {
        let plan = manifest(base()).parse().unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(plan.model, ModelConfig::SmallCnn(SmallCnnParams::default()));
        assert_eq!(plan.image_size, 28);
        assert_eq!(plan.normalisation, Normalisation::None);
        assert_eq!(plan.strategy, Strategy::FedAvg);
        assert_eq!(plan.stopping.metric, TargetMetric::Accuracy);
        assert_eq!(plan.clipping, None);
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let mut m = base();
        m["model"]["architecture"] = "vit".into();
        m["preprocessing"] =
            serde_json::json!({"normalisation": "histogram", "augmentations": ["flip", "mixup"]});
        m["optimiser"] =
            serde_json::json!({"name": "adamw", "learning_rate": 0.01, "momentum": 0.9});
        m["aggregation"] = serde_json::json!({"strategy": "fedsgd"});
        m["stopping"] =
            serde_json::json!({"target_metric": "f1", "target_value": 0.9, "patience": 0});
        m["privacy"] = serde_json::json!({"secagg": {"clip": 1.0}, "noise_multiplier": 1.0});
        let problems = manifest(m).problems();
        for expected in [
            "model.architecture must be \"small_cnn\", \"resnet\" or \"unet\", not \"vit\"",
            "preprocessing.normalisation must be one of \"zscore\", \"minmax\", \"dataset\" or \"none\", not \"histogram\"",
            "preprocessing.augmentations[1] must be \"flip\" or \"rotate\", not \"mixup\"",
            "optimiser.momentum applies to sgd only",
            "aggregation.strategy must be one of",
            "stopping.target_metric must be one of \"accuracy\", \"auroc\", \"dice\" or \"loss\", not \"f1\"",
            "stopping.patience must be at least 1",
            "privacy.secagg tunes secure aggregation, which this plan does not ask for",
            "privacy.noise_multiplier needs privacy.clip_norm",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected:?} missing from {problems:#?}"
            );
        }
    }

    #[test]
    fn secure_aggregation_is_typed_and_refused_with_what_needs_each_update() {
        let mut m = base();
        m["privacy"] = serde_json::json!({"secure_aggregation": true});
        let plan = manifest(m.clone())
            .parse()
            .unwrap_or_else(|p| panic!("{p:?}"));
        let s = plan.secure_aggregation.expect("secure aggregation");
        assert_eq!(
            (s.clip, s.threshold, s.neighbours, s.stage_seconds),
            (1.0, None, 20, 60)
        );
        // Every other site up to k + 1 sites; a strict majority of them by default.
        assert_eq!((s.degree(5), s.threshold_of(4)), (4, 3));
        assert_eq!((s.degree(100), s.threshold_of(20)), (20, 11));
        assert_eq!(s.threshold_of(2), 2);
        let tuned = SecureAggregation {
            threshold: Some(0.75),
            ..s
        };
        assert_eq!(tuned.threshold_of(4), 4);
        assert_eq!(tuned.threshold_of(20), 16);
        // Without secure aggregation the plan's hash form is unchanged (no secagg key).
        let plain = manifest(base());
        assert!(
            !serde_json::to_string(&plain)
                .unwrap_or_default()
                .contains("secagg")
        );
        // Strategies that need each site's update or keep per-site state are refused.
        for strategy in ["median", "krum", "fedbn", "scaffold", "fedcostwavg", "dos"] {
            m["aggregation"] = serde_json::json!({"strategy": strategy});
            let problems = manifest(m.clone()).problems();
            assert!(
                problems.iter().any(|p| p.contains(&format!(
                    "aggregation.strategy {strategy} needs each site's own update"
                ))),
                "{strategy}: {problems:?}"
            );
        }
        for strategy in ["fedavg", "fedadam", "fedyogi"] {
            m["aggregation"] = serde_json::json!({"strategy": strategy});
            assert!(manifest(m.clone()).parse().is_ok(), "{strategy}");
        }
        m["aggregation"] = serde_json::json!({"strategy": "fedavg", "min_sites": 2});
        m["privacy"] = serde_json::json!({"secure_aggregation": true,
            "secagg": {"clip": 0, "threshold": 0.5, "neighbours": 3, "stage_seconds": 1}});
        let problems = manifest(m.clone()).problems();
        for expected in [
            "privacy.secagg.clip must be above 0",
            "privacy.secagg.threshold must be above 0.5 and below 1",
            "privacy.secagg.neighbours must be an even number from 2 to 254",
            "privacy.secagg.stage_seconds must be 5 to 3600",
            "privacy.secure_aggregation needs aggregation.min_sites of at least 3",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected:?} missing from {problems:#?}"
            );
        }
        m["privacy"]["secagg"] = serde_json::json!({"rounds": 3});
        assert!(serde_json::from_value::<TrainingPlanManifest>(m).is_err());
    }

    #[test]
    fn strategy_parameters_are_typed() {
        let mut m = base();
        m["aggregation"] = serde_json::json!({"strategy": "krum", "parameters": {"f": 2}});
        assert_eq!(
            manifest(m.clone()).parse().map(|p| p.strategy),
            Ok(Strategy::Krum { f: 2 })
        );
        m["aggregation"] =
            serde_json::json!({"strategy": "krum", "parameters": {"f": 1.5, "beta": 0.1}});
        let problems = manifest(m.clone()).problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("parameters.beta: krum takes only f")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("parameters.f must be a whole number")),
            "{problems:?}"
        );
        m["aggregation"] = serde_json::json!({"strategy": "multi_krum", "parameters": {"m": 3}});
        assert_eq!(
            manifest(m.clone()).parse().map(|p| p.strategy),
            Ok(Strategy::MultiKrum { f: 1, m: Some(3) })
        );
        m["aggregation"] = serde_json::json!({"strategy": "dos"});
        assert_eq!(
            manifest(m.clone()).parse().map(|p| p.strategy),
            Ok(Strategy::Dos { temperature: 1.0 })
        );
        m["aggregation"] = serde_json::json!({"strategy": "dos", "parameters": {"temperature": 0}});
        assert!(
            manifest(m.clone()).problems()[0]
                .contains("aggregation.parameters.temperature must be a positive number, not 0")
        );
        // Bulyan with f = 1 needs 7 updates; a plan that may close a round with 5 is refused.
        m["aggregation"] = serde_json::json!({"strategy": "bulyan", "min_sites": 5});
        let problems = manifest(m.clone()).problems();
        assert!(
            problems.len() == 1
                && problems[0].contains("bulyan needs at least 7 updates every round")
                && problems[0].contains("min_sites = 5"),
            "{problems:?}"
        );
        // Multi-Krum cannot average more updates than a round may have.
        m["aggregation"] =
            serde_json::json!({"strategy": "multi_krum", "min_sites": 5, "parameters": {"m": 6}});
        assert!(
            manifest(m.clone()).problems()[0].contains("multi_krum needs at least 6 updates"),
            "{:?}",
            manifest(m.clone()).problems()
        );
        m["aggregation"] = serde_json::json!({"strategy": "bulyan", "min_sites": 7});
        assert_eq!(
            manifest(m.clone()).parse().map(|p| p.strategy),
            Ok(Strategy::Bulyan { f: 1 })
        );
        m["aggregation"] = serde_json::json!({"strategy": "fedavg", "parameters": {"lr": 1}});
        assert!(manifest(m.clone()).problems()[0].contains("fedavg takes no parameters"));
        m["aggregation"] =
            serde_json::json!({"strategy": "fedadam", "parameters": {"beta2": 0.999}});
        assert_eq!(
            manifest(m).parse().map(|p| p.strategy),
            Ok(Strategy::FedAdam {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                tau: 1e-3
            })
        );
    }

    #[test]
    fn hyper_parameters_are_typed_per_architecture() {
        let mut m = base();
        m["model"]["hyper_parameters"] = serde_json::json!({"channels": [8, 16]});
        assert_eq!(
            manifest(m.clone()).parse().map(|p| p.model),
            Ok(ModelConfig::SmallCnn(SmallCnnParams { channels: [8, 16] }))
        );
        m["model"]["hyper_parameters"] = serde_json::json!({"widths": [8, 16]});
        let problems = manifest(m.clone()).problems();
        assert!(
            problems[0].contains("unknown field `widths`"),
            "{problems:?}"
        );
        m["model"]["hyper_parameters"] = serde_json::json!({"channels": [0, 16]});
        assert!(manifest(m).problems()[0].contains("between 1 and 1024"));
    }

    #[test]
    fn amplitude_normalisation_takes_a_band_and_averaging_strategies_only() {
        let with = |pre: serde_json::Value, extra: &[(&str, serde_json::Value)]| {
            let mut m = base();
            m["preprocessing"] = pre;
            for (k, v) in extra {
                m[*k] = v.clone();
            }
            manifest(m)
        };
        let on = serde_json::json!({"amplitude_normalisation": {}});
        assert_eq!(
            with(on.clone(), &[]).parse().map(|p| p.amplitude),
            Ok(Some(AmplitudeNormalisation { band: 0.1 }))
        );
        assert_eq!(
            with(
                serde_json::json!({"amplitude_normalisation": {"band": 0.5}}),
                &[]
            )
            .parse()
            .map(|p| p.amplitude),
            Ok(Some(AmplitudeNormalisation { band: 0.5 }))
        );
        assert_eq!(
            with(serde_json::json!({}), &[])
                .parse()
                .map(|p| p.amplitude),
            Ok(None)
        );
        refused(
            with(
                serde_json::json!({"amplitude_normalisation": {"band": 0.6}}),
                &[],
            ),
            "band must be from 0 (the mean alone) to 0.5 (the whole spectrum), not 0.6",
        );
        refused(
            with(
                on.clone(),
                &[("aggregation", serde_json::json!({"strategy": "median"}))],
            ),
            "amplitude_normalisation is for fedavg, fedbn, fednova, scaffold and fedcostwavg, not median",
        );
        refused(
            with(
                on.clone(),
                &[("aggregation", serde_json::json!({"strategy": "fedadam"}))],
            ),
            "not fedadam",
        );
        refused(
            with(
                on.clone(),
                &[(
                    "privacy",
                    serde_json::json!({"clip_norm": 1.0, "noise_multiplier": 0.5}),
                )],
            ),
            "cannot go with privacy.clip_norm and noise_multiplier",
        );
        refused(
            with(
                on.clone(),
                &[(
                    "privacy",
                    serde_json::json!({"dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0}}),
                )],
            ),
            "cannot go with privacy.dp_sgd",
        );
        refused(
            with(
                on.clone(),
                &[
                    (
                        "aggregation",
                        serde_json::json!({"strategy": "fedavg", "min_sites": 3}),
                    ),
                    ("privacy", serde_json::json!({"secure_aggregation": true})),
                ],
            ),
            "cannot go with privacy.secure_aggregation",
        );
        for strategy in ["fednova", "scaffold", "fedcostwavg"] {
            let m = with(
                on.clone(),
                &[("aggregation", serde_json::json!({"strategy": strategy}))],
            );
            assert!(m.problems().is_empty(), "{strategy}: {:?}", m.problems());
        }
        // Old plans hash as before: an absent setting is not written out.
        let text = serde_json::to_string(&manifest(base())).unwrap_or_default();
        assert!(!text.contains("amplitude"), "{text}");
    }

    #[test]
    fn ditto_takes_a_lambda_and_one_personalisation_at_a_time() {
        let with = |aggregation: serde_json::Value, privacy: Option<serde_json::Value>| {
            let mut m = base();
            m["aggregation"] = aggregation;
            if let Some(p) = privacy {
                m["privacy"] = p;
            }
            manifest(m)
        };
        let on = serde_json::json!({"strategy": "fedavg", "ditto": {"lambda": 0.1}});
        assert_eq!(
            with(on.clone(), None).parse().map(|p| p.ditto),
            Ok(Some(0.1))
        );
        assert_eq!(
            with(
                serde_json::json!({"strategy": "median", "ditto": {"lambda": 0}}),
                None
            )
            .parse()
            .map(|p| p.ditto),
            Ok(Some(0.0))
        );
        assert_eq!(manifest(base()).parse().map(|p| p.ditto), Ok(None));
        refused(
            with(
                serde_json::json!({"strategy": "fedavg", "ditto": {"lambda": -1}}),
                None,
            ),
            "aggregation.ditto.lambda must be from 0 (each site's own data alone) to 10000, not -1",
        );
        refused(
            with(
                serde_json::json!({"strategy": "fedavg", "ditto": {"lambda": 0.1}, "local_layers": ["fc"]}),
                None,
            ),
            "choose one way to personalise",
        );
        refused(
            with(
                on,
                Some(
                    serde_json::json!({"dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0}}),
                ),
            ),
            "outside DP-SGD's noise",
        );
        let text = serde_json::to_string(&manifest(base())).unwrap_or_default();
        assert!(!text.contains("ditto"), "{text}");
    }

    #[test]
    fn dataset_normalisation_takes_both_statistics_or_neither() {
        let mut m = base();
        m["preprocessing"] = serde_json::json!({"normalisation": "dataset"});
        let plan = manifest(m.clone())
            .parse()
            .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(
            (plan.normalisation, plan.statistics),
            (Normalisation::Dataset, None)
        );
        m["preprocessing"] =
            serde_json::json!({"normalisation": "dataset", "mean": 0.5, "std": 0.25});
        assert_eq!(
            manifest(m.clone()).parse().map(|p| p.statistics),
            Ok(Some(Statistics {
                mean: 0.5,
                std: 0.25
            }))
        );
        let refused = |pre: serde_json::Value, needle: &str| {
            let mut m = base();
            m["preprocessing"] = pre;
            let problems = manifest(m).problems();
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        };
        refused(
            serde_json::json!({"normalisation": "dataset", "mean": 0.5}),
            "mean and preprocessing.std go together",
        );
        refused(
            serde_json::json!({"normalisation": "dataset", "mean": 0.5, "std": 0}),
            "std must be a number above 0",
        );
        refused(
            serde_json::json!({"normalisation": "zscore", "mean": 0.5, "std": 0.2}),
            "apply to normalisation = \"dataset\" only",
        );
        // DP-SGD: the site's own statistics would leave it outside the noise.
        m["preprocessing"] = serde_json::json!({"normalisation": "dataset"});
        m["privacy"] =
            serde_json::json!({"dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0}});
        assert!(
            manifest(m.clone())
                .problems()
                .iter()
                .any(|p| p.contains("needs preprocessing.mean and std fixed in the plan")),
            "{:?}",
            manifest(m.clone()).problems()
        );
        m["preprocessing"] =
            serde_json::json!({"normalisation": "dataset", "mean": 0.5, "std": 0.25});
        assert!(manifest(m).problems().is_empty());
        // Old plans hash as before: absent statistics are not written out.
        let text = serde_json::to_string(&manifest(base())).unwrap_or_default();
        assert!(
            !text.contains("\"mean\"") && !text.contains("\"std\""),
            "{text}"
        );
    }

    #[test]
    fn fednova_and_scaffold_need_sgd_and_count_steps_from_the_data() {
        for (name, strategy) in [
            ("fednova", Strategy::FedNova),
            ("scaffold", Strategy::Scaffold),
        ] {
            let mut m = serde_json::json!({
                "model": {"architecture": "small_cnn", "num_classes": 2},
                "optimiser": {"name": "sgd", "learning_rate": 0.05},
                "local_epochs": 2, "batch_size": 16, "rounds": 3,
                "aggregation": {"strategy": name}
            });
            let plan = manifest(m.clone()).parse().expect("with sgd");
            assert_eq!(plan.strategy, strategy);
            // 50 images in batches of 16: 4 steps an epoch (the last one short), 2 epochs.
            assert_eq!(plan.fednova_steps(50), 8.0);
            let mut private = m.clone();
            private["privacy"] = serde_json::json!({"dp_sgd": {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}});
            let problems = manifest(private).parse().unwrap_err();
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains(name) && p.contains("DP-SGD")),
                "{problems:?}"
            );
            for (optimiser, says) in [
                (
                    serde_json::json!({"name": "adamw", "learning_rate": 0.001}),
                    "not adamw",
                ),
                (
                    serde_json::json!({"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "proximal_mu": 0.01}),
                    "not both at once",
                ),
            ] {
                m["optimiser"] = optimiser;
                let problems = manifest(m.clone()).parse().unwrap_err();
                assert!(
                    problems
                        .iter()
                        .any(|p| p.contains(says) && p.contains(name)),
                    "{problems:?}"
                );
            }
        }
    }

    #[test]
    fn local_layers_name_the_models_layers_and_leave_some_shared() {
        let mut m = base();
        m["aggregation"]["local_layers"] = serde_json::json!(["fc"]);
        let plan = manifest(m.clone()).parse().expect("fc stays at the sites");
        assert_eq!(plan.local_layers, vec!["fc".to_string()]);
        assert!(plan.is_local("fc.weight") && plan.is_local("fc.bias"));
        assert!(!plan.is_local("conv1.weight") && !plan.is_local("fcx.weight"));
        for (layers, strategy, says) in [
            (
                serde_json::json!(["head"]),
                "fedavg",
                "does not have: its layers are conv1, conv2, fc",
            ),
            (
                serde_json::json!(["conv1", "conv2", "fc"]),
                "fedavg",
                "share at least one layer",
            ),
            (serde_json::json!(["fc"]), "median", "not median"),
        ] {
            m["aggregation"] = serde_json::json!({"strategy": strategy, "local_layers": layers});
            let problems = manifest(m.clone()).parse().unwrap_err();
            assert!(problems.iter().any(|p| p.contains(says)), "{problems:?}");
        }
        // A plan without local layers hashes as before.
        let plain = manifest(base());
        assert!(
            !serde_json::to_string(&plain)
                .unwrap()
                .contains("local_layers")
        );
    }

    #[test]
    fn local_fit_epochs_need_local_layers_and_no_dp_sgd() {
        let mut m = base();
        m["aggregation"] = serde_json::json!({"strategy": "fedavg", "local_layers": ["fc"], "local_fit_epochs": 3});
        let plan = manifest(m.clone()).parse().expect("3 epochs fit fc first");
        assert_eq!(plan.local_fit_epochs, 3);
        m["aggregation"]["local_fit_epochs"] = serde_json::json!(null);
        assert_eq!(manifest(m.clone()).parse().unwrap().local_fit_epochs, 0);
        for (aggregation, privacy, says) in [
            (
                serde_json::json!({"strategy": "fedavg", "local_fit_epochs": 3}),
                serde_json::json!({}),
                "local_layers names none",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "local_layers": ["fc"], "local_fit_epochs": 0}),
                serde_json::json!({}),
                "from 1 to 100, not 0",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "local_layers": ["fc"], "local_fit_epochs": 101}),
                serde_json::json!({}),
                "from 1 to 100, not 101",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "local_layers": ["fc"], "local_fit_epochs": 2}),
                serde_json::json!({"dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0}}),
                "outside DP-SGD's noise",
            ),
        ] {
            assert_refused(aggregation, privacy, "local_fit_epochs", says);
        }
        assert_not_hashed("local_fit_epochs");
    }

    #[test]
    fn fine_tune_epochs_are_one_way_to_personalise_and_not_with_dp_sgd() {
        let mut m = base();
        m["aggregation"] = serde_json::json!({"strategy": "median", "fine_tune_epochs": 3});
        let plan = manifest(m.clone())
            .parse()
            .expect("3 epochs of fine-tuning");
        assert_eq!(plan.fine_tune_epochs, 3);
        assert!(plan.is_fine_tuned("conv1.weight") && plan.is_fine_tuned("fc.bias"));
        assert_eq!(manifest(base()).parse().unwrap().fine_tune_epochs, 0);
        m["aggregation"]["fine_tune_layers"] = serde_json::json!(["fc"]);
        let plan = manifest(m.clone())
            .parse()
            .expect("the classifier fine-tuned");
        assert!(plan.is_fine_tuned("fc.weight") && plan.is_fine_tuned("fc.bias"));
        assert!(!plan.is_fine_tuned("conv1.weight") && !plan.is_fine_tuned("fcx.weight"));
        for (aggregation, privacy, says) in [
            (
                serde_json::json!({"strategy": "fedavg", "fine_tune_epochs": 0}),
                serde_json::json!({}),
                "from 1 to 100, not 0",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "fine_tune_epochs": 101}),
                serde_json::json!({}),
                "from 1 to 100, not 101",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "fine_tune_epochs": 3, "local_layers": ["fc"]}),
                serde_json::json!({}),
                "choose one way to personalise",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "fine_tune_epochs": 3, "ditto": {"lambda": 0.1}}),
                serde_json::json!({}),
                "choose one way to personalise",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "fine_tune_epochs": 3}),
                serde_json::json!({"dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0}}),
                "outside DP-SGD's noise",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "fine_tune_epochs": 3, "fine_tune_layers": ["head"]}),
                serde_json::json!({}),
                "names \"head\", which this model does not have: its layers are conv1, conv2, fc",
            ),
            (
                serde_json::json!({"strategy": "fedavg", "fine_tune_layers": ["fc"]}),
                serde_json::json!({}),
                "fine_tune_epochs is not set",
            ),
        ] {
            assert_refused(aggregation, privacy, "aggregation.fine_tune_", says);
        }
        assert_not_hashed("fine_tune_epochs");
    }

    /// A plan of these `aggregation` and `privacy` sections is refused with a problem that
    /// names `setting` and `says` what is wrong.
    fn assert_refused(
        aggregation: serde_json::Value,
        privacy: serde_json::Value,
        setting: &str,
        says: &str,
    ) {
        let mut m = base();
        m["aggregation"] = aggregation;
        m["privacy"] = privacy;
        let problems = manifest(m).parse().unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains(setting) && p.contains(says)),
            "{problems:?}"
        );
    }

    /// A plan without `setting` hashes as before it existed: the manifest does not name it.
    fn assert_not_hashed(setting: &str) {
        assert!(
            !serde_json::to_string(&manifest(base()))
                .unwrap()
                .contains(setting)
        );
    }

    #[test]
    fn resnet_normalisation_is_a_typed_choice_and_fedbn_needs_batch_norm() {
        let mut m = base();
        m["model"] = serde_json::json!({"architecture": "resnet", "num_classes": 2,
            "hyper_parameters": {"widths": [8, 48], "norm": "group"}});
        assert_eq!(
            manifest(m.clone()).parse().map(|p| p.model),
            Ok(ModelConfig::ResNet(ResNetParams {
                widths: vec![8, 48],
                norm: Norm::Group
            }))
        );
        m["model"]["hyper_parameters"]["norm"] = "layer".into();
        let problems = manifest(m.clone()).problems();
        assert!(
            problems[0].contains("unknown variant `layer`") && problems[0].contains("`group`"),
            "{problems:?}"
        );
        // FedBN has nothing to keep local without batch normalisation.
        m["aggregation"] = serde_json::json!({"strategy": "fedbn"});
        m["model"]["hyper_parameters"] = serde_json::json!({"norm": "group"});
        let problems = manifest(m.clone()).problems();
        assert!(
            problems.len() == 1
                && problems[0].contains("fedbn keeps each site's batch-normalisation"),
            "{problems:?}"
        );
        let mut cnn = base();
        cnn["aggregation"] = serde_json::json!({"strategy": "fedbn"});
        assert!(manifest(cnn).problems()[0].contains("this model has none"));
        m["model"]["hyper_parameters"] = serde_json::json!({"norm": "batch"});
        assert!(manifest(m).problems().is_empty());
        // Opacus's group count wherever it divides the channels, a divisor otherwise.
        assert_eq!(
            [4, 16, 32, 48, 64, 100].map(Norm::groups),
            [4, 16, 32, 16, 32, 4]
        );
    }

    #[test]
    fn dp_sgd_is_typed_and_refused_where_it_cannot_hold() {
        let mut m = base();
        m["privacy"] =
            serde_json::json!({"dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0}});
        let plan = manifest(m.clone())
            .parse()
            .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(
            plan.dp_sgd,
            Some(DpSgd {
                epsilon: 8.0,
                delta: 1e-5,
                max_grad_norm: 1.0,
                noise_multiplier: None
            })
        );
        // Every wrong number at once, with what it must be.
        m["privacy"] = serde_json::json!({"dp_sgd": {"epsilon": 0, "delta": 0.5, "max_grad_norm": -1, "noise_multiplier": 0}});
        let problems = manifest(m.clone()).problems();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[1].contains("privacy.dp_sgd.delta must be above 0 and at most 0.001"));
        // Not with update clipping, not with batch normalisation.
        m["privacy"] = serde_json::json!({"clip_norm": 1.0, "dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0}});
        m["model"]["architecture"] = "resnet".into();
        let problems = manifest(m.clone()).problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("replaces privacy.clip_norm")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(
                |p| p.contains("without batch normalisation") && p.contains("norm = \"group\"")
            ),
            "{problems:?}"
        );
        // resnet with group normalisation trains with DP-SGD.
        m["privacy"] =
            serde_json::json!({"dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0}});
        m["model"]["hyper_parameters"] = serde_json::json!({"norm": "group"});
        let plan = manifest(m.clone())
            .parse()
            .unwrap_or_else(|p| panic!("{p:?}"));
        assert!(plan.model.private_training() && !plan.model.has_batch_norm());
        // An unknown setting inside dp_sgd is refused, not ignored.
        m["privacy"] = serde_json::json!({"dp_sgd": {"epsilon": 8, "delta": 1e-5, "max_grad_norm": 1.0, "clip": 2}});
        assert!(serde_json::from_value::<TrainingPlanManifest>(m).is_err());
    }
}
