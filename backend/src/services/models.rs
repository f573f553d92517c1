//! The model registry: versions with their lineage, weights, release, and the monitoring
//! reports sites send for a released model. Also the run's rounds as people see them.

use chrono::Utc;
use consilium_core::Role;
use consilium_core::api::{
    ExcludedSite, LineageDto, ModelVersionDto, MonitoringReportDto, ReportMonitoring, RoundDto,
    RoundSiteDto, SignedUpdateDto, UncountedResult,
};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use uuid::Uuid;

use super::{from_json, not_found};
use crate::audit;
use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::{
    access_request, model_version, monitoring_report, plan, review, round, run, update,
};
use crate::error::{AppError, AppResult};
use crate::services::{access, directory, runs, studies};

pub fn version_dto(m: &model_version::Model) -> AppResult<ModelVersionDto> {
    Ok(ModelVersionDto {
        id: m.id,
        run_id: m.run_id,
        study_id: m.study_id,
        round: m.round,
        hash: m.hash.clone(),
        parent_id: m.parent_id,
        plan_hash: m.plan_hash.clone(),
        strategy: m.strategy.clone(),
        review_id: m.review_id,
        grant_ids: from_json(&m.grant_ids)?,
        contributions: from_json(&m.contributions)?,
        evaluation: m.evaluation.as_ref().map(from_json).transpose()?,
        created_at: m.created_at,
        released_at: m.released_at,
        released_by: m.released_by,
        secure_aggregation: m.secure_aggregation.as_ref().map(from_json).transpose()?,
    })
}

async fn visible_version(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
) -> AppResult<model_version::Model> {
    let m = model_version::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("model version", id))?;
    studies::visible_study(&ctx.db, actor, m.study_id)
        .await
        .map_err(|_| super::hidden("model version", id))?;
    Ok(m)
}

pub async fn list(
    ctx: &AppContext,
    actor: &Actor,
    run_id: Option<Uuid>,
    study_id: Option<Uuid>,
) -> AppResult<Vec<ModelVersionDto>> {
    let mut q = model_version::Entity::find().order_by_asc(model_version::Column::CreatedAt);
    if let Some(r) = run_id {
        q = q.filter(model_version::Column::RunId.eq(r));
    }
    if let Some(s) = study_id {
        q = q.filter(model_version::Column::StudyId.eq(s));
    }
    let mut out = Vec::new();
    for m in q.all(&ctx.db).await? {
        if studies::visible_study(&ctx.db, actor, m.study_id)
            .await
            .is_ok()
        {
            out.push(version_dto(&m)?);
        }
    }
    Ok(out)
}

