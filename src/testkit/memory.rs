//! In-memory implementations of ficus's own traits, to drive a role in a unit test without a
//! server: a [`MemorySource`] (a database and its change feed), a [`MemoryPublisher`] (a bus that
//! acknowledges at once and keeps what it was given), [`MemoryCheckpoints`] (fenced like the
//! store's), and a [`MemorySink`] that keeps the same promises as the MongoDB sink: version
//! guards, tombstones, rollups, retains and sweeps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bson::{Bson, Document, Timestamp, doc};
use futures::FutureExt;

use crate::bus::{Ack, BusError, Publisher};
use crate::event::mapping::ChangeRecord;
use crate::event::{CanonicalEvent, ControlMessage, Message, Version};
use crate::sink::plan::{Built, Step, plan, retained_away};
use crate::sink::rollup::GroupTally;
use crate::sink::{Sink, SinkError, Versioned};
use crate::source::{ChangeFeed, Source, SourceError, StartAt};
use crate::tail::checkpoint::{CheckpointError, CheckpointStore, TailState};
use crate::transform::{Base, WriteOp};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct SourceState {
    /// Documents as a snapshot would copy them, per collection, by `_id`.
    docs: BTreeMap<String, BTreeMap<String, Document>>,
    /// Changes in commit order, each at its own cluster time.
    changes: Vec<ChangeRecord>,
    /// The last cluster time handed out.
    now: u32,
}

/// A database and its change feed, in memory. Documents seeded with [`Self::seed`] existed
/// before ficus looked; changes recorded with [`Self::change`] happen now, one cluster time
/// each. `_id`s are compared as their text, so use ones that sort alike (padded numbers).
#[derive(Clone, Default)]
pub struct MemorySource(Arc<Mutex<SourceState>>);

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// A document that was there before ficus looked.
    pub fn seed(&self, collection: &str, doc: Document) {
        let id = doc.get("_id").map(Bson::to_string).unwrap_or_default();
        lock(&self.0).docs.entry(collection.to_string()).or_default().insert(id, doc);
    }

    /// A change happening now: applied to the documents and recorded in the feed. Its
    /// cluster time is set here; returns it.
    pub fn change(&self, mut record: ChangeRecord) -> Timestamp {
        let mut s = lock(&self.0);
        s.now += 1;
        record.cluster_time = Timestamp { time: 1_000, increment: s.now };
        let id = record.document_id.to_string();
        let docs = s.docs.entry(record.collection.clone()).or_default();
        match &record.after {
            Some(after) => {
                docs.insert(id, after.clone());
            }
            None => {
                docs.remove(&id);
            }
        }
        let at = record.cluster_time;
        s.changes.push(record);
        at
    }
}

impl Source for MemorySource {
    type Feed = MemoryFeed;

    async fn snapshot_start(&self) -> Result<crate::source::Handoff, SourceError> {
        // Nothing is ever pending in memory: the copies' version is the clock, the stream starts there.
        let version = Timestamp { time: 1_000, increment: lock(&self.0).now };
        Ok(crate::source::Handoff { version, resume: None })
    }

    async fn estimated_count(&self, coll: &str) -> Result<u64, SourceError> {
        Ok(lock(&self.0).docs.get(coll).map_or(0, |d| d.len() as u64))
    }

    async fn snapshot_batch(&self, coll: &str, after: Option<&Bson>, limit: u32) -> Result<Vec<Document>, SourceError> {
        let s = lock(&self.0);
        let after = after.map(Bson::to_string);
        Ok(s.docs
            .get(coll)
            .into_iter()
            .flat_map(|d| d.iter())
            .filter(|(id, _)| after.as_ref().is_none_or(|a| *id > a))
            .take(limit as usize)
            .map(|(_, d)| d.clone())
            .collect())
    }

    async fn watch(&self, start: &StartAt, _batch: u32, _max_await: Duration) -> Result<MemoryFeed, SourceError> {
        let s = lock(&self.0);
        let next = match start {
            StartAt::Time(ts) => s.changes.iter().position(|c| c.cluster_time >= *ts).unwrap_or(s.changes.len()),
            StartAt::Token(t) => t.get_i64("n").map(|n| n as usize + 1).unwrap_or(0),
        };
        Ok(MemoryFeed { source: self.clone(), next })
    }
}

/// A [`MemorySource`]'s feed; a token is `{n: <index of the change>}`.
pub struct MemoryFeed {
    source: MemorySource,
    next: usize,
}

