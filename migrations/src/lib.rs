//! The Consilium schema. The server runs these migrations at start (`consilium migrate`
//! runs them alone). Works on SQLite and PostgreSQL.

pub use sea_orm_migration::prelude::*;

mod m20261127_000001_governance;
mod m20261127_000002_engine;
mod m20261127_000003_previews;
mod m20261201_000004_site_keys;
mod m20261201_000005_site_outputs;
mod m20261201_000006_privacy;
mod m20261202_000007_privacy_ledger;
mod m20261202_000008_private_previews;
mod m20261205_000009_secure_aggregation;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_governance::Migration),
            Box::new(m20261127_000002_engine::Migration),
            Box::new(m20261127_000003_previews::Migration),
            Box::new(m20261201_000004_site_keys::Migration),
            Box::new(m20261201_000005_site_outputs::Migration),
            Box::new(m20261201_000006_privacy::Migration),
            Box::new(m20261202_000007_privacy_ledger::Migration),
            Box::new(m20261202_000008_private_previews::Migration),
            Box::new(m20261205_000009_secure_aggregation::Migration),
        ]
    }
}
