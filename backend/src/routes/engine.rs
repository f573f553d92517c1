use actix_web::{HttpResponse, get, post, put, web};
use consilium_core::api::{
    CreateWorkerToken, DatasetPrivacyDto, HeartbeatDto, LineageDto, ModelListQuery,
    ModelVersionDto, MonitoringReportDto, OutputQuery, OutputReceived, RegisterSiteKey,
    ReportMonitoring, RoundDto, RunDto, ServerKeyDto, SetPrivacyBudget, SiteGrantDto,
    SiteHealthDto, SiteKeyDto, StopRun, TokenCreated,
};
use consilium_core::problem::Problem;
use futures_util::StreamExt;
use sea_orm::EntityTrait;
use utoipa_actix_web::service_config::ServiceConfig;
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::context::AppContext;
use crate::entities::heartbeat;
use crate::error::{AppError, AppResult};
use crate::services::{access, models, privacy, runs, secagg, site_artifacts, site_keys, tokens};

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(rounds)
        .service(stop)
        .service(list_models)
        .service(get_model)
        .service(lineage)
        .service(weights)
        .service(release)
        .service(report)
        .service(monitoring)
        .service(site_grants)
        .service(site_model)
        .service(site_output)
        .service(site_secagg_post)
        .service(site_secagg_answer)
        .service(server_key)
        .service(site_health)
        .service(worker_token)
        .service(register_key)
        .service(list_keys)
        .service(revoke_key)
        .service(site_heartbeat)
        .service(site_privacy)
        .service(set_privacy_budget);
}

