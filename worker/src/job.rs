//! One job at a site: verify it, evaluate the incoming global model on the held-out split,
//! train locally, protect and store the update. `process` is what tests call directly; the
//! consumer loop around it (see `consumer`) is thin.

use async_trait::async_trait;
use chrono::Utc;
use consilium_core::aggregate::{Strategy, is_batch_norm};
use consilium_core::manifest::plan_hash;
use consilium_core::plan::{Plan, Segmentation};
use consilium_core::protocol::{Job, JobKind, JobResult, Outcome, PROTOCOL_VERSION};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use uuid::Uuid;

use crate::artifacts::SiteArtifacts;
use crate::data::{self, Dataset, DatasetSpec, Sample};
use crate::decode::Decoder;
use crate::ledger::{Entry, Ledger, Spending};
use crate::train::{DpStep, Net, Rng, device};
use consilium_core::protocol::PrivacySpent;
use consilium_core::signing::{SigningKey, VerifyingKey};

/// Where the worker learns which plans its site has approved.
#[async_trait]
pub trait Approvals: Send + Sync {
    /// `Ok(None)`: approved. `Ok(Some(reason))`: not approved. `Err`: could not find out.
    async fn check(
        &self,
        site: Uuid,
        study: Uuid,
        plan_hash: &str,
    ) -> Result<Option<String>, String>;
}

#[derive(Deserialize)]
struct GrantView {
    study_id: Uuid,
    plan_hashes: Vec<String>,
}

/// Asks the server (`GET /api/v1/sites/{id}/grants`) with the site's worker token.
pub struct ServerApprovals {
    pub server_url: String,
    /// The site's worker token; never printed.
    pub token: secrecy::SecretString,
    pub http: reqwest::Client,
}

#[async_trait]
impl Approvals for ServerApprovals {
    async fn check(&self, site: Uuid, study: Uuid, hash: &str) -> Result<Option<String>, String> {
        let url = format!(
            "{}/api/v1/sites/{site}/grants",
            self.server_url.trim_end_matches('/')
        );
        let resp = self
            .http
            .get(&url)
            .bearer_auth(secrecy::ExposeSecret::expose_secret(&self.token))
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url} answered {}", resp.status()));
        }
        let grants: Vec<GrantView> = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
        let study_grants: Vec<&GrantView> = grants.iter().filter(|g| g.study_id == study).collect();
        Ok(if study_grants.is_empty() {
            Some(format!(
                "no data-access grant in force at this site for study {study}"
            ))
        } else if !study_grants
            .iter()
            .any(|g| g.plan_hashes.iter().any(|h| h == hash))
        {
            Some(format!(
                "training plan {hash} is not approved for this site's data"
            ))
        } else {
            None
        })
    }
}

pub struct SiteContext {
    pub site_id: Uuid,
    pub dataset: DatasetSpec,
    /// The global models this site's jobs name, and where its outputs go (the server).
    pub artifacts: Arc<dyn SiteArtifacts>,
    pub approvals: Arc<dyn Approvals>,
    /// The program whose child processes decode the site's files.
    pub decoder: Decoder,
    /// The site's signing key: every message this worker sends is signed with it.
    pub signer: Arc<SigningKey>,
    /// The server's public key, pinned in the worker's configuration: only jobs signed with it
    /// are run.
    pub server_key: VerifyingKey,
    /// Datasets by image size, loaded once (an async lock: a second caller waits for the
    /// load under way instead of decoding everything again, without holding a thread).
    cache: tokio::sync::Mutex<HashMap<usize, Arc<Dataset>>>,
    /// Why the data could not be read the last time, until it can.
    data_error: Mutex<Option<String>>,
    /// This site's last trained weights in each FedBN run (its batch-norm parameters stay
    /// local), by run: never shared between runs, so never between studies.
    local: Mutex<HashMap<Uuid, Vec<u8>>>,
    /// What DP-SGD has spent of this site's dataset; every private round is checked against it
    /// and recorded in it before training.
    pub ledger: Arc<Ledger>,
}

