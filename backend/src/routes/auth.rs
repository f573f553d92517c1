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
async fn login(
    ctx: web::Data<AppContext>,
    req: HttpRequest,
    body: web::Json<LocalLogin>,
) -> AppResult<HttpResponse> {
    let client = crate::auth::client_addr(&ctx, &req);
    let (user, secret) = sessions::local_login(&ctx, body.into_inner(), client).await?;
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

#[derive(Deserialize, IntoParams)]
struct LoginQuery {
    /// The portal page to return to once signed in (a path of this server, e.g.
    /// `/studies/…`); home when absent.
    next: Option<String>,
}

/// Starts OpenID Connect sign-in: redirects to the identity provider.
#[utoipa::path(tag = "auth", params(LoginQuery), responses(
    (status = 303, description = "Redirect to the identity provider"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/auth/oidc/login")]
async fn oidc_login(
    ctx: web::Data<AppContext>,
    q: web::Query<LoginQuery>,
) -> AppResult<HttpResponse> {
    let next = match q.into_inner().next {
        None => None,
        Some(n) if return_path(&n) => Some(n),
        Some(n) => {
            return Err(AppError::Invalid(format!(
                "`next` must be a page of this portal (a path such as /studies), not {n:?}."
            )));
        }
    };
    let (url, state) = sessions::oidc_start(&ctx).await?;
    let mut resp = HttpResponse::SeeOther();
    resp.cookie(oidc_state_cookie(&ctx, OIDC_STATE_COOKIE, state));
    if let Some(n) = next {
        resp.cookie(oidc_state_cookie(&ctx, OIDC_NEXT_COOKIE, n));
    }
    Ok(resp.insert_header(("Location", url)).finish())
}

/// A page to return to after sign-in: a path of this server, and not an API or sign-in one;
/// only characters a path needs (it is written into the callback page's refresh).
fn return_path(n: &str) -> bool {
    consilium_core::is_local_path(n)
        && !n.starts_with("/api/")
        && !n.starts_with("/signin")
        && n.len() <= 2000
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~?=&%+:@,;".contains(&b))
}

/// The cookie that binds a sign-in to the browser that started it. `SameSite=Lax`: it must
/// come back with the identity provider's redirect to the callback (a cross-site navigation).
fn oidc_state_cookie(
    ctx: &AppContext,
    name: &'static str,
    value: String,
) -> actix_web::cookie::Cookie<'static> {
    actix_web::cookie::Cookie::build(name, value)
        .path("/api/v1/auth/oidc")
        .http_only(true)
        .secure(ctx.settings.server.cookie_secure)
        .same_site(actix_web::cookie::SameSite::Lax)
        .max_age(actix_web::cookie::time::Duration::minutes(10))
        .finish()
}

const OIDC_STATE_COOKIE: &str = "consilium_oidc_state";
/// The page the sign-in returns to (checked by `return_path` when set and when read).
const OIDC_NEXT_COOKIE: &str = "consilium_oidc_next";

#[derive(Deserialize, IntoParams)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Where the identity provider sends the browser back; opens the session.
#[utoipa::path(tag = "auth", params(CallbackQuery), responses(
    (status = 200, description = "Signed in: a page that moves on to the portal", content_type = "text/html"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/auth/oidc/callback")]
async fn oidc_callback(
    ctx: web::Data<AppContext>,
    req: HttpRequest,
    q: web::Query<CallbackQuery>,
) -> AppResult<HttpResponse> {
    let browser_state = req.cookie(OIDC_STATE_COOKIE).map(|c| c.value().to_string());
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
    let (_user, secret) = sessions::oidc_finish(&ctx, code, state, browser_state).await?;
    let next = req
        .cookie(OIDC_NEXT_COOKIE)
        .map(|c| c.value().to_string())
        .filter(|n| return_path(n))
        .unwrap_or_else(|| "/".into());
    let mut used = oidc_state_cookie(&ctx, OIDC_STATE_COOKIE, String::new());
    used.make_removal();
    let mut used_next = oidc_state_cookie(&ctx, OIDC_NEXT_COOKIE, String::new());
    used_next.make_removal();
    let next = html_escape::encode_double_quoted_attribute(&next);
    // The session cookie is SameSite=Strict, so a browser would not send it on a redirect
    // that continues the identity provider's cross-site navigation: this page moves on to the
    // portal itself, a same-site navigation that carries the new session.
    Ok(HttpResponse::Ok()
        .cookie(session_cookie(&ctx, secret))
        .cookie(used)
        .cookie(used_next)
        .content_type("text/html; charset=utf-8")
        .body(format!(
            concat!(
                "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
                "<meta http-equiv=\"refresh\" content=\"0;url={next}\"><title>Signed in · Consilium</title></head>",
                "<body><p>You are signed in. <a href=\"{next}\">Continue to Consilium</a>.</p></body></html>"
            ),
            next = next
        )))
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
