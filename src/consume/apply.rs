//! The one apply path: messages → transforms → sink, for live consumption, replay (from the
//! event store and from the live tail) and dead-letter re-drive alike.
//!
//! A batch is decoded and transformed (pure, [`prepare`]), written through the [`Sink`] with
//! transient failures retried, and a permanent failure isolated by writing the batch's events
//! one by one. What cannot be applied (undecodable, refused by a transform, refused by the
//! target for good) goes where the caller's [`Rejects`] says: to the dead letters, or counted
//! and reported. The call returns only when every message is durable in the target or handled
//! by that policy, so the caller may then move its position past the batch.
//!
//! A write that has not finished within [`WRITE_TIMEOUT`] is abandoned and tried again (its
//! writes are version-guarded, so a second try is harmless): the MongoDB Rust driver has no
//! socket timeout, and a bulk write in flight when the network reset its connections was seen
//! to wait for good, holding the consumer and its drain on SIGTERM.

use std::time::{Duration, Instant};

use bson::DateTime;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ConsumeError;
use super::direction::Transformer;
use crate::bus::{DeadLetters, Delivery, Stage};
use crate::event::{Message, Origin};
use crate::retry::Classify;
use crate::retry::with_backoff;
use crate::sink::{JudgedBy, Marker, Sink, SinkError, Versioned};

/// How long one attempt at writing a batch may take before it is abandoned and tried again.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the messages being applied come from (a label on the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The service's consumer group.
    Live,
    /// `ficus replay`: the event store, then the live tail after it.
    Replay,
    /// `ficus dlq replay`.
    Redrive,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Path::Live => "live",
            Path::Replay => "replay",
            Path::Redrive => "redrive",
        }
    }
}

/// What becomes of a message that cannot be applied.
#[derive(Clone, Copy)]
pub enum Rejects<'a> {
    /// Onto the topic's dead letters (live consumption, re-drive).
    DeadLetter(&'a DeadLetters),
    /// Logged and counted (replay: the live consumer dead-letters the same messages).
    Count,
}

/// One message to apply, with where it came from.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its Kafka position and, for a message taken from Kafka, its bytes.
    pub at: Delivery,
    pub message: Result<Message, String>,
}

impl Item {
    /// A message as taken from Kafka (decoded here; undecodable ones are rejected).
    pub fn delivered(d: Delivery) -> Item {
        let message = Message::decode(&d.payload).map_err(|e| format!("undecodable message: {e}"));
        Item { at: d, message }
    }

    /// A message read back from the event store, archived from this Kafka position.
    pub fn archived(topic: String, partition: i32, offset: i64, message: Message) -> Item {
        Item { at: Delivery { topic, partition, offset, key: None, payload: Vec::new() }, message: Ok(message) }
    }

    /// The original as delivered, for a dead letter.
    fn original(&self) -> Delivery {
        let mut d = self.at.clone();
        if d.payload.is_empty()
            && let Ok(m) = &self.message
        {
            d.payload = m.encode();
            d.key = Some(m.key().as_bytes().to_vec());
        }
        d
    }
}

/// What became of one message after transformation.
#[derive(Debug)]
pub enum Prepared<O> {
    Write(Versioned<O>),
    Rejected { stage: Stage, error: String },
}

/// Decodes and transforms one message (pure).
pub fn prepare<T: Transformer>(transformer: &T, item: &Item) -> Prepared<T::Op> {
    let message = match &item.message {
        Ok(m) => m,
        Err(e) => return Prepared::Rejected { stage: Stage::Decode, error: e.clone() },
    };
    match transformer.transform(message) {
        Ok(ops) => Prepared::Write(Versioned::of(message, ops)),
        Err(e) => Prepared::Rejected { stage: Stage::Transform, error: e.to_string() },
    }
}

/// What a batch came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: u64,
    pub rejected: u64,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, o: Applied) {
        self.applied += o.applied;
        self.rejected += o.rejected;
    }
}

/// Applies batches of one service's messages through its sink.
pub struct Applier<'a, T, S> {
    pub transformer: &'a T,
    pub sink: &'a S,
    pub rejects: Rejects<'a>,
    pub path: Path,
    /// Set: every batch is one transaction that writes an apply marker naming this origin
    /// (see `tail::echo`), so the tail of the database written knows ficus's own writes.
    pub origin: Option<Origin>,
    /// The view of ownership the transformer judged by, asked again before each batch commits
    /// (`None`: it judged nothing that can go stale); once it no longer holds the batch fails
    /// with [`ConsumeError::StaleJudgement`], for the caller to judge again.
    pub judged: Option<JudgedBy>,
}

