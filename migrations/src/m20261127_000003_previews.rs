use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn a(name: &str) -> Alias {
    Alias::new(name)
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // A synthetic preview of one site's data for one study: requested by the researcher,
        // generated and checked at the site, released (or rejected) by its custodian.
        m.create_table(
            Table::create()
                .table(a("preview_sets"))
                .if_not_exists()
                .col(pk_uuid(a("id")))
                .col(uuid(a("study_id")))
                .col(uuid(a("site_id")))
                .col(uuid(a("requested_by")))
                .col(uuid(a("grant_id")))
                .col(string(a("plan_hash")))
                .col(string(a("status")))
                .col(json(a("spec")))
                .col(string_null(a("set_hash")))
                .col(string_null(a("generator")))
                .col(double_null(a("epsilon")))
                .col(integer_null(a("images")))
                .col(integer_null(a("withheld")))
                .col(json_null(a("labels")))
                .col(json_null(a("memorisation")))
                .col(json_null(a("summary")))
                .col(text_null(a("failure")))
                .col(uuid_null(a("decided_by")))
                .col(timestamp_with_time_zone_null(a("decided_at")))
                .col(text_null(a("comment")))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone(a("updated_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("preview_sets_study_site")
                .table(a("preview_sets"))
                .col(a("study_id"))
                .col(a("site_id"))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(a("preview_sets")).to_owned())
            .await
    }
}
