//! The safe cutover's moves in ficus's store (`<store.db>.cutovers`, one document per service):
//! the [`Move`] with how far it got, and what its steps found out (the fence marker's time, the
//! offsets the drain waits for, the gaining side's start position, each step's duration), saved
//! after every step so that the same command resumes after a `kill -9`.

use bson::{DateTime, Document, Timestamp, doc};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::ownership::OwnershipError;
use super::plan::{Move, Phase};

/// The collection in the store.
pub const CUTOVERS: &str = "cutovers";

/// A partition's offset a drain waits for: every message before it was published before the
/// fence marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainTo {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One move and what its steps recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveRecord {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "move")]
    pub mv: Move,
    pub started: DateTime,
    /// The fence marker's cluster time on the losing side.
    #[serde(default)]
    pub marker: Option<Timestamp>,
    /// Per partition of the losing side's topics: the end once the marker was published.
    #[serde(default)]
    pub drain_to: Vec<DrainTo>,
    /// The gaining side's cluster time before anything could write there.
    #[serde(default)]
    pub reverse_start: Option<Timestamp>,
    /// When each step finished.
    #[serde(default)]
    pub finished: Vec<(Phase, DateTime)>,
    /// An emergency move (`--emergency`): fenced and drained, neither lens-checked nor verified.
    #[serde(default)]
    pub emergency: bool,
}

impl MoveRecord {
    pub fn new(mv: Move) -> MoveRecord {
        MoveRecord {
            id: mv.service.clone(),
            mv,
            started: DateTime::now(),
            marker: None,
            drain_to: Vec::new(),
            reverse_start: None,
            finished: Vec::new(),
            emergency: false,
        }
    }

    /// Records a step as done, now.
    pub fn done(&mut self, phase: Phase) {
        self.mv.record(phase);
        self.finished.push((phase, DateTime::now()));
    }

    /// When a step finished, if it has.
    pub fn finished_at(&self, phase: Phase) -> Option<DateTime> {
        self.finished.iter().find(|(p, _)| *p == phase).map(|(_, t)| *t)
    }
}

/// The moves in the store.
#[derive(Clone)]
pub struct MoveStore {
    coll: Collection<Document>,
}

impl MoveStore {
    pub fn new(db: &Database) -> MoveStore {
        MoveStore { coll: db.collection(CUTOVERS) }
    }

    /// A service's latest move.
    pub async fn get(&self, service: &str) -> Result<Option<MoveRecord>, OwnershipError> {
        let Some(d) = self.coll.find_one(doc! { "_id": service }).await? else { return Ok(None) };
        bson::deserialize_from_document(d)
            .map(Some)
            .map_err(|e| OwnershipError::Corrupt { service: format!("{service} (cutover)"), reason: e.to_string() })
    }

    /// Every service's latest move.
    pub async fn all(&self) -> Result<Vec<MoveRecord>, OwnershipError> {
        use futures::TryStreamExt;
        let docs: Vec<Document> = self.coll.find(doc! {}).await?.try_collect().await?;
        docs.into_iter()
            .map(|d| {
                let id = d.get_str("_id").unwrap_or("?").to_string();
                bson::deserialize_from_document(d)
                    .map_err(|e| OwnershipError::Corrupt { service: format!("{id} (cutover)"), reason: e.to_string() })
            })
            .collect()
    }

    /// Saves a move (durably: a resume must find every step recorded).
    pub async fn save(&self, record: &MoveRecord) -> Result<(), OwnershipError> {
        let d = bson::serialize_to_document(record)
            .map_err(|e| OwnershipError::Corrupt { service: record.id.clone(), reason: e.to_string() })?;
        let durable = mongodb::options::WriteConcern::builder()
            .w(mongodb::options::Acknowledgment::Majority)
            .journal(true)
            .build();
        self.coll.replace_one(doc! { "_id": &record.id }, d).upsert(true).write_concern(durable).await?;
        Ok(())
    }

    /// Forgets a service's move (aborted, or overridden by `--force`).
    pub async fn forget(&self, service: &str) -> Result<(), OwnershipError> {
        self.coll.delete_one(doc! { "_id": service }).await?;
        Ok(())
    }
}
