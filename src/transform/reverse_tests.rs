//! Tests of the reverse: the shipped transforms against their reverse fixtures
//! (`transforms/<service>/fixtures/reverse/*.json`), the laws on reference documents, the
//! shipped classification, load-time checks of `[reverse]`, and the semantics of `put`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use bson::{Bson, Document, doc};
use serde_json::Value;

use super::tests::diff;
use super::*;
use crate::event::{from_ejson, to_ejson};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shipped_topics() -> Topics {
    crate::config::topics::load(&repo().join("topics")).unwrap_or_else(|r| panic!("{r}"))
}

fn shipped() -> Vec<ServiceTransforms> {
    load_all(&repo().join("transforms"), &shipped_topics()).unwrap_or_else(|r| panic!("{r}"))
}

// ---- the reverse fixtures ----

/// Every reverse fixture of every shipped service: the patch (or the error) `put` returns must
/// be exactly what the fixture says, and a clean patch must round-trip: the forward of the
/// patched monolith document is the service document.
#[test]
fn shipped_reverse_fixtures() {
    let mut failures = Vec::new();
    let mut count = 0;
    for svc in shipped() {
        let dir = repo().join("transforms").join(svc.service()).join("fixtures").join("reverse");
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let mut exercised = BTreeSet::new();
        for file in files {
            count += 1;
            if let Err(msg) = run_reverse_fixture(&svc, &file, &mut exercised) {
                failures.push(format!("{}:\n{msg}", file.display()));
            }
        }
        for c in svc.collections() {
            if svc.reverse_for(&c).is_some() && !exercised.contains(&c) {
                failures.push(format!("{}: no reverse fixture exercises `{c}`", dir.display()));
            }
        }
    }
    assert!(count > 0, "no reverse fixtures found");
    assert!(failures.is_empty(), "{} problem(s) in {count} fixture(s):\n\n{}", failures.len(), failures.join("\n\n"));
}

fn document(v: &Value, what: &str) -> Result<Document, String> {
    match from_ejson(v.clone()) {
        Ok(Bson::Document(d)) => Ok(d),
        Ok(other) => Err(format!("`{what}` must be a document, found {other}")),
        Err(e) => Err(format!("`{what}` is not Extended JSON: {e}")),
    }
}

fn run_reverse_fixture(svc: &ServiceTransforms, path: &Path, exercised: &mut BTreeSet<String>) -> Result<(), String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let Value::Object(mut f) = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))? else {
        return Err("expected a JSON object".into());
    };
    let description = match f.remove("description") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => return Err("needs a `description`".into()),
    };
    let Some(Value::String(collection)) = f.remove("collection") else {
        return Err("needs a `collection` (the service collection)".into());
    };
    let monolith = match f.remove("monolith") {
        Some(Value::Null) => None,
        Some(v) => Some(document(&v, "monolith")?),
        None => return Err("needs `monolith` (a document, or null for one the monolith has never seen)".into()),
    };
    let service = document(&f.remove("service").ok_or("needs `service`")?, "service")?;
    let expected = match (f.remove("patch"), f.remove("error")) {
        (Some(patch), None) => Ok(patch),
        (None, Some(Value::String(needle))) => Err(needle),
        _ => return Err("needs either `patch` ({ set, unset }) or `error` (a substring of the message)".into()),
    };
    // Target fields that share a monolith field with one the service changed, and so follow it
    // in the round trip (`name` after `multilingual.en.name` went back as `name_en`).
    let followers: Vec<String> = match f.remove("followers") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        Some(_) => return Err("`followers` is a list of target fields".into()),
    };
    let conflicts = f.remove("conflicts").unwrap_or(Value::Array(vec![]));
    let disagreements = f.remove("disagreements").unwrap_or(Value::Array(vec![]));
    if let Some(extra) = f.keys().next() {
        return Err(format!("unknown key `{extra}`"));
    }
    let reverse = svc.reverse_for(&collection).ok_or_else(|| format!("`{collection}` is not written back"))?;
    exercised.insert(collection.clone());
    let actual = reverse.put(monolith.as_ref(), &service);
    let patch = match (expected, actual) {
        (Err(needle), Err(e)) if e.to_string().contains(&needle) => return Ok(()),
        (Err(needle), Err(e)) => {
            return Err(format!("{description}\n  expected an error containing {needle:?}, got: {e}"));
        }
        (Err(needle), Ok(p)) => {
            return Err(format!(
                "{description}\n  expected an error containing {needle:?}, got the patch {}",
                render(&p)
            ));
        }
        (Ok(_), Err(e)) => return Err(format!("{description}\n  expected a patch, got the error: {e}")),
        (Ok(expected), Ok(p)) => (expected, p),
    };
    let (expected, actual) = patch;
    let mut problems = Vec::new();
    diff("patch", &expected, &patch_json(&actual), &mut problems);
    diff("conflicts", &conflicts, &conflicts_json(&actual), &mut problems);
    diff("disagreements", &disagreements, &disagreements_json(&actual), &mut problems);
    if !problems.is_empty() {
        return Err(format!("{description}\n  {}\nactual: {}", problems.join("\n  "), render(&actual)));
    }
    // Applied, the patch must make the forward give back the service's document.
    let mut patched = monolith.clone().unwrap_or_default();
    if patched.is_empty()
        && let Some(id) = service.get("_id")
    {
        patched.insert("_id", id.clone());
    }
    actual.apply_to(&mut patched).map_err(|e| format!("{description}\n  the patch does not apply: {e}"))?;
    if !actual.has_issues() {
        let back = reverse.forward(patched).map_err(|e| format!("{description}\n  {e}"))?;
        let mut wanted = service.clone();
        wanted.remove("_id");
        wanted.remove("_ficus");
        let targets: BTreeSet<&str> =
            reverse.plan.scope.fields.iter().filter_map(|f| f.target.split('.').next()).collect();
        let mut wanted: Document = wanted.into_iter().filter(|(k, _)| targets.contains(k.as_str())).collect();
        let mut back =
            back.ok_or_else(|| format!("{description}\n  the patched document no longer reaches the target"))?;
        for f in &followers {
            super::reverse::unset_path(&mut wanted, f);
            super::reverse::unset_path(&mut back, f);
        }
        let back = to_ejson(&Bson::Document(back));
        let mut round = Vec::new();
        diff("round trip", &to_ejson(&Bson::Document(wanted)), &back, &mut round);
        if !round.is_empty() {
            return Err(format!(
                "{description}\n  the patched document does not give the service's back:\n  {}",
                round.join("\n  ")
            ));
        }
    }
    Ok(())
}

