#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The job step, called directly (no broker): verification, training on a site's images,
//! the update in the artifact store, determinism.

use async_trait::async_trait;
use chrono::{Duration, Utc};
use consilium_core::manifest::{TrainingPlanManifest, plan_hash};
use consilium_core::protocol::{Job, JobKind, Outcome};
use consilium_worker::artifacts::ArtifactStore;
use consilium_worker::data::{DataKind, DatasetSpec, LabelKey};
use consilium_worker::decode::Decoder;
use consilium_worker::job::{Approvals, SiteContext, process};
use consilium_worker::synthetic::{SiteProfile, write_site};
use std::sync::Arc;
use uuid::Uuid;

/// The approvals as the server would answer them: one study, one plan hash.
struct Granted {
    study: Uuid,
    hash: String,
}

#[async_trait]
impl Approvals for Granted {
    async fn check(&self, _site: Uuid, study: Uuid, hash: &str) -> Result<Option<String>, String> {
        Ok(if study == self.study && hash == self.hash {
            None
        } else {
            Some(format!(
                "training plan {hash} is not approved for this site's data"
            ))
        })
    }
}

fn manifest() -> TrainingPlanManifest {
    serde_json::from_value(serde_json::json!({
        "model": {"architecture": "small_cnn", "num_classes": 2},
        "preprocessing": {"image_size": 28, "normalisation": "zscore"},
        "optimiser": {"name": "adamw", "learning_rate": 0.003, "weight_decay": 0.0001},
        "local_epochs": 4, "batch_size": 8, "rounds": 3,
        "aggregation": {"strategy": "fedavg"}, "seed": 5
    }))
    .unwrap()
}

struct Site {
    _dir: tempfile::TempDir,
    store: ArtifactStore,
    ctx: SiteContext,
    study: Uuid,
    site: Uuid,
}

fn site(hash: &str, study: Uuid) -> Site {
    site_of(hash, study, 200)
}

fn site_of(hash: &str, study: Uuid, images: usize) -> Site {
    site_as(hash, study, images, Uuid::new_v4())
}

/// A site with a given id: its id is in its jobs' seed, so a fixed one gives it the same batches
/// in every run of a test.
fn site_as(hash: &str, study: Uuid, images: usize, site: Uuid) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let profile = SiteProfile {
        images,
        lesion_fraction: 0.5,
        gain: 1.0,
        offset: 0.0,
        noise: 0.03,
        blur: 0,
        seed: 3,
    };
    write_site(&dir.path().join("data"), 32, &profile).unwrap();
    let spec = DatasetSpec {
        kind: DataKind::Images,
        root: dir.path().join("data"),
        labels: dir.path().join("data/labels.csv"),
        label_key: LabelKey::Path,
        masks: false,
        holdout: 0.25,
        window: None,
        decoding: Default::default(),
    };
    let store = ArtifactStore::open(dir.path().join("artifacts").to_str().unwrap()).unwrap();
    let ctx = SiteContext::new(
        site,
        spec,
        Arc::new(store.clone()),
        Arc::new(Granted {
            study,
            hash: hash.to_string(),
        }),
        Decoder::program(env!("CARGO_BIN_EXE_consilium-worker")),
        consilium_core::signing::SigningKey::from_bytes(&[7; 32]),
        consilium_core::signing::SigningKey::from_bytes(&[9; 32]).verifying_key(),
    );
    Site {
        _dir: dir,
        store,
        ctx,
        study,
        site,
    }
}

