//! Site health: each site's worker as the server last heard it (online, training, offline,
//! never), its version and when it was heard, for the sites this person may see.

use consilium_core::api::SiteHealthDto;
use leptos::prelude::*;

use super::loading;
use crate::components::{Badge, Failure, when};
use crate::server::load_sites;

/// What the state means, in words.
pub fn health_words(h: &SiteHealthDto) -> String {
    match (h.state.as_str(), &h.last_seen) {
        ("never", _) => "its worker has not reported yet".to_string(),
        ("offline", Some(at)) => format!("offline: last heard {}", when(at)),
        ("training", Some(at)) => format!("online, training (heard {})", when(at)),
        (_, Some(at)) => format!("online, idle (heard {})", when(at)),
        (state, None) => state.to_string(),
    }
}

#[component]
pub fn Sites() -> impl IntoView {
    let data = Resource::new(|| (), |_| load_sites());
    view! {
        <leptos_meta::Title text="Sites"/>
        <h1>"Site health"</h1>
        <p class="hint">"Each site's worker reports every few seconds; one not heard for a minute is offline."</p>
        <Suspense fallback=loading>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(list) if list.is_empty() => view! { <p>"No sites you may see."</p> }.into_any(),
                    Ok(list) => view! {
                        {list.iter().flat_map(|h| h.flags.iter()).map(|f| view! {
                            <p class="notice warn site-flag">
                                <strong>{f.site_name.clone()}" is flagged: "</strong>
                                {format!("in a run of the study {:?}, {} down-weighted this site's update in rounds {}: it looks unlike the other sites'. Check the site's data pipeline (labels, images, scanner settings) and its worker.", f.study_title, f.strategy, f.rounds.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))}
                            </p>
                        }).collect_view()}
                        <div class="scroll">
                            <table id="site-health">
                                <thead><tr><th scope="col">"Site"</th><th scope="col">"State"</th><th scope="col">"Last heard"</th><th scope="col">"Worker version"</th><th scope="col">"Data"</th></tr></thead>
                                <tbody>
                                    {list.iter().map(|h| view! {
                                        <tr>
                                            <td>{h.site_name.clone()}</td>
                                            <td><Badge text=h.state.clone()/>" "{health_words(h)}</td>
                                            <td>{h.last_seen.as_ref().map(when).unwrap_or_else(|| "never".into())}</td>
                                            <td>{h.version.clone().unwrap_or_default()}</td>
                                            <td>{h.data_summary.clone().unwrap_or_default()}</td>
                                        </tr>
                                    }).collect_view()}
                                </tbody>
                            </table>
                        </div>
                    }.into_any(),
                    Err(e) => view! { <Failure error=e/> }.into_any(),
                }
            })}
        </Suspense>
    }
}
