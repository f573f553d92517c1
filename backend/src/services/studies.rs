//! Studies, their training plans, and the ethics committee's decisions on them.

use base64::Engine;
use chrono::Utc;
use consilium_core::Role;
use consilium_core::api::{
    CreateStudy, PlanDto, PlanFileContent, PlanFileDto, ReviewDecision, ReviewDto, StudyDto,
    StudySite, StudyStatus, SubmitPlan, SubmitReview, UpdateStudy,
};
use consilium_core::hash::sha256_hex;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use uuid::Uuid;

use super::{Checks, from_json, not_found, require};
use crate::audit;
use crate::context::AppContext;
use crate::domain::{Actor, Operation, amend_transition, review_transition, submit_transition};
use crate::entities::{committee, plan, review, site, study};
use crate::error::{AppError, AppResult};
use crate::services::directory;

pub fn study_dto(m: &study::Model) -> AppResult<StudyDto> {
    Ok(StudyDto {
        id: m.id,
        title: m.title.clone(),
        protocol_text: m.protocol_text.clone(),
        protocol_version: m.protocol_version,
        purpose: m.purpose.clone(),
        committee_id: m.committee_id,
        researcher_id: m.researcher_id,
        sites: from_json(&m.sites)?,
        status: StudyStatus::parse(&m.status).ok_or_else(|| {
            AppError::unexpected(anyhow::anyhow!("unknown study status {:?}", m.status))
        })?,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

/// A plan file as stored: its digest and its bytes.
#[derive(Serialize, Deserialize)]
struct StoredFile {
    name: String,
    size: u64,
    sha256: String,
    content_base64: String,
}

/// Adds the latest version's attachments named in `keep` to a new version's `files` (those
/// not uploaded again under the same name); a name the latest version lacks is refused.
fn carry_forward(
    files: &mut Vec<StoredFile>,
    latest: Option<&plan::Model>,
    keep: &[String],
) -> AppResult<()> {
    if keep.is_empty() {
        return Ok(());
    }
    let Some(latest) = latest else {
        return Err(AppError::Unprocessable(vec![
            "keep_files names attachments to carry from the latest plan version, but the study has no plan yet; upload the files instead.".into(),
        ]));
    };
    let previous: Vec<StoredFile> = from_json(&latest.files)?;
    let mut missing = Vec::new();
    for name in keep {
        if files.iter().any(|f| &f.name == name) {
            continue;
        }
        match previous.iter().find(|f| &f.name == name) {
            Some(f) => files.push(StoredFile {
                name: f.name.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
                content_base64: f.content_base64.clone(),
            }),
            None => missing.push(format!("{name:?}")),
        }
    }
    if !missing.is_empty() {
        let had: Vec<String> = previous.iter().map(|f| format!("{:?}", f.name)).collect();
        return Err(AppError::Unprocessable(vec![format!(
            "keep_files: plan version {} has no attachment {}; it has {}.",
            latest.version,
            missing.join(", "),
            if had.is_empty() {
                "none".to_string()
            } else {
                had.join(", ")
            }
        )]));
    }
    Ok(())
}

pub fn plan_dto(m: &plan::Model) -> AppResult<PlanDto> {
    let files: Vec<StoredFile> = from_json(&m.files)?;
    Ok(PlanDto {
        id: m.id,
        study_id: m.study_id,
        version: m.version,
        hash: m.hash.clone(),
        manifest: from_json(&m.manifest)?,
        files: files
            .into_iter()
            .map(|f| PlanFileDto {
                name: f.name,
                size: f.size,
                sha256: f.sha256,
            })
            .collect(),
        submitted_by: m.submitted_by,
        created_at: m.created_at,
    })
}

pub fn review_dto(m: &review::Model) -> AppResult<ReviewDto> {
    Ok(ReviewDto {
        id: m.id,
        study_id: m.study_id,
        committee_id: m.committee_id,
        reviewer_id: m.reviewer_id,
        decision: ReviewDecision::parse(&m.decision).ok_or_else(|| {
            AppError::unexpected(anyhow::anyhow!("unknown decision {:?}", m.decision))
        })?,
        comments: m.comments.clone(),
        conditions: m.conditions.clone(),
        expires_at: m.expires_at,
        protocol_version: m.protocol_version,
        plan_hashes: from_json(&m.plan_hashes)?,
        created_at: m.created_at,
    })
}

/// The plan's content hash (see `consilium_core::manifest::plan_hash`).
pub fn plan_hash(
    manifest: &consilium_core::manifest::TrainingPlanManifest,
    files: &[PlanFileDto],
) -> AppResult<String> {
    let listed: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.name.clone(), f.sha256.clone()))
        .collect();
    Ok(consilium_core::manifest::plan_hash(manifest, &listed)?)
}

pub async fn load_study<C: ConnectionTrait>(db: &C, id: Uuid) -> AppResult<study::Model> {
    study::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| not_found("study", id))
}

