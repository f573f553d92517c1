//! Training parity with PyTorch for the small CNN and the ResNet: the same initial weights (the plan's
//! `model.initialisation = "pytorch"`, seed 1) and the same batches (synthetic phantoms, 32 a
//! step, no normalisation or augmentation), plain SGD at lr 0.05, one step per batch. Writes
//! the weights, the batches and this side's loss per step into a folder for
//! `scripts/parity.py`, which repeats the steps in PyTorch and compares; `scripts/parity` runs
//! both.
//!
//! `cargo run --release -p consilium-worker --example parity -- DIR [STEPS] [small_cnn|resnet]`

use consilium_core::manifest::TrainingPlanManifest;
use consilium_worker::data::Sample;
use consilium_worker::synthetic::{SiteProfile, phantom};
use consilium_worker::train::{Net, Rng, device};
use std::io::Write;

const BATCH: usize = 32;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: parity DIR [STEPS]"))?,
    );
    let steps: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(200);
    let model = args.get(2).map_or("small_cnn", String::as_str);
    // The ResNet at its default widths [16, 32, 64] with batch normalisation, 32 × 32.
    let size: usize = match model {
        "small_cnn" => 28,
        "resnet" => 32,
        other => anyhow::bail!("the model must be small_cnn or resnet, not {other}"),
    };
    std::fs::create_dir_all(&dir)?;
    let m: TrainingPlanManifest = serde_json::from_value(serde_json::json!({
        "model": {"architecture": model, "num_classes": 2, "initialisation": "pytorch"},
        "preprocessing": {"image_size": size},
        "optimiser": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.0},
        "local_epochs": 1, "batch_size": BATCH, "rounds": 1,
        "aggregation": {"strategy": "fedavg"}, "seed": 1
    }))?;
    let plan = m.parse().map_err(|p| anyhow::anyhow!("{}", p.join("; ")))?;
    let net = Net::new(&plan, &device())?;
    std::fs::write(dir.join("initial.safetensors"), net.to_safetensors()?)?;
    let profile = SiteProfile {
        images: 0,
        lesion_fraction: 0.5,
        gain: 1.0,
        offset: 0.0,
        noise: 0.05,
        blur: 0,
        seed: 5,
    };
    let mut rng = Rng::new(profile.seed);
    let mut images = std::io::BufWriter::new(std::fs::File::create(dir.join("images.f32"))?);
    let mut labels = Vec::new();
    let mut losses = String::new();
    for _ in 0..steps {
        let batch: Vec<Sample> = (0..BATCH)
            .map(|i| {
                let lesion = rng.unit() < profile.lesion_fraction;
                Sample {
                    pixels: phantom(size, lesion, &profile, &mut rng),
                    label: u32::from(lesion),
                    mask: None,
                    source: format!("image {i}"),
                    holdout: false,
                    unit: format!("{i}"),
                }
            })
            .collect();
        for s in &batch {
            for v in &s.pixels {
                images.write_all(&v.to_le_bytes())?;
            }
            labels.push(s.label as u8);
        }
        let refs: Vec<&Sample> = batch.iter().collect();
        let (loss, _) = net.train(&refs, &plan, 0)?;
        losses.push_str(&format!("{loss}\n"));
    }
    images.flush()?;
    std::fs::write(dir.join("labels.u8"), labels)?;
    std::fs::write(dir.join("consilium-losses.txt"), losses)?;
    std::fs::write(dir.join("model.txt"), format!("{model} {size}"))?;
    println!("{steps} steps of {BATCH}: {}", dir.display());
    Ok(())
}
