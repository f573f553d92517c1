//! The simulator's attacking sites (`[sites.attack]`): each simulated site's artifacts go
//! through `Simulated`, which posts an honest site's update on the round's board and rewrites
//! an attacker's before it is handed over. The worker's code is the same for both; only the
//! simulation, which plays every site itself, can do this.

use consilium_core::aggregate::Weights;
use consilium_core::attack::Attack;
use consilium_core::protocol::{Job, JobKind};
use consilium_worker::artifacts::{ArtifactError, SiteArtifacts};
use rand::SeedableRng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

use crate::engine::weights;

/// The honest sites' updates of each round, as they hand them over.
#[derive(Default)]
pub struct Board {
    updates: Mutex<HashMap<(Uuid, u32), Vec<Weights>>>,
    posted: tokio::sync::Notify,
}

impl Board {
    fn post(&self, job: &Job, w: Weights) {
        if let Ok(mut u) = self.updates.lock() {
            // Only this round's and the last one's are still read.
            u.retain(|(run, round), _| *run != job.run_id || round + 1 >= job.round);
            u.entry((job.run_id, job.round)).or_default().push(w);
        }
        self.posted.notify_waiters();
    }

    fn honest(&self, job: &Job) -> Vec<Weights> {
        self.updates
            .lock()
            .map(|u| u.get(&(job.run_id, job.round)).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The round's honest updates once `count` are in, or those in by `deadline`.
    async fn wait_for(&self, job: &Job, count: usize) -> Vec<Weights> {
        loop {
            let notified = self.posted.notified();
            let got = self.honest(job);
            let left = (job.deadline - chrono::Utc::now())
                .to_std()
                .unwrap_or_default();
            if got.len() >= count || left.is_zero() {
                return got;
            }
            // Keep a margin before the deadline for training's own upload.
            let wait = left.saturating_sub(std::time::Duration::from_secs(5));
            if tokio::time::timeout(wait.max(std::time::Duration::from_millis(10)), notified)
                .await
                .is_err()
            {
                return self.honest(job);
            }
        }
    }
}

/// One simulated site's artifacts: honest (posting its updates) or attacking.
pub struct Simulated {
    pub inner: Arc<dyn SiteArtifacts>,
    pub attack: Option<Attack>,
    pub board: Arc<Board>,
    /// The simulation's sites and attackers.
    pub sites: usize,
    pub attackers: usize,
}

impl Simulated {
    async fn tamper(
        &self,
        attack: &Attack,
        job: &Job,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, ArtifactError> {
        let bad = |e: String| ArtifactError::Store(format!("the simulated attack: {e}"));
        let own = weights::from_safetensors(&bytes).map_err(bad)?;
        let global = match &job.global_model {
            Some(h) => weights::from_safetensors(&self.inner.model(job, h).await?).map_err(bad)?,
            None => own
                .iter()
                .map(|(k, t)| (k.clone(), t.zeros_like()))
                .collect(),
        };
        let honest = if attack.needs_honest() {
            self.board.wait_for(job, self.sites - self.attackers).await
        } else {
            Vec::new()
        };
        let refs: Vec<&Weights> = honest.iter().collect();
        // The noise attack's generator: a simulation's, seeded by the round (nothing secret).
        let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(job.round));
        let sent = attack.tamper(&global, &own, &refs, self.sites, self.attackers, &mut rng);
        weights::to_safetensors(&sent).map_err(bad)
    }
}

#[async_trait::async_trait]
impl SiteArtifacts for Simulated {
    async fn model(&self, job: &Job, hash: &str) -> Result<Vec<u8>, ArtifactError> {
        self.inner.model(job, hash).await
    }

    async fn secagg_post(
        &self,
        job: &Job,
        stage: consilium_core::secagg::wire::Stage,
        body: serde_json::Value,
    ) -> Result<(), ArtifactError> {
        self.inner.secagg_post(job, stage, body).await
    }

    async fn secagg_answer(
        &self,
        job: &Job,
        stage: consilium_core::secagg::wire::Stage,
    ) -> Result<Option<serde_json::Value>, ArtifactError> {
        self.inner.secagg_answer(job, stage).await
    }

    async fn upload(&self, job: &Job, bytes: Vec<u8>) -> Result<String, ArtifactError> {
        if job.kind != JobKind::Train {
            return self.inner.upload(job, bytes).await;
        }
        match &self.attack {
            // Nobody reads the honest updates (and under secure aggregation they are masked).
            None if self.attackers == 0 => self.inner.upload(job, bytes).await,
            None => {
                match weights::from_safetensors(&bytes) {
                    Ok(w) => self.board.post(job, w),
                    // The attackers that read the honest updates will go without this one.
                    Err(e) => {
                        tracing::warn!(job = %job.job_id, error = %e, "an honest simulated update could not be read for the attackers")
                    }
                }
                self.inner.upload(job, bytes).await
            }
            Some(attack) => {
                let sent = self.tamper(attack, job, bytes).await?;
                tracing::info!(job = %job.job_id, attack = %attack.describe(), "simulated attack: the update was rewritten");
                self.inner.upload(job, sent).await
            }
        }
    }
}

/// A copy of a labels CSV with every label `y` replaced by `classes - 1 - y` (the label-flip
/// attack), written to `to`.
pub fn flip_labels(
    from: &std::path::Path,
    to: &std::path::Path,
    classes: u32,
) -> anyhow::Result<()> {
    let mut reader = csv::Reader::from_path(from)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", from.display()))?;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut writer = csv::Writer::from_path(to)?;
    writer.write_record(reader.headers()?)?;
    for row in reader.records() {
        let row = row?;
        let mut fields: Vec<String> = row.iter().map(str::to_string).collect();
        if let Some(label) = fields.get_mut(1)
            && let Ok(y) = label.trim().parse::<u32>()
        {
            *label = Attack::LabelFlip {}.label(y, classes).to_string();
        }
        writer.write_record(&fields)?;
    }
    writer.flush()?;
    Ok(())
}
