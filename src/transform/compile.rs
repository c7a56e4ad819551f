//! Transform definition files (`transforms/<service>/*.toml`) → compiled, checked transforms.
//!
//! Everything that can be wrong with a definition is found here, at start-up, not on the first
//! event that happens to reach it: unknown keys, topics and event types `topics/` does not
//! declare, expressions that do not parse, unknown functions and maps, target fields declared
//! twice, keys that name nothing, rollup fields that would make members disagree. The files are
//! read with their spans, so each problem names its file, its field and its line, and every
//! problem of every file is reported at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use bson::Bson;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::builtins;
use super::expr::{self, Context, Expr, Root};
use super::model::{Align, Fields, Input, Key, Rollup, Shape, Target, Transform};
use super::reverse::invert;
use super::value::ValueMap;
use crate::config::report::{DefinitionError, Report};
use crate::config::topics::{TopicDef, Topics};
use crate::event::Op;

const TOP_KEYS: [&str; 10] =
    ["topic", "events", "collection", "key", "route", "when", "maps", "fields", "rollup", "reverse"];
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
    let mut seen: BTreeMap<&str, (&Transform, String)> = BTreeMap::new();
    for t in transforms {
        let identity = match &t.target {
            Target::Document { key: Key::SourceId, .. } => "keyed by `_id`".to_string(),
            Target::Document { key: Key::Field { name, .. }, .. } => format!("keyed by `{name}`"),
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

/// A TOML value with the line it starts on; tables keep the order they were written in.
#[derive(Debug, Clone)]
struct Node {
    line: usize,
    value: Raw,
}

#[derive(Debug, Clone)]
enum Raw {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Node>),
    Table(Vec<(String, Node)>),
    /// Something a definition never holds (a datetime, an out-of-range integer).
    Other(&'static str),
}

impl Raw {
    fn kind(&self) -> &'static str {
        match self {
            Raw::Text(_) => "text",
            Raw::Int(_) => "an integer",
            Raw::Float(_) => "a float",
            Raw::Bool(_) => "a boolean",
            Raw::Array(_) => "an array",
            Raw::Table(_) => "a table",
            Raw::Other(what) => what,
        }
    }
}

struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        LineIndex(std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect())
    }
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset).max(1)
    }
}

fn table(t: &DeTable<'_>, lines: &LineIndex) -> Vec<(String, Node)> {
    let mut entries: Vec<_> = t.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    entries.into_iter().map(|(k, v)| (k.get_ref().to_string(), node(v, lines.line(k.span().start), lines))).collect()
}

