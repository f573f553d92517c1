//! The security hardening, tried as an attacker would: cross-site requests, the portal's form
//! tokens, throttled sign-in and its timing, redirects, oversized uploads, security headers,
//! problem details at every edge, invisible characters and unbounded numbers, and the audit
//! of denials and credentials.

use crate::helpers::*;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A drafted study with a plan, ready to submit; returns its id.
async fn draft(app: &TestApp, w: &World) -> String {
    let sid = id_of(
        &app.post(
            "/api/v1/studies",
            &w.researcher.auth,
            study_body(w, &[w.site_a]),
        )
        .await
        .expect(201),
    );
    app.post(
        &format!("/api/v1/studies/{sid}/plans"),
        &w.researcher.auth,
        json!({"manifest": manifest(0.01)}),
    )
    .await
    .expect(201);
    sid
}

async fn status_of(app: &TestApp, w: &World, sid: &str) -> Value {
    app.get(&format!("/api/v1/studies/{sid}"), &w.researcher.auth)
        .await
        .expect(200)["status"]
        .clone()
}

fn cookie_values(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_changes_through_the_api_are_refused() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    let sid = draft(&app, &w).await;
    let session = app.sign_in(&w.researcher.email).await;
    let submit = format!("{}/api/v1/studies/{sid}/submit", app.address);
    let with_session = || {
        app.client
            .post(&submit)
            .header(COOKIE, format!("consilium_session={session}"))
    };

    // What an HTML form on another site can send: no JSON.
    for (content_type, body) in [
        ("application/x-www-form-urlencoded", ""),
        ("text/plain", "{}"),
        ("multipart/form-data; boundary=x", "--x--"),
    ] {
        let resp = with_session()
            .header(CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status().as_u16(), 415, "{content_type}");
        let p: Value = resp.json().await.expect("problem");
        assert_eq!(p["code"], "json_required");
    }
    // JSON from another origin, or a request the browser marks as cross-site.
    for (header, value) in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let resp = with_session()
            .header(header, value)
            .json(&json!({}))
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status().as_u16(), 403, "{header}: {value}");
        let p: Value = resp.json().await.expect("problem");
        assert_eq!(p["code"], "cross_site_request");
    }
    assert_eq!(status_of(&app, &w, &sid).await, "draft");

    // Sign-out by a cross-site form does not end the session.
    let logout = app
        .client
        .post(format!("{}/api/v1/auth/logout", app.address))
        .header(COOKIE, format!("consilium_session={session}"))
        .header(CONTENT_TYPE, "text/plain")
        .send()
        .await
        .expect("sent");
    assert_eq!(logout.status().as_u16(), 415);
    app.get("/api/v1/auth/me", &Auth::Cookie(session.clone()))
        .await
        .expect(200);

    // The same change from this server's own page goes through.
    let resp = with_session()
        .header("origin", app.address.clone())
        .header("sec-fetch-site", "same-origin")
        .json(&json!({}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(status_of(&app, &w, &sid).await, "submitted");

    // An API token is never attached by a browser: a program may call from anywhere.
    let resp = app
        .client
        .post(format!("{}/api/v1/studies", app.address))
        .bearer_auth(token(&w.researcher))
        .header("origin", "https://integration.example")
        .json(&study_body(&w, &[w.site_a]))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 201);
}

/// A browser of the portal: its cookies, and what it last read.
struct Browser<'a> {
    app: &'a TestApp,
    cookies: Vec<(String, String)>,
}

