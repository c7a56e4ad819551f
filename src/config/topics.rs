//! Topic definitions (`topics/*.toml`): one per monolith collection.
//!
//! A definition says where a collection's changes go (topic, partitions, replication, Kafka
//! configs), what identifies an aggregate (the key field), which domain event types a change
//! becomes, and which semantic events are derived from it (an array that grows). The tailer maps
//! with it, `ficus topics apply/check` provisions with it, consumers subscribe with it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::report::{DefinitionError, Problem, Report, read_toml, toml_files};
use crate::op::Op;

/// The file format, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicFile {
    collection: String,
    topic: String,
    aggregate: String,
    key: String,
    partitions: i32,
    replication_factor: i32,
    #[serde(default)]
    pre_images: bool,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    events: EventNames,
    #[serde(default)]
    derived: Vec<DerivedFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventNames {
    snapshot: Option<String>,
    insert: Option<String>,
    update: Option<String>,
    replace: Option<String>,
    delete: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DerivedFile {
    #[serde(rename = "type")]
    event_type: String,
    array_grows: String,
}

/// A semantic event derived from changes: one event per element that appears in an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedRule {
    pub event_type: String,
    /// Dotted path of the array.
    pub array_field: String,
}

/// A validated topic definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDef {
    pub file: PathBuf,
    pub collection: String,
    pub topic: String,
    pub aggregate: String,
    /// Dotted path of the aggregate id in the document (`_id`, `user_id`, …).
    pub key: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Whether the collection should record pre-images (needed to know the key of a deleted
    /// document when the key is not `_id`, and to diff arrays exactly).
    pub pre_images: bool,
    pub config: BTreeMap<String, String>,
    event_types: [String; 5],
    pub derived: Vec<DerivedRule>,
}

impl TopicDef {
    /// The domain event type a change of this kind becomes.
    pub fn event_type(&self, op: Op) -> &str {
        &self.event_types[op_slot(op)]
    }

    /// Every event type this topic can carry.
    pub fn all_event_types(&self) -> impl Iterator<Item = &str> {
        self.event_types.iter().map(String::as_str).chain(self.derived.iter().map(|d| d.event_type.as_str()))
    }

    /// The dead-letter topic consumers use for this topic.
    pub fn dlq_topic(&self) -> String {
        dlq_topic(&self.topic)
    }
}

fn op_slot(op: Op) -> usize {
    match op {
        Op::Snapshot => 0,
        Op::Insert => 1,
        Op::Update => 2,
        Op::Replace => 3,
        Op::Delete => 4,
    }
}

/// All topic definitions, indexed by source collection.
#[derive(Debug, Clone, Default)]
pub struct Topics {
    pub defs: Vec<TopicDef>,
    by_collection: HashMap<String, usize>,
}

impl Topics {
    pub fn for_collection(&self, collection: &str) -> Option<&TopicDef> {
        self.by_collection.get(collection).map(|&i| &self.defs[i])
    }
    pub fn by_topic(&self, topic: &str) -> Option<&TopicDef> {
        self.defs.iter().find(|d| d.topic == topic)
    }
    pub fn collections(&self) -> impl Iterator<Item = &str> {
        self.defs.iter().map(|d| d.collection.as_str())
    }

    /// Builds the index from already-validated definitions (used by tests and [`load`]).
    pub fn from_defs(defs: Vec<TopicDef>) -> Topics {
        let by_collection = defs.iter().enumerate().map(|(i, d)| (d.collection.clone(), i)).collect();
        Topics { defs, by_collection }
    }
}

impl Topics {
    /// The reverse direction's definitions for one service: each collection it writes back,
    /// on one topic, `<service>.changes`, keyed by the service document's `_id` (so each
    /// document's changes stay in order), with pre-images (a delete's routing key, and what an
    /// update changed), event types `<service>.<collection>.created|updated|deleted`.
    pub fn reverse<'a>(
        service: &str,
        collections: impl IntoIterator<Item = &'a str>,
        settings: &crate::config::ReverseConfig,
    ) -> Topics {
        let defs = collections
            .into_iter()
            .map(|collection| {
                let aggregate = format!("{service}.{collection}");
                TopicDef {
                    file: PathBuf::from(format!("transforms/{service}")),
                    collection: collection.to_string(),
                    topic: changes_topic(service),
                    event_types: [
                        format!("{aggregate}.snapshot"),
                        format!("{aggregate}.created"),
                        format!("{aggregate}.updated"),
                        format!("{aggregate}.replaced"),
                        format!("{aggregate}.deleted"),
                    ],
                    aggregate,
                    key: "_id".into(),
                    partitions: settings.partitions,
                    replication_factor: settings.replication_factor,
                    pre_images: true,
                    config: BTreeMap::new(),
                    derived: Vec::new(),
                }
            })
            .collect();
        Topics::from_defs(defs)
    }
}

