//! Secure aggregation's exchanges (SecAgg+), relayed by the server between the sites of a round.
//! Each site posts, with its worker token, its part of a stage (`POST
//! /sites/{id}/jobs/{job}/secagg/{stage}`) and asks for the stage's answer (`GET`, 202 until the
//! stage closes). A stage closes when every site expected in it has posted, or at its deadline;
//! the closing (who is in it; for the key exchange the graph and the threshold) is written once,
//! in the write transaction that sees it due, so any server process answers alike and a restart
//! resumes. The server holds only public keys, encrypted shares, masked inputs (in the store)
//! and the shares the protocol lets it have; `sum` rebuilds the masks it may remove and gives
//! the survivors' weighted mean change, never a site's own.

use chrono::{DateTime, Duration, Utc};
use consilium_core::aggregate::Weights;
use consilium_core::plan::{Plan, SECAGG_MIN_SITES, SecureAggregation};
use consilium_core::secagg::wire::{
    KeysAnswer, KeysPost, MaskedAnswer, MaskedPost, Neighbour, RevealsPost, SharesAnswer,
    SharesPost, Stage, decode_masked,
};
use consilium_core::secagg::{
    Context, Neighbourhoods, PublicKeys, Reveal, SiteIndex, dequantise_at, neighbourhoods,
    restrict, unmask,
};
use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::{plan, round, run, secagg_message, site_output};
use crate::error::{AppError, AppResult};
use crate::services::{site_artifacts, studies};

/// Largest body of one post: a site's shares for 254 neighbours, with room.
pub const MAX_POST_BYTES: usize = 256 * 1024;

/// A site in the key exchange.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Member {
    pub site_id: Uuid,
    pub keys: PublicKeys,
    pub samples: u64,
}

/// The key exchange as it closed: the members by index, their graph and threshold.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeysClosing {
    pub at: DateTime<Utc>,
    pub members: BTreeMap<SiteIndex, Member>,
    pub graph: Neighbourhoods,
    pub threshold: usize,
    pub neighbours: usize,
}

impl KeysClosing {
    fn index_of(&self, site: Uuid) -> Option<SiteIndex> {
        self.members
            .iter()
            .find(|(_, m)| m.site_id == site)
            .map(|(i, _)| *i)
    }

    pub fn total_samples(&self) -> u64 {
        self.members.values().map(|m| m.samples).sum()
    }
}

/// Who posted in a later stage before it closed (with a masked input's hash).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Closing {
    pub at: DateTime<Utc>,
    pub members: BTreeMap<SiteIndex, String>,
}

fn closed(stage: Stage) -> String {
    format!("{}.closed", stage.as_str())
}

/// A secure round as the exchanges see it.
pub struct SecureRound {
    pub row: round::Model,
    pub plan: Plan,
    pub secagg: SecureAggregation,
}

impl SecureRound {
    fn stage_seconds(&self) -> Duration {
        Duration::seconds(i64::from(self.secagg.stage_seconds))
    }

    fn sites(&self) -> AppResult<Vec<Uuid>> {
        serde_json::from_value(self.row.sites.clone()).map_err(AppError::unexpected)
    }

    pub fn context(&self) -> Context {
        Context {
            run: self.row.run_id,
            round: self.row.number.max(0) as u32,
        }
    }

    /// The standard deviation of the noise each site adds (distributed DP: the sum of at least
    /// t sites carries the plan's σ·C), and the round's quantisation step.
    pub fn noise_and_step(&self, threshold: usize, sites: usize) -> (f64, f64) {
        let per_site = self.plan.clipping.map_or(0.0, |c| {
            c.noise_multiplier * c.clip_norm / (threshold.max(1) as f64).sqrt()
        });
        (per_site, self.secagg.step(per_site, sites))
    }
}

