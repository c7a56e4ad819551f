//! The MongoDB source adapter: the monolith's change stream and the snapshot reader.
//!
//! It speaks the driver's types and hands the rest of ficus owned [`ChangeRecord`]s. The stream
//! watches the whole source database (one ordered stream, so a transaction spanning collections
//! stays in commit order), filtered server-side to the collections that have topic definitions,
//! with `fullDocument: updateLookup` and `fullDocumentBeforeChange: whenAvailable`.

use bson::{Bson, Document, Timestamp, doc};
use futures::TryStreamExt;
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use mongodb::{Client, Database};
use std::time::Duration;

use crate::event::Op;
use crate::mapping::ChangeRecord;
use crate::mongo::{self, ErrorClass};

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
}

impl SourceError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SourceError::Mongo(e) => mongo::classify(e),
            SourceError::HistoryLost { .. } => ErrorClass::HistoryLost,
            SourceError::Unsupported { .. } | SourceError::Malformed(_) => ErrorClass::Fatal,
        }
    }

    /// Lifts a driver error, recognising lost history.
    pub fn from_mongo(e: mongodb::error::Error) -> SourceError {
        if mongo::classify(&e) == ErrorClass::HistoryLost {
            SourceError::HistoryLost { detail: mongo::describe(&e) }
        } else {
            SourceError::Mongo(e)
        }
    }
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

pub type Stream = ChangeStream<ChangeStreamEvent<Document>>;

