//! The run check (preflight) and creating runs once every approval is in force.

use chrono::Utc;
use consilium_core::api::{CreateRun, PreflightReport, RunDto};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set,
};
use std::collections::HashMap;
use uuid::Uuid;

use super::{from_json, not_found, require};
use crate::audit;
use crate::context::AppContext;
use crate::domain::{Actor, Operation, PreflightInput, PreflightOutcome, preflight};
use crate::entities::run;
use crate::error::{AppError, AppResult};
use crate::services::{access, directory, studies};

pub fn run_dto(m: &run::Model) -> AppResult<RunDto> {
    Ok(RunDto {
        id: m.id,
        study_id: m.study_id,
        plan_hash: m.plan_hash.clone(),
        status: m.status.clone(),
        current_round: m.current_round,
        stop_reason: m.stop_reason.clone(),
        created_by: m.created_by,
        review_id: m.review_id,
        grant_ids: from_json(&m.grant_ids)?,
        created_at: m.created_at,
    })
}

/// Loads what the check needs and runs it.
pub async fn check<C: ConnectionTrait>(
    db: &C,
    study_id: Uuid,
    plan_hash: Option<&str>,
) -> AppResult<PreflightOutcome> {
    let study = studies::study_dto(&studies::load_study(db, study_id).await?)?;
    let plans = studies::plans_of(db, study_id).await?;
    let plan_hashes: Vec<String> = plans.iter().map(|p| p.hash.clone()).collect();
    let reviews = studies::reviews_of(db, study_id).await?;
    let requests = access::requests_of(db, study_id).await?;
    let mut site_names = HashMap::new();
    for s in &study.sites {
        if let Ok(site) = directory::get_site(db, s.site_id).await {
            site_names.insert(site.id, site.name);
        }
    }
    let mut out = preflight(&PreflightInput {
        study: &study,
        plan_hashes: &plan_hashes,
        requested_plan: plan_hash,
        reviews: &reviews,
        access: &requests,
        site_names: &site_names,
        now: Utc::now(),
    });
    // A plan stored before its settings were checked as they are now (or by an older server)
    // may name something no worker runs: it cannot start, and the reasons say why.
    if let Some(hash) = out.plan_hash.as_deref()
        && let Some(p) = plans.iter().find(|p| p.hash == hash)
    {
        let manifest: consilium_core::manifest::TrainingPlanManifest = from_json(&p.manifest)?;
        if let Err(problems) = manifest.parse() {
            let why = format!(
                "Training plan version {} can't be run: {}. Submit a corrected plan.",
                p.version,
                problems.join("; ")
            );
            out.unmet.push(why.clone());
            out.study_unmet.push(why);
        }
    }
    Ok(out)
}

pub async fn report(
    ctx: &AppContext,
    actor: &Actor,
    study_id: Uuid,
    plan_hash: Option<&str>,
) -> AppResult<PreflightReport> {
    studies::visible_study(&ctx.db, actor, study_id).await?;
    let out = check(&ctx.db, study_id, plan_hash).await?;
    Ok(PreflightReport {
        study_id,
        plan_hash: out.plan_hash.clone(),
        ready: out.ready(),
        unmet: out.unmet,
    })
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn create_run(
    ctx: &AppContext,
    actor: &Actor,
    study_id: Uuid,
    input: CreateRun,
) -> AppResult<RunDto> {
    require(actor, Operation::CreateRun)?;
    let s = studies::visible_study(&ctx.db, actor, study_id).await?;
    if s.researcher_id != actor.user_id {
        return Err(AppError::Forbidden(
            "Only the researcher who drafted this study may start its runs.".into(),
        ));
    }
    let w = ctx.begin_write().await?;
    let out = check(&*w, study_id, input.plan_hash.as_deref()).await?;
    let (Some(plan_hash), Some(review_id), true) =
        (out.plan_hash.clone(), out.review_id, out.ready())
    else {
        return Err(AppError::PreconditionsUnmet(out.unmet));
    };
    let m = run::ActiveModel {
        id: Set(Uuid::new_v4()),
        study_id: Set(study_id),
        plan_hash: Set(plan_hash),
        // With the federated engine attached the run starts at once; without it, it waits.
        status: Set(if ctx.federation.is_some() {
            "running"
        } else {
            "created"
        }
        .into()),
        created_by: Set(actor.user_id),
        review_id: Set(review_id),
        grant_ids: Set(serde_json::to_value(&out.grant_ids)?),
        created_at: Set(Utc::now()),
        current_round: Set(0),
        stop_reason: Set(None),
        server_state: Set(None),
    }
    .insert(&*w)
    .await?;
    let dto = run_dto(&m)?;
    audit::append(&*w, actor, "run.created", "run", m.id, &dto).await?;
    w.commit().await?;
    if let Some(f) = &ctx.federation {
        f.runs.drive(m.id)?;
    }
    Ok(dto)
}

pub async fn list_runs(ctx: &AppContext, actor: &Actor, study_id: Uuid) -> AppResult<Vec<RunDto>> {
    studies::visible_study(&ctx.db, actor, study_id).await?;
    run::Entity::find()
        .filter(run::Column::StudyId.eq(study_id))
        .order_by_asc(run::Column::CreatedAt)
        .all(&ctx.db)
        .await?
        .iter()
        .map(run_dto)
        .collect()
}

pub async fn get_run(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<RunDto> {
    let m = run::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("run", id))?;
    studies::visible_study(&ctx.db, actor, m.study_id)
        .await
        .map_err(|_| not_found("run", id))?;
    run_dto(&m)
}

/// Stops a running or paused run: the study's researcher, or an administrator.
#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn stop_run(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: consilium_core::api::StopRun,
) -> AppResult<RunDto> {
    let current = get_run(ctx, actor, id).await?;
    let s = studies::visible_study(&ctx.db, actor, current.study_id).await?;
    let owner = actor.has(consilium_core::Role::Researcher) && s.researcher_id == actor.user_id;
    if !(owner || actor.has(consilium_core::Role::Administrator)) {
        return Err(AppError::Forbidden(
            "Only the study's researcher or an administrator may stop its runs.".into(),
        ));
    }
    let mut checks = super::Checks::default();
    let reason = checks.text("reason", &input.reason, 2000, true);
    checks.finish()?;
    let w = ctx.begin_write().await?;
    let m = run::Entity::find_by_id(id)
        .one(&*w)
        .await?
        .ok_or_else(|| not_found("run", id))?;
    if !matches!(m.status.as_str(), "created" | "running" | "paused") {
        return Err(AppError::conflict(
            "invalid_state",
            format!("The run is already {}.", m.status),
        ));
    }
    let mut a: run::ActiveModel = m.into();
    a.status = Set("stopped".into());
    a.stop_reason = Set(Some(reason));
    let m = a.update(&*w).await?;
    let dto = run_dto(&m)?;
    audit::append(&*w, actor, "run.stopped", "run", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}