/// Who may read a study: administrators and auditors; its researcher; members of its
/// committee; custodians of its sites.
pub async fn can_see<C: ConnectionTrait>(db: &C, actor: &Actor, s: &StudyDto) -> AppResult<bool> {
    if actor.has(Role::Administrator) || actor.has(Role::Auditor) {
        return Ok(true);
    }
    if actor.has(Role::Researcher) && s.researcher_id == actor.user_id {
        return Ok(true);
    }
    if actor.has(Role::CommitteeMember) {
        let c = directory::get_committee(db, s.committee_id).await?;
        if c.members.contains(&actor.user_id) {
            return Ok(true);
        }
    }
    if actor.has(Role::Custodian) {
        for st in &s.sites {
            let site = directory::get_site(db, st.site_id).await?;
            if site.custodians.contains(&actor.user_id) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A stored study status; an unknown one is an error (reading it as a draft would let a
/// rejected study be edited and submitted again).
fn status_of(stored: &str) -> AppResult<StudyStatus> {
    StudyStatus::parse(stored)
        .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("unknown study status {stored:?}")))
}

pub async fn visible_study<C: ConnectionTrait>(
    db: &C,
    actor: &Actor,
    id: Uuid,
) -> AppResult<StudyDto> {
    let s = study_dto(&load_study(db, id).await?)?;
    if can_see(db, actor, &s).await? {
        Ok(s)
    } else {
        Err(super::hidden("study", id))
    }
}

fn require_owner(actor: &Actor, s: &StudyDto) -> AppResult<()> {
    if s.researcher_id == actor.user_id {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "Only the researcher who drafted this study may change it.".into(),
        ))
    }
}