impl MongoSource {
    pub async fn connect(uri: &str, db: &str, collections: Vec<String>) -> Result<Self, SourceError> {
        let client = mongo::connect(uri, "tail").await?;
        let db = client.database(db);
        Ok(MongoSource { client, db, collections })
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The server's current cluster time (its latest operation time), used as the point the
    /// stream resumes from after a snapshot. It is read before the copy starts, so every change
    /// the copy might miss is at or after it.
    pub async fn cluster_time(&self) -> Result<Timestamp, SourceError> {
        let reply = self.db.run_command(doc! { "ping": 1 }).await?;
        if let Ok(ts) = reply.get_timestamp("operationTime") {
            return Ok(ts);
        }
        if let Ok(ct) = reply.get_document("$clusterTime").and_then(|d| d.get_timestamp("clusterTime")) {
            return Ok(ct);
        }
        let hello = self.client.database("admin").run_command(doc! { "hello": 1 }).await?;
        if let Ok(ts) =
            hello.get_document("lastWrite").and_then(|d| d.get_document("opTime")).and_then(|d| d.get_timestamp("ts"))
        {
            return Ok(ts);
        }
        Err(SourceError::Malformed("the server reports no operationTime or $clusterTime: is it a replica set?".into()))
    }

    /// Opens the change stream.
    pub async fn watch(&self, start: &StartAt, batch_size: u32, max_await: Duration) -> Result<Stream, SourceError> {
        let pipeline = [doc! { "$match": {
            "ns.coll": { "$in": &self.collections },
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
        w.await.map_err(|e| match (start, crate::mongo::error_code(&e)) {
            // A token the server cannot parse is as unusable as one it no longer holds.
            (StartAt::Token(_), Some(9)) => SourceError::HistoryLost {
                detail: format!("the stored resume token is unusable: {}", mongo::describe(&e)),
            },
            _ => SourceError::from_mongo(e),
        })
    }

    /// The time of the oldest oplog entry, where ficus may read `local.oplog.rs` (not every
    /// deployment grants that; `None` then, and the server's own check is relied on).
    pub async fn oldest_oplog_time(&self) -> Option<Timestamp> {
        let oplog = self.client.database("local").collection::<Document>("oplog.rs");
        let first = oplog.find_one(doc! {}).sort(doc! { "$natural": 1 }).projection(doc! { "ts": 1 }).await.ok()??;
        first.get_timestamp("ts").ok()
    }

    /// Estimated documents in a collection (for snapshot progress).
    pub async fn estimated_count(&self, coll: &str) -> Result<u64, SourceError> {
        Ok(self.db.collection::<Document>(coll).estimated_document_count().await?)
    }

    /// Reads the next batch of a collection in `_id` order, after `after`.
    pub async fn snapshot_batch(
        &self,
        coll: &str,
        after: Option<&Bson>,
        limit: u32,
    ) -> Result<Vec<Document>, SourceError> {
        let filter = match after {
            Some(id) => doc! { "_id": { "$gt": id.clone() } },
            None => doc! {},
        };
        let cursor = self
            .db
            .collection::<Document>(coll)
            .find(filter)
            .sort(doc! { "_id": 1 })
            .limit(i64::from(limit))
            .batch_size(limit)
            .await?;
        Ok(cursor.try_collect().await?)
    }

    /// Turns on pre- and post-images for a collection (`collMod`), creating it if needed.
    pub async fn enable_pre_images(&self, coll: &str) -> Result<(), SourceError> {
        let names = self.db.list_collection_names().await?;
        if !names.iter().any(|n| n == coll) {
            self.db.create_collection(coll).await?;
        }
        self.db.run_command(doc! { "collMod": coll, "changeStreamPreAndPostImages": { "enabled": true } }).await?;
        Ok(())
    }

    /// Whether a collection records pre-images.
    pub async fn pre_images_enabled(&self, coll: &str) -> Result<bool, SourceError> {
        let mut cursor = self.db.list_collections().filter(doc! { "name": coll }).await?;
        let Some(spec) = cursor.try_next().await? else {
            return Ok(false);
        };
        let enabled = bson::serialize_to_document(&spec.options)
            .ok()
            .and_then(|o| o.get_document("changeStreamPreAndPostImages").ok().cloned())
            .and_then(|d| d.get_bool("enabled").ok())
            .unwrap_or(false);
        Ok(enabled)
    }
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

/// Converts one change-stream event into a [`ChangeRecord`] (index left at 0 for the caller
/// to assign). Operations that are not document changes are errors the caller must surface.
pub fn to_record(ev: ChangeStreamEvent<Document>) -> Result<ChangeRecord, SourceError> {
    let namespace = ev
        .ns
        .as_ref()
        .map(|ns| format!("{}.{}", ns.db, ns.coll.as_deref().unwrap_or("*")))
        .unwrap_or_else(|| "?".into());
    let op = match ev.operation_type {
        OperationType::Insert => Op::Insert,
        OperationType::Update => Op::Update,
        OperationType::Replace => Op::Replace,
        OperationType::Delete => Op::Delete,
        OperationType::Drop => {
            return Err(SourceError::Unsupported { op: "drop".into(), namespace });
        }
        OperationType::Rename => {
            return Err(SourceError::Unsupported { op: "rename".into(), namespace });
        }
        OperationType::DropDatabase => {
            return Err(SourceError::Unsupported { op: "dropDatabase".into(), namespace });
        }
        OperationType::Invalidate => {
            return Err(SourceError::Unsupported { op: "invalidate".into(), namespace });
        }
        OperationType::Other(o) => return Err(SourceError::Unsupported { op: o, namespace }),
        _ => {
            return Err(SourceError::Unsupported { op: "unknown".into(), namespace });
        }
    };
    let collection = ev
        .ns
        .and_then(|ns| ns.coll)
        .ok_or_else(|| SourceError::Malformed(format!("{op} event without a collection")))?;
    let document_id = ev
        .document_key
        .and_then(|mut k| k.remove("_id"))
        .ok_or_else(|| SourceError::Malformed(format!("{op} event on {collection} without documentKey._id")))?;
    let cluster_time = ev
        .cluster_time
        .ok_or_else(|| SourceError::Malformed(format!("{op} event on {collection} without clusterTime")))?;
    let token = token_doc(&ev.id)?;
    let (changed, removed) = match ev.update_description {
        Some(u) => (Some(u.updated_fields), u.removed_fields),
        None => (None, Vec::new()),
    };
    Ok(ChangeRecord {
        op,
        collection,
        document_id,
        after: ev.full_document,
        before: ev.full_document_before_change,
        changed,
        removed,
        cluster_time,
        index: 0,
        wall_time: ev.wall_time,
        resume_token: Some(token_data(&token)),
    })
}
