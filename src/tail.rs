//! The tail role: monolith → canonical events → Kafka, with checkpoint-after-ack.
//!
//! On first start (no checkpoint) it captures the source's cluster time, copies every defined
//! collection as snapshot events, then streams changes from that captured point, so nothing
//! changed during the copy is missed. The copy is resumable: progress (the last `_id` whose
//! events Kafka acknowledged) is checkpointed batch by batch.
//!
//! Streaming runs as two tasks joined by a bounded channel: a reader that drains the change
//! stream (never cancelled mid-request, so no batch is half-consumed) and a publisher that maps,
//! hands events to Kafka and keeps acknowledgements in source order. A checkpoint names only the
//! newest point whose every earlier event is acknowledged; quiet periods still advance it with
//! the stream's post-batch resume token.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{Bson, DateTime, Document, Timestamp};
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt, try_join_all};
use futures::stream::FuturesOrdered;
use governor::{Quota, RateLimiter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::bus::{Ack, BusError, Publisher};
use crate::checkpoint::{CheckpointError, CheckpointStore, SnapshotProgress, StreamPosition, TailState};
use crate::config::topics::Topics;
use crate::config::{OnHistoryLost, SnapshotConfig, TailConfig};
use crate::event::{ControlMessage, Op};
use crate::mapping::{ChangeRecord, map_change};
use crate::mongo::ErrorClass;
use crate::ops::Health;
use crate::retry::with_backoff;
use crate::source::{MongoSource, SourceError, StartAt, to_record, token_doc};

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
}

impl TailError {
    pub fn is_transient(&self) -> bool {
        match self {
            TailError::Source(e) => e.class() == ErrorClass::Transient,
            TailError::Bus(e) => e.is_transient(),
            TailError::Checkpoint(CheckpointError::Mongo(e)) => crate::mongo::classify(e) == ErrorClass::Transient,
            TailError::Checkpoint(CheckpointError::Corrupt { .. } | CheckpointError::Fenced { .. }) => false,
            TailError::Reader(_) => true,
        }
    }
}

/// Everything the tailer needs, passed in.
pub struct Tailer<P, C> {
    pub source_name: String,
    pub topics: Arc<Topics>,
    pub source: MongoSource,
    pub publisher: Arc<P>,
    pub checkpoints: C,
    pub tail: TailConfig,
    pub snapshot: SnapshotConfig,
    /// The lease epoch this tailer holds (fences its checkpoints); `None` without a lease.
    pub epoch: Option<i64>,
    pub health: Health,
}

/// Where one published change leaves the checkpoint once all its events are acknowledged.
#[derive(Debug, Clone)]
struct Covered {
    token: Document,
    cluster_time: Timestamp,
    index: u32,
    event_time: Option<DateTime>,
    /// When the token's position was current at the source.
    token_time: DateTime,
}

/// What the reader hands the publisher.
enum Item {
    Change {
        record: Box<ChangeRecord>,
        token: Document,
    },
    /// An empty batch: the post-batch resume token, which moves the checkpoint in quiet periods.
    Quiet {
        token: Document,
        at: DateTime,
    },
}

