//! The append-only, hash-chained audit log. Each event's hash covers its content and the
//! previous event's hash, so editing, deleting or reordering any row breaks the chain from
//! that row on, and `verify` names the first broken event.

use chrono::{DateTime, SecondsFormat, Utc};
use consilium_core::api::{AuditEventDto, AuditQuery, AuditVerification, BrokenEvent};
use consilium_core::hash::{canonical_sha256, sha256_hex};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::Actor;
use crate::entities::audit_event;
use crate::error::{AppError, AppResult};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Timestamps are kept to the microsecond, which both SQLite and PostgreSQL store exactly.
fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let micros = t.timestamp_micros();
    DateTime::from_timestamp_micros(micros).unwrap_or(t)
}

#[derive(Serialize)]
struct Hashed<'a> {
    seq: i64,
    id: Uuid,
    at: String,
    actor: &'a str,
    action: &'a str,
    object_type: &'a str,
    object_id: &'a str,
    digest: &'a str,
    prev_hash: &'a str,
}

fn event_hash(e: &audit_event::Model) -> AppResult<String> {
    Ok(canonical_sha256(&Hashed {
        seq: e.seq,
        id: e.id,
        at: e.at.to_rfc3339_opts(SecondsFormat::Micros, true),
        actor: &e.actor,
        action: &e.action,
        object_type: &e.object_type,
        object_id: &e.object_id,
        digest: &e.digest,
        prev_hash: &e.prev_hash,
    })?)
}

/// Appends one event inside the caller's write transaction (see `AppContext::begin_write`).
/// `new_state` is the object as it is after the change; its canonical SHA-256 is the digest.
pub async fn append<C: ConnectionTrait, S: Serialize>(
    db: &C,
    actor: &Actor,
    action: &str,
    object_type: &str,
    object_id: impl ToString,
    new_state: &S,
) -> AppResult<AuditEventDto> {
    append_named(
        db,
        &actor.audit_name(),
        action,
        object_type,
        object_id,
        new_state,
    )
    .await
}

/// Appends an event whose actor is not a signed-in one (a failed sign-in, a refused request
/// without credentials): `actor` says who it was, e.g. `anonymous from 10.0.0.7`.
pub async fn append_named<C: ConnectionTrait, S: Serialize>(
    db: &C,
    actor: &str,
    action: &str,
    object_type: &str,
    object_id: impl ToString,
    new_state: &S,
) -> AppResult<AuditEventDto> {
    let last = audit_event::Entity::find()
        .order_by_desc(audit_event::Column::Seq)
        .one(db)
        .await?;
    let (seq, prev_hash) = match last {
        Some(l) => (l.seq + 1, l.hash),
        None => (1, GENESIS.to_string()),
    };
    let mut event = audit_event::Model {
        seq,
        id: Uuid::new_v4(),
        at: truncate_micros(Utc::now()),
        actor: actor.to_string(),
        action: action.to_string(),
        object_type: object_type.to_string(),
        object_id: object_id.to_string(),
        digest: canonical_sha256(new_state)?,
        prev_hash,
        hash: String::new(),
    };
    event.hash = event_hash(&event)?;
    let active = audit_event::ActiveModel {
        seq: Set(event.seq),
        id: Set(event.id),
        at: Set(event.at),
        actor: Set(event.actor.clone()),
        action: Set(event.action.clone()),
        object_type: Set(event.object_type.clone()),
        object_id: Set(event.object_id.clone()),
        digest: Set(event.digest.clone()),
        prev_hash: Set(event.prev_hash.clone()),
        hash: Set(event.hash.clone()),
    };
    audit_event::Entity::insert(active)
        .exec_without_returning(db)
        .await?;
    tracing::info!(seq, action, object_type, object_id = %event.object_id, "audit event");
    Ok(to_dto(event))
}

pub fn to_dto(e: audit_event::Model) -> AuditEventDto {
    AuditEventDto {
        seq: e.seq,
        id: e.id,
        at: e.at,
        actor: e.actor,
        action: e.action,
        object_type: e.object_type,
        object_id: e.object_id,
        digest: e.digest,
        prev_hash: e.prev_hash,
        hash: e.hash,
    }
}

/// Checks a filter's values; says which one is wrong and how.
fn check_filter(q: &AuditQuery) -> AppResult<()> {
    for (name, value) in [
        ("actor", &q.actor),
        ("action", &q.action),
        ("object_type", &q.object_type),
        ("object_id", &q.object_id),
    ] {
        if value
            .as_deref()
            .is_some_and(|v| v.chars().any(char::is_control) || v.len() > 200)
        {
            return Err(AppError::Invalid(format!(
                "{name} must be printable text of at most 200 characters."
            )));
        }
    }
    if let (Some(from), Some(to)) = (q.from, q.to)
        && from >= to
    {
        return Err(AppError::Invalid(format!(
            "from ({}) must be before to ({}).",
            from.to_rfc3339(),
            to.to_rfc3339()
        )));
    }
    Ok(())
}

