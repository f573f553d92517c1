//! Before (or without) the browser bundle: pages are complete HTML and forms post and
//! redirect, so the portal works with no JavaScript at all; the missing bundle is named.

use consilium_backend::configuration::Settings;
use consilium_backend::demo;
use consilium_backend::startup::Application;

/// A page's HTML, as the browser gets it (its cookies, its redirects followed).
async fn html_of(browser: &reqwest::Client, url: &str) -> String {
    browser.get(url).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_forms_work_without_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.server.cookie_secure = false;
    settings.database.data_dir = dir.path().join("data");
    settings.log.level = "error".into();
    settings.portal.site_root = dir.path().join("no-bundle-here");
    let app = Application::build(settings).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let ctx = app.context.clone();
    tokio::spawn(app.run_until_stopped());
    demo::cast(&ctx, &demo::demo_scenario().unwrap())
        .await
        .unwrap();

    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .unwrap();
    let page = browser.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("<form method=\"post\" action=\"/portal/sign-in\""),
        "{html}"
    );
    assert!(
        html.contains("browser bundle is not built") && html.contains("scripts/build-portal"),
        "the missing bundle is named, with the command that builds it: {html}"
    );
    // A page that needs a signed-in person links to the sign-in, asking it to come back.
    let html = html_of(&browser, &format!("{url}/studies")).await;
    assert!(html.contains("href=\"/signin?next=%2Fstudies\""), "{html}");
    let html = html_of(&browser, &format!("{url}/signin?next=%2Fruns")).await;
    assert!(
        html.contains("name=\"form[next]\" value=\"/runs\""),
        "{html}"
    );
    // Every form carries this browser's token (see `security`); a post without it is refused.
    let token = html
        .split("name=\"form[csrf]\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the form's token")
        .to_string();

    // A wrong password comes back to the form with the reason and the email kept.
    let wrong = browser
        .post(format!("{url}/portal/sign-in"))
        .header("Accept", "text/html")
        .header("Referer", format!("{url}/signin"))
        .form(&[
            ("form[email]", "rhea@uni.example"),
            ("form[password]", "not-it"),
            ("form[csrf]", token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.url().path(), "/signin");
    assert!(
        wrong.url().query().is_none(),
        "nothing in the URL: {}",
        wrong.url()
    );
    let html = wrong.text().await.unwrap();
    assert!(
        html.contains("The email or the password is wrong."),
        "{html}"
    );
    assert!(!html.contains("Not saved"), "sign-in saves nothing: {html}");
    assert!(
        html.contains("value=\"rhea@uni.example\""),
        "the email is kept: {html}"
    );
    assert!(!html.contains("not-it"), "a password never comes back");

    // The right one signs in, and every page renders on the server.
    let home = browser
        .post(format!("{url}/portal/sign-in"))
        .header("Accept", "text/html")
        .header("Referer", format!("{url}/signin"))
        .form(&[
            ("form[email]", "rhea@uni.example"),
            ("form[password]", demo::DEMO_PASSWORD),
            ("form[csrf]", token.as_str()),
            ("form[next]", "/runs"),
        ])
        .send()
        .await
        .unwrap();
    // Back to the page that asked for the sign-in, with the status message there.
    assert_eq!(home.url().path(), "/runs");
    assert!(home.url().query().is_none(), "{}", home.url());
    let html = home.text().await.unwrap();
    assert!(html.contains("Signed in as Rhea Researcher."), "{html}");
    assert!(html.contains("<title>Runs · Consilium</title>"), "{html}");
    let home = browser.get(format!("{url}/")).send().await.unwrap();
    let html = home.text().await.unwrap();
    assert!(
        !html.contains("Signed in as"),
        "a status message is shown once: {html}"
    );
    assert!(
        html.contains("Welcome") && html.contains("Rhea Researcher"),
        "{html}"
    );
    assert!(
        !html.contains("/pkg/consilium.js"),
        "no script that would only fail"
    );
    for path in [
        "/studies",
        "/studies/new",
        "/access",
        "/runs",
        "/sites",
        "/models",
    ] {
        let r = browser.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let html = r.text().await.unwrap();
        assert!(html.contains("<h1>"), "{path}: {html}");
        assert!(
            !html.contains("role=\"alert\""),
            "{path} shows an error: {html}"
        );
    }
    // The researcher may not read the audit trail: the page says so instead of failing.
    let html = html_of(&browser, &format!("{url}/audit")).await;
    assert!(html.contains("role=\"alert\""), "{html}");
    // An unknown page is a 404 page, not a blank one.
    let r = browser
        .get(format!("{url}/no-such-page"))
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("Page not found"));
}
