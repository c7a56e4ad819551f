//! Where the tailer records how far it has durably got: snapshot progress and the resume token.
//!
//! A checkpoint only ever names a point whose every earlier event Kafka has acknowledged, so a
//! restart resumes exactly there and loses nothing (it may re-publish what followed, with the
//! same event ids). The store is a small document per source in ficus's own MongoDB database
//! (`store.uri`/`store.db`, collection `checkpoints`), written with majority write concern and
//! journaling: durable, atomic, readable by `ficus status`, and independent of Kafka retention
//! and of the machine ficus happens to run on.

use std::future::Future;

use bson::{Bson, DateTime, Document, Timestamp, doc};
use mongodb::options::{Acknowledgment, ReplaceOptions, WriteConcern};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

/// How far the initial snapshot has got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// The point the stream resumes from once the copy is done, captured before it began.
    pub start_time: Timestamp,
    /// Collections completely copied.
    pub done: Vec<String>,
    /// The collection being copied and the last `_id` whose events Kafka acknowledged.
    pub current: Option<String>,
    pub last_id: Option<Bson>,
    /// Documents copied so far (all collections).
    pub copied: u64,
}

/// Where the change stream resumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamPosition {
    /// Resume token document (`{_data: ...}`); `None` right after a snapshot, when the stream
    /// starts at `cluster_time` instead.
    pub resume_token: Option<Document>,
    /// Cluster time and index of the last event covered, so events sharing a cluster time keep
    /// their index across restarts (see `event::Position`).
    pub cluster_time: Timestamp,
    pub index: u32,
}

/// The tailer's durable state for one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TailState {
    /// `source.name`.
    #[serde(rename = "_id")]
    pub source: String,
    /// Present while the initial snapshot is incomplete.
    pub snapshot: Option<SnapshotProgress>,
    /// Present once streaming (after the snapshot).
    pub stream: Option<StreamPosition>,
    pub updated_at: DateTime,
    /// Cluster time of the newest change covered (for lag and token age in `ficus status`).
    pub last_event_time: Option<DateTime>,
    /// When the position the resume token names was current at the source: a change's time,
    /// or, for a post-batch token from a quiet period, when the empty batch came back.
    #[serde(default)]
    pub token_time: Option<DateTime>,
    /// The lease epoch of the tailer that wrote it: a save from an older epoch is refused.
    #[serde(default)]
    pub epoch: Option<i64>,
}

/// Errors from the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint store: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("checkpoint for {source_name} is unreadable: {reason}")]
    Corrupt { source_name: String, reason: String },
    #[error("checkpoint for {source_name} belongs to a newer lease holder: this tailer lost its lease")]
    Fenced { source_name: String },
}

/// Durable tail state.
pub trait CheckpointStore: Send + Sync {
    fn load(&self, source: &str) -> impl Future<Output = Result<Option<TailState>, CheckpointError>> + Send;
    fn save(&self, state: &TailState) -> impl Future<Output = Result<(), CheckpointError>> + Send;
    /// Removes the checkpoint (for a re-snapshot), unless a newer lease epoch wrote it.
    fn clear(&self, source: &str, epoch: Option<i64>) -> impl Future<Output = Result<(), CheckpointError>> + Send;
}

/// Matches the source's checkpoint unless a newer lease epoch wrote it.
fn fenced(source: &str, epoch: Option<i64>) -> Document {
    match epoch {
        Some(e) => doc! { "_id": source, "$or": [ { "epoch": { "$lte": e } }, { "epoch": null } ] },
        None => doc! { "_id": source },
    }
}

/// The MongoDB checkpoint store.

#[derive(Clone)]
pub struct MongoCheckpoints {
    coll: Collection<Document>,
}

impl MongoCheckpoints {
    pub fn new(db: &Database) -> Self {
        let wc = WriteConcern::builder().w(Acknowledgment::Majority).journal(true).build();
        MongoCheckpoints {
            coll: db.collection_with_options(
                "checkpoints",
                mongodb::options::CollectionOptions::builder().write_concern(wc).build(),
            ),
        }
    }
}

impl CheckpointStore for MongoCheckpoints {
    async fn load(&self, source: &str) -> Result<Option<TailState>, CheckpointError> {
        let Some(d) = self.coll.find_one(doc! { "_id": source }).await? else {
            return Ok(None);
        };
        bson::deserialize_from_document(d)
            .map(Some)
            .map_err(|e| CheckpointError::Corrupt { source_name: source.into(), reason: e.to_string() })
    }

    async fn save(&self, state: &TailState) -> Result<(), CheckpointError> {
        let d = bson::serialize_to_document(state)
            .map_err(|e| CheckpointError::Corrupt { source_name: state.source.clone(), reason: e.to_string() })?;
        let filter = fenced(&state.source, state.epoch);
        match self.coll.replace_one(filter, d).with_options(ReplaceOptions::builder().upsert(true).build()).await {
            Ok(_) => Ok(()),
            // A newer epoch's checkpoint is there: the upsert's insert collided with it.
            Err(e) if crate::mongo::error_code(&e) == Some(11000) => {
                Err(CheckpointError::Fenced { source_name: state.source.clone() })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn clear(&self, source: &str, epoch: Option<i64>) -> Result<(), CheckpointError> {
        self.coll.delete_one(fenced(source, epoch)).await?;
        Ok(())
    }
}
