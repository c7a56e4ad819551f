//! The edits the law check makes to a service document: every value field moved, mapped or
//! unset, and every array grown, shrunk, reordered and changed inside its first element.
//!
//! Kept apart from the check itself (`laws`), which judges what comes back: how an edit is
//! made (a different value of the same type, one the monolith's form can hold) reads on its own.

use bson::{Bson, DateTime, Document};

use super::patch::unset_path;
use crate::event::mapping::get_path;
use crate::transform::builtins::{describe, same};
use crate::transform::expr::Expr;
use crate::transform::model::{Align, Computed, DocumentPlan, FieldPlan, How, ScopePlan};
use crate::transform::value::Func;

/// One generated edit of a service document.
pub(super) struct Edit {
    /// The field whose round trip is checked: a value field, or a whole array.
    pub field: String,
    pub what: String,
    pub doc: Document,
}

const DAY_MS: i64 = 86_400_000;

/// A different value of the same type, deterministically: strings change (numeric text moves,
/// RFC 3339 text moves a day, other text gets `~`), numbers move by one, booleans toggle, dates
/// move a day, documents gain (or lose) a key, arrays gain an element.
pub(super) fn move_value(b: &Bson) -> Option<Bson> {
    Some(match b {
        Bson::String(s) => Bson::String(move_text(s)),
        Bson::Int32(i) => Bson::Int32(i.checked_add(1).unwrap_or(i - 1)),
        Bson::Int64(i) => Bson::Int64(i.checked_add(1).unwrap_or(i - 1)),
        Bson::Double(f) if f.is_nan() => Bson::Double(1.0),
        Bson::Double(f) => {
            let g = f + 1.0;
            Bson::Double(if g != *f && g.is_finite() {
                g
            } else if *f != 0.0 {
                -f
            } else {
                1.0
            })
        }
        Bson::Decimal128(d) => Bson::Decimal128(bump_digit(&d.to_string())?.parse().ok()?),
        Bson::Boolean(x) => Bson::Boolean(!x),
        Bson::DateTime(d) => {
            let ms = d.timestamp_millis();
            Bson::DateTime(DateTime::from_millis(ms.checked_add(DAY_MS).unwrap_or(ms - DAY_MS)))
        }
        Bson::ObjectId(o) => {
            let mut bytes = o.bytes();
            bytes[11] = bytes[11].wrapping_add(1);
            Bson::ObjectId(bson::oid::ObjectId::from_bytes(bytes))
        }
        Bson::Document(d) => {
            let mut d = d.clone();
            if d.remove("ficusEdit").is_none() {
                d.insert("ficusEdit", 1);
            }
            Bson::Document(d)
        }
        Bson::Array(items) => {
            let mut items = items.clone();
            let extra = match items.last() {
                Some(last) => move_value(last).unwrap_or_else(|| last.clone()),
                None => Bson::String("ficus-edit".into()),
            };
            items.push(extra);
            Bson::Array(items)
        }
        _ => return None,
    })
}

fn move_text(s: &str) -> String {
    let t = s.trim();
    let numeric = {
        let body = t.strip_prefix('-').unwrap_or(t);
        let (int, frac) = body.split_once('.').unwrap_or((body, "0"));
        !int.is_empty() && !frac.is_empty() && (int.bytes().chain(frac.bytes())).all(|b| b.is_ascii_digit())
    };
    if numeric && let Some(moved) = bump_digit(s) {
        return moved;
    }
    if let Ok(d) = DateTime::parse_rfc3339_str(t)
        && let Some(ms) = d.timestamp_millis().checked_add(DAY_MS)
        && let Ok(text) = DateTime::from_millis(ms).try_to_rfc3339_string()
    {
        return text;
    }
    format!("{s}~")
}