fn job(s: &Site, m: &TrainingPlanManifest, hash: &str, round: u32, global: Option<String>) -> Job {
    Job {
        protocol: consilium_core::protocol::PROTOCOL_VERSION,
        job_id: Uuid::new_v4(),
        kind: JobKind::Train,
        run_id: Uuid::nil(),
        round,
        study_id: s.study,
        site_id: s.site,
        plan_hash: hash.to_string(),
        manifest: m.clone(),
        files: vec![],
        global_model: global,
        deadline: Utc::now() + Duration::minutes(10),
        preview: None,
        correction: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_trains_the_approved_plan_and_learns() {
    let m = manifest();
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site(&hash, Uuid::from_u128(1));
    let r1 = process(&job(&s, &m, &hash, 1, None), &s.ctx).await;
    let Outcome::Trained {
        update_hash,
        samples,
        evaluation,
        train_loss_before,
        train_loss_after,
        skipped,
        ..
    } = r1.outcome
    else {
        panic!("{:?}", r1.outcome)
    };
    assert!(skipped.is_empty());
    assert!(
        samples > 100 && samples < 200,
        "a quarter is held out: {samples}"
    );
    assert_eq!(evaluation.samples + samples, 200);
    assert!(
        train_loss_after < train_loss_before,
        "{train_loss_before} → {train_loss_after}"
    );
    let bytes = s.store.get(&update_hash).await.unwrap();
    assert_eq!(consilium_core::hash::sha256_hex(&bytes), update_hash);

    // The next round starts from that model: on the held-out split it is clearly above chance.
    let r2 = process(&job(&s, &m, &hash, 2, Some(update_hash.clone())), &s.ctx).await;
    let Outcome::Trained { evaluation, .. } = r2.outcome else {
        panic!("{:?}", r2.outcome)
    };
    assert!(
        evaluation.accuracy > 0.8,
        "held-out accuracy {}",
        evaluation.accuracy
    );
    assert!(
        evaluation.auroc.unwrap() > 0.85,
        "held-out AUROC {:?}",
        evaluation.auroc
    );

    // The same job on the same data trains to the same weights (deterministic given the seed).
    let twin = site(&hash, s.study);
    let twin_ctx = SiteContext::new(
        s.site,
        twin.ctx.dataset.clone(),
        twin.ctx.artifacts.clone(),
        Arc::new(Granted {
            study: s.study,
            hash: hash.clone(),
        }),
        twin.ctx.decoder.clone(),
        (*twin.ctx.signer).clone(),
        twin.ctx.server_key,
    );
    let again = process(&job(&s, &m, &hash, 1, None), &twin_ctx).await;
    let Outcome::Trained {
        update_hash: replayed,
        ..
    } = again.outcome
    else {
        panic!("{:?}", again.outcome)
    };
    assert_eq!(
        replayed, update_hash,
        "same site, same data, same plan: the same update"
    );
}

#[tokio::test]
async fn an_altered_or_unapproved_plan_is_refused() {
    let m = manifest();
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site(&hash, Uuid::new_v4());
    // Someone changes the learning rate on the way but keeps the approved hash.
    let mut altered = m.clone();
    altered.optimiser.learning_rate = 0.5;
    let r = process(&job(&s, &altered, &hash, 1, None), &s.ctx).await;
    let Outcome::Refused { reason } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(reason.contains("it was altered"), "{reason}");
    // A consistent plan that the site never approved.
    let other_hash = plan_hash(&altered, &[]).unwrap();
    let r = process(&job(&s, &altered, &other_hash, 1, None), &s.ctx).await;
    let Outcome::Refused { reason } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(
        reason.contains("is not approved for this site's data"),
        "{reason}"
    );
    // A job for another site.
    let mut j = job(&s, &m, &hash, 1, None);
    j.site_id = Uuid::new_v4();
    assert!(matches!(
        process(&j, &s.ctx).await.outcome,
        Outcome::Refused { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_job_sends_back_only_checked_images_and_a_summary() {
    let m = manifest();
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site(&hash, Uuid::new_v4());
    let mut j = job(&s, &m, &hash, 0, None);
    j.kind = JobKind::Preview;
    j.preview = Some(consilium_core::preview::PreviewSpec {
        per_class: 6,
        image_size: 64,
        k: 10,
        generator: None,
        dp: None,
    });
    let r = process(&j, &s.ctx).await;
    let Outcome::Previewed {
        set,
        images,
        withheld,
        ..
    } = r.outcome
    else {
        panic!("{:?}", r.outcome);
    };
    assert_eq!(images + withheld, 12, "6 per class, two classes");
    let bytes = s.store.get(&set).await.unwrap();
    let set: consilium_core::preview::PreviewSet = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(set.images.len() as u32, images);
    assert_eq!(set.image_size, 64);
    assert_eq!(set.memorisation.ratios.len(), 12);
    assert_eq!(set.summary.k, 10);
    assert_eq!(
        set.summary.image_sizes,
        vec![consilium_core::preview::Count {
            value: "32×32".into(),
            count: Some(set.summary.files)
        }]
    );
    // Each image is a 64×64 PNG.
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(&set.images[0].png_base64)
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    // A preview under a plan the site has not approved is refused like any other job.
    let mut forged = j.clone();
    forged.study_id = Uuid::new_v4();
    assert!(matches!(
        process(&forged, &s.ctx).await.outcome,
        Outcome::Refused { .. }
    ));
}

/// The weights of an update, in the order the worker protects them (names sorted).
fn flat(bytes: &[u8]) -> Vec<f32> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Update clipping bounds what leaves the site: with partial sharing the classifier stays at
/// the site, so the sent update (the shared layers' change) is clipped to the full norm, not to
/// what is left of it after the kept classifier's change took its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipping_bounds_the_shared_layers_not_the_layers_kept_at_the_site() {
    let mut m = manifest();
    m.local_epochs = 1;
    m.aggregation.local_layers = vec!["fc".into()];
    m.privacy.clip_norm = Some(0.05);
    m.privacy.noise_multiplier = Some(0.0);
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site(&hash, Uuid::from_u128(4));
    let result = process(&job(&s, &m, &hash, 1, None), &s.ctx).await;
    let Outcome::Trained { update_hash, .. } = result.outcome else {
        panic!("{:?}", result.outcome)
    };
    let sent = flat(&s.store.get(&update_hash).await.unwrap());
    // Round 1 starts from the plan's initial model: its shared layers, in the same order.
    let plan = m.parse().unwrap();
    let initial = consilium_worker::train::Net::new(&plan, &candle_core::Device::Cpu)
        .unwrap()
        .weights()
        .unwrap();
    let mut names: Vec<&String> = initial.keys().filter(|n| !plan.is_local(n)).collect();
    names.sort();
    let start: Vec<f32> = names.iter().flat_map(|n| initial[*n].1.clone()).collect();
    assert_eq!(
        sent.len(),
        start.len(),
        "the update holds the shared layers only"
    );
    let norm = sent
        .iter()
        .zip(&start)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        (norm - 0.05).abs() < 1e-4,
        "the shared layers' change is clipped to 0.05, not below it: {norm}"
    );
}

/// The noise that protects an update comes from the operating system's generator: the same job
/// run twice is noised differently, and nobody who knows the plan (its seed, the round, the
/// site) can regenerate the noise and subtract it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_noise_cannot_be_regenerated_from_the_plan() {
    let mut clean = manifest();
    clean.local_epochs = 1;
    clean.privacy.clip_norm = Some(1.0);
    clean.privacy.noise_multiplier = Some(0.0);
    let mut noised = clean.clone();
    noised.privacy.noise_multiplier = Some(0.01);
    let study = Uuid::from_u128(3);
    let (clean_hash, noised_hash) = (
        plan_hash(&clean, &[]).unwrap(),
        plan_hash(&noised, &[]).unwrap(),
    );
    let s = site(&noised_hash, study);
    // The same site (same id, same data) approved for the plan without noise.
    let clean_ctx = SiteContext::new(
        s.site,
        s.ctx.dataset.clone(),
        s.ctx.artifacts.clone(),
        Arc::new(Granted {
            study,
            hash: clean_hash.clone(),
        }),
        s.ctx.decoder.clone(),
        (*s.ctx.signer).clone(),
        s.ctx.server_key,
    );
    let weights = |r: consilium_core::protocol::JobResult| {
        let Outcome::Trained { update_hash, .. } = r.outcome else {
            panic!("{:?}", r.outcome)
        };
        update_hash
    };
    let reference = weights(process(&job(&s, &clean, &clean_hash, 1, None), &clean_ctx).await);
    let first = weights(process(&job(&s, &noised, &noised_hash, 1, None), &s.ctx).await);
    let second = weights(process(&job(&s, &noised, &noised_hash, 1, None), &s.ctx).await);
    let reference = flat(&s.store.get(&reference).await.unwrap());
    let (first, second) = (
        flat(&s.store.get(&first).await.unwrap()),
        flat(&s.store.get(&second).await.unwrap()),
    );
    let site = s.site;
    assert_ne!(first, second, "the same job, noised twice, differently");
    // The clipped update is deterministic given the plan: what differs from it is the noise.
    let sigma = 0.01 * 1.0;
    let noise: Vec<f64> = first
        .iter()
        .zip(&reference)
        .map(|(a, b)| f64::from(a - b))
        .collect();
    let n = noise.len() as f64;
    let spread = (noise.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
    assert!(
        (spread - sigma).abs() < 0.1 * sigma,
        "the noise has the plan's scale: {spread} vs σ·C = {sigma}"
    );
    // Whoever knows the plan tries its seeds: the plan's, and the training seed derived from it.
    let derived = noised.seed
        ^ 1u64.wrapping_mul(0x1000_0001)
        ^ u64::from_le_bytes(site.as_bytes()[..8].try_into().unwrap());
    for seed in [noised.seed, derived] {
        let mut rng = consilium_worker::train::Rng::new(seed);
        let residual = noise
            .iter()
            .map(|v| (v - sigma * rng.normal()).powi(2))
            .sum::<f64>()
            / n;
        assert!(
            residual.sqrt() > 1.3 * sigma,
            "seed {seed}: subtracting the regenerated noise leaves {} (independent noise: √2·σ)",
            residual.sqrt()
        );
    }
}

fn dp_manifest(epsilon: f64) -> TrainingPlanManifest {
    let mut m = manifest();
    m.local_epochs = 1;
    m.rounds = 3;
    m.privacy.dp_sgd = Some(consilium_core::manifest::DpSgdSettings {
        epsilon,
        delta: 1e-5,
        max_grad_norm: 1.0,
        noise_multiplier: None,
    });
    m
}

fn spent(r: &consilium_core::protocol::JobResult) -> consilium_core::protocol::PrivacySpent {
    match &r.outcome {
        Outcome::Trained { privacy, .. } => {
            *privacy.clone().expect("a DP-SGD round reports its cost")
        }
        other => panic!("{other:?}"),
    }
}

/// Under DP-SGD each site derives σ for its patients so that the plan's rounds spend at most
/// the approved ε, reports what each round spent, and refuses by itself a round beyond the
/// budget (here a fourth round of a three-round plan, as a server gone wrong would send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_spends_at_most_the_approved_budget_and_refuses_more() {
    let m = dp_manifest(2.0);
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site(&hash, Uuid::from_u128(11));
    let mut last = None;
    let mut weights = Vec::new();
    for round in 1..=3 {
        let r = process(&job(&s, &m, &hash, round, None), &s.ctx).await;
        let p = spent(&r);
        let Outcome::Trained { update_hash, .. } = &r.outcome else {
            unreachable!()
        };
        weights.push(update_hash.clone());
        assert_eq!(p.delta, 1e-5);
        // 200 one-image patients, a quarter held out; batch 8 of ~150: q ≈ 0.05, 19 steps.
        assert!((140..=160).contains(&p.patients), "{p:?}");
        assert!(
            (p.sampling_rate - 8.0 / p.patients as f64).abs() < 1e-12,
            "{p:?}"
        );
        assert_eq!(p.steps, p.patients.div_ceil(8));
        assert!(p.noise_multiplier > 0.5, "{p:?}");
        assert!(
            p.epsilon_round > 0.0 && p.epsilon_run <= 2.0 + 1e-9,
            "{p:?}"
        );
        if let Some(prev) = last {
            assert!(p.epsilon_run > prev, "the run's ε grows: {p:?}");
        }
        last = Some(p.epsilon_run);
    }
    // The whole run spends (nearly) the whole budget: σ was derived for exactly it.
    let total = last.unwrap();
    assert!(total > 1.9 && total <= 2.0 + 1e-9, "run ε = {total}");
    // Round 1 with the same initial model twice trains differently: the sampling and the
    // noise are the site's secret.
    let twin = SiteContext::new(
        s.site,
        s.ctx.dataset.clone(),
        s.ctx.artifacts.clone(),
        Arc::new(Granted {
            study: s.study,
            hash: hash.clone(),
        }),
        s.ctx.decoder.clone(),
        (*s.ctx.signer).clone(),
        s.ctx.server_key,
    );
    let again = process(&job(&s, &m, &hash, 1, None), &twin).await;
    let Outcome::Trained { update_hash, .. } = &again.outcome else {
        panic!("{:?}", again.outcome)
    };
    assert_ne!(update_hash, &weights[0]);
    let r = process(&job(&s, &m, &hash, 4, None), &s.ctx).await;
    let Outcome::Refused { reason } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(reason.contains("above the approved ε = 2"), "{reason}");
    assert_eq!(
        s.ctx.ledger.entries().len(),
        3,
        "a refused round is not recorded"
    );
}

/// Every model the worker offers trains under DP-SGD: resnet with group normalisation spends
/// and reports like the small CNN, and its update holds no running statistics (values computed
/// from the patients' images outside the noised gradients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnet_with_group_norm_trains_under_dp_sgd() {
    let mut m = dp_manifest(4.0);
    m.model = serde_json::from_value(
        serde_json::json!({"architecture": "resnet", "num_classes": 2,
        "hyper_parameters": {"widths": [4, 8], "norm": "group"}}),
    )
    .unwrap();
    m.preprocessing.image_size = Some(16);
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site_of(&hash, Uuid::from_u128(17), 60);
    let r = process(&job(&s, &m, &hash, 1, None), &s.ctx).await;
    let p = spent(&r);
    assert!(
        p.epsilon_round > 0.0 && p.epsilon_run <= 4.0 + 1e-9,
        "{p:?}"
    );
    let Outcome::Trained { update_hash, .. } = &r.outcome else {
        unreachable!()
    };
    let bytes = s.store.get(update_hash).await.unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(
        names.iter().any(|n| n.ends_with("gn_stem.weight")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("running")), "{names:?}");
    assert_eq!(s.ctx.ledger.entries().len(), 1);
}

/// The site's lifetime budget holds across runs: a second study's run on the same dataset is
/// refused once the two together would exceed it, and what was spent survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_datasets_lifetime_budget_holds_across_runs() {
    use consilium_worker::ledger::{Budget, Ledger};
    let m = dp_manifest(3.0);
    let hash = plan_hash(&m, &[]).unwrap();
    let mut s = site(&hash, Uuid::from_u128(12));
    let file = s._dir.path().join("privacy-ledger.json");
    // Run 1 spends about 3 of it; run 2 can afford one round, not two.
    let budget = Budget {
        epsilon: 3.7,
        delta: 1e-5,
    };
    s.ctx = s
        .ctx
        .with_ledger(Ledger::open(&file, Some(budget)).unwrap());
    let run = |s: &Site, run: u128, round: u32| {
        let mut j = job(s, &m, &hash, round, None);
        j.run_id = Uuid::from_u128(run);
        j
    };
    for round in 1..=3 {
        let r = process(&run(&s, 1, round), &s.ctx).await;
        spent(&r);
    }
    // A restarted worker reads the same ledger.
    s.ctx = s
        .ctx
        .with_ledger(Ledger::open(&file, Some(budget)).unwrap());
    // The second run trains until the dataset's budget would be exceeded, then is refused.
    let mut trained = 0;
    let reason = loop {
        let r = process(&run(&s, 2, trained + 1), &s.ctx).await;
        match &r.outcome {
            Outcome::Trained { .. } => {
                let p = spent(&r);
                assert!(p.epsilon_dataset > p.epsilon_run, "{p:?}");
                assert!(p.epsilon_dataset <= 3.7 + 1e-9, "{p:?}");
                trained += 1;
            }
            Outcome::Refused { reason } => break reason.clone(),
            other => panic!("{other:?}"),
        }
        assert!(trained < 3, "the lifetime budget was never reached");
    };
    assert!(trained >= 1);
    assert!(
        reason.contains("above the site's budget of ε = 3.7"),
        "{reason}"
    );
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        on_disk["entries"].as_array().unwrap().len(),
        3 + trained as usize
    );
}

