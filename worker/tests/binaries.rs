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
artifacts = "{}"
[dataset]
kind = "{kind}"
root = "{}"
labels = "{}"
{extra}"#,
            dir.path().join("artifacts").display(),
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
    assert!(out.starts_with("69 images (dicom"), "{out}");
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
    assert!(out.starts_with("68 images (nifti"), "{out}");
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