fn node(v: &Spanned<DeValue<'_>>, line: usize, lines: &LineIndex) -> Node {
    let value = match v.get_ref() {
        DeValue::String(s) => Raw::Text(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Raw::Int(n),
            Err(_) => Raw::Other("an integer out of range"),
        },
        DeValue::Float(f) => match f.as_str().parse::<f64>() {
            Ok(x) if x.is_finite() => Raw::Float(x),
            _ => Raw::Other("a float that is not finite"),
        },
        DeValue::Boolean(b) => Raw::Bool(*b),
        DeValue::Datetime(_) => Raw::Other("a datetime"),
        DeValue::Array(a) => Raw::Array(a.iter().map(|e| node(e, lines.line(e.span().start), lines)).collect()),
        DeValue::Table(t) => Raw::Table(table(t, lines)),
    };
    Node { line, value }
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
        let entries = slots.remove("reverse").map(|n| self.reverse_entries(&n, &maps)).unwrap_or_default();
        let def = header.def?;
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

    /// `[fields]` with its `key`, or `[rollup]`.
    fn target(
        &mut self,
        slots: &mut BTreeMap<&str, Node>,
        input: &Input,
        maps: &BTreeMap<String, Arc<ValueMap>>,
    ) -> Option<Target> {
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
                let key = match slots.remove("key") {
                    Some(n) => self.key(&n, &fields, input),
                    None => {
                        let why =
                            "missing: name the field that identifies a target document, or \"_id\" for the monolith's";
                        self.err("key", None, why);
                        None
                    }
                };
                key.map(|key| Target::Document { key, fields })
            }
            (None, Some(rollup)) => {
                if let Some(n) = slots.remove("key") {
                    self.err("key", Some(n.line), "a rollup is keyed by its group; remove `key`");
                }
                if matches!(input, Input::Element { .. }) {
                    self.err("events", None, "a rollup counts source documents, not derived array elements");
                }
                self.rollup(&rollup, maps).map(Target::Rollup)
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

    /// `[reverse]`: one inline table per target field, `{ read_only = "why" }`,
    /// `{ set = "monolith.path", from = "expression" }` or `{ align = "field" | "position" }`.
    fn reverse_entries(&mut self, node: &Node, maps: &BTreeMap<String, Arc<ValueMap>>) -> Vec<invert::Entry> {
        let Raw::Table(entries) = &node.value else {
            self.err(
                "reverse",
                Some(node.line),
                format!("expected a table of target fields, found {}", node.value.kind()),
            );
            return Vec::new();
        };
        let cx = Context { maps, allow_group: false, reverse: true };
        let mut out = Vec::new();
        for (target, n) in entries {
            let field = format!("reverse.{target}");
            let Raw::Table(keys) = &n.value else {
                self.err(
                    &field,
                    Some(n.line),
                    format!(
                        "expected {{ read_only = \"why\" }}, {{ set = \"path\", from = \"expression\" }} or \
                         {{ align = \"field\" }}, found {}",
                        n.value.kind()
                    ),
                );
                continue;
            };
            let mut slots: BTreeMap<&str, (String, usize)> = BTreeMap::new();
            for (key, v) in keys {
                match REVERSE_KEYS.iter().find(|k| **k == key) {
                    Some(k) => {
                        if let Some(text) = self.text(&join(&field, key), v) {
                            slots.insert(k, (text, v.line));
                        }
                    }
                    None => self.err(
                        &join(&field, key),
                        Some(v.line),
                        format!("unknown key (expected one of: {})", REVERSE_KEYS.join(", ")),
                    ),
                }
            }
            let line = n.line;
            let kind =
                match (slots.remove("read_only"), slots.remove("set"), slots.remove("from"), slots.remove("align")) {
                    (Some((why, l)), None, None, None) => {
                        if why.trim().is_empty() {
                            self.err(
                                &field,
                                Some(l),
                                "`read_only` takes the reason the service never changes this field",
                            );
                            continue;
                        }
                        invert::EntryKind::ReadOnly(why)
                    }
                    (None, Some((set, set_line)), Some((src, from_line)), None) => {
                        if let Err(why) = invert::valid_set_path(&set) {
                            self.err(&join(&field, "set"), Some(set_line), why);
                        }
                        let from = match expr::parse(&src, &cx) {
                            Ok(e) => e,
                            Err(e) => {
                                self.err(&join(&field, "from"), Some(from_line), format!("in `{src}`: {e}"));
                                continue;
                            }
                        };
                        invert::EntryKind::Rule { set, from }
                    }
                    (None, None, None, Some((align, _))) => invert::EntryKind::Align(if align == "position" {
                        Align::Position
                    } else {
                        Align::Field(align)
                    }),
                    (None, Some(_), None, None) | (None, None, Some(_), None) => {
                        self.err(
                            &field,
                            Some(line),
                            "a rule takes both `set` (the monolith path) and `from` (its value)",
                        );
                        continue;
                    }
                    (None, None, None, None) => {
                        self.err(&field, Some(line), "empty entry: give `read_only`, `set` and `from`, or `align`");
                        continue;
                    }
                    _ => {
                        self.err(&field, Some(line), "give one of `read_only`, `set` with `from`, or `align`");
                        continue;
                    }
                };
            out.push(invert::Entry { target: target.clone(), line, kind });
        }
        out
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

    /// A top-level table of target fields (`[fields]`, `[rollup.fields]`); `None` when it is not
    /// a table.
    fn field_table(&mut self, at: &str, node: &Node, cx: &Context<'_>) -> Option<Fields> {
        let Raw::Table(entries) = &node.value else {
            self.err(at, Some(node.line), format!("expected a table of target fields, found {}", node.value.kind()));
            return None;
        };
        let sets_id = |key: &str| key.split('.').next() == Some("_id");
        for (key, n) in entries.iter().filter(|(k, _)| sets_id(k)) {
            self.err(
                &join(at, key),
                Some(n.line),
                "the sink sets `_id`: use key = \"_id\" to keep the monolith's, or key = \"<field>\" for a natural key",
            );
        }
        Some(self.fields(at, entries.iter().filter(|(k, _)| !sets_id(k)), node.line, cx))
    }

    fn fields<'n>(
        &mut self,
        at: &str,
        entries: impl Iterator<Item = &'n (String, Node)>,
        line: usize,
        cx: &Context<'_>,
    ) -> Fields {
        let mut out = Fields::new();
        let mut declared = 0;
        for (key, node) in entries {
            declared += 1;
            let field = join(at, key);
            let segments: Vec<&str> = key.split('.').collect();
            if segments.iter().any(|s| s.is_empty() || s.starts_with('$') || s.contains('\0')) {
                self.err(&field, Some(node.line), format!("`{key}` is not a target field path"));
                continue;
            }
            if let Some(target) = field.strip_prefix("fields.") {
                self.lines.insert(target.to_string(), node.line);
            }
            let Some(shape) = self.shape(&field, node, cx) else { continue };
            if let Err(clash) = insert(&mut out, &segments, shape) {
                self.err(&field, Some(node.line), format!("`{}` is declared more than once", join(at, &clash)));
            }
        }
        if declared == 0 {
            self.err(at, Some(line), "declares no fields");
        }
        out
    }

    fn shape(&mut self, field: &str, node: &Node, cx: &Context<'_>) -> Option<Shape> {
        match &node.value {
            Raw::Text(src) => self.expr(field, node, src, cx).map(Shape::Value),
            Raw::Int(i) => Some(Shape::Value(Expr::Literal(builtins::int_value(*i)))),
            Raw::Float(f) => Some(Shape::Value(Expr::Literal(Bson::Double(*f)))),
            Raw::Bool(b) => Some(Shape::Value(Expr::Literal(Bson::Boolean(*b)))),
            Raw::Table(entries) => match entries.iter().find(|(k, _)| k == "each") {
                Some((_, each)) => {
                    let each_field = join(field, "each");
                    let source = self.text(&each_field, each).and_then(|src| self.expr(&each_field, each, &src, cx));
                    let fields = self.fields(field, entries.iter().filter(|(k, _)| k != "each"), node.line, cx);
                    Some(Shape::Each { source: source?, fields })
                }
                None => Some(Shape::Object(self.fields(field, entries.iter(), node.line, cx))),
            },
            other => {
                self.err(
                    field,
                    Some(node.line),
                    format!("expected an expression (text), a number, a boolean or a table, found {}", other.kind()),
                );
                None
            }
        }
    }

    fn key(&mut self, node: &Node, fields: &Fields, input: &Input) -> Option<Key> {
        let name = self.text("key", node)?;
        let element = matches!(input, Input::Element { .. });
        if name == "_id" {
            if element {
                self.err("key", Some(node.line), "array elements have no `_id`; name a field of [fields]");
                return None;
            }
            return Some(Key::SourceId);
        }
        match fields.iter().find(|(k, _)| *k == name) {
            Some((_, Shape::Value(expr))) if element && expr.reads_event() => {
                self.err(
                    "key",
                    Some(node.line),
                    format!(
                        "`{name}` reads `$event`: the key of an element's target must come from the element \
                         (and `$key`), so the document's own changes can tell which elements it still has"
                    ),
                );
                None
            }
            Some((_, Shape::Value(expr))) => Some(Key::Field { name, expr: expr.clone() }),
            _ => {
                self.err(
                    "key",
                    Some(node.line),
                    format!("`{name}` must be a top-level field of [fields] holding a single value, or \"_id\""),
                );
                None
            }
        }
    }

    fn rollup(&mut self, node: &Node, maps: &BTreeMap<String, Arc<ValueMap>>) -> Option<Rollup> {
        let Raw::Table(entries) = &node.value else {
            self.err("rollup", Some(node.line), format!("expected a table, found {}", node.value.kind()));
            return None;
        };
        let cx = Context { maps, allow_group: false, reverse: false };
        let (mut group, mut count, mut distinct, mut fields) = (None, None, Vec::new(), Fields::new());
        for (key, n) in entries {
            let field = format!("rollup.{key}");
            match key.as_str() {
                "group" => group = self.text(&field, n).and_then(|src| self.expr(&field, n, &src, &cx)),
                "count" => count = self.rollup_count(&field, n),
                "distinct" => distinct = self.rollup_distinct(&field, n, &cx),
                "fields" => fields = self.rollup_fields(&field, n, maps),
                _ => {
                    self.err(&field, Some(n.line), format!("unknown key (expected one of: {})", ROLLUP_KEYS.join(", ")))
                }
            }
        }
        if group.is_none() && !entries.iter().any(|(k, _)| k == "group") {
            self.err("rollup.group", Some(node.line), "missing: the expression that names a source document's group");
        }
        if count.is_none() && !entries.iter().any(|(k, _)| k == "count") {
            self.err("rollup.count", Some(node.line), "missing: the group field that counts members");
        }
        let mut taken: BTreeSet<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        for name in count.iter().chain(distinct.iter().map(|(k, _)| k)) {
            if !taken.insert(name) {
                self.err("rollup", Some(node.line), format!("`{name}` is declared more than once"));
            }
        }
        Some(Rollup { group: group?, count_field: count?, distinct, fields })
    }

    /// `rollup.count`: the top-level group field counting members.
    fn rollup_count(&mut self, field: &str, n: &Node) -> Option<String> {
        self.text(field, n).filter(|name| {
            let ok = top_level_name(name);
            if !ok {
                self.err(field, Some(n.line), format!("`{name}` is not a top-level target field name"));
            }
            ok
        })
    }

    /// `[rollup.distinct]`: group arrays of the distinct values over the members.
    fn rollup_distinct(&mut self, field: &str, n: &Node, cx: &Context<'_>) -> Vec<(String, Expr)> {
        let Raw::Table(arrays) = &n.value else {
            self.err(
                field,
                Some(n.line),
                format!("expected a table of `targetArray = \"expression\"`, found {}", n.value.kind()),
            );
            return Vec::new();
        };
        let mut distinct = Vec::new();
        for (target, e) in arrays {
            let f = join(field, target);
            if !top_level_name(target) {
                self.err(&f, Some(e.line), format!("`{target}` is not a top-level target field name"));
            } else if let Some(expr) = self.text(&f, e).and_then(|src| self.expr(&f, e, &src, cx)) {
                distinct.push((target.clone(), expr));
            }
        }
        distinct
    }

    /// `[rollup.fields]`: group fields, from `$group` and constants only.
    fn rollup_fields(&mut self, field: &str, n: &Node, maps: &BTreeMap<String, Arc<ValueMap>>) -> Fields {
        let group_cx = Context { maps, allow_group: true, reverse: false };
        let fields = self.field_table(field, n, &group_cx).unwrap_or_default();
        for (name, shape) in &fields {
            if reads_source(shape) {
                self.err(
                    &join(field, name),
                    Some(n.line),
                    "group fields may use only `$group` and constants, so all members agree on them",
                );
            }
        }
        fields
    }
}

/// A top-level target field name: no dots, no `$`, not `_id`.
fn top_level_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['.', '$', '\0']) && name != "_id"
}

