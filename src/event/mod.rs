//! The canonical event: the one shape every change takes between the monolith and the services.
//!
//! The tailer produces it, Kafka carries it, consumers and the event store read it. On the wire
//! it is a CloudEvents 1.0 envelope in structured JSON mode, so `kcat` shows something a person
//! can read; document values inside `data` are canonical Extended JSON (`ejson`). Beside events,
//! topics carry ficus's own `control` messages (snapshot markers), and [`Message`] is either.
//!
//! Ordering and identity come from the [`Position`]: `id` is a hash of it and of the event's
//! content (the same change read the same way always yields the same id, so duplicates are
//! recognisable; read another way, say its document looked up later, another id: see
//! [`content_id`]) and `sequence` is its [`Version`], whose order is the source's commit order.

mod control;
mod ejson;
mod envelope;
pub mod mapping;
pub mod update;
mod version;

pub use crate::op::Op;
pub use control::{Control, ControlMessage, Message, SNAPSHOT_COMPLETED, SnapshotMarker};
pub use ejson::{from_ejson, to_ejson};
pub use update::Truncation;
pub use version::Version;

use std::fmt;

use bson::{Bson, DateTime, Document, Timestamp};

/// Envelope schema version carried in the `schemaversion` extension.
pub const SCHEMA_VERSION: u32 = 1;

/// CloudEvents `datacontenttype` of the whole structured-mode message.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// Where in the source's history an event sits.
///
/// `cluster_time` is the commit time of the change (for snapshot events: the point the stream
/// resumes from after the copy). `index` orders events that share a cluster time (the operations
/// of one transaction): stream events count from 1, snapshot events use 0, so a snapshot copy of
/// a document always sorts before any change streamed from the same instant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub cluster_time: Timestamp,
    pub index: u32,
    /// The change stream resume token (`_data`) for stream events; `None` for snapshot events.
    pub resume_token: Option<String>,
}

impl Position {
    /// The `sequence` extension: 30 digits, `time` then `increment` then `index`, each padded to
    /// 10, so comparing strings compares positions (and MongoDB can compare them with `$lt`).
    pub fn sequence(&self) -> String {
        self.version().as_str().to_string()
    }

    /// The position as a document version.
    pub fn version(&self) -> Version {
        Version::at(self.cluster_time, self.index)
    }
}

/// For semantic events derived from a change (e.g. `customer.purchase_recorded`): the array
/// element that appeared, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    /// Dotted path of the array that grew (`purchases`).
    pub field: String,
    /// Index of the element in the after-state's array, when known.
    pub index: Option<u32>,
    pub element: Bson,
}

/// The `data` of a canonical event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventData {
    pub op: Op,
    /// Source collection.
    pub collection: String,
    /// The aggregate id as its BSON value (also rendered as `subject` and the Kafka key).
    pub key: Bson,
    /// The source document's `_id`.
    pub document_id: Bson,
    /// The full document after the change (absent for deletes).
    pub after: Option<Document>,
    /// The full document before the change, when the collection has pre-images enabled (or, for
    /// snapshot and insert events, never).
    pub before: Option<Document>,
    /// For updates: the fields set, by dotted path.
    pub changed: Option<Document>,
    /// For updates: the fields removed, by dotted path.
    pub removed: Vec<String>,
    /// For updates: the arrays it shortened (`truncatedArrays`, reported for pipeline updates
    /// since MongoDB 5.0), cut before `changed` applies (see [`update::apply`]).
    pub truncated: Vec<Truncation>,
    /// For semantic events: what appeared.
    pub derived: Option<Derived>,
}

/// Which of ficus's own writes caused a change: the service and the collection whose write-back
/// it is (reverse sync into the monolith), or, on a service database, ficus's forward writes
/// (`collection: None`). Carried by the event as the `ficusorigin` extension attribute
/// (`customers_db/customers`); only the target that caused it skips it, every other reads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub service: String,
    pub collection: Option<String>,
}

impl Origin {
    /// The attribute's text: `service/collection`, or `service` for forward writes.
    pub fn render(&self) -> String {
        match &self.collection {
            Some(c) => format!("{}/{c}", self.service),
            None => self.service.clone(),
        }
    }

    pub fn parse(s: &str) -> Option<Origin> {
        let (service, collection) = match s.split_once('/') {
            Some((s, c)) => (s, Some(c.to_string())),
            None => (s, None),
        };
        (!service.is_empty() && collection.as_deref() != Some(""))
            .then(|| Origin { service: service.to_string(), collection })
    }
}

