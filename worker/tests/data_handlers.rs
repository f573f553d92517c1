#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The data handlers on real files from public DICOM and NIfTI test suites (tests/data,
//! with their licences): every good image is read, every bad or non-image file is skipped
//! with its reason, nothing crashes.

use consilium_worker::data::{DataKind, Dataset, DatasetSpec, LabelKey, by_source, load};
use consilium_worker::decode::Decoder;
use dicom_pixeldata::PixelDecoder;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// The shipped worker binary decodes, as at a site.
fn decoder() -> Decoder {
    Decoder::program(env!("CARGO_BIN_EXE_consilium-worker"))
}

fn data(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(dir)
}

fn labels(rows: &[(&str, u32)]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "file,label").unwrap();
    for (k, l) in rows {
        writeln!(f, "{k},{l}").unwrap();
    }
    f
}

fn spec(kind: DataKind, dir: &str, labels: &tempfile::NamedTempFile) -> DatasetSpec {
    DatasetSpec {
        kind,
        root: data(dir),
        labels: labels.path().to_path_buf(),
        label_key: LabelKey::Path,
        masks: false,
        holdout: 0.0,
        window: None,
        decoding: Default::default(),
    }
}

fn skipped(ds: &Dataset) -> BTreeMap<String, String> {
    ds.skipped
        .iter()
        .map(|s| (s.file.clone(), s.reason.clone()))
        .collect()
}

/// The image files of tests/data/dicom, each read (every frame).
const READ: [&str; 22] = [
    "693_UNCI.dcm",
    "CT_small.dcm",
    "JPEG-lossy.dcm",
    "JPEG2000.dcm",
    "JPEGLSNearLossless_16.dcm",
    "JPGExtended.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "RG3_J2KI.dcm",
    "SC_rgb_32bit.dcm",
    "US1_UNCR.dcm",
    "color-pl.dcm",
    "color-px.dcm",
    "emri_small.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "examples_ybr_color.dcm",
    "no_meta.dcm",
    "rtdose_1frame.dcm",
];

/// The bad and non-image files, each skipped with (part of) its reason.
const SKIPPED: [(&str, &str); 5] = [
    ("MR_truncated.dcm", "not a readable DICOM file"),
    ("badVR.dcm", "NumberOfFrames"),
    ("liver_1frame.dcm", "segmentation object"),
    ("rtplan.dcm", "no pixel data (RTPLAN object)"),
    ("LICENSE-pydicom.txt", "not a readable DICOM file"),
];

#[test]
fn dicom_files_are_read_or_skipped_with_a_reason() {
    let rows: Vec<(&str, u32)> = READ
        .iter()
        .chain(SKIPPED.iter().map(|(f, _)| f))
        .map(|f| (*f, 1))
        .collect();
    let l = labels(&rows);
    let ds = load(&spec(DataKind::Dicom, "dicom", &l), 64, &decoder()).unwrap();
    let read: std::collections::BTreeSet<&str> = ds
        .samples
        .iter()
        .map(|s| s.source.split('#').next().unwrap())
        .collect();
    assert_eq!(read.into_iter().collect::<Vec<_>>(), READ.to_vec());
    // Multi-frame files give one image per frame.
    for (file, frames) in [
        ("emri_small.dcm", 10),
        ("emri_small_jpeg_ls_lossless.dcm", 10),
        ("examples_ybr_color.dcm", 30),
    ] {
        let prefix = format!("{file}#");
        assert_eq!(
            ds.samples
                .iter()
                .filter(|s| s.source.starts_with(&prefix))
                .count(),
            frames,
            "{file}"
        );
    }
    for s in &ds.samples {
        assert_eq!(s.pixels.len(), 64 * 64);
        assert!(
            s.pixels.iter().all(|v| (0.0..=1.0).contains(v)),
            "{}",
            s.source
        );
        assert_eq!(s.label, 1);
    }
    let why = skipped(&ds);
    for (file, reason) in SKIPPED {
        assert!(
            why.get(file).is_some_and(|r| r.contains(reason)),
            "{file}: {:?}",
            why.get(file)
        );
    }
    // The other files of the folder have no label.
    for (file, reason) in &why {
        assert!(
            SKIPPED.iter().any(|(f, _)| f == file)
                || reason == "no label for it in the labels file",
            "{file}: {reason}"
        );
    }
    // Each file's format is reported, as check-data shows it.
    let format = |f: &str| {
        ds.files
            .iter()
            .find(|r| r.file == f)
            .map(|r| (r.format.clone(), r.modality.clone()))
            .unwrap()
    };
    assert_eq!(
        format("RG3_J2KI.dcm"),
        (
            "DICOM JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)".to_string(),
            Some("CR".to_string())
        )
    );
    assert!(
        format("JPGExtended.dcm")
            .0
            .contains("1.2.840.10008.1.2.4.51")
    );
    assert!(
        format("MR_small_jpeg_ls_lossless.dcm")
            .0
            .contains("1.2.840.10008.1.2.4.80")
    );
}

