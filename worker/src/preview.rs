//! Synthetic previews of a site's data (lifecycle: researchers see what the data looks like
//! without seeing it). At the site: a generator fitted to the site's images per class, a
//! memorisation check before anything may leave, and an aggregated metadata summary with
//! small counts suppressed and no identifying DICOM attribute read at all.
//!
//! The generator here is the fast one the issue calls the fallback for small datasets: per
//! class, the mean image plus a Gaussian over its leading principal components (found by
//! subspace iteration, so only `components` directions are ever computed).

use std::collections::BTreeMap;
use std::path::Path;

use consilium_core::plan::Segmentation;
pub use consilium_core::preview::{
    Count, MAX_PREVIEW_CLASSES, MemorisationReport, MetadataSummary,
};
use serde::{Deserialize, Serialize};

use crate::train::Rng;

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error(
        "class {label} has {count} training image(s); a preview needs at least {needed} per class"
    )]
    TooFew {
        label: u32,
        count: usize,
        needed: usize,
    },
    #[error("images of different sizes ({0} and {1} pixels); load them at one size")]
    Sizes(usize, usize),
}

/// A Gaussian over the leading principal components of one class's images.
#[derive(Clone, Debug)]
pub struct PcaGaussian {
    mean: Vec<f32>,
    /// Unit directions, each `mean.len()` long.
    components: Vec<Vec<f32>>,
    /// Standard deviation of the data along each direction.
    scales: Vec<f32>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalise(v: &mut [f32]) -> f32 {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    n
}

pub const MIN_PER_CLASS: usize = 3;

impl PcaGaussian {
    /// Fits to `images` (each `size × size`, values in [0, 1]), keeping at most `components`
    /// directions (fewer when the class has fewer images).
    pub fn fit(images: &[&[f32]], components: usize, seed: u64) -> Result<Self, PreviewError> {
        let d = images.first().map_or(0, |i| i.len());
        if let Some(bad) = images.iter().find(|i| i.len() != d) {
            return Err(PreviewError::Sizes(d, bad.len()));
        }
        let n = images.len();
        let mut mean = vec![0f32; d];
        for img in images {
            mean.iter_mut()
                .zip(img.iter())
                .for_each(|(m, x)| *m += x / n as f32);
        }
        let centred: Vec<Vec<f32>> = images
            .iter()
            .map(|img| img.iter().zip(&mean).map(|(x, m)| x - m).collect())
            .collect();
        let k = components.min(n.saturating_sub(1)).max(1);
        let mut rng = Rng::new(seed);
        let mut basis: Vec<Vec<f32>> = (0..k)
            .map(|_| (0..d).map(|_| rng.normal() as f32).collect())
            .collect();
        // Subspace iteration on the covariance Xᵀ X: basis ← orth(Xᵀ (X basis)).
        for _ in 0..12 {
            for v in basis.iter_mut() {
                let projections: Vec<f32> = centred.iter().map(|x| dot(x, v)).collect();
                let mut next = vec![0f32; d];
                for (x, p) in centred.iter().zip(&projections) {
                    next.iter_mut().zip(x).for_each(|(o, xi)| *o += p * xi);
                }
                *v = next;
            }
            // Gram–Schmidt.
            for i in 0..basis.len() {
                for j in 0..i {
                    let (head, tail) = basis.split_at_mut(i);
                    let c = dot(&tail[0], &head[j]);
                    tail[0]
                        .iter_mut()
                        .zip(&head[j])
                        .for_each(|(a, b)| *a -= c * b);
                }
                normalise(&mut basis[i]);
            }
        }
        let scales = basis
            .iter()
            .map(|v| {
                let var: f32 =
                    centred.iter().map(|x| dot(x, v).powi(2)).sum::<f32>() / (n.max(2) - 1) as f32;
                var.sqrt()
            })
            .collect();
        Ok(PcaGaussian {
            mean,
            components: basis,
            scales,
        })
    }

