//! sea-orm entities: the database rows. They are never the API contract; services map
//! them to the DTOs in `consilium_core::api`.

macro_rules! entity {
    ($module:ident, $table:literal, { $($field:tt)* }) => {
        pub mod $module {
            use sea_orm::entity::prelude::*;

            #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
            #[sea_orm(table_name = $table)]
            pub struct Model { $($field)* }

            #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
            pub enum Relation {}

            impl ActiveModelBehavior for ActiveModel {}
        }
    };
}

entity!(user, "users", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    #[sea_orm(unique)]
    pub email: String,
    pub name: String,
    pub roles: Json,
    pub password_hash: Option<String>,
    pub oidc_subject: Option<String>,
    pub created_at: DateTimeUtc,
});

entity!(site, "sites", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub name: String,
    pub custodians: Json,
    pub created_at: DateTimeUtc,
});

entity!(committee, "committees", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub name: String,
    pub members: Json,
    pub created_at: DateTimeUtc,
});

entity!(study, "studies", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub title: String,
    pub protocol_text: String,
    pub protocol_version: i32,
    pub purpose: String,
    pub committee_id: Uuid,
    pub researcher_id: Uuid,
    pub sites: Json,
    pub status: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
});

entity!(plan, "plans", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub study_id: Uuid,
    pub version: i32,
    pub hash: String,
    pub manifest: Json,
    /// `[{name, size, sha256, content_base64}]`
    pub files: Json,
    pub submitted_by: Uuid,
    pub created_at: DateTimeUtc,
});

entity!(review, "reviews", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub study_id: Uuid,
    pub committee_id: Uuid,
    pub reviewer_id: Uuid,
    pub decision: String,
    pub comments: String,
    pub conditions: Option<String>,
    pub expires_at: Option<DateTimeUtc>,
    pub protocol_version: i32,
    pub plan_hashes: Json,
    pub created_at: DateTimeUtc,
});

entity!(access_request, "access_requests", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub study_id: Uuid,
    pub site_id: Uuid,
    pub requester_id: Uuid,
    pub scope: Json,
    pub plan_hashes: Json,
    pub justification: String,
    pub status: String,
    pub decided_by: Option<Uuid>,
    pub decided_at: Option<DateTimeUtc>,
    pub expires_at: Option<DateTimeUtc>,
    pub comment: Option<String>,
    pub created_at: DateTimeUtc,
});

entity!(run, "runs", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub study_id: Uuid,
    pub plan_hash: String,
    pub status: String,
    pub created_by: Uuid,
    pub review_id: Uuid,
    pub grant_ids: Json,
    pub created_at: DateTimeUtc,
    pub current_round: i32,
    pub stop_reason: Option<String>,
    /// FedAdam/FedYogi server moments (JSON), kept between rounds.
    pub server_state: Option<String>,
});

entity!(api_token, "api_tokens", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub token_hash: String,
    pub roles: Json,
    pub expires_at: DateTimeUtc,
    pub revoked_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    /// Set for a site worker's token: it may act only for that site.
    pub site_id: Option<Uuid>,
});

entity!(session, "sessions", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id_hash: String,
    pub user_id: Uuid,
    pub expires_at: DateTimeUtc,
    pub created_at: DateTimeUtc,
});

entity!(oidc_pending, "oidc_pending", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub state: String,
    pub pkce_verifier: String,
    pub nonce: String,
    pub created_at: DateTimeUtc,
});

entity!(audit_event, "audit_events", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub seq: i64,
    pub id: Uuid,
    pub at: DateTimeUtc,
    pub actor: String,
    pub action: String,
    pub object_type: String,
    pub object_id: String,
    pub digest: String,
    pub prev_hash: String,
    pub hash: String,
});

entity!(round, "rounds", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub run_id: Uuid,
    pub number: i32,
    pub state: String,
    pub deadline: DateTimeUtc,
    pub quorum: i32,
    pub sites: Json,
    /// `[{site_id, reason}]`
    pub excluded: Json,
    pub global_in: Option<String>,
    pub model_version_id: Option<Uuid>,
    pub failure: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
});

