//! The portal's client of the REST API (server side only): every read and write of the portal
//! goes through `/api/v1`, with the signed-in person's session cookie, so the portal and an
//! integration leave the same audit events.

use actix_web::http::header;
use leptos::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::PortalError;

/// Where the REST API answers (the server's own address) and the HTTP client to reach it.
/// The backend provides it as context to every page render and server function.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    /// Proves to the API that the browser address this client forwards is the portal's
    /// (`consilium_backend::auth::client_addr`); never leaves this process.
    key: std::sync::Arc<str>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// The headers with which the portal forwards the browser's address to the API.
pub const CLIENT_HEADER: &str = "x-consilium-portal-client";
pub const KEY_HEADER: &str = "x-consilium-portal-key";

impl ApiClient {
    pub fn new(base: impl Into<String>, key: &str) -> Self {
        ApiClient {
            base: base.into().trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            key: key.into(),
        }
    }
}

/// The most bytes of a form upload the portal reads (the backend provides it as context).
#[derive(Clone, Copy, Debug)]
pub struct UploadLimit(pub usize);

/// The current request's declared body length, if any.
pub fn content_length() -> Option<usize> {
    let req = use_context::<leptos_actix::Request>()?.into_inner();
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The REST API as the person behind the current request.
pub struct Api {
    client: ApiClient,
    cookie: Option<String>,
    /// The browser's address (for the API's sign-in throttling and audit).
    peer: Option<String>,
}

/// The session cookie the API sets on sign-in, to hand on to the browser.
pub struct SetCookie(pub String);

impl Api {
    pub fn current() -> Result<Self, PortalError> {
        let client = use_context::<ApiClient>().ok_or_else(|| {
            PortalError::new(
                "portal",
                "The portal is not connected to the API (no ApiClient in context).",
            )
        })?;
        let req = use_context::<leptos_actix::Request>().map(|r| r.into_inner());
        let cookie = req.as_ref().and_then(|r| {
            r.headers()
                .get(header::COOKIE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        let peer = req
            .as_ref()
            .and_then(|r| r.peer_addr())
            .map(|a| a.ip().to_string());
        Ok(Api {
            client,
            cookie,
            peer,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .client
            .http
            .request(method, format!("{}/api/v1{path}", self.client.base));
        if let Some(c) = &self.cookie {
            r = r.header(header::COOKIE.as_str(), c);
        }
        if let Some(p) = &self.peer {
            r = r
                .header(CLIENT_HEADER, p)
                .header(KEY_HEADER, &*self.client.key);
        }
        r
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, PortalError> {
        let resp = self.request(reqwest::Method::GET, path).send().await;
        decode(resp).await.map(|(v, _)| v)
    }

    pub async fn text(&self, path: &str) -> Result<String, PortalError> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(problem(resp).await);
        }
        resp.text().await.map_err(unreachable)
    }

    pub async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<T, PortalError> {
        let resp = self.request(method, path).json(body).send().await;
        decode(resp).await.map(|(v, _)| v)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, PortalError> {
        self.send(reqwest::Method::POST, path, body).await
    }

    /// Posts and also returns the cookie the API set (sign-in).
    pub async fn post_for_cookie<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(T, Option<SetCookie>), PortalError> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await;
        decode(resp).await
    }

    /// A POST whose answer has no body (sign-out); returns the cookie the API set.
    pub async fn post_empty(&self, path: &str) -> Result<Option<SetCookie>, PortalError> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(&serde_json::json!({}))
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(problem(resp).await);
        }
        Ok(set_cookie(&resp))
    }
}

fn unreachable(e: reqwest::Error) -> PortalError {
    tracing::error!(error = %e, "the portal could not reach the API");
    PortalError::new(
        "api_unreachable",
        "The portal could not reach the Consilium API. Try again in a moment; if it persists, ask the administrator to check the server.",
    )
}

fn set_cookie(resp: &reqwest::Response) -> Option<SetCookie> {
    resp.headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(|v| SetCookie(v.to_string()))
}

/// An API problem's words as the portal says them: a person in the portal follows its pages,
/// so API paths (`POST /api/v1/…`) give way to the page or button that does it.
pub fn portal_words(code: &str, detail: &str) -> String {
    if code == "plan_missing" {
        return "Submit a training plan first (the form under \"Training plans\" on the study's page), then submit the study for review.".into();
    }
    let mut out = detail.replace(
        "at /api/v1/auth/oidc/login",
        "with your organisation's account (the button on the sign-in page)",
    );
    // Drop a parenthesis that names an API call, e.g. " (POST /api/v1/studies/{id}/plans)".
    while let Some(start) = out.find(" (").filter(|i| {
        out[*i..]
            .find(')')
            .is_some_and(|j| out[*i..*i + j].contains("/api/"))
    }) {
        let end = out[start..].find(')').map_or(out.len(), |j| start + j + 1);
        out.replace_range(start..end, "");
    }
    out
}

async fn problem(resp: reqwest::Response) -> PortalError {
    let status = resp.status().as_u16();
    match resp.json::<consilium_core::problem::Problem>().await {
        Ok(p) => PortalError {
            status,
            detail: portal_words(&p.code, &p.detail),
            code: p.code,
            errors: p.errors,
        },
        Err(_) => PortalError {
            status,
            code: "api".into(),
            detail: format!(
                "The API answered {status} without an explanation. Try again; if it persists, ask the administrator."
            ),
            errors: Vec::new(),
        },
    }
}

async fn decode<T: DeserializeOwned>(
    resp: Result<reqwest::Response, reqwest::Error>,
) -> Result<(T, Option<SetCookie>), PortalError> {
    let resp = resp.map_err(unreachable)?;
    if !resp.status().is_success() {
        return Err(problem(resp).await);
    }
    let cookie = set_cookie(&resp);
    let v = resp.json::<T>().await.map_err(|e| {
        tracing::error!(error = %e, "the API's answer did not decode");
        PortalError::new("api", "The API's answer could not be read by the portal. Reload the page; if it persists, ask the administrator.")
    })?;
    Ok((v, cookie))
}

/// A form post done: where to go, and what to tell the person there.
#[derive(Debug)]
pub struct Done {
    pub to: String,
    pub notice: String,
    /// Fill the form again with what was sent (a plan only checked, not submitted).
    pub keep_fields: bool,
}

impl Done {
    pub fn new(to: impl Into<String>, notice: impl Into<String>) -> Self {
        Done {
            to: to.into(),
            notice: notice.into(),
            keep_fields: false,
        }
    }

    pub fn keeping_fields(self) -> Self {
        Done {
            keep_fields: true,
            ..self
        }
    }
}

/// What was typed into a form, to fill it again (never a password).
fn kept(
    form: &std::collections::HashMap<String, String>,
) -> std::collections::HashMap<String, String> {
    form.iter()
        .filter(|(k, _)| !k.contains("password"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The end of a form post: go to `to` with its status message (success), or back to the form
/// with the error and what was typed, so that the page shows both — with or without the
/// browser bundle. Both travel in a one-time flash (`crate::flash`), never in the URL.
pub fn finish(result: Result<Done, PortalError>, form: &std::collections::HashMap<String, String>) {
    match result {
        Ok(done) => {
            crate::flash::put(crate::flash::Flash {
                notice: Some(done.notice),
                error: None,
                fields: if done.keep_fields {
                    kept(form)
                } else {
                    Default::default()
                },
            });
            leptos_actix::redirect(&done.to);
        }
        Err(e) => {
            crate::flash::put(crate::flash::Flash {
                notice: None,
                error: Some(e.message()),
                fields: kept(form),
            });
            leptos_actix::redirect(&referer_path().unwrap_or_else(|| "/".into()));
        }
    }
}

/// The path (without query) of the page the form was on: only a page of this server (the
/// `Referer`'s host must be the one the form was posted to), never `//host` or `/\host`.
fn referer_path() -> Option<String> {
    let req = use_context::<leptos_actix::Request>()?.into_inner();
    let r = req.headers().get(header::REFERER)?.to_str().ok()?;
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    let u = url::Url::parse(r).ok()?;
    let authority = match u.port() {
        Some(p) => format!("{}:{p}", u.host_str()?),
        None => u.host_str()?.to_string(),
    };
    let path = u.path();
    let local = authority.eq_ignore_ascii_case(host) && consilium_core::is_local_path(path);
    local.then(|| path.to_string())
}

/// Hands the API's session cookie on to the browser.
pub fn pass_cookie(c: Option<SetCookie>) {
    if let (Some(SetCookie(c)), Some(res)) = (c, use_context::<leptos_actix::ResponseOptions>())
        && let Ok(v) = header::HeaderValue::from_str(&c)
    {
        res.append_header(header::SET_COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::portal_words;

    #[test]
    fn the_portal_speaks_of_pages_not_api_paths() {
        for (code, detail) in [
            (
                "unauthenticated",
                "Sign in first (POST /api/v1/auth/login or /api/v1/auth/oidc/login), or send an API token as `Authorization: Bearer <token>`.",
            ),
            (
                "forbidden",
                "Local accounts are disabled on this server; sign in through your organisation at /api/v1/auth/oidc/login.",
            ),
            (
                "plan_missing",
                "Submit a training plan (POST /api/v1/studies/{id}/plans) before submitting the study for review.",
            ),
        ] {
            let said = portal_words(code, detail);
            assert!(!said.contains("/api/"), "{said}");
            assert!(!said.contains("()"), "{said}");
        }
        assert_eq!(
            portal_words("invalid", "Comments is required."),
            "Comments is required."
        );
    }
}
