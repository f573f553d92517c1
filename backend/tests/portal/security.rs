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

    // A link that fills the new-study form, opened by an administrator.
    p.sign_in("ada@consilium.example").await;
    for payload in PAYLOADS {
        p.goto(&format!(
            "/studies/new?error=x&f_protocol_text={}",
            encode(payload)
        ))
        .await;
        p.wait_for("Draft a new study", 10).await;
        holds_as_text(&p, &[("#protocol", payload)]).await;
    }
    p.shot("payload-in-protocol-is-text").await;
    p.sign_out().await;

    // Stored: the researcher's own protocol. A second site without an access request yet,
    // so that the study page offers to ask it.
    let sites = study_sites(&p, 2);
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

    // The researcher's study page: the plan form and the access request.
    p.sign_in("rhea@uni.example").await;
    let payload = PAYLOADS[0];
    p.goto(&format!(
        "/studies/{}?error=x&f_manifest={}&f_justification={}",
        study.id,
        encode(payload),
        encode(payload)
    ))
    .await;
    p.wait_for("Training plans", 10).await;
    holds_as_text(&p, &[("#manifest", payload), ("#justification", payload)]).await;

    // The stored protocol, shown again in her edit form.
    p.goto(&format!("/studies/{}/edit", study.id)).await;
    p.wait_for("Save changes", 10).await;
    holds_as_text(&p, &[("#protocol", PAYLOADS[1])]).await;
    p.sign_out().await;

    // The committee's review form.
    let other = drafted_study(&p, "Ankle fractures", 1).await;
    studies::submit_study(&p.ctx, &researcher(&p), other.id)
        .await
        .unwrap();
    p.sign_in("mira@ethics.example").await;
    p.goto(&format!(
        "/studies/{}?error=x&f_comments={}&f_conditions={}",
        other.id,
        encode(PAYLOADS[2]),
        encode(PAYLOADS[0])
    ))
    .await;
    p.wait_for("Training plans", 10).await;
    holds_as_text(
        &p,
        &[("#comments", PAYLOADS[2]), ("#conditions", PAYLOADS[0])],
    )
    .await;
    p.shot("payload-in-review-is-text").await;
    p.close().await;
}
