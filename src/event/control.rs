//! Control messages: what ficus itself tells the consumers of a topic, in order with the events
//! around them, as opposed to a change of a source document.
//!
//! They travel on the same topics as canonical events, as CloudEvents of a `ficus.control.*`
//! type whose `data` is the control message's own fields, so a consumer tells them apart by type
//! and never mistakes one for a document change. [`Message`] is what a topic carries: one or the
//! other. Markers archived before control messages had their own type (`ficus.snapshot.completed`,
//! the details in `data.after` of an event-shaped envelope) are still read.

use bson::{Bson, DateTime, Timestamp};
use serde_json::{Map, Value};

use super::{CanonicalEvent, DecodeError, Position, SCHEMA_VERSION, Version, bad, event_id};

/// The type of a snapshot marker on the wire.
pub const SNAPSHOT_COMPLETED: &str = "ficus.control.snapshot_completed";
/// The type snapshot markers had before control messages had their own shape.
const LEGACY_SNAPSHOT_COMPLETED: &str = "ficus.snapshot.completed";

/// What a snapshot marker says: every document of `collection` that existed at `start` has
/// been copied ahead of this marker on this partition. A consumer that has seen the markers of
/// every partition knows that anything of `collection` it holds at a version older than
/// `start` no longer exists at the source (it was deleted while no history was kept), and
/// removes it as a `delete_type` event would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMarker {
    pub collection: String,
    /// The version of the snapshot's copies.
    pub start: Version,
    pub partition: i32,
    pub partitions: i32,
    /// The topic's snapshot and delete event types.
    pub snapshot_type: String,
    pub delete_type: String,
}

/// The kinds of control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    SnapshotCompleted(SnapshotMarker),
}

/// One control message with its identity and place in the source's history.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlMessage {
    pub id: String,
    /// `ficus://<source name>/<collection>`.
    pub source: String,
    pub time: DateTime,
    pub position: Position,
    pub control: Control,
}

impl ControlMessage {
    /// The marker for one partition of a completed snapshot taken at `start`. It sorts after
    /// every event of that snapshot (and of its cluster time): its index is the largest there is.
    pub fn snapshot_completed(
        source_name: &str,
        collection: &str,
        start: Timestamp,
        (snapshot_type, delete_type): (&str, &str),
        partition: i32,
        partitions: i32,
    ) -> ControlMessage {
        let position = Position { cluster_time: start, index: u32::MAX, resume_token: None };
        ControlMessage {
            id: event_id(source_name, &position, &format!("snapshot-completed:{collection}:{partition}")),
            source: format!("ficus://{source_name}/{collection}"),
            time: DateTime::now(),
            position,
            control: Control::SnapshotCompleted(SnapshotMarker {
                collection: collection.to_string(),
                start: Version::at(start, 0),
                partition,
                partitions,
                snapshot_type: snapshot_type.to_string(),
                delete_type: delete_type.to_string(),
            }),
        }
    }

