//! A study: protocol, sites, training plans with their approval state, the ethics review,
//! data access, and the runs (with the reasons a run cannot start yet).

use consilium_core::Role;
use consilium_core::api::{
    AccessRequestDto, AccessStatus, PlanDto, ReviewDecision, ReviewDto, StudyDto, StudyStatus,
};
use leptos::prelude::*;

use crate::csrf::CsrfField;
use leptos::server_fn::ServerFn as _;
use leptos_router::hooks::use_params_map;

use super::loading;
use crate::components::{Badge, Failure, FormError, Hash, day, field, textarea_text, typed, when};
use crate::server::{StudyAction, StudyPage, SubmitPlan, load_study};

#[component]
pub fn Study() -> impl IntoView {
    let params = use_params_map();
    let data = Resource::new(
        move || params.read().get("id").unwrap_or_default(),
        load_study,
    );
    view! {
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => {
                        let title = format!("{} (study)", d.study.title);
                        let page = view! { <StudyView d/> }.into_any();
                        view! { <leptos_meta::Title text=title/>{page} }.into_any()
                    }
                    Err(e) => view! { <leptos_meta::Title text="Study"/><h1>"Study"</h1><Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

/// A committee decision in words, as the pages show it.
fn decision_words(d: ReviewDecision) -> &'static str {
    match d {
        ReviewDecision::Approve => "approved",
        ReviewDecision::RequestChanges => "changes requested",
        ReviewDecision::Reject => "rejected",
    }
}

fn last_approval(reviews: &[ReviewDto]) -> Option<&ReviewDto> {
    reviews
        .iter()
        .filter(|r| r.decision == ReviewDecision::Approve)
        .max_by_key(|r| r.created_at)
}

/// The committee's last decision on any plan.
fn last_review(reviews: &[ReviewDto]) -> Option<&ReviewDto> {
    reviews.iter().max_by_key(|r| r.created_at)
}

/// What the committee decided on this plan version, and only this one: a decision binds the
/// plans it was taken on, never a version submitted after it.
fn committee_state(study: &StudyDto, reviews: &[ReviewDto], hash: &str, latest: &str) -> String {
    let decided = reviews
        .iter()
        .filter(|r| r.plan_hashes.iter().any(|h| h == hash))
        .max_by_key(|r| r.created_at);
    match decided {
        Some(r) if r.protocol_version != study.protocol_version => format!(
            "{} on protocol version {} (the protocol has changed since)",
            decision_words(r.decision),
            r.protocol_version
        ),
        Some(r) if r.decision == ReviewDecision::Approve => format!(
            "approved until {}",
            r.expires_at.as_ref().map(day).unwrap_or_default()
        ),
        Some(r) if r.decision == ReviewDecision::RequestChanges => "changes requested".into(),
        Some(_) => "rejected".into(),
        None if hash != latest => "never reviewed (a later version replaced it)".into(),
        None if study.status == StudyStatus::Submitted => "awaiting decision".into(),
        None => "not yet submitted".into(),
    }
}

fn site_state(requests: &[AccessRequestDto], site: uuid::Uuid, hash: &str) -> String {
    let mine: Vec<&AccessRequestDto> = requests.iter().filter(|r| r.site_id == site).collect();
    if let Some(g) = mine
        .iter()
        .find(|r| r.status == AccessStatus::Approved && r.plan_hashes.iter().any(|h| h == hash))
    {
        return format!(
            "granted until {}",
            g.expires_at.as_ref().map(day).unwrap_or_default()
        );
    }
    if mine.iter().any(|r| r.status == AccessStatus::Approved) {
        return "granted for another plan".into();
    }
    match mine.last() {
        Some(r) => r.status.as_str().to_string(),
        None => "not requested".into(),
    }
}

const EXAMPLE_MANIFEST: &str = r#"{
  "model": { "architecture": "small_cnn", "num_classes": 2 },
  "preprocessing": { "image_size": 28, "normalisation": "zscore" },
  "optimiser": { "name": "adamw", "learning_rate": 0.003, "weight_decay": 0.0001 },
  "local_epochs": 2,
  "batch_size": 16,
  "rounds": 3,
  "aggregation": { "strategy": "fedavg", "min_sites": 2 },
  "seed": 7
}"#;

#[component]
fn StudyView(d: StudyPage) -> impl IntoView {
    let s = d.study.clone();
    let me = d.me.user.id;
    let owner = s.researcher_id == me && d.me.acting_roles.contains(&Role::Researcher);
    let committee = d
        .directory
        .committees
        .iter()
        .find(|c| c.id == s.committee_id)
        .cloned();
    let member = d.me.acting_roles.contains(&Role::CommitteeMember)
        && committee.as_ref().is_some_and(|c| c.members.contains(&me));
    let site_name = |id: uuid::Uuid| {
        d.directory
            .sites
            .iter()
            .find(|x| x.id == id)
            .map(|x| x.name.clone())
            .unwrap_or_else(|| id.to_string())
    };
    let sid = s.id.to_string();
    let latest = d.plans.iter().max_by_key(|p| p.version).cloned();
    // A study whose plan trains with DP-SGD gets only private previews (the server refuses
    // others); the form asks for the ε a preview may spend from the site's ledger.
    let preview_must_be_private = latest
        .as_ref()
        .is_some_and(|p| p.manifest.privacy.dp_sgd.is_some());
    // A segmentation plan's previews are images with their masks, not images per class.
    let preview_of_masks = latest
        .as_ref()
        .is_some_and(|p| p.manifest.model.labels.is_some());
    let manifest_default = latest
        .as_ref()
        .and_then(|p| serde_json::to_string_pretty(&p.manifest).ok())
        .unwrap_or_else(|| EXAMPLE_MANIFEST.to_string());
    let latest_attached: Vec<(String, u64)> = latest
        .as_ref()
        .map(|p| p.files.iter().map(|f| (f.name.clone(), f.size)).collect())
        .unwrap_or_default();
    let can_edit = owner && s.status != StudyStatus::Submitted && s.status != StudyStatus::Rejected;
    let can_submit =
        owner && matches!(s.status, StudyStatus::Draft | StudyStatus::ChangesRequested);
    let can_review = member && s.status == StudyStatus::Submitted;

    let latest_hash = d.plans.last().map(|p| p.hash.clone()).unwrap_or_default();
    let request_covers = match d.plans.iter().max_by_key(|p| p.version) {
        Some(p) => format!(
            "The request covers the latest plan: version {}, SHA-256 {} (ethics committee: {}).",
            p.version,
            p.hash,
            committee_state(&s, &d.reviews, &p.hash, &latest_hash)
        ),
        None => "Submit a training plan first: a request covers the latest plan.".to_string(),
    };
    // What the study's sites' workers were last heard doing, before a run is started.
    let sites_now: Vec<String> = s
        .sites
        .iter()
        .filter_map(|st| d.health.iter().find(|h| h.site_id == st.site_id))
        .map(|h| format!("{}: {}", h.site_name, super::sites::health_words(h)))
        .collect();
    let binds = what_it_binds(&s, d.plans.iter().max_by_key(|p| p.version), site_name);
    // Who sees the sites' data-access requests (and their previews): the study's researcher,
    // the administrators and auditors, and each site's custodians for their own site. Others
    // are told so, never shown "not requested" for what they cannot see.
    let oversight =
        d.me.acting_roles
            .iter()
            .any(|r| matches!(r, Role::Administrator | Role::Auditor));
    let custodian_sites: Vec<uuid::Uuid> = if d.me.acting_roles.contains(&Role::Custodian) {
        d.directory
            .sites
            .iter()
            .filter(|x| x.custodians.contains(&me))
            .map(|x| x.id)
            .collect()
    } else {
        Vec::new()
    };
    let sees_requests = |site: uuid::Uuid| owner || oversight || custodian_sites.contains(&site);
    let sees_previews = owner
        || oversight
        || s.sites
            .iter()
            .any(|st| custodian_sites.contains(&st.site_id));
    let plan_rows = d.plans.iter().rev().map(|p| {
        let per_site = s.sites.iter().map(|st| {
            let state = if sees_requests(st.site_id) {
                site_state(&d.requests, st.site_id, &p.hash)
            } else {
                "the custodian's decision is not shown to you".to_string()
            };
            format!("{}: {}", site_name(st.site_id), state)
        }).collect::<Vec<_>>();
        view! {
            <tr>
                <td>{p.version}</td>
                <td><Hash hash=p.hash.clone()/></td>
                <td>{p.manifest.model.architecture.clone()}", "{p.manifest.rounds}" rounds"</td>
                <td>{p.files.iter().map(|f| f.name.clone()).collect::<Vec<_>>().join(", ")}</td>
                <td>{committee_state(&s, &d.reviews, &p.hash, &latest_hash)}</td>
                <td><ul class="plain">{per_site.into_iter().map(|x| view! { <li>{x}</li> }).collect_view()}</ul></td>
            </tr>
        }
    }).collect_view();

    let diff = plan_diff(&d.plans, &d.reviews, latest.as_ref());
    let protocol_note = last_approval(&d.reviews).and_then(|r| {
        (r.protocol_version != s.protocol_version).then(|| format!(
            "The protocol changed since the last approval (version {} approved; this is version {}).",
            r.protocol_version, s.protocol_version
        ))
    });

    let reviews = d.reviews.iter().rev().map(|r| view! {
        <li class="card">
            <p><Badge text=r.decision.as_str().to_string()/>" on protocol version "{r.protocol_version}", "{when(&r.created_at)}</p>
            <p>{r.comments.clone()}</p>
            {r.conditions.clone().map(|c| view! { <p><strong>"Conditions: "</strong>{c}</p> })}
            {r.expires_at.map(|e| view! { <p>"Expires "{day(&e)}</p> })}
            <p class="hint">"Covers plans "{r.plan_hashes.iter().map(|h| h.chars().take(12).collect::<String>()).collect::<Vec<_>>().join(", ")}</p>
        </li>
    }).collect_view();

    let requests = d.requests.iter().map(|r| view! {
        <tr>
            <td>{site_name(r.site_id)}</td>
            <td><Badge text=r.status.as_str().to_string()/></td>
            <td>{format!("{} {} · {} · {} cases", r.scope.modality, r.scope.body_part, r.scope.label, r.scope.cases)}</td>
            <td>{r.expires_at.as_ref().map(day).unwrap_or_default()}</td>
            <td>{r.comment.clone().unwrap_or_default()}</td>
        </tr>
    }).collect_view();
    let requestable: Vec<(String, String)> = s
        .sites
        .iter()
        .filter(|st| {
            !d.requests.iter().any(|r| {
                r.site_id == st.site_id
                    && matches!(r.status, AccessStatus::Pending | AccessStatus::Approved)
            })
        })
        .map(|st| (st.site_id.to_string(), site_name(st.site_id)))
        .collect();

    let granted: Vec<(String, String)> = s
        .sites
        .iter()
        .filter(|st| {
            d.requests
                .iter()
                .any(|r| r.site_id == st.site_id && r.status == AccessStatus::Approved)
        })
        .map(|st| (st.site_id.to_string(), site_name(st.site_id)))
        .collect();

    let runs = d.runs.iter().map(|r| view! {
        <li><a href=format!("/runs/{}", r.id)>"Run of "{when(&r.created_at)}</a>" "<Badge text=r.status.clone()/>" — round "{r.current_round}</li>
    }).collect_view();

    let sites = s.sites.iter().map(|st| view! {
        <tr><td>{site_name(st.site_id)}</td><td>{st.scope.modality.clone()}</td><td>{st.scope.body_part.clone()}</td><td>{st.scope.label.clone()}</td><td>{st.scope.cases}</td></tr>
    }).collect_view();

    view! {
        <h1>{s.title.clone()}" "<Badge text=s.status.as_str().to_string()/></h1>
        <FormError/>
        <p class="meta">"Protocol version "{s.protocol_version}" · committee: "{committee.map(|c| c.name).unwrap_or_default()}" · updated "{when(&s.updated_at)}</p>
        <div class="actions">
            {can_edit.then(|| view! { <a class="button secondary" href=format!("/studies/{}/edit", s.id)>"Edit study"</a> })}
            {(can_edit && s.status == StudyStatus::Approved).then(|| view! { <span class="hint">" Editing the approved study returns it to draft for a new decision."</span> })}
            {can_submit.then(|| view! {
                <form method="post" action=StudyAction::url()><CsrfField/>
                    <input type="hidden" name=field("study_id") value=sid.clone()/>
                    <input type="hidden" name=field("action") value="submit"/>
                    <button type="submit">"Submit for ethics review"</button>
                </form>
            })}
        </div>
        <section aria-labelledby="protocol-h">
            <h2 id="protocol-h">"Protocol"</h2>
            <p><strong>"Purpose: "</strong>{s.purpose.clone()}</p>
            <pre class="protocol">{s.protocol_text.clone()}</pre>
            <table>
                <caption>"Sites and the data asked of each"</caption>
                <thead><tr><th scope="col">"Site"</th><th scope="col">"Modality"</th><th scope="col">"Body part"</th><th scope="col">"Label"</th><th scope="col">"Cases"</th></tr></thead>
                <tbody>{sites}</tbody>
            </table>
        </section>

        <section aria-labelledby="plans-h">
            <h2 id="plans-h">"Training plans"</h2>
            {if d.plans.is_empty() {
                view! { <p>"No training plan submitted yet."</p> }.into_any()
            } else {
                view! {
                    <table>
                        <thead><tr><th scope="col">"Version"</th><th scope="col">"Hash"</th><th scope="col">"Model"</th><th scope="col">"Files"</th><th scope="col">"Ethics committee"</th><th scope="col">"Sites"</th></tr></thead>
                        <tbody>{plan_rows}</tbody>
                    </table>
                }.into_any()
            }}
            {latest.as_ref().map(|p| view! {
                <details class="card" id="plan-content">
                    <summary>{format!("The manifest and files of plan version {}", p.version)}</summary>
                    <h3>"Manifest"</h3>
                    <pre class="code">{serde_json::to_string_pretty(&p.manifest).unwrap_or_default()}</pre>
                    {d.latest_files.iter().map(|(name, text)| view! {
                        <h3>{name.clone()}</h3>
                        <pre class="code">{text.clone()}</pre>
                    }).collect_view()}
                </details>
            })}
            {owner.then(|| view! {
                <details class="card" id="plan-form" open=d.plans.is_empty() || crate::flash::typed_into("manifest")>
                    <summary>"Submit a training plan"</summary>
                    {(s.status == StudyStatus::Approved).then(|| view! {
                        <p class="notice warn" role="note">"This study is approved. A new plan version returns it to draft: the committee must decide again, and each site's grant must name the new plan before a run can start."</p>
                    })}
                    <PlanForm study_id=sid.clone() manifest=typed("manifest", &manifest_default) attached=latest_attached.clone()/>
                </details>
            })}
        </section>

        <section aria-labelledby="review-h">
            <h2 id="review-h">"Ethics review"</h2>
            {protocol_note.map(|n| view! { <p class="notice warn">{n}</p> })}
            {diff}
            {can_review.then(|| view! { <ReviewForm study_id=sid.clone() next_year=d.next_year.clone() binds=binds.clone()/> })}
            {if d.reviews.is_empty() { view! { <p>"No decision yet."</p> }.into_any() } else { view! { <ul class="plain">{reviews}</ul> }.into_any() }}
        </section>

        <section aria-labelledby="access-h">
            <h2 id="access-h">"Data access"</h2>
            {if d.requests.is_empty() {
                view! { <p>"No data-access requests that you may see."</p> }.into_any()
            } else {
                view! {
                    <table>
                        <thead><tr><th scope="col">"Site"</th><th scope="col">"Status"</th><th scope="col">"Scope"</th><th scope="col">"Expires"</th><th scope="col">"Custodian's comment"</th></tr></thead>
                        <tbody>{requests}</tbody>
                    </table>
                }.into_any()
            }}
            {(owner && !requestable.is_empty()).then(|| view! {
                <form method="post" action=StudyAction::url() class="card"><CsrfField/>
                    <h3>"Request access to a site's data"</h3>
                    <p class="hint">{request_covers.clone()}</p>
                    <input type="hidden" name=field("study_id") value=sid.clone()/>
                    <input type="hidden" name=field("action") value="request_access"/>
                    <label for="site">"Site"</label>
                    <select id="site" name=field("site_id")>
                        {requestable.into_iter().map(|(id, name)| view! { <option value=id>{name}</option> }).collect_view()}
                    </select>
                    <label for="justification">"Justification"</label>
                    <textarea id="justification" name=field("justification") rows="3" required>{textarea_text(typed("justification", ""))}</textarea>
                    <button type="submit">"Request access"</button>
                </form>
            })}
        </section>

        <section aria-labelledby="previews-h">
            <h2 id="previews-h">"Synthetic previews"</h2>
            <p class="hint">"A site can generate synthetic images that resemble its data, checked so that none is a near-copy of a real image; its custodian decides whether you may see them."</p>
            {(owner && !granted.is_empty()).then(|| view! {
                <form method="post" action=StudyAction::url() class="card inline-form"><CsrfField/>
                    <input type="hidden" name=field("study_id") value=sid.clone()/>
                    <input type="hidden" name=field("action") value="request_preview"/>
                    <div>
                        <label for="preview-site">"Site"</label>
                        <select id="preview-site" name=field("site_id")>
                            {granted.iter().map(|(id, name)| view! { <option value=id.clone()>{name.clone()}</option> }).collect_view()}
                        </select>
                    </div>
                    <div>
                        <label for="generator">"Generator"</label>
                        <select id="generator" name=field("generator")>
                            <option value="auto">"Automatic (VAE with enough images)"</option>
                            <option value="cvae">"Conditional VAE"</option>
                            <option value="pca_gaussian">"PCA-Gaussian (small datasets)"</option>
                        </select>
                    </div>
                    <div>
                        <label for="per-class">{if preview_of_masks { "Images (each with its mask)" } else { "Images per class" }}</label>
                        <input id="per-class" type="number" min="1" max="64" name=field("per_class") value=typed("per_class", "12") class="short"/>
                    </div>
                    <div>
                        <label for="preview-epsilon">{if preview_must_be_private { "Privacy budget ε (required: the plan trains with DP-SGD)" } else { "Privacy budget ε (empty: not private)" }}</label>
                        <input id="preview-epsilon" name=field("epsilon") inputmode="decimal" required=preview_must_be_private value=typed("epsilon", if preview_must_be_private { "1" } else { "" }) class="short"/>
                    </div>
                    <button type="submit">"Ask for a preview"</button>
                </form>
            })}
            {(owner && granted.is_empty()).then(|| view! { <p class="hint">"A site can make a preview once its custodian has granted you access."</p> })}
            {if d.previews.is_empty() && !sees_previews {
                view! { <p class="hint">"Synthetic previews are shown to the study's researcher, the sites' custodians and the auditors, not to you."</p> }.into_any()
            } else if d.previews.is_empty() {
                view! { <p>"No previews yet."</p> }.into_any()
            } else {
                d.previews.iter().map(|p| {
                    if p.images.is_empty() {
                        let state = match p.status.as_str() {
                            "generating" => "being generated at the site".to_string(),
                            "awaiting_release" => "generated and checked; awaiting the custodian's release".to_string(),
                            "rejected" => format!("rejected by the custodian: {}", p.comment.clone().unwrap_or_default()),
                            "failed" => format!("failed: {}", p.failure.clone().unwrap_or_default()),
                            other => other.replace('_', " "),
                        };
                        view! { <p class="preview-state">{format!("{}: {state}", p.site_name)}</p> }.into_any()
                    } else {
                        view! { <super::previews::PreviewSet p=p.clone()/> }.into_any()
                    }
                }).collect_view().into_any()
            }}
        </section>

        <section aria-labelledby="runs-h">
            <h2 id="runs-h">"Runs"</h2>
            {if d.preflight.ready {
                view! {
                    <p class="notice ok" role="status">"Everything a run needs is in place: the committee's approval, the plan, and every site's grant."</p>
                    {(!sites_now.is_empty()).then(|| view! {
                        <p id="sites-online">"Sites now: "{sites_now.join("; ")}" ("<a href="/sites">"site health"</a>")"</p>
                    })}
                    {owner.then(|| view! {
                        <form method="post" action=StudyAction::url()><CsrfField/>
                            <input type="hidden" name=field("study_id") value=sid.clone()/>
                            <input type="hidden" name=field("action") value="start_run"/>
                            <button type="submit">"Start a run"</button>
                        </form>
                    })}
                }.into_any()
            } else {
                view! {
                    <div class="notice warn" id="preflight">
                        <p><strong>"A run cannot start yet:"</strong></p>
                        <ul>{d.preflight.unmet.iter().map(|u| view! { <li>{u.clone()}</li> }).collect_view()}</ul>
                    </div>
                }.into_any()
            }}
            <ul class="plain">{runs}</ul>
        </section>
    }
}

/// The latest plan against the last approved one, line by line.
fn plan_diff(
    plans: &[PlanDto],
    reviews: &[ReviewDto],
    latest: Option<&PlanDto>,
) -> Option<AnyView> {
    let latest = latest?;
    let reviewed = last_review(reviews)?;
    if reviewed.plan_hashes.contains(&latest.hash) {
        return Some(
            view! { <p class="hint">"The latest plan is the one the committee last reviewed."</p> }
                .into_any(),
        );
    }
    let old = plans
        .iter()
        .rev()
        .find(|p| reviewed.plan_hashes.contains(&p.hash))?;
    let a = serde_json::to_string_pretty(&old.manifest).ok()?;
    let b = serde_json::to_string_pretty(&latest.manifest).ok()?;
    let diff = similar::TextDiff::from_lines(&a, &b);
    let lines = diff
        .iter_all_changes()
        .map(|c| {
            let (class, sign) = match c.tag() {
                similar::ChangeTag::Delete => ("del", "− "),
                similar::ChangeTag::Insert => ("ins", "+ "),
                similar::ChangeTag::Equal => ("same", "  "),
            };
            view! { <span class=class>{sign}{c.value().to_string()}</span> }
        })
        .collect_view();
    let files = attachment_changes(old, latest);
    let files = if files.is_empty() {
        view! { <p class="hint">"Attachments: unchanged."</p> }.into_any()
    } else {
        view! {
            <ul class="plain" aria-label="Attachment changes">
                {files.into_iter().map(|f| view! { <li>{f}</li> }).collect_view()}
            </ul>
        }
        .into_any()
    };
    Some(
        view! {
            <h3>{format!(
                "Changes since the plan the committee last reviewed (version {}, {}) → version {}",
                old.version,
                decision_words(reviewed.decision),
                latest.version
            )}</h3>
            <pre class="diff" aria-label="Plan changes">{lines}</pre>
            {files}
        }
        .into_any(),
    )
}

/// The attachments a new plan version added, removed or changed, by name.
fn attachment_changes(old: &PlanDto, new: &PlanDto) -> Vec<String> {
    let mut out = Vec::new();
    for f in &new.files {
        match old.files.iter().find(|o| o.name == f.name) {
            None => out.push(format!("added {} ({} bytes)", f.name, f.size)),
            Some(o) if o.sha256 != f.sha256 => out.push(format!(
                "changed {} ({} → {} bytes)",
                f.name, o.size, f.size
            )),
            Some(_) => {}
        }
    }
    for o in &old.files {
        if !new.files.iter().any(|f| f.name == o.name) {
            out.push(format!("removed {}", o.name));
        }
    }
    out
}

#[component]
fn ReviewForm(study_id: String, next_year: String, binds: Vec<(String, String)>) -> impl IntoView {
    // Nothing is chosen for the member: the decision is theirs to make.
    let decision = typed("decision", "");
    let choice = move |value: &'static str, label: &'static str| {
        let id = format!("decision-{value}");
        let checked = decision == value;
        view! {
            <div class="choice">
                <input type="radio" id=id.clone() name=field("decision") value=value checked=checked required/>
                <label for=id>{label}</label>
            </div>
        }
    };
    view! {
        <form method="post" action=StudyAction::url() class="card" id="review-form"><CsrfField/>
            <h3>"Your committee's decision"</h3>
            <input type="hidden" name=field("study_id") value=study_id/>
            <input type="hidden" name=field("action") value="review"/>
            <h4>"What this decision binds"</h4>
            <dl class="binds">
                {binds.into_iter().map(|(what, value)| view! { <dt>{what}</dt><dd>{value}</dd> }).collect_view()}
            </dl>
            <fieldset>
                <legend>"Decision"</legend>
                {choice("approve", "Approve")}
                {choice("request_changes", "Request changes")}
                {choice("reject", "Reject")}
            </fieldset>
            <label for="comments">"Comments"</label>
            <textarea id="comments" name=field("comments") rows="3" required>{textarea_text(typed("comments", ""))}</textarea>
            <div class="approval-only">
                <label for="conditions">"Conditions (with an approval)"</label>
                <textarea id="conditions" name=field("conditions") rows="2">{textarea_text(typed("conditions", ""))}</textarea>
                <label for="expires">"Approval expires on"</label>
                <input id="expires" type="date" name=field("expires_on") value=typed("expires_on", &next_year)/>
            </div>
            <div class="choice">
                <input type="checkbox" id="confirm-binds" name=field("confirm") value="yes" required/>
                <label for="confirm-binds">"I have read what this decision binds, above, and record it for the committee."</label>
            </div>
            <button type="submit">"Record decision"</button>
        </form>
    }
}

/// What partial sharing keeps at each site, and how it trains there, in the committee's words.
fn kept_words(layers: &[String], fit_epochs: Option<u32>) -> String {
    let fit = fit_epochs
        .map(|n| {
            format!(
                "; each round they first train alone for {n} epoch{} on the site's images, on the shared layers that arrived, then the whole model trains; a site scoring a model fits them to it the same way first",
                if n == 1 { "" } else { "s" }
            )
        })
        .unwrap_or_default();
    format!(
        "{}: trained at each site and never sent; the server aggregates the other layers{fit}",
        layers.join(", ")
    )
}

/// Personalisation by fine-tuning, in the committee's words.
fn fine_tune_words(epochs: u32, layers: &[String]) -> String {
    let which = if layers.is_empty() {
        "every layer".to_string()
    } else {
        format!("its {} only", layers.join(", "))
    };
    format!(
        "fine-tuning: a site scoring a version of the model first trains a copy of it on its own training images for {epochs} epoch{}, {which}, and the sites' evaluations score that copy; it never leaves the site and is not kept",
        if epochs == 1 { "" } else { "s" }
    )
}

/// What a committee decision on the latest plan binds, in words: the protocol version, the plan
/// version and its full hash, the data asked of each site, and the aggregation and privacy
/// settings.
fn what_it_binds(
    s: &StudyDto,
    plan: Option<&PlanDto>,
    site_name: impl Fn(uuid::Uuid) -> String,
) -> Vec<(String, String)> {
    let mut out = vec![(
        "Protocol".to_string(),
        format!("version {}", s.protocol_version),
    )];
    let Some(p) = plan else {
        out.push(("Training plan".into(), "none submitted".into()));
        return out;
    };
    out.push((
        "Training plan".into(),
        format!("version {}, SHA-256 {}", p.version, p.hash),
    ));
    let files = if p.files.is_empty() {
        "none".to_string()
    } else {
        p.files
            .iter()
            .map(|f| format!("{} ({} bytes)", f.name, f.size))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push(("Attachments".into(), files));
    for st in &s.sites {
        out.push((
            format!("Data at {}", site_name(st.site_id)),
            format!(
                "{} cases of {} {} images, labelled {}",
                st.scope.cases, st.scope.modality, st.scope.body_part, st.scope.label
            ),
        ));
    }
    let m = &p.manifest;
    out.push((
        "Model and training".into(),
        format!(
            "{}, {} rounds of {} local epochs",
            m.model.architecture, m.rounds, m.local_epochs
        ),
    ));
    out.push((
        "Aggregation".into(),
        format!(
            "{}{}",
            m.aggregation.strategy,
            m.aggregation
                .min_sites
                .map(|n| format!(", at least {n} sites per round"))
                .unwrap_or_default()
        ),
    ));
    if !m.aggregation.local_layers.is_empty() {
        out.push((
            "Kept at each site".into(),
            kept_words(&m.aggregation.local_layers, m.aggregation.local_fit_epochs),
        ));
    }
    if let Some(d) = &m.aggregation.ditto {
        out.push((
            "Personalisation".into(),
            format!(
                "Ditto (λ = {}): each site also trains a model of its own, pulled towards the global one; it never leaves the site, and the sites' evaluations of each version score it",
                d.lambda
            ),
        ));
    }
    if let Some(n) = m.aggregation.fine_tune_epochs {
        out.push((
            "Personalisation".into(),
            fine_tune_words(n, &m.aggregation.fine_tune_layers),
        ));
    }
    if let Some(a) = m.parse().ok().and_then(|plan| plan.amplitude) {
        out.push(("Amplitude normalisation".into(), amplitude_words(a)));
    }
    let privacy = match (
        &m.privacy.dp_sgd,
        m.privacy.clip_norm,
        m.privacy.noise_multiplier,
    ) {
        (Some(dp), _, _) => privacy_budget_words(dp, m, s, &site_name),
        (None, Some(c), Some(n)) if n > 0.0 => format!(
            "each site clips its update to norm {c} and adds Gaussian noise (multiplier {n}); no privacy budget (ε) is claimed"
        ),
        (None, Some(c), _) => {
            format!("each site clips its update to norm {c}; no noise, no privacy budget (ε)")
        }
        _ => "no clipping or noise: no differential privacy, no privacy budget (ε)".to_string(),
    };
    let secure = m.parse().ok().and_then(|plan| plan.secure_aggregation);
    let privacy = match (&secure, m.privacy.clip_norm, m.privacy.noise_multiplier) {
        (Some(_), Some(_), Some(n)) if n > 0.0 && m.privacy.dp_sgd.is_none() => {
            format!("{privacy}; {}", distributed_noise_words(n, m.rounds))
        }
        _ => privacy,
    };
    out.push(("Privacy".into(), privacy));
    out.push((
        "Secure aggregation".into(),
        secure_words(secure.as_ref(), s.sites.len()),
    ));
    out
}

/// What update noise of multiplier `sigma` means under secure aggregation: each site adds its
/// share, so the sum carries all of it, and the accountant counts the sum's Gaussian mechanism
/// once per round (every site in every round: no sampling).
fn distributed_noise_words(sigma: f64, rounds: u32) -> String {
    use consilium_core::privacy::{RdpCost, default_orders};
    const DELTA: f64 = 1e-5;
    let cost = RdpCost::sampled_gaussian(1.0, sigma, u64::from(rounds.max(1)), &default_orders())
        .and_then(|c| c.epsilon(DELTA));
    let eps = match cost {
        Ok(e) => format!("ε = {:.2}", e.epsilon),
        Err(e) => format!("ε not computable ({e})"),
    };
    format!(
        "under secure aggregation each site adds its share of the noise and the sum the server sees carries it all: each site's update is protected in the sum at {eps} at δ = {DELTA} over the run's {rounds} rounds (site-level, the Gaussian mechanism composed by Rényi DP; the sites' weights are public, and at least t honest sites are in every sum)"
    )
}

/// What HarmoFL's amplitude normalisation sends and does, for the committee.
fn amplitude_words(a: consilium_core::plan::AmplitudeNormalisation) -> String {
    let band = if a.band == 0.0 {
        "each image's mean brightness".to_string()
    } else {
        format!(
            "each image's lowest frequencies (up to {} of the image side: contrast and brightness)",
            a.band
        )
    };
    format!(
        "{band} set to the sites' average, its structure kept; each site sends the mean amplitude spectrum of its training images with its first update (a summary of all of them, never an image), and the model carries the sites' sample-weighted average"
    )
}

/// What secure aggregation lets the server see, for a study of `sites` sites.
fn secure_words(secure: Option<&consilium_core::plan::SecureAggregation>, sites: usize) -> String {
    let Some(s) = secure else {
        return "off: the server sees each site's update".into();
    };
    let k = s.degree(sites);
    let t = s.threshold_of(k);
    format!(
        "on: the server sees only the sum of at least {} sites' masked updates, never one site's (SecAgg+: each value of a site's change clipped to ±{}, masked with keys agreed with {k} neighbours; a site's masks come off only with {t} of the {} shares it and its neighbours hold, so up to {} colluding {} learn nothing more)",
        t.max(consilium_core::plan::SECAGG_MIN_SITES),
        s.clip,
        k + 1,
        t.saturating_sub(1),
        if t == 2 { "site" } else { "sites" }
    )
}

/// A DP-SGD plan's budget in words, with what each site would spend when the plan fixes σ
/// (from the cases its grant covers, counted as patients).
fn privacy_budget_words(
    dp: &consilium_core::manifest::DpSgdSettings,
    m: &consilium_core::manifest::TrainingPlanManifest,
    s: &StudyDto,
    site_name: &impl Fn(uuid::Uuid) -> String,
) -> String {
    use consilium_core::privacy::{RdpCost, default_orders};
    let mut words = format!(
        "each patient's data: at most ε = {} at δ = {} over this study's run (DP-SGD at every site: each patient's gradient clipped to {}, Gaussian noise on every step, patients sampled at random; the site refuses a round beyond it)",
        dp.epsilon, dp.delta, dp.max_grad_norm
    );
    match dp.noise_multiplier {
        None => words.push_str("; each site derives σ for its number of patients"),
        Some(sigma) => {
            words.push_str(&format!("; σ = {sigma} fixed"));
            for st in &s.sites {
                let n = u64::from(st.scope.cases.max(1));
                let batch = u64::from(m.batch_size.max(1));
                let q = (batch as f64 / n as f64).min(1.0);
                let steps = u64::from(m.local_epochs.max(1))
                    * n.div_ceil(batch)
                    * u64::from(m.rounds.max(1));
                let cost = RdpCost::sampled_gaussian(q, sigma, steps, &default_orders())
                    .and_then(|c| c.epsilon(dp.delta));
                words.push_str(&match cost {
                    Ok(e) if e.epsilon > dp.epsilon => format!(
                        "; at {} ({n} cases) it would cost ε = {:.2}, above the budget: that site will refuse the rounds beyond it",
                        site_name(st.site_id),
                        e.epsilon
                    ),
                    Ok(e) => format!(
                        "; at {} ({n} cases) ε = {:.2}",
                        site_name(st.site_id),
                        e.epsilon
                    ),
                    Err(e) => format!("; at {}: {e}", site_name(st.site_id)),
                });
            }
        }
    }
    words
}

/// The plan form: the manifest as JSON, its problems listed as it is typed (once the bundle has
/// loaded; without it, "Check the plan" asks the server), the choices of every setting, and
/// the attachments.
#[component]
fn PlanForm(study_id: String, manifest: String, attached: Vec<(String, u64)>) -> AnyView {
    let problems = RwSignal::new(plan_problems(&manifest));
    let carried = (!attached.is_empty()).then(|| view! {
        <fieldset class="keep-files">
            <legend>"Attachments of the latest version, carried into the new one"</legend>
            <p class="hint">"Untick a file to leave it out; a file uploaded below under the same name replaces it."</p>
            {attached.into_iter().enumerate().map(|(i, (name, size))| {
                let id = format!("keep-{i}");
                view! {
                    <div class="check">
                        <input type="checkbox" id=id.clone() name="keep_files" value=name.clone() checked=true/>
                        <label for=id>{name}" ("{size}" bytes)"</label>
                    </div>
                }
            }).collect_view()}
        </fieldset>
    });
    view! {
        <form method="post" action=SubmitPlan::url() enctype="multipart/form-data"><CsrfField plain=true/>
            <input type="hidden" name="study_id" value=study_id/>
            <label for="manifest">"Manifest (JSON): model, preprocessing, optimiser, epochs, batch size, rounds, aggregation"</label>
            <textarea id="manifest" name="manifest" rows="14" class="code" required aria-describedby="plan-problems" on:input=move |ev| problems.set(plan_problems(&event_target_value(&ev)))>{textarea_text(manifest)}</textarea>
            <div id="plan-problems" aria-live="polite">
                {move || {
                    let list = problems.get();
                    if list.is_empty() {
                        view! { <p class="hint">"Every setting of this plan will be carried out as written."</p> }.into_any()
                    } else {
                        view! {
                            <div class="notice warn">
                                <p>{format!("This plan would be refused ({} problem{}):", list.len(), if list.len() == 1 { "" } else { "s" })}</p>
                                <ul>{list.into_iter().map(|p| view! { <li>{p}</li> }).collect_view()}</ul>
                            </div>
                        }.into_any()
                    }
                }}
            </div>
            <details class="choices">
                <summary>"Settings and their choices"</summary>
                <table>
                    <thead><tr><th scope="col">"Setting"</th><th scope="col">"Choices"</th></tr></thead>
                    <tbody>
                        {consilium_core::plan::CHOICES.iter().map(|(key, choices)| view! {
                            <tr><td><code>{*key}</code></td><td>{*choices}</td></tr>
                        }).collect_view()}
                    </tbody>
                </table>
            </details>
            {carried}
            <label for="files">"Attachments (training code, documentation)"</label>
            <input id="files" type="file" name="files" multiple/>
            <div class="row">
                <button type="submit" name="check" value="yes" class="secondary">"Check the plan"</button>
                <button type="submit">"Submit plan"</button>
            </div>
        </form>
    }
    .into_any()
}

/// What would make the server refuse this manifest text, in words.
pub fn plan_problems(text: &str) -> Vec<String> {
    match serde_json::from_str::<consilium_core::manifest::TrainingPlanManifest>(text) {
        Ok(m) => m.problems(),
        Err(e) => vec![format!(
            "The manifest is not valid JSON for a training plan: {e}."
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::secure_words;
    use consilium_core::manifest::TrainingPlanManifest;

    fn plan(privacy: serde_json::Value) -> consilium_core::plan::Plan {
        let m: TrainingPlanManifest = serde_json::from_value(serde_json::json!({
            "model": {"architecture": "small_cnn", "num_classes": 2},
            "optimiser": {"name": "adamw", "learning_rate": 0.01},
            "local_epochs": 1, "batch_size": 8, "rounds": 2,
            "aggregation": {"strategy": "fedavg"},
            "privacy": privacy
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        m.parse().unwrap_or_else(|p| panic!("{p:?}"))
    }

    #[test]
    fn the_committee_reads_what_secure_aggregation_shows_the_server() {
        let off = plan(serde_json::json!({}));
        assert_eq!(
            secure_words(off.secure_aggregation.as_ref(), 5),
            "off: the server sees each site's update"
        );
        let on = plan(serde_json::json!({"secure_aggregation": true, "secagg": {"clip": 0.5}}));
        let words = secure_words(on.secure_aggregation.as_ref(), 5);
        for expected in [
            "on: the server sees only the sum of at least 3 sites' masked updates, never one site's",
            "clipped to ±0.5",
            "keys agreed with 4 neighbours",
            "only with 3 of the 5 shares",
            "up to 2 colluding sites learn nothing more",
        ] {
            assert!(words.contains(expected), "{expected:?} in {words}");
        }
        // Update noise under secure aggregation is counted as one central Gaussian mechanism
        // per round: σ = 1 over 10 rounds is Rényi DP 10·α/2, ε = 19.05 at δ = 1e-5 (the
        // conversion of Balle et al. 2020, computed by hand over the accountant's orders).
        let words = super::distributed_noise_words(1.0, 10);
        assert!(
            words.contains("at ε = 19.05 at δ = 0.00001 over the run's 10 rounds"),
            "{words}"
        );
        // A large study: 20 neighbours each, 11 of 21 shares.
        let words = secure_words(on.secure_aggregation.as_ref(), 100);
        assert!(words.contains("sum of at least 11 sites"), "{words}");
        assert!(words.contains("with 20 neighbours"), "{words}");
    }

    #[test]
    fn the_committee_reads_what_stays_at_each_site_and_how_it_trains() {
        let fc = ["fc".to_string()];
        assert_eq!(
            super::kept_words(&fc, None),
            "fc: trained at each site and never sent; the server aggregates the other layers"
        );
        let words = super::kept_words(&fc, Some(3));
        assert!(
            words.ends_with("each round they first train alone for 3 epochs on the site's images, on the shared layers that arrived, then the whole model trains; a site scoring a model fits them to it the same way first"),
            "{words}"
        );
        assert!(super::kept_words(&fc, Some(1)).contains("for 1 epoch on"));
    }

    #[test]
    fn the_committee_reads_that_sites_score_fine_tuned_copies() {
        assert_eq!(
            super::fine_tune_words(3, &[]),
            "fine-tuning: a site scoring a version of the model first trains a copy of it on its own training images for 3 epochs, every layer, and the sites' evaluations score that copy; it never leaves the site and is not kept"
        );
        let fc = ["fc".to_string()];
        assert!(super::fine_tune_words(1, &fc).contains("for 1 epoch, its fc only, and"));
    }

    #[test]
    fn the_committee_reads_what_amplitude_normalisation_sends() {
        use consilium_core::plan::AmplitudeNormalisation;
        let words = super::amplitude_words(AmplitudeNormalisation { band: 0.1 });
        for expected in [
            "lowest frequencies (up to 0.1 of the image side",
            "each site sends the mean amplitude spectrum of its training images with its first update",
            "never an image",
        ] {
            assert!(words.contains(expected), "{expected:?} in {words}");
        }
        let words = super::amplitude_words(AmplitudeNormalisation { band: 0.0 });
        assert!(
            words.starts_with("each image's mean brightness set to the sites' average"),
            "{words}"
        );
    }
}
