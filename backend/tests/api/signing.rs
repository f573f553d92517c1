//! Site identity: only a site's registered key speaks for it. Keys are managed by the site's
//! custodian (audited); messages that do not prove their site — unsigned, signed with an
//! unregistered or revoked key, claiming another site, replayed — are refused, dead-lettered and
//! audited, never recorded; every contribution to a model carries its site's signature, which
//! `consilium verify-lineage` checks offline.

use crate::engine::{
    approved_study, engine_manifest, plain_site, register_key, run_to_end, start_keyed_worker,
};
use crate::helpers::*;
use crate::on_both;

use chrono::Utc;
use consilium_core::protocol::{Heartbeat, JobResult, Outcome, WorkerMessage, WorkerState};
use consilium_core::signing::{self, SigningKey, encode_public_key};
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;
use uuid::Uuid;

fn heartbeat(site: Uuid, summary: &str, at: chrono::DateTime<Utc>) -> WorkerMessage {
    WorkerMessage::Heartbeat(Heartbeat {
        site_id: site,
        state: WorkerState::Idle,
        data_summary: summary.into(),
        patients: None,
        version: "test".into(),
        at,
    })
}

/// The audit events of `action` (as the auditor reads them).
async fn events(app: &TestApp, w: &World, action: &str) -> Vec<Value> {
    app.get(
        &format!("/api/v1/audit/events?action={action}&limit=1000"),
        &w.auditor.auth,
    )
    .await
    .expect(200)
    .as_array()
    .expect("events")
    .clone()
}

/// Waits until `action` has been audited `n` times.
async fn audited(app: &TestApp, w: &World, action: &str, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let e = events(app, w, action).await;
        if e.len() >= n {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{action} was not audited {n} times");
}

async fn signing_keys_are_managed_by_the_sites_custodian(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let public = encode_public_key(&key.verifying_key());
    let path = format!("/api/v1/sites/{}/keys", w.site_a);
    let body = json!({"public_key": public, "name": "imaging gateway"});
    // Not the other site's custodian, not a researcher, not a token (even the custodian's own).
    for who in [&w.custodian_b.auth, &w.researcher.auth, &w.custodian_a.auth] {
        let r = app.post(&path, who, body.clone()).await.expect(403);
        assert!(
            r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("Only a custodian of")),
            "{r}"
        );
    }
    let session = Auth::Cookie(app.sign_in(&w.custodian_a.email).await);
    let bad = app
        .post(
            &path,
            &session,
            json!({"public_key": "c2hvcnQ=", "name": "x"}),
        )
        .await
        .expect(422);
    assert!(
        bad["detail"]
            .as_str()
            .is_some_and(|d| d.contains("public_key: the public key is not valid: 5 bytes")),
        "{bad}"
    );
    let registered = app.post(&path, &session, body.clone()).await.expect(201);
    let key_id = registered["key_id"].as_str().expect("key id").to_string();
    assert_eq!(key_id, signing::key_id(&key.verifying_key()));
    // The same key again, here or for another site: refused.
    app.post(&path, &session, body.clone()).await.expect(409);
    let admin = Auth::Cookie(app.sign_in(&w.admin.email).await);
    let elsewhere = app
        .post(&format!("/api/v1/sites/{}/keys", w.site_b), &admin, body)
        .await
        .expect(409);
    assert!(
        elsewhere["detail"]
            .as_str()
            .is_some_and(|d| d.contains("registered for another site")),
        "{elsewhere}"
    );
    // The site's custodian and the auditor see the keys; the other site's custodian does not.
    let listed = app.get(&path, &w.custodian_a.auth).await.expect(200);
    assert_eq!(listed[0]["key_id"], json!(key_id));
    app.get(&path, &w.auditor.auth).await.expect(200);
    app.get(&path, &w.custodian_b.auth).await.expect(403);
    // Revoked (rotation: the new key first, then the old one revoked), once.
    let revoke = format!("{path}/{key_id}/revoke");
    app.post(&revoke, &w.custodian_a.auth, json!({}))
        .await
        .expect(403);
    let revoked = app.post(&revoke, &session, json!({})).await.expect(200);
    assert!(revoked["revoked_at"].is_string());
    app.post(&revoke, &session, json!({})).await.expect(409);
    let registered = audited(&app, &w, "site_key.registered", 1).await;
    assert_eq!(registered[0]["object_id"], json!(w.site_a.to_string()));
    audited(&app, &w, "site_key.revoked", 1).await;
}
on_both!(signing_keys_are_managed_by_the_sites_custodian);

