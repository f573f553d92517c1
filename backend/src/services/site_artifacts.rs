//! Artifacts for the sites, through the server: a site's worker holds no store credentials.
//! With its worker token it may read the global models of the runs it takes part in, and hand
//! over its own output of a job it was sent and that is still open; the server hashes what
//! arrives and records which site sent it, so that a result counts only with its own site's
//! output (`engine::intake`). Nothing lets a site read another site's update.

use chrono::Utc;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, Set};
use uuid::Uuid;

use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::{model_version, preview_set, round, site_output};
use crate::error::{AppError, AppResult};

/// Outputs a site may hand over for one job (a worker restarted in the middle of a job sends
/// its output again); more is refused, so that a site cannot fill the store.
pub const OUTPUTS_PER_JOB: u64 = 5;

pub(crate) fn require_worker(actor: &Actor, site: Uuid, what: &str) -> AppResult<()> {
    if actor.site_id == Some(site) {
        Ok(())
    } else {
        Err(AppError::Forbidden(format!(
            "Only site {site}'s worker, with its worker token, may {what}."
        )))
    }
}

fn valid_hash(hash: &str) -> AppResult<()> {
    if consilium_core::hash::is_sha256_hex(hash) {
        Ok(())
    } else {
        Err(AppError::Invalid(format!(
            "{hash:?} is not a SHA-256 in lower-case hex (64 characters)."
        )))
    }
}

fn lists(sites: &serde_json::Value, site: Uuid) -> bool {
    serde_json::from_value::<Vec<Uuid>>(sites.clone()).is_ok_and(|s| s.contains(&site))
}

/// Whether `site` takes part in a run: one of its rounds lists the site.
async fn takes_part(ctx: &AppContext, run: Uuid, site: Uuid) -> AppResult<bool> {
    Ok(round::Entity::find()
        .filter(round::Column::RunId.eq(run))
        .all(&ctx.db)
        .await?
        .iter()
        .any(|r| lists(&r.sites, site)))
}

/// A global model, for a site that takes part in a run that sent it: the model a round
/// started from, or a version a run made (what evaluation jobs name).
pub async fn read_model(
    ctx: &AppContext,
    actor: &Actor,
    site: Uuid,
    hash: &str,
) -> AppResult<Vec<u8>> {
    require_worker(actor, site, "read the models its jobs name")?;
    valid_hash(hash)?;
    let not_yours = || {
        AppError::NotFound(format!(
            "No model {hash} in a run site {site} takes part in."
        ))
    };
    let mut allowed = round::Entity::find()
        .filter(round::Column::GlobalIn.eq(hash))
        .all(&ctx.db)
        .await?
        .iter()
        .any(|r| lists(&r.sites, site));
    if !allowed {
        for v in model_version::Entity::find()
            .filter(model_version::Column::Hash.eq(hash))
            .all(&ctx.db)
            .await?
        {
            if takes_part(ctx, v.run_id, site).await? {
                allowed = true;
                break;
            }
        }
    }
    if !allowed {
        allowed = own_correction(ctx, site, hash).await?;
    }
    if !allowed {
        return Err(not_yours());
    }
    ctx.federation()?
        .artifacts
        .get(hash)
        .await
        .map_err(AppError::unexpected)
}

