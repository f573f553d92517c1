//! Signing in to the portal through a real OpenID provider, in the browser.

#[path = "../common/oidc_provider.rs"]
mod oidc_provider;

use oidc_provider::{free_port, start_provider};

use crate::harness::Portal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_with_the_organisations_account() {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/api/v1/auth/oidc/callback");
    let provider = start_provider(&redirect);
    let mut p = Portal::start_with("oidc", 0, |s| {
        s.server.port = port;
        s.auth.oidc = Some(provider.settings(&redirect));
    })
    .await;

    p.goto("/").await;
    let page = p
        .wait_for("Sign in with your organisation's account", 10)
        .await;
    assert!(
        !page.contains("Password"),
        "no local accounts when OIDC is on: {page}"
    );
    p.shot("sign-in").await;
    p.press("Sign in with your organisation's account").await;
    // The provider's own login and consent pages.
    p.wait_for("Sign-in", 20).await;
    p.fill("input[name=login]", "rhea").await;
    p.fill("input[name=password]", "any password").await;
    p.shot("provider-login").await;
    p.click("button[type=submit]").await;
    p.wait_for("Continue", 20).await;
    p.click("button[type=submit]").await;
    let home = p.wait_for("What waits for you", 20).await;
    assert!(home.contains("Rhea Researcher"), "{home}");
    assert!(
        home.contains("researcher"),
        "roles from the provider's claim: {home}"
    );
    p.shot("signed-in").await;
    p.close().await;
}
