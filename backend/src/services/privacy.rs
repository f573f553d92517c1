//! The per-dataset privacy ledger: the custodian's cap on what its patients may spend over every
//! study. Every private round's cost at a site (its Rényi values per order, which add up across
//! rounds and runs where ε does not) is reserved before the round's job goes out, committed when
//! the site answers, released when the site refused without training. A round that would take the
//! run past its approved ε, or the dataset past its lifetime budget, is not sent to the site.
//!
//! Reservations are written through the one writer (`AppContext::begin_write`: a process-wide
//! lock and, on PostgreSQL, a transaction-scoped advisory lock), and the sum they are checked
//! against is read inside that same transaction: two runs on one dataset, from one server or
//! several, cannot both take the last of a budget.

use chrono::Utc;
use consilium_core::Role;
use consilium_core::api::{
    DatasetPrivacyDto, PrivacyBudgetDto, PrivacySpendDto, SetPrivacyBudget, StudySpendingDto,
};
use consilium_core::plan::{DpRound, DpRoundError, DpSgd, MAX_DELTA, Plan};
use consilium_core::preview::PreviewPrivacy;
use consilium_core::privacy::RdpCost;
use consilium_core::protocol::PrivacySpent;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set,
};
use std::collections::BTreeMap;
use uuid::Uuid;

use crate::audit;
use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::{privacy_budget, privacy_spend, study};
use crate::error::{AppError, AppResult};

pub const RESERVED: &str = "reserved";
pub const COMMITTED: &str = "committed";
pub const RELEASED: &str = "released";

/// Room for rounding: a run that σ was derived for spends exactly its ε.
const SLACK: f64 = 1e-9;

fn rdp_of(m: &privacy_spend::Model) -> AppResult<RdpCost> {
    serde_json::from_value(m.rdp.clone()).map_err(AppError::unexpected)
}

/// The Rényi costs of these rows together (`None`: no row).
fn total<'a>(
    rows: impl IntoIterator<Item = &'a privacy_spend::Model>,
) -> AppResult<Option<RdpCost>> {
    let mut sum: Option<RdpCost> = None;
    for r in rows {
        let c = rdp_of(r)?;
        sum = Some(match sum {
            None => c,
            Some(s) => s.plus(&c).map_err(AppError::unexpected)?,
        });
    }
    Ok(sum)
}

fn epsilon(c: &RdpCost, delta: f64) -> AppResult<f64> {
    Ok(c.epsilon(delta).map_err(AppError::unexpected)?.epsilon)
}

/// Order by order, the larger of two costs (what a site spent when the server's reservation
/// and the site's report differ: the ledger keeps the worse).
fn larger(a: &RdpCost, b: &RdpCost) -> RdpCost {
    if a.orders != b.orders {
        return a.clone();
    }
    RdpCost {
        orders: a.orders.clone(),
        rdp: a.rdp.iter().zip(&b.rdp).map(|(x, y)| x.max(*y)).collect(),
    }
}

/// What spends: a training round of a run's plan, or a private preview's generator.
#[derive(Clone, Copy)]
pub enum Spender<'a> {
    Round(&'a Plan, &'a DpSgd),
    Preview(&'a PreviewPrivacy),
}

impl Spender<'_> {
    pub const fn purpose(&self) -> &'static str {
        match self {
            Spender::Round(..) => ROUND,
            Spender::Preview(_) => PREVIEW,
        }
    }

    /// The ε and δ approved for the whole of what this is part of (the run; the preview).
    fn approved(&self) -> (f64, f64) {
        match self {
            Spender::Round(_, dp) => (dp.epsilon, dp.delta),
            Spender::Preview(dp) => (dp.epsilon, dp.delta),
        }
    }

    fn cost(&self, patients: u64) -> Result<DpRound, DpRoundError> {
        match self {
            Spender::Round(plan, dp) => plan.dp_round(dp, patients),
            Spender::Preview(dp) => consilium_core::preview::dp_cost(dp, patients),
        }
    }

    fn what(&self, round: i32) -> String {
        match self {
            Spender::Round(..) => format!("round {round}"),
            Spender::Preview(_) => "this preview".into(),
        }
    }
}