impl ChangeFeed for MemoryFeed {
    async fn next_change(&mut self) -> Result<Option<(ChangeRecord, Document)>, SourceError> {
        let change = lock(&self.source.0).changes.get(self.next).cloned();
        match change {
            Some(c) => {
                let token = doc! { "n": self.next as i64 };
                self.next += 1;
                Ok(Some((c, token)))
            }
            None => {
                // A real feed waits for changes before saying there are none.
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(None)
            }
        }
    }

    fn resume_token(&self) -> Result<Option<Document>, SourceError> {
        Ok(self.next.checked_sub(1).map(|n| doc! { "n": n as i64 }))
    }
}

// ---------------------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------------------

/// One message handed to a [`MemoryPublisher`].
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub topic: String,
    /// Set for a message put on one partition explicitly (control messages).
    pub partition: Option<i32>,
    pub message: Message,
}

/// A bus that acknowledges everything at once and keeps it, in order.
#[derive(Default)]
pub struct MemoryPublisher {
    sent: Mutex<Vec<Published>>,
    partitions: HashMap<String, i32>,
}

impl MemoryPublisher {
    /// Topics have one partition unless named here.
    pub fn with_partitions(partitions: &[(&str, i32)]) -> Self {
        MemoryPublisher {
            sent: Mutex::default(),
            partitions: partitions.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
        }
    }

    /// Everything published so far.
    pub fn published(&self) -> Vec<Published> {
        lock(&self.sent).clone()
    }
}

impl Publisher for MemoryPublisher {
    async fn publish(&self, topic: &str, event: &CanonicalEvent) -> Result<Ack, BusError> {
        let message = Message::Event(event.clone());
        lock(&self.sent).push(Published { topic: topic.into(), partition: None, message });
        Ok(futures::future::ready(Ok(())).boxed())
    }

    async fn publish_to_all_partitions(
        &self,
        topic: &str,
        message: impl Fn(i32, i32) -> ControlMessage + Send,
    ) -> Result<Vec<Ack>, BusError> {
        let n = self.partitions.get(topic).copied().unwrap_or(1);
        let mut acks = Vec::new();
        for p in 0..n {
            let m = Message::Control(message(p, n));
            lock(&self.sent).push(Published { topic: topic.into(), partition: Some(p), message: m });
            acks.push(futures::future::ready(Ok(())).boxed());
        }
        Ok(acks)
    }

    fn flush(&self, _timeout: Duration) -> Result<(), BusError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

/// Tail checkpoints in memory, fenced by lease epoch as in the store.
#[derive(Default)]
pub struct MemoryCheckpoints(Mutex<HashMap<String, TailState>>);

impl MemoryCheckpoints {
    pub fn get(&self, source: &str) -> Option<TailState> {
        lock(&self.0).get(source).cloned()
    }
}

impl CheckpointStore for MemoryCheckpoints {
    async fn load(&self, source: &str) -> Result<Option<TailState>, CheckpointError> {
        Ok(self.get(source))
    }

    async fn save(&self, state: &TailState) -> Result<(), CheckpointError> {
        let mut all = lock(&self.0);
        if let Some(held) = all.get(&state.source)
            && held.epoch > state.epoch
        {
            return Err(CheckpointError::Fenced { source_name: state.source.clone() });
        }
        all.insert(state.source.clone(), state.clone());
        Ok(())
    }