/// The topic of a service's own changes, which reverse sync writes back into the monolith.
pub fn changes_topic(service: &str) -> String {
    format!("{service}.changes")
}

/// Where the conflicts between a service and the monolith are recorded (JSON, both sides).
pub fn conflicts_topic(service: &str) -> String {
    format!("{service}.conflicts")
}

/// The dead-letter topic of a topic: `<topic>.dlq` (names ending so are reserved for it).
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Kafka's own rule for topic names.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn valid_path(path: &str) -> bool {
    !path.is_empty() && path.split('.').all(|p| !p.is_empty() && !p.starts_with('$'))
}

fn valid_event_type(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Loads every `*.toml` in `dir`, validating each and the set as a whole; all problems at once.
pub fn load(dir: &Path) -> Result<Topics, Report> {
    let mut report = Report::default();
    let files = match toml_files(dir) {
        Ok(f) => f,
        Err(e) => {
            report.push(e);
            return Err(report);
        }
    };
    if files.is_empty() {
        report.push(DefinitionError::new(dir, "", "no topic definitions (*.toml) found"));
    }
    let mut defs = Vec::new();
    for file in files {
        match read_toml::<TopicFile>(&file) {
            Ok(raw) => {
                if let Some(def) = validate(&file, raw, &mut report) {
                    defs.push(def);
                }
            }
            Err(e) => report.push(e),
        }
    }
    let mut seen_coll: HashMap<&str, &Path> = HashMap::new();
    let mut seen_topic: HashMap<&str, &Path> = HashMap::new();
    for d in &defs {
        if let Some(other) = seen_coll.insert(&d.collection, &d.file) {
            report.push(DefinitionError::new(
                &d.file,
                "collection",
                format!("`{}` is already defined in {}", d.collection, other.display()),
            ));
        }
        if let Some(other) = seen_topic.insert(&d.topic, &d.file) {
            report.push(DefinitionError::new(
                &d.file,
                "topic",
                format!("`{}` is already used by {}", d.topic, other.display()),
            ));
        }
    }
    let topics = Topics::from_defs(defs);
    report.into_result(topics)
}

/// Checks one definition, every problem reported; the definition if it has none.
fn validate(file: &Path, raw: TopicFile, report: &mut Report) -> Option<TopicDef> {
    let before = report.errors.len();
    let mut err = |field: &str, msg: String| report.push(DefinitionError::new(file, field, msg));
    check_fields(&raw, &mut err);
    let names = event_types(&raw.aggregate, &raw.events, &mut err);
    let derived = derived_rules(&raw.derived, &names, &mut err);
    if report.errors.len() > before {
        return None;
    }
    Some(TopicDef {
        file: file.to_path_buf(),
        collection: raw.collection,
        topic: raw.topic,
        aggregate: raw.aggregate,
        key: raw.key,
        partitions: raw.partitions,
        replication_factor: raw.replication_factor,
        pre_images: raw.pre_images,
        config: raw.config,
        event_types: names,
        derived,
    })
}

/// Checks the collection, topic, aggregate and key names, the partitions and replication, the
/// pre-images a key other than `_id` needs, and the Kafka topic configs.
fn check_fields(raw: &TopicFile, err: Problem<'_>) {
    if raw.collection.is_empty() || raw.collection.contains('$') || raw.collection.contains('\0') {
        err("collection", format!("`{}` is not a valid collection name", raw.collection));
    }
    if !valid_topic_name(&raw.topic) {
        err("topic", format!("`{}` is not a valid Kafka topic name ([a-zA-Z0-9._-], at most 249)", raw.topic));
    }
    if raw.topic.ends_with(".dlq") {
        err("topic", "names ending in `.dlq` are reserved for dead letters".into());
    }
    if !valid_event_type(&raw.aggregate) {
        err("aggregate", format!("`{}` must be a non-empty name of [a-zA-Z0-9._-]", raw.aggregate));
    }
    if !valid_path(&raw.key) {
        err("key", format!("`{}` is not a field path", raw.key));
    }
    if raw.partitions < 1 {
        err("partitions", format!("must be at least 1, got {}", raw.partitions));
    }
    if raw.replication_factor < 1 {
        err("replication_factor", format!("must be at least 1, got {}", raw.replication_factor));
    }
    if raw.key != "_id" && !raw.pre_images {
        err(
            "pre_images",
            format!(
                "the key `{}` is not `_id`, so a delete can only be keyed from the pre-image: set pre_images = true",
                raw.key
            ),
        );
    }
    for (k, v) in &raw.config {
        if k.is_empty() || v.is_empty() {
            err(&format!("config.{k}"), "Kafka topic configs need a name and a value".into());
        }
    }
}

/// The event type of each kind of change, in [`op_slot`] order: as named in `[events]`, else
/// `<aggregate>.snapshot|created|updated|updated|deleted`; invalid names reported.
fn event_types(agg: &str, events: &EventNames, err: Problem<'_>) -> [String; 5] {
    let names = [
        events.snapshot.clone().unwrap_or_else(|| format!("{agg}.snapshot")),
        events.insert.clone().unwrap_or_else(|| format!("{agg}.created")),
        events.update.clone().unwrap_or_else(|| format!("{agg}.updated")),
        events.replace.clone().unwrap_or_else(|| format!("{agg}.updated")),
        events.delete.clone().unwrap_or_else(|| format!("{agg}.deleted")),
    ];
    for (field, name) in ["snapshot", "insert", "update", "replace", "delete"].iter().zip(&names) {
        if !valid_event_type(name) {
            err(&format!("events.{field}"), format!("`{name}` is not a valid event type"));
        }
    }
    names
}

/// The derived-event rules, each checked: a valid type that is not already a change event
/// type (`names`), and an array's field path.
fn derived_rules(raw: &[DerivedFile], names: &[String; 5], err: Problem<'_>) -> Vec<DerivedRule> {
    let mut derived = Vec::new();
    for (i, d) in raw.iter().enumerate() {
        if !valid_event_type(&d.event_type) {
            err(&format!("derived[{i}].type"), format!("`{}` is not a valid event type", d.event_type));
        }
        if names.contains(&d.event_type) {
            err(&format!("derived[{i}].type"), format!("`{}` is already a change event type", d.event_type));
        }
        if !valid_path(&d.array_grows) {
            err(&format!("derived[{i}].array_grows"), format!("`{}` is not a field path", d.array_grows));
        }
        derived.push(DerivedRule { event_type: d.event_type.clone(), array_field: d.array_grows.clone() });
    }
    derived
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).unwrap();
    }

    #[test]
    fn loads_the_shipped_definitions() {
        let topics = load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/topics"))).unwrap();
        for coll in
            ["conversations", "customers", "products", "cache_entries", "logs", "metrics", "api_keys", "knowledge"]
        {
            assert!(topics.for_collection(coll).is_some(), "no topic for {coll}");
        }
        let c = topics.for_collection("customers").unwrap();
        assert_eq!(c.key, "user_id");
        assert_eq!(c.event_type(Op::Insert), "customer.created");
        assert_eq!(c.event_type(Op::Replace), "customer.updated");
        assert!(c.derived.iter().any(|d| d.event_type == "customer.purchase_recorded"));
    }

    #[test]
    fn reports_every_error_with_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.toml",
            r#"collection = "customers"
