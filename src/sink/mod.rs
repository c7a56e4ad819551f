//! The target side: version-guarded, idempotent writes of transform output into a service
//! database, and of a service's write-backs into the monolith.
//!
//! Every document ficus writes carries `_ficus: { v, src, event }`: `v` is the [`Version`] of
//! the last message applied, `src` the source document it came from. A write only lands where
//! the stored `v` is older, so duplicates, replays and redelivery after a rebalance are no-ops
//! and can never regress a document. Deletes remove the document and leave a tombstone
//! (`_ficus_tombstones`: collection, id, the delete's `v`) so a late, older upsert is refused
//! too; tombstones expire after the consume settings' TTL, which must exceed the longest
//! redelivery window (Kafka retention). Rollups keep one membership record per source
//! aggregate in `_ficus_members_<collection>` and recompute the group document ([`rollup`]).
//! A document the service owns (see `cutover`) is its application's to write, plain, so its
//! `_ficus` may be gone or stale: the newest monolith change merged into it is kept beside it
//! (`_ficus_merged`), and guards redelivered merges the way `_ficus.v` guards upserts.
//!
//! - [`plan`]: the order a batch's writes take (pure);
//! - [`merge`]: a non-owner's change merged into an owned document (pure), and [`conflicts`],
//!   where what could not be merged is recorded;
//! - [`rollup`]: a rollup's group document from its members (pure; `verify` computes the same);
//! - [`MongoSink`]: the MongoDB adapter;
//! - [`MonolithSink`]: the monolith as the sink of reverse sync (write-backs);
//! - [`RedisSink`] ([`redis`]): a service's entries in Redis (`[redis]` targets): the key
//!   layout, the guarded write script, expiry, back-pressure, and the rebuild and comparison
//!   `ficus replay` and `ficus verify` use.

use std::future::Future;

use bson::{Bson, Document};

use crate::event::{Message, Origin, Version};
use crate::mongo::{self, ErrorClass};
use crate::retry::Classify;
use crate::transform::{Write, WriteOp};

pub mod conflicts;
pub mod merge;
mod mongo_sink;
mod monolith;
pub mod plan;
pub mod redis;
pub mod rollup;

pub use mongo_sink::MongoSink;
pub use monolith::MonolithSink;
pub use redis::RedisSink;

/// The metadata field on every document ficus writes.
pub const META: &str = "_ficus";
pub const TOMBSTONES: &str = "_ficus_tombstones";
pub const MEMBERS_PREFIX: &str = "_ficus_members_";
/// Per owned document, the version of the newest monolith change merged into it.
pub const MERGED: &str = "_ficus_merged";
/// Which partitions have reported a completed snapshot, per target and snapshot.
pub const SNAPSHOTS: &str = "_ficus_snapshots";

/// The key of ficus's per-document bookkeeping (tombstones, verify's scratch records): the
/// collection and the document's `_id` in canonical Extended JSON, as one string. A string,
/// not a `{c, id}` sub-document, because some servers (secantusd-rs) answer `$in` over
/// document-valued `_id`s with a collection scan; strings use the `_id` index.
pub fn doc_key(collection: &str, id: &Bson) -> String {
    format!("{collection}/{}", id.clone().into_canonical_extjson())
}

/// One message's writes, with the position that versions them.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<O = WriteOp> {
    /// The message's position in the source's history.
    pub version: Version,
    pub event_id: String,
    pub source_collection: String,
    pub source_id: Bson,
    /// When the change happened at the source (for end-to-end latency).
    pub event_time: bson::DateTime,
    pub ops: Vec<O>,
    /// A dead letter re-driven (`ficus dlq replay`): later changes of its documents may have
    /// been applied meanwhile, so where a newer version is held its merges are applied as
    /// three-way merges against its own pre-image (the newer values stand, its own fields
    /// land) instead of being skipped as old.
    pub redriven: bool,
}

