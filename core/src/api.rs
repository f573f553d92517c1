//! The REST API's request and response bodies (under `/api/v1`).
//! Requests reject unknown fields so that a typo is an error, not a silently ignored value.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::manifest::TrainingPlanManifest;
use crate::role::Role;

#[cfg(feature = "server")]
use utoipa::{IntoParams, ToSchema};

macro_rules! dto {
    ($($item:item)*) => {
        $(
            #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
            #[cfg_attr(feature = "server", derive(ToSchema))]
            $item
        )*
    };
}

macro_rules! input {
    ($($item:item)*) => {
        $(
            #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
            #[cfg_attr(feature = "server", derive(ToSchema))]
            #[serde(deny_unknown_fields)]
            $item
        )*
    };
}

// ---------------------------------------------------------------- people and places

dto! {
    pub struct UserDto {
        pub id: Uuid,
        pub email: String,
        pub name: String,
        pub roles: Vec<Role>,
        /// Has a development-only local password.
        pub local_account: bool,
        /// Subject at the OpenID provider, once the person has signed in through it.
        pub oidc_subject: Option<String>,
        pub created_at: DateTime<Utc>,
    }

    pub struct SiteDto {
        pub id: Uuid,
        pub name: String,
        /// Users who decide data-access requests for this site.
        pub custodians: Vec<Uuid>,
        pub created_at: DateTime<Utc>,
    }

    pub struct CommitteeDto {
        pub id: Uuid,
        pub name: String,
        pub members: Vec<Uuid>,
        pub created_at: DateTime<Utc>,
    }
}

input! {
    pub struct CreateUser {
        pub email: String,
        pub name: String,
        pub roles: Vec<Role>,
        /// Sets a development-only local password (refused where local accounts are off).
        #[serde(default)]
        pub password: Option<String>,
    }

    pub struct SetRoles {
        pub roles: Vec<Role>,
    }

    pub struct CreateSite {
        pub name: String,
        #[serde(default)]
        pub custodians: Vec<Uuid>,
    }

    pub struct SetCustodians {
        pub custodians: Vec<Uuid>,
    }

    pub struct CreateCommittee {
        pub name: String,
        #[serde(default)]
        pub members: Vec<Uuid>,
    }

    pub struct SetMembers {
        pub members: Vec<Uuid>,
    }
}

// ---------------------------------------------------------------- studies

