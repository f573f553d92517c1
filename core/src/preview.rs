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

/// The most classes a preview of segmentation data generates masks for: the generator learns
/// each class as a channel beside the image, so each class costs as much as the image itself.
pub const MAX_PREVIEW_CLASSES: usize = 16;

/// How opaque a class's colour is over a synthetic image where its mask shows that class.
pub const OVERLAY_OPACITY: f32 = 0.45;

/// The colour a mask's class is drawn in over its image (the server's overlays and the portal's
/// legend both take it from here): none for the background (class 0); the foreground classes
/// take the Okabe–Ito palette (told apart with the common colour-vision deficiencies) in turn.
pub fn overlay_colour(class: usize) -> Option<[u8; 3]> {
    const PALETTE: [[u8; 3]; 7] = [
        [230, 159, 0],
        [86, 180, 233],
        [0, 158, 115],
        [240, 228, 66],
        [0, 114, 178],
        [213, 94, 0],
        [204, 121, 167],
    ];
    class.checked_sub(1).map(|i| PALETTE[i % PALETTE.len()])
}

/// `overlay_colour` as CSS (`#e69f00`).
pub fn overlay_css(class: usize) -> Option<String> {
    overlay_colour(class).map(|[r, g, b]| format!("#{r:02x}{g:02x}{b:02x}"))
}

/// An 8-bit grey image with its mask's classes drawn over it: RGB, row-major, each foreground
/// pixel blended with its class's colour at [`OVERLAY_OPACITY`]. `grey` and `classes` are the
/// same length.
pub fn overlay(grey: &[u8], classes: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(grey.len() * 3);
    for (&g, &c) in grey.iter().zip(classes) {
        match overlay_colour(usize::from(c)) {
            Some(colour) => rgb.extend(colour.map(|k| {
                (f32::from(g) * (1.0 - OVERLAY_OPACITY) + f32::from(k) * OVERLAY_OPACITY).round()
                    as u8
            })),
            None => rgb.extend([g, g, g]),
        }
    }
    rgb
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
    /// Segmentation data: the synthetic image's mask, generated with it, as a PNG (8-bit grey,
    /// same size) whose pixel values are the plan's classes (0 the background, 1 the plan's
    /// second mask value, …), base64. None for a classifier's preview.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_png_base64: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_background_stays_grey_and_each_class_takes_its_colour() {
        assert_eq!(overlay_colour(0), None);
        assert_eq!(overlay_css(1).as_deref(), Some("#e69f00"));
        assert_eq!(overlay_css(2).as_deref(), Some("#56b4e9"));
        // The palette repeats after its seven colours.
        assert_eq!(overlay_colour(8), overlay_colour(1));
        // Background pixels keep their grey; a class-1 pixel of grey 101 becomes
        // 0.55·101 + 0.45·(230, 159, 0), rounded.
        let rgb = overlay(&[100, 101, 200], &[0, 1, 2]);
        assert_eq!(&rgb[..3], &[100, 100, 100]);
        assert_eq!(&rgb[3..6], &[159, 127, 56]);
        assert_eq!(&rgb[6..], &[149, 191, 215]);
    }
}
