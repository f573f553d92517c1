//! Synthetic previews in the browser: the researcher asks a site, the site's worker generates
//! and checks them, the custodian releases them, the researcher sees them; a researcher
//! without a grant cannot.

use consilium_backend::domain::Actor;
use consilium_backend::services::directory;
use consilium_core::Role;
use consilium_core::api::CreateUser;

use crate::harness::{PASSWORD, Portal};
use crate::setup::{approved, drafted_study, granted};

/// How many of the images matching `css` the browser has loaded and decoded.
pub async fn loaded_images(p: &Portal, css: &str) -> u64 {
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

/// Reloads the study page until the newest preview is generated (or failed); it must be
/// awaiting the custodian's release.
async fn until_generated(p: &Portal, study_path: &str) {
    let mut page = String::new();
    for _ in 0..120 {
        p.goto(study_path).await;
        page = p.wait_for("Synthetic previews", 10).await;
        if !page.contains("being generated at the site") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(page.contains("awaiting the custodian's release"), "{page}");
    assert!(!page.contains("failed:"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custodian_releases_checked_previews_to_the_researcher() {
    let mut p = Portal::start("previews", 1).await;
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
    let study = drafted_study(&p, "Lesion detection, previews first", 2).await;
    approved(&p, &study).await;
    granted(&p, &study, 0).await;

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
    until_generated(&p, &study_path).await;
    assert_eq!(
        loaded_images(&p, ".preview img").await,
        0,
        "nothing shown before release"
    );
    p.shot_at("researcher-waits", "#previews-h").await;
    p.sign_out().await;

    // North's custodian sees the images, the check's figures and the summary, and releases.
    // Her home says a preview waits for her; the link leads to it.
    p.sign_in("cara@north.example").await;
    let home = p.wait_for("What waits for you", 10).await;
    assert!(
        home.contains("Release or reject 1 synthetic preview"),
        "{home}"
    );
    p.press("Release or reject 1 synthetic preview").await;
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
    let home = p.wait_for("What waits for you", 10).await;
    assert!(
        home.contains("North Hospital's preview for"),
        "the release is news: {home}"
    );
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

    // A second set, from the PCA-Gaussian generator, which the custodian rejects.
    p.choose("#generator", "PCA-Gaussian (small datasets)")
        .await;
    p.fill("#per-class", "4").await;
    p.press("Ask for a preview").await;
    until_generated(&p, &study_path).await;
    p.sign_out().await;
    p.sign_in("cara@north.example").await;
    p.goto("/access").await;
    let page = p
        .wait_for("Synthetic previews of your sites' data", 10)
        .await;
    assert!(page.contains("Generator pca_gaussian"), "{page}");
    p.fill(
        "input[id^=preview-comment-]",
        "Too few images per class to share.",
    )
    .await;
    p.press("Reject").await;
    p.wait_for("Decided", 20).await;
    p.sign_out().await;
    p.sign_in("rhea@uni.example").await;
    p.goto(&study_path).await;
    p.wait_for(
        "rejected by the custodian: Too few images per class to share.",
        10,
    )
    .await;
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