async fn messages_that_do_not_prove_their_site_are_refused(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let north = register_key(&app, w.site_a, &w.custodian_a).await;
    let stranger = SigningKey::generate(&mut rand::rngs::OsRng);
    let now = Utc::now();
    let publish = |m: &signing::SignedMessage| {
        let broker = app.broker.clone();
        let m = m.clone();
        async move { broker.publish_message(&m).await.expect("published") }
    };
    // A good one: recorded.
    publish(&signing::sign(&north, &heartbeat(w.site_a, "genuine", now)).expect("signed")).await;
    let path = format!("/api/v1/sites/{}/heartbeat", w.site_a);
    let mut seen = Value::Null;
    for _ in 0..100 {
        let r = app.get(&path, &w.custodian_a.auth).await;
        if r.status == 200 {
            seen = r.body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen["data_summary"], "genuine");

    // Unsigned; signed with a key nobody registered; North's key speaking for South; a
    // changed message under North's signature; an older heartbeat replayed.
    app.broker
        .publish_raw_result(
            &serde_json::to_vec(&heartbeat(w.site_a, "unsigned", now)).expect("json"),
        )
        .await
        .expect("published");
    publish(&signing::sign(&stranger, &heartbeat(w.site_a, "stranger", now)).expect("signed"))
        .await;
    publish(&signing::sign(&north, &heartbeat(w.site_b, "impostor", now)).expect("signed")).await;
    let mut altered = signing::sign(&north, &heartbeat(w.site_a, "original", now)).expect("signed");
    altered.message = altered.message.replace("original", "altered!");
    publish(&altered).await;
    let old = now - chrono::Duration::minutes(10);
    publish(&signing::sign(&north, &heartbeat(w.site_a, "replayed", old)).expect("signed")).await;
    let rejected = audited(&app, &w, "message.rejected", 5).await;
    let reasons = app
        .broker
        .dead_letter_reasons()
        .await
        .expect("dead letters");
    for expected in [
        "it is not signed",
        "which is not one of that site's registered keys in force",
        "the signature does not verify",
        "a replayed heartbeat",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected}: {reasons:?}"
        );
    }
    // Each is filed under the site it claimed: the impostor under South, for its custodian.
    let filed: Vec<&Value> = rejected.iter().map(|e| &e["object_id"]).collect();
    assert_eq!(
        filed
            .iter()
            .filter(|o| **o == &json!(w.site_b.to_string()))
            .count(),
        1,
        "{rejected:?}"
    );
    assert_eq!(
        filed
            .iter()
            .filter(|o| **o == &json!(w.site_a.to_string()))
            .count(),
        4,
        "{rejected:?}"
    );
    // None of them was recorded.
    let now_seen = app.get(&path, &w.custodian_a.auth).await.expect(200);
    assert_eq!(now_seen["data_summary"], "genuine");
    app.get(
        &format!("/api/v1/sites/{}/heartbeat", w.site_b),
        &w.custodian_b.auth,
    )
    .await
    .expect(404);

    // A revoked key speaks for nobody.
    let session = Auth::Cookie(app.sign_in(&w.custodian_a.email).await);
    app.post(
        &format!(
            "/api/v1/sites/{}/keys/{}/revoke",
            w.site_a,
            signing::key_id(&north.verifying_key())
        ),
        &session,
        json!({}),
    )
    .await
    .expect(200);
    publish(
        &signing::sign(&north, &heartbeat(w.site_a, "after revocation", Utc::now()))
            .expect("signed"),
    )
    .await;
    audited(&app, &w, "message.rejected", 6).await;
    let still = app.get(&path, &w.custodian_a.auth).await.expect(200);
    assert_eq!(still["data_summary"], "genuine");
}
on_both!(messages_that_do_not_prove_their_site_are_refused);

