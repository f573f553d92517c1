//! Sign-in and the home page: what waits for the signed-in person.

use consilium_core::api::AuthConfigDto;
use leptos::prelude::*;

use crate::csrf::CsrfField;
use leptos::server_fn::ServerFn as _;

use super::loading;
use crate::components::{Failure, FormError, field, typed};
use crate::server::{HomeData, SignIn as SignInFn, auth_config, load_home};

#[component]
pub fn Home() -> impl IntoView {
    let data = Resource::new(|| (), |_| load_home());
    view! {
        <leptos_meta::Title text="Home"/>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => view! { <Dashboard d/> }.into_any(),
                    Err(e) if e.is_unauthenticated() => view! { <SignIn/> }.into_any(),
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

#[component]
fn Dashboard(d: HomeData) -> impl IntoView {
    let name = d.me.user.name.clone();
    let (act, news): (Vec<_>, Vec<_>) = d.waiting.into_iter().partition(|w| w.act);
    let list = |items: Vec<crate::server::Waiting>| {
        items
            .into_iter()
            .map(|w| view! { <li><a href=w.href>{w.text}</a></li> })
            .collect_view()
    };
    let nothing = act.is_empty();
    view! {
        <h1>"Welcome, "{name}</h1>
        <FormError/>
        <section aria-labelledby="waiting">
            <h2 id="waiting">"What waits for you"</h2>
            {if nothing {
                view! { <p id="nothing-waits">"Nothing needs you now."</p> }.into_any()
            } else {
                view! { <ul class="tasks" id="to-do">{list(act)}</ul> }.into_any()
            }}
        </section>
        {(!news.is_empty()).then(|| view! {
            <section aria-labelledby="news">
                <h2 id="news">"News and work in progress"</h2>
                <ul class="tasks" id="news-list">{list(news)}</ul>
            </section>
        })}
    }
}

#[component]
pub fn SignIn() -> impl IntoView {
    let config = Resource::new(|| (), |_| auth_config());
    view! {
        <leptos_meta::Title text="Sign in"/>
        <h1>"Sign in"</h1>
        <FormError/>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match config.await {
                    Ok(c) => view! { <SignInOptions c/> }.into_any(),
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

/// The page to return to after signing in (`?next=`, a path of this portal), if any.
fn next_page() -> Option<String> {
    let q = leptos_router::hooks::use_query_map();
    q.read_untracked()
        .get("next")
        .filter(|n| consilium_core::is_local_path(n) && !n.starts_with("/signin"))
}

#[component]
fn SignInOptions(c: AuthConfigDto) -> impl IntoView {
    let next = next_page();
    let oidc = match &next {
        Some(n) => format!(
            "/api/v1/auth/oidc/login?next={}",
            percent_encoding::utf8_percent_encode(n, percent_encoding::NON_ALPHANUMERIC)
        ),
        None => "/api/v1/auth/oidc/login".to_string(),
    };
    let next_field = next.map(|n| view! { <input type="hidden" name=field("next") value=n/> });
    view! {
        {c.oidc.then(|| view! {
            <p><a class="button" href=oidc rel="external">"Sign in with your organisation's account"</a></p>
        })}
        {c.local_accounts.then(|| view! {
            <form method="post" action=SignInFn::url() class="card narrow"><CsrfField/>
                {next_field}
                <p class="hint">"Development and demo accounts (local passwords)."</p>
                <label for="email">"Email"</label>
                <input id="email" type="email" name=field("email") autocomplete="username" required value=typed("email", "")/>
                <label for="password">"Password"</label>
                <input id="password" type="password" name=field("password") autocomplete="current-password" required/>
                <button type="submit">"Sign in"</button>
            </form>
        })}
        {(!c.oidc && !c.local_accounts).then(|| view! {
            <p class="notice error" role="alert">"This server has no sign-in configured. Ask the administrator to set up OpenID Connect (auth.oidc in the configuration)."</p>
        })}
    }
}