pub const ROUND: &str = "round";
pub const PREVIEW: &str = "preview";

/// What one private round (or preview) at a site is to be reserved as.
pub struct Reservation<'a> {
    pub spender: Spender<'a>,
    pub study_id: Uuid,
    /// The run, or the preview request.
    pub run_id: Uuid,
    /// The round (0 for a preview).
    pub round: i32,
    pub site_id: Uuid,
    pub site_name: &'a str,
    /// The training split's patients, as the site's worker last reported.
    pub patients: Option<i64>,
}

/// Reserves a private round's cost at a site, inside the caller's write transaction.
/// `Ok(Err(reason))`: the round must not go to this site, and why, in words for the run page.
pub async fn reserve<C: ConnectionTrait>(
    db: &C,
    r: Reservation<'_>,
) -> AppResult<Result<(), String>> {
    let Some(patients) = r.patients.and_then(|n| u64::try_from(n).ok()) else {
        return Ok(Err(format!(
            "{} has not said how many patients its training data holds (its worker says so once the data is read); a private round's cost depends on it",
            r.site_name
        )));
    };
    let cost = match r.spender.cost(patients) {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("{}: {e}", r.site_name))),
    };
    let (approved_epsilon, approved_delta) = r.spender.approved();
    let what = r.spender.what(r.round);
    let rows = privacy_spend::Entity::find()
        .filter(privacy_spend::Column::SiteId.eq(r.site_id))
        .filter(privacy_spend::Column::State.is_in([RESERVED, COMMITTED]))
        .all(db)
        .await?;
    if rows
        .iter()
        .any(|x| x.run_id == r.run_id && x.round == r.round)
    {
        // Reserved when the round opened; a restarted server sends the job again.
        return Ok(Ok(()));
    }
    let run_total = match total(rows.iter().filter(|x| x.run_id == r.run_id))? {
        Some(t) => t.plus(&cost.rdp).map_err(AppError::unexpected)?,
        None => cost.rdp.clone(),
    };
    let run_epsilon = epsilon(&run_total, approved_delta)?;
    if run_epsilon > approved_epsilon * (1.0 + SLACK) {
        return Ok(Err(format!(
            "{what} would bring this run's privacy spending at {} to ε = {run_epsilon:.3}, above the approved ε = {approved_epsilon}",
            r.site_name
        )));
    }
    if let Some(budget) = privacy_budget::Entity::find_by_id(r.site_id)
        .one(db)
        .await?
    {
        let held = total(&rows)?;
        let before = match &held {
            Some(t) => epsilon(t, budget.delta)?,
            None => 0.0,
        };
        let dataset_total = match held {
            Some(t) => t.plus(&cost.rdp).map_err(AppError::unexpected)?,
            None => cost.rdp.clone(),
        };
        let dataset_epsilon = epsilon(&dataset_total, budget.delta)?;
        if dataset_epsilon > budget.epsilon * (1.0 + SLACK) {
            return Ok(Err(format!(
                "{}'s dataset has spent or reserved ε = {before:.3} of its lifetime budget ε = {} (δ = {}); {what} would bring it to ε = {dataset_epsilon:.3}. Its custodian sets the budget",
                r.site_name, budget.epsilon, budget.delta
            )));
        }
    }
    privacy_spend::ActiveModel {
        id: Set(Uuid::new_v4()),
        site_id: Set(r.site_id),
        study_id: Set(r.study_id),
        run_id: Set(r.run_id),
        round: Set(r.round),
        purpose: Set(r.spender.purpose().into()),
        state: Set(RESERVED.into()),
        patients: Set(i64::try_from(cost.patients).unwrap_or(i64::MAX)),
        sampling_rate: Set(cost.sampling_rate),
        noise_multiplier: Set(cost.noise_multiplier),
        steps: Set(i64::try_from(cost.steps).unwrap_or(i64::MAX)),
        delta: Set(approved_delta),
        rdp: Set(serde_json::to_value(&cost.rdp).map_err(AppError::unexpected)?),
        note: Set(None),
        created_at: Set(Utc::now()),
        updated_at: Set(Utc::now()),
    }
    .insert(db)
    .await?;
    Ok(Ok(()))
}

