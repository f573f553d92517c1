//! Robust aggregation at work: one of five sites sends poisoned updates (noise), outlier scoring
//! gives it almost no weight, the lineage records every site's score and share, and the site
//! is flagged to the researcher and to its custodian (and audited) after three rounds.

use consilium_backend::simulate::attacks::{Board, Simulated};
use consilium_core::attack::Attack;
use serde_json::{Value, json};
use std::sync::Arc;

use crate::engine::{
    approved_study_at, engine_manifest, five_sites, plain_site, run_to_end, start_configured_worker,
};
use crate::helpers::*;

async fn a_poisoning_site_is_outweighed_and_flagged(db: Db) {
    let app = spawn_app_with(db, |s| s.engine.round_timeout_seconds = 180).await;
    let w = world(&app).await;
    let dir = tempfile::tempdir().expect("dir");
    let p = |seed| plain_site(80, seed);
    let sites = five_sites(&app, &w).await;
    let (attacker, attacker_custodian) = sites[4].clone();
    let board = Arc::new(Board::default());
    let mut workers = Vec::new();
    for (i, (site, custodian)) in sites.iter().enumerate() {
        // A worker that sends noise (σ = 10) for its update: a broken pipeline or a crude
        // poisoner. (A sign flip of a late round's near-zero change can look like an honest
        // one to five-site outlier scores; the benchmark measures that, not this test.)
        let attack = (*site == attacker).then_some(Attack::Noise { sigma: 10.0 });
        let board = board.clone();
        workers.push(
            start_configured_worker(
                &app,
                *site,
                custodian,
                p(i as u64 + 1),
                dir.path(),
                move |mut c| {
                    c.artifacts = Arc::new(Simulated {
                        inner: c.artifacts.clone(),
                        attack,
                        board,
                        sites: 5,
                        attackers: 1,
                    });
                    c
                },
            )
            .await,
        );
    }
    let mut manifest = engine_manifest(3);
    manifest["local_epochs"] = json!(1);
    manifest["aggregation"] = json!({"strategy": "dos", "min_sites": 5});
    let people: Vec<(uuid::Uuid, &Person)> = sites.iter().map(|(s, c)| (*s, c)).collect();
    let (sid, _) = approved_study_at(&app, &w, manifest, &people).await;
    let (rid, done) = run_to_end(&app, &sid, &w.researcher.auth, 300).await;
    assert_eq!(done["status"], "completed", "{done}");

    // The lineage: every update's score and share; the attacker's share near 0 every round.
    let models = app
        .get(&format!("/api/v1/models?run_id={rid}"), &w.researcher.auth)
        .await
        .expect(200);
    let models = models.as_array().expect("models").clone();
    assert_eq!(models.len(), 3);
    for m in &models {
        let contributions = m["contributions"].as_array().expect("contributions");
        assert_eq!(contributions.len(), 5, "{m}");
        let total: f64 = contributions
            .iter()
            .map(|c| c["weight"].as_f64().expect("weight"))
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "shares sum to 1: {total}");
        let of = |c: &Value| {
            (
                c["weight"].as_f64().expect("weight"),
                c["score"].as_f64().expect("score"),
            )
        };
        let (bad, good): (Vec<&Value>, Vec<&Value>) = contributions
            .iter()
            .partition(|c| c["site_id"] == json!(attacker));
        let (weight, score) = of(bad[0]);
        assert!(
            weight < 0.1 && bad[0]["down_weighted"] == true,
            "the attacker: {m}"
        );
        // Honest sites differ among themselves too (so their shares differ), but the
        // attacker stands out most: the highest score, the smallest share.
        assert!(
            good.iter().all(|c| of(c).0 > weight && of(c).1 < score),
            "the attacker's weight {weight} and score {score}: {m}"
        );
        let honest: f64 = good.iter().map(|c| of(c).0).sum();
        assert!(honest > 0.9, "the honest sites make the model: {m}");
    }
    // The attacker's custodian sees the flag on the site-health page's data; the other
    // custodians see none on their sites.
    let health = app
        .get("/api/v1/site-health", &attacker_custodian.auth)
        .await
        .expect(200);
    let own: &Value = health
        .as_array()
        .expect("health")
        .iter()
        .find(|h| h["site_id"] == json!(attacker))
        .expect("its site");
    let flags = own["flags"].as_array().expect("flags");
    assert_eq!(flags.len(), 1, "{own}");
    assert_eq!(flags[0]["rounds"], json!([1, 2, 3]));
    assert_eq!(flags[0]["strategy"], "dos");
    assert_eq!(
        flags[0]["study_title"],
        "Nodule detection on chest radiographs"
    );
    let health = app
        .get("/api/v1/site-health", &w.custodian_a.auth)
        .await
        .expect(200);
    for h in health.as_array().expect("health") {
        assert_eq!(h["flags"], json!([]), "{h}");
    }
    // Audited once, when the streak reached three rounds.
    let events = app
        .get("/api/v1/audit/events?action=site.flagged", &w.auditor.auth)
        .await
        .expect(200);
    let events = events.as_array().expect("events");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["object_id"], json!(attacker.to_string()));

    // The portal: the run page names the flagged site for the researcher, with each site's
    // share and score per round; the site-health page tells the attacker's custodian.
    let page = |path: String, who: String| {
        let app = &app;
        async move {
            let cookie = app.sign_in(&who).await;
            app.client
                .get(format!("{}{path}", app.address))
                .header("Cookie", format!("consilium_session={cookie}"))
                .send()
                .await
                .expect("page")
                .text()
                .await
                .expect("html")
                // Leptos marks where text nodes meet.
                .replace("<!>", "")
        }
    };
    let html = page(format!("/runs/{rid}"), w.researcher.email.clone()).await;
    assert!(html.contains("Centre Hospital is flagged: "), "{html}");
    assert!(
        html.contains("dos down-weighted its update in rounds 1, 2, 3"),
        "{html}"
    );
    assert!(
        html.contains("Share of the model") && html.contains("(down-weighted)"),
        "{html}"
    );
    let html = page("/sites".into(), attacker_custodian.email.clone()).await;
    assert!(html.contains("Centre Hospital is flagged: "), "{html}");
    assert!(html.contains("Check the site's data pipeline"), "{html}");
    let html = page("/sites".into(), w.custodian_a.email.clone()).await;
    assert!(!html.contains("is flagged"), "{html}");
    drop(workers);
}

crate::on_both!(a_poisoning_site_is_outweighed_and_flagged);
