//! Where the tailer records how far it has durably got: snapshot progress and the resume token.
//!
//! A checkpoint only ever names a point whose every earlier event Kafka has acknowledged, so a
//! restart resumes exactly there and loses nothing (it may re-publish what followed: with the
//! same event ids where a change reads the same again, new ones where it does not). The store is a small document per source in ficus's own MongoDB database
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
    /// The version every copy carries, at or before every change the copy might not see
    /// (see `Source::snapshot_start`); the stream starts here when there is no `start_token`.
    pub start_time: Timestamp,
    /// Where the stream resumes once the copy is done: a position taken before the copy began,
    /// after which every change the copy might not see comes. Absent in checkpoints of ficus
    /// versions that started the stream at `start_time`.
    #[serde(default)]
    pub start_token: Option<Document>,
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

/// Where the tailer is: copying, or streaming.
#[derive(Debug, Clone, PartialEq)]
pub enum TailPhase {
    /// The initial snapshot is incomplete.
    Snapshot(SnapshotProgress),
    /// Streaming (after the snapshot).
    Stream(StreamPosition),
}

/// The tailer's durable state for one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Stored", into = "Stored")]
pub struct TailState {
    /// `source.name`.
    pub source: String,
    pub phase: TailPhase,
    pub updated_at: DateTime,
    /// Cluster time of the newest change covered (for lag and token age in `ficus status`).
    pub last_event_time: Option<DateTime>,
    /// When the position the resume token names was current at the source: a change's time,
    /// or, for a post-batch token from a quiet period, when the empty batch came back.
    pub token_time: Option<DateTime>,
    /// The lease epoch of the tailer that wrote it: a save from an older epoch is refused.
    pub epoch: Option<i64>,
}

/// The stored document: the phase as two optional fields, as checkpoints have always been
/// written (readable with any MongoDB client, and by older ficus versions).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(rename = "_id")]
    source: String,
    snapshot: Option<SnapshotProgress>,
    stream: Option<StreamPosition>,
    updated_at: DateTime,
    /// Cluster time of the newest change covered (for lag and token age in `ficus status`).
    last_event_time: Option<DateTime>,
    #[serde(default)]
    token_time: Option<DateTime>,
    #[serde(default)]
    epoch: Option<i64>,
}

impl TryFrom<Stored> for TailState {
    type Error = String;
    fn try_from(s: Stored) -> Result<Self, String> {
        let phase = match (s.snapshot, s.stream) {
            (Some(p), None) => TailPhase::Snapshot(p),
            (None, Some(p)) => TailPhase::Stream(p),
            (Some(_), Some(_)) => return Err("both snapshot progress and a stream position".into()),
            (None, None) => return Err("neither snapshot progress nor a stream position".into()),
        };
        Ok(TailState {
            source: s.source,
            phase,
            updated_at: s.updated_at,
            last_event_time: s.last_event_time,
            token_time: s.token_time,
            epoch: s.epoch,
        })
    }
}

impl From<TailState> for Stored {
    fn from(t: TailState) -> Stored {
        let (snapshot, stream) = match t.phase {
            TailPhase::Snapshot(p) => (Some(p), None),
            TailPhase::Stream(p) => (None, Some(p)),
        };
        Stored {
            source: t.source,
            snapshot,
            stream,
            updated_at: t.updated_at,
            last_event_time: t.last_event_time,
            token_time: t.token_time,
            epoch: t.epoch,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn the_phase_is_stored_as_checkpoints_always_were() {
        let state = TailState {
            source: "linechatbot".into(),
            phase: TailPhase::Stream(StreamPosition {
                resume_token: Some(doc! { "_data": "82AB" }),
                cluster_time: Timestamp { time: 5, increment: 1 },
                index: 2,
            }),
            updated_at: DateTime::from_millis(1),
            last_event_time: None,
            token_time: Some(DateTime::from_millis(2)),
            epoch: Some(3),
        };
        let stored = bson::serialize_to_document(&state).unwrap();
        assert_eq!(stored.get("snapshot"), Some(&Bson::Null));
        assert_eq!(stored.get_document("stream").unwrap().get_i64("index").ok().or(Some(2)), Some(2));
        assert_eq!(stored.get_str("_id").unwrap(), "linechatbot");
        let back: TailState = bson::deserialize_from_document(stored).unwrap();
        assert_eq!(back, state);
        // A checkpoint written before `epoch` and `token_time` existed still reads.
        let old = doc! {
            "_id": "linechatbot", "snapshot": { "start_time": Timestamp { time: 9, increment: 0 }, "done": [],
            "current": null, "last_id": null, "copied": 0_i64 }, "stream": null, "updated_at": DateTime::from_millis(1),
            "last_event_time": null,
        };
        let back: TailState = bson::deserialize_from_document(old).unwrap();
        assert!(matches!(back.phase, TailPhase::Snapshot(_)));
        // Neither phase (or both) is corruption, said so.
        let bad = doc! { "_id": "x", "snapshot": null, "stream": null, "updated_at": DateTime::from_millis(1), "last_event_time": null };
        let err = bson::deserialize_from_document::<TailState>(bad).unwrap_err().to_string();
        assert!(err.contains("neither"), "{err}");
    }
}
