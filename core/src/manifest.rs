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
    /// Model architecture, e.g. `small_cnn` or `resnet`.
    pub architecture: String,
    /// Number of output classes.
    pub num_classes: u32,
    /// Architecture hyper-parameters (e.g. channel widths, depth).
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub hyper_parameters: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// Images are resized to this square size in pixels.
    #[serde(default)]
    pub image_size: Option<u32>,
    /// Intensity normalisation, e.g. `zscore` or `minmax`.
    #[serde(default)]
    pub normalisation: Option<String>,
    /// Augmentations applied during training, e.g. `flip`, `rotate`.
    #[serde(default)]
    pub augmentations: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OptimiserSpec {
    /// `sgd` (with momentum) or `adamw`.
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
    /// e.g. `fedavg`, `fedadam`, `fedyogi`, `fedbn`, `fedcostwavg`, `median`, `trimmed_mean`, `krum`.
    pub strategy: String,
    /// Minimum number of sites whose updates a round needs.
    #[serde(default)]
    pub min_sites: Option<u32>,
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub parameters: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StoppingCriteria {
    /// Stop when the global model reaches this value of `target_metric`.
    #[serde(default)]
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
    /// Mask updates so that the server sees only their sum.
    #[serde(default)]
    pub secure_aggregation: bool,
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

impl TrainingPlanManifest {
    /// Every reason this manifest can't be run, in words; empty when it is sound.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let non_empty = |s: &str| !s.trim().is_empty();
        if !non_empty(&self.model.architecture) {
            out.push("model.architecture must name a model, e.g. \"small_cnn\"".to_string());
        }
        if self.model.num_classes < 2 {
            out.push("model.num_classes must be at least 2".to_string());
        }
        if !matches!(self.optimiser.name.as_str(), "sgd" | "adamw") {
            out.push(format!(
                "optimiser.name must be \"sgd\" or \"adamw\", not {:?}",
                self.optimiser.name
            ));
        }
        if !(self.optimiser.learning_rate.is_finite() && self.optimiser.learning_rate > 0.0) {
            out.push("optimiser.learning_rate must be a positive number".to_string());
        }
        for (name, v) in [
            ("optimiser.momentum", self.optimiser.momentum),
            ("optimiser.weight_decay", self.optimiser.weight_decay),
            ("optimiser.proximal_mu", self.optimiser.proximal_mu),
            ("privacy.clip_norm", self.privacy.clip_norm),
            ("privacy.noise_multiplier", self.privacy.noise_multiplier),
            ("stopping.target_value", self.stopping.target_value),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                out.push(format!("{name} must be a non-negative number"));
            }
        }
        for (name, v, max) in [
            ("local_epochs", self.local_epochs, MAX_LOCAL_EPOCHS),
            ("batch_size", self.batch_size, MAX_BATCH_SIZE),
            ("rounds", self.rounds, MAX_ROUNDS),
        ] {
            if v == 0 || v > max {
                out.push(format!("{name} must be between 1 and {max}, not {v}"));
            }
        }
        if !non_empty(&self.aggregation.strategy) {
            out.push("aggregation.strategy must name a strategy, e.g. \"fedavg\"".to_string());
        }
        if serde_json::to_value(self).is_ok_and(|v| has_control_text(&v)) {
            out.push("the manifest's text must not contain control characters".to_string());
        }
        if self.stopping.target_value.is_some() != self.stopping.target_metric.is_some() {
            out.push("stopping.target_metric and stopping.target_value go together".to_string());
        }
        out
    }
}

/// The most rounds a plan may ask for.
pub const MAX_ROUNDS: u32 = 10_000;
/// The most local epochs per round.
pub const MAX_LOCAL_EPOCHS: u32 = 1_000;
/// The largest batch.
pub const MAX_BATCH_SIZE: u32 = 4_096;

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
