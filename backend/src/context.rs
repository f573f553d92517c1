//! The one cloneable application context handed to every handler and service.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, Statement,
    TransactionTrait,
};
use std::sync::Arc;
use tokio::sync::{Mutex, MutexGuard};

use crate::auth::oidc::OidcClient;
use crate::configuration::Settings;
use crate::error::AppResult;

#[derive(Clone)]
pub struct AppContext {
    pub db: DatabaseConnection,
    pub settings: Arc<Settings>,
    pub oidc: Option<Arc<OidcClient>>,
    /// The federated side: the broker, the artifact store, and the handle that asks the
    /// engine to drive a run. None for the command line's admin commands.
    pub federation: Option<Federation>,
    write_lock: Arc<Mutex<()>>,
    /// Failed sign-ins per account and client address.
    pub sign_in_throttle: crate::throttle::SignInThrottle,
    /// Repeated denials folded before they reach the audit chain.
    pub audit_fold: crate::throttle::AuditFold,
    /// A random secret the portal sends with its own calls to the API, so that the API
    /// believes the browser's address the portal forwards (and nobody else's claim of one).
    pub portal_key: Arc<secrecy::SecretString>,
}

/// What the services need of the federated side. The engine owns the rounds; services reach
/// it only through `runs`, so that the engine depends on the services and not the reverse.
#[derive(Clone)]
pub struct Federation {
    pub broker: consilium_worker::broker::SharedBroker,
    pub artifacts: consilium_worker::artifacts::ArtifactStore,
    pub runs: RunHandle,
    /// The server's job-signing key: every job it sends is signed with it.
    pub signer: Arc<consilium_core::signing::SigningKey>,
}

impl Federation {
    /// Signs a job and sends it to its site.
    pub async fn send_job(
        &self,
        job: &consilium_core::protocol::Job,
    ) -> Result<(), consilium_worker::broker::BrokerError> {
        consilium_worker::broker::send_job(&*self.broker, &self.signer, job).await
    }
}

/// Asks the engine to drive a run (a new one, or one found running at start).
#[derive(Clone)]
pub struct RunHandle(tokio::sync::mpsc::UnboundedSender<uuid::Uuid>);

impl RunHandle {
    pub fn channel() -> (Self, tokio::sync::mpsc::UnboundedReceiver<uuid::Uuid>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (RunHandle(tx), rx)
    }

    /// Hands the run to the engine; an error when the engine has stopped.
    pub fn drive(&self, run: uuid::Uuid) -> AppResult<()> {
        self.0.send(run).map_err(|_| {
            crate::error::AppError::unexpected(anyhow::anyhow!(
                "the federated engine has stopped; run {run} waits for a restart"
            ))
        })
    }
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
            federation: None,
            write_lock: Arc::new(Mutex::new(())),
            audit_fold: crate::throttle::AuditFold::default(),
            portal_key: Arc::new(crate::auth::random_secret(32).into()),
        }
    }

    /// With the federated side attached (the server; not the admin commands).
    pub fn with_federation(mut self, federation: Federation) -> Self {
        self.federation = Some(federation);
        self
    }

    /// The federated side, or a 409 that says this server runs without it.
    pub fn federation(&self) -> AppResult<&Federation> {
        self.federation.as_ref().ok_or_else(|| {
            crate::error::AppError::conflict(
                "engine_off",
                "This server runs without the federated engine (no broker or artifact store); ask the administrator.",
            )
        })
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
