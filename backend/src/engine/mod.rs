//! The orchestrator: runs are sequences of rounds, each a persisted state machine
//! (collecting → aggregating → evaluated → closed | failed) with a deadline and a quorum,
//! so that a restart resumes it and a missing site does not stall it. Before every round the
//! governance conditions are checked again. Results arrive through the broker and are
//! counted once per job id.

pub mod weights;

use chrono::{Duration, Utc};
use consilium_core::aggregate::{ServerState, Strategy, Update, aggregate};
use consilium_core::api::{Contribution, ExcludedSite, ModelEvaluation, SiteEvaluation};
use consilium_core::manifest::TrainingPlanManifest;
use consilium_core::plan::{Plan, TargetMetric};
use consilium_core::protocol::{Job, JobKind, JobResult, Metrics, Outcome, WorkerMessage};
use consilium_worker::artifacts::ArtifactStore;
use consilium_worker::broker::SharedBroker;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::audit;
use crate::context::AppContext;
use crate::domain::Actor;
use crate::entities::{heartbeat, model_version, plan, round, run, site, update};
use crate::error::{AppError, AppResult};
use crate::services::{directory, runs as run_service, studies};

#[derive(Clone)]
pub struct Engine {
    /// The runtime the engine's tasks run on (not the web server's per-thread runtimes).
    runtime: tokio::runtime::Handle,
    pub broker: SharedBroker,
    pub artifacts: ArtifactStore,
    notify: Arc<Notify>,
    round_timeout: Duration,
}

fn job_id(run: Uuid, round: i32, site: Uuid, kind: JobKind) -> Uuid {
    Uuid::new_v5(&run, format!("{round}/{site}/{kind:?}").as_bytes())
}

/// Whether the run is still running (a researcher may have stopped it meanwhile).
async fn still_running(ctx: &AppContext, id: Uuid) -> AppResult<bool> {
    Ok(run::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .is_some_and(|x| x.status == "running"))
}

fn json<T: serde::Serialize>(v: &T) -> AppResult<serde_json::Value> {
    Ok(serde_json::to_value(v)?)
}

fn from<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> AppResult<T> {
    serde_json::from_value(v.clone()).map_err(AppError::unexpected)
}

impl Engine {
    pub fn new(broker: SharedBroker, artifacts: ArtifactStore, round_timeout_seconds: u64) -> Self {
        Engine {
            runtime: tokio::runtime::Handle::current(),
            broker,
            artifacts,
            notify: Arc::new(Notify::new()),
            round_timeout: Duration::seconds(round_timeout_seconds as i64),
        }
    }

    /// Starts consuming results and resumes every run that was running.
    pub async fn start(&self, ctx: &AppContext) -> AppResult<()> {
        let mut results = self.broker.results().await.map_err(AppError::unexpected)?;
        let (engine, c) = (self.clone(), ctx.clone());
        tokio::spawn(async move {
            while let Some(delivery) = results.recv().await {
                match serde_json::from_slice::<WorkerMessage>(&delivery.payload) {
                    Err(e) => {
                        tracing::error!(error = %e, "a message on the results queue can't be read; it goes to the dead-letter queue");
                        delivery.dead_letter().await;
                    }
                    Ok(msg) => match engine.receive(&c, msg).await {
                        Ok(true) => delivery.ack().await,
                        Ok(false) => {
                            tracing::error!(
                                "a result names a run or site this server does not know; it goes to the dead-letter queue"
                            );
                            delivery.dead_letter().await;
                        }
                        Err(e) => {
                            tracing::error!(error = ?e, "a result could not be recorded; it will be delivered again");
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            delivery.requeue().await;
                        }
                    },
                }
            }
        });
        let running = run::Entity::find()
            .filter(run::Column::Status.eq("running"))
            .all(&ctx.db)
            .await?;
        for r in running {
            tracing::info!(run = %r.id, "resuming run");
            self.spawn(ctx, r.id);
        }
        Ok(())
    }