/// The text with its last digit before any exponent moved by one (9 becomes 0).
fn bump_digit(text: &str) -> Option<String> {
    let mantissa_end = text.find(['E', 'e']).unwrap_or(text.len());
    let pos = text[..mantissa_end].rfind(|c: char| c.is_ascii_digit())?;
    let digit = text.as_bytes()[pos] - b'0';
    let mut out = text.to_string();
    out.replace_range(pos..=pos, &((digit + 1) % 10).to_string());
    Some(out)
}

/// Sets a target path in a service document (creating sub-documents).
fn with_value(doc: &Document, path: &str, value: Bson) -> Document {
    let mut out = doc.clone();
    let _ = super::patch::set_path(&mut out, path, value);
    out
}

/// Removes a target path, and the sub-documents it leaves empty (the forward leaves those out).
fn without(doc: &Document, path: &str) -> Document {
    let mut out = doc.clone();
    unset_path(&mut out, path);
    let mut parent = path;
    while let Some((up, _)) = parent.rsplit_once('.') {
        if matches!(get_path(&out, up), Some(Bson::Document(d)) if d.is_empty()) {
            unset_path(&mut out, up);
        }
        parent = up;
    }
    out
}

/// A moved value for a field: through the monolith value and the forward where the field is a
/// lens (so the edit is one the monolith's form can hold), else moved as it is.
fn moved(f: &FieldPlan, m: Option<&Document>, current: &Bson) -> Option<Bson> {
    match &f.how {
        How::Lens(lens) => {
            let source = m.and_then(|m| get_path(m, &lens.path)).filter(|v| !matches!(v, Bson::Null));
            match source {
                Some(v) => lens.forward(&move_value(v)?).ok().flatten(),
                None if lens.steps.is_empty() => move_value(current),
                None => None,
            }
        }
        _ => move_value(current),
    }
    .filter(|v| !same(v, current))
}

/// Edits of the value fields of one scope: `(field, what, new value or None to unset)`.
fn field_edits(
    plan: &ScopePlan,
    m: Option<&Document>,
    s: &Document,
    key: Option<&str>,
    align: Option<&str>,
) -> Vec<(String, String, Option<Bson>)> {
    let mut out = Vec::new();
    for f in &plan.fields {
        if !matches!(f.how, How::Lens(_) | How::Rule { .. }) {
            continue;
        }
        let Some(current) = get_path(s, &f.target) else { continue };
        if let Some(v) = moved(f, m, current) {
            out.push((
                f.target.clone(),
                format!("move {}: {} → {}", f.target, describe(current), describe(&v)),
                Some(v),
            ));
        }
        // Another value of the value map the field's forward ends in, if any.
        if let Computed::Value(Expr::Call { func: Func::Map(map), .. }) = &f.forward
            && let Some(v) = map.entries.values().find(|v| !same(v, current))
        {
            out.push((
                f.target.clone(),
                format!("map {}: {} → {}", f.target, describe(current), describe(v)),
                Some(v.clone()),
            ));
        }
        if Some(f.target.as_str()) != key && Some(f.target.as_str()) != align {
            out.push((f.target.clone(), format!("unset {}", f.target), None));
        }
    }
    out
}

/// Every edit of a service document `s` (= get(m)) the PutGet law is checked on.
pub(super) fn edits(plan: &DocumentPlan, m: &Document, s: &Document) -> Vec<Edit> {
    let mut out = Vec::new();
    for (field, what, value) in field_edits(&plan.scope, Some(m), s, plan.key.as_deref(), None) {
        let doc = match value {
            Some(v) => with_value(s, &field, v),
            None => without(s, &field),
        };
        out.push(Edit { field, what, doc });
    }
    for f in &plan.scope.fields {
        let How::Array { source, align, element, .. } = &f.how else { continue };
        let field = &f.target;
        let edit = |what: String, doc: Document| Edit { field: field.clone(), what, doc };
        let Some(Bson::Array(items)) = get_path(s, field) else {
            if get_path(s, field).is_some() {
                out.push(edit(format!("unset {field}"), without(s, field)));
            }
            continue;
        };
        let monolith_items = match get_path(m, source) {
            Some(Bson::Array(a)) => a.as_slice(),
            _ => &[],
        };
        for (what, items) in array_edits(field, align, element, items, monolith_items) {
            out.push(edit(what, with_value(s, field, Bson::Array(items))));
        }
        out.push(edit(format!("unset {field}"), without(s, field)));
    }
    out
}

