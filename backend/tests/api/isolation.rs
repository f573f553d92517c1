//! Each site's credentials reach only its own data. A site's worker token reads only the
//! global models of the runs its site takes part in and hands over only its own outputs of open
//! jobs; a result counts only with an output its own site handed over. A site's RabbitMQ user
//! consumes only its own job queue, publishes only results, and cannot pass a message off as
//! another site's — not even one signed with that site's stolen key.

use crate::engine::{
    approved_study, engine_manifest, register_key, run_to_end, site_broker, start_keyed_worker,
    worker_token,
};
use crate::federation::Vhost;
use crate::helpers::*;

use chrono::Utc;
use consilium_core::Role;
use consilium_core::protocol::{Heartbeat, JobResult, Outcome, WorkerMessage, WorkerState};
use consilium_core::signing;
use consilium_worker::broker::{site_queue_in, site_user};
use consilium_worker::synthetic::SiteProfile;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

fn profile(seed: u64) -> SiteProfile {
    crate::engine::plain_site(60, seed)
}

async fn events(app: &TestApp, w: &World, action: &str, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    for _ in 0..150 {
        got = app
            .get(
                &format!("/api/v1/audit/events?action={action}&limit=1000"),
                &w.auditor.auth,
            )
            .await
            .expect(200)
            .as_array()
            .expect("events")
            .clone();
        if got.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

/// A site worker's request for a model (or its SCAFFOLD correction) by its hash.
fn site_model(app: &TestApp, site: Uuid, hash: &str, token: &str) -> reqwest::RequestBuilder {
    app.client
        .get(format!("{}/api/v1/sites/{site}/models/{hash}", app.address))
        .bearer_auth(token)
}

async fn status(app: &TestApp, req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    assert!(
        status < 500,
        "server error {status}: {body} ({})",
        app.address
    );
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_reads_only_its_runs_models_and_counts_only_with_its_own_outputs() {
    let app = spawn_app_with(Db::Sqlite, |s| s.engine.round_timeout_seconds = 120).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let (_a, north) =
        start_keyed_worker(&app, w.site_a, &w.custodian_a, profile(1), dir.path()).await;
    let (_b, _) = start_keyed_worker(&app, w.site_b, &w.custodian_b, profile(2), dir.path()).await;
    let (sid, _) = approved_study(&app, &w, engine_manifest(1)).await;
    let (rid, done) = run_to_end(&app, &sid, &w.researcher.auth, 240).await;
    assert_eq!(done["status"], "completed", "{done}");
    let models = app
        .get(&format!("/api/v1/models?run_id={rid}"), &w.researcher.auth)
        .await
        .expect(200);
    let global = models[0]["hash"].as_str().expect("model hash").to_string();
    let lineage = app
        .get(
            &format!("/api/v1/models/{}/lineage", id_of(&models[0])),
            &w.researcher.auth,
        )
        .await
        .expect(200);
    let update_of = |site: Uuid| {
        lineage["signatures"]
            .as_array()
            .expect("signatures")
            .iter()
            .find(|s| s["site_id"] == json!(site.to_string()))
            .and_then(|s| s["update_hash"].as_str())
            .expect("the site's update")
            .to_string()
    };
    let south_update = update_of(w.site_b);

    // Site health: the researcher sees her study's sites, online, without what their workers
    // say of their data; North's custodian sees North with it; a committee member no site.
    let health = app
        .get("/api/v1/site-health", &w.researcher.auth)
        .await
        .expect(200);
    let health = health.as_array().expect("list");
    assert_eq!(health.len(), 2, "{health:?}");
    assert!(
        health
            .iter()
            .all(|h| (h["state"] == "online" || h["state"] == "training")
                && h["data_summary"].is_null()
                && h["version"].is_string()),
        "{health:?}"
    );
    let north_view = app
        .get("/api/v1/site-health", &w.custodian_a.auth)
        .await
        .expect(200);
    assert_eq!(north_view.as_array().map(Vec::len), Some(1), "{north_view}");
    assert_eq!(north_view[0]["site_id"], json!(w.site_a.to_string()));
    assert!(
        north_view[0]["data_summary"]
            .as_str()
            .is_some_and(|d| d.contains("images")),
        "{north_view}"
    );
    let none = app
        .get("/api/v1/site-health", &w.member.auth)
        .await
        .expect(200);
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");

    // North's worker token, and a third site's that takes no part in the study.
    let north_token = worker_token(&app, w.site_a, &w.custodian_a).await;
    let custodian_c = app.person("cleo@east.test", &[Role::Custodian]).await;
    let site_c: Uuid = app
        .post(
            "/api/v1/sites",
            &w.admin.auth,
            json!({"name": "East Clinic", "custodians": [custodian_c.id]}),
        )
        .await
        .expect(201)["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("site id");
    let east_token = worker_token(&app, site_c, &custodian_c).await;
    let get = |site: Uuid, hash: &str, token: &str| site_model(&app, site, hash, token);

    // North reads the model its run made, checked against its hash.
    let resp = get(w.site_a, &global, &north_token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.expect("bytes");
    assert_eq!(consilium_core::hash::sha256_hex(&bytes), global);
    // South's update, by every route North's credentials open: as North, as South, as a model
    // version; and the store itself is nowhere in a worker's configuration.
    let (code, body) = status(&app, get(w.site_a, &south_update, &north_token)).await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = status(&app, get(w.site_b, &south_update, &north_token)).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("worker token")),
        "{body}"
    );
    let (code, _) = status(&app, get(w.site_b, &global, &north_token)).await;
    assert_eq!(code, 403);
    let (code, _) = status(
        &app,
        app.client
            .get(format!(
                "{}/api/v1/models/{}/weights",
                app.address,
                id_of(&models[0])
            ))
            .bearer_auth(&north_token),
    )
    .await;
    assert!(code == 403 || code == 404, "{code}");
    // A site outside the run cannot read its model either; a malformed hash is a clear 400.
    let (code, _) = status(&app, get(site_c, &global, &east_token)).await;
    assert_eq!(code, 404);
    let (code, body) = status(&app, get(w.site_a, "../../etc/passwd", &north_token)).await;
    assert!(code == 400 || code == 404, "{code} {body}");

    // Outputs: only as its own site, only for a job still open.
    let put = |site: Uuid, job: Uuid, token: &str| {
        app.client
            .put(format!(
                "{}/api/v1/sites/{site}/jobs/{job}/output?run_id={rid}&round=1",
                app.address
            ))
            .bearer_auth(token)
            .body(b"weights".to_vec())
    };
    let (code, _) = status(&app, put(w.site_b, Uuid::new_v4(), &north_token)).await;
    assert_eq!(code, 403);
    let (code, body) = status(&app, put(w.site_a, Uuid::new_v4(), &north_token)).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["code"], "job_not_open", "{body}");

    // A result of North's, signed with North's key, naming South's update as its own: refused,
    // dead-lettered and audited for North.
    let forged = WorkerMessage::Result(JobResult {
        job_id: Uuid::new_v4(),
        run_id: rid.parse().expect("run id"),
        round: 1,
        site_id: w.site_a,
        kind: None,
        outcome: Outcome::Trained {
            update_hash: south_update.clone(),
            samples: 45,
            evaluation: Default::default(),
            train_loss_before: 0.7,
            train_loss_after: 0.3,
            duration_ms: 1,
            skipped: vec![],
            privacy: None,
        },
    });
    app.broker
        .publish_message(&signing::sign(&north, &forged).expect("signed"))
        .await
        .expect("published");
    let rejected = events(&app, &w, "message.rejected", 1).await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["object_id"], json!(w.site_a.to_string()));
    let reasons = app.broker.dead_letter_reasons().await.expect("reasons");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&south_update) && r.contains("handed over")),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sites_broker_user_reaches_only_its_own_queue_and_name() {
    let vhost = Vhost::new();
    let url = vhost.url();
    let app = spawn_app_with(Db::Postgres, |s| {
        s.engine.broker_url = Some(url.clone().into());
    })
    .await;
    let w = world(&app).await;
    let south_key = register_key(&app, w.site_b, &w.custodian_b).await;
    let made = consilium_backend::broker_users::provision(&app.ctx.settings, w.site_a, None)
        .await
        .expect("North's broker user");
    assert_eq!(made.user, site_user(w.site_a));
    let north_url = secrecy::ExposeSecret::expose_secret(&made.broker_url).to_string();
    assert!(
        !north_url.contains("guest"),
        "its own credentials: {north_url}"
    );
    // South's queue exists (the server declares a site's queue when it provisions it).
    consilium_backend::broker_users::provision(&app.ctx.settings, w.site_b, None)
        .await
        .expect("South's broker user");

    // North's credentials cannot consume South's jobs.
    let conn = Connection::connect(&north_url, ConnectionProperties::default())
        .await
        .expect("North connects");
    let channel = conn.create_channel().await.expect("channel");
    let err = channel
        .basic_consume(
            site_queue_in("consilium", w.site_b).as_str().into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("South's queue is refused to North");
    assert!(format!("{err:?}").contains("ACCESS_REFUSED"), "{err:?}");

    // Nor put a job on it (the default exchange is not North's to write to).
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let sent = async {
        channel
            .basic_publish(
                "".into(),
                site_queue_in("consilium", w.site_b).as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await?
            .await
    }
    .await;
    assert!(
        format!("{sent:?}").contains("ACCESS_REFUSED"),
        "publishing to South's queue: {sent:?}"
    );

    // Nor publish under South's broker user: RabbitMQ itself refuses the false user-id.
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let sent = async {
        channel
            .basic_publish(
                "consilium.results".into(),
                "consilium.results".into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default().with_user_id(site_user(w.site_b).as_str().into()),
            )
            .await?
            .await
    }
    .await;
    assert!(
        format!("{sent:?}").contains("PRECONDITION_FAILED"),
        "publishing as South's user: {sent:?}"
    );

    // And a heartbeat in South's name, signed with South's stolen key, sent with North's
    // credentials: the server refuses it, and files it under South for its custodian.
    let beat = |summary: &str| {
        WorkerMessage::Heartbeat(Heartbeat {
            site_id: w.site_b,
            state: WorkerState::Idle,
            data_summary: summary.into(),
            patients: None,
            version: "test".into(),
            at: Utc::now(),
        })
    };
    let north_broker = consilium_worker::broker::connect_site(&north_url)
        .await
        .expect("North's worker connection");
    north_broker
        .publish_message(&signing::sign(&south_key, &beat("forged")).expect("signed"))
        .await
        .expect("published");
    let rejected = events(&app, &w, "message.rejected", 1).await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["object_id"], json!(w.site_b.to_string()));
    let reasons = app.broker.dead_letter_reasons().await.expect("reasons");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&format!("by broker user {}", site_user(w.site_a)))),
        "{reasons:?}"
    );
    let heartbeat = app
        .get(
            &format!("/api/v1/sites/{}/heartbeat", w.site_b),
            &w.admin.auth,
        )
        .await;
    assert_ne!(
        heartbeat.body["data_summary"], "forged",
        "{}",
        heartbeat.text
    );

    // South's own worker, through its own user, is heard.
    site_broker(&app, w.site_b)
        .await
        .publish_message(&signing::sign(&south_key, &beat("genuine")).expect("signed"))
        .await
        .expect("published");
    let mut summary = Value::Null;
    for _ in 0..100 {
        summary = app
            .get(
                &format!("/api/v1/sites/{}/heartbeat", w.site_b),
                &w.admin.auth,
            )
            .await
            .body["data_summary"]
            .clone();
        if summary == "genuine" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(summary, "genuine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_gives_each_site_only_its_own_correction() {
    let app = spawn_app_with(Db::Sqlite, |s| s.engine.round_timeout_seconds = 120).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let (_a, _) = start_keyed_worker(&app, w.site_a, &w.custodian_a, profile(1), dir.path()).await;
    let (_b, _) = start_keyed_worker(&app, w.site_b, &w.custodian_b, profile(2), dir.path()).await;
    let mut manifest = engine_manifest(2);
    manifest["optimiser"] = json!({"name": "sgd", "learning_rate": 0.01, "momentum": 0.9});
    manifest["aggregation"] = json!({"strategy": "scaffold", "min_sites": 2});
    let (sid, _) = approved_study(&app, &w, manifest).await;
    let (rid, done) = run_to_end(&app, &sid, &w.researcher.auth, 240).await;
    assert_eq!(done["status"], "completed", "{done}");
    let models = app
        .get(&format!("/api/v1/models?run_id={rid}"), &w.researcher.auth)
        .await
        .expect(200);
    let round = |n: u64| {
        models
            .as_array()
            .expect("versions")
            .iter()
            .find(|m| m["round"] == json!(n))
            .unwrap_or_else(|| panic!("round {n}: {models}"))
            .clone()
    };
    let correction_of = |v: &Value, site: Uuid| {
        v["contributions"]
            .as_array()
            .expect("contributions")
            .iter()
            .find(|c| c["site_id"] == json!(site.to_string()))
            .map(|c| c["correction"].clone())
            .expect("the site's contribution")
    };
    // Round 1 starts with every control variate at zero: no correction is sent. In round 2
    // each site trains with its own, and the lineage names it.
    let first = round(1);
    assert_eq!(first["strategy"], "scaffold");
    assert!(correction_of(&first, w.site_a).is_null(), "{first}");
    let second = round(2);
    let north = correction_of(&second, w.site_a)
        .as_str()
        .expect("North's correction")
        .to_string();
    let south = correction_of(&second, w.site_b)
        .as_str()
        .expect("South's correction")
        .to_string();
    assert_ne!(north, south, "each site has its own control variate");

    let north_token = worker_token(&app, w.site_a, &w.custodian_a).await;
    let get = |site: Uuid, hash: &str, token: &str| site_model(&app, site, hash, token);
    let resp = get(w.site_a, &north, &north_token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.expect("bytes");
    assert_eq!(consilium_core::hash::sha256_hex(&bytes), north);
    // South's correction is South's mean gradient of the round: North's token does not read it.
    let (code, body) = status(&app, get(w.site_a, &south, &north_token)).await;
    assert_eq!(code, 404, "{body}");
    let (code, _) = status(&app, get(w.site_b, &south, &north_token)).await;
    assert_eq!(code, 403);
}
