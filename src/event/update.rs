//! An update's description applied to the document before it: exactly the document after (pure).
//!
//! A change stream reports an update by what it did (`updateDescription`): the fields it set
//! (`updatedFields`, dotted paths in which a numeric segment indexes an array), the fields it
//! removed (`removedFields`) and, since MongoDB 5.0, the arrays a pipeline update shortened
//! (`truncatedArrays`: each array's path and its new length; the elements left are set by index
//! where they changed). The document looked up after the update (`fullDocument: updateLookup`)
//! may already hold later changes, so only the pre-image with the description applied is this
//! update's own result. Both directions need it: the events derived from an array that shrank
//! (`mapping`), and a write-back that merges array elements by id (`transform::reverse`).
//!
//! Paths are read as MongoDB writes them, against the document they apply to: a numeric
//! segment indexes an array and names a field of a document (`{"a": {"0": …}}`); a field name
//! that holds a dot (legal since MongoDB 5.0, and reported unescaped) is taken where the plain
//! reading finds no field and the segments joined with dots do; `$`-prefixed field names are
//! field names like any other.

use bson::{Bson, Document};

use super::EventData;

/// An array an update shortened (an entry of `truncatedArrays`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Dotted path of the array.
    pub field: String,
    /// Its length after the update.
    pub new_size: u32,
}

/// An update description that does not fit the document it is applied to (a pre-image from
/// another moment, or a description from another document).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot apply the update at `{path}`: {reason}")]
pub struct UpdateError {
    pub path: String,
    pub reason: String,
}

/// The document `pre` becomes under an update described by `updated` (dotted path → new value),
/// `removed` (dotted paths) and `truncated`, applied in the order MongoDB's own changes imply:
/// arrays are cut to their new length first, then fields are set (an index past an array's end
/// pads it with null, as `$set` does; missing sub-documents are created), then removed. A path
/// through a value that is neither a document nor an array, a truncation of something that is
/// not an array or is already shorter, and a non-numeric segment into an array are errors: the
/// description was not made from this document.
pub fn apply(
    pre: &Document,
    updated: &Document,
    removed: &[String],
    truncated: &[Truncation],
) -> Result<Document, UpdateError> {
    let mut out = pre.clone();
    for t in truncated {
        truncate(&mut out, t).map_err(|reason| UpdateError { path: t.field.clone(), reason })?;
    }
    for (path, value) in updated {
        set(&mut out, path, value.clone()).map_err(|reason| UpdateError { path: path.clone(), reason })?;
    }
    for path in removed {
        unset(&mut out, path);
    }
    Ok(out)
}

impl EventData {
    /// What this update made of `pre` (its pre-image): [`apply`] of its description. `None` for
    /// an event that is not an update carrying a description.
    pub fn update_applied_to(&self, pre: &Document) -> Option<Result<Document, UpdateError>> {
        let changed = self.changed.as_ref().filter(|_| self.op == super::Op::Update)?;
        Some(apply(pre, changed, &self.removed, &self.truncated))
    }
}

/// Whether a path segment indexes an array: digits without a leading zero, as MongoDB reads one.
pub fn index(segment: &str) -> Option<usize> {
    let canonical = !segment.is_empty()
        && segment.bytes().all(|b| b.is_ascii_digit())
        && (segment == "0" || !segment.starts_with('0'));
    canonical.then(|| segment.parse().ok()).flatten()
}

/// The field of `doc` the segments at the start of `segments` name, and how many they are: the
/// first segment where the document has that field, else the longest run of segments whose
/// dotted join it has (a field name with dots), else the first segment (a field to create).
fn field_of(doc: &Document, segments: &[&str]) -> (String, usize) {
    if !doc.contains_key(segments[0]) {
        for n in (2..=segments.len()).rev() {
            let joined = segments[..n].join(".");
            if doc.contains_key(&joined) {
                return (joined, n);
            }
        }
    }
    (segments[0].to_string(), 1)
}