impl<P: Publisher + 'static, C: CheckpointStore> Tailer<P, C> {
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
                        self.health.disconnected("tail");
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
                None => self.begin_snapshot().await?,
            };
            if state.snapshot.is_some() {
                self.copy(&mut state, shutdown).await?;
                if state.snapshot.is_some() {
                    return Ok(()); // stopped by shutdown mid-copy; progress is saved
                }
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

    async fn begin_snapshot(&self) -> Result<TailState, TailError> {
        let start_time = self.source.cluster_time().await?;
        info!(source = %self.source_name, start = ?start_time, "no checkpoint: starting the initial snapshot");
        let state = TailState {
            source: self.source_name.clone(),
            snapshot: Some(SnapshotProgress { start_time, done: Vec::new(), current: None, last_id: None, copied: 0 }),
            stream: None,
            updated_at: DateTime::now(),
            last_event_time: None,
            token_time: None,
            epoch: self.epoch,
        };
        self.checkpoints.save(&state).await?;
        Ok(state)
    }

    /// Copies every defined collection, resuming where the checkpoint says.
    async fn copy(&self, state: &mut TailState, shutdown: &CancellationToken) -> Result<(), TailError> {
        let mut progress = state.snapshot.clone().expect("copy is only called mid-snapshot");
        let mut collections: Vec<&str> = self.topics.collections().collect();
        collections.sort_unstable();
        let mut total = progress.copied;
        for c in &collections {
            if !progress.done.iter().any(|d| d == c) {
                total += self.source.estimated_count(c).await?;
            }
        }
        let bar = progress_bar(total, progress.copied);
        let limiter =
            NonZeroU32::new(self.snapshot.max_docs_per_sec).map(|rate| RateLimiter::direct(Quota::per_second(rate)));
        let mut last_log = Instant::now();
        for coll in collections {
            if progress.done.iter().any(|d| d == coll) {
                continue;
            }
            let def = self.topics.for_collection(coll).expect("collections come from the definitions");
            let mut last_id = if progress.current.as_deref() == Some(coll) { progress.last_id.clone() } else { None };
            loop {
                if shutdown.is_cancelled() {
                    info!(source = %self.source_name, copied = progress.copied, "snapshot paused by shutdown; it resumes from here");
                    return Ok(());
                }
                let docs = self.source.snapshot_batch(coll, last_id.as_ref(), self.snapshot.batch_size).await?;
                let Some(last) = docs.last() else { break };
                let next_id = last.get("_id").cloned().unwrap_or(Bson::Null);
                if let Some(l) = &limiter
                    && let Some(n) = NonZeroU32::new(docs.len() as u32)
                {
                    // A batch larger than the per-second quota waits for it piecemeal.
                    let burst = l.until_n_ready(n).await;
                    if burst.is_err() {
                        for _ in 0..n.get() {
                            l.until_ready().await;
                        }
                    }
                }
                let n = docs.len() as u64;
                let mut acks = Vec::with_capacity(docs.len());
                for doc in docs {
                    let record = ChangeRecord {
                        op: Op::Snapshot,
                        collection: coll.to_string(),
                        document_id: doc.get("_id").cloned().unwrap_or(Bson::Null),
                        after: Some(doc),
                        before: None,
                        changed: None,
                        removed: Vec::new(),
                        cluster_time: progress.start_time,
                        index: 0,
                        wall_time: None,
                        resume_token: None,
                    };
                    acks.extend(self.publish(def.topic.as_str(), record).await?);
                }
                try_join_all(acks).await?;
                self.health.beat("tail");
                progress.current = Some(coll.to_string());
                progress.last_id = Some(next_id.clone());
                progress.copied += n;
                last_id = Some(next_id);
                state.snapshot = Some(progress.clone());
                state.updated_at = DateTime::now();
                self.save(state).await?;
                metrics::counter!("ficus_snapshot_documents_total", "collection" => coll.to_string()).increment(n);
                if let Some(b) = &bar {
                    b.set_position(progress.copied);
                }
                if last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = Instant::now();
                    info!(source = %self.source_name, collection = coll, copied = progress.copied, estimated_total = total, "snapshot progress");
                }
            }
            // Every copy of this collection is acknowledged: tell each partition's consumers, so
            // they can remove what no longer exists at the source (see `SnapshotMarker`).
            let types = (def.event_type(Op::Snapshot), def.event_type(Op::Delete));
            let start = progress.start_time;
            let marker = |p, n| ControlMessage::snapshot_completed(&self.source_name, coll, start, types, p, n);
            try_join_all(self.publisher.publish_to_all_partitions(def.topic.as_str(), marker).await?).await?;
            progress.done.push(coll.to_string());
            progress.current = None;
            progress.last_id = None;
            state.snapshot = Some(progress.clone());
            self.save(state).await?;
            info!(source = %self.source_name, collection = coll, copied = progress.copied, "snapshot: collection copied");
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        info!(source = %self.source_name, documents = progress.copied, "snapshot complete; streaming from the point captured before it");
        state.snapshot = None;
        state.stream = Some(StreamPosition { resume_token: None, cluster_time: progress.start_time, index: 0 });
        state.updated_at = DateTime::now();
        self.save(state).await?;
        Ok(())
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

    async fn stream(&self, state: &mut TailState, shutdown: &CancellationToken) -> Result<(), TailError> {
        let pos = state.stream.clone().expect("streaming starts after the snapshot");
        let start = match &pos.resume_token {
            Some(t) => StartAt::Token(t.clone()),
            None => StartAt::Time(pos.cluster_time),
        };
        info!(source = %self.source_name, from = ?start, "streaming changes");
        let stream = self.source.watch(&start, self.tail.batch_size, self.tail.max_await).await?;

        let (tx, mut rx) = mpsc::channel::<Item>(self.tail.batch_size as usize * 2);
        let reader_stop = shutdown.child_token();
        let reader = tokio::spawn(read_changes(
            stream,
            tx,
            reader_stop.clone(),
            pos.cluster_time,
            pos.index,
            self.health.clone(),
        ));

        let topics_by_coll: HashMap<&str, &str> =
            self.topics.defs.iter().map(|d| (d.collection.as_str(), d.topic.as_str())).collect();
        let mut inflight: FuturesOrdered<BoxFuture<'static, Result<Covered, BusError>>> = FuturesOrdered::new();
        let mut in_flight_events = 0usize;
        let mut pending_events: std::collections::VecDeque<usize> = Default::default();
        let mut sent = (pos.cluster_time, pos.index);
        let mut covered: Option<Covered> = None;
        let mut saved_at = Instant::now();
        let mut dirty = false;
        let mut tick = tokio::time::interval(self.tail.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let outcome: Result<(), TailError> = loop {
            tokio::select! {
                biased;
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    in_flight_events -= pending_events.pop_front().unwrap_or(0);
                    match done {
                        Ok(c) => { covered = Some(c); dirty = true; }
                        Err(e) => break Err(e.into()),
                    }
                    if dirty && saved_at.elapsed() >= self.tail.checkpoint_interval {
                        if let Err(e) = self.save_stream(state, covered.as_ref()).await { break Err(e); }
                        saved_at = Instant::now();
                        dirty = false;
                    }
                }
                item = rx.recv(), if in_flight_events < self.tail.max_in_flight => {
                    match item {
                        Some(Item::Change { record, token }) => {
                            let token_time = record.wall_time.unwrap_or_else(|| DateTime::from_millis(i64::from(record.cluster_time.time) * 1000));
                            let c = Covered { token, cluster_time: record.cluster_time, index: record.index, event_time: record.wall_time, token_time };
                            sent = (record.cluster_time, record.index);
                            metrics::counter!("ficus_tail_changes_read_total", "collection" => record.collection.clone()).increment(1);
                            let Some(topic) = topics_by_coll.get(record.collection.as_str()).copied() else {
                                inflight.push_back(futures::future::ready(Ok(c)).boxed());
                                pending_events.push_back(0);
                                continue;
                            };
                            let acks = match self.publish(topic, *record).await {
                                Ok(a) => a,
                                Err(e) => break Err(e),
                            };
                            in_flight_events += acks.len();
                            pending_events.push_back(acks.len());
                            inflight.push_back(async move { try_join_all(acks).await.map(|_| c) }.boxed());
                        }
                        Some(Item::Quiet { token, at }) => {
                            let c = Covered { token, cluster_time: sent.0, index: sent.1, event_time: None, token_time: at };
                            inflight.push_back(futures::future::ready(Ok(c)).boxed());
                            pending_events.push_back(0);
                        }
                        None => break Ok(()), // the reader ended: shutdown or an error, seen below
                    }
                }
                _ = tick.tick() => {
                    if let Some(t) = state.token_time {
                        let age = DateTime::now().saturating_duration_since(t).as_secs_f64();
                        metrics::gauge!("ficus_tail_checkpoint_age_seconds").set(age);
                    }
                    if dirty {
                        if let Err(e) = self.save_stream(state, covered.as_ref()).await { break Err(e); }
                        saved_at = Instant::now();
                        dirty = false;
                    }
                }
            }
        };

        // Stop reading, then drain: everything already handed to Kafka is awaited so the final
        // checkpoint covers as much as possible. A delivery failure stops the drain there.
        reader_stop.cancel();
        drop(rx);
        let mut outcome = outcome;
        if outcome.is_ok() || matches!(outcome, Err(TailError::Source(_))) {
            while let Some(done) = inflight.next().await {
                match done {
                    Ok(c) => covered = Some(c),
                    Err(e) => {
                        if outcome.is_ok() {
                            outcome = Err(e.into());
                        }
                        break;
                    }
                }
            }
        }
        self.save_stream(state, covered.as_ref()).await?;
        let read = reader.await.map_err(|e| TailError::Reader(e.to_string()))?;
        if let Err(e) = read
            && outcome.is_ok()
        {
            outcome = Err(e.into());
        }
        if outcome.is_ok() && !shutdown.is_cancelled() {
            return Err(TailError::Reader("the change stream ended".into()));
        }
        if let Err(e) = &outcome
            && !e.is_transient()
        {
            error!(source = %self.source_name, error = %e, "tail stopped");
        }
        outcome
    }

    /// Saves the state under this tailer's lease epoch.
    async fn save(&self, state: &mut TailState) -> Result<(), TailError> {
        state.epoch = self.epoch;
        state.updated_at = DateTime::now();
        self.checkpoints.save(state).await?;
        Ok(())
    }

    async fn save_stream(&self, state: &mut TailState, covered: Option<&Covered>) -> Result<(), TailError> {
        let Some(c) = covered else { return Ok(()) };
        state.stream =
            Some(StreamPosition { resume_token: Some(c.token.clone()), cluster_time: c.cluster_time, index: c.index });
        if c.event_time.is_some() {
            state.last_event_time = c.event_time;
        }
        state.token_time = Some(c.token_time);
        self.save(state).await?;
        metrics::counter!("ficus_tail_checkpoints_total").increment(1);
        Ok(())
    }
}

/// The reader task: drains the change stream into the channel until stopped. Each event gets
/// its index among events sharing a cluster time, continuing from the checkpoint's.
async fn read_changes(
    mut stream: crate::source::Stream,
    tx: mpsc::Sender<Item>,
    stop: CancellationToken,
    mut last_time: Timestamp,
    mut last_index: u32,
    health: Health,
) -> Result<(), SourceError> {
    while !stop.is_cancelled() {
        let next = stream.next_if_any().await;
        if next.is_ok() {
            health.beat("tail");
        }
        match next {
            Ok(Some(ev)) => {
                let (mut record, token) = to_record(&ev)?;
                record.index = if record.cluster_time == last_time { last_index + 1 } else { 1 };
                last_time = record.cluster_time;
                last_index = record.index;
                metrics::gauge!("ficus_tail_lag_seconds").set(crate::ops::age_seconds(last_time.time));
                if tx.send(Item::Change { record: Box::new(record), token }).await.is_err() {
                    return Ok(());
                }
            }
            Ok(None) => {
                // Nothing new: the stream is caught up with the source.
                metrics::gauge!("ficus_tail_lag_seconds").set(0.0);
                if let Some(t) = stream.resume_token()
                    && tx.send(Item::Quiet { token: token_doc(&t)?, at: DateTime::now() }).await.is_err()
                {
                    return Ok(());
                }
            }
            Err(e) => return Err(SourceError::from_mongo(e)),
        }
    }
    Ok(())
}

fn progress_bar(total: u64, done: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("snapshot {bar:40} {pos}/{len} docs {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done);
    Some(bar)
}