/// The unit of privacy is the patient: rows of the labels CSV sharing a `group` stay on one
/// side of the holdout split, and DP-SGD samples and counts patients, not images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patients_images_move_together() {
    let m = dp_manifest(8.0);
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site(&hash, Uuid::from_u128(13));
    // Four images per patient.
    let labels = s.ctx.dataset.labels.clone();
    let text = std::fs::read_to_string(&labels).unwrap();
    let mut out = String::from("file,label,group\n");
    for (i, row) in text.lines().skip(1).enumerate() {
        out.push_str(&format!("{row},patient-{}\n", i / 4));
    }
    std::fs::write(&labels, out).unwrap();
    let data = s.ctx.data(28).await.unwrap();
    let mut side: std::collections::HashMap<&str, bool> = Default::default();
    for sample in &data.samples {
        let held = *side.entry(sample.unit.as_str()).or_insert(sample.holdout);
        assert_eq!(
            held, sample.holdout,
            "{} is split across train and holdout",
            sample.unit
        );
    }
    assert_eq!(side.len(), 50);
    let train_patients = side.values().filter(|h| !**h).count() as u64;
    assert!(
        data.summary(consilium_worker::data::DataKind::Images)
            .contains("200 images of 50 patients")
    );
    let p = spent(&process(&job(&s, &m, &hash, 1, None), &s.ctx).await);
    assert_eq!(p.patients, train_patients);
    assert_eq!(p.steps, train_patients.div_ceil(8));
}