impl<'a> Browser<'a> {
    fn new(app: &'a TestApp) -> Self {
        Browser {
            app,
            cookies: Vec::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&mut self, resp: &reqwest::Response) {
        for c in cookie_values(resp) {
            let kv = c.split(';').next().unwrap_or_default();
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            self.cookies.retain(|(name, _)| name != k);
            if !v.is_empty() {
                self.cookies.push((k.to_string(), v.to_string()));
            }
        }
    }

    /// Loads a page; returns its HTML and the form token in it.
    async fn page(&mut self, path: &str) -> (String, String) {
        let resp = self
            .app
            .client
            .get(format!("{}{path}", self.app.address))
            .header(COOKIE, self.cookie_header())
            .header("accept", "text/html")
            .send()
            .await
            .expect("page");
        self.keep(&resp);
        let html = resp.text().await.expect("html");
        let token = html
            .split("name=\"csrf-token\" content=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_string();
        (html, token)
    }

    /// Posts a portal form (as a browser does, from `referer`).
    async fn post(
        &mut self,
        function: &str,
        fields: &[(&str, &str)],
        referer: &str,
        origin: Option<&str>,
    ) -> reqwest::Response {
        let form: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (format!("form[{k}]"), v.to_string()))
            .collect();
        let mut req = self
            .app
            .client
            .post(format!("{}/portal/{function}", self.app.address))
            .header(COOKIE, self.cookie_header())
            .header("accept", "text/html")
            .header("referer", referer)
            .form(&form);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let resp = req.send().await.expect("form post");
        self.keep(&resp);
        resp
    }

    /// Follows a form's redirect: the error comes back in a one-time flash, never in the
    /// URL; returns the page's HTML.
    async fn flashed(&mut self, resp: &reqwest::Response) -> String {
        let to = location(resp);
        assert!(!to.contains('?'), "nothing of the form in the URL: {to}");
        assert!(
            self.cookies.iter().any(|(k, _)| k == "consilium_flash"),
            "a flash cookie: {:?}",
            cookie_values(resp)
        );
        let (html, _) = self.page(&to).await;
        assert!(
            !self.cookies.iter().any(|(k, _)| k == "consilium_flash"),
            "the flash is shown once"
        );
        html
    }

    fn signed_in(&self) -> bool {
        self.cookies.iter().any(|(k, _)| k == "consilium_session")
    }
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_forms_carry_a_per_session_token() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    let sid = draft(&app, &w).await;
    let mut b = Browser::new(&app);
    let (html, pre_session) = b.page("/signin").await;
    assert_eq!(pre_session.len(), 64, "a token on the sign-in page: {html}");
    assert!(html.contains(&format!("name=\"form[csrf]\" value=\"{pre_session}\"")));
    let signin_page = format!("{}/signin", app.address);
    let credentials = [
        ("email", w.researcher.email.as_str()),
        ("password", PASSWORD),
    ];

    // Login CSRF: another site's form, with or without a token, signs nobody in.
    let resp = b
        .post(
            "sign-in",
            &credentials,
            &signin_page,
            Some("http://evil.example"),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 403);
    let resp = b.post("sign-in", &credentials, &signin_page, None).await;
    let html = b.flashed(&resp).await;
    assert!(html.contains("Reload the page"), "{html}");
    assert!(!b.signed_in());

    // With this browser's token, sign-in works; the session cookie is SameSite=Strict.
    let mut fields = credentials.to_vec();
    fields.push(("csrf", &pre_session));
    let resp = b.post("sign-in", &fields, &signin_page, None).await;
    assert_eq!(location(&resp), "/");
    assert!(
        cookie_values(&resp)
            .iter()
            .any(|c| c.starts_with("consilium_session=") && c.contains("SameSite=Strict"))
    );
    assert!(b.signed_in());

    // Signed in, the token has changed: the pre-session one, none, or a made-up one are
    // refused and nothing happens.
    let study_page = format!("{}/studies/{sid}", app.address);
    let (_, token) = b.page(&format!("/studies/{sid}")).await;
    assert_ne!(token, pre_session);
    for wrong in ["", pre_session.as_str(), &"0".repeat(64)] {
        let mut fields = vec![("study_id", sid.as_str()), ("action", "submit")];
        if !wrong.is_empty() {
            fields.push(("csrf", wrong));
        }
        let resp = b.post("study-action", &fields, &study_page, None).await;
        let html = b.flashed(&resp).await;
        assert!(html.contains("This form was not sent"), "{html}");
    }
    assert_eq!(status_of(&app, &w, &sid).await, "draft");
    let resp = b
        .post(
            "study-action",
            &[("study_id", &sid), ("action", "submit"), ("csrf", &token)],
            &study_page,
            Some(&app.address),
        )
        .await;
    assert_eq!(location(&resp), format!("/studies/{sid}"));
    assert_eq!(status_of(&app, &w, &sid).await, "submitted");

    // Redirects never leave this server, whatever the Referer says.
    for referer in [
        format!("{}//evil.example/x", app.address),
        format!("{}/\\evil.example/x", app.address),
        "http://evil.example/studies".to_string(),
    ] {
        let resp = b
            .post(
                "study-action",
                &[("study_id", &sid), ("action", "nonsense"), ("csrf", &token)],
                &referer,
                None,
            )
            .await;
        let to = location(&resp);
        assert!(to == "/" || to.starts_with("/studies"), "{referer} → {to}");
    }
    // The portal functions' own error redirect (arguments it cannot read) does not follow
    // the Referer to another host either.
    let resp = app
        .client
        .post(format!("{}/portal/study-action", app.address))
        .header(COOKIE, b.cookie_header())
        .header("accept", "text/html")
        .header("referer", "http://evil.example/phish")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body("form=%5B%5B%5B")
        .send()
        .await
        .expect("sent");
    let to = location(&resp);
    assert!(!to.contains("evil.example"), "{to}");

    // Sign-out needs the token too (a cross-site link cannot sign anyone out).
    for fields in [&[][..], &[("x", "y")][..]] {
        let resp = b.post("sign-out", fields, &study_page, None).await;
        assert!(!location(&resp).contains("evil"), "{}", location(&resp));
        assert!(b.signed_in());
    }
    let session = b
        .cookies
        .iter()
        .find(|(k, _)| k == "consilium_session")
        .map(|(_, v)| v.clone())
        .expect("session");
    app.get("/api/v1/auth/me", &Auth::Cookie(session))
        .await
        .expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_is_throttled_by_account_and_by_client() {
    let app = spawn_app_with(Db::Sqlite, |s| {
        s.auth.throttle.account_failures = 3;
        s.auth.throttle.client_failures = 6;
    })
    .await;
    let w = world(&app).await;
    // The status of a sign-in, and the problem's detail when refused.
    let login = |email: &str, password: &str, claimed: Option<&str>| {
        let mut req = app
            .client
            .post(format!("{}/api/v1/auth/login", app.address))
            .json(&json!({"email": email, "password": password}));
        if let Some(addr) = claimed {
            // The header the portal forwards the browser's address with, without its key.
            req = req
                .header("x-consilium-portal-client", addr)
                .header("x-consilium-portal-key", "guessed");
        }
        async move {
            let resp = req.send().await.expect("sent");
            let status = resp.status().as_u16();
            let retry = resp.headers().get("retry-after").is_some();
            let p: Value = resp.json().await.unwrap_or(Value::Null);
            (status, retry, p)
        }
    };
    for _ in 0..3 {
        assert_eq!(login(&w.member.email, "guess", None).await.0, 401);
    }
    // Locked now, even with the right password, for a while that grows.
    let (status, retry, p) = login(&w.member.email, PASSWORD, None).await;
    assert_eq!((status, retry), (429, true));
    assert_eq!(p["code"], "too_many_attempts");
    assert!(p["detail"].to_string().contains("for this account"), "{p}");

    // Three more failures on other accounts from the same address lock the address.
    assert_eq!(login("nobody@nowhere.test", "x", None).await.0, 401);
    for _ in 0..2 {
        assert_eq!(login(&w.auditor.email, "x", None).await.0, 401);
    }
    let (status, _, p) = login(&w.custodian_a.email, PASSWORD, None).await;
    assert_eq!(status, 429);
    assert!(p["detail"].to_string().contains("from your address"), "{p}");
    // Claiming another address does not help.
    let (status, _, _) = login(&w.custodian_a.email, PASSWORD, Some("10.9.9.9")).await;
    assert_eq!(status, 429);

    // The failures are audited, by account (unknown ones by the hash of what was typed).
    let failed = app
        .get(
            "/api/v1/audit/events?action=session.sign_in_failed&limit=1000",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let failed = failed.as_array().expect("events");
    assert!(
        failed
            .iter()
            .any(|e| e["object_id"] == json!(w.member.id.to_string()))
    );
    assert!(failed.iter().any(|e| e["object_type"] == "email"));
    assert!(
        failed
            .iter()
            .all(|e| e["actor"] == "anonymous from 127.0.0.1")
    );
    // Repeats are folded: three failures for one account, one event.
    let member_events = failed
        .iter()
        .filter(|e| e["object_id"] == json!(w.member.id.to_string()))
        .count();
    assert_eq!(member_events, 1, "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_known_accounts_answer_alike() {
    let app = spawn_app_with(Db::Sqlite, |s| {
        s.auth.throttle.account_failures = 1000;
        s.auth.throttle.client_failures = 1000;
    })
    .await;
    let w = world(&app).await;
    let time = |email: String| {
        let app = &app;
        async move {
            let start = Instant::now();
            let resp = app
                .client
                .post(format!("{}/api/v1/auth/login", app.address))
                .json(&json!({"email": email, "password": "wrong"}))
                .send()
                .await
                .expect("sent");
            assert_eq!(resp.status().as_u16(), 401);
            let p: Value = resp.json().await.expect("problem");
            assert_eq!(p["detail"], "The email or the password is wrong.");
            start.elapsed()
        }
    };
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        known.push(time(w.member.email.clone()).await);
        // One unknown account tried again, like the known one: the first failure of each is
        // audited, the repeats are folded, so both paths do the same work but the password check.
        unknown.push(time("nobody@nowhere.test".to_string()).await);
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[4].as_secs_f64(), unknown[4].as_secs_f64());
    println!("sign-in answer, median of 9: unknown account {u:.4} s, known account {k:.4} s");
    // Before the dummy check, an unknown account answered about 8 times faster.
    assert!(
        (0.5..2.0).contains(&(u / k)),
        "median unknown {u:.4} s vs known {k:.4} s"
    );
}

/// Sends the start of a request (headers and `body_start`) over a raw connection and reads the
/// answer, without ever sending the rest of the declared body.
async fn answer_before_body(app: &TestApp, head: &str, body_start: &[u8]) -> String {
    let addr = app.address.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(body_start).await.expect("body start");
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .expect("the server answers without waiting for the whole body")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_uploads_are_refused_before_they_are_read() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    let sid = draft(&app, &w).await;
    let host = app.address.trim_start_matches("http://").to_string();
    let declared = 60 * 1024 * 1024;
    let start = "--b\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\nx\r\n--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n\r\n";
    let mut body = start.as_bytes().to_vec();
    body.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let head = |cookie: &str| {
        format!(
            "POST /portal/submit-plan HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\nReferer: http://{host}/studies/{sid}\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {declared}\r\n{cookie}\r\n"
        )
    };
    // Signed out: refused at once (before: all 60 MB read, then refused).
    // What it says comes in a one-time flash, shown by the next page.
    let flashed = |answer: &str, cookies: String| {
        let token = answer
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: consilium_flash="))
            .and_then(|v| v.split(';').next())
            .unwrap_or_else(|| panic!("a flash cookie: {answer}"))
            .to_string();
        let to = answer
            .lines()
            .find_map(|l| l.strip_prefix("location: "))
            .unwrap_or_else(|| panic!("a redirect: {answer}"))
            .trim()
            .to_string();
        assert!(!to.contains('?'), "nothing in the URL: {to}");
        let client = app.client.clone();
        let url = format!("{}{to}", app.address);
        async move {
            client
                .get(url)
                .header(COOKIE, format!("consilium_flash={token}{cookies}"))
                .header("accept", "text/html")
                .send()
                .await
                .expect("page")
                .text()
                .await
                .expect("html")
        }
    };
    let answer = answer_before_body(&app, &head(""), &body).await;
    assert!(answer.starts_with("HTTP/1.1 302"), "{answer}");
    let page = flashed(&answer, String::new()).await;
    assert!(
        page.contains("sign in") || page.contains("Sign in"),
        "{page}"
    );
    // Signed in: larger than the limit, refused with the limit in words.
    let session = app.sign_in(&w.researcher.email).await;
    let answer = answer_before_body(
        &app,
        &head(&format!("Cookie: consilium_session={session}\r\n")),
        &body,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 302"), "{answer}");
    let page = flashed(&answer, format!("; consilium_session={session}")).await;
    assert!(page.contains("larger than the"), "{page}");
    // No plan was added.
    let plans = app
        .get(&format!("/api/v1/studies/{sid}/plans"), &w.researcher.auth)
        .await
        .expect(200);
    assert_eq!(plans.as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_has_the_security_headers_and_errors_are_problems() {
    let app = spawn_app(Db::Sqlite).await;
    for path in [
        "/signin",
        "/api/v1/auth/config",
        "/api/docs/",
        "/health",
        "/no-such-page",
    ] {
        let resp = app
            .client
            .get(format!("{}{path}", app.address))
            .header("accept", "text/html")
            .send()
            .await
            .expect("sent");
        let h = resp.headers();
        let get = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let csp = get("content-security-policy");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(csp.contains("object-src 'none'"), "{path}: {csp}");
        assert!(
            !csp.contains("script-src 'self' 'unsafe-inline'"),
            "{path}: {csp}"
        );
        if !path.starts_with("/api/docs") {
            assert!(csp.contains("script-src 'self' 'nonce-"), "{path}: {csp}");
            assert!(csp.contains("style-src 'self';"), "{path}: {csp}");
        }
        assert_eq!(get("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(get("x-frame-options"), "DENY", "{path}");
        assert_eq!(get("referrer-policy"), "same-origin", "{path}");
        // Secure cookies (the default) mean HTTPS: browsers are told to stay on it.
        assert!(
            get("strict-transport-security").starts_with("max-age="),
            "{path}"
        );
    }
    // A page's scripts carry this response's nonce, and no two responses share one.
    let nonce = |resp: &reqwest::Response| {
        resp.headers()
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .and_then(|c| c.split("'nonce-").nth(1))
            .and_then(|r| r.split('\'').next())
            .unwrap_or_default()
            .to_string()
    };
    let a = app
        .client
        .get(format!("{}/signin", app.address))
        .send()
        .await
        .expect("a");
    let b = app
        .client
        .get(format!("{}/signin", app.address))
        .send()
        .await
        .expect("b");
    assert_ne!(nonce(&a), nonce(&b));

    // Problem details at every edge, not only under /api/v1.
    for (method, path) in [
        (reqwest::Method::GET, "/pkg/..%2fCargo.toml"),
        (reqwest::Method::GET, "/api/docs/..%2f..%2fCargo.toml"),
        (reqwest::Method::POST, "/portal/no-such-function"),
        (reqwest::Method::POST, "/portal/study"),
    ] {
        let resp = app
            .client
            .request(method.clone(), format!("{}{path}", app.address))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("id=not-a-uuid")
            .send()
            .await
            .expect("sent");
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = resp.text().await.expect("body");
        assert!(
            (400..500).contains(&status),
            "{method} {path}: {status} {text}"
        );
        assert_eq!(ct, "application/problem+json", "{method} {path}: {text}");
        let p: Value = serde_json::from_str(&text).expect("problem");
        assert_eq!(p["status"], json!(status), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_numbers_and_dates_are_bounded() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    // Invisible formatting characters (Unicode Cf) in names: a right-to-left override makes
    // "exe.pdf" read as "fdp.exe"; a zero-width space makes two names look alike.
    for title in ["Nodules \u{202E}fdp.exe", "North\u{200B}Hospital study"] {
        let mut body = study_body(&w, &[w.site_a]);
        body["title"] = json!(title);
        let p = app
            .post("/api/v1/studies", &w.researcher.auth, body)
            .await
            .expect(422);
        assert!(
            p["errors"][0]
                .as_str()
                .unwrap_or_default()
                .contains("category Cf"),
            "{p}"
        );
    }
    let sid = draft(&app, &w).await;
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            &w.researcher.auth,
            json!({"manifest": manifest(0.01), "files": [{"name": "train\u{202E}yp.sh", "content_base64": ""}]}),
        )
        .await
        .expect(422);
    assert!(p.to_string().contains("category Cf"), "{p}");
    let mut m = manifest(0.01);
    m["rounds"] = json!(u32::MAX);
    m["local_epochs"] = json!(u32::MAX);
    m["batch_size"] = json!(u32::MAX);
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/plans"),
            &w.researcher.auth,
            json!({"manifest": m}),
        )
        .await
        .expect(422);
    let errors = p["errors"].to_string();
    for e in [
        "rounds must be between 1 and 10000",
        "local_epochs must be between 1 and 1000",
        "batch_size must be between 1 and 4096",
    ] {
        assert!(errors.contains(e), "{e}: {errors}");
    }
    // An approval for ever is not an approval.
    app.post(
        &format!("/api/v1/studies/{sid}/submit"),
        &w.researcher.auth,
        json!({}),
    )
    .await
    .expect(200);
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/reviews"),
            &w.member.auth,
            json!({"decision": "approve", "comments": "ok", "expires_at": "+10000-01-01T00:00:00Z"}),
        )
        .await;
    assert!(p.status.is_client_error(), "{}", p.text);
    let p = app
        .post(
            &format!("/api/v1/studies/{sid}/reviews"),
            &w.member.auth,
            json!({"decision": "approve", "comments": "ok", "expires_at": "2999-01-01T00:00:00Z"}),
        )
        .await
        .expect(422);
    assert!(
        p["errors"][0]
            .as_str()
            .unwrap_or_default()
            .contains("within 10 years"),
        "{p}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_and_credentials_are_in_the_audit_trail() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    let sid = draft(&app, &w).await;
    app.post(
        &format!("/api/v1/studies/{sid}/submit"),
        &w.researcher.auth,
        json!({}),
    )
    .await
    .expect(200);
    // A researcher tries to approve her own study, five times.
    for _ in 0..5 {
        app.post(
            &format!("/api/v1/studies/{sid}/reviews"),
            &w.researcher.auth,
            json!({"decision": "approve", "comments": "mine", "expires_at": in_days(30)}),
        )
        .await
        .expect(403);
    }
    // Another researcher looks for it.
    app.get(&format!("/api/v1/studies/{sid}"), &w.other_researcher.auth)
        .await
        .expect(404);
    // Somebody without credentials.
    app.get("/api/v1/audit/events", &Auth::None)
        .await
        .expect(401);

    let denied = app
        .get(
            "/api/v1/audit/events?action=studies.denied&limit=1000",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let denied = denied.as_array().expect("events");
    let by = |p: &Person| {
        denied
            .iter()
            .filter(|e| {
                e["actor"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{} via token ", p.id)))
            })
            .count()
    };
    // Five refusals in a minute are one event (the flood does not bloat the chain).
    assert_eq!(by(&w.researcher), 1, "{denied:?}");
    assert_eq!(by(&w.other_researcher), 1, "{denied:?}");
    assert!(denied.iter().all(|e| e["object_type"] == "route"));

    // The credential behind each change: a token, or a session.
    let created = app
        .get(
            "/api/v1/audit/events?action=study.created&limit=10",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let token_actor = created[0]["actor"].as_str().unwrap_or_default().to_string();
    assert!(
        token_actor.starts_with(&format!("{} via token ", w.researcher.id)),
        "{token_actor}"
    );
    let session = Auth::Cookie(app.sign_in(&w.researcher.email).await);
    app.post("/api/v1/studies", &session, study_body(&w, &[w.site_a]))
        .await
        .expect(201);
    let created = app
        .get(
            &format!(
                "/api/v1/audit/events?action=study.created&actor={}",
                w.researcher.id
            ),
            &w.auditor.auth,
        )
        .await
        .expect(200);
    let actors: Vec<&str> = created
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["actor"].as_str())
        .collect();
    assert_eq!(
        actors.len(),
        2,
        "the user id finds both credentials: {actors:?}"
    );
    assert_eq!(actors[1], format!("{} via session", w.researcher.id));
}

/// Responses are compressed as the client asks (pages, the API, the bundle), and the API's
/// answers are still never cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_as_the_client_asks() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    for encoding in ["br", "gzip"] {
        let resp = app
            .client
            .get(format!("{}/api/openapi.json", app.address))
            .header("Accept-Encoding", encoding)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()
                .get("content-encoding")
                .and_then(|v| v.to_str().ok()),
            Some(encoding),
            "{:?}",
            resp.headers()
        );
    }
    let resp = app
        .client
        .get(format!("{}/api/v1/studies", app.address))
        .bearer_auth(match &w.researcher.auth {
            Auth::Token(t) => t.clone(),
            _ => unreachable!("people have tokens"),
        })
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    // Without asking, plain.
    let resp = app
        .client
        .get(format!("{}/api/openapi.json", app.address))
        .send()
        .await
        .expect("sent");
    assert!(resp.headers().get("content-encoding").is_none());
    assert!(resp.json::<serde_json::Value>().await.is_ok());
}
