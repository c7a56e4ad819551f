//! Streaming: the change feed from the checkpoint onwards, handed to Kafka in source order.
//!
//! Two tasks joined by a bounded channel: a reader that drains the feed (stopped between
//! requests, or abandoned on stop when a request hangs) and the publisher loop, which maps each
//! change, hands its events to Kafka and tracks their acknowledgements in an [`AckWindow`]. A
//! checkpoint names only the newest point whose every earlier event is acknowledged; quiet
//! periods still advance it with the feed's post-batch resume token, so a quiet source never
//! ages out of the oplog.

use std::collections::HashMap;
use std::time::Instant;

use bson::{DateTime, Document, Timestamp};
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::ack::{AckWindow, Ticket};
use super::checkpoint::{CheckpointStore, StreamPosition, TailPhase, TailState};
use super::echo::{EchoTagger, Seen};
use super::{Echoes, TailError, Tailer};
use crate::bus::{BusError, Publisher};
use crate::event::mapping::ChangeRecord;
use crate::ops::{Health, RoleId};
use crate::retry::Classify;
use crate::source::{ChangeFeed, Source, SourceError, StartAt};

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

/// What the reader hands the publisher loop.
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

/// An acknowledgement from Kafka: the ticket of the change whose events it covers.
type Acks = FuturesUnordered<BoxFuture<'static, (Ticket, Result<(), BusError>)>>;

/// What the publisher loop keeps between changes: the changes handed to Kafka and not yet
/// acknowledged, the newest point every earlier event of which is, and when it was saved.
struct Flight {
    /// `None`: a change inside a marked transaction, no point to resume from (see `echo`).
    window: AckWindow<Option<Covered>>,
    acks: Acks,
    covered: Option<Covered>,
    saved_at: Instant,
    dirty: bool,
    /// The place of the last change read (quiet periods resume from it).
    sent: (Timestamp, u32),
    echoes: EchoTagger,
}

impl Flight {
    fn new(pos: &StreamPosition) -> Self {
        Flight {
            window: AckWindow::default(),
            acks: FuturesUnordered::new(),
            covered: None,
            saved_at: Instant::now(),
            dirty: false,
            sent: (pos.cluster_time, pos.index),
            echoes: EchoTagger::default(),
        }
    }

    /// Moves what the checkpoint covers up to the newest usable point acknowledged.
    fn advance(&mut self) {
        if let Some(c) = self.window.covered_where(|c: &Option<Covered>| c.is_some()) {
            self.covered = c;
            self.dirty = true;
        }
    }

    fn acknowledged(&mut self, ticket: Ticket) {
        self.window.ack(ticket);
        self.advance();
    }

    /// A change that publishes nothing still holds its place in the window.
    fn skip(&mut self, c: Option<Covered>) {
        self.window.push(c, 0);
    }
}

