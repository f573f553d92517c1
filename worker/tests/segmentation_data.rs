#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Segmentation data: images paired with their masks by the labels CSV, read through the
//! decoding child like the images — real NIfTI volumes (tests/data/nifti) with label volumes
//! made from them here, and PNG images with PNG masks.

use consilium_worker::data::{DataKind, Dataset, DatasetSpec, LabelKey, load};
use consilium_worker::decode::Decoder;
use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn decoder() -> Decoder {
    Decoder::program(env!("CARGO_BIN_EXE_consilium-worker"))
}

fn nifti_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nifti")
        .join(name)
}

fn spec(kind: DataKind, root: &Path) -> DatasetSpec {
    DatasetSpec {
        kind,
        root: root.to_path_buf(),
        labels: root.join("labels.csv"),
        label_key: LabelKey::Path,
        masks: true,
        holdout: 0.5,
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

/// A label volume of the image's geometry (its header) whose slice z holds `value(z)`
/// everywhere, written as NIfTI-1.
fn label_volume(image: &Path, out: &Path, value: impl Fn(usize) -> f32) {
    let obj = ReaderOptions::new().read_file(image).unwrap();
    let header = obj.header().clone();
    let volume = obj.into_volume().into_ndarray::<f32>().unwrap();
    let shape = volume.shape().to_vec();
    let labels =
        ndarray::Array3::from_shape_fn((shape[0], shape[1], shape[2]), |(_, _, z)| value(z) as u8);
    let mut h = header;
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    nifti::writer::WriterOptions::new(out)
        .reference_header(&h)
        .write_nifti(&labels)
        .unwrap();
}

#[test]
fn nifti_volumes_with_label_volumes_pair_slice_by_slice() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // BraTS-like: a folder per case with its image and its segmentation.
    for case in ["case1", "case2"] {
        std::fs::create_dir(root.join(case)).unwrap();
        std::fs::copy(nifti_file("anatomical.nii"), root.join(case).join("t1.nii")).unwrap();
    }
    std::fs::create_dir(root.join("case3")).unwrap();
    std::fs::copy(nifti_file("standard.nii.gz"), root.join("case3/t1.nii.gz")).unwrap();
    // Slice z of case 1's mask is all z mod 3; case 2's all 4 (a value the plan may not name).
    label_volume(
        &root.join("case1/t1.nii"),
        &root.join("case1/seg.nii"),
        |z| (z % 3) as f32,
    );
    label_volume(
        &root.join("case2/t1.nii"),
        &root.join("case2/seg.nii"),
        |_| 4.0,
    );
    // Case 3's mask is case 1's: another geometry.
    std::fs::copy(root.join("case1/seg.nii"), root.join("case3/seg.nii")).unwrap();
    std::fs::write(
        root.join("labels.csv"),
        "image,mask\ncase1/t1.nii,case1/seg.nii\ncase2/t1.nii,case2/seg.nii\ncase3/t1.nii.gz,case3/seg.nii\n",
    )
    .unwrap();
    let ds = load(&spec(DataKind::Nifti, root), 32, &decoder()).unwrap();

    // Every non-empty image slice (25 of anatomical.nii) has its own slice's mask.
    let case1: Vec<_> = ds
        .samples
        .iter()
        .filter(|s| s.source.starts_with("case1/"))
        .collect();
    assert_eq!(case1.len(), 25);
    for s in &case1 {
        let z: u16 = s.source.rsplit_once("#z").unwrap().1.parse().unwrap();
        let mask = s.mask.as_ref().unwrap();
        assert_eq!(mask.len(), 32 * 32);
        assert!(mask.iter().all(|&v| v == z % 3), "{}", s.source);
        // A case's slices stay on one side of the split.
        assert_eq!(s.holdout, case1[0].holdout);
        assert_eq!(s.unit, "case1/t1.nii");
    }
    assert!(
        ds.samples
            .iter()
            .filter(|s| s.source.starts_with("case2/"))
            .all(|s| s.mask.as_ref().unwrap().iter().all(|&v| v == 4))
    );
    // Masks are not images of their own, and a mask of another geometry is refused.
    assert!(ds.samples.iter().all(|s| !s.source.contains("seg.nii")));
    let why = skipped(&ds);
    assert!(
        why["case3/t1.nii.gz"].contains("its mask case3/seg.nii is")
            && why["case3/t1.nii.gz"].contains("a mask must have its image's geometry"),
        "{why:?}"
    );
    // check-data's counts: every mask value with its pixels in each split.
    let counts = ds.mask_counts();
    assert!(counts.contains("mask value  pixels at 32 × 32"), "{counts}");
    for value in ["0", "1", "2", "4"] {
        assert!(
            counts
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{value} "))),
            "{value}: {counts}"
        );
    }
}

#[test]
fn png_images_with_png_masks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A 20 × 20 image with a bright square and its mask (1 on the square), both resized to 10.
    let image = image::GrayImage::from_fn(20, 20, |x, y| {
        image::Luma([if (4..12).contains(&x) && (6..14).contains(&y) {
            220
        } else {
            30
        }])
    });
    image.save(root.join("a.png")).unwrap();
    let mask = image::GrayImage::from_fn(20, 20, |x, y| {
        image::Luma([u8::from((4..12).contains(&x) && (6..14).contains(&y))])
    });
    mask.save(root.join("a_mask.png")).unwrap();
    image.save(root.join("b.png")).unwrap();
    image::GrayImage::new(10, 20)
        .save(root.join("b_mask.png"))
        .unwrap();
    image.save(root.join("c.png")).unwrap();
    image::RgbImage::new(20, 20)
        .save(root.join("c_mask.png"))
        .unwrap();
    image.save(root.join("d.png")).unwrap();
    image.save(root.join("e.png")).unwrap();
    std::fs::write(
        root.join("labels.csv"),
        "image,mask\na.png,a_mask.png\nb.png,b_mask.png\nc.png,c_mask.png\nd.png,missing.png\n",
    )
    .unwrap();
    let ds = load(&spec(DataKind::Images, root), 10, &decoder()).unwrap();
    assert_eq!(ds.samples.len(), 1);
    let a = &ds.samples[0];
    assert_eq!(a.source, "a.png");
    // Nearest neighbour: the square (x 4–11, y 6–13) is x 2–5, y 3–6 at half the size.
    let expected: Vec<u16> = (0..100)
        .map(|i| u16::from((2..6).contains(&(i % 10)) && (3..7).contains(&(i / 10))))
        .collect();
    assert_eq!(a.mask.as_deref(), Some(expected.as_slice()));
    let why = skipped(&ds);
    assert!(
        why["b.png"].contains("its mask b_mask.png is 10 × 20 × 1 and the image 20 × 20 × 1"),
        "{why:?}"
    );
    assert!(why["c.png"].contains("a mask is greyscale"), "{why:?}");
    assert!(why["d.png"].contains("its mask missing.png"), "{why:?}");
    assert_eq!(why["e.png"], "no mask for it in the labels file");
    assert!(!why.contains_key("a_mask.png"));

    // A mask outside the data folder is refused before anything is read.
    std::fs::write(root.join("labels.csv"), "image,mask\na.png,../a_mask.png\n").unwrap();
    let err = load(&spec(DataKind::Images, root), 10, &decoder()).unwrap_err();
    assert!(
        err.to_string()
            .contains("must be a path inside the data folder"),
        "{err}"
    );
}

