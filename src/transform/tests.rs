//! Tests: the shipped transforms against their golden fixtures, the compiler's error reporting,
//! and the semantics the fixtures cannot show (expressions, key changes, dropping sub-fields).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use bson::{Bson, DateTime, Document, Timestamp, doc, oid::ObjectId};
use serde_json::Value;

use super::*;
use crate::event::{CanonicalEvent, Derived, EventData, Message, Op, Position, SCHEMA_VERSION};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(super) fn shipped_topics() -> Topics {
    crate::config::topics::load(&repo().join("topics")).unwrap_or_else(|r| panic!("{r}"))
}

/// Every fixture of every shipped service: the event must be exactly what
/// `CanonicalEvent::to_json` produces, and the writes (or the error) exactly what it says.
#[test]
fn shipped_fixtures() {
    let services = load_all(&repo().join("transforms"), &shipped_topics()).unwrap_or_else(|r| panic!("{r}"));
    let mut failures = Vec::new();
    let mut count = 0;
    for svc in &services {
        let dir = repo().join("transforms").join(svc.service()).join("fixtures");
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        if files.is_empty() {
            failures.push(format!("{}: no fixtures", dir.display()));
        }
        let mut exercised = BTreeSet::new();
        for file in files {
            count += 1;
            if let Err(msg) = run_fixture(svc, &file, &mut exercised) {
                failures.push(format!("{}:\n{msg}", file.display()));
            }
        }
        for t in &svc.transforms {
            if !exercised.contains(&t.name) {
                failures.push(format!("{}: no fixture exercises this transform", t.file.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{} problem(s) in {count} fixture(s):\n\n{}", failures.len(), failures.join("\n\n"));
}

fn run_fixture(svc: &ServiceTransforms, path: &Path, exercised: &mut BTreeSet<String>) -> Result<(), String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let Value::Object(mut fixture) = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))? else {
        return Err("expected a JSON object".into());
    };
    let description = match fixture.remove("description") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => return Err("needs a `description`".into()),
    };
    let event = fixture.remove("event").ok_or("needs an `event`")?;
    let expected = match (fixture.remove("writes"), fixture.remove("error")) {
        (Some(writes @ Value::Array(_)), None) => Ok(writes),
        (None, Some(Value::String(needle))) => Err(needle),
        _ => return Err("needs either `writes` (an array) or `error` (a substring of the message)".into()),
    };
    if let Some(extra) = fixture.keys().next() {
        return Err(format!("unknown key `{extra}`"));
    }

    let ev = CanonicalEvent::from_json(event.clone()).map_err(|e| format!("the event does not decode: {e}"))?;
    let mut envelope = Vec::new();
    diff("event", &event, &ev.to_json(), &mut envelope);
    if !envelope.is_empty() {
        return Err(format!("the event is not what CanonicalEvent::to_json produces:\n  {}", envelope.join("\n  ")));
    }
    exercised.extend(svc.transforms.iter().filter(|t| t.reads(&ev)).map(|t| t.name.clone()));

    let actual = svc.apply(&ev);
    let render = |writes: &[WriteOp]| {
        let all = Bson::Array(writes.iter().map(|w| Bson::Document(w.to_document())).collect());
        serde_json::to_string_pretty(&all.into_canonical_extjson()).unwrap_or_default()
    };
    match (expected, actual) {
        (Ok(writes), Ok(actual)) => {
            let expected = Bson::try_from(writes).map_err(|e| format!("`writes` is not Extended JSON: {e}"))?;
            let actual_bson = Bson::Array(actual.iter().map(|w| Bson::Document(w.to_document())).collect());
            let mut problems = Vec::new();
            diff("writes", &expected.into_canonical_extjson(), &actual_bson.into_canonical_extjson(), &mut problems);
            if problems.is_empty() {
                Ok(())
            } else {
                Err(format!("{description}\n  {}\nactual writes:\n{}", problems.join("\n  "), render(&actual)))
            }
        }
        (Ok(_), Err(e)) => Err(format!("{description}\n  expected writes, got the error: {e}")),
        (Err(needle), Err(e)) if e.to_string().contains(&needle) => Ok(()),
        (Err(needle), Err(e)) => Err(format!("{description}\n  expected an error containing {needle:?}, got: {e}")),
        (Err(needle), Ok(actual)) => {
            Err(format!("{description}\n  expected an error containing {needle:?}, got writes:\n{}", render(&actual)))
        }
    }
}

/// A readable structural diff; Extended JSON wrappers (`{"$numberInt": …}`) count as leaves.
pub(super) fn diff(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    let leaf = |v: &Value| matches!(v, Value::Object(m) if m.keys().any(|k| k.starts_with('$')));
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) if !leaf(expected) && !leaf(actual) => {
            for (k, ev) in e {
                match a.get(k) {
                    Some(av) => diff(&format!("{path}.{k}"), ev, av, out),
                    None => out.push(format!("{path}.{k}: missing (expected {ev})")),
                }
            }
            for (k, av) in a.iter().filter(|(k, _)| !e.contains_key(*k)) {
                out.push(format!("{path}.{k}: unexpected {av}"));
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            for i in 0..e.len().max(a.len()) {
                match (e.get(i), a.get(i)) {
                    (Some(ev), Some(av)) => diff(&format!("{path}[{i}]"), ev, av, out),
                    (Some(ev), None) => out.push(format!("{path}[{i}]: missing (expected {ev})")),
                    (None, Some(av)) => out.push(format!("{path}[{i}]: unexpected {av}")),
                    (None, None) => {}
                }
            }
        }
        _ if expected != actual => out.push(format!("{path}: expected {expected}, got {actual}")),
        _ => {}
    }
}

