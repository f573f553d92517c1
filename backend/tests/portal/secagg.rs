//! Secure aggregation in the browser: the committee reads what the server will and will not
//! see before it approves, and the researcher reads on the model's lineage whose masked updates
//! the sum holds.

use consilium_backend::services::{models, runs, studies};
use consilium_core::Role;
use consilium_core::api::CreateRun;

use crate::harness::Portal;
use crate::setup::{approved_as_submitted, drafted_study_with, finished, granted, researcher};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committee_and_the_researcher_see_what_the_server_sees() {
    let mut p = Portal::start("secagg", 3).await;
    let mut manifest = consilium_backend::demo::demo_scenario().unwrap().manifest;
    manifest.rounds = 1;
    manifest.local_epochs = 1;
    manifest.aggregation.min_sites = Some(3);
    manifest.privacy.secure_aggregation = true;
    let study = drafted_study_with(&p, "Masked lesion triage", 3, manifest).await;
    studies::submit_study(&p.ctx, &researcher(&p), study.id)
        .await
        .unwrap();

    // The committee reads, beside the plan's hash, that the server sees only a sum.
    let member = p.cast.first(Role::CommitteeMember).unwrap().email.clone();
    p.sign_in(&member).await;
    p.goto(&format!("/studies/{}", study.id)).await;
    p.wait_for("What this decision binds", 10).await;
    let form = p.text_of("#review-form").await;
    assert!(
        form.contains(
            "on: the server sees only the sum of at least 3 sites' masked updates, never one site's"
        ),
        "{form}"
    );
    assert!(form.contains("keys agreed with 2 neighbours"), "{form}");
    p.shot_at("committee-secure-aggregation", "#review-form")
        .await;
    p.sign_out().await;
    approved_as_submitted(&p, &study).await;
    for site in 0..3 {
        granted(&p, &study, site).await;
    }

    let r = runs::create_run(
        &p.ctx,
        &researcher(&p),
        study.id,
        CreateRun { plan_hash: None },
    )
    .await
    .unwrap();
    assert_eq!(finished(&p, r.id).await, "completed");
    let version = models::list(&p.ctx, &researcher(&p), Some(r.id), None)
        .await
        .unwrap()
        .remove(0);

    // The researcher reads on the lineage who was summed, and that no site's update was seen.
    let asker = p.cast.first(Role::Researcher).unwrap().email.clone();
    p.sign_in(&asker).await;
    p.goto(&format!("/models/{}", version.id)).await;
    p.wait_for("Secure aggregation", 10).await;
    let line = p.text_of("#secure-aggregation").await;
    assert!(
        line.contains("the server saw only the sum of the masked updates of 3 sites"),
        "{line}"
    );
    for (site, _, _) in p.cast.sites.iter().take(3) {
        assert!(line.contains(&site.name), "{} in {line}", site.name);
    }
    assert!(line.contains("never one site's"), "{line}");
    let page = p.text().await;
    assert!(page.contains("Masked inputs from the sites"), "{page}");
    p.shot("lineage-secure-aggregation").await;
    p.close().await;
}
