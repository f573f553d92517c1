//! The document shell, the navigation and the routes.

use consilium_core::Role;
use consilium_core::api::MeDto;
use leptos::prelude::*;

use crate::csrf::CsrfField;
use leptos::server_fn::ServerFn as _;
use leptos_meta::{MetaTags, Title, provide_meta_context};
use leptos_router::components::{A, Route, Router, Routes};
use leptos_router::{SsrMode, path};

use crate::error::PortalError;
use crate::pages;
use crate::server::{SignOut, me};

/// Told by the server when the browser bundle is missing, so the page says so.
#[derive(Clone, Copy, Debug)]
pub struct BundleMissing;

pub fn shell(options: LeptosOptions) -> impl IntoView {
    // Without a bundle there is nothing to load: no script tags that would only fail.
    let bundle = use_context::<BundleMissing>().is_none();
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <link rel="stylesheet" href=crate::STYLESHEET_PATH/>
                <meta name="csrf-token" content=crate::csrf::current()/>
                {bundle.then(|| view! { <HydrationScripts options/> })}
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

pub type MeResource = Resource<Result<Option<MeDto>, PortalError>>;

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    crate::flash::provide();
    #[cfg(feature = "ssr")]
    provide_context(crate::server::WaitingOnce::default());
    let me: MeResource = Resource::new(|| (), |_| me());
    provide_context(me);
    let waiting = Resource::new(|| (), |_| crate::server::waiting_count());
    let bundle_missing = use_context::<BundleMissing>().is_some();
    // Effects run only in the browser, once the bundle has hydrated the page: the mark tells
    // people's tools (and the browser tests) that the live parts work.
    Effect::new(|_| {
        if let Some(body) = document().body()
            && let Err(e) = body.set_attribute("data-hydrated", "true")
        {
            leptos::logging::warn!("could not mark the page as hydrated: {e:?}");
        }
    });
    view! {
        <Title formatter=|page: String| if page.is_empty() { "Consilium".to_string() } else { format!("{page} · Consilium") }/>
        <Router>
            <crate::flash::ClearOnNavigation/>
            <a class="skip" href="#main">"Skip to content"</a>
            <header class="top">
                <A href="/" attr:class="brand">"Consilium"</A>
                <Suspense fallback=|| ()>
                    {move || Suspend::new(async move {
                        let who = me.await.ok().flatten();
                        view! { <Nav me=who/> }
                    })}
                </Suspense>
                <Suspense fallback=|| ()>
                    {move || Suspend::new(async move {
                        // Nothing is said when the count cannot be read: the home page says
                        // why, and the header is no place for an error.
                        let n = match waiting.await {
                            Ok(n) => n,
                            Err(e) => {
                                leptos::logging::warn!("the header's count of waiting items could not be read: {e}");
                                0
                            }
                        };
                        (n > 0).then(|| {
                            let label = if n == 1 { "1 thing waits for you".to_string() } else { format!("{n} things wait for you") };
                            view! { <a href="/" class="waiting-count" id="waiting-count" aria-label=label.clone() title=label>{n}</a> }
                        })
                    })}
                </Suspense>
            </header>
            {bundle_missing.then(|| view! {
                <p class="notice warn" role="status">
                    "The portal's browser bundle is not built, so pages do not update live. "
                    "Everything else works. Build it with scripts/build-portal (see the README)."
                </p>
            })}
            <main id="main">
                <Routes fallback=|| view! { <pages::NotFound/> }>
                    <Route path=path!("/") view=pages::home::Home ssr=SsrMode::Async/>
                    <Route path=path!("/signin") view=pages::home::SignIn ssr=SsrMode::Async/>
                    <Route path=path!("/studies") view=pages::studies::Studies ssr=SsrMode::Async/>
                    <Route path=path!("/studies/new") view=pages::studies::NewStudy ssr=SsrMode::Async/>
                    <Route path=path!("/studies/:id") view=pages::study::Study ssr=SsrMode::Async/>
                    <Route path=path!("/studies/:id/edit") view=pages::studies::EditStudy ssr=SsrMode::Async/>
                    <Route path=path!("/reviews") view=pages::studies::Reviews ssr=SsrMode::Async/>
                    <Route path=path!("/access") view=pages::access::Access ssr=SsrMode::Async/>
                    <Route path=path!("/runs") view=pages::runs::Runs ssr=SsrMode::Async/>
                    <Route path=path!("/sites") view=pages::sites::Sites ssr=SsrMode::Async/>
                    <Route path=path!("/runs/:id") view=pages::runs::Run ssr=SsrMode::Async/>
                    <Route path=path!("/models") view=pages::models::Models ssr=SsrMode::Async/>
                    <Route path=path!("/models/:id") view=pages::models::Lineage ssr=SsrMode::Async/>
                    <Route path=path!("/audit") view=pages::audit::Audit ssr=SsrMode::Async/>
                </Routes>
            </main>
            <footer class="foot">
                "Consilium — governed federated learning for medical imaging. "
                <a href="/api/docs/" rel="external">"API documentation"</a>
            </footer>
        </Router>
    }
}

/// The navigation: every page a person's roles may use.
#[component]
fn Nav(me: Option<MeDto>) -> impl IntoView {
    let Some(me) = me else {
        return view! {
            <nav aria-label="Main"><A href="/signin">"Sign in"</A></nav>
        }
        .into_any();
    };
    let has = |r: Role| me.acting_roles.contains(&r);
    let all = has(Role::Administrator) || has(Role::Auditor);
    let roles = me
        .acting_roles
        .iter()
        .map(|r| crate::components::role_name(*r))
        .collect::<Vec<_>>()
        .join(", ");
    view! {
        <nav aria-label="Main">
            <A href="/">"Home"</A>
            {(all || has(Role::Researcher) || has(Role::CommitteeMember) || has(Role::Custodian))
                .then(|| view! { <A href="/studies">"Studies"</A> })}
            {(all || has(Role::CommitteeMember)).then(|| view! { <A href="/reviews">"Reviews"</A> })}
            {(all || has(Role::Researcher) || has(Role::Custodian))
                .then(|| view! { <A href="/access">"Data access"</A> })}
            <A href="/runs">"Runs"</A>
            {(all || has(Role::Researcher) || has(Role::Custodian))
                .then(|| view! { <A href="/sites">"Sites"</A> })}
            <A href="/models">"Models"</A>
            {all.then(|| view! { <A href="/audit">"Audit"</A> })}
        </nav>
        <div class="who">
            <span>{me.user.name.clone()}" · "<span class="roles">{roles}</span></span>
            <form method="post" action=SignOut::url()><CsrfField/>
                <button type="submit" class="link">"Sign out"</button>
            </form>
        </div>
    }
    .into_any()
}