/// δ must stay below one patient in the site's population (δ < 1/n), or the guarantee
/// allows releasing some patient's data outright: a site with more patients than 1/δ refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_too_large_for_the_sites_patients_is_refused() {
    let mut m = dp_manifest(8.0);
    if let Some(dp) = m.privacy.dp_sgd.as_mut() {
        dp.delta = 1e-3;
    }
    let hash = plan_hash(&m, &[]).unwrap();
    // 1,400 one-image patients, a quarter held out: about 1,050 ≥ 1/δ in training.
    let s = site_of(&hash, Uuid::from_u128(14), 1400);
    let r = process(&job(&s, &m, &hash, 1, None), &s.ctx).await;
    let Outcome::Refused { reason } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(reason.contains("is not below 1 /"), "{reason}");
    assert!(s.ctx.ledger.entries().is_empty());
}

/// A private preview trains its generator by DP-SGD: the cost is worked out from the site's
/// patients as the server reckons it, recorded in the site's ledger before training, reported
/// with the set, and the set states its ε. The site's own lifetime budget refuses the preview
/// that would exceed it, whatever the server asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_preview_spends_from_the_sites_ledger_and_is_refused_beyond_it() {
    use consilium_core::preview::{PreviewPrivacy, PreviewSpec, dp_cost};
    use consilium_worker::ledger::{Budget, Ledger};
    let m = manifest();
    let hash = plan_hash(&m, &[]).unwrap();
    let mut s = site(&hash, Uuid::new_v4());
    let dp = PreviewPrivacy {
        epsilon: 2.0,
        delta: 1e-5,
        max_grad_norm: 1.0,
    };
    // Room for one such preview, not two (two compose to about ε = 2.9).
    let budget = Budget {
        epsilon: 2.5,
        delta: 1e-5,
    };
    let file = s._dir.path().join("privacy-ledger.json");
    s.ctx = s
        .ctx
        .with_ledger(Ledger::open(&file, Some(budget)).unwrap());
    let ask = |s: &Site| {
        let mut j = job(s, &m, &hash, 0, None);
        j.kind = JobKind::Preview;
        j.run_id = Uuid::new_v4();
        j.preview = Some(PreviewSpec {
            per_class: 3,
            image_size: 32,
            k: 10,
            generator: Some("pca_gaussian".into()),
            dp: Some(dp),
        });
        j
    };
    // The fallback generator cannot be trained privately: refused, nothing spent.
    let r = process(&ask(&s), &s.ctx).await;
    let Outcome::Refused { reason } = &r.outcome else {
        panic!("{:?}", r.outcome);
    };
    assert!(
        reason.contains("pca_gaussian cannot be trained with DP-SGD"),
        "{reason}"
    );
    let mut private = ask(&s);
    if let Some(p) = private.preview.as_mut() {
        p.generator = None;
    }
    let r = process(&private, &s.ctx).await;
    let Outcome::Previewed { set, privacy, .. } = &r.outcome else {
        panic!("{:?}", r.outcome);
    };
    let spent = privacy.clone().expect("a private preview reports its cost");
    // 200 images of a patient each, about a quarter held out.
    assert!((130..=170).contains(&spent.patients), "{spent:?}");
    let expected = dp_cost(&dp, spent.patients).unwrap();
    assert_eq!(spent.noise_multiplier, expected.noise_multiplier);
    assert_eq!(spent.steps, consilium_core::preview::GENERATOR_STEPS);
    assert!(
        spent.epsilon_round <= 2.0 + 1e-9 && spent.epsilon_round > 1.9,
        "{spent:?}"
    );
    let bytes = s.store.get(set).await.unwrap();
    let set: consilium_core::preview::PreviewSet = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(set.generator, "cvae");
    assert_eq!(set.epsilon, Some(spent.epsilon_round));
    // The second would take the dataset past its budget: the site refuses it by itself.
    let mut again = ask(&s);
    if let Some(p) = again.preview.as_mut() {
        p.generator = None;
    }
    let r = process(&again, &s.ctx).await;
    let Outcome::Refused { reason } = &r.outcome else {
        panic!("{:?}", r.outcome);
    };
    assert!(
        reason.contains(
            "this preview's generator would bring this dataset's lifetime privacy spending"
        ) && reason.contains("above the site's budget of ε = 2.5"),
        "{reason}"
    );
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let entries = on_disk["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{on_disk}");
    assert_eq!(entries[0]["preview"], true);
}

