//! Synthetic previews at the site: the generator's output, the memorisation check, and the
//! metadata summary (small counts suppressed, no identifying DICOM attribute).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use consilium_worker::preview::{
    DEFAULT_DCR_THRESHOLD, PreviewError, PreviewImage, generate, memorisation_check,
    summarise_dicom,
};
use consilium_worker::synthetic::{SiteProfile, phantom};
use consilium_worker::train::Rng;

fn phantoms(n: usize, size: usize) -> Vec<(u32, Vec<f32>)> {
    let profile = SiteProfile {
        images: n,
        lesion_fraction: 0.5,
        gain: 1.0,
        offset: 0.0,
        noise: 0.04,
        blur: 1,
        seed: 3,
    };
    let mut rng = Rng::new(11);
    (0..n)
        .map(|i| {
            let lesion = i % 2 == 1;
            (u32::from(lesion), phantom(size, lesion, &profile, &mut rng))
        })
        .collect()
}

/// How many previews are nearer the mean image of their own class than of the other.
fn nearer_own_class(data: &[(u32, Vec<f32>)], previews: &[PreviewImage]) -> usize {
    let n = data[0].1.len();
    let mean = |label: u32| {
        let members: Vec<&Vec<f32>> = data
            .iter()
            .filter(|(l, _)| *l == label)
            .map(|(_, p)| p)
            .collect();
        (0..n)
            .map(|i| members.iter().map(|m| m[i]).sum::<f32>() / members.len() as f32)
            .collect::<Vec<f32>>()
    };
    let (m0, m1) = (mean(0), mean(1));
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
    previews
        .iter()
        .filter(|p| {
            let (own, other) = if p.label == 0 { (&m0, &m1) } else { (&m1, &m0) };
            dist(&p.pixels, own) < dist(&p.pixels, other)
        })
        .count()
}

#[test]
fn previews_have_the_shape_range_and_class_balance_asked_for() {
    let data = phantoms(40, 32);
    let train: Vec<(u32, &[f32])> = data.iter().map(|(l, p)| (*l, p.as_slice())).collect();
    let previews = generate(&train, 12, 8, 5).unwrap();
    assert_eq!(previews.len(), 24);
    for label in [0, 1] {
        assert_eq!(previews.iter().filter(|p| p.label == label).count(), 12);
    }
    for p in &previews {
        assert_eq!(p.pixels.len(), 32 * 32);
        assert!(p.pixels.iter().all(|x| (0.0..=1.0).contains(x)));
    }
    assert_ne!(previews[0].pixels, previews[1].pixels, "samples differ");
    // A class's previews look like that class: closer to its own mean than to the other's.
    let right = nearer_own_class(&data, &previews);
    assert!(right >= 20, "{right} of 24 previews nearer their own class");
    // Deterministic for a seed.
    assert_eq!(generate(&train, 12, 8, 5).unwrap(), previews);
}

