//! Site signing keys: the public halves of the keys a site's workers sign with. The site's
//! custodian (signed in) or an administrator registers and revokes them; every change is
//! audited. A message from a site is recorded only if it verifies with one of its keys that is
//! not revoked (`engine::intake`).

use chrono::Utc;
use consilium_core::Role;
use consilium_core::api::{RegisterSiteKey, SiteKeyDto};
use consilium_core::signing::{VerifyingKey, encode_public_key, key_id, parse_public_key};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set,
};
use uuid::Uuid;

use super::Checks;
use crate::audit;
use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::site_key;
use crate::error::{AppError, AppResult};

pub fn key_dto(m: &site_key::Model) -> SiteKeyDto {
    SiteKeyDto {
        key_id: m.key_id.clone(),
        site_id: m.site_id,
        public_key: m.public_key.clone(),
        name: m.name.clone(),
        registered_by: m.registered_by.clone(),
        registered_at: m.registered_at,
        revoked_by: m.revoked_by.clone(),
        revoked_at: m.revoked_at,
    }
}

/// Only the site's custodians (signed in, not through a token: a stolen token must not be able
/// to swap the site's identity) and administrators manage its keys; the CLI may too.
async fn require_manager(ctx: &AppContext, actor: &Actor, site_id: Uuid) -> AppResult<()> {
    let site = crate::services::directory::get_site(&ctx.db, site_id).await?;
    let allowed = actor.is_system()
        || ((actor.has(Role::Administrator)
            || (actor.has(Role::Custodian) && site.custodians.contains(&actor.user_id)))
            && actor.token_id.is_none()
            && actor.site_id.is_none());
    if allowed {
        Ok(())
    } else {
        Err(AppError::Forbidden(format!(
            "Only a custodian of {:?} or an administrator, signed in, may manage its signing keys.",
            site.name
        )))
    }
}

/// Registers a public key for the site.
#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn register(
    ctx: &AppContext,
    actor: &Actor,
    site_id: Uuid,
    input: RegisterSiteKey,
) -> AppResult<SiteKeyDto> {
    require_manager(ctx, actor, site_id).await?;
    let mut checks = Checks::default();
    let name = checks.text("name", &input.name, 200, false);
    let key = parse_public_key(&input.public_key);
    if let Err(e) = &key {
        checks.check(
            false,
            format!("public_key: {e}; give the line `consilium-worker keygen` printed"),
        );
    }
    checks.finish()?;
    let key = key.map_err(|e| AppError::Invalid(e.to_string()))?;
    let w = ctx.begin_write().await?;
    let id = key_id(&key);
    if let Some(existing) = site_key::Entity::find_by_id(id.clone()).one(&*w).await? {
        return Err(AppError::conflict(
            "key_exists",
            if existing.site_id == site_id {
                "This key is already registered for this site."
            } else {
                "This key is registered for another site: each site signs with its own key; create a new one with `consilium-worker keygen`."
            },
        ));
    }
    let m = site_key::ActiveModel {
        key_id: Set(id),
        site_id: Set(site_id),
        public_key: Set(encode_public_key(&key)),
        name: Set(name),
        registered_by: Set(actor.audit_name()),
        registered_at: Set(Utc::now()),
        revoked_by: Set(None),
        revoked_at: Set(None),
    }
    .insert(&*w)
    .await?;
    let dto = key_dto(&m);
    audit::append(&*w, actor, "site_key.registered", "site", site_id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

/// The site's keys, in force and revoked: the site's worker, its custodians, administrators
/// and auditors.
pub async fn list(ctx: &AppContext, actor: &Actor, site_id: Uuid) -> AppResult<Vec<SiteKeyDto>> {
    let site = crate::services::directory::get_site(&ctx.db, site_id).await?;
    if !crate::services::directory::sees_site_reports(actor, &site) {
        return Err(AppError::Forbidden(format!(
            "Only {:?}'s worker, its custodians, administrators and auditors may list its keys.",
            site.name
        )));
    }
    let rows = site_key::Entity::find()
        .filter(site_key::Column::SiteId.eq(site_id))
        .order_by_asc(site_key::Column::RegisteredAt)
        .all(&ctx.db)
        .await?;
    Ok(rows.iter().map(key_dto).collect())
}

/// Revokes one of the site's keys: from now on nothing signed with it is recorded.
#[tracing::instrument(skip(ctx), fields(actor = %actor.audit_name()))]
pub async fn revoke(
    ctx: &AppContext,
    actor: &Actor,
    site_id: Uuid,
    key: &str,
) -> AppResult<SiteKeyDto> {
    require_manager(ctx, actor, site_id).await?;
    let w = ctx.begin_write().await?;
    let m = site_key::Entity::find_by_id(key.to_string())
        .one(&*w)
        .await?
        .filter(|m| m.site_id == site_id)
        .ok_or_else(|| AppError::NotFound(format!("Site {site_id} has no key {key}.")))?;
    if m.revoked_at.is_some() {
        return Err(AppError::conflict(
            "invalid_state",
            "This key is already revoked.",
        ));
    }
    let mut a: site_key::ActiveModel = m.into();
    a.revoked_at = Set(Some(Utc::now()));
    a.revoked_by = Set(Some(actor.audit_name()));
    let m = a.update(&*w).await?;
    let dto = key_dto(&m);
    audit::append(&*w, actor, "site_key.revoked", "site", site_id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

/// The site's key `key`, if it is registered for `site_id` and not revoked.
pub async fn key_in_force<C: ConnectionTrait>(
    db: &C,
    site_id: Uuid,
    key: &str,
) -> AppResult<Option<VerifyingKey>> {
    let Some(m) = site_key::Entity::find_by_id(key.to_string())
        .one(db)
        .await?
        .filter(|m| m.site_id == site_id && m.revoked_at.is_none())
    else {
        return Ok(None);
    };
    parse_public_key(&m.public_key)
        .map(Some)
        .map_err(|e| AppError::unexpected(anyhow::anyhow!("stored key {key}: {e}")))
}
