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
