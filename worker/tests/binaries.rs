#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The shipped worker binary, run as a hospital runs it: `consilium-worker check-data` over
//! every file in tests/data, and its decoding child under a crashing or hanging codec.

use consilium_worker::data::{DataKind, DatasetSpec, LabelKey, load};
use consilium_worker::decode::{DecodeLimits, Decoder};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn data(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(dir)
}

/// A labels file naming every file of `root` (label 1).
fn label_everything(root: &Path, out: &Path) {
    let mut f = std::fs::File::create(out).unwrap();
    writeln!(f, "file,label").unwrap();
    for e in std::fs::read_dir(root).unwrap() {
        writeln!(f, "{},1", e.unwrap().file_name().to_string_lossy()).unwrap();
    }
}

fn check_data(kind: &str, root: &Path, extra: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.csv");
    label_everything(root, &labels);
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"site_id = "00000000-0000-0000-0000-000000000001"
server_url = "http://127.0.0.1:9"
token = "unused by check-data"
broker_url = "amqp://127.0.0.1:9"
[dataset]
kind = "{kind}"
root = "{}"
labels = "{}"
{extra}"#,
            root.display(),
            labels.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_consilium-worker"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "check-data",
            "--size",
            "32",
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The file names listed under "skipped:".
fn skipped_files(out: &str) -> Vec<String> {
    out.split("\nskipped:\n")
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.trim().split(": ").next().map(str::to_string))
        .collect()
}

#[test]
fn the_worker_binary_reads_every_dicom_test_file() {
    let (code, out, err) = check_data("dicom", &data("dicom"), "");
    assert_eq!(code, 0, "{out}{err}");
    // Every image file, JPEG 2000, JPEG-LS, 12-bit JPEG, 32-bit and planar colour included.
    assert!(out.starts_with("69 images of 14 patients (dicom"), "{out}");
    let mut skipped = skipped_files(&out);
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "LICENSE-pydicom-data.txt",
            "LICENSE-pydicom.txt",
            "MR_truncated.dcm",
            "PYDICOM_TEST_FILES_README.txt",
            "badVR.dcm",
            "liver_1frame.dcm",
            "rtplan.dcm"
        ],
        "{out}"
    );
    // The table per transfer syntax and modality: read, skipped, images.
    for row in [
        "DICOM JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)                      CR            1        0       1",
        "DICOM JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)               MR            2        0      11",
        "DICOM JPEG Extended (Process 2 & 4) (1.2.840.10008.1.2.4.51)                    NM            2        0       2",
        "DICOM Explicit VR Little Endian (1.2.840.10008.1.2.1)                           SEG           0        1       0",
    ] {
        assert!(out.contains(row), "{row}\n{out}");
    }
    assert!(
        out.contains("    1 skipped: a segmentation object (SEG)"),
        "{out}"
    );
}