/// A plan whose learning rate blows the model up: the site says so, with what to change,
/// instead of sending a result whose NaN loss the server cannot read (it once spun forever on
/// the NaN scores' AUROC, and the round waited for the site until its deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_diverges_fails_the_job_with_the_reason() {
    let mut m = manifest();
    m.optimiser = serde_json::from_value(
        serde_json::json!({"name": "sgd", "learning_rate": 1.0e6, "momentum": 0.9}),
    )
    .unwrap();
    m.local_epochs = 2;
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site(&hash, Uuid::from_u128(1));
    let r1 = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        process(&job(&s, &m, &hash, 1, None), &s.ctx),
    )
    .await
    .expect("the job ends");
    let Outcome::Failed { reason } = &r1.outcome else {
        panic!("{:?}", r1.outcome)
    };
    assert!(
        reason.contains("the model has diverged")
            && reason.contains("lower the plan's learning rate"),
        "{reason}"
    );
    // The result can be signed, sent and read back as it is.
    let text = serde_json::to_string(&r1).unwrap();
    let back: consilium_core::protocol::JobResult = serde_json::from_str(&text).unwrap();
    assert!(matches!(back.outcome, Outcome::Failed { .. }));
}

/// A version holding a well-trained model (trained whole at one site) whose classifier reads
/// its features the wrong way round (its two classes swapped): it scores below chance as it is.
/// The sites of these tests have fixed ids, so their batches, and the tests' scores, repeat.
async fn a_version_whose_classifier_is_swapped() -> Vec<u8> {
    let m = manifest();
    let hash = plan_hash(&m, &[]).unwrap();
    let trainer = site_as(&hash, Uuid::from_u128(6), 200, Uuid::from_u128(60));
    let trained = process(&job(&trainer, &m, &hash, 1, None), &trainer.ctx).await;
    let Outcome::Trained { update_hash, .. } = trained.outcome else {
        panic!("{:?}", trained.outcome)
    };
    let bytes = trainer.store.get(&update_hash).await.unwrap();
    let plan = m.parse().unwrap();
    let net = consilium_worker::train::Net::new(&plan, &candle_core::Device::Cpu).unwrap();
    net.load_safetensors(&bytes, |_| false).unwrap();
    let mut weights = net.weights().unwrap();
    for name in ["fc.weight", "fc.bias"] {
        let (_, values) = weights.get_mut(name).expect(name);
        let half = values.len() / 2;
        values.rotate_left(half);
    }
    net.set_weights(&weights).unwrap();
    net.to_safetensors().unwrap()
}

