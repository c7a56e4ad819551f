//! The Kafka adapter: the one place that builds client configuration, the publisher, and topic
//! provisioning (`ficus topics apply/check`).
//!
//! Everything Kafka-specific lives here, behind the [`Publisher`] trait, so the tail pipeline
//! deals only in canonical events and acknowledgements.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode as Code;

use crate::config::{KafkaConfig, Membership};

mod consumer;
use crate::event::{CONTENT_TYPE, CanonicalEvent};
use crate::topics::TopicDef;
pub use consumer::{Delivery, GroupConsumer, GroupProgress};

/// Errors from the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("delivery of event {id} to {topic} failed: {error}")]
    Delivery { id: String, topic: String, error: Box<KafkaError> },
    #[error("delivery of event {id} to {topic} was cancelled (producer closed)")]
    Cancelled { id: String, topic: String },
    #[error("topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error(
        "fenced out of consumer group {group}: another process joined it with the same group.instance.id `{instance}` \
         ({reason}). Two processes must not share kafka.instance_id: give each process slot its own \
         (FICUS_KAFKA_INSTANCE_ID; the default is the host name)"
    )]
    Fenced { group: String, instance: String, reason: String },
}

impl BusError {
    /// Whether retrying later can help (broker down, timeouts) as opposed to a configuration or
    /// authorisation problem that needs a person.
    pub fn is_transient(&self) -> bool {
        let code = match self {
            BusError::Kafka(e) => e.rdkafka_error_code(),
            BusError::Delivery { error, .. } => error.rdkafka_error_code(),
            BusError::Cancelled { .. } => return true,
            BusError::Topic { .. } | BusError::Fenced { .. } => return false,
        };
        !matches!(
            code,
            Some(
                Code::TopicAuthorizationFailed
                    | Code::ClusterAuthorizationFailed
                    | Code::SaslAuthenticationFailed
                    | Code::Authentication
                    | Code::UnknownTopicOrPartition
                    | Code::UnknownTopic
                    | Code::MessageSizeTooLarge
                    | Code::InvalidConfig
                    | Code::Fatal
            )
        )
    }
}

impl BusError {
    /// A problem in how ficus is configured or deployed, not in the data or the servers: the
    /// process should stop with exit 2 and not be restarted as is.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, BusError::Fenced { .. })
    }
}

/// Which kind of client a configuration is for. Each role gets every setting it needs and
/// none it must undo, so no caller edits a configuration after it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole<'a> {
    /// The idempotent producer (acks=all).
    Producer,
    /// A member of a consumer group that subscribes and has partitions assigned: offsets are
    /// stored by ficus after the write and committed by librdkafka; with static membership the
    /// member is `group.instance.id = <kafka.instance_id>/<group>`.
    GroupMember {
        group: &'a str,
    },
    /// A reader that assigns partitions itself (no group membership) to read them to an end,
    /// or only looks at a group's committed offsets. With a group, offsets it stores are
    /// committed only when it says so.
    Reader {
        group: Option<&'a str>,
    },
    Admin,
}

/// The `group.instance.id` of this process in `group`: stable across restarts of the same
/// process slot, unique per group.
pub fn group_instance_id(cfg: &KafkaConfig, group: &str) -> String {
    format!("{}/{group}", cfg.instance_id)
}

