//! The governance lifecycle through the REST API, as the people involved would walk it.

use crate::helpers::*;
use crate::on_both;
use base64::Engine;
use serde_json::{Value, json};

fn unmet(report: &Value) -> Vec<String> {
    report["unmet"]
        .as_array()
        .expect("unmet")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

async fn governed_study_from_draft_to_run(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let r = &w.researcher.auth;

    // 2. The researcher drafts a study for two sites.
    let study = app
        .post("/api/v1/studies", r, study_body(&w, &[w.site_a, w.site_b]))
        .await
        .expect(201);
    assert_eq!(study["status"], "draft");
    assert_eq!(study["protocol_version"], 1);
    let sid = id_of(&study);

    // A study can't go to the committee without its code.
    let refused = app
        .post(&format!("/api/v1/studies/{sid}/submit"), r, json!({}))
        .await
        .expect(409);
    assert_eq!(refused["code"], "plan_missing");

    // 3. The training plan: manifest plus a file; the server hashes it.
    let file = base64::engine::general_purpose::STANDARD.encode(b"import consilium\n");
    let plan = app
        .post(&format!("/api/v1/studies/{sid}/plans"), r, json!({"manifest": manifest(0.01), "files": [{"name": "train.py", "content_base64": file}]}))
        .await
        .expect(201);
    let h1 = plan["hash"].as_str().expect("hash").to_string();
    assert_eq!(h1.len(), 64);
    assert_eq!(plan["version"], 1);
    assert_eq!(plan["files"][0]["name"], "train.py");
    assert_eq!(plan["files"][0]["size"], 17);
    // The same plan, keys in another order, is the same hash: nothing new to submit.
    let mut reordered = serde_json::Map::new();
    for (k, v) in manifest(0.01).as_object().expect("object").iter().rev() {
        reordered.insert(k.clone(), v.clone());
    }
    let same = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            r,
            json!({"files": [{"content_base64": file, "name": "train.py"}], "manifest": reordered}),
        )
        .await
        .expect(409);
    assert_eq!(same["code"], "plan_unchanged");
    assert!(same["detail"].as_str().unwrap_or_default().contains(&h1));
    // Carrying the attachment forward by name is the same plan too; a name version 1 lacks
    // is refused with what it has.
    let kept = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            r,
            json!({"manifest": manifest(0.01), "keep_files": ["train.py"]}),
        )
        .await
        .expect(409);
    assert_eq!(kept["code"], "plan_unchanged");
    let unknown = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            r,
            json!({"manifest": manifest(0.01), "keep_files": ["model.py"]}),
        )
        .await
        .expect(422);
    let detail = unknown["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("\"model.py\"") && detail.contains("\"train.py\""),
        "{detail}"
    );

    let report = app
        .get(&format!("/api/v1/studies/{sid}/preflight"), r)
        .await
        .expect(200);
    assert_eq!(report["ready"], false);
    assert_eq!(
        unmet(&report)[0],
        "The study is draft; it must be approved by its ethics committee."
    );

    let submitted = app
        .post(&format!("/api/v1/studies/{sid}/submit"), r, json!({}))
        .await
        .expect(200);
    assert_eq!(submitted["status"], "submitted");

    // 4. The committee reviews: a researcher can't; an approval needs an expiry.
    app.post(
        &format!("/api/v1/studies/{sid}/reviews"),
        r,
        json!({"decision": "approve", "comments": "fine", "expires_at": in_days(30)}),
    )
    .await
    .expect(403);
    let missing = app
        .post(
            &format!("/api/v1/studies/{sid}/reviews"),
            &w.member.auth,
            json!({"decision": "approve", "comments": "fine"}),
        )
        .await
        .expect(422);
    assert!(
        missing["errors"][0]
            .as_str()
            .unwrap_or_default()
            .contains("expires_at is required")
    );
    let review = app
        .post(
            &format!("/api/v1/studies/{sid}/reviews"),
            &w.member.auth,
            json!({"decision": "approve", "comments": "Sound protocol.", "conditions": "Report adverse findings.", "expires_at": in_days(365)}),
        )
        .await
        .expect(201);
    assert_eq!(review["protocol_version"], 1);
    assert_eq!(review["plan_hashes"], json!([h1]));
    let again = app
        .post(
            &format!("/api/v1/studies/{sid}/reviews"),
            &w.member2.auth,
            json!({"decision": "approve", "comments": "x", "expires_at": in_days(30)}),
        )
        .await
        .expect(409);
    assert_eq!(again["code"], "invalid_state");
    assert_eq!(
        app.get(&format!("/api/v1/studies/{sid}"), r)
            .await
            .expect(200)["status"],
        "approved"
    );

    // 6. Approved, but no site has granted access yet: the run is refused with the reasons.
    let report = app
        .get(&format!("/api/v1/studies/{sid}/preflight"), r)
        .await
        .expect(200);
    assert_eq!(
        unmet(&report),
        vec![
            "Site North Hospital: no data-access request has been filed.".to_string(),
            "Site South Hospital: no data-access request has been filed.".to_string(),
        ]
    );
    let refused = app
        .post(&format!("/api/v1/studies/{sid}/runs"), r, json!({}))
        .await
        .expect(409);
    assert_eq!(refused["code"], "preconditions_unmet");
    assert_eq!(refused["errors"], report["unmet"]);

    // 5. Data access, per site, decided by that site's custodian only.
    let req_a = app
        .post(
            &format!("/api/v1/studies/{sid}/access-requests"),
            r,
            json!({"site_id": w.site_a, "justification": "Model training"}),
        )
        .await
        .expect(201);
    assert_eq!(req_a["status"], "pending");
    assert_eq!(req_a["plan_hashes"], json!([h1]));
    let req_b = app
        .post(
            &format!("/api/v1/studies/{sid}/access-requests"),
            r,
            json!({"site_id": w.site_b, "justification": "Model training"}),
        )
        .await
        .expect(201);
    let (a_id, b_id) = (id_of(&req_a), id_of(&req_b));
    let foreign = app
        .post(
            &format!("/api/v1/access-requests/{a_id}/decision"),
            &w.custodian_b.auth,
            json!({"decision": "approve", "expires_at": in_days(90)}),
        )
        .await
        .expect(403);
    assert!(
        foreign["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("North Hospital")
    );
    let narrowed = app
        .post(
            &format!("/api/v1/access-requests/{a_id}/decision"),
            &w.custodian_a.auth,
            json!({"decision": "approve", "expires_at": in_days(90), "scope": {"modality": "CR", "body_part": "CHEST", "label": "nodule", "cases": 150}, "comment": "150 cases available"}),
        )
        .await
        .expect(200);
    assert_eq!(narrowed["status"], "approved");
    assert_eq!(narrowed["scope"]["cases"], 150);
    app.post(
        &format!("/api/v1/access-requests/{b_id}/decision"),
        &w.custodian_b.auth,
        json!({"decision": "deny", "comment": "Not now"}),
    )
    .await
    .expect(200);
    // A custodian sees only their own site's requests.
    let seen_b = app
        .get("/api/v1/access-requests", &w.custodian_b.auth)
        .await
        .expect(200);
    assert_eq!(seen_b.as_array().map(Vec::len), Some(1));
    assert_eq!(seen_b[0]["site_id"], json!(w.site_b));
    app.get(
        &format!("/api/v1/access-requests/{a_id}"),
        &w.custodian_b.auth,
    )
    .await
    .expect(404);

    let report = app
        .get(&format!("/api/v1/studies/{sid}/preflight"), r)
        .await
        .expect(200);
    assert_eq!(
        unmet(&report),
        vec!["Site South Hospital: the custodian denied data access.".to_string()]
    );

    let req_b2 = app
        .post(
            &format!("/api/v1/studies/{sid}/access-requests"),
            r,
            json!({"site_id": w.site_b, "justification": "Resubmitted with safeguards"}),
        )
        .await
        .expect(201);
    app.post(
        &format!("/api/v1/studies/{sid}/access-requests"),
        r,
        json!({"site_id": w.site_b, "justification": "twice"}),
    )
    .await
    .expect(409);
    app.post(
        &format!("/api/v1/access-requests/{}/decision", id_of(&req_b2)),
        &w.custodian_b.auth,
        json!({"decision": "approve", "expires_at": in_days(90)}),
    )
    .await
    .expect(200);

    // 6. Everything in force: the run records the approvals it stands on.
    let report = app
        .get(&format!("/api/v1/studies/{sid}/preflight"), r)
        .await
        .expect(200);
    assert_eq!(report["ready"], true, "{report}");
    let run = app
        .post(&format!("/api/v1/studies/{sid}/runs"), r, json!({}))
        .await
        .expect(201);
    assert_eq!(run["plan_hash"], json!(h1));
    assert_eq!(run["review_id"], review["id"]);
    assert_eq!(run["grant_ids"], json!([a_id, id_of(&req_b2)]));

    // 4. An amendment of the protocol needs a new decision.
    let amended = app
        .call(
            reqwest::Method::PATCH,
            &format!("/api/v1/studies/{sid}"),
            r,
            Some(json!({"protocol_text": "Now also lateral views."})),
        )
        .await
        .expect(200);
    assert_eq!(amended["status"], "draft");
    assert_eq!(amended["protocol_version"], 2);
    let report = app
        .get(&format!("/api/v1/studies/{sid}/preflight"), r)
        .await
        .expect(200);
    assert_eq!(
        unmet(&report),
        vec![
            "The study is draft; it must be approved by its ethics committee.".to_string(),
            "The ethics approval covers protocol version 1; the protocol is now version 2 and needs a new decision.".to_string(),
        ]
    );
    app.post(&format!("/api/v1/studies/{sid}/submit"), r, json!({}))
        .await
        .expect(200);
    app.post(
        &format!("/api/v1/studies/{sid}/reviews"),
        &w.member2.auth,
        json!({"decision": "approve", "comments": "Amendment fine.", "expires_at": in_days(200)}),
    )
    .await
    .expect(201);
    assert_eq!(
        app.get(&format!("/api/v1/studies/{sid}/preflight"), r)
            .await
            .expect(200)["ready"],
        true
    );

    // A new plan version is new code: the study needs a new decision and the sites new grants.
    let plan2 = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            r,
            json!({"manifest": manifest(0.02)}),
        )
        .await
        .expect(201);
    assert_eq!(plan2["version"], 2);
    let h2 = plan2["hash"].as_str().expect("hash").to_string();
    assert_ne!(h1, h2);
    app.post(&format!("/api/v1/studies/{sid}/submit"), r, json!({}))
        .await
        .expect(200);
    app.post(
        &format!("/api/v1/studies/{sid}/reviews"),
        &w.member.auth,
        json!({"decision": "approve", "comments": "ok", "expires_at": in_days(200)}),
    )
    .await
    .expect(201);
    let report = app
        .get(&format!("/api/v1/studies/{sid}/preflight"), r)
        .await
        .expect(200);
    let short = &h2[..12];
    assert_eq!(
        unmet(&report),
        vec![
            format!(
                "Site North Hospital: the data-access grant does not cover training plan {short}."
            ),
            format!(
                "Site South Hospital: the data-access grant does not cover training plan {short}."
            ),
        ]
    );
    // The first plan stays runnable: the amendment decision and the grants that cover it still stand.
    let old = app
        .get(
            &format!("/api/v1/studies/{sid}/preflight?plan_hash={h1}"),
            r,
        )
        .await
        .expect(200);
    assert_eq!(old["ready"], true, "{old}");

    // 5. Revocation stops new runs at once.
    app.post(
        &format!("/api/v1/access-requests/{a_id}/revoke"),
        &w.custodian_a.auth,
        json!({"reason": "Consent withdrawn"}),
    )
    .await
    .expect(200);
    let old = app
        .get(
            &format!("/api/v1/studies/{sid}/preflight?plan_hash={h1}"),
            r,
        )
        .await
        .expect(200);
    assert_eq!(
        unmet(&old),
        vec!["Site North Hospital: the custodian revoked data access.".to_string()]
    );

    // 7. Every step is in the audit trail, and the chain holds.
    let events = app
        .get(
            &format!("/api/v1/audit/events?object_id={sid}&limit=1000"),
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let actions: Vec<&str> = events
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        vec![
            "study.created",
            "study.submitted",
            "study.approved",
            "study.amended",
            "study.submitted",
            "study.approved",
            "study.amended",
            "study.submitted",
            "study.approved"
        ]
    );
    assert!(
        events[0]["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{} via token ", w.researcher.id))),
        "{}",
        events[0]
    );
    let verified = app
        .get("/api/v1/audit/verify", &w.auditor.auth)
        .await
        .expect(200);
    assert_eq!(verified["ok"], true, "{verified}");
}
on_both!(governed_study_from_draft_to_run);

