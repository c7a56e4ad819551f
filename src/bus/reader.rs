//! Reading topics without joining a group: every partition from a chosen offset up to the end it
//! has when the read starts, and a group's committed offsets read from outside.
//!
//! `ficus replay` reads the live tail after the archive this way, `ficus dlq replay` the dead
//! letters (committing as it goes, in a group of its own), `ficus status` and a stalled-group
//! check the committed offsets against the high watermarks, and the demo what arrived.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{BusError, ClientRole, Delivery, client_config};
use crate::config::KafkaConfig;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps librdkafka's own chatter (connection refusals while a broker restarts, requests a
/// broker does not implement) at debug level: a reader's caller reports what matters.
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", "{fac}: {message}");
    }
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", "{error}: {reason}");
    }
}

impl ConsumerContext for ReaderContext {}

/// A consumer group's progress over some topics, read from outside.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupLag {
    /// Messages not yet consumed, over all partitions.
    pub lag: i64,
    /// Partitions with a committed offset, of all partitions.
    pub committed: usize,
    pub partitions: usize,
    /// The sum of the committed offsets (it moves whenever any member commits).
    pub committed_sum: i64,
}

/// One partition as [`Reader::positions`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset: the next message it will read.
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
}

impl PartitionPosition {
    /// Whether the group has consumed everything before `offset` (an empty partition's
    /// beginning counts as consumed).
    pub fn consumed_to(&self, offset: i64) -> bool {
        self.committed.unwrap_or(self.low).max(self.low) >= offset
    }
}

/// Where a partition's read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    Beginning,
    /// This offset (the next to read).
    Offset(i64),
    /// The reader's group's committed offset, or the beginning.
    Committed,
}

/// What a read to the end did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    pub read: u64,
    /// False when shutdown stopped it first.
    pub complete: bool,
}

/// A consumer that assigns partitions itself.
pub struct Reader {
    consumer: BaseConsumer<ReaderContext>,
    group: Option<String>,
}

impl Reader {
    /// A reader; with `group`, committed offsets are that group's (it is only read, or committed
    /// to by [`Self::read_to_end`] when asked, never joined).
    pub fn new(kafka: &KafkaConfig, client_id: &str, group: Option<&str>) -> Result<Reader, BusError> {
        let consumer =
            client_config(kafka, ClientRole::Reader { group }, client_id).create_with_context(ReaderContext)?;
        Ok(Reader { consumer, group: group.map(str::to_string) })
    }

    /// The partitions of a topic (none when it does not exist).
    pub fn partitions(&self, topic: &str) -> Result<Vec<i32>, BusError> {
        let md = tokio::task::block_in_place(|| self.consumer.fetch_metadata(Some(topic), TIMEOUT))?;
        Ok(md.topics().iter().filter(|t| t.name() == topic).flat_map(|t| t.partitions()).map(|p| p.id()).collect())
    }

