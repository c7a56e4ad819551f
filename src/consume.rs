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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bson::DateTime;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{BusError, ClientRole, client_config, dead_letter_body};
use crate::config::KafkaConfig;
use crate::event::CanonicalEvent;
use crate::mongo::ErrorClass;
use crate::ops::Health;
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
}

impl ConsumeError {
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumeError::Bus(e) => e.is_transient(),
            ConsumeError::Sink(e) => e.class() == ErrorClass::Transient,
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

/// Commits stored offsets when partitions are revoked, tells the loop a rebalance happened, and
/// publishes librdkafka's per-partition consumer lag as `ficus_consumer_lag`.
pub struct DrainContext {
    group: String,
    rebalanced: AtomicBool,
    /// Whether any broker connection is up, as of librdkafka's last statistics (or a consumer
    /// error saying all are down since).
    connected: AtomicBool,
}

impl DrainContext {
    pub fn new(group: &str) -> Self {
        DrainContext { group: group.to_string(), rebalanced: AtomicBool::new(false), connected: AtomicBool::new(true) }
    }
}

impl ClientContext for DrainContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        // Bootstrap and learned brokers both count: a consumer is connected while any link is up.
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.connected.store(up, Ordering::SeqCst);
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // librdkafka's internal "unassigned" partition is -1; unknown lag is -1 too.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    let labels =
                        [("group", self.group.clone()), ("topic", topic.clone()), ("partition", partition.to_string())];
                    metrics::gauge!("ficus_consumer_lag", &labels).set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for DrainContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Everything processed has its offset stored; commit it before letting go.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                debug!("commit on revoke: {e}");
            }
            info!(partitions = tpl.count(), "partitions revoked");
        }
        self.rebalanced.store(true, Ordering::SeqCst);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// One message, owned, as taken from Kafka.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
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
        let mut cfg = client_config(&self.kafka, ClientRole::Consumer, &format!("ficus-consume-{service}"));
        cfg.set("group.id", group_id(service));
        let consumer: StreamConsumer<DrainContext> = cfg.create_with_context(DrainContext::new(&group_id(service)))?;
        let topics: Vec<String> = self.transforms.topics().into_iter().collect();
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;
        let dlq = DeadLetters::new(&self.kafka, service)?;
        info!(service, group = %group_id(service), topics = ?topics, "consuming");

        let result = self.consume_loop(&consumer, &dlq, shutdown).await;
        // Commit whatever was stored, whether stopping cleanly or on an error.
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            debug!(service, "final commit: {e}");
        }
        consumer.unsubscribe();
        result
    }

    async fn consume_loop(
        &self,
        consumer: &StreamConsumer<DrainContext>,
        dlq: &DeadLetters,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumeError> {
        let role = format!("consume:{}", self.transforms.service());
        while let Some(batch) =
            next_batch(consumer, self.batch_max, self.batch_wait, shutdown, (&self.health, &role)).await?
        {
            process_batch(&self.transforms, &self.sink, dlq, &batch, shutdown).await?;
            store_offsets(consumer, &batch)?;
        }
        Ok(())
    }
}

/// Collects the next batch: waits for one message (or shutdown, then `None`), then takes more
/// for up to `wait` or until `max`. If a rebalance happened meanwhile, messages of partitions
/// this consumer no longer owns are dropped unprocessed: their new owner reads them from the
/// committed offset. Consumer errors librdkafka recovers from are logged and polling goes on
/// (see [`survive`]); only fatal ones are returned.
pub async fn next_batch(
    consumer: &StreamConsumer<DrainContext>,
    max: usize,
    wait: Duration,
    shutdown: &CancellationToken,
    health: (&Health, &str),
) -> Result<Option<Vec<Delivery>>, rdkafka::error::KafkaError> {
    let (health, role) = health;
    let ctx = consumer.context();
    loop {
        // Idle is healthy while connected: beat while waiting for the first message.
        let first = loop {
            if ctx.connected.load(Ordering::SeqCst) {
                health.beat(role);
            } else {
                health.disconnected(role);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                m = tokio::time::timeout(Duration::from_secs(5), consumer.recv()) => match m {
                    Ok(Ok(m)) => break m,
                    Ok(Err(e)) => survive(ctx, role, e)?,
                    Err(_) => continue,
                },
            }
        };
        let mut batch = vec![Delivery::from_message(&first)];
        drop(first);
        let deadline = tokio::time::Instant::now() + wait;
        while batch.len() < max {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(Delivery::from_message(&m)),
                Ok(Err(e)) => survive(ctx, role, e)?,
                Err(_) => break,
            }
        }
        if consumer.context().rebalanced.swap(false, Ordering::SeqCst) {
            let owned_now: HashSet<(String, i32)> =
                consumer.assignment()?.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
            batch.retain(|d| owned_now.contains(&(d.topic.clone(), d.partition)));
        }
        if !batch.is_empty() {
            return Ok(Some(batch));
        }
    }
}

/// A consumer error seen while polling. librdkafka reports broker outages, timeouts and
/// transport failures as errors but recovers from them itself, reconnecting and rejoining the
/// group with the same consumer: so those are logged and polling goes on. Replacing the
/// consumer instead would leave its old member in the group whenever the broker is
/// unreachable (the leave cannot be sent), and a coordinator that does not evict it (Tansu's)
/// would then hold the group's partitions forever. Errors that no retry can fix end the role.
fn survive(ctx: &DrainContext, role: &str, e: rdkafka::error::KafkaError) -> Result<(), rdkafka::error::KafkaError> {
    use rdkafka::error::KafkaError;
    let transient = matches!(e, KafkaError::MessageConsumption(_)) && BusError::Kafka(e.clone()).is_transient();
    if !transient {
        return Err(e);
    }
    metrics::counter!("ficus_errors_total", "stage" => role.to_string(), "kind" => "transient").increment(1);
    // One warning per outage; the reconnect attempts that follow are logged at debug.
    let was_connected = if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
        ctx.connected.swap(false, Ordering::SeqCst)
    } else {
        ctx.connected.load(Ordering::SeqCst)
    };
    if was_connected {
        warn!(stage = role, error = %e, "consumer error; librdkafka reconnects by itself, polling on");
    } else {
        debug!(stage = role, error = %e, "consumer error while disconnected");
    }
    Ok(())
}

/// Stores, for commit, the offsets after a processed batch (per partition, the next to read).
pub fn store_offsets(
    consumer: &StreamConsumer<DrainContext>,
    batch: &[Delivery],
) -> Result<(), rdkafka::error::KafkaError> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for d in batch {
        let e = next.entry((d.topic.as_str(), d.partition)).or_insert(0);
        *e = (*e).max(d.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // The partition was revoked meanwhile: its new owner re-applies (a no-op by version).
        debug!("store offsets: {e}");
    }
    Ok(())
}

impl Delivery {
    pub fn from_message(m: &rdkafka::message::BorrowedMessage<'_>) -> Delivery {
        Delivery {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        }
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
    let mut cfg = client_config(kafka, ClientRole::Consumer, &format!("ficus-dlq-replay-{service}"));
    cfg.set("group.id", format!("{}.dlq", group_id(service)));
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
