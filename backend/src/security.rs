//! What every request passes through (one middleware, `guard`):
//!
//! - **Cross-site requests refused.** A state-changing request (anything but GET, HEAD,
//!   OPTIONS) that carries no API token is refused (403) when the browser says it comes from
//!   another site (`Sec-Fetch-Site: cross-site`/`same-site`) or from another origin (`Origin`).
//!   The API's state-changing requests must also be JSON (`Content-Type: application/json`),
//!   which no HTML form can send and no other site can send without the browser asking first
//!   (CORS, which this server never grants). The portal's forms carry a per-session token too
//!   (`consilium_frontend::csrf`).
//! - **Security headers** on every response: a strict Content-Security-Policy with a fresh
//!   nonce for the portal's own scripts, `nosniff`, no framing, `Referrer-Policy`, and HSTS
//!   when the server is served over HTTPS (`server.cookie_secure`).
//! - **Redirects stay on this server**: a portal answer may only send the browser to a path
//!   of this server (never `//host`, `/\host` or another host, whatever the `Referer` says).
//! - **Errors are problem details everywhere**: 4xx answers of the bundle's files, the API
//!   documentation and the portal's functions become `application/problem+json` too.
//! - **Denials audited**: a 403, or a 404 that hides something that exists, is written to the
//!   audit trail as `<resource>.denied` with who tried (repeats folded, see `crate::throttle`).

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, web};
use base64::Engine;
use rand::RngCore;

use crate::audit;
use crate::context::AppContext;
use crate::domain::Actor;
use crate::error::{Denied, problem, problem_response};

/// The nonce of this response's Content-Security-Policy: the portal puts it on its scripts.
#[derive(Clone, Debug)]
pub struct CspNonce(pub String);

fn fresh_nonce() -> String {
    let mut buf = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// The middleware; see the module's description.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let nonce = fresh_nonce();
    req.extensions_mut().insert(CspNonce(nonce.clone()));
    let path = req.path().to_string();
    let method = req.method().clone();
    let ctx = req.app_data::<web::Data<AppContext>>().cloned();
    let hsts = ctx
        .as_ref()
        .is_some_and(|c| c.settings.server.cookie_secure);

    let mut res = match refusal(&req) {
        Some(refused) => {
            tracing::warn!(%method, %path, reason = %refused.detail, "cross-site request refused");
            req.into_response(problem_response(&refused).map_into_boxed_body())
        }
        None => next.call(req).await?.map_into_boxed_body(),
    };

    if path.starts_with("/portal/") {
        keep_redirect_here(res.headers_mut());
    }
    if res.status().is_client_error() || res.status().is_server_error() {
        res = as_problem(res, &path).await?;
    }
    if res.response().extensions().get::<Denied>().is_some()
        && let Some(ctx) = &ctx
    {
        audit_denial(ctx, &res, &method, &path).await;
    }
    set_headers(res.headers_mut(), &path, &nonce, hsts);
    no_store_for_api(res.headers_mut(), &path);
    Ok(res)
}