#[test]
fn shipped_services_read_and_write_what_the_migration_plan_says() {
    let services = load_all(&repo().join("transforms"), &shipped_topics()).unwrap_or_else(|r| panic!("{r}"));
    let summary: Vec<(String, Vec<String>, Vec<String>)> = services
        .iter()
        .map(|s| (s.database().to_string(), s.topics().into_iter().collect(), s.collections().into_iter().collect()))
        .collect();
    let strings = |xs: &[&str]| xs.iter().map(ToString::to_string).collect::<Vec<_>>();
    let expect =
        |db: &str, topics: &[&str], collections: &[&str]| (db.to_string(), strings(topics), strings(collections));
    assert_eq!(
        summary,
        vec![
            expect(
                "ai_sessions_db",
                &["linechatbot.cache_entries", "linechatbot.conversations", "linechatbot.metrics"],
                &["ai_responses", "ai_sessions", "provider_stats"]
            ),
            expect("auth_db", &["linechatbot.api_keys", "linechatbot.logs"], &["api_keys", "security_events"]),
            expect("cache", &["linechatbot.cache_entries"], &["ai_responses", "research"]),
            expect(
                "conversations_db",
                &["linechatbot.conversations", "linechatbot.logs"],
                &["conversations", "webhook_events"]
            ),
            expect("customers_db", &["linechatbot.customers"], &["customer_events", "customers"]),
            expect("metrics_db", &["linechatbot.logs", "linechatbot.metrics"], &["audit_logs", "system_metrics"]),
            expect("products_db", &["linechatbot.products"], &["categories", "products"]),
            expect(
                "research_db",
                &["linechatbot.cache_entries", "linechatbot.knowledge"],
                &["healthcare_knowledge", "research_cache"]
            ),
        ]
    );
}

pub(super) fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (name, body) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, body).unwrap();
    }
}

