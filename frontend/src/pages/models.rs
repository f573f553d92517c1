//! The model registry and a model's lineage: model → round → updates → sites → plan →
//! approvals.

use leptos::prelude::*;

use crate::csrf::CsrfField;
use leptos::server_fn::ServerFn as _;
use leptos_router::hooks::use_params_map;

use super::loading;
use crate::components::{Badge, Failure, FormError, Hash, day, field, headline, when};
use crate::server::{LineagePage, ModelAction, load_lineage, load_models};

#[component]
pub fn Models() -> impl IntoView {
    let data = Resource::new(|| (), |_| load_models());
    view! {
        <leptos_meta::Title text="Models"/>
        <h1>"Models"</h1>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) if d.models.is_empty() => view! { <p>"No model versions you may see yet."</p> }.into_any(),
                    Ok(d) => {
                        let title = |id| d.studies.iter().find(|s| s.id == id).map(|s| s.title.clone()).unwrap_or_default();
                        let p = crate::components::page_of(&d.models, |m| {
                            format!("{} round {} {} {}", title(m.study_id), m.round, m.hash, if m.released_at.is_some() { "released" } else { "" })
                        });
                        view! {
                            <crate::components::ListSearch what="model versions" path="/models" total=p.total matching=p.matching page=p.page pages=p.pages query=p.query.clone()/>
                            <table id="model-list">
                                <thead><tr><th scope="col">"Study"</th><th scope="col">"Round"</th><th scope="col">"Weights"</th><th scope="col">"Held-out score"</th><th scope="col">"Released"</th><th scope="col">"Created"</th></tr></thead>
                                <tbody>
                                    {p.rows.iter().map(|m| view! {
                                        <tr>
                                            <td>{title(m.study_id)}</td>
                                            <td><a href=format!("/models/{}", m.id)>"Round "{m.round}</a></td>
                                            <td><Hash hash=m.hash.clone()/></td>
                                            <td>{m.evaluation.as_ref().map(|e| headline(&e.global)).unwrap_or_default()}</td>
                                            <td>{m.released_at.as_ref().map(day).unwrap_or_else(|| "—".into())}</td>
                                            <td>{when(&m.created_at)}</td>
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

#[component]
pub fn Lineage() -> impl IntoView {
    let params = use_params_map();
    let data = Resource::new(
        move || params.read().get("id").unwrap_or_default(),
        load_lineage,
    );
    view! {
        <leptos_meta::Title text="Model lineage"/>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => view! { <LineageView d/> }.into_any(),
                    Err(e) => view! { <h1>"Model"</h1><Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}

#[component]
fn LineageView(d: LineagePage) -> impl IntoView {
    let l = d.lineage;
    let m = l.model.clone();
    let owner = d.study.researcher_id == d.me.user.id;
    let site_name = |id: uuid::Uuid| {
        d.directory
            .sites
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| id.to_string())
    };
    let contributions = m
        .contributions
        .iter()
        .map(|c| {
            view! {
                <tr>
                    <td>{c.site_name.clone()}</td>
                    <td><Hash hash=c.update_hash.clone()/></td>
                    <td>{c.samples}</td>
                    <td>{format!("{:.3} → {:.3}", c.train_loss_before, c.train_loss_after)}</td>
                    <td>{headline(&c.evaluation)}</td>
                    <td>{match &c.privacy {
                        Some(p) => format!("ε = {:.2} this round, {:.2} in the run, {:.2} for the dataset (δ = {}, σ = {:.2}, {} patients)", p.epsilon_round, p.epsilon_run, p.epsilon_dataset, p.delta, p.noise_multiplier, p.patients),
                        None => "not differentially private".to_string(),
                    }}</td>
                </tr>
            }
        })
        .collect_view();
    let grants = l.grants.iter().map(|g| view! {
        <li>{site_name(g.site_id)}": "<Badge text=g.status.as_str().to_string()/>
            " data-access grant "<code>{g.id.to_string()}</code>
            {g.decided_at.map(|t| view! { ", decided "{day(&t)} })}
            {g.expires_at.map(|t| view! { ", until "{day(&t)} })}
            ", "{format!("{} {} · {} · {} cases", g.scope.modality, g.scope.body_part, g.scope.label, g.scope.cases)}
        </li>
    }).collect_view();
    view! {
        <h1>"Model of round "{m.round}" — "{d.study.title.clone()}</h1>
        <FormError/>
        <p class="meta">"Weights "<Hash hash=m.hash.clone()/>" · "{m.strategy.clone()}" · created "{when(&m.created_at)}
            {m.released_at.map(|t| view! { " · released "{day(&t)} })}</p>
        <div class="actions">
            <a class="button secondary" href=format!("/api/v1/models/{}/weights", m.id) rel="external" download>"Download weights (safetensors)"</a>
            {(owner && m.released_at.is_none()).then(|| view! {
                <form method="post" action=ModelAction::url()><CsrfField/>
                    <input type="hidden" name=field("model_id") value=m.id.to_string()/>
                    <input type="hidden" name=field("action") value="release"/>
                    <button type="submit">"Release this model"</button>
                </form>
            })}
        </div>
        {m.evaluation.as_ref().map(|e| view! {
            <p id="evaluation">"Evaluated at every site: "{e.global.summary()}" (weighted by samples)."</p>
        })}
        <h2>"Lineage"</h2>
        <ol class="lineage" id="lineage">
            <li><strong>"Parent model: "</strong>{match l.parent.as_ref() {
                Some(p) => view! { <a href=format!("/models/{}", p.id)>"round "{p.round}</a>" "<Hash hash=p.hash.clone()/> }.into_any(),
                None => view! { "none (the run's initial model)" }.into_any(),
            }}</li>
            <li><strong>"Run: "</strong><a href=format!("/runs/{}", l.run.id)>{when(&l.run.created_at)}</a>" "<Badge text=l.run.status.clone()/></li>
            <li><strong>"Round "{l.round.number}": "</strong>{l.round.state.clone()}", quorum "{l.round.quorum}</li>
            {m.secure_aggregation.as_ref().map(|sa| {
                let names = |list: &[consilium_core::api::SecAggSite]| list.iter().map(|s| s.site_name.clone()).collect::<Vec<_>>().join(", ");
                let dropped = sa.dropped.iter().map(|s| format!("{}: {}{}", s.site_name, s.status, if s.recovered { "; its masks were removed with its neighbours' shares" } else { "" })).collect::<Vec<_>>().join("; ");
                view! {
                    <li id="secure-aggregation"><strong>"Secure aggregation: "</strong>
                        "the server saw only the sum of the masked updates of "{sa.summed.len()}" sites ("{names(&sa.summed)}"), never one site's; "
                        {format!("each with {} neighbours, a site's masks removable only with {} shares, values clipped to ±{}", sa.neighbours, sa.threshold, sa.clip)}
                        {(sa.noise_std > 0.0).then(|| format!(", noise of standard deviation {:.4} in the sum", sa.noise_std))}
                        "."
                        {(!sa.dropped.is_empty()).then(|| view! { " Dropped out: "{dropped.clone()}"." })}
                    </li>
                }
            })}
            <li><strong>{if m.secure_aggregation.is_some() { "Masked inputs from the sites:" } else { "Updates from the sites:" }}</strong>
                <table>
                    <thead><tr><th scope="col">"Site"</th><th scope="col">{if m.secure_aggregation.is_some() { "Masked input" } else { "Update" }}</th><th scope="col">"Samples"</th><th scope="col">"Training loss"</th><th scope="col">"Held-out score (incoming model)"</th><th scope="col">"Privacy spent"</th></tr></thead>
                    <tbody>{contributions}</tbody>
                </table>
            </li>
            <li><strong>"Training plan: "</strong>"version "{l.plan.version}" "<Hash hash=l.plan.hash.clone()/>" ("{l.plan.manifest.model.architecture.clone()}")"</li>
            <li><strong>"Ethics approval: "</strong><Badge text=l.review.decision.as_str().to_string()/>
                " on protocol version "{l.review.protocol_version}", "{when(&l.review.created_at)}
                {l.review.expires_at.map(|t| view! { ", until "{day(&t)} })}
                {l.review.conditions.clone().map(|c| view! { ". Conditions: "{c} })}
            </li>
            <li><strong>"Data-access grants:"</strong><ul>{grants}</ul></li>
        </ol>
    }
}
