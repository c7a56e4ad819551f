//! Tests of the reverse: the shipped transforms against their reverse fixtures
//! (`transforms/<service>/fixtures/reverse/*.json`), the laws on reference documents, the
//! shipped classification and load-time checks of `[reverse]`; the semantics of `put` are in
//! `put_tests`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use bson::{Bson, Document};
use serde_json::Value;

use crate::event::{from_ejson, to_ejson};
use crate::transform::tests::diff;
use crate::transform::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(super) fn shipped_topics() -> Topics {
    crate::config::topics::load(&repo().join("topics")).unwrap_or_else(|r| panic!("{r}"))
}

pub(super) fn shipped() -> Vec<ServiceTransforms> {
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
            unset_path(&mut wanted, f);
            unset_path(&mut back, f);
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
            // The cache service's entries live in Redis: forward only, never written back.
            "cache.ai_responses kind derived",
            "cache.ai_responses key derived",
            "cache.ai_responses sessionId derived",
            "cache.ai_responses lineUserId derived",
            "cache.ai_responses provider derived",
            "cache.ai_responses prompt derived",
            "cache.ai_responses response derived",
            "cache.ai_responses tokensUsed derived",
            "cache.ai_responses confidence derived",
            "cache.ai_responses expiresAt derived",
            "cache.ai_responses createdAt derived",
            "cache.research kind derived",
            "cache.research key derived",
            "cache.research query derived",
            "cache.research language derived",
            "cache.research expiresAt derived",
            "cache.research results derived",
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

pub(super) fn service(files: &[(&str, &str)]) -> ServiceTransforms {
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