/// The secure round `number` of `run`, or none when its plan does not ask for secure
/// aggregation.
pub async fn secure_round(
    db: &impl ConnectionTrait,
    run_id: Uuid,
    number: i32,
) -> AppResult<Option<SecureRound>> {
    let Some(r) = run::Entity::find_by_id(run_id).one(db).await? else {
        return Ok(None);
    };
    let Some(p) = plan::Entity::find()
        .filter(plan::Column::StudyId.eq(r.study_id))
        .filter(plan::Column::Hash.eq(r.plan_hash.as_str()))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let plan = studies::plan_dto(&p)?
        .manifest
        .parse()
        .map_err(|problems| {
            AppError::unexpected(anyhow::anyhow!(
                "the run's plan no longer parses: {}",
                problems.join("; ")
            ))
        })?;
    let Some(secagg) = plan.secure_aggregation else {
        return Ok(None);
    };
    let Some(row) = round::Entity::find()
        .filter(round::Column::RunId.eq(run_id))
        .filter(round::Column::Number.eq(number))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(SecureRound { row, plan, secagg }))
}

async fn rows(
    db: &impl ConnectionTrait,
    r: &round::Model,
    stage: &str,
) -> AppResult<Vec<secagg_message::Model>> {
    Ok(secagg_message::Entity::find()
        .filter(secagg_message::Column::RunId.eq(r.run_id))
        .filter(secagg_message::Column::Round.eq(r.number))
        .filter(secagg_message::Column::Stage.eq(stage))
        .all(db)
        .await?)
}

async fn closing_of<T: for<'de> Deserialize<'de>>(
    db: &impl ConnectionTrait,
    r: &round::Model,
    stage: Stage,
) -> AppResult<Option<T>> {
    match rows(db, r, &closed(stage)).await?.into_iter().next() {
        Some(row) => Ok(Some(
            serde_json::from_value(row.body).map_err(AppError::unexpected)?,
        )),
        None => Ok(None),
    }
}

