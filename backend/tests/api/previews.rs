//! Synthetic previews through the API: who may ask, who may see, who may release, and the
//! errors on the way (the browser test in tests/portal walks the generated path).

use crate::engine::{approved_study_at, engine_manifest};
use crate::helpers::*;
use crate::on_both;
use serde_json::json;

async fn previews_are_governed(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let (sid, _) =
        approved_study_at(&app, &w, engine_manifest(2), &[(w.site_a, &w.custodian_a)]).await;
    let r = &w.researcher.auth;
    let path = format!("/api/v1/studies/{sid}/previews");

    let bad = app
        .post(&path, r, json!({"site_id": w.site_a, "per_class": 0}))
        .await
        .expect(422);
    assert!(
        bad["detail"].as_str().unwrap().contains("per_class"),
        "{bad}"
    );
    let bad = app
        .post(&path, r, json!({"site_id": w.site_b}))
        .await
        .expect(422);
    assert!(
        bad["detail"]
            .as_str()
            .unwrap()
            .contains("does not take part"),
        "{bad}"
    );
    app.post(
        &path,
        &w.other_researcher.auth,
        json!({"site_id": w.site_a}),
    )
    .await
    .expect(404);

    let p = app
        .post(&path, r, json!({"site_id": w.site_a, "per_class": 4}))
        .await
        .expect(201);
    assert_eq!(p["status"], "generating");
    assert_eq!(p["images"], json!([]));
    let pid = p["id"].as_str().unwrap().to_string();

    // The other site's custodian does not see it; this site's custodian does.
    app.get(&format!("/api/v1/previews/{pid}"), &w.custodian_b.auth)
        .await
        .expect(404);
    app.get(&format!("/api/v1/previews/{pid}"), &w.custodian_a.auth)
        .await
        .expect(200);
    let listed = app.get(&path, &w.custodian_b.auth).await.expect(404);
    assert_eq!(listed["code"], "not_found");

    // Nothing to release before the site has answered; only the custodian decides.
    let early = app
        .post(
            &format!("/api/v1/previews/{pid}/decision"),
            &w.custodian_a.auth,
            json!({"decision": "release", "comment": "ok"}),
        )
        .await
        .expect(409);
    assert!(
        early["detail"].as_str().unwrap().contains("generating"),
        "{early}"
    );
    app.post(
        &format!("/api/v1/previews/{pid}/decision"),
        r,
        json!({"decision": "release", "comment": "mine"}),
    )
    .await
    .expect(403);
    let bad = app
        .post(
            &format!("/api/v1/previews/{pid}/decision"),
            &w.custodian_a.auth,
            json!({"decision": "publish", "comment": ""}),
        )
        .await
        .expect(422);
    assert_eq!(bad["errors"].as_array().unwrap().len(), 2, "{bad}");
    // The researcher may not see images before release.
    app.get(&format!("/api/v1/previews/{pid}/images/0"), r)
        .await
        .expect(403);

    // Without a grant in force, no preview.
    let requests = app
        .get(&format!("/api/v1/access-requests?study_id={sid}"), r)
        .await
        .expect(200);
    let req = requests[0]["id"].as_str().unwrap().to_string();
    app.post(
        &format!("/api/v1/access-requests/{req}/revoke"),
        &w.custodian_a.auth,
        json!({"reason": "audit"}),
    )
    .await
    .expect(200);
    let refused = app
        .post(&path, r, json!({"site_id": w.site_a}))
        .await
        .expect(409);
    assert_eq!(refused["code"], "no_grant");

    let events = app
        .get(
            "/api/v1/audit/events?action=preview.requested",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert_eq!(events.as_array().unwrap().len(), 1);
}
on_both!(previews_are_governed);
