//! The portal's form tokens (against cross-site request forgery, sign-in included).
//!
//! Every portal form carries a hidden `csrf` field. Its value is an HMAC-SHA256, keyed by a
//! random per-browser cookie (`consilium_csrf`: HttpOnly, SameSite=Strict), over the session
//! cookie's value (none before sign-in). Another site can neither read the cookie nor the
//! page, so it cannot make the token; signing in or out changes the session and so the token.
//! The server renders the token into each page (`<meta name="csrf-token">` and the forms);
//! the browser bundle reads it from the meta tag for forms it renders itself.

use leptos::prelude::*;

/// The name of the hidden field in every form.
pub const FIELD: &str = "csrf";

/// The form token of the current request (server side, in context).
#[derive(Clone, Debug)]
pub struct FormToken(pub String);

/// The token a form should carry now.
pub fn current() -> String {
    #[cfg(feature = "ssr")]
    {
        use_context::<FormToken>().map(|t| t.0).unwrap_or_default()
    }
    #[cfg(not(feature = "ssr"))]
    {
        document()
            .query_selector("meta[name=csrf-token]")
            .ok()
            .flatten()
            .and_then(|m| m.get_attribute("content"))
            .unwrap_or_default()
    }
}

/// The hidden field; `plain` names it `csrf` (multipart forms) instead of `form[csrf]`.
#[component]
pub fn CsrfField(#[prop(optional)] plain: bool) -> impl IntoView {
    let name = if plain {
        FIELD.to_string()
    } else {
        crate::components::field(FIELD)
    };
    view! { <input type="hidden" name=name value=current()/> }
}

#[cfg(feature = "ssr")]
pub use server::*;

#[cfg(feature = "ssr")]
mod server {
    use super::FormToken;
    use crate::error::PortalError;
    use actix_web::HttpRequest;
    use actix_web::cookie::{Cookie, SameSite};
    use actix_web::http::header;
    use hmac::{Hmac, Mac};
    use leptos::prelude::*;
    use sha2::Sha256;

    /// The per-browser cookie keying the form tokens.
    pub const COOKIE: &str = "consilium_csrf";

    /// Whether the portal's cookies are marked `Secure` (`server.cookie_secure`), in context.
    #[derive(Clone, Copy, Debug)]
    pub struct CookieSecure(pub bool);

    fn mac(key: &str, session: &str) -> Option<Hmac<Sha256>> {
        let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).ok()?;
        m.update(b"consilium portal form\n");
        m.update(session.as_bytes());
        Some(m)
    }

    /// Computes this request's form token and provides it (with the request's cookie state)
    /// as context; sets the key cookie when the browser has none yet.
    pub fn provide(req: &HttpRequest, session_cookie: &str, secure: bool) {
        provide_context(CookieSecure(secure));
        let session = req
            .cookie(session_cookie)
            .map(|c| c.value().to_string())
            .unwrap_or_default();
        let (key, fresh) = match req.cookie(COOKIE) {
            Some(c) if c.value().len() >= 32 => (c.value().to_string(), false),
            _ => (random_key(), true),
        };
        if fresh && let Some(res) = use_context::<leptos_actix::ResponseOptions>() {
            let cookie = Cookie::build(COOKIE, key.clone())
                .path("/")
                .http_only(true)
                .secure(secure)
                .same_site(SameSite::Strict)
                .finish();
            if let Ok(v) = header::HeaderValue::from_str(&cookie.to_string()) {
                res.append_header(header::SET_COOKIE, v);
            }
        }
        let token = mac(&key, &session)
            .map(|m| hex::encode(m.finalize().into_bytes()))
            .unwrap_or_default();
        provide_context(FormToken(token));
        provide_context(Expected {
            key: (!fresh).then_some(key),
            session,
        });
    }

    /// What a posted token is checked against: the cookies that came with the post.
    #[derive(Clone, Debug)]
    struct Expected {
        key: Option<String>,
        session: String,
    }

    /// Refuses a form whose token is missing or is not this browser's and session's.
    pub fn check(posted: Option<&String>) -> Result<(), PortalError> {
        let stale = || {
            PortalError::new(
                "form_expired",
                "This form was not sent: it was shown before you signed in or out, or came from another site. Reload the page and send it again.",
            )
        };
        let expected = use_context::<Expected>().ok_or_else(stale)?;
        let key = expected.key.ok_or_else(stale)?;
        let posted = posted.ok_or_else(stale)?;
        let bytes = hex::decode(posted.trim()).map_err(|_| stale())?;
        let m = mac(&key, &expected.session).ok_or_else(stale)?;
        m.verify_slice(&bytes).map_err(|_| stale())
    }

    fn random_key() -> String {
        use rand::RngCore;
        let mut buf = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut buf);
        hex::encode(buf)
    }
}
