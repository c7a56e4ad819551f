//! Conflicts between a service and the monolith, recorded where they happen.
//!
//! A conflict is found inside the transaction that applies the change meeting it (a forward
//! merge into an owned document, a write-back the monolith cannot take as it is), so it is
//! written there too, into the database's outbox `_ficus_conflicts`: it exists if and only if
//! the write it explains committed. The consume role relays the outbox to
//! `<service>.conflicts` and then removes what Kafka acknowledged (`consume::relay`), so a
//! crash between the two repeats a report (same `_id`) rather than losing one.

use bson::{Bson, DateTime, Document, doc};
use futures::TryStreamExt;
use mongodb::{ClientSession, Collection, Database};

use super::merge::FieldConflict;
use crate::cutover::rules::Why;

/// The outbox collection, in every database ficus writes.
pub const CONFLICTS: &str = "_ficus_conflicts";

/// Which side's change met the owner's: the monolith's (a change to a document the service
/// owns), or the service's (a change the monolith could not take as it is, or a change to a
/// document the monolith owns).
pub use crate::cutover::Side;

/// One side of a conflict: its version (on its own cluster's clock) and its document.
#[derive(Debug, Clone, PartialEq)]
pub struct SideState {
    pub version: Option<String>,
    pub document: Option<Document>,
}

/// A conflict, as recorded and published (JSON on `<service>.conflicts`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictRecord {
    pub service: String,
    pub side: Side,
    /// Where the owner's document is: the service collection (side monolith) or the monolith
    /// collection (side service).
    pub collection: String,
    pub id: Bson,
    /// The event whose change was not (wholly) applied.
    pub event: String,
    pub fields: Vec<FieldConflict>,
    /// What the owner holds (and keeps).
    pub owner: SideState,
    /// The other side's change.
    pub other: SideState,
    /// Why, when it is not a field both sides changed (a read-only field, a disagreement, a
    /// fence violation).
    pub reason: Option<String>,
    /// Why the change was merged rather than applied as the owner's (`cutover::rules`).
    pub why: Option<Why>,
}

impl ConflictRecord {
    /// The record's identity: the same event meeting the same document records one conflict,
    /// however often it is delivered.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.event, self.collection, self.id.clone().into_canonical_extjson())
    }

    pub fn to_document(&self) -> Document {
        let opt = |v: &Option<Bson>| v.clone().unwrap_or(Bson::Null);
        let fields: Vec<Bson> = self
            .fields
            .iter()
            .map(|f| {
                let mut d =
                    doc! { "path": &f.path, "owner": opt(&f.owner), "other": opt(&f.other), "base": opt(&f.base) };
                if let Some((field, id)) = &f.element {
                    d.insert("element", doc! { "field": field, "id": id.clone() });
                }
                Bson::Document(d)
            })
            .collect();
        let side = |v: &SideState| {
            doc! {
                "version": v.version.clone().map_or(Bson::Null, Bson::String),
                "document": v.document.clone().map_or(Bson::Null, Bson::Document),
            }
        };
        doc! {
            "_id": self.key(),
            "service": &self.service,
            "side": self.side.as_str(),
            "collection": &self.collection,
            "id": self.id.clone(),
            "event": &self.event,
            "fields": fields,
            "owner": side(&self.owner),
            "other": side(&self.other),
            "reason": self.reason.clone().map_or(Bson::Null, Bson::String),
            "why": self.why.map_or(Bson::Null, |w| Bson::String(w.as_str().to_string())),
            "fenceViolation": self.why == Some(Why::FenceViolation),
            "at": DateTime::now(),
        }
    }
}

/// A database's conflicts outbox.
#[derive(Clone)]
pub struct Outbox {
    coll: Collection<Document>,
}

impl Outbox {
    pub fn new(db: &Database) -> Self {
        Outbox { coll: db.collection(CONFLICTS) }
    }

    /// Records a conflict in the session's transaction (once per key).
    pub async fn record(&self, s: &mut ClientSession, c: &ConflictRecord) -> Result<(), mongodb::error::Error> {
        let d = c.to_document();
        self.coll.replace_one(doc! { "_id": d.get_str("_id").unwrap_or_default() }, d).upsert(true).session(s).await?;
        Ok(())
    }

    /// The oldest unrelayed conflicts of a service, at most `limit`.
    pub async fn pending(&self, service: &str, limit: i64) -> Result<Vec<Document>, mongodb::error::Error> {
        self.coll.find(doc! { "service": service }).sort(doc! { "at": 1 }).limit(limit).await?.try_collect().await
    }

    /// Removes relayed conflicts.
    pub async fn remove(&self, ids: Vec<Bson>) -> Result<(), mongodb::error::Error> {
        if !ids.is_empty() {
            self.coll.delete_many(doc! { "_id": { "$in": ids } }).await?;
        }
        Ok(())
    }
}