impl<O> Versioned<O> {
    /// The writes of one message, versioned by its position.
    pub fn of(m: &Message, ops: Vec<O>) -> Self {
        match m {
            Message::Event(ev) => Versioned {
                version: ev.position.version(),
                event_id: ev.id.clone(),
                source_collection: ev.data.collection.clone(),
                source_id: ev.data.document_id.clone(),
                event_time: ev.time,
                ops,
                redriven: false,
            },
            Message::Control(c) => Versioned {
                version: c.position.version(),
                event_id: c.id.clone(),
                source_collection: c.collection().to_string(),
                source_id: Bson::Null,
                event_time: c.time,
                ops,
                redriven: false,
            },
        }
    }
}

/// Errors from the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("target MongoDB: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error("writing to {collection}: error {code}: {message}")]
    Write { collection: String, code: i32, message: String },
    /// A write this sink does not take (a bug in the wiring, not in the data).
    #[error("{0}")]
    Unsupported(String),
    /// A service document the reverse transforms cannot write back (names the field).
    #[error(transparent)]
    Reverse(#[from] crate::transform::ReverseError),
    /// The write did not finish in time (a connection that hangs); it is tried again.
    #[error("the write did not finish within {}s; trying again", .0.as_secs())]
    TimedOut(std::time::Duration),
    /// The batch's writes were worked out under a view of ownership that no longer holds (the
    /// record changed, or the process, paused, has no young view to confirm it): worked out
    /// again, never committed as they are.
    #[error("the batch's view of ownership no longer holds ({0}); judging it again")]
    StaleJudgement(String),
    #[error("Redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A document whose entry cannot be laid down in Redis (no expiry, a value that does not
    /// fit its shape): permanent, so its message is dead-lettered.
    #[error("{collection}: entry `{key}`: {why}")]
    Entry { collection: String, key: String, why: String },
    /// Redis is too full to write into now (back-pressure): tried again after a backoff.
    #[error("paused: {0}")]
    Paused(String),
    /// A Redis that would evict ficus's keys: refused (bad configuration).
    #[error("{0}")]
    Evicting(String),
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        match self {
            SinkError::Mongo(e) => e.class(),
            SinkError::Write { code, .. } => mongo::classify_code(*code),
            SinkError::TimedOut(_) | SinkError::StaleJudgement(_) | SinkError::Paused(_) => ErrorClass::Transient,
            SinkError::Redis(e) => redis::classify(e),
            SinkError::Unsupported(_) | SinkError::Reverse(_) | SinkError::Entry { .. } | SinkError::Evicting(_) => {
                ErrorClass::Fatal
            }
        }
    }
}

impl SinkError {
    /// Whether it is about how ficus is deployed (a Redis that evicts): bad input, exit 2.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, SinkError::Evicting(_))
    }

    /// Whether it means "run the whole transaction again" (see [`mongo::transaction_conflict`]).
    pub fn is_conflict(&self) -> bool {
        match self {
            SinkError::Mongo(e) => mongo::transaction_conflict(e),
            SinkError::Write { code, .. } => matches!(code, 112 | 251),
            _ => false,
        }
    }
}

/// The apply marker a batch writes first, inside its transaction, into the database it writes
/// (`_ficus_applied`, see `tail::echo`): whose write the batch is, and where each partition it
/// read was, so the tail of that database knows the changes the batch causes for ficus's own;
/// and the closing marker it writes last.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub origin: Origin,
    /// Per topic and partition the batch read, the offset after its last message.
    pub positions: Vec<(String, i32, i64)>,
    /// Echoes of the service's own write-backs in the batch (counted in `_ficus_echoes`, which
    /// `ficus status` reads).
    pub echoes: u64,
    /// The view of ownership the batch's writes were judged by, asked again before the batch
    /// commits (`None`: nothing judged).
    pub judged: Option<JudgedBy>,
}

/// A judgement of ownership a batch was worked out under: whether it still holds.
pub trait Judgement: Send + Sync {
    /// `Err(why)` once it no longer holds.
    fn still_holds(&self) -> Result<(), String>;
}

/// The judgement a [`Marker`] carries.
#[derive(Clone)]
pub struct JudgedBy(pub std::sync::Arc<dyn Judgement>);