#[test]
fn every_encoding_of_the_same_mr_image_gives_the_same_pixels() {
    let files = [
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ];
    let rows: Vec<(&str, u32)> = files.iter().map(|f| (*f, 0)).collect();
    let l = labels(&rows);
    let ds = load(&spec(DataKind::Dicom, "dicom", &l), 64, &decoder()).unwrap();
    let by = by_source(&ds);
    let reference = &by["MR_small.dcm"].pixels;
    for f in &files[1..] {
        let max_diff = by[f]
            .pixels
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max_diff < 1e-5, "{f} differs by {max_diff}");
    }
    // A file without its meta header reads as the same CT image as the one with it.
    let l = labels(&[("CT_small.dcm", 0), ("no_meta.dcm", 0)]);
    let ds = load(&spec(DataKind::Dicom, "dicom", &l), 64, &decoder()).unwrap();
    let by = by_source(&ds);
    assert_eq!(by["CT_small.dcm"].pixels, by["no_meta.dcm"].pixels);
}

/// Values computed by pydicom (with its JPEG plug-ins) and nibabel, independent decoders:
/// tests/data/reference.json, made by the script in tests/data/README.md.
fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(data("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn pairs(v: &serde_json::Value) -> Vec<(usize, f64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap()))
        .collect()
}

#[test]
fn the_same_image_in_other_layouts_reads_the_same() {
    // Planar colour (R plane, G plane, B plane) and its pixel-interleaved twin; a JPEG-LS
    // multi-frame series and its uncompressed original.
    let l = labels(&[
        ("color-pl.dcm", 0),
        ("color-px.dcm", 0),
        ("emri_small.dcm", 0),
        ("emri_small_jpeg_ls_lossless.dcm", 0),
    ]);
    let ds = load(&spec(DataKind::Dicom, "dicom", &l), 64, &decoder()).unwrap();
    let by = by_source(&ds);
    assert_eq!(by["color-pl.dcm"].pixels, by["color-px.dcm"].pixels);
    for frame in 0..10 {
        assert_eq!(
            by[format!("emri_small.dcm#frame{frame}").as_str()].pixels,
            by[format!("emri_small_jpeg_ls_lossless.dcm#frame{frame}").as_str()].pixels,
            "frame {frame}"
        );
    }
}

#[test]
fn thirty_two_bit_samples_match_an_independent_decoder() {
    let reference = reference();
    for file in ["rtdose_1frame.dcm", "SC_rgb_32bit.dcm"] {
        let r = &reference[file];
        let size = r["size"].as_u64().unwrap() as usize;
        let l = labels(&[(file, 0)]);
        // At the image's own size: no resampling, min–max scaled as without a window.
        let ds = load(&spec(DataKind::Dicom, "dicom", &l), size, &decoder()).unwrap();
        let ours = &by_source(&ds)[file].pixels;
        for (i, expected) in pairs(&r["normalised"]) {
            assert!(
                (f64::from(ours[i]) - expected).abs() < 1e-4,
                "{file} pixel {i}: {} vs {expected}",
                ours[i]
            );
        }
    }
}

#[test]
fn twelve_bit_jpeg_matches_an_independent_decoder() {
    let r = &reference()["JPGExtended.dcm"];
    let obj = dicom_object::open_file(data("dicom").join("JPGExtended.dcm")).unwrap();
    let fragments = obj
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .value()
        .fragments()
        .unwrap()
        .concat();
    let frame = consilium_worker::jpeg12::decode(&fragments).unwrap();
    assert_eq!(
        (frame.width as u64, frame.height as u64),
        (r["width"].as_u64().unwrap(), r["height"].as_u64().unwrap())
    );
    // Lossy JPEG: decoders' inverse DCTs may differ by a unit here and there.
    let sum: f64 = frame.samples.iter().map(|v| f64::from(*v)).sum();
    let expected_sum = r["sum"].as_f64().unwrap();
    assert!(
        (sum - expected_sum).abs() / expected_sum < 0.002,
        "{sum} vs {expected_sum}"
    );
    for (i, expected) in pairs(&r["stored"]) {
        let ours = f64::from(frame.samples[i]);
        assert!(
            (ours - expected).abs() <= 2.0,
            "sample {i}: {ours} vs {expected}"
        );
    }
    // Something that is not a JPEG stream is an error, not a crash.
    assert!(consilium_worker::jpeg12::decode(b"not a jpeg").is_err());
}

#[test]
fn nifti2_volumes_match_an_independent_reader() {
    use nifti::IntoNdArray;
    let r = &reference()["example_nifti2.nii.gz"];
    let shape: Vec<usize> = r["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let mut heard = String::new();
    let volume = consilium_worker::data::nifti_volume(
        &data("nifti").join("example_nifti2.nii.gz"),
        &mut |format, _| heard = format.to_string(),
    )
    .unwrap()
    .into_ndarray::<f32>()
    .unwrap();
    assert_eq!(heard, "NIfTI-2 (gzip)");
    assert_eq!(volume.shape(), shape.as_slice());
    for (i, expected) in pairs(&r["voxels"]) {
        // nibabel's index in Fortran order: x fastest.
        let mut rest = i;
        let idx: Vec<usize> = shape
            .iter()
            .map(|d| {
                let v = rest % d;
                rest /= d;
                v
            })
            .collect();
        assert_eq!(f64::from(volume[idx.as_slice()]), expected, "voxel {idx:?}");
    }
}

/// The stored values of frame 0, with the object's rescale slope and intercept.
fn raw(file: &str) -> (Vec<f32>, f32, f32, String) {
    let obj = dicom_object::open_file(data("dicom").join(file)).unwrap();
    let num = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_float64().ok())
            .map(|v| v as f32)
    };
    let slope = num(dicom_dictionary_std::tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = num(dicom_dictionary_std::tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    let decoded = obj.decode_pixel_data().unwrap();
    let opts = dicom_pixeldata::ConvertOptions::new()
        .with_modality_lut(dicom_pixeldata::ModalityLutOption::None);
    let stored: Vec<f32> = decoded.to_vec_frame_with_options(0, &opts).unwrap();
    (
        stored,
        slope,
        intercept,
        decoded.photometric_interpretation().as_str().to_string(),
    )
}

#[test]
fn ct_values_are_rescaled_to_hounsfield_units_then_windowed() {
    let (stored, slope, intercept, _) = raw("CT_small.dcm");
    assert!(
        slope != 1.0 || intercept != 0.0,
        "CT_small carries a rescale"
    );
    let l = labels(&[("CT_small.dcm", 0)]);
    let mut s = spec(DataKind::Dicom, "dicom", &l);
    s.window = Some((40.0, 400.0)); // soft tissue: −160 … 240 HU
    let ds = load(&s, 128, &decoder()).unwrap(); // CT_small is 128 × 128: no resampling
    let ours = &by_source(&ds)["CT_small.dcm"].pixels;
    let mut compared = 0;
    for (o, v) in ours.iter().zip(&stored) {
        let hu = v * slope + intercept;
        let expected = ((hu + 160.0) / 400.0).clamp(0.0, 1.0);
        assert!((o - expected).abs() < 1e-3, "HU {hu}: {o} vs {expected}");
        compared += 1;
    }
    assert_eq!(compared, 128 * 128);
    // Some pixels are inside the window, some outside on each side.
    assert!(ours.contains(&0.0) && ours.iter().any(|v| *v > 0.0 && *v < 1.0));
}

#[test]
fn monochrome1_radiographs_are_inverted() {
    let (stored, slope, intercept, photometric) = raw("RG3_J2KI.dcm");
    assert_eq!(photometric, "MONOCHROME1");
    let l = labels(&[("RG3_J2KI.dcm", 0)]);
    let mut s = spec(DataKind::Dicom, "dicom", &l);
    let values: Vec<f32> = stored.iter().map(|v| v * slope + intercept).collect();
    let (lo, hi) = values
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
    s.window = Some((f64::from(lo + hi) / 2.0, f64::from(hi - lo)));
    let ds = load(&s, 1760, &decoder()).unwrap();
    let ours = &by_source(&ds)["RG3_J2KI.dcm"].pixels;
    // High stored values (dense tissue in MONOCHROME1 is dark) come out dark after inversion.
    for i in (0..values.len()).step_by(9973) {
        let windowed = (values[i] - lo) / (hi - lo);
        assert!((ours[i] - (1.0 - windowed)).abs() < 1e-3, "pixel {i}");
    }
}

#[test]
fn dicom_labels_by_sop_instance_uid() {
    let obj = dicom_object::open_file(data("dicom").join("MR_small.dcm")).unwrap();
    let uid = obj
        .element(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .trim()
        .to_string();
    let l = labels(&[(uid.as_str(), 1)]);
    let mut s = spec(DataKind::Dicom, "dicom", &l);
    s.label_key = LabelKey::SopInstanceUid;
    let ds = load(&s, 32, &decoder()).unwrap();
    // The MR image and its re-encodings share the UID; everything else has no label.
    let read: Vec<&str> = ds.samples.iter().map(|s| s.source.as_str()).collect();
    assert!(
        read.contains(&"MR_small.dcm") && read.contains(&"MR_small_RLE.dcm"),
        "{read:?}"
    );
    assert!(ds.samples.iter().all(|s| s.label == 1));
    assert_eq!(
        skipped(&ds)["CT_small.dcm"],
        "no label for it in the labels file"
    );
}

#[test]
fn nifti_volumes_are_sliced_to_2d() {
    let l = labels(&[
        ("anatomical.nii", 0),
        ("example4d.nii.gz", 1),
        ("example_nifti2.nii.gz", 0),
        ("standard.nii.gz", 1),
    ]);
    let ds = load(&spec(DataKind::Nifti, "nifti", &l), 32, &decoder()).unwrap();
    let mut counts = BTreeMap::new();
    for s in &ds.samples {
        *counts
            .entry(s.source.split('#').next().unwrap())
            .or_insert(0) += 1;
    }
    // Empty slices are left out; a 4-D series gives its first time point's slices.
    assert_eq!(
        counts,
        BTreeMap::from([
            ("anatomical.nii", 25),
            ("example4d.nii.gz", 24),
            ("example_nifti2.nii.gz", 12),
            ("standard.nii.gz", 7)
        ])
    );
    assert!(ds.samples.iter().all(|s| s.pixels.len() == 32 * 32));
}

#[test]
fn png_and_jpeg_folders_with_a_labels_csv() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [("a.png", 40u8), ("b.png", 200), ("c.jpg", 120)] {
        let img =
            image::GrayImage::from_fn(20, 10, |x, _| image::Luma([value.saturating_add(x as u8)]));
        img.save(dir.path().join(name)).unwrap();
    }
    std::fs::write(dir.path().join("broken.png"), b"not an image").unwrap();
    let l = labels(&[("a.png", 0), ("b.png", 1), ("c.jpg", 1), ("broken.png", 0)]);
    let extra = image::GrayImage::new(4, 4);
    extra.save(dir.path().join("unlabelled.png")).unwrap();
    let s = DatasetSpec {
        kind: DataKind::Images,
        root: dir.path().to_path_buf(),
        labels: l.path().to_path_buf(),
        label_key: LabelKey::Path,
        masks: false,
        holdout: 0.0,
        window: None,
        decoding: Default::default(),
    };
    let ds = load(&s, 16, &decoder()).unwrap();
    let by = by_source(&ds);
    assert_eq!(by.len(), 3);
    assert_eq!(by["b.png"].label, 1);
    // Greyscale values keep their scale: a brighter image stays brighter.
    let mean = |k: &str| by[k].pixels.iter().sum::<f32>() / 256.0;
    assert!(mean("b.png") > mean("c.jpg") && mean("c.jpg") > mean("a.png"));
    let why = skipped(&ds);
    assert!(why["broken.png"].starts_with("not a readable PNG or JPEG image"));
    assert_eq!(why["unlabelled.png"], "no label for it in the labels file");

    // A labels file with a word for a label is refused with the row.
    let bad = labels(&[("a.png", 0)]);
    std::fs::write(bad.path(), "file,label\na.png,nodule\n").unwrap();
    let s2 = DatasetSpec {
        labels: bad.path().to_path_buf(),
        ..s
    };
    let err = load(&s2, 16, &decoder()).unwrap_err().to_string();
    assert!(err.contains("row 2") && err.contains("nodule"), "{err}");
}
