//! A governed run trains a model across site workers (in-process broker, real training on
//! synthetic radiograph-like data), and every model version names what it stands on.

use crate::helpers::*;
use crate::on_both;

use consilium_core::Role;
use consilium_core::signing::{SigningKey, encode_public_key};
use consilium_worker::data::{DataKind, DatasetSpec, LabelKey};
use consilium_worker::job::{ServerApprovals, SiteContext};
use consilium_worker::synthetic::{SiteProfile, write_site};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub fn engine_manifest(rounds: u32) -> Value {
    json!({
        "model": {"architecture": "small_cnn", "num_classes": 2},
        "preprocessing": {"image_size": 28, "normalisation": "zscore"},
        "optimiser": {"name": "adamw", "learning_rate": 0.003, "weight_decay": 0.0001},
        "local_epochs": 3, "batch_size": 16, "rounds": rounds,
        "aggregation": {"strategy": "fedavg", "min_sites": 2},
        "seed": 9
    })
}

/// A worker token for the site, made by its signed-in custodian (not by another token).
/// Answers preview `preview` as `site`'s worker would: hands `body` over as the job's output
/// with the site's worker token, then publishes a result naming it (`images` images), signed
/// with a key the custodian registered, on the site's broker. What a forging site can do.
pub async fn answer_preview(
    app: &TestApp,
    site: Uuid,
    custodian: &Person,
    preview: &str,
    body: Vec<u8>,
    images: u32,
) {
    use consilium_core::protocol::{JobKind, JobResult, Outcome, WorkerMessage};
    let token = worker_token(app, site, custodian).await;
    let job_id = Uuid::new_v4();
    let stored = app
        .client
        .put(format!(
            "{}/api/v1/sites/{site}/jobs/{job_id}/output?run_id={preview}&round=0",
            app.address
        ))
        .bearer_auth(&token)
        .body(body)
        .send()
        .await
        .expect("handed over");
    assert_eq!(stored.status(), 201);
    let stored: Value = stored.json().await.expect("json");
    let key = register_key(app, site, custodian).await;
    let message = consilium_core::signing::sign(
        &key,
        &WorkerMessage::Result(JobResult {
            job_id,
            run_id: preview.parse().expect("uuid"),
            round: 0,
            site_id: site,
            kind: Some(JobKind::Preview),
            outcome: Outcome::Previewed {
                set: stored["sha256"].as_str().expect("sha256").to_string(),
                images,
                withheld: 0,
                duration_ms: 1,
                privacy: None,
            },
        }),
    )
    .expect("signed");
    site_broker(app, site)
        .await
        .publish_message(&message)
        .await
        .expect("published");
}

/// The U-Net recipe of `consilium simulate --example-segmentation`, for `rounds` rounds.
pub fn segmentation_plan(rounds: u32) -> Value {
    let mut plan = consilium_backend::simulate::Example::Segmentation
        .plan()
        .expect("the example's plan");
    plan.rounds = rounds;
    serde_json::to_value(plan).expect("json")
}

pub async fn worker_token(app: &TestApp, site: Uuid, custodian: &Person) -> String {
    let session = Auth::Cookie(app.sign_in(&custodian.email).await);
    app.post(
        &format!("/api/v1/sites/{site}/worker-tokens"),
        &session,
        json!({"name": "worker", "expires_at": in_days(30)}),
    )
    .await
    .expect(201)["token"]
        .as_str()
        .expect("token")
        .to_string()
}

/// A new signing key for the site (as `consilium-worker keygen` makes one), its public half
/// registered by the site's signed-in custodian.
pub async fn register_key(app: &TestApp, site: Uuid, custodian: &Person) -> SigningKey {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let session = Auth::Cookie(app.sign_in(&custodian.email).await);
    app.post(
        &format!("/api/v1/sites/{site}/keys"),
        &session,
        json!({"public_key": encode_public_key(&key.verifying_key()), "name": "test worker"}),
    )
    .await
    .expect(201);
    key
}