    /// The CloudEvents type.
    pub fn event_type(&self) -> &'static str {
        match self.control {
            Control::SnapshotCompleted(_) => SNAPSHOT_COMPLETED,
        }
    }

    /// The Kafka key (the partition is chosen explicitly; the key names what it is about).
    pub fn key(&self) -> &str {
        match &self.control {
            Control::SnapshotCompleted(m) => &m.collection,
        }
    }

    /// The collection it is about.
    pub fn collection(&self) -> &str {
        self.key()
    }

    pub fn to_json(&self) -> Value {
        let mut data = Map::new();
        match &self.control {
            Control::SnapshotCompleted(m) => {
                data.insert("collection".into(), m.collection.clone().into());
                data.insert("start".into(), m.start.as_str().into());
                data.insert("partition".into(), m.partition.into());
                data.insert("partitions".into(), m.partitions.into());
                data.insert("snapshotType".into(), m.snapshot_type.clone().into());
                data.insert("deleteType".into(), m.delete_type.clone().into());
            }
        }
        let mut env = Map::new();
        env.insert("specversion".into(), "1.0".into());
        env.insert("id".into(), self.id.clone().into());
        env.insert("source".into(), self.source.clone().into());
        env.insert("type".into(), self.event_type().into());
        env.insert("subject".into(), self.key().into());
        env.insert("time".into(), self.time.try_to_rfc3339_string().unwrap_or_default().into());
        env.insert("datacontenttype".into(), "application/json".into());
        env.insert("sequence".into(), self.position.sequence().into());
        env.insert("schemaversion".into(), SCHEMA_VERSION.into());
        env.insert("data".into(), Value::Object(data));
        Value::Object(env)
    }

    /// Parses a control message envelope (either shape; see the module header).
    fn from_json(mut env: Map<String, Value>, event_type: &str) -> Result<ControlMessage, DecodeError> {
        let mut string = |field: &'static str| match env.remove(field) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(bad(field, "missing or not a string")),
        };
        let id = string("id")?;
        let source = string("source")?;
        let time =
            DateTime::parse_rfc3339_str(string("time")?).map_err(|e| bad("time", format!("not RFC 3339: {e}")))?;
        let sequence = string("sequence")?;
        let (cluster_time, index) = Version::parse(&sequence)
            .and_then(|v| v.position())
            .ok_or_else(|| bad("sequence", "expected 30 digits"))?;
        let Some(Value::Object(mut data)) = env.remove("data") else {
            return Err(bad("data", "missing or not an object"));
        };
        if event_type == LEGACY_SNAPSHOT_COMPLETED {
            // The details were in `data.after`, as canonical Extended JSON.
            data = match data.remove("after").map(Bson::try_from) {
                Some(Ok(Bson::Document(d))) => match Bson::Document(d).into_relaxed_extjson() {
                    Value::Object(m) => m,
                    _ => return Err(bad("data.after", "expected an object")),
                },
                _ => return Err(bad("data.after", "a snapshot marker carries its details here")),
            };
            if let Some(Value::String(c)) = env.get("subject") {
                data.entry("collection").or_insert_with(|| Value::String(c.clone()));
            }
        }
        let text = |data: &Map<String, Value>, field: &'static str| match data.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(bad(field, "missing or not a string")),
        };
        // A plain number on the wire; Extended JSON (`{"$numberInt": "3"}`) when read back from
        // the event store, which keeps `data` as BSON.
        let int = |data: &Map<String, Value>, field: &'static str| {
            let n = match data.get(field).cloned().map(Bson::try_from) {
                Some(Ok(Bson::Int32(n))) => Some(i64::from(n)),
                Some(Ok(Bson::Int64(n))) => Some(n),
                _ => None,
            };
            n.and_then(|n| i32::try_from(n).ok()).ok_or_else(|| bad(field, "missing or not an integer"))
        };
        let control = Control::SnapshotCompleted(SnapshotMarker {
            collection: text(&data, "collection")?,
            start: Version::parse(&text(&data, "start")?).ok_or_else(|| bad("start", "expected 30 digits"))?,
            partition: int(&data, "partition")?,
            partitions: int(&data, "partitions")?,
            snapshot_type: text(&data, "snapshotType")?,
            delete_type: text(&data, "deleteType")?,
        });
        Ok(ControlMessage { id, source, time, position: Position { cluster_time, index, resume_token: None }, control })
    }
}

/// What a ficus topic carries.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // events are nearly every message; boxing them would cost each an allocation
pub enum Message {
    Event(CanonicalEvent),
    Control(ControlMessage),
}