/// The reservation of a round at a site, if the round is private.
pub async fn reservation<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    round: i32,
    site_id: Uuid,
) -> AppResult<Option<privacy_spend::Model>> {
    Ok(privacy_spend::Entity::find()
        .filter(privacy_spend::Column::RunId.eq(run_id))
        .filter(privacy_spend::Column::Round.eq(round))
        .filter(privacy_spend::Column::SiteId.eq(site_id))
        .one(db)
        .await?)
}

/// Why a site's reported cost is not what its own sampling rate, σ and steps cost (`None`: it
/// is).
pub fn unreproducible(spent: &PrivacySpent) -> Option<String> {
    let expected = RdpCost::sampled_gaussian(
        spent.sampling_rate,
        spent.noise_multiplier,
        spent.steps,
        &consilium_core::privacy::default_orders(),
    );
    let same = expected.as_ref().is_ok_and(|e| {
        e.orders == spent.rdp.orders
            && e.rdp.iter().zip(&spent.rdp.rdp).all(|(a, b)| {
                (a - b).abs() <= 1e-9 * a.abs().max(1.0) || (a.is_infinite() && a == b)
            })
    });
    (!same).then(|| {
        format!(
            "the reported privacy cost does not follow from its sampling rate {}, σ = {} and {} steps",
            spent.sampling_rate, spent.noise_multiplier, spent.steps
        )
    })
}

/// Where the site trained on other numbers than the server reserved from what its worker
/// reported: the two ledgers disagree (`None`: they agree).
pub fn disagreement(held: &privacy_spend::Model, spent: &PrivacySpent) -> Option<String> {
    let differs = held.patients != i64::try_from(spent.patients).unwrap_or(i64::MAX)
        || held.steps != i64::try_from(spent.steps).unwrap_or(i64::MAX)
        || (held.noise_multiplier - spent.noise_multiplier).abs()
            > 1e-12 * held.noise_multiplier.abs().max(1.0)
        || held.delta != spent.delta;
    differs.then(|| {
        format!(
            "the site's ledger and the server's disagree: it reported {} patients, σ = {}, {} steps and δ = {}, the server reserved {} patients, σ = {}, {} steps and δ = {}",
            spent.patients,
            spent.noise_multiplier,
            spent.steps,
            spent.delta,
            held.patients,
            held.noise_multiplier,
            held.steps,
            held.delta
        )
    })
}

/// ε of a ledger row alone, at its δ.
pub fn row_epsilon(row: &privacy_spend::Model) -> AppResult<f64> {
    epsilon(&rdp_of(row)?, row.delta)
}

/// How a reserved round ends.
pub enum Settlement {
    /// The site trained and reported this cost: committed (the larger of it and the
    /// reservation, order by order), with a note where the update was not counted.
    Spent {
        reported: Option<RdpCost>,
        note: Option<String>,
    },
    /// The site refused before training: nothing was spent.
    Released(String),
    /// No answer, a failure, or the run ended with the job out: counted as spent (the site may
    /// have trained), with why.
    Assumed(String),
}

