//! The pure half of the Redis sink: where a service's entries and their versions live (the key
//! layout), what value a target document becomes (its shape), whether an entry has already
//! expired, and the guarded writes a batch comes to. No I/O: the adapter (`super`) only sends
//! what is planned here through the script (`super::script`).

use std::collections::HashMap;

use bson::{Bson, Document};

use crate::event::Version;
use crate::sink::Versioned;
use crate::transform::{RedisTarget, ValueShape, WriteOp};

/// Where one service's keys live. Entries sit under their rendered keys (the live layout: the
/// keys the service's application reads); each entry's version record, kept beside it with the
/// same absolute expiry, under `ficus:<service>:v:<key>`. A replay builds under a prefix of its
/// own (`ficus:<service>:replay:`) and renames each key into the live layout when caught up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    entries: String,
    /// ficus's own keys: `<ours>v:<key>` (version records), `<ours>snapshot:…` (which partitions
    /// have finished a snapshot).
    ours: String,
}

impl Layout {
    /// The keys the service reads.
    pub fn live(service: &str) -> Layout {
        Layout { entries: String::new(), ours: format!("ficus:{service}:") }
    }

    /// Where `ficus replay` rebuilds.
    pub fn shadow(service: &str) -> Layout {
        Layout { entries: format!("ficus:{service}:replay:e:"), ours: format!("ficus:{service}:replay:") }
    }

    /// The set of partitions that have reported a snapshot of `collection`'s source at `before`.
    pub fn snapshot(&self, collection: &str, before: &Version) -> String {
        format!("{}snapshot:{collection}:{before}", self.ours)
    }

    pub fn entry(&self, key: &str) -> String {
        format!("{}{key}", self.entries)
    }

    pub fn version(&self, key: &str) -> String {
        format!("{}v:{key}", self.ours)
    }

    /// The SCAN pattern matching every version record (one per entry ficus wrote or deleted).
    pub fn versions_pattern(&self) -> String {
        format!("{}v:*", glob_escape(&self.ours))
    }

    /// The entry key a version record belongs to.
    pub fn key_of<'k>(&self, version_key: &'k str) -> Option<&'k str> {
        version_key.strip_prefix(&self.ours)?.strip_prefix("v:")
    }
}

/// Escapes SCAN's glob characters.
fn glob_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

/// A version record's text: the version (30 digits, so records compare as strings in commit
/// order, in Lua as in Rust) and the target the entry belongs to (for `ficus verify`'s report).
pub fn version_record(v: &Version, target: &str) -> String {
    format!("{}|{target}", v.as_str())
}

/// The target a record names.
pub fn record_target(record: &str) -> Option<&str> {
    record.split_once('|').map(|(_, t)| t)
}

/// The version a record holds.
pub fn record_version(record: &str) -> &str {
    record.split_once('|').map_or(record, |(v, _)| v)
}

/// An entry's value as Redis holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Hash fields and their text, in the target document's order.
    Hash(Vec<(String, String)>),
    /// A string (a field's text, or the document as JSON).
    Text(String),
}

/// What a target document becomes under its declared shape; the error names the field.
pub fn shape(target: &RedisTarget, doc: &Document) -> Result<Value, String> {
    match target.shape {
        ValueShape::Json => Ok(Value::Text(json(doc))),
        ValueShape::Hash => Ok(Value::Hash(
            doc.iter().filter(|(_, v)| !matches!(v, Bson::Null)).map(|(k, v)| (k.clone(), text(v))).collect(),
        )),
        ValueShape::String => {
            let field = target.value.as_deref().unwrap_or_default();
            match doc.get(field) {
                None | Some(Bson::Null) => Err(format!("`{field}` (redis.value) has no value")),
                Some(v) => Ok(Value::Text(text(v))),
            }
        }
    }
}

/// A document as relaxed Extended JSON (dates as `{"$date": "…Z"}`), keys in the target's order.
pub fn json(doc: &Document) -> String {
    Bson::Document(doc.clone()).into_relaxed_extjson().to_string()
}

