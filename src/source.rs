//! Where changes come from: the [`Source`] contract the tail reads through, and its MongoDB
//! adapter for the monolith's change stream and snapshot reads.
//!
//! The adapter speaks the driver's types and hands the rest of ficus owned [`ChangeRecord`]s. The stream
//! watches the whole source database (one ordered stream, so a transaction spanning collections
//! stays in commit order), filtered server-side to the collections that have topic definitions,
//! with `fullDocument: updateLookup` and `fullDocumentBeforeChange: whenAvailable`.
//!
//! Events and snapshot documents are read as raw BSON and converted structurally
//! ([`Document::try_from`]), never through serde: serde's `Document` reader takes a
//! sub-document such as `{"$numberInt": "5"}` or `{"$oid": ...}` (legal field names since
//! MongoDB 5.0) for an Extended JSON type wrapper, changing the value or failing on it.

use bson::{Bson, Document, RawDocumentBuf, Timestamp, doc};
use futures::TryStreamExt;
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use mongodb::{Client, Database};
use std::future::Future;
use std::time::Duration;

use crate::event::mapping::{ChangeRecord, TxnId};
use crate::event::{Op, Truncation};
use crate::mongo::{self, ErrorClass};
use crate::retry::Classify;

/// Errors from the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source MongoDB: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error(
        "the change stream can no longer resume from the checkpoint ({detail}): the oplog no longer holds that point. \
         Remedy: run `ficus run --resnapshot` (or set tail.on_history_lost = \"resnapshot\") to copy the collections again \
         and stream from there; consumers absorb the repeated events"
    )]
    HistoryLost { detail: String },
    #[error(
        "`{op}` on {namespace} cannot be expressed as document changes; the services are now behind the monolith. \
         Remedy: restore the collection or re-snapshot (`ficus run --resnapshot`)"
    )]
    Unsupported { op: String, namespace: String },
    #[error("malformed change event: {0}")]
    Malformed(String),
    /// The driver has no socket timeout: a `getMore` on a connection the network dropped
    /// silently waits for good. Bounded here, so the stream is opened again (transient).
    #[error("the change stream did not answer within {}s (a connection that hangs); opening it again", .0.as_secs())]
    Unanswered(Duration),
}

impl Classify for SourceError {
    fn class(&self) -> ErrorClass {
        match self {
            SourceError::Mongo(e) => e.class(),
            SourceError::HistoryLost { .. } => ErrorClass::HistoryLost,
            SourceError::Unanswered(_) => ErrorClass::Transient,
            SourceError::Unsupported { .. } | SourceError::Malformed(_) => ErrorClass::Fatal,
        }
    }
}

impl SourceError {
    /// Lifts a driver error, recognising lost history.
    pub fn from_mongo(e: mongodb::error::Error) -> SourceError {
        if mongo::classify(&e) == ErrorClass::HistoryLost {
            SourceError::HistoryLost { detail: mongo::describe(&e) }
        } else {
            SourceError::Mongo(e)
        }
    }
}

/// A database whose changes the tail follows.
///
/// Contract: [`Source::snapshot_start`] gives the copies' version and a point after which every
/// change comes that a copy made after the call might not see (one not yet visible when the copy
/// reads), so a feed opened there after the copy misses nothing the copy could not see; a
/// snapshot batch reads documents in `_id` order after `after`; a
/// [`ChangeFeed`] yields every change after its start in commit order, each with a token to
/// resume after it.
pub trait Source: Clone + Send + Sync + 'static {
    type Feed: ChangeFeed;
    /// Where a snapshot about to start begins: its copies' version and where the stream after it
    /// resumes (see the contract above).
    fn snapshot_start(&self) -> impl Future<Output = Result<Handoff, SourceError>> + Send;
    /// Roughly how many documents a collection holds (for progress).
    fn estimated_count(&self, coll: &str) -> impl Future<Output = Result<u64, SourceError>> + Send;
    /// The next documents of a collection in `_id` order, after `after`.
    fn snapshot_batch(
        &self,
        coll: &str,
        after: Option<&Bson>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Document>, SourceError>> + Send;
    /// Opens the change feed.
    fn watch(
        &self,
        start: &StartAt,
        batch_size: u32,
        max_await: Duration,
    ) -> impl Future<Output = Result<Self::Feed, SourceError>> + Send;
}