impl std::fmt::Debug for JudgedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JudgedBy(..)")
    }
}

impl PartialEq for JudgedBy {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Per origin, how many echoes of its write-backs its consumer skipped (not watched by tails).
const ECHOES: &str = "_ficus_echoes";

/// How many echoes of `service`'s write-backs its consumer has skipped, as counted in its
/// database `db` (the counter is written with each batch's marker, `Marker::write`).
pub async fn echoes_skipped(db: &mongodb::Database, service: &str) -> Result<i64, mongodb::error::Error> {
    let counter = db.collection::<Document>(ECHOES).find_one(bson::doc! { "_id": service }).await?;
    Ok(counter.and_then(|d| d.get_i64("skipped").ok()).unwrap_or(0))
}

impl Marker {
    /// Fails once the view of ownership the batch was judged by no longer holds (see
    /// `cutover::feed::Judging`): asked as a batch's transaction begins and again before it
    /// commits, so a batch judged before a forced switch never lands after it.
    pub fn still_judged(&self) -> Result<(), SinkError> {
        match &self.judged {
            Some(j) => j.0.still_holds().map_err(SinkError::StaleJudgement),
            None => Ok(()),
        }
    }

    /// Writes the closing marker, last in the session's transaction: the tail knows the
    /// transaction is over there (other writers' changes may come between its changes).
    pub async fn close(&self, db: &mongodb::Database, s: &mut mongodb::ClientSession) -> Result<(), SinkError> {
        // Per partition, like the opening markers, so concurrent members never collide on it.
        let at = self.positions.first().map(|(t, p, _)| format!("{t}/{p}")).unwrap_or_default();
        let (id, closing) = crate::markers::closing(&self.origin, &at);
        db.collection::<Document>(crate::markers::COLLECTION)
            .replace_one(bson::doc! { "_id": &id }, closing)
            .upsert(true)
            .session(&mut *s)
            .await?;
        Ok(())
    }

    /// Writes the marker (one document per partition) in the session's transaction.
    pub async fn write(&self, db: &mongodb::Database, s: &mut mongodb::ClientSession) -> Result<(), SinkError> {
        let markers = db.collection::<Document>(crate::markers::COLLECTION);
        for (topic, partition, offset) in &self.positions {
            let (id, marker) = crate::markers::opening(&self.origin, topic, *partition, *offset);
            // A replace carries the whole marker in the change event, as written.
            markers.replace_one(bson::doc! { "_id": &id }, marker).upsert(true).session(&mut *s).await?;
        }
        if self.echoes > 0 {
            db.collection::<Document>(ECHOES)
                .update_one(
                    bson::doc! { "_id": &self.origin.service },
                    bson::doc! { "$inc": { "skipped": self.echoes as i64 } },
                )
                .upsert(true)
                .session(&mut *s)
                .await?;
        }
        Ok(())
    }
}

/// Applies versioned writes to a service database.
///
/// Contract: when `apply` returns `Ok`, every write of the batch is durable (majority,
/// journaled), and the database is in the state one delivery of the batch's messages in
/// version order would leave, whatever was applied before: a write never lands over a newer
/// version (of the document or of its tombstone), so applying a batch twice, or batches out of
/// order, or interleaved with another writer of the same messages, converges to the same
/// state. The writes of a batch may go out in any order that keeps that promise ([`plan`]).
/// An error means some writes may have landed; applying the batch again is always safe. With a
/// [`Marker`], the batch is one transaction that writes the marker first: all of it lands, or
/// none.
///
/// Each sink names the writes it takes (`Op`): a service database's sink takes [`WriteOp`]s, the
/// monolith's sink takes reverse sync's [`crate::transform::WriteBack`]s, and a pipeline that
/// would hand one the other's does not compile.
pub trait Sink: Send + Sync {
    type Op: Write;

    fn apply(
        &self,
        batch: &[Versioned<Self::Op>],
        marker: Option<&Marker>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Removes ficus's metadata from a target document (for comparisons and display).
pub fn strip_meta(mut d: Document) -> Document {
    d.remove(META);
    d
}
