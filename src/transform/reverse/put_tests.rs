//! Tests of `put` and the law check on small inline definitions: rules, read-only fields,
//! inserts, array alignment, locating documents, patch semantics and rebasing.

use bson::{Bson, Document, doc};

use super::tests::{service, shipped, shipped_topics};
use crate::transform::*;

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
    use crate::transform::builtins::{camel_case, snake_case};
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