#[test]
fn a_class_with_too_few_images_is_refused_with_the_reason() {
    let data = phantoms(10, 16);
    let mut train: Vec<(u32, &[f32])> = data.iter().map(|(l, p)| (*l, p.as_slice())).collect();
    train.push((7, data[0].1.as_slice()));
    let err = generate(&train, 4, 4, 1).unwrap_err();
    assert!(
        matches!(
            err,
            PreviewError::TooFew {
                label: 7,
                count: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("class 7 has 1 training image"),
        "{err}"
    );
}

#[test]
fn copies_of_training_images_are_flagged_and_fresh_samples_pass() {
    let data = phantoms(40, 32);
    let real: Vec<&[f32]> = data.iter().map(|(_, p)| p.as_slice()).collect();
    // A "generator" that memorised: its output is the training images, barely changed.
    let copies: Vec<Vec<f32>> = data
        .iter()
        .take(10)
        .map(|(_, p)| p.iter().map(|x| (x + 0.001).min(1.0)).collect())
        .collect();
    let copies_ref: Vec<&[f32]> = copies.iter().map(Vec::as_slice).collect();
    let report = memorisation_check(&real, &copies_ref, DEFAULT_DCR_THRESHOLD);
    assert_eq!(report.flagged, (0..10).collect::<Vec<_>>(), "{report:?}");
    assert!(
        report.ratios.iter().all(|r| *r < 0.1),
        "{:?}",
        report.ratios
    );

    let train: Vec<(u32, &[f32])> = data.iter().map(|(l, p)| (*l, p.as_slice())).collect();
    let fresh = generate(&train, 10, 8, 9).unwrap();
    let fresh_ref: Vec<&[f32]> = fresh.iter().map(|p| p.pixels.as_slice()).collect();
    let report = memorisation_check(&real, &fresh_ref, DEFAULT_DCR_THRESHOLD);
    assert!(report.real_nn_median > 0.0);
    assert!(
        report.flagged.len() <= 2,
        "samples from the class model are not copies: {:?}",
        report.ratios
    );
}

fn dicom_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom")
}

#[test]
fn the_summary_suppresses_rare_values_and_names_nobody() {
    let files: Vec<PathBuf> = std::fs::read_dir(dicom_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    assert!(files.len() >= 10);
    // Every file labelled 0, except one rare label 1.
    let labelled: Vec<(&Path, u32)> = files
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_path(), u32::from(i == 0)))
        .collect();
    let k = 3;
    let summary = summarise_dicom(&labelled, k);
    let label = |v: &str| summary.labels.iter().find(|c| c.value == v).unwrap().count;
    assert_eq!(label("0"), Some(files.len() as u64 - 1));
    assert_eq!(label("1"), None, "a count below k is suppressed");
    assert!(
        summary
            .modalities
            .iter()
            .any(|c| c.value == "MR" && c.count.is_some()),
        "{summary:?}"
    );

    // Nothing identifying: collect every name, id, date and institution in the files, and
    // look for each in what would leave the site.
    use dicom_dictionary_std::tags;
    let json = serde_json::to_string(&summary).unwrap();
    let mut identifying = Vec::new();
    let mut makers = Vec::new();
    for f in &files {
        let Ok(obj) = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(f)
        else {
            continue;
        };
        if let Some(m) = obj
            .element(tags::MANUFACTURER)
            .ok()
            .and_then(|e| e.to_str().ok())
        {
            makers.push(m.trim().to_string());
        }
        for tag in [
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::STUDY_DATE,
            tags::INSTITUTION_NAME,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::ACCESSION_NUMBER,
            tags::STUDY_INSTANCE_UID,
        ] {
            if let Some(v) = obj.element(tag).ok().and_then(|e| e.to_str().ok()) {
                let v = v.trim().trim_end_matches('\0').to_string();
                if v.len() >= 3 {
                    identifying.push(v);
                }
            }
        }
    }
    // (A file whose institution is recorded as its scanner's maker names no one.)
    identifying.retain(|v| !makers.iter().any(|m| m.contains(v.as_str())));
    assert!(
        identifying.len() >= 10,
        "the files carry identifying attributes: {identifying:?}"
    );
    for m in &makers {
        let named = summary.manufacturers.iter().any(|c| &c.value == m);
        let n = makers.iter().filter(|x| *x == m).count() as u64;
        assert_eq!(
            named,
            n >= k,
            "{m:?} seen {n} times: named only when at least k"
        );
    }
    for v in &identifying {
        // As a value of its own, or inside one when long enough not to match by chance.
        let whole = json.contains(&format!("\"{v}\""));
        let inside = v.len() >= 6 && json.contains(v.as_str());
        assert!(!whole && !inside, "{v:?} leaked into {json}");
    }
}

#[test]
fn the_conditional_vae_draws_each_class_on_demand() {
    let data = phantoms(160, 32);
    let units: Vec<String> = (0..data.len()).map(|i| format!("patient-{i}")).collect();
    let train: Vec<(u32, &[f32], &str)> = data
        .iter()
        .zip(&units)
        .map(|((l, p), u)| (*l, p.as_slice(), u.as_str()))
        .collect();
    let previews =
        consilium_worker::cvae::generate(&train, 10, consilium_worker::cvae::STEPS, 7, None)
            .unwrap();
    assert_eq!(previews.len(), 20);
    for label in [0, 1] {
        assert_eq!(previews.iter().filter(|p| p.label == label).count(), 10);
    }
    for p in &previews {
        assert_eq!(p.pixels.len(), 32 * 32);
        assert!(p.pixels.iter().all(|x| (0.0..=1.0).contains(x)));
    }
    // Conditioned on the class: nearer that class's mean image than the other's.
    let right = nearer_own_class(&data, &previews);
    assert!(
        right >= 16,
        "{right} of 20 VAE samples nearer their own class"
    );
    // And not copies of the training images.
    let real: Vec<&[f32]> = data.iter().map(|(_, p)| p.as_slice()).collect();
    let samples: Vec<&[f32]> = previews.iter().map(|p| p.pixels.as_slice()).collect();
    let report = memorisation_check(&real, &samples, DEFAULT_DCR_THRESHOLD);
    assert!(report.flagged.len() <= 2, "{:?}", report.ratios);
}