impl SiteContext {
    pub fn new(
        site_id: Uuid,
        dataset: DatasetSpec,
        artifacts: Arc<dyn SiteArtifacts>,
        approvals: Arc<dyn Approvals>,
        decoder: Decoder,
        signer: SigningKey,
        server_key: VerifyingKey,
    ) -> Self {
        SiteContext {
            site_id,
            dataset,
            artifacts,
            approvals,
            decoder,
            signer: Arc::new(signer),
            server_key,
            cache: tokio::sync::Mutex::default(),
            data_error: Mutex::default(),
            local: Mutex::default(),
            ledger: Arc::new(Ledger::in_memory(None)),
        }
    }

    /// This site's privacy ledger (by default one in memory, without a lifetime budget).
    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        self.ledger = Arc::new(ledger);
        self
    }

    /// The dataset at `size × size`, loaded on first use, off the async threads (decoding a
    /// site's files takes a while and goes through child processes).
    pub async fn data(&self, size: usize) -> Result<Arc<Dataset>, String> {
        let mut cache = self.cache.lock().await;
        if let Some(d) = cache.get(&size) {
            return Ok(d.clone());
        }
        let (spec, decoder) = (self.dataset.clone(), self.decoder.clone());
        let loaded = tokio::task::spawn_blocking(move || data::load(&spec, size, &decoder))
            .await
            .map_err(|e| format!("reading the data stopped: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Ok(mut last) = self.data_error.lock() {
            *last = loaded.as_ref().err().cloned();
        }
        let d = Arc::new(loaded?);
        cache.insert(size, d.clone());
        Ok(d)
    }

    /// The training split's patients, once the data is read (never waits for it).
    pub fn train_patients(&self, size: usize) -> Option<u64> {
        self.cache
            .try_lock()
            .ok()
            .and_then(|c| c.get(&size).map(|d| d.train_patients()))
    }

    /// What a heartbeat says of the data, without waiting for it to be read.
    pub fn data_summary(&self, size: usize) -> String {
        if let Some(d) = self
            .cache
            .try_lock()
            .ok()
            .and_then(|c| c.get(&size).cloned())
        {
            return d.summary(self.dataset.kind);
        }
        match self.data_error.lock().ok().and_then(|e| e.clone()) {
            Some(e) => format!("data unreadable: {e}"),
            None => "reading the data".into(),
        }
    }
}

/// A synthetic preview of this site's training images, checked before it leaves.
async fn preview(job: &Job, ctx: &SiteContext, segmentation: Option<Segmentation>) -> Outcome {
    let spec = job.preview.clone().unwrap_or_default();
    if let Some(seg) = &segmentation
        && seg.values.len() > crate::preview::MAX_PREVIEW_CLASSES
    {
        return refuse(format!(
            "the plan names {} mask classes; a preview draws masks of at most {} (each class is a channel the generator learns)",
            seg.values.len(),
            crate::preview::MAX_PREVIEW_CLASSES
        ));
    }
    let data = match ctx.data(spec.image_size as usize).await {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let dicom = ctx.dataset.kind == data::DataKind::Dicom;
    let root = ctx.dataset.root.clone();
    let seed = job.manifest.seed
        ^ u64::from_le_bytes(job.job_id.as_bytes()[..8].try_into().unwrap_or_default());
    if spec.dp.is_some() && spec.generator.as_deref() == Some("pca_gaussian") {
        return Outcome::Refused {
            reason: "pca_gaussian cannot be trained with DP-SGD; a private preview uses cvae"
                .into(),
        };
    }
    let (private, privacy) = match &spec.dp {
        Some(dp) => match spend_on_preview(job, dp, &data, &ctx.ledger) {
            Ok((p, spent)) => (Some(p), Some(spent)),
            Err(JobError::Refused(reason)) => return Outcome::Refused { reason },
            Err(e) => return fail(e.to_string()),
        },
        None => (None, None),
    };
    let started = Instant::now();
    let built = tokio::task::spawn_blocking(move || {
        crate::preview::build_set(
            &data,
            &spec,
            &root,
            dicom,
            seed,
            private.as_ref(),
            segmentation.as_ref(),
        )
    })
    .await;
    let (set, withheld) = match built {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return fail(e),
        Err(e) => return fail(format!("the preview stopped unexpectedly: {e}")),
    };
    let images = set.images.len() as u32;
    let bytes = match serde_json::to_vec(&set) {
        Ok(b) => b,
        Err(e) => return fail(format!("the preview set could not be written: {e}")),
    };
    match ctx.artifacts.upload(job, bytes).await {
        Ok(hash) => Outcome::Previewed {
            set: hash,
            images,
            withheld,
            duration_ms: started.elapsed().as_millis() as u64,
            privacy,
        },
        Err(e) => fail(e.to_string()),
    }
}

/// Why a job produced no update.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Not a job this site runs: addressed elsewhere, altered, not approved, a plan or a
    /// protocol this worker cannot run. Reported as refused, and audited as a refusal.
    #[error("{0}")]
    Refused(String),
    /// Run and not finished: the data, the model or the store failed. Reported as failed.
    #[error("{0}")]
    Failed(String),
}