fn patch_json(p: &Patch) -> Value {
    let unset: Vec<Value> = p.unset.iter().map(|u| Value::String(u.clone())).collect();
    serde_json::json!({ "set": to_ejson(&Bson::Document(p.set.clone())), "unset": unset })
}

fn conflicts_json(p: &Patch) -> Value {
    let list: Vec<Value> = p
        .conflicts
        .iter()
        .map(|c| {
            let mut o = serde_json::Map::new();
            o.insert("field".into(), Value::String(c.field.clone()));
            if let Some(v) = &c.service {
                o.insert("service".into(), to_ejson(v));
            }
            if let Some(v) = &c.monolith {
                o.insert("monolith".into(), to_ejson(v));
            }
            Value::Object(o)
        })
        .collect();
    Value::Array(list)
}

fn disagreements_json(p: &Patch) -> Value {
    let list: Vec<Value> = p
        .disagreements
        .iter()
        .map(|d| {
            let fields: serde_json::Map<String, Value> =
                d.fields.iter().map(|(f, v)| (f.clone(), v.as_ref().map_or(Value::Null, to_ejson))).collect();
            serde_json::json!({ "path": d.path, "fields": fields })
        })
        .collect();
    Value::Array(list)
}

fn render(p: &Patch) -> String {
    let all = serde_json::json!({
        "patch": patch_json(p), "conflicts": conflicts_json(p), "disagreements": disagreements_json(p),
    });
    serde_json::to_string_pretty(&all).unwrap_or_default()
}

// ---- the laws on reference documents ----

#[test]
fn every_law_holds_on_reference_documents() {
    let topics = shipped_topics();
    let mut w = crate::testkit::workload::Workload::new(11);
    let mut docs = Vec::new();
    for c in crate::testkit::workload::Workload::COLLECTIONS {
        for i in 0..8 {
            docs.push((c.to_string(), w.document(c, i, 4).unwrap_or_default()));
        }
    }
    let mut bad = String::new();
    let mut checked = 0;
    for svc in shipped() {
        let report = check_laws(&svc, &topics, "linechatbot", docs.clone());
        for (c, t) in &report.tallies {
            assert!(t.documents > 0 && t.put_get > t.documents, "{}.{c}: nothing checked: {t:?}", svc.service());
            checked += t.get_put + t.put_get + t.inserts;
        }
        if !report.ok() {
            bad.push_str(&report.render(5));
        }
    }
    assert!(bad.is_empty(), "{bad}");
    assert!(checked > 1000, "only {checked} checks");
}

// ---- the classification of the shipped services ----

/// The fields that do not simply go back, per service collection: what transforms/README.md's
/// table says.
#[test]
fn shipped_classification() {
    let mut rows = Vec::new();
    let mut reversible = 0;
    for svc in shipped() {
        for c in svc.classification() {
            for f in &c.fields {
                match &f.class {
                    Reversibility::Reversible(how) => {
                        assert!(how.starts_with("← "), "{how}");
                        reversible += 1;
                    }
                    other => rows.push(format!("{}.{} {} {}", c.service, c.collection, f.field, other.label())),
                }
            }
        }
    }
    assert_eq!(
        rows,
        [
            "ai_sessions_db.ai_responses cached read-only",
            "ai_sessions_db.ai_sessions context read-only",
            "customers_db.customer_events eventId derived",
            "customers_db.customer_events lineUserId derived",
            "customers_db.customer_events eventType derived",
            "customers_db.customer_events eventData.purchaseId derived",
            "customers_db.customer_events eventData.productId derived",
            "customers_db.customer_events eventData.productName derived",
            "customers_db.customer_events eventData.amount derived",
            "customers_db.customer_events eventData.currency derived",
            "customers_db.customer_events eventData.purchaseDate derived",
            "customers_db.customer_events eventData.status derived",
            "customers_db.customer_events timestamp derived",
            "customers_db.customer_events source derived",
            "customers_db.customer_events correlationId derived",
            "customers_db.customer_events createdAt derived",
            "products_db.categories categoryId derived",
            "products_db.categories name derived",
            "products_db.categories productCount derived",
            "products_db.categories subcategories derived",
            "products_db.products availability.inStock read-only",
            "products_db.products analytics.conversionRate read-only",
            "research_db.healthcare_knowledge sources reversible by rule",
            "research_db.research_cache results reversible by rule",
        ]
    );
    assert!(reversible > 150, "{reversible}");
    let text = render_classification(&shipped());
    assert!(text.contains("customers_db.customers ← customers (customers.toml)"), "{text}");
    assert!(text.contains("segmentation.lifetimeValue"), "{text}");
    assert!(text.contains("← ltv | decimal"), "{text}");
    assert!(text.contains("← sources, elements aligned by `url`"), "{text}");
}