/// A run with signed updates: a second, different result for an answered job is refused; the
/// lineage carries each contribution's signature; `consilium verify-lineage` checks them
/// offline, and fails on a tampered lineage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_contribution_is_signed_and_verifiable_offline() {
    let app = spawn_app_with(Db::Sqlite, |s| s.engine.round_timeout_seconds = 120).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let p = |seed| plain_site(60, seed);
    let (_a, north) = start_keyed_worker(&app, w.site_a, &w.custodian_a, p(1), dir.path()).await;
    let (_b, _) = start_keyed_worker(&app, w.site_b, &w.custodian_b, p(2), dir.path()).await;
    let (sid, _) = approved_study(&app, &w, engine_manifest(1)).await;
    let (rid, done) = run_to_end(&app, &sid, &w.researcher.auth, 240).await;
    assert_eq!(done["status"], "completed", "{done}");
    let models = app
        .get(&format!("/api/v1/models?run_id={rid}"), &w.researcher.auth)
        .await
        .expect(200);
    let model = id_of(&models[0]);
    let lineage = app
        .get(
            &format!("/api/v1/models/{model}/lineage"),
            &w.researcher.auth,
        )
        .await
        .expect(200);
    let signatures = lineage["signatures"].as_array().expect("signatures");
    assert_eq!(signatures.len(), 2, "{lineage}");
    assert!(signatures.iter().all(|s| s["signature"].is_string()
        && s["public_key"].is_string()
        && s["message"].is_string()));

    // North's own key, its own job, different numbers (as when a redelivered job runs again):
    // the first answer counts; the second changes nothing.
    let north_update = signatures
        .iter()
        .find(|s| s["site_id"] == json!(w.site_a.to_string()))
        .expect("north's update");
    let mut result: WorkerMessage =
        serde_json::from_str(north_update["message"].as_str().expect("message")).expect("message");
    if let WorkerMessage::Result(JobResult {
        outcome: Outcome::Trained { samples, .. },
        ..
    }) = &mut result
    {
        *samples *= 10;
    }
    app.broker
        .publish_message(&signing::sign(&north, &result).expect("signed"))
        .await
        .expect("published");
    // An old heartbeat of North's, replayed: refused.
    let stale = heartbeat(w.site_a, "stale", Utc::now() - chrono::Duration::hours(1));
    app.broker
        .publish_message(&signing::sign(&north, &stale).expect("signed"))
        .await
        .expect("published");
    let rejected = audited(&app, &w, "message.rejected", 1).await;
    assert_eq!(rejected.len(), 1, "only the heartbeat: {rejected:?}");
    assert_eq!(rejected[0]["object_id"], json!(w.site_a.to_string()));
    let rounds = app
        .get(&format!("/api/v1/runs/{rid}/rounds"), &w.researcher.auth)
        .await
        .expect(200);
    let again = app
        .get(
            &format!("/api/v1/models/{model}/lineage"),
            &w.researcher.auth,
        )
        .await
        .expect(200);
    assert_eq!(again["signatures"], lineage["signatures"], "{rounds}");

    // Offline: the lineage file and nothing else.
    let file = dir.path().join("lineage.json");
    std::fs::write(&file, lineage.to_string()).expect("write");
    let verify = |path: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_consilium"))
            .arg("verify-lineage")
            .arg(path)
            .env_remove("CONSILIUM_CONFIG")
            .output()
            .expect("verify-lineage runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = verify(&file);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("Every contribution is signed by its site."),
        "{out}"
    );
    assert_eq!(out.matches(", verified").count(), 2, "{out}");
    // A lineage that credits North with another update, or gives another key: it fails.
    let mut tampered = lineage.clone();
    let hash = tampered["model"]["contributions"][0]["update_hash"]
        .as_str()
        .expect("hash")
        .to_string();
    let forged_hash = format!("{}{}", "0".repeat(8), &hash[8..]);
    tampered["model"]["contributions"][0]["update_hash"] = json!(forged_hash);
    for s in tampered["signatures"].as_array_mut().expect("signatures") {
        if s["update_hash"] == json!(hash) {
            s["update_hash"] = json!(forged_hash);
        }
    }
    tampered["signatures"][1]["public_key"] = json!(encode_public_key(
        &SigningKey::generate(&mut rand::rngs::OsRng).verifying_key()
    ));
    std::fs::write(&file, tampered.to_string()).expect("write");
    let (code, out) = verify(&file);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.matches("  FAIL ").count(), 2, "{out}");
    assert!(
        out.contains("the signed message is not this site's result with this update"),
        "{out}"
    );
    assert!(out.contains("not the signing key"), "{out}");

    // The audit export carries every signed update with its public key: checked offline too,
    // and one altered line fails.
    let export = app
        .get("/api/v1/audit/export?format=signatures", &w.auditor.auth)
        .await;
    assert_eq!(export.status, 200, "{}", export.text);
    let export = export.text;
    assert_eq!(export.lines().count(), 2, "{export}");
    let exported = dir.path().join("signatures.jsonl");
    std::fs::write(&exported, &export).expect("write");
    let (code, out) = verify(&exported);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Every update is signed by its site."), "{out}");
    let altered = export.replacen("\\\"samples\\\":", "\\\"samples\\\":1", 1);
    assert_ne!(
        altered, export,
        "the export carries the signed messages: {export}"
    );
    std::fs::write(&exported, &altered).expect("write");
    let (code, out) = verify(&exported);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.matches("  FAIL ").count(), 1, "{out}");
}
