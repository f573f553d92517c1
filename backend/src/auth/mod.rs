//! Who is calling: sessions (browser sign-in), API tokens (integrations), and the
//! development-only local passwords.

pub mod oidc;

use actix_web::cookie::{Cookie, SameSite, time::Duration as CookieDuration};
use actix_web::{FromRequest, HttpMessage, HttpRequest, dev::Payload, web};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use chrono::Utc;
use consilium_core::Role;
use consilium_core::hash::sha256_hex;
use rand::RngCore;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use secrecy::ExposeSecret;
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;

use crate::context::AppContext;
use crate::domain::{Actor, Via};
use crate::entities::{api_token, session, site, user};
use crate::error::{AppError, AppResult};

pub const SESSION_COOKIE: &str = "consilium_session";
pub const TOKEN_PREFIX: &str = "csm_";

/// A fresh random secret, URL-safe.
pub fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Secrets are stored only as their SHA-256 (they are long and random, so no salt is needed).
pub fn secret_hash(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

pub fn hash_password(password: &str) -> AppResult<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AppError::unexpected(anyhow::anyhow!("hashing a password: {e}")))
}

pub fn verify_password(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Verifies `password` against a hash of a random password nobody knows: what a sign-in for
/// an unknown account (or one without a password) costs, so that its answer takes as long as
/// a wrong password for a real account and timing reveals nothing.
pub fn verify_dummy_password(password: &str) {
    static DUMMY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| match hash_password(&random_secret(32)) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(error = ?e, "could not prepare the dummy password hash");
            None
        }
    });
    if let Some(h) = dummy {
        // Always false: nobody knows the password behind it.
        let _always_false = verify_password(password, h);
    }
}

/// The header with which the portal forwards the browser's address on its own API calls.
pub const PORTAL_CLIENT_HEADER: &str = consilium_frontend::api::CLIENT_HEADER;
/// The header carrying the portal's key, proving that the forwarded address is the portal's.
pub const PORTAL_KEY_HEADER: &str = consilium_frontend::api::KEY_HEADER;

/// The address of the person behind a request: the peer's, or, on the portal's own call to the
/// API (which comes from this machine), the browser's address the portal forwards. A client
/// cannot claim an address of its choice: the forwarded one counts only with the portal's key,
/// a random secret of this server process.
pub fn client_addr(ctx: &AppContext, req: &HttpRequest) -> Option<std::net::IpAddr> {
    let peer = req.peer_addr().map(|a| a.ip());
    let key = req
        .headers()
        .get(PORTAL_KEY_HEADER)
        .and_then(|v| v.to_str().ok());
    let forwarded = req
        .headers()
        .get(PORTAL_CLIENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    match (key, forwarded) {
        (Some(k), Some(addr)) if constant_time_eq(k, ctx.portal_key.expose_secret()) => Some(addr),
        _ => peer,
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub fn roles_of(json: &serde_json::Value) -> BTreeSet<Role> {
    json.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .filter_map(Role::parse)
                .collect()
        })
        .unwrap_or_default()
}

pub fn session_cookie(ctx: &AppContext, value: String) -> Cookie<'static> {
    Cookie::build(SESSION_COOKIE, value)
        .path("/")
        .http_only(true)
        .secure(ctx.settings.server.cookie_secure)
        .same_site(SameSite::Strict)
        .max_age(CookieDuration::hours(ctx.settings.server.session_hours))
        .finish()
}

pub fn expired_session_cookie(ctx: &AppContext) -> Cookie<'static> {
    let mut c = session_cookie(ctx, String::new());
    c.make_removal();
    c
}

/// Opens a session for a user and returns the cookie value (stored hashed).
pub async fn open_session(ctx: &AppContext, user_id: uuid::Uuid) -> AppResult<String> {
    let secret = random_secret(32);
    let now = Utc::now();
    let w = ctx.begin_write().await?;
    session::Entity::insert(session::ActiveModel {
        id_hash: sea_orm::Set(secret_hash(&secret)),
        user_id: sea_orm::Set(user_id),
        expires_at: sea_orm::Set(now + chrono::Duration::hours(ctx.settings.server.session_hours)),
        created_at: sea_orm::Set(now),
    })
    .exec_without_returning(&*w)
    .await?;
    w.commit().await?;
    Ok(secret)
}