async fn a_rejected_study_cannot_be_approved(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let r = &w.researcher.auth;
    let sid = id_of(
        &app.post("/api/v1/studies", r, study_body(&w, &[w.site_a]))
            .await
            .expect(201),
    );
    app.post(
        &format!("/api/v1/studies/{sid}/plans"),
        r,
        json!({"manifest": manifest(0.1)}),
    )
    .await
    .expect(201);
    app.post(&format!("/api/v1/studies/{sid}/submit"), r, json!({}))
        .await
        .expect(200);
    app.post(
        &format!("/api/v1/studies/{sid}/reviews"),
        &w.member.auth,
        json!({"decision": "reject", "comments": "No consent basis."}),
    )
    .await
    .expect(201);
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/reviews"),
            &w.member.auth,
            json!({"decision": "approve", "comments": "oops", "expires_at": in_days(5)}),
        )
        .await
        .expect(409);
    assert_eq!(p["code"], "invalid_state");
    assert_eq!(
        p["detail"],
        "The study is rejected; only a submitted study can be reviewed."
    );
    let p = app
        .post(&format!("/api/v1/studies/{sid}/submit"), r, json!({}))
        .await
        .expect(409);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("rejected")
    );
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            r,
            json!({"manifest": manifest(0.3)}),
        )
        .await
        .expect(409);
    assert_eq!(p["code"], "invalid_state");
}
on_both!(a_rejected_study_cannot_be_approved);