pub async fn get(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<ModelVersionDto> {
    version_dto(&visible_version(ctx, actor, id).await?)
}

/// The weights (safetensors) of a model version.
pub async fn weights(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<(String, Vec<u8>)> {
    let m = visible_version(ctx, actor, id).await?;
    let bytes = ctx
        .federation()?
        .artifacts
        .get(&m.hash)
        .await
        .map_err(AppError::unexpected)?;
    Ok((m.hash, bytes))
}

pub async fn round_dto(ctx: &AppContext, x: &round::Model) -> AppResult<RoundDto> {
    let sites: Vec<Uuid> = from_json(&x.sites)?;
    let excluded: Vec<ExcludedSite> = from_json(&x.excluded)?;
    let rows = update::Entity::find()
        .filter(update::Column::RunId.eq(x.run_id))
        .filter(update::Column::Round.eq(x.number))
        .filter(update::Column::Kind.eq("train"))
        .filter(update::Column::Late.eq(false))
        .all(&ctx.db)
        .await?;
    let not_counted = update::Entity::find()
        .filter(update::Column::RunId.eq(x.run_id))
        .filter(update::Column::Round.eq(x.number))
        .filter(update::Column::Late.eq(true))
        .order_by_asc(update::Column::ReceivedAt)
        .all(&ctx.db)
        .await?
        .into_iter()
        .map(|u| UncountedResult {
            site_id: u.site_id,
            job_id: u.job_id,
            outcome: u.outcome,
            reason: u.reason,
            received_at: u.received_at,
        })
        .collect();
    let mut out = Vec::new();
    for s in sites.iter().chain(
        excluded
            .iter()
            .map(|e| &e.site_id)
            .filter(|id| !sites.contains(id)),
    ) {
        let u = rows.iter().find(|u| u.site_id == *s);
        let ex = excluded.iter().find(|e| e.site_id == *s);
        let status = match (u, ex) {
            (Some(u), _) => u.outcome.clone(),
            (None, Some(_)) => "excluded".into(),
            (None, None) => "waiting".into(),
        };
        out.push(RoundSiteDto {
            site_id: *s,
            site_name: match directory::get_site(&ctx.db, *s).await {
                Ok(x) => x.name,
                // A site removed since: named by its id. A database error is an error.
                Err(AppError::NotFound(_)) => s.to_string(),
                Err(e) => return Err(e),
            },
            status,
            reason: u
                .and_then(|u| u.reason.clone())
                .or_else(|| ex.map(|e| e.reason.clone())),
            samples: u.and_then(|u| u.samples),
            evaluation: u
                .and_then(|u| u.evaluation.as_ref())
                .map(from_json)
                .transpose()?,
            duration_ms: u.and_then(|u| u.duration_ms),
            privacy: u
                .and_then(|u| u.privacy.as_ref())
                .map(from_json)
                .transpose()?,
        });
    }
    Ok(RoundDto {
        number: x.number,
        state: x.state.clone(),
        deadline: x.deadline,
        quorum: x.quorum,
        sites: out,
        excluded,
        model_version_id: x.model_version_id,
        failure: x.failure.clone(),
        not_counted,
    })
}

pub async fn rounds(ctx: &AppContext, actor: &Actor, run_id: Uuid) -> AppResult<Vec<RoundDto>> {
    runs::get_run(ctx, actor, run_id).await?;
    let rows = round::Entity::find()
        .filter(round::Column::RunId.eq(run_id))
        .order_by_asc(round::Column::Number)
        .all(&ctx.db)
        .await?;
    let mut out = Vec::new();
    for x in &rows {
        out.push(round_dto(ctx, x).await?);
    }
    Ok(out)
}

/// The model, its parent, its round and updates, the plan, the ethics decision and the grants.
pub async fn lineage(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<LineageDto> {
    let m = visible_version(ctx, actor, id).await?;
    let parent = match m.parent_id {
        Some(p) => model_version::Entity::find_by_id(p)
            .one(&ctx.db)
            .await?
            .map(|p| version_dto(&p))
            .transpose()?,
        None => None,
    };
    let r = run::Entity::find_by_id(m.run_id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("run", m.run_id))?;
    let x = round::Entity::find()
        .filter(round::Column::RunId.eq(m.run_id))
        .filter(round::Column::Number.eq(m.round))
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("round", m.id))?;
    let p = plan::Entity::find()
        .filter(plan::Column::StudyId.eq(m.study_id))
        .filter(plan::Column::Hash.eq(m.plan_hash.as_str()))
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("plan", m.id))?;
    let rv = review::Entity::find_by_id(m.review_id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("review", m.review_id))?;
    let grant_ids: Vec<Uuid> = from_json(&m.grant_ids)?;
    let mut grants = Vec::new();
    for g in grant_ids {
        if let Some(a) = access_request::Entity::find_by_id(g).one(&ctx.db).await? {
            let dto = access::access_dto(&a)?;
            grants.push(if access::may_read(ctx, actor, &a).await? {
                dto
            } else {
                access::withheld(dto)
            });
        }
    }
    let signatures = signed_updates(ctx, &m).await?;
    Ok(LineageDto {
        model: version_dto(&m)?,
        signatures,
        parent,
        run: runs::run_dto(&r)?,
        round: round_dto(ctx, &x).await?,
        plan: studies::plan_dto(&p)?,
        review: studies::review_dto(&rv)?,
        grants,
    })
}

/// The signed site updates a version was aggregated from, each with its site's public key.
async fn signed_updates(
    ctx: &AppContext,
    m: &model_version::Model,
) -> AppResult<Vec<SignedUpdateDto>> {
    let contributions: Vec<consilium_core::api::Contribution> = from_json(&m.contributions)?;
    let mut out = Vec::new();
    for c in contributions {
        let u = crate::entities::update::Entity::find()
            .filter(crate::entities::update::Column::RunId.eq(m.run_id))
            .filter(crate::entities::update::Column::Round.eq(m.round))
            .filter(crate::entities::update::Column::SiteId.eq(c.site_id))
            .filter(crate::entities::update::Column::UpdateHash.eq(c.update_hash.as_str()))
            .filter(crate::entities::update::Column::Late.eq(false))
            .one(&ctx.db)
            .await?;
        let key = match u.as_ref().and_then(|u| u.key_id.clone()) {
            Some(k) => crate::entities::site_key::Entity::find_by_id(k)
                .one(&ctx.db)
                .await?
                .map(|k| k.public_key),
            None => None,
        };
        out.push(SignedUpdateDto {
            site_id: c.site_id,
            site_name: c.site_name,
            job_id: u.as_ref().map(|u| u.job_id).unwrap_or_default(),
            update_hash: Some(c.update_hash),
            key_id: u.as_ref().and_then(|u| u.key_id.clone()),
            public_key: key,
            message: u.as_ref().and_then(|u| u.signed_message.clone()),
            signature: u.as_ref().and_then(|u| u.signature.clone()),
        });
    }
    Ok(out)
}

/// Checks, with nothing but the lineage itself (its public keys included), that each site
/// produced the update the model says it did: one line per contribution, and whether it holds.
pub fn verify_lineage(l: &LineageDto) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for c in &l.model.contributions {
        let short = c.update_hash.get(..12).unwrap_or(&c.update_hash);
        let head = format!("{} (site {}): update {short}…", c.site_name, c.site_id);
        let Some(s) = l.signatures.iter().find(|s| {
            s.site_id == c.site_id && s.update_hash.as_deref() == Some(c.update_hash.as_str())
        }) else {
            out.push((false, format!("{head}: no signed update in the lineage")));
            continue;
        };
        let (Some(message), Some(signature), Some(kid), Some(public)) =
            (&s.message, &s.signature, &s.key_id, &s.public_key)
        else {
            out.push((
                false,
                format!("{head}: unsigned (recorded before sites signed their updates)"),
            ));
            continue;
        };
        let checked = verify_signed_update(s, message, signature, kid, public, &c.update_hash);
        match checked {
            Ok(()) => out.push((true, format!("{head}: signed by {kid}, verified"))),
            Err(e) => out.push((false, format!("{head}: {e}"))),
        }
    }
    out
}

