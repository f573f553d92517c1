#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The typed plan at the site: every setting a plan may have changes what training does, a
//! worker refuses a plan it cannot run (with the reason), and FedBN's site-local batch-norm
//! state never crosses from one run (one study) to another.

use async_trait::async_trait;
use chrono::{Duration, Utc};
use consilium_core::manifest::{TrainingPlanManifest, plan_hash};
use consilium_core::plan::{Normalisation, Plan, Statistics};
use consilium_core::protocol::{Job, JobKind, Outcome, PROTOCOL_VERSION};
use consilium_worker::artifacts::ArtifactStore;
use consilium_worker::data::{DataKind, DatasetSpec, LabelKey, Sample};
use consilium_worker::job::{Approvals, SiteContext, process};
use consilium_worker::synthetic::{SiteProfile, write_site};
use consilium_worker::train::{Net, Rng, normalise, rotate};
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

fn base() -> Value {
    json!({
        "model": {"architecture": "small_cnn", "num_classes": 2},
        "preprocessing": {"image_size": 16},
        "optimiser": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        "local_epochs": 2, "batch_size": 8, "rounds": 3,
        "aggregation": {"strategy": "fedavg"}, "seed": 11
    })
}

fn plan_of(v: Value) -> Plan {
    let m: TrainingPlanManifest = serde_json::from_value(v).unwrap();
    m.parse().unwrap_or_else(|p| panic!("{p:?}"))
}

/// Images of two classes (a bright or a dark bar on an offset background), not normalised.
fn samples() -> Vec<Sample> {
    let mut rng = Rng::new(3);
    (0..48)
        .map(|i| {
            let label = (i % 2) as u32;
            let pixels = (0..16 * 16)
                .map(|p| {
                    let bar = (p % 16) < 8;
                    let base = 0.3 + 0.2 * rng.unit() as f32;
                    if bar && label == 1 { base + 0.3 } else { base }
                })
                .collect();
            Sample {
                pixels,
                label,
                mask: None,
                source: format!("image {i}"),
                holdout: false,
                unit: format!("patient {i}"),
            }
        })
        .collect()
}

/// The SHA-256 of the weights after training on `samples` with this plan.
fn trained(plan: &Plan) -> String {
    let data = samples();
    let refs: Vec<&Sample> = data.iter().collect();
    let net = Net::new(plan, &candle_core::Device::Cpu).unwrap();
    net.train(&refs, plan, 5).unwrap();
    consilium_core::hash::sha256_hex(&net.to_safetensors().unwrap())
}

#[test]
fn every_accepted_setting_changes_what_training_does() {
    let variants: Vec<(&str, Value)> = vec![
        ("as written", base()),
        ("zscore", {
            let mut m = base();
            m["preprocessing"]["normalisation"] = "zscore".into();
            m
        }),
        ("minmax", {
            let mut m = base();
            m["preprocessing"]["normalisation"] = "minmax".into();
            m
        }),
        ("dataset", {
            let mut m = base();
            m["preprocessing"]["normalisation"] = "dataset".into();
            m["preprocessing"]["mean"] = 0.4.into();
            m["preprocessing"]["std"] = 0.1.into();
            m
        }),
        ("flip", {
            let mut m = base();
            m["preprocessing"]["augmentations"] = json!(["flip"]);
            m
        }),
        ("pytorch initialisation", {
            let mut m = base();
            m["model"]["initialisation"] = "pytorch".into();
            m
        }),
        ("rotate", {
            let mut m = base();
            m["preprocessing"]["augmentations"] = json!(["rotate"]);
            m
        }),
        ("adamw", {
            let mut m = base();
            m["optimiser"] = json!({"name": "adamw", "learning_rate": 0.003});
            m
        }),
        ("proximal term", {
            let mut m = base();
            m["optimiser"]["proximal_mu"] = 0.5.into();
            m
        }),
    ];
    let mut seen: Vec<(&str, String)> = Vec::new();
    for (name, v) in variants {
        let weights = trained(&plan_of(v));
        for (other, w) in &seen {
            assert_ne!(
                &weights, w,
                "{name} trains exactly as {other}: the setting has no effect"
            );
        }
        seen.push((name, weights));
    }
    // `normalisation = "none"` is what an absent setting means.
    let mut none = base();
    none["preprocessing"]["normalisation"] = "none".into();
    assert_eq!(trained(&plan_of(none)), seen[0].1);
}