#[test]
fn compiler_reports_every_error_with_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[
            (
                "svc_db/a_header.toml",
                r#"topic = "linechatbot.nope"
events = []
collection = "system.things"
surprise = 1
[fields]
x = "y"
"#,
            ),
            (
                "svc_db/b_events.toml",
                r#"topic = "linechatbot.customers"
events = ["customer.updated", "customer.exploded", "customer.purchase_recorded", "customer.updated"]
collection = "things"
key = "id"
[fields]
id = "user_id"
"#,
            ),
            (
                "svc_db/c_fields.toml",
                r#"topic = "linechatbot.conversations"
events = ["conversation.updated"]
collection = "convs"
key = "missingField"
when = "state == "
[maps.role]
bot = "assistant"
[maps.decimal]
x = 1
[fields]
_id = "user_id"
a = "frobnicate(x)"
b = "x | rol"
c = "a..b"
d = "$group"
e = "ratio(x)"
f = "drop(meta, other)"
"g.h" = "x"
g = "y"
i = 2024-01-01T00:00:00Z
j = "$event.nope"
[fields.msgs]
each = "messages"
role = "from | role"
k = "'unterminated"
"#,
            ),
            ("svc_db/d_syntax.toml", "topic = \n"),
            (
                "svc_db/e_rollup.toml",
                r#"topic = "linechatbot.products"
events = ["product.updated"]
collection = "cats"
[rollup]
group = "category"
bogus = 1
distinct = { "a.b" = "subcategory" }
[rollup.fields]
name = "name_en"
"#,
            ),
            (
                "svc_db/f_clash.toml",
                r#"topic = "linechatbot.customers"
events = ["customer.updated"]
collection = "things"
key = "_id"
[fields]
x = "user_id"
"#,
            ),
            (
                "svc_db/g_keyed.toml",
                r#"topic = "linechatbot.customers"
events = ["customer.snapshot"]
collection = "things"
key = "id"
[fields]
id = "user_id"
"#,
            ),
            (
                "bad.name/ok.toml",
                r#"topic = "linechatbot.logs"
events = ["log.created"]
collection = "logs"
key = "_id"
[fields]
kind = "kind"
"#,
            ),
            ("empty_db/README.md", "nothing here"),
        ],
    );
    let report = load_all(dir.path(), &shipped_topics()).unwrap_err();
    let text = report.to_string();
    for needle in [
        "a_header.toml: surprise: unknown key",
        "a_header.toml: topic: unknown topic `linechatbot.nope`",
        "a_header.toml: collection: `system.things` is reserved",
        "b_events.toml: events[1]: `customer.exploded` is not an event type of topic `linechatbot.customers`",
        "b_events.toml: events[3]: `customer.updated` is listed twice",
        "b_events.toml: events: mixes derived events",
        "c_fields.toml: when: in `state == `: expected a value",
        "c_fields.toml: maps.decimal: `decimal` is a built-in function",
        "c_fields.toml: fields._id: the sink sets `_id`",
        "c_fields.toml: fields.a: in `frobnicate(x)`: unknown function or map `frobnicate`",
        "c_fields.toml: fields.b: in `x | rol`: unknown function or map `rol`",
        "c_fields.toml: fields.c: in `a..b`: `a..b` is not a field path",
        "c_fields.toml: fields.d: in `$group`: `$group` only exists in [rollup.fields]",
        "c_fields.toml: fields.e: in `ratio(x)`: `ratio` takes 2 argument(s), given 1",
        "c_fields.toml: fields.f: in `drop(meta, other)`: `drop` takes field paths as quoted text",
        "c_fields.toml: fields.g: `fields.g` is declared more than once",
        "c_fields.toml: fields.i: expected an expression (text), a number, a boolean or a table, found a datetime",
        "c_fields.toml: fields.j: in `$event.nope`: unknown `$event.nope`; the event has $event.id, $event.time",
        "c_fields.toml: fields.msgs.k: in `'unterminated`: unterminated string",
        "c_fields.toml: key: `missingField` must be a top-level field of [fields]",
        "d_syntax.toml: ",
        "e_rollup.toml: rollup.bogus: unknown key",
        "e_rollup.toml: rollup.count: missing",
        "e_rollup.toml: rollup.distinct.a.b: `a.b` is not a top-level target field name",
        "e_rollup.toml: rollup.fields.name: group fields may use only `$group` and constants",
        "g_keyed.toml: key: `things` is keyed by `id` here but keyed by `_id` in",
        "bad.name: `bad.name` is not a valid database name",
        "empty_db: no transform definitions",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    // Lines point at the declaration.
    assert!(
        text.contains(
            "c_fields.toml: fields.a: in `frobnicate(x)`: unknown function or map `frobnicate` at column 1 (known: "
        ),
        "{text}"
    );
    assert!(text.contains("(line 14)"), "{text}");
}

