use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use consilium_core::api::{AuthConfigDto, CreateToken, LocalLogin, MeDto, TokenCreated, TokenDto};
use consilium_core::problem::Problem;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_actix_web::service_config::ServiceConfig;
use uuid::Uuid;

use crate::auth::{
    Authenticated, SESSION_COOKIE, close_session, expired_session_cookie, session_cookie,
};
use crate::context::AppContext;
use crate::error::{AppError, AppResult};
use crate::services::{directory, sessions, tokens};

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(auth_config)
        .service(login)
        .service(logout)
        .service(me)
        .service(oidc_login)
        .service(oidc_callback)
        .service(list_tokens)
        .service(create_token)
        .service(revoke_token);
}

/// How people may sign in on this server.
#[utoipa::path(tag = "auth", responses((status = 200, body = AuthConfigDto)))]
#[get("/auth/config")]
async fn auth_config(ctx: web::Data<AppContext>) -> web::Json<AuthConfigDto> {
    web::Json(AuthConfigDto {
        local_accounts: ctx.settings.auth.local_accounts_enabled(),
        oidc: ctx.oidc.is_some(),
    })
}

/// Signs in with a development-only local account; sets the session cookie.
#[utoipa::path(tag = "auth", responses(
    (status = 200, body = MeDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/auth/login")]
async fn login(ctx: web::Data<AppContext>, body: web::Json<LocalLogin>) -> AppResult<HttpResponse> {
    let (user, secret) = sessions::local_login(&ctx, body.into_inner()).await?;
    let acting_roles = user.roles.clone();
    Ok(HttpResponse::Ok()
        .cookie(session_cookie(&ctx, secret))
        .json(MeDto { user, acting_roles }))
}

/// Ends the browser session.
#[utoipa::path(tag = "auth", responses((status = 204)))]
#[post("/auth/logout")]
async fn logout(ctx: web::Data<AppContext>, req: HttpRequest) -> AppResult<HttpResponse> {
    if let Some(c) = req.cookie(SESSION_COOKIE) {
        close_session(&ctx, c.value()).await?;
    }
    Ok(HttpResponse::NoContent()
        .cookie(expired_session_cookie(&ctx))
        .finish())
}

/// The signed-in user and the roles this request acts with.
#[utoipa::path(tag = "auth", responses(
    (status = 200, body = MeDto),
    (status = 401, body = Problem, content_type = "application/problem+json")))]
#[get("/auth/me")]
async fn me(
    ctx: web::Data<AppContext>,
    Authenticated(actor): Authenticated,
) -> AppResult<web::Json<MeDto>> {
    let user = directory::get_user(&ctx, &actor, actor.user_id).await?;
    Ok(web::Json(MeDto {
        user,
        acting_roles: actor.roles.iter().copied().collect(),
    }))
}

/// Starts OpenID Connect sign-in: redirects to the identity provider.
#[utoipa::path(tag = "auth", responses(
    (status = 303, description = "Redirect to the identity provider"),
    (status = 404, body = Problem, content_type = "application/problem+json")))]
#[get("/auth/oidc/login")]
async fn oidc_login(ctx: web::Data<AppContext>) -> AppResult<HttpResponse> {
    let url = sessions::oidc_start(&ctx).await?;
    Ok(HttpResponse::SeeOther()
        .insert_header(("Location", url))
        .finish())
}

#[derive(Deserialize, IntoParams)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Where the identity provider sends the browser back; opens the session.
#[utoipa::path(tag = "auth", params(CallbackQuery), responses(
    (status = 303, description = "Signed in; redirect to the portal"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/auth/oidc/callback")]
async fn oidc_callback(
    ctx: web::Data<AppContext>,
    q: web::Query<CallbackQuery>,
) -> AppResult<HttpResponse> {
    let q = q.into_inner();
    if let Some(error) = q.error {
        return Err(AppError::Unauthenticated(format!(
            "The identity provider did not sign you in ({error}{}). Start again at /api/v1/auth/oidc/login.",
            q.error_description
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        )));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return Err(AppError::Invalid(
            "The callback needs `code` and `state` from the identity provider.".into(),
        ));
    };
    let (_user, secret) = sessions::oidc_finish(&ctx, code, state).await?;
    Ok(HttpResponse::SeeOther()
        .cookie(session_cookie(&ctx, secret))
        .insert_header(("Location", "/"))
        .finish())
}

/// Your API tokens (never their secrets).
#[utoipa::path(tag = "tokens", responses((status = 200, body = Vec<TokenDto>)))]
#[get("/tokens")]
async fn list_tokens(
    ctx: web::Data<AppContext>,
    Authenticated(actor): Authenticated,
) -> AppResult<web::Json<Vec<TokenDto>>> {
    Ok(web::Json(tokens::list(&ctx, &actor).await?))
}

/// Creates an API token for yourself; the secret is in this response only.
#[utoipa::path(tag = "tokens", responses(
    (status = 201, body = TokenCreated),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/tokens")]
async fn create_token(
    ctx: web::Data<AppContext>,
    Authenticated(actor): Authenticated,
    body: web::Json<CreateToken>,
) -> AppResult<HttpResponse> {
    let owner = actor.user_id;
    Ok(HttpResponse::Created().json(tokens::create(&ctx, &actor, owner, body.into_inner()).await?))
}

/// Revokes an API token at once.
#[utoipa::path(tag = "tokens", responses(
    (status = 200, body = TokenDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[delete("/tokens/{id}")]
async fn revoke_token(
    ctx: web::Data<AppContext>,
    Authenticated(actor): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<TokenDto>> {
    Ok(web::Json(
        tokens::revoke(&ctx, &actor, id.into_inner()).await?,
    ))
}
