//! People and places: users, sites with their custodians, ethics committees with their members.

use chrono::Utc;
use consilium_core::Role;
use consilium_core::api::{
    CommitteeDto, CreateCommittee, CreateSite, CreateUser, SetCustodians, SetMembers, SetRoles,
    SiteDto, UserDto,
};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set,
};
use std::collections::BTreeSet;
use uuid::Uuid;

use super::{Checks, from_json, not_found, require, require_any};
use crate::audit;
use crate::auth::{hash_password, roles_of};
use crate::context::AppContext;
use crate::domain::{Actor, Operation};
use crate::entities::{committee, site, user};
use crate::error::{AppError, AppResult};

pub fn user_dto(m: &user::Model) -> UserDto {
    UserDto {
        id: m.id,
        email: m.email.clone(),
        name: m.name.clone(),
        roles: roles_of(&m.roles).into_iter().collect(),
        local_account: m.password_hash.is_some(),
        oidc_subject: m.oidc_subject.clone(),
        created_at: m.created_at,
    }
}

pub fn site_dto(m: &site::Model) -> AppResult<SiteDto> {
    Ok(SiteDto {
        id: m.id,
        name: m.name.clone(),
        custodians: from_json(&m.custodians)?,
        created_at: m.created_at,
    })
}

pub fn committee_dto(m: &committee::Model) -> AppResult<CommitteeDto> {
    Ok(CommitteeDto {
        id: m.id,
        name: m.name.clone(),
        members: from_json(&m.members)?,
        created_at: m.created_at,
    })
}

pub(crate) fn roles_json(roles: &BTreeSet<Role>) -> serde_json::Value {
    serde_json::Value::Array(
        roles
            .iter()
            .map(|r| serde_json::Value::from(r.as_str()))
            .collect(),
    )
}

pub(crate) fn check_email(checks: &mut Checks, email: &str) -> String {
    let email = checks.text("email", email, 254, false).to_lowercase();
    let valid = email.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
    });
    checks.check(
        valid || email.is_empty(),
        "email must be an address such as name@hospital.org",
    );
    email
}

pub(crate) fn check_password(checks: &mut Checks, password: &str) {
    checks.check(
        password.chars().count() >= 12,
        "password must be at least 12 characters",
    );
    checks.check(
        password.chars().count() <= 256,
        "password must be at most 256 characters",
    );
}

