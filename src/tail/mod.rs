//! The tail role: a source's changes → canonical events → Kafka, with checkpoint-after-ack.
//!
//! On first start (no checkpoint) it captures the source's cluster time, copies every defined
//! collection as snapshot events (`snapshot`), then streams changes from that captured point
//! (`stream`), so nothing changed during the copy is missed. The copy is resumable: progress
//! (the last `_id` whose events Kafka acknowledged) is checkpointed batch by batch. A checkpoint
//! only ever names a point whose every earlier event Kafka has acknowledged ([`ack`]).
//!
//! - [`checkpoint`]: the durable state, and the store it lives in;
//! - [`lease`]: one active tailer per source, fenced checkpoints;
//! - [`role`]: the role as `ficus run` runs it: wait for the lease, tail, stand by again.

pub mod ack;
pub mod checkpoint;
pub mod echo;
pub mod lease;
pub mod reverse;
pub mod role;
mod snapshot;
mod stream;

use std::sync::Arc;

use bson::DateTime;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::bus::{Ack, BusError, Publisher};
use crate::config::topics::Topics;
use crate::config::{OnHistoryLost, SnapshotConfig, TailConfig};
use crate::event::mapping::{ChangeRecord, map_change};
use crate::mongo::ErrorClass;
use crate::ops::{Health, RoleId};
use crate::retry::Classify;
use crate::retry::with_backoff;
use crate::source::{Handoff, Source, SourceError};
use checkpoint::{CheckpointError, CheckpointStore, SnapshotProgress, TailPhase, TailState};

/// Errors of the tail role.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the change-stream reader stopped unexpectedly: {0}")]
    Reader(String),
    #[error("ficus's store (lease): {}", crate::mongo::describe(.0))]
    Store(#[from] mongodb::error::Error),
    #[error(transparent)]
    Ownership(#[from] crate::cutover::ownership::OwnershipError),
}

impl Classify for TailError {
    fn class(&self) -> ErrorClass {
        match self {
            TailError::Source(e) => e.class(),
            TailError::Bus(e) => e.class(),
            TailError::Checkpoint(CheckpointError::Mongo(e)) => e.class(),
            TailError::Checkpoint(CheckpointError::Corrupt { .. } | CheckpointError::Fenced { .. }) => {
                ErrorClass::Fatal
            }
            TailError::Reader(_) => ErrorClass::Transient,
            TailError::Store(e) => e.class(),
            TailError::Ownership(e) => e.class(),
        }
    }
}

/// Everything the tailer needs, passed in.
pub struct Tailer<S, P, C> {
    pub source_name: String,
    pub topics: Arc<Topics>,
    pub source: S,
    pub publisher: Arc<P>,
    pub checkpoints: C,
    pub tail: TailConfig,
    pub snapshot: SnapshotConfig,
    /// The lease epoch this tailer holds (fences its checkpoints); `None` without a lease.
    pub epoch: Option<i64>,
    pub health: Health,
    pub role: RoleId,
    /// Where a source without a checkpoint starts.
    pub start: TailStart,
    /// What becomes of ficus's own writes coming back ([`echo`]).
    pub echoes: Echoes,
    /// Which changes are published at all (`None`: every one).
    pub admit: Option<Admit>,
}

/// Where a tailer without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailStart {
    /// Copy every collection, then stream from the point captured before the copy (the monolith).
    Snapshot,
    /// Stream from this cluster time on, copying nothing (a service database, already in step,
    /// from where the service began to own keys).
    At(bson::Timestamp),
}

/// What a tailer does with a change ficus's own write caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echoes {
    /// Publish it with its origin: other targets read it, only the one that caused it skips it
    /// (the monolith's tailer: a service's write-back is input for other services).
    Publish,
    /// Drop it (a service database's tailer: its only reader is the monolith, which sent it).
    Drop,
}

/// Decides, per change, whether a tailer publishes it (the reverse tailer publishes only
/// changes of documents the service owned when they were made). May wait (for a view of
/// ownership recent enough to judge the change).
pub trait Admission: Send + Sync {
    fn admit<'a>(&'a self, record: &'a ChangeRecord) -> futures::future::BoxFuture<'a, Result<bool, TailError>>;
}

/// A tailer's admission policy.
pub type Admit = Arc<dyn Admission>;