/// Builds the librdkafka configuration for one client. Order: ficus's defaults, then the user's
/// `kafka.properties`, then the role's own overrides, then the settings ficus's guarantees rest
/// on (idempotence and acks=all for the producer; manual offset storage for consumers; the
/// group and instance ids), which no file can turn off.
pub fn client_config(cfg: &KafkaConfig, role: ClientRole<'_>, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    c.set("client.id", client_id);
    let consumer = matches!(role, ClientRole::GroupMember { .. } | ClientRole::Reader { .. });
    match role {
        ClientRole::Producer => {
            c.set("linger.ms", "5");
            c.set("compression.type", "lz4");
            c.set("message.timeout.ms", "300000");
            c.set("queue.buffering.max.messages", "200000");
        }
        ClientRole::GroupMember { .. } | ClientRole::Reader { .. } => {
            c.set("auto.offset.reset", "earliest");
            // How long the broker may hold a fetch while no data is there. Real Kafka answers
            // as soon as data arrives, so this bounds only the idle polling rate; Tansu 0.6.0
            // sleeps through it on every fetch, data or not (half of it from 250 ms up), so
            // there it also sets the consumer's latency (benches/README.md).
            c.set("fetch.wait.max.ms", "100");
        }
        ClientRole::Admin => {}
    }
    if let ClientRole::GroupMember { .. } = role {
        // Feeds ficus_consumer_lag (see consume::DrainContext).
        c.set("statistics.interval.ms", "5000");
        // A consumer that dies holds its partitions this long before the group moves them
        // (with static membership, unless the same process slot comes back first).
        c.set("session.timeout.ms", "10000");
        c.set("heartbeat.interval.ms", "2000");
        c.set("partition.assignment.strategy", "cooperative-sticky");
    }
    let overrides: &BTreeMap<String, String> = match role {
        ClientRole::Producer => &cfg.producer,
        ClientRole::GroupMember { .. } | ClientRole::Reader { .. } => &cfg.consumer,
        ClientRole::Admin => &BTreeMap::new(),
    };
    for (k, v) in cfg.properties.iter().chain(overrides) {
        c.set(k, v);
    }
    match role {
        ClientRole::Producer => {
            c.set("enable.idempotence", "true");
            c.set("acks", "all");
        }
        ClientRole::GroupMember { group } => {
            c.set("group.id", group);
            if cfg.membership == Membership::Static {
                c.set("group.instance.id", group_instance_id(cfg, group));
            }
            c.set("enable.auto.commit", "true");
            c.set("enable.auto.offset.store", "false");
        }
        ClientRole::Reader { group } => {
            // A reader never joins a group; librdkafka still wants a group id to fetch or
            // commit offsets, and one of its own otherwise.
            c.set("group.id", group.map_or_else(|| format!("{client_id}.reader"), str::to_string));
            c.set("enable.auto.commit", "false");
            c.set("enable.auto.offset.store", "false");
        }
        ClientRole::Admin => {}
    }
    debug_assert!(consumer == c.get("group.id").is_some());
    c
}

/// A durable acknowledgement that resolves once the broker has the event (acks=all).
pub type Ack = BoxFuture<'static, Result<(), BusError>>;

/// Hands canonical events to the bus.
pub trait Publisher: Send + Sync {
    /// Queues one event for `topic`, keyed by its aggregate id. Waits only while the client's
    /// queue is full; the returned [`Ack`] resolves when the broker has acknowledged it.
    fn publish(&self, topic: &str, event: &CanonicalEvent) -> impl Future<Output = Result<Ack, BusError>> + Send;
    /// Queues one event for every partition of `topic` (a marker each partition's consumer must
    /// see, in order with the events before it); one [`Ack`] per partition.
    fn publish_to_all_partitions(
        &self,
        topic: &str,
        event: impl Fn(i32, i32) -> CanonicalEvent + Send,
    ) -> impl Future<Output = Result<Vec<Ack>, BusError>> + Send;
    /// Waits until everything queued is acknowledged or `timeout` passes.
    fn flush(&self, timeout: Duration) -> Result<(), BusError>;
}

/// The rdkafka-backed publisher.
pub struct KafkaPublisher {
    producer: FutureProducer,
    ce_headers: bool,
}

impl KafkaPublisher {
    pub fn new(cfg: &KafkaConfig, client_id: &str) -> Result<Self, BusError> {
        let producer: FutureProducer = client_config(cfg, ClientRole::Producer, client_id).create()?;
        Ok(KafkaPublisher { producer, ce_headers: cfg.ce_headers })
    }
}

impl Publisher for KafkaPublisher {
    async fn publish(&self, topic: &str, event: &CanonicalEvent) -> Result<Ack, BusError> {
        self.send(topic, None, event).await
    }

    async fn publish_to_all_partitions(
        &self,
        topic: &str,
        event: impl Fn(i32, i32) -> CanonicalEvent + Send,
    ) -> Result<Vec<Ack>, BusError> {
        let producer = self.producer.clone();
        let name = topic.to_string();
        let metadata =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(Some(&name), Duration::from_secs(30)))
                .await
                .map_err(|e| BusError::Topic {
                    topic: topic.into(),
                    reason: format!("metadata lookup failed: {e}"),
                })??;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        if partitions == 0 {
            return Err(BusError::Topic { topic: topic.into(), reason: "has no partitions (does it exist?)".into() });
        }
        let mut acks = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            acks.push(self.send(topic, Some(p), &event(p, partitions)).await?);
        }
        Ok(acks)
    }

    fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        self.producer.flush(timeout).map_err(BusError::from)
    }
}