// ---- semantics, on small inline definitions ----

fn service(files: &[(&str, &str)]) -> ServiceTransforms {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(String, &str)> = files.iter().map(|(n, b)| (format!("test_db/{n}"), *b)).collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    write_files(dir.path(), &files);
    load_service(&dir.path().join("test_db"), &shipped_topics()).unwrap_or_else(|r| panic!("{r}"))
}

fn event(
    op: Op,
    collection: &str,
    event_type: &str,
    after: Option<Document>,
    before: Option<Document>,
) -> CanonicalEvent {
    let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
    let position =
        Position { cluster_time: Timestamp { time: 1_767_225_600, increment: 1 }, index: 1, resume_token: None };
    CanonicalEvent {
        id: "0123456789abcdef0123456789abcdef".into(),
        source: format!("ficus://linechatbot/{collection}"),
        event_type: event_type.into(),
        subject: "k".into(),
        time: DateTime::from_millis(1_767_225_600_000),
        position,
        schema_version: SCHEMA_VERSION,
        origin: None,
        data: EventData {
            op,
            collection: collection.into(),
            key: Bson::String("k".into()),
            document_id: Bson::ObjectId(oid),
            after,
            before,
            changed: None,
            removed: vec![],
            truncated: Vec::new(),
            derived: None,
        },
    }
}

const PRODUCTS: &str = r#"topic = "linechatbot.products"
events = ["product.created", "product.updated", "product.deleted"]
collection = "items"
key = "productId"
when = "status != 'hidden'"
[fields]
productId = "sku"
conversion = "ratio(sold, views)"
inStock = "stock > 0"
specs = "specs | drop('internal', 'dims.raw') | camel_keys"
label = "concat(sku, ':', default(name, 'unnamed'))"

[reverse]
conversion = { read_only = "computed from sold and views" }
inStock = { read_only = "follows stock" }
specs = { read_only = "internal specs never leave the monolith" }
label = { read_only = "computed from sku and name" }
"#;

#[test]
fn expressions_compute_values() {
    let svc = service(&[("items.toml", PRODUCTS)]);
    let after = doc! {
        "sku": "S1", "sold": 5, "views": 0, "stock": 3,
        "specs": { "weight_g": 120, "internal": "x", "dims": { "raw": 1, "w_mm": 2 } },
    };
    let writes = svc.apply(&event(Op::Insert, "products", "product.created", Some(after), None)).unwrap();
    assert_eq!(
        writes,
        vec![WriteOp::Upsert {
            collection: "items".into(),
            id: "S1".into(),
            doc: doc! {
                "productId": "S1", "conversion": 0.0, "inStock": true,
                "specs": { "weightG": 120, "dims": { "wMm": 2 } }, "label": "S1:unnamed",
            },
        }]
    );
}

#[test]
fn a_changed_natural_key_removes_the_old_target() {
    let svc = service(&[("items.toml", PRODUCTS)]);
    let before = doc! { "sku": "OLD", "status": "active" };
    let after = doc! { "sku": "NEW", "status": "active" };
    let writes = svc.apply(&event(Op::Update, "products", "product.updated", Some(after), Some(before))).unwrap();
    assert_eq!(writes.len(), 2);
    assert_eq!(writes[0], WriteOp::Delete { collection: "items".into(), id: Some("OLD".into()) });
    assert!(matches!(&writes[1], WriteOp::Upsert { id, .. } if *id == Bson::from("NEW")));
}

