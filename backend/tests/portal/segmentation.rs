//! Segmentation in the browser: the researcher follows a U-Net's federated run by its Dice
//! (charted per round) and HD95 (site by site in each round's table), and reads the model's
//! Dice on its page and in the registry; a site's custodian and then the researcher see
//! synthetic previews with their masks drawn over them.

use consilium_backend::services::{models, previews, runs, studies};
use consilium_backend::simulate::Example;
use consilium_core::Role;
use consilium_core::api::{CreateRun, RequestPreview};

use crate::harness::Portal;
use crate::previews::loaded_images;
use crate::setup::{approved_as_submitted, drafted_study_with, finished, granted, researcher};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_researcher_follows_a_segmentation_run_by_its_dice() {
    let mut p = Portal::start_segmenting("segmentation", 2).await;
    // The example's U-Net recipe (`consilium simulate --example-segmentation`).
    let mut manifest = Example::Segmentation.plan().unwrap();
    manifest.rounds = 4;
    let study = drafted_study_with(&p, "Lesion outlines", 2, manifest).await;
    studies::submit_study(&p.ctx, &researcher(&p), study.id)
        .await
        .unwrap();
    approved_as_submitted(&p, &study).await;
    for site in 0..2 {
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
    let versions = models::list(&p.ctx, &researcher(&p), Some(r.id), None)
        .await
        .unwrap();
    let last = versions.iter().max_by_key(|m| m.round).unwrap();
    let global = &last.evaluation.as_ref().unwrap().global;
    let scores = global.segmentation.as_ref().unwrap();
    let dice = scores.mean_dice.unwrap();
    assert!(dice > 0.5, "the U-Net learnt nothing: {scores:?}");

    // The run page charts Dice and HD95 per round (not accuracy), and each round's table
    // gives each site's Dice and HD95 of that round's model.
    let asker = p.cast.first(Role::Researcher).unwrap().email.clone();
    p.sign_in(&asker).await;
    p.goto(&format!("/runs/{}", r.id)).await;
    let page = p.wait_for("Mean Dice per round", 20).await;
    assert!(!page.contains("Accuracy per round"), "{page}");
    // The page fits the window: the round tables scroll in their boxes, and the charts'
    // figures, there for screen readers, do not widen it (they did, by 48 px).
    assert_eq!(
        p.overflow().await,
        None,
        "the run page is wider than the window"
    );
    let chart = p
        .browser
        .execute(
            "return document.querySelector('.chart .sr-only').textContent;",
            vec![],
        )
        .await
        .unwrap();
    let chart = chart.as_str().unwrap_or_default();
    assert!(
        chart.contains(&format!("round 4: {dice:.3}")),
        "the chart's figures, as a screen reader reads them, hold the final Dice {dice:.3}: {chart}"
    );
    let round = p.text_of("section[aria-label='Round 4']").await;
    assert!(round.contains("Held-out mean Dice"), "{round}");
    assert!(round.contains("HD95 (px)"), "{round}");
    assert!(!round.contains("AUROC"), "{round}");
    let site = &last.evaluation.as_ref().unwrap().sites[0];
    let site_dice = site
        .metrics
        .segmentation
        .as_ref()
        .unwrap()
        .mean_dice
        .unwrap();
    assert!(
        round.contains(&format!("{site_dice:.3}")),
        "{} at {site_dice:.3} in {round}",
        site.site_name
    );
    p.shot_at("dice-charts", ".charts").await;

    // The model's page and the registry speak Dice too.
    p.goto(&format!("/models/{}", last.id)).await;
    p.wait_for("Evaluated at every site", 20).await;
    let evaluation = p.text_of("#evaluation").await;
    assert!(
        evaluation.contains(&format!("mean Dice {dice:.3}")),
        "{evaluation}"
    );
    assert!(evaluation.contains("pixel accuracy"), "{evaluation}");
    p.shot("model-dice").await;
    p.goto("/models").await;
    let list = p.wait_for("Held-out score", 20).await;
    assert!(list.contains(&format!("mean Dice {dice:.3}")), "{list}");
    p.close().await;
}

/// For each image matching `css`, how many of its pixels are coloured (not grey), read back
/// from the pixels the browser decoded.
async fn coloured_pixels(p: &Portal, css: &str) -> Vec<u64> {
    let counts = p
        .browser
        .execute(
            "return [...document.querySelectorAll(arguments[0])].map(i => {
                const c = document.createElement('canvas');
                c.width = i.naturalWidth; c.height = i.naturalHeight;
                const g = c.getContext('2d');
                g.drawImage(i, 0, 0);
                const d = g.getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let k = 0; k < d.length; k += 4) { if (d[k] !== d[k + 1] || d[k + 1] !== d[k + 2]) n++; }
                return n;
            });",
            vec![serde_json::json!(css)],
        )
        .await
        .unwrap();
    counts
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_previews_show_each_image_with_its_mask() {
    let mut p = Portal::start_segmenting("segmentation-previews", 1).await;
    let manifest = Example::Segmentation.plan().unwrap();
    let study = drafted_study_with(&p, "Lesion outlines, previews first", 1, manifest).await;
    studies::submit_study(&p.ctx, &researcher(&p), study.id)
        .await
        .unwrap();
    approved_as_submitted(&p, &study).await;
    granted(&p, &study, 0).await;
    let asked = previews::request(
        &p.ctx,
        &researcher(&p),
        study.id,
        RequestPreview {
            site_id: study.sites[0].site_id,
            per_class: Some(12),
            generator: None,
            epsilon: None,
            delta: None,
        },
    )
    .await
    .unwrap();
    let mut status = String::new();
    for _ in 0..240 {
        status = previews::get(&p.ctx, &researcher(&p), asked.id)
            .await
            .unwrap()
            .status;
        if status != "generating" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(status, "awaiting_release");

    // The site's custodian sees each synthetic image with its mask over it, which colour is
    // which class, and how many of the site's images show each class.
    let custodian = p.cast.sites[0].1.email.clone();
    p.sign_in(&custodian).await;
    p.goto("/access").await;
    let page = p
        .wait_for("Synthetic previews of your sites' data", 10)
        .await;
    assert!(page.contains("Images with their synthetic masks"), "{page}");
    let legend = p.text_of(".preview ul.legend").await;
    assert!(
        legend.contains("lesion (mask value 1)")
            && legend.contains("background (mask value 0): no colour"),
        "{legend}"
    );
    assert!(page.contains("Images showing each class"), "{page}");
    assert!(!page.contains("Class 0"), "no grid per class: {page}");
    let shown = loaded_images(&p, ".preview img.overlay").await;
    assert!(shown >= 6, "{shown} overlays loaded for the custodian");
    // Drawn as overlays: the images are grey, the lesions their masks outline in colour,
    // and not every synthetic image has a lesion.
    let coloured = coloured_pixels(&p, ".preview img.overlay").await;
    assert!(
        coloured.iter().any(|n| *n > 0) && coloured.iter().all(|n| *n < 32 * 32),
        "coloured pixels per overlay: {coloured:?}"
    );
    p.shot_at("custodian-sees-masks", ".preview").await;
    p.fill(
        "input[id^=preview-comment-]",
        "Masks look plausible; fine to share.",
    )
    .await;
    p.press("Release to the researcher").await;
    p.wait_for("Released", 20).await;
    p.sign_out().await;

    // Released: the researcher sees the same overlays on the study page.
    let asker = p.cast.first(Role::Researcher).unwrap().email.clone();
    p.sign_in(&asker).await;
    p.goto(&format!("/studies/{}", study.id)).await;
    let page = p.wait_for("Released", 10).await;
    assert!(page.contains("Images with their synthetic masks"), "{page}");
    assert!(
        page.contains("Images (each with its mask)"),
        "the request form: {page}"
    );
    let shown = loaded_images(&p, ".preview img.overlay").await;
    assert!(shown >= 6, "{shown} overlays loaded for the researcher");
    p.shot_at("researcher-sees-masks", ".preview").await;
    p.close().await;
}