async fn nobody_reviews_their_own_study(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    // A committee member who is also a researcher drafts a study for their own committee.
    let both = app
        .person(
            "dual@ethics.test",
            &[
                consilium_core::Role::Researcher,
                consilium_core::Role::CommitteeMember,
            ],
        )
        .await;
    app.call(
        reqwest::Method::PUT,
        &format!("/api/v1/committees/{}/members", w.committee),
        &w.admin.auth,
        Some(json!({"members": [w.member.id, both.id]})),
    )
    .await
    .expect(200);
    let sid = id_of(
        &app.post("/api/v1/studies", &both.auth, study_body(&w, &[w.site_a]))
            .await
            .expect(201),
    );
    app.post(
        &format!("/api/v1/studies/{sid}/plans"),
        &both.auth,
        json!({"manifest": manifest(0.1)}),
    )
    .await
    .expect(201);
    app.post(
        &format!("/api/v1/studies/{sid}/submit"),
        &both.auth,
        json!({}),
    )
    .await
    .expect(200);
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/reviews"),
            &both.auth,
            json!({"decision": "approve", "comments": "mine", "expires_at": in_days(5)}),
        )
        .await
        .expect(403);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("Nobody reviews their own study")
    );
    // A member of another committee may not decide either.
    let outsider = app
        .person(
            "olga@other-ethics.test",
            &[consilium_core::Role::CommitteeMember],
        )
        .await;
    app.post(
        &format!("/api/v1/studies/{sid}/reviews"),
        &outsider.auth,
        json!({"decision": "approve", "comments": "x", "expires_at": in_days(5)}),
    )
    .await
    .expect(404);
    // The other researcher can't even see it.
    app.get(&format!("/api/v1/studies/{sid}"), &w.other_researcher.auth)
        .await
        .expect(404);
}
on_both!(nobody_reviews_their_own_study);
