//! The initial snapshot: every defined collection copied in `_id` order as snapshot events,
//! resumable batch by batch, throttleable, with an end-of-copy marker on every partition of a
//! collection's topic once all its copies are acknowledged (see `event::SnapshotMarker`).

use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use bson::Bson;
use futures::future::try_join_all;
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::checkpoint::{CheckpointStore, SnapshotProgress, StreamPosition, TailPhase, TailState};
use super::{TailError, Tailer};
use crate::bus::Publisher;
use crate::event::mapping::ChangeRecord;
use crate::event::{ControlMessage, Op};
use crate::source::Source;

impl<S: Source, P: Publisher + 'static, C: CheckpointStore> Tailer<S, P, C> {
    /// Copies every defined collection, resuming where `progress` says; `Ok(false)` when
    /// shutdown stopped it midway (its progress is saved), `Ok(true)` once the state streams.
    pub(super) async fn copy(
        &self,
        state: &mut TailState,
        mut progress: SnapshotProgress,
        shutdown: &CancellationToken,
    ) -> Result<bool, TailError> {
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
                    return Ok(false);
                }
                let docs = self.source.snapshot_batch(coll, last_id.as_ref(), self.snapshot.batch_size).await?;
                let Some(last) = docs.last() else { break };
                let next_id = last.get("_id").cloned().unwrap_or(Bson::Null);
                pace(limiter.as_ref(), docs.len()).await;
                let n = docs.len() as u64;
                let mut acks = Vec::with_capacity(docs.len());
                for doc in docs {
                    let record = ChangeRecord::snapshot(coll, doc, progress.start_time);
                    acks.extend(self.publish(def.topic.as_str(), record).await?);
                }
                try_join_all(acks).await?;
                self.health.beat(&self.role);
                progress.current = Some(coll.to_string());
                progress.last_id = Some(next_id.clone());
                progress.copied += n;
                last_id = Some(next_id);
                state.phase = TailPhase::Snapshot(progress.clone());
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
            self.copied(state, &mut progress, def, coll).await?;
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        info!(source = %self.source_name, documents = progress.copied, "snapshot complete; streaming from the point taken before it");
        state.phase = TailPhase::Stream(StreamPosition {
            resume_token: progress.start_token.clone(),
            cluster_time: progress.start_time,
            index: 0,
        });
        self.save(state).await?;
        Ok(true)
    }

    /// Every copy of `coll` is acknowledged: each partition's consumers are told, so they can
    /// remove what no longer exists at the source (see `SnapshotMarker`), and the collection is
    /// done in the checkpoint.
    async fn copied(
        &self,
        state: &mut TailState,
        progress: &mut SnapshotProgress,
        def: &crate::config::topics::TopicDef,
        coll: &str,
    ) -> Result<(), TailError> {
        let types = (def.event_type(Op::Snapshot), def.event_type(Op::Delete));
        let start = progress.start_time;
        let marker = |p, n| ControlMessage::snapshot_completed(&self.source_name, coll, start, types, p, n);
        try_join_all(self.publisher.publish_to_all_partitions(def.topic.as_str(), marker).await?).await?;
        progress.done.push(coll.to_string());
        progress.current = None;
        progress.last_id = None;
        state.phase = TailPhase::Snapshot(progress.clone());
        self.save(state).await?;
        info!(source = %self.source_name, collection = coll, copied = progress.copied, "snapshot: collection copied");
        Ok(())
    }
}

/// Waits for the snapshot's rate limit to allow `n` more documents (a batch larger than the
/// per-second quota waits for it piecemeal).
async fn pace(limiter: Option<&governor::DefaultDirectRateLimiter>, n: usize) {
    let (Some(l), Some(n)) = (limiter, NonZeroU32::new(n as u32)) else { return };
    if l.until_n_ready(n).await.is_err() {
        for _ in 0..n.get() {
            l.until_ready().await;
        }
    }
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