    /// Drives a run (already marked running) in the background.
    pub fn spawn(&self, ctx: &AppContext, run_id: Uuid) {
        let (engine, ctx) = (self.clone(), ctx.clone());
        self.runtime.spawn(async move {
            if let Err(e) = engine.drive(&ctx, run_id).await {
                tracing::error!(run = %run_id, error = ?e, "the run stopped on an error");
                let _ = engine
                    .finish(
                        &ctx,
                        run_id,
                        "failed",
                        &format!("the server hit an error: {e}"),
                    )
                    .await;
            }
        });
    }

    /// Records a message; `Ok(false)` when it names a run or site that does not exist here
    /// (it can never be recorded: it goes to the dead-letter queue).
    async fn receive(&self, ctx: &AppContext, msg: WorkerMessage) -> AppResult<bool> {
        let site = match &msg {
            WorkerMessage::Heartbeat(h) => h.site_id,
            WorkerMessage::Result(r) => r.site_id,
        };
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
                self.record(ctx, r).await?;
                Ok(true)
            }
        }
    }

    /// Records a result once per job id; a result for a round that moved on is kept as late
    /// and audited, never counted.
    async fn record(&self, ctx: &AppContext, r: JobResult) -> AppResult<()> {
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
        let kind = match &r.outcome {
            Outcome::Evaluated { .. } => JobKind::Evaluate,
            _ if rnd.as_ref().is_some_and(|x| x.state == "aggregating") => JobKind::Evaluate,
            _ => JobKind::Train,
        };
        let expected = rnd.as_ref().is_some_and(|x| {
            let sites: Vec<Uuid> = from(&x.sites).unwrap_or_default();
            let phase = match kind {
                JobKind::Train => x.state == "collecting",
                JobKind::Evaluate => x.state == "aggregating",
                // Preview results are routed to their request before they get here.
                JobKind::Preview => false,
            };
            phase
                && sites.contains(&r.site_id)
                && job_id(r.run_id, x.number, r.site_id, kind) == r.job_id
                && Utc::now() <= x.deadline
        });
        let (outcome, hash, samples, eval, before, after, duration, reason, skipped) =
            match &r.outcome {
                Outcome::Trained {
                    update_hash,
                    samples,
                    evaluation,
                    train_loss_before,
                    train_loss_after,
                    duration_ms,
                    skipped,
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
                Outcome::Refused { reason } => (
                    "refused",
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some(reason.clone()),
                    None,
                ),
                Outcome::Failed { reason } => (
                    "failed",
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
        w.commit().await?;
        self.notify.notify_waiters();
        Ok(())
    }

    async fn plan_of(
        &self,
        ctx: &AppContext,
        r: &run::Model,
    ) -> AppResult<(TrainingPlanManifest, Vec<(String, String)>)> {
        let p = plan::Entity::find()
            .filter(plan::Column::StudyId.eq(r.study_id))
            .filter(plan::Column::Hash.eq(r.plan_hash.as_str()))
            .one(&ctx.db)
            .await?
            .ok_or_else(|| {
                AppError::unexpected(anyhow::anyhow!("the run's plan {} is gone", r.plan_hash))
            })?;
        let dto = studies::plan_dto(&p)?;
        Ok((
            dto.manifest,
            dto.files.into_iter().map(|f| (f.name, f.sha256)).collect(),
        ))
    }

    async fn drive(&self, ctx: &AppContext, run_id: Uuid) -> AppResult<()> {
        // The round this process opened (and sent jobs for); any other collecting round was
        // found at start, and its unanswered jobs are sent again.
        let mut opened: Option<i32> = None;
        loop {
            let Some(r) = run::Entity::find_by_id(run_id).one(&ctx.db).await? else {
                return Ok(());
            };
            if r.status != "running" {
                return Ok(());
            }
            let (manifest, files) = self.plan_of(ctx, &r).await?;
            let latest = round::Entity::find()
                .filter(round::Column::RunId.eq(run_id))
                .order_by_desc(round::Column::Number)
                .one(&ctx.db)
                .await?;
            match latest {
                None => {
                    self.open_round(ctx, &r, &manifest, &files, 1, None).await?;
                    opened = Some(1);
                }
                Some(x) => match x.state.as_str() {
                    "collecting" => {
                        let resend = opened != Some(x.number);
                        self.collect(ctx, &r, &manifest, &files, x, resend).await?
                    }
                    "aggregating" => self.aggregate(ctx, &r, &manifest, &files, x).await?,
                    "evaluated" => self.close(ctx, &r, &manifest, x).await?,
                    "closed" => {
                        let global = match x.model_version_id {
                            Some(id) => model_version::Entity::find_by_id(id)
                                .one(&ctx.db)
                                .await?
                                .map(|m| m.hash),
                            None => None,
                        };
                        self.open_round(ctx, &r, &manifest, &files, x.number + 1, global)
                            .await?;
                        opened = Some(x.number + 1);
                    }
                    _ => {
                        let why = x.failure.clone().unwrap_or_else(|| "a round failed".into());
                        return self.finish(ctx, run_id, "failed", &why).await;
                    }
                },
            }
        }
    }

    /// Ends a run with a status and the reason, audited.
    pub async fn finish(
        &self,
        ctx: &AppContext,
        run_id: Uuid,
        status: &str,
        reason: &str,
    ) -> AppResult<()> {
        let w = ctx.begin_write().await?;
        let Some(r) = run::Entity::find_by_id(run_id).one(&*w).await? else {
            return Ok(());
        };
        let mut a: run::ActiveModel = r.into();
        a.status = Set(status.to_string());
        a.stop_reason = Set(Some(reason.to_string()));
        let r = a.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            &format!("run.{status}"),
            "run",
            run_id,
            &run_service::run_dto(&r)?,
        )
        .await?;
        w.commit().await?;
        tracing::info!(run = %run_id, status, reason, "run ended");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        number: i32,
        sites: &[Uuid],
        kind: JobKind,
        model: &str,
        deadline: chrono::DateTime<Utc>,
    ) -> Vec<(Uuid, String)> {
        let mut failed = Vec::new();
        for site in sites {
            let job = Job {
                protocol: consilium_core::protocol::PROTOCOL_VERSION,
                job_id: job_id(r.id, number, *site, kind),
                kind,
                run_id: r.id,
                round: number as u32,
                study_id: r.study_id,
                site_id: *site,
                plan_hash: r.plan_hash.clone(),
                manifest: manifest.clone(),
                files: files.to_vec(),
                global_model: Some(model.to_string()),
                deadline,
                preview: None,
            };
            if let Err(e) = self.broker.publish_job(&job).await {
                failed.push((*site, format!("the job could not be sent: {e}")));
            }
        }
        failed
    }

    /// Re-checks governance, selects the sites, and sends round `number`'s training jobs.
    async fn open_round(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        number: i32,
        global: Option<String>,
    ) -> AppResult<()> {
        let check = run_service::check(&ctx.db, r.study_id, Some(&r.plan_hash)).await?;
        if !check.study_unmet.is_empty() {
            return self
                .finish(
                    ctx,
                    r.id,
                    "paused",
                    &format!(
                        "Round {number} can't start: {}",
                        check.study_unmet.join(" ")
                    ),
                )
                .await;
        }
        let total = check.eligible_sites.len() + check.site_unmet.len();
        let quorum = manifest
            .aggregation
            .min_sites
            .map_or(total, |q| q as usize)
            .clamp(1, total.max(1)) as i32;
        if (check.eligible_sites.len() as i32) < quorum {
            let reasons: Vec<String> = check
                .site_unmet
                .iter()
                .map(|(_, why)| why.clone())
                .collect();
            return self.finish(ctx, r.id, "paused", &format!(
                "Round {number} can't start: only {} of {total} sites may take part and the plan needs {quorum} ({}).",
                check.eligible_sites.len(), reasons.join(" ")
            )).await;
        }
        // Round 1 starts from the plan's seeded initial model, stored like any other.
        let global = match global {
            Some(g) => g,
            None => {
                let plan = manifest.parse().map_err(|p| {
                    AppError::unexpected(anyhow::anyhow!(
                        "the approved plan does not parse: {}",
                        p.join("; ")
                    ))
                })?;
                let bytes = tokio::task::spawn_blocking(move || {
                    consilium_worker::train::Net::new(&plan, &candle_core::Device::Cpu)
                        .and_then(|n| n.to_safetensors())
                })
                .await
                .map_err(AppError::unexpected)?
                .map_err(|e| {
                    AppError::unexpected(anyhow::anyhow!("the plan's model can't be built: {e}"))
                })?;
                self.artifacts
                    .put(bytes)
                    .await
                    .map_err(AppError::unexpected)?
            }
        };
        let deadline = Utc::now() + self.round_timeout;
        let excluded: Vec<ExcludedSite> = check
            .site_unmet
            .iter()
            .map(|(s, why)| ExcludedSite {
                site_id: *s,
                reason: why.clone(),
            })
            .collect();
        let w = ctx.begin_write().await?;
        let m = round::ActiveModel {
            id: Set(Uuid::new_v4()),
            run_id: Set(r.id),
            number: Set(number),
            state: Set("collecting".into()),
            deadline: Set(deadline),
            quorum: Set(quorum),
            sites: Set(json(&check.eligible_sites)?),
            excluded: Set(json(&excluded)?),
            global_in: Set(Some(global.clone())),
            model_version_id: Set(None),
            failure: Set(None),
            created_at: Set(Utc::now()),
            updated_at: Set(Utc::now()),
        }
        .insert(&*w)
        .await?;
        audit::append(&*w, &Actor::system(), "round.opened", "round", m.id, &serde_json::json!({
            "run_id": r.id, "round": number, "sites": check.eligible_sites, "excluded": excluded, "global_in": global, "deadline": deadline,
        }))
        .await?;
        w.commit().await?;
        self.publish(
            r,
            manifest,
            files,
            number,
            &check.eligible_sites,
            JobKind::Train,
            &global,
            deadline,
        )
        .await;
        Ok(())
    }

    async fn results_of(
        &self,
        ctx: &AppContext,
        run_id: Uuid,
        number: i32,
        kind: &str,
    ) -> AppResult<HashMap<Uuid, update::Model>> {
        let rows = update::Entity::find()
            .filter(update::Column::RunId.eq(run_id))
            .filter(update::Column::Round.eq(number))
            .filter(update::Column::Kind.eq(kind))
            .filter(update::Column::Late.eq(false))
            .all(&ctx.db)
            .await?;
        Ok(rows.into_iter().map(|u| (u.site_id, u)).collect())
    }

    /// Waits until every site answered or the deadline passed. With `resend` (a round found
    /// at start) the unanswered jobs are sent again first: the same job ids, so a site's
    /// second answer is not counted.
    #[allow(clippy::too_many_arguments)]
    async fn wait_for(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        x: &round::Model,
        kind: JobKind,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        model: &str,
        askable: &[Uuid],
        resend: bool,
    ) -> AppResult<HashMap<Uuid, update::Model>> {
        let sites: Vec<Uuid> = from(&x.sites)?;
        let label = if kind == JobKind::Train {
            "train"
        } else {
            "evaluate"
        };
        let mut resent = !resend;
        loop {
            let notified = self.notify.notified();
            let got = self.results_of(ctx, r.id, x.number, label).await?;
            let missing: Vec<Uuid> = sites
                .iter()
                .filter(|s| !got.contains_key(s))
                .copied()
                .collect();
            if missing.is_empty() || Utc::now() > x.deadline {
                return Ok(got);
            }
            if !resent {
                let wanted: Vec<Uuid> = missing
                    .iter()
                    .filter(|s| askable.contains(s))
                    .copied()
                    .collect();
                self.publish(
                    r, manifest, files, x.number, &wanted, kind, model, x.deadline,
                )
                .await;
                resent = true;
            }
            if !still_running(ctx, r.id).await? {
                return Ok(got);
            }
            let left = (x.deadline - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(std::time::Duration::from_secs(2));
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    async fn collect(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        x: round::Model,
        resend: bool,
    ) -> AppResult<()> {
        let global = x.global_in.clone().unwrap_or_default();
        let sites: Vec<Uuid> = from(&x.sites)?;
        let got = self
            .wait_for(
                ctx,
                r,
                &x,
                JobKind::Train,
                manifest,
                files,
                &global,
                &sites,
                resend,
            )
            .await?;
        if !still_running(ctx, r.id).await? {
            return Ok(());
        }
        let mut excluded: Vec<ExcludedSite> = from(&x.excluded)?;
        let mut trained = 0;
        for s in &sites {
            match got.get(s) {
                Some(u) if u.outcome == "trained" => trained += 1,
                Some(u) => excluded.push(ExcludedSite {
                    site_id: *s,
                    reason: format!("{}: {}", u.outcome, u.reason.clone().unwrap_or_default()),
                }),
                None => excluded.push(ExcludedSite {
                    site_id: *s,
                    reason: "no update before the deadline".into(),
                }),
            }
        }
        let w = ctx.begin_write().await?;
        let mut a: round::ActiveModel = x.clone().into();
        a.excluded = Set(json(&excluded)?);
        a.updated_at = Set(Utc::now());
        let action = if trained >= x.quorum {
            a.state = Set("aggregating".into());
            "round.collected"
        } else {
            a.state = Set("failed".into());
            a.failure = Set(Some(format!(
                "Round {} failed: {trained} of {} sites sent an update, the plan needs {}.",
                x.number,
                sites.len(),
                x.quorum
            )));
            "round.failed"
        };
        let m = a.update(&*w).await?;
        audit::append(&*w, &Actor::system(), action, "round", m.id, &serde_json::json!({
            "run_id": r.id, "round": m.number, "trained": trained, "excluded": excluded, "failure": m.failure,
        }))
        .await?;
        w.commit().await?;
        Ok(())
    }

    async fn aggregate(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        files: &[(String, String)],
        x: round::Model,
    ) -> AppResult<()> {
        let version = match x.model_version_id {
            Some(id) => model_version::Entity::find_by_id(id)
                .one(&ctx.db)
                .await?
                .ok_or_else(|| {
                    AppError::unexpected(anyhow::anyhow!("model version {id} is gone"))
                })?,
            None => self.new_version(ctx, r, manifest, &x).await?,
        };
        let x = round::Entity::find_by_id(x.id)
            .one(&ctx.db)
            .await?
            .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("round vanished")))?;
        let sites: Vec<Uuid> = from(&x.sites)?;
        let excluded: Vec<ExcludedSite> = from(&x.excluded)?;
        let evaluators: Vec<Uuid> = sites
            .iter()
            .filter(|s| !excluded.iter().any(|e| e.site_id == **s))
            .copied()
            .collect();
        let hash = version.hash.clone();
        self.publish(
            r,
            manifest,
            files,
            x.number,
            &evaluators,
            JobKind::Evaluate,
            &hash,
            x.deadline,
        )
        .await;
        let got = self
            .wait_for(
                ctx,
                r,
                &x,
                JobKind::Evaluate,
                manifest,
                files,
                &hash,
                &evaluators,
                false,
            )
            .await?;
        if !still_running(ctx, r.id).await? {
            return Ok(());
        }
        let mut per_site = Vec::new();
        for s in &evaluators {
            if let Some(m) = got
                .get(s)
                .and_then(|u| u.evaluation.as_ref())
                .and_then(|e| from::<Metrics>(e).ok())
            {
                per_site.push(SiteEvaluation {
                    site_id: *s,
                    site_name: site_name(ctx, *s).await,
                    metrics: m,
                });
            }
        }
        let evaluation = ModelEvaluation {
            global: weighted(per_site.iter().map(|s| &s.metrics)),
            sites: per_site,
        };
        let w = ctx.begin_write().await?;
        let mut v: model_version::ActiveModel = version.into();
        v.evaluation = Set(Some(json(&evaluation)?));
        let v = v.update(&*w).await?;
        let mut a: round::ActiveModel = x.into();
        a.state = Set("evaluated".into());
        a.updated_at = Set(Utc::now());
        let m = a.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            "round.evaluated",
            "round",
            m.id,
            &serde_json::json!({
                "run_id": r.id, "round": m.number, "model_version": v.id, "evaluation": evaluation,
            }),
        )
        .await?;
        w.commit().await?;
        Ok(())
    }

    /// Aggregates the round's updates into a new model version with its lineage.
    async fn new_version(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        x: &round::Model,
    ) -> AppResult<model_version::Model> {
        let strategy = Strategy::from_spec(&manifest.aggregation)
            .map_err(|e| AppError::unexpected(anyhow::anyhow!("{e}")))?;
        let global_hash = x.global_in.clone().unwrap_or_default();
        let global = weights::from_safetensors(
            &self
                .artifacts
                .get(&global_hash)
                .await
                .map_err(AppError::unexpected)?,
        )
        .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
        let got = self.results_of(ctx, r.id, x.number, "train").await?;
        let mut updates = Vec::new();
        let mut contributions = Vec::new();
        let mut ordered: Vec<&update::Model> =
            got.values().filter(|u| u.outcome == "trained").collect();
        ordered.sort_by_key(|u| u.site_id);
        for u in ordered {
            let hash = u.update_hash.clone().unwrap_or_default();
            let bytes = self
                .artifacts
                .get(&hash)
                .await
                .map_err(AppError::unexpected)?;
            let w = weights::from_safetensors(&bytes)
                .map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
            updates.push(Update {
                weights: w,
                samples: u.samples.unwrap_or(0).max(0) as u64,
                loss_before: u.train_loss_before,
                loss_after: u.train_loss_after,
            });
            contributions.push(Contribution {
                site_id: u.site_id,
                site_name: site_name(ctx, u.site_id).await,
                update_hash: hash,
                samples: u.samples.unwrap_or(0).max(0) as u64,
                evaluation: u
                    .evaluation
                    .as_ref()
                    .and_then(|e| from(e).ok())
                    .unwrap_or_default(),
                train_loss_before: u.train_loss_before.unwrap_or(f64::NAN),
                train_loss_after: u.train_loss_after.unwrap_or(f64::NAN),
            });
        }
        let mut state: ServerState = r
            .server_state
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        let (g, u) = (global.clone(), updates);
        let next = tokio::task::spawn_blocking(move || {
            aggregate(&strategy, &g, &u, &mut state).map(|w| (w, state))
        })
        .await
        .map_err(AppError::unexpected)?
        .map_err(|e| AppError::unexpected(anyhow::anyhow!("aggregation: {e}")))?;
        let (next, state) = next;
        let bytes =
            weights::to_safetensors(&next).map_err(|e| AppError::unexpected(anyhow::anyhow!(e)))?;
        let hash = self
            .artifacts
            .put(bytes)
            .await
            .map_err(AppError::unexpected)?;
        let parent = model_version::Entity::find()
            .filter(model_version::Column::RunId.eq(r.id))
            .order_by_desc(model_version::Column::Round)
            .one(&ctx.db)
            .await?
            .map(|p| p.id);
        let contributions: Vec<Contribution> = contributions
            .into_iter()
            .map(|c| Contribution {
                train_loss_before: finite(c.train_loss_before),
                train_loss_after: finite(c.train_loss_after),
                ..c
            })
            .collect();
        let w = ctx.begin_write().await?;
        let v = model_version::ActiveModel {
            id: Set(Uuid::new_v4()),
            run_id: Set(r.id),
            study_id: Set(r.study_id),
            round: Set(x.number),
            hash: Set(hash),
            parent_id: Set(parent),
            plan_hash: Set(r.plan_hash.clone()),
            review_id: Set(r.review_id),
            grant_ids: Set(r.grant_ids.clone()),
            strategy: Set(manifest.aggregation.strategy.clone()),
            contributions: Set(json(&contributions)?),
            evaluation: Set(None),
            created_at: Set(Utc::now()),
            released_at: Set(None),
            released_by: Set(None),
        }
        .insert(&*w)
        .await?;
        let mut a: round::ActiveModel = x.clone().into();
        a.model_version_id = Set(Some(v.id));
        a.updated_at = Set(Utc::now());
        a.update(&*w).await?;
        let mut rr: run::ActiveModel = r.clone().into();
        rr.server_state = Set(Some(serde_json::to_string(&state)?));
        rr.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            "model.version_created",
            "model_version",
            v.id,
            &crate::services::models::version_dto(&v)?,
        )
        .await?;
        w.commit().await?;
        Ok(v)
    }

    async fn close(
        &self,
        ctx: &AppContext,
        r: &run::Model,
        manifest: &TrainingPlanManifest,
        x: round::Model,
    ) -> AppResult<()> {
        let history = model_version::Entity::find()
            .filter(model_version::Column::RunId.eq(r.id))
            .order_by_asc(model_version::Column::Round)
            .all(&ctx.db)
            .await?;
        let plan = manifest.parse().map_err(|p| {
            AppError::unexpected(anyhow::anyhow!(
                "the approved plan does not parse: {}",
                p.join("; ")
            ))
        })?;
        let values: Vec<f64> = history
            .iter()
            .filter_map(|v| {
                v.evaluation
                    .as_ref()
                    .and_then(|e| from::<ModelEvaluation>(e).ok())
            })
            .map(|e| metric(&e.global, plan.stopping.metric))
            .collect();
        let stop = stopping(&plan, x.number, &values);
        let w = ctx.begin_write().await?;
        let mut a: round::ActiveModel = x.into();
        a.state = Set("closed".into());
        a.updated_at = Set(Utc::now());
        let m = a.update(&*w).await?;
        let mut rr: run::ActiveModel = r.clone().into();
        rr.current_round = Set(m.number);
        rr.update(&*w).await?;
        audit::append(
            &*w,
            &Actor::system(),
            "round.closed",
            "round",
            m.id,
            &serde_json::json!({"run_id": r.id, "round": m.number, "stop": stop}),
        )
        .await?;
        w.commit().await?;
        if let Some(reason) = stop {
            self.finish(ctx, r.id, "completed", &reason).await?;
        }
        Ok(())
    }
}

fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

async fn site_name(ctx: &AppContext, id: Uuid) -> String {
    directory::get_site(&ctx.db, id)
        .await
        .map(|s| s.name)
        .unwrap_or_else(|_| id.to_string())
}

/// The plan's stopping metric of a round's global model, larger being better throughout.
fn metric(m: &Metrics, name: TargetMetric) -> f64 {
    match name {
        TargetMetric::Loss => -m.loss,
        TargetMetric::Auroc => m.auroc.unwrap_or(0.0),
        TargetMetric::Accuracy => m.accuracy,
    }
}

/// Sample-weighted mean of the sites' metrics.
pub fn weighted<'a>(ms: impl Iterator<Item = &'a Metrics>) -> Metrics {
    let ms: Vec<&Metrics> = ms.collect();
    let n: u64 = ms.iter().map(|m| m.samples).sum();
    if n == 0 {
        return Metrics::default();
    }
    let w = |f: &dyn Fn(&Metrics) -> f64| {
        ms.iter().map(|m| f(m) * m.samples as f64).sum::<f64>() / n as f64
    };
    let with_auroc: Vec<&&Metrics> = ms.iter().filter(|m| m.auroc.is_some()).collect();
    let n_auroc: u64 = with_auroc.iter().map(|m| m.samples).sum();
    let auroc = (n_auroc > 0).then(|| {
        with_auroc
            .iter()
            .map(|m| m.auroc.unwrap_or(0.0) * m.samples as f64)
            .sum::<f64>()
            / n_auroc as f64
    });
    Metrics {
        loss: w(&|m| m.loss),
        accuracy: w(&|m| m.accuracy),
        auroc,
        samples: n,
    }
}

