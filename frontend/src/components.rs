//! Small pieces every page uses: errors and notices, badges, dates, hashes, charts.

use chrono::{DateTime, Utc};
use consilium_core::Role;
use leptos::prelude::*;
use leptos_router::hooks::use_query_map;

use crate::error::PortalError;

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Administrator => "administrator",
        Role::CommitteeMember => "committee member",
        Role::Researcher => "researcher",
        Role::Custodian => "data custodian",
        Role::Auditor => "auditor",
    }
}

pub fn when(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

pub fn day(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d").to_string()
}

/// The first 12 hex digits of a hash; the full hash is in the element's title.
#[component]
pub fn Hash(hash: String) -> impl IntoView {
    let short: String = hash.chars().take(12).collect();
    view! { <code class="hash" title=hash>{short}"…"</code> }
}

#[component]
pub fn Badge(text: String) -> impl IntoView {
    let class = format!("badge {}", text.replace(' ', "_"));
    view! { <span class=class>{text.replace('_', " ")}</span> }
}

/// A failed read: what went wrong and what to do (sign in, when that is the problem).
#[component]
pub fn Failure(error: PortalError) -> impl IntoView {
    if error.is_unauthenticated() {
        view! {
            <div class="notice error" role="alert">
                <p>"You are not signed in, or your session has ended. "
                <a href="/signin">"Sign in"</a>" to continue."</p>
            </div>
        }
        .into_any()
    } else {
        view! {
            <div class="notice error" role="alert"><p>{error.message()}</p></div>
        }
        .into_any()
    }
}

/// The error a form post came back with (`?error=` in the URL), shown above the page.
#[component]
pub fn FormError() -> impl IntoView {
    let q = use_query_map();
    move || {
        q.read().get("error").map(|e| {
            view! {
                <div class="notice error" role="alert" id="form-error">
                    <p><strong>"Not saved: "</strong>{e}</p>
                </div>
            }
        })
    }
}

/// What the person typed into field `name` before the form came back with an error, or
/// `default`.
pub fn typed(name: &str, default: &str) -> String {
    let q = use_query_map();
    q.read_untracked()
        .get(&format!("f_{name}"))
        .unwrap_or_else(|| default.to_string())
}

/// Text for a `<textarea>`. The renderer writes a textarea's children as they are (like a
/// `<script>`'s), so on the server the text is escaped here: `</textarea><img onerror=…>`
/// typed or sent in a link stays text. In the browser the children become a text node, which
/// needs no escaping.
pub fn textarea_text(text: String) -> String {
    #[cfg(feature = "ssr")]
    {
        html_escape::encode_text(&text).into_owned()
    }
    #[cfg(not(feature = "ssr"))]
    {
        text
    }
}

/// A form field's HTML name (every portal form posts `form[...]`).
pub fn field(name: &str) -> String {
    format!("form[{name}]")
}

pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [&str; 6] = [
    "#1f5fa8", "#b3461a", "#2b7a3d", "#7a3d8c", "#8a6d00", "#2f6f73",
];

/// A line chart (SVG) of one measure per round, with a legend and the numbers as a table for
/// screen readers.
#[component]
pub fn LineChart(
    title: String,
    series: Vec<Series>,
    #[prop(optional)] unit_max: Option<f64>,
) -> impl IntoView {
    let (w, h, pad_l, pad_b, pad_t, pad_r) = (560.0, 220.0, 48.0, 30.0, 12.0, 12.0);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    let x_max = xs.iter().cloned().fold(1.0_f64, f64::max);
    let y_max = unit_max
        .unwrap_or_else(|| ys.iter().cloned().fold(0.0_f64, f64::max) * 1.1)
        .max(1e-9);
    let sx =
        move |x: f64| pad_l + (x - 1.0).max(0.0) / (x_max - 1.0).max(1.0) * (w - pad_l - pad_r);
    let sy = move |y: f64| pad_t + (1.0 - y / y_max) * (h - pad_t - pad_b);
    let ticks: Vec<f64> = (0..=4).map(|i| y_max * f64::from(i) / 4.0).collect();
    let rounds: Vec<i64> = (1..=(x_max as i64)).collect();
    let view_box = format!("0 0 {w} {h}");
    let label = title.clone();
    let lines = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let colour = COLOURS[i % COLOURS.len()];
            let pts = s
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect::<Vec<_>>()
                .join(" ");
            let dots = s
                .points
                .iter()
                .map(|(x, y)| view! { <circle cx=format!("{:.1}", sx(*x)) cy=format!("{:.1}", sy(*y)) r="3" fill=colour/> })
                .collect_view();
            view! { <polyline points=pts fill="none" stroke=colour stroke-width="2"/>{dots} }
        })
        .collect_view();
    let legend = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // A presentation attribute, not a style: the Content-Security-Policy allows no
            // inline styles.
            let colour = COLOURS[i % COLOURS.len()];
            view! {
                <li>
                    <svg class="swatch" viewBox="0 0 10 10" aria-hidden="true"><rect width="10" height="10" rx="2" fill=colour/></svg>
                    {s.label.clone()}
                </li>
            }
        })
        .collect_view();
    let table_rows = series
        .iter()
        .map(|s| {
            let cells = s
                .points
                .iter()
                .map(|(x, y)| format!("round {x}: {y:.3}"))
                .collect::<Vec<_>>()
                .join(", ");
            view! { <tr><th scope="row">{s.label.clone()}</th><td>{cells}</td></tr> }
        })
        .collect_view();
    view! {
        <figure class="chart">
            <figcaption>{title.clone()}</figcaption>
            <svg viewBox=view_box role="img" aria-label=label>
                {ticks.into_iter().map(|t| view! {
                    <line x1=pad_l x2=w - pad_r y1=sy(t) y2=sy(t) class="grid"/>
                    <text x=pad_l - 6.0 y=sy(t) + 4.0 text-anchor="end" class="tick">{format!("{t:.2}")}</text>
                }).collect_view()}
                {rounds.into_iter().map(|r| view! {
                    <text x=sx(r as f64) y=h - 10.0 text-anchor="middle" class="tick">{r.to_string()}</text>
                }).collect_view()}
                {lines}
            </svg>
            <ul class="legend">{legend}</ul>
            <table class="sr-only"><caption>{title}</caption><tbody>{table_rows}</tbody></table>
        </figure>
    }
}