/// A source's changes in commit order.
pub trait ChangeFeed: Send + 'static {
    /// The next change with the token that resumes after it, or `None` when none is waiting
    /// right now (the feed is caught up).
    fn next_change(&mut self) -> impl Future<Output = Result<Option<(ChangeRecord, Document)>, SourceError>> + Send;
    /// The token that resumes after everything read so far, quiet periods included.
    fn resume_token(&self) -> Result<Option<Document>, SourceError>;
}

/// Where a snapshot begins (see [`Source::snapshot_start`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    /// The version every copy carries: the source's clock when the snapshot began.
    pub version: Timestamp,
    /// Where the stream resumes after the copy; `None`: at `version`'s time.
    pub resume: Option<Document>,
}

/// Where a change stream starts.
#[derive(Debug, Clone)]
pub enum StartAt {
    /// After the event (or post-batch point) this token names.
    Token(Document),
    /// At this cluster time, inclusive.
    Time(Timestamp),
}

/// The monolith.
#[derive(Clone)]
pub struct MongoSource {
    client: Client,
    db: Database,
    collections: Vec<String>,
}

/// How long past the server's own `maxAwaitTimeMS` a `getMore` may take before the stream is
/// taken for hung. A live server answers an idle `getMore` at `max_await`; a slow batch under
/// load takes seconds, not this.
const ANSWER_GRACE: Duration = Duration::from_secs(30);

/// The monolith's change stream, one raw event document at a time (see the module header for
/// why raw).
pub struct MongoFeed {
    stream: ChangeStream<RawDocumentBuf>,
    /// The longest a `getMore` may take before the stream counts as hung.
    answer_within: Duration,
}

impl ChangeFeed for MongoFeed {
    async fn next_change(&mut self) -> Result<Option<(ChangeRecord, Document)>, SourceError> {
        // Dropping the driver's future on timeout drops its connection with it (the driver
        // never returns a connection with a reply unread); the tail then opens the stream again
        // from its checkpoint.
        let next = tokio::time::timeout(self.answer_within, self.stream.next_if_any())
            .await
            .map_err(|_| SourceError::Unanswered(self.answer_within))?;
        match next.map_err(SourceError::from_mongo)? {
            Some(raw) => to_record(&raw).map(Some),
            None => Ok(None),
        }
    }

    fn resume_token(&self) -> Result<Option<Document>, SourceError> {
        self.stream.resume_token().map(|t| token_doc(&t)).transpose()
    }
}

impl MongoSource {
    /// The source over `db` of the process's `client` (see `clients`), following `collections`.
    pub fn new(client: mongodb::Client, db: &str, collections: Vec<String>) -> Self {
        let db = client.database(db);
        MongoSource { client, db, collections }
    }

    /// The database followed.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The time of the oldest oplog entry, where ficus may read `local.oplog.rs` (not every
    /// deployment grants that; `None` then, and the server's own check is relied on).
    pub async fn oldest_oplog_time(&self) -> Option<Timestamp> {
        let oplog = self.client.database("local").collection::<Document>("oplog.rs");
        let first = oplog.find_one(doc! {}).sort(doc! { "$natural": 1 }).projection(doc! { "ts": 1 }).await.ok()??;
        first.get_timestamp("ts").ok()
    }
}

impl MongoSource {
    /// The server's current cluster time (its latest operation time).
    async fn cluster_time(&self) -> Result<Timestamp, SourceError> {
        if let Some(ts) = mongo::cluster_time(&self.db).await? {
            return Ok(ts);
        }
        let hello = self.client.database("admin").run_command(doc! { "hello": 1 }).await?;
        if let Ok(ts) =
            hello.get_document("lastWrite").and_then(|d| d.get_document("opTime")).and_then(|d| d.get_timestamp("ts"))
        {
            return Ok(ts);
        }
        Err(SourceError::Malformed("the server reports no operationTime or $clusterTime: is it a replica set?".into()))
    }
}

impl Source for MongoSource {
    type Feed = MongoFeed;

