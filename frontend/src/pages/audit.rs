//! The audit trail: filtered by person, action, object and dates, a page at a time, newest
//! first; names and links instead of ids; each event's details; the chain's verification; the
//! filtered view exported.

use consilium_core::api::AuditEventDto;
use leptos::prelude::*;
use leptos_router::hooks::use_query_map;

use super::loading;
use crate::components::{Failure, Hash, when};
use crate::server::{AuditFilter, AuditPage, load_audit};

/// The object types events are recorded under, for the filter's choices.
const OBJECT_TYPES: [&str; 16] = [
    "study",
    "plan",
    "review",
    "access_request",
    "run",
    "round",
    "update",
    "model_version",
    "monitoring_report",
    "preview",
    "site",
    "site_key",
    "committee",
    "user",
    "token",
    "session",
];

#[component]
pub fn Audit() -> impl IntoView {
    let q = use_query_map();
    let filter = move || {
        let q = q.read();
        let get = |k: &str| q.get(k).unwrap_or_default();
        AuditFilter {
            actor: get("actor"),
            action: get("action"),
            object_type: get("object_type"),
            object_id: get("object_id"),
            from: get("from"),
            to: get("to"),
            before: get("before"),
            after: get("after"),
        }
    };
    let data = Resource::new(filter, load_audit);
    view! {
        <leptos_meta::Title text="Audit trail"/>
        <h1>"Audit trail"</h1>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => view! { <Trail d filter=filter()/> }.into_any(),
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

/// Who acted, in words: the person's name (and how they acted), a site's worker, or the
/// system; the raw actor when it names nobody known.
fn actor_words(d: &AuditPage, actor: &str) -> String {
    let (id, how) = actor.split_once(' ').unwrap_or((actor, ""));
    if let Some(u) = d.users.iter().find(|u| u.id.to_string() == id) {
        return if how.is_empty() {
            u.name.clone()
        } else {
            format!("{} ({how})", u.name)
        };
    }
    if let Some(rest) = actor.strip_prefix("site ")
        && let Some(site) = d
            .directory
            .sites
            .iter()
            .find(|s| rest.starts_with(&s.id.to_string()))
    {
        return format!("{}'s worker", site.name);
    }
    actor.to_string()
}

/// The object, in words, with a link to its page where it has one.
fn object_view(d: &AuditPage, e: &AuditEventDto) -> AnyView {
    let id = e.object_id.as_str();
    let study = d.studies.iter().find(|s| s.id.to_string() == id);
    let site = d.directory.sites.iter().find(|s| s.id.to_string() == id);
    let user = d.users.iter().find(|u| u.id.to_string() == id);
    let short: String = id.chars().take(8).collect();
    match (e.object_type.as_str(), study, site, user) {
        ("study", Some(s), _, _) => {
            view! { "study "<a href=format!("/studies/{}", s.id)>{s.title.clone()}</a> }.into_any()
        }
        ("site", _, Some(s), _) => {
            view! { "site "<a href="/sites">{s.name.clone()}</a> }.into_any()
        }
        ("user", _, _, Some(u)) => view! { "user "{u.name.clone()} }.into_any(),
        ("run", _, _, _) => {
            view! { "run "<a href=format!("/runs/{id}")><code>{short}</code></a> }.into_any()
        }
        ("model_version", _, _, _) => {
            view! { "model "<a href=format!("/models/{id}")><code>{short}</code></a> }.into_any()
        }
        ("access_request", _, _, _) => {
            view! { "data-access request "<a href="/access"><code>{short}</code></a> }.into_any()
        }
        (t, _, _, _) => view! { {t.replace('_', " ")}" "<code>{short}</code> }.into_any(),
    }
}

/// This view's URL with the page replaced.
fn page_link(f: &AuditFilter, before: Option<i64>, after: Option<i64>) -> String {
    let mut q = url_query(f);
    if let Some(b) = before {
        q.push(("before".into(), b.to_string()));
    }
    if let Some(a) = after {
        q.push(("after".into(), a.to_string()));
    }
    let encoded = q
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&");
    if encoded.is_empty() {
        "/audit".into()
    } else {
        format!("/audit?{encoded}")
    }
}

fn url_query(f: &AuditFilter) -> Vec<(String, String)> {
    [
        ("actor", &f.actor),
        ("action", &f.action),
        ("object_type", &f.object_type),
        ("object_id", &f.object_id),
        ("from", &f.from),
        ("to", &f.to),
    ]
    .into_iter()
    .filter(|(_, v)| !v.trim().is_empty())
    .map(|(k, v)| (k.to_string(), v.trim().to_string()))
    .collect()
}

#[component]
fn Trail(d: AuditPage, filter: AuditFilter) -> impl IntoView {
    let v = &d.verification;
    let verdict = if v.ok {
        view! { <p class="notice ok" role="status" id="chain">{format!("Chain verified: all {} events are intact and linked.", v.events_checked)}</p> }.into_any()
    } else {
        let broken = v
            .first_broken
            .as_ref()
            .map(|b| format!(" First broken event: #{} ({}).", b.seq, b.reason))
            .unwrap_or_default();
        view! { <p class="notice error" role="alert" id="chain">{format!("The chain is broken after checking {} events.{broken}", v.events_checked)}</p> }.into_any()
    };
    let mut people: Vec<(String, String)> = d
        .users
        .iter()
        .map(|u| (u.id.to_string(), u.name.clone()))
        .collect();
    people.sort_by(|a, b| a.1.cmp(&b.1));
    let actor = filter.actor.clone();
    let object_type = filter.object_type.clone();
    let export = |format: &str| {
        if d.export_query.is_empty() {
            format!("/api/v1/audit/export?format={format}")
        } else {
            format!("/api/v1/audit/export?format={format}&{}", d.export_query)
        }
    };
    let filtered = !url_query(&filter).is_empty();
    let newest = d.events.first().map(|e| e.seq);
    let oldest = d.events.last().map(|e| e.seq);
    let older = d
        .older
        .then(|| oldest.map(|s| page_link(&filter, Some(s), None)))
        .flatten();
    let newer = d
        .newer
        .then(|| newest.map(|s| page_link(&filter, None, Some(s))))
        .flatten();
    let first_page = (d.newer).then(|| page_link(&filter, None, None));
    let count = match (newest, oldest) {
        (Some(n), Some(o)) => format!(
            "Events #{n} to #{o}, newest first ({} on this page).",
            d.events.len()
        ),
        _ => "No event matches this filter.".to_string(),
    };
    let rows = d
        .events
        .iter()
        .map(|e| {
            let who = actor_words(&d, &e.actor);
            let what = object_view(&d, e);
            view! {
                <tr>
                    <td>{e.seq}</td>
                    <td>{when(&e.at)}</td>
                    <td>{who}</td>
                    <td><a rel="external" href=page_link(&AuditFilter { action: e.action.clone(), ..AuditFilter::default() }, None, None)>{e.action.clone()}</a></td>
                    <td>{what}</td>
                    <td>
                        <details class="event">
                            <summary>"Details"</summary>
                            <dl class="binds">
                                <dt>"At"</dt><dd>{e.at.to_rfc3339()}</dd>
                                <dt>"Actor"</dt><dd><code>{e.actor.clone()}</code></dd>
                                <dt>"Object"</dt><dd>{e.object_type.clone()}" "<code>{e.object_id.clone()}</code></dd>
                                <dt>"State digest"</dt><dd><code>{e.digest.clone()}</code></dd>
                                <dt>"Previous hash"</dt><dd><code>{e.prev_hash.clone()}</code></dd>
                                <dt>"Hash"</dt><dd><code>{e.hash.clone()}</code></dd>
                            </dl>
                        </details>
                        <Hash hash=e.hash.clone()/>
                    </td>
                </tr>
            }
        })
        .collect_view();
    view! {
        <form method="get" action="/audit" class="card filters" role="search">
            <div>
                <label for="actor">"Who"</label>
                <select id="actor" name="actor">
                    <option value="" selected=actor.is_empty()>"anyone"</option>
                    <option value="system" selected={actor == "system"}>"the system"</option>
                    {people.into_iter().map(|(id, name)| {
                        let chosen = actor == id;
                        view! { <option value=id selected=chosen>{name}</option> }
                    }).collect_view()}
                </select>
            </div>
            <div><label for="action">"Action, e.g. study.submitted"</label><input id="action" name="action" value=filter.action.clone()/></div>
            <div>
                <label for="object_type">"Object"</label>
                <select id="object_type" name="object_type">
                    <option value="" selected=object_type.is_empty()>"any"</option>
                    {OBJECT_TYPES.iter().map(|t| {
                        let chosen = object_type == *t;
                        view! { <option value=*t selected=chosen>{t.replace('_', " ")}</option> }
                    }).collect_view()}
                </select>
            </div>
            <div><label for="object_id">"Object id"</label><input id="object_id" name="object_id" value=filter.object_id.clone()/></div>
            <div><label for="from">"From (day)"</label><input id="from" name="from" type="date" value=filter.from.clone()/></div>
            <div><label for="to">"To (day, included)"</label><input id="to" name="to" type="date" value=filter.to.clone()/></div>
            <button type="submit">"Filter"</button>
            <a href="/audit">"Clear"</a>
        </form>
        {verdict}
        <p class="actions">
            {if filtered { "Export this filtered view: " } else { "Export the whole trail: " }}
            <a href=export("jsonl") rel="external" download id="export-jsonl">"JSON lines"</a>" · "
            <a href=export("csv") rel="external" download id="export-csv">"CSV"</a>
        </p>
        <p id="audit-count">{count}</p>
        <table class="audit">
            <thead><tr><th scope="col">"#"</th><th scope="col">"When"</th><th scope="col">"Who"</th><th scope="col">"Action"</th><th scope="col">"Object"</th><th scope="col">"Event"</th></tr></thead>
            <tbody>{rows}</tbody>
        </table>
        <nav class="pages" aria-label="Audit pages">
            // Whole page loads (each page is one server read), as the filter form's.
            {first_page.map(|h| view! { <a href=h rel="external">"Newest"</a> })}
            {newer.map(|h| view! { <a href=h rel="external prev">"Newer events"</a> })}
            {older.map(|h| view! { <a href=h rel="external next">"Older events"</a> })}
        </nav>
    }
}