dto! {
    /// The data a study asks of one site.
    #[serde(deny_unknown_fields)]
    pub struct DataScope {
        /// DICOM modality, e.g. `CR`, `CT`, `MR`.
        pub modality: String,
        pub body_part: String,
        /// The label the model learns, e.g. `nodule`.
        pub label: String,
        /// Number of cases requested.
        pub cases: u32,
    }

    #[serde(deny_unknown_fields)]
    pub struct StudySite {
        pub site_id: Uuid,
        pub scope: DataScope,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StudyStatus {
    Draft,
    Submitted,
    ChangesRequested,
    Approved,
    Rejected,
}

impl StudyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StudyStatus::Draft => "draft",
            StudyStatus::Submitted => "submitted",
            StudyStatus::ChangesRequested => "changes_requested",
            StudyStatus::Approved => "approved",
            StudyStatus::Rejected => "rejected",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            StudyStatus::Draft,
            StudyStatus::Submitted,
            StudyStatus::ChangesRequested,
            StudyStatus::Approved,
            StudyStatus::Rejected,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

dto! {
    pub struct StudyDto {
        pub id: Uuid,
        pub title: String,
        pub protocol_text: String,
        /// Increases with every change of the protocol; a decision binds to one version.
        pub protocol_version: i32,
        pub purpose: String,
        pub committee_id: Uuid,
        pub researcher_id: Uuid,
        pub sites: Vec<StudySite>,
        pub status: StudyStatus,
        pub created_at: DateTime<Utc>,
        pub updated_at: DateTime<Utc>,
    }
}

input! {
    pub struct CreateStudy {
        pub title: String,
        pub protocol_text: String,
        pub purpose: String,
        pub committee_id: Uuid,
        pub sites: Vec<StudySite>,
    }

    /// Changes a draft, or amends an approved study (which then needs a new decision).
    pub struct UpdateStudy {
        #[serde(default)]
        pub title: Option<String>,
        #[serde(default)]
        pub protocol_text: Option<String>,
        #[serde(default)]
        pub purpose: Option<String>,
        #[serde(default)]
        pub sites: Option<Vec<StudySite>>,
    }
}

// ---------------------------------------------------------------- training plans

input! {
    pub struct PlanFileUpload {
        /// File name, e.g. `train.py`; no folders.
        pub name: String,
        /// The file's bytes, base64 (standard alphabet, padded).
        pub content_base64: String,
    }

    pub struct SubmitPlan {
        pub manifest: TrainingPlanManifest,
        #[serde(default)]
        pub files: Vec<PlanFileUpload>,
        /// Attachments of the study's latest plan version to carry into this one, by name
        /// (the portal keeps each unless it is unticked); a file uploaded under the same name
        /// replaces it. None is carried when empty.
        #[serde(default)]
        pub keep_files: Vec<String>,
    }
}

dto! {
    pub struct PlanFileDto {
        pub name: String,
        pub size: u64,
        pub sha256: String,
    }

    pub struct PlanDto {
        pub id: Uuid,
        pub study_id: Uuid,
        /// 1 for the first plan of a study, then one more for every change.
        pub version: i32,
        /// SHA-256 over the canonical form of the manifest and the files' digests.
        pub hash: String,
        pub manifest: TrainingPlanManifest,
        pub files: Vec<PlanFileDto>,
        pub submitted_by: Uuid,
        pub created_at: DateTime<Utc>,
    }

    pub struct PlanFileContent {
        pub name: String,
        pub content_base64: String,
    }
}

// ---------------------------------------------------------------- ethics review

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReviewDecision {
    Approve,
    RequestChanges,
    Reject,
}

impl ReviewDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewDecision::Approve => "approve",
            ReviewDecision::RequestChanges => "request_changes",
            ReviewDecision::Reject => "reject",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Approve, Self::RequestChanges, Self::Reject]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

input! {
    pub struct SubmitReview {
        pub decision: ReviewDecision,
        pub comments: String,
        /// Conditions attached to an approval.
        #[serde(default)]
        pub conditions: Option<String>,
        /// Required for an approval: when it lapses.
        #[serde(default)]
        pub expires_at: Option<DateTime<Utc>>,
    }
}

dto! {
    pub struct ReviewDto {
        pub id: Uuid,
        pub study_id: Uuid,
        pub committee_id: Uuid,
        pub reviewer_id: Uuid,
        pub decision: ReviewDecision,
        pub comments: String,
        pub conditions: Option<String>,
        pub expires_at: Option<DateTime<Utc>>,
        /// The protocol version this decision covers.
        pub protocol_version: i32,
        /// The training-plan hashes this decision covers.
        pub plan_hashes: Vec<String>,
        pub created_at: DateTime<Utc>,
    }
}

// ---------------------------------------------------------------- data access

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AccessStatus {
    Pending,
    Approved,
    Denied,
    Revoked,
}

impl AccessStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessStatus::Pending => "pending",
            AccessStatus::Approved => "approved",
            AccessStatus::Denied => "denied",
            AccessStatus::Revoked => "revoked",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Approved, Self::Denied, Self::Revoked]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AccessDecision {
    Approve,
    Deny,
}

input! {
    pub struct CreateAccessRequest {
        pub site_id: Uuid,
        /// Plan hashes the grant would allow; by default the study's latest plan.
        #[serde(default)]
        pub plan_hashes: Option<Vec<String>>,
        pub justification: String,
    }

    pub struct DecideAccessRequest {
        pub decision: AccessDecision,
        #[serde(default)]
        pub comment: Option<String>,
        /// Required for an approval: when the grant lapses.
        #[serde(default)]
        pub expires_at: Option<DateTime<Utc>>,
        /// Narrows the requested scope (never widens it); by default the requested scope.
        #[serde(default)]
        pub scope: Option<DataScope>,
    }

    pub struct RevokeAccess {
        pub reason: String,
    }
}

dto! {
    pub struct AccessRequestDto {
        pub id: Uuid,
        pub study_id: Uuid,
        pub site_id: Uuid,
        pub requester_id: Uuid,
        pub scope: DataScope,
        /// Training-plan hashes this grant allows to run on the site's data.
        pub plan_hashes: Vec<String>,
        pub justification: String,
        pub status: AccessStatus,
        pub decided_by: Option<Uuid>,
        pub decided_at: Option<DateTime<Utc>>,
        pub expires_at: Option<DateTime<Utc>>,
        pub comment: Option<String>,
        pub created_at: DateTime<Utc>,
    }
}

