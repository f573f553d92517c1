//! `consilium-worker bench-train`: local training steps per second of a model on random data,
//! against candle's own kernels and PyTorch in the same run (see the README's benchmarks).
//! Each measurement runs in a fresh process of the worker binary; its output is the CLI's own.

use std::path::PathBuf;

/// What `bench-train` measures.
pub struct Bench<'a> {
    /// `small_cnn`, `resnet` or `unet`.
    pub model: &'a str,
    /// resnet's and unet's normalisation: `batch` or `group`.
    pub norm: &'a str,
    pub steps: usize,
    pub runs: usize,
    /// DP-SGD next to non-private training (instead of candle's kernels next to ours).
    pub dp: bool,
}

impl Bench<'_> {
    /// The model's name as the output and the PyTorch script know it.
    fn label(&self) -> String {
        match self.model {
            "resnet" => format!("resnet ({} norm)", self.norm),
            "unet" => format!(
                "unet (widths 16, 32, 64, {} norm, transposed upsampling, 2 classes, soft Dice + cross-entropy)",
                self.norm
            ),
            m => m.to_string(),
        }
    }

    /// Images per step: 64 for the classifiers, 16 for the U-Net (whose activations are
    /// full-resolution maps).
    fn batch(&self) -> usize {
        if self.model == "unet" { 16 } else { 64 }
    }

    /// The input's side in pixels.
    fn size(&self) -> usize {
        match self.model {
            "resnet" => 32,
            "unet" => 64,
            _ => 28,
        }
    }

    /// "batch 64, 28×28".
    fn shape(&self) -> String {
        format!("batch {}, {s}×{s}", self.batch(), s = self.size())
    }

    /// The arguments that repeat this benchmark in a child process or in PyTorch.
    fn args(&self) -> Vec<String> {
        vec![
            "--model".into(),
            self.model.into(),
            "--norm".into(),
            self.norm.into(),
            "--steps".into(),
            self.steps.to_string(),
        ]
    }

    fn check(&self) -> anyhow::Result<()> {
        match (self.model, self.norm) {
            ("small_cnn", "batch") | ("resnet" | "unet", "batch" | "group") => {}
            ("small_cnn", _) => anyhow::bail!("--norm applies to resnet and unet only"),
            (m, n) => anyhow::bail!(
                "--model must be small_cnn, resnet or unet and --norm batch or group, not {m} and {n}"
            ),
        }
        if self.dp && self.model == "unet" {
            anyhow::bail!(
                "DP-SGD is not built for segmentation plans yet (the plan refuses it): drop --dp for unet"
            );
        }
        if self.dp && self.model == "resnet" && self.norm != "group" {
            anyhow::bail!(
                "DP-SGD trains resnet with group normalisation only (batch normalisation's running averages would leave the site without noise): add --norm group"
            );
        }
        Ok(())
    }
}

/// The Python with PyTorch to compare with: CONSILIUM_TORCH_PYTHON, or .venv-torch.
fn torch_python() -> Option<PathBuf> {
    std::env::var_os("CONSILIUM_TORCH_PYTHON")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(".venv-torch/bin/python")))
        .filter(|p| p.exists())
}

/// PyTorch's steps/s on the same model, batch and optimiser (scripts/torch_bench.py).
fn torch_rate(b: &Bench, threads: usize, opacus: bool) -> anyhow::Result<Option<f64>> {
    let Some(python) = torch_python() else {
        return Ok(None);
    };
    // From the repository's root, or where this binary was built.
    let script = [
        PathBuf::from("scripts/torch_bench.py"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/torch_bench.py"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .ok_or_else(|| {
        anyhow::anyhow!("scripts/torch_bench.py not found: run from the repository's root")
    })?;
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([b.model, &b.steps.to_string(), &threads.to_string()])
        .args(opacus.then_some("--opacus"))
        .args((b.norm == "group").then_some("--group-norm"))
        .env("OMP_NUM_THREADS", threads.to_string())
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "PyTorch ({}) failed: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).trim().parse()?))
}

