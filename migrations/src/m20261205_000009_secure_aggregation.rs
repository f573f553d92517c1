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
        // Secure aggregation's exchanges: what each site posted in each stage of a round
        // (public keys, encrypted shares, a masked input's hash, revealed shares), and each
        // stage's closing (`site_id` nil: who is in it, the graph, the threshold), written in
        // the transaction that sees the stage full or past its deadline. Any server process
        // answers from these rows, and a restart resumes.
        m.create_table(
            Table::create()
                .table(a("secagg_messages"))
                .if_not_exists()
                .col(uuid(a("id")).primary_key())
                .col(uuid(a("run_id")))
                .col(integer(a("round")))
                .col(string(a("stage")))
                .col(uuid(a("site_id")))
                .col(json(a("body")))
                .col(timestamp_with_time_zone(a("created_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("secagg_messages_once")
                .table(a("secagg_messages"))
                .col(a("run_id"))
                .col(a("round"))
                .col(a("stage"))
                .col(a("site_id"))
                .unique()
                .to_owned(),
        )
        .await?;
        // A version made under secure aggregation: whose masked inputs its sum holds, who
        // dropped out, the parameters (`SecureAggregationRecord`).
        m.alter_table(
            Table::alter()
                .table(a("model_versions"))
                .add_column(json_null(a("secure_aggregation")))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(a("model_versions"))
                .drop_column(a("secure_aggregation"))
                .to_owned(),
        )
        .await?;
        m.drop_table(Table::drop().table(a("secagg_messages")).to_owned())
            .await
    }
}