pub async fn close_session(ctx: &AppContext, secret: &str) -> AppResult<()> {
    let w = ctx.begin_write().await?;
    session::Entity::delete_by_id(secret_hash(secret))
        .exec(&*w)
        .await?;
    w.commit().await?;
    Ok(())
}

/// The caller of a request, from `Authorization: Bearer <token>` or the session cookie.
pub struct Authenticated(pub Actor);

fn unauthenticated() -> AppError {
    AppError::Unauthenticated(
        "Sign in first (POST /api/v1/auth/login or /api/v1/auth/oidc/login), or send an API token as `Authorization: Bearer <token>`.".into(),
    )
}

async fn resolve(
    ctx: AppContext,
    bearer: Option<String>,
    cookie: Option<String>,
) -> AppResult<Actor> {
    let now = Utc::now();
    if let Some(token) = bearer {
        let Some(row) = api_token::Entity::find()
            .filter(api_token::Column::TokenHash.eq(secret_hash(&token)))
            .one(&ctx.db)
            .await?
        else {
            return Err(AppError::Unauthenticated(
                "This API token is not known; check that it was copied whole, or create a new one."
                    .into(),
            ));
        };
        if row.revoked_at.is_some() {
            return Err(AppError::Unauthenticated(
                "This API token was revoked; create a new one.".into(),
            ));
        }
        if row.expires_at <= now {
            return Err(AppError::Unauthenticated(
                "This API token has expired; create a new one.".into(),
            ));
        }
        let owner = user::Entity::find_by_id(row.user_id)
            .one(&ctx.db)
            .await?
            .ok_or_else(unauthenticated)?;
        let via = match row.site_id {
            Some(site_id) => Via::Worker {
                site: site::Entity::find_by_id(site_id)
                    .one(&ctx.db)
                    .await?
                    .map(|s| s.name)
                    .unwrap_or_else(|| site_id.to_string()),
            },
            None => Via::Token,
        };
        // A token never acts with a role its owner no longer holds.
        let roles = roles_of(&row.roles)
            .intersection(&roles_of(&owner.roles))
            .copied()
            .collect();
        return Ok(Actor {
            user_id: owner.id,
            roles,
            token_id: Some(row.id),
            site_id: row.site_id,
            via,
        });
    }
    if let Some(secret) = cookie {
        if let Some(s) = session::Entity::find_by_id(secret_hash(&secret))
            .one(&ctx.db)
            .await?
            && s.expires_at > now
            && let Some(u) = user::Entity::find_by_id(s.user_id).one(&ctx.db).await?
        {
            return Ok(Actor {
                user_id: u.id,
                roles: roles_of(&u.roles),
                token_id: None,
                site_id: None,
                via: Via::Session,
            });
        }
        return Err(AppError::Unauthenticated(
            "Your session has ended; sign in again.".into(),
        ));
    }
    Err(unauthenticated())
}

impl FromRequest for Authenticated {
    type Error = AppError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, AppError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let ctx = req
            .app_data::<web::Data<AppContext>>()
            .map(|d| d.get_ref().clone());
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .map(|h| h.to_str().map(str::to_string));
        let cookie = req.cookie(SESSION_COOKIE).map(|c| c.value().to_string());
        let req = req.clone();
        Box::pin(async move {
            let ctx = ctx.ok_or_else(|| {
                AppError::unexpected(anyhow::anyhow!("application context missing"))
            })?;
            let bearer = match header {
                None => None,
                Some(Ok(h)) => match h.strip_prefix("Bearer ") {
                    Some(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                    _ => {
                        return Err(AppError::Unauthenticated(
                            "The Authorization header must read `Bearer <token>`.".into(),
                        ));
                    }
                },
                Some(Err(_)) => {
                    return Err(AppError::Unauthenticated(
                        "The Authorization header is not readable text.".into(),
                    ));
                }
            };
            let actor = resolve(ctx, bearer, cookie).await?;
            // The denial audit (crate::security) names who was refused.
            req.extensions_mut().insert(actor.clone());
            Ok(Authenticated(actor))
        })
    }
}
