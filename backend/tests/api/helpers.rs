use chrono::{Duration, Utc};
use consilium_backend::configuration::Settings;
use consilium_backend::context::AppContext;
use consilium_backend::domain::Actor;
use consilium_backend::services::{directory, tokens};
use consilium_backend::startup::Application;
use consilium_core::Role;
use consilium_core::api::{CreateToken, CreateUser};
use consilium_migrations::{Migrator, MigratorTrait};
use reqwest::{Method, StatusCode};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Runs one async scenario on SQLite and on PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Db::Postgres).await
            }
        }
    };
}

fn pg_base() -> String {
    std::env::var("CONSILIUM_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_raw(Statement::from_string(DbBackend::Postgres, sql.to_string()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A migrated template database, made once per schema version (named by its migrations).
async fn pg_template() -> String {
    TEMPLATE
        .get_or_init(|| async {
            let names: Vec<String> = Migrator::migrations()
                .iter()
                .map(|m| m.name().to_string())
                .collect();
            let digest = consilium_core::hash::sha256_hex(names.join(",").as_bytes());
            let template = format!("consilium_tpl_{}", &digest[..16]);
            let admin = Database::connect(format!("{}/postgres", pg_base()))
                .await
                .expect("PostgreSQL at 127.0.0.1:5432");
            exec(&admin, "SELECT pg_advisory_lock(7401)").await;
            let exists = admin
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("SELECT 1 AS one FROM pg_database WHERE datname = '{template}'"),
                ))
                .await
                .expect("query pg_database")
                .is_some();
            if !exists {
                exec(&admin, &format!("CREATE DATABASE {template}_building")).await;
                let db = Database::connect(format!("{}/{template}_building", pg_base()))
                    .await
                    .expect("connect template");
                Migrator::up(&db, None).await.expect("migrate template");
                db.close().await.expect("close template");
                exec(
                    &admin,
                    &format!("ALTER DATABASE {template}_building RENAME TO {template}"),
                )
                .await;
            }
            exec(&admin, "SELECT pg_advisory_unlock(7401)").await;
            admin.close().await.expect("close admin");
            template
        })
        .await
        .clone()
}

pub struct TestApp {
    pub address: String,
    pub broker: consilium_worker::broker::SharedBroker,
    pub client: reqwest::Client,
    pub ctx: AppContext,

    _dir: tempfile::TempDir,
    pg_database: Option<String>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(name) = self.pg_database.take() {
            // Dropped from a thread of its own: Drop can't await.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    if let Ok(admin) = Database::connect(format!("{}/postgres", pg_base())).await {
                        let _ = admin
                            .execute_raw(Statement::from_string(
                                DbBackend::Postgres,
                                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                            ))
                            .await;
                        let _ = admin.close().await;
                    }
                });
            })
            .join();
        }
    }
}

impl TestApp {
    /// The PostgreSQL database this app uses (None on SQLite).
    pub fn database_url(&self) -> Option<String> {
        self.pg_database
            .as_ref()
            .map(|name| format!("{}/{name}", pg_base()))
    }
}

pub async fn spawn_app(db: Db) -> TestApp {
    spawn_app_with(db, |_| {}).await
}

pub async fn spawn_app_with(db: Db, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.database.data_dir = dir.path().join("data");
    settings.log.level = "warn".into();
    let mut pg_database = None;
    if db == Db::Postgres {
        let template = pg_template().await;
        let name = format!("consilium_test_{}", Uuid::new_v4().simple());
        let admin = Database::connect(format!("{}/postgres", pg_base()))
            .await
            .expect("PostgreSQL");
        exec(
            &admin,
            &format!("CREATE DATABASE {name} TEMPLATE {template}"),
        )
        .await;
        admin.close().await.expect("close");
        settings.database.url = Some(SecretString::from(format!("{}/{name}", pg_base())));
        pg_database = Some(name);
    }
    configure(&mut settings);
    let app = Application::build(settings)
        .await
        .expect("the server starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let ctx = app.context.clone();
    let broker = app.broker.clone();
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    TestApp {
        address,
        broker,
        client,
        ctx,
        _dir: dir,
        pg_database,
    }
}

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Token(String),
    Cookie(String),
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// Asserts the status, and that an error is an RFC 9457 problem with a code.
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        if status >= 400 {
            self.assert_problem();
        }
        self.body
    }

    pub fn assert_problem(&self) {
        assert_eq!(
            self.content_type, "application/problem+json",
            "body: {}",
            self.text
        );
        assert_eq!(
            self.body["status"].as_u64(),
            Some(u64::from(self.status.as_u16()))
        );
        assert!(
            self.body["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{}",
            self.text
        );
        assert!(
            self.body["detail"].as_str().is_some_and(|d| d.len() > 10),
            "{}",
            self.text
        );
    }
}