// ---- load-time checks of [reverse] ----

fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (name, body) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, body).unwrap();
    }
}

fn load(files: &[(&str, &str)]) -> Result<ServiceTransforms, String> {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(String, &str)> = files.iter().map(|(n, b)| (format!("test_db/{n}"), *b)).collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    write_files(dir.path(), &files);
    load_service(&dir.path().join("test_db"), &shipped_topics()).map_err(|r| r.to_string())
}

fn service(files: &[(&str, &str)]) -> ServiceTransforms {
    load(files).unwrap_or_else(|r| panic!("{r}"))
}

#[test]
fn loading_reports_every_field_that_does_not_reverse_and_every_bad_entry() {
    let report = load(&[
        (
            "a_missing.toml",
            r#"topic = "linechatbot.conversations"
events = ["conversation.updated"]
collection = "a"
key = "_id"

[maps.role]
bot = "assistant"
system = "assistant"

[fields]
role = "from | role"
inStock = "stock > 0"
rate = "ratio(sold, views)"
source = "'ficus'"
label = "concat(a, b)"
fallback = "default(x, 1)"
seen = "$event.time"
first = "messages.0.text"
[fields.context]
each = "messages"
content = "text"
"#,
        ),
        (
            "b_entries.toml",
            r#"topic = "linechatbot.products"
events = ["product.updated"]
collection = "b"
key = "productId"

[maps.state_of]
active = "on"

[fields]
productId = "sku"
name = "name_en"
inStock = "stock > 0"
rate = "ratio(sold, views)"
live = "status == 'active'"
flag = "status != 'gone'"
tags = "tags"
kind = "'product'"
[fields.pics]
each = "images_meta"
url = "url"
[fields.facts]
each = "facts"
value = "value"

[reverse]
name = { read_only = "the service never renames" }
inStock = { set = "stock", from = "$value | nope" }
rate = { set = "$bad", from = "$value" }
live = { set = "status", from = "$event.time" }
flag = { read_only = "" }
tags = { align = "position" }
kind = { set = "kind" }
pics = { align = "href" }
facts = { set = "facts", from = "$value" }
nothing = { read_only = "no such field" }
"pics.url" = { read_only = "inside an array that has no plan" }
"#,
        ),
        (
            "c_rollup.toml",
            r#"topic = "linechatbot.products"
events = ["product.updated"]
collection = "c"

[rollup]
group = "category"
count = "n"

[reverse]
n = { read_only = "computed" }
"#,
        ),
        (
            "d_elements.toml",
            r#"topic = "linechatbot.customers"
events = ["customer.purchase_recorded"]
collection = "d"
key = "pid"

[fields]
pid = "id"

[reverse]
pid = { read_only = "derived" }
"#,
        ),
    ])
    .unwrap_err();
    for needle in [
        "a_missing.toml: fields.role: not automatically reversible: value map `role` is not injective: `bot` and `system` both become `assistant`; add to [reverse]: \"role\" = { read_only = ",
        "a_missing.toml: fields.inStock: not automatically reversible: `stock > 0` is a condition",
        "(line 12)",
        "a_missing.toml: fields.rate: not automatically reversible: `ratio(sold, views)` is computed from several fields",
        "a_missing.toml: fields.source: not automatically reversible: `'ficus'` is a constant",
        "a_missing.toml: fields.label: not automatically reversible: `concat(a, b)` joins several values",
        "a_missing.toml: fields.fallback: not automatically reversible: `default(x, 1)` writes a default",
        "a_missing.toml: fields.seen: not automatically reversible: `$event.time` comes from the event",
        "a_missing.toml: fields.first: not automatically reversible: `messages.0.text` reads an array element by its position",
        "a_missing.toml: fields.context: not automatically reversible: the elements of `messages` carry no id",
        "{ align = \"position\" }",
        "b_entries.toml: reverse.name: `name` reverses automatically (← name_en); remove this entry",
        "b_entries.toml: reverse.inStock.from: in `$value | nope`: unknown function or map `nope`",
        "b_entries.toml: reverse.rate.set: `$bad` is not a monolith field path",
        "b_entries.toml: reverse.live.from: in `$event.time`: `$event` does not exist in a reverse rule",
        "b_entries.toml: reverse.flag: `read_only` takes the reason",
        "b_entries.toml: reverse.tags: `tags` reverses automatically (← tags); remove this entry",
        "b_entries.toml: reverse.kind: a rule takes both `set` (the monolith path) and `from` (its value)",
        "b_entries.toml: reverse.pics: `align = \"href\"` must name a single-value field of the elements of `pics` (they have: url)",
        "b_entries.toml: reverse.facts: `facts` is an array built with `each`: it takes `align` or `read_only`",
        "b_entries.toml: reverse.nothing: `nothing` is not a target field of [fields]",
        "b_entries.toml: reverse.pics.url: `pics.url` is inside `pics`, which needs its own entry first",
        "c_rollup.toml: reverse.n: this target is never written back (a rollup over many `products` documents",
        "d_elements.toml: reverse.pid: this target is never written back (built from array elements of `customers`",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in\n{report}");
    }
    // The fields whose entry was broken still say why they need one.
    assert!(
        report.contains("b_entries.toml: fields.kind: not automatically reversible: `'product'` is a constant"),
        "{report}"
    );
}