impl<S: Source, P: Publisher + 'static, C: CheckpointStore> Tailer<S, P, C> {
    /// Streams changes from the state's position until shutdown (then drains and checkpoints)
    /// or an error.
    pub(super) async fn stream(&self, state: &mut TailState, shutdown: &CancellationToken) -> Result<(), TailError> {
        let TailPhase::Stream(pos) = state.phase.clone() else {
            return Err(TailError::Reader("streaming starts after the snapshot".into()));
        };
        let start = match &pos.resume_token {
            Some(t) => StartAt::Token(t.clone()),
            None => StartAt::Time(pos.cluster_time),
        };
        info!(source = %self.source_name, from = ?start, "streaming changes");
        let stream = self.source.watch(&start, self.tail.batch_size, self.tail.max_await).await?;
        let (tx, rx) = mpsc::channel::<Item>(self.tail.batch_size as usize * 2);
        let reader_stop = shutdown.child_token();
        let beat = (self.health.clone(), self.role.clone(), self.source_name.clone());
        let reader = tokio::spawn(read_changes(stream, tx, reader_stop.clone(), pos.cluster_time, pos.index, beat));
        let mut flight = Flight::new(&pos);
        let outcome = self.publish_loop(state, &mut flight, rx, shutdown).await;
        // Stop reading, then drain: everything already handed to Kafka is awaited so the final
        // checkpoint covers as much as possible.
        reader_stop.cancel();
        let mut outcome = self.drain(state, &mut flight, outcome).await?;
        flight.advance();
        self.save_stream(state, flight.covered.as_ref()).await?;
        let read = self.stop_reader(reader).await?;
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

    /// Waits for the reader to see its stop, which it does once its request in flight returns
    /// (within `max_await` from a live server). A request hung on a dropped connection is not
    /// waited for: the reader is abandoned, which loses nothing (the checkpoint covers only what
    /// Kafka acknowledged) and keeps the shutdown bounded.
    async fn stop_reader(
        &self,
        mut reader: tokio::task::JoinHandle<Result<(), SourceError>>,
    ) -> Result<Result<(), SourceError>, TailError> {
        let within = self.tail.max_await + std::time::Duration::from_secs(2);
        match tokio::time::timeout(within, &mut reader).await {
            Ok(read) => read.map_err(|e| TailError::Reader(e.to_string())),
            Err(_) => {
                reader.abort();
                tracing::warn!(source = %self.source_name, "the change stream did not answer on stop; left unread");
                Ok(Ok(()))
            }
        }
    }

    /// Takes changes from the reader and hands them to Kafka, acknowledgements first, until
    /// shutdown, the reader's end, or an error; checkpoints every checkpoint interval.
    async fn publish_loop(
        &self,
        state: &mut TailState,
        f: &mut Flight,
        mut rx: mpsc::Receiver<Item>,
        shutdown: &CancellationToken,
    ) -> Result<(), TailError> {
        let topics: HashMap<&str, &str> =
            self.topics.defs.iter().map(|d| (d.collection.as_str(), d.topic.as_str())).collect();
        let mut tick = tokio::time::interval(self.tail.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some((ticket, done)) = f.acks.next(), if !f.acks.is_empty() => {
                    done?;
                    f.acknowledged(ticket);
                    self.save_if_due(state, f).await?;
                }
                // Stop taking changes at once, even with the window full (Kafka not answering):
                // what was handed over is drained after.
                _ = shutdown.cancelled() => return Ok(()),
                item = rx.recv(), if f.window.in_flight() < self.tail.max_in_flight => match item {
                    Some(Item::Change { record, token }) => self.take(f, record, token, &topics).await?,
                    Some(Item::Quiet { token, at }) => {
                        // Quiet inside a marked transaction is no point to resume from: the
                        // rest of it may still come (see `echo`).
                        let c = Covered { token, cluster_time: f.sent.0, index: f.sent.1, event_time: None, token_time: at };
                        let usable = !f.echoes.in_marked();
                        f.skip(usable.then_some(c));
                    }
                    None => return Ok(()), // the reader ended: shutdown or an error, seen after
                },
                _ = tick.tick() => {
                    f.advance();
                    if let Some(t) = state.token_time {
                        let age = DateTime::now().saturating_duration_since(t).as_secs_f64();
                        metrics::gauge!("ficus_tail_checkpoint_age_seconds", "source" => self.source_name.clone()).set(age);
                    }
                    if f.dirty {
                        self.save_stream(state, f.covered.as_ref()).await?;
                        f.saved_at = Instant::now();
                        f.dirty = false;
                    }
                }
            }
        }
    }

    /// One change read: bookkeeping (markers, echoes, changes not admitted, collections without
    /// a topic) keeps its place in the window; anything else is mapped and handed to Kafka.
    async fn take(
        &self,
        f: &mut Flight,
        record: Box<ChangeRecord>,
        token: Document,
        topics: &HashMap<&str, &str>,
    ) -> Result<(), TailError> {
        let token_time =
            record.wall_time.unwrap_or_else(|| DateTime::from_millis(i64::from(record.cluster_time.time) * 1000));
        let c = Covered {
            token,
            cluster_time: record.cluster_time,
            index: record.index,
            event_time: record.wall_time,
            token_time,
        };
        f.sent = (record.cluster_time, record.index);
        let seen = f.echoes.observe(*record);
        let c = (!f.echoes.in_marked()).then_some(c);
        let Seen::Change(record) = seen else {
            f.skip(c);
            return Ok(());
        };
        if record.origin.is_some() && self.echoes == Echoes::Drop {
            metrics::counter!("ficus_echoes_skipped_total", "service" => self.source_name.clone(), "side" => "tail")
                .increment(1);
            f.skip(c);
            return Ok(());
        }
        if let Some(admit) = &self.admit
            && !admit.admit(&record).await?
        {
            f.skip(c);
            return Ok(());
        }
        metrics::counter!("ficus_tail_changes_read_total", "source" => self.source_name.clone(), "collection" => record.collection.clone()).increment(1);
        let Some(topic) = topics.get(record.collection.as_str()).copied() else {
            f.skip(c);
            return Ok(());
        };
        let published = self.publish(topic, *record).await?;
        let ticket = f.window.push(c, published.len());
        f.acks.extend(published.into_iter().map(|ack| ack.map(move |r| (ticket, r)).boxed()));
        Ok(())
    }

    /// Saves the checkpoint if it moved and the checkpoint interval has passed since the last.
    async fn save_if_due(&self, state: &mut TailState, f: &mut Flight) -> Result<(), TailError> {
        if f.dirty && f.saved_at.elapsed() >= self.tail.checkpoint_interval {
            self.save_stream(state, f.covered.as_ref()).await?;
            f.saved_at = Instant::now();
            f.dirty = false;
        }
        Ok(())
    }

    /// Awaits everything already handed to Kafka (after a clean stop, or a source error), so the
    /// final checkpoint covers as much as possible. A delivery failure stops the drain there.
    /// It checkpoints as acknowledgements come (at most every checkpoint interval), so a drain
    /// cut short (a broker that does not answer, and the shutdown timeout) leaves the checkpoint
    /// at what was acknowledged; what was not is published again on restart. Returns the loop's
    /// outcome, or the delivery failure that ended the drain.
    async fn drain(
        &self,
        state: &mut TailState,
        f: &mut Flight,
        outcome: Result<(), TailError>,
    ) -> Result<Result<(), TailError>, TailError> {
        if !(outcome.is_ok() || matches!(outcome, Err(TailError::Source(_)))) || f.acks.is_empty() {
            return Ok(outcome);
        }
        info!(source = %self.source_name, unacknowledged = f.acks.len(), "draining: waiting for Kafka to acknowledge what was handed over");
        let every = std::time::Duration::from_secs(5);
        let mut waiting = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                next = f.acks.next() => {
                    let Some((ticket, done)) = next else { return Ok(outcome) };
                    if let Err(e) = done {
                        return Ok(outcome.and(Err(e.into())));
                    }
                    f.acknowledged(ticket);
                    self.save_if_due(state, f).await?;
                }
                _ = waiting.tick() => {
                    info!(source = %self.source_name, unacknowledged = f.acks.len(), "draining: still waiting for Kafka; the checkpoint stands at what was acknowledged");
                }
            }
        }
    }

    async fn save_stream(&self, state: &mut TailState, covered: Option<&Covered>) -> Result<(), TailError> {
        let Some(c) = covered else { return Ok(()) };
        state.phase = TailPhase::Stream(StreamPosition {
            resume_token: Some(c.token.clone()),
            cluster_time: c.cluster_time,
            index: c.index,
        });
        if c.event_time.is_some() {
            state.last_event_time = c.event_time;
        }
        state.token_time = Some(c.token_time);
        self.save(state).await?;
        metrics::counter!("ficus_tail_checkpoints_total", "source" => self.source_name.clone()).increment(1);
        Ok(())
    }
}

