//! `consilium demo`: a governed study walked end to end on one machine (SQLite, local
//! development accounts), through the same services the API uses, every step audited;
//! then the server keeps running so that people can sign in and look.

use chrono::{Duration, Utc};
use consilium_core::Role;
use consilium_core::api::{
    AccessDecision, CreateAccessRequest, CreateCommittee, CreateRun, CreateSite, CreateStudy,
    CreateUser, DataScope, DecideAccessRequest, ReviewDecision, StudySite, SubmitPlan,
    SubmitReview,
};
use consilium_core::manifest::TrainingPlanManifest;
use std::path::PathBuf;

use crate::audit;
use crate::configuration::Settings;
use crate::context::AppContext;
use crate::domain::Actor;
use crate::error::AppError;
use crate::services::{access, directory, runs, studies};
use crate::startup::Application;

/// The demo's people sign in with this development-only password.
pub const DEMO_PASSWORD: &str = "consilium-demo";

pub struct DemoOptions {
    pub data_dir: PathBuf,
    pub port: u16,
    /// Stop after the walk-through instead of serving.
    pub exit: bool,
}

fn step(n: usize, text: &str) {
    println!("  {n:>2}. {text}");
}

fn fail(e: AppError) -> anyhow::Error {
    let p = e.problem();
    anyhow::anyhow!("{} {}", p.detail, p.errors.join("; "))
}

fn as_actor(u: &consilium_core::api::UserDto) -> Actor {
    Actor {
        user_id: u.id,
        roles: u.roles.iter().copied().collect(),
        token_id: None,
        site_id: None,
    }
}

pub async fn run(mut settings: Settings, opts: DemoOptions) -> anyhow::Result<i32> {
    // The demo owns its folder: it starts from an empty database every time.
    let db_file = opts.data_dir.join("consilium.db");
    if db_file.exists() {
        std::fs::remove_file(&db_file)?;
        println!(
            "Starting over: removed the previous demo database {}",
            db_file.display()
        );
    }
    settings.database.url = None;
    settings.database.data_dir = opts.data_dir.clone();
    settings.server.port = opts.port;
    settings.auth.oidc = None;
    settings.auth.local_accounts = Some(true);
    let app = Application::build(settings).await?;
    let ctx = app.context.clone();
    walk_through(&ctx).await?;
    let url = format!("http://127.0.0.1:{}", app.port());
    println!();
    println!("Sign in (development-only local accounts, password {DEMO_PASSWORD:?}):");
    for (email, role) in PEOPLE.iter().map(|(e, _, r)| (e, r)) {
        println!("  {email:<28} {role}");
    }
    println!();
    println!("API documentation: {url}/api/docs/");
    println!(
        "Sign in with:      curl -c cookies -H 'content-type: application/json' -d '{{\"email\":\"rhea@uni.example\",\"password\":\"{DEMO_PASSWORD}\"}}' {url}/api/v1/auth/login"
    );
    if opts.exit {
        return Ok(0);
    }
    println!("Serving on {url} — press Ctrl-C to stop.");
    tokio::select! {
        r = app.run_until_stopped() => r?,
        _ = tokio::signal::ctrl_c() => println!("Stopped."),
    }
    Ok(0)
}

const PEOPLE: [(&str, &str, Role); 7] = [
    ("ada@consilium.example", "Ada Admin", Role::Administrator),
    ("rhea@uni.example", "Rhea Researcher", Role::Researcher),
    ("mira@ethics.example", "Mira Member", Role::CommitteeMember),
    (
        "cara@north.example",
        "Cara Custodian (North)",
        Role::Custodian,
    ),
    (
        "cody@south.example",
        "Cody Custodian (South)",
        Role::Custodian,
    ),
    (
        "cleo@east.example",
        "Cleo Custodian (East)",
        Role::Custodian,
    ),
    ("aldo@audit.example", "Aldo Auditor", Role::Auditor),
];

