//! The event store: every message ficus put on its topics, archived for good, queryable and
//! replayable; [`archive`] is the role that fills it.
//!
//! Kafka's retention and the oplog both forget; the store does not. The archive role (consumer
//! group `ficus.archive`, all topics) writes each event once, keyed by its id, into
//! `<store.db>.events` with its Kafka position, so a reader can replay the archive and then
//! move to the live topic with no gap: per partition, everything below the archive group's
//! committed offset is in the store. Offsets are stored only after the insert is durable, so
//! the archive is at-least-once like everything else and idempotent by event id.
//!
//! Documents hold the envelope's attributes as fields (topic, key, type, time, sequence) with
//! indexes for the questions people ask (an aggregate's history, a time range, a topic in
//! order), and `data` in native BSON.

use bson::{Bson, DateTime, Document, doc};
use mongodb::options::{Acknowledgment, IndexOptions, InsertManyOptions, WriteConcern};
use mongodb::{Collection, Database, IndexModel};

use crate::bus::BusError;
use crate::event::Message;
use crate::mongo::{self, ErrorClass};
use crate::ops::presence::PresenceError;
use crate::retry::Classify;

mod archive;
pub use archive::Archiver;

pub const EVENTS: &str = "events";
pub const ARCHIVE_GROUP: &str = "ficus.archive";

/// Errors of the event store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("event store: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("stored event {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    #[error(transparent)]
    Presence(#[from] PresenceError),
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::Mongo(e) => e.class(),
            StoreError::Bus(e) => e.class(),
            StoreError::Corrupt { .. } => ErrorClass::Fatal,
            StoreError::Presence(e) => e.class(),
        }
    }
}

impl StoreError {
    /// See [`BusError::is_misconfiguration`]: two processes with one instance id.
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            StoreError::Bus(e) => e.is_misconfiguration(),
            StoreError::Presence(PresenceError::Conflict(_)) => true,
            _ => false,
        }
    }
}

/// One archived message with where it sat on Kafka.
#[derive(Debug, Clone)]
pub struct Archived {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub message: Message,
}

/// The MongoDB event store.
#[derive(Clone)]
pub struct EventStore {
    events: Collection<Document>,
}

const DUPLICATE_KEY: i32 = 11000;

impl EventStore {
    pub async fn open(db: &Database) -> Result<Self, StoreError> {
        let wc = WriteConcern::builder().w(Acknowledgment::Majority).journal(true).build();
        let events = db
            .collection_with_options(EVENTS, mongodb::options::CollectionOptions::builder().write_concern(wc).build());
        let index = |keys: Document, name: &str| {
            IndexModel::builder().keys(keys).options(IndexOptions::builder().name(name.to_string()).build()).build()
        };
        events
            .create_indexes([
                index(doc! { "topic": 1, "key": 1, "sequence": 1 }, "aggregate_history"),
                index(doc! { "topic": 1, "time": 1 }, "topic_time"),
                index(doc! { "topic": 1, "partition": 1, "offset": 1 }, "kafka_position"),
            ])
            .await?;
        Ok(EventStore { events })
    }

    fn to_doc(a: &Archived) -> Result<Document, StoreError> {
        let m = &a.message;
        let mut json = m.to_json();
        let data = Bson::try_from(json["data"].take())
            .map_err(|e| StoreError::Corrupt { id: m.id().to_string(), reason: e.to_string() })?;
        let (source, resume_token) = match m {
            Message::Event(e) => (&e.source, e.position.resume_token.clone()),
            Message::Control(c) => (&c.source, None),
        };
        Ok(doc! {
            "_id": m.id(),
            "topic": &a.topic,
            "partition": a.partition,
            "offset": a.offset,
            "key": m.key(),
            "type": m.event_type(),
            "source": source,
            "time": m.time(),
            "sequence": m.position().sequence(),
            "resumetoken": resume_token,
            "schemaversion": crate::event::SCHEMA_VERSION as i32,
            "data": data,
            "archived_at": DateTime::now(),
        })
    }

