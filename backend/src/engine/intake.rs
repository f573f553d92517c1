//! Results intake: every message the sites send, from the results queue into the database —
//! heartbeats, and results counted once per job id.

use super::rounds::RoundState;
use super::*;
use consilium_core::signing::{self, SignedMessage};
use consilium_worker::broker::{Delivery, Subscription};

/// A message seen before.
enum Replay {
    /// The same message delivered again: no effect.
    Again,
    /// A replay: refused with this reason.
    Rejected(String),
}

/// The site a message speaks for.
fn site_of(msg: &WorkerMessage) -> Uuid {
    match msg {
        WorkerMessage::Heartbeat(h) => h.site_id,
        WorkerMessage::Result(r) => r.site_id,
        WorkerMessage::JobRejected(j) => j.site_id,
    }
}

/// Why a message from the sites could not be recorded.
#[derive(Debug)]
pub enum IntakeError {
    /// It might be recorded on another try (the database or the model store was unavailable):
    /// tried again, with a growing pause.
    Transient(AppError),
    /// It never will be (unreadable, names nothing this server knows, refers to a corrupt
    /// artifact): it goes to the dead-letter queue with this reason, audited, and the next
    /// message is read.
    Permanent(String),
    /// It does not prove that its site sent it (unsigned, signed with a key the site has not
    /// registered or has revoked, a signature that does not verify, a replay): dead-lettered
    /// and audited as `message.rejected` for the site it claims; never counted.
    Rejected { site: Option<Uuid>, reason: String },
}

impl From<AppError> for IntakeError {
    /// Database and store outages are transient; everything else about a message is its own
    /// fault and permanent.
    fn from(e: AppError) -> Self {
        match &e {
            AppError::Unexpected(inner) => {
                let outage = inner.chain().any(|c| {
                    c.downcast_ref::<sea_orm::DbErr>().is_some()
                        || matches!(
                            c.downcast_ref::<consilium_worker::artifacts::ArtifactError>(),
                            Some(
                                consilium_worker::artifacts::ArtifactError::Store(_)
                                    | consilium_worker::artifacts::ArtifactError::Config(..)
                            )
                        )
                });
                if outage {
                    IntakeError::Transient(e)
                } else {
                    IntakeError::Permanent(format!("it could not be recorded: {inner}"))
                }
            }
            other => IntakeError::Permanent(format!("it could not be recorded: {other}")),
        }
    }
}

/// Tries of a message that fails transiently before it is given back to the broker, and
/// the longest pause between two.
const TRIES: u32 = 6;
const MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

