#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A seeded corruption loop over the real test files: truncated and bit-flipped copies of
//! every DICOM and NIfTI file go through the shipped worker binary's decoder. Whatever a codec
//! does with them, the worker must go on, and every file must be read (with sane pixels) or
//! skipped with a reason. `FUZZ_SECONDS` bounds the loop (default 20);
//! `FUZZ_SEED` replays a run. A file on which the decoding child itself died is
//! copied to `target/fuzz-crashers/` and named in the output: keep it in tests/data/fuzz.

use consilium_worker::data::{DataKind, DatasetSpec, LabelKey, load};
use consilium_worker::decode::{DecodeLimits, Decoder};
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn data(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(dir)
}

fn originals(dir: &str, ext: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(data(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| ext.iter().any(|x| p.to_string_lossy().ends_with(x)))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A damaged copy: cut short, or a few bits flipped (more often in the first kilobytes,
/// where the headers that steer a decoder are).
fn damage(bytes: &[u8], rng: &mut impl Rng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if rng.gen_bool(0.3) {
        out.truncate(rng.gen_range(0..bytes.len().max(1)));
        return out;
    }
    for _ in 0..rng.gen_range(1..=8) {
        let span = if rng.gen_bool(0.6) {
            out.len().min(2048)
        } else {
            out.len()
        };
        if span == 0 {
            break;
        }
        let at = rng.gen_range(0..span);
        out[at] ^= 1 << rng.gen_range(0..8);
    }
    out
}

fn round(
    kind: DataKind,
    files: &[(String, Vec<u8>)],
    seed: u64,
    crashers: &mut Vec<PathBuf>,
) -> usize {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    let mut labels = std::fs::File::create(dir.path().join("labels.csv")).unwrap();
    writeln!(labels, "file,label").unwrap();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let damaged = format!("{i:02}-{name}");
        std::fs::write(root.join(&damaged), damage(bytes, &mut rng)).unwrap();
        writeln!(labels, "{damaged},0").unwrap();
    }
    drop(labels);
    let spec = DatasetSpec {
        kind,
        root: root.clone(),
        labels: dir.path().join("labels.csv"),
        label_key: LabelKey::Path,
        masks: false,
        holdout: 0.0,
        window: None,
        decoding: DecodeLimits {
            timeout_seconds: 60,
            max_memory_mib: 2048,
        },
    };
    let decoder = Decoder::program(env!("CARGO_BIN_EXE_consilium-worker"));
    let ds = load(&spec, 16, &decoder).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert_eq!(
        ds.files.len(),
        files.len(),
        "seed {seed}: every file accounted for"
    );
    for s in &ds.samples {
        assert!(
            s.pixels.len() == 256 && s.pixels.iter().all(|v| (0.0..=1.0).contains(v)),
            "seed {seed}: {} has pixels outside [0, 1]",
            s.source
        );
    }
    for f in &ds.files {
        match &f.skipped {
            Some(reason) => {
                assert!(
                    !reason.trim().is_empty(),
                    "seed {seed}: {} skipped without a reason",
                    f.file
                );
                if reason.contains("the decoder stopped on this file") {
                    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                        .join("../fuzz-crashers")
                        .join(format!("seed{seed}-{}", f.file));
                    std::fs::create_dir_all(keep.parent().unwrap()).unwrap();
                    std::fs::copy(root.join(&f.file), &keep).unwrap();
                    eprintln!("crasher (seed {seed}): {} — {reason}", keep.display());
                    crashers.push(keep);
                }
            }
            None => assert!(
                f.images > 0,
                "seed {seed}: {} read but gave no image",
                f.file
            ),
        }
    }
    ds.files.len()
}

#[test]
fn damaged_files_are_read_or_skipped_and_the_worker_goes_on() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let first_seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen::<u32>().into());
    let dicom = originals("dicom", &[".dcm"]);
    let nifti = originals("nifti", &[".nii", ".nii.gz"]);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut files, mut rounds, mut crashers) = (0, 0u64, Vec::new());
    while rounds == 0 || Instant::now() < deadline {
        let seed = first_seed + rounds;
        files += round(DataKind::Dicom, &dicom, seed, &mut crashers);
        files += round(DataKind::Nifti, &nifti, seed, &mut crashers);
        rounds += 1;
    }
    eprintln!(
        "fuzz: {rounds} rounds from seed {first_seed}, {files} damaged files, {} crashed a decoding child",
        crashers.len()
    );
}