/// A site's accuracy on its held-out split for `version`, in an evaluation job of plan `m`.
async fn score(version: &[u8], m: TrainingPlanManifest) -> f64 {
    let hash = plan_hash(&m, &[]).unwrap();
    let s = site_as(&hash, Uuid::from_u128(7), 200, Uuid::from_u128(70));
    let global = s.store.put(version.to_vec()).await.unwrap();
    let mut j = job(&s, &m, &hash, 2, Some(global));
    j.kind = JobKind::Evaluate;
    match process(&j, &s.ctx).await.outcome {
        Outcome::Evaluated { evaluation, .. } => evaluation.accuracy,
        other => panic!("{other:?}"),
    }
}

/// FLOP with `local_fit_epochs`: a site scores a version with its own layers first fitted to
/// that version's shared layers (FedRep's order), as it does before every training job, not
/// with layers fitted to other shared layers. The version's classifier is the one a site with
/// none of its own yet starts from. Unfitted it scores below chance; fitted it scores as the
/// trained model does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_scores_a_version_with_its_own_layers_fitted_to_it() {
    let version = a_version_whose_classifier_is_swapped().await;
    let mut unfitted = manifest();
    unfitted.aggregation.local_layers = vec!["fc".into()];
    let mut fitted = unfitted.clone();
    fitted.aggregation.local_fit_epochs = Some(10);
    let (unfitted, fitted) = (
        score(&version, unfitted).await,
        score(&version, fitted).await,
    );
    assert!(
        unfitted < 0.3 && fitted > 0.8,
        "fitted {fitted}, unfitted {unfitted}"
    );
}

/// Personalisation by fine-tuning: a site scoring a version scores a copy of it trained
/// further on its own training split, every layer or only the classifier
/// (`fine_tune_layers`). The same version scored as it is stays below chance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_scores_a_version_fine_tuned_to_its_own_data() {
    let version = a_version_whose_classifier_is_swapped().await;
    let mut tuned = manifest();
    tuned.aggregation.fine_tune_epochs = Some(10);
    let mut classifier = tuned.clone();
    classifier.aggregation.fine_tune_layers = vec!["fc".into()];
    let tuned = score(&version, tuned).await;
    let classifier = score(&version, classifier).await;
    let plain = score(&version, manifest()).await;
    assert!(
        plain < 0.3 && tuned > 0.8 && classifier > 0.8,
        "fine-tuned {tuned}, its classifier alone {classifier}, as it is {plain}"
    );
}
