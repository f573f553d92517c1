//! Data handlers: a site's local images (PNG/JPEG, DICOM, NIfTI) with their labels, as
//! square greyscale images in [0, 1]. A file that can't be used is skipped and counted with
//! its reason; it never stops the worker.

use consilium_core::protocol::Skipped;
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use dicom_pixeldata::PixelDecoder;
use image::imageops::FilterType;
use image::{ImageBuffer, Luma};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// A folder of PNG or JPEG files.
    Images,
    /// DICOM files (any folder depth).
    Dicom,
    /// NIfTI-1 volumes (`.nii`, `.nii.gz`), sliced to 2-D.
    Nifti,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LabelKey {
    /// The labels CSV's first column is the file's path relative to the data folder.
    #[default]
    Path,
    /// The first column is the DICOM SOP Instance UID.
    SopInstanceUid,
}

/// A site's dataset, as its worker configuration declares it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub kind: DataKind,
    pub root: PathBuf,
    /// CSV with a header and two columns: key (see `label_key`) and an integer label.
    pub labels: PathBuf,
    #[serde(default)]
    pub label_key: LabelKey,
    /// Fraction of the data held out for evaluation (chosen by a hash of each file's key).
    #[serde(default = "default_holdout")]
    pub holdout: f64,
    /// DICOM window (centre, width); by default the file's own, else min–max.
    #[serde(default)]
    pub window: Option<(f64, f64)>,
}

fn default_holdout() -> f64 {
    0.2
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Row-major, `size × size`, values in [0, 1].
    pub pixels: Vec<f32>,
    pub label: u32,
    /// File (and frame or slice) it came from.
    pub source: String,
    pub holdout: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub size: usize,
    pub samples: Vec<Sample>,
    pub skipped: Vec<Skipped>,
}

impl Dataset {
    pub fn train(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| !s.holdout)
    }
    pub fn holdout(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.holdout)
    }
    pub fn summary(&self, kind: DataKind) -> String {
        format!(
            "{} images ({:?}, {} held out), {} skipped",
            self.samples.len(),
            kind,
            self.holdout().count(),
            self.skipped.len()
        )
        .to_lowercase()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read the labels file {path}: {reason}")]
    Labels { path: String, reason: String },
    #[error("cannot read the data folder {path}: {reason}")]
    Folder { path: String, reason: String },
}

fn in_holdout(key: &str, fraction: f64) -> bool {
    let digest = consilium_core::hash::sha256_hex(key.as_bytes());
    let bucket = u64::from_str_radix(&digest[..8], 16).unwrap_or(0) % 10_000;
    (bucket as f64) < fraction * 10_000.0
}

