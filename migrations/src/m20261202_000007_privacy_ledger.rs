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
        // The training split's patients a worker last reported: a private round's cost is
        // worked out from it before the job goes out.
        m.alter_table(
            Table::alter()
                .table(a("heartbeats"))
                .add_column(big_integer_null(a("patients")))
                .to_owned(),
        )
        .await?;
        // A site's lifetime privacy budget for its dataset, set by its custodian.
        m.create_table(
            Table::create()
                .table(a("privacy_budgets"))
                .if_not_exists()
                .col(uuid(a("site_id")).primary_key())
                .col(double(a("epsilon")))
                .col(double(a("delta")))
                .col(uuid(a("set_by")))
                .col(timestamp_with_time_zone(a("set_at")))
                .to_owned(),
        )
        .await?;
        // The dataset's ledger: one row per private round at a site, reserved before the job
        // goes out, then committed (spent) or released (nothing was spent).
        m.create_table(
            Table::create()
                .table(a("privacy_spends"))
                .if_not_exists()
                .col(uuid(a("id")).primary_key())
                .col(uuid(a("site_id")))
                .col(uuid(a("study_id")))
                .col(uuid(a("run_id")))
                .col(integer(a("round")))
                .col(string(a("state")))
                .col(big_integer(a("patients")))
                .col(double(a("sampling_rate")))
                .col(double(a("noise_multiplier")))
                .col(big_integer(a("steps")))
                .col(double(a("delta")))
                .col(json(a("rdp")))
                .col(text_null(a("note")))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone(a("updated_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("privacy_spends_round")
                .table(a("privacy_spends"))
                .col(a("run_id"))
                .col(a("round"))
                .col(a("site_id"))
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("privacy_spends_site")
                .table(a("privacy_spends"))
                .col(a("site_id"))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(a("privacy_spends")).to_owned())
            .await?;
        m.drop_table(Table::drop().table(a("privacy_budgets")).to_owned())
            .await?;
        m.alter_table(
            Table::alter()
                .table(a("heartbeats"))
                .drop_column(a("patients"))
                .to_owned(),
        )
        .await
    }
}
