//! Bad input gets a 4xx problem that says what was wrong, never a 5xx, and changes nothing.

use crate::helpers::*;
use crate::on_both;
use serde_json::json;

async fn bad_requests_are_problems_not_server_errors(db: Db) {
    let app = spawn_app_with(db, |s| s.server.body_limit_bytes = 4096).await;
    let w = world(&app).await;
    let a = &w.admin.auth;
    let url = |p: &str| format!("{}{}", app.address, p);
    let Auth::Token(token) = a.clone() else {
        panic!("token")
    };

    // Invalid JSON.
    let resp = app
        .client
        .post(url("/api/v1/sites"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let p: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(p["code"], "invalid_json");

    // Unknown fields are named.
    let p = app
        .post("/api/v1/sites", a, json!({"name": "X", "colour": "red"}))
        .await
        .expect(400);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown field `colour`"),
        "{p}"
    );

    // Oversize bodies, with the limit and the setting to change.
    let p = app
        .post("/api/v1/sites", a, json!({"name": "x".repeat(5000)}))
        .await
        .expect(413);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("server.body_limit_bytes"),
        "{p}"
    );

    // Not JSON at all.
    let resp = app
        .client
        .post(url("/api/v1/sites"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("name=x")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 415);

    // Malformed ids in the path, unknown ids, unknown routes.
    let p = app
        .get("/api/v1/studies/not-a-uuid", &w.researcher.auth)
        .await
        .expect(400);
    assert_eq!(p["code"], "invalid_path");
    app.get(
        &format!("/api/v1/studies/{}", uuid::Uuid::new_v4()),
        &w.researcher.auth,
    )
    .await
    .expect(404);
    app.get("/api/v1/nothing-here", a).await.expect(404);
    let p = app
        .get("/api/v1/audit/events?limit=abc", a)
        .await
        .expect(400);
    assert_eq!(p["code"], "invalid_query");

    // Every invalid field at once, in words.
    let p = app
        .post("/api/v1/studies", &w.researcher.auth, json!({
            "title": "  ", "protocol_text": "ok", "purpose": "bad\u{0}byte", "committee_id": uuid::Uuid::new_v4(),
            "sites": [{"site_id": w.site_a, "scope": {"modality": "CR", "body_part": "CHEST", "label": "x", "cases": 0}}]
        }))
        .await
        .expect(422);
    let errors: Vec<&str> = p["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors.contains(&"title must not be empty"));
    assert!(errors.contains(&"purpose must not contain control characters"));
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("committee_id: no committee with id"))
    );
    assert!(errors.contains(&"sites[0].scope.cases must be at least 1"));

    // A manifest that can't run is refused with its reasons.
    let sid = id_of(
        &app.post(
            "/api/v1/studies",
            &w.researcher.auth,
            study_body(&w, &[w.site_a]),
        )
        .await
        .expect(201),
    );
    let mut m = manifest(0.1);
    m["optimiser"]["name"] = json!("adam");
    m["rounds"] = json!(0);
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            &w.researcher.auth,
            json!({"manifest": m, "files": [{"name": "../x.py", "content_base64": "!!"}]}),
        )
        .await
        .expect(422);
    let errors: Vec<&str> = p["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    assert_eq!(
        errors,
        vec![
            "optimiser.name must be \"sgd\" or \"adamw\", not \"adam\"",
            "rounds must be between 1 and 10000, not 0",
            "files[0].name must be a plain file name, without folders",
            "files[0].content_base64 is not valid base64",
        ]
    );

    // Duplicate names are a conflict, not a database error.
    let p = app
        .post("/api/v1/sites", a, json!({"name": "North Hospital"}))
        .await
        .expect(409);
    assert_eq!(p["code"], "already_exists");

    // Nothing above changed anything: only the world's own events are in the log.
    let sites = app.get("/api/v1/sites", a).await.expect(200);
    assert_eq!(sites.as_array().map(Vec::len), Some(2));
    assert_eq!(
        app.get("/api/v1/studies", &w.researcher.auth)
            .await
            .expect(200)
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Control characters never reach the database (PostgreSQL refuses NUL in text).
    app.post(
        "/api/v1/auth/login",
        &Auth::None,
        json!({"email": "a\u{0}b@x.test", "password": "whatever it is"}),
    )
    .await
    .expect(401);
    let p = app
        .get("/api/v1/audit/events?actor=%00x", a)
        .await
        .expect(400);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("actor must be printable text")
    );
    let mut m = manifest(0.1);
    m["model"]["architecture"] = json!("small\u{0}cnn");
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            &w.researcher.auth,
            json!({"manifest": m}),
        )
        .await
        .expect(422);
    assert_eq!(
        p["errors"][0],
        "the manifest's text must not contain control characters"
    );

    // Unauthenticated and bad credentials.
    let p = app.get("/api/v1/studies", &Auth::None).await.expect(401);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("Authorization: Bearer")
    );
    app.get("/api/v1/studies", &Auth::Token("csm_wrong".into()))
        .await
        .expect(401);
    let resp = app
        .client
        .get(url("/api/v1/studies"))
        .header("Authorization", "Basic abc")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 401);
    let p = app
        .post(
            "/api/v1/auth/login",
            &Auth::None,
            json!({"email": w.admin.email, "password": "wrong password!"}),
        )
        .await
        .expect(401);
    assert_eq!(p["detail"], "The email or the password is wrong.");
}
on_both!(bad_requests_are_problems_not_server_errors);