async fn walk_through(ctx: &AppContext) -> anyhow::Result<()> {
    let system = Actor::system();
    println!("A governed study, step by step:");
    let mut people = Vec::new();
    for (email, name, role) in PEOPLE {
        let u = directory::create_user(
            ctx,
            &system,
            CreateUser {
                email: email.into(),
                name: name.into(),
                roles: vec![role],
                password: Some(DEMO_PASSWORD.into()),
            },
        )
        .await
        .map_err(fail)?;
        people.push(u);
    }
    let [admin, researcher, member, north, south, east, _auditor] = &people[..] else {
        anyhow::bail!("the demo cast is incomplete");
    };
    step(1, "The administrator registered 7 people with their roles.");
    let admin = as_actor(admin);
    let committee = directory::create_committee(
        ctx,
        &admin,
        CreateCommittee {
            name: "Regional Ethics Committee".into(),
            members: vec![member.id],
        },
    )
    .await
    .map_err(fail)?;
    let mut sites = Vec::new();
    for (name, custodian) in [
        ("North Hospital", north),
        ("South Hospital", south),
        ("East Clinic", east),
    ] {
        sites.push(
            directory::create_site(
                ctx,
                &admin,
                CreateSite {
                    name: name.into(),
                    custodians: vec![custodian.id],
                },
            )
            .await
            .map_err(fail)?,
        );
    }
    step(
        2,
        "…an ethics committee and three hospitals, each with its data custodian.",
    );

    let r = as_actor(researcher);
    let scope = |cases| DataScope {
        modality: "CR".into(),
        body_part: "CHEST".into(),
        label: "lesion".into(),
        cases,
    };
    let study = studies::create_study(
        ctx,
        &r,
        CreateStudy {
            title: "Lesion detection on chest radiographs".into(),
            protocol_text: "Retrospective study on de-identified chest radiographs.\nPrimary endpoint: AUROC on each site's held-out data.".into(),
            purpose: "Train a lesion classifier across three hospitals without moving images.".into(),
            committee_id: committee.id,
            sites: sites.iter().zip([400, 250, 120]).map(|(s, n)| StudySite { site_id: s.id, scope: scope(n) }).collect(),
        },
    )
    .await
    .map_err(fail)?;
    step(
        3,
        &format!("The researcher drafted the study {:?}.", study.title),
    );
    let manifest: TrainingPlanManifest = serde_json::from_value(serde_json::json!({
        "model": {"architecture": "small_cnn", "num_classes": 2},
        "preprocessing": {"image_size": 28, "normalisation": "zscore"},
        "optimiser": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        "local_epochs": 1, "batch_size": 32, "rounds": 5,
        "aggregation": {"strategy": "fedavg", "min_sites": 2},
        "stopping": {"target_metric": "accuracy", "target_value": 0.95, "patience": 3},
        "seed": 42
    }))?;
    let plan = studies::submit_plan(
        ctx,
        &r,
        study.id,
        SubmitPlan {
            manifest,
            files: vec![],
        },
    )
    .await
    .map_err(fail)?;
    step(
        4,
        &format!(
            "…submitted its training plan, version {} with hash {}.",
            plan.version,
            &plan.hash[..16]
        ),
    );
    let before = runs::report(ctx, &r, study.id, None).await.map_err(fail)?;
    step(
        5,
        &format!(
            "Preflight before any approval: {} unmet condition(s), e.g. {:?}",
            before.unmet.len(),
            before.unmet.first().cloned().unwrap_or_default()
        ),
    );
    studies::submit_study(ctx, &r, study.id)
        .await
        .map_err(fail)?;
    let review = studies::review_study(
        ctx,
        &as_actor(member),
        study.id,
        SubmitReview {
            decision: ReviewDecision::Approve,
            comments: "The protocol and the training plan are sound.".into(),
            conditions: Some("Report any incidental findings to the sites.".into()),
            expires_at: Some(Utc::now() + Duration::days(365)),
        },
    )
    .await
    .map_err(fail)?;
    step(
        6,
        &format!(
            "The committee approved protocol v{} and plan {} for a year.",
            review.protocol_version,
            &plan.hash[..16]
        ),
    );
    for (site, custodian) in sites.iter().zip([north, south, east]) {
        let req = access::create_request(
            ctx,
            &r,
            study.id,
            CreateAccessRequest {
                site_id: site.id,
                plan_hashes: None,
                justification: "Federated training of the approved plan.".into(),
            },
        )
        .await
        .map_err(fail)?;
        access::decide(
            ctx,
            &as_actor(custodian),
            req.id,
            DecideAccessRequest {
                decision: AccessDecision::Approve,
                comment: Some("Approved for the plan named.".into()),
                expires_at: Some(Utc::now() + Duration::days(180)),
                scope: None,
            },
        )
        .await
        .map_err(fail)?;
    }
    step(
        7,
        "Each custodian granted data access for that plan hash on their site.",
    );
    let after = runs::report(ctx, &r, study.id, None).await.map_err(fail)?;
    step(8, &format!("Preflight now: ready = {}.", after.ready));
    let run = runs::create_run(ctx, &r, study.id, CreateRun { plan_hash: None })
        .await
        .map_err(fail)?;
    step(
        9,
        &format!(
            "The run {} was created under review {} and {} grants.",
            run.id,
            run.review_id,
            run.grant_ids.len()
        ),
    );
    let verified = audit::verify(&ctx.db).await.map_err(fail)?;
    step(
        10,
        &format!(
            "The audit trail holds {} hash-chained events; verification: {}.",
            verified.events_checked,
            if verified.ok { "intact" } else { "BROKEN" }
        ),
    );
    Ok(())
}