#[test]
fn leaving_the_filter_removes_the_target() {
    let svc = service(&[("items.toml", PRODUCTS)]);
    let hidden = doc! { "sku": "S1", "status": "hidden" };
    let shown = doc! { "sku": "S1", "status": "active" };
    let ev = |after: &Document, before: Option<&Document>| {
        event(Op::Update, "products", "product.updated", Some(after.clone()), before.cloned())
    };
    let keyed = WriteOp::Delete { collection: "items".into(), id: Some("S1".into()) };
    let by_source = WriteOp::Delete { collection: "items".into(), id: None };
    assert_eq!(svc.apply(&ev(&hidden, Some(&shown))).unwrap(), vec![keyed]);
    assert_eq!(svc.apply(&ev(&hidden, Some(&hidden))).unwrap(), vec![], "it never fed the target");
    assert_eq!(svc.apply(&ev(&hidden, None)).unwrap(), vec![by_source]);
    let created = event(Op::Insert, "products", "product.created", Some(hidden), None);
    assert_eq!(svc.apply(&created).unwrap(), vec![], "a new document has fed nothing yet");
}

#[test]
fn errors_name_file_transform_field_and_operand() {
    let svc = service(&[(
        "items.toml",
        r#"topic = "linechatbot.products"
events = ["product.created"]
collection = "items"
key = "productId"
[fields]
productId = "sku"
"pricing.amount" = "price | decimal"
"#,
    )]);
    let ev = event(Op::Insert, "products", "product.created", Some(doc! { "sku": "S1", "price": "abc" }), None);
    let err = svc.apply(&ev).unwrap_err();
    assert_eq!(err.transform, "items");
    assert_eq!(err.field, "pricing.amount");
    assert!(
        err.to_string().ends_with("items.toml (items): pricing.amount: `price`: cannot cast \"abc\" to decimal"),
        "{err}"
    );
    let ev = event(Op::Insert, "products", "product.created", Some(doc! { "price": "1.00" }), None);
    assert_eq!(svc.apply(&ev).unwrap_err().reason, "the key `sku` has no value");
}

#[test]
fn derived_elements_are_the_input_and_deletes_go_by_source() {
    let svc = service(&[(
        "events.toml",
        r#"topic = "linechatbot.customers"
events = ["customer.purchase_recorded", "customer.deleted"]
collection = "events"
key = "eventId"
when = "status != 'pending'"
[fields]
eventId = "concat('p:', id)"
user = "$key"
at = "$event.time"
"#,
    )]);
    // As the tail makes them: the element, the aggregate's key, no document.
    let mut ev = event(Op::Update, "customers", "customer.purchase_recorded", None, None);
    ev.data.key = Bson::String("U1".into());
    ev.data.derived =
        Some(Derived { field: "purchases".into(), index: Some(0), element: Bson::Document(doc! { "id": "P1" }) });
    let writes = svc.apply(&ev).unwrap();
    assert_eq!(
        writes,
        vec![WriteOp::Upsert {
            collection: "events".into(),
            id: "p:P1".into(),
            doc: doc! { "eventId": "p:P1", "user": "U1", "at": DateTime::from_millis(1_767_225_600_000) },
        }]
    );
    ev.data.derived = Some(Derived {
        field: "purchases".into(),
        index: Some(0),
        element: Bson::Document(doc! { "id": "P2", "status": "pending" }),
    });
    assert_eq!(svc.apply(&ev).unwrap(), vec![]);
    let del = event(Op::Delete, "customers", "customer.deleted", None, Some(doc! { "user_id": "U1" }));
    assert_eq!(svc.apply(&del).unwrap(), vec![WriteOp::Delete { collection: "events".into(), id: None }]);
}

#[test]
fn compiled_transforms_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<ServiceTransforms>();
}

#[test]
fn events_nobody_reads_yield_nothing() {
    let svc = service(&[("items.toml", PRODUCTS)]);
    let ev = event(Op::Insert, "customers", "customer.created", Some(doc! { "sku": "S1" }), None);
    assert_eq!(svc.apply(&ev).unwrap(), vec![]);
}