impl<S: Source, P: Publisher + 'static, C: CheckpointStore> Tailer<S, P, C> {
    /// Runs until `shutdown` is cancelled (then drains, checkpoints and returns `Ok`) or a fatal
    /// error. Transient errors restart from the last checkpoint with backoff.
    pub async fn run(&self, shutdown: CancellationToken, mut resnapshot: bool) -> Result<(), TailError> {
        with_backoff(
            "tail",
            &shutdown,
            || {
                let fresh = std::mem::take(&mut resnapshot);
                let shutdown = &shutdown;
                async move {
                    let r = self.attempt(shutdown, fresh).await;
                    if r.is_err() {
                        self.health.disconnected(&self.role);
                    }
                    r
                }
            },
            TailError::is_transient,
        )
        .await
    }

    async fn attempt(&self, shutdown: &CancellationToken, resnapshot: bool) -> Result<(), TailError> {
        if resnapshot {
            warn!(source = %self.source_name, "re-snapshot requested: discarding the checkpoint");
            self.checkpoints.clear(&self.source_name, self.epoch).await?;
        }
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let mut state = match self.checkpoints.load(&self.source_name).await? {
                Some(s) => s,
                None => self.begin().await?,
            };
            if let TailPhase::Snapshot(progress) = state.phase.clone()
                && !self.copy(&mut state, progress, shutdown).await?
            {
                return Ok(()); // stopped by shutdown mid-copy; progress is saved
            }
            match self.stream(&mut state, shutdown).await {
                Err(TailError::Source(SourceError::HistoryLost { detail }))
                    if self.tail.on_history_lost == OnHistoryLost::Resnapshot =>
                {
                    warn!(source = %self.source_name, %detail, "change stream history lost: taking a fresh snapshot (tail.on_history_lost = resnapshot)");
                    metrics::counter!("ficus_tail_resnapshots_total").increment(1);
                    self.checkpoints.clear(&self.source_name, self.epoch).await?;
                }
                other => return other,
            }
        }
    }

    async fn begin(&self) -> Result<TailState, TailError> {
        let phase = match self.start {
            TailStart::Snapshot => {
                let Handoff { version: start_time, resume: start_token } = self.source.snapshot_start().await?;
                info!(source = %self.source_name, start = ?start_time, "no checkpoint: starting the initial snapshot");
                TailPhase::Snapshot(SnapshotProgress {
                    start_time,
                    start_token,
                    done: Vec::new(),
                    current: None,
                    last_id: None,
                    copied: 0,
                })
            }
            TailStart::At(at) => {
                info!(source = %self.source_name, start = ?at, "no checkpoint: streaming from where ownership began");
                TailPhase::Stream(checkpoint::StreamPosition { resume_token: None, cluster_time: at, index: 0 })
            }
        };
        let state = TailState {
            source: self.source_name.clone(),
            phase,
            updated_at: DateTime::now(),
            last_event_time: None,
            token_time: None,
            epoch: self.epoch,
        };
        self.checkpoints.save(&state).await?;
        Ok(state)
    }

    /// Maps one change and hands its events to the publisher, returning their acknowledgements.
    async fn publish(&self, topic: &str, record: ChangeRecord) -> Result<Vec<Ack>, TailError> {
        let Some(def) = self.topics.for_collection(&record.collection) else {
            debug!(collection = %record.collection, "change in a collection without a topic definition");
            return Ok(Vec::new());
        };
        let mapped = map_change(def, &self.source_name, record);
        if let Some(why) = mapped.key_fallback {
            warn!(topic, "keyed by _id instead of the aggregate key: {why}");
            metrics::counter!("ficus_tail_key_fallback_total", "topic" => topic.to_string()).increment(1);
        }
        let mut acks = Vec::with_capacity(mapped.events.len());
        for ev in &mapped.events {
            // Everything logged while handing this event over carries its id and aggregate.
            let span = tracing::debug_span!("event", id = %ev.id, aggregate = %ev.subject, r#type = %ev.event_type);
            acks.push(self.publisher.publish(topic, ev).instrument(span).await?);
            metrics::counter!("ficus_events_published_total", "topic" => topic.to_string(), "type" => ev.event_type.clone()).increment(1);
        }
        Ok(acks)
    }

    /// Saves the state under this tailer's lease epoch.
    async fn save(&self, state: &mut TailState) -> Result<(), TailError> {
        state.epoch = self.epoch;
        state.updated_at = DateTime::now();
        self.checkpoints.save(state).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use bson::{Bson, doc};

    use super::*;
    use crate::config::TailConfig;
    use crate::consume::{Applier, Item, Path as ApplyPath, Rejects};
    use crate::event::{Message, Op};
    use crate::testkit::memory::{MemoryCheckpoints, MemoryPublisher, MemorySink, MemorySource};
    use crate::transform::load_service;

    fn repo(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    fn customer(n: u32, purchases: &[&str]) -> bson::Document {
        let purchases: Vec<Bson> = purchases
            .iter()
            .map(|p| Bson::Document(doc! { "id": *p, "product_id": "SKU-1", "amount": "10.50", "currency": "THB" }))
            .collect();
        doc! { "_id": format!("{n:04}"), "user_id": format!("U{n}"), "name": format!("N{n}"), "ltv": "1.00", "purchases": purchases }
    }

    fn change(op: Op, before: Option<bson::Document>, after: Option<bson::Document>) -> ChangeRecord {
        let id = after.as_ref().or(before.as_ref()).and_then(|d| d.get("_id").cloned()).unwrap_or(Bson::Null);
        ChangeRecord {
            op,
            collection: "customers".into(),
            document_id: id,
            after,
            before,
            changed: None,
            removed: Vec::new(),
            truncated: Vec::new(),
            cluster_time: bson::Timestamp { time: 0, increment: 0 },
            index: 0,
            wall_time: None,
            resume_token: None,
            txn: None,
            origin: None,
        }
    }

    /// A tailer of `source` onto `publisher`, in memory, that publishes echoes tagged.
    fn in_memory(
        topics: Arc<Topics>,
        source: &MemorySource,
        publisher: &Arc<MemoryPublisher>,
    ) -> Tailer<MemorySource, MemoryPublisher, MemoryCheckpoints> {
        Tailer {
            source_name: "linechatbot".into(),
            topics,
            source: source.clone(),
            publisher: publisher.clone(),
            checkpoints: MemoryCheckpoints::default(),
            tail: TailConfig {
                on_history_lost: OnHistoryLost::Fail,
                max_in_flight: 100,
                checkpoint_interval: Duration::from_millis(10),
                max_await: Duration::from_millis(10),
                batch_size: 10,
                lease_ttl: Duration::from_secs(15),
            },
            snapshot: SnapshotConfig { batch_size: 1, max_docs_per_sec: 0 },
            epoch: None,
            health: Health::new(Duration::from_secs(60)),
            role: RoleId::Tail,
            start: TailStart::Snapshot,
            echoes: Echoes::Publish,
            admit: None,
        }
    }

    /// The tail and a consumer driven through in-memory implementations of the source, the
    /// bus, the checkpoint store and the sink: the snapshot, its markers, the changes after it,
    /// the checkpoint, and the service database they build.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_tail_and_a_consumer_in_memory() {
        let topics = Arc::new(crate::config::topics::load(&repo("topics")).unwrap());
        let source = MemorySource::new();
        source.seed("customers", customer(1, &["P1"]));
        source.seed("customers", customer(2, &["P2", "P3"]));
        let publisher = Arc::new(MemoryPublisher::with_partitions(&[("linechatbot.customers", 2)]));
        let tailer = in_memory(topics, &source, &publisher);
        let stop = CancellationToken::new();
        let tailer = Arc::new(tailer);
        let running = {
            let (t, stop) = (tailer.clone(), stop.clone());
            tokio::spawn(async move { t.run(stop, false).await })
        };
        let count = |p: &MemoryPublisher| p.published().len();
        // Copies of every collection done (the snapshot ends before the stream starts).
        while !matches!(tailer.checkpoints.get("linechatbot").map(|s| s.phase), Some(TailPhase::Stream(_)))
            || count(&publisher) < 7
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Customer 2 loses a purchase (a $pull), customer 1 goes, customer 3 comes.
        source.change(change(Op::Update, Some(customer(2, &["P2", "P3"])), Some(customer(2, &["P3"]))));
        source.change(change(Op::Delete, Some(customer(1, &["P1"])), None));
        let last = source.change(change(Op::Insert, None, Some(customer(3, &[]))));
        let streamed = |t: &Tailer<MemorySource, MemoryPublisher, MemoryCheckpoints>| {
            matches!(t.checkpoints.get("linechatbot").map(|s| s.phase),
                Some(TailPhase::Stream(p)) if p.cluster_time == last)
        };
        while !streamed(&tailer) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        running.await.unwrap().unwrap();

        let published = publisher.published();
        // Every defined collection is copied (the others are empty: just their markers).
        let kinds: Vec<String> = published
            .iter()
            .filter(|p| p.topic == "linechatbot.customers")
            .map(|p| match &p.message {
                Message::Event(e) => e.event_type.clone(),
                Message::Control(c) => format!("{}@{}", c.event_type(), p.partition.unwrap_or(-1)),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "customer.snapshot",
                "customer.purchase_recorded",
                "customer.snapshot",
                "customer.purchase_recorded",
                "customer.purchase_recorded",
                "ficus.control.snapshot_completed@0",
                "ficus.control.snapshot_completed@1",
                "customer.updated",
                "customer.deleted",
                "customer.created",
            ]
        );
        let Some(TailPhase::Stream(pos)) = tailer.checkpoints.get("linechatbot").map(|s| s.phase) else {
            panic!("streaming")
        };
        assert_eq!(pos.resume_token, Some(doc! { "n": 2_i64 }), "the checkpoint covers the last change");

        // A consumer of customers_db reads the topic in order into an in-memory database.
        let topics = crate::config::topics::load(&repo("topics")).unwrap();
        let transforms = load_service(&repo("transforms/customers_db"), &topics).unwrap();
        let sink = MemorySink::default();
        let forward = crate::consume::Forward::new(Arc::new(transforms));
        let applier = Applier {
            transformer: &forward,
            sink: &sink,
            rejects: Rejects::Count,
            path: ApplyPath::Replay,
            origin: None,
            judged: None,
        };
        let items: Vec<Item> = published
            .into_iter()
            .enumerate()
            .map(|(i, p)| Item::archived(p.topic, p.partition.unwrap_or(0), i as i64, p.message))
            .collect();
        let done = applier.apply(&items, &CancellationToken::new()).await.unwrap();
        assert_eq!((done.applied, done.rejected), (items.len() as u64, 0));
        let ids = |c: &str| sink.documents(c).iter().map(|d| d.get_str("_id").unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(ids("customers"), ["U2", "U3"]);
        assert_eq!(ids("customer_events"), ["purchase_made:P3"], "P1 went with its customer, P2 with the $pull");
    }

    /// A feed that goes quiet in the middle of a marked transaction (secantusd-rs answers an
    /// empty batch there): the transaction's later changes are still its echoes, and the
    /// checkpoint stays before its marker until its closing marker.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_quiet_feed_inside_a_marked_transaction_neither_ends_it_nor_checkpoints_in_it() {
        let topics = Arc::new(crate::config::topics::load(&repo("topics")).unwrap());
        let source = MemorySource::new();
        let publisher = Arc::new(MemoryPublisher::with_partitions(&[("linechatbot.customers", 2)]));
        let tailer = Arc::new(in_memory(topics, &source, &publisher));
        let stop = CancellationToken::new();
        let running = {
            let (t, stop) = (tailer.clone(), stop.clone());
            tokio::spawn(async move { t.run(stop, false).await })
        };
        let position = |t: &Tailer<MemorySource, MemoryPublisher, MemoryCheckpoints>| match t
            .checkpoints
            .get("linechatbot")
            .map(|s| s.phase)
        {
            Some(TailPhase::Stream(p)) => Some(p.cluster_time),
            _ => None,
        };
        while position(&tailer).is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let txn = Some(crate::event::mapping::TxnId { lsid: "{\"id\":1}".into(), number: 7 });
        let marked = |mut r: ChangeRecord| {
            r.txn = txn.clone();
            r
        };
        let marker = |after: bson::Document| {
            let mut r = change(Op::Insert, None, Some(after));
            r.collection = crate::markers::COLLECTION.into();
            marked(r)
        };
        let opened = source.change(marker(doc! { "_id": "customers_db/customers/0", "origin": { "service": "customers_db", "collection": "customers" } }));
        source.change(marked(change(Op::Insert, None, Some(customer(1, &[])))));
        while publisher.published().iter().filter(|p| matches!(p.message, Message::Event(_))).count() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Quiet for a while: many empty reads, and checkpoint ticks.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(position(&tailer).is_some_and(|t| t < opened), "no checkpoint inside the marked transaction");
        source.change(marked(change(Op::Update, Some(customer(1, &[])), Some(customer(1, &["P1"])))));
        let closed = source.change(marker(doc! { "_id": "customers_db/customers/0/close", "closes": true }));
        while position(&tailer).is_none_or(|t| t < closed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        running.await.unwrap().unwrap();
        let origins: Vec<Option<String>> = publisher
            .published()
            .iter()
            .filter_map(|p| match &p.message {
                Message::Event(e) => Some(e.origin.as_ref().map(|o| o.render())),
                Message::Control(_) => None,
            })
            .collect();
        assert!(origins.len() >= 2, "{origins:?}");
        assert!(
            origins.iter().all(|o| o.as_deref() == Some("customers_db/customers")),
            "every change of it is an echo: {origins:?}"
        );
    }
}