impl From<crate::train::TrainError> for JobError {
    fn from(e: crate::train::TrainError) -> Self {
        JobError::Failed(e.to_string())
    }
}

impl From<JobError> for Outcome {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Refused(reason) => Outcome::Refused { reason },
            JobError::Failed(reason) => Outcome::Failed { reason },
        }
    }
}

fn refuse(reason: impl Into<String>) -> Outcome {
    JobError::Refused(reason.into()).into()
}

fn fail(reason: impl Into<String>) -> Outcome {
    JobError::Failed(reason.into()).into()
}

/// Runs a job to its outcome. Never panics on bad input: every problem is an outcome.
#[tracing::instrument(skip_all, fields(job = %job.job_id, run = %job.run_id, round = job.round, kind = ?job.kind))]
pub async fn process(job: &Job, ctx: &SiteContext) -> JobResult {
    let outcome = outcome(job, ctx).await;
    match &outcome {
        Outcome::Refused { reason } => tracing::warn!(job = %job.job_id, reason, "job refused"),
        Outcome::Failed { reason } => tracing::warn!(job = %job.job_id, reason, "job failed"),
        _ => tracing::info!(job = %job.job_id, round = job.round, "job done"),
    }
    JobResult {
        job_id: job.job_id,
        kind: Some(job.kind),
        run_id: job.run_id,
        round: job.round,
        site_id: ctx.site_id,
        outcome,
    }
}

