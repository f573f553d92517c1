//! The server's own work per round with many sites: re-checking governance, sending the
//! jobs, recording every result with its audit event, aggregating, sending the evaluation
//! jobs, recording those, closing the round. Every simulated site answers at once with a
//! ready-made update (the incoming global model), so what is timed is the orchestrator, the
//! broker and the database, not training. In-process broker and RabbitMQ in the same run.
//!
//! `cargo bench -p consilium-backend --bench round_overhead [-- SITES ROUNDS]`
//! (defaults 100 and 3; RabbitMQ at CONSILIUM_BENCH_AMQP or amqp://guest:guest@127.0.0.1:5672,
//! in a virtual host of its own made with rabbitmqctl; skipped when either is missing).

use consilium_backend::configuration::Settings;
use consilium_backend::demo::{self, Scenario};
use consilium_backend::domain::Actor;
use consilium_backend::services::{runs, site_keys};
use consilium_core::Role;
use consilium_core::api::{CreateRun, RegisterSiteKey};
use consilium_core::protocol::{Job, JobKind, JobResult, Metrics, Outcome, WorkerMessage};
use consilium_core::signing::{self, SigningKey};
use consilium_worker::broker::SharedBroker;
use std::process::Command;
use std::time::Instant;
use uuid::Uuid;

fn metrics() -> Metrics {
    Metrics {
        accuracy: 0.8,
        auroc: Some(0.85),
        loss: 0.45,
        samples: 50,
        segmentation: None,
    }
}

/// A simulated site: answers each job at once, signed with its registered key.
async fn respond(broker: SharedBroker, site: Uuid, key: SigningKey) {
    let Ok(mut jobs) = broker.jobs(site).await else {
        return;
    };
    while let Some(d) = jobs.recv().await {
        let Ok(job) = serde_json::from_slice::<Job>(&d.payload) else {
            d.dead_letter().await;
            continue;
        };
        let outcome = match job.kind {
            JobKind::Train => Outcome::Trained {
                update_hash: job.global_model.clone().unwrap_or_default(),
                samples: 100,
                evaluation: metrics(),
                train_loss_before: 0.7,
                train_loss_after: 0.6,
                duration_ms: 0,
                skipped: vec![],
                privacy: None,
            },
            JobKind::Evaluate => Outcome::Evaluated {
                evaluation: metrics(),
                duration_ms: 0,
            },
            JobKind::Preview => Outcome::Failed {
                reason: "this benchmark's sites make no previews".into(),
            },
        };
        let result = JobResult {
            job_id: job.job_id,
            kind: None,
            run_id: job.run_id,
            round: job.round,
            site_id: site,
            outcome,
        };
        let Ok(signed) = signing::sign(&key, &WorkerMessage::Result(result)) else {
            d.requeue().await;
            continue;
        };
        if broker.publish_message(&signed).await.is_ok() {
            d.ack().await;
        } else {
            d.requeue().await;
        }
    }
}

/// Seconds per round for `sites` sites over `rounds` rounds.
async fn measure(broker_url: Option<String>, sites: usize, rounds: u32) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.database.data_dir = dir.path().to_path_buf();
    settings.log.level = "error".into();
    settings.engine.broker_url = broker_url.map(Into::into);
    let app = consilium_backend::startup::Application::build(settings).await?;
    let ctx = app.context.clone();
    let broker = app.broker.clone();
    let server = tokio::spawn(app.run_until_stopped());
    let mut people = vec![
        (
            "admin@bench.local".to_string(),
            "Admin".to_string(),
            Role::Administrator,
        ),
        (
            "researcher@bench.local".into(),
            "Researcher".into(),
            Role::Researcher,
        ),
        (
            "member@bench.local".into(),
            "Member".into(),
            Role::CommitteeMember,
        ),
    ];
    let mut site_list = Vec::new();
    for i in 0..sites {
        let email = format!("custodian-{i}@bench.local");
        people.push((email.clone(), format!("Custodian {i}"), Role::Custodian));
        site_list.push((format!("Site {i:03}"), email, 100));
    }
    let manifest = serde_json::from_value(serde_json::json!({
        "model": {"architecture": "small_cnn", "num_classes": 2},
        "preprocessing": {"image_size": 28},
        "optimiser": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9},
        "local_epochs": 1, "batch_size": 16, "rounds": rounds,
        "aggregation": {"strategy": "fedavg"},
        "seed": 1
    }))?;
    let walked = demo::walk_through(
        &ctx,
        Scenario {
            people,
            sites: site_list,
            title: "Round overhead".into(),
            purpose: "Benchmark".into(),
            manifest,
            password: None,
            narrate: false,
            site_namespace: None,
        },
    )
    .await?;
    for (site, name) in &walked.sites {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        site_keys::register(
            &ctx,
            &Actor::system(),
            *site,
            RegisterSiteKey {
                public_key: signing::encode_public_key(&key.verifying_key()),
                name: format!("{name} (benchmark)"),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        tokio::spawn(respond(broker.clone(), *site, key));
    }
    let started = Instant::now();
    let run = runs::create_run(
        &ctx,
        &walked.researcher,
        walked.study,
        CreateRun { plan_hash: None },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    loop {
        let r = runs::get_run(&ctx, &walked.researcher, run.id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if r.status != "running" {
            anyhow::ensure!(
                r.status == "completed",
                "the run ended {}: {:?}",
                r.status,
                r.stop_reason
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64() / rounds as f64;
    server.abort();
    Ok(secs)
}

fn rabbit_vhost() -> Option<(String, String)> {
    let base = std::env::var("CONSILIUM_BENCH_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
    let vhost = format!("consilium-bench-{}", Uuid::new_v4().simple());
    let ok = |args: &[&str]| {
        Command::new("rabbitmqctl")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    (ok(&["add_vhost", &vhost])
        && ok(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]))
    .then(|| (format!("{base}/{vhost}"), vhost))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sites = args.first().copied().unwrap_or(100);
    let rounds = args.get(1).copied().unwrap_or(3) as u32;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("Server overhead per round (sites answer at once; {rounds} rounds, SQLite):");
    let base = rt.block_on(measure(None, 1, rounds))?;
    println!(
        "  in-process broker,   1 site : {:>8.1} ms per round",
        base * 1e3
    );
    let many = rt.block_on(measure(None, sites, rounds))?;
    println!(
        "  in-process broker, {sites:>3} sites: {:>8.1} ms per round ({:.2} ms per site)",
        many * 1e3,
        (many - base) * 1e3 / (sites - 1).max(1) as f64
    );
    let rabbit = rabbit_vhost();
    match rabbit {
        Some((url, vhost)) => {
            let many = rt.block_on(measure(Some(url), sites, rounds))?;
            println!(
                "  RabbitMQ,          {sites:>3} sites: {:>8.1} ms per round ({:.2} ms per site)",
                many * 1e3,
                (many - base) * 1e3 / (sites - 1).max(1) as f64
            );
            let _ = Command::new("rabbitmqctl")
                .args(["delete_vhost", &vhost])
                .output();
        }
        None => println!("  RabbitMQ: skipped (no rabbitmqctl or broker here)"),
    }
    // lapin's connection threads would complain about the runtime going away.
    rt.shutdown_background();
    std::process::exit(0);
}
