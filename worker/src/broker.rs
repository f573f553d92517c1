//! The message broker between the server and the sites, behind one trait with two adapters:
//! RabbitMQ (durable queues, one per site, publisher confirms, manual acks, a dead-letter
//! queue) and in-process channels for the embedded default. Delivery is at least once.
//!
//! On RabbitMQ the server and the sites connect as different users. The server declares the
//! topology; a site's user (`site_user`) may only consume its own job queue and publish to the
//! results exchange, and every message it publishes carries its user name in the AMQP
//! `user-id` property, which RabbitMQ refuses unless it is the connection's own user: the
//! server reads, from the broker itself, which site's credentials sent a message.

use async_trait::async_trait;
use consilium_core::protocol::Job;
use consilium_core::signing::{SignedMessage, SigningKey};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

pub const RESULTS_QUEUE: &str = "consilium.results";

pub fn site_queue(site: Uuid) -> String {
    format!("consilium.site.{site}.jobs")
}

/// The RabbitMQ user of a site's workers.
pub fn site_user(site: Uuid) -> String {
    format!("consilium-site-{site}")
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker is unreachable: {0}")]
    Unreachable(String),
    #[error("the broker did not confirm the message: {0}")]
    NotConfirmed(String),
    #[error("{0}")]
    Closed(String),
    #[error("the message could not be written as JSON: {0}")]
    Encode(String),
}

enum Acker {
    Requeue(mpsc::UnboundedSender<Vec<u8>>),
    Rabbit(lapin::Acker),
}

/// A received message; acknowledge it once handled, or reject it.
pub struct Delivery {
    pub payload: Vec<u8>,
    /// Set when the broker delivered it before (RabbitMQ's redelivered flag).
    pub redelivered: bool,
    /// The broker user that published it, as the broker checked it (RabbitMQ's validated
    /// `user-id`); none from the in-process broker, or when the publisher did not say.
    pub publisher: Option<String>,
    acker: Acker,
}

impl Delivery {
    pub async fn ack(self) {
        if let Acker::Rabbit(a) = self.acker
            && let Err(e) = a.ack(BasicAckOptions::default()).await
        {
            tracing::warn!(error = %e, "ack failed; the broker will deliver the message again");
        }
    }

    /// Gives the message back for another delivery (a transient failure).
    pub async fn requeue(self) {
        match self.acker {
            Acker::Rabbit(a) => {
                if let Err(e) = a
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                {
                    // The channel is gone: the broker redelivers unacknowledged messages anyway.
                    tracing::warn!(error = %e, "requeue failed; the broker will deliver the message again");
                }
            }
            Acker::Requeue(tx) => {
                if tx.send(self.payload).is_err() {
                    tracing::error!("the in-process queue is closed; a message was dropped");
                }
            }
        }
    }

    /// Sends the message to the dead-letter queue (it can never be processed).
    pub async fn dead_letter(self) {
        if let Acker::Rabbit(a) = self.acker
            && let Err(e) = a
                .nack(BasicNackOptions {
                    requeue: false,
                    ..Default::default()
                })
                .await
        {
            tracing::warn!(error = %e, "dead-lettering failed; the broker will deliver the message again");
        }
    }
}

pub type Subscription = mpsc::Receiver<Delivery>;

#[async_trait]
pub trait Broker: Send + Sync {
    /// Server → one site's job queue: a job signed with the server's key (`send_job`).
    async fn publish_job(&self, site: Uuid, job: &SignedMessage) -> Result<(), BrokerError>;
    /// Whether deliveries name their publisher as the broker authenticated it (RabbitMQ); the
    /// in-process broker has one process and no users.
    fn authenticates_publishers(&self) -> bool {
        false
    }
    /// Site → the server's results queue: a message signed with the site's key.
    async fn publish_message(&self, message: &SignedMessage) -> Result<(), BrokerError>;
    /// A site's jobs, one at a time.
    async fn jobs(&self, site: Uuid) -> Result<Subscription, BrokerError>;
    /// Everything the sites send.
    async fn results(&self) -> Result<Subscription, BrokerError>;
    /// Raw bytes to the results queue (used to test dead-lettering).
    async fn publish_raw_result(&self, payload: &[u8]) -> Result<(), BrokerError>;
    /// Puts a message that can never be processed on the dead-letter queue, with the reason
    /// (the `x-consilium-reason` header), for an operator to read; the caller then acks it.
    async fn dead_letter(&self, payload: &[u8], reason: &str) -> Result<(), BrokerError>;
    /// The reasons of the messages on the dead-letter queue, oldest first, leaving them there
    /// (for an operator, and for tests).
    async fn dead_letter_reasons(&self) -> Result<Vec<String>, BrokerError>;
}