    /// The copies' version is the server's clock, read first; the stream resumes where a fresh
    /// change stream opens, taken from its first, empty batch: after everything visible, before
    /// anything not yet (MongoDB's oplog visibility, secantusd-rs's visible tail).
    ///
    /// The clock (a command's `operationTime`) may already count writes that are not yet
    /// visible: a write's time is taken before it commits, and secantusd-rs gives each statement
    /// of a transaction its time when the statement runs. ficus used to start the stream at the
    /// clock, which skipped such a write: a delete in a transaction that committed after the
    /// copy had read its document never reached the services (issue 19). Opened where a fresh
    /// stream opens, the stream shows it, and the tail places it after the copies (see
    /// `tail::stream`). A server that gives no such token (before MongoDB 4.0.7) has the stream
    /// start at the clock.
    async fn snapshot_start(&self) -> Result<Handoff, SourceError> {
        let version = self.cluster_time().await?;
        let fresh = self.db.watch().batch_size(0).await.map_err(SourceError::from_mongo)?;
        let resume = fresh.resume_token().map(|t| token_doc(&t)).transpose()?;
        Ok(Handoff { version, resume })
    }

    /// Opens the change stream.
    async fn watch(&self, start: &StartAt, batch_size: u32, max_await: Duration) -> Result<MongoFeed, SourceError> {
        // ficus's apply markers too: they tell the tailer which transactions were ficus's own.
        let mut collections = self.collections.clone();
        collections.push(crate::markers::COLLECTION.to_string());
        let pipeline = [doc! { "$match": {
            "ns.coll": { "$in": &collections },
            "operationType": { "$in": ["insert", "update", "replace", "delete", "drop", "rename", "dropDatabase", "invalidate"] },
        }}];
        let mut w = self
            .db
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
            .batch_size(batch_size)
            .max_await_time(max_await);
        w = match start {
            StartAt::Token(t) => {
                let token: ResumeToken = bson::deserialize_from_document(t.clone()).map_err(|e| {
                    SourceError::HistoryLost { detail: format!("stored resume token is unusable: {e}") }
                })?;
                w.resume_after(token)
            }
            StartAt::Time(ts) => {
                // Some servers start silently at their oldest entry when asked for an earlier
                // time; that would skip changes, so check first.
                if let Some(oldest) = self.oldest_oplog_time().await
                    && oldest > *ts
                {
                    return Err(SourceError::HistoryLost {
                        detail: format!("the stream should start at {ts:?} but the oplog begins at {oldest:?}"),
                    });
                }
                w.start_at_operation_time(*ts)
            }
        };
        let stream = w.await.map_err(|e| match (start, crate::mongo::error_code(&e)) {
            // A token the server cannot parse is as unusable as one it no longer holds.
            (StartAt::Token(_), Some(9)) => SourceError::HistoryLost {
                detail: format!("the stored resume token is unusable: {}", mongo::describe(&e)),
            },
            _ => SourceError::from_mongo(e),
        })?;
        Ok(MongoFeed { stream: stream.with_type::<RawDocumentBuf>(), answer_within: max_await + ANSWER_GRACE })
    }

    /// Estimated documents in a collection (for snapshot progress).
    async fn estimated_count(&self, coll: &str) -> Result<u64, SourceError> {
        Ok(self.db.collection::<Document>(coll).estimated_document_count().await?)
    }

    /// Reads the next batch of a collection in `_id` order, after `after`.
    async fn snapshot_batch(&self, coll: &str, after: Option<&Bson>, limit: u32) -> Result<Vec<Document>, SourceError> {
        let filter = match after {
            Some(id) => doc! { "_id": { "$gt": id.clone() } },
            None => doc! {},
        };
        let cursor = self
            .db
            .collection::<RawDocumentBuf>(coll)
            .find(filter)
            .sort(doc! { "_id": 1 })
            .limit(i64::from(limit))
            .batch_size(limit)
            .await?;
        let raw: Vec<RawDocumentBuf> = cursor.try_collect().await?;
        raw.iter()
            .map(|r| mongo::to_document(r).map_err(|e| SourceError::Malformed(format!("a document of {coll}: {e}"))))
            .collect()
    }
}

/// The transaction a change event belongs to: its `lsid` and `txnNumber`, which MongoDB puts on
/// the events of multi-document transactions only.
fn txn_of(ev: &Document) -> Option<TxnId> {
    let lsid = ev.get_document("lsid").ok()?;
    let number = match ev.get("txnNumber")? {
        Bson::Int64(n) => *n,
        Bson::Int32(n) => i64::from(*n),
        _ => return None,
    };
    Some(TxnId { lsid: Bson::Document(lsid.clone()).into_canonical_extjson().to_string(), number })
}