impl<T: Transformer, S: Sink<Op = T::Op>> Applier<'_, T, S> {
    /// Applies a batch; returns once every message is durable in the target or rejected. Only
    /// a transient failure cut short by shutdown returns an error with nothing rejected.
    pub async fn apply(&self, batch: &[Item], shutdown: &CancellationToken) -> Result<Applied, ConsumeError> {
        let service = self.transformer.service();
        let mut done = Applied::default();
        let mut writes: Vec<(usize, Versioned<T::Op>)> = Vec::with_capacity(batch.len());
        for (i, item) in batch.iter().enumerate() {
            match prepare(self.transformer, item) {
                Prepared::Write(mut v) => {
                    v.redriven = self.path == Path::Redrive;
                    writes.push((i, v))
                }
                Prepared::Rejected { stage, error } => {
                    self.reject(item, stage, &error).await?;
                    done.rejected += 1;
                }
            }
        }
        let started = Instant::now();
        let (at, versioned): (Vec<usize>, Vec<Versioned<T::Op>>) = writes.into_iter().unzip();
        let marker = self.marker(batch.iter());
        let written =
            if versioned.is_empty() { Ok(()) } else { self.write(&versioned, marker.as_ref(), shutdown).await };
        match written {
            Ok(()) => done.applied += versioned.len() as u64,
            Err(SinkError::StaleJudgement(_)) => return Err(ConsumeError::StaleJudgement),
            Err(e) if e.is_transient() => return Err(e.into()), // shutdown during retries
            Err(e) => {
                // A permanent failure somewhere in the batch: one by one to find the culprits.
                warn!(%service, path = self.path.as_str(), error = %e, "batch write failed permanently; isolating the failing events");
                for (&i, v) in at.iter().zip(&versioned) {
                    let marker = self.marker(std::iter::once(&batch[i]));
                    match self.write(std::slice::from_ref(v), marker.as_ref(), shutdown).await {
                        Ok(()) => done.applied += 1,
                        Err(SinkError::StaleJudgement(_)) => return Err(ConsumeError::StaleJudgement),
                        Err(e) if e.is_transient() => return Err(e.into()),
                        Err(e) => {
                            self.reject(&batch[i], Stage::Write, &e.to_string()).await?;
                            done.rejected += 1;
                        }
                    }
                }
            }
        }
        let labels = [("service", service.to_string()), ("path", self.path.as_str().to_string())];
        metrics::histogram!("ficus_consume_apply_seconds", &labels).record(started.elapsed().as_secs_f64());
        metrics::histogram!("ficus_consume_batch_size", &labels).record(batch.len() as f64);
        metrics::counter!("ficus_events_applied_total", &labels).increment(done.applied);
        if self.path == Path::Live {
            let now = DateTime::now();
            let e2e = metrics::histogram!("ficus_end_to_end_latency_seconds", "service" => service.to_string());
            for v in &versioned {
                e2e.record(now.saturating_duration_since(v.event_time).as_secs_f64());
            }
        }
        Ok(done)
    }

    async fn write(
        &self,
        batch: &[Versioned<T::Op>],
        marker: Option<&Marker>,
        shutdown: &CancellationToken,
    ) -> Result<(), SinkError> {
        let stage = format!("{}:{}", self.path.as_str(), self.transformer.service());
        // A stale judgement is not retried here: the caller judges the batch again.
        let transient = |e: &SinkError| e.is_transient() && !matches!(e, SinkError::StaleJudgement(_));
        let attempt = || async {
            tokio::time::timeout(WRITE_TIMEOUT, self.sink.apply(batch, marker))
                .await
                .unwrap_or(Err(SinkError::TimedOut(WRITE_TIMEOUT)))
        };
        with_backoff(&stage, shutdown, attempt, transient).await
    }

    /// The apply marker of some items: per topic and partition, the offset after the last.
    fn marker<'i>(&self, items: impl Iterator<Item = &'i Item>) -> Option<Marker> {
        let origin = self.origin.clone()?;
        let mut positions: Vec<(String, i32, i64)> = Vec::new();
        let mut echoes = 0;
        for item in items {
            if item.message.as_ref().is_ok_and(|m| self.transformer.is_echo(m)) {
                echoes += 1;
            }
            let (topic, partition, next) = (&item.at.topic, item.at.partition, item.at.offset + 1);
            match positions.iter_mut().find(|(t, p, _)| t == topic && *p == partition) {
                Some(at) => at.2 = at.2.max(next),
                None => positions.push((topic.clone(), partition, next)),
            }
        }
        Some(Marker { origin, positions, echoes, judged: self.judged.clone() })
    }

    async fn reject(&self, item: &Item, stage: Stage, error: &str) -> Result<(), ConsumeError> {
        match self.rejects {
            Rejects::DeadLetter(dlq) => dlq.send(&item.original(), stage, error).await?,
            Rejects::Count => {
                let (d, service) = (&item.at, self.transformer.service());
                warn!(%service, path = self.path.as_str(), topic = %d.topic, partition = d.partition, offset = d.offset, stage = stage.as_str(), error, "not applied");
            }
        }
        Ok(())
    }
}