#[test]
fn nothing_identifying_leaves_with_a_preview_of_dicom_images() {
    use std::io::Write;
    let dir = dicom_dir();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".dcm"))
        .collect();
    let mut labels = tempfile::NamedTempFile::new().unwrap();
    writeln!(labels, "file,label").unwrap();
    for (i, n) in names.iter().enumerate() {
        writeln!(labels, "{n},{}", i % 2).unwrap();
    }
    labels.flush().unwrap();
    let spec = consilium_worker::data::DatasetSpec {
        kind: consilium_worker::data::DataKind::Dicom,
        root: dir.clone(),
        labels: labels.path().to_path_buf(),
        label_key: consilium_worker::data::LabelKey::Path,
        masks: false,
        holdout: 0.0,
        window: None,
        decoding: Default::default(),
    };
    let data = consilium_worker::data::load(
        &spec,
        32,
        &consilium_worker::decode::Decoder::program(env!("CARGO_BIN_EXE_consilium-worker")),
    )
    .unwrap();
    let preview = consilium_core::preview::PreviewSpec {
        per_class: 4,
        image_size: 32,
        k: 3,
        generator: None,
        dp: None,
    };
    let (set, _) =
        consilium_worker::preview::build_set(&data, &preview, &dir, true, 1, None, None).unwrap();
    assert_eq!(
        set.generator, "pca_gaussian",
        "few images per class: the fallback"
    );
    assert!(set.summary.modalities.iter().any(|c| c.count.is_some()));
    let everything = serde_json::to_string(&set).unwrap();

    use dicom_dictionary_std::tags;
    for n in &names {
        let Ok(obj) = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(dir.join(n))
        else {
            continue;
        };
        for tag in [
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::STUDY_DATE,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::ACCESSION_NUMBER,
            tags::STUDY_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
        ] {
            if let Some(v) = obj.element(tag).ok().and_then(|e| e.to_str().ok()) {
                let v = v.trim().trim_end_matches('\0');
                if v.len() >= 3 {
                    assert!(
                        !(everything.contains(&format!("\"{v}\""))
                            || v.len() >= 6 && everything.contains(v)),
                        "{v:?} (from {n}) left the site"
                    );
                }
            }
        }
        assert!(
            !everything.contains(n.as_str()),
            "a file name ({n}) left the site"
        );
    }
}

/// A private preview's generator trains by DP-SGD: the images still come out per class, and
/// the noise is the operating system's: the same seed (which the server knows) draws different
/// images every time, where the non-private generator reproduces exactly.
#[test]
fn a_private_generator_cannot_be_replayed_from_its_seed() {
    use consilium_worker::cvae::generate;
    let data = phantoms(160, 16);
    let units: Vec<String> = (0..data.len())
        .map(|i| format!("patient-{}", i / 2))
        .collect();
    let train: Vec<(u32, &[f32], &str)> = data
        .iter()
        .zip(&units)
        .map(|((l, p), u)| (*l, p.as_slice(), u.as_str()))
        .collect();
    let cost = consilium_core::preview::dp_cost(
        &consilium_core::preview::PreviewPrivacy {
            epsilon: 8.0,
            delta: 1e-5,
            max_grad_norm: 1.0,
        },
        80,
    )
    .unwrap();
    assert_eq!(cost.patients, 80);
    assert_eq!(cost.sampling_rate, 32.0 / 80.0);
    assert_eq!(cost.steps, consilium_core::preview::GENERATOR_STEPS);
    let step = consilium_worker::train::DpStep {
        sampling_rate: cost.sampling_rate,
        noise_multiplier: cost.noise_multiplier,
        max_grad_norm: 1.0,
        steps: 40,
    };
    let one = generate(&train, 4, 40, 7, Some(&step)).unwrap();
    let two = generate(&train, 4, 40, 7, Some(&step)).unwrap();
    assert_eq!(one.len(), 8);
    assert!(
        one.iter()
            .all(|p| p.pixels.iter().all(|x| (0.0..=1.0).contains(x)))
    );
    assert_eq!(
        one.iter().map(|p| p.label).collect::<Vec<_>>(),
        vec![0, 0, 0, 0, 1, 1, 1, 1]
    );
    assert_ne!(one, two, "the same seed drew the same private images");
    let plain = |seed| generate(&train, 4, 40, seed, None).unwrap();
    assert_eq!(
        plain(7),
        plain(7),
        "without DP the seed reproduces the preview"
    );
}