/// Signs a job with the server's key and sends it to its site's queue.
pub async fn send_job(broker: &dyn Broker, key: &SigningKey, job: &Job) -> Result<(), BrokerError> {
    let signed = consilium_core::signing::sign_job(key, job)
        .map_err(|e| BrokerError::Encode(e.to_string()))?;
    broker.publish_job(job.site_id, &signed).await
}

/// The header carrying why a message is on the dead-letter queue.
pub const REASON_HEADER: &str = "x-consilium-reason";

/// A message as JSON; one that cannot be written is an error, never an empty message.
fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, BrokerError> {
    serde_json::to_vec(v).map_err(|e| BrokerError::Encode(e.to_string()))
}

// ---------------------------------------------------------------- in-process

/// Tokio channels inside one process (the embedded default and the demo).
#[derive(Clone, Default)]
pub struct InProcessBroker {
    inner: Arc<Mutex<InProcessQueues>>,
}

#[derive(Default)]
struct InProcessQueues {
    queues: HashMap<String, mpsc::UnboundedSender<Vec<u8>>>,
    pending: HashMap<String, mpsc::UnboundedReceiver<Vec<u8>>>,
    /// Dead letters with their reasons, kept for the life of the process.
    dead: Vec<(Vec<u8>, String)>,
}

impl InProcessBroker {
    pub fn new() -> Self {
        Self::default()
    }

    fn sender(&self, queue: &str) -> Result<mpsc::UnboundedSender<Vec<u8>>, BrokerError> {
        let mut q = self
            .inner
            .lock()
            .map_err(|_| BrokerError::Closed("broker state poisoned".into()))?;
        if let Some(tx) = q.queues.get(queue) {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        q.queues.insert(queue.to_string(), tx.clone());
        q.pending.insert(queue.to_string(), rx);
        Ok(tx)
    }

    fn subscribe(&self, queue: &str) -> Result<Subscription, BrokerError> {
        let requeue = self.sender(queue)?;
        let mut rx = {
            let mut q = self
                .inner
                .lock()
                .map_err(|_| BrokerError::Closed("broker state poisoned".into()))?;
            q.pending
                .remove(queue)
                .ok_or_else(|| BrokerError::Closed(format!("{queue} already has a consumer")))?
        };
        let (tx, out) = mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(payload) = rx.recv().await {
                let d = Delivery {
                    payload,
                    redelivered: false,
                    publisher: None,
                    acker: Acker::Requeue(requeue.clone()),
                };
                if tx.send(d).await.is_err() {
                    break;
                }
            }
        });
        Ok(out)
    }

    fn send(&self, queue: &str, payload: Vec<u8>) -> Result<(), BrokerError> {
        self.sender(queue)?
            .send(payload)
            .map_err(|_| BrokerError::Closed(format!("{queue} is closed")))
    }

    /// The dead letters so far, with their reasons.
    pub fn dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        self.inner
            .lock()
            .map(|q| q.dead.clone())
            .unwrap_or_default()
    }
}

