//! The consume role: Kafka → transforms → one service database, at least once, idempotently.
//!
//! One consumer group per service (`ficus.<service>`), subscribed to the topics its transforms
//! read. Messages are taken in batches; each is decoded, transformed (pure) and written through
//! the [`Sink`], and only then are their offsets stored for commit, so an offset never passes a
//! write that is not durable. Processing happens between polls, and rebalance callbacks only
//! run inside a poll, so no work is ever in flight when partitions are released: the revoke
//! callback commits what was stored, and any message collected for a partition that was taken
//! away is dropped unprocessed (its new owner reads it from the committed offset).
//!
//! A message that cannot be decoded or transformed, or whose write fails permanently, goes to
//! the topic's dead-letter topic (`<topic>.dlq`) with the error, and the consumer moves on.
//! Transient failures (target down, network) retry with backoff and never skip.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bson::DateTime;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::bus::Delivery;
use crate::bus::{BusError, ClientRole, GroupConsumer, client_config, dead_letter_body};
use crate::config::{KafkaConfig, Membership};
use crate::event::CanonicalEvent;
use crate::mongo::ErrorClass;
use crate::ops::Health;
use crate::presence::{InstanceConflict, PresenceError, Slot};
use crate::retry::with_backoff;
use crate::sink::{Sink, SinkError, Versioned};
use crate::transform::ServiceTransforms;

/// Errors of the consume role.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Presence(#[from] PresenceError),
}

impl ConsumeError {
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumeError::Bus(e) => e.is_transient(),
            ConsumeError::Sink(e) => e.class() == ErrorClass::Transient,
            ConsumeError::Presence(e) => e.is_transient(),
        }
    }

    /// See [`BusError::is_misconfiguration`]: two processes with one instance id.
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            ConsumeError::Bus(e) => e.is_misconfiguration(),
            ConsumeError::Presence(PresenceError::Conflict(_)) => true,
            _ => false,
        }
    }
}

impl From<rdkafka::error::KafkaError> for ConsumeError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        ConsumeError::Bus(BusError::Kafka(e))
    }
}

/// The consumer group of a service.
pub fn group_id(service: &str) -> String {
    format!("ficus.{service}")
}

/// What became of one delivery after transformation.
pub(crate) enum Prepared {
    Write(Versioned),
    Dead { error: String, stage: &'static str },
}

/// Decodes and transforms one delivery (pure).
pub(crate) fn prepare(transforms: &ServiceTransforms, d: &Delivery) -> Prepared {
    let ev = match CanonicalEvent::decode(&d.payload) {
        Ok(ev) => ev,
        Err(e) => return Prepared::Dead { error: format!("undecodable message: {e}"), stage: "decode" },
    };
    match transforms.apply(&ev) {
        Ok(ops) => Prepared::Write(Versioned::of(&ev, ops)),
        Err(e) => Prepared::Dead { error: e.to_string(), stage: "transform" },
    }
}

/// Publishes dead letters, awaiting the broker's acknowledgement.
pub struct DeadLetters {
    producer: FutureProducer,
    service: String,
}

impl DeadLetters {
    pub fn new(cfg: &KafkaConfig, service: &str) -> Result<Self, BusError> {
        let producer = client_config(cfg, ClientRole::Producer, &format!("ficus-dlq-{service}")).create()?;
        Ok(DeadLetters { producer, service: service.to_string() })
    }