#[test]
fn a_completed_snapshot_sweeps_the_targets_that_mirror_the_collection() {
    let services = load_all(&repo().join("transforms"), &shipped_topics()).unwrap_or_else(|r| panic!("{r}"));
    let sweeps = |svc: &str, collection: &str, types: (&str, &str)| {
        let s = services.iter().find(|s| s.service() == svc).unwrap();
        let start = bson::Timestamp { time: 1_800_000_000, increment: 3 };
        let marker = crate::event::ControlMessage::snapshot_completed("linechatbot", collection, start, types, 1, 3);
        let back = Message::decode(&Message::Control(marker).encode()).unwrap();
        s.apply_message(&back).unwrap()
    };
    let products = sweeps("products_db", "products", ("product.snapshot", "product.deleted"));
    let before = crate::event::Version::at(bson::Timestamp { time: 1_800_000_000, increment: 3 }, 0);
    assert_eq!(
        products,
        vec![
            WriteOp::Sweep {
                collection: "categories".into(),
                source_collection: "products".into(),
                before: before.clone(),
                partition: 1,
                partitions: 3,
                rollup: Some(("productCount".into(), vec!["subcategories".into()])),
            },
            WriteOp::Sweep {
                collection: "products".into(),
                source_collection: "products".into(),
                before,
                partition: 1,
                partitions: 3,
                rollup: None,
            },
        ]
    );
    // customer_events, built from purchase elements, mirrors the customers too: a snapshot
    // rewrote every element it still has, so what is older than it belongs to customers gone.
    let customers = sweeps("customers_db", "customers", ("customer.snapshot", "customer.deleted"));
    let swept: Vec<&str> = customers
        .iter()
        .filter_map(|w| match w {
            WriteOp::Sweep { collection, .. } => Some(collection.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(swept, ["customer_events", "customers"], "{customers:?}");
}

#[test]
fn an_element_target_keeps_exactly_the_elements_its_document_has_now() {
    let svc = service(&[("buys.toml", BUYS)]);
    let purchase = |id: &str, status: &str| doc! { "id": id, "amount": "1.00", "status": status };
    // A $pull (or a replace, or a snapshot copy): the document now holds P1 and P3, P3 refunded.
    let after = doc! { "user_id": "U1", "purchases": [purchase("P1", "paid"), purchase("P3", "refunded"), "junk"] };
    for (op, ty) in
        [(Op::Update, "customer.updated"), (Op::Replace, "customer.updated"), (Op::Snapshot, "customer.snapshot")]
    {
        let ev = event(op, "customers", ty, Some(after.clone()), None);
        assert_eq!(
            svc.apply(&ev).unwrap(),
            vec![WriteOp::Retain { collection: "buys".into(), keep: vec![Bson::String("buy:P1".into())] }],
            "{op:?}: refunded purchases are filtered out, and so are elements that are not documents"
        );
    }
    // A document without the array keeps nothing; a delete is a delete.
    let ev = event(Op::Update, "customers", "customer.updated", Some(doc! { "user_id": "U1" }), None);
    assert_eq!(svc.apply(&ev).unwrap(), vec![WriteOp::Retain { collection: "buys".into(), keep: vec![] }]);
    let ev = event(Op::Delete, "customers", "customer.deleted", None, None);
    assert_eq!(svc.apply(&ev).unwrap(), vec![WriteOp::Delete { collection: "buys".into(), id: None }]);
}

#[test]
fn an_element_target_must_follow_deletes_and_key_by_the_element() {
    let dir = tempfile::tempdir().unwrap();
    let no_delete = BUYS.replace(", \"customer.deleted\"", "");
    write_files(dir.path(), &[("svc_db/buys.toml", &no_delete)]);
    let report = load_service(&dir.path().join("svc_db"), &shipped_topics()).unwrap_err().to_string();
    assert!(report.contains("buys.toml: events") && report.contains("customer.deleted"), "{report}");
    let by_event = BUYS.replace("concat('buy:', id)", "$event.id");
    write_files(dir.path(), &[("svc_db/buys.toml", &by_event)]);
    let report = load_service(&dir.path().join("svc_db"), &shipped_topics()).unwrap_err().to_string();
    assert!(report.contains("buys.toml: key") && report.contains("$event"), "{report}");
}

const BUYS: &str = r#"topic = "linechatbot.customers"
events = ["customer.purchase_recorded", "customer.deleted"]
collection = "buys"
key = "buyId"
when = "status != 'refunded'"

[fields]
buyId = "concat('buy:', id)"
who = "$key"
"#;

#[test]
fn a_transform_of_array_elements_cannot_read_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let body = "topic = \"linechatbot.customers\"\nevents = [\"customer.purchase_recorded\", \"customer.deleted\"]\ncollection = \"buys\"\nkey = \"pid\"\n\n[fields]\npid = \"id\"\nwho = \"$doc.user_id\"\n";
    write_files(dir.path(), &[("svc_db/buys.toml", body)]);
    let report = load_service(&dir.path().join("svc_db"), &shipped_topics()).unwrap_err().to_string();
    assert!(report.contains("buys.toml") && report.contains("fields") && report.contains("$key"), "{report}");
    // `$key` is the way.
    let ok = service(&[("buys.toml", &body.replace("$doc.user_id", "$key"))]);
    assert_eq!(ok.collections().into_iter().collect::<Vec<_>>(), ["buys"]);
}

#[test]
fn a_redis_declaration_is_checked_with_every_other_problem() {
    let dir = tempfile::tempdir().unwrap();
    let entry = |extra: &str| {
        format!(
            "topic = \"linechatbot.cache_entries\"\nevents = [\"cache_entry.created\", \"cache_entry.deleted\"]\n\
             collection = \"entries\"\n{extra}"
        )
    };
    let bad = entry(
        "key = \"key\"\n[fields]\nkey = \"key\"\nexpiresAt = \"expires_at | date\"\n[fields.sub]\nx = \"value.x\"\n\
         [redis]\nkey = \"cache:{kind}:{sub}\"\nshape = \"list\"\nexpire_at = \"expires\"\nttl = 5\n\
         [reverse]\nkey = { read_only = \"no\" }\n",
    );
    let no_value = entry(
        "[fields]\nkey = \"key\"\nat = \"expires_at | date\"\n[redis]\nkey = \"c:{key}\"\nshape = \"string\"\nexpire_at = \"at\"\n",
    );
    let logs = "topic = \"linechatbot.logs\"\nevents = [\"log.created\"]\ncollection = \"logs\"\n[fields]\nid = \"kind\"\n\
                at = \"ts | date\"\n[redis]\nkey = \"log:{id}\"\nshape = \"json\"\nexpire_at = \"at\"\n";
    let mongo = entry("key = \"key\"\n[fields]\nkey = \"key\"\n");
    let good = entry(
        "[fields]\nkey = \"key\"\nat = \"expires_at | date\"\n[redis]\nkey = \"c:{key}\"\nshape = \"json\"\nexpire_at = \"at\"\n",
    );
    write_files(
        dir.path(),
        &[
            ("kv/a.toml", bad.as_str()),
            ("kv/b.toml", no_value.as_str()),
            ("kv/c.toml", logs),
            ("mixed/d.toml", mongo.as_str()),
            ("mixed/e.toml", good.as_str()),
        ],
    );
    let text = load_all(dir.path(), &shipped_topics()).unwrap_err().to_string();
    for needle in [
        "a.toml: key: a [redis] target is keyed by its template (`[redis] key`); remove `key`",
        "a.toml: redis.ttl: unknown key",
        "a.toml: redis.key: `{kind}` must be a top-level field of [fields] holding a single value",
        "a.toml: redis.key: `{sub}` must be a top-level field of [fields] holding a single value",
        "a.toml: redis.shape: `list`: expected \"hash\", \"string\" or \"json\"",
        "a.toml: redis.expire_at: `expires` must be a top-level field of [fields]",
        "b.toml: redis.value: missing: a string entry names the target field it holds",
        "c.toml: redis: a Redis entry is deleted by the key its document had before: topic `linechatbot.logs` must record pre-images",
        "d.toml: redis: missing: ",
        "e.toml writes into Redis ([redis]), and a service's targets all live in one store",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}