/// A site of image + mask phantoms (PNG pairs), loaded as the worker loads it.
fn segmentation_site(dir: &Path, images: usize) -> consilium_worker::data::Dataset {
    let profile = SiteProfile {
        images,
        lesion_fraction: 0.6,
        gain: 1.0,
        offset: 0.0,
        noise: 0.03,
        blur: 0,
        seed: 7,
    };
    consilium_worker::synthetic::write_segmentation_site(dir, 32, &profile).unwrap();
    let spec = consilium_worker::data::DatasetSpec {
        kind: consilium_worker::data::DataKind::Images,
        root: dir.to_path_buf(),
        labels: dir.join("labels.csv"),
        label_key: consilium_worker::data::LabelKey::Path,
        masks: true,
        holdout: 0.0,
        window: None,
        decoding: Default::default(),
    };
    consilium_worker::data::load(
        &spec,
        32,
        &consilium_worker::decode::Decoder::program(env!("CARGO_BIN_EXE_consilium-worker")),
    )
    .unwrap()
}

/// A preview of a PNG segmentation site's data (not private) under the plan's mask classes.
fn segmentation_set(
    data: &consilium_worker::data::Dataset,
    spec: &consilium_core::preview::PreviewSpec,
    dir: &Path,
    seed: u64,
    plan: &consilium_core::plan::Segmentation,
) -> Result<(consilium_core::preview::PreviewSet, u32), String> {
    consilium_worker::preview::build_set(data, spec, dir, false, seed, None, Some(plan))
}

fn lesion_plan() -> consilium_core::plan::Segmentation {
    consilium_core::plan::Segmentation {
        values: vec![0, 1],
        names: vec!["background".into(), "lesion".into()],
    }
}

fn decode_png(b64: &str) -> image::GrayImage {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_luma8()
}

/// How much brighter an image is where its mask says lesion than where it says background
/// (None when the mask shows no lesion).
fn lesion_contrast(pixels: &[f32], classes: &[u8]) -> Option<f32> {
    let mean = |class: u8| {
        let v: Vec<f32> = pixels
            .iter()
            .zip(classes)
            .filter(|(_, c)| **c == class)
            .map(|(p, _)| *p)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f32>() / v.len() as f32)
    };
    Some(mean(1)? - mean(0)?)
}

