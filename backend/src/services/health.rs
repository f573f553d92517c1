//! Site health, from the workers' heartbeats: which sites are online, training, offline or
//! never heard from, with the worker's version and when it was last heard. Administrators and
//! auditors see every site, a custodian their own sites, a researcher the sites of their
//! studies, a site's worker its own; what a worker says of its data only the site's custodians,
//! administrators and auditors.

use chrono::{Duration, Utc};
use consilium_core::Role;
use consilium_core::api::{ModelVersionDto, SiteFlag, SiteHealthDto, flagged_sites};
use sea_orm::EntityTrait;
use std::collections::BTreeMap;

use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::{heartbeat, model_version, study};
use crate::error::AppResult;
use crate::services::{directory, studies};

/// A worker heard from within this long is online (workers beat every few seconds).
pub const ONLINE_WITHIN_SECONDS: i64 = 60;

pub async fn list(ctx: &AppContext, actor: &Actor) -> AppResult<Vec<SiteHealthDto>> {
    let sites = directory::list_sites(ctx).await?;
    let everything = actor.has(Role::Administrator) || actor.has(Role::Auditor);
    let study_sites: Vec<uuid::Uuid> = if actor.has(Role::Researcher) && actor.site_id.is_none() {
        studies::list_studies(ctx, actor)
            .await?
            .into_iter()
            .filter(|s| s.researcher_id == actor.user_id)
            .flat_map(|s| s.sites.into_iter().map(|x| x.site_id))
            .collect()
    } else {
        Vec::new()
    };
    let beats = heartbeat::Entity::find().all(&ctx.db).await?;
    // Flags are shown only to administrators, auditors and custodians; the lineage of every
    // model version is read for them alone.
    let flags = if everything || (actor.site_id.is_none() && actor.has(Role::Custodian)) {
        flags(ctx).await?
    } else {
        Vec::new()
    };
    let now = Utc::now();
    let mut out = Vec::new();
    for s in sites {
        let custodian = actor.site_id.is_none()
            && actor.has(Role::Custodian)
            && s.custodians.contains(&actor.user_id);
        let own_worker = actor.site_id == Some(s.id);
        if !(everything || custodian || own_worker || study_sites.contains(&s.id)) {
            continue;
        }
        let beat = beats.iter().find(|b| b.site_id == s.id);
        let state = match beat {
            None => "never",
            Some(b) if now - b.at > Duration::seconds(ONLINE_WITHIN_SECONDS) => "offline",
            Some(b) if b.state == "training" => "training",
            Some(_) => "online",
        };
        out.push(SiteHealthDto {
            site_id: s.id,
            site_name: s.name.clone(),
            state: state.to_string(),
            last_seen: beat.map(|b| b.at),
            version: beat.map(|b| b.version.clone()),
            data_summary: beat
                .filter(|_| everything || custodian || own_worker)
                .map(|b| b.data_summary.clone()),
            flags: flags
                .iter()
                .filter(|f| f.site_id == s.id && (everything || custodian))
                .cloned()
                .collect(),
        });
    }
    Ok(out)
}

/// Every run's flagged sites (`api::flagged_sites`), from the model versions' lineage.
async fn flags(ctx: &AppContext) -> AppResult<Vec<SiteFlag>> {
    let mut by_run: BTreeMap<uuid::Uuid, Vec<ModelVersionDto>> = BTreeMap::new();
    for v in model_version::Entity::find().all(&ctx.db).await? {
        by_run
            .entry(v.run_id)
            .or_default()
            .push(crate::services::models::version_dto(&v)?);
    }
    let mut flags: Vec<SiteFlag> = by_run.values().flat_map(|v| flagged_sites(v)).collect();
    for f in &mut flags {
        if let Some(s) = study::Entity::find_by_id(f.study_id).one(&ctx.db).await? {
            f.study_title = s.title;
        }
    }
    Ok(flags)
}