/// Checks one signed update with its own public key: the signature holds, and the message is
/// that site's result of that job with `update_hash`.
fn verify_signed_update(
    s: &SignedUpdateDto,
    message: &str,
    signature: &str,
    kid: &str,
    public: &str,
    update_hash: &str,
) -> Result<(), String> {
    use consilium_core::protocol::{Outcome, WorkerMessage};
    use consilium_core::signing::{self, SignedMessage, key_id, parse_public_key};
    let key = parse_public_key(public).map_err(|e| e.to_string())?;
    if key_id(&key) != kid {
        return Err(format!(
            "the public key given is {}, not the signing key {kid}",
            key_id(&key)
        ));
    }
    let signed = SignedMessage {
        message: message.to_string(),
        key_id: kid.to_string(),
        signature: signature.to_string(),
    };
    match signing::verify(&key, &signed).map_err(|e| e.to_string())? {
        WorkerMessage::Result(r)
            if r.site_id == s.site_id
                && r.job_id == s.job_id
                && matches!(&r.outcome, Outcome::Trained { update_hash: h, .. } if h == update_hash) =>
        {
            Ok(())
        }
        _ => Err("the signed message is not this site's result with this update".into()),
    }
}

/// Checks signed updates as the audit export lists them (`format=signatures`), each with
/// nothing but itself: one line per update, and whether it holds.
pub fn verify_signed_updates(list: &[SignedUpdateDto]) -> Vec<(bool, String)> {
    list.iter()
        .map(|s| {
            let hash = s.update_hash.clone().unwrap_or_default();
            let short = hash.get(..12).unwrap_or(&hash);
            let head = format!("{} (site {}): update {short}…", s.site_name, s.site_id);
            match (&s.message, &s.signature, &s.key_id, &s.public_key) {
                (Some(m), Some(sig), Some(kid), Some(public)) => {
                    match verify_signed_update(s, m, sig, kid, public, &hash) {
                        Ok(()) => (true, format!("{head}: signed by {kid}, verified")),
                        Err(e) => (false, format!("{head}: {e}")),
                    }
                }
                _ => (false, format!("{head}: unsigned")),
            }
        })
        .collect()
}

/// Every signed update this server recorded, oldest first, each with its site's public key
/// (the audit export's `signatures`).
pub async fn all_signed_updates(ctx: &AppContext) -> AppResult<Vec<SignedUpdateDto>> {
    use crate::entities::{site, site_key, update};
    let rows = update::Entity::find()
        .filter(update::Column::Signature.is_not_null())
        .filter(update::Column::UpdateHash.is_not_null())
        .order_by_asc(update::Column::ReceivedAt)
        .all(&ctx.db)
        .await?;
    let mut out = Vec::new();
    for u in rows {
        let public = match &u.key_id {
            Some(k) => site_key::Entity::find_by_id(k.clone())
                .one(&ctx.db)
                .await?
                .map(|k| k.public_key),
            None => None,
        };
        let site_name = site::Entity::find_by_id(u.site_id)
            .one(&ctx.db)
            .await?
            .map(|s| s.name)
            .unwrap_or_default();
        out.push(SignedUpdateDto {
            site_id: u.site_id,
            site_name,
            job_id: u.job_id,
            update_hash: u.update_hash,
            key_id: u.key_id,
            public_key: public,
            message: u.signed_message,
            signature: u.signature,
        });
    }
    Ok(out)
}