/// The site's dataset privacy ledger: its lifetime budget, the ε spent and reserved by every
/// study, round by round, and what is left (its worker, its custodians, administrators and
/// auditors).
#[utoipa::path(tag = "sites", responses((status = 200, body = DatasetPrivacyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/sites/{id}/privacy")]
async fn site_privacy(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<DatasetPrivacyDto>> {
    Ok(web::Json(
        privacy::dataset(&ctx, &a, id.into_inner()).await?,
    ))
}

/// Sets the site's lifetime privacy budget for its dataset (its custodian or an administrator,
/// signed in). From then on no private round goes to the site that would take its spending past
/// the budget; a budget below what was spent stops them all.
#[utoipa::path(tag = "sites", request_body = SetPrivacyBudget,
    responses((status = 200, body = DatasetPrivacyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[put("/sites/{id}/privacy/budget")]
async fn set_privacy_budget(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<SetPrivacyBudget>,
) -> AppResult<web::Json<DatasetPrivacyDto>> {
    Ok(web::Json(
        privacy::set_budget(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}

/// The run's rounds: state, deadline, quorum, and each site's part.
#[utoipa::path(tag = "runs", responses((status = 200, body = Vec<RoundDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/runs/{id}/rounds")]
async fn rounds(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<RoundDto>>> {
    Ok(web::Json(models::rounds(&ctx, &a, id.into_inner()).await?))
}

/// Stops a run; no further round starts.
#[utoipa::path(tag = "runs", responses((status = 200, body = RunDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/runs/{id}/stop")]
async fn stop(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<StopRun>,
) -> AppResult<web::Json<RunDto>> {
    Ok(web::Json(
        runs::stop_run(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}

/// Model versions you may see, optionally of one run or study.
#[utoipa::path(tag = "models", params(ModelListQuery), responses((status = 200, body = Vec<ModelVersionDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/models")]
async fn list_models(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    q: web::Query<ModelListQuery>,
) -> AppResult<web::Json<Vec<ModelVersionDto>>> {
    Ok(web::Json(
        models::list(&ctx, &a, q.run_id, q.study_id).await?,
    ))
}

/// One model version.
#[utoipa::path(tag = "models", responses((status = 200, body = ModelVersionDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/models/{id}")]
async fn get_model(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<ModelVersionDto>> {
    Ok(web::Json(models::get(&ctx, &a, id.into_inner()).await?))
}

/// Everything the version stands on: parent, round, updates and sites, plan, ethics decision, grants.
#[utoipa::path(tag = "models", responses((status = 200, body = LineageDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/models/{id}/lineage")]
async fn lineage(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<LineageDto>> {
    Ok(web::Json(models::lineage(&ctx, &a, id.into_inner()).await?))
}

/// The version's weights (safetensors).
#[utoipa::path(tag = "models", responses(
    (status = 200, description = "safetensors", body = Vec<u8>, content_type = "application/octet-stream"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/models/{id}/weights")]
async fn weights(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<HttpResponse> {
    let (hash, bytes) = models::weights(&ctx, &a, id.into_inner()).await?;
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"{hash}.safetensors\""),
        ))
        .insert_header(("ETag", format!("\"{hash}\"")))
        .body(bytes))
}

/// Releases the version for deployment to the sites.
#[utoipa::path(tag = "models", responses((status = 200, body = ModelVersionDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/models/{id}/release")]
async fn release(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<ModelVersionDto>> {
    Ok(web::Json(models::release(&ctx, &a, id.into_inner()).await?))
}

/// A site reports how a released model performs on its data.
#[utoipa::path(tag = "models", responses((status = 201, body = MonitoringReportDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/models/{id}/monitoring")]
async fn report(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<ReportMonitoring>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(models::report(&ctx, &a, id.into_inner(), body.into_inner()).await?))
}

/// The sites' monitoring reports for a version.
#[utoipa::path(tag = "models", responses((status = 200, body = Vec<MonitoringReportDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/models/{id}/monitoring")]
async fn monitoring(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<MonitoringReportDto>>> {
    Ok(web::Json(
        models::monitoring(&ctx, &a, id.into_inner()).await?,
    ))
}

/// The grants in force at a site (what its worker checks each job against).
#[utoipa::path(tag = "sites", responses((status = 200, body = Vec<SiteGrantDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/sites/{id}/grants")]
async fn site_grants(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<SiteGrantDto>>> {
    Ok(web::Json(
        access::site_grants(&ctx, &a, id.into_inner()).await?,
    ))
}

/// A global model named by one of the site's jobs (safetensors), for the site's worker only:
/// the model a round of a run it takes part in started from, or a version such a run made.
#[utoipa::path(tag = "sites", responses(
    (status = 200, content_type = "application/octet-stream", body = Vec<u8>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/sites/{id}/models/{sha256}")]
async fn site_model(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    path: web::Path<(Uuid, String)>,
) -> AppResult<HttpResponse> {
    let (site, hash) = path.into_inner();
    let bytes = site_artifacts::read_model(&ctx, &a, site, &hash).await?;
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(bytes))
}

fn site_job(site: Uuid, job: Uuid, q: OutputQuery) -> secagg::SiteJob {
    secagg::SiteJob {
        site,
        job,
        run_id: q.run_id,
        number: q.round as i32,
    }
}

fn secagg_stage(name: &str) -> AppResult<consilium_core::secagg::wire::Stage> {
    consilium_core::secagg::wire::Stage::parse(name).ok_or_else(|| {
        AppError::NotFound(format!(
            "No secure-aggregation stage {name:?}: the stages are keys, shares, masked and reveals."
        ))
    })
}

/// The site's part of a secure-aggregation exchange of a training job it was sent and that is
/// still open, from the site's worker only: its public keys and training images (`keys`), its
/// encrypted shares (`shares`), the hash of the masked input it handed over as the job's output
/// (`masked`), the shares it reveals (`reveals`).
#[utoipa::path(tag = "sites", params(OutputQuery),
    request_body(content = Object, description = "The stage's post (`secagg::wire`)"),
    responses((status = 204, description = "Recorded"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/sites/{id}/jobs/{job}/secagg/{stage}")]
async fn site_secagg_post(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    path: web::Path<(Uuid, Uuid, String)>,
    query: web::Query<OutputQuery>,
    body: web::Json<serde_json::Value>,
) -> AppResult<HttpResponse> {
    let (site, job, stage) = path.into_inner();
    let stage = secagg_stage(&stage)?;
    secagg::post(
        &ctx,
        &a,
        site_job(site, job, query.into_inner()),
        stage,
        body.into_inner(),
    )
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// What the site learns when a secure-aggregation exchange closes (202 while it is open): its
/// index, threshold and neighbours' public keys (`keys`), the shares sent to it (`shares`), who
/// sent a masked input and who dropped out (`masked`, `reveals`).
#[utoipa::path(tag = "sites", params(OutputQuery),
    responses((status = 200, body = Object), (status = 202, description = "Still open: ask again"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/sites/{id}/jobs/{job}/secagg/{stage}")]
async fn site_secagg_answer(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    path: web::Path<(Uuid, Uuid, String)>,
    query: web::Query<OutputQuery>,
) -> AppResult<HttpResponse> {
    let (site, job, stage) = path.into_inner();
    let stage = secagg_stage(&stage)?;
    let at = site_job(site, job, query.into_inner());
    Ok(match secagg::answer(&ctx, &a, at, stage).await? {
        Some(v) => HttpResponse::Ok().json(v),
        None => HttpResponse::Accepted().json(serde_json::json!({"state": "open"})),
    })
}

/// The site's output of a job it was sent and that is still open (its update, or a preview
/// set), from the site's worker only. The server hashes what arrives; the job's result then
/// counts only with this hash.
#[utoipa::path(tag = "sites", params(OutputQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = OutputReceived),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[put("/sites/{id}/jobs/{job}/output")]
async fn site_output(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    path: web::Path<(Uuid, Uuid)>,
    query: web::Query<OutputQuery>,
    mut payload: web::Payload,
) -> AppResult<HttpResponse> {
    let (site, job) = path.into_inner();
    let limit = ctx
        .settings
        .engine
        .max_output_mib
        .saturating_mul(1024 * 1024) as usize;
    let mut bytes = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| AppError::Invalid(format!("The request body could not be read: {e}.")))?;
        if bytes.len() + chunk.len() > limit {
            return Err(AppError::TooLarge(format!(
                "The output is larger than the {} MiB this server accepts (engine.max_output_mib).",
                ctx.settings.engine.max_output_mib
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    let size = bytes.len() as u64;
    let q = query.into_inner();
    let sha256 =
        site_artifacts::receive_output(&ctx, &a, site, job, q.run_id, q.round as i32, bytes)
            .await?;
    Ok(HttpResponse::Created().json(OutputReceived {
        sha256,
        bytes: size,
    }))
}

/// Each site's worker as last heard (online, training, offline, never), for the sites this
/// person may see.
#[utoipa::path(tag = "sites", responses((status = 200, body = Vec<SiteHealthDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/site-health")]
async fn site_health(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
) -> AppResult<web::Json<Vec<SiteHealthDto>>> {
    Ok(web::Json(crate::services::health::list(&ctx, &a).await?))
}

/// The server's public job-signing key, for a worker's `server_public_key`.
#[utoipa::path(tag = "sites", responses((status = 200, body = ServerKeyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/server-key")]
async fn server_key(
    ctx: web::Data<AppContext>,
    Authenticated(_a): Authenticated,
) -> AppResult<web::Json<ServerKeyDto>> {
    let key = ctx.federation()?.signer.verifying_key();
    Ok(web::Json(ServerKeyDto {
        key_id: consilium_core::signing::key_id(&key),
        public_key: consilium_core::signing::encode_public_key(&key),
    }))
}

/// Creates the site worker's token (the site's custodian or an administrator); shown once.
#[utoipa::path(tag = "sites", responses((status = 201, body = TokenCreated),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/sites/{id}/worker-tokens")]
async fn worker_token(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<CreateWorkerToken>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(tokens::create_worker_token(&ctx, &a, id.into_inner(), body.into_inner()).await?))
}

/// Registers a public signing key of the site's workers (its custodian or an administrator,
/// signed in). From then on the site's messages signed with it are recorded.
#[utoipa::path(tag = "sites", responses((status = 201, body = SiteKeyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/sites/{id}/keys")]
async fn register_key(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<RegisterSiteKey>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(site_keys::register(&ctx, &a, id.into_inner(), body.into_inner()).await?))
}

/// The site's signing keys, in force and revoked: its worker, its custodians, administrators
/// and auditors.
#[utoipa::path(tag = "sites", responses((status = 200, body = Vec<SiteKeyDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/sites/{id}/keys")]
async fn list_keys(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<SiteKeyDto>>> {
    Ok(web::Json(site_keys::list(&ctx, &a, id.into_inner()).await?))
}

/// Revokes a signing key (rotation: register the new key, then revoke the old one). Nothing
/// signed with it is recorded from then on.
#[utoipa::path(tag = "sites", responses((status = 200, body = SiteKeyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/sites/{id}/keys/{key_id}/revoke")]
async fn revoke_key(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    path: web::Path<(Uuid, String)>,
) -> AppResult<web::Json<SiteKeyDto>> {
    let (site, key) = path.into_inner();
    Ok(web::Json(site_keys::revoke(&ctx, &a, site, &key).await?))
}

/// The site worker's last heartbeat: its worker, its custodians, administrators and auditors.
#[utoipa::path(tag = "sites", responses((status = 200, body = HeartbeatDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/sites/{id}/heartbeat")]
async fn site_heartbeat(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<HeartbeatDto>> {
    let id = id.into_inner();
    // What a site's worker reports (its image counts, its version) is the site's business.
    let site = crate::services::directory::get_site(&ctx.db, id).await?;
    if !crate::services::directory::sees_site_reports(&a, &site) {
        return Err(AppError::Forbidden(format!(
            "Only {:?}'s worker, its custodians, administrators and auditors may read its heartbeat.",
            site.name
        )));
    }
    let h = heartbeat::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("Site {id}'s worker has not reported yet; check that it runs and reaches the broker.")))?;
    Ok(web::Json(HeartbeatDto {
        site_id: h.site_id,
        state: h.state,
        data_summary: h.data_summary,
        patients: h.patients,
        version: h.version,
        at: h.at,
    }))
}