/// Where a path ends: a field of a document or a slot of an array.
enum Slot<'d> {
    Field(&'d mut Document, String),
    Index(&'d mut Vec<Bson>, usize),
}

/// Walks to the container of a path's last step. With `create`, missing sub-documents are
/// created and arrays padded (as `$set` does); without, a missing step is `Ok(None)`.
fn locate<'d>(doc: &'d mut Document, path: &str, create: bool) -> Result<Option<Slot<'d>>, String> {
    /// A container being walked through.
    enum Cur<'d> {
        Doc(&'d mut Document),
        Arr(&'d mut Vec<Bson>),
    }
    let segments: Vec<&str> = path.split('.').collect();
    let mut at = 0;
    let mut cur = Cur::Doc(doc);
    loop {
        let next: &'d mut Bson = match cur {
            Cur::Doc(d) => {
                let (key, n) = field_of(d, &segments[at..]);
                at += n;
                if at == segments.len() {
                    return Ok(Some(Slot::Field(d, key)));
                }
                if !d.contains_key(&key) {
                    if !create {
                        return Ok(None);
                    }
                    d.insert(key.clone(), Document::new());
                }
                d.get_mut(&key).expect("present or just inserted")
            }
            Cur::Arr(items) => {
                let walked = segments[..at].join(".");
                let Some(i) = index(segments[at]) else {
                    return Err(format!("`{}` does not index the array at `{walked}`", segments[at]));
                };
                at += 1;
                if at == segments.len() {
                    return Ok(Some(Slot::Index(items, i)));
                }
                if i >= items.len() {
                    if !create {
                        return Ok(None);
                    }
                    items.resize(i, Bson::Null);
                    items.push(Bson::Document(Document::new()));
                }
                &mut items[i]
            }
        };
        cur = match next {
            Bson::Document(d) => Cur::Doc(d),
            Bson::Array(items) => Cur::Arr(items),
            other if create => {
                let walked = segments[..at].join(".");
                return Err(format!("cannot create `{}` in {} at `{walked}`", segments[at], kind(other)));
            }
            _ => return Ok(None),
        };
    }
}

fn set(doc: &mut Document, path: &str, value: Bson) -> Result<(), String> {
    match locate(doc, path, true)? {
        Some(Slot::Field(d, key)) => {
            d.insert(key, value);
        }
        Some(Slot::Index(items, i)) => {
            if i >= items.len() {
                items.resize(i + 1, Bson::Null);
            }
            items[i] = value;
        }
        None => unreachable!("a path is always located when creating"),
    }
    Ok(())
}

/// Removes a path as `$unset` does (an array element becomes null); what is not there stays
/// not there.
fn unset(doc: &mut Document, path: &str) {
    match locate(doc, path, false) {
        Ok(Some(Slot::Field(d, key))) => {
            d.remove(&key);
        }
        Ok(Some(Slot::Index(items, i))) => {
            if let Some(slot) = items.get_mut(i) {
                *slot = Bson::Null;
            }
        }
        Ok(None) | Err(_) => {}
    }
}

fn truncate(doc: &mut Document, t: &Truncation) -> Result<(), String> {
    let slot = locate(doc, &t.field, false)?;
    let value = match slot {
        Some(Slot::Field(d, key)) => d.get_mut(&key),
        Some(Slot::Index(items, i)) => items.get_mut(i),
        None => None,
    };
    match value {
        Some(Bson::Array(items)) if items.len() >= t.new_size as usize => {
            items.truncate(t.new_size as usize);
            Ok(())
        }
        Some(Bson::Array(items)) => {
            Err(format!("the array has {} elements, fewer than its new size {}", items.len(), t.new_size))
        }
        Some(other) => Err(format!("expected an array to truncate, found {}", kind(other))),
        None => Err("no array there to truncate".into()),
    }
}

