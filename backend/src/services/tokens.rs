//! API tokens for integrations: shown once, stored hashed, scoped to some of the owner's
//! roles, with an expiry, revocable.

use chrono::{DateTime, Duration, Utc};
use consilium_core::Role;
use consilium_core::api::{CreateToken, TokenCreated, TokenDto};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use std::collections::BTreeSet;
use uuid::Uuid;

use super::{Checks, not_found};
use crate::audit;
use crate::auth::{TOKEN_PREFIX, random_secret, roles_of, secret_hash};
use crate::context::{AppContext, WriteTxn};
use crate::domain::Actor;
use crate::entities::{api_token, user};
use crate::error::{AppError, AppResult};
use crate::services::directory::roles_json;

pub const MAX_DAYS: i64 = 366;

pub fn token_dto(m: &api_token::Model) -> TokenDto {
    TokenDto {
        id: m.id,
        user_id: m.user_id,
        name: m.name.clone(),
        roles: roles_of(&m.roles).into_iter().collect(),
        expires_at: m.expires_at,
        revoked_at: m.revoked_at,
        created_at: m.created_at,
    }
}

/// Creates a token for `owner`. A person creates their own; the system (CLI) may create
/// one for anybody.
#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn create(
    ctx: &AppContext,
    actor: &Actor,
    owner: Uuid,
    input: CreateToken,
) -> AppResult<TokenCreated> {
    if !actor.is_system() && actor.user_id != owner {
        return Err(AppError::Forbidden(
            "You may create API tokens only for yourself.".into(),
        ));
    }
    if actor.token_id.is_some() {
        return Err(AppError::Forbidden(
            "An API token can't create other tokens; sign in to create one.".into(),
        ));
    }
    let owner_row = user::Entity::find_by_id(owner)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("user", owner))?;
    let owner_roles = roles_of(&owner_row.roles);
    let mut checks = Checks::default();
    let name = checks.text("name", &input.name, 200, false);
    let roles: BTreeSet<Role> = input.roles.into_iter().collect();
    checks.check(!roles.is_empty(), "roles must name at least one role");
    for r in &roles {
        checks.check(
            owner_roles.contains(r),
            format!("roles: you do not hold the {r} role, so a token can't carry it"),
        );
    }
    let now = check_expiry(&mut checks, input.expires_at);
    checks.finish()?;
    let w = ctx.begin_write().await?;
    let token = NewToken {
        owner,
        name,
        roles: roles_json(&roles),
        expires_at: input.expires_at,
        site_id: None,
        now,
    };
    insert(w, actor, token, "token.created").await
}

/// Token management needs the person signed in: a token (a worker's or an integration's)
/// may not list, create or revoke tokens — else a stolen token could revoke the production
/// worker's, or see them all. A token may revoke only itself.
fn require_signed_in(actor: &Actor, what: &str) -> AppResult<()> {
    if actor.token_id.is_some() {
        return Err(AppError::Forbidden(format!(
            "An API token can't {what}; sign in to manage tokens."
        )));
    }
    Ok(())
}

pub async fn list(ctx: &AppContext, actor: &Actor) -> AppResult<Vec<TokenDto>> {
    require_signed_in(actor, "list tokens")?;
    let rows = api_token::Entity::find()
        .filter(api_token::Column::UserId.eq(actor.user_id))
        .order_by_asc(api_token::Column::CreatedAt)
        .all(&ctx.db)
        .await?;
    Ok(rows.iter().map(token_dto).collect())
}