/// One value as text: text as is, numbers in decimal, dates in RFC 3339 (UTC, milliseconds),
/// ObjectIds in hex, documents and arrays as relaxed Extended JSON.
pub fn text(v: &Bson) -> String {
    match v {
        Bson::String(s) => s.clone(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        Bson::Double(d) => d.to_string(),
        Bson::Decimal128(d) => d.to_string(),
        Bson::Boolean(b) => b.to_string(),
        Bson::DateTime(d) => d.try_to_rfc3339_string().unwrap_or_else(|_| d.timestamp_millis().to_string()),
        Bson::ObjectId(o) => o.to_hex(),
        Bson::Null => String::new(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// The absolute expiry (epoch milliseconds) a target document declares; the error names the
/// field and what it holds instead of a date.
pub fn expiry(target: &RedisTarget, doc: &Document) -> Result<i64, String> {
    let field = &target.expire_at;
    match doc.get(field) {
        Some(Bson::DateTime(d)) => Ok(d.timestamp_millis()),
        None => Err(format!("`{field}` (redis.expire_at) has no value: the entry's expiry is unknown")),
        Some(other) => Err(format!(
            "`{field}` (redis.expire_at) is {:?}, not a date: cast it with `| date` in [fields]",
            other.element_type()
        )),
    }
}

/// Whether an entry expiring at `at` (epoch ms) is already gone at `now`: Redis deletes a key
/// whose PEXPIREAT is not in the future, so such an entry is written as a delete.
pub fn expired(at: i64, now: i64) -> bool {
    at <= now
}

/// One guarded write of an entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned<'a> {
    /// The rendered key (in the layout's terms, see [`Layout::entry`]).
    pub key: &'a str,
    /// The version record guarding it (see [`version_record`]).
    pub record: String,
    pub write: Write,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Replace the entry and expire it at this instant (epoch ms); its record expires with it.
    Set { value: Value, expire_at: i64 },
    /// Remove the entry and leave its record as a tombstone. `expired`: the event's own expiry
    /// had passed when it arrived (counted apart from the monolith's deletes).
    Delete { expired: bool },
}

/// A message whose writes cannot be laid down in Redis (a permanent error: dead-lettered).
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub collection: String,
    pub key: String,
    pub why: String,
}

/// What a batch comes to.
#[derive(Debug, Default, PartialEq)]
pub struct Batch<'a> {
    /// The newest write of each key, in the order the keys first appear.
    pub writes: Vec<Planned<'a>>,
    /// Partitions that finished a snapshot, after every write before their marker.
    pub sweeps: Vec<Sweep<'a>>,
}

/// One partition's report that a snapshot of the target's source collection is complete (see
/// `WriteOp::Sweep`): once every partition has reported, the target's entries still older than
/// the snapshot were not in it, so the monolith no longer has them, and they are deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep<'a> {
    pub collection: &'a str,
    pub before: &'a Version,
    pub partition: i32,
    pub partitions: i32,
}

/// Of the version records read back (entry key, record), the entries a completed snapshot of
/// `collection` at `before` removes: the target's, and older than the snapshot.
pub fn swept<'k>(records: &'k [(String, Option<String>)], collection: &str, before: &Version) -> Vec<&'k str> {
    records
        .iter()
        .filter_map(|(key, record)| {
            let record = record.as_deref()?;
            let older = record_version(record) < before.as_str();
            (record_target(record) == Some(collection) && older).then_some(key.as_str())
        })
        .collect()
}

/// Plans a batch at `now` (epoch ms): per key only its newest write goes out (every write is
/// guarded, so this only saves work). `target` gives the declaration of a target collection.
/// The first message that cannot be laid down refuses the batch, which the apply path then
/// writes message by message to dead-letter just that one.
pub fn plan<'a>(
    batch: &'a [Versioned],
    target: impl Fn(&str) -> Option<&'a RedisTarget>,
    now: i64,
) -> Result<Batch<'a>, Refused> {
    let mut out = Batch::default();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for v in batch {
        for op in &v.ops {
            if let WriteOp::Sweep { collection, before, partition, partitions, .. } = op {
                out.sweeps.push(Sweep { collection, before, partition: *partition, partitions: *partitions });
                continue;
            }
            let Some((key, write)) = planned(v, op, &target, now)? else { continue };
            let record = version_record(&v.version, op.collection());
            let p = Planned { key, record, write };
            match at.get(key) {
                Some(&i) if out.writes[i].record.as_str() >= p.record.as_str() => {}
                Some(&i) => out.writes[i] = p,
                None => {
                    at.insert(key, out.writes.len());
                    out.writes.push(p);
                }
            }
        }
    }
    Ok(out)
}