// ---------------------------------------------------------------- preflight and runs

dto! {
    pub struct PreflightReport {
        pub study_id: Uuid,
        /// The plan hash checked (the latest plan unless one was asked for).
        pub plan_hash: Option<String>,
        /// True when a run may be created now.
        pub ready: bool,
        /// Every condition not met, in words.
        pub unmet: Vec<String>,
    }

    pub struct RunDto {
        pub id: Uuid,
        pub study_id: Uuid,
        pub plan_hash: String,
        /// `created`, `running`, `paused`, `completed`, `failed` or `stopped`.
        pub status: String,
        /// The last round that closed (0 before the first).
        pub current_round: i32,
        /// Why the run stopped, paused or failed, in words.
        pub stop_reason: Option<String>,
        pub created_by: Uuid,
        /// The ethics decision in force when the run was created.
        pub review_id: Uuid,
        /// The data-access grants in force, one per participating site.
        pub grant_ids: Vec<Uuid>,
        pub created_at: DateTime<Utc>,
    }
}

input! {
    pub struct CreateRun {
        /// The plan to run; by default the study's latest plan.
        #[serde(default)]
        pub plan_hash: Option<String>,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct PreflightQuery {
    /// Check this plan hash instead of the latest plan.
    #[serde(default)]
    pub plan_hash: Option<String>,
}

/// Which job a site's output answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    /// The job's run (for a preview job, the preview request).
    pub run_id: Uuid,
    /// The job's round (0 for a preview).
    pub round: u32,
}

// ---------------------------------------------------------------- sign-in and tokens

input! {
    pub struct LocalLogin {
        pub email: String,
        pub password: String,
    }

    pub struct CreateToken {
        pub name: String,
        /// Roles the token may act with; each must be one of the owner's roles.
        pub roles: Vec<Role>,
        pub expires_at: DateTime<Utc>,
    }
}

dto! {
    pub struct MeDto {
        pub user: UserDto,
        /// The roles this request acts with (an API token may carry fewer than its owner).
        pub acting_roles: Vec<Role>,
    }

    pub struct AuthConfigDto {
        /// Development-only local accounts are enabled.
        pub local_accounts: bool,
        /// OpenID Connect sign-in is configured (`/api/v1/auth/oidc/login`).
        pub oidc: bool,
    }

    pub struct TokenDto {
        pub id: Uuid,
        pub user_id: Uuid,
        pub name: String,
        pub roles: Vec<Role>,
        pub expires_at: DateTime<Utc>,
        pub revoked_at: Option<DateTime<Utc>>,
        pub created_at: DateTime<Utc>,
    }

    pub struct TokenCreated {
        /// The secret, shown this once; only its hash is stored.
        pub token: String,
        pub info: TokenDto,
    }
}

// ---------------------------------------------------------------- audit

dto! {
    pub struct AuditEventDto {
        /// Position in the log, from 1.
        pub seq: i64,
        pub id: Uuid,
        pub at: DateTime<Utc>,
        /// Who acted: a user id, or `system`.
        pub actor: String,
        pub action: String,
        pub object_type: String,
        pub object_id: String,
        /// SHA-256 of the object's new state.
        pub digest: String,
        pub prev_hash: String,
        pub hash: String,
    }

    pub struct BrokenEvent {
        pub seq: i64,
        pub id: Uuid,
        pub reason: String,
    }

    pub struct AuditVerification {
        /// True when every event's hash matches its content and its predecessor.
        pub ok: bool,
        pub events_checked: u64,
        /// The first event whose hash does not match, if any.
        pub first_broken: Option<BrokenEvent>,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    pub actor: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub object_type: Option<String>,
    #[serde(default)]
    pub object_id: Option<String>,
    /// Events at or after this time (RFC 3339, e.g. `2026-12-01T00:00:00Z`).
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    /// Events before this time (RFC 3339).
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    /// At most this many events (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Events after this sequence number (the page after, in log order).
    #[serde(default)]
    pub after_seq: Option<i64>,
    /// Events before this sequence number: the `limit` newest of them, still in log order
    /// (the page before; not together with `after_seq`).
    #[serde(default)]
    pub before_seq: Option<i64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    #[default]
    Jsonl,
    Csv,
    /// Every signed site update the server recorded, one `SignedUpdateDto` per line with its
    /// site's public key, for `consilium verify-lineage` to check offline.
    Signatures,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `jsonl` (default), `csv`, or `signatures` (the signed site updates, JSON lines).
    #[serde(default)]
    pub format: Option<ExportFormat>,
    /// The events of `/audit/events`' filters only (every event when none is given; not
    /// with `signatures`).
    #[serde(default)]
    pub actor: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub object_type: Option<String>,
    #[serde(default)]
    pub object_id: Option<String>,
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
}

impl ExportQuery {
    /// The filters, as `/audit/events` takes them.
    pub fn filter(&self) -> AuditQuery {
        AuditQuery {
            actor: self.actor.clone(),
            action: self.action.clone(),
            object_type: self.object_type.clone(),
            object_id: self.object_id.clone(),
            from: self.from,
            to: self.to,
            ..AuditQuery::default()
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct AccessListQuery {
    #[serde(default)]
    pub site_id: Option<Uuid>,
    #[serde(default)]
    pub study_id: Option<Uuid>,
}

// ---------------------------------------------------------------- the federated engine

dto! {
    /// One site's part in a round.
    pub struct RoundSiteDto {
        pub site_id: Uuid,
        pub site_name: String,
        /// `waiting`, `trained`, `refused`, `failed` or `excluded`.
        pub status: String,
        pub reason: Option<String>,
        pub samples: Option<i64>,
        /// The incoming global model on this site's held-out split.
        pub evaluation: Option<crate::protocol::Metrics>,
        pub duration_ms: Option<i64>,
        /// What this round's update cost the site's patients under DP-SGD (none without it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub privacy: Option<crate::protocol::PrivacySpent>,
    }

    pub struct ExcludedSite {
        pub site_id: Uuid,
        pub reason: String,
    }

    pub struct RoundDto {
        pub number: i32,
        /// `collecting`, `aggregating`, `evaluated`, `closed` or `failed`.
        pub state: String,
        pub deadline: DateTime<Utc>,
        pub quorum: i32,
        pub sites: Vec<RoundSiteDto>,
        pub excluded: Vec<ExcludedSite>,
        pub model_version_id: Option<Uuid>,
        pub failure: Option<String>,
        /// Results received for this round that were not counted: late (after the deadline or
        /// the round's phase), or for a job the server never sent (e.g. an altered plan,
        /// refused by the site).
        pub not_counted: Vec<UncountedResult>,
    }

    /// A result the round did not count, kept for the record (and audited).
    pub struct UncountedResult {
        pub site_id: Uuid,
        pub job_id: Uuid,
        /// `trained`, `evaluated`, `refused` or `failed`.
        pub outcome: String,
        pub reason: Option<String>,
        pub received_at: DateTime<Utc>,
    }

    /// An update that went into a model version.
    pub struct Contribution {
        pub site_id: Uuid,
        pub site_name: String,
        pub update_hash: String,
        pub samples: u64,
        /// The incoming global model on the site's held-out split.
        pub evaluation: crate::protocol::Metrics,
        pub train_loss_before: f64,
        pub train_loss_after: f64,
        /// What the update cost the site's patients under DP-SGD: ε of the round, of the run
        /// and of the dataset, with σ, the sampling rate and the steps (none without DP-SGD).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub privacy: Option<crate::protocol::PrivacySpent>,
        /// The update's share of the new model, 0 (excluded) to 1 (see
        /// `aggregate::SiteWeight`); none in versions made before shares were recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub weight: Option<f64>,
        /// The robust strategy's outlier score of the update (higher is more suspect).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub score: Option<f64>,
        /// A robust strategy gave it less than half the round's median share.
        #[serde(default)]
        pub down_weighted: bool,
        /// SCAFFOLD: SHA-256 of the correction `c − c_i` the site added to its gradients this
        /// round (none in round 1, where every control variate is zero).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub correction: Option<String>,
        /// Partial sharing: the layers the site kept and did not send (its update is the
        /// rest; the server kept the model's own values of these).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub kept_at_site: Vec<String>,
    }

    /// A site a robust strategy down-weighted in `aggregate::FLAG_AFTER_ROUNDS` or more
    /// consecutive rounds of a run: its updates look unlike the others' (an attack, or a
    /// broken pipeline at the site). Shown to the researcher and to the site's custodians.
    pub struct SiteFlag {
        pub run_id: Uuid,
        pub study_id: Uuid,
        /// The study's title, where the server fills it in (site health).
        #[serde(default)]
        pub study_title: String,
        pub site_id: Uuid,
        pub site_name: String,
        pub strategy: String,
        /// The consecutive rounds it was down-weighted in, oldest first.
        pub rounds: Vec<u32>,
        /// Its share of each of those rounds' models.
        pub weights: Vec<f64>,
    }

    pub struct SiteEvaluation {
        pub site_id: Uuid,
        pub site_name: String,
        pub metrics: crate::protocol::Metrics,
    }

    /// The model evaluated at every site, and the sample-weighted mean.
    pub struct ModelEvaluation {
        pub global: crate::protocol::Metrics,
        pub sites: Vec<SiteEvaluation>,
    }

    pub struct ModelVersionDto {
        pub id: Uuid,
        pub run_id: Uuid,
        pub study_id: Uuid,
        pub round: i32,
        /// SHA-256 of the weights (safetensors).
        pub hash: String,
        pub parent_id: Option<Uuid>,
        pub plan_hash: String,
        pub strategy: String,
        pub review_id: Uuid,
        pub grant_ids: Vec<Uuid>,
        pub contributions: Vec<Contribution>,
        pub evaluation: Option<ModelEvaluation>,
        pub created_at: DateTime<Utc>,
        pub released_at: Option<DateTime<Utc>>,
        pub released_by: Option<Uuid>,
        /// How the version was aggregated when the plan asks for secure aggregation: the
        /// server saw only the sum of these sites' masked inputs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub secure_aggregation: Option<SecureAggregationRecord>,
    }

    /// A round under secure aggregation (SecAgg+), for the lineage: whose masked inputs are in
    /// the sum, who dropped out and whether their masks were removed, and the parameters.
    pub struct SecureAggregationRecord {
        /// The sites whose masked inputs the sum holds.
        pub summed: Vec<SecAggSite>,
        /// Sites that joined the key exchange and sent no masked input.
        pub dropped: Vec<SecAggSite>,
        /// Neighbours of each site (k) and the shares that rebuild a secret (t).
        pub neighbours: u32,
        pub threshold: u32,
        /// Each value of a site's change was clipped to ±clip.
        pub clip: f64,
        /// The standard deviation of the Gaussian noise the sum carries in all (each summed
        /// site added its share; 0 without `privacy.noise_multiplier`).
        #[serde(default)]
        pub noise_std: f64,
    }

    /// A site's part in a secure round.
    pub struct SecAggSite {
        pub site_id: Uuid,
        pub site_name: String,
        /// What happened: `summed`, or how it dropped out.
        pub status: String,
        /// A site that dropped out after the key exchange: its pairwise masks were removed
        /// with its neighbours' shares.
        #[serde(default)]
        pub recovered: bool,
    }

    /// Everything a model version stands on.
    pub struct LineageDto {
        pub model: ModelVersionDto,
        pub parent: Option<ModelVersionDto>,
        pub run: RunDto,
        pub round: RoundDto,
        pub plan: PlanDto,
        pub review: ReviewDto,
        pub grants: Vec<AccessRequestDto>,
        /// The sites' signed updates the version was aggregated from.
        #[serde(default)]
        pub signatures: Vec<SignedUpdateDto>,
    }

    /// A grant in force for a site, as its worker sees it.
    pub struct SiteGrantDto {
        pub study_id: Uuid,
        pub plan_hashes: Vec<String>,
        pub expires_at: DateTime<Utc>,
    }

    /// A site's worker as the server last heard it.
    pub struct SiteHealthDto {
        pub site_id: Uuid,
        pub site_name: String,
        /// `online` (heard within the last minute, idle), `training`, `offline` (heard
        /// before) or `never` (its worker has not reported yet).
        pub state: String,
        pub last_seen: Option<DateTime<Utc>>,
        /// The worker's version, as it reported it.
        pub version: Option<String>,
        /// What the worker says of its data; only for the site's custodians, administrators
        /// and auditors.
        pub data_summary: Option<String>,
        /// Runs in which robust aggregation kept down-weighting this site's updates; only for
        /// the site's custodians, administrators and auditors.
        #[serde(default)]
        pub flags: Vec<SiteFlag>,
    }

    pub struct HeartbeatDto {
        pub site_id: Uuid,
        pub state: String,
        pub data_summary: String,
        /// Patients in the site's training split, once its worker has read the data.
        pub patients: Option<i64>,
        pub version: String,
        pub at: DateTime<Utc>,
    }

    pub struct MonitoringReportDto {
        pub id: Uuid,
        pub model_version_id: Uuid,
        pub site_id: Uuid,
        pub metrics: crate::protocol::Metrics,
        pub note: Option<String>,
        pub reported_at: DateTime<Utc>,
    }
}

input! {
    pub struct StopRun {
        pub reason: String,
    }

    /// A site's monitoring metrics for a released model (lifecycle step 10).
    pub struct ReportMonitoring {
        pub site_id: Uuid,
        pub metrics: crate::protocol::Metrics,
        #[serde(default)]
        pub note: Option<String>,
    }

    pub struct CreateWorkerToken {
        pub name: String,
        pub expires_at: DateTime<Utc>,
    }

    /// A site's public signing key, registered by its custodian (`consilium-worker keygen`
    /// prints it).
    pub struct RegisterSiteKey {
        /// The Ed25519 public key: base64 of its 32 bytes.
        pub public_key: String,
        /// What it is, e.g. "worker on imaging-gw-2".
        pub name: String,
    }
}

dto! {
    /// The server's public job-signing key: workers pin it (`server_public_key`) and run only
    /// jobs signed with it. Compare it with what the administrator gave you before pinning it.
    pub struct ServerKeyDto {
        pub key_id: String,
        /// Base64 of the Ed25519 public key's 32 bytes.
        pub public_key: String,
    }

    /// A site's output of a job, as the server received it.
    pub struct OutputReceived {
        /// SHA-256 of the bytes that arrived, computed by the server.
        pub sha256: String,
        pub bytes: u64,
    }
}

dto! {
    pub struct SiteKeyDto {
        /// `ed25519:` and the first 16 hex digits of the key's SHA-256.
        pub key_id: String,
        pub site_id: Uuid,
        pub public_key: String,
        pub name: String,
        pub registered_by: String,
        pub registered_at: DateTime<Utc>,
        pub revoked_by: Option<String>,
        pub revoked_at: Option<DateTime<Utc>>,
    }

    /// One site update behind a model version, as its site signed it: anyone with the site's
    /// public key can check `signature` over `message` (`consilium verify-lineage`).
    pub struct SignedUpdateDto {
        pub site_id: Uuid,
        pub site_name: String,
        pub job_id: Uuid,
        pub update_hash: Option<String>,
        pub key_id: Option<String>,
        /// The signing key's public half, as registered.
        pub public_key: Option<String>,
        /// The worker message exactly as signed (JSON).
        pub message: Option<String>,
        pub signature: Option<String>,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(IntoParams))]
#[serde(deny_unknown_fields)]
pub struct ModelListQuery {
    #[serde(default)]
    pub run_id: Option<Uuid>,
    #[serde(default)]
    pub study_id: Option<Uuid>,
}

// ---------------------------------------------------------------- synthetic previews

input! {
    /// Asks a site for a synthetic preview of its data for this study (the study's researcher,
    /// with a data-access grant in force for the site).
    pub struct RequestPreview {
        pub site_id: Uuid,
        /// Synthetic images per class, 1 to 64 (default 12).
        #[serde(default)]
        pub per_class: Option<u32>,
        /// `cvae` (a class-conditional variational autoencoder) or `pca_gaussian` (a Gaussian
        /// over each class's principal components, for small datasets); by default the VAE
        /// where every class has at least 40 training images.
        #[serde(default)]
        pub generator: Option<String>,
        /// Train the generator with DP-SGD so that the set costs each patient at most this ε
        /// (spent from the site's dataset privacy ledger, like a training round). Required
        /// when the study's plan trains with DP-SGD; the generator is then `cvae`.
        #[serde(default)]
        pub epsilon: Option<f64>,
        /// δ of a private preview: by default the plan's DP-SGD δ, else 1e-5.
        #[serde(default)]
        pub delta: Option<f64>,
    }

    /// The site's custodian releases a checked preview set to the study's researcher, or
    /// rejects it.
    pub struct DecidePreview {
        /// `release` or `reject`.
        pub decision: String,
        pub comment: String,
    }
}

dto! {
    pub struct PreviewImageDto {
        /// Position in the set: `GET /previews/{id}/images/{index}` is the PNG.
        pub index: u32,
        pub label: u32,
    }

    /// One class of a segmentation plan's masks, as a preview draws it.
    pub struct PreviewClassDto {
        /// The value the site's masks give this class (the plan's `model.labels`).
        pub value: u16,
        pub name: String,
        /// The colour its pixels take over the images (CSS); none for the background.
        pub colour: Option<String>,
    }

    pub struct PreviewDto {
        pub id: Uuid,
        pub study_id: Uuid,
        pub site_id: Uuid,
        pub site_name: String,
        pub requested_by: Uuid,
        /// The grant that authorised it, and the plan hash the job ran under.
        pub grant_id: Uuid,
        pub plan_hash: String,
        /// `generating`, `awaiting_release`, `released`, `rejected` or `failed`.
        pub status: String,
        /// `pca_gaussian` or `cvae`.
        pub generator: Option<String>,
        /// The differential-privacy budget the set spends per patient (as the server's ledger
        /// reckons it); none when the generator was not private.
        pub epsilon: Option<f64>,
        /// δ of `epsilon`.
        pub delta: Option<f64>,
        /// The images (only for those who may see them: the site's custodian, and the
        /// researcher once released).
        pub images: Vec<PreviewImageDto>,
        /// A preview of segmentation data: the plan's mask classes, background first. Each
        /// image then comes with its synthetic mask (`GET /previews/{id}/images/{index}/mask`,
        /// PNG of the plan's mask values) and the mask drawn over it (`…/overlay`, PNG). Empty
        /// for a classifier's preview.
        pub classes: Vec<PreviewClassDto>,
        /// Images the memorisation check withheld (they never left the site).
        pub withheld: Option<u32>,
        pub memorisation: Option<crate::preview::MemorisationReport>,
        pub summary: Option<crate::preview::MetadataSummary>,
        /// Why the site could not make it.
        pub failure: Option<String>,
        pub decided_by: Option<Uuid>,
        pub decided_by_name: Option<String>,
        pub decided_at: Option<DateTime<Utc>>,
        pub comment: Option<String>,
        pub created_at: DateTime<Utc>,
        pub updated_at: DateTime<Utc>,
    }
}

// ---------------------------------------------------------------- privacy ledger

input! {
    /// A site's lifetime privacy budget for its dataset: the most ε any of its patients may
    /// spend over every study, at δ. Its custodian sets it; rounds that would exceed it are not
    /// sent to the site.
    pub struct SetPrivacyBudget {
        pub epsilon: f64,
        pub delta: f64,
    }
}

dto! {
    pub struct PrivacyBudgetDto {
        pub epsilon: f64,
        pub delta: f64,
        pub set_by: Uuid,
        pub set_at: DateTime<Utc>,
    }

    /// One private round at one site in the dataset's ledger.
    pub struct PrivacySpendDto {
        pub study_id: Uuid,
        /// The run, or for a preview the preview request.
        pub run_id: Uuid,
        /// `round` (a training round) or `preview` (a private preview's generator; round 0).
        pub purpose: String,
        pub round: i32,
        /// `reserved` (the job is out), `committed` (spent) or `released` (nothing was spent).
        pub state: String,
        pub patients: i64,
        pub sampling_rate: f64,
        pub noise_multiplier: f64,
        pub steps: i64,
        /// ε of this round alone, at the plan's δ.
        pub epsilon_round: f64,
        /// Why it was committed or released, where that is not the update being counted.
        pub note: Option<String>,
        pub updated_at: DateTime<Utc>,
    }

    /// What one study spent from the dataset.
    pub struct StudySpendingDto {
        pub study_id: Uuid,
        pub title: String,
        /// ε its rounds have spent (committed), at the ledger's δ.
        pub epsilon: f64,
        pub rounds_committed: u32,
        pub rounds_reserved: u32,
        /// Private previews committed.
        pub previews: u32,
    }

    /// A site's dataset privacy ledger: its budget, what every study spent from it and what is
    /// left. ε values are composed from the rounds' Rényi costs (which add up; ε does not), at
    /// the budget's δ, or the smallest δ of the plans that spent when no budget is set.
    pub struct DatasetPrivacyDto {
        pub site_id: Uuid,
        pub site_name: String,
        pub budget: Option<PrivacyBudgetDto>,
        /// The δ the ε values below are stated at (none before anything was spent or set).
        pub delta: Option<f64>,
        /// ε of every committed round.
        pub spent_epsilon: f64,
        /// ε of every committed round and every round whose job is out.
        pub spent_or_reserved_epsilon: f64,
        /// What the budget leaves once committed and reserved rounds are counted.
        pub remaining_epsilon: Option<f64>,
        pub studies: Vec<StudySpendingDto>,
        pub spends: Vec<PrivacySpendDto>,
    }
}

/// The sites a run's robust aggregation down-weighted in `aggregate::FLAG_AFTER_ROUNDS` or
/// more consecutive rounds, each with its latest such streak (`versions` in any order).
pub fn flagged_sites(versions: &[ModelVersionDto]) -> Vec<SiteFlag> {
    use std::collections::BTreeMap;
    let mut ordered: Vec<&ModelVersionDto> = versions.iter().collect();
    ordered.sort_by_key(|v| v.round);
    // Each site's current streak of down-weighted rounds, and the flags so far.
    let mut streaks: BTreeMap<Uuid, SiteFlag> = BTreeMap::new();
    let mut flags: BTreeMap<Uuid, SiteFlag> = BTreeMap::new();
    for v in ordered {
        let round = v.round.max(0) as u32;
        for c in &v.contributions {
            if !c.down_weighted {
                streaks.remove(&c.site_id);
                continue;
            }
            let streak = streaks.entry(c.site_id).or_insert_with(|| SiteFlag {
                run_id: v.run_id,
                study_id: v.study_id,
                study_title: String::new(),
                site_id: c.site_id,
                site_name: c.site_name.clone(),
                strategy: v.strategy.clone(),
                rounds: Vec::new(),
                weights: Vec::new(),
            });
            // A round the site sat out ends the streak.
            if streak.rounds.last().is_some_and(|&r| r + 1 != round) {
                streak.rounds.clear();
                streak.weights.clear();
            }
            streak.rounds.push(round);
            streak.weights.push(c.weight.unwrap_or(0.0));
            if streak.rounds.len() >= crate::aggregate::FLAG_AFTER_ROUNDS {
                flags.insert(c.site_id, streak.clone());
            }
        }
    }
    flags.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(round: i32, down: &[(Uuid, bool)]) -> ModelVersionDto {
        ModelVersionDto {
            id: Uuid::new_v4(),
            run_id: Uuid::nil(),
            study_id: Uuid::nil(),
            round,
            hash: String::new(),
            parent_id: None,
            plan_hash: String::new(),
            strategy: "dos".into(),
            review_id: Uuid::nil(),
            grant_ids: Vec::new(),
            contributions: down
                .iter()
                .map(|&(site_id, down_weighted)| Contribution {
                    site_id,
                    site_name: format!("site {site_id}"),
                    update_hash: String::new(),
                    samples: 1,
                    evaluation: Default::default(),
                    train_loss_before: 0.0,
                    train_loss_after: 0.0,
                    privacy: None,
                    weight: Some(if down_weighted { 0.01 } else { 0.3 }),
                    score: Some(1.0),
                    down_weighted,
                    correction: None,
                    kept_at_site: Vec::new(),
                })
                .collect(),
            evaluation: None,
            created_at: Utc::now(),
            released_at: None,
            released_by: None,
            secure_aggregation: None,
        }
    }

    #[test]
    fn a_site_is_flagged_after_three_consecutive_down_weighted_rounds() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        // a: down in 1, 2, 3 (flagged) and 4; b: down in 1, 2, up in 3, down in 4, 5.
        let mut runs = vec![
            version(4, &[(a, true), (b, true)]),
            version(2, &[(a, true), (b, true)]),
            version(1, &[(a, true), (b, true)]),
            version(3, &[(a, true), (b, false)]),
        ];
        let flags = flagged_sites(&runs);
        assert_eq!(flags.len(), 1, "{flags:?}");
        assert_eq!(
            (flags[0].site_id, flags[0].rounds.clone()),
            (a, vec![1, 2, 3, 4])
        );
        assert_eq!(flags[0].weights, vec![0.01; 4]);
        runs.push(version(5, &[(b, true)]));
        assert!(flagged_sites(&runs).iter().all(|f| f.site_id == a));
        // A round b sat out ends its streak; three in a row again flag it.
        runs.push(version(7, &[(b, true)]));
        runs.push(version(8, &[(b, true)]));
        assert!(flagged_sites(&runs).iter().all(|f| f.site_id == a));
        runs.push(version(9, &[(b, true)]));
        let flags = flagged_sites(&runs);
        assert_eq!(
            flags
                .iter()
                .find(|f| f.site_id == b)
                .map(|f| f.rounds.clone()),
            Some(vec![7, 8, 9])
        );
    }
}