impl Message {
    /// Decodes a record's payload.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        Self::from_json(serde_json::from_slice(bytes)?)
    }

    /// Parses a structured-mode envelope of either kind.
    pub fn from_json(v: Value) -> Result<Message, DecodeError> {
        let Value::Object(env) = v else {
            return Err(bad("(envelope)", "expected a JSON object"));
        };
        match env.get("type").and_then(Value::as_str) {
            Some(t) if t.starts_with("ficus.control.") || t == LEGACY_SNAPSHOT_COMPLETED => {
                let t = t.to_string();
                if t != SNAPSHOT_COMPLETED && t != LEGACY_SNAPSHOT_COMPLETED {
                    return Err(bad("type", format!("unknown control message `{t}`")));
                }
                ControlMessage::from_json(env, &t).map(Message::Control)
            }
            _ => CanonicalEvent::from_json(Value::Object(env)).map(Message::Event),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Message::Event(e) => e.to_json(),
            Message::Control(c) => c.to_json(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).expect("a JSON value always serialises")
    }

    pub fn id(&self) -> &str {
        match self {
            Message::Event(e) => &e.id,
            Message::Control(c) => &c.id,
        }
    }

    pub fn position(&self) -> &Position {
        match self {
            Message::Event(e) => &e.position,
            Message::Control(c) => &c.position,
        }
    }

    pub fn event_type(&self) -> &str {
        match self {
            Message::Event(e) => &e.event_type,
            Message::Control(c) => c.event_type(),
        }
    }

    /// The Kafka key: the aggregate id of an event.
    pub fn key(&self) -> &str {
        match self {
            Message::Event(e) => e.key(),
            Message::Control(c) => c.key(),
        }
    }

    pub fn time(&self) -> DateTime {
        match self {
            Message::Event(e) => e.time,
            Message::Control(c) => c.time,
        }
    }

    pub fn as_event(&self) -> Option<&CanonicalEvent> {
        match self {
            Message::Event(e) => Some(e),
            Message::Control(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker() -> ControlMessage {
        let start = Timestamp { time: 1_800_000_000, increment: 3 };
        ControlMessage::snapshot_completed(
            "linechatbot",
            "customers",
            start,
            ("customer.snapshot", "customer.deleted"),
            2,
            6,
        )
    }

    #[test]
    fn a_snapshot_marker_is_a_control_message_on_the_wire() {
        let m = marker();
        let wire = m.to_json();
        assert_eq!(wire["type"], SNAPSHOT_COMPLETED);
        assert_eq!(wire["data"]["collection"], "customers");
        assert_eq!(wire["data"]["partitions"], 6);
        assert!(wire["data"].get("after").is_none() && wire["data"].get("op").is_none(), "not an event's shape");
        let back = Message::decode(&Message::Control(m.clone()).encode()).unwrap();
        assert_eq!(back, Message::Control(m.clone()));
        // As the event store gives it back: `data` through BSON, integers as Extended JSON.
        let mut stored = m.to_json();
        stored["data"] = Bson::try_from(stored["data"].take()).unwrap().into_canonical_extjson();
        assert_eq!(Message::from_json(stored).unwrap(), Message::Control(m.clone()));
        let Control::SnapshotCompleted(details) = &m.control;
        assert_eq!(details.start, Version::at(Timestamp { time: 1_800_000_000, increment: 3 }, 0));
        assert!(m.position.version() > details.start, "sorts after the copies");
    }

    #[test]
    fn a_marker_archived_in_the_old_shape_still_reads() {
        let old = serde_json::json!({
            "specversion": "1.0", "id": "abc", "source": "ficus://linechatbot/customers",
            "type": "ficus.snapshot.completed", "subject": "customers", "time": "2026-11-20T10:00:00Z",
            "datacontenttype": "application/json", "sequence": "180000000000000000034294967295", "schemaversion": 1,
            "data": { "op": "snapshot", "collection": "customers", "key": "customers", "documentId": null,
                      "after": { "start": "180000000000000000030000000000", "partition": { "$numberInt": "2" },
                                 "partitions": { "$numberInt": "6" }, "snapshotType": "customer.snapshot",
                                 "deleteType": "customer.deleted" },
                      "before": null }
        });
        let Message::Control(c) = Message::from_json(old).unwrap() else { panic!("a control message") };
        let Control::SnapshotCompleted(m) = c.control;
        assert_eq!((m.collection.as_str(), m.partition, m.partitions), ("customers", 2, 6));
        assert_eq!(m.start.as_str(), "180000000000000000030000000000");
        assert_eq!(m.delete_type, "customer.deleted");
    }

    #[test]
    fn an_unknown_control_message_is_refused_by_name() {
        let mut v = marker().to_json();
        v["type"] = "ficus.control.surprise".into();
        let err = Message::from_json(v).unwrap_err().to_string();
        assert!(err.contains("ficus.control.surprise"), "{err}");
    }
}
