//! The three-way merge of a non-owner's change into an owned document (pure).
//!
//! Once a service owns an aggregate (see `cutover`), the monolith is no longer its writer, but
//! the monolith's application may still change it (a cut-over customer's stats). Such a change
//! is not applied over the owner's document: it is merged field by field against the last
//! state both sides agreed on (`base`, what the monolith's previous state made):
//!
//! - a field the owner has not changed since then takes the new value;
//! - a field only the owner changed keeps the owner's value;
//! - a field both changed, to different values, is a **conflict**: the owner's value wins and
//!   both are reported, never silently dropped.
//!
//! Sub-documents merge field by field too; arrays whose elements carry an id (the transform's
//! `each` arrays: `purchaseHistory` by `purchaseId`) merge element by element
//! (`transform::elements`), so one side's new purchase and the other's refund of another both
//! stand; other arrays and values are compared whole. A delete by the non-owner, or a change to
//! a document the owner deleted, is a conflict on the whole document, and the owner's state
//! stands. The same rules serve both directions.

use bson::{Bson, Document};

use crate::transform::Base;
use crate::transform::elements::{self, Wins};

/// One field (or array element) both sides changed (or, with an unknown base, hold differently).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldConflict {
    /// Dotted path of the field; `(document)` for the whole document.
    pub path: String,
    /// The owner's value, which stands (`None`: absent).
    pub owner: Option<Bson>,
    /// The other side's value, not applied (`None`: absent).
    pub other: Option<Bson>,
    /// The value both last agreed on (`None`: absent or unknown).
    pub base: Option<Bson>,
    /// For one element of an array at `path`: its id field and id (the values are the element's
    /// versions then).
    pub element: Option<(String, Bson)>,
}

/// Per array path of the owner's documents, the field that identifies an element (`None`:
/// elements cannot be told apart, the array is one value).
pub type ArrayKeys = [(String, Option<String>)];

/// Where a conflict is: a field's path, and for one element of an array there, the element's id
/// field and id.
#[derive(Debug, Clone, PartialEq)]
pub struct Spot {
    pub path: String,
    pub element: Option<(String, Bson)>,
    /// The owner's value there when the conflict was recorded (`Some(None)`: absent; `None`:
    /// not known), see [`still_held`].
    pub was: Option<Option<Bson>>,
}

/// The spots where the owner still holds the value that won its conflict (or where that value
/// is not known, and for single array elements): a repair writes the owner's values there and
/// nowhere else (pure). Where the owner's value has changed since, the conflict is behind it:
/// the owner wrote again (its own change carries the new value across), or a later change of
/// the other side was merged into it. A repair that wrote the owner's *current* value there
/// took back what the other side had done since: a counter only the monolith's code changes,
/// stale on the service when a conflict was recorded and caught up by the time the record was
/// relayed, was written back over the monolith's newer count (an increment lost in the ownership
/// chaos test).
pub fn still_held(owner: &Document, spots: &[Spot]) -> Vec<Spot> {
    use crate::event::mapping::get_path;
    let plain = |v: Option<&Bson>| v.filter(|v| !matches!(v, Bson::Null)).cloned();
    spots
        .iter()
        .filter(|s| match (&s.was, &s.element) {
            (Some(was), None) => plain(get_path(owner, &s.path)) == plain(was.as_ref()),
            _ => true,
        })
        .cloned()
        .collect()
}

/// Makes `target` hold what `source` holds at each spot (a field set or removed, one element of
/// an array set, added or removed), leaving everything else as it is (pure: a repair writes
/// the owner's values at the conflicts so). Returns the top-level fields changed.
pub fn take_spots(target: &mut Document, source: &Document, spots: &[Spot]) -> Result<Vec<String>, String> {
    use crate::event::mapping::get_path;
    let mut touched = Vec::new();
    for spot in spots {
        let value = match &spot.element {
            Some((field, id)) => {
                let element = match get_path(source, &spot.path) {
                    Some(Bson::Array(a)) => a.iter().find(|e| e.as_document().and_then(|d| d.get(field)) == Some(id)),
                    _ => None,
                };
                Some(with_element(get_path(target, &spot.path), field, id, element))
            }
            None => get_path(source, &spot.path).cloned(),
        };
        match value {
            Some(v) => {
                crate::transform::set_path(target, &spot.path, v).map_err(|why| format!("{}: {why}", spot.path))?
            }
            None => crate::transform::unset_path(target, &spot.path),
        }
        let top = spot.path.split('.').next().unwrap_or_default().to_string();
        if !touched.contains(&top) {
            touched.push(top);
        }
    }
    Ok(touched)
}

