//! Runs: the list, and one run's live state per round and per site with its charts.

use consilium_core::protocol::Metrics;
use leptos::prelude::*;

use crate::csrf::CsrfField;
use leptos::server_fn::ServerFn as _;
use leptos_router::hooks::use_params_map;

use super::loading;
use crate::components::{Badge, Failure, FormError, Hash, LineChart, Series, field, when};
use crate::server::{RunPage, StudyAction, load_run, load_runs};

#[component]
pub fn Runs() -> impl IntoView {
    let data = Resource::new(|| (), |_| load_runs());
    view! {
        <leptos_meta::Title text="Runs"/>
        <h1>"Runs"</h1>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) if d.runs.is_empty() => view! { <p>"No runs you may see yet."</p> }.into_any(),
                    Ok(d) => {
                        let title = |id| d.studies.iter().find(|s| s.id == id).map(|s| s.title.clone()).unwrap_or_default();
                        let p = crate::components::page_of(&d.runs, |r| format!("{} {} {}", title(r.study_id), r.status, r.plan_hash));
                        view! {
                            <crate::components::ListSearch what="runs" path="/runs" total=p.total matching=p.matching page=p.page pages=p.pages query=p.query.clone()/>
                            <table id="run-list">
                                <thead><tr><th scope="col">"Study"</th><th scope="col">"Status"</th><th scope="col">"Round"</th><th scope="col">"Plan"</th><th scope="col">"Started"</th></tr></thead>
                                <tbody>
                                    {p.rows.iter().map(|r| view! {
                                        <tr>
                                            <td><a href=format!("/runs/{}", r.id)>{title(r.study_id)}</a></td>
                                            <td><Badge text=r.status.clone()/></td>
                                            <td>{r.current_round}</td>
                                            <td><Hash hash=r.plan_hash.clone()/></td>
                                            <td>{when(&r.created_at)}</td>
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

fn live(status: &str) -> bool {
    matches!(status, "created" | "running")
}

#[component]
pub fn Run() -> impl IntoView {
    let params = use_params_map();
    let data = Resource::new(
        move || params.read().get("id").unwrap_or_default(),
        load_run,
    );
    // In the browser: ask again every two seconds while the run is going.
    Effect::new(move |_| {
        let _ = set_interval_with_handle(
            move || {
                let going = data
                    .get_untracked()
                    .and_then(|r| r.ok())
                    .is_some_and(|d| live(&d.run.status));
                if going {
                    data.refetch();
                }
            },
            std::time::Duration::from_secs(2),
        );
    });
    view! {
        <Transition fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(d) => {
                        let title = format!("Run of {}", d.study.title);
                        let page = view! { <RunView d/> }.into_any();
                        view! { <leptos_meta::Title text=title/>{page} }.into_any()
                    }
                    Err(e) => view! { <leptos_meta::Title text="Run"/><h1>"Run"</h1><Failure error=e/> }.into_any(),
                }
            })}
        </Transition>
    }
}

#[component]
fn RunView(d: RunPage) -> impl IntoView {
    let r = d.run.clone();
    let owner = d.study.researcher_id == d.me.user.id;
    let going = live(&r.status);
    // Charts: the global model's and each site's held-out figures per round: accuracy and
    // loss, or for a segmentation model mean Dice and loss (HD95 in the rounds' tables).
    let mut models = d.models.clone();
    models.sort_by_key(|m| m.round);
    let mut site_names: Vec<(uuid::Uuid, String)> = Vec::new();
    for round in &d.rounds {
        for s in &round.sites {
            if !site_names.iter().any(|(id, _)| *id == s.site_id) {
                site_names.push((s.site_id, s.site_name.clone()));
            }
        }
    }
    // One line for the global model, then one per site, of one measure.
    let series = |measure: fn(&Metrics) -> Option<f64>| {
        let global = Series {
            label: "global model".into(),
            points: models
                .iter()
                .filter_map(|m| {
                    let e = m.evaluation.as_ref()?;
                    Some((f64::from(m.round), measure(&e.global)?))
                })
                .collect(),
        };
        let sites = site_names.iter().map(|(id, name)| Series {
            label: name.clone(),
            points: models
                .iter()
                .filter_map(|m| {
                    m.evaluation
                        .as_ref()?
                        .sites
                        .iter()
                        .find(|s| s.site_id == *id)
                        .and_then(|s| Some((f64::from(m.round), measure(&s.metrics)?)))
                })
                .collect(),
        });
        std::iter::once(global).chain(sites).collect::<Vec<_>>()
    };
    let segmentation = models.iter().any(|m| {
        m.evaluation
            .as_ref()
            .is_some_and(|e| e.global.segmentation.is_some())
    });
    let acc_series = series(|m| Some(m.accuracy));
    let dice_series = series(|m| m.segmentation.as_ref()?.mean_dice);
    let loss_series = series(|m| Some(m.loss));
    let has_points = models.iter().any(|m| m.evaluation.is_some());
    // Where the run is: its latest round and that round's state.
    let of = d
        .rounds_planned
        .map(|n| format!(" of {n}"))
        .unwrap_or_default();
    let latest = d.rounds.iter().max_by_key(|x| x.number);
    let round_state = match latest {
        Some(x) => format!("Round {}{of}: {}", x.number, x.state),
        None => format!(
            "No round opened yet{}",
            d.rounds_planned
                .map(|n| format!(" ({n} planned)"))
                .unwrap_or_default()
        ),
    };
    // Each site now: what it does in the latest round, and whether its worker is heard.
    let site_states = latest.map(|x| {
        x.sites
            .iter()
            .map(|s| {
                let doing = match s.status.as_str() {
                    "waiting" if going => format!("training in round {}", x.number),
                    "waiting" => format!("did not report in round {}", x.number),
                    other => format!("{} in round {}", other.replace('_', " "), x.number),
                };
                let worker = d
                    .health
                    .iter()
                    .find(|h| h.site_id == s.site_id)
                    .map(|h| {
                        let heard = h
                            .last_seen
                            .as_ref()
                            .map(|t| format!(", last heard {}", when(t)))
                            .unwrap_or_default();
                        format!(" · worker {}{heard}", h.state)
                    })
                    .unwrap_or_default();
                view! { <li><strong>{s.site_name.clone()}</strong>": "{doing}{worker}</li> }
            })
            .collect_view()
    });

    // A DP-SGD run shows what each round cost each site's patients.
    let private = d
        .rounds
        .iter()
        .any(|x| x.sites.iter().any(|s| s.privacy.is_some()));
    // A robust strategy shows what each update counted for, and flags a site it kept
    // down-weighting (its custodian sees the flag on the site-health page).
    let robust = models
        .iter()
        .any(|m| m.contributions.iter().any(|c| c.score.is_some()));
    let flags = consilium_core::api::flagged_sites(&models);
    let flag_notes = flags.iter().map(|f| {
        let rounds = f.rounds.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let shares = f.weights.iter().map(|w| format!("{:.0}%", w * 100.0)).collect::<Vec<_>>().join(", ");
        view! {
            <p class="notice warn site-flag">
                <strong>{f.site_name.clone()}" is flagged: "</strong>
                {format!("{} down-weighted its update in rounds {rounds} (shares {shares}): it looks unlike the other sites'. It may be under attack or its data pipeline may be broken; its custodian sees this flag too.", f.strategy)}
            </p>
        }
    }).collect_view();
    let rounds = d.rounds.iter().rev().map(|round| {
        let model = round.model_version_id.map(|id| view! { <a href=format!("/models/{id}")>"model of this round"</a> });
        // The figures are those of the model this round made, on each site's held-out split
        // (the sites' own results carry the model they started from: the previous round's).
        let made_by = models.iter().find(|m| m.round == round.number);
        let made = made_by.and_then(|m| m.evaluation.clone());
        let sites = round.sites.iter().map(|s| {
            let held_out = made.as_ref().and_then(|e| e.sites.iter().find(|x| x.site_id == s.site_id)).map(|x| x.metrics.clone());
            let counted = made_by.and_then(|m| m.contributions.iter().find(|c| c.site_id == s.site_id));
            view! {
                <tr>
                    <td>{s.site_name.clone()}</td>
                    <td><Badge text=s.status.clone()/></td>
                    <td>{s.samples.map(|n| n.to_string()).unwrap_or_default()}</td>
                    {if segmentation {
                        let seg = held_out.as_ref().and_then(|m| m.segmentation.clone());
                        view! {
                            <td>{seg.as_ref().and_then(|s| s.mean_dice).map(|d| format!("{d:.3}")).unwrap_or_else(|| "—".into())}</td>
                            <td>{seg.as_ref().and_then(|s| s.hd95).map(|h| format!("{h:.2}")).unwrap_or_else(|| "—".into())}</td>
                        }.into_any()
                    } else {
                        view! {
                            <td>{held_out.as_ref().map(|m| format!("{:.3}", m.accuracy)).unwrap_or_else(|| "—".into())}</td>
                            <td>{held_out.as_ref().and_then(|m| m.auroc).map(|a| format!("{a:.3}")).unwrap_or_else(|| "—".into())}</td>
                        }.into_any()
                    }}
                    <td>{held_out.as_ref().map(|m| format!("{:.3}", m.loss)).unwrap_or_else(|| "—".into())}</td>
                    <td>{s.duration_ms.map(|ms| format!("{:.1} s", ms as f64 / 1000.0)).unwrap_or_default()}</td>
                    {private.then(|| view! { <td>{s.privacy.as_ref().map(|p| format!("ε {:.2} (run {:.2})", p.epsilon_round, p.epsilon_run)).unwrap_or_else(|| "—".into())}</td> })}
                    {robust.then(|| view! {
                        <td class="share">{counted.and_then(|c| c.weight).map(|w| format!("{:.1}%", w * 100.0)).unwrap_or_else(|| "—".into())}
                            {counted.is_some_and(|c| c.down_weighted).then_some(" (down-weighted)")}</td>
                        <td>{counted.and_then(|c| c.score).map(|x| format!("{x:.3}")).unwrap_or_else(|| "—".into())}</td>
                    })}
                    <td>{s.reason.clone().unwrap_or_default()}</td>
                </tr>
            }
        }).collect_view();
        let excluded = round.excluded.iter().map(|x| {
            let name = round.sites.iter().find(|s| s.site_id == x.site_id).map(|s| s.site_name.clone()).unwrap_or_else(|| x.site_id.to_string());
            view! { <li>{name}": "{x.reason.clone()}</li> }
        }).collect_view();
        let late = round.not_counted.iter().map(|x| {
            let name = round.sites.iter().find(|s| s.site_id == x.site_id).map(|s| s.site_name.clone()).unwrap_or_else(|| x.site_id.to_string());
            view! { <li>{name}": "{x.outcome.clone()}" — "{x.reason.clone().unwrap_or_else(|| "arrived too late".into())}</li> }
        }).collect_view();
        let waiting = round.sites.iter().filter(|s| s.status == "waiting").map(|s| s.site_name.clone()).collect::<Vec<_>>();
        view! {
            <section class="card round" aria-label=format!("Round {}", round.number)>
                <h3>"Round "{round.number}" "<Badge text=round.state.clone()/></h3>
                <p class="meta">"Quorum "{round.quorum}" · deadline "{when(&round.deadline)}" "{model}</p>
                {round.failure.clone().map(|f| view! { <p class="notice error">{f}</p> })}
                {(!waiting.is_empty() && round.state == "collecting").then(|| view! { <p class="hint">"Waiting for: "{waiting.join(", ")}</p> })}
                // Privacy, robustness and segmentation add columns: the table scrolls in its box.
                <div class="scroll"><table>
                    <caption>"Held-out figures: this round's model at each site"</caption>
                    <thead><tr><th scope="col">"Site"</th><th scope="col">"Status"</th><th scope="col">"Training images"</th>{if segmentation { view! { <th scope="col">"Held-out mean Dice"</th><th scope="col">"HD95 (px)"</th> }.into_any() } else { view! { <th scope="col">"Held-out accuracy"</th><th scope="col">"AUROC"</th> }.into_any() }}<th scope="col">"Held-out loss"</th><th scope="col">"Time"</th>{private.then(|| view! { <th scope="col">"Privacy spent"</th> })}{robust.then(|| view! { <th scope="col">"Share of the model"</th><th scope="col">"Outlier score"</th> })}<th scope="col">"Reason"</th></tr></thead>
                    <tbody>{sites}</tbody>
                </table></div>
                {(!round.excluded.is_empty()).then(|| view! { <p><strong>"Excluded:"</strong></p><ul>{excluded}</ul> })}
                {(!round.not_counted.is_empty()).then(|| view! { <p><strong>"Not counted:"</strong></p><ul>{late}</ul> })}
            </section>
        }
    }).collect_view();

    view! {
        <h1>"Run of "<a href=format!("/studies/{}", d.study.id)>{d.study.title.clone()}</a>" "<Badge text=r.status.clone()/></h1>
        <FormError/>
        <p class="meta" id="run-state" aria-live="polite">
            {round_state}" · plan "<Hash hash=r.plan_hash.clone()/>" · started "{when(&r.created_at)}
            {going.then_some(view! { " · updating live" })}
        </p>
        {r.stop_reason.clone().map(|s| {
            // A run that completed (its target reached, or its rounds done) is good news.
            let class = if r.status == "completed" { "notice ok" } else { "notice warn" };
            view! { <p class=class>{s}</p> }
        })}
        {(owner && going).then(|| view! {
            <form method="post" action=StudyAction::url() class="inline-form"><CsrfField/>
                <input type="hidden" name=field("study_id") value=d.study.id.to_string()/>
                <input type="hidden" name=field("run_id") value=r.id.to_string()/>
                <input type="hidden" name=field("action") value="stop_run"/>
                <label for="reason">"Reason for stopping"</label>
                <input id="reason" name=field("reason") required/>
                <button type="submit" class="danger">"Stop run"</button>
            </form>
        })}
        {site_states.map(|l| view! { <h2 id="sites-now">"Sites"</h2><ul class="site-states">{l}</ul> })}
        {flag_notes}
        {has_points.then(|| if segmentation {
            view! {
                <div class="charts">
                    <LineChart title="Mean Dice per round".to_string() y_title="Held-out mean Dice".to_string() series=dice_series unit_max=1.0/>
                    <LineChart title="Loss per round".to_string() y_title="Held-out loss".to_string() series=loss_series/>
                </div>
            }.into_any()
        } else {
            view! {
                <div class="charts">
                    <LineChart title="Accuracy per round".to_string() y_title="Held-out accuracy".to_string() series=acc_series unit_max=1.0/>
                    <LineChart title="Loss per round".to_string() y_title="Held-out loss".to_string() series=loss_series/>
                </div>
            }.into_any()
        })}
        <h2>"Rounds"</h2>
        {if d.rounds.is_empty() { view! { <p>"No round has opened yet."</p> }.into_any() } else { view! { <div>{rounds}</div> }.into_any() }}
    }
}
