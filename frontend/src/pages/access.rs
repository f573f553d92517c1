//! Data access: a custodian decides the requests for their sites and sees what runs on their
//! sites' data; a researcher sees their own requests.

use consilium_core::Role;
use consilium_core::api::{AccessRequestDto, AccessStatus, ReviewDecision};
use leptos::prelude::*;

use crate::csrf::CsrfField;
use leptos::server_fn::ServerFn as _;

use super::loading;
use super::previews::PreviewSet;
use crate::components::{Badge, Failure, FormError, Hash, day, field, typed, when};
use crate::server::{
    AccessAction, AccessPage, PreviewAction, PrivacyBudgetAction, SiteKeyAction, load_access,
};

#[component]
pub fn Access() -> impl IntoView {
    let data = Resource::new(|| (), |_| load_access());
    view! {
        <leptos_meta::Title text="Data access"/>
        <h1>"Data access"</h1>
        <FormError/>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => view! { <AccessView d/> }.into_any(),
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

#[component]
fn AccessView(d: AccessPage) -> impl IntoView {
    let me = d.me.user.id;
    let my_sites: Vec<uuid::Uuid> = d
        .directory
        .sites
        .iter()
        .filter(|s| s.custodians.contains(&me))
        .map(|s| s.id)
        .collect();
    let custodian = d.me.acting_roles.contains(&Role::Custodian);
    let site_name = |id: uuid::Uuid| {
        d.directory
            .sites
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| id.to_string())
    };
    let study_title = |id: uuid::Uuid| {
        d.studies
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.title.clone())
            .unwrap_or_else(|| id.to_string())
    };
    // Pending requests first (they wait for this custodian), then the newest.
    let mut for_me: Vec<&AccessRequestDto> = d
        .requests
        .iter()
        .filter(|r| my_sites.contains(&r.site_id))
        .collect();
    for_me.sort_by_key(|r| {
        (
            r.status != AccessStatus::Pending,
            std::cmp::Reverse(r.created_at),
        )
    });
    // Each plan a request covers: its version, and whether the committee approved it.
    let plan_line = |study: uuid::Uuid, hash: &str| {
        let version = d
            .plans
            .iter()
            .find(|p| p.study_id == study && p.hash == hash)
            .map(|p| p.version);
        let approval = d
            .reviews
            .iter()
            .filter(|r| r.study_id == study && r.plan_hashes.iter().any(|h| h == hash))
            .max_by_key(|r| r.created_at);
        let (class, ethics) = match approval {
            Some(r) if r.decision == ReviewDecision::Approve => (
                "ok",
                format!(
                    "approved by the ethics committee until {}",
                    r.expires_at.as_ref().map(day).unwrap_or_default()
                ),
            ),
            Some(r) if r.decision == ReviewDecision::RequestChanges => (
                "warn",
                "not approved: the committee asked for changes".to_string(),
            ),
            Some(_) => (
                "warn",
                "not approved: the committee rejected it".to_string(),
            ),
            None => (
                "warn",
                "not approved by the ethics committee (no decision on it yet)".to_string(),
            ),
        };
        let label = version.map_or_else(|| "a plan".to_string(), |v| format!("plan version {v}"));
        view! {
            <li>
                <a href=format!("/studies/{study}#plans-h")>{label}</a>" "<Hash hash=hash.to_string()/>
                <br/><span class=format!("ethics {class}")>{ethics}</span>
            </li>
        }
    };
    let mine: Vec<&AccessRequestDto> = d.requests.iter().filter(|r| r.requester_id == me).collect();
    let names = my_sites
        .iter()
        .map(|s| site_name(*s))
        .collect::<Vec<_>>()
        .join(", ");

    let decide = |r: &AccessRequestDto| {
        let id = r.id.to_string();
        match r.status {
            AccessStatus::Pending => view! {
                <form method="post" action=AccessAction::url() class="decide"><CsrfField/>
                    <input type="hidden" name=field("request_id") value=id.clone()/>
                    <label for=format!("expires-{id}")>"Access expires on"</label>
                    <input id=format!("expires-{id}") type="date" name=field("expires_on") value=typed("expires_on", &d.next_year)/>
                    <label for=format!("cases-{id}")>"Cases granted (at most the cases asked)"</label>
                    <input id=format!("cases-{id}") type="number" min="1" max=r.scope.cases name=field("cases") value=typed("cases", &r.scope.cases.to_string()) class="short"/>
                    <label for=format!("comment-{id}")>"Comment"</label>
                    <input id=format!("comment-{id}") name=field("comment") value=typed("comment", "")/>
                    <div class="actions">
                        <button type="submit" name=field("action") value="approve">"Approve"</button>
                        <button type="submit" name=field("action") value="deny" class="danger">"Deny"</button>
                    </div>
                </form>
            }.into_any(),
            AccessStatus::Approved => view! {
                <form method="post" action=AccessAction::url() class="decide"><CsrfField/>
                    <input type="hidden" name=field("request_id") value=id.clone()/>
                    <input type="hidden" name=field("action") value="revoke"/>
                    <label for=format!("reason-{id}")>"Reason for revoking"</label>
                    <input id=format!("reason-{id}") name=field("reason") required/>
                    <button type="submit" class="danger">"Revoke"</button>
                </form>
            }.into_any(),
            _ => view! { <span class="hint">"decided"</span> }.into_any(),
        }
    };

    let paged = crate::components::page_of(&for_me, |r| {
        format!(
            "{} {} {} {}",
            study_title(r.study_id),
            site_name(r.site_id),
            r.status.as_str(),
            r.justification
        )
    });
    let search = (!for_me.is_empty()).then(|| {
        view! { <crate::components::ListSearch what="requests" path="/access" total=paged.total matching=paged.matching page=paged.page pages=paged.pages query=paged.query.clone()/> }
    });
    let request_rows = paged.rows.iter().map(|r| view! {
        <tr>
            <td><a href=format!("/studies/{}", r.study_id)>{study_title(r.study_id)}</a></td>
            <td>{site_name(r.site_id)}</td>
            <td>{format!("{} {} · {} · {} cases", r.scope.modality, r.scope.body_part, r.scope.label, r.scope.cases)}</td>
            <td>{r.justification.clone()}</td>
            <td><ul class="plain">{r.plan_hashes.iter().map(|h| plan_line(r.study_id, h)).collect_view()}</ul></td>
            <td><Badge text=r.status.as_str().to_string()/>{r.expires_at.map(|e| view! { <br/>"until "{day(&e)} })}</td>
            <td>{decide(r)}</td>
        </tr>
    }).collect_view();

    let activity = d.activity.iter().map(|a| {
        let rounds = a.rounds.iter().map(|round| {
            let cells = round.sites.iter().filter(|s| my_sites.contains(&s.site_id)).map(|s| {
                let metrics = s.evaluation.as_ref().map(|m| format!(", {}", m.summary())).unwrap_or_default();
                format!("{}: {}{}{}", s.site_name, s.status, s.samples.map(|n| format!(", {n} samples")).unwrap_or_default(), metrics)
            }).collect::<Vec<_>>().join("; ");
            view! { <li>"Round "{round.number}" ("{round.state.clone()}"): "{cells}</li> }
        }).collect_view();
        view! {
            <li class="card">
                <p><a href=format!("/runs/{}", a.run.id)>{a.study_title.clone()}</a>" "<Badge text=a.run.status.clone()/></p>
                <p class="meta">"Plan "<Hash hash=a.run.plan_hash.clone()/>" · ethics decision "<code>{a.run.review_id.to_string()}</code>" · grants "{a.run.grant_ids.iter().map(|g| view! { <code>{g.to_string()}</code>" " }).collect_view()}" · started "{when(&a.run.created_at)}</p>
                <ul class="plain">{rounds}</ul>
            </li>
        }
    }).collect_view();

    let key_rows = d.keys.iter().map(|k| {
        let revoke = k.revoked_at.is_none().then(|| view! {
            <form method="post" action=SiteKeyAction::url()><CsrfField/>
                <input type="hidden" name=field("site_id") value=k.site_id.to_string()/>
                <input type="hidden" name=field("key_id") value=k.key_id.clone()/>
                <button type="submit" name=field("action") value="revoke" class="danger">"Revoke"</button>
            </form>
        });
        view! {
            <tr>
                <td>{site_name(k.site_id)}</td>
                <td><code>{k.key_id.clone()}</code></td>
                <td>{k.name.clone()}</td>
                <td>{day(&k.registered_at)}</td>
                <td>{match &k.revoked_at {
                    Some(at) => view! { <Badge text="revoked".to_string()/>" "{day(at)} }.into_any(),
                    None => view! { <Badge text="in force".to_string()/> }.into_any(),
                }}</td>
                <td>{revoke}</td>
            </tr>
        }
    }).collect_view();
    let site_options = my_sites
        .iter()
        .map(|s| view! { <option value=s.to_string()>{site_name(*s)}</option> })
        .collect_view();

    let my_rows = mine.iter().map(|r| view! {
        <tr>
            <td><a href=format!("/studies/{}", r.study_id)>{study_title(r.study_id)}</a></td>
            <td>{site_name(r.site_id)}</td>
            <td><Badge text=r.status.as_str().to_string()/></td>
            <td>{r.expires_at.as_ref().map(day).unwrap_or_default()}</td>
            <td>{r.comment.clone().unwrap_or_default()}</td>
        </tr>
    }).collect_view();

    view! {
        {custodian.then(|| view! {
            <section aria-labelledby="for-site">
                <h2 id="for-site">"Requests for your sites ("{names.clone()}")"</h2>
                {search}
                {if for_me.is_empty() { view! { <p>"No requests for your sites."</p> }.into_any() } else { view! {
                    <table id="site-requests">
                        <thead><tr><th scope="col">"Study"</th><th scope="col">"Site"</th><th scope="col">"Scope"</th><th scope="col">"Justification"</th><th scope="col">"Plans"</th><th scope="col">"Status"</th><th scope="col">"Decision"</th></tr></thead>
                        <tbody>{request_rows}</tbody>
                    </table>
                }.into_any() }}
            </section>
            <section aria-labelledby="previews-h">
                <h2 id="previews-h">"Synthetic previews of your sites' data"</h2>
                {if d.previews.is_empty() { view! { <p>"No previews asked of your sites."</p> }.into_any() } else {
                    d.previews.iter().map(|p| {
                        let id = p.id.to_string();
                        let study = study_title(p.study_id);
                        view! {
                            <p class="meta">"For the study "<a href=format!("/studies/{}", p.study_id)>{study}</a></p>
                            <PreviewSet p=p.clone()/>
                            {(p.status == "awaiting_release").then(|| view! {
                                <form method="post" action=PreviewAction::url() class="decide card"><CsrfField/>
                                    <input type="hidden" name=field("preview_id") value=id.clone()/>
                                    <label for=format!("preview-comment-{id}")>"Comment"</label>
                                    <input id=format!("preview-comment-{id}") name=field("comment") required value=typed("comment", "")/>
                                    <div class="actions">
                                        <button type="submit" name=field("action") value="release">"Release to the researcher"</button>
                                        <button type="submit" name=field("action") value="reject" class="danger">"Reject"</button>
                                    </div>
                                </form>
                            })}
                        }
                    }).collect_view().into_any()
                }}
            </section>
            <section aria-labelledby="site-keys">
                <h2 id="site-keys">"Signing keys of your sites"</h2>
                <p class="hint">"Only a registered key speaks for a site: the server records a result or heartbeat only if it verifies with one in force. Make the key at the site with "<code>"consilium-worker keygen --out site.key"</code>" and register the public key it prints; to rotate, register the new key, then revoke the old one."</p>
                {if d.keys.is_empty() { view! { <p>"No keys registered: your sites' workers cannot be heard."</p> }.into_any() } else { view! {
                    <table id="keys">
                        <thead><tr><th scope="col">"Site"</th><th scope="col">"Key"</th><th scope="col">"Name"</th><th scope="col">"Registered"</th><th scope="col">"Status"</th><th scope="col">"Action"</th></tr></thead>
                        <tbody>{key_rows}</tbody>
                    </table>
                }.into_any() }}
                <form method="post" action=SiteKeyAction::url() class="card" id="register-key"><CsrfField/>
                    <input type="hidden" name=field("action") value="register"/>
                    <label for="key-site">"Site"</label>
                    <select id="key-site" name=field("site_id")>{site_options}</select>
                    <label for="key-public">"Public key (the line "<code>"keygen"</code>" printed)"</label>
                    <input id="key-public" name=field("public_key") required value=typed("public_key", "")/>
                    <label for="key-name">"Name"</label>
                    <input id="key-name" name=field("name") required value=typed("name", "")/>
                    <button type="submit">"Register the key"</button>
                </form>
            </section>
            <section aria-labelledby="privacy-ledger">
                <h2 id="privacy-ledger">"Privacy ledgers of your sites' data"</h2>
                <p class="hint">"ε bounds how much any one patient's data can change what a study's models reveal (smaller is more private; δ is the small chance that the bound fails). Every private round is reserved here before its job goes to your site and counted when your site trains it; a round that would take your dataset past its lifetime budget is not sent. Your site's worker keeps its own ledger too, and refuses such a round by itself."</p>
                {d.privacy.iter().map(|l| view! { <PrivacyLedger l=l.clone()/> }).collect_view()}
            </section>
            <section aria-labelledby="on-site">
                <h2 id="on-site">"Running on your sites' data"</h2>
                {if d.activity.is_empty() { view! { <p>"Nothing has run on your sites' data."</p> }.into_any() } else { view! { <ul class="plain">{activity}</ul> }.into_any() }}
            </section>
        })}
        {(!mine.is_empty()).then(|| view! {
            <section aria-labelledby="yours">
                <h2 id="yours">"Your requests"</h2>
                <table>
                    <thead><tr><th scope="col">"Study"</th><th scope="col">"Site"</th><th scope="col">"Status"</th><th scope="col">"Expires"</th><th scope="col">"Comment"</th></tr></thead>
                    <tbody>{my_rows}</tbody>
                </table>
            </section>
        })}
    }
}

