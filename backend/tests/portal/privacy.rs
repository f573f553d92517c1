//! Differential privacy in the browser: the committee reads the plan's budget in words, the
//! custodian sets the dataset's lifetime budget and sees what a private study spent from it.

use consilium_backend::services::{previews, privacy, runs, studies};
use consilium_core::Role;
use consilium_core::api::CreateRun;

use crate::harness::Portal;
use crate::setup::{
    actor, approved_as_submitted, drafted_study_with, finished, granted, researcher,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custodian_caps_and_sees_what_patients_spent() {
    let mut p = Portal::start("privacy", 1).await;
    let mut manifest = consilium_backend::demo::demo_scenario().unwrap().manifest;
    manifest.rounds = 2;
    manifest.local_epochs = 1;
    manifest.aggregation.min_sites = Some(1);
    manifest.privacy.dp_sgd = Some(consilium_core::manifest::DpSgdSettings {
        epsilon: 8.0,
        delta: 1e-5,
        max_grad_norm: 1.0,
        noise_multiplier: None,
    });
    let study = drafted_study_with(&p, "Private lesion triage", 1, manifest).await;
    studies::submit_study(&p.ctx, &researcher(&p), study.id)
        .await
        .unwrap();

    // The committee reads the budget it approves, in words, beside the plan's hash.
    let member = p.cast.first(Role::CommitteeMember).unwrap().email.clone();
    p.sign_in(&member).await;
    p.goto(&format!("/studies/{}", study.id)).await;
    let page = p
        .wait_for("each patient's data: at most ε = 8 at δ = 0.00001", 10)
        .await;
    assert!(page.contains("each site derives σ"), "{page}");
    p.shot("committee-budget").await;
    p.sign_out().await;
    approved_as_submitted(&p, &study).await;
    granted(&p, &study, 0).await;

    // North's custodian: no budget yet, nothing spent; a budget that is not a number is
    // refused with what to type, a good one is set.
    let (site, custodian, _) = p.cast.sites[0].clone();
    p.sign_in(&custodian.email).await;
    p.goto("/access").await;
    p.wait_for("Privacy ledgers of your sites' data", 10).await;
    let ledger = format!("#privacy-{}", site.id);
    let card = p.text_of(&ledger).await;
    assert!(card.contains("No lifetime budget is set"), "{card}");
    assert!(
        card.contains("No private round or preview has run on this data."),
        "{card}"
    );
    p.fill(&format!("#budget-eps-{}", site.id), "lots").await;
    p.press("Set the budget").await;
    p.wait_for(
        "Lifetime ε must be a number such as 8 or 1e-5, not \"lots\".",
        10,
    )
    .await;
    p.fill(&format!("#budget-eps-{}", site.id), "20").await;
    p.press("Set the budget").await;
    p.wait_for("of a lifetime budget of ε = 20", 10).await;
    p.shot("budget-set").await;

    // A private run on North's data; the ledger shows what the study spent and what is left.
    let r = runs::create_run(
        &p.ctx,
        &researcher(&p),
        study.id,
        CreateRun { plan_hash: None },
    )
    .await
    .unwrap();
    assert_eq!(finished(&p, r.id).await, "completed");
    let spent = privacy::dataset(&p.ctx, &actor(&custodian), site.id)
        .await
        .unwrap();
    assert!(spent.spent_epsilon > 0.0 && spent.spent_epsilon <= 8.0);
    p.goto("/access").await;
    p.wait_for("What each study spent", 10).await;
    let card = p.text_of(&ledger).await;
    assert!(
        card.contains(&format!(
            "ε = {:.3} spent at δ = 0.00001",
            spent.spent_epsilon
        )),
        "{card}"
    );
    assert!(
        card.contains(&format!("ε = {:.3} left.", 20.0 - spent.spent_epsilon)),
        "{card}"
    );
    assert!(card.contains("Private lesion triage"), "{card}");
    p.shot_at("ledger", &ledger).await;
    p.sign_out().await;

    // The researcher asks North for a synthetic preview: the plan trains with DP-SGD, so the
    // form asks what ε the preview may spend; a non-number is refused with what to type.
    let asker = p.cast.first(Role::Researcher).unwrap().email.clone();
    p.sign_in(&asker).await;
    p.goto(&format!("/studies/{}", study.id)).await;
    p.wait_for(
        "Privacy budget ε (required: the plan trains with DP-SGD)",
        10,
    )
    .await;
    p.fill("#preview-epsilon", "some").await;
    p.press("Ask for a preview").await;
    p.wait_for(
        "Privacy budget ε must be a number such as 8 or 1e-5, not \"some\".",
        10,
    )
    .await;
    p.fill("#preview-epsilon", "2").await;
    p.press("Ask for a preview").await;
    p.wait_for("being generated at the site", 10).await;
    p.sign_out().await;
    let mut status = String::new();
    for _ in 0..600 {
        let sets = previews::list(&p.ctx, &actor(&custodian), study.id)
            .await
            .unwrap();
        status = sets.first().map(|s| s.status.clone()).unwrap_or_default();
        if status != "generating" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(status, "awaiting_release");

    // The custodian sees the set's ε beside it, and the preview in the ledger.
    p.sign_in(&custodian.email).await;
    p.goto("/access").await;
    let page = p
        .wait_for("differentially private: each patient's data spent ε = ", 10)
        .await;
    assert!(
        page.contains("at δ = 0.00001 (from the site's privacy ledger)"),
        "{page}"
    );
    let card = p.text_of(&ledger).await;
    assert!(card.contains("Private previews"), "{card}");
    let spent = privacy::dataset(&p.ctx, &actor(&custodian), site.id)
        .await
        .unwrap();
    assert_eq!(spent.studies[0].previews, 1);
    assert!(
        card.contains(&format!("ε = {:.3} spent", spent.spent_epsilon)),
        "{card}"
    );
    p.close().await;
}