topic = "bad topic!"
aggregate = "customer"
key = "user_id"
partitions = 0
replication_factor = 1
[[derived]]
type = "customer.created"
array_grows = ""
"#,
        );
        write(dir.path(), "b.toml", "collection = 3\n");
        write(
            dir.path(),
            "c.toml",
            r#"collection = "customers"
topic = "t"
aggregate = "x"
key = "_id"
partitions = 1
replication_factor = 1
surprise = true
"#,
        );
        let report = load(dir.path()).unwrap_err();
        let text = report.to_string();
        for needle in [
            "a.toml: topic:",
            "a.toml: partitions:",
            "a.toml: pre_images:",
            "a.toml: derived[0].type:",
            "a.toml: derived[0].array_grows:",
            "b.toml:",
            "c.toml:",
            "surprise",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn duplicate_collections_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let body = |topic: &str| {
            format!(
                "collection = \"logs\"\ntopic = \"{topic}\"\naggregate = \"log\"\nkey = \"_id\"\npartitions = 1\nreplication_factor = 1\n"
            )
        };
        write(dir.path(), "a.toml", &body("t1"));
        write(dir.path(), "b.toml", &body("t2"));
        let text = load(dir.path()).unwrap_err().to_string();
        assert!(text.contains("b.toml: collection: `logs` is already defined"), "{text}");
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(valid_topic_name("linechatbot.customers"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name(".."));
        assert!(!valid_topic_name("a/b"));
        assert!(!valid_topic_name(&"x".repeat(250)));
    }
}
