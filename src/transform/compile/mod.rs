//! Transform definition files (`transforms/<service>/*.toml`) → compiled, checked transforms.
//!
//! Everything that can be wrong with a definition is found here, at start-up, not on the first
//! event that happens to reach it: unknown keys, topics and event types `topics/` does not
//! declare, expressions that do not parse, unknown functions and maps, target fields declared
//! twice, keys that name nothing, rollup fields that would make members disagree. The files are
//! read with their spans, so each problem names its file, its field and its line, and every
//! problem of every file is reported at once.
//!
//! This module reads a file's top (topic, events, collection, maps, `when`) and puts the
//! transform together; `node` reads the TOML with its lines, `target` compiles the fields, key
//! and rollup, and `entries` the `[reverse]` table.

mod checks;
mod entries;
mod node;
mod redis;
mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use bson::Bson;
use toml::de::DeTable;

use super::builtins;
use super::expr::{self, Context, Expr};
use super::model::{Input, Key, Target, Transform};
use super::reverse::invert;
use super::template::RedisTarget;
use super::value::ValueMap;
use crate::config::report::{DefinitionError, Report};
use crate::config::topics::{TopicDef, Topics};
use crate::event::Op;

use node::{LineIndex, Node, Raw, table};
use target::reads_doc;

const TOP_KEYS: [&str; 13] = [
    "topic",
    "events",
    "collection",
    "key",
    "route",
    "when",
    "maps",
    "fields",
    "rollup",
    "reverse",
    "redis",
    "refs",
    "quality",
];
const REVERSE_KEYS: [&str; 4] = ["read_only", "set", "from", "align"];

/// What the top of a file says: the topic, its event types, the target collection.
struct Header<'t> {
    def: Option<&'t TopicDef>,
    events: BTreeSet<String>,
    input: Input,
    collection: Option<String>,
}
const ROLLUP_KEYS: [&str; 4] = ["group", "count", "distinct", "fields"];

/// Compiles one file; problems go to `report`. `None` when there were any.
pub(super) fn compile_file(file: &Path, topics: &Topics, report: &mut Report) -> Option<Transform> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            report.push(DefinitionError::new(file, "", format!("cannot read: {e}")));
            return None;
        }
    };
    let lines = LineIndex::new(&text);
    let root = match DeTable::parse(&text) {
        Ok(t) => t,
        Err(e) => {
            let at = e.span().map(|s| format!(" (line {})", lines.line(s.start))).unwrap_or_default();
            report.push(DefinitionError::new(file, "", format!("{}{at}", e.message())));
            return None;
        }
    };
    let entries = table(root.get_ref(), &lines);
    let mut c = Compiler { file, errors: Vec::new(), lines: BTreeMap::new() };
    let transform = c.transform(entries, topics);
    let failed = !c.errors.is_empty();
    report.errors.extend(c.errors);
    if failed { None } else { transform }
}

/// Checks the transforms of one service together: a collection written by several transforms
/// must be keyed the same way by all of them, and a rollup collection belongs to one transform.
pub(super) fn check_service(transforms: &[Transform], report: &mut Report) {
    check_routes(transforms, report);
    check_store(transforms, report);
    let mut seen: BTreeMap<&str, (&Transform, String)> = BTreeMap::new();
    for t in transforms {
        let identity = match &t.target {
            Target::Document { key: Key::SourceId, .. } => "keyed by `_id`".to_string(),
            Target::Document { key: Key::Field { name, .. }, .. } => format!("keyed by `{name}`"),
            Target::Document { key: Key::Template(t), .. } => format!("keyed by the template `{}`", t.source),
            Target::Rollup(_) => "a rollup".to_string(),
        };
        match seen.get(t.collection.as_str()) {
            None => {
                seen.insert(&t.collection, (t, identity));
            }
            Some((first, first_identity)) => {
                let rollup = matches!(t.target, Target::Rollup(_)) || matches!(first.target, Target::Rollup(_));
                if rollup || *first_identity != identity {
                    report.push(DefinitionError::new(
                        &t.file,
                        if rollup { "collection" } else { "key" },
                        format!(
                            "`{}` is {identity} here but {first_identity} in {}: one collection, one identity",
                            t.collection,
                            first.file.display()
                        ),
                    ));
                }
            }
        }
    }
}

/// A service writes into one kind of store: every transform is a `[redis]` target, or none is.
fn check_store(transforms: &[Transform], report: &mut Report) {
    let Some(redis) = transforms.iter().find(|t| t.redis.is_some()) else { return };
    for t in transforms.iter().filter(|t| t.redis.is_none()) {
        report.push(DefinitionError::new(
            &t.file,
            "redis",
            format!(
                "missing: {} writes into Redis ([redis]), and a service's targets all live in one store; \
                 give this target a [redis] table too, or move it to a service of its own",
                redis.file.display()
            ),
        ));
    }
}

