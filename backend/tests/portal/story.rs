//! The whole governed story, in the browser, as the researcher, the committee member, the
//! custodians and the auditor.

use crate::harness::Portal;

const MANIFEST: &str = r#"{
  "model": { "architecture": "small_cnn", "num_classes": 2 },
  "preprocessing": { "image_size": 28, "normalisation": "zscore" },
  "optimiser": { "name": "adamw", "learning_rate": 0.003, "weight_decay": 0.0001 },
  "local_epochs": 2,
  "batch_size": 16,
  "rounds": 3,
  "aggregation": { "strategy": "fedavg", "min_sites": 2 },
  "seed": 42
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_from_draft_to_model_in_the_browser() {
    let mut p = Portal::start("story", 2).await;
    // The bundle comes compressed, and browsers keep it, asking again with its ETag.
    let bundle = reqwest::Client::new()
        .get(format!("{}/pkg/consilium_bg.wasm", p.url))
        .header("Accept-Encoding", "br, gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(bundle.status(), 200);
    let header = |name: &str| {
        bundle
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(header("content-encoding").as_deref(), Some("br"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    let etag = header("etag").expect("an ETag");
    let again = reqwest::Client::new()
        .get(format!("{}/pkg/consilium_bg.wasm", p.url))
        .header("If-None-Match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304, "an unchanged bundle is not sent again");
    let north = p.cast.sites[0].0.clone();
    let south = p.cast.sites[1].0.clone();

    // The researcher drafts a study for two hospitals.
    p.sign_in("rhea@uni.example").await;
    let home = p.wait_for("What waits for you", 10).await;
    assert!(home.contains("Welcome, Rhea Researcher"), "{home}");
    assert!(home.contains("Draft your first study"), "{home}");
    assert_eq!(p.text_of("#waiting-count").await, "1", "one thing to do");
    p.shot("researcher-home").await;
    p.press("Draft your first study").await;
    p.wait_for("Draft a new study", 10).await;
    p.fill("#title", "Pneumothorax detection across two hospitals")
        .await;
    p.fill(
        "#purpose",
        "Detect pneumothorax on chest radiographs without moving images.",
    )
    .await;
    p.fill(
        "#protocol",
        "Retrospective, de-identified chest radiographs.\nPrimary endpoint: AUROC per site.",
    )
    .await;
    p.choose("#committee", "Regional Ethics Committee").await;
    p.fill("#label", "lesion").await;
    p.click(&format!("#site-{}", north.id)).await;
    p.click(&format!("#site-{}", south.id)).await;
    p.fill(&format!("#cases-{}", north.id), "300").await;
    p.fill(&format!("#cases-{}", south.id), "200").await;
    p.shot("study-form").await;
    p.press("Save draft").await;
    let page = p.wait_for("Training plans", 20).await;
    assert!(
        page.contains("Pneumothorax detection across two hospitals"),
        "{page}"
    );
    assert!(page.contains("draft"), "{page}");
    assert!(
        page.contains("A run cannot start yet"),
        "the reasons show before approval: {page}"
    );
    let study_path = p.path().await;
    assert!(study_path.starts_with("/studies/"), "{study_path}");

    // …submits the training plan with its code attached.
    let code = p.ctx.settings.database.data_dir.join("train.py");
    std::fs::create_dir_all(code.parent().unwrap()).unwrap();
    std::fs::write(
        &code,
        "# the training step the committee reviews\nprint('train')\n",
    )
    .unwrap();
    p.fill("#manifest", MANIFEST).await;
    p.browser
        .find(fantoccini::Locator::Css("#files"))
        .await
        .unwrap()
        .send_keys(&code.display().to_string())
        .await
        .unwrap();
    p.press("Submit plan").await;
    let page = p.wait_for("train.py", 20).await;
    assert!(
        page.contains("not yet submitted"),
        "plan state per committee: {page}"
    );
    assert!(
        page.contains("North Hospital: not requested"),
        "plan state per site: {page}"
    );

    // …asks both hospitals for access (the form names the plan it covers) and submits the
    // study to the committee.
    assert!(
        page.contains("The request covers the latest plan: version 1, SHA-256"),
        "{page}"
    );
    p.choose("#site", "North Hospital").await;
    p.fill(
        "#justification",
        "Federated training of the submitted plan on chest radiographs.",
    )
    .await;
    p.press("Request access").await;
    p.wait_for("North Hospital: pending", 20).await;
    p.fill(
        "#justification",
        "Federated training of the submitted plan on chest radiographs.",
    )
    .await;
    p.press("Request access").await;
    p.wait_for("South Hospital: pending", 20).await;
    p.press("Submit for ethics review").await;
    let page = p.wait_for("awaiting decision", 20).await;
    assert!(page.contains("submitted"), "{page}");
    p.shot_at("study-submitted", "#plans-h").await;
    p.sign_out().await;

    // The committee member finds it in the queue and approves with conditions.
    p.sign_in("mira@ethics.example").await;
    let home = p.wait_for("What waits for you", 10).await;
    assert!(
        home.contains("Review \"Pneumothorax detection across two hospitals\": it awaits your committee's decision"),
        "{home}"
    );
    assert_eq!(p.text_of("#waiting-count").await, "1", "one review to do");
    p.shot("committee-home").await;
    p.press("Reviews").await;
    p.wait_for("Review queue", 10).await;
    // The queue's rows may come after its heading on a loaded machine.
    p.wait_for("Pneumothorax detection across two hospitals", 10)
        .await;
    p.press("Pneumothorax detection across two hospitals").await;
    p.wait_for("Your committee's decision", 10).await;
    p.click("#plan-content summary").await;
    p.wait_for("the training step the committee reviews", 10)
        .await;
    // The form says what the decision binds; nothing is decided for her.
    let form = p.text_of("#review-form").await;
    for expected in [
        "What this decision binds",
        "Protocol",
        "version 1, SHA-256 ",
        "Data at North Hospital",
        "300 cases of",
        "Secure aggregation",
        "no privacy budget",
    ] {
        assert!(form.contains(expected), "{expected:?} in {form}");
    }
    assert!(
        !form.contains("Approval expires on"),
        "expiry only with an approval: {form}"
    );
    let checked = p
        .browser
        .find_all(fantoccini::Locator::Css(
            "#review-form input[type=radio]:checked",
        ))
        .await
        .unwrap();
    assert!(checked.is_empty(), "no decision pre-selected");
    p.click("#decision-approve").await;
    p.fill("#comments", "Sound protocol; the plan matches it.")
        .await;
    p.fill("#conditions", "Report incidental findings to the sites.")
        .await;
    p.click("#confirm-binds").await;
    p.shot_at("committee-review", "#review-form").await;
    p.press("Record decision").await;
    let page = p
        .wait_for("Conditions: Report incidental findings", 20)
        .await;
    assert!(
        page.contains("approved until"),
        "plan approved by the committee: {page}"
    );
    p.shot_at("committee-approved", "#review-h").await;
    p.sign_out().await;

    // Each custodian grants access for their own site, and sees only their site's request.
    for (email, site, other) in [
        ("cara@north.example", "North Hospital", "South Hospital"),
        ("cody@south.example", "South Hospital", "North Hospital"),
    ] {
        p.sign_in(email).await;
        let home = p.wait_for("What waits for you", 10).await;
        assert!(
            home.contains("Decide 1 data-access request for your sites"),
            "{home}"
        );
        assert_eq!(
            p.text_of("#waiting-count").await,
            "1",
            "one request to decide"
        );
        p.press("Decide 1 data-access request for your sites").await;
        p.wait_for("Requests for your sites", 10).await;
        let table = p.text_of("#site-requests").await;
        assert!(table.contains(site) && !table.contains(other), "{table}");
        p.shot(&format!(
            "custodian-{}",
            site.split(' ').next().unwrap().to_lowercase()
        ))
        .await;
        p.press("Approve").await;
        p.wait_for("Revoke", 20).await;
        p.wait_for("Access is granted for this plan.", 10).await;
        let counted = p
            .browser
            .find_all(fantoccini::Locator::Css("#waiting-count"))
            .await
            .unwrap();
        assert!(counted.is_empty(), "nothing waits once decided");
        p.sign_out().await;
    }

    // The researcher starts the run and watches the rounds arrive.
    p.sign_in("rhea@uni.example").await;
    p.goto(&study_path).await;
    let page = p.wait_for("Everything a run needs is in place", 10).await;
    assert!(page.contains("North Hospital: granted until"), "{page}");
    // Before she starts, she sees that the sites' workers are there.
    let online = p.text_of("#sites-online").await;
    assert!(
        online.contains("North Hospital: online") && online.contains("South Hospital: online"),
        "{online}"
    );
    // Before she changes the approved study, she is told what that costs.
    p.click("#plan-form summary").await;
    let page = p
        .wait_for("A new plan version returns it to draft", 10)
        .await;
    assert!(page.contains("the committee must decide again"), "{page}");
    p.press("Start a run").await;
    p.wait_for("Rounds", 20).await;
    assert!(p.path().await.starts_with("/runs/"));
    p.shot("run-started").await;
    p.wait_for("Round 1", 90).await;
    let page = p.wait_for("completed", 180).await;
    assert!(page.contains("Accuracy per round"), "charts drawn: {page}");
    assert!(
        page.contains("North Hospital") && page.contains("South Hospital"),
        "{page}"
    );
    let charts = p
        .browser
        .find_all(fantoccini::Locator::Css("figure.chart svg polyline"))
        .await
        .unwrap();
    assert!(charts.len() >= 2, "a line per series");
    // Each round's table shows the model that round made, as the chart does: round 1's model
    // at North, on North's held-out split; the header says where the run ended.
    let run_id: uuid::Uuid = p
        .path()
        .await
        .trim_start_matches("/runs/")
        .parse()
        .expect("run id");
    let models = consilium_backend::services::models::list(
        &p.ctx,
        &consilium_backend::domain::Actor::system(),
        Some(run_id),
        None,
    )
    .await
    .expect("models");
    let first = models
        .iter()
        .find(|m| m.round == 1)
        .expect("round 1's model");
    let at_north = first
        .evaluation
        .as_ref()
        .and_then(|e| e.sites.iter().find(|x| x.site_id == north.id))
        .expect("evaluated at North")
        .metrics
        .clone();
    let table = p.text_of("section.round[aria-label='Round 1'] table").await;
    let row = table
        .lines()
        .find(|l| l.contains("North Hospital"))
        .unwrap_or_default()
        .to_string();
    assert!(
        row.contains(&format!("{:.3}", at_north.accuracy)),
        "round 1's model at North ({:.3}) in {row:?}",
        at_north.accuracy
    );
    if let Some(auroc) = at_north.auroc {
        assert!(row.contains(&format!("{auroc:.3}")), "AUROC shown: {row:?}");
    }
    assert!(
        table.contains("Training images") && table.contains("Held-out accuracy"),
        "{table}"
    );
    let state = p.text_of("#run-state").await;
    assert!(!state.contains("Round 0"), "{state}");
    assert!(
        state.contains("Round 3 of 3"),
        "progress against the plan: {state}"
    );
    let sites_now = p.text_of("ul.site-states").await;
    assert!(
        sites_now.contains("North Hospital") && sites_now.contains("in round 3"),
        "{sites_now}"
    );
    let chart = p.text_of("figure.chart").await;
    assert!(
        chart.contains("Round") && chart.contains("Held-out accuracy"),
        "axis titles: {chart}"
    );
    assert!(
        p.title().await.starts_with("Run of Pneumothorax"),
        "{}",
        p.title().await
    );
    p.shot("run-completed").await;
    // On a tablet and a phone: ticks stay readable, nothing scrolls the page sideways.
    for (width, height) in [(820, 1180), (390, 844)] {
        p.browser.set_window_size(width, height).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let tick = p
            .browser
            .execute(
                r#"const t = document.querySelector('figure.chart text.tick');
                   const svg = t.ownerSVGElement;
                   const scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
                   return parseFloat(getComputedStyle(t).fontSize) * scale;"#,
                vec![],
            )
            .await
            .unwrap()
            .as_f64()
            .unwrap();
        assert!(tick >= 12.0, "ticks drawn at {tick:.1} px at {width} px");
        assert_eq!(p.overflow().await, None, "the run page at {width} px");
        p.shot(&format!("run-at-{width}")).await;
    }
    p.browser.set_window_size(1280, 1000).await.unwrap();

    // The model's lineage names the approvals behind it.
    p.click("section.round a[href^='/models/']").await;
    let page = p.wait_for("Lineage", 20).await;
    for expected in [
        "Ethics approval",
        "approve",
        "Data-access grants",
        "North Hospital",
        "South Hospital",
        "Training plan",
        "Download weights",
    ] {
        assert!(page.contains(expected), "{expected:?} in {page}");
    }
    p.shot("model-lineage").await;
    p.sign_out().await;

    // The auditor sees the whole trail, its chain verified.
    p.sign_in("aldo@audit.example").await;
    p.goto("/audit").await;
    let page = p.wait_for("Chain verified", 20).await;
    for action in [
        "study.submitted",
        "review.approve",
        "access.approved",
        "run.created",
    ] {
        assert!(page.contains(action), "{action:?} in the trail: {page}");
    }
    // Names, not ids; filtered by person, the export is of the filtered view.
    assert!(page.contains("Rhea Researcher (via session)"), "{page}");
    p.choose("#actor", "Rhea Researcher").await;
    p.fill("#action", "run.created").await;
    p.press("Filter").await;
    // The filtered page replaces the whole trail: wait for its count, not for any count.
    p.wait_for("(1 on this page)", 20).await;
    let rows = p.text_of("table.audit tbody").await;
    assert!(
        rows.contains("Rhea Researcher") && rows.contains("run.created"),
        "{rows}"
    );
    let export = p
        .browser
        .find(fantoccini::Locator::Css("#export-csv"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(
        export.contains("action=run.created") && export.contains("actor="),
        "{export}"
    );
    p.click("details.event > summary").await;
    let details = p.text_of("details.event").await;
    assert!(
        details.contains("State digest") && details.contains("Previous hash"),
        "{details}"
    );
    p.shot("audit-filtered").await;
    // A page at a time: the administrator registers 60 more people, so the trail is longer
    // than one page.
    let admin = crate::setup::actor(p.cast.first(consilium_core::Role::Administrator).unwrap());
    for i in 0..60 {
        consilium_backend::services::directory::create_user(
            &p.ctx,
            &admin,
            consilium_core::api::CreateUser {
                email: format!("reader{i}@uni.example"),
                name: format!("Reader {i}"),
                roles: vec![consilium_core::Role::Researcher],
                password: None,
            },
        )
        .await
        .unwrap();
    }
    p.goto("/audit").await;
    let count = p.text_of("#audit-count").await;
    assert!(count.contains("(100 on this page)"), "{count}");
    p.hydrated().await;
    p.press("Older events").await;
    p.wait_for("Newer events", 20).await;
    let older = p.text_of("#audit-count").await;
    assert_ne!(older, count, "{older}");
    p.shot("audit").await;

    // Lists are searched and paged: 30 more drafts make the studies two pages long.
    for i in 0..30 {
        consilium_backend::services::studies::create_study(
            &p.ctx,
            &crate::setup::researcher(&p),
            consilium_core::api::CreateStudy {
                title: format!("Knee study {i:02}"),
                protocol_text: "Retrospective.".into(),
                purpose: "Paging.".into(),
                committee_id: p.cast.committee.id,
                sites: crate::setup::study_sites(&p, 1),
            },
        )
        .await
        .unwrap();
    }
    p.goto("/studies").await;
    let list = p.wait_for("page 1 of 2", 10).await;
    assert!(list.contains("31 studies · page 1 of 2"), "{list}");
    p.press("Next page").await;
    let second = p.wait_for("page 2 of 2", 10).await;
    assert!(second.contains("Previous page"), "{second}");
    p.fill("#search-studies", "pneumothorax").await;
    p.press("Search").await;
    p.wait_for("1 of 31 studies match \"pneumothorax\"", 10)
        .await;
    assert!(
        p.text_of("#study-list")
            .await
            .contains("Pneumothorax detection"),
        "the match is listed"
    );
    p.shot("studies-searched").await;

    // Every page has its own title, and none scrolls sideways on a tablet or a phone.
    let model_page = format!("/models/{}", first.id);
    let run_page = format!("/runs/{run_id}");
    let study_page = format!("/studies/{}", first.study_id);
    let edit_page = format!("/studies/{}/edit", first.study_id);
    let pages = [
        "/",
        "/studies",
        "/studies/new",
        study_page.as_str(),
        edit_page.as_str(),
        "/reviews",
        "/access",
        "/runs",
        run_page.as_str(),
        "/sites",
        "/models",
        model_page.as_str(),
        "/audit",
    ];
    let mut titles = std::collections::BTreeSet::new();
    for (width, height) in [(1280, 1000), (820, 1180), (390, 844)] {
        p.browser.set_window_size(width, height).await.unwrap();
        for path in pages {
            p.goto(path).await;
            p.wait_for("Sign out", 10).await;
            let title = p.title().await;
            assert!(title.ends_with(" · Consilium"), "{path}: {title:?}");
            titles.insert(title);
            assert_eq!(p.overflow().await, None, "{path} at {width} px");
        }
        p.goto("/studies").await;
        p.wait_for("Sign out", 10).await;
        p.shot(&format!("studies-at-{width}")).await;
    }
    assert_eq!(titles.len(), pages.len(), "a title per page: {titles:?}");
    // The focus ring stands out from the page: at least 3:1 against white.
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    use fantoccini::key::Key;
    let tab = KeyActions::new("keyboard".into())
        .then(KeyAction::Down {
            value: Key::Tab.into(),
        })
        .then(KeyAction::Up {
            value: Key::Tab.into(),
        });
    p.browser.perform_actions(tab).await.unwrap();
    let ring = p
        .browser
        .execute(
            r#"const a = document.activeElement;
               const s = getComputedStyle(a);
               return [s.outlineStyle, s.outlineWidth, s.outlineColor, a.textContent];"#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(ring[0], "solid", "{ring}");
    let colour: Vec<f64> = ring[2]
        .as_str()
        .unwrap()
        .trim_start_matches("rgb(")
        .trim_end_matches(')')
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    let lum = |c: &[f64]| {
        let lin = |v: f64| {
            let v = v / 255.0;
            if v <= 0.04045 {
                v / 12.92
            } else {
                ((v + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2])
    };
    let contrast = 1.05 / (lum(&colour) + 0.05);
    assert!(
        contrast >= 3.0,
        "focus ring {ring} has {contrast:.1}:1 against white"
    );
    p.browser.set_window_size(1280, 1000).await.unwrap();
    p.sign_out().await;

    // The researcher's own pages carry her forms (plan, previews, access, runs): they fit too.
    p.sign_in("rhea@uni.example").await;
    for (width, height) in [(820, 1180), (390, 844)] {
        p.browser.set_window_size(width, height).await.unwrap();
        for path in [
            "/",
            study_page.as_str(),
            edit_page.as_str(),
            "/access",
            run_page.as_str(),
        ] {
            p.goto(path).await;
            p.wait_for("Sign out", 10).await;
            assert_eq!(
                p.overflow().await,
                None,
                "{path} at {width} px, as the researcher"
            );
        }
        p.goto(&study_page).await;
        p.wait_for("Training plans", 10).await;
        p.shot(&format!("researcher-study-at-{width}")).await;
    }
    p.close().await;
}
