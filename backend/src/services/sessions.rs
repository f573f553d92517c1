//! Signing in: development-only local passwords, and OpenID Connect with users
//! provisioned at their first sign-in.

use chrono::{Duration, Utc};
use consilium_core::Role;
use consilium_core::api::{LocalLogin, UserDto};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use std::collections::BTreeSet;
use std::net::IpAddr;
use uuid::Uuid;

use crate::audit;
use crate::auth::oidc::IdClaims;
use crate::auth::{open_session, roles_of, verify_dummy_password, verify_password};
use crate::context::AppContext;
use crate::domain::{Actor, Via};
use crate::entities::{oidc_pending, user};
use crate::error::{AppError, AppResult};
use crate::services::directory::{roles_json, user_dto};

/// Signs in with a local password; returns the user and the session secret.
///
/// Failed attempts are counted per account and per client address (`client`, the browser's
/// address): past the limits sign-in there is locked for a growing time (429). An unknown
/// account costs the same password check as a known one, so timing tells nothing. Every
/// failure is audited as `session.sign_in_failed` (repeats from one client for one account
/// folded into one event a minute).
pub async fn local_login(
    ctx: &AppContext,
    input: LocalLogin,
    client: Option<IpAddr>,
) -> AppResult<(UserDto, String)> {
    if !ctx.settings.auth.local_accounts_enabled() {
        return Err(AppError::Forbidden(
            "Local accounts are disabled on this server; sign in through your organisation at /api/v1/auth/oidc/login.".into(),
        ));
    }
    let wrong = || AppError::Unauthenticated("The email or the password is wrong.".into());
    let email = input.email.trim().to_lowercase();
    let account: String = email.chars().take(254).collect();
    if let Err(locked) = ctx.sign_in_throttle.check(&account, client) {
        let secs = locked.retry_after.as_secs().max(1);
        failed(ctx, &account, None, client, "locked").await?;
        return Err(AppError::TooManyAttempts {
            retry_after: secs,
            detail: format!(
                "Too many failed sign-ins {}; try again in {secs} seconds.",
                if locked.account {
                    "for this account"
                } else {
                    "from your address"
                }
            ),
        });
    }
    let found = if email.chars().any(char::is_control) || email.len() > 254 {
        None
    } else {
        user::Entity::find()
            .filter(user::Column::Email.eq(email.as_str()))
            .one(&ctx.db)
            .await?
    };
    let ok = match found.as_ref().and_then(|u| u.password_hash.as_deref()) {
        Some(h) => verify_password(&input.password, h),
        None => {
            verify_dummy_password(&input.password);
            false
        }
    };
    let user_id = found.as_ref().map(|u| u.id);
    let Some(u) = found.filter(|_| ok) else {
        ctx.sign_in_throttle.failed(&account, client);
        failed(ctx, &account, user_id, client, "wrong email or password").await?;
        return Err(wrong());
    };
    ctx.sign_in_throttle.succeeded(&account);
    let secret = open_session(ctx, u.id).await?;
    let w = ctx.begin_write().await?;
    let actor = Actor {
        user_id: u.id,
        roles: roles_of(&u.roles),
        token_id: None,
        site_id: None,
        via: Via::Session,
    };
    let dto = user_dto(&u);
    audit::append(&*w, &actor, "session.signed_in_local", "user", u.id, &dto).await?;
    w.commit().await?;
    Ok((dto, secret))
}

/// Audits a failed sign-in (folded per account and client). The object is the account when it
/// exists, else the SHA-256 of the email typed (a mistyped password in the email field is
/// never written down).
async fn failed(
    ctx: &AppContext,
    account: &str,
    user_id: Option<Uuid>,
    client: Option<IpAddr>,
    reason: &str,
) -> AppResult<()> {
    tracing::warn!(user = ?user_id, client = ?client, reason, "failed local sign-in");
    let client_name = client.map_or_else(|| "an unknown address".to_string(), |c| c.to_string());
    let (object_type, object_id) = match user_id {
        Some(id) => ("user", id.to_string()),
        None => ("email", audit::digest_text(account)),
    };
    let Some(folded) = ctx
        .audit_fold
        .admit(&format!("sign_in_failed {object_id} {client_name}"))
    else {
        return Ok(());
    };
    let w = ctx.begin_write().await?;
    audit::append_named(
        &*w,
        &format!("anonymous from {client_name}"),
        "session.sign_in_failed",
        object_type,
        object_id,
        &serde_json::json!({ "reason": reason, "client": client_name, "folded_before": folded }),
    )
    .await?;
    w.commit().await
}

/// Starts an OpenID Connect sign-in; returns the provider URL to redirect to and the `state`
/// (which the browser keeps in a cookie, so that only the browser that started a sign-in can
/// finish it).
pub async fn oidc_start(ctx: &AppContext) -> AppResult<(String, String)> {
    let oidc = ctx.oidc.as_ref().ok_or_else(oidc_off)?;
    let start = oidc.start();
    // Pending sign-ins older than 10 minutes are dropped.
    let w = ctx.begin_write().await?;
    oidc_pending::Entity::delete_many()
        .filter(oidc_pending::Column::CreatedAt.lt(Utc::now() - Duration::minutes(10)))
        .exec(&*w)
        .await?;
    let state = start.state.clone();
    oidc_pending::Entity::insert(oidc_pending::ActiveModel {
        state: Set(start.state),
        pkce_verifier: Set(start.pkce_verifier),
        nonce: Set(start.nonce),
        created_at: Set(Utc::now()),
    })
    .exec_without_returning(&*w)
    .await?;
    w.commit().await?;
    Ok((start.url, state))
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
    browser_state: Option<String>,
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
    // Login CSRF: a callback link made by someone else (their code, their state) would sign
    // this browser into their account. Only the browser that started the sign-in has its state.
    if browser_state.as_deref() != Some(state.as_str()) {
        tracing::warn!("an OpenID callback came from a browser that did not start the sign-in");
        return Err(AppError::Invalid(
            "This sign-in did not start in this browser (or its cookie has expired); start again at /api/v1/auth/oidc/login.".into(),
        ));
    }
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
        via: Via::Session,
    };
    if let Some(action) = action {
        audit::append(&*w, &actor, action, "user", m.id, &dto).await?;
    }
    audit::append(&*w, &actor, "session.signed_in_oidc", "user", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}