#[test]
fn small_cnn_takes_its_channels_from_the_plan() {
    let mut m = base();
    m["model"]["hyper_parameters"] = json!({"channels": [4, 6]});
    let net = Net::new(&plan_of(m), &candle_core::Device::Cpu).unwrap();
    let w = net.weights().unwrap();
    assert_eq!(w["conv1.weight"].0, vec![4, 1, 3, 3]);
    assert_eq!(w["conv2.weight"].0, vec![6, 4, 3, 3]);
    assert_eq!(w["fc.weight"].0, vec![2, 6 * 4 * 4]);
    let default = Net::new(&plan_of(base()), &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        default.weights().unwrap()["conv1.weight"].0,
        vec![32, 1, 3, 3]
    );
}

#[test]
fn normalisations_and_rotations_do_what_they_say() {
    let img: Vec<f32> = (0..16).map(|i| 0.2 + 0.01 * i as f32).collect();
    let mut mm = img.clone();
    normalise(&mut mm, Normalisation::Minmax, None);
    assert!(
        (mm[0] - 0.0).abs() < 1e-6 && (mm[15] - 1.0).abs() < 1e-5,
        "{mm:?}"
    );
    let mut z = img.clone();
    normalise(&mut z, Normalisation::Zscore, None);
    let mean = z.iter().sum::<f32>() / 16.0;
    let sd = (z.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0).sqrt();
    assert!(mean.abs() < 1e-5 && (sd - 1.0).abs() < 1e-4);
    let mut n = img.clone();
    normalise(&mut n, Normalisation::None, None);
    assert_eq!(n, img);
    // 0° keeps the image; 90° turns it a quarter (on screen, y pointing down): the top-left
    // corner goes to the top-right, the bottom-left to the top-left.
    assert_eq!(rotate(&img, 4, 0.0), img);
    let r = rotate(&img, 4, 90.0);
    assert!((r[3] - img[0]).abs() < 1e-4, "{r:?}");
    assert!((r[0] - img[12]).abs() < 1e-4, "{r:?}");
    // A small angle keeps the centre and blurs nothing away: the total stays close.
    let r = rotate(&img, 4, 10.0);
    assert!(r.iter().sum::<f32>() < img.iter().sum::<f32>());
}

/// Approves every plan of every study (the refusals below come from the worker itself).
struct AllGranted;

#[async_trait]
impl Approvals for AllGranted {
    async fn check(&self, _: Uuid, _: Uuid, _: &str) -> Result<Option<String>, String> {
        Ok(None)
    }
}

fn site_context(dir: &std::path::Path, site: Uuid) -> SiteContext {
    let profile = SiteProfile {
        images: 80,
        lesion_fraction: 0.5,
        gain: 1.0,
        offset: 0.0,
        noise: 0.03,
        blur: 0,
        seed: 3,
    };
    write_site(&dir.join("data"), 32, &profile).unwrap();
    let spec = DatasetSpec {
        kind: DataKind::Images,
        root: dir.join("data"),
        labels: dir.join("data/labels.csv"),
        label_key: LabelKey::Path,
        masks: false,
        holdout: 0.25,
        window: None,
        decoding: Default::default(),
    };
    let store = ArtifactStore::open(dir.join("artifacts").to_str().unwrap()).unwrap();
    SiteContext::new(
        site,
        spec,
        Arc::new(store),
        Arc::new(AllGranted),
        consilium_worker::decode::Decoder::program(env!("CARGO_BIN_EXE_consilium-worker")),
        consilium_core::signing::SigningKey::from_bytes(&[7; 32]),
        consilium_core::signing::SigningKey::from_bytes(&[9; 32]).verifying_key(),
    )
}

