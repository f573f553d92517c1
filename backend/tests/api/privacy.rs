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
    use crate::engine::{approved_study, engine_manifest, run_to_end, start_worker};
    use crate::helpers::*;
    let app = spawn_app_with(db, |s| s.engine.round_timeout_seconds = 120).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let _a = start_worker(&app, w.site_a, &w.custodian_a, site_profile(1), dir.path()).await;
    let _b = start_worker(&app, w.site_b, &w.custodian_b, site_profile(2), dir.path()).await;
    let mut m = engine_manifest(3);
    m["local_epochs"] = 1.into();
    m["privacy"] =
        serde_json::json!({"dp_sgd": {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0}});
    let (sid, _) = approved_study(&app, &w, m).await;
    let (rid, done) = run_to_end(&app, &sid, &w.researcher.auth, 240).await;
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
    use crate::engine::{approved_study, engine_manifest, keyed_site, run_to_end};
    use crate::helpers::*;
    use consilium_core::protocol::{Outcome, WorkerMessage};
    use consilium_core::signing;
    let app = spawn_app_with(Db::Sqlite, |s| s.engine.round_timeout_seconds = 30).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let profile = site_profile(4);
    let (ctx, broker, key) = keyed_site(&app, w.site_b, &w.custodian_b, profile, dir.path()).await;
    let server_key = ctx.server_key;
    // It says how many patients it trains on, as an honest worker does, so that the server
    // reserves its rounds.
    let data = ctx.data(64).await.expect("the site's data");
    let beat = WorkerMessage::Heartbeat(consilium_core::protocol::Heartbeat {
        site_id: ctx.site_id,
        state: consilium_core::protocol::WorkerState::Idle,
        data_summary: "ready".into(),
        patients: Some(data.train_patients()),
        version: "test".into(),
        at: chrono::Utc::now(),
    });
    broker
        .publish_message(&signing::sign(&key, &beat).expect("signed"))
        .await
        .expect("heartbeat sent");
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
    let (rid, done) = run_to_end(&app, &sid, &w.researcher.auth, 120).await;
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

/// The private round's cost at a site of `patients` training patients under `manifest`'s plan,
/// worked out as the server and the site do (`Plan::dp_round`).
fn round_cost(manifest: &Value, patients: u64) -> consilium_core::privacy::RdpCost {
    let m: consilium_core::manifest::TrainingPlanManifest =
        serde_json::from_value(manifest.clone()).expect("a manifest");
    let plan = m.parse().expect("a plan");
    let dp = plan.dp_sgd.expect("DP-SGD");
    plan.dp_round(&dp, patients).expect("a round's cost").rdp
}

fn times(c: &consilium_core::privacy::RdpCost, n: usize) -> consilium_core::privacy::RdpCost {
    (1..n).fold(c.clone(), |sum, _| sum.plus(c).expect("same orders"))
}