/// Whether the run stops after `round`, and why: the maximum number of rounds, the target
/// metric reached, or no improvement for `patience` rounds.
pub fn stopping(plan: &Plan, round: i32, values: &[f64]) -> Option<String> {
    if round as u32 >= plan.rounds {
        return Some(format!("Completed the plan's {} rounds.", plan.rounds));
    }
    let name = plan.stopping.metric.name();
    if let (Some(target), Some(last)) = (plan.stopping.target, values.last()) {
        let reached = if plan.stopping.metric == TargetMetric::Loss {
            -last <= target
        } else {
            *last >= target
        };
        if reached {
            return Some(format!(
                "Reached the target {name} {target} in round {round}."
            ));
        }
    }
    if let Some(k) = plan.stopping.patience {
        let k = k as usize;
        if values.len() > k {
            let best_before = values[..values.len() - k]
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            if values[values.len() - k..].iter().all(|v| *v <= best_before) {
                return Some(format!("No improvement of {name} for {k} rounds."));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(stopping: serde_json::Value) -> Plan {
        let m: TrainingPlanManifest = serde_json::from_value(serde_json::json!({
            "model": {"architecture": "small_cnn", "num_classes": 2},
            "optimiser": {"name": "sgd", "learning_rate": 0.05},
            "local_epochs": 1, "batch_size": 8, "rounds": 10,
            "aggregation": {"strategy": "fedavg"},
            "stopping": stopping
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        m.parse().unwrap_or_else(|p| panic!("{p:?}"))
    }

    fn global(accuracy: f64, auroc: f64, loss: f64) -> Metrics {
        Metrics {
            loss,
            accuracy,
            auroc: Some(auroc),
            samples: 10,
        }
    }

    /// The same rounds stop the run, or not, by the metric the plan names.
    #[test]
    fn the_target_metric_decides_when_a_run_stops() {
        let rounds = [global(0.80, 0.91, 0.40), global(0.86, 0.93, 0.35)];
        let decide = |stopping: serde_json::Value| {
            let p = plan(stopping);
            let values: Vec<f64> = rounds
                .iter()
                .map(|m| metric(m, p.stopping.metric))
                .collect();
            stopping_reason(&p, &values)
        };
        assert_eq!(
            decide(serde_json::json!({"target_metric": "accuracy", "target_value": 0.9})),
            None
        );
        assert_eq!(
            decide(serde_json::json!({"target_metric": "auroc", "target_value": 0.9})),
            Some("Reached the target auroc 0.9 in round 2.".to_string())
        );
        assert_eq!(
            decide(serde_json::json!({"target_metric": "loss", "target_value": 0.3})),
            None
        );
        assert_eq!(
            decide(serde_json::json!({"target_metric": "loss", "target_value": 0.36})),
            Some("Reached the target loss 0.36 in round 2.".to_string())
        );
        // Patience watches the plan's metric too: accuracy fell, AUROC did not.
        let worse = [global(0.86, 0.90, 0.3), global(0.84, 0.95, 0.3)];
        let patient = |metric_name: &str| {
            let mut s = serde_json::json!({"patience": 1});
            if metric_name != "accuracy" {
                s = serde_json::json!({"patience": 1, "target_metric": metric_name, "target_value": 0.99});
            }
            let p = plan(s);
            let values: Vec<f64> = worse.iter().map(|m| metric(m, p.stopping.metric)).collect();
            stopping_reason(&p, &values)
        };
        assert_eq!(
            patient("accuracy"),
            Some("No improvement of accuracy for 1 rounds.".to_string())
        );
        assert_eq!(patient("auroc"), None);
    }

    fn stopping_reason(p: &Plan, values: &[f64]) -> Option<String> {
        stopping(p, values.len() as i32, values)
    }
}
