//! Sign-in and the home page: what waits for the signed-in person.

use consilium_core::Role;
use consilium_core::api::{AccessStatus, AuthConfigDto, StudyStatus};
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

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

#[component]
fn Dashboard(d: HomeData) -> impl IntoView {
    let me = &d.me;
    let has = |r: Role| me.acting_roles.contains(&r);
    let my_sites: Vec<uuid::Uuid> = d
        .directory
        .sites
        .iter()
        .filter(|s| s.custodians.contains(&me.user.id))
        .map(|s| s.id)
        .collect();
    let my_committees: Vec<uuid::Uuid> = d
        .directory
        .committees
        .iter()
        .filter(|c| c.members.contains(&me.user.id))
        .map(|c| c.id)
        .collect();
    let mut items: Vec<(String, String)> = Vec::new();
    if has(Role::CommitteeMember) {
        let n = d
            .studies
            .iter()
            .filter(|s| {
                s.status == StudyStatus::Submitted && my_committees.contains(&s.committee_id)
            })
            .count();
        items.push((
            format!("{} your review", plural(n, "study awaits", "studies await")),
            "/reviews".into(),
        ));
    }
    if has(Role::Custodian) {
        let n = d
            .requests
            .iter()
            .filter(|r| r.status == AccessStatus::Pending && my_sites.contains(&r.site_id))
            .count();
        items.push((
            format!(
                "{} for your site",
                plural(n, "data-access request", "data-access requests")
            ),
            "/access".into(),
        ));
    }
    if has(Role::Researcher) {
        let mine: Vec<_> = d
            .studies
            .iter()
            .filter(|s| s.researcher_id == me.user.id)
            .collect();
        let drafts = mine
            .iter()
            .filter(|s| s.status == StudyStatus::Draft)
            .count();
        let changes = mine
            .iter()
            .filter(|s| s.status == StudyStatus::ChangesRequested)
            .count();
        let waiting = mine
            .iter()
            .filter(|s| s.status == StudyStatus::Submitted)
            .count();
        let approved = mine
            .iter()
            .filter(|s| s.status == StudyStatus::Approved)
            .count();
        if drafts > 0 {
            items.push((
                format!(
                    "{} to submit for ethics review",
                    plural(drafts, "draft", "drafts")
                ),
                "/studies".into(),
            ));
        }
        if changes > 0 {
            items.push((
                format!(
                    "{} the committee asked to change",
                    plural(changes, "study", "studies")
                ),
                "/studies".into(),
            ));
        }
        if waiting > 0 {
            items.push((
                format!(
                    "{} awaiting the committee's decision",
                    plural(waiting, "study", "studies")
                ),
                "/studies".into(),
            ));
        }
        if approved > 0 {
            items.push((
                format!("{} approved", plural(approved, "study", "studies")),
                "/studies".into(),
            ));
        }
        if mine.is_empty() {
            items.push((
                "No studies yet: draft your first study".into(),
                "/studies/new".into(),
            ));
        }
    }
    let running = d.runs.iter().filter(|r| r.status == "running").count();
    if running > 0 {
        items.push((
            format!("{} in progress", plural(running, "run", "runs")),
            "/runs".into(),
        ));
    }
    if has(Role::Auditor) || has(Role::Administrator) {
        items.push((
            "The audit trail and its verification".into(),
            "/audit".into(),
        ));
    }
    let name = me.user.name.clone();
    view! {
        <h1>"Welcome, "{name}</h1>
        <FormError/>
        <section aria-labelledby="waiting">
            <h2 id="waiting">"What waits for you"</h2>
            <ul class="tasks">
                {items.into_iter().map(|(text, href)| view! { <li><a href=href>{text}</a></li> }).collect_view()}
            </ul>
        </section>
    }
}

#[component]
pub fn SignIn() -> impl IntoView {
    let config = Resource::new(|| (), |_| auth_config());
    view! {
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

#[component]
fn SignInOptions(c: AuthConfigDto) -> impl IntoView {
    view! {
        {c.oidc.then(|| view! {
            <p><a class="button" href="/api/v1/auth/oidc/login" rel="external">"Sign in with your organisation's account"</a></p>
        })}
        {c.local_accounts.then(|| view! {
            <form method="post" action=SignInFn::url() class="card narrow"><CsrfField/>
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
