//! The worker's loop: heartbeats, and one job at a time from its site's queue.

use chrono::Utc;
use consilium_core::protocol::{Heartbeat, Job, RejectedJob, WorkerMessage, WorkerState};
use consilium_core::signing::{self, SignedMessage};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

use crate::broker::SharedBroker;
use crate::job::{SiteContext, process};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs until `stop` resolves: heartbeats every `heartbeat` and whenever the worker starts or
/// finishes a job (so that the server shows what it does now, even for a job shorter than the
/// interval), and jobs as they come.
pub async fn run(
    ctx: Arc<SiteContext>,
    broker: SharedBroker,
    heartbeat: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // The data is read once in the background; heartbeats say how far that is and never wait.
    let size = consilium_core::plan::DEFAULT_IMAGE_SIZE;
    let busy = Arc::new(AtomicBool::new(false));
    let changed = Arc::new(Notify::new());
    let warm = {
        let (ctx, changed) = (ctx.clone(), changed.clone());
        tokio::spawn(async move {
            if let Err(e) = ctx.data(size).await {
                tracing::error!(error = %e, "the site's data cannot be read");
            }
            // The next heartbeat says what was read (and how many patients) at once.
            changed.notify_one();
        })
    };
    let beat = {
        let (ctx, broker, busy, changed) =
            (ctx.clone(), broker.clone(), busy.clone(), changed.clone());
        tokio::spawn(async move {
            loop {
                let summary = ctx.data_summary(size);
                let hb = Heartbeat {
                    site_id: ctx.site_id,
                    state: if busy.load(Ordering::Relaxed) {
                        WorkerState::Training
                    } else {
                        WorkerState::Idle
                    },
                    data_summary: summary,
                    patients: ctx.train_patients(size),
                    version: VERSION.to_string(),
                    at: Utc::now(),
                };
                match signing::sign(&ctx.signer, &WorkerMessage::Heartbeat(hb)) {
                    Ok(signed) => {
                        if let Err(e) = broker.publish_message(&signed).await {
                            tracing::warn!(error = %e, "heartbeat not sent");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "a heartbeat can't be written"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(heartbeat) => {}
                    _ = changed.notified() => {}
                }
            }
        })
    };
    let mut jobs = broker.jobs(ctx.site_id).await?;
    tracing::info!(site = %ctx.site_id, "waiting for jobs");
    tokio::pin!(stop);
    loop {
        let delivery = tokio::select! {
            d = jobs.recv() => match d { Some(d) => d, None => break },
            _ = &mut stop => break,
        };
        let job = match verified_job(&ctx, &delivery.payload) {
            Ok(j) => j,
            Err(reason) => {
                tracing::error!(
                    reason,
                    "a message on this site's job queue is refused; it goes to the dead-letter queue"
                );
                let report = WorkerMessage::JobRejected(RejectedJob {
                    site_id: ctx.site_id,
                    reason,
                    message_sha256: consilium_core::hash::sha256_hex(&delivery.payload),
                    at: Utc::now(),
                });
                // The server audits it for the site's custodian.
                match signing::sign(&ctx.signer, &report) {
                    Ok(signed) => {
                        if let Err(e) = broker.publish_message(&signed).await {
                            tracing::warn!(error = %e, "the refused job could not be reported to the server");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the refused job's report can't be written")
                    }
                }
                delivery.dead_letter().await;
                continue;
            }
        };
        busy.store(true, Ordering::Relaxed);
        changed.notify_one();
        let result = process(&job, &ctx).await;
        busy.store(false, Ordering::Relaxed);
        changed.notify_one();
        let sent = match signing::sign(&ctx.signer, &WorkerMessage::Result(result)) {
            Ok(signed) => broker.publish_message(&signed).await,
            Err(e) => Err(crate::broker::BrokerError::Encode(e.to_string())),
        };
        match sent {
            Ok(()) => delivery.ack().await,
            Err(e) => {
                tracing::warn!(error = %e, job = %job.job_id, "result not delivered; the job will run again");
                delivery.requeue().await;
            }
        }
    }
    beat.abort();
    warm.abort();
    Ok(())
}

/// A job, once its signature proves that the server this worker pins sent it, and that it is
/// addressed to this site.
fn verified_job(ctx: &SiteContext, payload: &[u8]) -> Result<Job, String> {
    let signed: SignedMessage = serde_json::from_slice(payload).map_err(|e| {
        format!("it is not a job signed by the server (protocol 4 signs every job): {e}")
    })?;
    let job = signing::verify_job(&ctx.server_key, &signed)
        .map_err(|e| format!("it is not a job from the server this worker trusts: {e}"))?;
    if job.site_id != ctx.site_id {
        return Err(format!(
            "a job for site {}, on the queue of site {}",
            job.site_id, ctx.site_id
        ));
    }
    Ok(job)
}
