//! The one cloneable application context handed to every handler and service.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, Statement,
    TransactionTrait,
};
use std::sync::{Arc, OnceLock};
use tokio::sync::{Mutex, MutexGuard};

use crate::auth::oidc::OidcClient;
use crate::configuration::Settings;
use crate::error::AppResult;

#[derive(Clone)]
pub struct AppContext {
    pub db: DatabaseConnection,
    pub settings: Arc<Settings>,
    pub oidc: Option<Arc<OidcClient>>,
    engine: Arc<OnceLock<crate::engine::Engine>>,
    write_lock: Arc<Mutex<()>>,
    /// Failed sign-ins per account and client address.
    pub sign_in_throttle: crate::throttle::SignInThrottle,
    /// Repeated denials folded before they reach the audit chain.
    pub audit_fold: crate::throttle::AuditFold,
    /// A random secret the portal sends with its own calls to the API, so that the API
    /// believes the browser's address the portal forwards (and nobody else's claim of one).
    pub portal_key: Arc<secrecy::SecretString>,
}

/// A transaction in which state changes and their audit events are written together.
/// Writers are serialised (in this process by a mutex, across server processes on
/// PostgreSQL by an advisory lock) so that the audit chain never forks.
pub struct WriteTxn<'a> {
    pub txn: DatabaseTransaction,
    _guard: MutexGuard<'a, ()>,
}

impl std::ops::Deref for WriteTxn<'_> {
    type Target = DatabaseTransaction;
    fn deref(&self) -> &Self::Target {
        &self.txn
    }
}

impl WriteTxn<'_> {
    pub async fn commit(self) -> AppResult<()> {
        self.txn.commit().await?;
        Ok(())
    }
}

/// Key of the PostgreSQL advisory lock that serialises audited writes.
const AUDIT_LOCK_KEY: i64 = 0x636f_6e73_696c;

impl AppContext {
    pub fn new(db: DatabaseConnection, settings: Settings, oidc: Option<Arc<OidcClient>>) -> Self {
        AppContext {
            db,
            sign_in_throttle: crate::throttle::SignInThrottle::new(settings.auth.throttle.clone()),
            settings: Arc::new(settings),
            oidc,
            engine: Arc::new(OnceLock::new()),
            write_lock: Arc::new(Mutex::new(())),
            audit_fold: crate::throttle::AuditFold::default(),
            portal_key: Arc::new(crate::auth::random_secret(32).into()),
        }
    }

    /// The federated engine, once started (the CLI's admin commands run without it).
    pub fn engine(&self) -> Option<&crate::engine::Engine> {
        self.engine.get()
    }

    pub fn set_engine(&self, engine: crate::engine::Engine) {
        let _ = self.engine.set(engine);
    }

    pub async fn begin_write(&self) -> AppResult<WriteTxn<'_>> {
        let guard = self.write_lock.lock().await;
        let txn = self.db.begin().await?;
        if txn.get_database_backend() == DbBackend::Postgres {
            txn.execute_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})"),
            ))
            .await?;
        }
        Ok(WriteTxn { txn, _guard: guard })
    }
}
