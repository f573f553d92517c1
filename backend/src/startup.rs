//! Building the server: database (migrated at start), OpenID discovery, the actix app
//! with the API, its OpenAPI document and the interactive docs.

use actix_web::dev::Server;
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use consilium_migrations::{Migrator, MigratorTrait};
use leptos_actix::LeptosRoutes;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use secrecy::ExposeSecret;
use std::net::TcpListener;
use std::sync::Arc;
use tracing_actix_web::TracingLogger;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_actix_web::AppExt;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::oidc::OidcClient;
use crate::configuration::Settings;
use crate::context::AppContext;
use crate::error::{problem, problem_response};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Consilium API",
        description = "Governed federated learning for medical imaging: studies, training plans, ethics review, data access, runs and the audit trail. Errors are RFC 9457 problem details.",
    ),
    modifiers(&SecurityAddon),
    security(("bearer" = []), ("session" = [])),
)]
pub struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token (POST /api/v1/tokens)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::auth::SESSION_COOKIE,
            ))),
        );
    }
}

/// The OpenAPI document, collected from the same routes the server serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, api) = App::new()
        .into_utoipa_app()
        .openapi(ApiDoc::openapi())
        .service(utoipa_actix_web::scope("/api/v1").configure(crate::routes::configure))
        .split_for_parts();
    api
}

