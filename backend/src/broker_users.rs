//! One RabbitMQ user per site, made through RabbitMQ's management API. A site's user may
//! consume only its own job queue and publish only to the results exchange; it may declare,
//! bind or delete nothing. The server, as the broker's administrator, declares the site's
//! queue. With `engine.broker_site_users` (the default) the server accepts a site's message
//! only when RabbitMQ says that user published it (the validated AMQP `user-id`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::configuration::Settings;
use consilium_worker::broker::{RabbitBroker, results_queue, site_queue_in, site_user};

/// The namespace of the production queues and exchanges.
const NS: &str = "consilium";

/// A site's broker user, made or updated.
pub struct Provisioned {
    pub user: String,
    /// The URL the site's worker connects with (`broker_url` in worker.toml): its own user and
    /// password; never printed except once, to the administrator who made it.
    pub broker_url: SecretString,
}

/// What a site's user may do, as RabbitMQ permission patterns (configure, write, read).
pub fn permissions(ns: &str, site: Uuid) -> (String, String, String) {
    let escape = |s: &str| s.replace('.', "\\.").replace('-', "\\-");
    (
        "^$".to_string(),
        format!("^{}$", escape(&results_queue(ns))),
        format!("^{}$", escape(&site_queue_in(ns, site))),
    )
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A URL path segment or credential: everything but letters and digits escaped.
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Creates (or gives a new password to) the site's broker user, sets its permissions in the
/// broker URL's virtual host, and declares the site's job queue. `password`: the one to set;
/// none: a new random one (32 bytes from the operating system's generator).
pub async fn provision(
    settings: &Settings,
    site: Uuid,
    password: Option<SecretString>,
) -> anyhow::Result<Provisioned> {
    let broker = settings.engine.broker_url.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "engine.broker_url is not set: the embedded in-process broker has no users (sites connect to RabbitMQ)"
        )
    })?;
    let amqp = url::Url::parse(broker.expose_secret())
        .map_err(|e| anyhow::anyhow!("engine.broker_url is not a URL: {e}"))?;
    let tls = match amqp.scheme() {
        "amqp" => false,
        "amqps" => true,
        other => anyhow::bail!("engine.broker_url has scheme {other:?}; expected amqp or amqps"),
    };
    let host = amqp
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("engine.broker_url names no host"))?
        .to_string();
    let vhost = match amqp.path().trim_start_matches('/') {
        "" => "/".to_string(),
        v => decode(v),
    };
    let management = match &settings.engine.broker_management_url {
        Some(m) => url::Url::parse(m.expose_secret())
            .map_err(|e| anyhow::anyhow!("engine.broker_management_url is not a URL: {e}"))?,
        None => {
            let mut m = url::Url::parse(&format!(
                "{}://{host}:15672/",
                if tls { "https" } else { "http" }
            ))?;
            m.set_username(amqp.username())
                .and_then(|()| m.set_password(amqp.password()))
                .map_err(|()| anyhow::anyhow!("the broker URL's credentials do not fit a URL"))?;
            m
        }
    };
    let (admin_user, admin_password) = (
        decode(management.username()),
        management.password().map(decode),
    );
    let base = format!(
        "{}://{}{}",
        management.scheme(),
        management
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("engine.broker_management_url names no host"))?,
        management
            .port()
            .map(|p| format!(":{p}"))
            .unwrap_or_default()
    );
    let password = password.unwrap_or_else(|| {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        SecretString::from(URL_SAFE_NO_PAD.encode(bytes))
    });
    let user = site_user(site);
    let http = reqwest::Client::new();
    let base = base.as_str();
    let call = |path: String, body: serde_json::Value| {
        let request = http
            .put(format!("{base}/api/{path}"))
            .basic_auth(&admin_user, admin_password.as_deref())
            .json(&body);
        async move {
            let resp = request.send().await.map_err(|e| {
                anyhow::anyhow!(
                    "RabbitMQ's management API at {base} is unreachable ({e}); enable it (`rabbitmq-plugins enable rabbitmq_management`) or set engine.broker_management_url"
                )
            })?;
            if resp.status().is_success() {
                Ok(())
            } else {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                Err(anyhow::anyhow!(
                    "RabbitMQ's management API refused {path}: {status} {text}"
                ))
            }
        }
    };
    call(
        format!("users/{}", encode(&user)),
        serde_json::json!({"password": password.expose_secret(), "tags": ""}),
    )
    .await?;
    let (configure, write, read) = permissions(NS, site);
    call(
        format!("permissions/{}/{}", encode(&vhost), encode(&user)),
        serde_json::json!({"configure": configure, "write": write, "read": read}),
    )
    .await?;
    RabbitBroker::connect_in(broker.expose_secret(), NS)
        .await?
        .declare_site_queue(site)
        .await?;
    let mut site_url = amqp.clone();
    site_url
        .set_username(&user)
        .and_then(|()| site_url.set_password(Some(password.expose_secret())))
        .map_err(|()| anyhow::anyhow!("the broker URL cannot carry a user"))?;
    Ok(Provisioned {
        user,
        broker_url: SecretString::from(site_url.to_string()),
    })
}