async fn outcome(job: &Job, ctx: &SiteContext) -> Outcome {
    if job.site_id != ctx.site_id {
        return refuse(format!(
            "the job is addressed to site {}, not this site ({})",
            job.site_id, ctx.site_id
        ));
    }
    match plan_hash(&job.manifest, &job.files) {
        Ok(h) if h == job.plan_hash => {}
        Ok(h) => {
            return refuse(format!(
                "the plan in the job hashes to {h}, not to the approved {}: it was altered",
                job.plan_hash
            ));
        }
        Err(e) => return refuse(format!("the plan can't be hashed: {e}")),
    }
    if job.protocol > PROTOCOL_VERSION {
        return refuse(format!(
            "this worker (version {}, protocol {PROTOCOL_VERSION}) is older than the server's jobs (protocol {}); upgrade the site worker",
            env!("CARGO_PKG_VERSION"),
            job.protocol
        ));
    }
    // A plan this worker cannot run is refused before any data is touched.
    let plan = match job.manifest.parse() {
        Ok(p) => p,
        Err(problems) => {
            return refuse(format!(
                "this worker (version {}) cannot run the plan: {}",
                env!("CARGO_PKG_VERSION"),
                problems.join("; ")
            ));
        }
    };
    // The server may be briefly unreachable (a restart): ask again until the deadline.
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        match ctx
            .approvals
            .check(ctx.site_id, job.study_id, &job.plan_hash)
            .await
        {
            Ok(None) => break,
            Ok(Some(reason)) => return refuse(reason),
            Err(e)
                if Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default()
                    < job.deadline =>
            {
                tracing::warn!(job = %job.job_id, error = %e, "can't reach the server to confirm the approvals; asking again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => {
                return fail(format!(
                    "could not confirm the approvals with the server before the deadline: {e}"
                ));
            }
        }
    }
    if job.deadline < Utc::now() {
        return fail("the round's deadline passed before the job could start");
    }
    if job.kind == JobKind::Preview {
        return preview(job, ctx, plan.segmentation.clone()).await;
    }
    let global = match &job.global_model {
        Some(h) => match ctx.artifacts.model(job, h).await {
            Ok(b) => Some(b),
            Err(e) => return fail(e.to_string()),
        },
        None => None,
    };
    // SCAFFOLD's correction for this site, from round 2 on; a correction for another
    // strategy is a job this plan does not describe.
    let correction = match (&job.correction, plan.strategy == Strategy::Scaffold) {
        (None, _) => None,
        (Some(h), true) => match ctx.artifacts.model(job, h).await {
            Ok(b) => Some(b),
            Err(e) => return fail(format!("SCAFFOLD's correction: {e}")),
        },
        (Some(_), false) => {
            return refuse(
                "the job sends a SCAFFOLD correction, and the approved plan's strategy is not scaffold",
            );
        }
    };
    let data = match ctx.data(plan.image_size).await {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    // Secure aggregation: the keys and shares go to the neighbours before training.
    let secure = match (plan.secure_aggregation, job.kind) {
        (Some(secagg), JobKind::Train) => {
            match crate::secure::prepare(job, ctx, data.train().count() as u64).await {
                Ok(p) => Some((secagg, p)),
                Err(e) => return e.into(),
            }
        }
        _ => None,
    };
    let plan_after = plan.clone();
    let fedbn = plan.strategy == Strategy::FedBn;
    let local = if fedbn || !plan.local_layers.is_empty() || plan.ditto.is_some() {
        ctx.local
            .lock()
            .ok()
            .and_then(|l| l.get(&job.run_id).cloned())
    } else {
        None
    };
    let job2 = job.clone();
    let site = ctx.site_id;
    let ledger = ctx.ledger.clone();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        compute(
            &job2,
            &plan,
            site,
            &data,
            Incoming {
                global: global.as_deref(),
                local: local.as_deref(),
                correction: correction.as_deref(),
            },
            &ledger,
        )
    })
    .await;
    let (outcome, weights) = match result {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return e.into(),
        Err(e) => return fail(format!("training stopped unexpectedly: {e}")),
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    if let Some(reason) = outcome.diverged() {
        return fail(reason);
    }
    match (outcome, weights) {
        (Computed::Evaluated(evaluation), _) => Outcome::Evaluated {
            evaluation,
            duration_ms,
        },
        (
            Computed::Trained {
                samples,
                evaluation,
                before,
                after,
                skipped,
                privacy,
                kept,
                change,
            },
            Some(bytes),
        ) => {
            if let Some(kept) = kept {
                match ctx.local.lock() {
                    Ok(mut l) => {
                        l.insert(job.run_id, kept);
                    }
                    Err(e) => {
                        return fail(format!("this site's own layers could not be kept: {e}"));
                    }
                }
            }
            let handed_over = match (secure, change) {
                (Some((secagg, prepared)), Some(change)) => {
                    crate::secure::finish(job, ctx, &plan_after, &secagg, prepared, change)
                        .await
                        .map_err(|e| e.to_string())
                }
                (Some(_), None) => Err("training produced no change to mask".to_string()),
                (None, _) => ctx
                    .artifacts
                    .upload(job, bytes)
                    .await
                    .map_err(|e| e.to_string()),
            };
            match handed_over {
                Ok(update_hash) => Outcome::Trained {
                    update_hash,
                    samples,
                    evaluation,
                    train_loss_before: before,
                    train_loss_after: after,
                    duration_ms,
                    skipped,
                    privacy,
                },
                Err(e) => fail(e),
            }
        }
        (Computed::Trained { .. }, None) => fail("training produced no weights"),
    }
}

