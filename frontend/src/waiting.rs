//! What waits for the signed-in person (server side): reviews, data-access requests, previews
//! to release or newly released, plans whose grants must be asked again, studies to submit or
//! change, runs finished or failed, site flags and monitoring drops — for the home page and the
//! header's count. Only what the API lets this person see is counted.

use chrono::{Duration, Utc};
use consilium_core::Role;
use consilium_core::api::{
    AccessRequestDto, AccessStatus, MeDto, ModelVersionDto, MonitoringReportDto, PreflightReport,
    PreviewDto, RunDto, SiteHealthDto, StudyDto, StudyStatus,
};

use crate::api::Api;
use crate::error::PortalError;
use crate::server::{Directory, Waiting};

/// How long a finished run or a released preview counts as news.
const NEWS_DAYS: i64 = 7;
/// A monitoring report this much below the released model's held-out accuracy is an alert.
pub const MONITORING_DROP: f64 = 0.05;

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn act(text: String, href: String) -> Waiting {
    Waiting {
        text,
        href,
        act: true,
    }
}

fn news(text: String, href: String) -> Waiting {
    Waiting {
        text,
        href,
        act: false,
    }
}

/// A read the person may not be allowed: hidden is nothing to list, not an error.
fn allowed<T>(r: Result<T, PortalError>) -> Result<Option<T>, PortalError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.status == 403 || e.status == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Everything the page needs to say what waits; read once per page.
pub struct Gathered {
    pub me: MeDto,
    pub studies: Vec<StudyDto>,
    pub requests: Vec<AccessRequestDto>,
    pub directory: Directory,
    pub runs: Vec<RunDto>,
}

