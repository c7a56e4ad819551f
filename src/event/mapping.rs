//! Change → canonical events: the tailer's pure core.
//!
//! [`ChangeRecord`] is ficus's own owned copy of one change (a change-stream event or a document
//! read by the snapshot), free of driver types; [`map_change`] turns it into the canonical events
//! its topic definition declares: the change event itself and any semantic events derived from
//! arrays that grew. No I/O happens here, so every rule is tested with plain fixtures.

use bson::{Bson, DateTime, Document, Timestamp};

use super::update;
use super::{
    CanonicalEvent, Derived, EventData, Op, Origin, Position, SCHEMA_VERSION, Truncation, content_id, render_key,
};
use crate::config::topics::{DerivedRule, TopicDef};

/// One change in the source, owned and driver-independent.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    pub op: Op,
    pub collection: String,
    pub document_id: Bson,
    pub after: Option<Document>,
    pub before: Option<Document>,
    pub changed: Option<Document>,
    pub removed: Vec<String>,
    /// The arrays an update shortened (`truncatedArrays`), see [`super::update`].
    pub truncated: Vec<Truncation>,
    pub cluster_time: Timestamp,
    /// The index among events sharing `cluster_time` (see [`Position`]).
    pub index: u32,
    pub wall_time: Option<DateTime>,
    pub resume_token: Option<String>,
    /// The multi-document transaction the change was part of, if any.
    pub txn: Option<TxnId>,
    /// Set when ficus's own write caused the change (see [`super::Origin`]).
    pub origin: Option<Origin>,
}

/// A multi-document transaction: its session and number (`lsid`, `txnNumber`). Every change of
/// one transaction carries the same; cluster times may differ (secantusd-rs gives each its own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxnId {
    /// The session id, as canonical Extended JSON.
    pub lsid: String,
    pub number: i64,
}

impl ChangeRecord {
    /// A document as a snapshot copies it: an `Op::Snapshot` change at `cluster_time`, index 0.
    pub fn snapshot(collection: &str, doc: Document, cluster_time: Timestamp) -> ChangeRecord {
        ChangeRecord {
            op: Op::Snapshot,
            collection: collection.to_string(),
            document_id: doc.get("_id").cloned().unwrap_or(Bson::Null),
            after: Some(doc),
            before: None,
            changed: None,
            removed: Vec::new(),
            truncated: Vec::new(),
            cluster_time,
            index: 0,
            wall_time: None,
            resume_token: None,
            txn: None,
            origin: None,
        }
    }
}

/// What mapping one change produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub events: Vec<CanonicalEvent>,
    /// Set when the aggregate key could not be found and the document `_id` keyed the events
    /// instead (a delete without a pre-image on a collection keyed by another field, or a
    /// document lacking its key field). The tailer logs and counts it; nothing is dropped.
    pub key_fallback: Option<String>,
}