enum Computed {
    Evaluated(consilium_core::protocol::Metrics),
    Trained {
        samples: u64,
        evaluation: consilium_core::protocol::Metrics,
        before: f64,
        after: f64,
        skipped: Vec<consilium_core::protocol::Skipped>,
        privacy: Option<Box<PrivacySpent>>,
        /// All the trained weights, kept at the site for the run's next job: FedBN's
        /// batch-norm parameters and the layers that are not shared come from them.
        kept: Option<Vec<u8>>,
        /// Under secure aggregation: the change of every shared value, sorted by name (what
        /// is masked; the update itself never leaves).
        change: Option<Vec<f32>>,
    },
}

impl Computed {
    /// Why the result cannot be reported, when the model has diverged: a loss that is not a
    /// number (its logits overflowed; a NaN in the signed result would make the whole message
    /// unreadable to the server, which would wait for this site until the round's deadline),
    /// or a training loss that grew by orders of magnitude (the weights blew up without
    /// overflowing, and would carry the blow-up into the global model).
    fn diverged(&self) -> Option<String> {
        let (evaluation, training) = match self {
            Computed::Evaluated(e) => (e, None),
            Computed::Trained {
                evaluation,
                before,
                after,
                ..
            } => (evaluation, Some((*before, *after))),
        };
        let advice = "the model has diverged; lower the plan's learning rate (or clip the updates) and start a new run";
        if !evaluation.loss.is_finite() {
            return Some(format!(
                "the model's loss on this site's held-out data is {}: {advice}",
                evaluation.loss
            ));
        }
        match training {
            Some((before, after)) if !(before.is_finite() && after.is_finite()) => Some(format!(
                "the training loss went from {before} to {after}: {advice}"
            )),
            Some((before, after)) if after > DIVERGED_GROWTH * before.max(1.0) => Some(format!(
                "the training loss went from {before} to {after}, more than {DIVERGED_GROWTH} \
                 times its start: {advice}"
            )),
            _ => None,
        }
    }
}

/// How many times its starting value (or 1, if that was lower) a site's training loss may
/// grow in one job before the model counts as diverged. Training that merely goes badly (a
/// noisy DP-SGD round, a learning rate a little high) stays far below it; a blow-up is above.
const DIVERGED_GROWTH: f64 = 100.0;

/// The weights a training job starts from (safetensors): the round's global model, this
/// site's own FedBN batch-norm state, SCAFFOLD's correction.
struct Incoming<'a> {
    global: Option<&'a [u8]>,
    local: Option<&'a [u8]>,
    correction: Option<&'a [u8]>,
}

/// Mixed into a training job's seed for Ditto's own model, so that its batches are not the
/// global model's.
const DITTO_SEED: u64 = 0xd177_0000_0000_0001;

/// Mixed into a training job's seed for the epochs that fit this site's own layers, so that
/// their batches are not the whole model's.
const LOCAL_FIT_SEED: u64 = 0x10ca_1f17_0000_0001;

/// Mixed into an evaluation's seed for the epochs that fine-tune the version it scores.
const FINE_TUNE_SEED: u64 = 0xf1e7_0000_0000_0001;

