//! Signing in: development-only local passwords, and OpenID Connect with users
//! provisioned at their first sign-in.

use chrono::{Duration, Utc};
use consilium_core::Role;
use consilium_core::api::{LocalLogin, UserDto};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use std::collections::BTreeSet;
use uuid::Uuid;

use crate::audit;
use crate::auth::oidc::IdClaims;
use crate::auth::{open_session, roles_of, verify_password};
use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::{oidc_pending, user};
use crate::error::{AppError, AppResult};
use crate::services::directory::{roles_json, user_dto};

/// Signs in with a local password; returns the user and the session secret.
pub async fn local_login(ctx: &AppContext, input: LocalLogin) -> AppResult<(UserDto, String)> {
    if !ctx.settings.auth.local_accounts_enabled() {
        return Err(AppError::Forbidden(
            "Local accounts are disabled on this server; sign in through your organisation at /api/v1/auth/oidc/login.".into(),
        ));
    }
    let wrong = || AppError::Unauthenticated("The email or the password is wrong.".into());
    let email = input.email.trim().to_lowercase();
    if email.chars().any(char::is_control) || email.len() > 254 {
        return Err(wrong());
    }
    let u = user::Entity::find()
        .filter(user::Column::Email.eq(email))
        .one(&ctx.db)
        .await?
        .ok_or_else(wrong)?;
    let ok = u
        .password_hash
        .as_deref()
        .is_some_and(|h| verify_password(&input.password, h));
    if !ok {
        tracing::warn!(user = %u.id, "failed local sign-in");
        return Err(wrong());
    }
    let secret = open_session(ctx, u.id).await?;
    let w = ctx.begin_write().await?;
    let actor = Actor {
        user_id: u.id,
        roles: roles_of(&u.roles),
        token_id: None,
        site_id: None,
    };
    let dto = user_dto(&u);
    audit::append(&*w, &actor, "session.signed_in_local", "user", u.id, &dto).await?;
    w.commit().await?;
    Ok((dto, secret))
}

/// Starts an OpenID Connect sign-in; returns the provider URL to redirect to.
pub async fn oidc_start(ctx: &AppContext) -> AppResult<String> {
    let oidc = ctx.oidc.as_ref().ok_or_else(oidc_off)?;
    let start = oidc.start();
    // Pending sign-ins older than 10 minutes are dropped.
    let w = ctx.begin_write().await?;
    oidc_pending::Entity::delete_many()
        .filter(oidc_pending::Column::CreatedAt.lt(Utc::now() - Duration::minutes(10)))
        .exec(&*w)
        .await?;
    oidc_pending::Entity::insert(oidc_pending::ActiveModel {
        state: Set(start.state),
        pkce_verifier: Set(start.pkce_verifier),
        nonce: Set(start.nonce),
        created_at: Set(Utc::now()),
    })
    .exec_without_returning(&*w)
    .await?;
    w.commit().await?;
    Ok(start.url)
}

fn oidc_off() -> AppError {
    AppError::NotFound(
        "OpenID Connect sign-in is not configured on this server (auth.oidc).".into(),
    )
}

/// Completes an OpenID Connect sign-in; returns the user and the session secret.
pub async fn oidc_finish(
    ctx: &AppContext,
    code: String,
    state: String,
) -> AppResult<(UserDto, String)> {
    let oidc = ctx.oidc.as_ref().ok_or_else(oidc_off)?;
    let well_formed = !state.is_empty()
        && state.len() <= 128
        && state
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'));
    let pending = if well_formed {
        oidc_pending::Entity::find_by_id(state.clone())
            .one(&ctx.db)
            .await?
    } else {
        None
    };
    let Some(pending) = pending.filter(|p| p.created_at > Utc::now() - Duration::minutes(10))
    else {
        return Err(AppError::Invalid(
            "This sign-in link is unknown or has expired (they last 10 minutes); start again at /api/v1/auth/oidc/login.".into(),
        ));
    };
    {
        let w = ctx.begin_write().await?;
        oidc_pending::Entity::delete_by_id(state).exec(&*w).await?;
        w.commit().await?;
    }
    let claims = oidc
        .finish(code, pending.pkce_verifier, &pending.nonce)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "OpenID sign-in refused");
            AppError::Unauthenticated(format!(
                "Sign-in failed: {e}. Start again at /api/v1/auth/oidc/login."
            ))
        })?;
    let u = provision(ctx, &claims, &oidc.settings.roles_claim).await?;
    let secret = open_session(ctx, u.id).await?;
    Ok((u, secret))
}

fn claimed_roles(claims: &IdClaims, claim: &str) -> Option<BTreeSet<Role>> {
    let values = claims.other.get(claim)?.as_array()?;
    Some(
        values
            .iter()
            .filter_map(|v| v.as_str())
            .filter_map(Role::parse)
            .collect(),
    )
}

/// Finds or creates the user behind an ID token. Roles come from the configured claim
/// when the provider sends it; otherwise an administrator grants them.
pub async fn provision(
    ctx: &AppContext,
    claims: &IdClaims,
    roles_claim: &str,
) -> AppResult<UserDto> {
    let w = ctx.begin_write().await?;
    let by_subject = user::Entity::find()
        .filter(user::Column::OidcSubject.eq(claims.sub.as_str()))
        .one(&*w)
        .await?;
    let email = claims.email.clone().map(|e| e.trim().to_lowercase());
    let by_email = match (&by_subject, &email) {
        (None, Some(e)) => {
            user::Entity::find()
                .filter(user::Column::Email.eq(e.as_str()))
                .filter(user::Column::OidcSubject.is_null())
                .one(&*w)
                .await?
        }
        _ => None,
    };
    let claimed = claimed_roles(claims, roles_claim);
    let (m, action) = match by_subject.or(by_email) {
        Some(existing) => {
            let mut a: user::ActiveModel = existing.clone().into();
            a.oidc_subject = Set(Some(claims.sub.clone()));
            if let Some(r) = &claimed {
                a.roles = Set(roles_json(r));
            }
            let changed = existing.oidc_subject.as_deref() != Some(claims.sub.as_str())
                || claimed
                    .as_ref()
                    .is_some_and(|r| *r != roles_of(&existing.roles));
            (a.update(&*w).await?, changed.then_some("user.linked_oidc"))
        }
        None => {
            let email = email.unwrap_or_else(|| format!("{}@oidc.invalid", claims.sub));
            let m = user::ActiveModel {
                id: Set(Uuid::new_v4()),
                email: Set(email.clone()),
                name: Set(claims.name.clone().unwrap_or(email)),
                roles: Set(roles_json(&claimed.unwrap_or_default())),
                password_hash: Set(None),
                oidc_subject: Set(Some(claims.sub.clone())),
                created_at: Set(Utc::now()),
            }
            .insert(&*w)
            .await?;
            (m, Some("user.provisioned"))
        }
    };
    let dto = user_dto(&m);
    let actor = Actor {
        user_id: m.id,
        roles: roles_of(&m.roles),
        token_id: None,
        site_id: None,
    };
    if let Some(action) = action {
        audit::append(&*w, &actor, action, "user", m.id, &dto).await?;
    }
    audit::append(&*w, &actor, "session.signed_in_oidc", "user", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}
