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

/// A model's headline figure in a table cell: "accuracy 0.912" or "mean Dice 0.905".
pub fn headline(m: &consilium_core::protocol::Metrics) -> String {
    match m.headline() {
        (name, Some(v)) => format!("{name} {v:.3}"),
        (name, None) => format!("no {name}"),
    }
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
                <a href=sign_in_here()>"Sign in"</a>" to continue here."</p>
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

/// The sign-in page, asked to come back to this page afterwards.
pub fn sign_in_here() -> String {
    let l = leptos_router::hooks::use_location();
    let path = l.pathname.get_untracked();
    let search = l.search.get_untracked();
    let search = search.trim_start_matches('?');
    if path == "/" || path.starts_with("/signin") {
        return "/signin".into();
    }
    let here = if search.is_empty() {
        path
    } else {
        format!("{path}?{search}")
    };
    let next = percent_encoding::utf8_percent_encode(&here, percent_encoding::NON_ALPHANUMERIC);
    format!("/signin?next={next}")
}

/// What the last form post said: its error (the form was not sent), or the status message
/// after the action. Shown above the page, once (`crate::flash`).
#[component]
pub fn FormError() -> impl IntoView {
    let flash = use_context::<crate::flash::Current>();
    move || {
        let f = flash.map(|c| c.0.get()).unwrap_or_default();
        let error = f.error.map(|e| {
            view! {
                <div class="notice error" role="alert" id="form-error"><p>{e}</p></div>
            }
        });
        let notice = f.notice.map(|n| {
            view! {
                <div class="notice ok" role="status" id="form-notice"><p>{n}</p></div>
            }
        });
        view! { {error}{notice} }
    }
}

/// What the person typed into field `name` before the form came back with an error, or
/// `default`.
pub fn typed(name: &str, default: &str) -> String {
    crate::flash::current()
        .fields
        .get(name)
        .cloned()
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

/// A line chart (SVG) of one measure per round, with axis titles, a legend and the numbers as
/// a table for screen readers. It is drawn at least 560 px wide (its box scrolls on a narrow
/// screen), so its 12 px ticks are never scaled below 12 px.
#[component]
pub fn LineChart(
    title: String,
    /// The measure, written along the vertical axis.
    y_title: String,
    series: Vec<Series>,
    #[prop(optional)] unit_max: Option<f64>,
) -> impl IntoView {
    let (w, h, pad_l, pad_b, pad_t, pad_r) = (560.0, 240.0, 64.0, 46.0, 12.0, 14.0);
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
            <div class="plot"><svg viewBox=view_box role="img" aria-label=label>
                {ticks.into_iter().map(|t| view! {
                    <line x1=pad_l x2=w - pad_r y1=sy(t) y2=sy(t) class="grid"/>
                    <text x=pad_l - 6.0 y=sy(t) + 4.0 text-anchor="end" class="tick">{format!("{t:.2}")}</text>
                }).collect_view()}
                {rounds.into_iter().map(|r| view! {
                    <text x=sx(r as f64) y=h - pad_b + 18.0 text-anchor="middle" class="tick">{r.to_string()}</text>
                }).collect_view()}
                <text x=pad_l + (w - pad_l - pad_r) / 2.0 y=h - 6.0 text-anchor="middle" class="axis-title">"Round"</text>
                <text x="0" y="0" text-anchor="middle" class="axis-title"
                    transform=format!("translate(14 {:.1}) rotate(-90)", pad_t + (h - pad_t - pad_b) / 2.0)>{y_title}</text>
                {lines}
            </svg></div>
            <ul class="legend">{legend}</ul>
            // In a box of its own: a table is never narrower than its content, so hidden on its
            // own it would still widen the page.
            <div class="sr-only"><table><caption>{title}</caption><tbody>{table_rows}</tbody></table></div>
        </figure>
    }
}

/// Rows per page of a list (studies, runs, models, requests).
pub const LIST_PAGE: usize = 25;

/// A list's search and page, as the URL carries them (`?q=…&page=…`, pages from 1).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListQuery {
    pub q: String,
    pub page: usize,
}

pub fn list_query() -> ListQuery {
    let q = use_query_map();
    let q = q.read_untracked();
    ListQuery {
        q: q.get("q").unwrap_or_default().trim().to_string(),
        page: q
            .get("page")
            .and_then(|p| p.parse::<usize>().ok())
            .filter(|p| *p >= 1)
            .unwrap_or(1),
    }
}

/// A page of a list: the items whose `text` holds every word of the search (any case).
pub struct Paged<T> {
    pub rows: Vec<T>,
    pub total: usize,
    pub matching: usize,
    pub page: usize,
    pub pages: usize,
    pub query: ListQuery,
}

pub fn page_of<T: Clone>(items: &[T], text: impl Fn(&T) -> String) -> Paged<T> {
    let query = list_query();
    let words: Vec<String> = query
        .q
        .to_lowercase()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let matching: Vec<&T> = items
        .iter()
        .filter(|i| {
            let t = text(i).to_lowercase();
            words.iter().all(|w| t.contains(w.as_str()))
        })
        .collect();
    let pages = matching.len().div_ceil(LIST_PAGE).max(1);
    let page = query.page.min(pages);
    let rows = matching
        .iter()
        .skip((page - 1) * LIST_PAGE)
        .take(LIST_PAGE)
        .map(|t| (*t).clone())
        .collect();
    Paged {
        rows,
        total: items.len(),
        matching: matching.len(),
        page,
        pages,
        query,
    }
}

/// The search box of a list and where the list stands ("3 of 40 match"), with its pages.
#[component]
pub fn ListSearch(
    /// What is listed, e.g. "studies".
    what: &'static str,
    path: &'static str,
    total: usize,
    matching: usize,
    page: usize,
    pages: usize,
    query: ListQuery,
) -> impl IntoView {
    let searched = query.q.clone();
    let link = move |p: usize| {
        let mut parts = Vec::new();
        if !searched.is_empty() {
            parts.push(format!(
                "q={}",
                percent_encoding::utf8_percent_encode(
                    &searched,
                    percent_encoding::NON_ALPHANUMERIC
                )
            ));
        }
        if p > 1 {
            parts.push(format!("page={p}"));
        }
        if parts.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", parts.join("&"))
        }
    };
    let said = if query.q.is_empty() {
        format!("{total} {what}")
    } else {
        format!("{matching} of {total} {what} match {:?}", query.q)
    };
    let said = if pages > 1 {
        format!("{said} · page {page} of {pages}")
    } else {
        said
    };
    let id = format!("search-{}", what.replace(' ', "-"));
    view! {
        <form method="get" action=path class="list-search" role="search">
            <label for=id.clone()>{format!("Search {what}")}</label>
            <input id=id type="search" name="q" value=query.q.clone()/>
            <button type="submit" class="secondary">"Search"</button>
            {(!query.q.is_empty()).then(|| view! { <a href=path rel="external">"Clear"</a> })}
        </form>
        <p class="meta list-count">{said}</p>
        {(pages > 1).then(|| view! {
            <nav class="pages" aria-label=format!("Pages of {what}")>
                {(page > 1).then(|| view! { <a href=link(page - 1) rel="external prev">"Previous page"</a> })}
                {(page < pages).then(|| view! { <a href=link(page + 1) rel="external next">"Next page"</a> })}
            </nav>
        })}
    }
}
