//! Data-access requests: filed per site by the study's researcher, decided (and revoked)
//! by that site's custodian. A grant names the plan hashes it allows on the site's data.

use chrono::Utc;
use consilium_core::Role;
use consilium_core::api::{
    AccessDecision, AccessRequestDto, AccessStatus, CreateAccessRequest, DecideAccessRequest,
    RevokeAccess,
};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set,
};
use uuid::Uuid;

use super::{Checks, from_json, not_found, require};
use crate::audit;
use crate::context::AppContext;
use crate::domain::{Actor, Operation};
use crate::entities::access_request;
use crate::error::{AppError, AppResult};
use crate::services::{directory, studies};

pub fn access_dto(m: &access_request::Model) -> AppResult<AccessRequestDto> {
    Ok(AccessRequestDto {
        id: m.id,
        study_id: m.study_id,
        site_id: m.site_id,
        requester_id: m.requester_id,
        scope: from_json(&m.scope)?,
        plan_hashes: from_json(&m.plan_hashes)?,
        justification: m.justification.clone(),
        status: AccessStatus::parse(&m.status).ok_or_else(|| {
            AppError::unexpected(anyhow::anyhow!("unknown access status {:?}", m.status))
        })?,
        decided_by: m.decided_by,
        decided_at: m.decided_at,
        expires_at: m.expires_at,
        comment: m.comment.clone(),
        created_at: m.created_at,
    })
}

