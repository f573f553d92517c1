//! Turning a posted form into a REST call (server side): read and check the fields, call the
//! API, say where to go next. A field the person left wrong gets an error that names it.

use chrono::{DateTime, NaiveDate, Utc};
use consilium_core::api::{
    AccessDecision, AccessRequestDto, CreateAccessRequest, CreateRun, CreateStudy, DataScope,
    DatasetPrivacyDto, DecideAccessRequest, ModelVersionDto, RegisterSiteKey, ReviewDecision,
    ReviewDto, RevokeAccess, RunDto, SetPrivacyBudget, SiteKeyDto, StopRun, StudyDto, StudySite,
    SubmitReview, UpdateStudy,
};
use uuid::Uuid;

use crate::api::{Api, Done};
use crate::error::PortalError;
use crate::server::Form;

fn invalid(detail: impl Into<String>) -> PortalError {
    PortalError::new("invalid", detail)
}

pub fn uuid(what: &str, s: &str) -> Result<Uuid, PortalError> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        PortalError::new(
            "not_found",
            format!("There is no {what} {s:?}; follow a link from the list instead."),
        )
    })
}

pub fn required(form: &Form, key: &str, label: &str) -> Result<String, PortalError> {
    match form.get(key).map(|v| v.trim()) {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(invalid(format!("{label} is required."))),
    }
}

