//! Tests of the reverse: the shipped transforms against their reverse fixtures
//! (`transforms/<service>/fixtures/reverse/*.json`), the laws on reference documents, the
//! shipped classification, load-time checks of `[reverse]`, and the semantics of `put`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use bson::{Bson, Document};
use serde_json::Value;

use super::tests::diff;
use super::*;
use crate::event::{from_ejson, to_ejson};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shipped_topics() -> Topics {
    crate::topics::load(&repo().join("topics")).unwrap_or_else(|r| panic!("{r}"))
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
    let mut w = crate::workload::Workload::new(11);
    let mut docs = Vec::new();
    for c in crate::workload::Workload::COLLECTIONS {
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