impl Engine {
    /// Reads the results queue for as long as the server runs: each message is recorded, or
    /// tried again when the failure may pass (a bounded backoff), or dead-lettered with its
    /// reason when it never can be; either way the next message flows.
    #[tracing::instrument(skip_all)]
    pub(super) async fn consume(&self, ctx: &AppContext, mut results: Subscription) {
        while let Some(delivery) = results.recv().await {
            let mut pause = std::time::Duration::from_millis(250);
            let mut tries = 0;
            let outcome = loop {
                tries += 1;
                match self.intake(ctx, &delivery).await {
                    Err(IntakeError::Transient(e)) if tries < TRIES => {
                        tracing::warn!(error = ?e, tries, "a result could not be recorded yet; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_PAUSE);
                    }
                    other => break other,
                }
            };
            match outcome {
                Ok(()) => delivery.ack().await,
                Err(IntakeError::Permanent(reason)) => {
                    self.dead_letter(ctx, delivery, &reason, None).await
                }
                Err(IntakeError::Rejected { site, reason }) => {
                    self.dead_letter(ctx, delivery, &reason, Some(site)).await
                }
                // Still failing (an outage): given back to the broker once; failing again
                // after a redelivery, it is dead-lettered (kept there for an operator) so that
                // the messages behind it flow.
                Err(IntakeError::Transient(e)) if delivery.redelivered => {
                    let reason = format!(
                        "it could not be recorded after {TRIES} tries, twice: {}",
                        stop_reason(&e)
                    );
                    tracing::error!(error = ?e, "a result keeps failing");
                    self.dead_letter(ctx, delivery, &reason, None).await
                }
                Err(IntakeError::Transient(e)) => {
                    tracing::error!(error = ?e, "a result could not be recorded; the broker will deliver it again");
                    delivery.requeue().await;
                }
            }
        }
    }

    /// One message: its signature checked against the keys its site registered, then
    /// recorded.
    async fn intake(&self, ctx: &AppContext, delivery: &Delivery) -> Result<(), IntakeError> {
        let payload = &delivery.payload;
        let signed = match serde_json::from_slice::<SignedMessage>(payload) {
            Ok(s) => s,
            Err(e) => {
                return Err(match serde_json::from_slice::<WorkerMessage>(payload) {
                    Ok(m) => IntakeError::Rejected {
                        site: Some(site_of(&m)),
                        reason: "it is not signed: site workers sign every message (protocol 3); update the worker and register its key".into(),
                    },
                    Err(_) => IntakeError::Permanent(format!(
                        "it is not a message from a site worker: {e}"
                    )),
                });
            }
        };
        let claimed = signing::unverified(&signed).map_err(|e| {
            IntakeError::Permanent(format!("it is not a message from a site worker: {e}"))
        })?;
        let site = site_of(&claimed);
        let rejected = |reason: String| IntakeError::Rejected {
            site: Some(site),
            reason,
        };
        // Which broker user sent it, as RabbitMQ itself checked: the site's own.
        if self.broker.authenticates_publishers() && ctx.settings.engine.broker_site_users {
            let expected = consilium_worker::broker::site_user(site);
            if delivery.publisher.as_deref() != Some(expected.as_str()) {
                return Err(rejected(format!(
                    "it claims to come from site {site}, but was published {}; a site's messages must come through its own broker user {expected} (`consilium admin broker-user`)",
                    match &delivery.publisher {
                        Some(u) => format!("by broker user {u}"),
                        None => "without naming its broker user".to_string(),
                    }
                )));
            }
        }
        let key = crate::services::site_keys::key_in_force(&ctx.db, site, &signed.key_id)
            .await?
            .ok_or_else(|| {
                rejected(format!(
                    "it claims to come from site {site}, signed with key {}, which is not one of that site's registered keys in force",
                    signed.key_id
                ))
            })?;
        let msg = signing::verify(&key, &signed)
            .map_err(|e| rejected(format!("it claims to come from site {site}: {e}")))?;
        if let Some(reason) = self.replayed(ctx, &msg, &signed).await? {
            return match reason {
                Replay::Again => Ok(()),
                Replay::Rejected(reason) => Err(rejected(reason)),
            };
        }
        if let WorkerMessage::Result(r) = &msg
            && let Some(hash) = match &r.outcome {
                Outcome::Trained { update_hash, .. } => Some(update_hash),
                Outcome::Previewed { set, .. } => Some(set),
                _ => None,
            }
            && !crate::services::site_artifacts::output_of(ctx, site, r.job_id, hash).await?
        {
            return Err(rejected(format!(
                "its output {hash} for job {} is not one site {site} handed over to this server for that job",
                r.job_id
            )));
        }
        match self.receive(ctx, msg, &signed).await? {
            true => Ok(()),
            false => Err(IntakeError::Permanent(
                "it names a run or site this server does not know".into(),
            )),
        }
    }

    /// Whether a verified message was seen before. The very same message delivered again (the
    /// broker delivers at least once) has no effect, and neither has a second answer to a job
    /// already answered: signed with the site's own key, it can only be the site answering a
    /// redelivered job again (after a restart), and the first answer counts. A heartbeat older
    /// than the last one recorded is a replay, refused.
    async fn replayed(
        &self,
        ctx: &AppContext,
        msg: &WorkerMessage,
        signed: &SignedMessage,
    ) -> AppResult<Option<Replay>> {
        match msg {
            WorkerMessage::Heartbeat(h) => {
                if h.at > Utc::now() + chrono::Duration::minutes(5) {
                    return Ok(Some(Replay::Rejected(format!(
                        "a heartbeat dated {}, in the future (check the site's clock)",
                        h.at
                    ))));
                }
                let last = heartbeat::Entity::find_by_id(h.site_id)
                    .one(&ctx.db)
                    .await?;
                Ok(match last {
                    Some(last) if last.at == h.at => Some(Replay::Again),
                    Some(last) if last.at > h.at => Some(Replay::Rejected(format!(
                        "a replayed heartbeat: dated {}, before the last one recorded ({})",
                        h.at, last.at
                    ))),
                    _ => None,
                })
            }
            // Reports of refused jobs are folded by reason when audited.
            WorkerMessage::JobRejected(_) => Ok(None),
            WorkerMessage::Result(r) => {
                let earlier = update::Entity::find()
                    .filter(update::Column::JobId.eq(r.job_id))
                    .one(&ctx.db)
                    .await?;
                Ok(match earlier {
                    None => None,
                    Some(u) => {
                        if u.signature.as_deref() != Some(signed.signature.as_str()) {
                            tracing::info!(job = %r.job_id, "a second answer to an answered job; the first counts");
                        }
                        Some(Replay::Again)
                    }
                })
            }
        }
    }

    /// Puts a message on the dead-letter queue with its reason, and audits it (repeats of one
    /// reason folded, so a flood cannot bloat the chain).
    /// `rejected` names the site a message claimed to come from, when it was refused for not
    /// proving it (audited as `message.rejected`, for the site's custodian to see).
    async fn dead_letter(
        &self,
        ctx: &AppContext,
        delivery: Delivery,
        reason: &str,
        rejected: Option<Option<Uuid>>,
    ) {
        tracing::error!(
            reason,
            "a message on the results queue goes to the dead-letter queue"
        );
        let digest = consilium_core::hash::sha256_hex(&delivery.payload);
        match self.broker.dead_letter(&delivery.payload, reason).await {
            Ok(()) => delivery.ack().await,
            // The reason could not go with it: rejected, the broker dead-letters it plainly.
            Err(e) => {
                tracing::error!(error = %e, "the dead-letter queue refused the message with its reason");
                delivery.dead_letter().await
            }
        }
        if let Some(folded) = ctx.audit_fold.admit(&format!("dead_letter {reason}")) {
            let written = async {
                let w = ctx.begin_write().await?;
                // A rejected message is filed under the site it claimed to speak for, so that
                // the site's custodian finds what was sent in its name.
                let (action, object_type, object) = match rejected {
                    Some(Some(site)) => ("message.rejected", "site", site.to_string()),
                    Some(None) => ("message.rejected", "message", digest.clone()),
                    None => ("message.dead_lettered", "message", digest.clone()),
                };
                audit::append(
                    &*w,
                    &Actor::system(),
                    action,
                    object_type,
                    &object,
                    &serde_json::json!({"reason": reason, "message": digest, "folded_before": folded}),
                )
                .await?;
                w.commit().await
            }
            .await;
            if let Err(e) = written {
                tracing::error!(error = ?e, "could not audit a dead-lettered message");
            }
        }
    }

    /// Records a message; `Ok(false)` when it names a run or site that does not exist here
    /// (it can never be recorded: it goes to the dead-letter queue).
    pub(super) async fn receive(
        &self,
        ctx: &AppContext,
        msg: WorkerMessage,
        signed: &SignedMessage,
    ) -> AppResult<bool> {
        let site = site_of(&msg);
        if crate::entities::site::Entity::find_by_id(site)
            .one(&ctx.db)
            .await?
            .is_none()
        {
            return Ok(false);
        }
        match msg {
            WorkerMessage::Heartbeat(h) => {
                let m = heartbeat::ActiveModel {
                    site_id: Set(h.site_id),
                    state: Set(format!("{:?}", h.state).to_lowercase()),
                    data_summary: Set(h.data_summary.chars().take(500).collect()),
                    patients: Set(h.patients.and_then(|n| i64::try_from(n).ok())),
                    version: Set(h.version.chars().take(50).collect()),
                    at: Set(h.at),
                };
                // Through the one writer, like every other write: SQLite refuses a second
                // writer that would deadlock with an open transaction.
                let w = ctx.begin_write().await?;
                heartbeat::Entity::delete_by_id(h.site_id).exec(&*w).await?;
                heartbeat::Entity::insert(m)
                    .exec_without_returning(&*w)
                    .await?;
                w.commit().await?;
                Ok(true)
            }
            WorkerMessage::JobRejected(j) => {
                self.audit_rejected_job(ctx, j).await?;
                Ok(true)
            }
            WorkerMessage::Result(r) => {
                if crate::services::previews::is_preview(ctx, r.run_id).await? {
                    crate::services::previews::record(ctx, &self.artifacts, r).await?;
                    return Ok(true);
                }
                if run::Entity::find_by_id(r.run_id)
                    .one(&ctx.db)
                    .await?
                    .is_none()
                {
                    return Ok(false);
                }
                self.record(ctx, r, signed).await?;
                Ok(true)
            }
        }
    }

    /// A job the site's worker refused for its signature (forged, altered, or from another
    /// server): audited as `job.rejected_by_site` for the site's custodian and the server's
    /// administrator (repeats of one reason folded, so that a flood cannot bloat the chain).
    async fn audit_rejected_job(
        &self,
        ctx: &AppContext,
        j: consilium_core::protocol::RejectedJob,
    ) -> AppResult<()> {
        tracing::error!(site = %j.site_id, reason = %j.reason, "a site refused a message on its job queue");
        let Some(folded) = ctx
            .audit_fold
            .admit(&format!("job.rejected_by_site {} {}", j.site_id, j.reason))
        else {
            return Ok(());
        };
        let name = site::Entity::find_by_id(j.site_id)
            .one(&ctx.db)
            .await?
            .map(|s| s.name)
            .unwrap_or_else(|| "(unknown)".to_string());
        let w = ctx.begin_write().await?;
        audit::append(
            &*w,
            &Actor::site_worker(j.site_id, &name),
            "job.rejected_by_site",
            "site",
            j.site_id,
            &serde_json::json!({"reason": j.reason, "message": j.message_sha256, "at": j.at, "folded_before": folded}),
        )
        .await?;
        w.commit().await
    }

    /// Records a result once per job id; a result for a round that moved on is kept as late
    /// and audited, never counted.
    #[tracing::instrument(skip_all, fields(run = %r.run_id, round = r.round, site = %r.site_id, job = %r.job_id))]
    pub(super) async fn record(
        &self,
        ctx: &AppContext,
        r: JobResult,
        signed: &SignedMessage,
    ) -> AppResult<()> {
        let w = ctx.begin_write().await?;
        if update::Entity::find()
            .filter(update::Column::JobId.eq(r.job_id))
            .one(&*w)
            .await?
            .is_some()
        {
            tracing::info!(job = %r.job_id, "duplicate result ignored");
            return Ok(());
        }
        let rnd = round::Entity::find()
            .filter(round::Column::RunId.eq(r.run_id))
            .filter(round::Column::Number.eq(r.round as i32))
            .one(&*w)
            .await?;
        // A worker of protocol 2 names its job's kind; an older one is judged by the outcome
        // and the round.
        let kind = match (&r.outcome, r.kind) {
            (_, Some(kind)) => kind,
            (Outcome::Evaluated { .. }, None) => JobKind::Evaluate,
            _ if rnd
                .as_ref()
                .is_some_and(|x| x.state == RoundState::Aggregating.as_str()) =>
            {
                JobKind::Evaluate
            }
            _ => JobKind::Train,
        };
        let expected = match rnd.as_ref() {
            None => false,
            Some(x) => {
                // An unreadable list of the round's sites is an error, not "no sites".
                let sites: Vec<Uuid> = from(&x.sites)?;
                let phase = match kind {
                    JobKind::Train => x.state == RoundState::Collecting.as_str(),
                    JobKind::Evaluate => x.state == RoundState::Aggregating.as_str(),
                    // Preview results are routed to their request before they get here.
                    JobKind::Preview => false,
                };
                phase
                    && sites.contains(&r.site_id)
                    && job_id(r.run_id, x.number, r.site_id, kind) == r.job_id
                    && Utc::now() <= x.deadline
            }
        };
        let (privacy, privacy_problem) = if expected && kind == JobKind::Train {
            privacy_check(&*w, &r).await?
        } else {
            (None, None)
        };
        let (mut outcome, mut hash, samples, eval, before, after, duration, mut reason, skipped) =
            match &r.outcome {
                Outcome::Trained {
                    update_hash,
                    samples,
                    evaluation,
                    train_loss_before,
                    train_loss_after,
                    duration_ms,
                    skipped,
                    privacy: _,
                } => (
                    "trained",
                    Some(update_hash.clone()),
                    Some(*samples as i64),
                    Some(json(evaluation)?),
                    Some(*train_loss_before),
                    Some(*train_loss_after),
                    Some(*duration_ms as i64),
                    None,
                    Some(json(skipped)?),
                ),
                Outcome::Evaluated {
                    evaluation,
                    duration_ms,
                } => (
                    "evaluated",
                    None,
                    None,
                    Some(json(evaluation)?),
                    None,
                    None,
                    Some(*duration_ms as i64),
                    None,
                    None,
                ),
                Outcome::Previewed { .. } => (
                    "failed",
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some("a preview set arrived for a training run".to_string()),
                    None,
                ),
                Outcome::Refused { reason } | Outcome::Failed { reason } => (
                    if matches!(r.outcome, Outcome::Refused { .. }) {
                        "refused"
                    } else {
                        "failed"
                    },
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some(reason.clone()),
                    None,
                ),
            };
        if expected && kind == JobKind::Train {
            settle_privacy(
                &*w,
                &r,
                outcome,
                reason.as_deref(),
                privacy_problem.as_deref(),
            )
            .await?;
        }
        if let Some(problem) = &privacy_problem {
            // Not counted: the update leaves the round, and the reason is the site's to read.
            outcome = "failed";
            hash = None;
            reason = Some(format!("not counted: {problem}"));
        }
        let m = update::ActiveModel {
            id: Set(Uuid::new_v4()),
            run_id: Set(r.run_id),
            round: Set(r.round as i32),
            site_id: Set(r.site_id),
            job_id: Set(r.job_id),
            kind: Set(format!("{kind:?}").to_lowercase()),
            outcome: Set(outcome.to_string()),
            update_hash: Set(hash),
            samples: Set(samples),
            evaluation: Set(eval),
            train_loss_before: Set(before.filter(|v| v.is_finite())),
            train_loss_after: Set(after.filter(|v| v.is_finite())),
            duration_ms: Set(duration),
            reason: Set(reason.map(|s| s.chars().take(2000).collect())),
            skipped: Set(skipped),
            late: Set(!expected),
            received_at: Set(Utc::now()),
            signed_message: Set(Some(signed.message.clone())),
            key_id: Set(Some(signed.key_id.clone())),
            signature: Set(Some(signed.signature.clone())),
            privacy: Set(privacy),
        }
        .insert(&*w)
        .await?;
        let site_name = site::Entity::find_by_id(r.site_id)
            .one(&*w)
            .await?
            .map(|s| s.name)
            .unwrap_or_else(|| "(unknown)".to_string());
        let site_actor = Actor::site_worker(r.site_id, &site_name);
        // A refusal is always recorded as one, even for a job the server did not expect
        // (an altered or forged job): the custodian and the auditors need to see it.
        let action = match (expected, outcome) {
            (_, "refused") => "job.refused",
            (_, "failed") => "job.failed",
            (false, _) => "update.late",
            (true, "evaluated") => "model.evaluated_at_site",
            _ => "update.received",
        };
        audit::append(
            &*w,
            &site_actor,
            action,
            "update",
            m.id,
            &serde_json::json!({
                "run_id": r.run_id, "round": r.round, "site_id": r.site_id, "job_id": r.job_id,
                "outcome": outcome, "update_hash": m.update_hash, "reason": m.reason, "late": !expected,
            }),
        )
        .await?;
        if let Some(problem) = privacy_problem {
            tracing::warn!(site = %r.site_id, run = %r.run_id, problem, "privacy alarm");
            audit::append(
                &*w,
                &site_actor,
                "privacy.alarm",
                "update",
                m.id,
                &serde_json::json!({"run_id": r.run_id, "round": r.round, "site_id": r.site_id, "job_id": r.job_id, "problem": problem}),
            )
            .await?;
        }
        w.commit().await?;
        self.notify.notify_waiters();
        Ok(())
    }
}

/// Settles the round's reservation in the site's dataset ledger by what the site answered: a
/// trained update commits the cost its numbers give (the larger of it and the reservation,
/// counted or not: the site spent it either way), a refusal releases it, a failure keeps it.
async fn settle_privacy<C: sea_orm::ConnectionTrait>(
    db: &C,
    r: &JobResult,
    outcome: &str,
    reason: Option<&str>,
    problem: Option<&str>,
) -> AppResult<()> {
    use crate::services::privacy::{Settlement, settle};
    let how = match (&r.outcome, outcome) {
        (Outcome::Trained { privacy, .. }, _) => Settlement::Spent {
            reported: privacy.as_ref().map(|p| {
                consilium_core::privacy::RdpCost::sampled_gaussian(
                    p.sampling_rate,
                    p.noise_multiplier,
                    p.steps,
                    &p.rdp.orders,
                )
                .unwrap_or_else(|_| p.rdp.clone())
            }),
            note: problem.map(|p| {
                format!("the update was not counted ({p}); its cost is, since the site trained")
            }),
        },
        (_, "refused") => Settlement::Released(format!(
            "the site refused the job before training: {}",
            reason.unwrap_or("no reason given")
        )),
        _ => Settlement::Assumed(format!(
            "the job failed at the site ({}); counted as spent, since the site may have trained",
            reason.unwrap_or("no reason given")
        )),
    };
    settle(db, r.run_id, r.round as i32, r.site_id, how).await
}

/// A DP-SGD plan's update counts only with a privacy cost that its own numbers reproduce (the
/// Rényi values of its sampling rate, σ and steps, at the plan's δ and, where the plan fixes it,
/// its σ) and that keeps the run at this site within the approved ε, composed by the server
/// from the site's counted updates: the server's own account, kept beside the site's ledger.
/// Returns the cost to store and, when the update must not count, why.
async fn privacy_check<C: sea_orm::ConnectionTrait>(
    db: &C,
    r: &JobResult,
) -> AppResult<(Option<serde_json::Value>, Option<String>)> {
    let Outcome::Trained { privacy, .. } = &r.outcome else {
        return Ok((None, None));
    };
    let stored = privacy.as_ref().map(json).transpose()?;
    let Some(run) = run::Entity::find_by_id(r.run_id).one(db).await? else {
        return Ok((stored, None));
    };
    let Some(p) = plan::Entity::find()
        .filter(plan::Column::StudyId.eq(run.study_id))
        .filter(plan::Column::Hash.eq(run.plan_hash.as_str()))
        .one(db)
        .await?
    else {
        return Ok((stored, None));
    };
    let manifest = crate::services::studies::plan_dto(&p)?.manifest;
    let Some(dp) = manifest.parse().ok().and_then(|plan| plan.dp_sgd) else {
        return Ok((stored, None));
    };
    let Some(spent) = privacy else {
        return Ok((
            None,
            Some("the plan trains with DP-SGD, and the site reported no privacy cost".into()),
        ));
    };
    let problem = if let Some(p) = crate::services::privacy::unreproducible(spent) {
        Some(p)
    } else if spent.delta != dp.delta {
        Some(format!(
            "the site stated its cost at δ = {}, the plan's δ is {}",
            spent.delta, dp.delta
        ))
    } else if let Some(p) =
        crate::services::privacy::reservation(db, r.run_id, r.round as i32, r.site_id)
            .await?
            .and_then(|held| crate::services::privacy::disagreement(&held, spent))
    {
        Some(p)
    } else if dp
        .noise_multiplier
        .is_some_and(|s| s != spent.noise_multiplier)
    {
        Some(format!(
            "the site trained with σ = {}, not the plan's σ = {}",
            spent.noise_multiplier,
            dp.noise_multiplier.unwrap_or_default()
        ))
    } else {
        let counted = update::Entity::find()
            .filter(update::Column::RunId.eq(r.run_id))
            .filter(update::Column::SiteId.eq(r.site_id))
            .filter(update::Column::Outcome.eq("trained"))
            .filter(update::Column::Late.eq(false))
            .all(db)
            .await?;
        let mut total = spent.rdp.clone();
        for u in counted {
            let Some(v) = u.privacy else { continue };
            let earlier: consilium_core::protocol::PrivacySpent = from(&v)?;
            total = total.plus(&earlier.rdp).map_err(AppError::unexpected)?;
        }
        let epsilon = total
            .epsilon(dp.delta)
            .map_err(AppError::unexpected)?
            .epsilon;
        (epsilon > dp.epsilon * (1.0 + 1e-9)).then(|| {
            format!(
                "it would bring this run's privacy spending at this site to ε = {epsilon:.3}, above the approved ε = {}",
                dp.epsilon
            )
        })
    };
    Ok((stored, problem))
}