/// One canonical domain event.
#[derive(Debug, Clone, PartialEq)]
pub struct CanonicalEvent {
    /// Deterministic from the position and the content (see [`content_id`]).
    pub id: String,
    /// `ficus://<source name>/<collection>`.
    pub source: String,
    /// Domain event type, e.g. `customer.updated`.
    pub event_type: String,
    /// The aggregate id rendered as a string ([`render_key`]); also the Kafka message key.
    pub subject: String,
    /// When the change happened (the source's wall time where known).
    pub time: DateTime,
    pub position: Position,
    pub schema_version: u32,
    pub data: EventData,
    /// Set when ficus's own write-back caused the change (an echo; see [`Origin`]).
    pub origin: Option<Origin>,
}

/// Deterministic id of a control message: BLAKE3 over the source name, the position and a
/// discriminator (what the message is about), as 32 hex digits. Events take [`content_id`].
pub fn event_id(source: &str, position: &Position, discriminator: &str) -> String {
    hex_id(&position_hasher(source, position, discriminator))
}

/// The id of a canonical event: BLAKE3 over the source name, the position, a discriminator
/// (snapshot and derived events share a position with others) and everything the event
/// carries but its id, as 32 hex digits.
///
/// The content is part of the id because reading a change again does not always give the same
/// event: an update's `after` is looked up when the change is read (`updateLookup`), so after a
/// restart it is the document as it is then; a snapshot copy made again after a restart
/// mid-copy is too; and the key of an update whose document has gone since may come from
/// elsewhere. So the same change read the same way has the same id (a duplicate is
/// recognisable), and read another way it has another (a consumer that deduplicates by id never
/// drops the newer content as a repeat).
pub fn content_id(source: &str, event: &CanonicalEvent, discriminator: &str) -> String {
    let mut h = position_hasher(source, &event.position, discriminator);
    h.update(&[0]);
    event.digest_content(&mut h);
    hex_id(&h)
}

fn position_hasher(source: &str, position: &Position, discriminator: &str) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(source.as_bytes());
    h.update(&[0]);
    h.update(position.sequence().as_bytes());
    h.update(&[0]);
    if let Some(token) = &position.resume_token {
        h.update(token.as_bytes());
    }
    h.update(&[0]);
    h.update(discriminator.as_bytes());
    h
}