/// Reads a dotted path (`stats.msgs`, `purchases.2.id`) from a document.
pub fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut cur = doc.get(parts.next()?)?;
    for part in parts {
        cur = match cur {
            Bson::Document(d) => d.get(part)?,
            Bson::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Maps one change through its topic definition.
pub fn map_change(def: &TopicDef, source_name: &str, rec: ChangeRecord) -> Mapped {
    let derived: Vec<(&DerivedRule, Vec<Grown>)> =
        def.derived.iter().map(|rule| (rule, grown_elements(rule, &rec))).collect();
    let (base, key_fallback) = change_event(def, source_name, rec);
    let discriminator = discriminator(&base.data);

    let mut events = Vec::with_capacity(1 + derived.iter().map(|d| d.1.len()).sum::<usize>());
    // A derived event carries its element, not the document again: `data.key` names the
    // aggregate, and consumers that want the document read the change event beside it. (With
    // the document, a customer with three purchases cost Kafka four copies of the customer,
    // and a 400-message conversation 401 copies of 64 KB.)
    let bare = if derived.iter().any(|(_, e)| !e.is_empty()) { Some(base.without_images()) } else { None };
    for (rule, elements) in derived {
        for (n, (index, element)) in elements.into_iter().enumerate() {
            let Some(bare) = &bare else { break };
            let mut ev = bare.clone();
            let which = index.map_or_else(|| format!("n{n}"), |i| i.to_string());
            ev.event_type = rule.event_type.clone();
            ev.data.derived = Some(Derived { field: rule.array_field.clone(), index, element });
            ev.id = content_id(source_name, &ev, &format!("{discriminator}derived:{}:{which}", rule.event_type));
            events.push(ev);
        }
    }
    events.insert(0, base);
    Mapped { events, key_fallback }
}

/// The change event of one change alone (no derived events), and the aggregate key's
/// fallback as [`Mapped::key_fallback`] says.
pub fn change_event(def: &TopicDef, source_name: &str, rec: ChangeRecord) -> (CanonicalEvent, Option<String>) {
    let (key, key_fallback) = aggregate_key(def, &rec);
    let position =
        Position { cluster_time: rec.cluster_time, index: rec.index, resume_token: rec.resume_token.clone() };
    let source = format!("ficus://{source_name}/{}", rec.collection);
    let time = rec.wall_time.unwrap_or_else(|| DateTime::from_millis(i64::from(rec.cluster_time.time) * 1000));
    let subject = render_key(&key);
    let data = EventData {
        op: rec.op,
        collection: rec.collection,
        key,
        document_id: rec.document_id,
        after: rec.after,
        before: rec.before,
        changed: rec.changed,
        removed: rec.removed,
        truncated: rec.truncated,
        derived: None,
    };
    let discriminator = discriminator(&data);
    let mut event = CanonicalEvent {
        id: String::new(),
        source,
        event_type: def.event_type(rec.op).to_string(),
        subject,
        time,
        position,
        schema_version: SCHEMA_VERSION,
        data,
        origin: rec.origin,
    };
    event.id = content_id(source_name, &event, &discriminator);
    (event, key_fallback)
}

/// Snapshot events of one snapshot share a position; the document id tells them apart.
fn discriminator(data: &EventData) -> String {
    match data.op {
        Op::Snapshot => format!("snapshot:{}", render_key(&data.document_id)),
        _ => String::new(),
    }
}

fn aggregate_key(def: &TopicDef, rec: &ChangeRecord) -> (Bson, Option<String>) {
    if def.key == "_id" {
        return (rec.document_id.clone(), None);
    }
    let found = rec
        .after
        .as_ref()
        .and_then(|d| get_path(d, &def.key))
        .or_else(|| rec.before.as_ref().and_then(|d| get_path(d, &def.key)));
    match found {
        Some(k) if !matches!(k, Bson::Null | Bson::Undefined) => (k.clone(), None),
        _ => {
            let why = if rec.after.is_none() && rec.before.is_none() {
                format!(
                    "{} of {}.{} has no pre-image, so its key `{}` is unknown; enable pre-images (ficus topics apply)",
                    rec.op,
                    rec.collection,
                    render_key(&rec.document_id),
                    def.key
                )
            } else {
                format!("document {}.{} has no key field `{}`", rec.collection, render_key(&rec.document_id), def.key)
            };
            (rec.document_id.clone(), Some(why))
        }
    }
}

/// An element that appeared in an array, with its index where known.
type Grown = (Option<u32>, Bson);

/// The elements that appeared in the rule's array, with their index where known.
///
/// Inserts and snapshot copies report every element. An update is judged by its update
/// description alone, which is exact for that change (the after-state of an update is looked up
/// later and may already hold newer changes): `purchases.3` set means element 3 appeared, unless
/// the before-state's array already held that element (an update that shrinks an array, which
/// MongoDB reports as `truncatedArrays`, sets the elements that move down again: they are not
/// new); the whole array set is diffed against the before-state (a multiset difference), or,
/// with no before-state, reported whole. Changes inside an element (`purchases.3.status`) and a
/// cut alone grow nothing. A replace diffs its new document against the before-state, or reports
/// every element. Reporting an element twice is harmless: consumers key derived targets by the
/// element's own id.
fn grown_elements(rule: &DerivedRule, rec: &ChangeRecord) -> Vec<Grown> {
    let array = |d: Option<&Document>| match d.and_then(|d| get_path(d, &rule.array_field)) {
        Some(Bson::Array(a)) => Some(a.clone()),
        _ => None,
    };
    let indexed = |a: Vec<Bson>| a.into_iter().enumerate().map(|(i, e)| (Some(i as u32), e)).collect::<Vec<_>>();
    match rec.op {
        Op::Delete => Vec::new(),
        Op::Snapshot | Op::Insert => array(rec.after.as_ref()).map(indexed).unwrap_or_default(),
        Op::Replace => match (array(rec.after.as_ref()), rec.before.as_ref()) {
            (Some(after), Some(_)) => diff(after, array(rec.before.as_ref()).unwrap_or_default()),
            (Some(after), None) => indexed(after),
            (None, _) => Vec::new(),
        },
        Op::Update => {
            let Some(changed) = rec.changed.as_ref() else { return Vec::new() };
            let prefix = format!("{}.", rule.array_field);
            let mut set = Vec::new();
            for (path, value) in changed {
                if path == &rule.array_field {
                    let Bson::Array(after) = value else { return Vec::new() };
                    return match array(rec.before.as_ref()) {
                        Some(before) => diff(after.clone(), before),
                        None => indexed(after.clone()),
                    };
                }
                if let Some(i) = path.strip_prefix(&prefix).and_then(update::index).and_then(|i| u32::try_from(i).ok())
                {
                    set.push((Some(i), value.clone()));
                }
            }
            let Some(mut before) = array(rec.before.as_ref()) else { return set };
            // Each element of the before-state accounts for one equal element set (a multiset).
            set.retain(|(_, e)| match before.iter().position(|o| o == e) {
                Some(pos) => {
                    before.swap_remove(pos);
                    false
                }
                None => true,
            });
            set
        }
    }
}

/// Elements of `after` not matched by an equal element of `before` (a multiset difference).
fn diff(after: Vec<Bson>, mut before: Vec<Bson>) -> Vec<Grown> {
    let mut out = Vec::new();
    for (i, e) in after.into_iter().enumerate() {
        if let Some(pos) = before.iter().position(|o| *o == e) {
            before.swap_remove(pos);
        } else {
            out.push((Some(i as u32), e));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::topics::Topics;
    use bson::{doc, oid::ObjectId};
    use std::path::Path;

    fn topics() -> Topics {
        crate::config::topics::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/topics"))).unwrap()
    }

    fn rec(op: Op, coll: &str, after: Option<Document>) -> ChangeRecord {
        ChangeRecord {
            op,
            collection: coll.into(),
            document_id: Bson::ObjectId(ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap()),
            after,
            before: None,
            changed: None,
            removed: vec![],
            truncated: vec![],
            cluster_time: Timestamp { time: 100, increment: 1 },
            index: 1,
            wall_time: None,
            resume_token: Some("T1".into()),
            txn: None,
            origin: None,
        }
    }

    fn purchase(id: &str) -> Document {
        doc! { "id": id, "product_id": "SKU1", "amount": "10.00" }
    }

    #[test]
    fn insert_becomes_created_keyed_by_the_aggregate_field() {
        let t = topics();
        let def = t.for_collection("customers").unwrap();
        let out = map_change(
            def,
            "linechatbot",
            rec(Op::Insert, "customers", Some(doc! { "user_id": "U1", "purchases": [] })),
        );
        assert_eq!(out.key_fallback, None);
        assert_eq!(out.events.len(), 1);
        let ev = &out.events[0];
        assert_eq!(ev.event_type, "customer.created");
        assert_eq!(ev.subject, "U1");
        assert_eq!(ev.source, "ficus://linechatbot/customers");
        assert_eq!(ev.position.sequence(), "000000010000000000010000000001");
        assert_eq!(ev.time, DateTime::from_millis(100_000));
    }

    #[test]
    fn push_derives_one_event_per_new_element() {
        let t = topics();
        let def = t.for_collection("customers").unwrap();
        let mut r = rec(
            Op::Update,
            "customers",
            Some(doc! { "user_id": "U1", "purchases": [purchase("P1"), purchase("P2"), purchase("P3")] }),
        );
        r.changed = Some(doc! { "purchases.2": purchase("P3"), "updated_at": DateTime::from_millis(1) });
        let out = map_change(def, "linechatbot", r);
        let types: Vec<_> = out.events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["customer.updated", "customer.purchase_recorded"]);
        let d = out.events[1].data.derived.as_ref().unwrap();
        assert_eq!(d.index, Some(2));
        assert_eq!(d.element, Bson::Document(purchase("P3")));
        assert_ne!(out.events[0].id, out.events[1].id);
        assert_eq!(out.events[1].subject, "U1");
    }

    #[test]
    fn an_update_is_judged_by_its_description_not_the_looked_up_state() {
        // updateLookup returns the document as it is now, possibly after a later $push; the
        // update itself ($set tier) grew nothing.
        let t = topics();
        let def = t.for_collection("customers").unwrap();
        let mut r = rec(Op::Update, "customers", Some(doc! { "user_id": "U1", "purchases": [purchase("P1")] }));
        r.before = Some(doc! { "user_id": "U1", "purchases": [] });
        r.changed = Some(doc! { "tier": "vip" });
        assert_eq!(map_change(def, "s", r.clone()).events.len(), 1);
        // The same shape from a whole-array $push (as some servers report it) is diffed exactly.
        r.changed = Some(doc! { "purchases": [purchase("P1")] });
        let out = map_change(def, "s", r);
        assert_eq!(out.events.len(), 2);
        assert_eq!(out.events[1].data.derived.as_ref().unwrap().index, Some(0));
    }

    #[test]
    fn nested_update_of_an_element_is_not_growth() {
        let t = topics();
        let def = t.for_collection("customers").unwrap();
        let mut r = rec(Op::Update, "customers", Some(doc! { "user_id": "U1", "purchases": [purchase("P1")] }));
        r.changed = Some(doc! { "purchases.0.status": "refunded" });
        assert_eq!(map_change(def, "s", r).events.len(), 1);
    }

    #[test]
    fn an_array_that_shrank_grew_nothing_though_its_elements_moved_down() {
        // A pipeline update dropped P1 of three purchases: MongoDB reports the two left, set again
        // at their new indexes, and the cut. With the before-state, nothing appeared.
        let t = topics();
        let def = t.for_collection("customers").unwrap();
        let three = doc! { "user_id": "U1", "purchases": [purchase("P1"), purchase("P2"), purchase("P3")] };
        let mut r =
            rec(Op::Update, "customers", Some(doc! { "user_id": "U1", "purchases": [purchase("P2"), purchase("P3")] }));
        r.before = Some(three.clone());
        r.changed = Some(doc! { "purchases.0": purchase("P2"), "purchases.1": purchase("P3") });
        r.truncated = vec![Truncation { field: "purchases".into(), new_size: 2 }];
        let out = map_change(def, "s", r.clone());
        assert_eq!(out.events.len(), 1, "no purchase_recorded for elements that only moved");
        assert_eq!(out.events[0].data.truncated, r.truncated, "the cut travels with the change event");
        // The same update also putting a new purchase in the freed slot: that one appeared.
        r.changed = Some(doc! { "purchases.0": purchase("P2"), "purchases.1": purchase("P9") });
        let out = map_change(def, "s", r.clone());
        let grown: Vec<_> = out.events[1..].iter().map(|e| e.data.derived.clone().unwrap()).collect();
        assert_eq!(
            grown,
            [Derived { field: "purchases".into(), index: Some(1), element: Bson::Document(purchase("P9")) }]
        );
        // A cut alone grows nothing.
        r.changed = Some(doc! {});
        assert_eq!(map_change(def, "s", r.clone()).events.len(), 1);
        // Without the before-state the elements set are reported (consumers key them by id).
        r.before = None;
        r.changed = Some(doc! { "purchases.0": purchase("P2"), "purchases.1": purchase("P3") });
        assert_eq!(map_change(def, "s", r).events.len(), 3);
    }

    #[test]
    fn before_state_gives_an_exact_diff() {
        let t = topics();
        let def = t.for_collection("customers").unwrap();
        let mut r = rec(
            Op::Replace,
            "customers",
            Some(doc! { "user_id": "U1", "purchases": [purchase("P0"), purchase("P1"), purchase("P2")] }),
        );
        r.before = Some(doc! { "user_id": "U1", "purchases": [purchase("P1"), purchase("P2")] });
        let out = map_change(def, "s", r);
        assert_eq!(out.events.len(), 2);
        assert_eq!(out.events[1].data.derived.as_ref().unwrap().index, Some(0));
    }

    #[test]
    fn snapshot_reports_every_element_and_distinct_ids() {
        let t = topics();
        let def = t.for_collection("conversations").unwrap();
        let mut r = rec(Op::Snapshot, "conversations", Some(doc! { "messages": [{ "id": "m1" }, { "id": "m2" }] }));
        r.index = 0;
        r.resume_token = None;
        let a = map_change(def, "s", r.clone());
        assert_eq!(a.events[0].event_type, "conversation.snapshot");
        assert_eq!(a.events.len(), 3);
        r.document_id = Bson::Int32(7);
        let b = map_change(def, "s", r);
        assert_ne!(a.events[0].id, b.events[0].id, "snapshot events of one snapshot differ by document");
        assert_eq!(b.events[0].subject, "7");
    }

    #[test]
    fn delete_is_keyed_from_the_pre_image() {
        let t = topics();
        let def = t.for_collection("customers").unwrap();
        let mut r = rec(Op::Delete, "customers", None);
        r.before = Some(doc! { "user_id": "U9", "purchases": [purchase("P1")] });
        let out = map_change(def, "s", r);
        assert_eq!(out.events.len(), 1, "a delete derives nothing");
        assert_eq!(out.events[0].event_type, "customer.deleted");
        assert_eq!(out.events[0].subject, "U9");
        assert_eq!(out.key_fallback, None);
    }

    #[test]
    fn missing_key_falls_back_to_the_id_and_says_why() {
        let t = topics();
        let def = t.for_collection("customers").unwrap();
        let out = map_change(def, "s", rec(Op::Delete, "customers", None));
        assert_eq!(out.events[0].subject, "65a1b2c3d4e5f60718293a4b");
        assert!(out.key_fallback.unwrap().contains("pre-image"));
    }

    #[test]
    fn same_change_same_ids() {
        let t = topics();
        let def = t.for_collection("products").unwrap();
        let r = rec(Op::Insert, "products", Some(doc! { "sku": "S1" }));
        assert_eq!(map_change(def, "s", r.clone()), map_change(def, "s", r));
    }

    /// The cause of one id carrying two contents (issue 19): an update's `after` is looked up
    /// when the change is read (`fullDocument: updateLookup`), so the same change read again
    /// after a restart carries the document as it is then; a snapshot copy read again after a
    /// restart mid-copy carries the document as it is then; and the key of an update whose
    /// document has gone since comes from elsewhere, moving its derived events too. Each must
    /// get a new id, and an identical read the same one.
    #[test]
    fn a_change_read_again_with_other_content_gets_another_id() {
        let t = topics();
        let customers = t.for_collection("customers").unwrap();
        let mut first = rec(
            Op::Update,
            "customers",
            Some(doc! { "user_id": "U1", "tier": "gold", "purchases": [purchase("P1"), purchase("P2")] }),
        );
        first.changed = Some(doc! { "purchases.1": purchase("P2") });
        // The same change, its document looked up later, after a further `$set`.
        let mut later = first.clone();
        later.after = Some(doc! { "user_id": "U1", "tier": "vip", "purchases": [purchase("P1"), purchase("P2")] });
        let (a, b) = (map_change(customers, "s", first.clone()), map_change(customers, "s", later));
        assert_eq!(a.events.len(), 2);
        assert_ne!(a.events[0].id, b.events[0].id, "the change event's content differs");
        assert_eq!(a.events[1].id, map_change(customers, "s", first.clone()).events[1].id);
        // Looked up once the document was gone: no `after`, so the key falls back to `_id`
        // (no pre-image), which moves the derived event's subject and key.
        let mut gone = first.clone();
        gone.after = None;
        let c = map_change(customers, "s", gone);
        assert_ne!(c.events[1].subject, a.events[1].subject);
        assert_ne!(c.events[1].id, a.events[1].id, "the derived event's content differs");
        // Identical reads, identical ids, for every event.
        let ids = |m: &Mapped| m.events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&map_change(customers, "s", first)));

        // A snapshot copy made again after a restart mid-copy reads the document as it is then.
        let products = t.for_collection("products").unwrap();
        let copy = |views: i32| {
            let mut r = rec(Op::Snapshot, "products", Some(doc! { "sku": "S1", "views": views }));
            r.index = 0;
            r.resume_token = None;
            map_change(products, "s", r).events.remove(0)
        };
        assert_eq!(copy(1).id, copy(1).id);
        assert_ne!(copy(1).id, copy(2).id);
    }

    #[test]
    fn paths_reach_into_documents_and_arrays() {
        let d = doc! { "a": { "b": [10, { "c": "x" }] } };
        assert_eq!(get_path(&d, "a.b.1.c"), Some(&Bson::String("x".into())));
        assert_eq!(get_path(&d, "a.b.0"), Some(&Bson::Int32(10)));
        assert_eq!(get_path(&d, "a.z"), None);
    }
}
