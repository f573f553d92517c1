//! The wire protocol between the server and the site workers (JSON over the broker).
//! Model weights never travel here: messages carry the SHA-256 of a safetensors file in the
//! artifact store.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::manifest::TrainingPlanManifest;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Evaluate the global model on the held-out split, then train it locally.
    Train,
    /// Evaluate the global model on the held-out split only.
    Evaluate,
    /// Fit a generator to the training split and send back a checked synthetic preview set.
    Preview,
}

/// A job for one site. `job_id` is the idempotency key: the server counts its result once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The protocol the server speaks (`PROTOCOL_VERSION`); a worker refuses jobs of a newer
    /// protocol than its own, with that reason.
    #[serde(default = "first_protocol")]
    pub protocol: u32,
    pub job_id: Uuid,
    pub kind: JobKind,
    pub run_id: Uuid,
    pub round: u32,
    pub study_id: Uuid,
    pub site_id: Uuid,
    /// The approved plan's hash; the worker re-hashes `manifest` (with `files`) and checks both.
    pub plan_hash: String,
    pub manifest: TrainingPlanManifest,
    /// Names and SHA-256 of the plan's attached files, which are part of its hash.
    #[serde(default)]
    pub files: Vec<(String, String)>,
    /// SHA-256 of the global model (safetensors) in the artifact store; none in round 1.
    pub global_model: Option<String>,
    pub deadline: DateTime<Utc>,
    /// For a preview job: what to generate. `run_id` then names the preview request.
    #[serde(default)]
    pub preview: Option<crate::preview::PreviewSpec>,
    /// SCAFFOLD: SHA-256 of this site's correction `c − c_i` (safetensors) in the artifact
    /// store, which the site adds to every gradient; none in round 1 (all control variates are
    /// zero) and for other strategies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction: Option<String>,
}

/// The job protocol this build speaks. 2: typed plans (a worker refuses a plan it cannot run).
/// 3: every worker message signed with the site's registered key (`signing`).
/// 4: every job signed with the server's key, which workers pin; workers report the jobs they
/// refused for their signature (`WorkerMessage::JobRejected`).
/// 5: private previews (`PreviewSpec::dp`): a worker that would ignore the request for DP-SGD
/// must refuse the job instead.
/// 6: SCAFFOLD (`Job::correction`): a worker that would train without the correction must
/// refuse the job instead.
/// 7: secure aggregation (`privacy.secure_aggregation`): the worker masks its update through
/// the four SecAgg+ exchanges (`secagg::wire`) and hands over only the masked input.
pub const PROTOCOL_VERSION: u32 = 7;

fn first_protocol() -> u32 {
    1
}

/// Metrics on a labelled split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Metrics {
    pub loss: f64,
    pub accuracy: f64,
    /// Area under the ROC curve (one-vs-rest, averaged over classes); none when the split
    /// lacks positives or negatives.
    pub auroc: Option<f64>,
    pub samples: u64,
    /// A segmentation model's scores (its `accuracy` is then the share of pixels labelled
    /// right); absent for a classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<crate::segmentation::SegmentationScores>,
}

impl Metrics {
    /// The figure a model is judged by, with its name: a segmentation model's mean Dice, a
    /// classifier's accuracy.
    pub fn headline(&self) -> (&'static str, Option<f64>) {
        match &self.segmentation {
            Some(s) => ("mean Dice", s.mean_dice),
            None => ("accuracy", Some(self.accuracy)),
        }
    }

    /// In words, as the portal and the CLI show it: "accuracy 0.912, loss 0.210", or for a
    /// segmentation model "mean Dice 0.905, HD95 0.95 px, pixel accuracy 0.990, loss 0.123"
    /// (a score the split cannot give, such as HD95 without a predicted lesion, left out).
    pub fn summary(&self) -> String {
        let Some(s) = &self.segmentation else {
            return format!("accuracy {:.3}, loss {:.3}", self.accuracy, self.loss);
        };
        let mut parts = Vec::new();
        match s.mean_dice {
            Some(d) => parts.push(format!("mean Dice {d:.3}")),
            None => parts.push("no Dice (no lesion in the masks or the predictions)".into()),
        }
        if let Some(h) = s.hd95 {
            parts.push(format!("HD95 {h:.2} px"));
        }
        parts.push(format!("pixel accuracy {:.3}", self.accuracy));
        parts.push(format!("loss {:.3}", self.loss));
        parts.join(", ")
    }
}

