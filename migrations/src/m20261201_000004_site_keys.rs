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
        // A site's public signing keys, registered by its custodian: every message a worker
        // sends must verify with one that is not revoked.
        m.create_table(
            Table::create()
                .table(a("site_keys"))
                .if_not_exists()
                .col(string(a("key_id")).primary_key())
                .col(uuid(a("site_id")))
                .col(string(a("public_key")))
                .col(string(a("name")))
                .col(string(a("registered_by")))
                .col(timestamp_with_time_zone(a("registered_at")))
                .col(string_null(a("revoked_by")))
                .col(timestamp_with_time_zone_null(a("revoked_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("site_keys_site")
                .table(a("site_keys"))
                .col(a("site_id"))
                .to_owned(),
        )
        .await?;
        // Each result keeps the exact signed message and its signature, so that anyone with
        // the site's public key can check the lineage offline. One column per statement:
        // SQLite alters one at a time.
        for column in [
            text_null(a("signed_message")),
            string_null(a("key_id")),
            string_null(a("signature")),
        ] {
            let mut column = column;
            m.alter_table(
                Table::alter()
                    .table(a("updates"))
                    .add_column(&mut column)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in ["signed_message", "key_id", "signature"] {
            m.alter_table(
                Table::alter()
                    .table(a("updates"))
                    .drop_column(a(column))
                    .to_owned(),
            )
            .await?;
        }
        m.drop_table(Table::drop().table(a("site_keys")).to_owned())
            .await
    }
}