/// Settles a round's reservation at a site (nothing when the round is not private or was
/// settled already).
pub async fn settle<C: ConnectionTrait>(
    db: &C,
    run_id: Uuid,
    round: i32,
    site_id: Uuid,
    how: Settlement,
) -> AppResult<()> {
    let Some(row) = reservation(db, run_id, round, site_id).await? else {
        return Ok(());
    };
    if row.state != RESERVED {
        return Ok(());
    }
    let reserved = rdp_of(&row)?;
    let mut a: privacy_spend::ActiveModel = row.into();
    match how {
        Settlement::Spent { reported, note } => {
            let spent = reported.map_or(reserved.clone(), |r| larger(&reserved, &r));
            a.state = Set(COMMITTED.into());
            a.rdp = Set(serde_json::to_value(&spent).map_err(AppError::unexpected)?);
            a.note = Set(note);
        }
        Settlement::Released(why) => {
            a.state = Set(RELEASED.into());
            a.note = Set(Some(why));
        }
        Settlement::Assumed(why) => {
            a.state = Set(COMMITTED.into());
            a.note = Set(Some(why));
        }
    }
    a.updated_at = Set(Utc::now());
    a.update(db).await?;
    Ok(())
}

/// Commits every reservation a run still holds (it ended with jobs out: the sites may have
/// trained).
pub async fn end_run<C: ConnectionTrait>(db: &C, run_id: Uuid, why: &str) -> AppResult<()> {
    let open = privacy_spend::Entity::find()
        .filter(privacy_spend::Column::RunId.eq(run_id))
        .filter(privacy_spend::Column::State.eq(RESERVED))
        .all(db)
        .await?;
    for row in open {
        settle(
            db,
            run_id,
            row.round,
            row.site_id,
            Settlement::Assumed(format!(
                "the run ended ({why}) while the job was out; counted as spent, since the site may have trained"
            )),
        )
        .await?;
    }
    Ok(())
}

/// The dataset's ledger: budget, spent, reserved, remaining, and which studies spent it.
pub async fn dataset(
    ctx: &AppContext,
    actor: &Actor,
    site_id: Uuid,
) -> AppResult<DatasetPrivacyDto> {
    let site = crate::services::directory::get_site(&ctx.db, site_id).await?;
    if !crate::services::directory::sees_site_reports(actor, &site) {
        return Err(AppError::Forbidden(format!(
            "Only {:?}'s worker, its custodians, administrators and auditors may see its privacy ledger.",
            site.name
        )));
    }
    ledger(&ctx.db, &site).await
}

async fn ledger<C: ConnectionTrait>(
    db: &C,
    site: &consilium_core::api::SiteDto,
) -> AppResult<DatasetPrivacyDto> {
    let budget = privacy_budget::Entity::find_by_id(site.id).one(db).await?;
    let rows = privacy_spend::Entity::find()
        .filter(privacy_spend::Column::SiteId.eq(site.id))
        .order_by_asc(privacy_spend::Column::CreatedAt)
        .all(db)
        .await?;
    let delta = budget
        .as_ref()
        .map(|b| b.delta)
        .or_else(|| rows.iter().map(|r| r.delta).reduce(f64::min));
    let eps = |rows: Vec<&privacy_spend::Model>| -> AppResult<f64> {
        match (total(rows)?, delta) {
            (Some(t), Some(d)) => epsilon(&t, d),
            _ => Ok(0.0),
        }
    };
    let committed: Vec<_> = rows.iter().filter(|r| r.state == COMMITTED).collect();
    let held: Vec<_> = rows.iter().filter(|r| r.state != RELEASED).collect();
    let spent_epsilon = eps(committed)?;
    let spent_or_reserved_epsilon = eps(held)?;
    let mut by_study: BTreeMap<Uuid, Vec<&privacy_spend::Model>> = BTreeMap::new();
    for r in &rows {
        by_study.entry(r.study_id).or_default().push(r);
    }
    let mut studies = Vec::new();
    for (study_id, spends) in by_study {
        let title = study::Entity::find_by_id(study_id)
            .one(db)
            .await?
            .map_or_else(|| "(deleted study)".to_string(), |s| s.title);
        studies.push(StudySpendingDto {
            study_id,
            title,
            epsilon: eps(spends
                .iter()
                .copied()
                .filter(|r| r.state == COMMITTED)
                .collect())?,
            rounds_committed: spends
                .iter()
                .filter(|r| r.state == COMMITTED && r.purpose == ROUND)
                .count() as u32,
            rounds_reserved: spends.iter().filter(|r| r.state == RESERVED).count() as u32,
            previews: spends
                .iter()
                .filter(|r| r.state == COMMITTED && r.purpose == PREVIEW)
                .count() as u32,
        });
    }
    let mut spends = Vec::with_capacity(rows.len());
    for r in &rows {
        spends.push(PrivacySpendDto {
            study_id: r.study_id,
            run_id: r.run_id,
            purpose: r.purpose.clone(),
            round: r.round,
            state: r.state.clone(),
            patients: r.patients,
            sampling_rate: r.sampling_rate,
            noise_multiplier: r.noise_multiplier,
            steps: r.steps,
            epsilon_round: epsilon(&rdp_of(r)?, r.delta)?,
            note: r.note.clone(),
            updated_at: r.updated_at,
        });
    }
    Ok(DatasetPrivacyDto {
        site_id: site.id,
        site_name: site.name.clone(),
        remaining_epsilon: budget
            .as_ref()
            .map(|b| (b.epsilon - spent_or_reserved_epsilon).max(0.0)),
        budget: budget.map(|b| PrivacyBudgetDto {
            epsilon: b.epsilon,
            delta: b.delta,
            set_by: b.set_by,
            set_at: b.set_at,
        }),
        delta,
        spent_epsilon,
        spent_or_reserved_epsilon,
        studies,
        spends,
    })
}

