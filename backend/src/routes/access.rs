use actix_web::{HttpResponse, get, post, web};
use consilium_core::api::{
    AccessListQuery, AccessRequestDto, CreateAccessRequest, DecideAccessRequest, RevokeAccess,
};
use consilium_core::problem::Problem;
use utoipa_actix_web::service_config::ServiceConfig;
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::context::AppContext;
use crate::error::AppResult;
use crate::services::access;

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(create_request)
        .service(list_requests)
        .service(get_request)
        .service(decide)
        .service(revoke);
}

/// Files a data-access request for one participating site (the study's researcher).
#[utoipa::path(tag = "data access", responses((status = 201, body = AccessRequestDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/studies/{id}/access-requests")]
async fn create_request(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<CreateAccessRequest>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(access::create_request(&ctx, &a, id.into_inner(), body.into_inner()).await?))
}

/// The data-access requests you may see, optionally for one site or study.
#[utoipa::path(tag = "data access", params(AccessListQuery), responses((status = 200, body = Vec<AccessRequestDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/access-requests")]
async fn list_requests(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    q: web::Query<AccessListQuery>,
) -> AppResult<web::Json<Vec<AccessRequestDto>>> {
    Ok(web::Json(
        access::list(&ctx, &a, q.site_id, q.study_id).await?,
    ))
}

/// One data-access request.
#[utoipa::path(tag = "data access", responses((status = 200, body = AccessRequestDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/access-requests/{id}")]
async fn get_request(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<AccessRequestDto>> {
    Ok(web::Json(access::get(&ctx, &a, id.into_inner()).await?))
}

/// Approves (with expiry and scope) or denies a pending request (the site's custodian).
#[utoipa::path(tag = "data access", responses((status = 200, body = AccessRequestDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/access-requests/{id}/decision")]
async fn decide(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<DecideAccessRequest>,
) -> AppResult<web::Json<AccessRequestDto>> {
    Ok(web::Json(
        access::decide(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}

/// Revokes an approved grant (the site's custodian); no new round may use it.
#[utoipa::path(tag = "data access", responses((status = 200, body = AccessRequestDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/access-requests/{id}/revoke")]
async fn revoke(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<RevokeAccess>,
) -> AppResult<web::Json<AccessRequestDto>> {
    Ok(web::Json(
        access::revoke(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}
