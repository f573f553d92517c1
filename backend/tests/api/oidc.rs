//! Sign-in through a real OpenID provider (the npm package oidc-provider, started here on a
//! loopback port): the authorization code flow with PKCE, users provisioned at first
//! sign-in with roles from a claim, and ID tokens that must be refused.

use crate::helpers::*;
use crate::on_both;
use chrono::Utc;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
#[path = "../common/oidc_provider.rs"]
mod oidc_provider;
use oidc_provider::{ProviderProcess, free_port, start_provider};

async fn app_with_provider(db: Db) -> (TestApp, ProviderProcess) {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/api/v1/auth/oidc/callback");
    let provider = start_provider(&redirect);
    let app = spawn_app_with(db, |s| {
        s.server.port = port;
        s.auth.oidc = Some(provider.settings(&redirect));
    })
    .await;
    (app, provider)
}

fn attr<'a>(html: &'a str, after: &str, name: &str) -> Option<&'a str> {
    let start = html.find(after)?;
    let rest = &html[start..];
    let key = format!("{name}=\"");
    let i = rest.find(&key)? + key.len();
    let end = rest[i..].find('"')?;
    Some(&rest[i..i + end])
}

/// Walks the browser's part of the flow: our login redirect, the provider's login and
/// consent forms, back to our callback. Returns the callback's response.
async fn sign_in_through_provider(app: &TestApp, login: &str) -> reqwest::Response {
    sign_in_through_provider_from(app, login, "/api/v1/auth/oidc/login").await
}

/// As `sign_in_through_provider`, started at `start` (the login, with its query).
async fn sign_in_through_provider_from(
    app: &TestApp,
    login: &str,
    start: &str,
) -> reqwest::Response {
    let (browser, callback) = callback_url_from(app, login, start).await;
    browser.get(callback).send().await.expect("callback")
}

/// The same walk, up to the link back to our callback (not followed); returns the browser
/// (with its cookies) and that link.
async fn callback_url(app: &TestApp, login: &str) -> (reqwest::Client, url::Url) {
    callback_url_from(app, login, "/api/v1/auth/oidc/login").await
}

async fn callback_url_from(app: &TestApp, login: &str, start: &str) -> (reqwest::Client, url::Url) {
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut resp = browser
        .get(format!("{}{start}", app.address))
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status().as_u16(), 303);
    for _ in 0..20 {
        if resp.status().is_redirection() {
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .expect("location")
                .to_string();
            let next = resp.url().join(&location).expect("url");
            if next.path() == "/api/v1/auth/oidc/callback" {
                return (browser, next);
            }
            resp = browser.get(next).send().await.expect("follow");
            continue;
        }
        let base = resp.url().clone();
        let html = resp.text().await.expect("page");
        let action = attr(&html, "<form", "action")
            .unwrap_or_else(|| panic!("a form on the provider page {base}: {html}"))
            .to_string();
        let target = base.join(&action).expect("form url");
        let prompt = attr(&html, "name=\"prompt\"", "value")
            .unwrap_or_default()
            .to_string();
        let mut form: Vec<(&str, &str)> = vec![("prompt", prompt.as_str())];
        if prompt == "login" {
            form.extend([("login", login), ("password", "any password")]);
        }
        resp = browser
            .post(target)
            .form(&form)
            .send()
            .await
            .expect("form post");
    }
    panic!("the sign-in flow did not reach the callback");
}

fn session_from(resp: &reqwest::Response) -> (String, String) {
    let header = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("consilium_session="))
        .expect("a session cookie")
        .to_string();
    let value = header
        .split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_string())
        .expect("value");
    (value, header)
}