/// The most a lifetime budget may be: beyond it a number no longer protects anyone.
pub const MAX_BUDGET_EPSILON: f64 = 100.0;

/// Sets the dataset's lifetime budget (the site's custodian, signed in, or an administrator);
/// audited. A budget below what was spent already stops every further private round there.
#[tracing::instrument(skip(ctx, input), fields(actor = %actor.audit_name()))]
pub async fn set_budget(
    ctx: &AppContext,
    actor: &Actor,
    site_id: Uuid,
    input: SetPrivacyBudget,
) -> AppResult<DatasetPrivacyDto> {
    let site = crate::services::directory::get_site(&ctx.db, site_id).await?;
    let allowed = (actor.has(Role::Administrator)
        || (actor.has(Role::Custodian) && site.custodians.contains(&actor.user_id)))
        && actor.token_id.is_none()
        && actor.site_id.is_none();
    if !allowed {
        return Err(AppError::Forbidden(format!(
            "Only a custodian of {:?} or an administrator, signed in, may set its privacy budget.",
            site.name
        )));
    }
    let mut problems = Vec::new();
    if !(input.epsilon.is_finite() && input.epsilon > 0.0 && input.epsilon <= MAX_BUDGET_EPSILON) {
        problems.push(format!(
            "epsilon must be a number above 0 and at most {MAX_BUDGET_EPSILON}; it is {}",
            input.epsilon
        ));
    }
    if !(input.delta.is_finite() && input.delta > 0.0 && input.delta <= MAX_DELTA) {
        problems.push(format!(
            "delta must be above 0 and at most {MAX_DELTA} (the chance the guarantee fails outright; 1e-5 is usual); it is {}",
            input.delta
        ));
    }
    if !problems.is_empty() {
        return Err(AppError::Unprocessable(problems));
    }
    let w = ctx.begin_write().await?;
    privacy_budget::Entity::delete_by_id(site_id)
        .exec(&*w)
        .await?;
    privacy_budget::ActiveModel {
        site_id: Set(site_id),
        epsilon: Set(input.epsilon),
        delta: Set(input.delta),
        set_by: Set(actor.user_id),
        set_at: Set(Utc::now()),
    }
    .insert(&*w)
    .await?;
    let dto = ledger(&*w, &site).await?;
    audit::append(
        &*w,
        actor,
        "privacy.budget_set",
        "site",
        site_id,
        &serde_json::json!({"epsilon": input.epsilon, "delta": input.delta, "spent_or_reserved_epsilon": dto.spent_or_reserved_epsilon}),
    )
    .await?;
    w.commit().await?;
    Ok(dto)
}
