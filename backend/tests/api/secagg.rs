//! Secure aggregation across five site workers over the real RabbitMQ: one site stops after the
//! key exchange, another after sending its masked input; the round completes with the sum of
//! the four survivors (the same model a plain FedAvg of those four makes), the lineage names who
//! was summed and who dropped out, and no site's own update is in the store. With too few
//! neighbours left to remove a dropped site's masks, the round fails and says so.

use consilium_backend::engine::weights;
use consilium_core::protocol::Job;
use consilium_core::secagg::wire::Stage;
use consilium_worker::artifacts::{ArtifactError, SiteArtifacts};
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

use crate::engine::{
    approved_study_at, engine_manifest, five_sites, plain_site, run_to_end, start_configured_worker,
};
use crate::federation::Vhost;
use crate::helpers::*;
use crate::on_both;

/// A site worker that stops answering when it reaches `at` in a secure round (as if killed),
/// and gives up on the job at its deadline, so that it takes the next one.
struct StopsAt {
    inner: Arc<dyn SiteArtifacts>,
    at: Stage,
}

#[async_trait::async_trait]
impl SiteArtifacts for StopsAt {
    async fn model(&self, job: &Job, hash: &str) -> Result<Vec<u8>, ArtifactError> {
        self.inner.model(job, hash).await
    }
    async fn upload(&self, job: &Job, bytes: Vec<u8>) -> Result<String, ArtifactError> {
        self.inner.upload(job, bytes).await
    }
    async fn secagg_post(&self, job: &Job, stage: Stage, body: Value) -> Result<(), ArtifactError> {
        if stage == self.at {
            let left = (job.deadline - chrono::Utc::now())
                .to_std()
                .unwrap_or_default();
            tokio::time::sleep(left + std::time::Duration::from_secs(1)).await;
            return Err(ArtifactError::Store("the site stopped".into()));
        }
        self.inner.secagg_post(job, stage, body).await
    }
    async fn secagg_answer(&self, job: &Job, stage: Stage) -> Result<Option<Value>, ArtifactError> {
        self.inner.secagg_answer(job, stage).await
    }
}

/// The sites a secure version's sum holds, as its lineage names them.
pub fn summed_sites(record: &Value) -> Vec<Uuid> {
    record["summed"]
        .as_array()
        .expect("summed")
        .iter()
        .filter_map(|s| s["site_id"].as_str()?.parse().ok())
        .collect()
}

fn secure_manifest() -> Value {
    let mut m = engine_manifest(1);
    m["local_epochs"] = json!(1);
    m["aggregation"] = json!({"strategy": "fedavg", "min_sites": 3});
    m["privacy"] = json!({"secure_aggregation": true, "secagg": {"stage_seconds": 8}});
    m
}

/// Five workers; `stops[i]` is where site i stops in secure rounds.
async fn federation(
    app: &TestApp,
    w: &World,
    dir: &std::path::Path,
    stops: [Option<Stage>; 5],
) -> Vec<(Uuid, Person)> {
    let sites = five_sites(app, w).await;
    for (i, (site, custodian)) in sites.iter().enumerate() {
        let at = stops[i];
        start_configured_worker(
            app,
            *site,
            custodian,
            plain_site(64, i as u64 + 1),
            dir,
            move |mut c| {
                if let Some(at) = at {
                    c.artifacts = Arc::new(StopsAt {
                        inner: c.artifacts.clone(),
                        at,
                    });
                }
                c
            },
        )
        .await;
    }
    sites
}