    /// Sends one failed delivery to `<topic>.dlq` and waits until it is durable.
    pub async fn send(&self, d: &Delivery, stage: &str, error: &str) -> Result<(), BusError> {
        let original = match serde_json::from_slice::<Value>(&d.payload) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(&d.payload).into_owned()),
        };
        let body = dead_letter_body(&self.service, stage, error, &d.topic, d.partition, d.offset, original);
        let payload = serde_json::to_vec(&body).expect("JSON values serialise");
        let dlq = format!("{}.dlq", d.topic);
        let headers = OwnedHeaders::new()
            .insert(Header { key: "ficus_service", value: Some(self.service.as_str()) })
            .insert(Header { key: "ficus_error", value: Some(error) });
        let mut record = FutureRecord::to(&dlq).payload(&payload).headers(headers);
        if let Some(k) = &d.key {
            record = record.key(k.as_slice());
        }
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => {
                metrics::counter!("ficus_events_dead_lettered_total", "service" => self.service.clone(), "topic" => d.topic.clone(), "stage" => stage.to_string()).increment(1);
                let event_id = body["event"].get("id").and_then(Value::as_str).unwrap_or("");
                let aggregate = body["event"].get("subject").and_then(Value::as_str).unwrap_or("");
                warn!(service = %self.service, topic = %d.topic, partition = d.partition, offset = d.offset, event_id, aggregate, stage, error, "dead-lettered");
                Ok(())
            }
            Err((error, _)) => Err(BusError::Delivery {
                id: format!("{}@{}:{}", d.topic, d.partition, d.offset),
                topic: dlq,
                error: Box::new(error),
            }),
        }
    }
}

/// Applies a batch: transform, write (retrying transient failures), dead-letter the rest.
/// Returns when every delivery is either durable in the target or durable in a DLQ.
pub async fn process_batch<S: Sink>(
    transforms: &ServiceTransforms,
    sink: &S,
    dlq: &DeadLetters,
    batch: &[Delivery],
    shutdown: &CancellationToken,
) -> Result<(), ConsumeError> {
    let service = transforms.service().to_string();
    let mut writes: Vec<(usize, Versioned)> = Vec::with_capacity(batch.len());
    for (i, d) in batch.iter().enumerate() {
        match prepare(transforms, d) {
            Prepared::Write(v) => writes.push((i, v)),
            Prepared::Dead { error, stage } => dlq.send(d, stage, &error).await?,
        }
    }
    let versioned: Vec<Versioned> = writes.iter().map(|(_, v)| v.clone()).collect();
    let started = std::time::Instant::now();
    let whole = with_backoff(
        &format!("consume:{service}"),
        shutdown,
        || sink.apply(&versioned),
        |e| e.class() == ErrorClass::Transient,
    )
    .await;
    match whole {
        Ok(()) => {}
        Err(e) if e.class() == ErrorClass::Transient => return Err(e.into()), // shutdown during retries
        Err(e) => {
            // A permanent failure somewhere in the batch: apply one by one to find the culprits.
            warn!(%service, error = %e, "batch write failed permanently; isolating the failing events");
            for (i, v) in &writes {
                let one = std::slice::from_ref(v);
                match with_backoff(
                    &format!("consume:{service}"),
                    shutdown,
                    || sink.apply(one),
                    |e| e.class() == ErrorClass::Transient,
                )
                .await
                {
                    Ok(()) => {}
                    Err(e) if e.class() == ErrorClass::Transient => return Err(e.into()),
                    Err(e) => dlq.send(&batch[*i], "write", &e.to_string()).await?,
                }
            }
        }
    }
    metrics::histogram!("ficus_consume_apply_seconds", "service" => service.clone())
        .record(started.elapsed().as_secs_f64());
    let now = DateTime::now();
    let e2e = metrics::histogram!("ficus_end_to_end_latency_seconds", "service" => service.clone());
    for (_, v) in &writes {
        e2e.record(now.saturating_duration_since(v.event_time).as_secs_f64());
    }
    metrics::histogram!("ficus_consume_batch_size", "service" => service.clone()).record(batch.len() as f64);
    metrics::counter!("ficus_events_applied_total", "service" => service).increment(writes.len() as u64);
    Ok(())
}

/// The consume role for one service.
pub struct ServiceConsumer<S> {
    pub transforms: Arc<ServiceTransforms>,
    pub health: Health,
    /// ficus's store (the registry of group members).
    pub store: mongodb::Database,
    pub sink: S,
    pub kafka: KafkaConfig,
    pub batch_max: usize,
    pub batch_wait: Duration,
}