/// Every transform of a service that reads one monolith collection routes it by the same key.
fn check_routes(transforms: &[Transform], report: &mut Report) {
    let mut routes: BTreeMap<&str, &Transform> = BTreeMap::new();
    for t in transforms {
        match routes.get(t.source_collection.as_str()) {
            Some(first) if first.route != t.route => report.push(DefinitionError::new(
                &t.file,
                "route",
                format!(
                    "`{}` routes {} by `{}`, but {} routes it by `{}`: one service, one routing key per collection",
                    t.name,
                    t.source_collection,
                    t.route,
                    first.file.display(),
                    first.route
                ),
            )),
            Some(_) => {}
            None => {
                routes.insert(&t.source_collection, t);
            }
        }
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() { key.to_string() } else { format!("{at}.{key}") }
}

/// Collects the problems of one file.
struct Compiler<'f> {
    file: &'f Path,
    errors: Vec<DefinitionError>,
    /// The line declaring each target field of `[fields]` (`availability.inStock`,
    /// `purchaseHistory.amount`), for problems the reverse planner finds.
    lines: BTreeMap<String, usize>,
}

impl Compiler<'_> {
    fn err(&mut self, field: &str, line: Option<usize>, message: impl std::fmt::Display) {
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        self.errors.push(DefinitionError::new(self.file, field, format!("{message}{at}")));
    }

    fn text(&mut self, field: &str, node: &Node) -> Option<String> {
        match &node.value {
            Raw::Text(s) => Some(s.clone()),
            other => {
                self.err(field, Some(node.line), format!("expected text, found {}", other.kind()));
                None
            }
        }
    }

    fn expr(&mut self, field: &str, node: &Node, src: &str, cx: &Context<'_>) -> Option<Expr> {
        match expr::parse(src, cx) {
            Ok(e) => Some(e),
            Err(e) => {
                self.err(field, Some(node.line), format!("in `{src}`: {e}"));
                None
            }
        }
    }

    fn transform(&mut self, entries: Vec<(String, Node)>, topics: &Topics) -> Option<Transform> {
        let mut slots = self.slots(entries);
        let header = self.header(&mut slots, topics);
        let maps = slots.remove("maps").map(|n| self.maps(&n)).unwrap_or_default();
        let cx = Context { maps: &maps, allow_group: false, reverse: false };
        let when = slots.remove("when").and_then(|n| {
            let src = self.text("when", &n)?;
            self.expr("when", &n, &src, &cx)
        });
        let route = slots.remove("route").and_then(|n| {
            let path = self.text("route", &n)?;
            let valid = !path.is_empty() && path.split('.').all(|p| !p.is_empty() && !p.starts_with('$'));
            if !valid {
                self.err("route", Some(n.line), format!("`{path}` is not a monolith field path"));
                return None;
            }
            Some(path)
        });
        let target = self.target(&mut slots, &header.input, &maps);
        let (target, redis) = match target {
            Some((t, r)) => (Some(t), r),
            None => (None, None),
        };
        let entries = slots.remove("reverse").map(|n| self.reverse_entries(&n, &maps)).unwrap_or_default();
        let target_collection = header.collection.clone().unwrap_or_default();
        let refs = slots.remove("refs").map(|n| self.refs(&n, &target_collection)).unwrap_or_default();
        let quality = slots.remove("quality").map(|n| self.quality(&n, &target_collection)).unwrap_or_default();
        let def = header.def?;
        if redis.is_some() && !def.pre_images {
            let why = format!(
                "a Redis entry is deleted by the key its document had before: topic `{}` must record pre-images \
                 (`pre_images = true` in {})",
                def.topic,
                def.file.display()
            );
            self.err("redis", None, why);
        }
        let target = target?;
        let (reverse, problems) =
            invert::plan(&target, &header.input, when.as_ref(), entries, &self.lines, &def.collection);
        for p in problems {
            self.err(&p.field, p.line, p.message);
        }
        let mut forward_def = def.clone();
        // The reverse runs the forward on whole documents; derived events play no part there.
        forward_def.derived.clear();
        Some(Transform {
            file: self.file.to_path_buf(),
            name: self.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            topic: def.topic.clone(),
            source_collection: def.collection.clone(),
            events: header.events,
            input: header.input,
            collection: header.collection?,
            when,
            route: route.unwrap_or_else(|| def.key.clone()),
            target,
            def: forward_def,
            reverse,
            refs,
            quality,
            redis,
        })
    }

    /// The top-level keys by name; unknown ones are reported.
    fn slots(&mut self, entries: Vec<(String, Node)>) -> BTreeMap<&'static str, Node> {
        let mut slots = BTreeMap::new();
        for (key, node) in entries {
            match TOP_KEYS.iter().find(|k| **k == key) {
                Some(k) => {
                    slots.insert(*k, node);
                }
                None => {
                    self.err(&key, Some(node.line), format!("unknown key (expected one of: {})", TOP_KEYS.join(", ")))
                }
            }
        }
        slots
    }

    /// `topic`, `events` and `collection`: what the transform reads and where it writes.
    fn header<'t>(&mut self, slots: &mut BTreeMap<&str, Node>, topics: &'t Topics) -> Header<'t> {
        let mut required = |name: &str| {
            let node = slots.remove(name);
            if node.is_none() {
                self.err(name, None, "missing");
            }
            node
        };
        let (topic, events, collection) = (required("topic"), required("events"), required("collection"));
        let def = topic.and_then(|n| {
            let name = self.text("topic", &n)?;
            let def = topics.by_topic(&name);
            if def.is_none() {
                let known: Vec<&str> = topics.defs.iter().map(|d| d.topic.as_str()).collect();
                self.err(
                    "topic",
                    Some(n.line),
                    format!("unknown topic `{name}` (topics/ defines: {})", known.join(", ")),
                );
            }
            def
        });
        let (events, input) = match (events, def) {
            (Some(n), Some(def)) => self.events(&n, def),
            _ => (BTreeSet::new(), Input::Document),
        };
        let collection = collection.and_then(|n| {
            let name = self.text("collection", &n)?;
            if let Err(why) = valid_collection(&name) {
                self.err("collection", Some(n.line), why);
            }
            Some(name)
        });
        Header { def, events, input, collection }
    }

    /// `[fields]` with its `key` (or its `[redis]` declaration), or `[rollup]`.
    fn target(
        &mut self,
        slots: &mut BTreeMap<&str, Node>,
        input: &Input,
        maps: &BTreeMap<String, Arc<ValueMap>>,
    ) -> Option<(Target, Option<RedisTarget>)> {
        let cx = Context { maps, allow_group: false, reverse: false };
        match (slots.remove("fields"), slots.remove("rollup")) {
            (Some(node), None) => {
                let fields = self.field_table("fields", &node, &cx).unwrap_or_default();
                if matches!(input, Input::Element { .. }) && fields.iter().any(|(_, s)| reads_doc(s)) {
                    self.err(
                        "fields",
                        Some(node.line),
                        "derived events carry the array element, not the document: `$doc` reads nothing here; \
                         use `$key` for the aggregate id",
                    );
                }
                if let Some(redis) = slots.remove("redis") {
                    return self.redis_target(slots, &redis, input, fields);
                }
                let key = match slots.remove("key") {
                    Some(n) => self.key(&n, &fields, input),
                    None => {
                        let why =
                            "missing: name the field that identifies a target document, or \"_id\" for the monolith's";
                        self.err("key", None, why);
                        None
                    }
                };
                key.map(|key| (Target::Document { key, fields }, None))
            }
            (None, Some(rollup)) => {
                if let Some(n) = slots.remove("redis") {
                    self.err("redis", Some(n.line), "a rollup is a document in MongoDB; a [redis] target has [fields]");
                }
                if let Some(n) = slots.remove("key") {
                    self.err("key", Some(n.line), "a rollup is keyed by its group; remove `key`");
                }
                if matches!(input, Input::Element { .. }) {
                    self.err("events", None, "a rollup counts source documents, not derived array elements");
                }
                self.rollup(&rollup, maps).map(|r| (Target::Rollup(r), None))
            }
            (Some(_), Some(n)) => {
                self.err("rollup", Some(n.line), "a transform has either [fields] or [rollup], not both");
                None
            }
            (None, None) => {
                self.err("fields", None, "missing: declare the target's [fields] (or a [rollup])");
                None
            }
        }
    }

    /// A `[fields]` target whose entries live in Redis: keyed by its `[redis]` template.
    fn redis_target(
        &mut self,
        slots: &mut BTreeMap<&str, Node>,
        redis: &Node,
        input: &Input,
        fields: crate::transform::model::Fields,
    ) -> Option<(Target, Option<RedisTarget>)> {
        if let Some(n) = slots.remove("key") {
            self.err("key", Some(n.line), "a [redis] target is keyed by its template (`[redis] key`); remove `key`");
        }
        if matches!(input, Input::Element { .. }) {
            self.err("events", None, "a [redis] target reads document events, not derived array elements");
        }
        let declared = self.redis(redis, &fields)?;
        Some((Target::Document { key: Key::Template(declared.key.clone()), fields }, Some(declared)))
    }

    fn events(&mut self, node: &Node, def: &TopicDef) -> (BTreeSet<String>, Input) {
        let mut events = BTreeSet::new();
        let Raw::Array(items) = &node.value else {
            self.err(
                "events",
                Some(node.line),
                format!("expected an array of event types, found {}", node.value.kind()),
            );
            return (events, Input::Document);
        };
        for (i, item) in items.iter().enumerate() {
            let field = format!("events[{i}]");
            let Some(name) = self.text(&field, item) else { continue };
            if !def.all_event_types().any(|t| t == name) {
                let known: BTreeSet<&str> = def.all_event_types().collect();
                let known: Vec<&str> = known.into_iter().collect();
                self.err(
                    &field,
                    Some(item.line),
                    format!(
                        "`{name}` is not an event type of topic `{}` (it carries: {})",
                        def.topic,
                        known.join(", ")
                    ),
                );
            } else if !events.insert(name.clone()) {
                self.err(&field, Some(item.line), format!("`{name}` is listed twice"));
            }
        }
        if items.is_empty() {
            self.err("events", Some(node.line), "lists no event types");
        }
        let derived: BTreeSet<&str> = def.derived.iter().map(|d| d.event_type.as_str()).collect();
        let delete = def.event_type(Op::Delete);
        let arrays: BTreeSet<&str> =
            def.derived.iter().filter(|d| events.contains(&d.event_type)).map(|d| d.array_field.as_str()).collect();
        let reads_elements = !arrays.is_empty();
        let reads_documents = events.iter().any(|e| !derived.contains(e.as_str()) && e != delete);
        if reads_elements && reads_documents {
            self.err(
                "events",
                Some(node.line),
                format!(
                    "mixes derived events (array elements) with document events; a transform reads one or \
                     the other, plus `{delete}` if it should follow deletes"
                ),
            );
        }
        if arrays.len() > 1 {
            let arrays: Vec<&str> = arrays.iter().copied().collect();
            self.err(
                "events",
                Some(node.line),
                format!("reads the elements of several arrays ({}); one transform, one array", arrays.join(", ")),
            );
        }
        if reads_elements && !events.contains(delete) {
            self.err(
                "events",
                Some(node.line),
                format!(
                    "a target built from array elements mirrors the elements its source document has now, so it \
                     follows the document's deletes: add `{delete}`"
                ),
            );
        }
        let input = match arrays.first() {
            Some(array) => Input::Element { array: array.to_string() },
            None => Input::Document,
        };
        (events, input)
    }

    fn maps(&mut self, node: &Node) -> BTreeMap<String, Arc<ValueMap>> {
        let mut maps = BTreeMap::new();
        let Raw::Table(entries) = &node.value else {
            self.err("maps", Some(node.line), format!("expected a table of value maps, found {}", node.value.kind()));
            return maps;
        };
        for (name, map) in entries {
            let field = format!("maps.{name}");
            let ident = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ident || ["and", "or", "not", "true", "false", "null"].contains(&name.as_str()) {
                self.err(&field, Some(map.line), "a map name is a plain word of letters, digits and `_`");
                continue;
            }
            if expr::is_builtin(name) {
                self.err(&field, Some(map.line), format!("`{name}` is a built-in function; choose another name"));
                continue;
            }
            let Raw::Table(values) = &map.value else {
                self.err(
                    &field,
                    Some(map.line),
                    format!("expected a table of `from = to` values, found {}", map.value.kind()),
                );
                continue;
            };
            let mut entries = BTreeMap::new();
            for (from, to) in values {
                let to = match &to.value {
                    Raw::Text(s) => Bson::String(s.clone()),
                    Raw::Int(i) => builtins::int_value(*i),
                    Raw::Float(f) => Bson::Double(*f),
                    Raw::Bool(b) => Bson::Boolean(*b),
                    other => {
                        self.err(
                            &format!("{field}.{from}"),
                            Some(to.line),
                            format!("expected a plain value, found {}", other.kind()),
                        );
                        continue;
                    }
                };
                entries.insert(from.clone(), to);
            }
            maps.insert(name.clone(), Arc::new(ValueMap { name: name.clone(), entries }));
        }
        maps
    }
}

fn valid_collection(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['$', '\0']) {
        return Err(format!("`{name}` is not a valid collection name"));
    }
    if name.starts_with("system.") || name.starts_with("_ficus") {
        return Err(format!("`{name}` is reserved (system.* for MongoDB, _ficus* for ficus's own bookkeeping)"));
    }
    Ok(())
}