/// ε with three decimals (the ledger's figures).
fn eps(x: f64) -> String {
    format!("{x:.3}")
}

/// One dataset's privacy ledger: budget, spent, left, the studies that spent it, and the
/// custodian's form to set the budget.
#[component]
fn PrivacyLedger(l: consilium_core::api::DatasetPrivacyDto) -> impl IntoView {
    let id = l.site_id;
    let delta = l.delta.map(|d| format!(" at δ = {d}")).unwrap_or_default();
    let summary = match (&l.budget, l.remaining_epsilon) {
        (Some(b), Some(left)) => format!(
            "ε = {} spent{} (ε = {} with the rounds and previews now out) of a lifetime budget of ε = {}; ε = {} left.",
            eps(l.spent_epsilon),
            delta,
            eps(l.spent_or_reserved_epsilon),
            b.epsilon,
            eps(left)
        ),
        _ => format!(
            "ε = {} spent{}. No lifetime budget is set: only each study's approved ε limits what is spent.",
            eps(l.spent_epsilon),
            delta
        ),
    };
    let rows = l
        .studies
        .iter()
        .map(|s| {
            view! {
                <tr>
                    <td><a href=format!("/studies/{}", s.study_id)>{s.title.clone()}</a></td>
                    <td>{eps(s.epsilon)}</td>
                    <td>{s.rounds_committed}</td>
                    <td>{s.rounds_reserved}</td>
                    <td>{s.previews}</td>
                </tr>
            }
        })
        .collect_view();
    let budget_now = l
        .budget
        .as_ref()
        .map(|b| b.epsilon.to_string())
        .unwrap_or_default();
    let delta_now = l
        .budget
        .as_ref()
        .map_or_else(|| "1e-5".to_string(), |b| b.delta.to_string());
    view! {
        <div class="card privacy-ledger" id=format!("privacy-{id}")>
            <h3>{l.site_name.clone()}</h3>
            <p class="ledger-summary">{summary}</p>
            {if l.studies.is_empty() {
                view! { <p>"No private round or preview has run on this data."</p> }.into_any()
            } else {
                view! {
                    <div class="scroll">
                        <table>
                            <caption>"What each study spent"</caption>
                            <thead><tr><th scope="col">"Study"</th><th scope="col">"ε spent"</th><th scope="col">"Rounds spent"</th><th scope="col">"Out now"</th><th scope="col">"Private previews"</th></tr></thead>
                            <tbody>{rows}</tbody>
                        </table>
                    </div>
                }.into_any()
            }}
            <form method="post" action=PrivacyBudgetAction::url() class="inline-form"><CsrfField/>
                <input type="hidden" name=field("site_id") value=id.to_string()/>
                <label for=format!("budget-eps-{id}")>"Lifetime ε"</label>
                <input id=format!("budget-eps-{id}") name=field("epsilon") inputmode="decimal" required value=typed("epsilon", &budget_now)/>
                <label for=format!("budget-delta-{id}")>"δ"</label>
                <input id=format!("budget-delta-{id}") name=field("delta") inputmode="decimal" required value=typed("delta", &delta_now)/>
                <button type="submit">"Set the budget"</button>
            </form>
        </div>
    }
}
