//! The list of studies, the study form (new and edit) and the committee's review queue.

use consilium_core::Role;
use consilium_core::api::{StudyDto, StudyStatus};
use leptos::prelude::*;

use crate::csrf::CsrfField;
use leptos::server_fn::ServerFn as _;
use leptos_router::hooks::use_params_map;

use super::loading;
use crate::app::MeResource;
use crate::components::{Badge, Failure, FormError, day, field, textarea_text, typed};
use crate::server::{Directory, SaveStudy, StudiesData, load_studies, load_study};

#[component]
pub fn Studies() -> impl IntoView {
    let data = Resource::new(|| (), |_| load_studies());
    let me = expect_context::<MeResource>();
    view! {
        <leptos_meta::Title text="Studies"/>
        <h1>"Studies"</h1>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                let researcher = me.await.ok().flatten().is_some_and(|m| m.acting_roles.contains(&Role::Researcher));
                match data.await {
                    Ok(d) => view! {
                        {researcher.then(|| view! { <p><a class="button" href="/studies/new">"Draft a new study"</a></p> })}
                        <StudyTable d/>
                    }.into_any(),
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

#[component]
fn StudyTable(d: StudiesData) -> impl IntoView {
    if d.studies.is_empty() {
        return view! { <p>"No studies you may see yet."</p> }.into_any();
    }
    let committee = |id| {
        d.directory
            .committees
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.name.clone())
            .unwrap_or_default()
    };
    let p = crate::components::page_of(&d.studies, |s| {
        format!(
            "{} {} {}",
            s.title,
            s.status.as_str().replace('_', " "),
            committee(s.committee_id)
        )
    });
    view! {
        <crate::components::ListSearch what="studies" path="/studies" total=p.total matching=p.matching page=p.page pages=p.pages query=p.query.clone()/>
        <table id="study-list">
            <caption class="sr-only">"Studies"</caption>
            <thead><tr><th scope="col">"Title"</th><th scope="col">"Status"</th><th scope="col">"Committee"</th><th scope="col">"Sites"</th><th scope="col">"Updated"</th></tr></thead>
            <tbody>
                {p.rows.iter().map(|s| view! {
                    <tr>
                        <td><a href=format!("/studies/{}", s.id)>{s.title.clone()}</a></td>
                        <td><Badge text=s.status.as_str().to_string()/></td>
                        <td>{committee(s.committee_id)}</td>
                        <td>{s.sites.len()}</td>
                        <td>{day(&s.updated_at)}</td>
                    </tr>
                }).collect_view()}
            </tbody>
        </table>
    }
    .into_any()
}

#[component]
pub fn NewStudy() -> impl IntoView {
    let data = Resource::new(|| (), |_| load_studies());
    view! {
        <leptos_meta::Title text="Draft a new study"/>
        <h1>"Draft a new study"</h1>
        <FormError/>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => view! { <StudyForm directory=d.directory study=None/> }.into_any(),
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

#[component]
pub fn EditStudy() -> impl IntoView {
    let params = use_params_map();
    let data = Resource::new(
        move || params.read().get("id").unwrap_or_default(),
        load_study,
    );
    view! {
        <leptos_meta::Title text="Edit study"/>
        <h1>"Edit study"</h1>
        <FormError/>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => view! {
                        {(d.study.status == StudyStatus::Approved).then(|| view! {
                            <p class="notice warn">"This study is approved. Changing its protocol makes it a new version that needs the committee's decision again."</p>
                        })}
                        <StudyForm directory=d.directory study=Some(d.study)/>
                    }.into_any(),
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

/// The study form: title, purpose, protocol, committee, and the sites with their scope.
#[component]
fn StudyForm(directory: Directory, study: Option<StudyDto>) -> impl IntoView {
    let s = study.as_ref();
    let first_scope = s.and_then(|s| s.sites.first()).map(|x| x.scope.clone());
    let title = typed("title", s.map(|s| s.title.as_str()).unwrap_or(""));
    let purpose = typed("purpose", s.map(|s| s.purpose.as_str()).unwrap_or(""));
    let protocol = typed(
        "protocol_text",
        s.map(|s| s.protocol_text.as_str()).unwrap_or(""),
    );
    let modality = typed(
        "modality",
        first_scope
            .as_ref()
            .map(|x| x.modality.as_str())
            .unwrap_or("CR"),
    );
    let body_part = typed(
        "body_part",
        first_scope
            .as_ref()
            .map(|x| x.body_part.as_str())
            .unwrap_or("CHEST"),
    );
    let label = typed(
        "label",
        first_scope.as_ref().map(|x| x.label.as_str()).unwrap_or(""),
    );
    let committee = typed(
        "committee_id",
        &s.map(|s| s.committee_id.to_string()).unwrap_or_default(),
    );
    let editing = s.is_some();
    let study_id = s.map(|s| s.id.to_string()).unwrap_or_default();
    let submit_label = if editing {
        "Save changes"
    } else {
        "Save draft"
    };
    let sites = directory
        .sites
        .iter()
        .map(|site| {
            let id = site.id.to_string();
            let current = s.and_then(|s| s.sites.iter().find(|x| x.site_id == site.id));
            let ticked_default = if current.is_some() { "on" } else { "" };
            let ticked = typed(&format!("site_{id}"), ticked_default) == "on";
            let cases = typed(
                &format!("cases_{id}"),
                &current.map(|c| c.scope.cases.to_string()).unwrap_or_else(|| "100".into()),
            );
            let cb = format!("site-{id}");
            let cs = format!("cases-{id}");
            view! {
                <div class="site-row">
                    <input type="checkbox" id=cb.clone() name=field(&format!("site_{id}")) checked=ticked/>
                    <label for=cb>{site.name.clone()}</label>
                    <label for=cs.clone() class="inline">"cases"</label>
                    <input id=cs type="number" min="1" name=field(&format!("cases_{id}")) value=cases class="short"/>
                </div>
            }
        })
        .collect_view();
    view! {
        <form method="post" action=SaveStudy::url() class="card"><CsrfField/>
            <input type="hidden" name=field("study_id") value=study_id/>
            <label for="title">"Title"</label>
            <input id="title" name=field("title") value=title required/>
            <label for="purpose">"Purpose"</label>
            <input id="purpose" name=field("purpose") value=purpose required/>
            <label for="protocol">"Protocol"</label>
            <textarea id="protocol" name=field("protocol_text") rows="8" required>{textarea_text(protocol)}</textarea>
            {(!editing).then(|| view! {
                <label for="committee">"Ethics committee"</label>
                <select id="committee" name=field("committee_id") required>
                    <option value="">"Choose a committee"</option>
                    {directory.committees.iter().map(|c| {
                        let id = c.id.to_string();
                        let selected = id == committee;
                        view! { <option value=id selected=selected>{c.name.clone()}</option> }
                    }).collect_view()}
                </select>
            })}
            <fieldset>
                <legend>"Data the study needs"</legend>
                <div class="row">
                    <div><label for="modality">"Modality"</label><input id="modality" name=field("modality") value=modality required/></div>
                    <div><label for="body_part">"Body part"</label><input id="body_part" name=field("body_part") value=body_part required/></div>
                    <div><label for="label">"Label the model learns"</label><input id="label" name=field("label") value=label required/></div>
                </div>
                <p class="hint">"Tick each site whose data the study needs, with the number of cases."</p>
                {sites}
            </fieldset>
            <button type="submit">{submit_label}</button>
        </form>
    }
}

#[component]
pub fn Reviews() -> impl IntoView {
    let data = Resource::new(|| (), |_| load_studies());
    let me = expect_context::<MeResource>();
    view! {
        <leptos_meta::Title text="Review queue"/>
        <h1>"Review queue"</h1>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                let me = me.await.ok().flatten();
                match data.await {
                    Ok(d) => {
                        let uid = me.map(|m| m.user.id);
                        let mine: Vec<uuid::Uuid> = d.directory.committees.iter()
                            .filter(|c| uid.is_some_and(|u| c.members.contains(&u)))
                            .map(|c| c.id).collect();
                        let queue: Vec<StudyDto> = d.studies.into_iter()
                            .filter(|s| s.status == StudyStatus::Submitted && mine.contains(&s.committee_id))
                            .collect();
                        if queue.is_empty() {
                            view! { <p>"Nothing awaits your committee's decision."</p> }.into_any()
                        } else {
                            view! {
                                <p>{format!("{} awaiting your committee's decision:", if queue.len() == 1 { "1 study".to_string() } else { format!("{} studies", queue.len()) })}</p>
                                <ul class="tasks">
                                    {queue.into_iter().map(|s| view! {
                                        <li><a href=format!("/studies/{}", s.id)>{s.title.clone()}</a>" — protocol version "{s.protocol_version}", submitted "{day(&s.updated_at)}</li>
                                    }).collect_view()}
                                </ul>
                            }.into_any()
                        }
                    }
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}