/// The edits of the array at `field` (`items`, from the monolith's `monolith_items`), each as
/// what it does and the array it leaves: an element added, one removed, the order reversed,
/// and the value fields of the first element edited.
fn array_edits(
    field: &str,
    align: &Align,
    element: &ScopePlan,
    items: &[Bson],
    monolith_items: &[Bson],
) -> Vec<(String, Vec<Bson>)> {
    let mut out: Vec<(String, Vec<Bson>)> = Vec::new();
    out.extend(added(field, align, element, items, monolith_items));
    out.extend(removed(field, align, items));
    out.extend(reversed(field, items));
    out.extend(first_element_edits(field, align, element, items, monolith_items));
    out
}

/// The first element of an array, when it is a document.
fn first_document(items: &[Bson]) -> Option<&Document> {
    match items.first() {
        Some(Bson::Document(d)) => Some(d),
        _ => None,
    }
}

/// Add: a copy of an element with a new id (or, by position, of the last one).
fn added(
    field: &str,
    align: &Align,
    element: &ScopePlan,
    items: &[Bson],
    monolith_items: &[Bson],
) -> Option<(String, Vec<Bson>)> {
    match align {
        Align::Field(name) => {
            let first = first_document(items)?;
            let key = first.get(name.as_str())?;
            let key_plan = element.fields.iter().find(|e| e.target == *name);
            let new_key =
                key_plan.and_then(|k| moved(k, first_document(monolith_items), key)).or_else(|| move_value(key))?;
            let mut copy = first.clone();
            copy.insert(name.clone(), new_key.clone());
            let mut more = items.to_vec();
            more.push(Bson::Document(copy));
            Some((format!("add a copy of {field}[0] with {name} {}", describe(&new_key)), more))
        }
        Align::Position => {
            let last = items.last()?;
            let mut more = items.to_vec();
            more.push(last.clone());
            Some((format!("add a copy of the last element of {field}"), more))
        }
    }
}

/// Remove: the first element (by field), or the last (by position).
fn removed(field: &str, align: &Align, items: &[Bson]) -> Option<(String, Vec<Bson>)> {
    if items.is_empty() {
        return None;
    }
    let mut fewer = items.to_vec();
    let removed = match align {
        Align::Field(_) => {
            fewer.remove(0);
            "the first"
        }
        Align::Position => {
            fewer.pop();
            "the last"
        }
    };
    Some((format!("remove {removed} element of {field}"), fewer))
}

/// Reverse the order, when that changes the array.
fn reversed(field: &str, items: &[Bson]) -> Option<(String, Vec<Bson>)> {
    if items.len() < 2 {
        return None;
    }
    let reversed: Vec<Bson> = items.iter().rev().cloned().collect();
    if same(&Bson::Array(reversed.clone()), &Bson::Array(items.to_vec())) {
        return None;
    }
    Some((format!("reverse the order of {field}"), reversed))
}

/// The value-field edits of the first element (its alignment field is never unset).
fn first_element_edits(
    field: &str,
    align: &Align,
    element: &ScopePlan,
    items: &[Bson],
    monolith_items: &[Bson],
) -> Vec<(String, Vec<Bson>)> {
    let Some(first) = first_document(items) else { return Vec::new() };
    let align_field = match align {
        Align::Field(name) => Some(name.as_str()),
        Align::Position => None,
    };
    let mut out = Vec::new();
    for (inner, what, value) in field_edits(element, first_document(monolith_items), first, None, align_field) {
        let changed = match value {
            Some(v) => with_value(first, &inner, v),
            None => without(first, &inner),
        };
        let mut next = items.to_vec();
        next[0] = Bson::Document(changed);
        out.push((format!("in {field}[0]: {what}"), next));
    }
    out
}