    /// One new image: the mean plus a random combination of the components, clamped to [0, 1].
    pub fn sample(&self, rng: &mut Rng) -> Vec<f32> {
        let mut img = self.mean.clone();
        for (v, s) in self.components.iter().zip(&self.scales) {
            let z = rng.normal() as f32 * s;
            img.iter_mut().zip(v).for_each(|(p, c)| *p += z * c);
        }
        img.iter_mut().for_each(|p| *p = p.clamp(0.0, 1.0));
        img
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreviewImage {
    pub label: u32,
    /// Row-major, `size × size`, values in [0, 1].
    pub pixels: Vec<f32>,
}

/// `per_class` synthetic images for each class of `train` (label, pixels), class by class.
pub fn generate(
    train: &[(u32, &[f32])],
    per_class: usize,
    components: usize,
    seed: u64,
) -> Result<Vec<PreviewImage>, PreviewError> {
    let mut classes: BTreeMap<u32, Vec<&[f32]>> = BTreeMap::new();
    for (label, px) in train {
        classes.entry(*label).or_default().push(px);
    }
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut out = Vec::new();
    for (label, images) in classes {
        if images.len() < MIN_PER_CLASS {
            return Err(PreviewError::TooFew {
                label,
                count: images.len(),
                needed: MIN_PER_CLASS,
            });
        }
        let model = PcaGaussian::fit(&images, components, seed.wrapping_add(u64::from(label)))?;
        for _ in 0..per_class {
            out.push(PreviewImage {
                label,
                pixels: model.sample(&mut rng),
            });
        }
    }
    Ok(out)
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

pub const DEFAULT_DCR_THRESHOLD: f64 = 0.5;

pub fn memorisation_check(
    real: &[&[f32]],
    synthetic: &[&[f32]],
    threshold: f64,
) -> MemorisationReport {
    let mut real_nn: Vec<f64> = real
        .iter()
        .enumerate()
        .map(|(i, a)| {
            real.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, b)| distance(a, b))
                .fold(f64::INFINITY, f64::min)
        })
        .filter(|d| d.is_finite())
        .collect();
    real_nn.sort_by(f64::total_cmp);
    let real_nn_median = real_nn.get(real_nn.len() / 2).copied().unwrap_or(0.0);
    let ratios: Vec<f64> = synthetic
        .iter()
        .map(|s| {
            let closest = real
                .iter()
                .map(|r| distance(s, r))
                .fold(f64::INFINITY, f64::min);
            if real_nn_median > 0.0 {
                closest / real_nn_median
            } else {
                0.0
            }
        })
        .collect();
    let flagged = ratios
        .iter()
        .enumerate()
        .filter(|(_, r)| **r < threshold)
        .map(|(i, _)| i)
        .collect();
    MemorisationReport {
        real_nn_median,
        ratios,
        flagged,
        threshold,
    }
}

fn counts(map: BTreeMap<String, u64>, k: u64) -> Vec<Count> {
    map.into_iter()
        .map(|(value, n)| Count {
            value,
            count: (n >= k).then_some(n),
        })
        .collect()
}

/// Like `counts`, but a value seen fewer than k times is not named at all (a rare scanner can
/// point at a small hospital): such values are pooled as "other".
fn merge_rare(map: BTreeMap<String, u64>, k: u64) -> Vec<Count> {
    let mut out = BTreeMap::new();
    for (value, n) in map {
        let key = if n >= k { value } else { "other".to_string() };
        *out.entry(key).or_insert(0) += n;
    }
    counts(out, k)
}

/// Summarises DICOM files and their labels. Only these attributes are ever read: Modality,
/// Rows, Columns, Pixel Spacing, Manufacturer — no name, id, date or institution, so none can
/// leave the site.
pub fn summarise_dicom(files: &[(&Path, u32)], k: u64) -> MetadataSummary {
    use dicom_dictionary_std::tags;
    let mut modalities = BTreeMap::new();
    let mut sizes = BTreeMap::new();
    let mut spacings = BTreeMap::new();
    let mut makers = BTreeMap::new();
    let mut labels = BTreeMap::new();
    let mut unreadable = 0;
    for (path, label) in files {
        *labels.entry(label.to_string()).or_insert(0) += 1;
        let Ok(obj) = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
        else {
            unreadable += 1;
            continue;
        };
        let text = |tag| {
            obj.element(tag)
                .ok()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let number = |tag| obj.element(tag).ok().and_then(|e| e.to_int::<u32>().ok());
        *modalities
            .entry(text(tags::MODALITY).unwrap_or_else(|| "unknown".into()))
            .or_insert(0) += 1;
        let size = match (number(tags::ROWS), number(tags::COLUMNS)) {
            (Some(r), Some(c)) => format!("{r}×{c}"),
            _ => "unknown".into(),
        };
        *sizes.entry(size).or_insert(0) += 1;
        let spacing = obj
            .element(tags::PIXEL_SPACING)
            .ok()
            .and_then(|e| e.to_multi_float64().ok())
            .map(|v| {
                v.iter()
                    .map(|x| format!("{x:.1}"))
                    .collect::<Vec<_>>()
                    .join("×")
            })
            .unwrap_or_else(|| "unknown".into());
        *spacings.entry(spacing).or_insert(0) += 1;
        *makers
            .entry(text(tags::MANUFACTURER).unwrap_or_else(|| "unknown".into()))
            .or_insert(0) += 1;
    }
    MetadataSummary {
        k,
        files: files.len() as u64,
        modalities: counts(modalities, k),
        image_sizes: counts(sizes, k),
        pixel_spacings: counts(spacings, k),
        manufacturers: merge_rare(makers, k),
        labels: counts(labels, k),
        unreadable,
    }
}

/// A summary for image files without DICOM metadata (PNG, NIfTI): the labels, and the
/// number of files.
pub fn summarise_labels(labels: &[u32], files: u64, k: u64) -> MetadataSummary {
    let mut map = BTreeMap::new();
    for l in labels {
        *map.entry(l.to_string()).or_insert(0) += 1;
    }
    MetadataSummary {
        k,
        files,
        labels: counts(map, k),
        ..MetadataSummary::default()
    }
}

fn png(pixels: &[f32], size: u32) -> Result<Vec<u8>, String> {
    let bytes: Vec<u8> = pixels
        .iter()
        .map(|p| (p.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    grey_png(bytes, size)
}

fn grey_png(bytes: Vec<u8>, size: u32) -> Result<Vec<u8>, String> {
    let img = image::GrayImage::from_raw(size, size, bytes)
        .ok_or_else(|| "a synthetic image has the wrong number of pixels".to_string())?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| format!("a synthetic image could not be encoded: {e}"))?;
    Ok(out.into_inner())
}

/// A private preview's DP-SGD, as the site's ledger recorded it before training.
pub struct Private {
    pub step: crate::train::DpStep,
    /// ε the generator's training spends, at the preview's δ.
    pub epsilon: f64,
}

/// Segmentation data for the generators: each image followed by its mask as one channel per
/// class (1 where the pixel is of that class, else 0), so that a generator fitted to these
/// learns images and masks together and draws them as pairs.
fn joint(data: &crate::data::Dataset, seg: &Segmentation) -> Result<Vec<Vec<f32>>, String> {
    let classes = seg.values.len();
    if classes > MAX_PREVIEW_CLASSES {
        return Err(format!(
            "the plan names {classes} mask classes; a preview draws masks of at most {MAX_PREVIEW_CLASSES} (each class is a channel the generator learns)"
        ));
    }
    data.train()
        .map(|s| {
            let mask = crate::train::mask_classes(s, seg).map_err(|e| e.to_string())?;
            let mut v = Vec::with_capacity(s.pixels.len() * (1 + classes));
            v.extend_from_slice(&s.pixels);
            for c in 0..classes as u32 {
                v.extend(mask.iter().map(|&m| if m == c { 1.0 } else { 0.0 }));
            }
            Ok(v)
        })
        .collect()
}

/// Splits a generated joint vector (see `joint`) into its image and its mask: each pixel's
/// class is the channel drawn strongest there.
fn split(joint: &[f32], pixels: usize, classes: usize) -> (Vec<f32>, Vec<u8>) {
    let image = joint[..pixels].to_vec();
    let mask = (0..pixels)
        .map(|p| {
            (0..classes)
                .map(|c| joint[pixels * (1 + c) + p])
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (c, v)| {
                    if v > best.1 { (c, v) } else { best }
                })
                .0 as u8
        })
        .collect();
    (image, mask)
}

/// What a segmentation preview's summary counts per class: the training images that show it.
fn images_per_class(data: &crate::data::Dataset, seg: &Segmentation) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in data.train() {
        let mut seen = vec![false; seg.values.len()];
        for v in s.mask.iter().flatten() {
            if let Some(c) = seg.class_of(*v) {
                seen[usize::from(c)] = true;
            }
        }
        for (name, _) in seg.names.iter().zip(&seen).filter(|(_, s)| **s) {
            *out.entry(name.clone()).or_insert(0) += 1;
        }
    }
    out
}

/// Builds what leaves the site for a preview job: generated images, minus those the
/// memorisation check flags, the check's figures and the metadata summary. `root` is the
/// folder of the dataset's files, `dicom` whether they are DICOM (for the summary). With `segmentation` (the plan's mask classes) each image is generated with its mask,
/// the memorisation check compares the images alone, and the summary counts the images that
/// show each class.
pub fn build_set(
    data: &crate::data::Dataset,
    spec: &consilium_core::preview::PreviewSpec,
    root: &Path,
    dicom: bool,
    seed: u64,
    private: Option<&Private>,
    segmentation: Option<&Segmentation>,
) -> Result<(consilium_core::preview::PreviewSet, u32), String> {
    use base64::Engine as _;
    let joint = segmentation.map(|seg| joint(data, seg)).transpose()?;
    let examples: Vec<crate::cvae::Example> = data
        .train()
        .enumerate()
        .map(|(i, s)| {
            let values = joint.as_ref().map_or(s.pixels.as_slice(), |j| &j[i]);
            (s.label, values, s.unit.as_str())
        })
        .collect();
    let train: Vec<(u32, &[f32])> = examples.iter().map(|(l, p, _)| (*l, *p)).collect();
    if train.is_empty() {
        return Err("the site has no training images to preview".into());
    }
    let mut per_class: BTreeMap<u32, usize> = BTreeMap::new();
    for (l, _) in &train {
        *per_class.entry(*l).or_insert(0) += 1;
    }
    let fewest = per_class.values().copied().min().unwrap_or(0);
    let vae = match spec.generator.as_deref() {
        Some("cvae") => true,
        Some("pca_gaussian") if private.is_some() => {
            return Err(
                "pca_gaussian cannot be trained with DP-SGD; a private preview uses cvae".into(),
            );
        }
        Some("pca_gaussian") => false,
        Some(other) => {
            return Err(format!(
                "unknown generator {other:?}: use cvae or pca_gaussian"
            ));
        }
        None => private.is_some() || fewest >= crate::cvae::MIN_PER_CLASS,
    };
    let (generated, generator) = if vae {
        if fewest < MIN_PER_CLASS {
            return Err(format!(
                "a class has {fewest} training image(s); a preview needs at least {MIN_PER_CLASS} per class"
            ));
        }
        let images = crate::cvae::generate(
            &examples,
            spec.per_class as usize,
            crate::cvae::STEPS,
            seed,
            private.map(|p| &p.step),
        )
        .map_err(|e| format!("the generator could not be trained: {e}"))?;
        (images, "cvae")
    } else {
        let images =
            generate(&train, spec.per_class as usize, 16, seed).map_err(|e| e.to_string())?;
        (images, "pca_gaussian")
    };
    let pixels = data.size * data.size;
    let generated: Vec<(PreviewImage, Option<Vec<u8>>)> = generated
        .into_iter()
        .map(|g| match segmentation {
            Some(seg) => {
                let (image, mask) = split(&g.pixels, pixels, seg.values.len());
                (
                    PreviewImage {
                        label: g.label,
                        pixels: image,
                    },
                    Some(mask),
                )
            }
            None => (g, None),
        })
        .collect();
    let real: Vec<&[f32]> = data.train().map(|s| s.pixels.as_slice()).collect();
    let synthetic: Vec<&[f32]> = generated.iter().map(|(g, _)| g.pixels.as_slice()).collect();
    let memorisation = memorisation_check(&real, &synthetic, DEFAULT_DCR_THRESHOLD);
    let mut images = Vec::new();
    let encode = |png: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(png);
    for (i, (g, mask)) in generated.iter().enumerate() {
        if memorisation.flagged.contains(&i) {
            continue;
        }
        images.push(consilium_core::preview::PreviewImageData {
            label: g.label,
            png_base64: encode(png(&g.pixels, data.size as u32)?),
            mask_png_base64: match mask {
                // Pixel value = class.
                Some(m) => Some(encode(grey_png(m.clone(), data.size as u32)?)),
                None => None,
            },
        });
    }
    let withheld = memorisation.flagged.len() as u32;
    let labels: Vec<u32> = data.train().map(|s| s.label).collect();
    let summary = match dicom {
        true => {
            let mut files: BTreeMap<String, u32> = BTreeMap::new();
            for s in data.train() {
                let file = s.source.split('#').next().unwrap_or(&s.source).to_string();
                files.entry(file).or_insert(s.label);
            }
            let paths: Vec<(std::path::PathBuf, u32)> =
                files.into_iter().map(|(f, l)| (root.join(f), l)).collect();
            let refs: Vec<(&Path, u32)> = paths.iter().map(|(p, l)| (p.as_path(), *l)).collect();
            let mut s = summarise_dicom(&refs, spec.k);
            // Labels per image (a multi-frame file has several), not per file.
            s.labels = summarise_labels(&labels, 0, spec.k).labels;
            s
        }
        false => {
            let files = data
                .train()
                .map(|s| s.source.split('#').next().unwrap_or(&s.source))
                .collect::<std::collections::BTreeSet<_>>();
            let mut sizes = BTreeMap::new();
            for f in &files {
                let size = image::image_dimensions(root.join(f))
                    .map(|(w, h)| format!("{h}×{w}"))
                    .unwrap_or_else(|_| "unknown".into());
                *sizes.entry(size).or_insert(0) += 1;
            }
            let mut s = summarise_labels(&labels, files.len() as u64, spec.k);
            s.image_sizes = counts(sizes, spec.k);
            s
        }
    };
    let summary = match segmentation {
        Some(seg) => MetadataSummary {
            labels: counts(images_per_class(data, seg), spec.k),
            ..summary
        },
        None => summary,
    };
    Ok((
        consilium_core::preview::PreviewSet {
            generator: generator.into(),
            epsilon: private.map(|p| p.epsilon),
            image_size: data.size as u32,
            images,
            memorisation,
            summary,
        },
        withheld,
    ))
}