/// The write one op comes to; `None` for ops that have nothing to do here (a sweep is planned
/// apart, see [`Sweep`]).
fn planned<'a>(
    v: &'a Versioned,
    op: &'a WriteOp,
    target: &impl Fn(&str) -> Option<&'a RedisTarget>,
    now: i64,
) -> Result<Option<(&'a str, Write)>, Refused> {
    let refuse = |collection: &str, key: &str, why: String| Refused {
        collection: collection.to_string(),
        key: key.to_string(),
        why,
    };
    match op {
        WriteOp::Upsert { collection, id, doc } => {
            let key = id.as_str().ok_or_else(|| refuse(collection, "?", format!("the key {id} is not text")))?;
            let t = target(collection)
                .ok_or_else(|| refuse(collection, key, "no [redis] declaration for this target".into()))?;
            let expire_at = expiry(t, doc).map_err(|why| refuse(collection, key, why))?;
            if expired(expire_at, now) {
                return Ok(Some((key, Write::Delete { expired: true })));
            }
            let value = shape(t, doc).map_err(|why| refuse(collection, key, why))?;
            Ok(Some((key, Write::Set { value, expire_at })))
        }
        WriteOp::Delete { collection, id: Some(id) } => {
            let key = id.as_str().ok_or_else(|| refuse(collection, "?", format!("the key {id} is not text")))?;
            Ok(Some((key, Write::Delete { expired: false })))
        }
        WriteOp::Delete { collection, id: None } => Err(refuse(
            collection,
            "?",
            format!(
                "a delete of {} `{}` without its before-state: the entry's key cannot be rendered \
                 (turn pre-images on for the collection; the entry expires at its own time meanwhile)",
                v.source_collection, v.source_id
            ),
        )),
        WriteOp::Sweep { .. } => Ok(None),
        WriteOp::Rollup { collection, .. }
        | WriteOp::Retain { collection, .. }
        | WriteOp::Merge { collection, .. }
        | WriteOp::Witness { collection, .. } => Err(refuse(
            collection,
            "?",
            format!("a {} write has no meaning in Redis", op.to_document().get_str("op").unwrap_or("?")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::KeyTemplate;
    use bson::doc;

    fn target(shape: ValueShape, value: Option<&str>) -> RedisTarget {
        RedisTarget {
            key: KeyTemplate::parse("cache:{kind}:{key}").unwrap(),
            shape,
            expire_at: "expiresAt".into(),
            value: value.map(str::to_string),
        }
    }

    fn at(ms: i64) -> Bson {
        Bson::DateTime(bson::DateTime::from_millis(ms))
    }

    fn v(seq: u32, ops: Vec<WriteOp>) -> Versioned {
        Versioned {
            version: Version::at(bson::Timestamp { time: 100, increment: seq }, 0),
            event_id: format!("e{seq}"),
            source_collection: "cache_entries".into(),
            source_id: Bson::Int32(seq as i32),
            event_time: bson::DateTime::from_millis(0),
            ops,
            redriven: false,
        }
    }

    fn upsert(key: &str, doc: Document) -> WriteOp {
        WriteOp::Upsert { collection: "c".into(), id: Bson::String(key.into()), doc }
    }

    #[test]
    fn values_take_their_declared_shape() {
        let doc = doc! {
            "key": "k1", "n": 412, "ok": true, "ratio": 0.87, "at": at(1_772_615_693_400), "none": Bson::Null,
            "tags": ["a", "b"], "sub": { "x": 1 },
        };
        let Value::Hash(fields) = shape(&target(ValueShape::Hash, None), &doc).unwrap() else { panic!() };
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            fields,
            [
                ("key", "k1"),
                ("n", "412"),
                ("ok", "true"),
                ("ratio", "0.87"),
                ("at", "2026-03-04T09:14:53.4Z"),
                ("tags", r#"["a","b"]"#),
                ("sub", r#"{"x":1}"#),
            ],
            "null is left out of a hash, which cannot hold it"
        );
        let json = shape(&target(ValueShape::Json, None), &doc! { "key": "k1", "at": at(0) }).unwrap();
        assert_eq!(json, Value::Text(r#"{"key":"k1","at":{"$date":"1970-01-01T00:00:00Z"}}"#.into()));
        let s = target(ValueShape::String, Some("n"));
        assert_eq!(shape(&s, &doc).unwrap(), Value::Text("412".into()));
        assert!(shape(&s, &doc! { "key": "k" }).unwrap_err().contains("`n` (redis.value) has no value"));
    }

    #[test]
    fn the_expiry_is_the_documents_own_and_a_past_one_deletes() {
        let t = target(ValueShape::Json, None);
        assert_eq!(expiry(&t, &doc! { "expiresAt": at(5_000) }), Ok(5_000));
        assert!(expiry(&t, &doc! {}).unwrap_err().contains("`expiresAt` (redis.expire_at) has no value"));
        assert!(expiry(&t, &doc! { "expiresAt": "tomorrow" }).unwrap_err().contains("not a date"));
        assert!(expired(5_000, 5_000) && expired(4_999, 5_000) && !expired(5_001, 5_000));
    }

    #[test]
    fn a_batch_keeps_each_keys_newest_write_and_turns_expired_entries_into_deletes() {
        let t = target(ValueShape::Json, None);
        let live = |n: i32| doc! { "key": "a", "n": n, "expiresAt": at(10_000) };
        let batch = vec![
            v(3, vec![upsert("cache:x:a", live(3))]),
            v(1, vec![upsert("cache:x:a", live(1))]), // older, redelivered: loses to 3
            v(2, vec![upsert("cache:x:b", doc! { "expiresAt": at(999) })]), // expired on arrival
            v(4, vec![WriteOp::Delete { collection: "c".into(), id: Some(Bson::String("cache:x:c".into())) }]),
        ];
        let p = plan(&batch, |_| Some(&t), 1_000).unwrap();
        let keys: Vec<&str> = p.writes.iter().map(|w| w.key).collect();
        assert_eq!(keys, ["cache:x:a", "cache:x:b", "cache:x:c"]);
        assert_eq!(p.writes[0].write, Write::Set { value: Value::Text(json(&live(3))), expire_at: 10_000 });
        assert_eq!(record_version(&p.writes[0].record), batch[0].version.as_str());
        assert_eq!(record_target(&p.writes[0].record), Some("c"));
        assert_eq!(p.writes[1].write, Write::Delete { expired: true });
        assert_eq!(p.writes[2].write, Write::Delete { expired: false });
    }

    #[test]
    fn a_completed_snapshot_sweeps_only_the_targets_entries_older_than_it() {
        let at = |i: u32| Version::at(bson::Timestamp { time: 100, increment: i }, 0);
        let before = at(5);
        let records = vec![
            ("gone".to_string(), Some(version_record(&at(4), "research"))),
            ("copied".to_string(), Some(version_record(&at(5), "research"))),
            ("changed since".to_string(), Some(version_record(&at(6), "research"))),
            ("another target".to_string(), Some(version_record(&at(1), "ai_responses"))),
            ("expired meanwhile".to_string(), None),
        ];
        assert_eq!(swept(&records, "research", &before), ["gone"]);
        let sweep = WriteOp::Sweep {
            collection: "research".into(),
            source_collection: "cache_entries".into(),
            before: before.clone(),
            partition: 1,
            partitions: 3,
            rollup: None,
        };
        let t = target(ValueShape::Json, None);
        let batch = vec![v(7, vec![sweep])];
        let p = plan(&batch, |_| Some(&t), 0).unwrap();
        assert_eq!(p.sweeps, [Sweep { collection: "research", before: &before, partition: 1, partitions: 3 }]);
        assert!(p.writes.is_empty());
    }

    #[test]
    fn a_bad_document_refuses_its_batch_naming_the_target_the_key_and_the_field() {
        let t = target(ValueShape::Json, None);
        let batch = vec![v(1, vec![upsert("cache:x:a", doc! { "expiresAt": "soon" })])];
        let r = plan(&batch, |_| Some(&t), 0).unwrap_err();
        assert_eq!((r.collection.as_str(), r.key.as_str()), ("c", "cache:x:a"));
        assert!(r.why.contains("`expiresAt`"), "{}", r.why);
        let keyless = vec![v(1, vec![WriteOp::Delete { collection: "c".into(), id: None }])];
        assert!(plan(&keyless, |_| Some(&t), 0).unwrap_err().why.contains("without its before-state"));
    }

    #[test]
    fn the_layout_keeps_versions_and_rebuilds_apart_from_the_entries() {
        let live = Layout::live("cache");
        assert_eq!(live.entry("cache:a"), "cache:a");
        assert_eq!(live.version("cache:a"), "ficus:cache:v:cache:a");
        assert_eq!(live.key_of("ficus:cache:v:cache:a"), Some("cache:a"));
        let shadow = Layout::shadow("cache");
        assert_eq!(shadow.entry("cache:a"), "ficus:cache:replay:e:cache:a");
        assert_eq!(shadow.versions_pattern(), "ficus:cache:replay:v:*");
        assert_eq!(Layout::live("c*").versions_pattern(), "ficus:c\\*:v:*");
        let before = Version::at(bson::Timestamp { time: 1, increment: 2 }, 0);
        assert_eq!(live.snapshot("research", &before), format!("ficus:cache:snapshot:research:{before}"));
        assert!(!live.snapshot("research", &before).starts_with("ficus:cache:v:"), "never taken for a record");
    }
}