fn reads_doc(shape: &Shape) -> bool {
    match shape {
        Shape::Value(e) => e.reads_root(Root::Doc),
        Shape::Object(fields) => fields.iter().any(|(_, s)| reads_doc(s)),
        Shape::Each { source, fields } => source.reads_root(Root::Doc) || fields.iter().any(|(_, s)| reads_doc(s)),
    }
}

fn reads_source(shape: &Shape) -> bool {
    match shape {
        Shape::Value(e) => e.reads_source(),
        Shape::Object(fields) => fields.iter().any(|(_, s)| reads_source(s)),
        Shape::Each { .. } => true,
    }
}

/// Places a shape at a dotted target path, merging objects; on a clash returns the clashing path.
fn insert(fields: &mut Fields, path: &[&str], shape: Shape) -> Result<(), String> {
    let Some((head, rest)) = path.split_first() else { return Ok(()) };
    let existing = fields.iter_mut().find(|(k, _)| k == head);
    match (existing, shape) {
        (None, shape) => {
            let shape = if rest.is_empty() {
                shape
            } else {
                let mut inner = Fields::new();
                insert(&mut inner, rest, shape)?;
                Shape::Object(inner)
            };
            fields.push((head.to_string(), shape));
            Ok(())
        }
        (Some((_, Shape::Object(inner))), shape) if !rest.is_empty() => {
            insert(inner, rest, shape).map_err(|clash| join(head, &clash))
        }
        (Some((_, Shape::Object(inner))), Shape::Object(more)) => {
            for (k, s) in more {
                insert(inner, &[k.as_str()], s).map_err(|clash| join(head, &clash))?;
            }
            Ok(())
        }
        _ => Err(path.join(".")),
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