#[async_trait]
impl Broker for InProcessBroker {
    async fn publish_job(&self, site: Uuid, job: &SignedMessage) -> Result<(), BrokerError> {
        self.send(&site_queue(site), encode(job)?)
    }
    async fn publish_message(&self, message: &SignedMessage) -> Result<(), BrokerError> {
        self.send(RESULTS_QUEUE, encode(message)?)
    }
    async fn jobs(&self, site: Uuid) -> Result<Subscription, BrokerError> {
        self.subscribe(&site_queue(site))
    }
    async fn results(&self) -> Result<Subscription, BrokerError> {
        self.subscribe(RESULTS_QUEUE)
    }
    async fn publish_raw_result(&self, payload: &[u8]) -> Result<(), BrokerError> {
        self.send(RESULTS_QUEUE, payload.to_vec())
    }
    async fn dead_letter(&self, payload: &[u8], reason: &str) -> Result<(), BrokerError> {
        tracing::warn!(reason, "a message goes to the dead-letter list");
        self.inner
            .lock()
            .map_err(|_| BrokerError::Closed("broker state poisoned".into()))?
            .dead
            .push((payload.to_vec(), reason.to_string()));
        Ok(())
    }
    async fn dead_letter_reasons(&self) -> Result<Vec<String>, BrokerError> {
        Ok(self.dead_letters().into_iter().map(|(_, r)| r).collect())
    }
}

// ---------------------------------------------------------------- RabbitMQ

/// RabbitMQ through lapin. Reconnects (with back-off) whenever the connection drops.
#[derive(Clone)]
pub struct RabbitBroker {
    url: String,
    /// Prefix of every queue and exchange name (`consilium`; tests use their own).
    ns: String,
    /// The site whose worker this is; none for the server.
    site: Option<SiteIdentity>,
    publisher: Arc<tokio::sync::Mutex<Option<(Connection, Channel)>>>,
}

/// A site worker's connection: it declares nothing and signs its messages with its user name.
#[derive(Clone)]
struct SiteIdentity {
    user: String,
}

fn queue_args(ns: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(dead_letter(ns).into()),
    );
    args
}

/// The names of a namespace's shared queues: results (a queue, and the exchange the sites
/// publish to, of the same name), and dead letters (exchange and queue).
pub fn results_queue(ns: &str) -> String {
    format!("{ns}.results")
}
pub fn dead_letter(ns: &str) -> String {
    format!("{ns}.dead-letter")
}
pub fn site_queue_in(ns: &str, site: Uuid) -> String {
    format!("{ns}.site.{site}.jobs")
}

