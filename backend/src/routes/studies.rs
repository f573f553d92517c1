use actix_web::{HttpResponse, get, patch, post, web};
use consilium_core::api::{
    CreateRun, CreateStudy, PlanDto, PlanFileContent, PreflightQuery, PreflightReport, ReviewDto,
    RunDto, StudyDto, SubmitPlan, SubmitReview, UpdateStudy,
};
use consilium_core::problem::Problem;
use utoipa_actix_web::service_config::ServiceConfig;
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::context::AppContext;
use crate::error::AppResult;
use crate::services::{runs, studies};

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(list_studies)
        .service(create_study)
        .service(get_study)
        .service(update_study)
        .service(submit_study)
        .service(list_plans)
        .service(submit_plan)
        .service(get_plan)
        .service(plan_files)
        .service(list_reviews)
        .service(review_study)
        .service(preflight)
        .service(list_runs)
        .service(create_run)
        .service(get_run);
}

/// The studies you may see.
#[utoipa::path(tag = "studies", responses((status = 200, body = Vec<StudyDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/studies")]
async fn list_studies(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
) -> AppResult<web::Json<Vec<StudyDto>>> {
    Ok(web::Json(studies::list_studies(&ctx, &a).await?))
}

/// Drafts a study (researchers).
#[utoipa::path(tag = "studies", responses((status = 201, body = StudyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/studies")]
async fn create_study(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    body: web::Json<CreateStudy>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created().json(studies::create_study(&ctx, &a, body.into_inner()).await?))
}

/// One study.
#[utoipa::path(tag = "studies", responses((status = 200, body = StudyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/studies/{id}")]
async fn get_study(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<StudyDto>> {
    Ok(web::Json(
        studies::visible_study(&ctx.db, &a, id.into_inner()).await?,
    ))
}

/// Changes a draft, or amends an approved study (it returns to draft and needs a new decision).
#[utoipa::path(tag = "studies", responses((status = 200, body = StudyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[patch("/studies/{id}")]
async fn update_study(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<UpdateStudy>,
) -> AppResult<web::Json<StudyDto>> {
    Ok(web::Json(
        studies::update_study(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}

/// Submits the study (with its latest plan) to its ethics committee.
#[utoipa::path(tag = "studies", responses((status = 200, body = StudyDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/studies/{id}/submit")]
async fn submit_study(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<StudyDto>> {
    Ok(web::Json(
        studies::submit_study(&ctx, &a, id.into_inner()).await?,
    ))
}

/// The study's training plans, oldest first.
#[utoipa::path(tag = "plans", responses((status = 200, body = Vec<PlanDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/studies/{id}/plans")]
async fn list_plans(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<PlanDto>>> {
    Ok(web::Json(
        studies::list_plans(&ctx, &a, id.into_inner()).await?,
    ))
}

/// Submits a training plan (manifest and files); the server computes its hash. Any change
/// is a new version.
#[utoipa::path(tag = "plans", responses((status = 201, body = PlanDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/studies/{id}/plans")]
async fn submit_plan(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<SubmitPlan>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(studies::submit_plan(&ctx, &a, id.into_inner(), body.into_inner()).await?))
}

/// One training plan.
#[utoipa::path(tag = "plans", responses((status = 200, body = PlanDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/plans/{id}")]
async fn get_plan(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<PlanDto>> {
    Ok(web::Json(
        studies::get_plan(&ctx, &a, id.into_inner()).await?,
    ))
}

/// The files attached to a training plan, with their contents.
#[utoipa::path(tag = "plans", responses((status = 200, body = Vec<PlanFileContent>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/plans/{id}/files")]
async fn plan_files(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<PlanFileContent>>> {
    Ok(web::Json(
        studies::plan_files(&ctx, &a, id.into_inner()).await?,
    ))
}

/// The committee's decisions on this study.
#[utoipa::path(tag = "reviews", responses((status = 200, body = Vec<ReviewDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/studies/{id}/reviews")]
async fn list_reviews(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<ReviewDto>>> {
    Ok(web::Json(
        studies::list_reviews(&ctx, &a, id.into_inner()).await?,
    ))
}

/// Decides on a submitted study: approve (with conditions and expiry), request changes,
/// or reject. Binds to the protocol version and the latest plan hash.
#[utoipa::path(tag = "reviews", responses((status = 201, body = ReviewDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/studies/{id}/reviews")]
async fn review_study(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<SubmitReview>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(studies::review_study(&ctx, &a, id.into_inner(), body.into_inner()).await?))
}

/// Whether a run may start now, and every reason it can't.
#[utoipa::path(tag = "runs", params(PreflightQuery), responses((status = 200, body = PreflightReport),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/studies/{id}/preflight")]
async fn preflight(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    q: web::Query<PreflightQuery>,
) -> AppResult<web::Json<PreflightReport>> {
    Ok(web::Json(
        runs::report(&ctx, &a, id.into_inner(), q.plan_hash.as_deref()).await?,
    ))
}

/// The study's runs.
#[utoipa::path(tag = "runs", responses((status = 200, body = Vec<RunDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/studies/{id}/runs")]
async fn list_runs(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<RunDto>>> {
    Ok(web::Json(runs::list_runs(&ctx, &a, id.into_inner()).await?))
}

/// Creates a run; refused with every unmet condition unless the study and plan are
/// approved and every site has granted access.
#[utoipa::path(tag = "runs", responses((status = 201, body = RunDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/studies/{id}/runs")]
async fn create_run(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<CreateRun>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(runs::create_run(&ctx, &a, id.into_inner(), body.into_inner()).await?))
}

/// One run.
#[utoipa::path(tag = "runs", responses((status = 200, body = RunDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/runs/{id}")]
async fn get_run(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<RunDto>> {
    Ok(web::Json(runs::get_run(&ctx, &a, id.into_inner()).await?))
}
