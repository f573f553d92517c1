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
use consilium_core::api::{AuditVerification, ModelVersionDto, RoundDto, RunDto};
use consilium_core::manifest::TrainingPlanManifest;
use consilium_worker::broker::SharedBroker;
use consilium_worker::data::{DataKind, DatasetSpec, LabelKey};
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
    let missing: Vec<&String> = p
        .errors
        .iter()
        .filter(|x| !p.detail.contains(x.as_str()))
        .collect();
    if missing.is_empty() {
        anyhow::anyhow!("{}", p.detail)
    } else {
        anyhow::anyhow!(
            "{} {}",
            p.detail,
            missing
                .iter()
                .map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )
    }
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
    settings.engine.broker_url = None;
    settings.engine.round_timeout_seconds = settings.engine.round_timeout_seconds.min(180);
    let app = Application::build(settings).await?;
    let ctx = app.context.clone();
    let broker = app.broker.clone();
    let url = format!("http://127.0.0.1:{}", app.port());
    // The API must answer while the demo runs: the site workers ask it for their grants.
    let server = tokio::spawn(app.run_until_stopped());
    let walked = walk_through(&ctx, demo_scenario()?).await?;
    train(&ctx, &broker, &url, &opts.data_dir, &walked).await?;
    println!();
    println!("The portal:        {url}/");
    println!("Sign in (development-only local accounts, password {DEMO_PASSWORD:?}):");
    for (email, role) in PEOPLE.iter().map(|(e, _, r)| (e, r)) {
        println!("  {email:<28} {role}");
    }
    println!();
    println!("API documentation: {url}/api/docs/");
    println!(
        "From a script:     curl -c cookies -H 'content-type: application/json' -d '{{\"email\":\"rhea@uni.example\",\"password\":\"{DEMO_PASSWORD}\"}}' {url}/api/v1/auth/login"
    );
    if opts.exit {
        server.abort();
        return Ok(0);
    }
    println!("Serving on {url} — press Ctrl-C to stop.");
    tokio::select! {
        r = server => { r??; }
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

/// Who takes part in a governed study and what it trains: the demo's story, or a simulation.
pub struct Scenario {
    /// (email, name, role): at least an administrator, a researcher, a committee member and
    /// each site's custodian.
    pub people: Vec<(String, String, Role)>,
    /// (site name, its custodian's email, cases in the data scope).
    pub sites: Vec<(String, String, u32)>,
    pub title: String,
    pub purpose: String,
    pub manifest: TrainingPlanManifest,
    /// Development-only local password for everyone (the demo's people sign in).
    pub password: Option<String>,
    /// Print each step.
    pub narrate: bool,
}

pub fn demo_scenario() -> anyhow::Result<Scenario> {
    Ok(Scenario {
        people: PEOPLE
            .iter()
            .map(|(e, n, r)| (e.to_string(), n.to_string(), *r))
            .collect(),
        sites: vec![
            ("North Hospital".into(), "cara@north.example".into(), 400),
            ("South Hospital".into(), "cody@south.example".into(), 250),
            ("East Clinic".into(), "cleo@east.example".into(), 120),
        ],
        title: "Lesion detection on chest radiographs".into(),
        purpose: "Train a lesion classifier across three hospitals without moving images.".into(),
        manifest: serde_json::from_value(serde_json::json!({
            "model": {"architecture": "small_cnn", "num_classes": 2},
            "preprocessing": {"image_size": 28, "normalisation": "zscore"},
            "optimiser": {"name": "adamw", "learning_rate": 0.003, "weight_decay": 0.0001},
            "local_epochs": 2, "batch_size": 16, "rounds": 5,
            "aggregation": {"strategy": "fedavg", "min_sites": 2},
            "stopping": {"target_metric": "accuracy", "target_value": 0.95, "patience": 3},
            "seed": 42
        }))?,
        password: Some(DEMO_PASSWORD.into()),
        narrate: true,
    })
}

/// The people, the ethics committee and the sites of a scenario (the administrator's part),
/// created through the services the API uses.
pub struct Cast {
    pub people: Vec<consilium_core::api::UserDto>,
    pub committee: consilium_core::api::CommitteeDto,
    /// Each site with its custodian and the cases the study asks of it.
    pub sites: Vec<(
        consilium_core::api::SiteDto,
        consilium_core::api::UserDto,
        u32,
    )>,
}

impl Cast {
    pub fn first(&self, role: Role) -> anyhow::Result<&consilium_core::api::UserDto> {
        self.people
            .iter()
            .find(|u| u.roles.contains(&role))
            .ok_or_else(|| anyhow::anyhow!("the cast has no {}", role.as_str()))
    }
}

pub async fn cast(ctx: &AppContext, sc: &Scenario) -> anyhow::Result<Cast> {
    let system = Actor::system();
    let mut people = Vec::new();
    for (email, name, role) in &sc.people {
        let u = directory::create_user(
            ctx,
            &system,
            CreateUser {
                email: email.clone(),
                name: name.clone(),
                roles: vec![*role],
                password: sc.password.clone(),
            },
        )
        .await
        .map_err(fail)?;
        people.push(u);
    }
    let first = |role: Role| {
        people
            .iter()
            .find(|u| u.roles.contains(&role))
            .ok_or_else(|| anyhow::anyhow!("the cast has no {}", role.as_str()))
    };
    let by_email = |email: &str| {
        people
            .iter()
            .find(|u| u.email == email)
            .ok_or_else(|| anyhow::anyhow!("the cast has nobody with the email {email}"))
    };
    let (admin, member) = (
        as_actor(first(Role::Administrator)?),
        first(Role::CommitteeMember)?,
    );
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
    for (name, custodian, cases) in &sc.sites {
        let custodian = by_email(custodian)?;
        let site = directory::create_site(
            ctx,
            &admin,
            CreateSite {
                name: name.clone(),
                custodians: vec![custodian.id],
            },
        )
        .await
        .map_err(fail)?;
        sites.push((site, custodian.clone(), *cases));
    }

    Ok(Cast {
        people,
        committee,
        sites,
    })
}

/// Walks the governance of `sc` through the services the API uses, every step audited:
/// people, committee, sites, study, plan, review, data-access grants.
pub async fn walk_through(ctx: &AppContext, sc: Scenario) -> anyhow::Result<Walked> {
    let step = |n: usize, text: &str| {
        if sc.narrate {
            step(n, text)
        }
    };
    if sc.narrate {
        println!("A governed study, step by step:");
    }
    let Cast {
        people,
        committee,
        sites,
    } = cast(ctx, &sc).await?;
    let researcher = people
        .iter()
        .find(|u| u.roles.contains(&Role::Researcher))
        .ok_or_else(|| anyhow::anyhow!("the cast has no researcher"))?;
    let member = people
        .iter()
        .find(|u| u.roles.contains(&Role::CommitteeMember))
        .ok_or_else(|| anyhow::anyhow!("the cast has no committee member"))?;
    step(
        1,
        &format!(
            "The administrator registered {} people with their roles.",
            people.len()
        ),
    );
    step(
        2,
        &format!(
            "…an ethics committee and {} sites, each with its data custodian.",
            sites.len()
        ),
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
            title: sc.title.clone(),
            protocol_text: "Retrospective study on de-identified images.\nPrimary endpoint: AUROC on each site's held-out data.".into(),
            purpose: sc.purpose.clone(),
            committee_id: committee.id,
            sites: sites
                .iter()
                .map(|(s, _, cases)| StudySite { site_id: s.id, scope: scope(*cases) })
                .collect(),
        },
    )
    .await
    .map_err(fail)?;
    step(
        3,
        &format!("The researcher drafted the study {:?}.", study.title),
    );
    let plan = studies::submit_plan(
        ctx,
        &r,
        study.id,
        SubmitPlan {
            manifest: sc.manifest,
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
    for (site, custodian, _) in &sites {
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
    Ok(Walked {
        study: study.id,
        plan_hash: plan.hash,
        researcher: r,
        sites: sites
            .iter()
            .map(|(s, _, _)| (s.id, s.name.clone()))
            .collect(),
    })
}

pub struct Walked {
    pub study: uuid::Uuid,
    pub plan_hash: String,
    pub researcher: Actor,
    pub sites: Vec<(uuid::Uuid, String)>,
}

/// Generates each hospital's synthetic images, starts its site worker in this process, runs
/// the federated training with a progress bar per round, and prints the results.
async fn train(
    ctx: &AppContext,
    broker: &SharedBroker,
    url: &str,
    data_dir: &std::path::Path,
    w: &Walked,
) -> anyhow::Result<()> {
    println!();
    println!("Three site workers, each with its own synthetic chest-radiograph phantoms:");
    let specs = synthetic_sites(data_dir, &w.sites, true)?;
    start_workers(ctx, broker, url, specs).await?;
    let result = follow(ctx, w).await?;
    if result.run.status != "completed" {
        anyhow::bail!(
            "the demo's run ended {}: {}",
            result.run.status,
            result.run.stop_reason.unwrap_or_default()
        );
    }
    let accuracy = result
        .versions
        .last()
        .and_then(|v| v.evaluation.as_ref())
        .map_or(0.0, |e| e.global.accuracy);
    if accuracy < 0.7 {
        anyhow::bail!(
            "the demo's model reached only {accuracy:.3} accuracy at the sites; expected clearly above chance"
        );
    }
    Ok(())
}

/// Writes synthetic chest-radiograph phantoms for each site (the demo's profiles, in order)
/// under `data_dir/sites/`, and describes each as a worker's dataset.
pub fn synthetic_sites(
    data_dir: &std::path::Path,
    sites: &[(uuid::Uuid, String)],
    narrate: bool,
) -> anyhow::Result<Vec<(uuid::Uuid, String, DatasetSpec)>> {
    let profiles = consilium_worker::synthetic::demo_sites(1);
    let mut specs = Vec::new();
    for ((site, name), (key, profile)) in sites.iter().zip(profiles) {
        let dir = data_dir.join("sites").join(key);
        let _ = std::fs::remove_dir_all(&dir);
        let lesions = consilium_worker::synthetic::write_site(&dir, 32, &profile)?;
        if narrate {
            println!(
                "  {name:<16} {} images, {lesions} with a lesion, noise {:.2}, blur {}",
                profile.images, profile.noise, profile.blur
            );
        }
        specs.push((
            *site,
            name.clone(),
            DatasetSpec {
                kind: DataKind::Images,
                labels: dir.join("labels.csv"),
                root: dir,
                label_key: LabelKey::Path,
                holdout: 0.25,
                window: None,
            },
        ));
    }
    Ok(specs)
}

/// Starts one site worker per site in this process, each with its own worker token and data,
/// on the server's broker and artifact store.
pub async fn start_workers(
    ctx: &AppContext,
    broker: &SharedBroker,
    url: &str,
    sites: Vec<(uuid::Uuid, String, DatasetSpec)>,
) -> anyhow::Result<()> {
    use consilium_worker::job::{ServerApprovals, SiteContext};
    use std::sync::Arc;

    let engine = ctx
        .engine()
        .ok_or_else(|| anyhow::anyhow!("the federated engine is not running"))?;
    for (site, name, spec) in sites {
        let token = crate::services::tokens::create_worker_token(
            ctx,
            &Actor::system(),
            site,
            consilium_core::api::CreateWorkerToken {
                name: format!("{name} worker"),
                expires_at: Utc::now() + Duration::days(30),
            },
        )
        .await
        .map_err(fail)?
        .token;
        let approvals = Arc::new(ServerApprovals {
            server_url: url.to_string(),
            token,
            http: reqwest::Client::new(),
        });
        let site_ctx = Arc::new(SiteContext::new(
            site,
            spec,
            engine.artifacts.clone(),
            approvals,
        ));
        let broker = broker.clone();
        tokio::spawn(async move {
            if let Err(e) = consilium_worker::consumer::run(
                site_ctx,
                broker,
                std::time::Duration::from_secs(3),
                std::future::pending(),
            )
            .await
            {
                tracing::error!(site = %name, error = %e, "a site worker stopped");
            }
        });
    }
    Ok(())
}

/// How a followed run ended.
pub struct Followed {
    pub run: RunDto,
    pub rounds: Vec<RoundDto>,
    pub versions: Vec<ModelVersionDto>,
    pub audit: AuditVerification,
    pub seconds: f64,
}

/// Starts the study's run and follows it to its end: a progress bar per round, then a table
/// of global and per-site accuracy, the final model and its lineage, the audit verification.
pub async fn follow(ctx: &AppContext, w: &Walked) -> anyhow::Result<Followed> {
    let run = runs::create_run(ctx, &w.researcher, w.study, CreateRun { plan_hash: None })
        .await
        .map_err(fail)?;
    println!();
    println!("Federated training (run {}):", run.id);
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "  round {prefix:>2} [{bar:24}] {pos}/{len} sites  {msg}",
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .progress_chars("=> ");
    let mut shown: Vec<indicatif::ProgressBar> = Vec::new();
    let started = std::time::Instant::now();
    let (final_run, rounds) = loop {
        let rounds = crate::services::models::rounds(ctx, &w.researcher, run.id)
            .await
            .map_err(fail)?;
        for (i, round) in rounds.iter().enumerate() {
            if shown.len() <= i {
                let bar = bars.add(indicatif::ProgressBar::new(round.sites.len() as u64));
                bar.set_style(style.clone());
                bar.set_prefix(round.number.to_string());
                shown.push(bar);
            }
            let bar = &shown[i];
            let done = round.sites.iter().filter(|s| s.status != "waiting").count();
            bar.set_position(done as u64);
            let model = match round.model_version_id {
                Some(id) => crate::services::models::get(ctx, &w.researcher, id)
                    .await
                    .ok(),
                None => None,
            };
            let msg = match (round.state.as_str(), model.and_then(|m| m.evaluation)) {
                (_, Some(e)) => format!("global accuracy {:.3}", e.global.accuracy),
                (state, None) => state.to_string(),
            };
            bar.set_message(msg);
            if round.state == "closed" || round.state == "failed" {
                bar.finish();
            }
        }
        let current = runs::get_run(ctx, &w.researcher, run.id)
            .await
            .map_err(fail)?;
        if current.status != "running" {
            break (current, rounds);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    for b in &shown {
        b.finish();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "  {} after {seconds:.1} s: {}",
        final_run.status,
        final_run.stop_reason.clone().unwrap_or_default()
    );
    let versions = crate::services::models::list(ctx, &w.researcher, Some(run.id), None)
        .await
        .map_err(fail)?;
    println!();
    let names: Vec<&str> = w.sites.iter().map(|(_, n)| n.as_str()).collect();
    println!(
        "  round  global acc  global AUROC  {}",
        names.iter().map(|n| format!("{n:>16}")).collect::<String>()
    );
    for v in &versions {
        let Some(e) = &v.evaluation else { continue };
        let per_site: String = w
            .sites
            .iter()
            .map(|(id, _)| {
                e.sites.iter().find(|s| s.site_id == *id).map_or_else(
                    || format!("{:>16}", "—"),
                    |s| format!("{:>16.3}", s.metrics.accuracy),
                )
            })
            .collect();
        println!(
            "  {:>5}  {:>10.3}  {:>12}  {per_site}",
            v.round,
            e.global.accuracy,
            e.global.auroc.map_or("—".into(), |a| format!("{a:.3}"))
        );
    }
    if let Some(last) = versions.last() {
        println!();
        println!(
            "Final model {} (round {}, {}):",
            last.id, last.round, last.strategy
        );
        println!("  weights sha256 {}", last.hash);
        println!(
            "  plan {}  ethics decision {}  grants {}",
            &last.plan_hash[..16],
            last.review_id,
            last.grant_ids.len()
        );
        for c in &last.contributions {
            println!(
                "  update {} from {:<16} {} samples",
                &c.update_hash[..16],
                c.site_name,
                c.samples
            );
        }
        println!("  lineage: GET /api/v1/models/{}/lineage", last.id);
    }
    let verified = audit::verify(&ctx.db).await.map_err(fail)?;
    println!(
        "The audit trail holds {} hash-chained events; verification: {}.",
        verified.events_checked,
        if verified.ok { "intact" } else { "BROKEN" }
    );
    Ok(Followed {
        run: final_run,
        rounds,
        versions,
        audit: verified,
        seconds,
    })
}