#[test]
fn rules_that_write_inside_another_field_are_refused() {
    let report = load(&[(
        "a.toml",
        r#"topic = "linechatbot.conversations"
events = ["conversation.updated"]
collection = "a"
key = "_id"

[fields]
metadata = "meta"
channel = "concat('#', meta.channel)"
inner = "meta.campaign"

[reverse]
channel = { set = "meta.channel", from = "$value" }
"#,
    )])
    .unwrap_err();
    assert!(
        report.contains("a.toml: fields.inner: not automatically reversible: it reads `meta.campaign`, inside `meta`, which `metadata` writes back whole"),
        "{report}"
    );
    assert!(
        report.contains("a.toml: reverse.channel: the rule sets `meta.channel`, and `metadata` writes `meta` back"),
        "{report}"
    );
}

// ---- put, on small inline definitions ----

const ITEMS: &str = r#"topic = "linechatbot.products"
events = ["product.snapshot", "product.created", "product.updated", "product.deleted"]
collection = "items"
key = "itemId"
when = "kind == 'item' and status != 'hidden'"

[maps.level]
low = "minor"
info = "minor"
high = "major"

[maps.level_back]
minor = "low"
major = "high"

[fields]
itemId = "code | string"
severity = "level | level"
label = "concat(code, ':', title)"
title = "title"
[fields.parts]
each = "parts"
name = "name"
qty = "qty | int"

[reverse]
severity = { set = "level", from = "$value | level_back" }
label = { read_only = "code and title, which go back" }
parts = { align = "position" }
"#;

fn items() -> ServiceTransforms {
    service(&[("items.toml", ITEMS)])
}

#[test]
fn rules_read_the_value_the_service_and_the_monolith() {
    let svc = items();
    let r = svc.reverse_for("items").unwrap();
    let m = doc! { "_id": 1, "kind": "item", "code": 7, "level": "info", "title": "bolt", "parts": [] };
    let s = doc! { "itemId": "7", "severity": "minor", "label": "7:bolt", "title": "bolt", "parts": [] };
    // Unchanged: the rule does not run (info stays info, though level_back would say low).
    assert!(r.put(Some(&m), &s).unwrap().is_empty());
    let mut edited = s.clone();
    edited.insert("severity", "major");
    let p = r.put(Some(&m), &edited).unwrap();
    assert_eq!(p.set, doc! { "level": "high" });
    // The natural key goes back through `string` in the monolith's type: an integer.
    edited.insert("itemId", "8");
    edited.insert("label", "8:bolt");
    let p = r.put(Some(&m), &edited).unwrap();
    assert_eq!(p.set, doc! { "code": 8, "level": "high" });
    assert!(p.conflicts.is_empty(), "{p:?}");
    // $source reads the monolith, plain paths the service document.
    let svc = service(&[(
        "items.toml",
        &ITEMS.replace("from = \"$value | level_back\"", "from = \"concat($source.level, '>', $value, '>', title)\""),
    )]);
    let r = svc.reverse_for("items").unwrap();
    let mut edited = s.clone();
    edited.insert("severity", "major");
    assert_eq!(r.put(Some(&m), &edited).unwrap().set, doc! { "level": "info>major>bolt" });
    let edited = doc! { "itemId": "7", "label": "7:bolt", "title": "bolt", "parts": [] };
    // Absent: the rule sees no $value, and concat of an absent value is absent: unset.
    assert_eq!(r.put(Some(&m), &edited).unwrap().unset, ["level"]);
}

#[test]
fn read_only_fields_are_checked_against_the_patched_document() {
    let svc = items();
    let r = svc.reverse_for("items").unwrap();
    let m = doc! { "_id": 1, "kind": "item", "code": "A1", "level": "low", "title": "bolt" };
    let s = doc! { "itemId": "A1", "severity": "minor", "label": "A1:bolt", "title": "nut" };
    let p = r.put(Some(&m), &s).unwrap();
    assert_eq!(p.set, doc! { "title": "nut" });
    assert_eq!(
        p.conflicts,
        [Conflict {
            field: "label".into(),
            service: Some("A1:bolt".into()),
            monolith: Some("A1:nut".into()),
            reason: "code and title, which go back".into(),
        }]
    );
    let s = doc! { "itemId": "A1", "severity": "minor", "label": "A1:nut", "title": "nut" };
    assert!(r.put(Some(&m), &s).unwrap().conflicts.is_empty());
    // A change that takes the document out of the target's filter is a conflict too.
    let svc = service(&[("items.toml", &ITEMS.replace("title = \"title\"", "title = \"status\""))]);
    let r = svc.reverse_for("items").unwrap();
    let s = doc! { "itemId": "A1", "severity": "minor", "label": "A1:bolt", "title": "hidden" };
    let p = r.put(Some(&m), &s).unwrap();
    assert_eq!(p.set, doc! { "status": "hidden" });
    assert_eq!(p.conflicts.len(), 1);
    assert_eq!(p.conflicts[0].field, "(when)");
}

#[test]
fn an_insert_writes_the_filter_constants() {
    let svc = items();
    let r = svc.reverse_for("items").unwrap();
    let s = doc! { "_id": "B2", "itemId": "B2", "severity": "major", "label": "B2:cog", "title": "cog", "parts": [{ "name": "x", "qty": 2 }] };
    let p = r.put(None, &s).unwrap();
    assert_eq!(
        p.set,
        doc! { "code": "B2", "level": "high", "title": "cog", "parts": [{ "name": "x", "qty": 2 }], "kind": "item" }
    );
    assert!(!p.has_issues(), "{p:?}");
    assert_eq!(r.locate(&s).unwrap(), doc! { "code": "B2" });
}

