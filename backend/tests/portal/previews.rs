//! Synthetic previews in the browser: the researcher asks a site, the site's worker generates
//! and checks them, the custodian releases them, the researcher sees them; a researcher
//! without a grant cannot.

use consilium_backend::domain::Actor;
use consilium_backend::services::{access, directory, studies};
use consilium_core::Role;
use consilium_core::api::{
    AccessDecision, CreateAccessRequest, CreateStudy, CreateUser, DataScope, DecideAccessRequest,
    ReviewDecision, StudySite, SubmitPlan, SubmitReview,
};

use crate::harness::{PASSWORD, Portal};

fn actor(u: &consilium_core::api::UserDto) -> Actor {
    Actor {
        user_id: u.id,
        roles: u.roles.iter().copied().collect(),
        token_id: None,
        site_id: None,
    }
}

/// How many of the images matching `css` the browser has loaded and decoded.
async fn loaded_images(p: &Portal, css: &str) -> u64 {
    p.browser
        .execute(
            "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length;",
            vec![serde_json::json!(css)],
        )
        .await
        .unwrap()
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custodian_releases_checked_previews_to_the_researcher() {
    let mut p = Portal::start("previews", 1).await;
    let researcher = actor(p.cast.first(Role::Researcher).unwrap());
    let member = actor(p.cast.first(Role::CommitteeMember).unwrap());
    let (north, north_custodian, _) = p.cast.sites[0].clone();
    let (south, _, _) = p.cast.sites[1].clone();
    directory::create_user(
        &p.ctx,
        &Actor::system(),
        CreateUser {
            email: "rene@uni.example".into(),
            name: "René Other-Researcher".into(),
            roles: vec![Role::Researcher],
            password: Some(PASSWORD.into()),
        },
    )
    .await
    .unwrap();

    // An approved study; North has granted access, South has not.
    let study = studies::create_study(
        &p.ctx,
        &researcher,
        CreateStudy {
            title: "Lesion detection, previews first".into(),
            protocol_text: "Retrospective.".into(),
            purpose: "See the data's shape before writing the plan.".into(),
            committee_id: p.cast.committee.id,
            sites: [&north, &south]
                .iter()
                .map(|s| StudySite {
                    site_id: s.id,
                    scope: DataScope {
                        modality: "CR".into(),
                        body_part: "CHEST".into(),
                        label: "lesion".into(),
                        cases: 100,
                    },
                })
                .collect(),
        },
    )
    .await
    .unwrap();
    let manifest = consilium_backend::demo::demo_scenario().unwrap().manifest;
    studies::submit_plan(
        &p.ctx,
        &researcher,
        study.id,
        SubmitPlan {
            manifest,
            files: vec![],
        },
    )
    .await
    .unwrap();
    studies::submit_study(&p.ctx, &researcher, study.id)
        .await
        .unwrap();
    studies::review_study(
        &p.ctx,
        &member,
        study.id,
        SubmitReview {
            decision: ReviewDecision::Approve,
            comments: "Fine.".into(),
            conditions: None,
            expires_at: Some(chrono::Utc::now() + chrono::Duration::days(30)),
        },
    )
    .await
    .unwrap();
    for site in [&north, &south] {
        access::create_request(
            &p.ctx,
            &researcher,
            study.id,
            CreateAccessRequest {
                site_id: site.id,
                plan_hashes: None,
                justification: "Previews, then training.".into(),
            },
        )
        .await
        .unwrap();
    }
    let north_request = access::list(&p.ctx, &researcher, Some(north.id), Some(study.id))
        .await
        .unwrap()
        .remove(0);
    access::decide(
        &p.ctx,
        &actor(&north_custodian),
        north_request.id,
        DecideAccessRequest {
            decision: AccessDecision::Approve,
            comment: None,
            expires_at: Some(chrono::Utc::now() + chrono::Duration::days(30)),
            scope: None,
        },
    )
    .await
    .unwrap();

    // The researcher asks North (the only granted site) for a preview.
    p.sign_in("rhea@uni.example").await;
    let study_path = format!("/studies/{}", study.id);
    p.goto(&study_path).await;
    p.wait_for("Synthetic previews", 10).await;
    let sites = p.text_of("#preview-site").await;
    assert!(
        sites.contains("North Hospital") && !sites.contains("South Hospital"),
        "{sites}"
    );
    p.fill("#per-class", "8").await;
    p.press("Ask for a preview").await;
    p.wait_for("North Hospital: ", 20).await;
    let mut page = String::new();
    for _ in 0..120 {
        p.goto(&study_path).await;
        page = p.wait_for("Synthetic previews", 10).await;
        if page.contains("awaiting the custodian's release") || page.contains("failed:") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(page.contains("awaiting the custodian's release"), "{page}");
    assert_eq!(
        loaded_images(&p, ".preview img").await,
        0,
        "nothing shown before release"
    );
    p.shot_at("researcher-waits", "#previews-h").await;
    p.sign_out().await;

    // North's custodian sees the images, the check's figures and the summary, and releases.
    p.sign_in("cara@north.example").await;
    p.goto("/access").await;
    let page = p
        .wait_for("Synthetic previews of your sites' data", 10)
        .await;
    assert!(page.contains("Memorisation check"), "{page}");
    assert!(page.contains("counts below k = 10 suppressed"), "{page}");
    assert!(
        page.contains("Class 0") && page.contains("Class 1"),
        "{page}"
    );
    let shown = loaded_images(&p, ".preview img").await;
    assert!(shown >= 8, "{shown} images loaded for the custodian");
    p.shot_at("custodian-reviews-preview", ".preview").await;
    p.fill(
        "input[id^=preview-comment-]",
        "Checked: no near-copies; fine to share.",
    )
    .await;
    p.press("Release to the researcher").await;
    p.wait_for("Released", 20).await;
    p.sign_out().await;

    // The researcher now sees them, with who released them and when.
    p.sign_in("rhea@uni.example").await;
    p.goto(&study_path).await;
    let page = p.wait_for("Released", 10).await;
    assert!(page.contains("by Cara Custodian (North)"), "{page}");
    assert!(page.contains("fine to share"), "{page}");
    let shown = loaded_images(&p, ".preview img").await;
    assert!(shown >= 8, "{shown} images loaded for the researcher");
    p.shot_at("researcher-sees-previews", ".preview").await;
    let first = p
        .browser
        .find(fantoccini::Locator::Css(".preview img"))
        .await
        .unwrap()
        .attr("src")
        .await
        .unwrap()
        .unwrap();
    p.sign_out().await;

    // Another researcher, without a grant, sees neither the study nor the images.
    p.sign_in("rene@uni.example").await;
    p.goto(&study_path).await;
    let page = p.wait_for("No study", 10).await;
    assert!(!page.contains("Synthetic previews"), "{page}");
    p.goto(&first).await;
    let body = p.text().await;
    assert!(
        body.contains("not_found") && body.contains("No preview"),
        "{body}"
    );
    p.close().await;
}
