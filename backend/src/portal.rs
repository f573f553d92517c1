//! Serving the portal (the `consilium-frontend` crate, rendered here through leptos_actix):
//! its pages, its server functions under `/portal/`, its stylesheet, and the browser bundle
//! when it has been built.

use actix_web::HttpMessage;
use actix_web::HttpResponse;
use consilium_frontend::api::{ApiClient, UploadLimit};
use consilium_frontend::app::BundleMissing;
use leptos::nonce::Nonce;
use leptos::prelude::{LeptosOptions, provide_context, use_context};
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::configuration::{PortalSettings, Settings};
use crate::security::CspNonce;

#[derive(Clone)]
pub struct Portal {
    pub options: LeptosOptions,
    pub api: ApiClient,
    /// The folder served at `/pkg`, when the bundle is there.
    pub pkg_dir: Option<PathBuf>,
    /// Whether cookies are marked `Secure` (`server.cookie_secure`).
    cookie_secure: bool,
    /// The most bytes of a plan upload the portal reads: the API's body limit less the growth
    /// of base64 (the files travel to the API as base64 in JSON).
    upload_limit: usize,
    /// Form posts' messages waiting for the page they lead to.
    flash: consilium_frontend::flash::FlashStore,
}

impl Portal {
    /// `addr` is where this server listens: the portal calls the REST API there, with `key`
    /// (the server's portal key) on every call.
    pub fn new(settings: &Settings, addr: SocketAddr, key: &str) -> Self {
        let server = &settings.server;
        let settings: &PortalSettings = &settings.portal;
        let host = match addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
            ip if ip.is_unspecified() => "[::1]".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let api = ApiClient::new(format!("http://{host}:{}", addr.port()), key);
        let root = settings.site_root.clone();
        let pkg = root.join(consilium_frontend::BUNDLE_DIR);
        let wasm = pkg.join(format!("{}_bg.wasm", consilium_frontend::BUNDLE_NAME));
        let pkg_dir = if wasm.is_file() {
            Some(pkg)
        } else {
            tracing::warn!(
                missing = %wasm.display(),
                "the portal's browser bundle is not built: pages are served without live updates; build it with scripts/build-portal"
            );
            None
        };
        let options = LeptosOptions::builder()
            .output_name(consilium_frontend::BUNDLE_NAME)
            .site_root(root.display().to_string())
            .site_pkg_dir(consilium_frontend::BUNDLE_DIR)
            .build();
        Portal {
            options,
            api,
            pkg_dir,
            cookie_secure: server.cookie_secure,
            upload_limit: server.body_limit_bytes / 4 * 3,
            flash: Default::default(),
        }
    }

    /// Context every page render and server function gets.
    pub fn context(&self) -> impl Fn() + Clone + Send + 'static {
        let api = self.api.clone();
        let missing = self.pkg_dir.is_none();
        let secure = self.cookie_secure;
        let limit = UploadLimit(self.upload_limit);
        let flash = self.flash.clone();
        move || {
            provide_context(api.clone());
            provide_context(limit);
            provide_context(flash.clone());
            if missing {
                provide_context(BundleMissing);
            }
            if let Some(req) = use_context::<leptos_actix::Request>() {
                let req = req.into_inner();
                // The nonce of this response's Content-Security-Policy, for the page's scripts.
                if let Some(n) = req.extensions().get::<CspNonce>() {
                    provide_context(Nonce::from_value(n.0.clone()));
                }
                consilium_frontend::csrf::provide(&req, crate::auth::SESSION_COOKIE, secure);
            }
        }
    }
}

pub async fn stylesheet() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .body(consilium_frontend::STYLESHEET)
}

/// A browser asking for a page the portal does not have.
pub fn not_found_page() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type("text/html; charset=utf-8")
        .body(format!(
            concat!(
                "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
                "<link rel=\"stylesheet\" href=\"{}\"><title>Page not found · Consilium</title></head>",
                "<body><header class=\"top\"><a class=\"brand\" href=\"/\">Consilium</a></header>",
                "<main id=\"main\"><h1>Page not found</h1><p>There is no page at this address. ",
                "Go to the <a href=\"/\">home page</a>; the navigation there leads everywhere.</p>",
                "</main></body></html>"
            ),
            consilium_frontend::STYLESHEET_PATH
        ))
}