#[test]
fn positional_arrays_keep_unread_fields_by_position() {
    let svc = items();
    let r = svc.reverse_for("items").unwrap();
    let m = doc! { "_id": 1, "kind": "item", "code": "A1", "level": "low", "title": "bolt",
    "parts": [{ "name": "a", "qty": "1", "sku": "S-a" }, { "name": "b", "qty": 2, "sku": "S-b" }] };
    let base = doc! { "itemId": "A1", "severity": "minor", "label": "A1:bolt", "title": "bolt" };
    let with = |parts: Bson| {
        let mut d = base.clone();
        d.insert("parts", parts);
        d
    };
    // Edit the first, append one: the first keeps its text quantity and its sku.
    let s = with(bson::bson!([{ "name": "a", "qty": 5 }, { "name": "b", "qty": 2 }, { "name": "c", "qty": 1 }]));
    let p = r.put(Some(&m), &s).unwrap();
    assert_eq!(
        p.set,
        doc! { "parts": [{ "name": "a", "qty": "5", "sku": "S-a" }, { "name": "b", "qty": 2, "sku": "S-b" }, { "name": "c", "qty": 1 }] }
    );
    // The documented caveat: a reorder keeps the unread fields where they were.
    let s = with(bson::bson!([{ "name": "b", "qty": 2 }, { "name": "a", "qty": 1 }]));
    let p = r.put(Some(&m), &s).unwrap();
    assert_eq!(
        p.set,
        doc! { "parts": [{ "name": "b", "qty": "2", "sku": "S-a" }, { "name": "a", "qty": 1, "sku": "S-b" }] }
    );
}

#[test]
fn elements_with_repeated_or_missing_ids_align_by_occurrence() {
    let svc = shipped().into_iter().find(|s| s.service() == "customers_db").unwrap();
    let r = svc.reverse_for("customers").unwrap();
    let m = doc! {
        "_id": 1, "user_id": "U1",
        "purchases": [
            { "id": "P1", "amount": "1.00", "note": "first" },
            { "id": "P1", "amount": "2.00", "note": "second" },
            { "amount": "3.00", "note": "no id" },
        ],
    };
    let s = doc! {
        "lineUserId": "U1",
        "purchaseHistory": [
            { "amount": dec("3.50") },
            { "purchaseId": "P1", "amount": dec("1.00") },
            { "purchaseId": "P1", "amount": dec("2.50") },
        ],
    };
    let p = r.put(Some(&m), &s).unwrap();
    assert_eq!(
        p.set,
        doc! { "purchases": [
            { "amount": "3.50", "note": "no id" },
            { "id": "P1", "amount": "1.00", "note": "first" },
            { "id": "P1", "amount": "2.50", "note": "second" },
        ] }
    );
}

#[test]
fn elements_sharing_an_id_keep_their_own_fields_when_they_move() {
    // Found by the property test: two purchases with one id, one amount a string and one an
    // integer, reversed in the service. Matching by occurrence alone swapped their complements.
    let svc = shipped().into_iter().find(|s| s.service() == "customers_db").unwrap();
    let r = svc.reverse_for("customers").unwrap();
    let m = doc! { "_id": 1, "user_id": "U1", "purchases": [
        { "id": "x", "amount": "0.00", "note": "a" },
        { "id": "x", "amount": 1114, "note": "b" },
    ] };
    let s = doc! { "lineUserId": "U1", "purchaseHistory": [
        { "purchaseId": "x", "amount": dec("1114") },
        { "purchaseId": "x", "amount": dec("0.00") },
    ] };
    let p = r.put(Some(&m), &s).unwrap();
    assert_eq!(
        p.set,
        doc! { "purchases": [{ "id": "x", "amount": 1114, "note": "b" }, { "id": "x", "amount": "0.00", "note": "a" }] }
    );
}

fn dec(text: &str) -> Bson {
    Bson::Decimal128(text.parse().unwrap())
}

#[test]
fn locate_finds_the_monolith_document() {
    let svcs = shipped();
    let find = |svc: &str, coll: &str| svcs.iter().find(|s| s.service() == svc).unwrap().reverse_for(coll).unwrap();
    let r = find("customers_db", "customers");
    assert_eq!(r.source_collection(), "customers");
    assert_eq!(r.locate(&doc! { "_id": "U1", "lineUserId": "U1" }).unwrap(), doc! { "user_id": "U1" });
    assert!(
        r.locate(&doc! { "_id": "U1" })
            .unwrap_err()
            .to_string()
            .contains("lineUserId: the service document has no key value")
    );
    // What ficus wrote carries its source: found by it even after the natural key changed.
    let written =
        doc! { "_id": "U2", "lineUserId": "U2", "_ficus": { "v": "1", "src": { "c": "customers", "id": 7 } } };
    assert_eq!(r.locate(&written).unwrap(), doc! { "_id": 7 });
    let elsewhere = doc! { "_id": "U2", "lineUserId": "U2", "_ficus": { "v": "1", "src": { "c": "other", "id": 7 } } };
    assert_eq!(r.locate(&elsewhere).unwrap(), doc! { "user_id": "U2" });
    let r = find("conversations_db", "conversations");
    let oid = bson::oid::ObjectId::parse_str("6602b3e5d4c1a2f3e4d5c6b7").unwrap();
    assert_eq!(r.locate(&doc! { "_id": oid }).unwrap(), doc! { "_id": oid });
    assert!(r.locate(&doc! {}).is_err());
    assert!(svcs.iter().find(|s| s.service() == "products_db").unwrap().reverse_for("categories").is_none());
    assert!(svcs.iter().find(|s| s.service() == "customers_db").unwrap().reverse_for("customer_events").is_none());
    assert!(svcs.iter().find(|s| s.service() == "customers_db").unwrap().reverse_for("nothing").is_none());
}