fn hex_id(h: &blake3::Hasher) -> String {
    let hash = h.finalize();
    let mut out = String::with_capacity(32);
    for b in &hash.as_bytes()[..16] {
        use fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Renders an aggregate id for `subject` and the Kafka key: strings as themselves, ObjectIds as
/// hex, integers in decimal, anything else as canonical Extended JSON.
pub fn render_key(key: &Bson) -> String {
    match key {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        other => other.clone().into_canonical_extjson().to_string(),
    }
}

/// A message on the wire that is not a canonical event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

pub(crate) fn bad(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Field { field, reason: reason.into() }
}

impl CanonicalEvent {
    /// Feeds everything the event carries but its id and position into `h`, each part framed
    /// by its length, documents and values as their BSON bytes (exact, and cheaper than JSON).
    fn digest_content(&self, h: &mut blake3::Hasher) {
        fn part(h: &mut blake3::Hasher, bytes: &[u8]) {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        fn document(h: &mut blake3::Hasher, d: Option<&Document>) {
            match d.map(bson::serialize_to_vec) {
                Some(Ok(bytes)) => part(h, &bytes),
                // A document that does not serialise has no bytes to tell it by: its JSON does.
                Some(Err(_)) => part(h, Bson::Document(d.cloned().unwrap_or_default()).to_string().as_bytes()),
                None => part(h, b"\xff"),
            }
        }
        fn value(h: &mut blake3::Hasher, v: &Bson) {
            document(h, Some(&bson::doc! { "v": v.clone() }));
        }
        let d = &self.data;
        part(h, self.source.as_bytes());
        part(h, self.event_type.as_bytes());
        part(h, self.subject.as_bytes());
        part(h, &self.time.timestamp_millis().to_le_bytes());
        part(h, &self.schema_version.to_le_bytes());
        part(h, self.origin.as_ref().map(Origin::render).unwrap_or_default().as_bytes());
        part(h, d.op.as_str().as_bytes());
        part(h, d.collection.as_bytes());
        value(h, &d.key);
        value(h, &d.document_id);
        document(h, d.after.as_ref());
        document(h, d.before.as_ref());
        document(h, d.changed.as_ref());
        for r in &d.removed {
            part(h, r.as_bytes());
        }
        part(h, b"\xfe");
        for t in &d.truncated {
            part(h, t.field.as_bytes());
            part(h, &t.new_size.to_le_bytes());
        }
        part(h, b"\xfd");
        if let Some(x) = &d.derived {
            part(h, x.field.as_bytes());
            part(h, &x.index.map_or(-1, i64::from).to_le_bytes());
            value(h, &x.element);
        }
    }

    /// The event without its document images (`after`, `before`, `changed`, the derived
    /// element): what a dead letter keeps of an event too large to send.
    /// Built field by field, so the images are never copied.
    pub fn without_images(&self) -> CanonicalEvent {
        CanonicalEvent {
            id: self.id.clone(),
            source: self.source.clone(),
            event_type: self.event_type.clone(),
            subject: self.subject.clone(),
            time: self.time,
            position: self.position.clone(),
            schema_version: self.schema_version,
            origin: self.origin.clone(),
            data: EventData {
                op: self.data.op,
                collection: self.data.collection.clone(),
                key: self.data.key.clone(),
                document_id: self.data.document_id.clone(),
                after: None,
                before: None,
                changed: None,
                removed: Vec::new(),
                truncated: Vec::new(),
                derived: self.data.derived.as_ref().map(|d| Derived {
                    field: d.field.clone(),
                    index: d.index,
                    element: Bson::Null,
                }),
            },
        }
    }

    /// The Kafka message key: the aggregate id.
    pub fn key(&self) -> &str {
        &self.subject
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use bson::{Decimal128, doc, oid::ObjectId};

    fn sample() -> CanonicalEvent {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let pos = Position {
            cluster_time: Timestamp { time: 1_700_000_000, increment: 7 },
            index: 2,
            resume_token: Some("8265A1B2C3000000072B".into()),
        };
        let after = doc! {
            "_id": oid, "user_id": "U1", "ltv": "1290.50", "n32": 5_i32, "n64": 5_i64, "d": 5.0,
            "dec": "1.5".parse::<Decimal128>().unwrap(),
            "when": DateTime::from_millis(1_700_000_000_123),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "nested": { "a": [1_i32, { "b": bson::Bson::Null }] },
        };
        CanonicalEvent {
            id: event_id("linechatbot", &pos, ""),
            source: "ficus://linechatbot/customers".into(),
            event_type: "customer.updated".into(),
            subject: "U1".into(),
            time: DateTime::from_millis(1_700_000_000_000),
            position: pos,
            schema_version: SCHEMA_VERSION,
            data: EventData {
                op: Op::Update,
                collection: "customers".into(),
                key: Bson::String("U1".into()),
                document_id: Bson::ObjectId(oid),
                after: Some(after),
                before: None,
                changed: Some(doc! { "stats.msgs": 5_i32 }),
                removed: vec!["tz".into()],
                truncated: vec![],
                derived: Some(Derived {
                    field: "purchases".into(),
                    index: Some(3),
                    element: Bson::Document(doc! { "id": "P1" }),
                }),
            },
            origin: None,
        }
    }

    #[test]
    fn an_echo_says_whose_write_caused_it() {
        let mut ev = sample();
        ev.origin = Some(Origin { service: "customers_db".into(), collection: Some("customers".into()) });
        assert_eq!(ev.to_json()["ficusorigin"], "customers_db/customers");
        assert_eq!(CanonicalEvent::decode(&ev.encode()).unwrap(), ev);
        assert!(sample().to_json().get("ficusorigin").is_none(), "no attribute on events nobody caused");
        assert_eq!(Origin::parse("customers_db"), Some(Origin { service: "customers_db".into(), collection: None }));
        assert_eq!(Origin::parse("/x"), None);
    }

    #[test]
    fn envelope_round_trips_every_bson_type() {
        let ev = sample();
        let back = CanonicalEvent::decode(&ev.encode()).unwrap();
        assert_eq!(back, ev);
        // Int32 and Int64 stay apart, which relaxed JSON would lose.
        let after = back.data.after.unwrap();
        assert!(matches!(after.get("n32"), Some(Bson::Int32(5))));
        assert!(matches!(after.get("n64"), Some(Bson::Int64(5))));
    }

    #[test]
    fn field_names_that_look_like_type_wrappers_survive_the_envelope() {
        let mut ev = sample();
        let lookalikes = doc! {
            "count": { "$numberInt": "5" },
            "ref": { "$oid": "not an object id" },
            "made": { "$date": { "$numberLong": "0" } },
            "list": [{ "$$already": 1_i32, "plain": { "$regularExpression": { "pattern": "a", "options": "" } } }],
            "n": 7_i32,
        };
        ev.data.after = Some(lookalikes.clone());
        ev.data.changed = Some(doc! { "count": { "$numberInt": "5" } });
        let wire = ev.to_json();
        assert_eq!(wire["data"]["after"]["count"]["$$numberInt"], "5");
        assert_eq!(wire["data"]["after"]["n"]["$numberInt"], "7");
        let back = CanonicalEvent::decode(&ev.encode()).unwrap();
        assert_eq!(back.data.after, Some(lookalikes));
        assert_eq!(back, ev);
    }

    #[test]
    fn truncated_arrays_travel_with_the_update_and_survive_the_event_store() {
        let mut ev = sample();
        ev.data.derived = None;
        ev.data.changed = Some(doc! { "purchases.0": { "id": "P2" }, "$odd.name": 1_i32 });
        ev.data.truncated = vec![
            Truncation { field: "purchases".into(), new_size: 1 },
            Truncation { field: "tags.a.b".into(), new_size: 0 },
        ];
        let wire = ev.to_json();
        assert_eq!(
            wire["data"]["truncatedArrays"],
            serde_json::json!([{ "field": "purchases", "newSize": 1 }, { "field": "tags.a.b", "newSize": 0 }])
        );
        assert_eq!(CanonicalEvent::decode(&ev.encode()).unwrap(), ev);
        // The event store keeps `data` as BSON and gives it back as canonical Extended JSON,
        // where the sizes are `{"$numberInt": …}`.
        let mut stored = wire.clone();
        let data = Bson::try_from(stored["data"].take()).unwrap();
        stored["data"] = data.into_canonical_extjson();
        assert_eq!(stored["data"]["truncatedArrays"][0]["newSize"]["$numberInt"], "1");
        assert_eq!(CanonicalEvent::from_json(stored).unwrap(), ev);
        // Updates that shrink nothing say nothing: the field is left out.
        assert!(sample().to_json()["data"].get("truncatedArrays").is_none());
        // Malformed entries are named.
        let mut bad = wire;
        bad["data"]["truncatedArrays"][1]["newSize"] = Value::from(-1);
        let err = CanonicalEvent::from_json(bad).unwrap_err().to_string();
        assert!(err.contains("data.truncatedArrays") && err.contains("tags.a.b"), "{err}");
    }

    #[test]
    fn envelope_is_cloudevents_structured_json() {
        let v = sample().to_json();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "customer.updated");
        assert_eq!(v["subject"], "U1");
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["sequence"], "170000000000000000070000000002");
        assert_eq!(v["data"]["after"]["ltv"], "1290.50");
        assert_eq!(v["data"]["after"]["n32"]["$numberInt"], "5");
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let p = sample().position;
        assert_eq!(event_id("s", &p, ""), event_id("s", &p, ""));
        assert_ne!(event_id("s", &p, ""), event_id("s", &p, "purchases.3"));
        let mut q = p.clone();
        q.index += 1;
        assert_ne!(event_id("s", &p, ""), event_id("s", &q, ""));
        assert_eq!(event_id("s", &p, "").len(), 32);
    }

    #[test]
    fn decode_names_the_bad_field() {
        let mut v = sample().to_json();
        v["sequence"] = Value::String("x".into());
        let err = CanonicalEvent::from_json(v).unwrap_err().to_string();
        assert!(err.contains("sequence"), "{err}");
        let err = CanonicalEvent::decode(b"not json").unwrap_err().to_string();
        assert!(err.contains("not JSON"), "{err}");
        let mut v = sample().to_json();
        v["data"]["after"] = Value::from(3);
        let err = CanonicalEvent::from_json(v).unwrap_err().to_string();
        assert!(err.contains("data.after"), "{err}");
    }

    #[test]
    fn keys_render_readably() {
        assert_eq!(render_key(&Bson::String("U1".into())), "U1");
        assert_eq!(render_key(&Bson::Int64(42)), "42");
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        assert_eq!(render_key(&Bson::ObjectId(oid)), "65a1b2c3d4e5f60718293a4b");
    }
}
