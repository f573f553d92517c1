//! The training plan's manifest: what the researcher's code will do at every site.
//! It is hashed together with the attached files; any change is a new plan version.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TrainingPlanManifest {
    pub model: ModelSpec,
    #[serde(default)]
    pub preprocessing: Preprocessing,
    pub optimiser: OptimiserSpec,
    /// Local epochs each site trains per round.
    pub local_epochs: u32,
    pub batch_size: u32,
    /// Rounds the run may take at most.
    pub rounds: u32,
    pub aggregation: AggregationSpec,
    #[serde(default)]
    pub stopping: StoppingCriteria,
    #[serde(default)]
    pub privacy: PrivacySettings,
    /// Seed for every random choice, so that a run can be reproduced.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model architecture: `small_cnn` or `resnet` (classifiers), `unet` (segmentation).
    #[cfg_attr(feature = "server", schema(value_type = crate::plan::Architecture))]
    pub architecture: String,
    /// Number of output classes.
    pub num_classes: u32,
    /// The architecture's hyper-parameters: `small_cnn` takes `channels` (two counts, default
    /// `[32, 64]`), `resnet` takes `widths` (one to eight counts, default `[16, 32, 64]`) and
    /// `norm` (`batch`, the default, or `group`: group normalisation, which DP-SGD needs);
    /// `unet` takes `widths` (two to six counts, default `[16, 32, 64]`), `norm` and
    /// `upsampling` (`transposed`, the default, or `resize`). Unknown names are refused.
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub hyper_parameters: BTreeMap<String, serde_json::Value>,
    /// How the initial weights are drawn: `kaiming` (the default) or `pytorch` (PyTorch's
    /// defaults for `Conv2d` and `Linear`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "server", schema(value_type = Option<crate::plan::Initialisation>))]
    pub initialisation: Option<String>,
    /// `unet` only: what each mask value means, `{"0": "background", "1": "lesion", …}`. The
    /// values in ascending order are the classes 0, 1, …; the lowest is the background, which
    /// the mean Dice leaves out. As many as `num_classes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// Images are resized to this square size in pixels.
    #[serde(default)]
    pub image_size: Option<u32>,
    /// Intensity normalisation: of each image, `zscore` or `minmax`; of the dataset,
    /// `dataset` (by `mean` and `std`, or the site's training split's); `none` (absent: none).
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Option<crate::plan::Normalisation>))]
    pub normalisation: Option<String>,
    /// The pixel mean `dataset` normalisation subtracts (with `std`; absent: each site's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// The pixel standard deviation `dataset` normalisation divides by (with `mean`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
    /// Augmentations of training batches: `flip`, `rotate` (±15°).
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Vec<crate::plan::Augmentation>))]
    pub augmentations: Vec<String>,
    /// HarmoFL's amplitude normalisation: every image's low-frequency amplitudes replaced by
    /// the sites' mean spectrum, its phase kept (absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amplitude_normalisation: Option<AmplitudeNormalisationSpec>,
}

/// HarmoFL's amplitude normalisation (Jiang et al. 2022).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AmplitudeNormalisationSpec {
    /// The low band replaced, as a fraction of the image side: frequencies up to
    /// `⌊side · band⌋` in both directions; 0 is the mean alone, 0.5 the whole spectrum
    /// (absent: 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub band: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OptimiserSpec {
    /// `sgd` (with momentum) or `adamw` (no `momentum`: it keeps its own moments).
    #[cfg_attr(feature = "server", schema(value_type = crate::plan::OptimiserName))]
    pub name: String,
    pub learning_rate: f64,
    #[serde(default)]
    pub momentum: Option<f64>,
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// FedProx proximal term μ (0 or absent: plain local training).
    #[serde(default)]
    pub proximal_mu: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AggregationSpec {
    /// `fedavg`, `fedadam`, `fedyogi`, `fedbn`, `fedcostwavg`, `median`, `trimmed_mean` or `krum`.
    #[cfg_attr(feature = "server", schema(value_type = crate::plan::StrategyName))]
    pub strategy: String,
    /// Minimum number of sites whose updates a round needs.
    #[serde(default)]
    pub min_sites: Option<u32>,
    /// The strategy's parameters: `fedadam`/`fedyogi` take `lr`, `beta1`, `beta2`, `tau`;
    /// `fedcostwavg` `alpha`; `trimmed_mean` `beta`; `krum` `f`; the others none.
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub parameters: BTreeMap<String, serde_json::Value>,
    /// Partial sharing: the model's layers (`conv1`, `fc`, `layer0`, …) that stay at each
    /// site, trained there and never sent; the server aggregates the rest. With `fedavg`,
    /// `fedbn` or `fedcostwavg`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_layers: Vec<String>,
    /// With `local_layers`: epochs (1–100) in which each site first trains only those layers
    /// on the incoming shared ones, before the whole model trains in a round and before it
    /// scores a version (FedRep's order), so that a site's own layers fit the shared layers
    /// they are used with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_fit_epochs: Option<u32>,
    /// Ditto (Li et al. 2021): each site also trains a model of its own, pulled towards the
    /// global one, which never leaves the site and is what its evaluations score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ditto: Option<DittoSpec>,
    /// Personalisation by local fine-tuning (FedAvg + FT): epochs (1–100) in which a site
    /// scoring a version first trains a copy of it, every layer, on its own training split; it
    /// scores that copy, which never leaves the site and is not kept. Training is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_epochs: Option<u32>,
    /// With `fine_tune_epochs`: the model's layers the fine-tuning trains (e.g. `["fc"]`, the
    /// classifier on the shared features); every layer when left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fine_tune_layers: Vec<String>,
}