/// Whether `hash` is `site`'s own SCAFFOLD correction in a run it takes part in: the one its
/// next job carries, or one it trained with. Another
/// site's correction is its control variate, its mean gradient over a round: it is not handed
/// out.
async fn own_correction(ctx: &AppContext, site: Uuid, hash: &str) -> AppResult<bool> {
    let mut runs = std::collections::BTreeSet::new();
    for r in round::Entity::find().all(&ctx.db).await? {
        if lists(&r.sites, site) {
            runs.insert(r.run_id);
        }
    }
    for id in runs {
        if crate::engine::versions::corrections(ctx, id)
            .await?
            .get(&site)
            .is_some_and(|h| h == hash)
        {
            return Ok(true);
        }
        // One its site trained with in an earlier round, as the lineage names it.
        for v in model_version::Entity::find()
            .filter(model_version::Column::RunId.eq(id))
            .all(&ctx.db)
            .await?
        {
            let contributions: Vec<consilium_core::api::Contribution> =
                serde_json::from_value(v.contributions).map_err(AppError::unexpected)?;
            if contributions
                .iter()
                .any(|c| c.site_id == site && c.correction.as_deref() == Some(hash))
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether `job` of `run` is one the server sent `site` and still waits for: a training job of
/// a round that collects, or the site's preview request while it generates.
pub(crate) async fn open_job(
    ctx: &AppContext,
    site: Uuid,
    job: Uuid,
    run: Uuid,
    number: i32,
) -> AppResult<bool> {
    if let Some(p) = preview_set::Entity::find_by_id(run).one(&ctx.db).await? {
        return Ok(p.site_id == site && p.status == "generating");
    }
    let Some(r) = round::Entity::find()
        .filter(round::Column::RunId.eq(run))
        .filter(round::Column::Number.eq(number))
        .one(&ctx.db)
        .await?
    else {
        return Ok(false);
    };
    Ok(
        r.state == crate::engine::rounds::RoundState::Collecting.as_str()
            && lists(&r.sites, site)
            && crate::engine::job_id(run, number, site, consilium_core::protocol::JobKind::Train)
                == job,
    )
}

/// Stores a site's output of a job and records it; returns its SHA-256, computed here.
#[tracing::instrument(skip(ctx, bytes), fields(actor = %actor.audit_name(), bytes = bytes.len()))]
pub async fn receive_output(
    ctx: &AppContext,
    actor: &Actor,
    site: Uuid,
    job: Uuid,
    run: Uuid,
    number: i32,
    bytes: Vec<u8>,
) -> AppResult<String> {
    require_worker(actor, site, "hand over its outputs")?;
    if bytes.is_empty() {
        return Err(AppError::Invalid(
            "The output is empty: send the job's update (safetensors) or preview set as the request body.".into(),
        ));
    }
    if !open_job(ctx, site, job, run, number).await? {
        return Err(AppError::conflict(
            "job_not_open",
            format!(
                "Job {job} (run {run}, round {number}) is not a job this server sent site {site} and still waits for: it may have ended, or never existed."
            ),
        ));
    }
    let earlier = site_output::Entity::find()
        .filter(site_output::Column::JobId.eq(job))
        .filter(site_output::Column::SiteId.eq(site))
        .count(&ctx.db)
        .await?;
    if earlier >= OUTPUTS_PER_JOB {
        return Err(AppError::conflict(
            "too_many_outputs",
            format!(
                "Site {site} has handed over {earlier} outputs for job {job} already; no more are accepted."
            ),
        ));
    }
    let size = bytes.len() as i64;
    let hash = ctx
        .federation()?
        .artifacts
        .put(bytes)
        .await
        .map_err(AppError::unexpected)?;
    let w = ctx.begin_write().await?;
    site_output::ActiveModel {
        id: Set(Uuid::new_v4()),
        job_id: Set(job),
        site_id: Set(site),
        run_id: Set(run),
        hash: Set(hash.clone()),
        bytes: Set(size),
        received_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    w.commit().await?;
    Ok(hash)
}

/// Whether `site` handed over the output `hash` for `job` itself.
pub async fn output_of(ctx: &AppContext, site: Uuid, job: Uuid, hash: &str) -> AppResult<bool> {
    Ok(site_output::Entity::find()
        .filter(site_output::Column::JobId.eq(job))
        .filter(site_output::Column::SiteId.eq(site))
        .filter(site_output::Column::Hash.eq(hash))
        .one(&ctx.db)
        .await?
        .is_some())
}