impl TestApp {
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        auth: &Auth,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{}", self.address, path));
        req = match auth {
            Auth::None => req,
            Auth::Token(t) => req.bearer_auth(t),
            Auth::Cookie(c) => req.header("Cookie", format!("consilium_session={c}")),
        };
        let changes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
        match body {
            Some(b) => req = req.json(&b),
            // A change through the API is JSON even without a body (see `security`).
            None if changes => req = req.json(&json!({})),
            None => {}
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(status.as_u16() < 500, "server error {status}: {text}");
        Reply {
            status,
            content_type,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str, auth: &Auth) -> Reply {
        self.call(Method::GET, path, auth, None).await
    }

    pub async fn post(&self, path: &str, auth: &Auth, body: Value) -> Reply {
        self.call(Method::POST, path, auth, Some(body)).await
    }

    /// Creates a user straight through the service (as `consilium admin create-user` does)
    /// and an API token carrying all of the user's roles.
    pub async fn person(&self, email: &str, roles: &[Role]) -> Person {
        let system = Actor::system();
        let user = directory::create_user(
            &self.ctx,
            &system,
            CreateUser {
                email: email.into(),
                name: email.split('@').next().unwrap_or(email).into(),
                roles: roles.to_vec(),
                password: self
                    .ctx
                    .settings
                    .auth
                    .local_accounts_enabled()
                    .then(|| PASSWORD.into()),
            },
        )
        .await
        .expect("user created");
        let token = tokens::create(
            &self.ctx,
            &system,
            user.id,
            CreateToken {
                name: "test".into(),
                roles: roles.to_vec(),
                expires_at: Utc::now() + Duration::days(1),
            },
        )
        .await
        .expect("token created")
        .token;
        Person {
            id: user.id,
            email: email.into(),
            auth: Auth::Token(token),
        }
    }

    /// Signs in with the local password and returns the session cookie's value.
    pub async fn sign_in(&self, email: &str) -> String {
        let resp = self
            .client
            .post(format!("{}/api/v1/auth/login", self.address))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await
            .expect("login sent");
        assert_eq!(resp.status(), StatusCode::OK);
        let cookie = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("consilium_session="))
            .expect("a session cookie")
            .to_string();
        cookie
            .split(';')
            .next()
            .and_then(|kv| kv.split_once('='))
            .map(|(_, v)| v.to_string())
            .expect("cookie value")
    }
}

pub const PASSWORD: &str = "a long test password";

#[derive(Clone, Debug)]
pub struct Person {
    pub id: Uuid,
    pub email: String,
    pub auth: Auth,
}

/// The cast of a governed study: an administrator, two researchers, two committee members,
/// a custodian for each of two sites, an auditor; one committee; two sites.
pub struct World {
    pub admin: Person,
    pub researcher: Person,
    pub other_researcher: Person,
    pub member: Person,
    pub member2: Person,
    pub custodian_a: Person,
    pub custodian_b: Person,
    pub auditor: Person,
    pub committee: Uuid,
    pub site_a: Uuid,
    pub site_b: Uuid,
}

pub async fn world(app: &TestApp) -> World {
    let admin = app
        .person("admin@consilium.test", &[Role::Administrator])
        .await;
    let researcher = app.person("rhea@uni.test", &[Role::Researcher]).await;
    let other_researcher = app.person("oscar@uni.test", &[Role::Researcher]).await;
    let member = app
        .person("mira@ethics.test", &[Role::CommitteeMember])
        .await;
    let member2 = app
        .person("max@ethics.test", &[Role::CommitteeMember])
        .await;
    let custodian_a = app.person("cara@north.test", &[Role::Custodian]).await;
    let custodian_b = app.person("cody@south.test", &[Role::Custodian]).await;
    let auditor = app.person("aldo@audit.test", &[Role::Auditor]).await;
    let committee = app
        .post(
            "/api/v1/committees",
            &admin.auth,
            json!({"name": "North Ethics Board", "members": [member.id, member2.id]}),
        )
        .await
        .expect(201)["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("committee id");
    let site_a = app
        .post(
            "/api/v1/sites",
            &admin.auth,
            json!({"name": "North Hospital", "custodians": [custodian_a.id]}),
        )
        .await
        .expect(201)["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("site id");
    let site_b = app
        .post(
            "/api/v1/sites",
            &admin.auth,
            json!({"name": "South Hospital", "custodians": [custodian_b.id]}),
        )
        .await
        .expect(201)["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("site id");
    World {
        admin,
        researcher,
        other_researcher,
        member,
        member2,
        custodian_a,
        custodian_b,
        auditor,
        committee,
        site_a,
        site_b,
    }
}

pub fn scope() -> Value {
    json!({"modality": "CR", "body_part": "CHEST", "label": "nodule", "cases": 200})
}

pub fn study_body(w: &World, sites: &[Uuid]) -> Value {
    json!({
        "title": "Nodule detection on chest radiographs",
        "protocol_text": "Retrospective, de-identified chest radiographs.\nPrimary endpoint: AUROC.",
        "purpose": "Detect pulmonary nodules",
        "committee_id": w.committee,
        "sites": sites.iter().map(|s| json!({"site_id": s, "scope": scope()})).collect::<Vec<_>>(),
    })
}

pub fn manifest(lr: f64) -> Value {
    json!({
        "model": {"architecture": "small_cnn", "num_classes": 2, "hyper_parameters": {"channels": [32, 64]}},
        "preprocessing": {"image_size": 64, "normalisation": "zscore", "augmentations": ["flip"]},
        "optimiser": {"name": "sgd", "learning_rate": lr, "momentum": 0.9},
        "local_epochs": 1,
        "batch_size": 32,
        "rounds": 5,
        "aggregation": {"strategy": "fedavg", "min_sites": 1},
        "stopping": {"target_metric": "auroc", "target_value": 0.9, "patience": 3},
        "privacy": {"clip_norm": 1.0, "noise_multiplier": 0.5, "secure_aggregation": false},
        "seed": 7
    })
}

pub fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

pub fn in_days(days: i64) -> String {
    (Utc::now() + Duration::days(days)).to_rfc3339()
}

/// The person's API token (people made by `TestApp::person` sign in with one).
pub fn token(p: &Person) -> String {
    match &p.auth {
        Auth::Token(t) => t.clone(),
        _ => panic!("a token"),
    }
}
