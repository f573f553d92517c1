//! The portal's server functions: each read gathers one page's data from the REST API; each
//! write is the target of a plain HTML form (so it works before the browser bundle has
//! loaded) and ends in a redirect: to the result on success, back to the form with the error
//! and what was typed otherwise.

use std::collections::HashMap;

use consilium_core::api::{
    AccessRequestDto, AuditEventDto, AuditVerification, CommitteeDto, DatasetPrivacyDto,
    LineageDto, MeDto, ModelVersionDto, PlanDto, PreflightReport, PreviewDto, ReviewDto, RoundDto,
    RunDto, SiteDto, SiteHealthDto, SiteKeyDto, StudyDto,
};
use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::PortalError;

#[cfg(feature = "ssr")]
use crate::api::{Api, finish, pass_cookie};
#[cfg(feature = "ssr")]
use crate::forms;

/// What every page needs: the signed-in person (none when signed out).
#[server(prefix = "/portal", endpoint = "me")]
pub async fn me() -> Result<Option<MeDto>, PortalError> {
    match Api::current()?.get::<MeDto>("/auth/me").await {
        Ok(me) => Ok(Some(me)),
        Err(e) if e.is_unauthenticated() => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Directory {
    pub sites: Vec<SiteDto>,
    pub committees: Vec<CommitteeDto>,
}

/// One thing that waits for the signed-in person, with the page where it is done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Waiting {
    pub text: String,
    pub href: String,
    /// The person has to act (counted in the header); otherwise news.
    pub act: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HomeData {
    pub me: MeDto,
    /// What needs the person first, then the news.
    pub waiting: Vec<Waiting>,
}

#[cfg(feature = "ssr")]
async fn directory(api: &Api) -> Result<Directory, PortalError> {
    Ok(Directory {
        sites: api.get("/sites").await?,
        committees: api.get("/committees").await?,
    })
}

#[cfg(feature = "ssr")]
async fn runs_of(api: &Api, studies: &[StudyDto]) -> Result<Vec<RunDto>, PortalError> {
    let mut runs = Vec::new();
    for s in studies {
        runs.extend(
            api.get::<Vec<RunDto>>(&format!("/studies/{}/runs", s.id))
                .await?,
        );
    }
    runs.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    Ok(runs)
}

#[server(prefix = "/portal", endpoint = "home")]
pub async fn load_home() -> Result<HomeData, PortalError> {
    let api = Api::current()?;
    let (me, waiting) = waiting_for(&api).await?;
    Ok(HomeData { me, waiting })
}

#[cfg(feature = "ssr")]
async fn gather(api: &Api) -> Result<crate::waiting::Gathered, PortalError> {
    let studies: Vec<StudyDto> = api.get("/studies").await?;
    Ok(crate::waiting::Gathered {
        me: api.get("/auth/me").await?,
        requests: api.get("/access-requests").await?,
        runs: runs_of(api, &studies).await?,
        directory: directory(api).await?,
        studies,
    })
}

/// What waits for the person, read once per page render: the header's count and the home
/// page's list share it (the App provides it to each render). A server function called from
/// the browser has none and reads afresh.
#[cfg(feature = "ssr")]
#[derive(Clone, Default)]
pub struct WaitingOnce(std::sync::Arc<tokio::sync::OnceCell<WaitingRead>>);

/// The person and what waits for them.
#[cfg(feature = "ssr")]
type WaitingRead = Result<(MeDto, Vec<Waiting>), PortalError>;

#[cfg(feature = "ssr")]
async fn waiting_for(api: &Api) -> Result<(MeDto, Vec<Waiting>), PortalError> {
    let read = || async {
        let g = gather(api).await?;
        let waiting = crate::waiting::waiting(api, &g).await?;
        Ok((g.me, waiting))
    };
    match use_context::<WaitingOnce>() {
        Some(once) => once.0.get_or_init(read).await.clone(),
        None => read().await,
    }
}

/// How many things wait for the signed-in person to act (the header's count); none when
/// signed out.
#[server(prefix = "/portal", endpoint = "waiting-count")]
pub async fn waiting_count() -> Result<usize, PortalError> {
    let api = Api::current()?;
    match waiting_for(&api).await {
        Ok((_, waiting)) => Ok(waiting.iter().filter(|w| w.act).count()),
        Err(e) if e.is_unauthenticated() => Ok(0),
        Err(e) => Err(e),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudiesData {
    pub studies: Vec<StudyDto>,
    pub directory: Directory,
}

#[server(prefix = "/portal", endpoint = "studies")]
pub async fn load_studies() -> Result<StudiesData, PortalError> {
    let api = Api::current()?;
    Ok(StudiesData {
        studies: api.get("/studies").await?,
        directory: directory(&api).await?,
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudyPage {
    pub me: MeDto,
    pub study: StudyDto,
    pub directory: Directory,
    pub plans: Vec<PlanDto>,
    pub reviews: Vec<ReviewDto>,
    pub requests: Vec<AccessRequestDto>,
    pub preflight: PreflightReport,
    pub runs: Vec<RunDto>,
    /// The latest plan's attachments as text (name, content), for the committee to read.
    pub latest_files: Vec<(String, String)>,
    /// The synthetic previews of the sites' data this person may see.
    pub previews: Vec<PreviewDto>,
    /// The study's sites' workers as last heard (what this person may see of them).
    pub health: Vec<SiteHealthDto>,
    /// A date one year ahead (YYYY-MM-DD), the default expiry offered in forms.
    pub next_year: String,
}

/// A plan's attachments, as text where they are text.
#[cfg(feature = "ssr")]
async fn plan_files(
    api: &Api,
    plan: Option<&PlanDto>,
) -> Result<Vec<(String, String)>, PortalError> {
    use base64::Engine;
    let Some(plan) = plan else {
        return Ok(Vec::new());
    };
    let files: Vec<consilium_core::api::PlanFileContent> =
        api.get(&format!("/plans/{}/files", plan.id)).await?;
    Ok(files
        .into_iter()
        .map(|f| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(f.content_base64.as_bytes())
                .unwrap_or_default();
            let text = match String::from_utf8(bytes) {
                Ok(t) if t.len() <= 200_000 => t,
                Ok(t) => format!("(text, {} bytes: too long to show here)", t.len()),
                Err(e) => format!("(binary file, {} bytes)", e.as_bytes().len()),
            };
            (f.name, text)
        })
        .collect())
}

#[server(prefix = "/portal", endpoint = "study")]
pub async fn load_study(id: String) -> Result<StudyPage, PortalError> {
    let api = Api::current()?;
    let id = forms::uuid("study", &id)?;
    let plans: Vec<PlanDto> = api.get(&format!("/studies/{id}/plans")).await?;
    let latest_files = plan_files(&api, plans.iter().max_by_key(|p| p.version)).await?;
    Ok(StudyPage {
        me: api.get("/auth/me").await?,
        study: api.get(&format!("/studies/{id}")).await?,
        directory: directory(&api).await?,
        plans,
        latest_files,
        previews: api.get(&format!("/studies/{id}/previews")).await?,
        reviews: api.get(&format!("/studies/{id}/reviews")).await?,
        requests: api.get(&format!("/access-requests?study_id={id}")).await?,
        preflight: api.get(&format!("/studies/{id}/preflight")).await?,
        runs: api.get(&format!("/studies/{id}/runs")).await?,
        health: api.get("/site-health").await?,
        next_year: (chrono::Utc::now() + chrono::Duration::days(365))
            .format("%Y-%m-%d")
            .to_string(),
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccessPage {
    pub me: MeDto,
    pub requests: Vec<AccessRequestDto>,
    pub studies: Vec<StudyDto>,
    pub directory: Directory,
    /// Runs on the data of the custodian's sites, with their rounds.
    pub activity: Vec<SiteActivity>,
    /// Preview sets of the custodian's sites (with their images), newest first.
    pub previews: Vec<PreviewDto>,
    /// The signing keys of the custodian's sites, in force and revoked.
    pub keys: Vec<SiteKeyDto>,
    /// The privacy ledgers of the custodian's datasets (one per site).
    pub privacy: Vec<DatasetPrivacyDto>,
    /// The plans and the committee's decisions of the studies that ask the custodian's sites,
    /// so that each request shows which plan version it covers and whether ethics approved it.
    pub plans: Vec<PlanDto>,
    pub reviews: Vec<ReviewDto>,
    pub next_year: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteActivity {
    pub run: RunDto,
    pub study_title: String,
    pub rounds: Vec<RoundDto>,
}

#[server(prefix = "/portal", endpoint = "access")]
pub async fn load_access() -> Result<AccessPage, PortalError> {
    let api = Api::current()?;
    let me: MeDto = api.get("/auth/me").await?;
    let studies: Vec<StudyDto> = api.get("/studies").await?;
    let requests: Vec<AccessRequestDto> = api.get("/access-requests").await?;
    let directory = directory(&api).await?;
    let mine: Vec<uuid::Uuid> = directory
        .sites
        .iter()
        .filter(|s| s.custodians.contains(&me.user.id))
        .map(|s| s.id)
        .collect();
    let mut activity = Vec::new();
    let mut previews = Vec::new();
    let mut keys = Vec::new();
    let mut privacy = Vec::new();
    let mut plans = Vec::new();
    let mut reviews = Vec::new();
    for site in &mine {
        keys.extend(
            api.get::<Vec<SiteKeyDto>>(&format!("/sites/{site}/keys"))
                .await?,
        );
        privacy.push(
            api.get::<DatasetPrivacyDto>(&format!("/sites/{site}/privacy"))
                .await?,
        );
    }
    if !mine.is_empty() {
        for s in studies
            .iter()
            .filter(|s| s.sites.iter().any(|x| mine.contains(&x.site_id)))
        {
            plans.extend(
                api.get::<Vec<PlanDto>>(&format!("/studies/{}/plans", s.id))
                    .await?,
            );
            reviews.extend(
                api.get::<Vec<ReviewDto>>(&format!("/studies/{}/reviews", s.id))
                    .await?,
            );
            let sets: Vec<PreviewDto> = api.get(&format!("/studies/{}/previews", s.id)).await?;
            previews.extend(sets.into_iter().filter(|p| mine.contains(&p.site_id)));
            for run in api
                .get::<Vec<RunDto>>(&format!("/studies/{}/runs", s.id))
                .await?
            {
                let rounds: Vec<RoundDto> = api.get(&format!("/runs/{}/rounds", run.id)).await?;
                activity.push(SiteActivity {
                    run,
                    study_title: s.title.clone(),
                    rounds,
                });
            }
        }
    }
    previews.sort_by_key(|p| std::cmp::Reverse(p.created_at));
    Ok(AccessPage {
        me,
        requests,
        studies,
        directory,
        activity,
        previews,
        keys,
        privacy,
        plans,
        reviews,
        next_year: (chrono::Utc::now() + chrono::Duration::days(365))
            .format("%Y-%m-%d")
            .to_string(),
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunPage {
    pub me: MeDto,
    pub run: RunDto,
    pub study: StudyDto,
    pub rounds: Vec<RoundDto>,
    pub models: Vec<ModelVersionDto>,
    /// The rounds the run's plan asks for (none when the plan is not visible).
    pub rounds_planned: Option<u32>,
    /// The sites' workers now (the sites this person may see).
    pub health: Vec<SiteHealthDto>,
}

#[server(prefix = "/portal", endpoint = "run")]
pub async fn load_run(id: String) -> Result<RunPage, PortalError> {
    let api = Api::current()?;
    let id = forms::uuid("run", &id)?;
    let run: RunDto = api.get(&format!("/runs/{id}")).await?;
    let plans: Vec<PlanDto> = api.get(&format!("/studies/{}/plans", run.study_id)).await?;
    Ok(RunPage {
        rounds_planned: plans
            .iter()
            .find(|p| p.hash == run.plan_hash)
            .map(|p| p.manifest.rounds),
        health: api.get("/site-health").await?,
        me: api.get("/auth/me").await?,
        study: api.get(&format!("/studies/{}", run.study_id)).await?,
        rounds: api.get(&format!("/runs/{id}/rounds")).await?,
        models: api.get(&format!("/models?run_id={id}")).await?,
        run,
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunsData {
    pub runs: Vec<RunDto>,
    pub studies: Vec<StudyDto>,
}

#[server(prefix = "/portal", endpoint = "sites")]
pub async fn load_sites() -> Result<Vec<SiteHealthDto>, PortalError> {
    Api::current()?.get("/site-health").await
}

#[server(prefix = "/portal", endpoint = "runs")]
pub async fn load_runs() -> Result<RunsData, PortalError> {
    let api = Api::current()?;
    let studies: Vec<StudyDto> = api.get("/studies").await?;
    Ok(RunsData {
        runs: runs_of(&api, &studies).await?,
        studies,
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelsData {
    pub models: Vec<ModelVersionDto>,
    pub studies: Vec<StudyDto>,
}

#[server(prefix = "/portal", endpoint = "models")]
pub async fn load_models() -> Result<ModelsData, PortalError> {
    let api = Api::current()?;
    let mut models: Vec<ModelVersionDto> = api.get("/models").await?;
    models.sort_by_key(|m| std::cmp::Reverse(m.created_at));
    Ok(ModelsData {
        models,
        studies: api.get("/studies").await?,
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LineagePage {
    pub me: MeDto,
    pub lineage: LineageDto,
    pub study: StudyDto,
    pub directory: Directory,
}

#[server(prefix = "/portal", endpoint = "lineage")]
pub async fn load_lineage(id: String) -> Result<LineagePage, PortalError> {
    let api = Api::current()?;
    let id = forms::uuid("model", &id)?;
    let lineage: LineageDto = api.get(&format!("/models/{id}/lineage")).await?;
    Ok(LineagePage {
        me: api.get("/auth/me").await?,
        study: api
            .get(&format!("/studies/{}", lineage.model.study_id))
            .await?,
        directory: directory(&api).await?,
        lineage,
    })
}

/// The audit page's filter and page, as its URL carries them (all text, empty when unset).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditFilter {
    pub actor: String,
    pub action: String,
    pub object_type: String,
    pub object_id: String,
    /// First day shown (YYYY-MM-DD), and last day shown.
    pub from: String,
    pub to: String,
    /// The page: events before this sequence number, or after this one.
    pub before: String,
    pub after: String,
}

/// Events per audit page.
pub const AUDIT_PAGE: usize = 100;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditPage {
    /// This page's events, newest first.
    pub events: Vec<AuditEventDto>,
    pub verification: AuditVerification,
    /// Whether older (and newer) events match beyond this page.
    pub older: bool,
    pub newer: bool,
    /// The filter as `/audit/export` takes it (without a page), for the export links.
    pub export_query: String,
    /// Who and what the events name, to show names and links instead of ids.
    pub users: Vec<consilium_core::api::UserDto>,
    pub directory: Directory,
    pub studies: Vec<StudyDto>,
}

#[server(prefix = "/portal", endpoint = "audit")]
pub async fn load_audit(filter: AuditFilter) -> Result<AuditPage, PortalError> {
    let api = Api::current()?;
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("actor", &filter.actor),
        ("action", &filter.action),
        ("object_type", &filter.object_type),
        ("object_id", &filter.object_id),
    ] {
        if !v.trim().is_empty() {
            q.append_pair(k, v.trim());
        }
    }
    let day = |v: &str, label: &str| -> Result<Option<chrono::NaiveDate>, PortalError> {
        let v = v.trim();
        if v.is_empty() {
            return Ok(None);
        }
        chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
            .map(Some)
            .map_err(|_| {
                PortalError::new(
                    "invalid",
                    format!("{label} must be a date such as 2026-12-01, not {v:?}."),
                )
            })
    };
    if let Some(d) = day(&filter.from, "From")? {
        q.append_pair("from", &format!("{d}T00:00:00Z"));
    }
    if let Some(d) = day(&filter.to, "To")? {
        // The last day shown is whole: events before the next day's start.
        let next = d.succ_opt().unwrap_or(d);
        q.append_pair("to", &format!("{next}T00:00:00Z"));
    }
    let export_query = q.finish();
    let seq = |v: &str, label: &str| -> Result<Option<i64>, PortalError> {
        let v = v.trim();
        if v.is_empty() {
            return Ok(None);
        }
        v.parse::<i64>().map(Some).map_err(|_| {
            PortalError::new(
                "invalid",
                format!("{label} must be an event number; follow the page links instead."),
            )
        })
    };
    let verification: AuditVerification = api.get("/audit/verify").await?;
    let before = seq(&filter.before, "The page")?;
    let after = seq(&filter.after, "The page")?;
    // One event more than a page says whether there is another page that way.
    let mut page = url::form_urlencoded::Serializer::new(export_query.clone());
    page.append_pair("limit", &(AUDIT_PAGE + 1).to_string());
    match (before, after) {
        (_, Some(a)) => page.append_pair("after_seq", &a.to_string()),
        (Some(b), None) => page.append_pair("before_seq", &b.to_string()),
        (None, None) => page.append_pair(
            "before_seq",
            &(i64::try_from(verification.events_checked).unwrap_or(i64::MAX - 1) + 1).to_string(),
        ),
    };
    let mut events: Vec<AuditEventDto> =
        api.get(&format!("/audit/events?{}", page.finish())).await?;
    let more = events.len() > AUDIT_PAGE;
    let (older, newer) = if after.is_some() {
        events.truncate(AUDIT_PAGE);
        (true, more)
    } else {
        if more {
            events.remove(0);
        }
        (more, before.is_some())
    };
    events.reverse();
    let studies: Vec<StudyDto> = api.get("/studies").await?;
    Ok(AuditPage {
        events,
        verification,
        older,
        newer,
        export_query,
        users: api.get("/users").await?,
        directory: directory(&api).await?,
        studies,
    })
}

// ------------------------------------------------------------------ form posts

/// Every form posts its fields as `form[name]`; a form post answers with a redirect.
pub type Form = HashMap<String, String>;

/// A form post: its token checked first (`crate::csrf`), then `act`; ends in `finish`.
#[cfg(feature = "ssr")]
async fn posted<F, Fut>(form: &Form, act: F)
where
    F: FnOnce(Api) -> Fut,
    Fut: std::future::Future<Output = Result<crate::api::Done, PortalError>>,
{
    let r = match (
        crate::csrf::check(form.get(crate::csrf::FIELD)),
        Api::current(),
    ) {
        (Ok(()), Ok(api)) => act(api).await,
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let mut shown = form.clone();
    shown.remove(crate::csrf::FIELD);
    finish(r, &shown);
}

/// Where a sign-in continues: the page that asked for it (`next`, a path of this portal), or
/// home.
#[cfg(feature = "ssr")]
fn next_page(form: &Form) -> String {
    form.get("next")
        .map(|n| n.trim())
        .filter(|n| consilium_core::is_local_path(n) && !n.starts_with("/signin"))
        .map_or_else(|| "/".to_string(), str::to_string)
}

#[server(prefix = "/portal", endpoint = "sign-in")]
pub async fn sign_in(form: Form) -> Result<(), PortalError> {
    let form = &form;
    posted(form, |api| async move {
        let body = consilium_core::api::LocalLogin {
            email: forms::required(form, "email", "Email")?,
            password: forms::required(form, "password", "Password")?,
        };
        let (me, cookie): (MeDto, _) = api.post_for_cookie("/auth/login", &body).await?;
        pass_cookie(cookie);
        Ok(crate::api::Done::new(
            next_page(form),
            format!("Signed in as {}.", me.user.name),
        ))
    })
    .await;
    Ok(())
}

#[server(prefix = "/portal", endpoint = "sign-out")]
pub async fn sign_out(form: Form) -> Result<(), PortalError> {
    posted(&form, |api| async move {
        let cookie = api.post_empty("/auth/logout").await?;
        pass_cookie(cookie);
        Ok(crate::api::Done::new("/signin", "You are signed out."))
    })
    .await;
    Ok(())
}

#[server(prefix = "/portal", endpoint = "save-study")]
pub async fn save_study(form: Form) -> Result<(), PortalError> {
    let f = &form;
    posted(f, |api| async move { forms::save_study(&api, f).await }).await;
    Ok(())
}

#[server(prefix = "/portal", endpoint = "study-action")]
pub async fn study_action(form: Form) -> Result<(), PortalError> {
    let f = &form;
    posted(f, |api| async move { forms::study_action(&api, f).await }).await;
    Ok(())
}

#[server(prefix = "/portal", endpoint = "access-action")]
pub async fn access_action(form: Form) -> Result<(), PortalError> {
    let f = &form;
    posted(f, |api| async move { forms::access_action(&api, f).await }).await;
    Ok(())
}

#[server(prefix = "/portal", endpoint = "site-key-action")]
pub async fn site_key_action(form: Form) -> Result<(), PortalError> {
    let f = &form;
    posted(
        f,
        |api| async move { forms::site_key_action(&api, f).await },
    )
    .await;
    Ok(())
}

#[server(prefix = "/portal", endpoint = "privacy-budget")]
pub async fn privacy_budget_action(form: Form) -> Result<(), PortalError> {
    let f = &form;
    posted(f, |api| async move {
        forms::privacy_budget_action(&api, f).await
    })
    .await;
    Ok(())
}

#[server(prefix = "/portal", endpoint = "model-action")]
pub async fn model_action(form: Form) -> Result<(), PortalError> {
    let f = &form;
    posted(f, |api| async move { forms::model_action(&api, f).await }).await;
    Ok(())
}

/// The training-plan form: the manifest (JSON) and any attachments, as multipart form data.
#[server(prefix = "/portal", endpoint = "submit-plan", input = leptos::server_fn::codec::MultipartFormData)]
pub async fn submit_plan(data: leptos::server_fn::codec::MultipartData) -> Result<(), PortalError> {
    let api = Api::current()?;
    let mut form = Form::new();
    let r = forms::submit_plan(&api, data, &mut form).await;
    finish(r, &form);
    Ok(())
}

#[server(prefix = "/portal", endpoint = "auth-config")]
pub async fn auth_config() -> Result<consilium_core::api::AuthConfigDto, PortalError> {
    Api::current()?.get("/auth/config").await
}

#[server(prefix = "/portal", endpoint = "preview-action")]
pub async fn preview_action(form: Form) -> Result<(), PortalError> {
    let f = &form;
    posted(f, |api| async move { forms::preview_action(&api, f).await }).await;
    Ok(())
}