/// The CPU/GPU-bound part, off the async runtime.
fn compute(
    job: &Job,
    plan: &Plan,
    site: Uuid,
    data: &Dataset,
    weights: Incoming<'_>,
    ledger: &Ledger,
) -> Result<(Computed, Option<Vec<u8>>), JobError> {
    let Incoming {
        global,
        local,
        correction,
    } = weights;
    let dev = device();
    let net = Net::new(plan, &dev)?;
    if let Some(g) = global {
        net.load_safetensors(g, |_| false)?;
    }
    let fedbn = plan.strategy == Strategy::FedBn;
    // What of this site's kept state replaces the global model's: FedBN's batch norm and the
    // layers it does not share; for a Ditto evaluation its whole own model (but the shared
    // spectrum of amplitude normalisation, which training used).
    let ditto_evaluation = plan.ditto.is_some() && job.kind == JobKind::Evaluate;
    let own = |name: &str| {
        if ditto_evaluation {
            name != crate::harmonise::AMPLITUDE
        } else {
            (fedbn && is_batch_norm(name)) || plan.is_local(name)
        }
    };
    if let Some(l) = local {
        net.load_safetensors(l, |name| !own(name))
            .map_err(|e| {
                JobError::Failed(format!(
                    "this site's own layers of this run (FedBN's batch norm, the layers it does not share, Ditto's model) are unreadable: {e}"
                ))
            })?;
    }
    // HarmoFL's amplitude normalisation, to the model's mean spectrum (or, in this site's
    // first job of the run, to its training split's, which its update then carries).
    let harmonised = crate::harmonise::site_samples(&net, plan, &data.samples)?;
    let samples = harmonised.as_deref().unwrap_or(&data.samples);
    let holdout: Vec<&Sample> = samples.iter().filter(|s| s.holdout).collect();
    let train: Vec<&Sample> = samples.iter().filter(|s| !s.holdout).collect();
    // Dataset normalisation by the plan's statistics, else by this site's training split's
    // (which stay here, like the images), for training and held-out images alike.
    let plan = &plan.with_statistics(train.iter().map(|s| s.pixels.as_slice()));
    if train.is_empty() && holdout.is_empty() {
        return Err(JobError::Failed(format!(
            "no usable images at this site ({} files skipped)",
            data.skipped.len()
        )));
    }
    if let Some(bad) = data
        .samples
        .iter()
        .find(|s| s.label as usize >= plan.num_classes)
    {
        return Err(JobError::Failed(format!(
            "{} has label {}, but the plan's model has {} classes",
            bad.source, bad.label, plan.num_classes
        )));
    }
    // A segmentation plan needs masks the plan's labels name; a classifier, images without.
    match &plan.segmentation {
        Some(seg) => {
            for s in &data.samples {
                crate::train::mask_classes(s, seg)?;
            }
        }
        None => {
            if let Some(s) = data.samples.iter().find(|s| s.mask.is_some()) {
                return Err(JobError::Failed(format!(
                    "this site's data pairs images with masks ({} and others), and the plan trains a classifier: a study of this dataset needs a segmentation plan (architecture = \"unet\")",
                    s.source
                )));
            }
        }
    }
    let seed = plan.seed
        ^ u64::from(job.round).wrapping_mul(0x1000_0001)
        ^ u64::from_le_bytes(site.as_bytes()[..8].try_into().unwrap_or([0; 8]));
    // FLOP with local_fit_epochs: this site's own layers first fit the shared layers that
    // arrived (FedRep's order), in a training job before the whole model trains, and in an
    // evaluation before the version is scored: the personalised model a site scores and uses
    // is its own layers fitted to the version's shared ones, not last round's layers on them.
    // In an evaluation the fitted layers are not kept (the next training job fits again).
    if plan.local_fit_epochs > 0 && !train.is_empty() {
        net.train_only(
            &train,
            plan,
            (plan.local_fit_epochs, seed ^ LOCAL_FIT_SEED),
            |name| plan.is_local(name),
        )?;
    }
    if job.kind == JobKind::Evaluate {
        // Personalisation by fine-tuning: the version this site scores is a copy of it
        // trained further (its `fine_tune_layers`, or every layer) on this site's training
        // split; nothing of it is kept.
        if plan.fine_tune_epochs > 0 && !train.is_empty() {
            net.train_only(
                &train,
                plan,
                (plan.fine_tune_epochs, seed ^ FINE_TUNE_SEED),
                |name| plan.is_fine_tuned(name),
            )?;
        }
        return Ok((Computed::Evaluated(net.evaluate(&holdout, plan)?), None));
    }
    let evaluation = net.evaluate(&holdout, plan)?;
    let reference = net.weights()?;
    let before = net.evaluate(&train, plan)?.loss;
    let privacy = match plan.dp_sgd {
        Some(dp) => {
            let (step, spent) = spend_privacy(job, plan, &dp, &train, ledger)?;
            net.train_dp(&train, plan, seed, &step)?;
            Some(Box::new(spent))
        }
        None => {
            let correction = correction.map(|c| net.correction(c)).transpose()?;
            net.train_corrected(&train, plan, seed, correction.as_deref())?;
            None
        }
    };
    let after = net.evaluate(&train, plan)?.loss;
    // What leaves the site: every weight but the layers it keeps (`local_layers`).
    let sent = |name: &str| !plan.is_local(name);
    // Under secure aggregation the noise is the sites' shares of it, added to the masked
    // input (`secure::input`); the clipping is the same.
    if let Some(c) = plan.clipping {
        let noise = if plan.secure_aggregation.is_some() {
            0.0
        } else {
            c.noise_multiplier
        };
        protect(&net, &reference, c.clip_norm, noise, sent)?;
    }
    let change = match plan.secure_aggregation {
        Some(_) => {
            let now = net.weights()?;
            let mut names: Vec<&String> = now.keys().filter(|n| sent(n)).collect();
            names.sort();
            let mut change = Vec::new();
            for name in names {
                let ((_, w), Some((_, g))) = (&now[name], reference.get(name)) else {
                    return Err(JobError::Failed(format!(
                        "the model's {name} has no value before training"
                    )));
                };
                change.extend(w.iter().zip(g).map(|(a, b)| a - b));
            }
            Some(change)
        }
        None => None,
    };
    // The layers that stay at the site are not in what is sent.
    let bytes = net.to_safetensors_without(|name| !sent(name))?;
    let kept = match plan.ditto {
        // Ditto: this site's own model, from its last round's (or the global model in its
        // first), trained on the same images towards the global model this round started from.
        Some(lambda) => {
            let personal = Net::new(plan, &dev)?;
            match local {
                Some(l) => personal.load_safetensors(l, |_| false)?,
                None => personal.set_weights(&reference)?,
            }
            personal.train_towards(&train, plan, seed ^ DITTO_SEED, &reference, lambda)?;
            Some(personal.to_safetensors()?)
        }
        None => (fedbn || !plan.local_layers.is_empty())
            .then(|| net.to_safetensors())
            .transpose()?,
    };
    Ok((
        Computed::Trained {
            samples: train.len() as u64,
            evaluation,
            before,
            after,
            skipped: data.skipped.clone(),
            privacy,
            kept,
            change,
        },
        Some(bytes),
    ))
}