fn unsafe_method(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Why a state-changing request is refused before it runs, if it is.
fn refusal(req: &ServiceRequest) -> Option<consilium_core::problem::Problem> {
    if !unsafe_method(req.method()) {
        return None;
    }
    let headers = req.headers();
    // An API token is sent by a program, never attached by a browser on its own: requests
    // with one cannot be forged by another site.
    if headers.contains_key(header::AUTHORIZATION) {
        return None;
    }
    let refuse = |detail: String| {
        Some(problem(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            detail,
            Vec::new(),
        ))
    };
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && matches!(site, "cross-site" | "same-site")
    {
        return refuse(format!(
            "This request came from another site (Sec-Fetch-Site: {site}); Consilium accepts changes only from its own pages. Use the portal itself, or an API token."
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("(unreadable)");
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !same_origin(origin, host) {
            return refuse(format!(
                "This request came from {origin}, not from this server ({host}); Consilium accepts changes only from its own pages. Use the portal itself, or an API token."
            ));
        }
    }
    if req.path().starts_with("/api/") && !is_json(headers) {
        return Some(problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "json_required",
            "Changes through the API are sent as JSON: set `Content-Type: application/json` (also when there is no body; send `{}`), or send an API token.".into(),
            Vec::new(),
        ));
    }
    None
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether the `Origin` header names the server the request was sent to (its `Host`).
pub fn same_origin(origin: &str, host: &str) -> bool {
    let Ok(o) = url::Url::parse(origin) else {
        return false;
    };
    if host.is_empty() || !matches!(o.scheme(), "http" | "https") {
        return false;
    }
    match url::Url::parse(&format!("{}://{host}", o.scheme())) {
        Ok(h) => h.origin() == o.origin() && h.path() == "/",
        Err(_) => false,
    }
}

/// A path of this server for `Location`, or `/` when the target would leave it.
pub fn local_path(target: &str) -> &str {
    if consilium_core::is_local_path(target) {
        target
    } else {
        "/"
    }
}

fn keep_redirect_here(headers: &mut HeaderMap) {
    let Some(location) = headers.get(header::LOCATION) else {
        return;
    };
    let target = location.to_str().unwrap_or("/");
    let safe = local_path(target);
    if safe != target {
        tracing::warn!(
            target,
            "a redirect to another site was replaced by the home page"
        );
        headers.insert(header::LOCATION, HeaderValue::from_static("/"));
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Makes an error answer a problem detail when it is not one (and is not a page for people).
async fn as_problem(
    res: ServiceResponse<BoxBody>,
    path: &str,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let ct = content_type(res.headers());
    if ct.starts_with("application/problem+json") || ct.starts_with("text/html") {
        return Ok(res);
    }
    let server_fn = res.headers().contains_key("serverfnerror");
    let status = res.status();
    let (req, response) = res.into_parts();
    let (head, body) = response.into_parts();
    let bytes = actix_web::body::to_bytes(body)
        .await
        .unwrap_or_else(|_| actix_web::web::Bytes::new());
    let (status, code, detail, errors) = if server_fn {
        portal_problem(&bytes)
    } else {
        let code = match status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "invalid_body",
            s if s.is_server_error() => "internal_error",
            _ => "bad_request",
        };
        let detail = if status.is_server_error() {
            "The server could not complete the request. It has been logged; try again, and report it if it persists.".to_string()
        } else {
            format!(
                "The request for {path} was refused ({}): {}",
                status.canonical_reason().unwrap_or("error"),
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(300)
                    .collect::<String>()
            )
        };
        (status, code.to_string(), detail, Vec::new())
    };
    let mut out = problem_response(&problem(status, &code, detail, errors));
    for (name, value) in head.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    if let Some(d) = head.extensions().get::<Denied>() {
        out.extensions_mut().insert(*d);
    }
    Ok(ServiceResponse::new(req, out.map_into_boxed_body()))
}

/// A portal function's error (`PortalError` as JSON) as a problem: its own status when it
/// came from the API, else one that says what kind of failure it was.
fn portal_problem(body: &[u8]) -> (StatusCode, String, String, Vec<String>) {
    #[derive(serde::Deserialize)]
    struct Reported {
        status: u16,
        code: String,
        detail: String,
        #[serde(default)]
        errors: Vec<String>,
    }
    match serde_json::from_slice::<Reported>(body) {
        Ok(r) => {
            let status = match (r.status, r.code.as_str()) {
                (s, _) if (400..600).contains(&s) => {
                    StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST)
                }
                (_, "api_unreachable") => StatusCode::SERVICE_UNAVAILABLE,
                (_, "api") => StatusCode::BAD_GATEWAY,
                (_, "not_found") => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_REQUEST,
            };
            (status, r.code, r.detail, r.errors)
        }
        Err(_) => (
            StatusCode::BAD_REQUEST,
            "bad_request".into(),
            "The portal could not complete this request. Reload the page and try again.".into(),
            Vec::new(),
        ),
    }
}

async fn audit_denial(
    ctx: &AppContext,
    res: &ServiceResponse<BoxBody>,
    method: &Method,
    path: &str,
) {
    let req = res.request();
    let actor = req.extensions().get::<Actor>().map(Actor::audit_name);
    let actor = actor.unwrap_or_else(|| {
        let client = crate::auth::client_addr(ctx, req)
            .map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
        format!("anonymous from {client}")
    });
    let resource = path
        .trim_start_matches("/api/v1/")
        .split('/')
        .next()
        .unwrap_or("request")
        .replace('-', "_");
    let action = format!("{resource}.denied");
    let route = req.match_pattern().unwrap_or_else(|| path.to_string());
    let Some(folded) = ctx.audit_fold.admit(&format!("{actor} {method} {route}")) else {
        return;
    };
    let state = serde_json::json!({
        "method": method.as_str(),
        "path": path,
        "status": res.status().as_u16(),
        "folded_before": folded,
    });
    let written = async {
        let w = ctx.begin_write().await?;
        audit::append_named(
            &*w,
            &actor,
            &action,
            "route",
            format!("{method} {path}"),
            &state,
        )
        .await?;
        w.commit().await
    }
    .await;
    if let Err(e) = written {
        tracing::error!(error = ?e, %actor, %path, "could not audit a denied request");
    }
}

const API_DOCS_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn set_headers(headers: &mut HeaderMap, path: &str, nonce: &str, hsts: bool) {
    let csp = if path.starts_with("/api/docs") {
        API_DOCS_CSP.to_string()
    } else {
        format!(
            "default-src 'none'; script-src 'self' 'nonce-{nonce}' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
        )
    };
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    set("content-security-policy", &csp);
    set("x-content-type-options", "nosniff");
    set("x-frame-options", "DENY");
    set("referrer-policy", "same-origin");
    set("cross-origin-resource-policy", "same-origin");
    set(
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    );
    if hsts {
        set(
            "strict-transport-security",
            "max-age=31536000; includeSubDomains",
        );
    }
}

fn no_store_for_api(headers: &mut HeaderMap, path: &str) {
    if path.starts_with("/api/v1/") && !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert!(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(same_origin(
            "https://consilium.example",
            "consilium.example"
        ));
        assert!(same_origin(
            "https://consilium.example:443",
            "consilium.example"
        ));
        assert!(!same_origin("http://evil.example", "127.0.0.1:8080"));
        assert!(!same_origin("http://127.0.0.1:8081", "127.0.0.1:8080"));
        assert!(!same_origin("null", "127.0.0.1:8080"));
        assert!(!same_origin("http://127.0.0.1:8080", ""));
        assert!(!same_origin("http://a.example", "a.example/evil"));
    }

    #[test]
    fn redirects_stay_here() {
        assert_eq!(local_path("/studies/1?error=x"), "/studies/1?error=x");
        assert_eq!(local_path("//evil.example/x"), "/");
        assert_eq!(local_path("/\\evil.example"), "/");
        assert_eq!(local_path("https://evil.example/"), "/");
        assert_eq!(local_path("studies"), "/");
    }
}