impl KafkaPublisher {
    async fn send(&self, topic: &str, partition: Option<i32>, event: &CanonicalEvent) -> Result<Ack, BusError> {
        let payload = event.encode();
        let headers = if self.ce_headers {
            let mut h = OwnedHeaders::new_with_capacity(7);
            h = h.insert(Header { key: "content-type", value: Some(CONTENT_TYPE) });
            for (k, v) in event.ce_headers() {
                h = h.insert(Header { key: k, value: Some(v.as_str()) });
            }
            Some(h)
        } else {
            None
        };
        let mut record = FutureRecord::to(topic).key(event.key()).payload(&payload);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let fut = loop {
            match self.producer.send_result(record) {
                Ok(fut) => break fut,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) if oversized(&e) => {
                    let producer = self.producer.clone();
                    let (topic, stripped, size) = (topic.to_string(), event.without_images(), payload.len());
                    return Ok(
                        async move { dead_letter_oversized(&producer, &topic, stripped, size, &e).await }.boxed()
                    );
                }
                Err((e, _)) => {
                    return Err(BusError::Delivery { id: event.id.clone(), topic: topic.into(), error: Box::new(e) });
                }
            }
        };
        let id = event.id.clone();
        let topic = topic.to_string();
        let producer = self.producer.clone();
        let (stripped, size) = (event.without_images(), payload.len());
        drop(payload);
        Ok(async move {
            match fut.await {
                Ok(Ok(_delivery)) => Ok(()),
                Ok(Err((error, _msg))) if oversized(&error) => {
                    dead_letter_oversized(&producer, &topic, stripped, size, &error).await
                }
                Ok(Err((error, _msg))) => Err(BusError::Delivery { id, topic, error: Box::new(error) }),
                Err(_) => Err(BusError::Cancelled { id, topic }),
            }
        }
        .boxed())
    }
}

fn oversized(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(Code::MessageSizeTooLarge)
}

/// The body of a dead letter on `<topic>.dlq`, as every stage writes it.
pub fn dead_letter_body(
    service: &str,
    stage: &str,
    error: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    event: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "service": service,
        "stage": stage,
        "error": error,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "failedAt": bson::DateTime::now().try_to_rfc3339_string().unwrap_or_default(),
        "event": event,
    })
}

/// An event too large for the broker (or the producer's `message.max.bytes`). Stopping on it
/// would stop the tail for good, since a restart meets the same change again; so its envelope,
/// without the document images, goes to `<topic>.dlq` with the error and the remedy, loudly,
/// and the tail moves on. The service documents it would have changed are then stale until the
/// document changes again or is re-snapshotted, which `ficus verify` shows.
async fn dead_letter_oversized(
    producer: &FutureProducer,
    topic: &str,
    event: CanonicalEvent,
    size: usize,
    error: &KafkaError,
) -> Result<(), BusError> {
    let error = format!(
        "the event is {size} bytes, too large for {topic} ({error}); raise the producer's message.max.bytes \
         ([kafka.producer]) and the topic's max.message.bytes, then re-snapshot (`ficus run --resnapshot`) to carry it"
    );
    tracing::error!(topic, event_id = %event.id, aggregate = %event.subject, size, "event too large for Kafka: dead-lettered without its document: {error}");
    metrics::counter!("ficus_events_dead_lettered_total", "service" => "tail", "topic" => topic.to_string(), "stage" => "publish").increment(1);
    let body = dead_letter_body("tail", "publish", &error, topic, -1, -1, event.to_json());
    let payload = serde_json::to_vec(&body).expect("JSON values serialise");
    let dlq = format!("{topic}.dlq");
    let record = FutureRecord::to(&dlq).key(event.key()).payload(&payload);
    match producer.send(record, Duration::from_secs(30)).await {
        Ok(_) => Ok(()),
        Err((error, _)) => Err(BusError::Delivery { id: event.id.clone(), topic: dlq, error: Box::new(error) }),
    }
}

/// How an existing topic differs from its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    Missing,
    Ok,
    /// One line per difference.
    Drift(Vec<String>),
}

/// The outcome for one topic of `apply` or `check`.
#[derive(Debug, Clone)]
pub struct TopicReport {
    pub topic: String,
    pub state: TopicState,
    /// Set by `apply` when it created the topic.
    pub created: bool,
}

