//! Data handlers: a site's local images (PNG/JPEG, DICOM, NIfTI) with their labels — a class
//! per image, or a mask per image for segmentation — as square greyscale images in [0, 1]. A
//! file that can't be used is skipped and counted with its reason; it never stops the worker.
//! Files, masks included, are decoded in a child process ([`crate::decode`]), so that not even
//! a crashing codec can.

use crate::decode::{DecodeLimits, Decoder};
use consilium_core::protocol::Skipped;
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
use image::imageops::FilterType;
use image::{ImageBuffer, Luma};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// A folder of PNG or JPEG files.
    Images,
    /// DICOM files (any folder depth).
    Dicom,
    /// NIfTI-1 and NIfTI-2 volumes (`.nii`, `.nii.gz`), sliced to 2-D.
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
    /// CSV with a header and two columns: key (see `label_key`) and an integer label — or,
    /// with `masks`, the image's mask file.
    pub labels: PathBuf,
    /// Segmentation data: the labels CSV's second column is each image's mask, a path
    /// relative to the data folder (a PNG of label values, or a NIfTI label volume with its
    /// image volume's geometry), not a class.
    #[serde(default)]
    pub masks: bool,
    #[serde(default)]
    pub label_key: LabelKey,
    /// Fraction of the data held out for evaluation (chosen by a hash of each file's key).
    #[serde(default = "default_holdout")]
    pub holdout: f64,
    /// DICOM window (centre, width); by default the file's own, else min–max.
    #[serde(default)]
    pub window: Option<(f64, f64)>,
    /// Time and memory allowed for decoding one file.
    #[serde(default)]
    pub decoding: DecodeLimits,
}

fn default_holdout() -> f64 {
    0.2
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Row-major, `size × size`, values in [0, 1].
    pub pixels: Vec<f32>,
    /// The image's class (0 for an image with a mask).
    pub label: u32,
    /// Segmentation data: the mask's values at each pixel (row-major, `size × size`, resized
    /// by nearest neighbour), as stored; the plan's `model.labels` maps them to classes.
    pub mask: Option<Vec<u16>>,
    /// File (and frame or slice) it came from.
    pub source: String,
    pub holdout: bool,
    /// The unit of privacy this image belongs to (its patient), known at the site only: the
    /// labels CSV's `group`, else the DICOM PatientID, else its file (every slice of a NIfTI
    /// volume, every frame of a DICOM file). A unit's images stay on one side of the holdout
    /// split and are sampled and clipped together under DP-SGD. Never sent anywhere.
    pub unit: String,
}

#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub size: usize,
    pub samples: Vec<Sample>,
    pub skipped: Vec<Skipped>,
    /// Every file looked at, with its format and what came of it.
    pub files: Vec<FileReport>,
}

/// One file of the dataset: its format, and how many images it gave or why it gave none.
#[derive(Clone, Debug, PartialEq)]
pub struct FileReport {
    pub file: String,
    /// `DICOM <transfer syntax name> (<UID>)`, `NIfTI-1`, `NIfTI-2`, `PNG`, `JPEG`, …;
    /// `not decoded` for a file that had no label.
    pub format: String,
    /// The DICOM modality, where there is one.
    pub modality: Option<String>,
    pub images: usize,
    pub skipped: Option<String>,
}