/// Each synthetic image comes with a synthetic mask drawn with it, by either generator: a PNG
/// of the plan's classes at the image's size, where the lesion the mask outlines is in its own
/// image (brighter there than the set's other images are); the memorisation check compares the
/// images alone; the summary counts the images that show each class.
#[test]
fn a_segmentation_preview_draws_each_image_with_its_mask() {
    let dir = tempfile::tempdir().unwrap();
    let data = segmentation_site(dir.path(), 120);
    let real: Vec<&[f32]> = data.train().map(|s| s.pixels.as_slice()).collect();
    // In the real pairs a lesion is brighter than the background around it.
    let real_contrast: Vec<f32> = data
        .train()
        .filter_map(|s| {
            let m: Vec<u8> = s.mask.as_ref().unwrap().iter().map(|v| *v as u8).collect();
            lesion_contrast(&s.pixels, &m)
        })
        .collect();
    let real_contrast = real_contrast.iter().sum::<f32>() / real_contrast.len() as f32;
    assert!(real_contrast > 0.05, "{real_contrast}");
    let with_lesion = data
        .train()
        .filter(|s| s.mask.as_ref().unwrap().contains(&1))
        .count() as u64;

    for generator in ["pca_gaussian", "cvae"] {
        let spec = consilium_core::preview::PreviewSpec {
            per_class: 24,
            image_size: 32,
            k: 1,
            generator: Some(generator.into()),
            dp: None,
        };
        let (set, withheld) =
            segmentation_set(&data, &spec, dir.path(), 5, &lesion_plan()).unwrap();
        assert_eq!(set.generator, generator);
        assert_eq!(set.images.len() + withheld as usize, 24);
        // The check measured the images against the real images alone (the masks are not
        // part of the distance).
        assert_eq!(set.memorisation.ratios.len(), 24);
        let images_only = memorisation_check(&real, &real[..1], DEFAULT_DCR_THRESHOLD);
        assert_eq!(set.memorisation.real_nn_median, images_only.real_nn_median);
        let mut contrasts = Vec::new();
        let mut lesions = 0;
        let mut decoded = Vec::new();
        for img in &set.images {
            let px = decode_png(&img.png_base64);
            let mask = decode_png(img.mask_png_base64.as_deref().expect("a mask per image"));
            assert_eq!(mask.dimensions(), (32, 32), "{generator}");
            assert_eq!(px.dimensions(), (32, 32), "{generator}");
            assert!(
                mask.pixels().all(|p| p.0[0] <= 1),
                "{generator}: classes 0 and 1 only"
            );
            let pixels: Vec<f32> = px.pixels().map(|p| f32::from(p.0[0]) / 255.0).collect();
            let classes: Vec<u8> = mask.pixels().map(|p| p.0[0]).collect();
            if let Some(c) = lesion_contrast(&pixels, &classes) {
                lesions += 1;
                contrasts.push(c);
            }
            decoded.push((pixels, classes));
        }
        // The same masks over the other images of the set: how bright a lesion's place is in
        // an image that was not drawn with that mask.
        let others: Vec<f32> = (0..decoded.len())
            .filter_map(|i| {
                let other = &decoded[(i + 1) % decoded.len()].0;
                lesion_contrast(other, &decoded[i].1)
            })
            .collect();
        let others = others.iter().sum::<f32>() / others.len().max(1) as f32;
        assert!(
            lesions > 0 && lesions < set.images.len(),
            "{generator}: some masks show a lesion and some do not ({lesions} of {})",
            set.images.len()
        );
        let contrast = contrasts.iter().sum::<f32>() / contrasts.len() as f32;
        assert!(
            contrast - others > real_contrast / 4.0,
            "{generator}: where a synthetic mask says lesion, its own image is brighter ({contrast:.3}) than the other images there ({others:.3}); real pairs {real_contrast:.3}"
        );
        let labels = &set.summary.labels;
        let count = |name: &str| labels.iter().find(|c| c.value == name).unwrap().count;
        assert_eq!(count("background"), Some(data.train().count() as u64));
        assert_eq!(count("lesion"), Some(with_lesion));
    }
}

#[test]
fn a_segmentation_preview_needs_masks_and_a_plan_it_can_draw() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = segmentation_site(dir.path(), 12);
    let spec = consilium_core::preview::PreviewSpec::default();
    // More classes than the generator draws.
    let many = consilium_core::plan::Segmentation {
        values: (0..20).collect(),
        names: (0..20).map(|i| format!("class {i}")).collect(),
    };
    let e = segmentation_set(&data, &spec, dir.path(), 1, &many).unwrap_err();
    assert!(
        e.contains("20 mask classes") && e.contains("at most 16"),
        "{e}"
    );
    // A mask value the plan does not name.
    let only_background = consilium_core::plan::Segmentation {
        values: vec![0],
        names: vec!["background".into()],
    };
    let e = segmentation_set(&data, &spec, dir.path(), 1, &only_background).unwrap_err();
    assert!(e.contains("does not name"), "{e}");
    // Images without masks.
    data.samples.iter_mut().for_each(|s| s.mask = None);
    let e = segmentation_set(&data, &spec, dir.path(), 1, &lesion_plan()).unwrap_err();
    assert!(e.contains("masks = true"), "{e}");
}