    /// Rebuilds the message from a stored document.
    pub fn from_doc(d: Document) -> Result<Archived, StoreError> {
        let id = d.get_str("_id").unwrap_or("?").to_string();
        let corrupt = |reason: String| StoreError::Corrupt { id: id.clone(), reason };
        let get = |f: &str| d.get(f).cloned().ok_or_else(|| corrupt(format!("missing {f}")));
        let time = d.get_datetime("time").map_err(|e| corrupt(e.to_string()))?;
        let mut env = serde_json::Map::new();
        env.insert("specversion".into(), "1.0".into());
        env.insert("id".into(), id.clone().into());
        for f in ["source", "type", "sequence"] {
            env.insert(f.into(), get(f)?.as_str().unwrap_or_default().into());
        }
        env.insert("subject".into(), get("key")?.as_str().unwrap_or_default().into());
        env.insert("time".into(), time.try_to_rfc3339_string().unwrap_or_default().into());
        if let Some(Bson::String(t)) = d.get("resumetoken") {
            env.insert("resumetoken".into(), t.clone().into());
        }
        env.insert("schemaversion".into(), d.get_i32("schemaversion").unwrap_or(1).into());
        env.insert("data".into(), get("data")?.into_canonical_extjson());
        let message = Message::from_json(serde_json::Value::Object(env)).map_err(|e| corrupt(e.to_string()))?;
        Ok(Archived {
            topic: d.get_str("topic").map_err(|e| corrupt(e.to_string()))?.to_string(),
            partition: d.get_i32("partition").map_err(|e| corrupt(e.to_string()))?,
            offset: d.get_i64("offset").map_err(|e| corrupt(e.to_string()))?,
            message,
        })
    }

    /// Inserts a batch; an event already archived (same id) is left as it is.
    pub async fn append(&self, batch: &[Archived]) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let docs = batch.iter().map(Self::to_doc).collect::<Result<Vec<_>, _>>()?;
        let n = docs.len() as u64;
        match self.events.insert_many(docs).with_options(InsertManyOptions::builder().ordered(false).build()).await {
            Ok(r) => Ok(r.inserted_ids.len() as u64),
            Err(e) => match e.kind.as_ref() {
                mongodb::error::ErrorKind::InsertMany(im)
                    if im.write_concern_error.is_none()
                        && im.write_errors.as_ref().is_some_and(|w| w.iter().all(|w| w.code == DUPLICATE_KEY)) =>
                {
                    Ok(n - im.write_errors.as_ref().map_or(0, |w| w.len() as u64))
                }
                _ => Err(e.into()),
            },
        }
    }

    /// Events of some topics, optionally from a time on, in `sequence` order, streamed.
    pub async fn scan(
        &self,
        topics: &[String],
        from: Option<DateTime>,
    ) -> Result<mongodb::Cursor<Document>, StoreError> {
        let mut filter = doc! { "topic": { "$in": topics } };
        if let Some(t) = from {
            filter.insert("time", doc! { "$gte": t });
        }
        Ok(self.events.find(filter).sort(doc! { "sequence": 1, "_id": 1 }).batch_size(1000).await?)
    }

    pub async fn count(&self, filter: Document) -> Result<u64, StoreError> {
        Ok(self.events.count_documents(filter).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{CanonicalEvent, Derived, EventData, Op, Position, Truncation};
    use bson::Timestamp;

    #[test]
    fn an_archived_event_reads_back_identical() {
        let pos =
            Position { cluster_time: Timestamp { time: 7, increment: 3 }, index: 2, resume_token: Some("82AB".into()) };
        let event = CanonicalEvent {
            id: crate::event::event_id("s", &pos, "x"),
            source: "ficus://s/customers".into(),
            event_type: "customer.purchase_recorded".into(),
            subject: "U1".into(),
            time: DateTime::from_millis(7000),
            position: pos,
            schema_version: 1,
            origin: None,
            data: EventData {
                op: Op::Update,
                collection: "customers".into(),
                key: Bson::String("U1".into()),
                document_id: Bson::Int64(9),
                after: Some(doc! { "user_id": "U1", "n": 1_i32, "d": 1.5 }),
                before: None,
                changed: Some(doc! { "n": 1_i32 }),
                removed: vec!["x".into()],
                truncated: vec![Truncation { field: "purchases".into(), new_size: 2 }],
                derived: Some(Derived {
                    field: "purchases".into(),
                    index: Some(3),
                    element: Bson::Document(doc! { "id": "P" }),
                }),
            },
        };
        let archived = Archived { topic: "t".into(), partition: 2, offset: 40, message: Message::Event(event) };
        let back = EventStore::from_doc(EventStore::to_doc(&archived).unwrap()).unwrap();
        assert_eq!(back.message, archived.message);
        assert_eq!((back.topic.as_str(), back.partition, back.offset), ("t", 2, 40));
    }

    #[test]
    fn an_archived_control_message_reads_back_identical() {
        let start = Timestamp { time: 1_800_000_000, increment: 3 };
        let mut marker = crate::event::ControlMessage::snapshot_completed(
            "s",
            "customers",
            start,
            ("a.snapshot", "a.deleted"),
            4,
            6,
        );
        marker.time = DateTime::from_millis(1_800_000_000_123);
        let archived = Archived { topic: "t".into(), partition: 4, offset: 9, message: Message::Control(marker) };
        let back = EventStore::from_doc(EventStore::to_doc(&archived).unwrap()).unwrap();
        assert_eq!(back.message, archived.message);
    }
}