/// Starts a site worker in this process, with its own worker token, data and the server's broker.
pub async fn start_worker(
    app: &TestApp,
    site: Uuid,
    custodian: &Person,
    profile: SiteProfile,
    dir: &std::path::Path,
) -> tokio::task::JoinHandle<()> {
    start_keyed_worker(app, site, custodian, profile, dir)
        .await
        .0
}

/// The broker as the site's worker sees it: on RabbitMQ, its own broker user, made by the
/// product's provisioning (`consilium admin broker-user`); else the in-process broker.
pub async fn site_broker(app: &TestApp, site: Uuid) -> consilium_worker::broker::SharedBroker {
    if app.ctx.settings.engine.broker_url.is_none() {
        return app.broker.clone();
    }
    let made = consilium_backend::broker_users::provision(&app.ctx.settings, site, None)
        .await
        .expect("the site's broker user");
    consilium_worker::broker::connect_site(secrecy::ExposeSecret::expose_secret(&made.broker_url))
        .await
        .expect("connects as the site's user")
}

/// `start_worker`, also giving back the worker's signing key.
pub async fn start_keyed_worker(
    app: &TestApp,
    site: Uuid,
    custodian: &Person,
    profile: SiteProfile,
    dir: &std::path::Path,
) -> (tokio::task::JoinHandle<()>, SigningKey) {
    start_configured_worker(app, site, custodian, profile, dir, |c| c).await
}

/// `start_keyed_worker` with the site's context changed first (its own privacy ledger, say).
pub async fn start_configured_worker(
    app: &TestApp,
    site: Uuid,
    custodian: &Person,
    profile: SiteProfile,
    dir: &std::path::Path,
    configure: impl FnOnce(SiteContext) -> SiteContext,
) -> (tokio::task::JoinHandle<()>, SigningKey) {
    let (ctx, broker, key) = keyed_site_with(app, site, custodian, profile, dir, configure).await;
    let handle = tokio::spawn(async move {
        // It runs until the test ends; a worker that stops on its own fails the test loudly.
        if let Err(e) = consilium_worker::consumer::run(
            ctx,
            broker,
            Duration::from_secs(1),
            std::future::pending(),
        )
        .await
        {
            panic!("the site's worker stopped: {e:#}");
        }
    });
    (handle, key)
}

/// A site as its worker sees it: its data, its registered key, its token and its own broker
/// connection; the caller runs the worker's loop (or a compromised one).
pub async fn keyed_site(
    app: &TestApp,
    site: Uuid,
    custodian: &Person,
    profile: SiteProfile,
    dir: &std::path::Path,
) -> (
    Arc<SiteContext>,
    consilium_worker::broker::SharedBroker,
    SigningKey,
) {
    keyed_site_with(app, site, custodian, profile, dir, |c| c).await
}

async fn keyed_site_with(
    app: &TestApp,
    site: Uuid,
    custodian: &Person,
    profile: SiteProfile,
    dir: &std::path::Path,
    configure: impl FnOnce(SiteContext) -> SiteContext,
) -> (
    Arc<SiteContext>,
    consilium_worker::broker::SharedBroker,
    SigningKey,
) {
    let data = dir.join(format!("site-{site}"));
    write_site(&data, 32, &profile).expect("synthetic data");
    let token = worker_token(app, site, custodian).await;
    let spec = DatasetSpec {
        kind: DataKind::Images,
        labels: data.join("labels.csv"),
        root: data,
        label_key: LabelKey::Path,
        masks: false,
        holdout: 0.25,
        window: None,
        decoding: Default::default(),
    };
    let token: secrecy::SecretString = token.into();
    // Models come and go through the server, as for a hospital's worker.
    let artifacts = Arc::new(consilium_worker::artifacts::ServerArtifacts {
        server_url: app.address.clone(),
        token: token.clone(),
        http: reqwest::Client::new(),
    });
    let approvals = Arc::new(ServerApprovals {
        server_url: app.address.clone(),
        token,
        http: reqwest::Client::new(),
    });
    let key = register_key(app, site, custodian).await;
    let server_key = app.ctx.federation().expect("engine").signer.verifying_key();
    let ctx = Arc::new(configure(SiteContext::new(
        site,
        spec,
        artifacts,
        approvals,
        consilium_worker::decode::Decoder::program(env!("CARGO_BIN_EXE_consilium")),
        key.clone(),
        server_key,
    )));
    let broker = site_broker(app, site).await;
    (ctx, broker, key)
}

