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
        // What each site handed over for each job, hashed by the server on arrival: a result
        // counts only with an output its own site uploaded for that job.
        m.create_table(
            Table::create()
                .table(a("site_outputs"))
                .if_not_exists()
                .col(uuid(a("id")).primary_key())
                .col(uuid(a("job_id")))
                .col(uuid(a("site_id")))
                .col(uuid(a("run_id")))
                .col(string(a("hash")))
                .col(big_integer(a("bytes")))
                .col(timestamp_with_time_zone(a("received_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("site_outputs_job")
                .table(a("site_outputs"))
                .col(a("job_id"))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(a("site_outputs")).to_owned())
            .await
    }
}