#[test]
fn patches_apply_with_mongodb_semantics() {
    let patch = |set: Document, unset: &[&str]| Patch {
        set,
        unset: unset.iter().map(ToString::to_string).collect(),
        ..Patch::default()
    };
    let mut d = doc! { "a": { "b": 1, "keep": true }, "arr": [{ "x": 1 }, 5], "gone": 1, "n": null };
    patch(doc! { "a.c.d": 2, "arr.0.y": 3, "arr.4": "p", "top": 1 }, &["gone", "arr.1", "a.zz.q", "missing"])
        .apply_to(&mut d)
        .unwrap();
    assert_eq!(
        d,
        doc! { "a": { "b": 1, "keep": true, "c": { "d": 2 } }, "arr": [{ "x": 1, "y": 3 }, null, null, null, "p"], "n": null, "top": 1 }
    );
    // As on the server: through a scalar or null, or with overlapping paths, nothing applies.
    let before = d.clone();
    for (set, unset) in [
        (doc! { "top.x": 1 }, vec![]),
        (doc! { "n.x": 1 }, vec![]),
        (doc! { "arr.k": 1 }, vec![]),
        (doc! { "a": 1, "a.b": 2 }, vec![]),
        (doc! { "a.b": 1 }, vec!["a"]),
    ] {
        let err = patch(set.clone(), &unset).apply_to(&mut d).unwrap_err();
        assert!(matches!(err, ReverseError::Apply { .. }), "{set}: {err}");
        assert_eq!(d, before);
    }
    let p = patch(doc! { "a.b": 2 }, &["c"]);
    assert_eq!(p.to_update(), doc! { "$set": { "a.b": 2 }, "$unset": { "c": "" } });
    assert_eq!(Patch::default().to_update(), doc! {});
    assert!(Patch::default().is_empty());
}

#[test]
fn camel_case_reverses_to_snake_case() {
    use super::builtins::{camel_case, snake_case};
    for key in
        ["avgResponseTime", "p95ResponseTime", "userID", "HTTPCode", "_id", "a1B", "x", "$fooBar", "a.bC", "ÉtéChaud"]
    {
        let back = snake_case(key);
        assert_eq!(camel_case(&back), key, "{key} → {back}");
    }
    assert_eq!(snake_case("avgResponseTime"), "avg_response_time");
    assert_eq!(snake_case("p95ResponseTime"), "p95_response_time");
}

#[test]
fn the_law_check_finds_a_wrong_rule() {
    // `from = "'low'"` writes every severity back as `low`: PutGet must fail on the map edit.
    let svc = service(&[("items.toml", &ITEMS.replace("from = \"$value | level_back\"", "from = \"'low'\""))]);
    let m = doc! { "_id": 1, "kind": "item", "code": "A1", "level": "info", "title": "bolt", "parts": [{ "name": "a", "qty": 1 }] };
    let report = check_laws(&svc, &shipped_topics(), "linechatbot", [("products".to_string(), m.clone())]);
    assert!(!report.ok());
    let broken: Vec<(&str, Law)> = report.failures.iter().map(|f| (f.field.as_str(), f.law)).collect();
    assert!(broken.contains(&("severity", Law::PutGet)), "{}", report.render(10));
    assert!(report.failures.iter().all(|f| f.field == "severity"), "{}", report.render(10));
    let edits: Vec<&str> = report.failures.iter().map(|f| f.edit.as_str()).collect();
    assert_eq!(
        edits,
        ["move severity: \"minor\" → \"minor~\"", "map severity: \"minor\" → \"major\"", "unset severity"]
    );
    let text = report.render(10);
    assert!(text.contains("[3 failed]") && text.contains("LAWS BROKEN"), "{text}");
    assert!(text.contains("≠ severity"), "{text}");
    // The right rule passes, on the same document.
    let report = check_laws(&items(), &shipped_topics(), "linechatbot", [("products".to_string(), m)]);
    assert!(report.ok(), "{}", report.render(10));
    let t = &report.tallies["items"];
    assert_eq!((t.documents, t.get_put, t.inserts, t.failed), (1, 1, 1, 0));
    assert!(t.put_get >= 10, "{t:?}");
}

#[test]
fn the_law_check_counts_documents_the_forward_rejects() {
    let svc = items();
    let m = doc! { "_id": 1, "kind": "item", "code": "A1", "level": "info", "title": "bolt", "parts": [{ "name": "a", "qty": "many" }] };
    let report = check_laws(&svc, &shipped_topics(), "linechatbot", [("products".to_string(), m)]);
    assert_eq!(report.tallies["items"].rejected, 1);
    assert_eq!(report.tallies["items"].documents, 0);
    assert!(report.ok());
}

