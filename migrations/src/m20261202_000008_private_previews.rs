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
        // What a ledger row paid for: a training round, or a private preview's generator
        // (`run_id` then names the preview request, `round` is 0).
        m.alter_table(
            Table::alter()
                .table(a("privacy_spends"))
                .add_column(string(a("purpose")).default("round"))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(a("privacy_spends"))
                .drop_column(a("purpose"))
                .to_owned(),
        )
        .await
    }
}