fn optional(form: &Form, key: &str) -> Option<String> {
    form.get(key)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A date field (YYYY-MM-DD) as the end of that day, UTC.
fn date(form: &Form, key: &str, label: &str) -> Result<DateTime<Utc>, PortalError> {
    let v = required(form, key, label)?;
    let d = NaiveDate::parse_from_str(&v, "%Y-%m-%d").map_err(|_| {
        invalid(format!(
            "{label} must be a date such as 2027-06-30, not {v:?}."
        ))
    })?;
    d.and_hms_opt(23, 59, 59)
        .map(|t| t.and_utc())
        .ok_or_else(|| invalid(format!("{label} is not a valid date.")))
}

fn number(form: &Form, key: &str, label: &str) -> Result<u32, PortalError> {
    let v = required(form, key, label)?;
    v.parse::<u32>()
        .map_err(|_| invalid(format!("{label} must be a whole number, not {v:?}.")))
}

/// The sites ticked on the study form, each with the shared scope and its own case count.
fn study_sites(form: &Form) -> Result<Vec<StudySite>, PortalError> {
    let modality = required(form, "modality", "Modality")?;
    let body_part = required(form, "body_part", "Body part")?;
    let label = required(form, "label", "Label")?;
    let mut ids: Vec<&String> = form
        .keys()
        .filter(|k| k.starts_with("site_") && form.get(*k).is_some_and(|v| v == "on"))
        .collect();
    ids.sort();
    let mut sites = Vec::new();
    for k in ids {
        let id = k.trim_start_matches("site_");
        let site_id = uuid("site", id)?;
        let cases = number(form, &format!("cases_{id}"), "Cases for each ticked site")?;
        sites.push(StudySite {
            site_id,
            scope: DataScope {
                modality: modality.clone(),
                body_part: body_part.clone(),
                label: label.clone(),
                cases,
            },
        });
    }
    if sites.is_empty() {
        return Err(invalid(
            "Tick at least one site whose data the study needs.",
        ));
    }
    Ok(sites)
}

pub async fn save_study(api: &Api, form: &Form) -> Result<Done, PortalError> {
    let title = required(form, "title", "Title")?;
    let purpose = required(form, "purpose", "Purpose")?;
    let protocol_text = required(form, "protocol_text", "Protocol")?;
    let sites = study_sites(form)?;
    let s: StudyDto = match optional(form, "study_id") {
        Some(id) => {
            let id = uuid("study", &id)?;
            api.send(
                reqwest::Method::PATCH,
                &format!("/studies/{id}"),
                &UpdateStudy {
                    title: Some(title),
                    protocol_text: Some(protocol_text),
                    purpose: Some(purpose),
                    sites: Some(sites),
                },
            )
            .await?
        }
        None => {
            let committee_id = uuid(
                "committee",
                &required(form, "committee_id", "Ethics committee")?,
            )?;
            api.post(
                "/studies",
                &CreateStudy {
                    title,
                    protocol_text,
                    purpose,
                    committee_id,
                    sites,
                },
            )
            .await?
        }
    };
    let notice = if optional(form, "study_id").is_some() {
        "The study's changes are saved."
    } else {
        "The study is saved as a draft. Add a training plan, then submit it for ethics review."
    };
    Ok(Done::new(format!("/studies/{}", s.id), notice))
}

pub async fn study_action(api: &Api, form: &Form) -> Result<Done, PortalError> {
    let id = uuid("study", &required(form, "study_id", "Study")?)?;
    let back = format!("/studies/{id}");
    match required(form, "action", "Action")?.as_str() {
        "submit" => {
            let _: StudyDto = api
                .post(&format!("/studies/{id}/submit"), &serde_json::json!({}))
                .await?;
            Ok(Done::new(
                back,
                "The study is submitted: the ethics committee has been asked to review it.",
            ))
        }
        "review" => {
            if optional(form, "confirm").is_none() {
                return Err(invalid(
                    "Confirm that you have read what the decision binds (the box above the button), then record it.",
                ));
            }
            let decision = required(form, "decision", "Decision")?;
            let decision = ReviewDecision::parse(&decision)
                .ok_or_else(|| invalid("Choose approve, request changes or reject."))?;
            let expires_at = match decision {
                ReviewDecision::Approve => Some(date(form, "expires_on", "Approval expires on")?),
                _ => None,
            };
            let _: ReviewDto = api
                .post(
                    &format!("/studies/{id}/reviews"),
                    &SubmitReview {
                        decision,
                        comments: required(form, "comments", "Comments")?,
                        conditions: optional(form, "conditions"),
                        expires_at,
                    },
                )
                .await?;
            Ok(Done::new(
                back,
                match decision {
                    ReviewDecision::Approve => "Your decision is recorded: the study is approved.",
                    ReviewDecision::RequestChanges => {
                        "Your decision is recorded: the researcher is asked for changes."
                    }
                    ReviewDecision::Reject => "Your decision is recorded: the study is rejected.",
                },
            ))
        }
        "request_access" => {
            let site_id = uuid("site", &required(form, "site_id", "Site")?)?;
            let _: AccessRequestDto = api
                .post(
                    &format!("/studies/{id}/access-requests"),
                    &CreateAccessRequest {
                        site_id,
                        plan_hashes: None,
                        justification: required(form, "justification", "Justification")?,
                    },
                )
                .await?;
            Ok(Done::new(
                back,
                "The data-access request is sent to the site's custodians.",
            ))
        }
        "request_preview" => {
            let site_id = uuid("site", &required(form, "site_id", "Site")?)?;
            let per_class = match optional(form, "per_class") {
                Some(_) => Some(number(form, "per_class", "Images per class")?),
                None => None,
            };
            let _: consilium_core::api::PreviewDto = api
                .post(
                    &format!("/studies/{id}/previews"),
                    &consilium_core::api::RequestPreview {
                        site_id,
                        per_class,
                        generator: optional(form, "generator").filter(|g| g != "auto"),
                        epsilon: match optional(form, "epsilon") {
                            Some(_) => Some(decimal(form, "epsilon", "Privacy budget ε")?),
                            None => None,
                        },
                        delta: None,
                    },
                )
                .await?;
            Ok(Done::new(
                format!("{back}#previews-h"),
                "The preview is requested: the site makes it, then its custodian decides whether to release it.",
            ))
        }
        "start_run" => {
            let run: RunDto = api
                .post(
                    &format!("/studies/{id}/runs"),
                    &CreateRun { plan_hash: None },
                )
                .await?;
            Ok(Done::new(
                format!("/runs/{}", run.id),
                "The run has started: the sites are asked to train.",
            ))
        }
        "stop_run" => {
            let run = uuid("run", &required(form, "run_id", "Run")?)?;
            let _: RunDto = api
                .post(
                    &format!("/runs/{run}/stop"),
                    &StopRun {
                        reason: required(form, "reason", "Reason for stopping")?,
                    },
                )
                .await?;
            Ok(Done::new(
                format!("/runs/{run}"),
                "The run is stopped; the reason is recorded.",
            ))
        }
        other => Err(invalid(format!("Unknown action {other:?}."))),
    }
}

/// A custodian registers a public signing key for one of their sites, or revokes one.
pub async fn site_key_action(api: &Api, form: &Form) -> Result<Done, PortalError> {
    let site = uuid("site", &required(form, "site_id", "Site")?)?;
    let notice = match required(form, "action", "Action")?.as_str() {
        "register" => {
            let _: SiteKeyDto = api
                .post(
                    &format!("/sites/{site}/keys"),
                    &RegisterSiteKey {
                        public_key: required(form, "public_key", "Public key")?,
                        name: required(form, "name", "Name")?,
                    },
                )
                .await?;
            "The site's signing key is registered: its workers' messages are accepted."
        }
        "revoke" => {
            let key = required(form, "key_id", "Key")?;
            let key = url_segment(&key);
            let _: SiteKeyDto = api
                .post(
                    &format!("/sites/{site}/keys/{key}/revoke"),
                    &serde_json::json!({}),
                )
                .await?;
            "The key is revoked: messages signed with it are refused from now on."
        }
        other => return Err(invalid(format!("Unknown action {other:?}."))),
    };
    Ok(Done::new("/access#site-keys", notice))
}

/// A decimal number field (ε, δ: `8`, `0.5`, `1e-5`).
fn decimal(form: &Form, key: &str, label: &str) -> Result<f64, PortalError> {
    let v = required(form, key, label)?;
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .ok_or_else(|| {
            invalid(format!(
                "{label} must be a number such as 8 or 1e-5, not {v:?}."
            ))
        })
}

/// The custodian sets a dataset's lifetime privacy budget.
pub async fn privacy_budget_action(api: &Api, form: &Form) -> Result<Done, PortalError> {
    let site = uuid("site", &required(form, "site_id", "Site")?)?;
    let _: DatasetPrivacyDto = api
        .send(
            reqwest::Method::PUT,
            &format!("/sites/{site}/privacy/budget"),
            &SetPrivacyBudget {
                epsilon: decimal(form, "epsilon", "Lifetime ε")?,
                delta: decimal(form, "delta", "δ")?,
            },
        )
        .await?;
    Ok(Done::new(
        "/access#privacy-ledger",
        "The dataset's lifetime privacy budget is set.",
    ))
}

/// A value as one path segment: anything but letters, digits, `-`, `_`, `.` and `:` escaped.
fn url_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn access_action(api: &Api, form: &Form) -> Result<Done, PortalError> {
    let id = uuid(
        "data-access request",
        &required(form, "request_id", "Request")?,
    )?;
    let back = optional(form, "back").unwrap_or_else(|| "/access".into());
    // Only a page of this server: not `//host` or `/\host`, which browsers read as another.
    let back = if consilium_core::is_local_path(&back) {
        back
    } else {
        "/access".into()
    };
    match required(form, "action", "Action")?.as_str() {
        "approve" | "deny" => {
            let approve = form.get("action").is_some_and(|a| a == "approve");
            let current: AccessRequestDto = api.get(&format!("/access-requests/{id}")).await?;
            let scope = match optional(form, "cases") {
                Some(_) if approve => {
                    let cases = number(form, "cases", "Cases granted")?;
                    Some(DataScope {
                        cases,
                        ..current.scope
                    })
                }
                _ => None,
            };
            let _: AccessRequestDto = api
                .post(
                    &format!("/access-requests/{id}/decision"),
                    &DecideAccessRequest {
                        decision: if approve {
                            AccessDecision::Approve
                        } else {
                            AccessDecision::Deny
                        },
                        comment: optional(form, "comment"),
                        expires_at: if approve {
                            Some(date(form, "expires_on", "Access expires on")?)
                        } else {
                            None
                        },
                        scope,
                    },
                )
                .await?;
            let said = if approve {
                "Access is granted for this plan."
            } else {
                "The request is denied."
            };
            Ok(Done::new(back, said))
        }
        "revoke" => {
            let _: AccessRequestDto = api
                .post(
                    &format!("/access-requests/{id}/revoke"),
                    &RevokeAccess {
                        reason: required(form, "reason", "Reason for revoking")?,
                    },
                )
                .await?;
            Ok(Done::new(
                back,
                "Access is revoked: the site's workers refuse this study's jobs from now on.",
            ))
        }
        other => Err(invalid(format!("Unknown action {other:?}."))),
    }
}

pub async fn preview_action(api: &Api, form: &Form) -> Result<Done, PortalError> {
    let id = uuid("preview", &required(form, "preview_id", "Preview")?)?;
    let decision = match required(form, "action", "Action")?.as_str() {
        "release" => "release",
        "reject" => "reject",
        other => return Err(invalid(format!("Unknown action {other:?}."))),
    };
    let _: consilium_core::api::PreviewDto = api
        .post(
            &format!("/previews/{id}/decision"),
            &consilium_core::api::DecidePreview {
                decision: decision.into(),
                comment: required(form, "comment", "Comment")?,
            },
        )
        .await?;
    let said = if decision == "release" {
        "The preview is released to the researcher."
    } else {
        "The preview is rejected: the researcher does not see it."
    };
    Ok(Done::new("/access#previews-h", said))
}

pub async fn model_action(api: &Api, form: &Form) -> Result<Done, PortalError> {
    let id = uuid("model", &required(form, "model_id", "Model")?)?;
    match required(form, "action", "Action")?.as_str() {
        "release" => {
            let _: ModelVersionDto = api
                .post(&format!("/models/{id}/release"), &serde_json::json!({}))
                .await?;
            Ok(Done::new(
                format!("/models/{id}"),
                "The model version is released.",
            ))
        }
        other => Err(invalid(format!("Unknown action {other:?}."))),
    }
}

/// The plan form, read as it streams in: the sender must be signed in before anything is
/// read, the form's token must come before any file, and reading stops at the upload limit
/// (the API's body limit, less the base64 growth of the files), so that nobody can make the
/// server take in more than that.
pub async fn submit_plan(
    api: &Api,
    data: leptos::server_fn::codec::MultipartData,
    form: &mut Form,
) -> Result<Done, PortalError> {
    use base64::Engine;
    let limit =
        leptos::prelude::use_context::<crate::api::UploadLimit>().map_or(1024 * 1024, |l| l.0);
    // Signed in? (Before a byte of the form is read.)
    let _me: consilium_core::api::MeDto = api.get("/auth/me").await?;
    if let Some(length) = crate::api::content_length()
        && length > limit
    {
        return Err(too_large(limit));
    }
    let mut mp = data
        .into_inner()
        .ok_or_else(|| invalid("The plan form arrived without its fields."))?;
    let mut files = Vec::new();
    let mut keep_files = Vec::new();
    let mut read = 0usize;
    let mut token_checked = false;
    while let Some(mut field) = mp.next_field().await.map_err(unreadable)? {
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_string);
        if !token_checked && name != crate::csrf::FIELD {
            crate::csrf::check(None)?;
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(unreadable)? {
            read += chunk.len();
            if read > limit {
                return Err(too_large(limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        match (name.as_str(), file_name) {
            (crate::csrf::FIELD, _) => {
                crate::csrf::check(Some(&String::from_utf8_lossy(&bytes).into_owned()))?;
                token_checked = true;
            }
            ("files", Some(file_name)) if !file_name.is_empty() => {
                files.push(consilium_core::api::PlanFileUpload {
                    name: file_name,
                    content_base64: base64::engine::general_purpose::STANDARD.encode(&bytes),
                });
            }
            ("files", _) => {}
            ("keep_files", _) => keep_files.push(String::from_utf8_lossy(&bytes).into_owned()),
            _ => {
                form.insert(name, String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    if !token_checked {
        crate::csrf::check(None)?;
    }
    let id = uuid("study", &required(form, "study_id", "Study")?)?;
    let text = required(form, "manifest", "The manifest")?;
    let manifest: consilium_core::manifest::TrainingPlanManifest = serde_json::from_str(&text)
        .map_err(|e| {
            invalid(format!(
                "The manifest is not valid JSON for a training plan: {e} (line {}, column {}).",
                e.line(),
                e.column()
            ))
        })?;
    // "Check the plan": the server's verdict, nothing saved.
    if form.contains_key("check") {
        let problems = manifest.problems();
        return if problems.is_empty() {
            Ok(Done::new(
                format!("/studies/{id}"),
                "The plan was only checked, and nothing was submitted: every setting will be carried out as written. Submit it when it is ready.",
            )
            .keeping_fields())
        } else {
            Err(PortalError {
                status: 422,
                code: "invalid_input".into(),
                detail: format!(
                    "Not submitted: the plan was only checked, and it would be refused: {}",
                    problems.join("; ")
                ),
                errors: problems,
            })
        };
    }
    let _: consilium_core::api::PlanDto = api
        .post(
            &format!("/studies/{id}/plans"),
            &consilium_core::api::SubmitPlan {
                manifest,
                files,
                keep_files,
            },
        )
        .await?;
    Ok(Done::new(
        format!("/studies/{id}"),
        "The training plan is submitted as a new version.",
    ))
}

fn too_large(limit: usize) -> PortalError {
    PortalError {
        status: 413,
        code: "invalid_body".into(),
        detail: format!(
            "The plan and its files are larger than the {} KiB this server accepts; attach smaller files (or ask the administrator to raise server.body_limit_bytes).",
            limit / 1024
        ),
        errors: Vec::new(),
    }
}

fn unreadable<E: std::fmt::Display>(e: E) -> PortalError {
    invalid(format!("The form could not be read ({e}); send it again."))
}