/// A connection and a channel with publisher confirms; the server's also declares the shared
/// topology (a site's user may not, and needs not).
async fn open(url: &str, ns: &str, server: bool) -> Result<(Connection, Channel), BrokerError> {
    let unreachable = |e: lapin::Error| BrokerError::Unreachable(e.to_string());
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(unreachable)?;
    let channel = conn.create_channel().await.map_err(unreachable)?;
    if server {
        declare_topology(&channel, ns).await?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(unreachable)?;
    Ok((conn, channel))
}

async fn declare_topology(channel: &Channel, ns: &str) -> Result<(), BrokerError> {
    let unreachable = |e: lapin::Error| BrokerError::Unreachable(e.to_string());
    channel
        .exchange_declare(
            dead_letter(ns).into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(unreachable)?;
    channel
        .queue_declare(
            dead_letter(ns).into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map_err(unreachable)?;
    channel
        .queue_bind(
            dead_letter(ns).into(),
            dead_letter(ns).into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unreachable)?;
    declare(channel, ns, &results_queue(ns)).await?;
    channel
        .exchange_declare(
            results_queue(ns).into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(unreachable)?;
    channel
        .queue_bind(
            results_queue(ns).into(),
            results_queue(ns).into(),
            results_queue(ns).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unreachable)?;
    Ok(())
}

async fn declare(channel: &Channel, ns: &str, queue: &str) -> Result<(), BrokerError> {
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), queue_args(ns))
        .await
        .map(|_| ())
        .map_err(|e| BrokerError::Unreachable(e.to_string()))
}

impl RabbitBroker {
    /// Connects (and declares the shared topology) to check the URL early.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        Self::connect_in(url, "consilium").await
    }

    /// Uses queue and exchange names under `ns` (isolated test runs share one broker).
    pub async fn connect_in(url: &str, ns: &str) -> Result<Self, BrokerError> {
        let pair = open(url, ns, true).await?;
        Ok(RabbitBroker {
            url: url.to_string(),
            ns: ns.to_string(),
            site: None,
            publisher: Arc::new(tokio::sync::Mutex::new(Some(pair))),
        })
    }

    /// A site worker's connection, as the site's own broker user (the URL's): it declares
    /// nothing, consumes the site's job queue, and publishes to the results exchange with its
    /// user name in `user-id`.
    pub async fn connect_site(url: &str) -> Result<Self, BrokerError> {
        Self::connect_site_in(url, "consilium").await
    }

    pub async fn connect_site_in(url: &str, ns: &str) -> Result<Self, BrokerError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| BrokerError::Unreachable(format!("the broker URL is not a URL: {e}")))?;
        let user = percent_decode(parsed.username());
        let user = if user.is_empty() {
            "guest".to_string()
        } else {
            user
        };
        let pair = open(url, ns, false).await?;
        Ok(RabbitBroker {
            url: url.to_string(),
            ns: ns.to_string(),
            site: Some(SiteIdentity { user }),
            publisher: Arc::new(tokio::sync::Mutex::new(Some(pair))),
        })
    }

    /// Declares a site's job queue (the server does, before the site's worker first connects).
    pub async fn declare_site_queue(&self, site: Uuid) -> Result<(), BrokerError> {
        let (conn, channel) = open(&self.url, &self.ns, true).await?;
        declare(&channel, &self.ns, &site_queue_in(&self.ns, site)).await?;
        if let Err(e) = conn.close(200, "done".into()).await {
            tracing::warn!(error = %e, "closing the declaring connection");
        }
        Ok(())
    }

    /// How many messages wait in the dead-letter queue (messages nobody could read).
    pub async fn dead_letters(&self) -> Result<u32, BrokerError> {
        let (conn, channel) = open(&self.url, &self.ns, true).await?;
        let queue = channel
            .queue_declare(
                dead_letter(&self.ns).into(),
                QueueDeclareOptions {
                    passive: true,
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::Unreachable(e.to_string()))?;
        let _ = conn.close(200, "done".into()).await;
        Ok(queue.message_count())
    }

    async fn publish(&self, queue: &str, payload: &[u8]) -> Result<(), BrokerError> {
        self.publish_with("", queue, payload, FieldTable::default(), true)
            .await
    }

    /// To the results exchange: the only place a site's user may publish.
    async fn publish_result(&self, payload: &[u8]) -> Result<(), BrokerError> {
        let name = results_queue(&self.ns);
        self.publish_with(&name, &name, payload, FieldTable::default(), false)
            .await
    }

    /// The dead-lettered messages' reasons, oldest first (read and left on the queue).
    pub async fn dead_letter_reasons(&self) -> Result<Vec<String>, BrokerError> {
        let (conn, channel) = open(&self.url, &self.ns, true).await?;
        let mut out = Vec::new();
        while let Some(m) = channel
            .basic_get(dead_letter(&self.ns).into(), BasicGetOptions::default())
            .await
            .map_err(|e| BrokerError::Unreachable(e.to_string()))?
        {
            let reason = m
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(REASON_HEADER).cloned())
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                })
                .unwrap_or_else(|| "(no reason recorded)".to_string());
            out.push(reason);
        }
        // Unacknowledged, the messages go back on the queue when the channel closes.
        if let Err(e) = conn.close(200, "done".into()).await {
            tracing::warn!(error = %e, "closing the inspection connection");
        }
        Ok(out)
    }

    async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        headers: FieldTable,
        declare_queue: bool,
    ) -> Result<(), BrokerError> {
        let server = self.site.is_none();
        let mut last = String::new();
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
            }
            let mut guard = self.publisher.lock().await;
            if guard
                .as_ref()
                .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
            {
                match open(&self.url, &self.ns, server).await {
                    Ok(pair) => *guard = Some(pair),
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                }
            }
            let Some((_, channel)) = guard.as_ref() else {
                continue;
            };
            if declare_queue
                && server
                && let Err(e) = declare(channel, &self.ns, routing_key).await
            {
                last = e.to_string();
                *guard = None;
                continue;
            }
            let mut props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_headers(headers.clone());
            if let Some(site) = &self.site {
                props = props.with_user_id(site.user.as_str().into());
            }
            match channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    payload,
                    props,
                )
                .await
            {
                Ok(confirm) => match confirm.await {
                    Ok(Confirmation::Ack(_)) | Ok(Confirmation::NotRequested) => return Ok(()),
                    Ok(other) => last = format!("{other:?}"),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            *guard = None;
        }
        Err(BrokerError::NotConfirmed(last))
    }

    /// Consumes `queue` with prefetch 1, reconnecting whenever the connection is lost.
    fn consume(&self, queue: String) -> Subscription {
        let (tx, rx) = mpsc::channel(1);
        let (url, ns, server) = (self.url.clone(), self.ns.clone(), self.site.is_none());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                if tx.is_closed() {
                    return;
                }
                match consume_once(&url, &ns, server, &queue, &tx).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(queue, error = %e, "broker connection lost; reconnecting");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        rx
    }
}

