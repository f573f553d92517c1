//! `consilium privacy cost`, the researcher's planning command: ε for a DP-SGD schedule by both
//! conversions, the noise multiplier for a target ε, and clear refusals.

use serde_json::Value;
use std::process::Command;

fn consilium(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_consilium"))
        .args(args)
        .env_remove("CONSILIUM_CONFIG")
        .output()
        .expect("consilium runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_privacy_planner_reports_both_conversions_and_finds_the_noise() {
    // MNIST with TensorFlow Privacy's figures: 60,000 examples, batch 256, σ = 1.1, 60 epochs.
    let q = (256.0f64 / 60_000.0).to_string();
    let (code, out, err) = consilium(&[
        "privacy",
        "cost",
        "--sampling-rate",
        &q,
        "--noise-multiplier",
        "1.1",
        "--steps",
        "14063",
        "--delta",
        "1e-5",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    let classic = v["epsilon_classic"].as_f64().expect("classic");
    assert_eq!((classic * 100.0).round() / 100.0, 3.01, "{v}");
    let tight = v["epsilon"].as_f64().expect("epsilon");
    assert!(tight < classic, "{v}");

    // The σ for ε = 2 over the same schedule, and that σ costs at most ε = 2.
    let (code, out, err) = consilium(&[
        "privacy",
        "cost",
        "--sampling-rate",
        &q,
        "--epsilon",
        "2",
        "--steps",
        "14063",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    let sigma = v["noise_multiplier"].as_f64().expect("sigma");
    assert!(sigma > 1.1, "more noise for a smaller ε: {v}");
    let spent = v["epsilon"].as_f64().expect("epsilon");
    assert!(spent <= 2.0 && spent > 1.98, "{v}");

    // Text for people.
    let (code, out, _) = consilium(&[
        "privacy",
        "cost",
        "--sampling-rate",
        "0.01",
        "--noise-multiplier",
        "1.0",
        "--steps",
        "1000",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("what Consilium enforces") && out.contains("classic"),
        "{out}"
    );

    // Nonsense is refused with what was wrong.
    let (code, _, err) = consilium(&[
        "privacy",
        "cost",
        "--sampling-rate",
        "2",
        "--noise-multiplier",
        "1",
        "--steps",
        "10",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("sampling rate must lie in [0, 1]"), "{err}");
    let (code, _, err) = consilium(&["privacy", "cost", "--sampling-rate", "0.1", "--steps", "10"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--noise-multiplier") || err.contains("--epsilon"),
        "{err}"
    );
}

/// A DP-SGD run: every site reports what each round cost its patients, the server checks it and
/// keeps it with the round and in every model version's lineage, and no site's run spends
/// more than the approved ε.
async fn a_private_run_reports_and_bounds_what_each_site_spent(db: crate::helpers::Db) {
    use crate::engine::{approved_study, engine_manifest, start_worker, wait_for_run};
    use crate::helpers::*;
    use consilium_worker::synthetic::SiteProfile;
    let app = spawn_app_with(db, |s| s.engine.round_timeout_seconds = 120).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let p = |seed| SiteProfile {
        images: 120,
        lesion_fraction: 0.5,
        gain: 1.0,
        offset: 0.0,
        noise: 0.03,
        blur: 0,
        seed,
    };
    let _a = start_worker(&app, w.site_a, &w.custodian_a, p(1), dir.path()).await;
    let _b = start_worker(&app, w.site_b, &w.custodian_b, p(2), dir.path()).await;
    let mut m = engine_manifest(3);
    m["local_epochs"] = 1.into();
    m["privacy"] =
        serde_json::json!({"dp_sgd": {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0}});
    let (sid, _) = approved_study(&app, &w, m).await;
    let run = app
        .post(
            &format!("/api/v1/studies/{sid}/runs"),
            &w.researcher.auth,
            serde_json::json!({}),
        )
        .await
        .expect(201);
    let rid = id_of(&run);
    let done = wait_for_run(&app, &rid, &w.researcher.auth, 240).await;
    assert_eq!(done["status"], "completed", "{done}");
    let rounds = app
        .get(&format!("/api/v1/runs/{rid}/rounds"), &w.researcher.auth)
        .await
        .expect(200);
    let mut last: std::collections::HashMap<String, f64> = Default::default();
    for round in rounds.as_array().expect("rounds") {
        for s in round["sites"].as_array().expect("sites") {
            assert_eq!(s["status"], "trained", "{round}");
            let p = &s["privacy"];
            let run_eps = p["epsilon_run"].as_f64().expect("ε of the run");
            assert!(run_eps <= 4.0 + 1e-9, "{p}");
            assert_eq!(p["delta"], 1e-5);
            assert!(p["noise_multiplier"].as_f64().expect("σ") > 0.0);
            let site = s["site_id"].as_str().expect("site").to_string();
            if let Some(prev) = last.insert(site, run_eps) {
                assert!(run_eps > prev, "the run's ε grows round by round: {p}");
            }
        }
    }
    // The plan's three rounds spend (nearly) all of the budget at each site, and no more.
    assert!(
        last.values().all(|e| *e > 3.8 && *e <= 4.0 + 1e-9),
        "{last:?}"
    );
    let models = app
        .get(&format!("/api/v1/models?run_id={rid}"), &w.researcher.auth)
        .await
        .expect(200);
    let newest = models.as_array().and_then(|m| m.last()).expect("a model");
    let lineage = app
        .get(
            &format!("/api/v1/models/{}/lineage", id_of(newest)),
            &w.auditor.auth,
        )
        .await
        .expect(200);
    for c in lineage["model"]["contributions"]
        .as_array()
        .expect("contributions")
    {
        let eps = c["privacy"]["epsilon_run"]
            .as_f64()
            .expect("ε in the lineage");
        assert_eq!(Some(&eps), last.get(c["site_id"].as_str().expect("site")));
    }
}
crate::on_both!(a_private_run_reports_and_bounds_what_each_site_spent);

/// A compromised worker trains as told but claims a tenth of what it spent, to let its run
/// go on past the budget: the server recomputes the cost from the reported sampling rate, σ
/// and steps, does not count the update, says why on the round and audits a privacy alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_understates_its_privacy_cost_is_not_counted() {
    use crate::engine::{approved_study, engine_manifest, keyed_site, wait_for_run};
    use crate::helpers::*;
    use consilium_core::protocol::{Outcome, WorkerMessage};
    use consilium_core::signing;
    use consilium_worker::synthetic::SiteProfile;
    let app = spawn_app_with(Db::Sqlite, |s| s.engine.round_timeout_seconds = 30).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let profile = SiteProfile {
        images: 120,
        lesion_fraction: 0.5,
        gain: 1.0,
        offset: 0.0,
        noise: 0.03,
        blur: 0,
        seed: 4,
    };
    let (ctx, broker, key) = keyed_site(&app, w.site_b, &w.custodian_b, profile, dir.path()).await;
    let server_key = ctx.server_key;
    let liar = tokio::spawn(async move {
        let mut jobs = broker.jobs(ctx.site_id).await.expect("the site's queue");
        while let Some(d) = jobs.recv().await {
            let signed: signing::SignedMessage =
                serde_json::from_slice(&d.payload).expect("a signed job");
            let job = signing::verify_job(&server_key, &signed).expect("the server's job");
            let mut result = consilium_worker::job::process(&job, &ctx).await;
            if let Outcome::Trained {
                privacy: Some(p), ..
            } = &mut result.outcome
            {
                p.rdp.rdp.iter_mut().for_each(|v| *v /= 10.0);
                p.epsilon_round /= 10.0;
                p.epsilon_run /= 10.0;
            }
            let lie = signing::sign(&key, &WorkerMessage::Result(result)).expect("signed");
            broker.publish_message(&lie).await.expect("published");
            d.ack().await;
        }
    });
    let mut m = engine_manifest(2);
    m["local_epochs"] = 1.into();
    m["aggregation"]["min_sites"] = 1.into();
    m["privacy"] =
        serde_json::json!({"dp_sgd": {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0}});
    let (sid, _) = approved_study(&app, &w, m).await;
    let run = app
        .post(
            &format!("/api/v1/studies/{sid}/runs"),
            &w.researcher.auth,
            serde_json::json!({}),
        )
        .await
        .expect(201);
    let rid = id_of(&run);
    let done = wait_for_run(&app, &rid, &w.researcher.auth, 120).await;
    assert_eq!(done["status"], "failed", "{done}");
    let rounds = app
        .get(&format!("/api/v1/runs/{rid}/rounds"), &w.researcher.auth)
        .await
        .expect(200);
    let south = rounds[0]["sites"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|x| x["site_id"] == serde_json::json!(w.site_b))
        })
        .cloned()
        .expect("South in round 1");
    assert_eq!(south["status"], "failed", "{south}");
    assert!(
        south["reason"].as_str().is_some_and(|r| r.starts_with(
            "not counted: the reported privacy cost does not follow from its sampling rate"
        )),
        "{south}"
    );
    let alarms = app
        .get(
            "/api/v1/audit/events?action=privacy.alarm&limit=1000",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let alarms = alarms.as_array().expect("events");
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    // Audit events keep digests of their details; the reason is on the round (above).
    assert_eq!(alarms[0]["object_type"], "update");
    assert!(
        alarms[0]["actor"]
            .as_str()
            .is_some_and(|a| a.contains("South Hospital"))
    );
    liar.abort();
}