/// How many patients (units of privacy) these samples belong to.
pub fn patients<'a>(samples: impl Iterator<Item = &'a Sample>) -> u64 {
    samples
        .map(|s| s.unit.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64
}

impl Dataset {
    pub fn train(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| !s.holdout)
    }
    pub fn holdout(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.holdout)
    }
    /// Patients (the unit of privacy) in the training split.
    pub fn train_patients(&self) -> u64 {
        patients(self.train())
    }
    /// What the dataset's files yield, per format and modality: files read and skipped, images,
    /// and each skip reason with how many files had it (`consilium-worker check-data`).
    pub fn table(&self) -> String {
        #[derive(Default)]
        struct Row {
            read: usize,
            skipped: usize,
            images: usize,
            reasons: BTreeMap<String, usize>,
        }
        let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
        for f in &self.files {
            let key = (
                f.format.clone(),
                f.modality.clone().unwrap_or_else(|| "—".into()),
            );
            let row = rows.entry(key).or_default();
            row.images += f.images;
            match &f.skipped {
                Some(reason) => {
                    row.skipped += 1;
                    *row.reasons.entry(reason.clone()).or_default() += 1;
                }
                None => row.read += 1,
            }
        }
        let width = rows
            .keys()
            .map(|(f, _)| f.chars().count())
            .max()
            .unwrap_or(0)
            .max("format".len());
        let mut out = format!(
            "{:<width$}  {:<8}  {:>5}  {:>7}  {:>6}\n",
            "format", "modality", "read", "skipped", "images"
        );
        for ((format, modality), row) in &rows {
            out.push_str(&format!(
                "{format:<width$}  {modality:<8}  {:>5}  {:>7}  {:>6}\n",
                row.read, row.skipped, row.images
            ));
            for (reason, n) in &row.reasons {
                out.push_str(&format!("    {n} skipped: {reason}\n"));
            }
        }
        out.push_str(&self.mask_counts());
        out
    }

    /// Segmentation data: how many pixels of the masks (at the size read) hold each value, in
    /// the training and the held-out split; empty without masks.
    pub fn mask_counts(&self) -> String {
        let mut counts: BTreeMap<u16, [u64; 2]> = BTreeMap::new();
        for s in &self.samples {
            for &v in s.mask.iter().flatten() {
                counts.entry(v).or_default()[usize::from(s.holdout)] += 1;
            }
        }
        if counts.is_empty() {
            return String::new();
        }
        let mut out = format!(
            "mask value  pixels at {0} × {0}: training  held out\n",
            self.size
        );
        for (v, [train, holdout]) in counts {
            out.push_str(&format!("{v:>10}  {train:>27}  {holdout:>8}\n"));
        }
        out
    }

    pub fn summary(&self, kind: DataKind) -> String {
        let units: std::collections::BTreeSet<&str> =
            self.samples.iter().map(|s| s.unit.as_str()).collect();
        format!(
            "{} images of {} patients ({:?}, {} held out), {} skipped",
            self.samples.len(),
            units.len(),
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
    #[error("{reason}")]
    Settings { reason: String },
    #[error("cannot decode images: {reason}")]
    Decoder { reason: String },
}

/// One file to decode (what the worker sends its decoding child).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub kind: DataKind,
    pub path: PathBuf,
    /// The file's path relative to the data folder: the name images are reported under.
    pub rel: String,
    pub size: usize,
    pub window: Option<(f64, f64)>,
    /// A mask: its label values as stored (in `Image::pixels`, whole numbers), resized by
    /// nearest neighbour, every slice kept.
    #[serde(default)]
    pub mask: bool,
}

/// One image decoded from a file, at the requested size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Image {
    /// File (and frame or slice) it came from.
    pub source: String,
    pub pixels: Vec<f32>,
    /// The DICOM SOP Instance UID, for labels keyed by it.
    pub key: Option<String>,
    /// The DICOM PatientID: the image's unit of privacy. It goes from the decoding child to
    /// the worker, never further.
    #[serde(default)]
    pub patient: Option<String>,
    /// The file's geometry as stored: width, height and slices (or frames), which a mask
    /// must share with its image.
    #[serde(default)]
    pub geometry: Option<[u32; 3]>,
}

/// What decoding a file gave.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Decoded {
    pub format: String,
    pub modality: Option<String>,
    pub images: Result<Vec<Image>, String>,
}

impl Decoded {
    /// A file that gave nothing, for the reason given.
    pub fn failed(reason: String) -> Self {
        Decoded {
            format: "unrecognised".into(),
            modality: None,
            images: Err(reason),
        }
    }
}

/// Decodes one file in this process (the decoding child's work). `header` hears the file's
/// format and modality as soon as they are known, before the pixels are decoded.
pub fn decode_file(request: &Request, header: &mut dyn FnMut(&str, Option<&str>)) -> Decoded {
    let mut format = String::from("unrecognised");
    let mut modality = None;
    let mut heard = |f: &str, m: Option<&str>| {
        format = f.to_string();
        modality = m.map(str::to_string);
        header(f, m);
    };
    let Request {
        kind,
        path,
        rel,
        size,
        window,
        mask,
    } = request;
    let images = match kind {
        _ if *mask => read_mask(path, rel, *size, &mut heard),
        DataKind::Images => read_image(path, rel, *size, &mut heard),
        DataKind::Dicom => read_dicom(path, rel, *size, *window, &mut heard),
        DataKind::Nifti => read_nifti(path, rel, *size, &mut heard),
    };
    Decoded {
        format,
        modality,
        images,
    }
}

fn in_holdout(key: &str, fraction: f64) -> bool {
    let digest = consilium_core::hash::sha256_hex(key.as_bytes());
    let bucket = u64::from_str_radix(&digest[..8], 16).unwrap_or(0) % 10_000;
    (bucket as f64) < fraction * 10_000.0
}

/// A labels row: the label, and the patient (unit of privacy) when the CSV has a `group` column.
struct Label {
    label: u32,
    group: Option<String>,
}