entity!(update, "updates", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub run_id: Uuid,
    pub round: i32,
    pub site_id: Uuid,
    #[sea_orm(unique)]
    pub job_id: Uuid,
    pub kind: String,
    pub outcome: String,
    pub update_hash: Option<String>,
    pub samples: Option<i64>,
    pub evaluation: Option<Json>,
    pub train_loss_before: Option<f64>,
    pub train_loss_after: Option<f64>,
    pub duration_ms: Option<i64>,
    pub reason: Option<String>,
    pub skipped: Option<Json>,
    pub late: bool,
    pub received_at: DateTimeUtc,
    /// The worker message exactly as signed, its key and signature (protocol 3 on).
    pub signed_message: Option<String>,
    pub key_id: Option<String>,
    pub signature: Option<String>,
    /// What a DP-SGD update cost its site's patients (`PrivacySpent`), checked on arrival.
    pub privacy: Option<Json>,
});

entity!(site_key, "site_keys", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub key_id: String,
    pub site_id: Uuid,
    /// The Ed25519 public key, base64 of its 32 bytes.
    pub public_key: String,
    pub name: String,
    pub registered_by: String,
    pub registered_at: DateTimeUtc,
    pub revoked_by: Option<String>,
    pub revoked_at: Option<DateTimeUtc>,
});

entity!(site_output, "site_outputs", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub job_id: Uuid,
    pub site_id: Uuid,
    pub run_id: Uuid,
    /// SHA-256 of what arrived, computed by the server.
    pub hash: String,
    pub bytes: i64,
    pub received_at: DateTimeUtc,
});

entity!(model_version, "model_versions", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub run_id: Uuid,
    pub study_id: Uuid,
    pub round: i32,
    pub hash: String,
    pub parent_id: Option<Uuid>,
    pub plan_hash: String,
    pub review_id: Uuid,
    pub grant_ids: Json,
    pub strategy: String,
    pub contributions: Json,
    pub evaluation: Option<Json>,
    pub created_at: DateTimeUtc,
    pub released_at: Option<DateTimeUtc>,
    pub released_by: Option<Uuid>,
    /// `SecureAggregationRecord`, for a version made under secure aggregation.
    pub secure_aggregation: Option<Json>,
});

entity!(secagg_message, "secagg_messages", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub run_id: Uuid,
    pub round: i32,
    /// `keys`, `shares`, `masked`, `reveals`, each stage's closing (`keys.closed`, …) and
    /// the round's sum (`sum`).
    pub stage: String,
    /// The site that posted it; nil for a closing.
    pub site_id: Uuid,
    pub body: Json,
    pub created_at: DateTimeUtc,
});

entity!(monitoring_report, "monitoring_reports", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub model_version_id: Uuid,
    pub site_id: Uuid,
    pub metrics: Json,
    pub note: Option<String>,
    pub reported_at: DateTimeUtc,
});

entity!(heartbeat, "heartbeats", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub site_id: Uuid,
    pub state: String,
    pub data_summary: String,
    /// The training split's patients, as the worker last said (`Heartbeat::patients`).
    pub patients: Option<i64>,
    pub version: String,
    pub at: DateTimeUtc,
});

entity!(preview_set, "preview_sets", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub study_id: Uuid,
    pub site_id: Uuid,
    pub requested_by: Uuid,
    pub grant_id: Uuid,
    pub plan_hash: String,
    /// `generating`, `awaiting_release`, `released`, `rejected` or `failed`.
    pub status: String,
    pub spec: Json,
    pub set_hash: Option<String>,
    pub generator: Option<String>,
    pub epsilon: Option<f64>,
    pub images: Option<i32>,
    pub withheld: Option<i32>,
    /// The label of each image in the set, in order.
    pub labels: Option<Json>,
    pub memorisation: Option<Json>,
    pub summary: Option<Json>,
    pub failure: Option<String>,
    pub decided_by: Option<Uuid>,
    pub decided_at: Option<DateTimeUtc>,
    pub comment: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
});

entity!(privacy_budget, "privacy_budgets", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub site_id: Uuid,
    /// The most ε any patient of the site's dataset may spend over every study, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    pub set_by: Uuid,
    pub set_at: DateTimeUtc,
});

entity!(privacy_spend, "privacy_spends", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub site_id: Uuid,
    pub study_id: Uuid,
    pub run_id: Uuid,
    pub round: i32,
    /// `round` or `preview` (a private preview's generator: `run_id` names the request).
    pub purpose: String,
    /// `reserved` (the job is out), `committed` (spent) or `released` (nothing was spent).
    pub state: String,
    pub patients: i64,
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    pub steps: i64,
    /// The plan's δ.
    pub delta: f64,
    /// The round's Rényi costs (`RdpCost`): what adds up across rounds and runs.
    pub rdp: Json,
    /// Why it was committed or released, where that is not simply the update being counted.
    pub note: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
});
