//! `consilium-worker`: one per hospital.

use clap::{Parser, Subcommand};
use consilium_worker::artifacts::ArtifactStore;
use consilium_worker::data::{self, DatasetSpec};
use consilium_worker::job::{ServerApprovals, SiteContext};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Training allocates and frees large tensors every step; jemalloc keeps freed memory for a
/// while instead of returning it to the kernel and faulting it back in (a quarter of CPU
/// training time with the system allocator).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "consilium-worker",
    version,
    about = "The Consilium site worker: trains approved plans on this hospital's images"
)]
struct Cli {
    /// The worker's TOML configuration (also `CONSILIUM_WORKER_*` variables).
    #[arg(long, env = "CONSILIUM_WORKER_CONFIG", default_value = "worker.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connects to the broker and runs jobs until stopped.
    Run,
    /// Reads the dataset and reports what is usable and what is skipped, then exits.
    CheckData {
        #[arg(long, default_value_t = 28)]
        size: usize,
    },
    /// Measures local training steps/s of a model (random data, batch 64, SGD with momentum)
    /// with 1 thread and with all threads, each in a fresh process.
    BenchTrain {
        /// `small_cnn` (28×28 input) or `resnet` (32×32).
        #[arg(long, default_value = "small_cnn")]
        model: String,
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Measurements of each kind; the median is reported, with the range.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Run one measurement with this many threads (used by the parent run).
        #[arg(long, hide = true)]
        threads: Option<usize>,
        /// With candle's own kernels (the baseline; used by the parent run).
        #[arg(long, hide = true)]
        candle_conv: bool,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerSettings {
    site_id: Uuid,
    /// The Consilium server, e.g. `https://consilium.example.org`.
    server_url: String,
    /// The site's worker token (`consilium admin create-worker-token`).
    token: String,
    /// `amqp://user:password@host:5672/%2f`
    broker_url: String,
    /// Artifact store: a folder, or `s3://bucket/prefix`.
    artifacts: String,
    #[serde(default = "default_heartbeat")]
    heartbeat_seconds: u64,
    dataset: DatasetSpec,
}

fn default_heartbeat() -> u64 {
    5
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::BenchTrain {
        model,
        steps,
        runs,
        threads,
        candle_conv,
    } = &cli.command
    {
        return bench_train(model, *steps, *runs, *threads, *candle_conv);
    }
    let settings: WorkerSettings = Figment::new()
        .merge(Toml::file_exact(&cli.config))
        .merge(Env::prefixed("CONSILIUM_WORKER_").split("__"))
        .extract()
        .map_err(|e| {
            anyhow::anyhow!(
                "invalid worker configuration ({}): {e}",
                cli.config.display()
            )
        })?;
    match cli.command {
        Command::CheckData { size } => {
            let ds = data::load(&settings.dataset, size)?;
            println!("{}", ds.summary(settings.dataset.kind));
            for s in &ds.skipped {
                println!("  skipped {}: {}", s.file, s.reason);
            }
            Ok(())
        }
        Command::BenchTrain { .. } => Ok(()),
        Command::Run => {
            let artifacts = ArtifactStore::open(&settings.artifacts)?;
            let approvals = Arc::new(ServerApprovals {
                server_url: settings.server_url.clone(),
                token: settings.token.clone(),
                http: reqwest::Client::new(),
            });
            let ctx = Arc::new(SiteContext::new(
                settings.site_id,
                settings.dataset,
                artifacts,
                approvals,
            ));
            let broker = consilium_worker::broker::connect(&settings.broker_url).await?;
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            consilium_worker::consumer::run(
                ctx,
                broker,
                Duration::from_secs(settings.heartbeat_seconds),
                stop,
            )
            .await
        }
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
fn torch_rate(model: &str, steps: usize, threads: usize) -> anyhow::Result<Option<f64>> {
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
        .args([model, &steps.to_string(), &threads.to_string()])
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
fn bench_child(model: &str, steps: usize, threads: usize, baseline: bool) -> anyhow::Result<f64> {
    let mut args = vec![
        "bench-train".to_string(),
        "--model".into(),
        model.into(),
        "--steps".into(),
        steps.to_string(),
        "--threads".into(),
        threads.to_string(),
    ];
    if baseline {
        args.push("--candle-conv".into());
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
fn bench_parent(model: &str, steps: usize, runs: usize) -> anyhow::Result<()> {
    let all = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "{model}: batch 64, SGD with momentum, {steps} steps after 3 warm-up steps; median of {runs} run(s) (range)"
    );
    for t in [1, all] {
        let (base, line) = measured(runs, || bench_child(model, steps, t, true))?;
        println!("  {t} thread(s), candle's kernels:    {line}");
        let (ours, line) = measured(runs, || bench_child(model, steps, t, false))?;
        println!("  {t} thread(s), Consilium's kernels: {line}");
        println!("  {t} thread(s), speed-up {:.2}x", ours / base);
        if torch_python().is_some() {
            let (torch, line) = measured(runs, || {
                torch_rate(model, steps, t)?.ok_or_else(|| anyhow::anyhow!("PyTorch is gone"))
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

fn bench_train(
    model: &str,
    steps: usize,
    runs: usize,
    threads: Option<usize>,
    candle_conv: bool,
) -> anyhow::Result<()> {
    use consilium_worker::data::Sample;
    use consilium_worker::train::{Net, Rng};
    let Some(threads) = threads else {
        return bench_parent(model, steps, runs);
    };
    consilium_core::conv::use_candle_kernels(candle_conv);
    let size = if model == "resnet" { 32 } else { 28 };
    let manifest: consilium_core::manifest::TrainingPlanManifest = serde_json::from_value(
        serde_json::json!({
            "model": {"architecture": model, "num_classes": 10},
            "preprocessing": {"image_size": size},
            "optimiser": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9},
            "local_epochs": 1, "batch_size": 64, "rounds": 1, "aggregation": {"strategy": "fedavg"}, "seed": 1
        }),
    )?;
    let plan = manifest
        .parse()
        .map_err(|p| anyhow::anyhow!("the benchmark's plan: {}", p.join("; ")))?;
    let net = Net::new(&plan, &consilium_worker::train::device())?;
    let mut rng = Rng::new(7);
    let samples: Vec<Sample> = (0..64)
        .map(|i| Sample {
            pixels: (0..size * size).map(|_| rng.unit() as f32).collect(),
            label: i % 10,
            source: String::new(),
            holdout: false,
        })
        .collect();
    let batch: Vec<&Sample> = samples.iter().collect();
    // One epoch over 64 samples with batch 64 is exactly one step.
    for _ in 0..3 {
        net.train(&batch, &plan, 1)?;
    }
    let started = std::time::Instant::now();
    for i in 0..steps {
        net.train(&batch, &plan, i as u64)?;
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::debug!(threads, "measured");
    println!("{:.3}", steps as f64 / secs);
    Ok(())
}