/// Users that exist, for membership lists; reports every id that does not.
async fn check_users_exist<C: ConnectionTrait>(
    db: &C,
    field: &str,
    ids: &[Uuid],
    needed: Role,
) -> AppResult<()> {
    let mut checks = Checks::default();
    let unique: BTreeSet<Uuid> = ids.iter().copied().collect();
    checks.check(
        unique.len() == ids.len(),
        format!("{field} lists a user twice"),
    );
    for id in unique {
        match user::Entity::find_by_id(id).one(db).await? {
            None => checks.0.push(format!("{field}: no user with id {id}")),
            Some(u) if !roles_of(&u.roles).contains(&needed) => checks.0.push(format!(
                "{field}: user {} does not have the {needed} role",
                u.email
            )),
            Some(_) => {}
        }
    }
    checks.finish()
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn create_user(ctx: &AppContext, actor: &Actor, input: CreateUser) -> AppResult<UserDto> {
    require(actor, Operation::CreateUser)?;
    let mut checks = Checks::default();
    let email = check_email(&mut checks, &input.email);
    let name = checks.text("name", &input.name, 200, false);
    if let Some(p) = &input.password {
        check_password(&mut checks, p);
        if !ctx.settings.auth.local_accounts_enabled() {
            checks.0.push("password: local accounts are disabled on this server; the user signs in through the identity provider".into());
        }
    }
    checks.finish()?;
    let password_hash = input.password.as_deref().map(hash_password).transpose()?;
    let roles: BTreeSet<Role> = input.roles.into_iter().collect();
    let w = ctx.begin_write().await?;
    if user::Entity::find()
        .filter(user::Column::Email.eq(email.as_str()))
        .one(&*w)
        .await?
        .is_some()
    {
        return Err(AppError::conflict(
            "already_exists",
            format!("A user with the email {email} already exists."),
        ));
    }
    let m = user::ActiveModel {
        id: Set(Uuid::new_v4()),
        email: Set(email),
        name: Set(name),
        roles: Set(roles_json(&roles)),
        password_hash: Set(password_hash),
        oidc_subject: Set(None),
        created_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    let dto = user_dto(&m);
    audit::append(&*w, actor, "user.created", "user", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn set_roles(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: SetRoles,
) -> AppResult<UserDto> {
    require(actor, Operation::SetUserRoles)?;
    let roles: BTreeSet<Role> = input.roles.into_iter().collect();
    let w = ctx.begin_write().await?;
    let m = user::Entity::find_by_id(id)
        .one(&*w)
        .await?
        .ok_or_else(|| not_found("user", id))?;
    let mut a: user::ActiveModel = m.into();
    a.roles = Set(roles_json(&roles));
    let m = a.update(&*w).await?;
    let dto = user_dto(&m);
    audit::append(&*w, actor, "user.roles_set", "user", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

pub async fn list_users(ctx: &AppContext, actor: &Actor) -> AppResult<Vec<UserDto>> {
    require_any(actor, &[Role::Administrator, Role::Auditor], "list users")?;
    let rows = user::Entity::find()
        .order_by_asc(user::Column::Email)
        .all(&ctx.db)
        .await?;
    Ok(rows.iter().map(user_dto).collect())
}

pub async fn get_user(ctx: &AppContext, actor: &Actor, id: Uuid) -> AppResult<UserDto> {
    if actor.user_id != id {
        require_any(
            actor,
            &[Role::Administrator, Role::Auditor],
            "see other users",
        )?;
    }
    let m = user::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| not_found("user", id))?;
    Ok(user_dto(&m))
}

pub async fn create_site(ctx: &AppContext, actor: &Actor, input: CreateSite) -> AppResult<SiteDto> {
    create_site_with_id(ctx, actor, Uuid::new_v4(), input).await
}

/// `create_site` with an id the caller chose. A simulation, whose database is its own, derives
/// its sites' ids from the experiment: a site's batch order mixes in its id, so the same plan
/// seed then gives the same model (`simulate::site_namespace`).
#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn create_site_with_id(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: CreateSite,
) -> AppResult<SiteDto> {
    require(actor, Operation::CreateSite)?;
    let mut checks = Checks::default();
    let name = checks.text("name", &input.name, 200, false);
    checks.finish()?;
    let w = ctx.begin_write().await?;
    check_users_exist(&*w, "custodians", &input.custodians, Role::Custodian).await?;
    let m = site::ActiveModel {
        id: Set(id),
        name: Set(name),
        custodians: Set(serde_json::to_value(&input.custodians)?),
        created_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    let dto = site_dto(&m)?;
    audit::append(&*w, actor, "site.created", "site", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn set_custodians(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: SetCustodians,
) -> AppResult<SiteDto> {
    require(actor, Operation::SetCustodians)?;
    let w = ctx.begin_write().await?;
    let m = site::Entity::find_by_id(id)
        .one(&*w)
        .await?
        .ok_or_else(|| not_found("site", id))?;
    check_users_exist(&*w, "custodians", &input.custodians, Role::Custodian).await?;
    let mut a: site::ActiveModel = m.into();
    a.custodians = Set(serde_json::to_value(&input.custodians)?);
    let m = a.update(&*w).await?;
    let dto = site_dto(&m)?;
    audit::append(&*w, actor, "site.custodians_set", "site", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

pub async fn list_sites(ctx: &AppContext) -> AppResult<Vec<SiteDto>> {
    let rows = site::Entity::find()
        .order_by_asc(site::Column::Name)
        .all(&ctx.db)
        .await?;
    rows.iter().map(site_dto).collect()
}

pub async fn get_site<C: ConnectionTrait>(db: &C, id: Uuid) -> AppResult<SiteDto> {
    let m = site::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| not_found("site", id))?;
    site_dto(&m)
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn create_committee(
    ctx: &AppContext,
    actor: &Actor,
    input: CreateCommittee,
) -> AppResult<CommitteeDto> {
    require(actor, Operation::CreateCommittee)?;
    let mut checks = Checks::default();
    let name = checks.text("name", &input.name, 200, false);
    checks.finish()?;
    let w = ctx.begin_write().await?;
    check_users_exist(&*w, "members", &input.members, Role::CommitteeMember).await?;
    let m = committee::ActiveModel {
        id: Set(Uuid::new_v4()),
        name: Set(name),
        members: Set(serde_json::to_value(&input.members)?),
        created_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    let dto = committee_dto(&m)?;
    audit::append(&*w, actor, "committee.created", "committee", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn set_members(
    ctx: &AppContext,
    actor: &Actor,
    id: Uuid,
    input: SetMembers,
) -> AppResult<CommitteeDto> {
    require(actor, Operation::SetMembers)?;
    let w = ctx.begin_write().await?;
    let m = committee::Entity::find_by_id(id)
        .one(&*w)
        .await?
        .ok_or_else(|| not_found("committee", id))?;
    check_users_exist(&*w, "members", &input.members, Role::CommitteeMember).await?;
    let mut a: committee::ActiveModel = m.into();
    a.members = Set(serde_json::to_value(&input.members)?);
    let m = a.update(&*w).await?;
    let dto = committee_dto(&m)?;
    audit::append(&*w, actor, "committee.members_set", "committee", m.id, &dto).await?;
    w.commit().await?;
    Ok(dto)
}

pub async fn list_committees(ctx: &AppContext) -> AppResult<Vec<CommitteeDto>> {
    let rows = committee::Entity::find()
        .order_by_asc(committee::Column::Name)
        .all(&ctx.db)
        .await?;
    rows.iter().map(committee_dto).collect()
}

pub async fn get_committee<C: ConnectionTrait>(db: &C, id: Uuid) -> AppResult<CommitteeDto> {
    let m = committee::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| not_found("committee", id))?;
    committee_dto(&m)
}

/// Whether the actor may read what a site's worker reports (its heartbeat, keys and privacy
/// ledger): the site's worker, its custodians (not through a site token), administrators and
/// auditors.
pub fn sees_site_reports(actor: &crate::domain::Actor, site: &SiteDto) -> bool {
    use consilium_core::Role;
    actor.site_id == Some(site.id)
        || (actor.site_id.is_none()
            && actor.has(Role::Custodian)
            && site.custodians.contains(&actor.user_id))
        || actor.has(Role::Administrator)
        || actor.has(Role::Auditor)
}