pub async fn waiting(api: &Api, g: &Gathered) -> Result<Vec<Waiting>, PortalError> {
    let me = &g.me;
    let has = |r: Role| me.acting_roles.contains(&r);
    let mine = |s: &StudyDto| s.researcher_id == me.user.id;
    let my_sites: Vec<uuid::Uuid> = g
        .directory
        .sites
        .iter()
        .filter(|s| s.custodians.contains(&me.user.id))
        .map(|s| s.id)
        .collect();
    let my_committees: Vec<uuid::Uuid> = g
        .directory
        .committees
        .iter()
        .filter(|c| c.members.contains(&me.user.id))
        .map(|c| c.id)
        .collect();
    let recent = Utc::now() - Duration::days(NEWS_DAYS);
    let mut items = Vec::new();

    if has(Role::CommitteeMember) {
        for s in g.studies.iter().filter(|s| {
            s.status == StudyStatus::Submitted && my_committees.contains(&s.committee_id)
        }) {
            items.push(act(
                format!("Review {:?}: it awaits your committee's decision", s.title),
                format!("/studies/{}", s.id),
            ));
        }
    }
    let title = |id: uuid::Uuid| {
        g.studies
            .iter()
            .find(|s| s.id == id)
            .map_or_else(|| "a study".to_string(), |s| format!("{:?}", s.title))
    };
    if has(Role::Custodian) {
        let pending = g
            .requests
            .iter()
            .filter(|r| r.status == AccessStatus::Pending && my_sites.contains(&r.site_id))
            .count();
        if pending > 0 {
            items.push(act(
                format!(
                    "Decide {} for your sites",
                    plural(pending, "data-access request", "data-access requests")
                ),
                "/access".into(),
            ));
        }
    }

    // Previews: the custodian releases or rejects; the researcher hears of a release.
    let mut previews: Vec<PreviewDto> = Vec::new();
    if has(Role::Custodian) || has(Role::Researcher) {
        for s in g
            .studies
            .iter()
            .filter(|s| mine(s) || s.sites.iter().any(|x| my_sites.contains(&x.site_id)))
        {
            let listed: Option<Vec<PreviewDto>> =
                allowed(api.get(&format!("/studies/{}/previews", s.id)).await)?;
            previews.extend(listed.unwrap_or_default());
        }
    }
    if has(Role::Custodian) {
        let to_release = previews
            .iter()
            .filter(|p| p.status == "awaiting_release" && my_sites.contains(&p.site_id))
            .count();
        if to_release > 0 {
            items.push(act(
                format!(
                    "Release or reject {}",
                    plural(to_release, "synthetic preview", "synthetic previews")
                ),
                "/access#previews-h".into(),
            ));
        }
    }
    if has(Role::Researcher) {
        for p in previews.iter().filter(|p| {
            p.status == "released"
                && p.decided_at.is_some_and(|t| t > recent)
                && g.studies.iter().any(|s| s.id == p.study_id && mine(s))
        }) {
            items.push(news(
                format!(
                    "{}'s preview for {} is released",
                    p.site_name,
                    title(p.study_id)
                ),
                format!("/studies/{}#previews-h", p.study_id),
            ));
        }
        let own: Vec<&StudyDto> = g.studies.iter().filter(|s| mine(s)).collect();
        for s in &own {
            let href = format!("/studies/{}", s.id);
            match s.status {
                StudyStatus::Draft => items.push(act(
                    format!("Submit {:?} for ethics review (a draft)", s.title),
                    href,
                )),
                StudyStatus::ChangesRequested => items.push(act(
                    format!("Change {:?}: the committee asked for changes", s.title),
                    href,
                )),
                StudyStatus::Submitted => items.push(news(
                    format!("{:?} awaits the committee's decision", s.title),
                    href,
                )),
                StudyStatus::Approved => {
                    // Approved, but it cannot run: a site's grant does not cover the approved
                    // plan (a new plan version, an expired grant), or the approval lapsed.
                    let pre: Option<PreflightReport> =
                        allowed(api.get(&format!("/studies/{}/preflight", s.id)).await)?;
                    if let Some(pre) = pre.filter(|p| !p.ready && !p.unmet.is_empty()) {
                        items.push(act(
                            format!(
                                "{:?} is approved but cannot run yet: {}",
                                s.title,
                                pre.unmet.join(" ")
                            ),
                            href,
                        ));
                    }
                }
                StudyStatus::Rejected => {}
            }
        }
        if own.is_empty() {
            items.push(act("Draft your first study".into(), "/studies/new".into()));
        }
    }

    // Runs: in progress, and those started this week that finished, failed or were stopped.
    let running = g.runs.iter().filter(|r| r.status == "running").count();
    if running > 0 {
        items.push(news(
            format!("{} in progress", plural(running, "run", "runs")),
            "/runs".into(),
        ));
    }
    for r in g.runs.iter().filter(|r| {
        matches!(r.status.as_str(), "completed" | "failed" | "stopped") && r.created_at > recent
    }) {
        let words = match r.status.as_str() {
            "completed" => "finished",
            "failed" => "failed",
            _ => "was stopped",
        };
        items.push(news(
            format!("A run of {} {words}", title(r.study_id)),
            format!("/runs/{}", r.id),
        ));
    }

    // Alerts: sites robust aggregation kept down-weighting (their custodians), and released
    // models whose monitoring at a site fell below their held-out accuracy.
    if has(Role::Custodian) || has(Role::Administrator) {
        let health: Vec<SiteHealthDto> =
            allowed(api.get("/site-health").await)?.unwrap_or_default();
        for f in health.iter().flat_map(|h| h.flags.iter()) {
            items.push(act(
                format!(
                    "{} is flagged in a run of {:?}: check its data pipeline",
                    f.site_name, f.study_title
                ),
                "/sites".into(),
            ));
        }
    }
    if has(Role::Researcher) || has(Role::Custodian) {
        let models: Vec<ModelVersionDto> = allowed(api.get("/models").await)?.unwrap_or_default();
        for m in models.iter().filter(|m| m.released_at.is_some()) {
            let Some(held_out) = m.evaluation.as_ref().map(|e| e.global.accuracy) else {
                continue;
            };
            let reports: Vec<MonitoringReportDto> =
                allowed(api.get(&format!("/models/{}/monitoring", m.id)).await)?
                    .unwrap_or_default();
            let dropped = reports
                .iter()
                .filter(|r| {
                    r.reported_at > recent
                        && r.metrics.accuracy < held_out - MONITORING_DROP
                        && (g.studies.iter().any(|s| s.id == m.study_id && mine(s))
                            || my_sites.contains(&r.site_id))
                })
                .count();
            if dropped > 0 {
                items.push(act(
                    format!(
                        "A released model of {} scores more than {:.0} points below its held-out accuracy in {}",
                        title(m.study_id),
                        MONITORING_DROP * 100.0,
                        plural(dropped, "monitoring report", "monitoring reports")
                    ),
                    format!("/models/{}", m.id),
                ));
            }
        }
    }
    if has(Role::Auditor) || has(Role::Administrator) {
        items.push(news(
            "The audit trail and its verification".into(),
            "/audit".into(),
        ));
    }
    // What needs the person first, then the news.
    items.sort_by_key(|w| !w.act);
    Ok(items)
}