/// A file a data handler could not use, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Skipped {
    pub file: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Trained {
        /// SHA-256 of the update (safetensors) in the artifact store.
        update_hash: String,
        /// Training samples.
        samples: u64,
        /// The incoming global model on the held-out split.
        evaluation: Metrics,
        /// Mean training loss on the incoming model's first pass and after local training.
        train_loss_before: f64,
        train_loss_after: f64,
        duration_ms: u64,
        skipped: Vec<Skipped>,
        /// What this update cost the site's patients under the plan's DP-SGD (none without it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        privacy: Option<Box<PrivacySpent>>,
    },
    Evaluated {
        evaluation: Metrics,
        duration_ms: u64,
    },
    /// A preview set, checked, in the artifact store (JSON, `PreviewSet`).
    Previewed {
        /// SHA-256 of the preview set in the artifact store.
        set: String,
        /// Images in the set, and images withheld as too close to a real one.
        images: u32,
        withheld: u32,
        duration_ms: u64,
        /// What training the generator with DP-SGD cost, as the site's ledger recorded it
        /// (`None`: the preview was not private).
        #[serde(default)]
        privacy: Option<PrivacySpent>,
    },
    /// The worker would not run the job (e.g. the plan is not approved for this site).
    Refused { reason: String },
    /// The job failed at the site (e.g. no usable data).
    Failed { reason: String },
}

/// The privacy a site spent on one round's update (DP-SGD), as its own ledger recorded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct PrivacySpent {
    /// Patients (the unit of privacy) in the site's training split.
    pub patients: u64,
    /// Each patient's chance of being in a step's batch (Poisson sampling).
    pub sampling_rate: f64,
    /// σ: the noise's standard deviation over the clipping norm.
    pub noise_multiplier: f64,
    /// Noisy steps this round.
    pub steps: u64,
    /// δ the ε values below are stated at (the plan's).
    pub delta: f64,
    /// ε this round alone (the tighter conversion).
    pub epsilon_round: f64,
    /// ε of this run at this site so far, this round included.
    pub epsilon_run: f64,
    /// ε this site's dataset has spent over every run its ledger knows of, this round included,
    /// at the site's lifetime δ when it set one (else the plan's).
    pub epsilon_dataset: f64,
    /// The Rényi costs of this round, order by order (they add up across rounds and runs).
    pub rdp: crate::privacy::RdpCost,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub job_id: Uuid,
    pub run_id: Uuid,
    pub round: u32,
    pub site_id: Uuid,
    /// The kind of job this answers (absent from workers before protocol 2).
    #[serde(default)]
    pub kind: Option<JobKind>,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Training,
}

/// What a worker says every few seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    pub site_id: Uuid,
    pub state: WorkerState,
    /// e.g. "412 images (dicom), 3 skipped".
    pub data_summary: String,
    /// Patients (the unit of privacy) in the site's training split, once the data is read: the
    /// server works out a private round's cost from it to reserve it before the job goes out.
    /// A count only; no patient's identity leaves the site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients: Option<u64>,
    pub version: String,
    pub at: DateTime<Utc>,
}

/// A message on the site's job queue that the worker refused before reading it as a job: not
/// signed with the server key the worker pins (forged, altered, or from another server).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectedJob {
    pub site_id: Uuid,
    /// Why it was refused.
    pub reason: String,
    /// SHA-256 of the message as it arrived, to find it on the dead-letter queue.
    pub message_sha256: String,
    pub at: DateTime<Utc>,
}

/// Everything a worker sends to the server, on the one results queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Result(JobResult),
    Heartbeat(Heartbeat),
    JobRejected(RejectedJob),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segmentation::SegmentationScores;

    #[test]
    fn a_segmentation_model_is_summarised_by_its_dice() {
        let classifier = Metrics {
            loss: 0.21,
            accuracy: 0.9124,
            auroc: Some(0.95),
            samples: 40,
            segmentation: None,
        };
        assert_eq!(classifier.headline(), ("accuracy", Some(0.9124)));
        assert_eq!(classifier.summary(), "accuracy 0.912, loss 0.210");
        let mut segmenter = Metrics {
            loss: 0.1234,
            accuracy: 0.99,
            auroc: None,
            samples: 40,
            segmentation: Some(SegmentationScores {
                dice: vec![Some(0.9051)],
                mean_dice: Some(0.9051),
                mean_iou: Some(0.83),
                hd95: Some(0.951),
            }),
        };
        assert_eq!(segmenter.headline(), ("mean Dice", Some(0.9051)));
        assert_eq!(
            segmenter.summary(),
            "mean Dice 0.905, HD95 0.95 px, pixel accuracy 0.990, loss 0.123"
        );
        segmenter.segmentation = Some(SegmentationScores {
            dice: vec![None],
            mean_dice: None,
            mean_iou: None,
            hd95: None,
        });
        assert_eq!(segmenter.headline(), ("mean Dice", None));
        assert_eq!(
            segmenter.summary(),
            "no Dice (no lesion in the masks or the predictions), pixel accuracy 0.990, loss 0.123"
        );
    }
}
