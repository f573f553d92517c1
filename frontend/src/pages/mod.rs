//! One module per area of the portal.

pub mod access;
pub mod audit;
pub mod home;
pub mod models;
pub mod previews;
pub mod runs;
pub mod sites;
pub mod studies;
pub mod study;

use leptos::prelude::*;

#[component]
pub fn NotFound() -> impl IntoView {
    #[cfg(feature = "ssr")]
    if let Some(res) = use_context::<leptos_actix::ResponseOptions>() {
        res.set_status(actix_web::http::StatusCode::NOT_FOUND);
    }
    view! {
        <leptos_meta::Title text="Page not found"/>
        <h1>"Page not found"</h1>
        <p>"There is no page at this address. Use the navigation above, or go to the "<a href="/">"home page"</a>"."</p>
    }
}

pub fn loading() -> impl IntoView {
    view! { <p class="loading" aria-live="polite">"Loading…"</p> }
}
