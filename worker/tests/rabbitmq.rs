#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The RabbitMQ adapter against the real broker at 127.0.0.1:5672: jobs reach only their
//! site's queue, a requeued job is delivered again, and an unreadable result goes to the
//! dead-letter queue.

use chrono::Utc;
use consilium_core::protocol::{Job, JobKind};
use consilium_worker::broker::{Broker, RabbitBroker, dead_letter, results_queue};
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;
use uuid::Uuid;

fn url() -> String {
    std::env::var("CONSILIUM_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn manifest() -> consilium_core::manifest::TrainingPlanManifest {
    serde_json::from_value(serde_json::json!({
        "model": {"architecture": "small_cnn", "num_classes": 2},
        "optimiser": {"name": "sgd", "learning_rate": 0.1}, "local_epochs": 1, "batch_size": 8, "rounds": 1,
        "aggregation": {"strategy": "fedavg"}
    }))
    .unwrap()
}

fn job(site: Uuid) -> Job {
    Job {
        protocol: consilium_core::protocol::PROTOCOL_VERSION,
        job_id: Uuid::new_v4(),
        kind: JobKind::Train,
        run_id: Uuid::new_v4(),
        round: 1,
        study_id: Uuid::new_v4(),
        site_id: site,
        plan_hash: "0".repeat(64),
        manifest: manifest(),
        files: vec![],
        global_model: None,
        deadline: Utc::now(),
        preview: None,
        correction: None,
    }
}

async fn next(
    sub: &mut consilium_worker::broker::Subscription,
) -> consilium_worker::broker::Delivery {
    tokio::time::timeout(Duration::from_secs(20), sub.recv())
        .await
        .expect("a delivery within 20 s")
        .expect("open subscription")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_results_redelivery_and_dead_letters_over_rabbitmq() {
    let ns = format!("consilium-test-{}", Uuid::new_v4().simple());
    let broker = RabbitBroker::connect_in(&url(), &ns)
        .await
        .expect("RabbitMQ at 127.0.0.1:5672");
    let (north, south) = (Uuid::new_v4(), Uuid::new_v4());
    let mut north_jobs = broker.jobs(north).await.unwrap();
    let mut south_jobs = broker.jobs(south).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // consumers declared

    let j = job(north);
    let server_key = consilium_core::signing::SigningKey::from_bytes(&[3; 32]);
    consilium_worker::broker::send_job(&broker, &server_key, &j)
        .await
        .unwrap();
    let d = next(&mut north_jobs).await;
    let signed: consilium_core::signing::SignedMessage =
        serde_json::from_slice(&d.payload).unwrap();
    let got = consilium_core::signing::verify_job(&server_key.verifying_key(), &signed).unwrap();
    assert_eq!(got, j);
    assert!(!d.redelivered);
    // Given back (e.g. a transient failure): delivered again, marked as such.
    d.requeue().await;
    let again = next(&mut north_jobs).await;
    assert!(again.redelivered);
    again.ack().await;
    // The other site never saw it.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), south_jobs.recv())
            .await
            .is_err()
    );

    // An unreadable result is dead-lettered, not lost and not retried forever.
    let mut results = broker.results().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker
        .publish_raw_result(b"{ this is not a result")
        .await
        .unwrap();
    let bad = next(&mut results).await;
    assert_eq!(bad.payload, b"{ this is not a result");
    bad.dead_letter().await;
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut dead = None;
    for _ in 0..40 {
        if let Some(m) = ch
            .basic_get(dead_letter(&ns).into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            dead = Some(m.delivery.data.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.as_deref(), Some(&b"{ this is not a result"[..]));

    for q in [
        results_queue(&ns),
        dead_letter(&ns),
        format!("{ns}.site.{north}.jobs"),
        format!("{ns}.site.{south}.jobs"),
    ] {
        let _ = ch
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(dead_letter(&ns).into(), Default::default())
        .await;
}