/// An array with the element of id `id` (by `field`) replaced by `element` (`None`: removed),
/// or added at the end where it was not there (pure: a repair sets one element so).
pub fn with_element(array: Option<&Bson>, field: &str, id: &Bson, element: Option<&Bson>) -> Bson {
    let mut items = match array {
        Some(Bson::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let at = items.iter().position(|e| e.as_document().and_then(|d| d.get(field)) == Some(id));
    match (at, element) {
        (Some(i), Some(e)) => items[i] = e.clone(),
        (Some(i), None) => {
            items.remove(i);
        }
        (None, Some(e)) => items.push(e.clone()),
        (None, None) => {}
    }
    Bson::Array(items)
}

/// What a merge comes to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Merged {
    /// The owner's document after the merge; `None` when it does not change.
    pub write: Option<Document>,
    pub conflicts: Vec<FieldConflict>,
}

/// Merges the other side's new state `theirs` (`None`: deleted there) into the owner's
/// `owner` (`None`: absent), against `base`, arrays at `arrays` element by element. Documents
/// are compared without `_id` and ficus's metadata (`_ficus`), which the caller sets.
pub fn merge(owner: Option<&Document>, base: &Base, theirs: Option<&Document>, arrays: &ArrayKeys) -> Merged {
    let whole = |owner: Option<&Document>, other: Option<&Document>| Merged {
        write: None,
        conflicts: vec![FieldConflict {
            path: "(document)".into(),
            owner: owner.map(|d| Bson::Document(plain(d))),
            other: other.map(|d| Bson::Document(plain(d))),
            base: match base {
                Base::Was(d) => Some(Bson::Document(plain(d))),
                _ => None,
            },
            element: None,
        }],
    };
    match (owner, theirs) {
        (None, None) => Merged::default(),
        // New on their side and absent here: nothing to disagree about.
        (None, Some(t)) if *base == Base::New => Merged { write: Some(plain(t)), conflicts: Vec::new() },
        // The owner deleted it, or the other side did: the owner's state stands.
        (None, Some(_)) | (Some(_), None) => whole(owner, theirs),
        (Some(o), Some(t)) => {
            let (o, t) = (plain(o), plain(t));
            let b = match base {
                Base::Was(d) => Some(plain(d)),
                Base::New => Some(Document::new()),
                Base::Unknown => None,
            };
            let mut conflicts = Vec::new();
            let merged = fields(&o, b.as_ref(), &t, "", arrays, &mut conflicts);
            Merged { write: (merged != o).then_some(merged), conflicts }
        }
    }
}

/// A document without `_id` and `_ficus`.
fn plain(d: &Document) -> Document {
    let mut d = d.clone();
    d.remove("_id");
    d.remove(crate::sink::META);
    d
}

/// Merges one level: every field of either side, in the owner's order then the others'.
fn fields(
    o: &Document,
    b: Option<&Document>,
    t: &Document,
    at: &str,
    arrays: &ArrayKeys,
    out: &mut Vec<FieldConflict>,
) -> Document {
    let mut merged = Document::new();
    let keys = o
        .keys()
        .chain(t.keys().filter(|k| !o.contains_key(*k)))
        .chain(b.into_iter().flat_map(|b| b.keys()).filter(|k| !o.contains_key(*k) && !t.contains_key(*k)));
    let keys: Vec<String> = keys.cloned().collect();
    for k in keys {
        let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
        let (ov, tv) = (o.get(&k), t.get(&k));
        let bv = b.map(|b| b.get(&k));
        let keyed = arrays.iter().find(|(p, _)| *p == path);
        let v = match keyed {
            Some((_, id)) if is_array(ov) || is_array(tv) => array(ov, bv, tv, &path, id.as_deref(), out),
            _ => field(ov, bv, tv, &path, arrays, out),
        };
        if let Some(v) = v {
            merged.insert(k, v);
        }
    }
    merged
}

/// Merges one field; `bv` is `None` when the base is unknown, `Some(None)` when the field was
/// absent in it.
fn field(
    ov: Option<&Bson>,
    bv: Option<Option<&Bson>>,
    tv: Option<&Bson>,
    path: &str,
    arrays: &ArrayKeys,
    out: &mut Vec<FieldConflict>,
) -> Option<Bson> {
    if ov == tv {
        return ov.cloned();
    }
    if let (Some(Bson::Document(o)), Some(Bson::Document(t))) = (ov, tv) {
        let b = match bv {
            Some(Some(Bson::Document(b))) => Some(b.clone()),
            Some(_) => Some(Document::new()),
            None => None,
        };
        return Some(Bson::Document(fields(o, b.as_ref(), t, path, arrays, out)));
    }
    match bv {
        Some(b) if b == ov => tv.cloned(), // only their side changed it
        Some(b) if b == tv => ov.cloned(), // only the owner changed it
        b => {
            out.push(FieldConflict {
                path: path.to_string(),
                owner: ov.cloned(),
                other: tv.cloned(),
                base: b.flatten().cloned(),
                element: None,
            });
            ov.cloned()
        }
    }
}

fn is_array(v: Option<&Bson>) -> bool {
    matches!(v, Some(Bson::Array(_)))
}

/// Merges an array of elements with an id, element by element; the owner's element stands
/// where both changed one. With an unknown base, an array the two hold differently is one
/// conflict, the owner's standing, as any field.
fn array(
    ov: Option<&Bson>,
    bv: Option<Option<&Bson>>,
    tv: Option<&Bson>,
    path: &str,
    id: Option<&str>,
    out: &mut Vec<FieldConflict>,
) -> Option<Bson> {
    let Some(base) = bv else {
        if ov != tv {
            out.push(FieldConflict {
                path: path.to_string(),
                owner: ov.cloned(),
                other: tv.cloned(),
                base: None,
                element: None,
            });
        }
        return ov.cloned();
    };
    let merged = elements::merge(base, tv, ov, id, Wins::Current);
    for c in merged.conflicts {
        let element = match (id, &c.id) {
            (Some(field), Some(id)) => Some((field.to_string(), id.clone())),
            _ => None,
        };
        out.push(FieldConflict { path: path.to_string(), owner: c.current, other: c.theirs, base: c.base, element });
    }
    merged.value
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn conflict(path: &str, owner: Option<Bson>, other: Option<Bson>, base: Option<Bson>) -> FieldConflict {
        FieldConflict { path: path.into(), owner, other, base, element: None }
    }

    #[test]
    fn untouched_fields_take_the_change_the_owners_stand_and_both_changed_is_a_conflict() {
        let base = doc! { "name": "Ann", "stats": { "msgs": 1, "visits": 2 }, "tier": "gold", "note": "x" };
        // The owner renamed her and changed the tier; the monolith counted a message, changed
        // the tier too, and dropped the note.
        let owner = doc! { "_id": "U1", "name": "Anne", "stats": { "msgs": 1, "visits": 2 }, "tier": "platinum", "note": "x", "_ficus": { "v": "1" } };
        let theirs = doc! { "name": "Ann", "stats": { "msgs": 2, "visits": 2 }, "tier": "silver" };
        let m = merge(Some(&owner), &Base::Was(base), Some(&theirs), &[]);
        assert_eq!(m.write, Some(doc! { "name": "Anne", "stats": { "msgs": 2, "visits": 2 }, "tier": "platinum" }));
        assert_eq!(
            m.conflicts,
            [conflict("tier", Some("platinum".into()), Some("silver".into()), Some("gold".into()))]
        );
    }

    #[test]
    fn nothing_to_do_when_the_owner_already_holds_it() {
        let base = doc! { "a": 1, "b": 1 };
        let owner = doc! { "a": 2, "b": 1 };
        // Delivered again after it was merged: the same state, no conflict, no write.
        assert_eq!(merge(Some(&owner), &Base::Was(base.clone()), Some(&owner), &[]), Merged::default());
        // Their change equals what the owner did: agreement.
        assert_eq!(merge(Some(&owner), &Base::Was(base), Some(&doc! { "a": 2, "b": 1 }), &[]), Merged::default());
    }

    #[test]
    fn an_unknown_base_makes_every_difference_a_conflict_owner_winning() {
        let owner = doc! { "a": 1, "b": 2 };
        let m = merge(Some(&owner), &Base::Unknown, Some(&doc! { "a": 1, "b": 3, "c": 4 }), &[]);
        assert_eq!(m.write, None);
        assert_eq!(
            m.conflicts,
            [
                conflict("b", Some(Bson::Int32(2)), Some(Bson::Int32(3)), None),
                conflict("c", None, Some(Bson::Int32(4)), None)
            ]
        );
    }

    #[test]
    fn deletes_on_either_side_are_conflicts_on_the_whole_document() {
        let owner = doc! { "a": 1 };
        let m = merge(Some(&owner), &Base::Was(owner.clone()), None, &[]);
        assert_eq!((m.write, m.conflicts.len(), m.conflicts[0].path.as_str()), (None, 1, "(document)"));
        let m = merge(None, &Base::Was(owner.clone()), Some(&doc! { "a": 2 }), &[]);
        assert_eq!((m.write, m.conflicts[0].other.clone()), (None, Some(Bson::Document(doc! { "a": 2 }))));
        // A document new on their side that the owner does not have is simply taken.
        let m = merge(None, &Base::New, Some(&doc! { "_id": "x", "a": 2 }), &[]);
        assert_eq!((m.write, m.conflicts), (Some(doc! { "a": 2 }), vec![]));
        assert_eq!(merge(None, &Base::Unknown, None, &[]), Merged::default());
    }

    #[test]
    fn arrays_of_elements_with_an_id_merge_element_by_element() {
        let p = |id: &str, status: &str| Bson::Document(doc! { "purchaseId": id, "status": status });
        let keys = [("purchaseHistory".to_string(), Some("purchaseId".to_string()))];
        let base = doc! { "purchaseHistory": [p("P1", "paid"), p("P2", "paid")] };
        // The owner refunded P1; the monolith's code pushed P3 and marked P2 pending.
        let owner = doc! { "purchaseHistory": [p("P1", "refunded"), p("P2", "paid")] };
        let theirs = doc! { "purchaseHistory": [p("P1", "paid"), p("P2", "pending"), p("P3", "paid")] };
        let m = merge(Some(&owner), &Base::Was(base.clone()), Some(&theirs), &keys);
        assert_eq!(
            m.write,
            Some(doc! { "purchaseHistory": [p("P1", "refunded"), p("P2", "pending"), p("P3", "paid")] }),
            "both sides' element changes stand"
        );
        assert_eq!(m.conflicts, vec![]);
        // Both changed P1: the owner's element stands, the conflict names the element.
        let theirs = doc! { "purchaseHistory": [p("P1", "pending"), p("P2", "paid")] };
        let m = merge(Some(&owner), &Base::Was(base), Some(&theirs), &keys);
        assert_eq!(m.write, None);
        let element = Some(("purchaseId".to_string(), Bson::String("P1".into())));
        assert_eq!(
            m.conflicts,
            [FieldConflict {
                path: "purchaseHistory".into(),
                owner: Some(p("P1", "refunded")),
                other: Some(p("P1", "pending")),
                base: Some(p("P1", "paid")),
                element
            }]
        );
        // Compared whole without keys: one conflict on the array, the owner's array stands.
        let m = merge(Some(&owner), &Base::Was(doc! { "purchaseHistory": [p("P1", "paid")] }), Some(&theirs), &[]);
        assert_eq!((m.write, m.conflicts.len()), (None, 1));
    }

    #[test]
    fn one_element_is_set_removed_or_added() {
        let p = |id: &str, n: i32| Bson::Document(doc! { "id": id, "n": n });
        let a = Bson::Array(vec![p("A", 1), p("B", 1)]);
        let id = |s: &str| Bson::String(s.into());
        assert_eq!(with_element(Some(&a), "id", &id("B"), Some(&p("B", 2))), Bson::Array(vec![p("A", 1), p("B", 2)]));
        assert_eq!(with_element(Some(&a), "id", &id("A"), None), Bson::Array(vec![p("B", 1)]));
        assert_eq!(
            with_element(Some(&a), "id", &id("C"), Some(&p("C", 1))),
            Bson::Array(vec![p("A", 1), p("B", 1), p("C", 1)])
        );
        assert_eq!(with_element(None, "id", &id("C"), None), Bson::Array(vec![]));
    }

    #[test]
    fn a_repair_writes_only_where_the_owner_still_holds_the_value_that_won() {
        let spot = |path: &str, was: Option<Option<Bson>>| Spot { path: path.into(), element: None, was };
        let owner = doc! { "displayName": "S", "analytics": { "totalMessages": 31 } };
        let spots = [
            // The owner's rename that won: still the owner's value, written across.
            spot("displayName", Some(Some(Bson::from("S")))),
            // A counter the owner held stale (26) when the conflict was recorded, caught up
            // since: the monolith's newer count stands.
            spot("analytics.totalMessages", Some(Some(Bson::Int32(26)))),
            // Absent then and now.
            spot("profile.country", Some(None)),
            // Not known: written as before.
            spot("segmentation.tier", None),
        ];
        let held: Vec<String> = still_held(&owner, &spots).into_iter().map(|s| s.path).collect();
        assert_eq!(held, ["displayName", "profile.country", "segmentation.tier"]);
    }
}
