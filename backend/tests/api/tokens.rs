//! API tokens: shown once, stored hashed, scoped, expiring, revocable.

use crate::helpers::*;
use crate::on_both;
use consilium_core::Role;
use sea_orm::{ConnectionTrait, Statement};
use serde_json::json;

async fn api_tokens_are_scoped_expire_and_can_be_revoked(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let both = app
        .person("bea@uni.test", &[Role::Researcher, Role::Auditor])
        .await;
    let session = Auth::Cookie(app.sign_in(&both.email).await);

    // A token scoped to auditing only.
    let created = app
        .post(
            "/api/v1/tokens",
            &session,
            json!({"name": "reporting", "roles": ["auditor"], "expires_at": in_days(7)}),
        )
        .await
        .expect(201);
    let secret = created["token"].as_str().expect("secret").to_string();
    assert!(secret.starts_with("csm_") && secret.len() > 40);
    let scoped = Auth::Token(secret.clone());
    assert_eq!(
        app.get("/api/v1/auth/me", &scoped).await.expect(200)["acting_roles"],
        json!(["auditor"])
    );
    app.get("/api/v1/audit/verify", &scoped).await.expect(200);
    app.post("/api/v1/studies", &scoped, study_body(&w, &[w.site_a]))
        .await
        .expect(403);

    // Shown once: listings never carry the secret, and the database holds only its hash.
    let listed = app.get("/api/v1/tokens", &session).await.expect(200);
    assert!(!listed.to_string().contains(&secret));
    let backend = app.ctx.db.get_database_backend();
    let row = app
        .ctx
        .db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT token_hash FROM api_tokens WHERE name = 'reporting'".to_string(),
        ))
        .await
        .expect("query")
        .expect("row");
    let stored: String = row.try_get("", "token_hash").expect("hash");
    assert_eq!(stored, consilium_core::hash::sha256_hex(secret.as_bytes()));

    // Roles the owner does not hold, past expiry dates, tokens minting tokens: refused.
    let p = app
        .post(
            "/api/v1/tokens",
            &session,
            json!({"name": "x", "roles": ["administrator"], "expires_at": in_days(7)}),
        )
        .await
        .expect(422);
    assert_eq!(
        p["errors"][0],
        "roles: you do not hold the administrator role, so a token can't carry it"
    );
    app.post(
        "/api/v1/tokens",
        &session,
        json!({"name": "x", "roles": ["auditor"], "expires_at": in_days(-1)}),
    )
    .await
    .expect(422);
    app.post(
        "/api/v1/tokens",
        &scoped,
        json!({"name": "x", "roles": ["auditor"], "expires_at": in_days(1)}),
    )
    .await
    .expect(403);

    // Another user can't revoke it; its owner can, and it stops working at once.
    let tid = created["info"]["id"].as_str().expect("id").to_string();
    let other_session = Auth::Cookie(app.sign_in(&w.researcher.email).await);
    app.call(
        reqwest::Method::DELETE,
        &format!("/api/v1/tokens/{tid}"),
        &other_session,
        None,
    )
    .await
    .expect(404);
    // Nor can a token (of anybody) manage tokens: not list, not revoke another.
    app.get("/api/v1/tokens", &w.researcher.auth)
        .await
        .expect(403);
    app.call(
        reqwest::Method::DELETE,
        &format!("/api/v1/tokens/{tid}"),
        &w.researcher.auth,
        None,
    )
    .await
    .expect(403);
    let revoked = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{tid}"),
            &session,
            None,
        )
        .await
        .expect(200);
    assert!(revoked["revoked_at"].is_string());
    let p = app.get("/api/v1/auth/me", &scoped).await.expect(401);
    assert!(p["detail"].as_str().unwrap_or_default().contains("revoked"));

    // An expired token is refused with a reason.
    let other = app
        .post(
            "/api/v1/tokens",
            &session,
            json!({"name": "short", "roles": ["researcher"], "expires_at": in_days(1)}),
        )
        .await
        .expect(201);
    app.ctx
        .db
        .execute_raw(Statement::from_string(
            backend,
            "UPDATE api_tokens SET expires_at = created_at WHERE name = 'short'",
        ))
        .await
        .expect("expire");
    let p = app
        .get(
            "/api/v1/auth/me",
            &Auth::Token(other["token"].as_str().expect("t").into()),
        )
        .await
        .expect(401);
    assert!(p["detail"].as_str().unwrap_or_default().contains("expired"));

    // A token loses a role its owner loses.
    let rt = app
        .post(
            "/api/v1/tokens",
            &session,
            json!({"name": "research", "roles": ["researcher"], "expires_at": in_days(1)}),
        )
        .await
        .expect(201);
    let rt = Auth::Token(rt["token"].as_str().expect("t").into());
    app.call(
        reqwest::Method::PUT,
        &format!("/api/v1/users/{}/roles", both.id),
        &w.admin.auth,
        Some(json!({"roles": ["auditor"]})),
    )
    .await
    .expect(200);
    assert_eq!(
        app.get("/api/v1/auth/me", &rt).await.expect(200)["acting_roles"],
        json!([])
    );
}
on_both!(api_tokens_are_scoped_expire_and_can_be_revoked);
