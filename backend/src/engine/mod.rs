//! The orchestrator: runs are sequences of rounds, each a persisted state machine
//! (collecting → aggregating → evaluated → closed | failed) with a deadline and a quorum,
//! so that a restart resumes it and a missing site does not stall it. Before every round the
//! governance conditions are checked again. Results arrive through the broker and are
//! counted once per job id.

mod driver;
mod intake;
pub mod rounds;
mod secure;
pub(crate) mod versions;
pub mod weights;

pub use rounds::stopping;
pub use versions::weighted;

use chrono::{Duration, Utc};
use consilium_core::aggregate::{
    Aggregated, FLAG_AFTER_ROUNDS, ServerState, Strategy, Update, aggregate, down_weighted,
};
use consilium_core::api::{
    Contribution, ExcludedSite, ModelEvaluation, SiteEvaluation, flagged_sites,
};
use consilium_core::manifest::TrainingPlanManifest;
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
    /// The server's job-signing key.
    signer: Arc<consilium_core::signing::SigningKey>,
    notify: Arc<Notify>,
    round_timeout: Duration,
}

pub(crate) fn job_id(run: Uuid, round: i32, site: Uuid, kind: JobKind) -> Uuid {
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
    pub fn new(
        broker: SharedBroker,
        artifacts: ArtifactStore,
        signer: Arc<consilium_core::signing::SigningKey>,
        round_timeout_seconds: u64,
    ) -> Self {
        Engine {
            runtime: tokio::runtime::Handle::current(),
            broker,
            artifacts,
            signer,
            notify: Arc::new(Notify::new()),
            round_timeout: Duration::seconds(round_timeout_seconds as i64),
        }
    }

    /// Starts consuming results, drives every run the services hand over (`RunHandle`), and
    /// resumes every run that was running.
    pub async fn start(
        &self,
        ctx: &AppContext,
        mut requests: tokio::sync::mpsc::UnboundedReceiver<Uuid>,
    ) -> AppResult<()> {
        let results = self.broker.results().await.map_err(AppError::unexpected)?;
        let (engine, c) = (self.clone(), ctx.clone());
        tokio::spawn(async move { engine.consume(&c, results).await });
        let (engine, c) = (self.clone(), ctx.clone());
        self.runtime.spawn(async move {
            while let Some(run) = requests.recv().await {
                engine.spawn(&c, run);
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
                let reason = stop_reason(&e);
                if let Err(f) = engine.finish(&ctx, run_id, "failed", &reason).await {
                    tracing::error!(
                        run = %run_id, error = ?f,
                        "the run's failure could not be recorded: it shows as running with nothing driving it until the server restarts"
                    );
                }
            }
        });
    }
}

fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

/// The reason a failed run shows, in words a researcher can act on; the whole cause chain goes
/// to the log, never database or file-system internals to the API.
pub fn stop_reason(e: &AppError) -> String {
    match e {
        AppError::Unexpected(inner) => {
            if inner
                .chain()
                .any(|c| c.downcast_ref::<sea_orm::DbErr>().is_some())
            {
                "The run stopped: the server could not read or write its database while driving it. Start the run again; if it stops again, ask the administrator (the server's log has the cause).".to_string()
            } else if inner.chain().any(|c| {
                c.downcast_ref::<consilium_worker::artifacts::ArtifactError>()
                    .is_some()
            }) {
                "The run stopped: the model store (engine.artifacts) could not be read or written. Ask the administrator to check it, then start the run again.".to_string()
            } else {
                format!("The run stopped: {inner}.")
            }
        }
        other => format!("The run stopped: {other}"),
    }
}

/// A site's name for the lineage; a site that no longer exists is named by its id, and a
/// database error is an error (not a missing name).
async fn site_name(ctx: &AppContext, id: Uuid) -> AppResult<String> {
    match directory::get_site(&ctx.db, id).await {
        Ok(s) => Ok(s.name),
        Err(AppError::NotFound(_)) => Ok(id.to_string()),
        Err(e) => Err(e),
    }
}