/// The `_data` string of a resume token document (or its Extended JSON when it has none).
pub fn token_data(token: &Document) -> String {
    match token.get("_data") {
        Some(Bson::String(s)) => s.clone(),
        _ => Bson::Document(token.clone()).into_canonical_extjson().to_string(),
    }
}

/// A resume token as a plain document.
pub fn token_doc(token: &ResumeToken) -> Result<Document, SourceError> {
    bson::serialize_to_document(token).map_err(|e| SourceError::Malformed(format!("resume token: {e}")))
}

/// The arrays an update shortened (`truncatedArrays`, MongoDB 5.0 on: `[{field, newSize}]`).
fn truncated_arrays(u: &Document) -> Result<Vec<Truncation>, String> {
    let Ok(entries) = u.get_array("truncatedArrays") else { return Ok(Vec::new()) };
    entries
        .iter()
        .map(|e| {
            let e = e.as_document().ok_or_else(|| format!("expected documents, found {e}"))?;
            let field = e.get_str("field").map_err(|_| format!("an entry without a `field`: {e}"))?;
            let new_size = match e.get("newSize") {
                Some(Bson::Int32(n)) => u32::try_from(*n).ok(),
                Some(Bson::Int64(n)) => u32::try_from(*n).ok(),
                _ => None,
            };
            let new_size = new_size.ok_or_else(|| format!("`{field}` without a valid `newSize`: {e}"))?;
            Ok(Truncation { field: field.to_string(), new_size })
        })
        .collect()
}

/// Converts one raw change-stream event into a [`ChangeRecord`] (index left at 0 for the caller
/// to assign) and its resume token. Operations that are not document changes are errors the
/// caller must surface.
pub fn to_record(raw: &bson::RawDocument) -> Result<(ChangeRecord, Document), SourceError> {
    let ev = mongo::to_document(raw).map_err(|e| SourceError::Malformed(format!("change event: {e}")))?;
    let ns = ev.get_document("ns").ok();
    let collection = ns.and_then(|n| n.get_str("coll").ok()).map(str::to_string);
    let namespace = ns
        .map(|n| format!("{}.{}", n.get_str("db").unwrap_or("?"), collection.as_deref().unwrap_or("*")))
        .unwrap_or_else(|| "?".into());
    let kind =
        ev.get_str("operationType").map_err(|_| SourceError::Malformed("change event without operationType".into()))?;
    let op = match kind {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "replace" => Op::Replace,
        "delete" => Op::Delete,
        other => return Err(SourceError::Unsupported { op: other.to_string(), namespace }),
    };
    let collection = collection.ok_or_else(|| SourceError::Malformed(format!("{op} event without a collection")))?;
    let token = ev
        .get_document("_id")
        .cloned()
        .map_err(|_| SourceError::Malformed(format!("{op} event on {collection} without a resume token")))?;
    let document_id = ev
        .get_document("documentKey")
        .ok()
        .and_then(|k| k.get("_id").cloned())
        .ok_or_else(|| SourceError::Malformed(format!("{op} event on {collection} without documentKey._id")))?;
    let cluster_time = ev
        .get_timestamp("clusterTime")
        .map_err(|_| SourceError::Malformed(format!("{op} event on {collection} without clusterTime")))?;
    let image = |field: &str| ev.get_document(field).ok().cloned();
    let (changed, removed, truncated) = match ev.get_document("updateDescription") {
        Ok(u) => (
            Some(u.get_document("updatedFields").cloned().unwrap_or_default()),
            u.get_array("removedFields")
                .map(|a| a.iter().filter_map(|f| f.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
            truncated_arrays(u).map_err(|why| {
                SourceError::Malformed(format!("{op} event on {collection}: updateDescription.truncatedArrays: {why}"))
            })?,
        ),
        Err(_) => (None, Vec::new(), Vec::new()),
    };
    let record = ChangeRecord {
        op,
        collection,
        document_id,
        after: image("fullDocument"),
        before: image("fullDocumentBeforeChange"),
        changed,
        removed,
        truncated,
        cluster_time,
        index: 0,
        wall_time: ev.get_datetime("wallTime").ok().copied(),
        resume_token: Some(token_data(&token)),
        txn: txn_of(&ev),
        origin: None,
    };
    Ok((record, token))
}
