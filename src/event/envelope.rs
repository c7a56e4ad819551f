//! The wire form of a canonical event: the CloudEvents 1.0 structured-mode JSON envelope, its
//! encoding for Kafka, its decoding (naming the first bad field) and the `ce_*` headers of the
//! Kafka protocol binding. Kept apart from the event itself so the type reads on its own.

use bson::{Bson, DateTime, Document};
use serde_json::{Map, Value};

use super::ejson::doc_to_json;
use super::{
    CanonicalEvent, DecodeError, Derived, EventData, Op, Origin, Position, Truncation, Version, bad, from_ejson,
    to_ejson,
};

impl CanonicalEvent {
    /// The structured-mode CloudEvents JSON envelope.
    pub fn to_json(&self) -> Value {
        let mut data = Map::new();
        data.insert("op".into(), Value::String(self.data.op.as_str().into()));
        data.insert("collection".into(), Value::String(self.data.collection.clone()));
        data.insert("key".into(), to_ejson(&self.data.key));
        data.insert("documentId".into(), to_ejson(&self.data.document_id));
        let opt = |d: &Option<Document>| d.as_ref().map(doc_to_json).unwrap_or(Value::Null);
        data.insert("after".into(), opt(&self.data.after));
        data.insert("before".into(), opt(&self.data.before));
        if self.data.changed.is_some() || self.data.op == Op::Update {
            data.insert("changed".into(), opt(&self.data.changed));
            data.insert("removed".into(), Value::Array(self.data.removed.iter().cloned().map(Value::String).collect()));
        }
        if !self.data.truncated.is_empty() {
            let cut = |t: &Truncation| {
                let mut m = Map::new();
                m.insert("field".into(), Value::String(t.field.clone()));
                m.insert("newSize".into(), Value::from(t.new_size));
                Value::Object(m)
            };
            data.insert("truncatedArrays".into(), Value::Array(self.data.truncated.iter().map(cut).collect()));
        }
        if let Some(d) = &self.data.derived {
            let mut m = Map::new();
            m.insert("field".into(), Value::String(d.field.clone()));
            m.insert("index".into(), d.index.map(Value::from).unwrap_or(Value::Null));
            m.insert("element".into(), to_ejson(&d.element));
            data.insert("derived".into(), Value::Object(m));
        }

        let mut env = Map::new();
        env.insert("specversion".into(), Value::String("1.0".into()));
        env.insert("id".into(), Value::String(self.id.clone()));
        env.insert("source".into(), Value::String(self.source.clone()));
        env.insert("type".into(), Value::String(self.event_type.clone()));
        env.insert("subject".into(), Value::String(self.subject.clone()));
        env.insert("time".into(), Value::String(self.time.try_to_rfc3339_string().unwrap_or_default()));
        env.insert("datacontenttype".into(), Value::String("application/json".into()));
        env.insert("sequence".into(), Value::String(self.position.sequence()));
        env.insert(
            "clustertime".into(),
            Value::String(format!("{}.{}", self.position.cluster_time.time, self.position.cluster_time.increment)),
        );
        if let Some(tok) = &self.position.resume_token {
            env.insert("resumetoken".into(), Value::String(tok.clone()));
        }
        env.insert("schemaversion".into(), Value::from(self.schema_version));
        if let Some(o) = &self.origin {
            env.insert("ficusorigin".into(), Value::String(o.render()));
        }
        env.insert("data".into(), Value::Object(data));
        Value::Object(env)
    }

    /// Encodes the envelope as bytes for Kafka.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).expect("a JSON value always serialises")
    }

    /// Decodes an envelope produced by [`CanonicalEvent::encode`].
    pub fn decode(bytes: &[u8]) -> Result<CanonicalEvent, DecodeError> {
        let v: Value = serde_json::from_slice(bytes)?;
        Self::from_json(v)
    }

    /// Parses a structured-mode envelope.
    pub fn from_json(v: Value) -> Result<CanonicalEvent, DecodeError> {
        let Value::Object(mut env) = v else {
            return Err(bad("(envelope)", "expected a JSON object"));
        };
        let mut string = |field: &'static str| -> Result<String, DecodeError> {
            match env.remove(field) {
                Some(Value::String(s)) => Ok(s),
                Some(_) => Err(bad(field, "expected a string")),
                None => Err(bad(field, "missing")),
            }
        };
        let spec = string("specversion")?;
        if spec != "1.0" {
            return Err(bad("specversion", format!("unsupported CloudEvents version {spec:?}")));
        }
        let id = string("id")?;
        let source = string("source")?;
        let event_type = string("type")?;
        let subject = string("subject")?;
        let time_s = string("time")?;
        let time = DateTime::parse_rfc3339_str(&time_s).map_err(|e| bad("time", format!("not RFC 3339: {e}")))?;
        let seq = string("sequence")?;
        let (cluster_time, index) =
            Version::parse(&seq).and_then(|v| v.position()).ok_or_else(|| bad("sequence", "expected 30 digits"))?;
        let resume_token = resume_token(env.remove("resumetoken"))?;
        let schema_version = schema_version(env.remove("schemaversion"))?;
        let origin = origin(env.remove("ficusorigin"))?;
        let Some(Value::Object(data)) = env.remove("data") else {
            return Err(bad("data", "missing or not an object"));
        };
        Ok(CanonicalEvent {
            id,
            source,
            event_type,
            subject,
            time,
            position: Position { cluster_time, index, resume_token },
            schema_version,
            data: event_data(data)?,
            origin,
        })
    }

    /// CloudEvents Kafka protocol binding headers (`ce_*`), sent beside the structured body when
    /// `kafka.ce_headers` is on, so brokers and tools can route without parsing the body.
    pub fn ce_headers(&self) -> [(&'static str, String); 6] {
        [
            ("ce_specversion", "1.0".to_string()),
            ("ce_id", self.id.clone()),
            ("ce_type", self.event_type.clone()),
            ("ce_source", self.source.clone()),
            ("ce_subject", self.subject.clone()),
            ("ce_sequence", self.position.sequence()),
        ]
    }
}