#[test]
fn the_worker_binary_reads_every_nifti_test_file() {
    let (code, out, err) = check_data("nifti", &data("nifti"), "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("68 images of 4 patients (nifti"), "{out}");
    assert_eq!(skipped_files(&out), ["LICENSE-nibabel.txt"], "{out}");
    assert!(out.contains("NIfTI-2 (gzip)"), "{out}");
}

#[test]
fn decoding_limits_that_cannot_work_are_refused() {
    let (code, out, err) = check_data(
        "dicom",
        &data("dicom"),
        "[dataset.decoding]\nmax_memory_mib = 16\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("dataset.decoding.max_memory_mib is 16: give 256 to 1048576 MiB"),
        "{err}"
    );
}

/// A stand-in for a codec gone wrong: a decoding child that answers like the real one, then
/// does `behaviour` on the first file.
fn misbehaving_decoder(dir: &Path, behaviour: &str) -> Decoder {
    let script = dir.join("decoder.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho '{{\"decoder\":1}}'\nread request\n{behaviour}\n"),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    Decoder::program(script)
}

fn one_file_spec(dir: &Path, limits: DecodeLimits) -> DatasetSpec {
    let root = dir.join("data");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(
        data("dicom").join("MR_small.dcm"),
        root.join("MR_small.dcm"),
    )
    .unwrap();
    std::fs::write(dir.join("labels.csv"), "file,label\nMR_small.dcm,0\n").unwrap();
    DatasetSpec {
        kind: DataKind::Dicom,
        root,
        labels: dir.join("labels.csv"),
        label_key: LabelKey::Path,
        masks: false,
        holdout: 0.0,
        window: None,
        decoding: limits,
    }
}

#[test]
fn a_crashing_or_hanging_codec_costs_only_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = one_file_spec(dir.path(), DecodeLimits::default());
    let crashing = misbehaving_decoder(
        dir.path(),
        "echo 'free(): invalid pointer' >&2\nkill -SEGV $$",
    );
    let ds = load(&spec, 32, &crashing).unwrap();
    assert!(ds.samples.is_empty());
    let reason = &ds.skipped[0].reason;
    assert!(
        reason.contains("the decoder stopped on this file (killed by signal 11 (segmentation fault): free(): invalid pointer)"),
        "{reason}"
    );

    let dir = tempfile::tempdir().unwrap();
    let spec = one_file_spec(
        dir.path(),
        DecodeLimits {
            timeout_seconds: 1,
            ..DecodeLimits::default()
        },
    );
    let hanging = misbehaving_decoder(dir.path(), "sleep 30");
    let started = std::time::Instant::now();
    let ds = load(&spec, 32, &hanging).unwrap();
    assert!(
        started.elapsed().as_secs() < 20,
        "the hanging child was not stopped"
    );
    assert_eq!(
        ds.skipped[0].reason,
        "decoding took longer than 1 s (dataset.decoding.timeout_seconds); the file was skipped"
    );

    // A program that is not a decoder is refused as a whole, not file by file.
    let err = load(&spec, 32, &Decoder::program("/bin/cat"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is not a Consilium decoder of this version"),
        "{err}"
    );
}

/// An uncompressed DICOM image of `side` × `side` 16-bit samples (`side`² × 2 bytes).
fn write_large_dicom(path: &Path, side: u16) {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    use dicom_object::meta::FileMetaTableBuilder;
    let mut obj = InMemDicomObject::new_empty();
    let text = |v: &str| PrimitiveValue::from(v);
    let number = |v: u16| PrimitiveValue::from(v);
    obj.put(DataElement::new(
        tags::SOP_CLASS_UID,
        VR::UI,
        text("1.2.840.10008.5.1.4.1.1.7"),
    ));
    obj.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        text("1.2.3.4.5"),
    ));
    obj.put(DataElement::new(tags::MODALITY, VR::CS, text("OT")));
    obj.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, number(1)));
    obj.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        text("MONOCHROME2"),
    ));
    obj.put(DataElement::new(tags::ROWS, VR::US, number(side)));
    obj.put(DataElement::new(tags::COLUMNS, VR::US, number(side)));
    obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, number(16)));
    obj.put(DataElement::new(tags::BITS_STORED, VR::US, number(16)));
    obj.put(DataElement::new(tags::HIGH_BIT, VR::US, number(15)));
    obj.put(DataElement::new(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        number(0),
    ));
    let pixels: Vec<u16> = (0..u32::from(side) * u32::from(side))
        .map(|i| (i % 4096) as u16)
        .collect();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(pixels.into()),
    ));
    obj.with_meta(
        FileMetaTableBuilder::new()
            .transfer_syntax("1.2.840.10008.1.2.1")
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
            .media_storage_sop_instance_uid("1.2.3.4.5"),
    )
    .unwrap()
    .write_to_file(path)
    .unwrap();
}

#[test]
fn a_file_that_needs_more_memory_than_allowed_is_skipped_and_the_next_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    // 8192² samples: 128 MiB stored, four times that as decoded values.
    write_large_dicom(&root.join("a_large.dcm"), 8192);
    std::fs::copy(data("dicom").join("MR_small.dcm"), root.join("b_small.dcm")).unwrap();
    std::fs::write(
        dir.path().join("labels.csv"),
        "file,label\na_large.dcm,0\nb_small.dcm,1\n",
    )
    .unwrap();
    let spec = |max_memory_mib| DatasetSpec {
        kind: DataKind::Dicom,
        root: root.clone(),
        labels: dir.path().join("labels.csv"),
        label_key: LabelKey::Path,
        masks: false,
        holdout: 0.0,
        window: None,
        decoding: DecodeLimits {
            max_memory_mib,
            ..DecodeLimits::default()
        },
    };
    let decoder = Decoder::program(env!("CARGO_BIN_EXE_consilium-worker"));
    let ds = load(&spec(256), 32, &decoder).unwrap();
    assert_eq!(ds.samples.len(), 1);
    assert_eq!(ds.samples[0].source, "b_small.dcm");
    let reason = &ds.skipped[0].reason;
    assert!(
        reason.starts_with("the decoder stopped on this file (it needed more than 256 MiB (dataset.decoding.max_memory_mib)"),
        "{reason}"
    );
    // With room enough, the same file reads.
    let ds = load(&spec(4096), 32, &decoder).unwrap();
    assert_eq!(ds.samples.len(), 2, "{:?}", ds.skipped);
}

/// `consilium-worker privacy` reads the site's ledger with the shipped configuration's shape
/// (deploy/worker.toml, its lifetime budget), and an unreadable ledger stops the worker with
/// what to do rather than starting again from zero.
#[test]
fn the_worker_reports_its_privacy_ledger_and_refuses_an_unreadable_one() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("privacy-ledger.json");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/worker.toml");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_consilium-worker"))
            .args(["--config", config, "privacy"])
            .env("CONSILIUM_WORKER_PRIVACY_LEDGER", &ledger)
            .output()
            .unwrap()
    };
    let out = run();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("0 private rounds in 0 runs"), "{text}");
    assert!(
        text.contains("ε = 0.000 of the lifetime budget ε = 10 at δ = 0.00001"),
        "{text}"
    );
    std::fs::write(&ledger, b"{\"entries\": [").unwrap();
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("restore it from a backup"), "{err}");
}