/// One measurement in a child process: steps/s with `threads` threads.
fn bench_child(b: &Bench, threads: usize, baseline: bool, dp: bool) -> anyhow::Result<f64> {
    let mut args = vec!["bench-train".to_string()];
    args.extend(b.args());
    args.extend(["--threads".into(), threads.to_string()]);
    if baseline {
        args.push("--candle-conv".into());
    }
    if dp {
        args.push("--dp".into());
    }
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(&args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "the {threads}-thread measurement failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// The median of `runs` measurements, and their range, as "median (min–max)".
fn measured(
    runs: usize,
    mut measure: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<(f64, String)> {
    let mut rates = (0..runs.max(1))
        .map(|_| measure())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let range = match (rates.first(), rates.last()) {
        (Some(lo), Some(hi)) if rates.len() > 1 => format!(" ({lo:.2}–{hi:.2})"),
        _ => String::new(),
    };
    Ok((median, format!("{median:>7.2} steps/s{range}")))
}

/// The parent: one child process per measurement (a thread pool is sized once per process),
/// candle's kernels, Consilium's and PyTorch's side by side, each `runs` times, interleaved.
fn bench_parent(b: &Bench) -> anyhow::Result<()> {
    let (model, steps, runs, shape) = (b.label(), b.steps, b.runs, b.shape());
    let all = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if b.dp {
        println!(
            "{model}: {shape} (every patient sampled), SGD with momentum, {steps} steps after 3 warm-up steps; median of {runs} run(s) (range)"
        );
        for t in [1, all] {
            let (plain, line) = measured(runs, || bench_child(b, t, false, false))?;
            println!("  {t} thread(s), non-private:                   {line}");
            let (private, line) = measured(runs, || bench_child(b, t, false, true))?;
            println!("  {t} thread(s), DP-SGD (per-patient clipping): {line}");
            println!(
                "  {t} thread(s), DP-SGD step time {:.2}x the non-private",
                plain / private
            );
            if torch_python().is_some() {
                let (opacus, line) = measured(runs, || {
                    torch_rate(b, t, true)?.ok_or_else(|| anyhow::anyhow!("PyTorch is gone"))
                })?;
                println!(
                    "  {t} thread(s), Opacus DP-SGD:                 {line} (Consilium at {:.2}x Opacus)",
                    private / opacus
                );
            }
        }
        if torch_python().is_none() {
            println!(
                "  (Opacus not measured: scripts/torch-venv creates .venv-torch with it, or set CONSILIUM_TORCH_PYTHON)"
            );
        }
        return Ok(());
    }
    println!(
        "{model}: {shape}, SGD with momentum, {steps} steps after 3 warm-up steps; median of {runs} run(s) (range)"
    );
    for t in [1, all] {
        let (base, line) = measured(runs, || bench_child(b, t, true, false))?;
        println!("  {t} thread(s), candle's kernels:    {line}");
        let (ours, line) = measured(runs, || bench_child(b, t, false, false))?;
        println!("  {t} thread(s), Consilium's kernels: {line}");
        println!("  {t} thread(s), speed-up {:.2}x", ours / base);
        if torch_python().is_some() {
            let (torch, line) = measured(runs, || {
                torch_rate(b, t, false)?.ok_or_else(|| anyhow::anyhow!("PyTorch is gone"))
            })?;
            println!(
                "  {t} thread(s), PyTorch:             {line} (Consilium at {:.2}x PyTorch)",
                ours / torch
            );
        }
    }
    if torch_python().is_none() {
        println!(
            "  (PyTorch not measured: scripts/torch-venv creates .venv-torch, or set CONSILIUM_TORCH_PYTHON)"
        );
    }
    Ok(())
}

pub fn bench_train(b: &Bench, threads: Option<usize>, candle_conv: bool) -> anyhow::Result<()> {
    use crate::data::Sample;
    use crate::train::{DpStep, Net, Rng};
    b.check()?;
    let Some(threads) = threads else {
        return bench_parent(b);
    };
    let (model, steps, dp) = (b.model, b.steps, b.dp);
    consilium_core::conv::use_candle_kernels(candle_conv);
    let (size, batch_size) = (b.size(), b.batch());
    let segmentation = model == "unet";
    let classes = if segmentation { 2 } else { 10 };
    let mut spec = serde_json::json!({"architecture": model, "num_classes": classes});
    if model != "small_cnn" {
        spec["hyper_parameters"] = serde_json::json!({"norm": b.norm});
    }
    if segmentation {
        spec["labels"] = serde_json::json!({"0": "background", "1": "lesion"});
    }
    let manifest: consilium_core::manifest::TrainingPlanManifest = serde_json::from_value(
        serde_json::json!({
            "model": spec,
            "preprocessing": {"image_size": size},
            "optimiser": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9},
            "local_epochs": 1, "batch_size": batch_size, "rounds": 1, "aggregation": {"strategy": "fedavg"}, "seed": 1
        }),
    )?;
    let plan = manifest
        .parse()
        .map_err(|p| anyhow::anyhow!("the benchmark's plan: {}", p.join("; ")))?;
    let net = Net::new(&plan, &crate::train::device())?;
    let mut rng = Rng::new(7);
    let samples: Vec<Sample> = (0..batch_size)
        .map(|i| Sample {
            pixels: (0..size * size).map(|_| rng.unit() as f32).collect(),
            label: i as u32 % classes as u32,
            // A random label per pixel, as the PyTorch script's.
            mask: segmentation.then(|| {
                (0..size * size)
                    .map(|_| u16::from(rng.unit() < 0.5))
                    .collect()
            }),
            source: String::new(),
            holdout: false,
            unit: format!("patient {i}"),
        })
        .collect();
    let batch: Vec<&Sample> = samples.iter().collect();
    // One epoch over one batch of samples is exactly one step; under DP-SGD, sampling rate 1
    // takes every patient, so both steps see the same batch.
    let private = DpStep {
        sampling_rate: 1.0,
        noise_multiplier: 1.0,
        max_grad_norm: 1.0,
        steps: 1,
    };
    let step = |seed: u64| -> anyhow::Result<()> {
        if dp {
            net.train_dp(&batch, &plan, seed, &private)?;
        } else {
            net.train(&batch, &plan, seed)?;
        }
        Ok(())
    };
    for _ in 0..3 {
        step(1)?;
    }
    let started = std::time::Instant::now();
    for i in 0..steps {
        step(i as u64)?;
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::debug!(threads, "measured");
    println!("{:.3}", steps as f64 / secs);
    Ok(())
}
