//! The audit trail: a filterable list, the chain's verification, export.

use leptos::prelude::*;
use leptos_router::hooks::use_query_map;

use super::loading;
use crate::components::{Failure, Hash, when};
use crate::server::load_audit;

#[component]
pub fn Audit() -> impl IntoView {
    let q = use_query_map();
    let filter = move || {
        let q = q.read();
        let get = |k: &str| q.get(k).unwrap_or_default();
        (
            get("actor"),
            get("action"),
            get("object_type"),
            get("object_id"),
        )
    };
    let data = Resource::new(filter, |(a, b, c, d)| load_audit(a, b, c, d));
    let (actor, action, object_type, object_id) = filter();
    view! {
        <leptos_meta::Title text="Audit trail"/>
        <h1>"Audit trail"</h1>
        <form method="get" action="/audit" class="card filters" role="search">
            <div><label for="actor">"Actor (user id or system)"</label><input id="actor" name="actor" value=actor/></div>
            <div><label for="action">"Action, e.g. study.submitted"</label><input id="action" name="action" value=action/></div>
            <div><label for="object_type">"Object type"</label><input id="object_type" name="object_type" value=object_type/></div>
            <div><label for="object_id">"Object id"</label><input id="object_id" name="object_id" value=object_id/></div>
            <button type="submit">"Filter"</button>
            <a href="/audit">"Clear"</a>
        </form>
        <p class="actions">
            "Export the whole trail: "
            <a href="/api/v1/audit/export?format=jsonl" rel="external" download>"JSON lines"</a>" · "
            <a href="/api/v1/audit/export?format=csv" rel="external" download>"CSV"</a>
        </p>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => {
                        let v = d.verification;
                        let verdict = if v.ok {
                            view! { <p class="notice ok" role="status" id="chain">{format!("Chain verified: all {} events are intact and linked.", v.events_checked)}</p> }.into_any()
                        } else {
                            let broken = v.first_broken.map(|b| format!(" First broken event: #{} ({}).", b.seq, b.reason)).unwrap_or_default();
                            view! { <p class="notice error" role="alert" id="chain">{format!("The chain is broken after checking {} events.{broken}", v.events_checked)}</p> }.into_any()
                        };
                        view! {
                            {verdict}
                            <p>{if d.events.len() >= 1000 { "1000 events shown, the most this page lists: narrow the filter, or export the whole trail.".to_string() } else { format!("{} events shown, newest first.", d.events.len()) }}</p>
                            <table class="audit">
                                <thead><tr><th scope="col">"#"</th><th scope="col">"When"</th><th scope="col">"Actor"</th><th scope="col">"Action"</th><th scope="col">"Object"</th><th scope="col">"Hash"</th></tr></thead>
                                <tbody>
                                    {d.events.iter().map(|e| view! {
                                        <tr>
                                            <td>{e.seq}</td>
                                            <td>{when(&e.at)}</td>
                                            <td><code>{e.actor.chars().take(8).collect::<String>()}</code></td>
                                            <td>{e.action.clone()}</td>
                                            <td>{e.object_type.clone()}" "<code>{e.object_id.chars().take(8).collect::<String>()}</code></td>
                                            <td><Hash hash=e.hash.clone()/></td>
                                        </tr>
                                    }).collect_view()}
                                </tbody>
                            </table>
                        }.into_any()
                    }
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}