#[test]
fn dicom_images_with_png_and_nifti_masks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let dicom = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom");
    // MR_small.dcm: one 64 × 64 frame; emri_small.dcm: 10 frames of 64 × 64.
    std::fs::copy(dicom.join("MR_small.dcm"), root.join("mr.dcm")).unwrap();
    std::fs::copy(dicom.join("emri_small.dcm"), root.join("emri.dcm")).unwrap();
    std::fs::copy(dicom.join("MR_small.dcm"), root.join("wrong.dcm")).unwrap();
    image::GrayImage::from_fn(64, 64, |x, _| image::Luma([u8::from(x >= 32) * 2]))
        .save(root.join("mr_mask.png"))
        .unwrap();
    image::GrayImage::new(32, 32)
        .save(root.join("wrong_mask.png"))
        .unwrap();
    // A label volume of 64 × 64 × 10 whose slice z is all z (one per frame).
    let labels = ndarray::Array3::from_shape_fn((64, 64, 10), |(_, _, z)| z as u8);
    nifti::writer::WriterOptions::new(root.join("emri_seg.nii"))
        .write_nifti(&labels)
        .unwrap();
    std::fs::write(
        root.join("labels.csv"),
        "image,mask\nmr.dcm,mr_mask.png\nemri.dcm,emri_seg.nii\nwrong.dcm,wrong_mask.png\n",
    )
    .unwrap();
    let ds = load(&spec(DataKind::Dicom, root), 16, &decoder()).unwrap();
    let mr = ds.samples.iter().find(|s| s.source == "mr.dcm").unwrap();
    let mask = mr.mask.as_ref().unwrap();
    assert_eq!(mask[0], 0, "the left half is 0");
    assert_eq!(mask[15], 2, "the right half is 2");
    let frames: Vec<_> = ds
        .samples
        .iter()
        .filter(|s| s.source.starts_with("emri.dcm#frame"))
        .collect();
    assert_eq!(frames.len(), 10);
    for f in frames {
        let n: u16 = f.source.rsplit_once("#frame").unwrap().1.parse().unwrap();
        assert!(
            f.mask.as_ref().unwrap().iter().all(|&v| v == n),
            "{}",
            f.source
        );
    }
    let why = skipped(&ds);
    assert!(
        why["wrong.dcm"].contains("is 32 × 32 × 1 and the image 64 × 64 × 1"),
        "{why:?}"
    );
}