    /// A partition's low and high watermarks.
    pub fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), BusError> {
        Ok(tokio::task::block_in_place(|| self.consumer.fetch_watermarks(topic, partition, TIMEOUT))?)
    }

    /// Per partition of `topics`: the reader's group's committed offset (`None`: nothing
    /// committed) and the partition's watermarks now. What a drain to a marker compares.
    pub fn positions(&self, topics: &[String]) -> Result<Vec<PartitionPosition>, BusError> {
        tokio::task::block_in_place(|| {
            let mut tpl = TopicPartitionList::new();
            for t in topics {
                let md = self.consumer.fetch_metadata(Some(t), TIMEOUT)?;
                for p in md.topics().iter().filter(|m| m.name() == t).flat_map(|t| t.partitions()) {
                    tpl.add_partition(t, p.id());
                }
            }
            let committed = match self.group {
                Some(_) => self.consumer.committed_offsets(tpl, TIMEOUT)?,
                None => tpl,
            };
            committed
                .elements()
                .iter()
                .map(|e| {
                    let (low, high) = self.consumer.fetch_watermarks(e.topic(), e.partition(), TIMEOUT)?;
                    let committed = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    Ok(PartitionPosition {
                        topic: e.topic().to_string(),
                        partition: e.partition(),
                        committed,
                        low,
                        high,
                    })
                })
                .collect()
        })
    }

    /// The reader's group's progress over `topics`.
    pub fn group_lag(&self, topics: &[String]) -> Result<GroupLag, BusError> {
        tokio::task::block_in_place(|| group_lag(&self.consumer, topics))
    }

    /// Reads every partition of `topics` from `start(topic, partition)` up to the high watermark
    /// it has now, handing batches of at most `batch` to `handle`. With `commit`, the offsets of
    /// each handled batch are committed to the reader's group before the next is read. Stops
    /// early (`complete: false`) on shutdown; a handler error stops it and is returned.
    pub async fn read_to_end<E: From<BusError>>(
        &self,
        topics: &[String],
        start: impl Fn(&str, i32) -> ReadFrom,
        batch: usize,
        commit: bool,
        shutdown: &CancellationToken,
        mut handle: impl AsyncFnMut(Vec<Delivery>) -> Result<(), E>,
    ) -> Result<ReadOutcome, E> {
        let (assign, mut ends) = self.assignment(topics, start)?;
        let mut outcome = ReadOutcome::default();
        if ends.is_empty() {
            outcome.complete = true;
            return Ok(outcome);
        }
        self.consumer.assign(&assign).map_err(BusError::from)?;
        let mut pending: Vec<Delivery> = Vec::new();
        while !ends.is_empty() || !pending.is_empty() {
            if shutdown.is_cancelled() {
                return Ok(outcome);
            }
            let polled = if ends.is_empty() {
                None
            } else {
                tokio::task::block_in_place(|| self.consumer.poll(Duration::from_millis(100)))
            };
            let idle = polled.is_none();
            if let Some(m) = polled {
                let m = m.map_err(BusError::from)?;
                let d = Delivery::from_message(&m);
                let key = (d.topic.clone(), d.partition);
                if let Some(end) = ends.get(&key).copied() {
                    if d.offset + 1 >= end {
                        ends.remove(&key);
                    }
                    if d.offset < end {
                        pending.push(d);
                    }
                }
            }
            if !pending.is_empty() && (pending.len() >= batch || idle || ends.is_empty()) {
                let done = std::mem::take(&mut pending);
                outcome.read += done.len() as u64;
                let positions = next_offsets(&done)?;
                handle(done).await?;
                if commit {
                    tokio::task::block_in_place(|| self.consumer.commit(&positions, CommitMode::Sync))
                        .map_err(BusError::from)?;
                }
            }
        }
        outcome.complete = true;
        Ok(outcome)
    }

    /// Where [`Self::read_to_end`] reads each partition of `topics` from, and the high watermark
    /// it reads up to; partitions with nothing to read are left out.
    #[allow(clippy::type_complexity)]
    fn assignment(
        &self,
        topics: &[String],
        start: impl Fn(&str, i32) -> ReadFrom,
    ) -> Result<(TopicPartitionList, HashMap<(String, i32), i64>), BusError> {
        let mut assign = TopicPartitionList::new();
        let mut ends: HashMap<(String, i32), i64> = HashMap::new();
        let mut wanted = TopicPartitionList::new();
        for topic in topics {
            for p in self.partitions(topic)? {
                wanted.add_partition(topic, p);
            }
        }
        let committed = match self.group {
            Some(_) => tokio::task::block_in_place(|| self.consumer.committed_offsets(wanted.clone(), TIMEOUT))?,
            None => wanted.clone(),
        };
        for e in committed.elements() {
            let (topic, p) = (e.topic(), e.partition());
            let from = match start(topic, p) {
                ReadFrom::Beginning => None,
                ReadFrom::Offset(o) => Some(o),
                ReadFrom::Committed => match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            };
            let (low, high) = self.watermarks(topic, p)?;
            if from.unwrap_or(low).max(low) < high {
                let offset = from.map_or(Offset::Beginning, Offset::Offset);
                assign.add_partition_offset(topic, p, offset)?;
                ends.insert((topic.to_string(), p), high);
            }
        }
        Ok((assign, ends))
    }
}

/// Per partition, the offset after the last delivery of a batch.
pub(super) fn next_offsets(batch: &[Delivery]) -> Result<TopicPartitionList, BusError> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for d in batch {
        let e = next.entry((d.topic.as_str(), d.partition)).or_insert(0);
        *e = (*e).max(d.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    Ok(tpl)
}

/// A group's committed offsets over `topics` against their high watermarks, through any
/// consumer of that group (blocking).
pub(super) fn group_lag<X: ConsumerContext, C: Consumer<X>>(c: &C, topics: &[String]) -> Result<GroupLag, BusError> {
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), TIMEOUT)?;
        for p in md.topics().iter().filter(|m| m.name() == t).flat_map(|t| t.partitions()) {
            tpl.add_partition(t, p.id());
        }
    }
    let committed = c.committed_offsets(tpl, TIMEOUT)?;
    let mut out = GroupLag { partitions: committed.count(), ..Default::default() };
    for e in committed.elements() {
        let (low, high) = c.fetch_watermarks(e.topic(), e.partition(), TIMEOUT)?;
        let at = match e.offset() {
            Offset::Offset(o) => {
                out.committed += 1;
                o
            }
            _ => low,
        };
        out.committed_sum += at;
        out.lag += (high - at).max(0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(topic: &str, partition: i32, offset: i64) -> Delivery {
        Delivery { topic: topic.into(), partition, offset, key: None, payload: Vec::new() }
    }

    #[test]
    fn a_batch_commits_the_offset_after_its_last_message_per_partition() {
        let tpl = next_offsets(&[d("t", 0, 5), d("t", 1, 2), d("t", 0, 7), d("u", 0, 0)]).unwrap();
        let mut got: Vec<(String, i32, Option<i64>)> = tpl
            .elements()
            .iter()
            .map(|e| {
                (e.topic().to_string(), e.partition(), if let Offset::Offset(o) = e.offset() { Some(o) } else { None })
            })
            .collect();
        got.sort();
        assert_eq!(got, [("t".into(), 0, Some(8)), ("t".into(), 1, Some(3)), ("u".into(), 0, Some(1))]);
    }
}