/// Drafts, approves and grants a two-site study; returns (study id, plan hash).
pub async fn approved_study(app: &TestApp, w: &World, manifest: Value) -> (String, String) {
    approved_study_at(
        app,
        w,
        manifest,
        &[(w.site_a, &w.custodian_a), (w.site_b, &w.custodian_b)],
    )
    .await
}

/// Drafts, approves and grants a study at these sites (each with its custodian).
pub async fn approved_study_at(
    app: &TestApp,
    w: &World,
    manifest: Value,
    sites: &[(Uuid, &Person)],
) -> (String, String) {
    let r = &w.researcher.auth;
    let ids: Vec<Uuid> = sites.iter().map(|(s, _)| *s).collect();
    let sid = id_of(
        &app.post("/api/v1/studies", r, study_body(w, &ids))
            .await
            .expect(201),
    );
    let hash = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            r,
            json!({"manifest": manifest}),
        )
        .await
        .expect(201)["hash"]
        .as_str()
        .expect("hash")
        .to_string();
    app.post(&format!("/api/v1/studies/{sid}/submit"), r, json!({}))
        .await
        .expect(200);
    app.post(
        &format!("/api/v1/studies/{sid}/reviews"),
        &w.member.auth,
        json!({"decision": "approve", "comments": "ok", "expires_at": in_days(30)}),
    )
    .await
    .expect(201);
    for (site, custodian) in sites {
        let req = id_of(
            &app.post(
                &format!("/api/v1/studies/{sid}/access-requests"),
                r,
                json!({"site_id": site, "justification": "training"}),
            )
            .await
            .expect(201),
        );
        app.post(
            &format!("/api/v1/access-requests/{req}/decision"),
            &custodian.auth,
            json!({"decision": "approve", "expires_at": in_days(30)}),
        )
        .await
        .expect(200);
    }
    (sid, hash)
}