async fn check_sites<C: ConnectionTrait>(
    db: &C,
    checks: &mut Checks,
    sites: &[StudySite],
) -> AppResult<()> {
    checks.check(
        !sites.is_empty(),
        "sites must name at least one participating site",
    );
    let unique: BTreeSet<Uuid> = sites.iter().map(|s| s.site_id).collect();
    checks.check(unique.len() == sites.len(), "sites lists a site twice");
    for (i, s) in sites.iter().enumerate() {
        if site::Entity::find_by_id(s.site_id).one(db).await?.is_none() {
            checks
                .0
                .push(format!("sites[{i}].site_id: no site with id {}", s.site_id));
        }
        checks.text(
            &format!("sites[{i}].scope.modality"),
            &s.scope.modality,
            16,
            false,
        );
        checks.text(
            &format!("sites[{i}].scope.body_part"),
            &s.scope.body_part,
            64,
            false,
        );
        checks.text(
            &format!("sites[{i}].scope.label"),
            &s.scope.label,
            128,
            false,
        );
        checks.check(
            s.scope.cases > 0,
            format!("sites[{i}].scope.cases must be at least 1"),
        );
    }
    Ok(())
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn create_study(
    ctx: &AppContext,
    actor: &Actor,
    input: CreateStudy,
) -> AppResult<StudyDto> {
    require(actor, Operation::CreateStudy)?;
    let mut checks = Checks::default();
    let title = checks.text("title", &input.title, 300, false);
    let protocol_text = checks.text("protocol_text", &input.protocol_text, 100_000, true);
    let purpose = checks.text("purpose", &input.purpose, 10_000, true);
    if committee::Entity::find_by_id(input.committee_id)
        .one(&ctx.db)
        .await?
        .is_none()
    {
        checks.0.push(format!(
            "committee_id: no committee with id {}",
            input.committee_id
        ));
    }
    check_sites(&ctx.db, &mut checks, &input.sites).await?;
    checks.finish()?;
    let now = Utc::now();
    let w = ctx.begin_write().await?;
    let m = study::ActiveModel {
        id: Set(Uuid::new_v4()),
        title: Set(title),
        protocol_text: Set(protocol_text),
        protocol_version: Set(1),
        purpose: Set(purpose),
        committee_id: Set(input.committee_id),
        researcher_id: Set(actor.user_id),
        sites: Set(serde_json::to_value(&input.sites)?),
        status: Set(StudyStatus::Draft.as_str().to_string()),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(&*w)
    .await?;
    let dto = study_dto(&m)?;
    audit::append(&*w, actor, "study.created", "study", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn update_study(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: UpdateStudy,
) -> AppResult<StudyDto> {
    require(actor, Operation::UpdateStudy)?;
    let current = visible_study(&ctx.db, actor, id).await?;
    require_owner(actor, &current)?;
    let mut checks = Checks::default();
    let title = input
        .title
        .as_deref()
        .map(|t| checks.text("title", t, 300, false));
    let protocol = input
        .protocol_text
        .as_deref()
        .map(|t| checks.text("protocol_text", t, 100_000, true));
    let purpose = input
        .purpose
        .as_deref()
        .map(|t| checks.text("purpose", t, 10_000, true));
    if let Some(sites) = &input.sites {
        check_sites(&ctx.db, &mut checks, sites).await?;
    }
    checks.finish()?;
    let w = ctx.begin_write().await?;
    let m = load_study(&*w, id).await?;
    let status = status_of(&m.status)?;
    let next = amend_transition(status).map_err(|d| AppError::conflict("invalid_state", d))?;
    let protocol_changed = protocol.as_ref().is_some_and(|p| *p != m.protocol_text);
    let version = m.protocol_version + i32::from(protocol_changed);
    let mut a: study::ActiveModel = m.into();
    if let Some(t) = title {
        a.title = Set(t);
    }
    if let Some(p) = protocol {
        a.protocol_text = Set(p);
    }
    if let Some(p) = purpose {
        a.purpose = Set(p);
    }
    if let Some(s) = &input.sites {
        a.sites = Set(serde_json::to_value(s)?);
    }
    a.protocol_version = Set(version);
    a.status = Set(next.as_str().to_string());
    a.updated_at = Set(Utc::now());
    let m = a.update(&*w).await?;
    let dto = study_dto(&m)?;
    let action = if status == StudyStatus::Approved {
        "study.amended"
    } else {
        "study.updated"
    };
    audit::append(&*w, actor, action, "study", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

#[tracing::instrument(skip(ctx), fields(actor = %actor.audit_name()))]
pub async fn submit_study(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<StudyDto> {
    require(actor, Operation::SubmitStudy)?;
    let current = visible_study(&ctx.db, actor, id).await?;
    require_owner(actor, &current)?;
    let w = ctx.begin_write().await?;
    let m = load_study(&*w, id).await?;
    let status = status_of(&m.status)?;
    let next = submit_transition(status).map_err(|d| AppError::conflict("invalid_state", d))?;
    if latest_plan(&*w, id).await?.is_none() {
        return Err(AppError::conflict(
            "plan_missing",
            "Submit a training plan (POST /api/v1/studies/{id}/plans) before submitting the study for review.",
        ));
    }
    let mut a: study::ActiveModel = m.into();
    a.status = Set(next.as_str().to_string());
    a.updated_at = Set(Utc::now());
    let m = a.update(&*w).await?;
    let dto = study_dto(&m)?;
    audit::append(&*w, actor, "study.submitted", "study", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

pub async fn list_studies(ctx: &AppContext, actor: &Actor) -> AppResult<Vec<StudyDto>> {
    let rows = study::Entity::find()
        .order_by_desc(study::Column::CreatedAt)
        .all(&ctx.db)
        .await?;
    let mut out = Vec::new();
    for m in &rows {
        let s = study_dto(m)?;
        if can_see(&ctx.db, actor, &s).await? {
            out.push(s);
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------ plans

pub async fn plans_of<C: ConnectionTrait>(db: &C, study_id: Uuid) -> AppResult<Vec<plan::Model>> {
    Ok(plan::Entity::find()
        .filter(plan::Column::StudyId.eq(study_id))
        .order_by_asc(plan::Column::Version)
        .all(db)
        .await?)
}

pub async fn latest_plan<C: ConnectionTrait>(
    db: &C,
    study_id: Uuid,
) -> AppResult<Option<plan::Model>> {
    Ok(plans_of(db, study_id).await?.pop())
}

fn check_file_name(checks: &mut Checks, i: usize, name: &str) -> String {
    let n = checks.text(&format!("files[{i}].name"), name, 255, false);
    checks.check(
        !n.contains(['/', '\\']) && n != "." && n != "..",
        format!("files[{i}].name must be a plain file name, without folders"),
    );
    n
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn submit_plan(
    ctx: &AppContext,
    actor: &Actor,
    study_id: Uuid,
    input: SubmitPlan,
) -> AppResult<PlanDto> {
    require(actor, Operation::SubmitPlan)?;
    let current = visible_study(&ctx.db, actor, study_id).await?;
    require_owner(actor, &current)?;
    let mut checks = Checks(input.manifest.problems());
    let mut files = Vec::new();
    let mut names = BTreeSet::new();
    for (i, f) in input.files.iter().enumerate() {
        let name = check_file_name(&mut checks, i, &f.name);
        checks.check(
            names.insert(name.clone()),
            format!("files[{i}].name: {name:?} is attached twice"),
        );
        match base64::engine::general_purpose::STANDARD.decode(f.content_base64.trim()) {
            Ok(bytes) => files.push(StoredFile {
                name,
                size: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
                content_base64: f.content_base64.trim().to_string(),
            }),
            Err(_) => checks
                .0
                .push(format!("files[{i}].content_base64 is not valid base64")),
        }
    }
    checks.finish()?;

    let w = ctx.begin_write().await?;
    let s = load_study(&*w, study_id).await?;
    let status = status_of(&s.status)?;
    let next = amend_transition(status).map_err(|d| AppError::conflict("invalid_state", d))?;
    let existing = plans_of(&*w, study_id).await?;
    carry_forward(&mut files, existing.last(), &input.keep_files)?;
    let listed: Vec<PlanFileDto> = files
        .iter()
        .map(|f| PlanFileDto {
            name: f.name.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
        })
        .collect();
    let hash = plan_hash(&input.manifest, &listed)?;
    if let Some(last) = existing.last()
        && last.hash == hash
    {
        return Err(AppError::conflict(
            "plan_unchanged",
            format!(
                "This plan is identical to version {} (hash {}); nothing to submit.",
                last.version, hash
            ),
        ));
    }
    let version = existing.last().map_or(1, |p| p.version + 1);
    let m = plan::ActiveModel {
        id: Set(Uuid::new_v4()),
        study_id: Set(study_id),
        version: Set(version),
        hash: Set(hash),
        manifest: Set(serde_json::to_value(&input.manifest)?),
        files: Set(serde_json::to_value(&files)?),
        submitted_by: Set(actor.user_id),
        created_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    let dto = plan_dto(&m)?;
    audit::append(&*w, actor, "plan.submitted", "plan", m.id, &dto).await?;
    if next != status {
        let mut a: study::ActiveModel = s.into();
        a.status = Set(next.as_str().to_string());
        a.updated_at = Set(Utc::now());
        let s = a.update(&*w).await?;
        audit::append(&*w, actor, "study.amended", "study", s.id, &study_dto(&s)?).await?;
    }
    w.commit().await?;
    Ok(dto)
}

pub async fn list_plans(
    ctx: &AppContext,
    actor: &Actor,
    study_id: Uuid,
) -> AppResult<Vec<PlanDto>> {
    visible_study(&ctx.db, actor, study_id).await?;
    plans_of(&ctx.db, study_id)
        .await?
        .iter()
        .map(plan_dto)
        .collect()
}

async fn visible_plan(ctx: &AppContext, actor: &Actor, plan_id: Uuid) -> AppResult<plan::Model> {
    let m = plan::Entity::find_by_id(plan_id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("plan", plan_id))?;
    visible_study(&ctx.db, actor, m.study_id)
        .await
        .map_err(|_| not_found("plan", plan_id))?;
    Ok(m)
}

pub async fn get_plan(ctx: &AppContext, actor: &Actor, plan_id: Uuid) -> AppResult<PlanDto> {
    plan_dto(&visible_plan(ctx, actor, plan_id).await?)
}

pub async fn plan_files(
    ctx: &AppContext,
    actor: &Actor,
    plan_id: Uuid,
) -> AppResult<Vec<PlanFileContent>> {
    let m = visible_plan(ctx, actor, plan_id).await?;
    let files: Vec<StoredFile> = from_json(&m.files)?;
    Ok(files
        .into_iter()
        .map(|f| PlanFileContent {
            name: f.name,
            content_base64: f.content_base64,
        })
        .collect())
}

// ------------------------------------------------------------------ ethics review

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn review_study(
    ctx: &AppContext,
    actor: &Actor,
    study_id: Uuid,
    input: SubmitReview,
) -> AppResult<ReviewDto> {
    require(actor, Operation::ReviewStudy)?;
    let s = visible_study(&ctx.db, actor, study_id).await?;
    let c = directory::get_committee(&ctx.db, s.committee_id).await?;
    if !c.members.contains(&actor.user_id) {
        return Err(AppError::Forbidden(format!(
            "Only members of the committee {:?} may review this study.",
            c.name
        )));
    }
    if s.researcher_id == actor.user_id {
        return Err(AppError::Forbidden(
            "Nobody reviews their own study; another committee member must decide.".into(),
        ));
    }
    let mut checks = Checks::default();
    let comments = checks.text("comments", &input.comments, 20_000, true);
    let conditions = checks.optional_text("conditions", input.conditions.as_deref(), 20_000);
    if input.decision == ReviewDecision::Approve {
        match input.expires_at {
            None => checks
                .0
                .push("expires_at is required for an approval".into()),
            Some(e) => checks.expiry("expires_at", e),
        }
    }
    checks.finish()?;

    let w = ctx.begin_write().await?;
    let m = load_study(&*w, study_id).await?;
    let status = status_of(&m.status)?;
    let next = review_transition(status, input.decision)
        .map_err(|d| AppError::conflict("invalid_state", d))?;
    let plan = latest_plan(&*w, study_id).await?;
    let plan_hashes: Vec<String> = plan.into_iter().map(|p| p.hash).collect();
    let r = review::ActiveModel {
        id: Set(Uuid::new_v4()),
        study_id: Set(study_id),
        committee_id: Set(m.committee_id),
        reviewer_id: Set(actor.user_id),
        decision: Set(input.decision.as_str().to_string()),
        comments: Set(comments),
        conditions: Set(conditions),
        expires_at: Set(if input.decision == ReviewDecision::Approve {
            input.expires_at
        } else {
            None
        }),
        protocol_version: Set(m.protocol_version),
        plan_hashes: Set(serde_json::to_value(&plan_hashes)?),
        created_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    let dto = review_dto(&r)?;
    audit::append(
        &*w,
        actor,
        &format!("review.{}", input.decision.as_str()),
        "review",
        r.id,
        &dto,
    )
    .await?;
    let mut a: study::ActiveModel = m.into();
    a.status = Set(next.as_str().to_string());
    a.updated_at = Set(Utc::now());
    let m = a.update(&*w).await?;
    audit::append(
        &*w,
        actor,
        &format!("study.{}", next.as_str()),
        "study",
        m.id,
        &study_dto(&m)?,
    )
    .await?;
    w.commit().await?;
    Ok(dto)
}

pub async fn reviews_of<C: ConnectionTrait>(db: &C, study_id: Uuid) -> AppResult<Vec<ReviewDto>> {
    review::Entity::find()
        .filter(review::Column::StudyId.eq(study_id))
        .order_by_asc(review::Column::CreatedAt)
        .all(db)
        .await?
        .iter()
        .map(review_dto)
        .collect()
}

pub async fn list_reviews(
    ctx: &AppContext,
    actor: &Actor,
    study_id: Uuid,
) -> AppResult<Vec<ReviewDto>> {
    visible_study(&ctx.db, actor, study_id).await?;
    reviews_of(&ctx.db, study_id).await
}
