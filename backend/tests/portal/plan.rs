//! The plan form tells the researcher, before anything is submitted, what the server would
//! refuse: live as the manifest is typed, and through "Check the plan" (which saves nothing).

use consilium_backend::services::studies;

use crate::harness::Portal;
use crate::setup::{drafted_study, researcher};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_form_shows_the_problems_before_submitting() {
    let mut p = Portal::start("plan", 0).await;
    let study = drafted_study(&p, "Elbow effusions", 1).await;
    let before = studies::list_plans(&p.ctx, &researcher(&p), study.id)
        .await
        .unwrap()
        .len();
    p.sign_in("rhea@uni.example").await;
    p.goto(&format!("/studies/{}", study.id)).await;
    p.wait_for("Training plans", 10).await;
    p.open_plan_form().await;
    let bad = r#"{"model": {"architecture": "small_cnn", "num_classes": 2},
 "optimiser": {"name": "adamw", "learning_rate": 0.01, "momentum": 0.9},
 "local_epochs": 1, "batch_size": 8, "rounds": 2,
 "aggregation": {"strategy": "fedsgd"},
 "privacy": {"secure_aggregation": true, "secagg": {"neighbours": 3}}}"#;
    p.fill("#manifest", bad).await;
    let shown = p.wait_for("This plan would be refused", 10).await;
    for problem in [
        "aggregation.strategy must be one of",
        "optimiser.momentum applies to sgd only",
        "privacy.secagg.neighbours must be an even number from 2 to 254",
    ] {
        assert!(shown.contains(problem), "{problem}: {shown}");
    }
    p.shot_at("problems-while-typing", "#plan-problems").await;
    // The choices are on the form.
    p.click("details.choices > summary").await;
    let choices = p.text_of("details.choices").await;
    assert!(
        choices.contains("fedavg, fedadam, fedyogi, fedbn"),
        "{choices}"
    );

    // "Check the plan" asks the server and saves nothing; what was typed stays.
    p.press("Check the plan").await;
    let page = p.wait_for("would be refused", 20).await;
    p.hydrated().await;
    let open = p
        .browser
        .execute(
            "return document.querySelector('#manifest').closest('details').open;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(open, serde_json::json!(true), "the failed form stays open");
    assert!(page.contains("would be refused"), "{page}");
    let kept = p
        .browser
        .find(fantoccini::Locator::Css("#manifest"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(kept.contains("fedsgd"), "the manifest survives: {kept}");
    let after = studies::list_plans(&p.ctx, &researcher(&p), study.id)
        .await
        .unwrap()
        .len();
    assert_eq!(before, after, "checking saved nothing");

    // Mended, the form says it will run as written.
    p.fill(
        "#manifest",
        &bad.replace("fedsgd", "fedavg")
            .replace(", \"momentum\": 0.9", "")
            .replace("\"neighbours\": 3", "\"neighbours\": 4"),
    )
    .await;
    p.wait_for(
        "Every setting of this plan will be carried out as written",
        10,
    )
    .await;
    p.shot_at("plan-sound", "#plan-problems").await;

    // A new version keeps the latest version's attachments unless one is unticked.
    use base64::Engine as _;
    let mut manifest = consilium_backend::demo::demo_scenario().unwrap().manifest;
    manifest.rounds = 4;
    studies::submit_plan(
        &p.ctx,
        &researcher(&p),
        study.id,
        consilium_core::api::SubmitPlan {
            manifest: manifest.clone(),
            files: ["train.py", "README.txt"]
                .iter()
                .map(|n| consilium_core::api::PlanFileUpload {
                    name: n.to_string(),
                    content_base64: base64::engine::general_purpose::STANDARD.encode(n),
                })
                .collect(),
            keep_files: vec![],
        },
    )
    .await
    .unwrap();
    p.goto(&format!("/studies/{}", study.id)).await;
    p.wait_for("Training plans", 10).await;
    p.open_plan_form().await;
    let carried = p.text_of("fieldset.keep-files").await;
    assert!(
        carried.contains("train.py") && carried.contains("README.txt"),
        "{carried}"
    );
    p.click("fieldset.keep-files input[value='README.txt']")
        .await;
    manifest.rounds = 6;
    p.fill(
        "#manifest",
        &serde_json::to_string_pretty(&manifest).unwrap(),
    )
    .await;
    p.shot_at("plan-keeps-attachments", "fieldset.keep-files")
        .await;
    p.press("Submit plan").await;
    p.wait_for("The training plan is submitted as a new version.", 20)
        .await;
    let plans = studies::list_plans(&p.ctx, &researcher(&p), study.id)
        .await
        .unwrap();
    let latest = plans.iter().max_by_key(|x| x.version).unwrap();
    assert_eq!(latest.manifest.rounds, 6);
    let names: Vec<&str> = latest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["train.py"],
        "kept the ticked one, left the unticked one"
    );
    p.close().await;
}