fn read_labels(path: &Path) -> Result<BTreeMap<String, u32>, DataError> {
    let fail = |reason: String| DataError::Labels {
        path: path.display().to_string(),
        reason,
    };
    let mut reader = csv::Reader::from_path(path).map_err(|e| fail(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (i, row) in reader.records().enumerate() {
        let row = row.map_err(|e| fail(e.to_string()))?;
        let (Some(key), Some(label)) = (row.get(0), row.get(1)) else {
            return Err(fail(format!(
                "row {} needs two columns: file and label",
                i + 2
            )));
        };
        let label: u32 = label.trim().parse().map_err(|_| {
            fail(format!(
                "row {}: the label {label:?} is not a whole number ≥ 0",
                i + 2
            ))
        })?;
        out.insert(key.trim().to_string(), label);
    }
    Ok(out)
}

/// Resizes a greyscale image to `size × size` and scales it to [0, 1] (min–max), unless it
/// is already windowed to [0, 1].
fn to_square(
    width: u32,
    height: u32,
    pixels: Vec<f32>,
    size: usize,
    already_unit: bool,
) -> Result<Vec<f32>, String> {
    let img: ImageBuffer<Luma<f32>, Vec<f32>> = ImageBuffer::from_raw(width, height, pixels)
        .ok_or("the pixel buffer does not match the image size")?;
    let resized = image::imageops::resize(&img, size as u32, size as u32, FilterType::Triangle);
    let mut data = resized.into_raw();
    if !already_unit {
        let (lo, hi) = data
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        if !lo.is_finite() || !hi.is_finite() {
            return Err("the image holds values that are not finite".into());
        }
        let range = if hi > lo { hi - lo } else { 1.0 };
        data.iter_mut().for_each(|v| *v = (*v - lo) / range);
    }
    data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    Ok(data)
}

fn files_under(root: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| DataError::Folder {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn relative(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Loads a site's dataset at `size × size`.
pub fn load(spec: &DatasetSpec, size: usize) -> Result<Dataset, DataError> {
    let labels = read_labels(&spec.labels)?;
    let mut ds = Dataset {
        size,
        ..Default::default()
    };
    let labels_file = spec.labels.canonicalize().ok();
    for path in files_under(&spec.root)? {
        if path.canonicalize().ok() == labels_file {
            continue;
        }
        let rel = relative(&spec.root, &path);
        if spec.label_key == LabelKey::Path && !labels.contains_key(&rel) {
            ds.skipped.push(Skipped {
                file: rel,
                reason: "no label for it in the labels file".into(),
            });
            continue;
        }
        let result = match spec.kind {
            DataKind::Images => {
                read_image(&path, size).map(|px| vec![(rel.clone(), px, Some(rel.clone()))])
            }
            DataKind::Dicom => read_dicom(&path, &rel, size, spec),
            DataKind::Nifti => read_nifti(&path, &rel, size),
        };
        match result {
            Err(reason) => ds.skipped.push(Skipped { file: rel, reason }),
            Ok(images) => {
                for (source, pixels, key) in images {
                    let key = match spec.label_key {
                        LabelKey::Path => Some(rel.clone()),
                        LabelKey::SopInstanceUid => key.filter(|k| *k != rel),
                    };
                    match key.as_ref().and_then(|k| labels.get(k)) {
                        Some(&label) => {
                            let holdout = in_holdout(&rel, spec.holdout);
                            ds.samples.push(Sample {
                                pixels,
                                label,
                                source,
                                holdout,
                            });
                        }
                        None => {
                            ds.skipped.push(Skipped {
                                file: source,
                                reason: "no label for it in the labels file".into(),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(ds)
}

fn read_image(path: &Path, size: usize) -> Result<Vec<f32>, String> {
    let img = image::open(path).map_err(|e| format!("not a readable PNG or JPEG image: {e}"))?;
    let grey = img.to_luma32f();
    let (w, h) = grey.dimensions();
    to_square(w, h, grey.into_raw(), size, true)
}

type Images = Vec<(String, Vec<f32>, Option<String>)>;

fn read_dicom(path: &Path, rel: &str, size: usize, spec: &DatasetSpec) -> Result<Images, String> {
    let obj = match OpenFileOptions::new()
        .read_preamble(ReadPreamble::Auto)
        .open_file(path)
    {
        Ok(obj) => obj,
        // A legacy file without preamble and file meta: a bare data set in implicit VR
        // little endian, DICOM's default transfer syntax.
        Err(e) => {
            legacy_dicom(path).ok_or_else(|| format!("not a readable DICOM file: {}", chain(&e)))?
        }
    };
    let text = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim().to_string())
    };
    let modality = text(tags::MODALITY).unwrap_or_default();
    if modality == "SEG" {
        return Err("a segmentation object (SEG), not an image to train on".into());
    }
    if obj.element(tags::PIXEL_DATA).is_err() {
        return Err(format!(
            "no pixel data ({} object)",
            if modality.is_empty() {
                "non-image"
            } else {
                &modality
            }
        ));
    }
    let sop_uid = text(tags::SOP_INSTANCE_UID);
    let decoded = obj
        .decode_pixel_data()
        .map_err(|e| format!("pixel data can't be decoded: {}", chain(&e)))?;
    let (w, h) = (decoded.columns(), decoded.rows());
    let samples = usize::from(decoded.samples_per_pixel());
    let monochrome1 = decoded.photometric_interpretation().as_str() == "MONOCHROME1";
    let window = spec.window.or_else(|| {
        let c = obj
            .element(tags::WINDOW_CENTER)
            .ok()?
            .to_multi_float64()
            .ok()?
            .first()
            .copied()?;
        let w = obj
            .element(tags::WINDOW_WIDTH)
            .ok()?
            .to_multi_float64()
            .ok()?
            .first()
            .copied()?;
        (w > 0.0).then_some((c, w))
    });
    let mut out = Vec::new();
    for frame in 0..decoded.number_of_frames() {
        let values: Vec<f32> = decoded
            .to_vec_frame(frame)
            .map_err(|e| format!("frame {frame} can't be converted: {e}"))?;
        let expected = (w * h) as usize * samples;
        if values.len() < expected {
            return Err(format!(
                "frame {frame} is cut short: {} of {expected} values",
                values.len()
            ));
        }
        // Colour images become greyscale (luminance).
        let mut grey: Vec<f32> = if samples == 3 {
            values
                .chunks_exact(3)
                .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
                .collect()
        } else {
            values[..(w * h) as usize].to_vec()
        };
        let windowed = match window {
            Some((c, width)) => {
                let (lo, width) = ((c - width / 2.0) as f32, width as f32);
                grey.iter_mut()
                    .for_each(|v| *v = ((*v - lo) / width).clamp(0.0, 1.0));
                true
            }
            None => false,
        };
        let mut pixels = to_square(w, h, grey, size, windowed)?;
        if monochrome1 {
            pixels.iter_mut().for_each(|v| *v = 1.0 - *v);
        }
        let source = if decoded.number_of_frames() > 1 {
            format!("{rel}#frame{frame}")
        } else {
            rel.to_string()
        };
        out.push((source, pixels, sop_uid.clone()));
    }
    Ok(out)
}

fn legacy_dicom(path: &Path) -> Option<dicom_object::DefaultDicomObject> {
    use dicom_object::InMemDicomObject;
    use dicom_object::meta::FileMetaTableBuilder;
    use dicom_transfer_syntax_registry::entries::{
        EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
    };
    let bytes = std::fs::read(path).ok()?;
    if bytes.get(128..132) == Some(b"DICM") {
        return None; // a proper file whose content is broken: keep its own error
    }
    // A bare data set starts with a group 0008 element; some writers leave a stray byte first.
    let offset = (0..4).find(|&o| bytes.get(o..o + 2) == Some(&[0x08, 0x00]))?;
    let explicit = bytes
        .get(offset + 4..offset + 6)
        .is_some_and(|vr| vr.iter().all(u8::is_ascii_uppercase));
    let ts = if explicit {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    } else {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    };
    let ds = InMemDicomObject::read_dataset_with_ts(&bytes[offset..], &ts).ok()?;
    // Only a data set that looks like an image counts; anything else keeps its first error.
    if ds.get(tags::SOP_CLASS_UID).is_none()
        || ds.get(tags::ROWS).is_none()
        || ds.get(tags::PIXEL_DATA).is_none()
    {
        return None;
    }
    ds.with_meta(FileMetaTableBuilder::new().transfer_syntax(ts.uid()))
        .ok()
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn read_nifti(path: &Path, rel: &str, size: usize) -> Result<Images, String> {
    use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
    let name = path.to_string_lossy();
    if !(name.ends_with(".nii") || name.ends_with(".nii.gz")) {
        return Err("not a NIfTI file (.nii or .nii.gz)".into());
    }
    let obj = ReaderOptions::new().read_file(path).map_err(|e| {
        format!("not a readable NIfTI-1 volume ({e}); NIfTI-2 files are not supported: convert them to NIfTI-1, e.g. with nibabel")
    })?;
    let volume = obj
        .into_volume()
        .into_ndarray::<f32>()
        .map_err(|e| format!("the volume can't be read: {e}"))?;
    let shape = volume.shape().to_vec();
    if shape.len() < 2 {
        return Err(format!(
            "a volume of {} dimension(s) has no 2-D slices",
            shape.len()
        ));
    }
    let (nx, ny) = (shape[0], shape[1]);
    let nz = shape.get(2).copied().unwrap_or(1);
    let mut out = Vec::new();
    for z in 0..nz {
        // The first time point of a 4-D series; x runs fastest in the slice.
        let mut slice = Vec::with_capacity(nx * ny);
        for y in 0..ny {
            for x in 0..nx {
                let mut idx = vec![x, y];
                idx.extend(std::iter::repeat_n(0, shape.len() - 2));
                if shape.len() > 2 {
                    idx[2] = z;
                }
                slice.push(volume.get(idx.as_slice()).copied().unwrap_or(0.0));
            }
        }
        let (lo, hi) = slice
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        if hi <= lo {
            continue; // an empty slice carries nothing to learn from
        }
        let pixels = to_square(nx as u32, ny as u32, slice, size, false)?;
        out.push((format!("{rel}#z{z}"), pixels, None));
    }
    if out.is_empty() {
        return Err("every slice is empty".into());
    }
    Ok(out)
}

/// The per-source lookup used by tests and reports.
pub fn by_source(ds: &Dataset) -> HashMap<&str, &Sample> {
    ds.samples.iter().map(|s| (s.source.as_str(), s)).collect()
}