/// The `resumetoken` extension: a string, or absent for snapshot events.
fn resume_token(v: Option<Value>) -> Result<Option<String>, DecodeError> {
    match v {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(bad("resumetoken", "expected a string")),
    }
}

/// The `schemaversion` extension: a number, or a number in a string.
fn schema_version(v: Option<Value>) -> Result<u32, DecodeError> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad("schemaversion", "expected a small unsigned integer")),
        Some(Value::String(s)) => s.parse().map_err(|_| bad("schemaversion", "expected an integer")),
        _ => Err(bad("schemaversion", "missing")),
    }
}

/// The `ficusorigin` extension: `service/collection`, or absent.
fn origin(v: Option<Value>) -> Result<Option<Origin>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            Ok(Some(Origin::parse(&s).ok_or_else(|| bad("ficusorigin", "expected service/collection"))?))
        }
        Some(_) => Err(bad("ficusorigin", "expected a string")),
    }
}

/// The `data` object: what happened to which document.
fn event_data(mut data: Map<String, Value>) -> Result<EventData, DecodeError> {
    let op: Op = match data.remove("op") {
        Some(v) => serde_json::from_value(v).map_err(|e| bad("data.op", e.to_string()))?,
        None => return Err(bad("data.op", "missing")),
    };
    let collection = match data.remove("collection") {
        Some(Value::String(s)) => s,
        _ => return Err(bad("data.collection", "missing or not a string")),
    };
    let key = bson_of("data.key", data.remove("key"))?;
    let document_id = bson_of("data.documentId", data.remove("documentId"))?;
    let after = opt_doc("data.after", data.remove("after"))?;
    let before = opt_doc("data.before", data.remove("before"))?;
    let changed = opt_doc("data.changed", data.remove("changed"))?;
    let removed = removed(data.remove("removed"))?;
    let truncated = match data.remove("truncatedArrays") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.into_iter().map(truncation).collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("data.truncatedArrays", "expected an array")),
    };
    let derived = derived(data.remove("derived"))?;
    Ok(EventData { op, collection, key, document_id, after, before, changed, removed, truncated, derived })
}

/// A value in Extended JSON that must be there.
fn bson_of(field: &'static str, v: Option<Value>) -> Result<Bson, DecodeError> {
    let v = v.ok_or_else(|| bad(field, "missing"))?;
    from_ejson(v).map_err(|e| bad(field, format!("not Extended JSON: {e}")))
}

/// A document in Extended JSON, or absent.
fn opt_doc(field: &'static str, v: Option<Value>) -> Result<Option<Document>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match from_ejson(v) {
            Ok(Bson::Document(d)) => Ok(Some(d)),
            Ok(_) => Err(bad(field, "expected a document")),
            Err(e) => Err(bad(field, format!("not Extended JSON: {e}"))),
        },
    }
}

/// `data.removed`: the dotted paths an update removed.
fn removed(v: Option<Value>) -> Result<Vec<String>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad("data.removed", "expected strings")),
            })
            .collect(),
        Some(_) => Err(bad("data.removed", "expected an array")),
    }
}

/// `data.derived`: the array element a semantic event is about, or absent.
fn derived(v: Option<Value>) -> Result<Option<Derived>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(mut m)) => {
            let field = match m.remove("field") {
                Some(Value::String(s)) => s,
                _ => return Err(bad("data.derived.field", "missing or not a string")),
            };
            let index = match m.remove("index") {
                None | Some(Value::Null) => None,
                // A plain number, or Extended JSON (`{"$numberInt": "3"}`) from a round trip
                // through BSON, as the event store does.
                Some(v) => Some(small_int(v).ok_or_else(|| bad("data.derived.index", "expected an integer"))?),
            };
            let element = bson_of("data.derived.element", m.remove("element"))?;
            Ok(Some(Derived { field, index, element }))
        }
        Some(_) => Err(bad("data.derived", "expected an object")),
    }
}

/// A small unsigned integer on the wire: a plain number, or Extended JSON (`{"$numberInt": "3"}`)
/// from a round trip through BSON, as the event store does.
fn small_int(v: Value) -> Option<u32> {
    match Bson::try_from(v) {
        Ok(Bson::Int32(i)) => u32::try_from(i).ok(),
        Ok(Bson::Int64(i)) => u32::try_from(i).ok(),
        _ => None,
    }
}

/// One entry of `data.truncatedArrays`: `{"field": "purchases", "newSize": 2}`.
fn truncation(v: Value) -> Result<Truncation, DecodeError> {
    let Value::Object(mut m) = v else { return Err(bad("data.truncatedArrays", "expected objects")) };
    let field = match m.remove("field") {
        Some(Value::String(s)) => s,
        _ => return Err(bad("data.truncatedArrays", "an entry's `field` is missing or not a string")),
    };
    let new_size = m
        .remove("newSize")
        .and_then(small_int)
        .ok_or_else(|| bad("data.truncatedArrays", format!("`{field}`: `newSize` is missing or not a count")))?;
    Ok(Truncation { field, new_size })
}
