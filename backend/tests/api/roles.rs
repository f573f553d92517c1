//! Every role against every mutating operation: allowed (2xx) or 403, nothing else.
//! Each person signs in with a browser session, as they would in the portal.

use crate::helpers::*;
use crate::on_both;
use consilium_core::Role;
use reqwest::Method;
use serde_json::{Value, json};

struct Cast {
    sessions: Vec<(Role, Auth)>,
}

impl Cast {
    /// Tries `op` as every role; `allowed` must succeed (2xx), all others get 403.
    /// Returns the allowed role's response. The allowed role goes last so that the
    /// refused attempts run against the same state.
    async fn check(
        &self,
        app: &TestApp,
        op: &str,
        allowed: &[Role],
        method: Method,
        path: &str,
        body: impl Fn(Role) -> Value,
    ) -> Value {
        let mut result = Value::Null;
        let mut order: Vec<&(Role, Auth)> = self
            .sessions
            .iter()
            .filter(|(r, _)| !allowed.contains(r))
            .collect();
        order.extend(self.sessions.iter().filter(|(r, _)| allowed.contains(r)));
        for (role, auth) in order {
            let reply = app
                .call(method.clone(), path, auth, Some(body(*role)))
                .await;
            if allowed.contains(role) {
                assert!(
                    reply.status.is_success(),
                    "{op} as {role}: expected success, got {} {}",
                    reply.status,
                    reply.text
                );
                result = reply.body;
            } else {
                assert_eq!(
                    reply.status.as_u16(),
                    403,
                    "{op} as {role}: expected 403, got {}",
                    reply.text
                );
                reply.assert_problem();
                assert_eq!(reply.body["code"], "forbidden");
            }
        }
        result
    }
}

async fn every_role_against_every_mutating_operation(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let mut sessions = Vec::new();
    for (role, p) in [
        (Role::Administrator, &w.admin),
        (Role::CommitteeMember, &w.member),
        (Role::Researcher, &w.researcher),
        (Role::Custodian, &w.custodian_a),
        (Role::Auditor, &w.auditor),
    ] {
        sessions.push((role, Auth::Cookie(app.sign_in(&p.email).await)));
    }
    let cast = Cast { sessions };
    use Role::*;

    let user = cast
        .check(
            &app,
            "create user",
            &[Administrator],
            Method::POST,
            "/api/v1/users",
            |r| json!({"email": format!("new-{r}@x.test"), "name": "New", "roles": ["auditor"]}),
        )
        .await;
    cast.check(
        &app,
        "set roles",
        &[Administrator],
        Method::PUT,
        &format!("/api/v1/users/{}/roles", id_of(&user)),
        |_| json!({"roles": ["researcher"]}),
    )
    .await;
    cast.check(
        &app,
        "create site",
        &[Administrator],
        Method::POST,
        "/api/v1/sites",
        |r| json!({"name": format!("Site {r}")}),
    )
    .await;
    cast.check(
        &app,
        "set custodians",
        &[Administrator],
        Method::PUT,
        &format!("/api/v1/sites/{}/custodians", w.site_a),
        |_| json!({"custodians": [w.custodian_a.id]}),
    )
    .await;
    let committee = cast
        .check(
            &app,
            "create committee",
            &[Administrator],
            Method::POST,
            "/api/v1/committees",
            |r| json!({"name": format!("Board {r}")}),
        )
        .await;
    cast.check(
        &app,
        "set members",
        &[Administrator],
        Method::PUT,
        &format!("/api/v1/committees/{}/members", id_of(&committee)),
        |_| json!({"members": [w.member2.id]}),
    )
    .await;
    let study = cast
        .check(
            &app,
            "create study",
            &[Researcher],
            Method::POST,
            "/api/v1/studies",
            |_| study_body(&w, &[w.site_a]),
        )
        .await;
    let sid = id_of(&study);
    cast.check(
        &app,
        "update study",
        &[Researcher],
        Method::PATCH,
        &format!("/api/v1/studies/{sid}"),
        |_| json!({"title": "Renamed"}),
    )
    .await;
    cast.check(
        &app,
        "submit plan",
        &[Researcher],
        Method::POST,
        &format!("/api/v1/studies/{sid}/plans"),
        |_| json!({"manifest": manifest(0.05)}),
    )
    .await;
    cast.check(
        &app,
        "submit study",
        &[Researcher],
        Method::POST,
        &format!("/api/v1/studies/{sid}/submit"),
        |_| json!({}),
    )
    .await;
    cast.check(
        &app,
        "review study",
        &[CommitteeMember],
        Method::POST,
        &format!("/api/v1/studies/{sid}/reviews"),
        |_| json!({"decision": "approve", "comments": "ok", "expires_at": in_days(10)}),
    )
    .await;
    let request = cast
        .check(
            &app,
            "request access",
            &[Researcher],
            Method::POST,
            &format!("/api/v1/studies/{sid}/access-requests"),
            |_| json!({"site_id": w.site_a, "justification": "training"}),
        )
        .await;
    let rid = id_of(&request);
    cast.check(
        &app,
        "decide access",
        &[Custodian],
        Method::POST,
        &format!("/api/v1/access-requests/{rid}/decision"),
        |_| json!({"decision": "approve", "expires_at": in_days(10)}),
    )
    .await;
    cast.check(
        &app,
        "create run",
        &[Researcher],
        Method::POST,
        &format!("/api/v1/studies/{sid}/runs"),
        |_| json!({}),
    )
    .await;
    cast.check(
        &app,
        "revoke access",
        &[Custodian],
        Method::POST,
        &format!("/api/v1/access-requests/{rid}/revoke"),
        |_| json!({"reason": "withdrawn"}),
    )
    .await;
    let everyone = [
        Administrator,
        CommitteeMember,
        Researcher,
        Custodian,
        Auditor,
    ];
    cast.check(
        &app,
        "create token",
        &everyone,
        Method::POST,
        "/api/v1/tokens",
        |r| json!({"name": "ci", "roles": [r], "expires_at": in_days(1)}),
    )
    .await;

    // Reading the audit trail is for administrators and auditors.
    for (role, auth) in &cast.sessions {
        let status = app.get("/api/v1/audit/verify", auth).await.status.as_u16();
        let expected = if matches!(role, Administrator | Auditor) {
            200
        } else {
            403
        };
        assert_eq!(status, expected, "audit as {role}");
    }
    // A site's heartbeat: its custodians, administrators and auditors (no worker has reported
    // yet, which they learn); everybody else is refused.
    for (role, auth) in &cast.sessions {
        let reply = app
            .get(&format!("/api/v1/sites/{}/heartbeat", w.site_a), auth)
            .await;
        let expected = if matches!(role, Administrator | Auditor | Custodian) {
            404
        } else {
            403
        };
        assert_eq!(
            reply.status.as_u16(),
            expected,
            "heartbeat as {role}: {}",
            reply.text
        );
    }
    // Token management needs a signed-in person: no API token lists or revokes tokens.
    for p in [
        &w.admin,
        &w.member,
        &w.researcher,
        &w.custodian_a,
        &w.auditor,
    ] {
        app.get("/api/v1/tokens", &p.auth).await.expect(403);
    }
}
on_both!(every_role_against_every_mutating_operation);
