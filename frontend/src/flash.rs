//! What a form post says on the page it leads to: the status message after an action, or the
//! error and what was typed when it failed — carried by a one-time flash, never in the URL
//! (where it would stay in the browser's history, the server's logs and `Referer` headers).
//!
//! The post stores the flash on the server under a random token and sets the token in a
//! short-lived cookie (`consilium_flash`: HttpOnly, SameSite=Strict); the next page render
//! takes it (it is shown once) and clears the cookie. The render hands the flash to the
//! browser bundle as a shared value, so the hydrated page shows the same; it is dropped at the
//! first navigation inside the page.

use std::collections::HashMap;

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

/// One form post's message for the next page.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Flash {
    /// What was done, after a successful action.
    pub notice: Option<String>,
    /// Why the form was not sent, after a failed one.
    pub error: Option<String>,
    /// What was typed into the failed form (never a password), to fill it again.
    pub fields: HashMap<String, String>,
}

impl Flash {
    pub fn notice(text: impl Into<String>) -> Self {
        Flash {
            notice: Some(text.into()),
            ..Flash::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.notice.is_none() && self.error.is_none() && self.fields.is_empty()
    }
}

/// The flash of this page, in context (a signal: a navigation inside the page clears it).
#[derive(Clone, Copy, Debug)]
pub struct Current(pub RwSignal<Flash>);

/// Takes this render's flash (server) or reads the one the server rendered (browser), and
/// provides it as context.
pub fn provide() {
    let flash = SharedValue::new(|| {
        #[cfg(feature = "ssr")]
        {
            server::take()
        }
        #[cfg(not(feature = "ssr"))]
        {
            Flash::default()
        }
    })
    .into_inner();
    provide_context(Current(RwSignal::new(flash)));
}

/// This page's flash (empty when none).
pub fn current() -> Flash {
    use_context::<Current>()
        .map(|c| c.0.get_untracked())
        .unwrap_or_default()
}

/// Whether the failed form that led here had a field `name` (so that form is shown open).
pub fn typed_into(name: &str) -> bool {
    current().fields.contains_key(name)
}

/// Clears the flash at the first navigation inside the page: it belongs to the page the post
/// led to only. Must sit inside the router.
#[component]
pub fn ClearOnNavigation() -> impl IntoView {
    let location = leptos_router::hooks::use_location();
    let first = location.pathname.get_untracked();
    Effect::new(move |_| {
        let now = location.pathname.get();
        if now != first
            && let Some(c) = use_context::<Current>()
        {
            c.0.set(Flash::default());
        }
    });
}

#[cfg(feature = "ssr")]
pub use server::{FlashStore, put};

#[cfg(feature = "ssr")]
mod server {
    use super::Flash;
    use actix_web::cookie::{Cookie, SameSite};
    use actix_web::http::header;
    use leptos::prelude::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// The cookie that names a browser's pending flash.
    pub const COOKIE: &str = "consilium_flash";
    /// How long a flash waits for the page it leads to.
    const TTL: Duration = Duration::from_secs(300);
    /// The most flashes held at once; the oldest give way beyond it.
    const MOST: usize = 10_000;

    /// The flashes waiting to be shown, by token (in the server's memory: a flash lives for
    /// one redirect, so several portal replicas need the load balancer to keep a browser on
    /// one of them, as `docs/ARCHITECTURE.md` says).
    #[derive(Clone, Debug, Default)]
    pub struct FlashStore(Arc<Mutex<HashMap<String, (Instant, Flash)>>>);

    impl FlashStore {
        fn insert(&self, flash: Flash) -> Option<String> {
            let token = token();
            let mut map = self.0.lock().ok()?;
            let now = Instant::now();
            map.retain(|_, (at, _)| now.duration_since(*at) < TTL);
            if map.len() >= MOST
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
            map.insert(token.clone(), (now, flash));
            Some(token)
        }

        fn take(&self, token: &str) -> Option<Flash> {
            let mut map = self.0.lock().ok()?;
            let (at, flash) = map.remove(token)?;
            (at.elapsed() < TTL).then_some(flash)
        }
    }

    fn token() -> String {
        use rand::RngCore;
        let mut buf = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut buf);
        hex::encode(buf)
    }

    fn cookie(value: String, max_age: Duration) -> Cookie<'static> {
        let secure = use_context::<crate::csrf::CookieSecure>().is_some_and(|s| s.0);
        Cookie::build(COOKIE, value)
            .path("/")
            .http_only(true)
            .secure(secure)
            .same_site(SameSite::Strict)
            .max_age(actix_web::cookie::time::Duration::seconds(
                i64::try_from(max_age.as_secs()).unwrap_or(300),
            ))
            .finish()
    }

    fn set_cookie(c: Cookie<'static>) {
        if let Some(res) = use_context::<leptos_actix::ResponseOptions>()
            && let Ok(v) = header::HeaderValue::from_str(&c.to_string())
        {
            res.append_header(header::SET_COOKIE, v);
        }
    }

    /// Keeps `flash` for the browser's next page.
    pub fn put(flash: Flash) {
        if flash.is_empty() {
            return;
        }
        let Some(store) = use_context::<FlashStore>() else {
            tracing::warn!("the portal has no flash store: a form's message is not shown");
            return;
        };
        match store.insert(flash) {
            Some(token) => set_cookie(cookie(token, TTL)),
            None => tracing::error!("the flash store is poisoned: a form's message is not shown"),
        }
    }

    /// The flash the browser's cookie names, once; clears the cookie.
    pub fn take() -> Flash {
        let Some(req) = use_context::<leptos_actix::Request>() else {
            return Flash::default();
        };
        let Some(token) = req
            .into_inner()
            .cookie(COOKIE)
            .map(|c| c.value().to_string())
        else {
            return Flash::default();
        };
        set_cookie(cookie(String::new(), Duration::ZERO));
        use_context::<FlashStore>()
            .and_then(|s| s.take(&token))
            .unwrap_or_default()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_flash_is_taken_once() {
            let store = FlashStore::default();
            let token = store.insert(Flash::notice("Saved.")).unwrap();
            assert_eq!(token.len(), 64);
            assert_eq!(
                store.take(&token).unwrap().notice.as_deref(),
                Some("Saved.")
            );
            assert!(store.take(&token).is_none(), "shown once");
            assert!(store.take("guessed").is_none());
        }
    }
}