/// The events a filter selects (actor, action, object, time), in no order yet.
fn filtered(q: &AuditQuery) -> sea_orm::Select<audit_event::Entity> {
    let mut select = audit_event::Entity::find();
    if let Some(v) = &q.actor {
        // A user id matches every credential it acted with (`<id> via session`, `<id> via
        // token …`); the full name matches itself.
        select = select.filter(
            sea_orm::Condition::any()
                .add(audit_event::Column::Actor.eq(v.as_str()))
                .add(audit_event::Column::Actor.starts_with(format!("{v} "))),
        );
    }
    if let Some(v) = &q.action {
        select = select.filter(audit_event::Column::Action.eq(v.as_str()));
    }
    if let Some(v) = &q.object_type {
        select = select.filter(audit_event::Column::ObjectType.eq(v.as_str()));
    }
    if let Some(v) = &q.object_id {
        select = select.filter(audit_event::Column::ObjectId.eq(v.as_str()));
    }
    if let Some(from) = q.from {
        select = select.filter(audit_event::Column::At.gte(from));
    }
    if let Some(to) = q.to {
        select = select.filter(audit_event::Column::At.lt(to));
    }
    select
}

/// Events matching a filter, in log order: the first `limit` (after `after_seq`), or the
/// last `limit` before `before_seq`.
pub async fn list<C: ConnectionTrait>(db: &C, q: &AuditQuery) -> AppResult<Vec<AuditEventDto>> {
    let limit = u64::from(q.limit.unwrap_or(100));
    if limit == 0 || limit > 1000 {
        return Err(AppError::Invalid(
            "limit must be between 1 and 1000.".into(),
        ));
    }
    check_filter(q)?;
    if q.after_seq.is_some() && q.before_seq.is_some() {
        return Err(AppError::Invalid(
            "Give after_seq (the page after) or before_seq (the page before), not both.".into(),
        ));
    }
    let select = filtered(q);
    let rows = match q.before_seq {
        Some(before) => {
            let mut rows = select
                .filter(audit_event::Column::Seq.lt(before))
                .order_by_desc(audit_event::Column::Seq)
                .limit(limit)
                .all(db)
                .await?;
            rows.reverse();
            rows
        }
        None => {
            let mut select = select.order_by_asc(audit_event::Column::Seq);
            if let Some(after) = q.after_seq {
                select = select.filter(audit_event::Column::Seq.gt(after));
            }
            select.limit(limit).all(db).await?
        }
    };
    Ok(rows.into_iter().map(to_dto).collect())
}

const PAGE: u64 = 1000;

/// Calls `f` on every event in log order, a page at a time.
pub async fn for_each<C: ConnectionTrait>(
    db: &C,
    f: impl FnMut(audit_event::Model) -> AppResult<()>,
) -> AppResult<()> {
    for_each_matching(db, &AuditQuery::default(), f).await
}

/// Calls `f` on every event a filter selects, in log order, a page at a time.
pub async fn for_each_matching<C: ConnectionTrait>(
    db: &C,
    q: &AuditQuery,
    mut f: impl FnMut(audit_event::Model) -> AppResult<()>,
) -> AppResult<()> {
    check_filter(q)?;
    let mut pages = filtered(q)
        .order_by_asc(audit_event::Column::Seq)
        .paginate(db, PAGE);
    while let Some(rows) = pages.fetch_and_next().await? {
        for row in rows {
            f(row)?;
        }
    }
    Ok(())
}

/// Recomputes the whole chain and names the first event that does not match.
pub async fn verify<C: ConnectionTrait>(db: &C) -> AppResult<AuditVerification> {
    let mut expected_prev = GENESIS.to_string();
    let mut expected_seq = 1i64;
    let mut checked = 0u64;
    let mut first_broken: Option<BrokenEvent> = None;
    for_each(db, |e| {
        if first_broken.is_some() {
            return Ok(());
        }
        checked += 1;
        let reason = if e.seq != expected_seq {
            Some(format!(
                "expected event number {expected_seq} here, found {}: events are missing",
                e.seq
            ))
        } else if e.prev_hash != expected_prev {
            Some(
                "its link to the previous event does not match the previous event's hash"
                    .to_string(),
            )
        } else if event_hash(&e)? != e.hash {
            Some("its content does not match its hash: the event was altered".to_string())
        } else {
            None
        };
        match reason {
            Some(reason) => {
                first_broken = Some(BrokenEvent {
                    seq: e.seq,
                    id: e.id,
                    reason,
                })
            }
            None => {
                expected_prev = e.hash.clone();
                expected_seq += 1;
            }
        }
        Ok(())
    })
    .await?;
    Ok(AuditVerification {
        ok: first_broken.is_none(),
        events_checked: checked,
        first_broken,
    })
}

/// Digest helper for states that are not JSON objects.
pub fn digest_text(s: &str) -> String {
    sha256_hex(s.as_bytes())
}