/// A row of segmentation data's labels CSV: the image's mask file and its patient.
struct MaskRow {
    mask: String,
    group: Option<String>,
}

/// A labels CSV row: line number, key, second column and `group` (where the CSV has it).
type Row = (usize, String, String, Option<String>);

/// The labels CSV's rows. `second` names the second column in errors.
fn read_rows(path: &Path, second: &str) -> Result<Vec<Row>, DataError> {
    let fail = |reason: String| DataError::Labels {
        path: path.display().to_string(),
        reason,
    };
    let mut reader = csv::Reader::from_path(path).map_err(|e| fail(e.to_string()))?;
    let group_column = reader
        .headers()
        .map_err(|e| fail(e.to_string()))?
        .iter()
        .position(|h| h.trim().eq_ignore_ascii_case("group"));
    if group_column.is_some_and(|c| c < 2) {
        return Err(fail(format!(
            "the `group` column must come after the key and {second} columns"
        )));
    }
    let mut out = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let row = row.map_err(|e| fail(e.to_string()))?;
        let (Some(key), Some(value)) = (row.get(0), row.get(1)) else {
            return Err(fail(format!(
                "row {} needs two columns: file and {second}",
                i + 2
            )));
        };
        let group = match group_column.map(|c| row.get(c).map(str::trim)) {
            None => None,
            Some(Some(g)) if !g.is_empty() => Some(g.to_string()),
            Some(_) => {
                return Err(fail(format!(
                    "row {}: the `group` column is empty; give every row its patient (or leave the column out)",
                    i + 2
                )));
            }
        };
        out.push((
            i + 2,
            key.trim().to_string(),
            value.trim().to_string(),
            group,
        ));
    }
    Ok(out)
}

fn read_labels(path: &Path) -> Result<BTreeMap<String, Label>, DataError> {
    let mut out = BTreeMap::new();
    for (line, key, label, group) in read_rows(path, "label")? {
        let label: u32 = label.parse().map_err(|_| DataError::Labels {
            path: path.display().to_string(),
            reason: format!("row {line}: the label {label:?} is not a whole number ≥ 0"),
        })?;
        out.insert(key, Label { label, group });
    }
    Ok(out)
}

/// Segmentation data's labels CSV: each image's mask, a path inside the data folder.
fn read_mask_rows(path: &Path) -> Result<BTreeMap<String, MaskRow>, DataError> {
    let mut out = BTreeMap::new();
    for (line, key, mask, group) in read_rows(path, "mask")? {
        let inside = !mask.is_empty()
            && Path::new(&mask)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(DataError::Labels {
                path: path.display().to_string(),
                reason: format!(
                    "row {line}: the mask {mask:?} must be a path inside the data folder, relative to it (no `..`, not absolute)"
                ),
            });
        }
        out.insert(key, MaskRow { mask, group });
    }
    Ok(out)
}