#[test]
fn disagreements_inside_elements_name_the_monolith_element() {
    let svc = service(&[("items.toml", &ITEMS.replace("name = \"name\"\n", "name = \"name\"\ncaption = \"name\"\n"))]);
    let r = svc.reverse_for("items").unwrap();
    let m = doc! { "_id": 1, "kind": "item", "code": "A1", "level": "low", "title": "bolt",
    "parts": [{ "name": "a", "qty": 1 }, { "name": "b", "qty": 2 }] };
    let s = doc! { "itemId": "A1", "severity": "minor", "label": "A1:bolt", "title": "bolt",
    "parts": [{ "name": "a", "caption": "a", "qty": 1 }, { "name": "c", "caption": "d", "qty": 3 }] };
    let p = r.put(Some(&m), &s).unwrap();
    assert_eq!(
        p.disagreements,
        [Disagreement {
            path: "parts[1].name".into(),
            fields: vec![("parts[1].name".into(), Some("c".into())), ("parts[1].caption".into(), Some("d".into()))],
        }]
    );
    // What agrees still goes back; the disputed field keeps the monolith's value.
    assert_eq!(p.set, doc! { "parts": [{ "name": "a", "qty": 1 }, { "name": "b", "qty": 3 }] });
}

#[test]
fn the_law_check_lets_fields_from_one_source_follow_each_other() {
    // name and caption both come from the element's name: editing one changes the other.
    let svc = service(&[("items.toml", &ITEMS.replace("name = \"name\"\n", "name = \"name\"\ncaption = \"name\"\n"))]);
    let mut m = doc! { "_id": 1, "kind": "item", "code": "A1", "level": "low", "title": "bolt" };
    m.insert("parts", bson::bson!([{ "name": "a", "qty": 1, "sku": "S-a" }, { "name": "b", "qty": "2" }]));
    let report = check_laws(&svc, &shipped_topics(), "linechatbot", [("products".to_string(), m)]);
    assert!(report.ok(), "{}", report.render(10));
    assert!(report.tallies["items"].put_get > 15, "{:?}", report.tallies);
}

/// A service change is laid over the monolith's current document: only what the service changed
/// is written back, whatever else the monolith changed meanwhile stays.
#[test]
fn a_service_change_is_rebased_on_the_monolith_as_it_is_now() {
    use crate::event::{EventData, Op};
    let services = shipped();
    let customers = services.iter().find(|s| s.service() == "customers_db").unwrap();
    let reverse = customers.reverse_for("customers").unwrap();
    let monolith = bson::doc! { "_id": 1, "user_id": "U1", "name": "Ann", "tier": "gold", "ltv": "10.00" };
    let image = reverse.image(&monolith).unwrap().unwrap();
    // The service renamed her when the monolith still said tier basic; the monolith has since
    // moved her to gold.
    let mut stale = image.clone();
    stale.insert("displayName", "Anne");
    stale.get_document_mut("segmentation").unwrap().insert("tier", "basic");
    let change = |op, changed: Option<Document>, before: Option<Document>, after: Option<Document>| EventData {
        op,
        collection: "customers".into(),
        key: Bson::String("U1".into()),
        document_id: Bson::String("U1".into()),
        after,
        before,
        changed,
        removed: Vec::new(),
        truncated: Vec::new(),
        derived: None,
    };
    let update = change(Op::Update, Some(bson::doc! { "displayName": "Anne" }), None, Some(stale.clone()));
    let patch = reverse.put(Some(&monolith), &reverse.rebase(Some(&monolith), &update).unwrap()).unwrap();
    assert_eq!(patch.to_update(), bson::doc! { "$set": { "name": "Anne" } }, "the tier stays gold");
    // Read after a delete: no document after, the update still says what it changed.
    let gone = change(Op::Update, Some(bson::doc! { "displayName": "Anne" }), None, None);
    assert_eq!(reverse.rebase(Some(&monolith), &gone).unwrap().get_str("displayName").unwrap(), "Anne");
    assert_eq!(reverse.rebase(None, &gone), None, "nothing to say about a document neither side has");
    // A replace: what changed against its pre-image.
    let mut before = stale.clone();
    before.insert("displayName", "Ann");
    let replace = change(Op::Replace, None, Some(before), Some(stale.clone()));
    let patch = reverse.put(Some(&monolith), &reverse.rebase(Some(&monolith), &replace).unwrap()).unwrap();
    assert_eq!(patch.to_update(), bson::doc! { "$set": { "name": "Anne" } });
    // Without a pre-image, or with no monolith document, the whole document speaks.
    let blind = change(Op::Replace, None, None, Some(stale.clone()));
    assert_eq!(reverse.rebase(Some(&monolith), &blind), Some(stale.clone()));
    assert_eq!(reverse.rebase(None, &update), Some(stale));
}

