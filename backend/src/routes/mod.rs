//! HTTP handlers under `/api/v1`: parse, call a service, map the result. Every operation
//! is annotated for the OpenAPI document.

mod access;
mod audit;
mod auth;
mod directory;
mod engine;
mod previews;
mod studies;

use utoipa_actix_web::service_config::ServiceConfig;

pub fn configure(cfg: &mut ServiceConfig) {
    auth::configure(cfg);
    directory::configure(cfg);
    studies::configure(cfg);
    access::configure(cfg);
    audit::configure(cfg);
    engine::configure(cfg);
    previews::configure(cfg);
}