    async fn clear(&self, source: &str, epoch: Option<i64>) -> Result<(), CheckpointError> {
        let mut all = lock(&self.0);
        if all.get(source).is_none_or(|held| held.epoch <= epoch) {
            all.remove(source);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Sink
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Stored {
    id: Bson,
    doc: Document,
    version: Version,
    source: (String, Bson),
}

#[derive(Debug, Clone)]
struct Member {
    group: Option<Bson>,
    values: Document,
    version: Version,
}

#[derive(Default)]
struct SinkState {
    docs: HashMap<String, BTreeMap<String, Stored>>,
    tombstones: HashMap<(String, String), Version>,
    members: HashMap<String, BTreeMap<String, Member>>,
    snapshots: HashMap<(String, String, Version), (BTreeSet<i32>, bool)>,
    conflicts: Vec<(String, Bson, Vec<crate::sink::merge::FieldConflict>)>,
}

/// A service database in memory, with the MongoDB sink's promises.
#[derive(Default)]
pub struct MemorySink(Mutex<SinkState>);

impl MemorySink {
    /// A collection's documents with their `_id`, without ficus's metadata, in `_id` order.
    pub fn documents(&self, collection: &str) -> Vec<Document> {
        let s = lock(&self.0);
        s.docs
            .get(collection)
            .into_iter()
            .flat_map(|c| c.values())
            .map(|d| {
                let mut out = doc! { "_id": d.id.clone() };
                out.extend(d.doc.clone());
                out
            })
            .collect()
    }
}

impl MemorySink {
    /// The conflicts merges recorded: collection, document `_id`, fields.
    pub fn conflicts(&self) -> Vec<(String, Bson, Vec<crate::sink::merge::FieldConflict>)> {
        lock(&self.0).conflicts.clone()
    }
}

impl SinkState {
    fn merge(
        &mut self,
        v: &Versioned,
        collection: &str,
        id: &Bson,
        (theirs, base): (Option<&Document>, &Base),
        arrays: &[(String, Option<String>)],
    ) {
        let key = id.to_string();
        let current = self.docs.get(collection).and_then(|c| c.get(&key)).cloned();
        if current.as_ref().is_some_and(|d| d.version >= v.version)
            || (current.is_none()
                && self.tombstones.get(&(collection.to_string(), key.clone())).is_some_and(|t| *t >= v.version))
        {
            return;
        }
        let merged = crate::sink::merge::merge(current.as_ref().map(|d| &d.doc), base, theirs, arrays);
        let source = (v.source_collection.clone(), v.source_id.clone());
        match (merged.write, current) {
            (Some(doc), _) => {
                let stored = Stored { id: id.clone(), doc, version: v.version.clone(), source };
                self.docs.entry(collection.to_string()).or_default().insert(key, stored);
            }
            (None, Some(mut d)) => {
                d.version = v.version.clone();
                self.docs.entry(collection.to_string()).or_default().insert(key, d);
            }
            (None, None) => {}
        }
        if !merged.conflicts.is_empty() {
            self.conflicts.push((collection.to_string(), id.clone(), merged.conflicts));
        }
    }

    fn upsert(&mut self, v: &Versioned, collection: &str, id: &Bson, doc: &Document) {
        let key = id.to_string();
        if self.tombstones.get(&(collection.to_string(), key.clone())).is_some_and(|t| *t >= v.version) {
            return;
        }
        let docs = self.docs.entry(collection.to_string()).or_default();
        if docs.get(&key).is_some_and(|d| d.version >= v.version) {
            return;
        }
        let source = (v.source_collection.clone(), v.source_id.clone());
        docs.insert(key, Stored { id: id.clone(), doc: doc.clone(), version: v.version.clone(), source });
    }

    /// The echo of the service's own write-back: its version recorded, nothing written.
    fn witness(&mut self, version: &Version, collection: &str, id: &Bson, deleted: bool) {
        let key = id.to_string();
        if deleted {
            let tomb = self.tombstones.entry((collection.to_string(), key)).or_default();
            if *tomb < *version {
                *tomb = version.clone();
            }
        } else if let Some(d) = self.docs.get_mut(collection).and_then(|c| c.get_mut(&key))
            && d.version < *version
        {
            d.version = version.clone();
        }
    }

    fn delete(&mut self, version: &Version, collection: &str, id: &Bson) {
        let key = id.to_string();
        let tomb = self.tombstones.entry((collection.to_string(), key.clone())).or_default();
        if *tomb < *version {
            *tomb = version.clone();
        }
        let docs = self.docs.entry(collection.to_string()).or_default();
        if docs.get(&key).is_some_and(|d| d.version < *version) {
            docs.remove(&key);
        }
    }

    fn built_by(&self, collection: &str, source: &(String, Bson)) -> Vec<Bson> {
        self.docs
            .get(collection)
            .into_iter()
            .flat_map(|c| c.values())
            .filter(|d| d.source == *source)
            .map(|d| d.id.clone())
            .collect()
    }

    fn rollup(&mut self, v: &Versioned, collection: &str, op: &WriteOp) {
        let WriteOp::Rollup { group, member, count_field, distinct, group_fields, .. } = op else { return };
        let members = self.members.entry(collection.to_string()).or_default();
        let key = member.to_string();
        let previous = members.get(&key).cloned();
        if previous.as_ref().is_some_and(|p| p.version >= v.version) {
            return;
        }
        let values: Document = distinct.iter().map(|(f, x)| (f.clone(), x.clone().unwrap_or(Bson::Null))).collect();
        members.insert(key, Member { group: group.clone(), values, version: v.version.clone() });
        let mut affected: Vec<Bson> = group.iter().cloned().collect();
        if let Some(old) = previous.and_then(|p| p.group)
            && !affected.contains(&old)
        {
            affected.push(old);
        }
        for g in affected {
            let in_group: Vec<Member> =
                self.members[collection].values().filter(|m| m.group.as_ref() == Some(&g)).cloned().collect();
            let docs = self.docs.entry(collection.to_string()).or_default();
            if in_group.is_empty() {
                docs.remove(&g.to_string());
                continue;
            }
            let mut tally = GroupTally::new(distinct.iter().map(|(f, _)| f.as_str()));
            for m in &in_group {
                tally.add(|f| m.values.get(f));
            }
            let newest = in_group.iter().map(|m| m.version.clone()).max().unwrap_or_default();
            let mut doc = match docs.get(&g.to_string()) {
                Some(d) if Some(&g) != group.as_ref() => d.doc.clone(),
                _ => group_fields.clone(),
            };
            doc.extend(tally.fields(count_field));
            let source = (v.source_collection.clone(), Bson::Null);
            docs.insert(g.to_string(), Stored { id: g.clone(), doc, version: newest, source });
        }
    }

    fn sweep(&mut self, v: &Versioned, op: &WriteOp) {
        let WriteOp::Sweep { collection, source_collection, before, partition, partitions, rollup } = op else {
            return;
        };
        let key = (collection.clone(), source_collection.clone(), before.clone());
        let (seen, swept) = self.snapshots.entry(key).or_default();
        seen.insert(*partition);
        if (seen.len() as i32) < *partitions || *swept {
            return;
        }
        *swept = true;
        let at = Versioned { version: before.clone(), ..v.clone() };
        match rollup {
            None => {
                let stale: Vec<Bson> = self
                    .docs
                    .get(collection)
                    .into_iter()
                    .flat_map(|c| c.values())
                    .filter(|d| d.source.0 == *source_collection && d.version < *before)
                    .map(|d| d.id.clone())
                    .collect();
                for id in stale {
                    self.delete(before, collection, &id);
                }
            }
            Some((count_field, distinct)) => {
                let stale: Vec<String> = self
                    .members
                    .get(collection)
                    .into_iter()
                    .flat_map(|m| m.iter())
                    .filter(|(_, m)| m.version < *before && m.group.is_some())
                    .map(|(k, _)| k.clone())
                    .collect();
                for member in stale {
                    let leave = WriteOp::Rollup {
                        collection: collection.clone(),
                        group: None,
                        member: Bson::String(member),
                        count_field: count_field.clone(),
                        distinct: distinct.iter().map(|d| (d.clone(), None)).collect(),
                        group_fields: Document::new(),
                    };
                    self.rollup(&at, collection, &leave);
                }
            }
        }
    }
}

impl Sink for MemorySink {
    type Op = WriteOp;

    async fn apply(&self, batch: &[Versioned], _marker: Option<&crate::sink::Marker>) -> Result<(), SinkError> {
        let plan = plan(batch);
        let mut s = lock(&self.0);
        for (collection, upserts) in &plan.upserts {
            for u in upserts {
                s.upsert(u.by, collection, u.id, u.doc);
            }
        }
        for Step { by, op } in &plan.steps {
            match op {
                WriteOp::Delete { collection, id: Some(id) } => s.delete(&by.version, collection, id),
                WriteOp::Delete { collection, id: None } => {
                    for id in s.built_by(collection, &(by.source_collection.clone(), by.source_id.clone())) {
                        s.delete(&by.version, collection, &id);
                    }
                }
                WriteOp::Rollup { collection, .. } => s.rollup(by, collection, op),
                WriteOp::Merge { collection, id, doc, base, arrays, .. } => {
                    s.merge(by, collection, id, (doc.as_ref(), base), arrays)
                }
                WriteOp::Witness { collection, id, deleted } => s.witness(&by.version, collection, id, *deleted),
                _ => {}
            }
        }
        for (collection, retains) in &plan.retains {
            let built: Vec<Built> = s
                .docs
                .get(*collection)
                .into_iter()
                .flat_map(|c| c.values())
                .map(|d| Built { id: d.id.clone(), source_id: d.source.1.clone(), version: d.version.clone() })
                .collect();
            for (v, id) in retained_away(retains, &built) {
                s.delete(&v.version, collection, &id);
            }
        }
        for Step { by, op } in &plan.sweeps {
            s.sweep(by, op);
        }
        Ok(())
    }
}
