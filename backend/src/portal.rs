//! Serving the portal (the `consilium-frontend` crate, rendered here through leptos_actix):
//! its pages, its server functions under `/portal/`, its stylesheet, and the browser bundle
//! when it has been built.

use actix_web::HttpResponse;
use consilium_frontend::api::ApiClient;
use consilium_frontend::app::BundleMissing;
use leptos::prelude::{LeptosOptions, provide_context};
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::configuration::PortalSettings;

#[derive(Clone)]
pub struct Portal {
    pub options: LeptosOptions,
    pub api: ApiClient,
    /// The folder served at `/pkg`, when the bundle is there.
    pub pkg_dir: Option<PathBuf>,
}

impl Portal {
    /// `addr` is where this server listens: the portal calls the REST API there.
    pub fn new(settings: &PortalSettings, addr: SocketAddr) -> Self {
        let host = match addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
            ip if ip.is_unspecified() => "[::1]".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let api = ApiClient::new(format!("http://{host}:{}", addr.port()));
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
        }
    }

    /// Context every page render and server function gets.
    pub fn context(&self) -> impl Fn() + Clone + Send + 'static {
        let api = self.api.clone();
        let missing = self.pkg_dir.is_none();
        move || {
            provide_context(api.clone());
            if missing {
                provide_context(BundleMissing);
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
