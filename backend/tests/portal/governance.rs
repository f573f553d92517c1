//! The study page tells the committee what each plan version's own state is: a decision binds
//! the versions it was taken on, never one submitted after it; and a new version is compared
//! with the one the committee last reviewed, attachments included. Server-rendered HTML, as the
//! committee member's browser receives it. What she may not see (the custodians' decisions, the
//! previews) is said to be hidden from her, never shown as missing.

use base64::Engine as _;
use consilium_backend::configuration::Settings;
use consilium_backend::demo;
use consilium_backend::domain::{Actor, Via};
use consilium_backend::services::studies;
use consilium_backend::startup::Application;
use consilium_core::Role;
use consilium_core::api::{
    CreateStudy, DataScope, PlanFileUpload, ReviewDecision, StudySite, SubmitPlan, SubmitReview,
};

fn actor(u: &consilium_core::api::UserDto) -> Actor {
    Actor {
        user_id: u.id,
        roles: u.roles.iter().copied().collect(),
        token_id: None,
        site_id: None,
        via: Via::Console,
    }
}

fn files(list: &[(&str, &str)]) -> Vec<PlanFileUpload> {
    list.iter()
        .map(|(name, text)| PlanFileUpload {
            name: name.to_string(),
            content_base64: base64::engine::general_purpose::STANDARD.encode(text),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committee_sees_each_versions_own_decision_the_diff_and_what_is_hidden_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.server.cookie_secure = false;
    settings.database.data_dir = dir.path().join("data");
    settings.log.level = "error".into();
    let app = Application::build(settings).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let ctx = app.context.clone();
    tokio::spawn(app.run_until_stopped());
    let scenario = demo::demo_scenario().unwrap();
    let cast = demo::cast(&ctx, &scenario).await.unwrap();
    let researcher = actor(cast.first(Role::Researcher).unwrap());
    let member = cast.first(Role::CommitteeMember).unwrap();

    let study = studies::create_study(
        &ctx,
        &researcher,
        CreateStudy {
            title: "Per-version states".into(),
            protocol_text: "Retrospective.".into(),
            purpose: "Checking what the committee sees.".into(),
            committee_id: cast.committee.id,
            sites: cast
                .sites
                .iter()
                .map(|(s, _, _)| StudySite {
                    site_id: s.id,
                    scope: DataScope {
                        modality: "CR".into(),
                        body_part: "CHEST".into(),
                        label: "lesion".into(),
                        cases: 10,
                    },
                })
                .collect(),
        },
    )
    .await
    .unwrap();
    let submit = |manifest, attached| {
        studies::submit_plan(
            &ctx,
            &researcher,
            study.id,
            SubmitPlan {
                manifest,
                files: attached,
                keep_files: vec![],
            },
        )
    };
    let v1 = submit(
        scenario.manifest.clone(),
        files(&[("train.py", "print(1)"), ("README.txt", "notes")]),
    )
    .await
    .unwrap();
    studies::submit_study(&ctx, &researcher, study.id)
        .await
        .unwrap();
    studies::review_study(
        &ctx,
        &actor(member),
        study.id,
        SubmitReview {
            decision: ReviewDecision::RequestChanges,
            comments: "Fewer rounds, please.".into(),
            conditions: None,
            expires_at: None,
        },
    )
    .await
    .unwrap();
    let mut changed = scenario.manifest.clone();
    changed.rounds += 1;
    let v2 = submit(
        changed,
        files(&[("train.py", "print(2)"), ("LICENSE", "MIT")]),
    )
    .await
    .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    studies::submit_study(&ctx, &researcher, study.id)
        .await
        .unwrap();

    // The committee member opens the study.
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let login = browser
        .post(format!("{url}/api/v1/auth/login"))
        .json(&serde_json::json!({
            "email": member.email,
            "password": scenario.password.clone().unwrap(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let page = browser
        .get(format!("{url}/studies/{}", study.id))
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    // Version 2 (listed first) was never reviewed: it awaits the decision; the request for
    // changes stays with version 1.
    let awaiting = html
        .find("awaiting decision")
        .expect("v2 awaits the decision");
    let requested = html
        .find("changes requested")
        .expect("v1 keeps its decision");
    assert!(awaiting < requested, "v2's row comes first: {html}");
    // Once in v1's row, once in the diff's heading.
    assert_eq!(html.matches("changes requested").count(), 2, "{html}");
    assert_eq!(html.matches("awaiting decision").count(), 1, "{html}");
    // The diff is against the version the committee reviewed, attachments included.
    assert!(
        html.contains(
            "Changes since the plan the committee last reviewed (version 1, changes requested) → version 2"
        ),
        "{html}"
    );
    // What she cannot see is said to be hidden from her, never shown as missing.
    assert!(!html.contains("not requested"), "{html}");
    assert!(
        html.contains("the custodian's decision is not shown to you"),
        "{html}"
    );
    assert!(!html.contains("No previews yet"), "{html}");
    assert!(html.contains("not to you"), "{html}");
    // The review form binds the latest version by its full hash; a decision posted without the
    // confirmation is not recorded, with the reason.
    assert!(
        html.contains(&format!("version 2, SHA-256 {}", v2.hash)),
        "{html}"
    );
    let token = html
        .split("name=\"form[csrf]\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the form's token")
        .to_string();
    let page_url = format!("{url}/studies/{}", study.id);
    let study_id = study.id.to_string();
    let posted = browser
        .post(format!("{url}/portal/study-action"))
        .header("Accept", "text/html")
        .header("Referer", &page_url)
        .form(&[
            ("form[csrf]", token.as_str()),
            ("form[study_id]", study_id.as_str()),
            ("form[action]", "review"),
            ("form[decision]", "approve"),
            ("form[comments]", "Fine."),
            ("form[expires_on]", "2030-01-01"),
        ])
        .send()
        .await
        .unwrap();
    let after = posted.text().await.unwrap();
    assert!(
        after.contains("Confirm that you have read what the decision binds"),
        "{after}"
    );
    let reviews = studies::list_reviews(&ctx, &actor(member), study.id)
        .await
        .unwrap();
    assert_eq!(
        reviews.len(),
        1,
        "nothing recorded without the confirmation"
    );
    for change in ["changed train.py", "added LICENSE", "removed README.txt"] {
        assert!(html.contains(change), "{change}: {html}");
    }

    // North's custodian is asked for data under version 2, which the committee has not yet
    // decided on: the request says which version it covers, and that ethics has not approved it.
    let north = &cast.sites[0];
    consilium_backend::services::access::create_request(
        &ctx,
        &researcher,
        study.id,
        consilium_core::api::CreateAccessRequest {
            site_id: north.0.id,
            plan_hashes: None,
            justification: "Training the plan.".into(),
        },
    )
    .await
    .unwrap();
    let custodian = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let login = custodian
        .post(format!("{url}/api/v1/auth/login"))
        .json(&serde_json::json!({
            "email": north.1.email,
            "password": scenario.password.clone().unwrap(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let access = custodian
        .get(format!("{url}/access"))
        .header("Accept", "text/html")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(access.contains("plan version 2"), "{access}");
    assert!(
        access.contains("not approved by the ethics committee (no decision on it yet)"),
        "{access}"
    );
}
