//! The tail role: a source's changes → canonical events → Kafka, with checkpoint-after-ack.
//!
//! On first start (no checkpoint) it captures the source's cluster time, copies every defined
//! collection as snapshot events ([`snapshot`]), then streams changes from that captured point
//! ([`stream`]), so nothing changed during the copy is missed. The copy is resumable: progress
//! (the last `_id` whose events Kafka acknowledged) is checkpointed batch by batch. A checkpoint
//! only ever names a point whose every earlier event Kafka has acknowledged ([`ack`]).
//!
//! - [`checkpoint`]: the durable state, and the store it lives in;
//! - [`lease`]: one active tailer per source, fenced checkpoints;
//! - [`role`]: the role as `ficus run` runs it: wait for the lease, tail, stand by again.

pub mod ack;
pub mod checkpoint;
pub mod lease;
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
use crate::retry::with_backoff;
use crate::source::{Source, SourceError};
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
}

impl TailError {
    pub fn is_transient(&self) -> bool {
        match self {
            TailError::Source(e) => e.class() == ErrorClass::Transient,
            TailError::Bus(e) => e.is_transient(),
            TailError::Checkpoint(CheckpointError::Mongo(e)) => crate::mongo::classify(e) == ErrorClass::Transient,
            TailError::Checkpoint(CheckpointError::Corrupt { .. } | CheckpointError::Fenced { .. }) => false,
            TailError::Reader(_) => true,
            TailError::Store(e) => crate::mongo::classify(e) == ErrorClass::Transient,
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
}

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
                        self.health.disconnected(&RoleId::Tail);
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

    async fn begin_snapshot(&self) -> Result<TailState, TailError> {
        let start_time = self.source.cluster_time().await?;
        info!(source = %self.source_name, start = ?start_time, "no checkpoint: starting the initial snapshot");
        let state = TailState {
            source: self.source_name.clone(),
            phase: TailPhase::Snapshot(SnapshotProgress {
                start_time,
                done: Vec::new(),
                current: None,
                last_id: None,
                copied: 0,
            }),
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
