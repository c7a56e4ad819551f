//! The fields a service collection's transforms write, and a service document cut down to them
//! (pure).
//!
//! A service database is the transforms' output plus whatever the service keeps on its own: its
//! application may give an owned customer a `nickname` no transform writes. Those fields are the
//! service's, so `verify` (and with it the safe cutover's verify step) compares a service
//! document with its expectation only over the fields ficus writes, and lists the others as
//! *service-only fields*. The field tree comes from the compiled transform, the one definition
//! of what ficus writes, never from a second reading of the files:
//!
//! - a field computed as one value (a path, an expression, a sub-document or an array taken
//!   whole) is ficus's whole: a field the service adds inside it is a difference;
//! - a dotted target path (`profile.language`) makes `profile` a sub-document of which ficus
//!   writes `language` only;
//! - an array built with `each` is ficus's (its length and order), and of each element ficus
//!   writes the element's declared fields only;
//! - a rollup's group document is ficus's whole (a count and distinct values over many members:
//!   nobody else writes it);
//! - a target built from array elements is a document target like any other: its declared
//!   fields;
//! - `_id` and ficus's metadata (`_ficus`) are kept, as a document's identity and bookkeeping.

use std::collections::{BTreeMap, BTreeSet};

use bson::{Bson, Document};

use super::model::{Fields, Shape, Target, Transform};

/// What ficus writes at one place of a service document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldTree {
    /// The whole value.
    Whole,
    /// A sub-document of which ficus writes these fields.
    Object(BTreeMap<String, FieldTree>),
    /// An array built element by element: ficus writes the array and, in each element, these
    /// fields.
    Each(BTreeMap<String, FieldTree>),
}

/// A service document cut down to the fields its transforms write.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Projection {
    /// The document with only the fields ficus writes (and `_id`, `_ficus`).
    pub document: Document,
    /// The paths of the fields left out, the service's own: dotted, with `[]` for "in an
    /// element of" (`purchaseHistory[].giftNote`).
    pub service_only: BTreeSet<String>,
}

/// Fields kept at the top of every document: its identity and ficus's bookkeeping.
const KEPT: [&str; 2] = ["_id", "_ficus"];

impl FieldTree {
    /// The tree a compiled transform writes.
    pub(super) fn of(t: &Transform) -> FieldTree {
        match &t.target {
            Target::Document { fields, .. } => FieldTree::Object(tree(fields)),
            Target::Rollup(_) => FieldTree::Whole,
        }
    }

    /// What several transforms writing one collection write together. Two shapes that do not
    /// agree (an object in one, an array of elements in the other) fall back to the whole value.
    pub fn union(self, other: FieldTree) -> FieldTree {
        match (self, other) {
            (FieldTree::Object(a), FieldTree::Object(b)) => FieldTree::Object(union_fields(a, b)),
            (FieldTree::Each(a), FieldTree::Each(b)) => FieldTree::Each(union_fields(a, b)),
            _ => FieldTree::Whole,
        }
    }

    /// Whether ficus writes the field at `path` (dotted, `[]` for "in every element of":
    /// `purchaseHistory[].productId`): everything inside a value written whole is.
    pub fn writes(&self, path: &str) -> bool {
        let steps: Vec<&str> = path.split('.').map(|s| s.trim_end_matches("[]")).collect();
        self.writes_steps(&steps)
    }

    fn writes_steps(&self, steps: &[&str]) -> bool {
        let fields = match self {
            FieldTree::Whole => return true,
            FieldTree::Object(f) | FieldTree::Each(f) => f,
        };
        if steps.is_empty() {
            return true;
        }
        // A field may be declared dotted at this level (`"profile.language"`): try each prefix.
        (1..=steps.len()).any(|n| fields.get(&steps[..n].join(".")).is_some_and(|sub| sub.writes_steps(&steps[n..])))
    }

    /// `doc` cut down to this tree, and the paths of what was left out.
    pub fn project(&self, doc: &Document) -> Projection {
        let mut service_only = BTreeSet::new();
        let document = match self {
            FieldTree::Object(fields) => object(fields, doc, "", &mut service_only),
            FieldTree::Whole | FieldTree::Each(_) => doc.clone(),
        };
        Projection { document, service_only }
    }
}

fn tree(fields: &Fields) -> BTreeMap<String, FieldTree> {
    fields
        .iter()
        .map(|(name, shape)| {
            let sub = match shape {
                Shape::Value(_) => FieldTree::Whole,
                Shape::Object(inner) => FieldTree::Object(tree(inner)),
                Shape::Each { fields, .. } => FieldTree::Each(tree(fields)),
            };
            (name.clone(), sub)
        })
        .collect()
}

fn union_fields(mut a: BTreeMap<String, FieldTree>, b: BTreeMap<String, FieldTree>) -> BTreeMap<String, FieldTree> {
    for (name, sub) in b {
        let merged = match a.remove(&name) {
            Some(mine) => mine.union(sub),
            None => sub,
        };
        a.insert(name, merged);
    }
    a
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() { key.to_string() } else { format!("{at}.{key}") }
}

