//! Plans mean what they say: a setting no worker would carry out is refused at submission
//! (422, every problem in words), long before anyone approves it; a stored plan that no longer
//! parses cannot start a run.

use crate::helpers::*;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use serde_json::{Value, json};

async fn refused(app: &TestApp, w: &World, sid: &str, m: Value) -> Vec<String> {
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            &w.researcher.auth,
            json!({"manifest": m}),
        )
        .await
        .expect(422);
    p["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect()
}

/// Sets the value at a JSON pointer, making the objects on the way.
fn set(m: &mut Value, pointer: &str, value: &Value) {
    let mut at = m;
    for key in pointer.trim_start_matches('/').split('/') {
        at = &mut at[key];
    }
    *at = value.clone();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_setting_no_worker_runs_is_refused_at_submission() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    let sid = id_of(
        &app.post(
            "/api/v1/studies",
            &w.researcher.auth,
            study_body(&w, &[w.site_a]),
        )
        .await
        .expect(201),
    );
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/aggregation/strategy",
            json!("fedsgd"),
            "aggregation.strategy must be one of \"fedavg\"",
        ),
        (
            "/aggregation/parameters",
            json!({"f": 1}),
            "aggregation.parameters.f: fedavg takes no parameters",
        ),
        (
            "/privacy/secagg",
            json!({"neighbours": 3}),
            "privacy.secagg tunes secure aggregation, which this plan does not ask for",
        ),
        (
            "/preprocessing/normalisation",
            json!("histogram"),
            "preprocessing.normalisation must be one of \"zscore\", \"minmax\", \"dataset\" or \"none\", not \"histogram\"",
        ),
        (
            "/preprocessing/augmentations",
            json!(["flip", "mixup"]),
            "preprocessing.augmentations[1] must be \"flip\" or \"rotate\", not \"mixup\"",
        ),
        (
            "/stopping/target_metric",
            json!("f1"),
            "stopping.target_metric must be one of \"accuracy\", \"auroc\", \"dice\" or \"loss\", not \"f1\"",
        ),
        (
            "/model/hyper_parameters",
            json!({"depth": 3}),
            "model.hyper_parameters for small_cnn: unknown field `depth`",
        ),
        (
            "/model/architecture",
            json!("vit"),
            "model.architecture must be \"small_cnn\", \"resnet\" or \"unet\", not \"vit\"",
        ),
        (
            "/preprocessing/image_size",
            json!(30),
            "preprocessing.image_size must be a multiple of 4 for small_cnn",
        ),
    ];
    for (pointer, value, expected) in &cases {
        let mut m = manifest(0.01);
        set(&mut m, pointer, value);
        let errors = refused(&app, &w, &sid, m).await;
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "{pointer} = {value}: {errors:?}"
        );
    }
    // All at once: every problem listed in one answer.
    let mut m = manifest(0.01);
    for (pointer, value, _) in &cases[..6] {
        set(&mut m, pointer, value);
    }
    m["optimiser"] = json!({"name": "adamw", "learning_rate": 0.01, "momentum": 0.9});
    let errors = refused(&app, &w, &sid, m).await;
    assert!(errors.len() >= 6, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("optimiser.momentum applies to sgd only"))
    );
    // Nothing was stored.
    let plans = app
        .get(&format!("/api/v1/studies/{sid}/plans"), &w.researcher.auth)
        .await
        .expect(200);
    assert_eq!(plans, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_plan_no_worker_can_run_does_not_start() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    let (sid, _) = crate::engine::approved_study(&app, &w, crate::engine::engine_manifest(2)).await;
    // A plan stored by an older server, before strategies were checked.
    let sid_uuid: uuid::Uuid = sid.parse().expect("uuid");
    let stored = consilium_backend::entities::plan::Entity::find()
        .filter(consilium_backend::entities::plan::Column::StudyId.eq(sid_uuid))
        .one(&app.ctx.db)
        .await
        .expect("query")
        .expect("the plan");
    let mut manifest = stored.manifest.clone();
    manifest["aggregation"]["strategy"] = json!("fedsgd");
    let mut a: consilium_backend::entities::plan::ActiveModel = stored.into();
    a.manifest = Set(manifest);
    a.update(&app.ctx.db).await.expect("update");
    let pre = app
        .get(
            &format!("/api/v1/studies/{sid}/preflight"),
            &w.researcher.auth,
        )
        .await
        .expect(200);
    assert_eq!(pre["ready"], false);
    assert!(
        pre["unmet"]
            .to_string()
            .contains("can't be run: aggregation.strategy must be one of"),
        "{pre}"
    );
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/runs"),
            &w.researcher.auth,
            json!({}),
        )
        .await
        .expect(409);
    assert!(
        p["detail"].to_string().contains("Submit a corrected plan"),
        "{p}"
    );
}
