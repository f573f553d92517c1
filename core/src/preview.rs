//! Synthetic previews of a site's data: what a site sends back (through the artifact store)
//! and what the server shows once the site's custodian releases it.

use serde::{Deserialize, Serialize};

#[cfg(feature = "server")]
use utoipa::ToSchema;

/// What a preview job asks of the site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct PreviewSpec {
    /// Synthetic images per class (before any is withheld).
    pub per_class: u32,
    /// Images are generated at this square size.
    pub image_size: u32,
    /// Counts below k are suppressed in the metadata summary.
    pub k: u64,
    /// `cvae` or `pca_gaussian`; by default the VAE where every class has enough images.
    #[serde(default)]
    pub generator: Option<String>,
    /// Train the generator with DP-SGD under this budget, spent from the dataset's ledger.
    #[serde(default)]
    pub dp: Option<PreviewPrivacy>,
}

/// The budget a private preview may spend: ε per patient at δ, for the one generator it trains.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct PreviewPrivacy {
    pub epsilon: f64,
    pub delta: f64,
    /// C: each patient's gradient is clipped to this L2 norm.
    pub max_grad_norm: f64,
}

/// Optimiser steps the preview generator trains for.
pub const GENERATOR_STEPS: u64 = 300;

/// Images (without DP) or expected patients (with DP-SGD) in each of the generator's steps.
pub const GENERATOR_BATCH: u64 = 32;

/// What training a private preview's generator costs a site whose training split holds
/// `patients` patients: [`GENERATOR_STEPS`] DP-SGD steps, each patient sampled with
/// probability `GENERATOR_BATCH / patients`, σ the smallest that stays within the asked ε. The
/// site trains by it and the server reserves it before the job goes out, both from here.
pub fn dp_cost(
    dp: &PreviewPrivacy,
    patients: u64,
) -> Result<crate::plan::DpRound, crate::plan::DpRoundError> {
    crate::plan::dp_schedule(
        &crate::plan::DpSgd {
            epsilon: dp.epsilon,
            delta: dp.delta,
            max_grad_norm: dp.max_grad_norm,
            noise_multiplier: None,
        },
        patients,
        GENERATOR_BATCH,
        |_| GENERATOR_STEPS,
        1,
    )
}

impl Default for PreviewSpec {
    fn default() -> Self {
        PreviewSpec {
            per_class: 12,
            image_size: 64,
            k: 10,
            generator: None,
            dp: None,
        }
    }
}

/// A count in a summary: exact when at least k, otherwise suppressed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct Count {
    pub value: String,
    /// None: fewer than k, suppressed.
    pub count: Option<u64>,
}

/// What a site's data looks like, aggregated; every count below `k` is suppressed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct MetadataSummary {
    pub k: u64,
    pub files: u64,
    pub modalities: Vec<Count>,
    /// `rows×columns`.
    pub image_sizes: Vec<Count>,
    /// Pixel spacing in mm, rounded to 0.1.
    pub pixel_spacings: Vec<Count>,
    /// Manufacturers seen fewer than k times are pooled as `other`, unnamed.
    pub manufacturers: Vec<Count>,
    pub labels: Vec<Count>,
    /// Files that could not be read for the summary (counted, never named).
    pub unreadable: u64,
}

/// How close each synthetic image is to its nearest real training image, against how close
/// real images are to each other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct MemorisationReport {
    /// Median over real images of the distance to the nearest other real image.
    pub real_nn_median: f64,
    /// For each synthetic image: its distance to the closest real image divided by
    /// `real_nn_median` (the distance-to-closest-record ratio).
    pub ratios: Vec<f64>,
    /// Images whose ratio is below `threshold`: too close to a real image; withheld.
    pub flagged: Vec<usize>,
    pub threshold: f64,
}

/// One synthetic image as it leaves the site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreviewImageData {
    pub label: u32,
    /// PNG, 8-bit grey, base64 (standard alphabet).
    pub png_base64: String,
}

/// Everything that leaves the site for one preview request (stored as one JSON artifact):
/// only the images that passed the memorisation check, the check's figures and the summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreviewSet {
    /// `pca_gaussian` or `cvae`.
    pub generator: String,
    /// The differential-privacy budget spent, when the generator was private.
    pub epsilon: Option<f64>,
    pub image_size: u32,
    pub images: Vec<PreviewImageData>,
    pub memorisation: MemorisationReport,
    pub summary: MetadataSummary,
}