/// The fields of `doc` the tree names, projected in turn; the others' paths go to `out`.
fn object(fields: &BTreeMap<String, FieldTree>, doc: &Document, at: &str, out: &mut BTreeSet<String>) -> Document {
    let mut kept = Document::new();
    for (key, value) in doc {
        let path = join(at, key);
        match fields.get(key) {
            Some(sub) => {
                if let Some(v) = value_of(sub, value, &path, out) {
                    kept.insert(key.clone(), v);
                }
            }
            None if at.is_empty() && KEPT.contains(&key.as_str()) => {
                kept.insert(key.clone(), value.clone());
            }
            None => {
                out.insert(path);
            }
        }
    }
    kept
}

/// One value projected to its tree; `None` for a sub-document that held only the service's
/// fields (ficus never writes an empty sub-document: it leaves the field out).
fn value_of(tree: &FieldTree, value: &Bson, path: &str, out: &mut BTreeSet<String>) -> Option<Bson> {
    match (tree, value) {
        (FieldTree::Object(fields), Bson::Document(d)) => {
            let kept = object(fields, d, path, out);
            (d.is_empty() || !kept.is_empty()).then_some(Bson::Document(kept))
        }
        (FieldTree::Each(fields), Bson::Array(items)) => {
            let at = format!("{path}[]");
            let items = items
                .iter()
                .map(|item| match item {
                    // An element keeps its place even when it held only the service's fields:
                    // ficus writes every element, an empty one included.
                    Bson::Document(element) => Bson::Document(object(fields, element, &at, out)),
                    other => other.clone(),
                })
                .collect();
            Some(Bson::Array(items))
        }
        // The whole value, or a shape ficus would not have written (compared as it is, so it
        // differs).
        _ => Some(value.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bson::doc;

    use super::*;
    use crate::transform::{ServiceTransforms, load_all, load_service};

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn topics() -> crate::config::topics::Topics {
        crate::config::topics::load(&repo().join("topics")).unwrap_or_else(|r| panic!("{r}"))
    }

    fn shipped(service: &str) -> ServiceTransforms {
        let all = load_all(&repo().join("transforms"), &topics()).unwrap_or_else(|r| panic!("{r}"));
        all.into_iter().find(|s| s.service() == service).unwrap()
    }

    fn tree(service: &ServiceTransforms, collection: &str) -> FieldTree {
        service.written_fields(collection).unwrap_or_else(|| panic!("{collection} is not written"))
    }

    fn paths(p: &Projection) -> Vec<&str> {
        p.service_only.iter().map(String::as_str).collect()
    }

    #[test]
    fn the_tree_follows_the_compiled_transform() {
        let customers = shipped("customers_db");
        let FieldTree::Object(top) = tree(&customers, "customers") else { panic!("a document target is an object") };
        assert_eq!(top.get("displayName"), Some(&FieldTree::Whole));
        let Some(FieldTree::Object(profile)) = top.get("profile") else { panic!("dotted paths nest: {top:?}") };
        let names: Vec<&str> = profile.keys().map(String::as_str).collect();
        assert_eq!(names, ["country", "interests", "language", "preferences", "timezone"]);
        // `prefs` is copied as one value: whatever is inside it is ficus's.
        assert_eq!(profile.get("preferences"), Some(&FieldTree::Whole));
        let Some(FieldTree::Each(element)) = top.get("purchaseHistory") else { panic!("`each` is an array") };
        assert!(element.contains_key("purchaseId") && element.contains_key("amount") && element.len() == 7);
        // A target built from array elements: its declared fields, like any document.
        let FieldTree::Object(events) = tree(&customers, "customer_events") else { panic!() };
        assert!(events.contains_key("eventId") && matches!(events.get("eventData"), Some(FieldTree::Object(_))));
        // A rollup's group document is ficus's whole.
        assert_eq!(tree(&shipped("products_db"), "categories"), FieldTree::Whole);
        assert_eq!(customers.written_fields("no_such_collection"), None);
    }

    #[test]
    fn fields_of_the_service_are_left_out_and_named_at_any_depth() {
        let customers = shipped("customers_db");
        let doc = doc! {
            "_id": "U1",
            "lineUserId": "U1",
            "nickname": "Kat",
            "displayName": "Kathy",
            "profile": { "language": "ja", "nickname": "K", "preferences": { "theme": "dark", "own": 1 } },
            "purchaseHistory": [
                { "purchaseId": "p1", "amount": 3, "giftNote": "for mum" },
                { "purchaseId": "p2" },
            ],
            "_ficus": { "v": "1" },
        };
        let p = tree(&customers, "customers").project(&doc);
        assert_eq!(
            p.document,
            doc! {
                "_id": "U1",
                "_ficus": { "v": "1" },
                "lineUserId": "U1",
                "displayName": "Kathy",
                "profile": { "language": "ja", "preferences": { "theme": "dark", "own": 1 } },
                "purchaseHistory": [ { "purchaseId": "p1", "amount": 3 }, { "purchaseId": "p2" } ],
            }
        );
        assert_eq!(paths(&p), ["nickname", "profile.nickname", "purchaseHistory[].giftNote"]);
    }

    #[test]
    fn a_document_without_fields_of_its_own_is_unchanged() {
        let customers = shipped("customers_db");
        let doc = doc! {
            "_id": "U1", "lineUserId": "U1", "profile": { "language": "ja" },
            "purchaseHistory": [ {}, { "purchaseId": "p2" } ], "createdAt": "2026-01-01",
        };
        let p = tree(&customers, "customers").project(&doc);
        assert_eq!((p.document, p.service_only.len()), (doc, 0));
    }

    #[test]
    fn a_sub_document_of_only_the_services_fields_goes_but_an_empty_one_stays() {
        let customers = shipped("customers_db");
        let t = tree(&customers, "customers");
        // ficus leaves out a sub-document none of whose sources exist; the service's field
        // alone there does not make one.
        let p = t.project(&doc! { "_id": "U1", "profile": { "nickname": "K" }, "analytics": { "own": { "x": 1 } } });
        assert_eq!(p.document, doc! { "_id": "U1" });
        assert_eq!(paths(&p), ["analytics.own", "profile.nickname"]);
        // An empty sub-document ficus would never write is kept, and so differs.
        let p = t.project(&doc! { "_id": "U1", "profile": {} });
        assert_eq!(p.document, doc! { "_id": "U1", "profile": {} });
        // An element of only the service's fields keeps its place in the array.
        let p = t.project(&doc! { "_id": "U1", "purchaseHistory": [ { "own": 1 }, { "purchaseId": "p" } ] });
        assert_eq!(p.document, doc! { "_id": "U1", "purchaseHistory": [ {}, { "purchaseId": "p" } ] });
    }

    #[test]
    fn values_of_a_shape_ficus_does_not_write_are_compared_as_they_are() {
        let customers = shipped("customers_db");
        let t = tree(&customers, "customers");
        let doc = doc! { "_id": "U1", "profile": "flat", "purchaseHistory": { "not": "an array" }, "displayName": { "a": 1 } };
        let p = t.project(&doc);
        assert_eq!((p.document, p.service_only.len()), (doc, 0));
        let p = t.project(&doc! { "purchaseHistory": [ 1, "two", { "purchaseId": "p", "x": 1 } ] });
        assert_eq!(p.document, doc! { "purchaseHistory": [ 1, "two", { "purchaseId": "p" } ] });
    }

    #[test]
    fn a_rollup_document_is_compared_whole() {
        let categories = tree(&shipped("products_db"), "categories");
        let doc = doc! { "_id": "tea", "productCount": 3, "anything": true };
        let p = categories.project(&doc);
        assert_eq!((p.document, p.service_only.len()), (doc, 0));
    }

    #[test]
    fn transforms_writing_one_collection_write_the_union_of_their_fields() {
        let dir = tempfile::tempdir().unwrap();
        let svc = dir.path().join("fan_db");
        std::fs::create_dir_all(&svc).unwrap();
        let header = |events: &str| {
            format!("topic = \"linechatbot.customers\"\nevents = [{events}]\ncollection = \"people\"\nkey = \"_id\"\n")
        };
        std::fs::write(
            svc.join("a.toml"),
            header("\"customer.created\"") + "[fields]\nname = \"name\"\n\"profile.lang\" = \"lang\"\n",
        )
        .unwrap();
        std::fs::write(
            svc.join("b.toml"),
            header("\"customer.updated\"") + "[fields]\ntier = \"tier\"\n\"profile.tz\" = \"tz\"\n",
        )
        .unwrap();
        let fan = load_service(&svc, &topics()).unwrap_or_else(|r| panic!("{r}"));
        let p = fan.written_fields("people").unwrap().project(
            &doc! { "_id": 1, "name": "a", "tier": "b", "own": 1, "profile": { "lang": "ja", "tz": "UTC", "own": 2 } },
        );
        assert_eq!(p.document, doc! { "_id": 1, "name": "a", "tier": "b", "profile": { "lang": "ja", "tz": "UTC" } });
        assert_eq!(paths(&p), ["own", "profile.own"]);
        // Shapes that disagree are taken whole.
        let object = FieldTree::Object(BTreeMap::from([("a".to_string(), FieldTree::Whole)]));
        let each = FieldTree::Each(BTreeMap::new());
        assert_eq!(object.clone().union(each), FieldTree::Whole);
        assert_eq!(object.clone().union(FieldTree::Whole), FieldTree::Whole);
        assert_eq!(object.clone().union(object.clone()), object);
    }
}
