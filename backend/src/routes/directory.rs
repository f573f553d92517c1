use actix_web::{HttpResponse, get, post, put, web};
use consilium_core::api::{
    CommitteeDto, CreateCommittee, CreateSite, CreateUser, SetCustodians, SetMembers, SetRoles,
    SiteDto, UserDto,
};
use consilium_core::problem::Problem;
use utoipa_actix_web::service_config::ServiceConfig;
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::context::AppContext;
use crate::error::AppResult;
use crate::services::directory;

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(list_users)
        .service(create_user)
        .service(get_user)
        .service(set_roles)
        .service(list_sites)
        .service(create_site)
        .service(get_site)
        .service(set_custodians)
        .service(list_committees)
        .service(create_committee)
        .service(get_committee)
        .service(set_members);
}

/// All users (administrators and auditors).
#[utoipa::path(tag = "directory", responses((status = 200, body = Vec<UserDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/users")]
async fn list_users(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
) -> AppResult<web::Json<Vec<UserDto>>> {
    Ok(web::Json(directory::list_users(&ctx, &a).await?))
}

/// Registers a user with roles (administrators).
#[utoipa::path(tag = "directory", responses((status = 201, body = UserDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/users")]
async fn create_user(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    body: web::Json<CreateUser>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created().json(directory::create_user(&ctx, &a, body.into_inner()).await?))
}

/// One user (yourself, or anyone for administrators and auditors).
#[utoipa::path(tag = "directory", responses((status = 200, body = UserDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/users/{id}")]
async fn get_user(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<UserDto>> {
    Ok(web::Json(
        directory::get_user(&ctx, &a, id.into_inner()).await?,
    ))
}

/// Replaces a user's roles (administrators).
#[utoipa::path(tag = "directory", responses((status = 200, body = UserDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[put("/users/{id}/roles")]
async fn set_roles(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<SetRoles>,
) -> AppResult<web::Json<UserDto>> {
    Ok(web::Json(
        directory::set_roles(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}

/// The participating hospitals.
#[utoipa::path(tag = "directory", responses((status = 200, body = Vec<SiteDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/sites")]
async fn list_sites(
    ctx: web::Data<AppContext>,
    Authenticated(_a): Authenticated,
) -> AppResult<web::Json<Vec<SiteDto>>> {
    Ok(web::Json(directory::list_sites(&ctx).await?))
}

/// Registers a site with its data custodians (administrators).
#[utoipa::path(tag = "directory", responses((status = 201, body = SiteDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/sites")]
async fn create_site(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    body: web::Json<CreateSite>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created().json(directory::create_site(&ctx, &a, body.into_inner()).await?))
}

/// One site.
#[utoipa::path(tag = "directory", responses((status = 200, body = SiteDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/sites/{id}")]
async fn get_site(
    ctx: web::Data<AppContext>,
    Authenticated(_a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<SiteDto>> {
    Ok(web::Json(
        directory::get_site(&ctx.db, id.into_inner()).await?,
    ))
}

/// Replaces a site's custodians (administrators).
#[utoipa::path(tag = "directory", responses((status = 200, body = SiteDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[put("/sites/{id}/custodians")]
async fn set_custodians(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<SetCustodians>,
) -> AppResult<web::Json<SiteDto>> {
    Ok(web::Json(
        directory::set_custodians(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}

/// The ethics committees.
#[utoipa::path(tag = "directory", responses((status = 200, body = Vec<CommitteeDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/committees")]
async fn list_committees(
    ctx: web::Data<AppContext>,
    Authenticated(_a): Authenticated,
) -> AppResult<web::Json<Vec<CommitteeDto>>> {
    Ok(web::Json(directory::list_committees(&ctx).await?))
}

/// Registers an ethics committee with its members (administrators).
#[utoipa::path(tag = "directory", responses((status = 201, body = CommitteeDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/committees")]
async fn create_committee(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    body: web::Json<CreateCommittee>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(directory::create_committee(&ctx, &a, body.into_inner()).await?))
}

/// One committee.
#[utoipa::path(tag = "directory", responses((status = 200, body = CommitteeDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/committees/{id}")]
async fn get_committee(
    ctx: web::Data<AppContext>,
    Authenticated(_a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<CommitteeDto>> {
    Ok(web::Json(
        directory::get_committee(&ctx.db, id.into_inner()).await?,
    ))
}

/// Replaces a committee's members (administrators).
#[utoipa::path(tag = "directory", responses((status = 200, body = CommitteeDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[put("/committees/{id}/members")]
async fn set_members(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<SetMembers>,
) -> AppResult<web::Json<CommitteeDto>> {
    Ok(web::Json(
        directory::set_members(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}