/// Where a change read after `last` goes in the stream's order: its cluster time and its index
/// among changes of that time (stream changes count from 1; see `event::Position`). A change
/// whose time is before `last`'s takes `last`'s time: that happens only right after a
/// snapshot, for a write that was not yet visible when the snapshot began although the
/// source's clock already counted it (see `Source::snapshot_start`), and the copies, versioned
/// at that clock, must not be newer than it. Everywhere else the stream's times only grow, and
/// this is the change's own.
pub(super) fn place(last: (Timestamp, u32), time: Timestamp) -> (Timestamp, u32) {
    let (last_time, last_index) = last;
    if time > last_time { (time, 1) } else { (last_time, last_index + 1) }
}

/// The reader task: drains the change stream into the channel until stopped. Each event gets
/// its place ([`place`]), continuing from the checkpoint's.
async fn read_changes(
    mut feed: impl ChangeFeed,
    tx: mpsc::Sender<Item>,
    stop: CancellationToken,
    mut last_time: Timestamp,
    mut last_index: u32,
    (health, role, source): (Health, RoleId, String),
) -> Result<(), SourceError> {
    let lag = metrics::gauge!("ficus_tail_lag_seconds", "source" => source);
    while !stop.is_cancelled() {
        let next = feed.next_change().await;
        if next.is_ok() {
            health.beat(&role);
        }
        match next {
            Ok(Some((mut record, token))) => {
                (record.cluster_time, record.index) = place((last_time, last_index), record.cluster_time);
                last_time = record.cluster_time;
                last_index = record.index;
                lag.set(crate::ops::age_seconds(last_time.time));
                if tx.send(Item::Change { record: Box::new(record), token }).await.is_err() {
                    return Ok(());
                }
            }
            Ok(None) => {
                // Nothing new: the stream is caught up with the source.
                lag.set(0.0);
                if let Some(token) = feed.resume_token()?
                    && tx.send(Item::Quiet { token, at: DateTime::now() }).await.is_err()
                {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_take_their_own_time_and_count_within_it() {
        let t = |time, increment| Timestamp { time, increment };
        assert_eq!(place((t(10, 1), 0), t(10, 2)), (t(10, 2), 1));
        // A transaction's changes sharing one time (as MongoDB gives them) count on.
        assert_eq!(place((t(10, 2), 1), t(10, 2)), (t(10, 2), 2));
        assert_eq!(place((t(10, 2), 2), t(11, 1)), (t(11, 1), 1));
    }

    /// The handoff after a snapshot: the copies are versioned at the source's clock (index 0)
    /// and the stream continues from there. A delete whose transaction was still open when the
    /// clock was read has an earlier time; placed at its own time it was older than the copy
    /// it deletes, and the service kept the document (issue 19). It goes after the copies.
    #[test]
    fn a_change_timed_before_the_copies_goes_after_them() {
        let t = |time, increment| Timestamp { time, increment };
        let copies = (t(100, 5), 0);
        let pending_delete = place(copies, t(100, 3));
        assert_eq!(pending_delete, (t(100, 5), 1));
        assert!(crate::event::Version::at(pending_delete.0, pending_delete.1) > crate::event::Version::at(copies.0, 0));
        assert_eq!(place(pending_delete, t(99, 9)), (t(100, 5), 2), "another, earlier still");
        assert_eq!(place((t(100, 5), 2), t(100, 6)), (t(100, 6), 1), "then the stream's own times");
    }
}
