//! The results queue over the real RabbitMQ: a message that can never be recorded (a preview
//! result pointing at a corrupt preview set) goes to the dead-letter queue with its reason and
//! is audited, and the messages behind it still flow (before, it was requeued for ever and
//! blocked every heartbeat and update behind it).

use crate::engine::{answer_preview, approved_study, engine_manifest, start_worker};
use crate::federation::Vhost;
use crate::helpers::*;

use consilium_worker::broker::RabbitBroker;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_can_never_be_recorded_is_dead_lettered_with_its_reason() {
    let vhost = Vhost::new();
    let url = vhost.url();
    let app = spawn_app_with(Db::Sqlite, |s| {
        s.engine.broker_url = Some(url.clone().into());
        s.engine.round_timeout_seconds = 120;
    })
    .await;
    let w = world(&app).await;
    let (sid, _) = approved_study(&app, &w, engine_manifest(2)).await;
    // North is asked for a preview before its worker runs; a forged answer comes first,
    // pointing at an artifact that is not a preview set.
    let preview = id_of(
        &app.post(
            &format!("/api/v1/studies/{sid}/previews"),
            &w.researcher.auth,
            json!({"site_id": w.site_a, "per_class": 4}),
        )
        .await
        .expect(201),
    );
    // Handed over with North's worker token as North's output of the preview job, and
    // announced signed with North's own registered key as North's broker user: it proves where
    // it comes from, and is still impossible to record.
    answer_preview(
        &app,
        w.site_a,
        &w.custodian_a,
        &preview,
        b"not a preview set".to_vec(),
        8,
    )
    .await;
    let rabbit = RabbitBroker::connect(&url).await.expect("broker");
    let mut reasons = Vec::new();
    for _ in 0..100 {
        reasons = rabbit.dead_letter_reasons().await.expect("dead letters");
        if !reasons.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("it could not be recorded"),
        "{reasons:?}"
    );

    // What comes after still flows: the sites' workers answer the preview and train a run.
    let dir = tempfile::tempdir().expect("dir");
    let p = |seed| crate::engine::plain_site(80, seed);
    let _a = start_worker(&app, w.site_a, &w.custodian_a, p(1), dir.path()).await;
    let _b = start_worker(&app, w.site_b, &w.custodian_b, p(2), dir.path()).await;
    let (_, done) = crate::engine::run_to_end(&app, &sid, &w.researcher.auth, 120).await;
    assert_eq!(done["status"], "completed", "{done}");
    let mut status = json!(null);
    for _ in 0..100 {
        status = app
            .get(&format!("/api/v1/previews/{preview}"), &w.researcher.auth)
            .await
            .expect(200)["status"]
            .clone();
        if status != "generating" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status, "awaiting_release",
        "the site's real preview was recorded"
    );
    // The dead letter is in the audit trail, with its reason.
    let events = app
        .get(
            "/api/v1/audit/events?action=message.dead_lettered",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    assert_eq!(rabbit.dead_letters().await.expect("count"), 1);
}
