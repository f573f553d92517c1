//! The audit log is a hash chain: editing a row is detected and the event named.

use crate::helpers::*;
use crate::on_both;
use sea_orm::{ConnectionTrait, Statement};

async fn an_edited_audit_row_is_named_by_verify(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let ok = app
        .get("/api/v1/audit/verify", &w.auditor.auth)
        .await
        .expect(200);
    assert_eq!(ok["ok"], true);
    let total = ok["events_checked"].as_u64().expect("count");
    assert!(
        total >= 11,
        "the world's users, tokens, committee and sites: {total}"
    );

    // Exports: one JSON line per event; CSV with a header.
    let resp = app
        .client
        .get(format!("{}/api/v1/audit/export", app.address))
        .bearer_auth(token(&w.auditor))
        .send()
        .await
        .expect("export");
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let jsonl = resp.text().await.expect("body");
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len() as u64, total);
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[0]["prev_hash"], "0".repeat(64));
    assert_eq!(lines[1]["prev_hash"], lines[0]["hash"]);
    let csv = app
        .client
        .get(format!("{}/api/v1/audit/export?format=csv", app.address))
        .bearer_auth(token(&w.auditor))
        .send()
        .await
        .expect("csv")
        .text()
        .await
        .expect("body");
    let mut rows = csv.lines();
    assert_eq!(
        rows.next(),
        Some("seq,id,at,actor,action,object_type,object_id,digest,prev_hash,hash")
    );
    assert_eq!(rows.count() as u64, total);

    // Someone with database access rewrites event 3.
    let backend = app.ctx.db.get_database_backend();
    app.ctx
        .db
        .execute_raw(Statement::from_string(
            backend,
            "UPDATE audit_events SET action = 'user.deleted' WHERE seq = 3",
        ))
        .await
        .expect("tamper");
    let broken = app
        .get("/api/v1/audit/verify", &w.auditor.auth)
        .await
        .expect(200);
    assert_eq!(broken["ok"], false);
    assert_eq!(broken["first_broken"]["seq"], 3);
    assert_eq!(broken["first_broken"]["id"], lines[2]["id"]);
    assert!(
        broken["first_broken"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("altered"),
        "{broken}"
    );

    // Deleting an event is detected too (at the event after the gap).
    app.ctx
        .db
        .execute_raw(Statement::from_string(
            backend,
            "UPDATE audit_events SET action = 'user.created' WHERE seq = 3",
        ))
        .await
        .expect("restore");
    assert_eq!(
        app.get("/api/v1/audit/verify", &w.auditor.auth)
            .await
            .expect(200)["ok"],
        true
    );
    app.ctx
        .db
        .execute_raw(Statement::from_string(
            backend,
            "DELETE FROM audit_events WHERE seq = 5",
        ))
        .await
        .expect("delete");
    let gap = app
        .get("/api/v1/audit/verify", &w.auditor.auth)
        .await
        .expect(200);
    assert_eq!(gap["first_broken"]["seq"], 6);
    assert!(
        gap["first_broken"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("missing"),
        "{gap}"
    );
}
on_both!(an_edited_audit_row_is_named_by_verify);

/// The trail is explored a page at a time, newest first, by action, person and dates, and the
/// filtered view exports as shown.
async fn the_trail_is_filtered_paged_and_exported_as_filtered(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let all = app
        .get("/api/v1/audit/events?limit=1000", &w.auditor.auth)
        .await
        .expect(200);
    let all = all.as_array().expect("events").clone();
    let n = all.len() as i64;
    assert!(n >= 11, "{n}");

    // The page before event n: the 3 newest before it, still in log order.
    let page = app
        .get(
            &format!("/api/v1/audit/events?before_seq={n}&limit=3"),
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let seqs: Vec<i64> = page
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, [n - 3, n - 2, n - 1]);
    let both = app
        .get(
            "/api/v1/audit/events?before_seq=5&after_seq=1",
            &w.auditor.auth,
        )
        .await
        .expect(400);
    assert!(
        both["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("not both")
    );

    // By action and by dates: today holds them all, tomorrow none; a range backwards is
    // refused with the reason.
    let created = app
        .get(
            "/api/v1/audit/events?action=user.created&limit=1000",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let users = created.as_array().expect("events").len();
    assert!(users >= 4 && (users as i64) < n, "{users} of {n}");
    let today = chrono::Utc::now().date_naive();
    let tomorrow = today.succ_opt().expect("tomorrow");
    let in_range = |from: chrono::NaiveDate, to: chrono::NaiveDate| {
        format!("/api/v1/audit/events?limit=1000&from={from}T00:00:00Z&to={to}T00:00:00Z")
    };
    let got = app
        .get(&in_range(today, tomorrow), &w.auditor.auth)
        .await
        .expect(200);
    assert_eq!(got.as_array().map(Vec::len), Some(all.len()));
    let none = app
        .get(
            &in_range(tomorrow, tomorrow.succ_opt().expect("day after")),
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert_eq!(none.as_array().map(Vec::len), Some(0));
    let backwards = app
        .get(&in_range(tomorrow, today), &w.auditor.auth)
        .await
        .expect(400);
    assert!(
        backwards["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("must be before"),
        "{backwards}"
    );

    // The export of that filter holds exactly the filtered events.
    let export = app
        .client
        .get(format!(
            "{}/api/v1/audit/export?format=csv&action=user.created",
            app.address
        ))
        .bearer_auth(token(&w.auditor))
        .send()
        .await
        .expect("export")
        .text()
        .await
        .expect("body");
    let rows: Vec<&str> = export.lines().skip(1).collect();
    assert_eq!(rows.len(), users);
    assert!(
        rows.iter().all(|r| r.contains(",user.created,")),
        "{export}"
    );
    let refused = app
        .client
        .get(format!(
            "{}/api/v1/audit/export?format=signatures&action=user.created",
            app.address
        ))
        .bearer_auth(token(&w.auditor))
        .send()
        .await
        .expect("export");
    assert_eq!(refused.status().as_u16(), 400);
}
on_both!(the_trail_is_filtered_paged_and_exported_as_filtered);