/// A service change inside an array is merged into the monolith's array by element id, never
/// laid by index: the monolith's own code may have pushed or removed elements meanwhile.
#[test]
fn a_service_change_inside_an_array_is_rebased_by_element_id() {
    use crate::event::{EventData, Op, Truncation};
    let services = shipped();
    let customers = services.iter().find(|s| s.service() == "customers_db").unwrap();
    let reverse = customers.reverse_for("customers").unwrap();
    assert_eq!(reverse.array_keys(), [("purchaseHistory".to_string(), Some("purchaseId".to_string()))]);
    // A monolith purchase, with a field no transform reads (it must stay with its element).
    let buy = |id: &str, status: &str| bson::bson!({ "id": id, "product_id": "SKU", "amount": "10.00", "status": status, "gateway": format!("gw-{id}") });
    let customer =
        |purchases: Vec<Bson>| bson::doc! { "_id": 1, "user_id": "U1", "name": "Ann", "purchases": purchases };
    let statuses = |patch: &Patch| -> Vec<(String, String)> {
        patch
            .set
            .get_array("purchases")
            .unwrap()
            .iter()
            .map(|p| {
                let p = p.as_document().unwrap();
                (p.get_str("id").unwrap().to_string(), p.get_str("status").unwrap().to_string())
            })
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
    // What the service held: the image of the monolith when it had P0, P1, P2.
    let before =
        reverse.image(&customer(vec![buy("P0", "paid"), buy("P1", "paid"), buy("P2", "paid")])).unwrap().unwrap();
    let element = |i: usize| before.get_array("purchaseHistory").unwrap()[i].clone();
    let update = |changed: Document, truncated: Vec<Truncation>, before: Option<&Document>| {
        let mut data = EventData {
            op: Op::Update,
            collection: "customers".into(),
            key: Bson::String("U1".into()),
            document_id: Bson::String("U1".into()),
            after: None,
            before: before.cloned(),
            changed: Some(changed),
            removed: Vec::new(),
            truncated,
            derived: None,
        };
        data.after = data.before.as_ref().map(|b| data.update_applied_to(b).unwrap().unwrap());
        data
    };
    // Meanwhile the monolith's own code dropped P0 and pushed P3.
    let now = customer(vec![buy("P1", "paid"), buy("P2", "paid"), buy("P3", "paid")]);

    // The service refunds its element 1, P1: by index that is P2 in the monolith now.
    let refund = update(bson::doc! { "purchaseHistory.1.status": "refunded" }, vec![], Some(&before));
    let rebased = reverse.rebase_merged(Some(&now), &refund);
    assert!(rebased.conflicts.is_empty(), "{:?}", rebased.conflicts);
    let patch = reverse.put(Some(&now), &rebased.document.unwrap()).unwrap();
    assert_eq!(statuses(&patch), pairs(&[("P1", "refunded"), ("P2", "paid"), ("P3", "paid")]));
    let kept: Vec<&str> = patch
        .set
        .get_array("purchases")
        .unwrap()
        .iter()
        .map(|p| p.as_document().unwrap().get_str("gateway").unwrap())
        .collect();
    assert_eq!(kept, ["gw-P1", "gw-P2", "gw-P3"], "each element keeps the fields no transform reads");

    // The service pushes P9 (its element 3) onto the array the monolith shortened: no hole, no
    // dead letter, P9 after P2.
    let mut p9 = element(2);
    p9.as_document_mut().unwrap().insert("purchaseId", "P9");
    let push = update(bson::doc! { "purchaseHistory.3": p9 }, vec![], Some(&before));
    let patch = reverse.put(Some(&now), &reverse.rebase(Some(&now), &push).unwrap()).unwrap();
    assert_eq!(statuses(&patch), pairs(&[("P1", "paid"), ("P2", "paid"), ("P9", "paid"), ("P3", "paid")]));

    // A pipeline update on the service drops P0: the elements left move down, the array is cut.
    // On the monolith as the service saw it, exactly P1 and P2 remain.
    let was = customer(vec![buy("P0", "paid"), buy("P1", "paid"), buy("P2", "paid")]);
    let cut = update(
        bson::doc! { "purchaseHistory.0": element(1), "purchaseHistory.1": element(2) },
        vec![Truncation { field: "purchaseHistory".into(), new_size: 2 }],
        Some(&before),
    );
    let patch = reverse.put(Some(&was), &reverse.rebase(Some(&was), &cut).unwrap()).unwrap();
    assert_eq!(statuses(&patch), pairs(&[("P1", "paid"), ("P2", "paid")]));
    // Cut on the monolith as it is now: P0 is gone already, P3 (the monolith's) stays.
    let patch = reverse.put(Some(&now), &reverse.rebase(Some(&now), &cut).unwrap()).unwrap();
    assert!(patch.is_empty(), "nothing left to write: {patch:?}");

    // Both sides changed P1: the service's value stands (it owns the document) and the pair is
    // reported.
    let disputed = customer(vec![buy("P1", "disputed"), buy("P2", "paid")]);
    let rebased = reverse.rebase_merged(Some(&disputed), &refund);
    assert_eq!(rebased.conflicts.len(), 1);
    let (path, c) = &rebased.conflicts[0];
    assert_eq!((path.as_str(), c.id.clone()), ("purchaseHistory", Some(Bson::String("P1".into()))));
    let status = |v: &Option<Bson>| {
        v.as_ref().and_then(|v| v.as_document()).and_then(|d| d.get_str("status").ok()).map(str::to_string)
    };
    assert_eq!(
        (status(&c.base), status(&c.theirs), status(&c.current)),
        (Some("paid".into()), Some("refunded".into()), Some("disputed".into()))
    );
    let patch = reverse.put(Some(&disputed), &rebased.document.unwrap()).unwrap();
    assert_eq!(statuses(&patch), pairs(&[("P1", "refunded"), ("P2", "paid")]));

    // Without a pre-image the array is taken whole from the document after the change.
    let mut blind = refund.clone();
    blind.before = None;
    let after = blind.after.clone().unwrap();
    assert_eq!(
        reverse.rebase(Some(&now), &blind).unwrap().get_array("purchaseHistory").unwrap(),
        after.get_array("purchaseHistory").unwrap()
    );
    // With neither, the paths are laid as they are.
    blind.after = None;
    let laid = reverse.rebase(Some(&now), &blind).unwrap();
    assert_eq!(
        laid.get_array("purchaseHistory").unwrap()[1].as_document().unwrap().get_str("status").unwrap(),
        "refunded"
    );
}