fn kind(v: &Bson) -> &'static str {
    match v {
        Bson::Document(_) => "a document",
        Bson::Array(_) => "an array",
        Bson::String(_) => "a string",
        Bson::Null => "null",
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => "a number",
        Bson::Boolean(_) => "a boolean",
        _ => "a value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn cut(field: &str, new_size: u32) -> Truncation {
        Truncation { field: field.into(), new_size }
    }

    fn p(id: &str) -> Bson {
        Bson::Document(doc! { "id": id, "status": "paid" })
    }

    #[test]
    fn fields_set_and_removed_by_dotted_paths_at_any_depth() {
        let pre = doc! { "name": "Ann", "stats": { "msgs": 1, "seen": { "at": 5 } }, "tz": "UTC" };
        let post = apply(
            &pre,
            &doc! { "stats.msgs": 2, "stats.seen.by": "bot", "prefs.lang": "th", "name": "Anne" },
            &["tz".into(), "stats.seen.at".into(), "not.there".into()],
            &[],
        )
        .unwrap();
        // Existing fields keep their place; new ones (and their new parents) come last.
        assert_eq!(
            post,
            doc! { "name": "Anne", "stats": { "msgs": 2, "seen": { "by": "bot" } }, "prefs": { "lang": "th" } }
        );
    }

    #[test]
    fn a_numeric_segment_indexes_an_array_and_names_a_field_of_a_document() {
        let pre = doc! { "list": [p("P0"), p("P1")], "byNumber": { "0": "zero" } };
        let post = apply(
            &pre,
            &doc! { "list.1.status": "refunded", "list.3": p("P3"), "byNumber.0": "nil", "byNumber.1": "one" },
            &["list.0.status".into()],
            &[],
        )
        .unwrap();
        assert_eq!(
            post,
            doc! {
                "list": [{ "id": "P0" }, { "id": "P1", "status": "refunded" }, Bson::Null, p("P3")],
                "byNumber": { "0": "nil", "1": "one" },
            }
        );
        // An index past the end of an array inside an element creates the element, as $set does.
        let post = apply(&doc! { "a": [] }, &doc! { "a.1.b": 1 }, &[], &[]).unwrap();
        assert_eq!(post, doc! { "a": [Bson::Null, { "b": 1 }] });
    }

    #[test]
    fn a_truncated_array_is_cut_before_the_elements_left_are_set() {
        // A pipeline update removed the first purchase of three: MongoDB reports the two left,
        // moved down, by index, and the new length.
        let pre = doc! { "purchases": [p("P0"), p("P1"), p("P2")], "n": 1 };
        let updated = doc! { "purchases.0": p("P1"), "purchases.1": p("P2") };
        let post = apply(&pre, &updated, &[], &[cut("purchases", 2)]).unwrap();
        assert_eq!(post, doc! { "purchases": [p("P1"), p("P2")], "n": 1 });
        // Without the truncation the last element would stay, twice: what ficus did before.
        let stale = apply(&pre, &updated, &[], &[]).unwrap();
        assert_eq!(stale.get_array("purchases").unwrap().len(), 3);
        // A cut alone, nested, and a field of a kept element changed beside it.
        let pre = doc! { "c": { "xs": [1, 2, 3, 4], "ys": [p("Y0"), p("Y1")] } };
        let post = apply(&pre, &doc! { "c.ys.0.status": "void" }, &[], &[cut("c.xs", 1), cut("c.ys", 1)]).unwrap();
        assert_eq!(post, doc! { "c": { "xs": [1], "ys": [{ "id": "Y0", "status": "void" }] } });
        // An array inside an element, cut.
        let pre = doc! { "orders": [{ "lines": [1, 2, 3] }] };
        let post = apply(&pre, &doc! {}, &[], &[cut("orders.0.lines", 0)]).unwrap();
        assert_eq!(post, doc! { "orders": [{ "lines": [] }] });
    }

    #[test]
    fn dotted_and_dollar_field_names_are_fields_like_any_other() {
        // `a.b` is a field of its own here (there is no `a`); `x.y` goes into the sub-document.
        let pre = doc! { "a.b": 1, "x": { "y": 1, "k.v": [1, 2] }, "$price": 5 };
        let post =
            apply(&pre, &doc! { "a.b": 2, "x.y": 2, "$price": 6, "x.$note": "n" }, &[], &[cut("x.k.v", 1)]).unwrap();
        assert_eq!(post, doc! { "a.b": 2, "x": { "y": 2, "k.v": [1], "$note": "n" }, "$price": 6 });
        // Where both readings exist, the plain one wins (MongoDB's own reading of such a path).
        let pre = doc! { "a": { "b": 1 }, "a.b": 1 };
        assert_eq!(apply(&pre, &doc! { "a.b": 2 }, &[], &[]).unwrap(), doc! { "a": { "b": 2 }, "a.b": 1 });
    }

    #[test]
    fn a_description_from_another_document_is_an_error_naming_the_path() {
        let pre = doc! { "n": 1, "list": [1, 2], "d": {} };
        let err = |u: Document, t: &[Truncation]| apply(&pre, &u, &[], t).unwrap_err();
        assert_eq!(
            err(doc! { "n.x": 1 }, &[]).to_string(),
            "cannot apply the update at `n.x`: cannot create `x` in a number at `n`"
        );
        assert_eq!(err(doc! { "list.x": 1 }, &[]).path, "list.x");
        assert!(err(doc! {}, &[cut("list", 3)]).reason.contains("fewer than its new size 3"));
        assert!(err(doc! {}, &[cut("n", 0)]).reason.contains("found a number"));
        assert!(err(doc! {}, &[cut("gone", 0)]).reason.contains("no array"));
        assert!(err(doc! {}, &[cut("d.gone", 0)]).reason.contains("no array"));
        // A leading zero is not an index (MongoDB reads `01` as a field name).
        assert_eq!(index("01"), None);
        assert_eq!(index("0"), Some(0));
        assert_eq!(index("12"), Some(12));
        assert!(err(doc! { "list.01": 1 }, &[]).reason.contains("does not index"));
    }

    #[test]
    fn an_event_applies_its_own_description() {
        use super::super::Op;
        let mut data = EventData {
            op: Op::Update,
            collection: "c".into(),
            key: Bson::Int32(1),
            document_id: Bson::Int32(1),
            after: None,
            before: None,
            changed: Some(doc! { "xs.0": 9 }),
            removed: vec![],
            truncated: vec![cut("xs", 1)],
            derived: None,
        };
        let pre = doc! { "xs": [1, 2, 3] };
        assert_eq!(data.update_applied_to(&pre), Some(Ok(doc! { "xs": [9] })));
        data.op = Op::Replace;
        assert_eq!(data.update_applied_to(&pre), None, "only an update has a description");
    }
}
