use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn a(name: &str) -> Alias {
    Alias::new(name)
}

fn table(name: &str) -> TableCreateStatement {
    Table::create().table(a(name)).if_not_exists().to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // A worker token is bound to one site and carries no role.
        m.alter_table(
            Table::alter()
                .table(a("api_tokens"))
                .add_column(uuid_null(a("site_id")))
                .to_owned(),
        )
        .await?;
        for col in [
            integer(a("current_round")).default(0).to_owned(),
            text_null(a("stop_reason")),
            text_null(a("server_state")),
        ] {
            m.alter_table(Table::alter().table(a("runs")).add_column(col).to_owned())
                .await?;
        }
        m.create_table(
            table("rounds")
                .col(pk_uuid(a("id")))
                .col(uuid(a("run_id")))
                .col(integer(a("number")))
                .col(string(a("state")))
                .col(timestamp_with_time_zone(a("deadline")))
                .col(integer(a("quorum")))
                .col(json(a("sites")))
                .col(json(a("excluded")))
                .col(string_null(a("global_in")))
                .col(uuid_null(a("model_version_id")))
                .col(text_null(a("failure")))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone(a("updated_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("rounds_run_number")
                .table(a("rounds"))
                .col(a("run_id"))
                .col(a("number"))
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("updates")
                .col(pk_uuid(a("id")))
                .col(uuid(a("run_id")))
                .col(integer(a("round")))
                .col(uuid(a("site_id")))
                .col(uuid_uniq(a("job_id")))
                .col(string(a("kind")))
                .col(string(a("outcome")))
                .col(string_null(a("update_hash")))
                .col(big_integer_null(a("samples")))
                .col(json_null(a("evaluation")))
                .col(double_null(a("train_loss_before")))
                .col(double_null(a("train_loss_after")))
                .col(big_integer_null(a("duration_ms")))
                .col(text_null(a("reason")))
                .col(json_null(a("skipped")))
                .col(boolean(a("late")))
                .col(timestamp_with_time_zone(a("received_at")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("model_versions")
                .col(pk_uuid(a("id")))
                .col(uuid(a("run_id")))
                .col(uuid(a("study_id")))
                .col(integer(a("round")))
                .col(string(a("hash")))
                .col(uuid_null(a("parent_id")))
                .col(string(a("plan_hash")))
                .col(uuid(a("review_id")))
                .col(json(a("grant_ids")))
                .col(string(a("strategy")))
                .col(json(a("contributions")))
                .col(json_null(a("evaluation")))
                .col(timestamp_with_time_zone(a("created_at")))
                .col(timestamp_with_time_zone_null(a("released_at")))
                .col(uuid_null(a("released_by")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("monitoring_reports")
                .col(pk_uuid(a("id")))
                .col(uuid(a("model_version_id")))
                .col(uuid(a("site_id")))
                .col(json(a("metrics")))
                .col(text_null(a("note")))
                .col(timestamp_with_time_zone(a("reported_at")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("heartbeats")
                .col(uuid(a("site_id")).primary_key())
                .col(string(a("state")))
                .col(text(a("data_summary")))
                .col(string(a("version")))
                .col(timestamp_with_time_zone(a("at")))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            "heartbeats",
            "monitoring_reports",
            "model_versions",
            "updates",
            "rounds",
        ] {
            m.drop_table(Table::drop().table(a(t)).to_owned()).await?;
        }
        Ok(())
    }
}