/// The slice or frame an image or mask is of (`…#z3`, `…#frame3`; 0 for a single image).
fn plane(source: &str) -> u64 {
    source
        .rsplit_once('#')
        .and_then(|(_, p)| p.strip_prefix('z').or_else(|| p.strip_prefix("frame")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Each image's mask values from its mask file's decoded planes, or why the file can't be
/// used: the mask must have the image's geometry and a plane for every image.
fn pair_masks(
    images: &[Image],
    masks: Vec<Image>,
    mask_rel: &str,
) -> Result<Vec<Vec<u16>>, String> {
    let mut by_plane: HashMap<u64, Image> =
        masks.into_iter().map(|m| (plane(&m.source), m)).collect();
    let dims = |g: Option<[u32; 3]>| {
        g.map_or("unknown".to_string(), |[w, h, d]| {
            format!("{w} × {h} × {d}")
        })
    };
    images
        .iter()
        .map(|image| {
            let mask = by_plane.remove(&plane(&image.source)).ok_or_else(|| {
                format!("its mask {mask_rel} has no plane for {}", image.source)
            })?;
            if mask.geometry != image.geometry {
                return Err(format!(
                    "its mask {mask_rel} is {} and the image {}: a mask must have its image's geometry",
                    dims(mask.geometry),
                    dims(image.geometry)
                ));
            }
            Ok(mask.pixels.iter().map(|v| *v as u16).collect())
        })
        .collect()
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

/// Loads a site's dataset at `size × size`, each file decoded by `decoder`'s child process
/// (segmentation data's masks too).
pub fn load(spec: &DatasetSpec, size: usize, decoder: &Decoder) -> Result<Dataset, DataError> {
    spec.decoding
        .check()
        .map_err(|reason| DataError::Settings { reason })?;
    if spec.masks && spec.label_key != LabelKey::Path {
        return Err(DataError::Settings {
            reason: "segmentation data (masks = true) pairs each image with its mask by the image's path: set label_key = \"path\"".into(),
        });
    }
    let (labels, masks) = if spec.masks {
        (BTreeMap::new(), read_mask_rows(&spec.labels)?)
    } else {
        (read_labels(&spec.labels)?, BTreeMap::new())
    };
    let mask_files: std::collections::BTreeSet<&str> =
        masks.values().map(|m| m.mask.as_str()).collect();
    let mut ds = Dataset {
        size,
        ..Default::default()
    };
    let labels_file = spec.labels.canonicalize().ok();
    let mut session = decoder.session(spec.decoding);
    for path in files_under(&spec.root)? {
        if path.canonicalize().ok() == labels_file {
            continue;
        }
        let rel = relative(&spec.root, &path);
        if mask_files.contains(rel.as_str()) {
            continue; // read with its image
        }
        let listed = if spec.masks {
            masks.contains_key(&rel)
        } else {
            labels.contains_key(&rel)
        };
        if spec.label_key == LabelKey::Path && !listed {
            let reason = if spec.masks {
                "no mask for it in the labels file"
            } else {
                "no label for it in the labels file"
            }
            .to_string();
            ds.files.push(FileReport {
                file: rel.clone(),
                format: "not decoded".into(),
                modality: None,
                images: 0,
                skipped: Some(reason.clone()),
            });
            ds.skipped.push(Skipped { file: rel, reason });
            continue;
        }
        let decoded = session.decode(&Request {
            kind: spec.kind,
            path: path.clone(),
            rel: rel.clone(),
            size,
            window: spec.window,
            mask: false,
        })?;
        let mut report = FileReport {
            file: rel.clone(),
            format: decoded.format,
            modality: decoded.modality,
            images: 0,
            skipped: None,
        };
        // Segmentation data: the file's mask, decoded like it and paired plane by plane.
        let images = match (decoded.images, masks.get(&rel)) {
            (Ok(images), Some(row)) => {
                let mask = session.decode(&Request {
                    kind: spec.kind,
                    path: spec.root.join(&row.mask),
                    rel: row.mask.clone(),
                    size,
                    window: None,
                    mask: true,
                })?;
                mask.images
                    .map_err(|reason| format!("its mask {}: {reason}", row.mask))
                    .and_then(|m| pair_masks(&images, m, &row.mask))
                    .map(|m| images.into_iter().zip(m.into_iter().map(Some)).collect())
            }
            (images, _) => images.map(|i| i.into_iter().map(|i| (i, None)).collect::<Vec<_>>()),
        };
        match images {
            Err(reason) => {
                report.skipped = Some(reason.clone());
                ds.skipped.push(Skipped { file: rel, reason });
            }
            Ok(images) => {
                for (
                    Image {
                        source,
                        pixels,
                        key,
                        patient,
                        ..
                    },
                    mask,
                ) in images
                {
                    if pixels.len() != size * size
                        || mask.as_ref().is_some_and(|m| m.len() != size * size)
                    {
                        ds.skipped.push(Skipped {
                            file: source,
                            reason: format!(
                                "the decoder gave {} values for a {size} × {size} image",
                                pixels.len()
                            ),
                        });
                        continue;
                    }
                    let key = match spec.label_key {
                        LabelKey::Path => Some(rel.clone()),
                        LabelKey::SopInstanceUid => key.filter(|k| *k != rel),
                    };
                    let found = match (&mask, key.as_ref()) {
                        (Some(_), _) => masks.get(&rel).map(|m| (0, m.group.clone())),
                        (None, Some(k)) => labels.get(k).map(|l| (l.label, l.group.clone())),
                        (None, None) => None,
                    };
                    match found {
                        Some((label, group)) => {
                            // Units sharing a name merge, which only makes them larger.
                            let unit = group.or(patient).unwrap_or_else(|| rel.clone());
                            let holdout = in_holdout(&unit, spec.holdout);
                            report.images += 1;
                            ds.samples.push(Sample {
                                pixels,
                                label,
                                mask,
                                source,
                                holdout,
                                unit,
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
                if report.images == 0 {
                    report.skipped = Some("none of its images has a label".into());
                }
            }
        }
        ds.files.push(report);
    }
    Ok(ds)
}

/// Hears a file's format and modality as soon as they are known.
pub type Heard<'a> = &'a mut dyn FnMut(&str, Option<&str>);

fn read_image(path: &Path, rel: &str, size: usize, heard: Heard) -> Result<Vec<Image>, String> {
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("not a readable PNG or JPEG image: {e}"))?;
    if let Some(f) = reader.format() {
        heard(&format!("{f:?}").to_uppercase(), None);
    }
    let img = reader
        .decode()
        .map_err(|e| format!("not a readable PNG or JPEG image: {e}"))?;
    let grey = img.to_luma32f();
    let (w, h) = grey.dimensions();
    let pixels = to_square(w, h, grey.into_raw(), size, true)?;
    Ok(vec![Image {
        source: rel.to_string(),
        pixels,
        key: Some(rel.to_string()),
        patient: None,
        geometry: Some([w, h, 1]),
    }])
}

fn read_dicom(
    path: &Path,
    rel: &str,
    size: usize,
    window: Option<(f64, f64)>,
    heard: Heard,
) -> Result<Vec<Image>, String> {
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
    let uid = obj.meta().transfer_syntax().trim_end_matches('\0').trim();
    let ts_name = TransferSyntaxRegistry
        .get(uid)
        .map(|ts| ts.name().to_string())
        .unwrap_or_else(|| "unknown transfer syntax".into());
    heard(
        &format!("DICOM {ts_name} ({uid})"),
        (!modality.is_empty()).then_some(modality.as_str()),
    );
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
    let patient = text(tags::PATIENT_ID).filter(|p| !p.is_empty());
    let number = |tag| obj.element(tag).ok().and_then(|e| e.to_float64().ok());
    let monochrome1 = text(tags::PHOTOMETRIC_INTERPRETATION).as_deref() == Some("MONOCHROME1");
    // 12-bit JPEG goes to libjpeg-turbo; everything else to dicom-pixeldata.
    let twelve_bit_jpeg = uid == JPEG_EXTENDED && number(tags::BITS_STORED).unwrap_or(8.0) > 8.0;
    let (frames, decoded) = if twelve_bit_jpeg {
        (
            jpeg12_frames(
                &obj,
                number(tags::RESCALE_SLOPE),
                number(tags::RESCALE_INTERCEPT),
            )?,
            None,
        )
    } else {
        let decoded = obj
            .decode_pixel_data()
            .map_err(|e| format!("pixel data can't be decoded: {}", chain(&e)))?;
        (Vec::new(), Some(decoded))
    };
    let (w, h, count) = match &decoded {
        Some(d) => (d.columns(), d.rows(), d.number_of_frames()),
        None => {
            let (w, h, _) = frames.first().ok_or("no frames in the pixel data")?;
            (*w, *h, frames.len() as u32)
        }
    };
    let window = window.or_else(|| {
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
    let mut frames = frames.into_iter();
    for frame in 0..count {
        let mut grey = match &decoded {
            Some(d) => grey_frame(d, frame)?,
            None => match frames.next() {
                Some((fw, fh, values)) if (fw, fh) == (w, h) => values,
                Some((fw, fh, _)) => {
                    return Err(format!(
                        "frame {frame} is {fw} × {fh}, unlike frame 0 ({w} × {h})"
                    ));
                }
                None => return Err(format!("frame {frame} is missing")),
            },
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
        let source = if count > 1 {
            format!("{rel}#frame{frame}")
        } else {
            rel.to_string()
        };
        out.push(Image {
            source,
            pixels,
            key: sop_uid.clone(),
            patient: patient.clone(),
            geometry: Some([w, h, count]),
        });
    }
    Ok(out)
}

/// JPEG Extended (process 2 & 4), whose 12-bit form the Rust JPEG decoders do not read.
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";

/// The frames of 12-bit JPEG pixel data, decoded and rescaled: (width, height, values).
fn jpeg12_frames(
    obj: &dicom_object::DefaultDicomObject,
    slope: Option<f64>,
    intercept: Option<f64>,
) -> Result<Vec<(u32, u32, Vec<f32>)>, String> {
    let pixel_data = obj
        .element(tags::PIXEL_DATA)
        .map_err(|e| format!("no pixel data: {e}"))?;
    let fragments = pixel_data
        .value()
        .fragments()
        .ok_or("JPEG pixel data that is not encapsulated in fragments")?;
    let frames_stated = obj
        .element(tags::NUMBER_OF_FRAMES)
        .ok()
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1)
        .max(1) as usize;
    // One frame spread over fragments, or one fragment per frame.
    let streams: Vec<Vec<u8>> = if frames_stated == 1 {
        vec![fragments.iter().flatten().copied().collect()]
    } else if fragments.len() == frames_stated {
        fragments.to_vec()
    } else {
        return Err(format!(
            "{frames_stated} frames in {} JPEG fragments: only one fragment per frame is read",
            fragments.len()
        ));
    };
    let (slope, intercept) = (slope.unwrap_or(1.0), intercept.unwrap_or(0.0));
    streams
        .iter()
        .map(|stream| {
            let frame = crate::jpeg12::decode(stream)?;
            let values = frame
                .samples
                .iter()
                .map(|v| (f64::from(*v) * slope + intercept) as f32)
                .collect();
            Ok((frame.width as u32, frame.height as u32, values))
        })
        .collect()
}

/// One frame as greyscale values after the modality rescale (colour becomes luminance).
/// dicom-pixeldata converts 8- and 16-bit interleaved samples; 32-bit samples and planar
/// colour (PlanarConfiguration 1) are converted here from the decoded bytes.
fn grey_frame(decoded: &dicom_pixeldata::DecodedPixelData, frame: u32) -> Result<Vec<f32>, String> {
    use dicom_pixeldata::{PixelRepresentation, PlanarConfiguration};
    let pixels = decoded.columns() as usize * decoded.rows() as usize;
    let samples = usize::from(decoded.samples_per_pixel());
    let planar = samples > 1 && decoded.planar_configuration() == PlanarConfiguration::PixelFirst;
    let values: Vec<f32> = if decoded.bits_allocated() == 32 || planar {
        let bytes = decoded
            .frame_data(frame)
            .map_err(|e| format!("frame {frame} can't be read: {e}"))?;
        let signed = decoded.pixel_representation() == PixelRepresentation::Signed;
        let raw: Vec<f64> = match decoded.bits_allocated() {
            8 if signed => bytes.iter().map(|b| f64::from(*b as i8)).collect(),
            8 => bytes.iter().map(|b| f64::from(*b)).collect(),
            16 => bytes
                .chunks_exact(2)
                .map(|b| {
                    let v = [b[0], b[1]];
                    if signed {
                        f64::from(i16::from_le_bytes(v))
                    } else {
                        f64::from(u16::from_le_bytes(v))
                    }
                })
                .collect(),
            32 => bytes
                .chunks_exact(4)
                .map(|b| {
                    let v = [b[0], b[1], b[2], b[3]];
                    if signed {
                        f64::from(i32::from_le_bytes(v))
                    } else {
                        f64::from(u32::from_le_bytes(v))
                    }
                })
                .collect(),
            other => return Err(format!("BitsAllocated {other} is not read")),
        };
        let (slope, intercept) = decoded
            .rescale()
            .ok()
            .and_then(|r| r.first().map(|r| (r.slope, r.intercept)))
            .unwrap_or((1.0, 0.0));
        let rescaled = raw.iter().map(|v| (v * slope + intercept) as f32);
        if planar {
            // R plane, G plane, B plane: interleave.
            let planes: Vec<f32> = rescaled.collect();
            if planes.len() < pixels * samples {
                return Err(format!(
                    "frame {frame} is cut short: {} of {} values",
                    planes.len(),
                    pixels * samples
                ));
            }
            (0..pixels)
                .flat_map(|i| (0..samples).map(move |c| (c, i)))
                .map(|(c, i)| planes[c * pixels + i])
                .collect()
        } else {
            rescaled.collect()
        }
    } else {
        decoded
            .to_vec_frame(frame)
            .map_err(|e| format!("frame {frame} can't be converted: {e}"))?
    };
    let expected = pixels * samples;
    if values.len() < expected {
        return Err(format!(
            "frame {frame} is cut short: {} of {expected} values",
            values.len()
        ));
    }
    Ok(if samples == 3 {
        values
            .chunks_exact(3)
            .take(pixels)
            .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
            .collect()
    } else {
        values[..pixels].to_vec()
    })
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

fn read_nifti(path: &Path, rel: &str, size: usize, heard: Heard) -> Result<Vec<Image>, String> {
    use nifti::IntoNdArray;
    let name = path.to_string_lossy();
    let gz = name.ends_with(".nii.gz");
    if !(name.ends_with(".nii") || gz) {
        return Err("not a NIfTI file (.nii or .nii.gz)".into());
    }
    let volume = nifti_volume(path, heard)?;
    let volume = volume
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
    let geometry = nifti_geometry(&shape)?;
    let mut out = Vec::new();
    for z in 0..nz {
        let slice = nifti_slice(&volume, z);
        let (lo, hi) = slice
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        if hi <= lo {
            continue; // an empty slice carries nothing to learn from
        }
        let pixels = to_square(nx as u32, ny as u32, slice, size, false)?;
        out.push(Image {
            source: format!("{rel}#z{z}"),
            pixels,
            key: None,
            patient: None,
            geometry: Some(geometry),
        });
    }
    if out.is_empty() {
        return Err("every slice is empty".into());
    }
    Ok(out)
}

/// The slices of a volume (the first time point of a 4-D series), as a mask's or an image's
/// geometry: width, height, slices.
fn nifti_geometry(shape: &[usize]) -> Result<[u32; 3], String> {
    let dim =
        |i: usize| u32::try_from(shape.get(i).copied().unwrap_or(1)).map_err(|e| e.to_string());
    Ok([dim(0)?, dim(1)?, dim(2)?])
}

/// Slice `z` of a volume of two or more dimensions, x running fastest.
fn nifti_slice(volume: &ndarray::ArrayD<f32>, z: usize) -> Vec<f32> {
    let shape = volume.shape();
    let (nx, ny) = (shape[0], shape[1]);
    let mut slice = Vec::with_capacity(nx * ny);
    let mut idx = vec![0; shape.len()];
    for y in 0..ny {
        for x in 0..nx {
            idx[0] = x;
            idx[1] = y;
            if shape.len() > 2 {
                idx[2] = z;
            }
            slice.push(volume.get(idx.as_slice()).copied().unwrap_or(0.0));
        }
    }
    slice
}

/// A mask file's label values, resized by nearest neighbour: a greyscale PNG (8 or 16 bits;
/// its values are the labels), or a NIfTI label volume (every slice, empty or not). DICOM
/// segmentation objects (SEG) are not read.
fn read_mask(path: &Path, rel: &str, size: usize, heard: Heard) -> Result<Vec<Image>, String> {
    let name = path.to_string_lossy().to_lowercase();
    let resize = |w: usize, h: usize, values: Vec<f32>| -> Result<Vec<f32>, String> {
        if values
            .iter()
            .any(|v| !(v.fract() == 0.0 && (0.0..=65535.0).contains(v)))
        {
            return Err(
                "a mask holds label values that are not whole numbers from 0 to 65535".into(),
            );
        }
        // As u16: the image crate clamps f32 pixels to [0, 1] when it resizes.
        let labels: Vec<u16> = values.into_iter().map(|v| v as u16).collect();
        let img: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_raw(w as u32, h as u32, labels)
                .ok_or("the mask's buffer does not match its size")?;
        Ok(
            image::imageops::resize(&img, size as u32, size as u32, FilterType::Nearest)
                .into_raw()
                .into_iter()
                .map(f32::from)
                .collect(),
        )
    };
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        use nifti::IntoNdArray;
        let volume = nifti_volume(path, heard)?
            .into_ndarray::<f32>()
            .map_err(|e| format!("the mask volume can't be read: {e}"))?;
        let shape = volume.shape().to_vec();
        if shape.len() < 2 {
            return Err(format!("a mask volume of {} dimension(s)", shape.len()));
        }
        let geometry = nifti_geometry(&shape)?;
        return (0..shape.get(2).copied().unwrap_or(1))
            .map(|z| {
                Ok(Image {
                    source: format!("{rel}#z{z}"),
                    pixels: resize(shape[0], shape[1], nifti_slice(&volume, z))?,
                    key: None,
                    patient: None,
                    geometry: Some(geometry),
                })
            })
            .collect();
    }
    if name.ends_with(".dcm") {
        return Err("a DICOM mask (SEG) is not read: store each mask as a NIfTI label volume or a PNG of label values".into());
    }
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("not a readable PNG mask: {e}"))?;
    match reader.format() {
        Some(image::ImageFormat::Png) => heard("PNG", None),
        Some(f) => {
            return Err(format!(
                "a {f:?} mask: masks are PNG (lossless) or NIfTI, whose values are the labels"
            ));
        }
        None => return Err("not a PNG or NIfTI mask".into()),
    }
    let img = reader
        .decode()
        .map_err(|e| format!("not a readable PNG mask: {e}"))?;
    let (w, h) = (img.width(), img.height());
    let values: Vec<f32> = match img {
        image::DynamicImage::ImageLuma8(b) => b.into_raw().into_iter().map(f32::from).collect(),
        image::DynamicImage::ImageLuma16(b) => b.into_raw().into_iter().map(f32::from).collect(),
        other => {
            return Err(format!(
                "the mask is a {:?} PNG: a mask is greyscale (8 or 16 bits) with the label values as its pixels",
                other.color()
            ));
        }
    };
    Ok(vec![Image {
        source: rel.to_string(),
        pixels: resize(w as usize, h as usize, values)?,
        key: Some(rel.to_string()),
        patient: None,
        geometry: Some([w, h, 1]),
    }])
}

/// A NIfTI-1 or NIfTI-2 volume (`.nii`, `.nii.gz`); `heard` hears which.
pub fn nifti_volume(path: &Path, heard: Heard) -> Result<nifti::InMemNiftiVolume, String> {
    use nifti::{NiftiObject, ReaderOptions};
    let gz = path.to_string_lossy().ends_with(".gz");
    let bytes = nifti_bytes(path, gz)?;
    let sizeof_hdr = bytes
        .get(..4)
        .map(|b| [b[0], b[1], b[2], b[3]])
        .ok_or("the file is too short for a NIfTI header")?;
    if i32::from_le_bytes(sizeof_hdr) == 540 || i32::from_be_bytes(sizeof_hdr) == 540 {
        heard(if gz { "NIfTI-2 (gzip)" } else { "NIfTI-2" }, None);
        nifti2_volume(&bytes)
    } else {
        heard(if gz { "NIfTI-1 (gzip)" } else { "NIfTI-1" }, None);
        ReaderOptions::new()
            .read_file(path)
            .map(|obj| obj.into_volume())
            .map_err(|e| format!("not a readable NIfTI-1 volume: {e}"))
    }
}

/// The file's bytes, decompressed if it is gzipped.
fn nifti_bytes(path: &Path, gz: bool) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::read(path).map_err(|e| format!("cannot read the file: {e}"))?;
    if !gz {
        return Ok(file);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(file.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| format!("not a readable gzip file: {e}"))?;
    Ok(out)
}

/// A single-file NIfTI-2 volume (`n+2` magic; 540-byte header with 64-bit dimensions). The
/// header's fields are read at their offsets in the NIfTI-2 standard; the voxels, from its
/// `vox_offset`, go to the same volume type NIfTI-1 files give.
fn nifti2_volume(bytes: &[u8]) -> Result<nifti::InMemNiftiVolume, String> {
    use nifti::Endianness;
    let header = bytes
        .get(..540)
        .ok_or("the file is too short for its NIfTI-2 header (540 bytes)")?;
    let little = i32::from_le_bytes([header[0], header[1], header[2], header[3]]) == 540;
    let endianness = if little {
        Endianness::Little
    } else {
        Endianness::Big
    };
    let at = |offset: usize, n: usize| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&header[offset..offset + n]);
        if !little {
            b[..n].reverse();
        }
        b
    };
    let i16_at = |o| {
        let b = at(o, 2);
        i16::from_le_bytes([b[0], b[1]])
    };
    let i64_at = |o| i64::from_le_bytes(at(o, 8));
    let f64_at = |o| f64::from_le_bytes(at(o, 8));
    if &header[4..7] != b"n+2" {
        return Err(
            "a NIfTI-2 header without the single-file magic n+2 (a .hdr/.img pair?): store it as one .nii file"
                .into(),
        );
    }
    let datatype = nifti::NiftiHeader {
        datatype: i16_at(12),
        ..Default::default()
    }
    .data_type()
    .map_err(|e| format!("the NIfTI-2 data type can't be read: {e}"))?;
    let mut dim = [0u16; 8];
    for (i, d) in dim.iter_mut().enumerate() {
        let value = i64_at(16 + 8 * i);
        *d = u16::try_from(value).map_err(|_| {
            format!("NIfTI-2 dimension {i} is {value}: only volumes up to 65535 voxels per axis are read")
        })?;
    }
    let vox_offset = usize::try_from(i64_at(168))
        .ok()
        .filter(|o| *o >= 540 && *o <= bytes.len())
        .ok_or("the NIfTI-2 voxel offset points outside the file")?;
    let (slope, intercept) = (f64_at(176), f64_at(184));
    // A slope of 0 means the values are stored unscaled.
    let (slope, intercept) = if slope == 0.0 {
        (1.0, 0.0)
    } else {
        (slope, intercept)
    };
    let wanted = dim[1..=usize::from(dim[0]).min(7)]
        .iter()
        .try_fold(datatype.size_of(), |n, d| n.checked_mul(usize::from(*d)))
        .ok_or("the NIfTI-2 volume is too large")?;
    let data = bytes[vox_offset..]
        .get(..wanted)
        .ok_or_else(|| {
            format!(
                "the NIfTI-2 volume is cut short: {} of {wanted} bytes",
                bytes.len() - vox_offset
            )
        })?
        .to_vec();
    nifti::InMemNiftiVolume::from_raw_fields(
        dim,
        datatype,
        slope as f32,
        intercept as f32,
        data,
        endianness,
    )
    .map_err(|e| format!("the NIfTI-2 volume can't be read: {e}"))
}

/// The per-source lookup used by tests and reports.
pub fn by_source(ds: &Dataset) -> HashMap<&str, &Sample> {
    ds.samples.iter().map(|s| (s.source.as_str(), s)).collect()
}