/// The world's two sites and three more hospitals, each with its own custodian.
pub async fn five_sites(app: &TestApp, w: &World) -> Vec<(Uuid, Person)> {
    let mut sites = vec![
        (w.site_a, w.custodian_a.clone()),
        (w.site_b, w.custodian_b.clone()),
    ];
    for name in ["East", "West", "Centre"] {
        let custodian = app
            .person(
                &format!("custodian@{}.test", name.to_lowercase()),
                &[Role::Custodian],
            )
            .await;
        let site = app
            .post(
                "/api/v1/sites",
                &w.admin.auth,
                json!({"name": format!("{name} Hospital"), "custodians": [custodian.id]}),
            )
            .await
            .expect(201)["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("site id");
        sites.push((site, custodian));
    }
    sites
}

/// A synthetic site of `images` phantoms, half with a lesion, one scanner for all.
pub fn plain_site(images: usize, seed: u64) -> SiteProfile {
    SiteProfile {
        images,
        lesion_fraction: 0.5,
        gain: 1.0,
        offset: 0.0,
        noise: 0.03,
        blur: 0,
        seed,
    }
}

/// Starts the study's run as its researcher (`auth`) and waits up to `secs` for it to end;
/// returns the run's id and how it ended.
pub async fn run_to_end(app: &TestApp, sid: &str, auth: &Auth, secs: u64) -> (String, Value) {
    let run = app
        .post(&format!("/api/v1/studies/{sid}/runs"), auth, json!({}))
        .await
        .expect(201);
    let rid = id_of(&run);
    let done = wait_for_run(app, &rid, auth, secs).await;
    (rid, done)
}

pub async fn wait_for_run(app: &TestApp, run: &str, auth: &Auth, secs: u64) -> Value {
    for _ in 0..secs * 4 {
        let r = app
            .get(&format!("/api/v1/runs/{run}"), auth)
            .await
            .expect(200);
        if r["status"] != "running" {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the run did not finish within {secs} s");
}

async fn a_governed_run_trains_across_sites(db: Db) {
    let app = spawn_app_with(db, |s| s.engine.round_timeout_seconds = 120).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let p = |seed, lesion_fraction, noise| SiteProfile {
        images: 120,
        lesion_fraction,
        gain: 1.0,
        offset: 0.0,
        noise,
        blur: 0,
        seed,
    };
    let _a = start_worker(&app, w.site_a, &w.custodian_a, p(1, 0.5, 0.03), dir.path()).await;
    let _b = start_worker(&app, w.site_b, &w.custodian_b, p(2, 0.35, 0.06), dir.path()).await;
    let (sid, hash) = approved_study(&app, &w, engine_manifest(3)).await;
    let run = app
        .post(
            &format!("/api/v1/studies/{sid}/runs"),
            &w.researcher.auth,
            json!({}),
        )
        .await
        .expect(201);
    assert_eq!(run["status"], "running");
    let rid = id_of(&run);
    let done = wait_for_run(&app, &rid, &w.researcher.auth, 240).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["current_round"], 3);
    assert_eq!(done["stop_reason"], "Completed the plan's 3 rounds.");

    let rounds = app
        .get(&format!("/api/v1/runs/{rid}/rounds"), &w.researcher.auth)
        .await
        .expect(200);
    assert_eq!(rounds.as_array().map(Vec::len), Some(3));
    for round in rounds.as_array().expect("rounds") {
        assert_eq!(round["state"], "closed");
        let statuses: Vec<&str> = round["sites"]
            .as_array()
            .expect("sites")
            .iter()
            .filter_map(|s| s["status"].as_str())
            .collect();
        assert_eq!(statuses, vec!["trained", "trained"], "{round}");
    }

    let models = app
        .get(&format!("/api/v1/models?run_id={rid}"), &w.researcher.auth)
        .await
        .expect(200);
    let models = models.as_array().expect("models").clone();
    assert_eq!(models.len(), 3);
    let last = &models[2];
    assert_eq!(last["parent_id"], models[1]["id"]);
    let acc = last["evaluation"]["global"]["accuracy"]
        .as_f64()
        .expect("accuracy");
    assert!(
        acc > 0.75,
        "the global model is clearly above chance at the sites: {acc}"
    );

    // Lineage: model → round → updates → sites → plan hash → approvals.
    let lineage = app
        .get(
            &format!("/api/v1/models/{}/lineage", id_of(last)),
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert_eq!(lineage["model"]["plan_hash"], json!(hash));
    assert_eq!(lineage["plan"]["hash"], json!(hash));
    assert_eq!(lineage["review"]["decision"], "approve");
    assert_eq!(lineage["grants"].as_array().map(Vec::len), Some(2));
    let contributions = lineage["model"]["contributions"]
        .as_array()
        .expect("contributions");
    let mut sites: Vec<String> = contributions
        .iter()
        .map(|c| c["site_name"].as_str().unwrap_or_default().to_string())
        .collect();
    sites.sort();
    assert_eq!(sites, vec!["North Hospital", "South Hospital"]);
    for c in contributions {
        assert_eq!(c["update_hash"].as_str().map(str::len), Some(64));
        assert!(c["samples"].as_u64().unwrap_or(0) > 50);
    }
    assert_eq!(lineage["parent"]["id"], models[1]["id"]);

    // The weights download is the stored artifact, and hashes to the version's hash.
    let resp = app
        .client
        .get(format!(
            "{}/api/v1/models/{}/weights",
            app.address,
            id_of(last)
        ))
        .bearer_auth(token(&w.researcher))
        .send()
        .await
        .expect("weights");
    let bytes = resp.bytes().await.expect("bytes");
    assert_eq!(
        consilium_core::hash::sha256_hex(&bytes),
        last["hash"].as_str().expect("hash")
    );

    // Release, then a site reports monitoring metrics for it.
    app.post(
        &format!("/api/v1/models/{}/release", id_of(last)),
        &w.researcher.auth,
        json!({}),
    )
    .await
    .expect(200);
    let report = json!({"site_id": w.site_a, "metrics": {"loss": 0.3, "accuracy": 0.9, "auroc": 0.95, "samples": 40}, "note": "first month"});
    // Another site's custodian may not speak for North: answered as if the model did not
    // exist, like every refusal below (404, not 403 or 409, which would tell what exists).
    app.post(
        &format!("/api/v1/models/{}/monitoring", id_of(last)),
        &w.custodian_b.auth,
        report.clone(),
    )
    .await
    .expect(404);
    forged_reports_are_refused(&app, &w, &models).await;
    each_site_sees_its_own(&app, &w, &id_of(last)).await;
    app.post(
        &format!("/api/v1/models/{}/monitoring", id_of(last)),
        &w.custodian_a.auth,
        report,
    )
    .await
    .expect(201);

    // Every step is audited and the chain holds.
    let audit = app
        .get(
            "/api/v1/audit/events?action=update.received&limit=1000",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert_eq!(audit.as_array().map(Vec::len), Some(6));
    assert_eq!(
        app.get("/api/v1/audit/verify", &w.auditor.auth)
            .await
            .expect(200)["ok"],
        true
    );
    // The workers report in.
    let hb = app
        .get(
            &format!("/api/v1/sites/{}/heartbeat", w.site_a),
            &w.admin.auth,
        )
        .await
        .expect(200);
    assert!(
        hb["data_summary"]
            .as_str()
            .unwrap_or_default()
            .contains("images"),
        "{hb}"
    );
}
on_both!(a_governed_run_trains_across_sites);

/// In a model's lineage, a site's custodian reads the other sites' grants without their
/// justification, comment or decider; a site's heartbeat is its own business; a worker token
/// manages no tokens.
async fn each_site_sees_its_own(app: &TestApp, w: &World, model: &str) {
    let path = format!("/api/v1/models/{model}/lineage");
    for (who, own, theirs) in [
        (&w.custodian_b, w.site_b, w.site_a),
        (&w.custodian_a, w.site_a, w.site_b),
    ] {
        let lineage = app.get(&path, &who.auth).await.expect(200);
        let grants = lineage["grants"].as_array().expect("grants");
        let grant = |site: Uuid| {
            grants
                .iter()
                .find(|g| g["site_id"] == json!(site))
                .expect("a grant per site")
        };
        assert_eq!(grant(own)["justification"], "training");
        assert!(
            grant(theirs)["justification"]
                .as_str()
                .is_some_and(|j| j.starts_with("(withheld"))
        );
        assert_eq!(grant(theirs)["decided_by"], Value::Null);
        assert_eq!(grant(theirs)["status"], "approved");
        // The grant itself stays out of reach, as it was.
        app.get(
            &format!("/api/v1/access-requests/{}", id_of(grant(theirs))),
            &who.auth,
        )
        .await
        .expect(404);
    }
    let full = app.get(&path, &w.auditor.auth).await.expect(200);
    assert!(
        full["grants"]
            .as_array()
            .expect("grants")
            .iter()
            .all(|g| g["justification"] == "training")
    );

    let heartbeat = |site: Uuid| format!("/api/v1/sites/{site}/heartbeat");
    app.get(&heartbeat(w.site_a), &w.custodian_a.auth)
        .await
        .expect(200);
    app.get(&heartbeat(w.site_a), &w.custodian_b.auth)
        .await
        .expect(403);
    app.get(&heartbeat(w.site_a), &w.researcher.auth)
        .await
        .expect(403);
    let worker = Auth::Token(worker_token(app, w.site_a, &w.custodian_a).await);
    app.get(&heartbeat(w.site_a), &worker).await.expect(200);
    app.get(&heartbeat(w.site_b), &worker).await.expect(403);
    // A worker token neither lists nor revokes its custodian's tokens.
    app.get("/api/v1/tokens", &worker).await.expect(403);
    let session = Auth::Cookie(app.sign_in(&w.custodian_a.email).await);
    let tokens = app.get("/api/v1/tokens", &session).await.expect(200);
    let sibling = tokens
        .as_array()
        .expect("tokens")
        .first()
        .map(id_of)
        .expect("a token");
    app.call(
        reqwest::Method::DELETE,
        &format!("/api/v1/tokens/{sibling}"),
        &worker,
        None,
    )
    .await
    .expect(403);
    // Site results are audited in the site worker's name, not the system's.
    let received = app
        .get(
            "/api/v1/audit/events?action=update.received&limit=5",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert!(
        received
            .as_array()
            .expect("events")
            .iter()
            .all(|e| e["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with("site ") && a.contains(" worker ("))),
        "{received}"
    );
}

/// A custodian of a site that takes part in no study reports on models it cannot read: refused
/// exactly as for a model id that does not exist, released or not.
async fn forged_reports_are_refused(app: &TestApp, w: &World, models: &[Value]) {
    let outsider = app.person("olga@west.test", &[Role::Custodian]).await;
    let west: Uuid = app
        .post(
            "/api/v1/sites",
            &w.admin.auth,
            json!({"name": "West Hospital", "custodians": [outsider.id]}),
        )
        .await
        .expect(201)["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("site id");
    let report = json!({"site_id": west, "metrics": {"loss": 0.1, "accuracy": 0.99, "samples": 1}});
    let released = id_of(&models[2]);
    let unreleased = id_of(&models[0]);
    let unknown = Uuid::new_v4().to_string();
    let mut answers = Vec::new();
    for model in [&released, &unreleased, &unknown] {
        let body = app
            .post(
                &format!("/api/v1/models/{model}/monitoring"),
                &outsider.auth,
                report.clone(),
            )
            .await
            .expect(404);
        answers.push((
            body["code"].clone(),
            body["detail"]
                .as_str()
                .unwrap_or_default()
                .replace(model.as_str(), "ID"),
        ));
    }
    assert!(answers.iter().all(|a| *a == answers[2]), "{answers:?}");
    // A site in the study may not report in the name of a site outside it either.
    app.post(
        &format!("/api/v1/models/{released}/monitoring"),
        &w.custodian_a.auth,
        report,
    )
    .await
    .expect(404);
    let reports = app
        .get(
            &format!("/api/v1/models/{released}/monitoring"),
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert_eq!(reports.as_array().map(Vec::len), Some(0), "{reports}");
    // The refusals are in the audit trail, named by who tried and how.
    let denied = app
        .get(
            "/api/v1/audit/events?action=models.denied&limit=1000",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let denied = denied.as_array().expect("events");
    assert!(
        denied.iter().any(|e| e["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{} via token ", outsider.id)))),
        "{denied:?}"
    );
}

/// A run the engine cannot drive (its model store is gone) fails with a reason the researcher
/// can act on, not "an unexpected error occurred", and without the store's internals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_names_its_cause() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    let (sid, _) = approved_study(&app, &w, engine_manifest(2)).await;
    // The artifact folder replaced by a file: nothing can be written there any more.
    let folder = app.ctx.settings.database.data_dir.join("artifacts");
    std::fs::remove_dir_all(&folder).expect("remove the store");
    std::fs::write(&folder, b"not a folder").expect("a file in its place");
    let run = app
        .post(
            &format!("/api/v1/studies/{sid}/runs"),
            &w.researcher.auth,
            json!({}),
        )
        .await
        .expect(201);
    let done = wait_for_run(&app, &id_of(&run), &w.researcher.auth, 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    let reason = done["stop_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the model store (engine.artifacts) could not be read or written"),
        "{reason}"
    );
    assert!(!reason.contains("unexpected"), "{reason}");
    assert!(
        !reason.contains(&folder.display().to_string()),
        "no internals: {reason}"
    );
}