/// This round's DP-SGD at this site: the sampling rate and steps from the site's patient count
/// and the plan's batch size and epochs, σ from the plan or derived so that the whole run stays
/// within the approved ε (`Plan::dp_round`, as the server reserved it).
fn spend_privacy(
    job: &Job,
    plan: &Plan,
    dp: &consilium_core::plan::DpSgd,
    train: &[&Sample],
    ledger: &Ledger,
) -> Result<(DpStep, PrivacySpent), JobError> {
    let cost = plan.dp_round(dp, data::patients(train.iter().copied()));
    spend(job, cost, (dp.epsilon, dp.delta), dp.max_grad_norm, ledger)
}

/// A private preview's DP-SGD at this site: its generator's cost from the site's patient count
/// (`preview::dp_cost`, as the server reserved it).
fn spend_on_preview(
    job: &Job,
    dp: &consilium_core::preview::PreviewPrivacy,
    data: &Dataset,
    ledger: &Ledger,
) -> Result<(crate::preview::Private, PrivacySpent), JobError> {
    let cost = consilium_core::preview::dp_cost(dp, data::patients(data.train()));
    let (step, spent) = spend(job, cost, (dp.epsilon, dp.delta), dp.max_grad_norm, ledger)?;
    let epsilon = spent.epsilon_round;
    Ok((crate::preview::Private { step, epsilon }, spent))
}