impl<S: Sink> ServiceConsumer<S> {
    /// Runs until shutdown (finishing the batch at hand and committing) or a fatal error.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ConsumeError> {
        let role = format!("consume:{}", self.transforms.service());
        let attempt = || async {
            let r = self.attempt(&shutdown).await;
            if r.is_err() {
                self.health.disconnected(&role);
            }
            r
        };
        with_backoff(&role, &shutdown, attempt, ConsumeError::is_transient).await
    }

    async fn attempt(&self, shutdown: &CancellationToken) -> Result<(), ConsumeError> {
        let service = self.transforms.service();
        let group = group_id(service);
        let role = format!("consume:{service}");
        let topics: Vec<String> = self.transforms.topics().into_iter().collect();
        // Claim this process's slot in the group before joining it (see `presence`).
        let Some(slot) = claim_slot(&self.store, &self.kafka, &group, shutdown).await? else { return Ok(()) };
        let consumer = GroupConsumer::join(&self.kafka, &group, &topics, &format!("ficus-consume-{service}"))?;
        let dlq = DeadLetters::new(&self.kafka, service)?;
        info!(service, %group, topics = ?topics, "consuming");

        let watching = shutdown.child_token();
        let keeper = tokio::spawn(crate::presence::keep(
            slot.clone(),
            consumer.clone(),
            role.clone(),
            self.health.clone(),
            watching.clone(),
        ));
        let result = tokio::select! {
            r = self.consume_loop(&consumer, &dlq, &role, shutdown) => r,
            kept = keeper_ended(&watching, keeper) => kept,
        };
        watching.cancel();
        // Commit whatever was stored, whether stopping cleanly or on an error.
        consumer.close();
        if shutdown.is_cancelled() {
            slot.release().await;
        }
        result
    }

    async fn consume_loop(
        &self,
        consumer: &GroupConsumer,
        dlq: &DeadLetters,
        role: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumeError> {
        let idle = |up| if up { self.health.beat(role) } else { self.health.disconnected(role) };
        while let Some(batch) = consumer.next_batch(self.batch_max, self.batch_wait, shutdown, idle).await? {
            process_batch(&self.transforms, &self.sink, dlq, &batch, shutdown).await?;
            consumer.store_offsets(&batch)?;
        }
        Ok(())
    }
}

/// Claims this process's slot in `group` in the store's registry (see `presence`): the slot
/// `kafka.instance_id` with static membership, a per-process one with dynamic membership.
/// `None` when shutdown came first.
pub(crate) async fn claim_slot(
    store: &mongodb::Database,
    kafka: &KafkaConfig,
    group: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Slot>, PresenceError> {
    let instance = match kafka.membership {
        Membership::Static => kafka.instance_id.clone(),
        Membership::Dynamic => format!("{}#{}", kafka.instance_id, std::process::id()),
    };
    Slot::claim(store, group, &instance, shutdown).await
}

/// Waits for the member's keeper: it only ends early when another process took the slot.
pub(crate) async fn keeper_ended<E: From<PresenceError>>(
    watching: &CancellationToken,
    keeper: tokio::task::JoinHandle<Result<(), InstanceConflict>>,
) -> Result<(), E> {
    let _ = watching;
    match keeper.await {
        Ok(Err(conflict)) => Err(PresenceError::from(conflict).into()),
        // Stopped by the token, or the task panicked: either way the loop decides.
        _ => std::future::pending().await,
    }
}

/// What `ficus dlq replay` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters of this service applied successfully now.
    pub applied: u64,
    /// Dead letters that failed again (re-dead-lettered with the new error).
    pub failed: u64,
    /// Dead letters of other services, left alone.
    pub skipped: u64,
}