async fn insert(
    db: &impl ConnectionTrait,
    r: &round::Model,
    stage: &str,
    site: Uuid,
    body: serde_json::Value,
) -> AppResult<()> {
    secagg_message::ActiveModel {
        id: Set(Uuid::new_v4()),
        run_id: Set(r.run_id),
        round: Set(r.number),
        stage: Set(stage.to_string()),
        site_id: Set(site),
        body: Set(body),
        created_at: Set(Utc::now()),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// The key exchange's closing, its later stages' closings, each once closed.
#[derive(Default)]
pub struct Closings {
    pub keys: Option<KeysClosing>,
    pub shares: Option<Closing>,
    pub masked: Option<Closing>,
    pub reveals: Option<Closing>,
}

/// Closes every stage that is due (all its sites posted, or its deadline passed), in order,
/// and returns the closings so far. Most calls close nothing and only read; the write lock is
/// taken when a stage falls due.
pub async fn advance(ctx: &AppContext, s: &SecureRound) -> AppResult<Closings> {
    if let Some(c) = close_due(&ctx.db, s, false).await? {
        return Ok(c);
    }
    let w = ctx.begin_write().await?;
    let c = close_due(&*w, s, true).await?.ok_or_else(|| {
        AppError::unexpected(anyhow::anyhow!("a stage due to close was not closed"))
    })?;
    w.commit().await?;
    Ok(c)
}

/// The closings, closing what is due when `write` (the caller holds the write lock); without
/// it, `None` as soon as a stage is due.
async fn close_due(
    w: &impl ConnectionTrait,
    s: &SecureRound,
    write: bool,
) -> AppResult<Option<Closings>> {
    let r = &s.row;
    let now = Utc::now();
    let mut out = Closings {
        keys: closing_of(w, r, Stage::Keys).await?,
        shares: closing_of(w, r, Stage::Shares).await?,
        masked: closing_of(w, r, Stage::Masked).await?,
        reveals: closing_of(w, r, Stage::Reveals).await?,
    };
    if out.keys.is_none() {
        let posts = rows(w, r, Stage::Keys.as_str()).await?;
        let expected = s.sites()?;
        // Before training: half the round's training time, for workers still reading their
        // data (it closes as soon as every site has posted).
        let training = r.deadline - r.created_at - s.stage_seconds() * 2;
        let due = r.created_at + training / 2;
        if expected
            .iter()
            .all(|x| posts.iter().any(|p| p.site_id == *x))
            || now >= due
        {
            if !write {
                return Ok(None);
            }
            let mut members: Vec<(Uuid, KeysPost)> = posts
                .into_iter()
                .map(|p| {
                    serde_json::from_value(p.body)
                        .map(|b| (p.site_id, b))
                        .map_err(AppError::unexpected)
                })
                .collect::<AppResult<_>>()?;
            members.sort_by_key(|(site, _)| *site);
            let n = members.len();
            let k = s.secagg.degree(n);
            let graph = neighbourhoods(n, k, &mut rand::rngs::OsRng);
            let closing = KeysClosing {
                at: now,
                members: members
                    .into_iter()
                    .enumerate()
                    .map(|(i, (site_id, b))| {
                        (
                            i as SiteIndex,
                            Member {
                                site_id,
                                keys: b.keys,
                                samples: b.samples,
                            },
                        )
                    })
                    .collect(),
                graph,
                threshold: s.secagg.threshold_of(k),
                neighbours: k,
            };
            insert(
                w,
                r,
                &closed(Stage::Keys),
                Uuid::nil(),
                serde_json::to_value(&closing)?,
            )
            .await?;
            out.keys = Some(closing);
        }
    }
    // Each later stage expects the sites that shared their keys (a site that dropped out
    // after sending its masked input still holds its neighbours' shares).
    let Some(keys) = &out.keys else {
        return Ok(Some(out));
    };
    let mut previous_at = keys.at;
    let mut expected: BTreeSet<SiteIndex> = keys.members.keys().copied().collect();
    for stage in [Stage::Shares, Stage::Masked, Stage::Reveals] {
        let slot = match stage {
            Stage::Shares => &mut out.shares,
            Stage::Masked => &mut out.masked,
            _ => &mut out.reveals,
        };
        if slot.is_none() {
            let due = match stage {
                // The masked input comes after training: the round's training time.
                Stage::Masked => r.deadline - s.stage_seconds() * 2,
                _ => previous_at + s.stage_seconds(),
            };
            let posts = rows(w, r, stage.as_str()).await?;
            let mut members = BTreeMap::new();
            for p in posts {
                if let Some(i) = keys.index_of(p.site_id) {
                    let hash = match stage {
                        Stage::Masked => {
                            serde_json::from_value::<MaskedPost>(p.body)
                                .map_err(AppError::unexpected)?
                                .sha256
                        }
                        _ => String::new(),
                    };
                    members.insert(i, hash);
                }
            }
            if expected.iter().all(|i| members.contains_key(i)) || now >= due {
                if !write {
                    return Ok(None);
                }
                let closing = Closing { at: now, members };
                insert(
                    w,
                    r,
                    &closed(stage),
                    Uuid::nil(),
                    serde_json::to_value(&closing)?,
                )
                .await?;
                *slot = Some(closing);
            }
        }
        match slot {
            Some(c) => {
                previous_at = c.at;
                if stage == Stage::Shares {
                    expected = c.members.keys().copied().collect();
                }
            }
            None => break,
        }
    }
    Ok(Some(out))
}

/// Why a site's post or question is not part of this round's exchanges.
fn not_open(stage: Stage, number: i32, why: &str) -> AppError {
    AppError::conflict(
        "secagg_stage_closed",
        format!(
            "The {} exchange of round {number} {why}; this site takes no part in the round's secure sum.",
            stage.as_str()
        ),
    )
}

/// A site's training job of a round, as its worker names it.
#[derive(Clone, Copy, Debug)]
pub struct SiteJob {
    pub site: Uuid,
    pub job: Uuid,
    pub run_id: Uuid,
    pub number: i32,
}

async fn checked_round(ctx: &AppContext, actor: &Actor, at: SiteJob) -> AppResult<SecureRound> {
    let SiteJob {
        site,
        job,
        run_id,
        number,
    } = at;
    site_artifacts::require_worker(actor, site, "take part in its rounds' secure aggregation")?;
    if !site_artifacts::open_job(ctx, site, job, run_id, number).await? {
        return Err(AppError::conflict(
            "job_not_open",
            format!(
                "Job {job} (run {run_id}, round {number}) is not a training job this server sent site {site} and still waits for: it may have ended, or never existed."
            ),
        ));
    }
    secure_round(&ctx.db, run_id, number)
        .await?
        .ok_or_else(|| {
            AppError::conflict(
                "not_secure",
                format!(
                    "Run {run_id}'s plan does not ask for secure aggregation: send the update as the job's output."
                ),
            )
        })
}

fn parse<T: for<'de> Deserialize<'de>>(stage: Stage, body: serde_json::Value) -> AppResult<T> {
    serde_json::from_value(body).map_err(|e| {
        AppError::Invalid(format!(
            "The {} post is not what this stage takes: {e}.",
            stage.as_str()
        ))
    })
}

/// The values a masked input of this round holds: the global model's, less the layers that
/// stay at the sites.
pub fn layout(global: &Weights, plan: &Plan) -> usize {
    global
        .iter()
        .filter(|(name, _)| !plan.is_local(name))
        .map(|(_, t)| t.data.len())
        .sum()
}

/// A site's part of `stage` (its worker, for a training job of a secure round that is still
/// open). Posting the same again is accepted; anything else twice is refused.
#[tracing::instrument(skip(ctx, body), fields(actor = %actor.audit_name()))]
pub async fn post(
    ctx: &AppContext,
    actor: &Actor,
    at: SiteJob,
    stage: Stage,
    body: serde_json::Value,
) -> AppResult<()> {
    let SiteJob {
        site,
        job,
        run_id,
        number,
    } = at;
    let s = checked_round(ctx, actor, at).await?;
    let c = advance(ctx, &s).await?;
    let is_closed = match stage {
        Stage::Keys => c.keys.is_some(),
        Stage::Shares => c.shares.is_some(),
        Stage::Masked => c.masked.is_some(),
        Stage::Reveals => c.reveals.is_some(),
    };
    if is_closed {
        return Err(not_open(
            stage,
            number,
            "has closed without this site's part",
        ));
    }
    let member = |keys: &Option<KeysClosing>| -> AppResult<(KeysClosing, SiteIndex)> {
        let keys = keys.clone().ok_or_else(|| {
            not_open(
                stage,
                number,
                "has not opened: the key exchange is still open",
            )
        })?;
        let index = keys.index_of(site).ok_or_else(|| {
            not_open(
                stage,
                number,
                "is among the sites of the key exchange, and this site is not",
            )
        })?;
        Ok((keys, index))
    };
    let in_stage = |c: &Option<Closing>, i: SiteIndex, what: &str| -> AppResult<()> {
        match c {
            Some(c) if c.members.contains_key(&i) => Ok(()),
            Some(_) => Err(not_open(stage, number, what)),
            None => Err(not_open(stage, number, "has not opened yet")),
        }
    };
    match stage {
        Stage::Keys => {
            let b: KeysPost = parse(stage, body.clone())?;
            if b.samples == 0 {
                return Err(AppError::Invalid(
                    "A site with no training images has no part in the sum: samples must be at least 1.".into(),
                ));
            }
        }
        Stage::Shares => {
            let (keys, i) = member(&c.keys)?;
            let b: SharesPost = parse(stage, body.clone())?;
            let to: BTreeSet<SiteIndex> = b.shares.iter().map(|x| x.to).collect();
            let neighbours: BTreeSet<SiteIndex> = keys
                .graph
                .get(&i)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect();
            if to != neighbours
                || to.len() != b.shares.len()
                || b.shares.iter().any(|x| x.from != i)
            {
                return Err(AppError::Invalid(format!(
                    "Site {i}'s shares must go one to each of its neighbours {neighbours:?}, each from {i}."
                )));
            }
            if b.shares.iter().any(|x| x.ciphertext.len() > 256) {
                return Err(AppError::Invalid(
                    "A share is at most 256 bytes of ciphertext.".into(),
                ));
            }
        }
        Stage::Masked => {
            let (_, i) = member(&c.keys)?;
            in_stage(
                &c.shares,
                i,
                "is among the sites that shared their keys, and this site did not",
            )?;
            let b: MaskedPost = parse(stage, body.clone())?;
            let received = site_output::Entity::find()
                .filter(site_output::Column::JobId.eq(job))
                .filter(site_output::Column::SiteId.eq(site))
                .filter(site_output::Column::Hash.eq(b.sha256.as_str()))
                .one(&ctx.db)
                .await?
                .ok_or_else(|| {
                    AppError::Invalid(format!(
                        "No output {} of job {job} from this site: hand over the masked input as the job's output first.",
                        b.sha256
                    ))
                })?;
            let global = ctx
                .federation()?
                .artifacts
                .get(s.row.global_in.as_deref().unwrap_or_default())
                .await
                .map_err(AppError::unexpected)?;
            let global = crate::engine::weights::from_safetensors(&global)
                .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
            let len = layout(&global, &s.plan);
            if received.bytes != (len * 4) as i64 {
                return Err(AppError::Invalid(format!(
                    "A masked input of this round's model is {} bytes ({len} values of 32 bits), not {}.",
                    len * 4,
                    received.bytes
                )));
            }
        }
        Stage::Reveals => {
            let (keys, i) = member(&c.keys)?;
            in_stage(
                &c.shares,
                i,
                "is among the sites that shared their keys, and this site did not",
            )?;
            let masked = c
                .masked
                .as_ref()
                .ok_or_else(|| not_open(stage, number, "has not opened yet"))?;
            let shared = c
                .shares
                .as_ref()
                .map(|x| x.members.clone())
                .unwrap_or_default();
            let b: RevealsPost = parse(stage, body.clone())?;
            let neighbours = keys.graph.get(&i).cloned().unwrap_or_default();
            let mut seen = BTreeSet::new();
            for r in &b.reveals {
                let (of, seed, share) = match r {
                    Reveal::Seed { of, share } => (*of, true, share),
                    Reveal::MaskKey { of, share } => (*of, false, share),
                };
                let own_seed = of == i && seed;
                if !(own_seed || neighbours.contains(&of))
                    || !shared.contains_key(&of)
                    || !seen.insert(of)
                {
                    return Err(AppError::Invalid(format!(
                        "Site {i} may reveal one share of itself and of each neighbour that shared its keys; {of} is not one, or is named twice."
                    )));
                }
                if seed != masked.members.contains_key(&of) {
                    return Err(AppError::Invalid(format!(
                        "Site {i} revealed the wrong secret of site {of}: a seed share for a site that sent its masked input, a mask-key share for one that did not."
                    )));
                }
                if share.len() > 64 {
                    return Err(AppError::Invalid(
                        "A revealed share is at most 64 bytes.".into(),
                    ));
                }
            }
        }
    }
    let w = ctx.begin_write().await?;
    let earlier = secagg_message::Entity::find()
        .filter(secagg_message::Column::RunId.eq(run_id))
        .filter(secagg_message::Column::Round.eq(number))
        .filter(secagg_message::Column::Stage.eq(stage.as_str()))
        .filter(secagg_message::Column::SiteId.eq(site))
        .one(&*w)
        .await?;
    match earlier {
        Some(e) if e.body == body => return Ok(()),
        Some(_) => {
            return Err(AppError::conflict(
                "already_posted",
                format!(
                    "This site posted its {} part of round {number} already, with other content; a part is posted once.",
                    stage.as_str()
                ),
            ));
        }
        None => insert(&*w, &s.row, stage.as_str(), site, body).await?,
    }
    w.commit().await?;
    Ok(())
}

/// What the site learns when `stage` closes (none while it is open).
#[tracing::instrument(skip(ctx), fields(actor = %actor.audit_name()))]
pub async fn answer(
    ctx: &AppContext,
    actor: &Actor,
    at: SiteJob,
    stage: Stage,
) -> AppResult<Option<serde_json::Value>> {
    let (site, number) = (at.site, at.number);
    let s = checked_round(ctx, actor, at).await?;
    let c = advance(ctx, &s).await?;
    let Some(keys) = &c.keys else {
        return Ok(None);
    };
    let i = keys
        .index_of(site)
        .ok_or_else(|| not_open(Stage::Keys, number, "closed without this site's keys"))?;
    let member = |closing: &Option<Closing>, what: Stage| -> AppResult<Option<()>> {
        match closing {
            None => Ok(None),
            Some(x) if x.members.contains_key(&i) => Ok(Some(())),
            Some(_) => Err(not_open(what, number, "closed without this site's part")),
        }
    };
    let value = match stage {
        Stage::Keys => serde_json::to_value(KeysAnswer {
            index: i,
            threshold: keys.threshold,
            sites: keys.members.len(),
            total_samples: keys.total_samples(),
            neighbours: keys
                .graph
                .get(&i)
                .into_iter()
                .flatten()
                .filter_map(|j| {
                    keys.members.get(j).map(|m| Neighbour {
                        index: *j,
                        keys: m.keys,
                    })
                })
                .collect(),
        })?,
        Stage::Shares => {
            if member(&c.shares, Stage::Shares)?.is_none() {
                return Ok(None);
            }
            let mut shares = Vec::new();
            for row in rows(&ctx.db, &s.row, Stage::Shares.as_str()).await? {
                let from_member = keys.index_of(row.site_id).is_some_and(|x| {
                    c.shares
                        .as_ref()
                        .is_some_and(|c| c.members.contains_key(&x))
                });
                if from_member {
                    let post: SharesPost =
                        serde_json::from_value(row.body).map_err(AppError::unexpected)?;
                    shares.extend(post.shares.into_iter().filter(|x| x.to == i));
                }
            }
            serde_json::to_value(SharesAnswer { shares })?
        }
        Stage::Masked | Stage::Reveals => {
            member(&c.shares, Stage::Shares)?;
            let Some(masked) = &c.masked else {
                return Ok(None);
            };
            if stage == Stage::Reveals && c.reveals.is_none() {
                return Ok(None);
            }
            let shared: BTreeSet<SiteIndex> = c
                .shares
                .as_ref()
                .map(|x| x.members.keys().copied().collect())
                .unwrap_or_default();
            let survivors: BTreeSet<SiteIndex> = masked.members.keys().copied().collect();
            serde_json::to_value(MaskedAnswer {
                dropped: shared.difference(&survivors).copied().collect(),
                survivors,
            })?
        }
    };
    Ok(Some(value))
}

/// The round's sum, or why there is none.
pub struct Sum {
    /// The survivors' weighted mean change (their weights renormalised to 1).
    pub mean_change: Vec<f32>,
    /// The survivors by site, with their masked input's hash and training images.
    pub survivors: Vec<(Uuid, String, u64)>,
    /// Sites of the round that sent no masked input, with how they dropped out and whether
    /// their masks were removed.
    pub dropped: Vec<(Uuid, &'static str, bool)>,
    pub threshold: usize,
    pub neighbours: usize,
    /// The standard deviation of the noise the sum carries.
    pub noise_std: f64,
}

/// Unmasks the round's sum once every exchange has closed: `Err` says, in words, why the round
/// cannot use it (too few sites, a site whose masks cannot be removed).
pub async fn sum(
    ctx: &AppContext,
    s: &SecureRound,
    c: &Closings,
    global: &Weights,
    quorum: usize,
) -> AppResult<Result<Sum, String>> {
    let (Some(keys), Some(shares), Some(masked), Some(_)) =
        (&c.keys, &c.shares, &c.masked, &c.reveals)
    else {
        return Ok(Err(
            "the secure aggregation's exchanges did not close".into()
        ));
    };
    let number = s.row.number;
    let sites = s.sites()?;
    let mut dropped = Vec::new();
    for site in &sites {
        let stage = match keys.index_of(*site) {
            None => Some(Stage::Keys),
            Some(i) if !shares.members.contains_key(&i) => Some(Stage::Shares),
            Some(i) if !masked.members.contains_key(&i) => Some(Stage::Masked),
            Some(_) => None,
        };
        if let Some(stage) = stage {
            dropped.push((*site, stage.dropped_before(), stage == Stage::Masked));
        }
    }
    let survivors: BTreeSet<SiteIndex> = masked.members.keys().copied().collect();
    let needed = quorum.max(SECAGG_MIN_SITES).max(keys.threshold);
    if survivors.len() < needed {
        return Ok(Err(format!(
            "Round {number} failed: {} of {} sites sent a masked input, and a secure sum needs {needed} (the plan's quorum, the threshold t = {} and never fewer than {SECAGG_MIN_SITES}).",
            survivors.len(),
            sites.len(),
            keys.threshold
        )));
    }
    let len = layout(global, &s.plan);
    let store = &ctx.federation()?.artifacts;
    let mut inputs = BTreeMap::new();
    for (i, hash) in &masked.members {
        let bytes = store.get(hash).await.map_err(AppError::unexpected)?;
        let words = decode_masked(&bytes, len)
            .map_err(|e| AppError::unexpected(anyhow::anyhow!("site {i}'s masked input: {e}")))?;
        inputs.insert(*i, words);
    }
    let mut reveals: BTreeMap<SiteIndex, Vec<Reveal>> = BTreeMap::new();
    for row in rows(&ctx.db, &s.row, Stage::Reveals.as_str()).await? {
        if let Some(i) = keys.index_of(row.site_id) {
            let post: RevealsPost =
                serde_json::from_value(row.body).map_err(AppError::unexpected)?;
            reveals.insert(i, post.reveals);
        }
    }
    let shared: BTreeSet<SiteIndex> = shares.members.keys().copied().collect();
    let graph = restrict(&keys.graph, &shared);
    let public: BTreeMap<SiteIndex, PublicKeys> =
        keys.members.iter().map(|(i, m)| (*i, m.keys)).collect();
    let (ctx_round, threshold) = (s.context(), keys.threshold);
    let unmasked = tokio::task::spawn_blocking(move || {
        unmask(&ctx_round, &graph, &public, &inputs, &reveals, threshold)
    })
    .await
    .map_err(AppError::unexpected)?;
    let total = keys.total_samples().max(1) as f64;
    let member_of = |i: &SiteIndex| keys.members.get(i);
    let summed_weight: f64 = survivors
        .iter()
        .filter_map(member_of)
        .map(|m| m.samples as f64 / total)
        .sum();
    let (per_site, step) = s.noise_and_step(threshold, keys.members.len());
    let sum = match unmasked {
        Ok(sum) => sum,
        Err(consilium_core::secagg::SecAggError::BelowThreshold {
            site,
            what,
            got,
            threshold,
        }) => {
            let named = match member_of(&site) {
                Some(m) => match crate::services::directory::get_site(&ctx.db, m.site_id).await {
                    Ok(x) => format!("{} (site {})", x.name, m.site_id),
                    Err(AppError::NotFound(_)) => format!("site {}", m.site_id),
                    Err(e) => return Err(e),
                },
                None => format!("site number {site}"),
            };
            return Ok(Err(format!(
                "Round {number} failed: secure aggregation could not remove the {what} of {named}: {got} of the sites holding its shares answered, the threshold is {threshold}; too few were left, so the sum cannot be read."
            )));
        }
        Err(e) => return Ok(Err(format!("Round {number} failed: {e}."))),
    };
    let mean_change = dequantise_at(&sum, step)
        .into_iter()
        .map(|v| (f64::from(v) / summed_weight.max(f64::MIN_POSITIVE)) as f32)
        .collect();
    Ok(Ok(Sum {
        mean_change,
        survivors: masked
            .members
            .iter()
            .filter_map(|(i, hash)| member_of(i).map(|m| (m.site_id, hash.clone(), m.samples)))
            .collect(),
        dropped,
        threshold,
        neighbours: keys.neighbours,
        noise_std: per_site * (survivors.len() as f64).sqrt(),
    }))
}