fn job(site: Uuid, study: Uuid, run: Uuid, manifest: Value) -> Job {
    let manifest: TrainingPlanManifest = serde_json::from_value(manifest).unwrap();
    Job {
        protocol: PROTOCOL_VERSION,
        job_id: Uuid::new_v4(),
        kind: JobKind::Train,
        run_id: run,
        round: 1,
        study_id: study,
        site_id: site,
        plan_hash: plan_hash(&manifest, &[]).unwrap(),
        manifest,
        files: vec![],
        global_model: None,
        deadline: Utc::now() + Duration::minutes(10),
        preview: None,
        correction: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_what_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let site = Uuid::new_v4();
    let ctx = site_context(dir.path(), site);
    // A plan from a server that knows a strategy this worker does not (or a forged one).
    let mut m = base();
    m["aggregation"]["strategy"] = "fedsgd".into();
    let r = process(&job(site, Uuid::new_v4(), Uuid::new_v4(), m), &ctx).await;
    let Outcome::Refused { reason } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(reason.contains("cannot run the plan"), "{reason}");
    assert!(
        reason.contains("aggregation.strategy must be one of"),
        "{reason}"
    );
    // A job of a newer protocol.
    let mut newer = job(site, Uuid::new_v4(), Uuid::new_v4(), base());
    newer.protocol = PROTOCOL_VERSION + 1;
    let r = process(&newer, &ctx).await;
    let Outcome::Refused { reason } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(reason.contains("older than the server's jobs"), "{reason}");
    // A SCAFFOLD correction with a plan that is not SCAFFOLD's: not what was approved.
    let mut corrected = job(site, Uuid::new_v4(), Uuid::new_v4(), base());
    corrected.correction = Some("ab".repeat(32));
    let r = process(&corrected, &ctx).await;
    let Outcome::Refused { reason } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(reason.contains("SCAFFOLD correction"), "{reason}");
}

#[test]
fn pytorch_initialisation_draws_as_pytorch_does() {
    let spread = |init: &str| {
        let mut v = base();
        v["model"]["initialisation"] = init.into();
        let net = Net::new(&plan_of(v), &candle_core::Device::Cpu).unwrap();
        let w = net.weights().unwrap();
        let sd = |name: &str| {
            let x = &w[name].1;
            let mean = x.iter().sum::<f32>() / x.len() as f32;
            (x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / x.len() as f32).sqrt()
        };
        let bias = w["conv2.bias"].1.clone();
        (sd("conv2.weight"), sd("fc.weight"), bias)
    };
    // conv2: 32 · 3 · 3 = 288 inputs; PyTorch: U(±1/√288), sd 1/√(3·288) = 0.0340; Kaiming
    // uniform: U(±√(6/288)), sd √(2/288) = 0.0833.
    let (conv, fc, bias) = spread("pytorch");
    assert!((conv - 0.0340).abs() < 0.0017, "{conv}");
    let fan_in = 64 * 4 * 4; // the small CNN's classifier at 16 px: 64 channels of 4 × 4
    let expected = 1.0 / (3.0 * fan_in as f32).sqrt();
    assert!(
        (fc - expected).abs() < 0.05 * expected,
        "{fc} vs {expected}"
    );
    let bound = 1.0 / 288f32.sqrt();
    assert!(bias.iter().all(|b| b.abs() <= bound) && bias.iter().any(|b| *b != 0.0));
    let (conv, _, bias) = spread("kaiming");
    assert!((conv - 0.0833).abs() < 0.004, "{conv}");
    assert!(bias.iter().all(|b| *b == 0.0));
    let mut v = base();
    v["model"]["initialisation"] = "xavier".into();
    let m: TrainingPlanManifest = serde_json::from_value(v).unwrap();
    assert!(m.problems()[0].contains("model.initialisation must be \"kaiming\" or \"pytorch\""));
}

#[test]
fn dataset_normalisation_uses_one_mean_and_deviation() {
    let mut v = base();
    v["preprocessing"]["normalisation"] = "dataset".into();
    let site = plan_of(v.clone());
    assert_eq!(
        site.statistics, None,
        "each site's own, filled in at the site"
    );
    let images = [vec![0.0f32, 1.0], vec![0.0, 1.0]];
    let filled = site.with_statistics(images.iter().map(Vec::as_slice));
    assert_eq!(
        filled.statistics,
        Some(Statistics {
            mean: 0.5,
            std: 0.5
        })
    );
    let mut img = vec![0.0, 0.5, 1.0];
    normalise(&mut img, Normalisation::Dataset, filled.statistics);
    assert_eq!(img, [-1.0, 0.0, 1.0]);
    // Without its statistics the plan cannot train (never a silent identity).
    let data = samples();
    let refs: Vec<&Sample> = data.iter().collect();
    let net = Net::new(&site, &candle_core::Device::Cpu).unwrap();
    assert!(net.train(&refs, &site, 1).is_err());
    // The plan's values win over the site's.
    v["preprocessing"]["mean"] = 0.4.into();
    v["preprocessing"]["std"] = 0.1.into();
    let fixed = plan_of(v);
    assert_eq!(
        fixed
            .with_statistics(images.iter().map(Vec::as_slice))
            .statistics,
        Some(Statistics {
            mean: 0.4,
            std: 0.1
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_trains_with_its_own_dataset_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let site = Uuid::new_v4();
    let ctx = site_context(dir.path(), site);
    let mut m = base();
    m["preprocessing"]["normalisation"] = "dataset".into();
    let r = process(&job(site, Uuid::new_v4(), Uuid::new_v4(), m), &ctx).await;
    // Without the site's statistics filled in, the batch would be refused and the job fail.
    let Outcome::Trained {
        train_loss_before,
        train_loss_after,
        ..
    } = &r.outcome
    else {
        panic!("{:?}", r.outcome)
    };
    assert!(
        train_loss_before.is_finite() && train_loss_after.is_finite(),
        "{:?}",
        r.outcome
    );
}

fn fedbn() -> Value {
    json!({
        "model": {"architecture": "resnet", "num_classes": 2, "hyper_parameters": {"widths": [4, 8]}},
        "preprocessing": {"image_size": 16},
        "optimiser": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        "local_epochs": 1, "batch_size": 8, "rounds": 3,
        "aggregation": {"strategy": "fedbn"}, "seed": 13
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbn_state_never_crosses_from_one_study_to_another() {
    let site = Uuid::new_v4();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (busy, fresh) = (site_context(d1.path(), site), site_context(d2.path(), site));
    // Study A's FedBN run trains at the site first (other batch-norm statistics: another seed).
    let mut a = fedbn();
    a["seed"] = 99.into();
    let ra = process(&job(site, Uuid::new_v4(), Uuid::new_v4(), a), &busy).await;
    assert!(
        matches!(ra.outcome, Outcome::Trained { .. }),
        "{:?}",
        ra.outcome
    );
    // Study B's run at the same site gives exactly what it gives at a site that never ran A.
    let b = job(site, Uuid::new_v4(), Uuid::new_v4(), fedbn());
    let after_a = process(&b, &busy).await.outcome;
    let alone = process(&b, &fresh).await.outcome;
    let hash = |o: &Outcome| match o {
        Outcome::Trained { update_hash, .. } => update_hash.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        hash(&after_a),
        hash(&alone),
        "study A's batch-norm state leaked into study B"
    );
}

#[test]
fn scaffold_adds_its_correction_to_every_gradient() {
    // One step of plain SGD (48 images, batch 48, one epoch): w' = w − η (g + (c − c_i)), so the
    // corrected weights differ from the uncorrected by exactly η times the correction.
    let mut m = base();
    m["optimiser"] = json!({"name": "sgd", "learning_rate": 0.05});
    m["local_epochs"] = 1.into();
    m["batch_size"] = 48.into();
    m["aggregation"] = json!({"strategy": "scaffold"});
    let plan = plan_of(m);
    let data = samples();
    let refs: Vec<&Sample> = data.iter().collect();
    let dev = candle_core::Device::Cpu;
    let plain = Net::new(&plan, &dev).unwrap();
    let corrected = Net::new(&plan, &dev).unwrap();
    let mut correction = plain.weights().unwrap();
    for (_, data) in correction.values_mut() {
        for (i, x) in data.iter_mut().enumerate() {
            *x = ((i % 7) as f32 - 3.0) / 10.0;
        }
    }
    let carrier = Net::new(&plan, &dev).unwrap();
    carrier.set_weights(&correction).unwrap();
    let bytes = carrier.to_safetensors().unwrap();
    plain.train(&refs, &plan, 5).unwrap();
    let c = corrected.correction(&bytes).unwrap();
    corrected
        .train_corrected(&refs, &plan, 5, Some(&c))
        .unwrap();
    let (a, b) = (plain.weights().unwrap(), corrected.weights().unwrap());
    let mut checked = 0;
    for (name, (_, wa)) in &a {
        let wb = &b[name].1;
        let running = name.ends_with("running_mean") || name.ends_with("running_var");
        for (i, (x, y)) in wa.iter().zip(wb).enumerate() {
            let want = if running {
                0.0
            } else {
                0.05 * correction[name].1[i]
            };
            assert!(
                (x - y - want).abs() < 1e-5,
                "{name}[{i}]: {x} − {y} is not {want}"
            );
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked} weights checked");

    // A correction that lacks a trained weight is refused, naming it.
    let mut short = correction.clone();
    let dropped = short
        .keys()
        .find(|n| n.ends_with("weight"))
        .unwrap()
        .clone();
    short.remove(&dropped);
    let tensors: Vec<(String, candle_core::Tensor)> = short
        .iter()
        .map(|(n, (shape, d))| {
            (
                n.clone(),
                candle_core::Tensor::from_vec(d.clone(), shape.as_slice(), &dev).unwrap(),
            )
        })
        .collect();
    let path = tempfile::NamedTempFile::new().unwrap();
    candle_core::safetensors::save(
        &tensors
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
        path.path(),
    )
    .unwrap();
    let err = corrected
        .correction(&std::fs::read(path.path()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&dropped), "{err}");
}

#[test]
fn local_fit_epochs_train_only_the_layers_kept_at_the_site() {
    // FLOP's fitting step, one step of plain SGD (48 images, batch 48, one epoch) on `fc`
    // alone, from fc.weight = 0 and fc.bias = (1, 0): every logit is the bias, so the bias's
    // gradient is softmax(b) − the share of each class (½, ½), and
    // b' = b − η (softmax(b) − ½) by hand; every other weight stays bit for bit.
    let mut m = base();
    m["optimiser"] = json!({"name": "sgd", "learning_rate": 0.05});
    m["local_epochs"] = 1.into();
    m["batch_size"] = 48.into();
    m["aggregation"] = json!({"strategy": "fedavg", "local_layers": ["fc"], "local_fit_epochs": 1});
    let plan = plan_of(m);
    assert_eq!(plan.local_fit_epochs, 1);
    let data = samples();
    let refs: Vec<&Sample> = data.iter().collect();
    let net = Net::new(&plan, &candle_core::Device::Cpu).unwrap();
    let mut start = net.weights().unwrap();
    start.get_mut("fc.weight").unwrap().1.fill(0.0);
    start.get_mut("fc.bias").unwrap().1 = vec![1.0, 0.0];
    net.set_weights(&start).unwrap();
    net.train_only(&refs, &plan, (plan.local_fit_epochs, 5), |n| {
        plan.is_local(n)
    })
    .unwrap();
    let after = net.weights().unwrap();
    let p1 = 1.0 / (1.0 + (-1.0f64).exp());
    let want = [1.0 - 0.05 * (p1 - 0.5), 0.05 * (p1 - 0.5)];
    for (i, w) in want.iter().enumerate() {
        let got = f64::from(after["fc.bias"].1[i]);
        assert!((got - w).abs() < 1e-6, "fc.bias[{i}]: {got}, by hand {w}");
    }
    assert!(
        after["fc.weight"].1.iter().any(|&x| x != 0.0),
        "fc.weight trained"
    );
    for (name, (_, w)) in &after {
        if !plan.is_local(name) {
            assert!(w == &start[name].1, "{name} changed, and only fc trains");
        }
    }
    // Two epochs are two steps here: the classifier moves on, the rest still stays.
    let twice = Net::new(&plan, &candle_core::Device::Cpu).unwrap();
    twice.set_weights(&start).unwrap();
    twice
        .train_only(&refs, &plan, (2, 5), |n| plan.is_local(n))
        .unwrap();
    let twice = twice.weights().unwrap();
    assert!(
        twice["fc.bias"].1 != after["fc.bias"].1,
        "a second epoch trained"
    );
    assert!(twice["conv1.weight"].1 == start["conv1.weight"].1);
}

#[test]
fn the_plans_layer_names_are_the_models() {
    // `aggregation.local_layers` is checked against `ModelConfig::layers`: every weight of each
    // model must belong to one of them.
    for model in [
        json!({"architecture": "small_cnn", "num_classes": 2}),
        json!({"architecture": "resnet", "num_classes": 3, "hyper_parameters": {"widths": [8, 16, 32]}}),
    ] {
        let mut m = base();
        m["model"] = model;
        let plan = plan_of(m);
        let layers = plan.model.layers();
        let net = Net::new(&plan, &candle_core::Device::Cpu).unwrap();
        let names: Vec<String> = net.weights().unwrap().into_keys().collect();
        for n in &names {
            assert!(
                layers.iter().any(|l| n.starts_with(&format!("{l}."))),
                "{n} is in no layer of {layers:?}"
            );
        }
        for l in &layers {
            assert!(
                names.iter().any(|n| n.starts_with(&format!("{l}."))),
                "{l} holds no weight: {names:?}"
            );
        }
    }
}