/// Re-drives a service's dead letters through the same transform-and-write path, reading each
/// `<topic>.dlq` up to its end as of the start, in the group `ficus.<service>.dlq`. What fails
/// again is dead-lettered again (after the point this run stops at) so nothing is lost.
pub async fn replay_dead_letters<S: Sink>(
    transforms: &ServiceTransforms,
    sink: &S,
    kafka: &KafkaConfig,
    shutdown: &CancellationToken,
) -> Result<ReplayReport, ConsumeError> {
    use rdkafka::consumer::BaseConsumer;
    let service = transforms.service();
    let group = format!("{}.dlq", group_id(service));
    let cfg = client_config(kafka, ClientRole::Reader { group: Some(&group) }, &format!("ficus-dlq-replay-{service}"));
    let consumer: BaseConsumer = cfg.create()?;
    let dlq = DeadLetters::new(kafka, service)?;

    // Where each dead-letter partition ends now, and where this group left off.
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let mut assign = TopicPartitionList::new();
    for topic in transforms.topics() {
        let dlq_topic = format!("{topic}.dlq");
        let md = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(&dlq_topic), Duration::from_secs(10)))?;
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            let (_low, high) =
                tokio::task::block_in_place(|| consumer.fetch_watermarks(&dlq_topic, p.id(), Duration::from_secs(10)))?;
            ends.insert((dlq_topic.clone(), p.id()), high);
            assign.add_partition(&dlq_topic, p.id());
        }
    }
    let committed =
        tokio::task::block_in_place(|| consumer.committed_offsets(assign.clone(), Duration::from_secs(10)))?;
    let mut start = TopicPartitionList::new();
    for e in committed.elements() {
        let off = match e.offset() {
            rdkafka::Offset::Offset(o) => rdkafka::Offset::Offset(o),
            _ => rdkafka::Offset::Beginning,
        };
        start.add_partition_offset(e.topic(), e.partition(), off)?;
    }
    consumer.assign(&start)?;

    let mut report = ReplayReport::default();
    let mut position: HashMap<(String, i32), i64> = committed
        .elements()
        .iter()
        .map(|e| {
            ((e.topic().to_string(), e.partition()), if let rdkafka::Offset::Offset(o) = e.offset() { o } else { 0 })
        })
        .collect();
    let done = |position: &HashMap<(String, i32), i64>| {
        ends.iter().all(|(k, end)| position.get(k).copied().unwrap_or(0) >= *end)
    };
    while !done(&position) && !shutdown.is_cancelled() {
        let Some(m) = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200))) else { continue };
        let m = m?;
        let key = (m.topic().to_string(), m.partition());
        let offset = m.offset();
        if ends.get(&key).is_some_and(|end| offset >= *end) {
            position.insert(key, offset);
            continue;
        }
        let body: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
        if body.get("service").and_then(Value::as_str) == Some(service) {
            let original = Delivery {
                topic: body.get("topic").and_then(Value::as_str).unwrap_or_default().to_string(),
                partition: body.get("partition").and_then(Value::as_i64).unwrap_or(-1) as i32,
                offset: body.get("offset").and_then(Value::as_i64).unwrap_or(-1),
                key: m.key().map(<[u8]>::to_vec),
                payload: match body.get("event") {
                    Some(Value::String(s)) => s.clone().into_bytes(),
                    Some(v) => serde_json::to_vec(v).expect("JSON values serialise"),
                    None => Vec::new(),
                },
            };
            match prepare(transforms, &original) {
                Prepared::Write(v) => match with_backoff(
                    "dlq-replay",
                    shutdown,
                    || sink.apply(std::slice::from_ref(&v)),
                    |e| e.class() == ErrorClass::Transient,
                )
                .await
                {
                    Ok(()) => report.applied += 1,
                    Err(e) if e.class() == ErrorClass::Transient => return Err(e.into()),
                    Err(e) => {
                        dlq.send(&original, "write", &e.to_string()).await?;
                        report.failed += 1;
                    }
                },
                Prepared::Dead { error, stage } => {
                    dlq.send(&original, stage, &error).await?;
                    report.failed += 1;
                }
            }
        } else {
            report.skipped += 1;
        }
        consumer.store_offset(m.topic(), m.partition(), offset)?;
        position.insert(key, offset + 1);
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    Ok(report)
}