/// Ditto's personalisation (Li et al. 2021).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DittoSpec {
    /// λ, how strongly each site's own model is pulled towards the global one (0: trained on
    /// the site's data alone).
    pub lambda: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StoppingCriteria {
    /// Stop when the global model reaches this value of `target_metric`: `accuracy`,
    /// `auroc` or `loss` (at or below).
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Option<crate::plan::TargetMetric>))]
    pub target_metric: Option<String>,
    #[serde(default)]
    pub target_value: Option<f64>,
    /// Stop after this many rounds without improvement.
    #[serde(default)]
    pub patience: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    /// Clip each update to this L2 norm.
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// Gaussian noise multiplier applied after clipping.
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// Mask updates so that the server sees only their sum (SecAgg+; `secagg` tunes it).
    #[serde(default)]
    pub secure_aggregation: bool,
    /// Secure aggregation's parameters; left out of the hashed form when absent, so plans
    /// written before it keep their hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg: Option<SecAggSettings>,
    /// Differentially private training at each site (DP-SGD) under a per-patient budget.
    /// Left out of the hashed form when absent, so plans written before it keep their hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_sgd: Option<DpSgdSettings>,
}

/// `privacy.secagg`: how secure aggregation masks the sites' updates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SecAggSettings {
    /// Each value of a site's change is clipped to ±clip before it is quantised (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f64>,
    /// The fraction of the holders of a site's shares (its neighbours and itself) whose shares
    /// rebuild its secrets: above one half, below one (default: a majority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Neighbours of each site (k of Bell et al.'s sparse graph, even); every other site when
    /// the round has at most k + 1 sites (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<u32>,
    /// How long each exchange after the first waits for the sites, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_seconds: Option<u32>,
}

/// `privacy.dp_sgd`: each site trains with DP-SGD (per-patient gradient clipping, Gaussian
/// noise on every step, Poisson sampling of patients) and spends at most `epsilon` at `delta`
/// per patient over the whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DpSgdSettings {
    /// The budget: ε per patient for the whole run, at `delta`.
    pub epsilon: f64,
    /// δ of the budget; it must be below 1 / (a site's patients).
    pub delta: f64,
    /// C: each patient's gradient is clipped to this L2 norm every step.
    pub max_grad_norm: f64,
    /// σ: noise of σ·C on each step's sum. When left out, each site derives the smallest σ
    /// that keeps its patients within `epsilon` over the plan's rounds and epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
}

/// A plan's content hash: SHA-256 over the canonical JSON of the manifest and the attached
/// files' names and SHA-256 digests (sorted by name). The server and every worker compute it
/// the same way.
pub fn plan_hash(
    manifest: &TrainingPlanManifest,
    files: &[(String, String)],
) -> Result<String, serde_json::Error> {
    #[derive(Serialize)]
    struct Canonical<'a> {
        manifest: &'a TrainingPlanManifest,
        files: Vec<(&'a str, &'a str)>,
    }
    let mut listed: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, h)| (n.as_str(), h.as_str()))
        .collect();
    listed.sort();
    crate::hash::canonical_sha256(&Canonical {
        manifest,
        files: listed,
    })
}
