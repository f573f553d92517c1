use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // What a DP-SGD update cost its site's patients (`PrivacySpent`, JSON), as the site
        // reported it and the server checked it.
        m.alter_table(
            Table::alter()
                .table(Alias::new("updates"))
                .add_column(json_null(Alias::new("privacy")))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Alias::new("updates"))
                .drop_column(Alias::new("privacy"))
                .to_owned(),
        )
        .await
    }
}