/// Checks a private job's cost against the approved (ε, δ) of its run or preview and the
/// dataset's lifetime budget in the site's ledger and records it there, before any training;
/// returns how to train and what to report.
fn spend(
    job: &Job,
    cost: Result<consilium_core::plan::DpRound, consilium_core::plan::DpRoundError>,
    (epsilon, delta): (f64, f64),
    max_grad_norm: f64,
    ledger: &Ledger,
) -> Result<(DpStep, PrivacySpent), JobError> {
    let consilium_core::plan::DpRound {
        patients,
        sampling_rate,
        noise_multiplier,
        steps,
        rdp,
    } = cost.map_err(|e| match e {
        consilium_core::plan::DpRoundError::NoPatients => JobError::Failed(e.to_string()),
        _ => JobError::Refused(e.to_string()),
    })?;
    let spent = ledger
        .spend(
            Entry {
                job_id: job.job_id,
                run_id: job.run_id,
                study_id: job.study_id,
                round: job.round,
                at: Utc::now(),
                patients,
                sampling_rate,
                noise_multiplier,
                steps,
                rdp: rdp.clone(),
                preview: job.kind == JobKind::Preview,
            },
            &Spending {
                run_epsilon: epsilon,
                run_delta: delta,
            },
        )
        .map_err(JobError::Refused)?;
    Ok((
        DpStep {
            sampling_rate,
            noise_multiplier,
            max_grad_norm,
            steps,
        },
        PrivacySpent {
            patients,
            sampling_rate,
            noise_multiplier,
            steps,
            delta,
            epsilon_round: spent.epsilon_round,
            epsilon_run: spent.epsilon_run,
            epsilon_dataset: spent.epsilon_dataset,
            rdp,
        },
    ))
}

/// Clips the update (local − global) to an L2 norm and adds Gaussian noise of
/// `noise_multiplier × clip` per coordinate (the Gaussian mechanism of DP-FedAvg), over the
/// weights `sent` picks: what leaves the site. The layers a site keeps (`local_layers`) count
/// for neither, and stay as trained.
fn protect(
    net: &Net,
    reference: &crate::train::NamedWeights,
    clip: f64,
    noise_multiplier: f64,
    sent: impl Fn(&str) -> bool,
) -> Result<(), JobError> {
    let local = net.weights()?;
    let mut names: Vec<&String> = local.keys().filter(|n| sent(n)).collect();
    names.sort();
    let mut norm2 = 0f64;
    for name in &names {
        if let (Some((_, w)), Some((_, g))) = (local.get(*name), reference.get(*name)) {
            norm2 += w
                .iter()
                .zip(g)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>();
        }
    }
    let scale = (clip / norm2.sqrt().max(1e-12)).min(1.0);
    let sigma = noise_multiplier * clip;
    // Noise nobody can regenerate: from the operating system's generator, never the plan's
    // seed (which the server knows).
    let mut rng = Rng::from_entropy();
    let mut out = HashMap::new();
    for name in names {
        let (shape, w) = &local[name];
        let Some((_, g)) = reference.get(name) else {
            continue;
        };
        let protected = w
            .iter()
            .zip(g)
            .map(|(a, b)| b + ((f64::from(a - b) * scale) + sigma * rng.normal()) as f32)
            .collect();
        out.insert(name.clone(), (shape.clone(), protected));
    }
    Ok(net.set_weights(&out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained(before: f64, after: f64) -> Computed {
        Computed::Trained {
            samples: 10,
            evaluation: consilium_core::protocol::Metrics {
                loss: 0.7,
                accuracy: 0.5,
                auroc: None,
                samples: 4,
                segmentation: None,
            },
            before,
            after,
            skipped: Vec::new(),
            privacy: None,
            kept: None,
            change: None,
        }
    }

    /// A learning rate that blows the weights up does not always overflow them: the loss can
    /// end finite and huge (CI once saw 0.81 → 496215). That is divergence too.
    #[test]
    fn a_loss_that_explodes_without_overflowing_is_divergence() {
        let reason = trained(0.81, 496_215.5).diverged().unwrap();
        assert!(
            reason.contains("from 0.81 to 496215.5")
                && reason.contains("lower the plan's learning rate"),
            "{reason}"
        );
        assert!(trained(0.69, f64::NAN).diverged().is_some());
        assert!(trained(0.69, f64::INFINITY).diverged().is_some());
        // Training that goes badly but does not blow up is reported as it is.
        assert!(trained(0.69, 3.5).diverged().is_none());
        assert!(trained(0.01, 40.0).diverged().is_none());
        assert!(trained(2.3, 0.4).diverged().is_none());
    }
}