pub async fn requests_of<C: ConnectionTrait>(
    db: &C,
    study_id: Uuid,
) -> AppResult<Vec<AccessRequestDto>> {
    access_request::Entity::find()
        .filter(access_request::Column::StudyId.eq(study_id))
        .order_by_asc(access_request::Column::CreatedAt)
        .all(db)
        .await?
        .iter()
        .map(access_dto)
        .collect()
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn create_request(
    ctx: &AppContext,
    actor: &Actor,
    study_id: Uuid,
    input: CreateAccessRequest,
) -> AppResult<AccessRequestDto> {
    require(actor, Operation::RequestAccess)?;
    let s = studies::visible_study(&ctx.db, actor, study_id).await?;
    if s.researcher_id != actor.user_id {
        return Err(AppError::Forbidden(
            "Only the researcher who drafted this study may request data access for it.".into(),
        ));
    }
    let mut checks = Checks::default();
    let justification = checks.text("justification", &input.justification, 20_000, true);
    let scope = s
        .sites
        .iter()
        .find(|x| x.site_id == input.site_id)
        .map(|x| x.scope.clone());
    checks.check(
        scope.is_some(),
        format!(
            "site_id: site {} does not take part in this study",
            input.site_id
        ),
    );
    let plans = studies::plans_of(&ctx.db, study_id).await?;
    let plan_hashes = match input.plan_hashes {
        Some(h) => {
            checks.check(!h.is_empty(), "plan_hashes must name at least one plan");
            for x in &h {
                checks.check(
                    plans.iter().any(|p| &p.hash == x),
                    format!("plan_hashes: {x:?} is not a plan of this study"),
                );
            }
            h
        }
        None => {
            let latest: Vec<String> = plans.last().map(|p| p.hash.clone()).into_iter().collect();
            checks.check(
                !latest.is_empty(),
                "the study has no training plan yet; submit one before requesting data access",
            );
            latest
        }
    };
    checks.finish()?;
    let w = ctx.begin_write().await?;
    let pending = access_request::Entity::find()
        .filter(access_request::Column::StudyId.eq(study_id))
        .filter(access_request::Column::SiteId.eq(input.site_id))
        .filter(access_request::Column::Status.eq(AccessStatus::Pending.as_str()))
        .one(&*w)
        .await?;
    if pending.is_some() {
        return Err(AppError::conflict(
            "already_pending",
            "A data-access request for this study and site already awaits the custodian's decision.",
        ));
    }
    let m = access_request::ActiveModel {
        id: Set(Uuid::new_v4()),
        study_id: Set(study_id),
        site_id: Set(input.site_id),
        requester_id: Set(actor.user_id),
        scope: Set(serde_json::to_value(&scope)?),
        plan_hashes: Set(serde_json::to_value(&plan_hashes)?),
        justification: Set(justification),
        status: Set(AccessStatus::Pending.as_str().to_string()),
        decided_by: Set(None),
        decided_at: Set(None),
        expires_at: Set(None),
        comment: Set(None),
        created_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    let dto = access_dto(&m)?;
    audit::append(&*w, actor, "access.requested", "access_request", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

async fn require_custodian<C: ConnectionTrait>(
    db: &C,
    actor: &Actor,
    site_id: Uuid,
) -> AppResult<()> {
    let site = directory::get_site(db, site_id).await?;
    if site.custodians.contains(&actor.user_id) {
        Ok(())
    } else {
        Err(AppError::Forbidden(format!(
            "Only a custodian of site {:?} may decide its data-access requests.",
            site.name
        )))
    }
}

async fn load(ctx: &AppContext, id: Uuid) -> AppResult<access_request::Model> {
    access_request::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("data-access request", id))
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn decide(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: DecideAccessRequest,
) -> AppResult<AccessRequestDto> {
    require(actor, Operation::DecideAccess)?;
    let current = access_dto(&load(ctx, id).await?)?;
    require_custodian(&ctx.db, actor, current.site_id).await?;
    let mut checks = Checks::default();
    let comment = checks.optional_text("comment", input.comment.as_deref(), 20_000);
    let mut scope = current.scope.clone();
    if input.decision == AccessDecision::Approve {
        match input.expires_at {
            None => checks
                .0
                .push("expires_at is required for an approval".into()),
            Some(e) => checks.expiry("expires_at", e),
        }
        if let Some(s) = input.scope {
            let same_kind = s.modality == scope.modality
                && s.body_part == scope.body_part
                && s.label == scope.label;
            checks.check(
                same_kind,
                "scope may narrow the number of cases but not change modality, body part or label",
            );
            checks.check(
                s.cases >= 1 && s.cases <= scope.cases,
                format!(
                    "scope.cases must be between 1 and the {} requested",
                    scope.cases
                ),
            );
            scope = s;
        }
    }
    checks.finish()?;
    let w = ctx.begin_write().await?;
    let m = access_request::Entity::find_by_id(id)
        .one(&*w)
        .await?
        .ok_or_else(|| not_found("data-access request", id))?;
    if m.status != AccessStatus::Pending.as_str() {
        return Err(AppError::conflict(
            "invalid_state",
            format!(
                "This request is already {}; only a pending request can be decided.",
                m.status
            ),
        ));
    }
    let (status, action) = match input.decision {
        AccessDecision::Approve => (AccessStatus::Approved, "access.approved"),
        AccessDecision::Deny => (AccessStatus::Denied, "access.denied"),
    };
    let mut a: access_request::ActiveModel = m.into();
    a.status = Set(status.as_str().to_string());
    a.decided_by = Set(Some(actor.user_id));
    a.decided_at = Set(Some(Utc::now()));
    a.comment = Set(comment);
    a.scope = Set(serde_json::to_value(&scope)?);
    if status == AccessStatus::Approved {
        a.expires_at = Set(input.expires_at);
    }
    let m = a.update(&*w).await?;
    let dto = access_dto(&m)?;
    audit::append(&*w, actor, action, "access_request", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn revoke(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: RevokeAccess,
) -> AppResult<AccessRequestDto> {
    require(actor, Operation::RevokeAccess)?;
    let current = access_dto(&load(ctx, id).await?)?;
    require_custodian(&ctx.db, actor, current.site_id).await?;
    let mut checks = Checks::default();
    let reason = checks.text("reason", &input.reason, 20_000, true);
    checks.finish()?;
    let w = ctx.begin_write().await?;
    let m = access_request::Entity::find_by_id(id)
        .one(&*w)
        .await?
        .ok_or_else(|| not_found("data-access request", id))?;
    if m.status != AccessStatus::Approved.as_str() {
        return Err(AppError::conflict(
            "invalid_state",
            format!(
                "This request is {}; only an approved grant can be revoked.",
                m.status
            ),
        ));
    }
    let mut a: access_request::ActiveModel = m.into();
    a.status = Set(AccessStatus::Revoked.as_str().to_string());
    a.comment = Set(Some(reason));
    a.decided_by = Set(Some(actor.user_id));
    a.decided_at = Set(Some(Utc::now()));
    let m = a.update(&*w).await?;
    let dto = access_dto(&m)?;
    audit::append(&*w, actor, "access.revoked", "access_request", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

/// Requests the actor may see: all for administrators and auditors, their own studies'
/// for researchers, their sites' for custodians.
pub async fn list(
    ctx: &AppContext,
    actor: &Actor,
    site: Option<Uuid>,
    study: Option<Uuid>,
) -> AppResult<Vec<AccessRequestDto>> {
    let mut q = access_request::Entity::find().order_by_asc(access_request::Column::CreatedAt);
    if let Some(s) = site {
        q = q.filter(access_request::Column::SiteId.eq(s));
    }
    if let Some(s) = study {
        q = q.filter(access_request::Column::StudyId.eq(s));
    }
    let all_visible = actor.has(Role::Administrator) || actor.has(Role::Auditor);
    let my_sites: Vec<Uuid> = if actor.has(Role::Custodian) {
        directory::list_sites(ctx)
            .await?
            .into_iter()
            .filter(|s| s.custodians.contains(&actor.user_id))
            .map(|s| s.id)
            .collect()
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for m in q.all(&ctx.db).await? {
        let visible = all_visible
            || (actor.has(Role::Researcher) && m.requester_id == actor.user_id)
            || my_sites.contains(&m.site_id);
        if visible {
            out.push(access_dto(&m)?);
        }
    }
    Ok(out)
}

pub async fn get(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<AccessRequestDto> {
    let m = load(ctx, id).await?;
    if may_read(ctx, actor, &m).await? {
        access_dto(&m)
    } else {
        Err(super::hidden("data-access request", id))
    }
}

/// Who may read a data-access request whole (its justification, the custodian's comment,
/// who decided): the requester, the site's custodians, administrators and auditors.
pub async fn may_read(
    ctx: &AppContext,
    actor: &Actor,
    m: &access_request::Model,
) -> AppResult<bool> {
    Ok(actor.has(Role::Administrator)
        || actor.has(Role::Auditor)
        || (actor.has(Role::Researcher) && m.requester_id == actor.user_id)
        || (actor.has(Role::Custodian)
            && require_custodian(&ctx.db, actor, m.site_id).await.is_ok()))
}

/// A grant as somebody else sees it in a model's lineage: that it exists, for which site,
/// plan and scope, in force until when — without the requester's justification, the
/// custodian's comment or who decided.
pub fn withheld(mut dto: AccessRequestDto) -> AccessRequestDto {
    dto.justification = WITHHELD.to_string();
    dto.comment = None;
    dto.decided_by = None;
    dto
}

/// What a withheld grant shows instead of its justification.
pub const WITHHELD: &str =
    "(withheld: only the requester, the site's custodians, administrators and auditors read this)";

/// The grants in force at a site: what its worker checks every job against. Its worker
/// token, its custodians, administrators and auditors may read them.
pub async fn site_grants(
    ctx: &AppContext,
    actor: &Actor,
    site_id: Uuid,
) -> AppResult<Vec<consilium_core::api::SiteGrantDto>> {
    let site = directory::get_site(&ctx.db, site_id).await?;
    let allowed = actor.site_id == Some(site_id)
        || (actor.has(Role::Custodian) && site.custodians.contains(&actor.user_id))
        || actor.has(Role::Administrator)
        || actor.has(Role::Auditor);
    if !allowed {
        return Err(AppError::Forbidden(format!(
            "Only site {:?}'s worker or custodians may read its grants.",
            site.name
        )));
    }
    let now = Utc::now();
    let rows = access_request::Entity::find()
        .filter(access_request::Column::SiteId.eq(site_id))
        .filter(access_request::Column::Status.eq(AccessStatus::Approved.as_str()))
        .all(&ctx.db)
        .await?;
    let mut out = Vec::new();
    for m in rows {
        let dto = access_dto(&m)?;
        if let Some(expires_at) = dto.expires_at.filter(|e| *e > now) {
            out.push(consilium_core::api::SiteGrantDto {
                study_id: dto.study_id,
                plan_hashes: dto.plan_hashes,
                expires_at,
            });
        }
    }
    Ok(out)
}