/// Returns Ok when the subscriber went away, Err when the connection failed.
async fn consume_once(
    url: &str,
    ns: &str,
    server: bool,
    queue: &str,
    tx: &mpsc::Sender<Delivery>,
) -> Result<(), BrokerError> {
    let (conn, channel) = open(url, ns, server).await?;
    if server {
        declare(&channel, ns, queue).await?;
    }
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .map_err(|e| BrokerError::Unreachable(e.to_string()))?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("consilium-{}", Uuid::new_v4()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            BrokerError::Unreachable(if server {
                e.to_string()
            } else {
                format!(
                    "{e} (a site's broker user may consume only its own job queue, which the server creates: has the administrator provisioned this site's broker user with `consilium admin broker-user`?)"
                )
            })
        })?;
    tracing::info!(queue, "consuming");
    while let Some(next) = consumer.next().await {
        let d = next.map_err(|e| BrokerError::Unreachable(e.to_string()))?;
        let delivery = Delivery {
            payload: d.data.clone(),
            redelivered: d.redelivered,
            publisher: d.properties.user_id().as_ref().map(|u| u.to_string()),
            acker: Acker::Rabbit(d.acker),
        };
        if tx.send(delivery).await.is_err() {
            let _ = conn.close(200, "done".into()).await;
            return Ok(());
        }
    }
    Err(BrokerError::Unreachable(
        "the consumer was cancelled".into(),
    ))
}

#[async_trait]
impl Broker for RabbitBroker {
    async fn publish_job(&self, site: Uuid, job: &SignedMessage) -> Result<(), BrokerError> {
        self.publish(&site_queue_in(&self.ns, site), &encode(job)?)
            .await
    }
    fn authenticates_publishers(&self) -> bool {
        true
    }
    async fn publish_message(&self, message: &SignedMessage) -> Result<(), BrokerError> {
        self.publish_result(&encode(message)?).await
    }
    async fn jobs(&self, site: Uuid) -> Result<Subscription, BrokerError> {
        Ok(self.consume(site_queue_in(&self.ns, site)))
    }
    async fn results(&self) -> Result<Subscription, BrokerError> {
        Ok(self.consume(results_queue(&self.ns)))
    }
    async fn publish_raw_result(&self, payload: &[u8]) -> Result<(), BrokerError> {
        self.publish_result(payload).await
    }
    async fn dead_letter_reasons(&self) -> Result<Vec<String>, BrokerError> {
        RabbitBroker::dead_letter_reasons(self).await
    }
    async fn dead_letter(&self, payload: &[u8], reason: &str) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        let reason: String = reason.chars().take(2000).collect();
        headers.insert(
            ShortString::from(REASON_HEADER),
            AMQPValue::LongString(reason.into()),
        );
        // Straight to the dead-letter queue (declared with the topology, without arguments).
        self.publish_with("", &dead_letter(&self.ns), payload, headers, false)
            .await
    }
}

/// Both adapters behind one handle.
pub type SharedBroker = Arc<dyn Broker>;

/// `amqp://…` selects RabbitMQ; anything else is an error (the in-process broker is made in code).
pub async fn connect(url: &str) -> Result<SharedBroker, BrokerError> {
    Ok(Arc::new(RabbitBroker::connect(url).await?))
}

/// A site worker's connection to RabbitMQ, as its own broker user.
pub async fn connect_site(url: &str) -> Result<SharedBroker, BrokerError> {
    Ok(Arc::new(RabbitBroker::connect_site(url).await?))
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
