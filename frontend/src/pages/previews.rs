//! Synthetic previews as people see them: the image grid per class, the memorisation check's
//! figures and the metadata summary.

use consilium_core::api::PreviewDto;
use consilium_core::preview::{Count, MetadataSummary};
use leptos::prelude::*;

use crate::components::{Badge, day};

fn counts(c: &[Count]) -> String {
    if c.is_empty() {
        return "—".into();
    }
    c.iter()
        .map(|x| match x.count {
            Some(n) => format!("{} ({n})", x.value),
            None => format!("{} (fewer than k)", x.value),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A site's data summarised; for segmentation data the labels are the images that show each
/// class.
#[component]
pub fn Summary(s: MetadataSummary, #[prop(optional)] masks: bool) -> impl IntoView {
    let rows = [
        (
            if masks {
                "Images showing each class"
            } else {
                "Labels"
            },
            counts(&s.labels),
        ),
        ("Modalities", counts(&s.modalities)),
        ("Image sizes", counts(&s.image_sizes)),
        ("Pixel spacing (mm)", counts(&s.pixel_spacings)),
        ("Manufacturers", counts(&s.manufacturers)),
    ];
    view! {
        <table class="summary">
            <caption>{format!("What the site's data looks like ({} files; counts below k = {} suppressed)", s.files, s.k)}</caption>
            <tbody>
                {rows.into_iter().map(|(k, v)| view! { <tr><th scope="row">{k}</th><td>{v}</td></tr> }).collect_view()}
            </tbody>
        </table>
    }
}

/// A preview of segmentation data: each synthetic image with its mask drawn over it (the link
/// opens the image alone), and which colour is which class.
fn overlays(p: &PreviewDto) -> AnyView {
    let legend = p
        .classes
        .iter()
        .map(|c| match &c.colour {
            Some(colour) => view! {
                <li><span class="swatch" style=format!("background:{colour}")></span>{format!("{} (mask value {})", c.name, c.value)}</li>
            }
            .into_any(),
            None => view! { <li>{format!("{} (mask value {}): no colour", c.name, c.value)}</li> }.into_any(),
        })
        .collect_view();
    let imgs = p
        .images
        .iter()
        .map(|i| {
            let base = format!("/api/v1/previews/{}/images/{}", p.id, i.index);
            let alt = format!("Synthetic image {} with its synthetic mask over it", i.index + 1);
            view! {
                <a href=base.clone() title="The image alone">
                    <img class="overlay" src=format!("{base}/overlay") alt=alt width="96" height="96" loading="lazy"/>
                </a>
            }
        })
        .collect_view();
    view! {
        <figure class="grid">
            <figcaption>"Images with their synthetic masks"</figcaption>
            <ul class="legend">{legend}</ul>
            <div class="images">{imgs}</div>
        </figure>
    }
    .into_any()
}

/// A preview set: status, who released it, the images by class (or with their masks), the
/// figures, the summary.
#[component]
pub fn PreviewSet(p: PreviewDto) -> impl IntoView {
    let masks = !p.classes.is_empty();
    let mut classes: Vec<u32> = p.images.iter().map(|i| i.label).collect();
    classes.sort_unstable();
    classes.dedup();
    let grids = classes
        .into_iter()
        .map(|label| {
            let imgs = p
                .images
                .iter()
                .filter(|i| i.label == label)
                .map(|i| {
                    let src = format!("/api/v1/previews/{}/images/{}", p.id, i.index);
                    let alt = format!("Synthetic image {} of class {label}", i.index + 1);
                    view! { <img src=src alt=alt width="96" height="96" loading="lazy"/> }
                })
                .collect_view();
            view! {
                <figure class="grid">
                    <figcaption>{format!("Class {label}")}</figcaption>
                    <div class="images">{imgs}</div>
                </figure>
            }
        })
        .collect_view();
    let grids = match masks {
        true => overlays(&p),
        false => grids.into_any(),
    };
    let figures = p.memorisation.as_ref().map(|m| {
        let min = m.ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        view! {
            <p class="meta memorisation">
                {format!(
                    "Memorisation check: each synthetic image's distance to its closest real image, over the median real-to-real distance ({:.3}). Smallest ratio {:.2}; images below {:.2} are withheld: {} withheld.",
                    m.real_nn_median,
                    if min.is_finite() { min } else { 0.0 },
                    m.threshold,
                    p.withheld.unwrap_or(0)
                )}
            </p>
        }
    });
    let decided = p.decided_at.map(|t| {
        let verb = if p.status == "released" { "Released" } else { "Decided" };
        view! {
            <p class="meta">{format!("{verb} {} by {}", day(&t), p.decided_by_name.clone().unwrap_or_default())}
                {p.comment.clone().map(|c| format!(": “{c}”"))}</p>
        }
    });
    view! {
        <div class="card preview" id=format!("preview-{}", p.id)>
            <h3>{p.site_name.clone()}" "<Badge text=p.status.clone()/></h3>
            <p class="meta">
                {format!("Generator {}", p.generator.clone().unwrap_or_else(|| "—".into()))}
                {format!(" · {}", match (p.epsilon, p.delta) {
                    (Some(e), Some(d)) => format!("differentially private: each patient's data spent ε = {e:.2} at δ = {d} (from the site's privacy ledger)"),
                    (Some(e), None) => format!("differentially private, ε = {e:.2}"),
                    (None, Some(d)) => format!("to be differentially private at δ = {d}"),
                    (None, None) => "not differentially private".into(),
                })}
                {format!(" · requested {}", day(&p.created_at))}
            </p>
            {p.failure.clone().map(|f| view! { <p class="notice error">{f}</p> })}
            {decided}
            {figures}
            <div class="grids">{grids}</div>
            {p.summary.clone().map(|s| view! { <Summary s masks/> })}
        </div>
    }
}
