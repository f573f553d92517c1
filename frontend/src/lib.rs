//! The Consilium portal: Leptos components rendered by the backend (feature `ssr`, through
//! leptos_actix) and hydrated in the browser (feature `hydrate`, built for
//! `wasm32-unknown-unknown`). Every read and write goes through the REST API under
//! `/api/v1`, with the signed-in person's session, so that the portal does nothing an
//! integration could not, and leaves the same audit events.

pub mod app;
pub mod components;
pub mod csrf;
pub mod error;
pub mod flash;
pub mod pages;
pub mod server;

#[cfg(feature = "ssr")]
pub mod api;
#[cfg(feature = "ssr")]
mod forms;
#[cfg(feature = "ssr")]
mod waiting;

pub use app::{App, shell};

/// The stylesheet, served by the backend at [`STYLESHEET_PATH`].
pub const STYLESHEET: &str = include_str!("../style.css");
pub const STYLESHEET_PATH: &str = "/assets/consilium.css";
/// The browser bundle's name (wasm-bindgen `--out-name`) and folder under the site root.
pub const BUNDLE_NAME: &str = "consilium";
pub const BUNDLE_DIR: &str = "pkg";

#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(App);
}