/// Releases a version for deployment to the sites (the study's researcher).
pub async fn release(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<ModelVersionDto> {
    let m = visible_version(ctx, actor, id).await?;
    let s = studies::visible_study(&ctx.db, actor, m.study_id).await?;
    if !(actor.has(Role::Researcher) && s.researcher_id == actor.user_id) {
        return Err(AppError::Forbidden(
            "Only the study's researcher may release its models.".into(),
        ));
    }
    if m.evaluation.is_none() {
        return Err(AppError::conflict(
            "not_evaluated",
            "This version has not been evaluated at the sites yet; release an evaluated version.",
        ));
    }
    if m.released_at.is_some() {
        return Err(AppError::conflict(
            "invalid_state",
            "This version is already released.",
        ));
    }
    let w = ctx.begin_write().await?;
    let mut a: model_version::ActiveModel = m.into();
    a.released_at = Set(Some(Utc::now()));
    a.released_by = Set(Some(actor.user_id));
    let m = a.update(&*w).await?;
    let dto = version_dto(&m)?;
    audit::append(&*w, actor, "model.released", "model_version", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

/// A site's monitoring metrics for a released model: its worker, or its custodian.
pub async fn report(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: ReportMonitoring,
) -> AppResult<MonitoringReportDto> {
    // Refused as "not found" unless the caller may see the model and speaks for a site of its
    // study: otherwise the answers (404, 409, 201) would tell which model ids exist and which
    // are released, and a site in no study could report on any model.
    let m = model_version::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("model version", id))?;
    let site = directory::get_site(&ctx.db, input.site_id)
        .await
        .map_err(|_| super::hidden("model version", id))?;
    let speaks_for_site = actor.site_id == Some(site.id)
        || (actor.site_id.is_none()
            && actor.has(Role::Custodian)
            && site.custodians.contains(&actor.user_id));
    let study = studies::load_study(&ctx.db, m.study_id).await?;
    let in_study = studies::study_dto(&study)?
        .sites
        .iter()
        .any(|s| s.site_id == site.id);
    if !(speaks_for_site && in_study) {
        return Err(super::hidden("model version", id));
    }
    if m.released_at.is_none() {
        return Err(AppError::conflict(
            "not_released",
            "Monitoring is reported for released models only.",
        ));
    }
    let mut checks = super::Checks::default();
    let note = checks.optional_text("note", input.note.as_deref(), 5000);
    let mt = &input.metrics;
    checks.check(
        [mt.loss, mt.accuracy].iter().all(|v| v.is_finite()) && mt.auroc.is_none_or(f64::is_finite),
        "metrics must be finite numbers",
    );
    checks.check(
        (0.0..=1.0).contains(&mt.accuracy),
        "metrics.accuracy must be between 0 and 1",
    );
    checks.finish()?;
    let w = ctx.begin_write().await?;
    let r = monitoring_report::ActiveModel {
        id: Set(Uuid::new_v4()),
        model_version_id: Set(id),
        site_id: Set(site.id),
        metrics: Set(serde_json::to_value(&input.metrics)?),
        note: Set(note),
        reported_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    let dto = MonitoringReportDto {
        id: r.id,
        model_version_id: id,
        site_id: site.id,
        metrics: input.metrics,
        note: r.note.clone(),
        reported_at: r.reported_at,
    };
    audit::append(
        &*w,
        actor,
        "model.monitoring_reported",
        "monitoring_report",
        r.id,
        &dto,
    )
    .await?;
    w.commit().await?;
    Ok(dto)
}

pub async fn monitoring(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
) -> AppResult<Vec<MonitoringReportDto>> {
    visible_version(ctx, actor, id).await?;
    let rows = monitoring_report::Entity::find()
        .filter(monitoring_report::Column::ModelVersionId.eq(id))
        .order_by_asc(monitoring_report::Column::ReportedAt)
        .all(&ctx.db)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(MonitoringReportDto {
                id: r.id,
                model_version_id: id,
                site_id: r.site_id,
                metrics: from_json(&r.metrics)?,
                note: r.note.clone(),
                reported_at: r.reported_at,
            })
        })
        .collect()
}
