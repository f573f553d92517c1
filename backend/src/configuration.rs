//! Typed, layered configuration: defaults → a TOML file → `CONSILIUM_*` environment
//! variables (nested keys joined by `__`, e.g. `CONSILIUM_DATABASE__URL`).
//! Secrets are `SecretString`s, which never print.

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub engine: EngineSettings,
    pub log: LogSettings,
    pub portal: PortalSettings,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct PortalSettings {
    /// Folder holding the portal's browser bundle in `pkg/` (scripts/build-portal writes
    /// `target/site`). Without it the portal still works, server-rendered, without live
    /// updates, and says so.
    pub site_root: PathBuf,
}

impl Default for PortalSettings {
    fn default() -> Self {
        Self {
            site_root: PathBuf::from("target/site"),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// `amqp://user:password@host:5672/%2f` for RabbitMQ; unset: the in-process broker.
    pub broker_url: Option<SecretString>,
    /// Artifact store: a folder or `s3://bucket/prefix`; unset: `data_dir/artifacts`.
    pub artifacts: Option<String>,
    /// How long a round waits for the sites before excluding the missing ones.
    pub round_timeout_seconds: u64,
    /// The server's job-signing key (Ed25519); unset: `data_dir/server-signing.key`. Created,
    /// readable only by the server's user, when missing. Workers pin its public half
    /// (`consilium admin server-key`).
    pub signing_key: Option<PathBuf>,
    /// On RabbitMQ, accept a site's message only when the broker says the site's own broker
    /// user published it (`consilium admin broker-user`). Turn off only for a development
    /// broker where everything shares one user.
    pub broker_site_users: bool,
    /// RabbitMQ's management API, where `consilium admin broker-user` creates the sites'
    /// users (`http://user:password@host:15672`); unset: port 15672 of the broker's host, with
    /// the broker URL's user and password (`https` when the broker URL is `amqps`).
    pub broker_management_url: Option<SecretString>,
    /// Largest output (an update, a preview set) a site may hand over, in MiB.
    pub max_output_mib: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            broker_url: None,
            artifacts: None,
            round_timeout_seconds: 600,
            signing_key: None,
            broker_site_users: true,
            broker_management_url: None,
            max_output_mib: 1024,
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// Largest request body accepted, in bytes.
    pub body_limit_bytes: usize,
    /// Mark session cookies `Secure` (browsers accept them on http://localhost too).
    pub cookie_secure: bool,
    /// How long a browser session lasts.
    pub session_hours: i64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            body_limit_bytes: 2 * 1024 * 1024,
            cookie_secure: true,
            session_hours: 12,
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// A `postgres://` or `sqlite://` URL. Unset: SQLite in `data_dir/consilium.db`.
    pub url: Option<SecretString>,
    /// Where the embedded default keeps its SQLite database (and, later, artifacts).
    pub data_dir: PathBuf,
    pub max_connections: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            data_dir: PathBuf::from("data"),
            max_connections: 10,
        }
    }
}

impl DatabaseSettings {
    /// The connection URL, with the embedded SQLite default filled in.
    pub fn connection_url(&self) -> SecretString {
        match &self.url {
            Some(url) => url.clone(),
            None => {
                let path = self.data_dir.join("consilium.db");
                SecretString::from(format!("sqlite://{}?mode=rwc", path.display()))
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.connection_url()
            .expose_secret()
            .starts_with("postgres")
    }
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Development-only local accounts (argon2 passwords). Unset: on unless OIDC is configured.
    pub local_accounts: Option<bool>,
    pub oidc: Option<OidcSettings>,
    /// How failed local sign-ins are slowed down and locked.
    pub throttle: ThrottleSettings,
}

/// Failed sign-ins: after `account_failures` failures for one account (or `client_failures`
/// from one client address) within `window_seconds`, each further failure locks sign-in there
/// for twice as long as the last (1 s, 2 s, 4 s, … at most `max_lock_seconds`).
#[derive(Debug, Deserialize, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleSettings {
    pub account_failures: u32,
    pub client_failures: u32,
    pub window_seconds: u64,
    pub max_lock_seconds: u64,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            account_failures: 5,
            client_failures: 20,
            window_seconds: 15 * 60,
            max_lock_seconds: 15 * 60,
        }
    }
}

impl AuthSettings {
    pub fn local_accounts_enabled(&self) -> bool {
        self.local_accounts.unwrap_or(self.oidc.is_none())
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// The provider's issuer URL; discovery reads `<issuer>/.well-known/openid-configuration`.
    pub issuer_url: String,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Where the provider sends the browser back: `<public url>/api/v1/auth/oidc/callback`.
    pub redirect_url: String,
    /// ID-token claim holding a list of Consilium role names.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
}

fn default_roles_claim() -> String {
    "consilium_roles".into()
}

fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}

#[derive(Debug, Deserialize, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `tracing` filter, e.g. `info` or `consilium_backend=debug`.
    pub level: String,
    /// One JSON object per line instead of text.
    pub json: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            json: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// Reads the settings: defaults, then `file` (when given, or `consilium.toml` when present),
/// then the environment.
pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
    let mut figment = Figment::new();
    match file {
        Some(path) => figment = figment.merge(Toml::file_exact(path)),
        None => figment = figment.merge(Toml::file("consilium.toml")),
    }
    figment = figment.merge(Env::prefixed("CONSILIUM_").split("__"));
    figment.extract().map_err(|e| ConfigError(Box::new(e)))
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_secrets() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "consilium.toml",
                r#"
                [server]
                port = 9000
                [auth.oidc]
                issuer_url = "https://id.example"
                client_id = "consilium"
                client_secret = "very-secret-value"
                redirect_url = "https://consilium.example/api/v1/auth/oidc/callback"
                "#,
            )?;
            jail.set_env("CONSILIUM_SERVER__PORT", "9100");
            jail.set_env("CONSILIUM_DATABASE__URL", "postgres://u:pw@db/consilium");
            let s = load(None).expect("loads");
            assert_eq!(s.server.port, 9100, "the environment wins over the file");
            assert_eq!(s.server.host, "127.0.0.1", "defaults fill the rest");
            assert!(s.database.is_postgres());
            assert!(
                !s.auth.local_accounts_enabled(),
                "OIDC turns local accounts off"
            );
            let printed = format!("{s:?}");
            assert!(
                !printed.contains("very-secret-value") && !printed.contains("pw@db"),
                "{printed}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("consilium.toml", "[server]\nprot = 1\n")?;
            let err = load(None).expect_err("a typo is reported").to_string();
            assert!(err.contains("prot"), "{err}");
            Ok(())
        });
    }
}
