//! Segmentation in the browser: the researcher follows a U-Net's federated run by its Dice
//! (charted per round) and HD95 (site by site in each round's table), and reads the model's
//! Dice on its page and in the registry.

use consilium_backend::services::{models, runs, studies};
use consilium_core::Role;
use consilium_core::api::CreateRun;

use crate::harness::Portal;
use crate::setup::{approved_as_submitted, drafted_study_with, finished, granted, researcher};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_researcher_follows_a_segmentation_run_by_its_dice() {
    let mut p = Portal::start_segmenting("segmentation", 2).await;
    // The example's U-Net recipe (`consilium simulate --example-segmentation`).
    let manifest: consilium_core::manifest::TrainingPlanManifest =
        serde_json::from_value(serde_json::json!({
            "model": {"architecture": "unet", "num_classes": 2,
                "labels": {"0": "background", "1": "lesion"},
                "hyper_parameters": {"widths": [8, 16, 32], "norm": "batch", "upsampling": "transposed"}},
            "preprocessing": {"image_size": 32, "normalisation": "zscore", "augmentations": ["flip"]},
            "optimiser": {"name": "adamw", "learning_rate": 0.01, "weight_decay": 0.0001},
            "local_epochs": 3, "batch_size": 8, "rounds": 4, "seed": 1,
            "aggregation": {"strategy": "fedavg", "min_sites": 2}
        }))
        .unwrap();
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
    let chart = p.text_of(".chart").await;
    assert!(
        chart.contains(&format!("round 4: {dice:.3}")),
        "the chart's figures hold the final Dice {dice:.3}: {chart}"
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