/// Provisions and inspects topics through the admin API.
pub struct TopicAdmin {
    admin: AdminClient<DefaultClientContext>,
    timeout: Duration,
}

impl TopicAdmin {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, BusError> {
        let admin = client_config(cfg, ClientRole::Admin, "ficus-admin").create()?;
        Ok(TopicAdmin { admin, timeout: Duration::from_secs(30) })
    }

    /// Compares one topic with its definition: partition count, replication factor, configs.
    pub async fn inspect(&self, def: &TopicDef) -> Result<TopicState, BusError> {
        self.inspect_named(&def.topic, def.partitions, def.replication_factor, &def.config).await
    }

    /// [`TopicAdmin::inspect`] for a topic without a definition of its own (dead letters).
    pub async fn inspect_named(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
        config: &BTreeMap<String, String>,
    ) -> Result<TopicState, BusError> {
        let md = {
            let admin = &self.admin;
            let topic = topic.to_string();
            let timeout = self.timeout;
            // Metadata calls block; keep them off the runtime's worker threads.
            tokio::task::block_in_place(|| admin.inner().fetch_metadata(Some(&topic), timeout))?
        };
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(TopicState::Missing);
        };
        if let Some(err) = t.error()
            && matches!(RDKafkaErrorCode::from(err), Code::UnknownTopicOrPartition | Code::UnknownTopic)
        {
            return Ok(TopicState::Missing);
        }
        if t.partitions().is_empty() {
            return Ok(TopicState::Missing);
        }
        let mut drift = Vec::new();
        let have = t.partitions().len() as i32;
        if have != partitions {
            drift.push(format!("partitions: defined {partitions}, found {have}"));
        }
        let rf = t.partitions().iter().map(|p| p.replicas().len() as i32).min().unwrap_or(0);
        if rf != replication {
            drift.push(format!("replication_factor: defined {replication}, found {rf}"));
        }
        if !config.is_empty() {
            let opts = AdminOptions::new().request_timeout(Some(self.timeout));
            match self.admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts).await {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(res)) => {
                        let entries = res.entry_map();
                        for (k, want) in config {
                            match entries.get(k.as_str()).and_then(|e| e.value.as_deref()) {
                                Some(v) if v == want => {}
                                Some(v) => drift.push(format!("config {k}: defined {want}, found {v}")),
                                None => drift.push(format!("config {k}: defined {want}, not reported by the broker")),
                            }
                        }
                    }
                    Some(Err(code)) => drift.push(format!("configs could not be described: {code:?}")),
                    None => drift.push("configs could not be described: empty answer".into()),
                },
                Err(e) => drift.push(format!("configs could not be described: {e}")),
            }
        }
        Ok(if drift.is_empty() { TopicState::Ok } else { TopicState::Drift(drift) })
    }

    /// Creates the topic if missing; reports drift otherwise (never alters an existing topic:
    /// repartitioning reorders keys and is an operator's decision).
    pub async fn apply(&self, def: &TopicDef) -> Result<TopicReport, BusError> {
        self.apply_named(&def.topic, def.partitions, def.replication_factor, &def.config).await
    }

    /// [`TopicAdmin::apply`] for a topic that has no definition of its own (dead letters).
    pub async fn apply_named(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
        config: &BTreeMap<String, String>,
    ) -> Result<TopicReport, BusError> {
        let state = self.inspect_named(topic, partitions, replication, config).await?;
        if state != TopicState::Missing {
            return Ok(TopicReport { topic: topic.to_string(), state, created: false });
        }
        let mut nt = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        for (k, v) in config {
            nt = nt.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout)).request_timeout(Some(self.timeout));
        let results = self.admin.create_topics([&nt], &opts).await?;
        for r in results {
            if let Err((name, code)) = r
                && code != Code::TopicAlreadyExists
            {
                return Err(BusError::Topic { topic: name, reason: format!("create failed: {code}") });
            }
        }
        // Creation is asynchronous in Kafka: wait until the metadata shows every partition.
        let state = self.wait_visible(topic, partitions, replication, config).await?;
        Ok(TopicReport { topic: topic.to_string(), state, created: true })
    }

    async fn wait_visible(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
        config: &BTreeMap<String, String>,
    ) -> Result<TopicState, BusError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let state = self.inspect_named(topic, partitions, replication, config).await?;
            if state != TopicState::Missing || tokio::time::Instant::now() > deadline {
                return Ok(state);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