async fn the_server_sums_masked_updates_and_recovers_dropped_sites(db: Db) {
    let vhost = Vhost::new();
    let url = vhost.url();
    let app = spawn_app_with(db, |s| {
        s.engine.broker_url = Some(url.clone().into());
        s.engine.round_timeout_seconds = 60;
    })
    .await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    // East stops after the key exchange (before its masked input), West after its masked input.
    let sites = federation(
        &app,
        &w,
        dir.path(),
        [None, None, Some(Stage::Masked), Some(Stage::Reveals), None],
    )
    .await;
    let people: Vec<(Uuid, &Person)> = sites.iter().map(|(s, c)| (*s, c)).collect();
    let (sid, _) = approved_study_at(&app, &w, secure_manifest(), &people).await;
    let (rid, done) = run_to_end(&app, &sid, &w.researcher.auth, 240).await;
    assert_eq!(done["status"], "completed", "{done}");
    let models = app
        .get(&format!("/api/v1/models?run_id={rid}"), &w.researcher.auth)
        .await
        .expect(200);
    let version = &models[0];
    let record = &version["secure_aggregation"];
    let (east, west) = (sites[2].0, sites[3].0);
    let summed = summed_sites(record);
    assert_eq!(summed.len(), 4, "{record}");
    assert!(
        summed.contains(&west) && !summed.contains(&east),
        "{record}"
    );
    assert_eq!(record["dropped"][0]["site_id"], json!(east), "{record}");
    assert_eq!(
        record["dropped"][0]["status"],
        "dropped out after the key exchange, before its masked input"
    );
    assert_eq!(record["dropped"][0]["recovered"], true);
    assert_eq!(
        (record["neighbours"].as_u64(), record["threshold"].as_u64()),
        (Some(4), Some(3))
    );
    // Each contribution names a masked input and the site's public share of the images.
    let contributions = version["contributions"].as_array().expect("contributions");
    assert_eq!(contributions.len(), 4);
    let total: f64 = contributions
        .iter()
        .filter_map(|c| c["weight"].as_f64())
        .sum();
    assert!((total - 1.0).abs() < 1e-9, "{total}");
    let store = &app.ctx.federation().expect("engine").artifacts;
    let global = weights::from_safetensors(
        &store
            .get(version["hash"].as_str().expect("hash"))
            .await
            .expect("the model"),
    )
    .expect("weights");
    let values: usize = global.values().map(|t| t.data.len()).sum();
    for c in contributions {
        let masked = store
            .get(c["update_hash"].as_str().expect("hash"))
            .await
            .expect("the masked input");
        // 32-bit words, not a safetensors file of the site's weights.
        assert_eq!(masked.len(), values * 4);
        assert!(weights::from_safetensors(&masked).is_err());
    }
    // Nothing in the store is a site's own update: the files that hold weights are the initial
    // model, the round's sum and the new version; every other file is a masked input.
    let folder = app
        .ctx
        .settings
        .engine
        .artifacts
        .clone()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| app.ctx.settings.database.data_dir.join("artifacts"));
    let mut files = Vec::new();
    let mut dirs = vec![folder];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("the store's folder").flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    let holding_weights = files
        .iter()
        .filter(|f| weights::from_safetensors(&std::fs::read(f).expect("a file")).is_ok())
        .count();
    assert!(
        holding_weights <= 3 && files.len() >= holding_weights + 4,
        "{holding_weights} of {} files hold weights",
        files.len()
    );
    // The round's table tells the researcher who dropped out and that its masks were removed.
    let rounds = app
        .get(&format!("/api/v1/runs/{rid}/rounds"), &w.researcher.auth)
        .await
        .expect(200);
    let excluded = rounds[0]["excluded"].to_string();
    assert!(
        excluded.contains("its masks were removed with its neighbours' shares"),
        "{excluded}"
    );

    // The same plan without secure aggregation, at the four sites that were summed, makes the
    // same model: the masks cancelled exactly, to the quantisation step.
    let mut plain = secure_manifest();
    plain["privacy"] = json!({"secure_aggregation": false});
    let four: Vec<(Uuid, &Person)> = people.iter().filter(|(s, _)| *s != east).copied().collect();
    let (sid, _) = approved_study_at(&app, &w, plain, &four).await;
    let (prid, done) = run_to_end(&app, &sid, &w.researcher.auth, 240).await;
    assert_eq!(done["status"], "completed", "{done}");
    let plain_models = app
        .get(&format!("/api/v1/models?run_id={prid}"), &w.researcher.auth)
        .await
        .expect(200);
    let plain_weights = weights::from_safetensors(
        &store
            .get(plain_models[0]["hash"].as_str().expect("hash"))
            .await
            .expect("the plain model"),
    )
    .expect("weights");
    let mut largest = 0f32;
    for (name, t) in &global {
        for (a, b) in t.data.iter().zip(&plain_weights[name].data) {
            largest = largest.max((a - b).abs());
        }
    }
    assert!(
        largest < 1e-4,
        "the secure sum differs from the plain one by {largest}"
    );
}
on_both!(the_server_sums_masked_updates_and_recovers_dropped_sites);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_threshold_the_round_fails_and_says_why() {
    let app = spawn_app_with(Db::Sqlite, |s| s.engine.round_timeout_seconds = 60).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    // East stops after the key exchange; West and Centre after their masked inputs: a
    // survivor's self mask needs three of the five shares it and its neighbours hold, and only
    // it and one other answer.
    let sites = federation(
        &app,
        &w,
        dir.path(),
        [
            None,
            None,
            Some(Stage::Masked),
            Some(Stage::Reveals),
            Some(Stage::Reveals),
        ],
    )
    .await;
    let people: Vec<(Uuid, &Person)> = sites.iter().map(|(s, c)| (*s, c)).collect();
    let (sid, _) = approved_study_at(&app, &w, secure_manifest(), &people).await;
    let (_, done) = run_to_end(&app, &sid, &w.researcher.auth, 240).await;
    assert_eq!(done["status"], "failed", "{done}");
    let reason = done["stop_reason"].as_str().unwrap_or_default();
    // It names the site whose masks stay on (a survivor: its own share and one other's).
    assert!(
        reason.starts_with("Round 1 failed: secure aggregation could not remove the self mask of ")
            && reason.contains("2 of the sites holding its shares answered, the threshold is 3")
            && reason.contains("the sum cannot be read"),
        "{reason}"
    );
    let named = sites
        .iter()
        .filter(|(s, _)| reason.contains(&s.to_string()))
        .count();
    assert_eq!(named, 1, "{reason}");
    assert!(
        !reason.contains(&sites[2].0.to_string()),
        "East sent no masked input: {reason}"
    );
}
