//! Script injection, tried as an attacker would: payloads that close a `<textarea>` in links
//! that fill the portal's forms, and stored in a study's protocol. No script runs, the text
//! stays text, and the portal still hydrates under its Content-Security-Policy.

use consilium_backend::services::studies;
use consilium_core::api::UpdateStudy;

use crate::harness::Portal;
use crate::setup::{drafted_study, researcher, study_sites};

const PAYLOADS: [&str; 3] = [
    "</textarea><img src=x onerror=\"document.title='pwned'\">",
    "</textarea><script>document.title='pwned'</script>",
    "</TEXTAREA ><svg onload=\"document.title='pwned'\"></svg>&amp; <b>bold</b>",
];

fn encode(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// The page is hydrated (its scripts ran under the CSP), nothing injected ran, and each
/// textarea holds the payload as text.
async fn holds_as_text(p: &Portal, fields: &[(&str, &str)]) {
    p.hydrated().await;
    let state = p
        .browser
        .execute(
            "return [document.title, document.querySelectorAll('img[src=\"x\"], main script, main svg[onload]').length];",
            vec![],
        )
        .await
        .expect("script");
    assert_ne!(state[0], "pwned", "an injected script ran");
    assert_eq!(state[1], 0, "injected elements in the page: {state}");
    for (css, expected) in fields {
        let value = p
            .browser
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .prop("value")
            .await
            .unwrap();
        assert_eq!(
            value.as_deref(),
            Some(*expected),
            "{css} keeps the text as typed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_typed_or_linked_runs_as_script() {
    let mut p = Portal::start("security", 0).await;
    let study = drafted_study(&p, "Wrist fractures", 1).await;

    // A link can no longer fill a form: what a failed form sent comes back in a one-time
    // flash, never from the URL.
    p.sign_in("ada@consilium.example").await;
    p.goto(&format!(
        "/studies/new?error=x&f_protocol_text={}",
        encode(PAYLOADS[0])
    ))
    .await;
    p.wait_for("Draft a new study", 10).await;
    holds_as_text(&p, &[("#protocol", "")]).await;
    let alerts = p
        .browser
        .find_all(fantoccini::Locator::Css("#form-error"))
        .await
        .unwrap();
    assert!(alerts.is_empty(), "a link shows no error of its own");
    // Typed into a form that comes back with an error, each payload stays text.
    for payload in PAYLOADS {
        p.goto("/studies/new").await;
        p.wait_for("Draft a new study", 10).await;
        p.fill("#title", "Payload").await;
        p.fill("#purpose", "Payload.").await;
        p.fill("#protocol", payload).await;
        p.choose("#committee", "Regional Ethics Committee").await;
        p.fill("#label", "fracture").await;
        p.press("Save draft").await;
        p.wait_for("Tick at least one site", 20).await;
        holds_as_text(&p, &[("#protocol", payload)]).await;
    }
    p.shot("payload-in-protocol-is-text").await;
    p.sign_out().await;

    // Stored: the researcher's own protocol.
    let sites = study_sites(&p, 1);
    studies::update_study(
        &p.ctx,
        &researcher(&p),
        study.id,
        UpdateStudy {
            title: None,
            protocol_text: Some(PAYLOADS[1].into()),
            purpose: None,
            sites: Some(sites),
        },
    )
    .await
    .unwrap();

    // The researcher's plan form: a manifest that is not JSON comes back as typed.
    p.sign_in("rhea@uni.example").await;
    p.goto(&format!("/studies/{}", study.id)).await;
    p.wait_for("Training plans", 10).await;
    p.open_plan_form().await;
    p.fill("#manifest", PAYLOADS[0]).await;
    p.press("Submit plan").await;
    p.wait_for("not valid JSON", 20).await;
    holds_as_text(&p, &[("#manifest", PAYLOADS[0])]).await;

    // The stored protocol, shown again in her edit form.
    p.goto(&format!("/studies/{}/edit", study.id)).await;
    p.wait_for("Save changes", 10).await;
    holds_as_text(&p, &[("#protocol", PAYLOADS[1])]).await;
    p.sign_out().await;

    // The committee's review form, sent without the confirmation it needs.
    let other = drafted_study(&p, "Ankle fractures", 1).await;
    studies::submit_study(&p.ctx, &researcher(&p), other.id)
        .await
        .unwrap();
    p.sign_in("mira@ethics.example").await;
    p.goto(&format!("/studies/{}", other.id)).await;
    p.wait_for("Training plans", 10).await;
    p.click("#decision-approve").await;
    p.fill("#comments", PAYLOADS[2]).await;
    p.fill("#conditions", PAYLOADS[0]).await;
    // The browser asks for the box itself; the server asks too, and that is what is tried.
    p.browser
        .execute(
            "document.querySelector('#confirm-binds').required = false;",
            vec![],
        )
        .await
        .unwrap();
    p.press("Record decision").await;
    p.wait_for("Confirm that you have read", 20).await;
    holds_as_text(
        &p,
        &[("#comments", PAYLOADS[2]), ("#conditions", PAYLOADS[0])],
    )
    .await;
    p.shot("payload-in-review-is-text").await;
    p.close().await;
}