async fn sign_in_with_a_real_openid_provider(db: Db) {
    let (app, _provider) = app_with_provider(db).await;

    let config = app
        .get("/api/v1/auth/config", &Auth::None)
        .await
        .expect(200);
    assert_eq!(config, json!({"local_accounts": false, "oidc": true}));

    // Login CSRF: a callback link made in someone else's browser (their code, their state)
    // does not sign this browser in.
    let (_attacker, forged) = callback_url(&app, "mallory").await;
    let victim = app
        .client
        .get(forged)
        .send()
        .await
        .expect("forged callback");
    assert_eq!(victim.status().as_u16(), 400);
    assert!(!victim.headers().get_all("set-cookie").iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.starts_with("consilium_session="))
    }));
    let problem: serde_json::Value = victim.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("did not start in this browser"),
        "{problem}"
    );

    let callback = sign_in_through_provider(&app, "rhea").await;
    // The session cookie is SameSite=Strict, so the callback answers with a page that moves
    // on to the portal (a same-site navigation) instead of a redirect.
    assert_eq!(
        callback.status().as_u16(),
        200,
        "callback: {:?}",
        callback.headers()
    );
    let (session, header) = session_from(&callback);
    let page = callback.text().await.expect("page");
    assert!(
        page.contains("http-equiv=\"refresh\" content=\"0;url=/\""),
        "{page}"
    );
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(
            header.contains(attribute),
            "{attribute} missing from {header}"
        );
    }
    let me = app
        .get("/api/v1/auth/me", &Auth::Cookie(session.clone()))
        .await
        .expect(200);
    assert_eq!(me["user"]["email"], "rhea@uni.test");
    assert_eq!(me["user"]["name"], "Rhea Researcher");
    assert_eq!(me["user"]["roles"], json!(["researcher"]));
    assert_eq!(me["user"]["oidc_subject"], "rhea");

    // Asked from a portal page, the sign-in returns there; a `next` off this portal is refused.
    let back = sign_in_through_provider_from(
        &app,
        "rhea",
        "/api/v1/auth/oidc/login?next=%2Fstudies%3Fq%3Dx",
    )
    .await;
    let page = back.text().await.expect("page");
    assert!(
        page.contains("http-equiv=\"refresh\" content=\"0;url=/studies?q=x\""),
        "{page}"
    );
    for evil in [
        "//evil.example/x",
        "https://evil.example/",
        "/api/v1/tokens",
        "/\"><script>",
    ] {
        let refused = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client")
            .get(format!("{}/api/v1/auth/oidc/login", app.address))
            .query(&[("next", evil)])
            .send()
            .await
            .expect("login");
        assert_eq!(refused.status().as_u16(), 400, "{evil}");
    }

    // Signing in again finds the same user.
    let (again, _) = session_from(&sign_in_through_provider(&app, "rhea").await);
    let me2 = app
        .get("/api/v1/auth/me", &Auth::Cookie(again))
        .await
        .expect(200);
    assert_eq!(me2["user"]["id"], me["user"]["id"]);

    // Without a roles claim, the user has none until an administrator grants them.
    let (nora, _) = session_from(&sign_in_through_provider(&app, "nora").await);
    let nora_auth = Auth::Cookie(nora);
    assert_eq!(
        app.get("/api/v1/auth/me", &nora_auth).await.expect(200)["user"]["roles"],
        json!([])
    );
    app.post("/api/v1/sites", &nora_auth, json!({"name": "Nora's site"}))
        .await
        .expect(403);
    let admin = app
        .person(
            "admin@consilium.test",
            &[consilium_core::Role::Administrator],
        )
        .await;
    let nora_id = app.get("/api/v1/auth/me", &nora_auth).await.expect(200)["user"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    app.call(
        reqwest::Method::PUT,
        &format!("/api/v1/users/{nora_id}/roles"),
        &admin.auth,
        Some(json!({"roles": ["auditor"]})),
    )
    .await
    .expect(200);
    assert_eq!(
        app.get("/api/v1/auth/me", &nora_auth).await.expect(200)["acting_roles"],
        json!(["auditor"])
    );

    // Provisioning is audited.
    let events = app
        .get("/api/v1/audit/events?action=user.provisioned", &admin.auth)
        .await
        .expect(200);
    assert_eq!(events.as_array().map(Vec::len), Some(2));

    // Local passwords are off while OpenID Connect is configured.
    let p = app
        .post(
            "/api/v1/auth/login",
            &Auth::None,
            json!({"email": "admin@consilium.test", "password": PASSWORD}),
        )
        .await
        .expect(403);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("Local accounts are disabled")
    );

    // A callback nobody started is refused.
    let p = app
        .get(
            "/api/v1/auth/oidc/callback?code=abc&state=made-up",
            &Auth::None,
        )
        .await
        .expect(400);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown or has expired")
    );
    let p = app
        .get(
            "/api/v1/auth/oidc/callback?error=access_denied&error_description=User%20cancelled",
            &Auth::None,
        )
        .await
        .expect(401);
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("User cancelled")
    );

    // Logging out ends the session.
    let resp = app
        .client
        .post(format!("{}/api/v1/auth/logout", app.address))
        .header("Cookie", format!("consilium_session={session}"))
        .json(&json!({}))
        .send()
        .await
        .expect("logout");
    assert_eq!(resp.status().as_u16(), 204);
    app.get("/api/v1/auth/me", &Auth::Cookie(session))
        .await
        .expect(401);
}
on_both!(sign_in_with_a_real_openid_provider);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misdirected_id_tokens_are_refused() {
    let (app, provider) = app_with_provider(Db::Sqlite).await;
    let oidc = app.ctx.oidc.clone().expect("OpenID configured");
    let pem = |name: &str| std::fs::read(provider.keys.path().join(name)).expect("key file");
    let good_key = EncodingKey::from_rsa_pem(&pem("signing-key.pem")).expect("key");
    let forged_key = EncodingKey::from_rsa_pem(&pem("forged-key.pem")).expect("key");
    let now = Utc::now().timestamp();
    let claims = |iss: &str, aud: &str, exp: i64, nonce: &str| json!({"iss": iss, "aud": aud, "sub": "rhea", "iat": now, "exp": exp, "nonce": nonce, "email": "rhea@uni.test"});
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-key".into());
    let sign = |key: &EncodingKey, c: serde_json::Value| {
        jsonwebtoken::encode(&header, &c, key).expect("signed")
    };
    let iss = provider.issuer.as_str();

    // The provider's own key, right claims: accepted (so the refusals below are meaningful).
    let ok = oidc
        .validate(
            &sign(&good_key, claims(iss, "consilium", now + 300, "n1")),
            "n1",
        )
        .await
        .expect("valid token");
    assert_eq!(ok.sub, "rhea");

    let refusals = [
        (
            "forged",
            sign(&forged_key, claims(iss, "consilium", now + 300, "n1")),
            "InvalidSignature",
        ),
        (
            "expired",
            sign(&good_key, claims(iss, "consilium", now - 3600, "n1")),
            "ExpiredSignature",
        ),
        (
            "other audience",
            sign(&good_key, claims(iss, "another-app", now + 300, "n1")),
            "InvalidAudience",
        ),
        (
            "other issuer",
            sign(
                &good_key,
                claims("http://evil.test", "consilium", now + 300, "n1"),
            ),
            "InvalidIssuer",
        ),
        (
            "replayed nonce",
            sign(&good_key, claims(iss, "consilium", now + 300, "n0")),
            "nonce",
        ),
    ];
    for (what, token, reason) in refusals {
        let err = oidc
            .validate(&token, "n1")
            .await
            .expect_err(what)
            .to_string();
        assert!(err.contains(reason), "{what}: {err}");
    }
    // Payload altered after signing.
    let good = sign(&good_key, claims(iss, "consilium", now + 300, "n1"));
    let parts: Vec<&str> = good.split('.').collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let altered = b64.encode(
        claims(iss, "consilium", now + 300, "n1")
            .to_string()
            .replace("rhea", "root"),
    );
    let tampered = format!("{}.{}.{}", parts[0], altered, parts[2]);
    let err = oidc
        .validate(&tampered, "n1")
        .await
        .expect_err("tampered")
        .to_string();
    assert!(err.contains("InvalidSignature"), "{err}");
    // A symmetric algorithm (HS256 keyed with public material) is never accepted.
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(iss, "consilium", now + 300, "n1"),
        &EncodingKey::from_secret(b"k"),
    )
    .expect("hs");
    let err = oidc
        .validate(&hs, "n1")
        .await
        .expect_err("hs256")
        .to_string();
    assert!(err.contains("not accepted"), "{err}");
}
