//! What the portal refuses or explains: why a run cannot start yet, a form that comes back
//! with its error and what was typed, a custodian who cannot see another site's requests.

use consilium_backend::services::studies;
use consilium_core::api::SubmitPlan;

use crate::harness::Portal;
use crate::setup::{approved, drafted_study, granted, researcher};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasons_errors_and_what_each_person_may_see() {
    let mut p = Portal::start("guards", 0).await;
    let researcher = researcher(&p);

    // A study with a plan, through the services (as an integration would through the API),
    // with access requests for North and South.
    let study = drafted_study(&p, "Fracture triage", 2).await;

    // The researcher sees, in words, why the run cannot start; there is no start button.
    p.sign_in("rhea@uni.example").await;
    p.goto(&format!("/studies/{}", study.id)).await;
    p.wait_for("Training plans", 10).await;
    let reasons = p.text_of("#preflight").await;
    assert!(reasons.contains("A run cannot start yet"), "{reasons}");
    assert!(
        reasons.to_lowercase().contains("ethics") || reasons.to_lowercase().contains("approv"),
        "the missing approval is named: {reasons}"
    );
    assert!(!p.text().await.contains("Start a run"));
    p.shot_at("run-cannot-start", "#preflight").await;

    // The draft can be edited.
    p.press("Edit study").await;
    p.wait_for("Save changes", 10).await;
    p.fill("#title", "Fracture triage (wrist)").await;
    p.press("Save changes").await;
    let page = p.wait_for("Fracture triage (wrist)", 20).await;
    assert!(
        page.contains("Training plans"),
        "back on the study page: {page}"
    );

    // A form with a mistake comes back with the error and what was typed.
    p.goto("/studies/new").await;
    p.wait_for("Draft a new study", 10).await;
    p.fill("#title", "Knee effusion grading").await;
    p.fill("#purpose", "Grade effusions.").await;
    p.fill("#protocol", "Prospective.").await;
    p.choose("#committee", "Regional Ethics Committee").await;
    p.fill("#label", "effusion").await;
    p.press("Save draft").await;
    p.wait_for("Tick at least one site", 20).await;
    let url = p.browser.current_url().await.unwrap();
    assert_eq!(url.query(), None, "nothing typed travels in the URL: {url}");
    let kept = p
        .browser
        .find(fantoccini::Locator::Css("#title"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap();
    assert_eq!(
        kept.as_deref(),
        Some("Knee effusion grading"),
        "the title survives the error"
    );
    p.shot("form-error-keeps-input").await;
    p.sign_out().await;

    // East's custodian sees no other site's requests; North's sees North's only.
    p.sign_in("cleo@east.example").await;
    p.goto("/access").await;
    let page = p.wait_for("Requests for your sites", 10).await;
    assert!(page.contains("No requests for your sites"), "{page}");
    assert!(!page.contains("Fracture triage (wrist)"), "{page}");
    p.shot("custodian-east-sees-nothing").await;
    p.sign_out().await;
    p.sign_in("cara@north.example").await;
    p.goto("/access").await;
    p.wait_for("Requests for your sites", 10).await;
    let table = p.text_of("#site-requests").await;
    assert!(
        table.contains("North Hospital") && !table.contains("South Hospital"),
        "{table}"
    );

    // Readable on a tablet: nothing wider than the screen.
    p.browser.set_window_size(820, 1180).await.unwrap();
    for path in [
        "/access".to_string(),
        format!("/studies/{}", study.id),
        "/".into(),
    ] {
        p.goto(&path).await;
        p.wait_for("Sign out", 10).await;
        let fits = p
            .browser
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            fits,
            serde_json::json!(true),
            "{path} is wider than a tablet"
        );
    }
    p.goto("/access").await;
    p.wait_for("Requests for your sites", 10).await;
    p.shot("tablet-custodian").await;
    p.browser.set_window_size(1280, 1000).await.unwrap();
    p.sign_out().await;

    // Approved and granted (through the services), the researcher starts a run; with no site
    // worker answering it waits, and the researcher stops it with a reason.
    approved(&p, &study).await;
    granted(&p, &study, 0).await;
    granted(&p, &study, 1).await;
    p.sign_in("rhea@uni.example").await;
    p.goto(&format!("/studies/{}", study.id)).await;
    p.wait_for("Everything a run needs is in place", 10).await;
    p.press("Start a run").await;
    p.wait_for("Rounds", 20).await;
    p.fill("#reason", "Wrong label column at one site.").await;
    p.shot("run-stopping").await;
    p.press("Stop run").await;
    let page = p.wait_for("Wrong label column at one site.", 20).await;
    assert!(page.contains("stopped"), "{page}");

    // A new plan version after the approval: the committee sees what changed.
    let mut manifest = consilium_backend::demo::demo_scenario().unwrap().manifest;
    manifest.rounds = 9;
    studies::submit_plan(
        &p.ctx,
        &researcher,
        study.id,
        SubmitPlan {
            manifest,
            files: vec![],
            keep_files: vec![],
        },
    )
    .await
    .unwrap();
    studies::submit_study(&p.ctx, &researcher, study.id)
        .await
        .unwrap();
    p.sign_out().await;
    p.sign_in("mira@ethics.example").await;
    p.goto(&format!("/studies/{}", study.id)).await;
    let page = p
        .wait_for(
            "Changes since the plan the committee last reviewed (version 1, approved) → version 2",
            10,
        )
        .await;
    let diff = p.text_of("pre.diff").await;
    assert!(
        diff.contains("− ") && diff.contains("\"rounds\": 5"),
        "{diff}"
    );
    assert!(
        diff.contains("+ ") && diff.contains("\"rounds\": 9"),
        "{diff}"
    );
    assert!(page.contains("Your committee's decision"), "{page}");
    p.shot_at("plan-diff", "pre.diff").await;
    p.sign_out().await;

    // Every page is reachable from the navigation (the auditor sees them all).
    p.sign_in("aldo@audit.example").await;
    for (link, heading) in [
        ("Studies", "Studies"),
        ("Reviews", "Review queue"),
        ("Data access", "Data access"),
        ("Runs", "Runs"),
        ("Models", "Models"),
        ("Audit", "Audit trail"),
        ("Home", "What waits for you"),
    ] {
        p.press(link).await;
        let page = p.wait_for(heading, 10).await;
        let alerts = p
            .browser
            .find_all(fantoccini::Locator::Css("[role=alert]"))
            .await
            .unwrap();
        assert!(alerts.is_empty(), "{link}: {page}");
    }
    p.goto("/studies").await;
    p.wait_for("Fracture triage (wrist)", 10).await;
    p.shot("auditor-studies").await;
    p.close().await;
}