/// `openapi/openapi.json` as committed: pretty-printed, with a final newline.
pub fn openapi_json() -> Result<String, serde_json::Error> {
    Ok(format!("{}\n", openapi().to_pretty_json()?))
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the database: {0}")]
    Database(#[source] sea_orm::DbErr),
    #[error("cannot migrate the database: {0}")]
    Migrate(#[source] sea_orm::DbErr),
    #[error("{0}")]
    Oidc(#[from] crate::auth::oidc::OidcError),
    #[error("cannot start the federated engine: {0}")]
    Engine(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Connects to the configured database and brings its schema up to date.
pub async fn connect_and_migrate(settings: &Settings) -> Result<DatabaseConnection, StartupError> {
    if !settings.database.is_postgres() {
        let dir = &settings.database.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| StartupError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let mut options = ConnectOptions::new(
        settings
            .database
            .connection_url()
            .expose_secret()
            .to_string(),
    );
    options
        .max_connections(settings.database.max_connections)
        .sqlx_logging(false);
    let db = Database::connect(options)
        .await
        .map_err(StartupError::Database)?;
    Migrator::up(&db, None)
        .await
        .map_err(StartupError::Migrate)?;
    Ok(db)
}

pub async fn build_context(settings: Settings) -> Result<AppContext, StartupError> {
    let db = connect_and_migrate(&settings).await?;
    let oidc = match settings.auth.oidc.clone() {
        Some(o) => Some(Arc::new(OidcClient::discover(o).await?)),
        None => None,
    };
    Ok(AppContext::new(db, settings, oidc))
}

pub struct Application {
    port: u16,
    server: Server,
    pub context: AppContext,
    /// The broker the engine uses (the in-process one unless `engine.broker_url` is set).
    pub broker: consilium_worker::broker::SharedBroker,
}

/// Connects the broker and the artifact store, attaches them to the context, and starts the
/// federated engine on it. Returns the context the server and the services use.
pub async fn start_engine(context: AppContext) -> Result<AppContext, StartupError> {
    let settings = &context.settings;
    let broker: consilium_worker::broker::SharedBroker = match &settings.engine.broker_url {
        Some(url) => consilium_worker::broker::connect(url.expose_secret())
            .await
            .map_err(|e| StartupError::Engine(e.to_string()))?,
        None => Arc::new(consilium_worker::broker::InProcessBroker::new()),
    };
    let location = settings.engine.artifacts.clone().unwrap_or_else(|| {
        settings
            .database
            .data_dir
            .join("artifacts")
            .display()
            .to_string()
    });
    let artifacts = consilium_worker::artifacts::ArtifactStore::open(&location)
        .map_err(|e| StartupError::Engine(e.to_string()))?;
    let signer = Arc::new(server_key(settings).map_err(StartupError::Engine)?);
    if settings.engine.broker_url.is_some() && !settings.engine.broker_site_users {
        tracing::warn!(
            "engine.broker_site_users is off: the server does not check which broker user sent a site's message (a development broker only)"
        );
    }
    let (runs, requests) = crate::context::RunHandle::channel();
    let round_timeout = settings.engine.round_timeout_seconds;
    let context = context.with_federation(crate::context::Federation {
        broker: broker.clone(),
        artifacts: artifacts.clone(),
        runs,
        signer: signer.clone(),
    });
    crate::engine::Engine::new(broker, artifacts, signer, round_timeout)
        .start(&context, requests)
        .await
        .map_err(|e| StartupError::Engine(e.to_string()))?;
    Ok(context)
}

/// Where the server's job-signing key lives.
pub fn server_key_path(settings: &Settings) -> std::path::PathBuf {
    settings
        .engine
        .signing_key
        .clone()
        .unwrap_or_else(|| settings.database.data_dir.join("server-signing.key"))
}

/// The server's job-signing key, created (readable only by this user) on first use.
pub fn server_key(settings: &Settings) -> Result<consilium_core::signing::SigningKey, String> {
    let path = server_key_path(settings);
    if path.exists() {
        return consilium_worker::identity::load(&path)
            .map_err(|e| format!("the server's signing key (engine.signing_key): {e}"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create {} for the server's signing key: {e}",
                dir.display()
            )
        })?;
    }
    let key = consilium_worker::identity::generate(&path)
        .map_err(|e| format!("the server's signing key (engine.signing_key): {e}"))?;
    tracing::info!(path = %path.display(), key = %consilium_core::signing::key_id(&key.verifying_key()), "created the server's job-signing key; workers pin its public half (`consilium admin server-key`)");
    Ok(key)
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let addr = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&addr).map_err(|source| StartupError::Bind {
            addr: addr.clone(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?
            .port();
        if settings.auth.local_accounts_enabled() {
            tracing::warn!("local accounts are enabled: they are for development and demos only");
        }
        let context = start_engine(build_context(settings).await?).await?;
        let broker = context
            .federation()
            .map_err(|e| StartupError::Engine(e.to_string()))?
            .broker
            .clone();
        let server = run(listener, context.clone())?;
        tracing::info!(port, "Consilium is listening");
        Ok(Application {
            port,
            server,
            context,
            broker,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

fn json_error(err: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let (status, detail) = match &err {
        JsonPayloadError::OverflowKnownLength { length, limit } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The request body is {length} bytes; this server accepts at most {limit} (server.body_limit_bytes)."
            ),
        ),
        JsonPayloadError::Overflow { limit } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The request body is larger than the {limit} bytes this server accepts (server.body_limit_bytes)."
            ),
        ),
        JsonPayloadError::ContentType => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Send the body as JSON with `Content-Type: application/json`.".to_string(),
        ),
        JsonPayloadError::Deserialize(e) => (
            StatusCode::BAD_REQUEST,
            format!("The JSON body is not valid for this operation: {e}."),
        ),
        other => (
            StatusCode::BAD_REQUEST,
            format!("The request body could not be read: {other}."),
        ),
    };
    let code = if status == StatusCode::BAD_REQUEST {
        "invalid_json"
    } else {
        "invalid_body"
    };
    let p = problem(status, code, detail, Vec::new());
    actix_web::error::InternalError::from_response(err, problem_response(&p)).into()
}

fn path_error(err: PathError, _req: &HttpRequest) -> actix_web::Error {
    let p = problem(
        StatusCode::BAD_REQUEST,
        "invalid_path",
        format!(
            "A value in the URL path is malformed ({err}); ids are UUIDs such as 3f2b8c1e-9a4d-4c7e-8f00-1a2b3c4d5e6f."
        ),
        Vec::new(),
    );
    actix_web::error::InternalError::from_response(err, problem_response(&p)).into()
}

fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let p = problem(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        format!("The query string is not valid here: {err}."),
        Vec::new(),
    );
    actix_web::error::InternalError::from_response(err, problem_response(&p)).into()
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    let wants_page = req
        .headers()
        .get(actix_web::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if wants_page && !req.path().starts_with("/api") && !req.path().starts_with("/portal/") {
        return crate::portal::not_found_page();
    }
    problem_response(&problem(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "There is no {} {}; the API is described at /api/docs.",
            req.method(),
            req.path()
        ),
        Vec::new(),
    ))
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

pub fn run(listener: TcpListener, context: AppContext) -> Result<Server, StartupError> {
    let body_limit = context.settings.server.body_limit_bytes;
    let data = web::Data::new(context);
    let spec = openapi();
    let addr = listener.local_addr().map_err(|source| StartupError::Bind {
        addr: "listener".into(),
        source,
    })?;
    let portal = crate::portal::Portal::new(
        &data.settings,
        addr,
        secrecy::ExposeSecret::expose_secret(&*data.portal_key),
    );
    let routes = leptos_actix::generate_route_list(consilium_frontend::App);
    let server = HttpServer::new(move || {
        let portal_context = portal.context();
        let options = portal.options.clone();
        let (app, _) = App::new()
            .wrap(actix_web::middleware::from_fn(crate::security::guard))
            .wrap(TracingLogger::default())
            // Outermost, so that what leaves is what the guard finished (HTML, JSON, the
            // bundle): gzip, brotli or zstd as the client asks.
            .wrap(actix_web::middleware::Compress::default())
            .app_data(data.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(body_limit)
                    .error_handler(json_error),
            )
            .app_data(web::PayloadConfig::default().limit(body_limit))
            .app_data(web::PathConfig::default().error_handler(path_error))
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .into_utoipa_app()
            .service(utoipa_actix_web::scope("/api/v1").configure(crate::routes::configure))
            .split_for_parts();
        let app = app
            .app_data(web::Data::new(portal.options.clone()))
            .route(
                consilium_frontend::STYLESHEET_PATH,
                web::get().to(crate::portal::stylesheet),
            )
            .route(
                "/portal/{tail:.*}",
                leptos_actix::handle_server_fns_with_context(portal_context.clone()),
            );
        let app = match &portal.pkg_dir {
            // The bundle's names are fixed: browsers keep it and ask again with its ETag, so an
            // unchanged bundle costs a 304, a rebuilt one is fetched.
            Some(dir) => app.service(
                web::scope("/pkg")
                    .wrap(
                        actix_web::middleware::DefaultHeaders::new()
                            .add(("Cache-Control", "no-cache")),
                    )
                    .service(actix_files::Files::new("", dir).use_etag(true)),
            ),
            None => app,
        };
        app.leptos_routes_with_context(routes.clone(), portal_context, move || {
            consilium_frontend::shell(options.clone())
        })
        .route("/health", web::get().to(health))
        .service(SwaggerUi::new("/api/docs/{_:.*}").url("/api/openapi.json", spec.clone()))
        .route(
            "/api/docs",
            web::get().to(|| async {
                HttpResponse::Found()
                    .insert_header(("Location", "/api/docs/"))
                    .finish()
            }),
        )
        .default_service(web::to(not_found))
    })
    .listen(listener)
    .map_err(|source| StartupError::Bind {
        addr: "listener".into(),
        source,
    })?
    .run();
    Ok(server)
}