#[tracing::instrument(skip(ctx), fields(actor = %actor.audit_name()))]
pub async fn revoke(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<TokenDto> {
    if actor.token_id != Some(id) {
        require_signed_in(actor, "revoke other tokens")?;
    }
    let w = ctx.begin_write().await?;
    let m = api_token::Entity::find_by_id(id)
        .one(&*w)
        .await?
        .ok_or_else(|| not_found("API token", id))?;
    if m.user_id != actor.user_id && !actor.has(Role::Administrator) {
        return Err(super::hidden("API token", id));
    }
    if m.revoked_at.is_some() {
        return Err(AppError::conflict(
            "invalid_state",
            "This token is already revoked.",
        ));
    }
    let mut a: api_token::ActiveModel = m.into();
    a.revoked_at = Set(Some(Utc::now()));
    let m = a.update(&*w).await?;
    let dto = token_dto(&m);
    audit::append(&*w, actor, "token.revoked", "api_token", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

/// A site worker's token: bound to one site, no role. The site's custodian (or an
/// administrator, or the CLI) creates it; it is shown once.
#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn create_worker_token(
    ctx: &AppContext,
    actor: &Actor,
    site_id: Uuid,
    input: consilium_core::api::CreateWorkerToken,
) -> AppResult<TokenCreated> {
    let site = crate::services::directory::get_site(&ctx.db, site_id).await?;
    let allowed = actor.is_system()
        || actor.has(Role::Administrator)
        || (actor.has(Role::Custodian) && site.custodians.contains(&actor.user_id));
    if !allowed || actor.token_id.is_some() {
        return Err(AppError::Forbidden(format!(
            "Only a custodian of {:?} or an administrator, signed in, may create its worker tokens.",
            site.name
        )));
    }
    let mut checks = Checks::default();
    let name = checks.text("name", &input.name, 200, false);
    let now = check_expiry(&mut checks, input.expires_at);
    checks.finish()?;
    let w = ctx.begin_write().await?;
    let owner = if actor.is_system() {
        // The CLI acts as the system: the token belongs to the site's first custodian, else to
        // the first administrator.
        match site.custodians.first() {
            Some(c) => *c,
            None => user::Entity::find()
                .all(&*w)
                .await?
                .into_iter()
                .find(|u| roles_of(&u.roles).contains(&Role::Administrator))
                .map(|u| u.id)
                .ok_or_else(|| {
                    AppError::conflict(
                        "no_owner",
                        "Register a custodian for this site (or an administrator) first.",
                    )
                })?,
        }
    } else {
        actor.user_id
    };
    let token = NewToken {
        owner,
        name,
        roles: serde_json::json!([]),
        expires_at: input.expires_at,
        site_id: Some(site_id),
        now,
    };
    insert(w, actor, token, "token.worker_created").await
}

/// Checks a token's expiry (future, within `MAX_DAYS`); returns "now".
fn check_expiry(checks: &mut Checks, expires_at: DateTime<Utc>) -> DateTime<Utc> {
    let now = Utc::now();
    checks.check(expires_at > now, "expires_at must be in the future");
    checks.check(
        expires_at <= now + Duration::days(MAX_DAYS),
        format!("expires_at must be within {MAX_DAYS} days"),
    );
    now
}

struct NewToken {
    owner: Uuid,
    name: String,
    roles: serde_json::Value,
    expires_at: DateTime<Utc>,
    site_id: Option<Uuid>,
    now: DateTime<Utc>,
}

/// Stores a new token (only its hash), audits it, commits, and returns the secret once.
async fn insert(
    w: WriteTxn<'_>,
    actor: &Actor,
    t: NewToken,
    action: &str,
) -> AppResult<TokenCreated> {
    let secret = format!("{TOKEN_PREFIX}{}", random_secret(32));
    let m = api_token::ActiveModel {
        id: Set(Uuid::new_v4()),
        user_id: Set(t.owner),
        name: Set(t.name),
        token_hash: Set(secret_hash(&secret)),
        roles: Set(t.roles),
        expires_at: Set(t.expires_at),
        revoked_at: Set(None),
        created_at: Set(t.now),
        site_id: Set(t.site_id),
    }
    .insert(&*w)
    .await?;
    let info = token_dto(&m);
    audit::append(&*w, actor, action, "api_token", m.id, &info).await?;
    w.commit().await?;
    Ok(TokenCreated {
        token: secret,
        info,
    })
}