async fn patients_of(
    app: &crate::helpers::TestApp,
    site: uuid::Uuid,
    auth: &crate::helpers::Auth,
) -> u64 {
    for _ in 0..300 {
        let beat = app
            .get(&format!("/api/v1/sites/{site}/heartbeat"), auth)
            .await;
        if let Some(n) = beat.body["patients"].as_u64() {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("site {site}'s worker never said how many patients it has");
}

/// The custodian's cap, and the site's own: North's custodian sets a lifetime budget that
/// affords two of the plan's three rounds; South's worker keeps its own ledger with a budget
/// for one. Round 2 goes to North only after the server reserved it; South refuses round 2 by
/// itself (the server asked) and nothing is spent; round 3 is not sent to North at all, and
/// South refuses it too, so the run ends there. The ledgers show each round, spent or released.
async fn budgets_leave_out_the_rounds_that_would_exceed_them(db: crate::helpers::Db) {
    use crate::engine::{
        approved_study, engine_manifest, run_to_end, start_configured_worker, start_worker,
    };
    use crate::helpers::*;
    let app = spawn_app_with(db, |s| s.engine.round_timeout_seconds = 120).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut m = engine_manifest(3);
    m["local_epochs"] = 1.into();
    m["aggregation"]["min_sites"] = 1.into();
    m["privacy"] =
        serde_json::json!({"dp_sgd": {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0}});
    let _north = start_worker(&app, w.site_a, &w.custodian_a, site_profile(1), dir.path()).await;
    let north_patients = patients_of(&app, w.site_a, &w.custodian_a.auth).await;
    let one = round_cost(&m, north_patients);
    let two = times(&one, 2).epsilon(1e-5).expect("ε").epsilon;
    let three = times(&one, 3).epsilon(1e-5).expect("ε").epsilon;
    let north_budget = (two + three) / 2.0;

    // South's IT gave its worker a budget for one round (the worker's own configuration):
    // halfway between one round's cost and two's (South has about as many patients as North,
    // and the halfway mark leaves room either way).
    let south_data = site_profile(2);
    let south_worker_budget = (one.epsilon(1e-5).expect("ε").epsilon + two) / 2.0;
    let (_south, _) = start_configured_worker(
        &app,
        w.site_b,
        &w.custodian_b,
        south_data,
        dir.path(),
        |c| {
            c.with_ledger(consilium_worker::ledger::Ledger::in_memory(Some(
                consilium_worker::ledger::Budget {
                    epsilon: south_worker_budget,
                    delta: 1e-5,
                },
            )))
        },
    )
    .await;

    // The custodian sets North's budget, signed in; nonsense and other people are refused.
    let custodian = Auth::Cookie(app.sign_in(&w.custodian_a.email).await);
    let path = format!("/api/v1/sites/{}/privacy/budget", w.site_a);
    let bad = app
        .call(
            reqwest::Method::PUT,
            &path,
            &custodian,
            Some(serde_json::json!({"epsilon": -1, "delta": 0.5})),
        )
        .await
        .expect(422);
    let detail = bad["detail"].as_str().expect("detail");
    assert!(detail.contains("epsilon must be a number above 0"), "{bad}");
    assert!(
        detail.contains("delta must be above 0 and at most 0.001"),
        "{bad}"
    );
    let researcher = Auth::Cookie(app.sign_in(&w.researcher.email).await);
    app.call(
        reqwest::Method::PUT,
        &path,
        &researcher,
        Some(serde_json::json!({"epsilon": 50, "delta": 1e-5})),
    )
    .await
    .expect(403);
    let set = app
        .call(
            reqwest::Method::PUT,
            &path,
            &custodian,
            Some(serde_json::json!({"epsilon": north_budget, "delta": 1e-5})),
        )
        .await
        .expect(200);
    assert_eq!(
        set["budget"]["epsilon"].as_f64(),
        Some(north_budget),
        "{set}"
    );
    assert_eq!(
        set["remaining_epsilon"].as_f64(),
        Some(north_budget),
        "{set}"
    );

    let (sid, _) = approved_study(&app, &w, m).await;
    let (rid, done) = run_to_end(&app, &sid, &w.researcher.auth, 300).await;
    assert_eq!(done["status"], "failed", "{done}");
    let rounds = app
        .get(&format!("/api/v1/runs/{rid}/rounds"), &w.researcher.auth)
        .await
        .expect(200);
    let rounds = rounds.as_array().expect("rounds");
    assert_eq!(rounds.len(), 3, "{rounds:?}");
    let part = |round: &Value, site: uuid::Uuid| -> Option<Value> {
        round["sites"]
            .as_array()
            .and_then(|s| s.iter().find(|x| x["site_id"] == serde_json::json!(site)))
            .cloned()
    };
    assert_eq!(
        part(&rounds[0], w.site_a).expect("North")["status"],
        "trained"
    );
    assert_eq!(
        part(&rounds[0], w.site_b).expect("South")["status"],
        "trained"
    );
    assert_eq!(
        part(&rounds[1], w.site_a).expect("North")["status"],
        "trained"
    );
    for r in &rounds[1..] {
        let south = part(r, w.site_b).expect("South was asked");
        assert_eq!(south["status"], "refused", "{south}");
        assert!(
            south["reason"]
                .as_str()
                .is_some_and(|r| r.contains("above the site's budget")),
            "{south}"
        );
    }
    // Round 3 never went to North: left out, with the reason in words.
    let left_out = part(&rounds[2], w.site_a).expect("North in round 3");
    assert_eq!(left_out["status"], "excluded", "{left_out}");
    assert!(
        left_out["reason"].as_str().is_some_and(
            |r| r.contains("lifetime budget") && r.contains("round 3 would bring it to")
        ),
        "{left_out}"
    );
    assert!(
        rounds[2]["failure"]
            .as_str()
            .is_some_and(|f| f.contains("0 of 1 sites")),
        "{}",
        rounds[2]
    );

    // North's ledger: two rounds spent, within the budget; the custodian and auditors see it,
    // the researcher does not.
    let north = app
        .get(&format!("/api/v1/sites/{}/privacy", w.site_a), &custodian)
        .await
        .expect(200);
    let spent = north["spent_epsilon"].as_f64().expect("spent");
    assert!(
        (spent - two).abs() < 1e-6 && spent <= north_budget,
        "{north}"
    );
    let remaining = north["remaining_epsilon"].as_f64().expect("remaining");
    assert!((remaining - (north_budget - two)).abs() < 1e-6, "{north}");
    assert_eq!(north["studies"][0]["study_id"], serde_json::json!(sid));
    assert_eq!(north["studies"][0]["rounds_committed"], 2, "{north}");
    let states: Vec<&str> = north["spends"]
        .as_array()
        .expect("spends")
        .iter()
        .map(|x| x["state"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(states, ["committed", "committed"], "{north}");
    app.get(
        &format!("/api/v1/sites/{}/privacy", w.site_a),
        &w.auditor.auth,
    )
    .await
    .expect(200);
    app.get(
        &format!("/api/v1/sites/{}/privacy", w.site_a),
        &w.researcher.auth,
    )
    .await
    .expect(403);
    // South's: round 1 spent, rounds 2 and 3 released (its worker refused before training);
    // no budget set on the server.
    let south = app
        .get(
            &format!("/api/v1/sites/{}/privacy", w.site_b),
            &w.custodian_b.auth,
        )
        .await
        .expect(200);
    assert!(
        south["budget"].is_null() && south["remaining_epsilon"].is_null(),
        "{south}"
    );
    let states: Vec<&str> = south["spends"]
        .as_array()
        .expect("spends")
        .iter()
        .map(|x| x["state"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(states, ["committed", "released", "released"], "{south}");
    assert!(
        south["spends"][1]["note"]
            .as_str()
            .is_some_and(|n| n.contains("refused the job before training")),
        "{south}"
    );
}
crate::on_both!(budgets_leave_out_the_rounds_that_would_exceed_them);

/// Two servers on one PostgreSQL database (a deployment with replicas) open private rounds of
/// different runs on one dataset at the same moment; its budget affords three. Exactly three
/// are reserved and every other is refused with the reason: no two read the same remainder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_cannot_overspend_one_dataset_together() {
    use crate::engine::engine_manifest;
    use crate::helpers::*;
    use consilium_backend::services::privacy::{Reservation, reserve};
    let app = spawn_app_with(Db::Postgres, |_| {}).await;
    let w = world(&app).await;
    let mut settings = (*app.ctx.settings).clone();
    settings.server.port = 0;
    let second = consilium_backend::startup::Application::build(settings)
        .await
        .expect("a second server on the same database");
    let other = second.context.clone();
    tokio::spawn(second.run_until_stopped());

    let mut m = engine_manifest(3);
    m["privacy"] =
        serde_json::json!({"dp_sgd": {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0}});
    let one = round_cost(&m, 200);
    let budget = (times(&one, 3).epsilon(1e-5).expect("ε").epsilon
        + times(&one, 4).epsilon(1e-5).expect("ε").epsilon)
        / 2.0;
    let custodian = Auth::Cookie(app.sign_in(&w.custodian_a.email).await);
    app.call(
        reqwest::Method::PUT,
        &format!("/api/v1/sites/{}/privacy/budget", w.site_a),
        &custodian,
        Some(serde_json::json!({"epsilon": budget, "delta": 1e-5})),
    )
    .await
    .expect(200);

    let manifest: consilium_core::manifest::TrainingPlanManifest =
        serde_json::from_value(m).expect("manifest");
    let plan = std::sync::Arc::new(manifest.parse().expect("plan"));
    let site = w.site_a;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let ctx = if i % 2 == 0 {
            app.ctx.clone()
        } else {
            other.clone()
        };
        let plan = plan.clone();
        tasks.push(tokio::spawn(async move {
            let dp = plan.dp_sgd.expect("DP-SGD");
            let w = ctx.begin_write().await.expect("a write");
            let got = reserve(
                &*w,
                Reservation {
                    spender: consilium_backend::services::privacy::Spender::Round(&plan, &dp),
                    study_id: uuid::Uuid::new_v4(),
                    run_id: uuid::Uuid::new_v4(),
                    round: 1,
                    site_id: site,
                    site_name: "North",
                    patients: Some(200),
                },
            )
            .await
            .expect("the ledger answers");
            // Hold the transaction a moment, as a server busy sending jobs would: a second
            // reader of the same remainder would get in here.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            w.commit().await.expect("commit");
            got
        }));
    }
    let mut granted = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => granted += 1,
            Err(why) => assert!(why.contains("lifetime budget"), "{why}"),
        }
    }
    assert_eq!(granted, 3);
    let ledger = app
        .get(&format!("/api/v1/sites/{}/privacy", w.site_a), &custodian)
        .await
        .expect(200);
    let held = ledger["spent_or_reserved_epsilon"].as_f64().expect("held");
    assert!(held <= budget, "{ledger}");
    assert_eq!(
        ledger["spends"].as_array().map(Vec::len),
        Some(3),
        "{ledger}"
    );
}

/// A private preview spends from the dataset's ledger like a round: a study whose plan trains
/// with DP-SGD gets only private previews, the generator's cost is reserved before the job goes
/// out and committed when the set arrives, the set says the ε the server's ledger reckons, and
/// a preview that would take the dataset past its lifetime budget is never asked of the site.
async fn private_previews_spend_from_the_datasets_ledger(db: crate::helpers::Db) {
    use crate::engine::{approved_study, engine_manifest, start_worker};
    use crate::helpers::*;
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let profile = site_profile(4);
    let _north = start_worker(&app, w.site_a, &w.custodian_a, profile, dir.path()).await;
    let mut m = engine_manifest(2);
    m["privacy"] =
        serde_json::json!({"dp_sgd": {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0}});
    let (sid, _) = approved_study(&app, &w, m).await;
    let r = &w.researcher.auth;
    let path = format!("/api/v1/studies/{sid}/previews");

    let bad = app
        .post(&path, r, serde_json::json!({"site_id": w.site_a}))
        .await
        .expect(422);
    assert!(
        bad["detail"]
            .as_str()
            .expect("detail")
            .contains("a preview of its sites' data must be private too"),
        "{bad}"
    );
    let bad = app
        .post(
            &path,
            r,
            serde_json::json!({"site_id": w.site_a, "epsilon": 0, "delta": 0.5, "generator": "pca_gaussian"}),
        )
        .await
        .expect(422);
    let detail = bad["detail"].as_str().expect("detail");
    assert!(detail.contains("epsilon must be a number above 0"), "{bad}");
    assert!(
        detail.contains("delta must be above 0 and at most"),
        "{bad}"
    );
    assert!(
        detail.contains("pca_gaussian cannot be trained with DP-SGD"),
        "{bad}"
    );

    // North's custodian leaves room for one preview at ε = 2, not two (they compose to 2.9).
    patients_of(&app, w.site_a, &w.custodian_a.auth).await;
    let custodian = Auth::Cookie(app.sign_in(&w.custodian_a.email).await);
    app.call(
        reqwest::Method::PUT,
        &format!("/api/v1/sites/{}/privacy/budget", w.site_a),
        &custodian,
        Some(serde_json::json!({"epsilon": 2.5, "delta": 1e-5})),
    )
    .await
    .expect(200);
    let asked = app
        .post(
            &path,
            r,
            serde_json::json!({"site_id": w.site_a, "epsilon": 2, "per_class": 3}),
        )
        .await
        .expect(201);
    assert_eq!(asked["delta"], 1e-5, "the plan's δ: {asked}");
    let pid = id_of(&asked);
    let ledger = format!("/api/v1/sites/{}/privacy", w.site_a);
    let held = app.get(&ledger, &w.custodian_a.auth).await.expect(200);
    let spends = held["spends"].as_array().expect("spends");
    assert_eq!(spends.len(), 1, "{held}");
    assert_eq!(spends[0]["purpose"], "preview");
    assert_eq!(spends[0]["run_id"].as_str(), Some(pid.as_str()));

    let mut set = serde_json::Value::Null;
    for _ in 0..600 {
        set = app
            .get(&format!("/api/v1/previews/{pid}"), &w.custodian_a.auth)
            .await
            .expect(200);
        if set["status"] != "generating" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(set["status"], "awaiting_release", "{set}");
    assert_eq!(set["generator"], "cvae");
    let eps = set["epsilon"].as_f64().expect("the set's ε");
    assert!(eps > 1.9 && eps <= 2.0 + 1e-9, "{set}");
    let spent = app.get(&ledger, &w.custodian_a.auth).await.expect(200);
    assert_eq!(spent["spends"][0]["state"], "committed", "{spent}");
    assert_eq!(spent["studies"][0]["previews"], 1, "{spent}");
    assert_eq!(spent["studies"][0]["rounds_committed"], 0, "{spent}");
    let left = spent["remaining_epsilon"].as_f64().expect("remaining");
    assert!((left - (2.5 - eps)).abs() < 1e-6, "{spent}");

    // A second would exceed the dataset's budget: refused here, no job, nothing reserved.
    let refused = app
        .post(
            &path,
            r,
            serde_json::json!({"site_id": w.site_a, "epsilon": 2}),
        )
        .await
        .expect(409);
    assert_eq!(refused["code"], "privacy_budget", "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .expect("detail")
            .contains("of its lifetime budget ε = 2.5"),
        "{refused}"
    );
    let after = app.get(&ledger, &w.custodian_a.auth).await.expect(200);
    assert_eq!(after["spends"].as_array().map(Vec::len), Some(1), "{after}");
    let asked = app
        .get(
            "/api/v1/audit/events?action=preview.requested",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert_eq!(asked.as_array().map(Vec::len), Some(1));
}
crate::on_both!(private_previews_spend_from_the_datasets_ledger);

/// A synthetic site of 120 images, half with a lesion.
fn site_profile(seed: u64) -> consilium_worker::synthetic::SiteProfile {
    crate::engine::plain_site(120, seed)
}
