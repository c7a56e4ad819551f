//! What a write-back says to the monolith: the field-scoped [`Patch`] `put` returns, its
//! conflicts and disagreements, the errors that stop one, and the `$set`/`$unset` path rules
//! that apply it the way MongoDB would.
//!
//! Kept apart from the lens that computes it (`put`): the sinks and the merge read and apply
//! patches and paths without needing the reverse itself.

use std::path::PathBuf;

use bson::{Bson, Document};

use crate::event::mapping::get_path;
use crate::transform::builtins::found;
use crate::transform::elements::ElementConflict;
use crate::transform::error::TransformError;

/// Why a service document cannot be written back. The consumer dead-letters the change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReverseError {
    /// A service value with no monolith form: a string where a number belongs, a value the
    /// monolith's type cannot hold exactly, a sub-document where a value belongs.
    #[error("{} ({transform}): {field}: {reason}", file.display())]
    Value {
        file: PathBuf,
        transform: String,
        /// The target field (`segmentation.lifetimeValue`, `purchaseHistory[2].amount`).
        field: String,
        /// The service's value, when the problem is one.
        value: Option<Box<Bson>>,
        reason: String,
    },
    /// The monolith document, patched, no longer transforms (a value the service did not send is
    /// broken there).
    #[error("the patched monolith document does not transform: {0}")]
    Forward(#[from] TransformError),
    /// A patch that cannot be applied to the document (MongoDB would refuse the update too).
    #[error("cannot apply the patch at `{path}`: {reason}")]
    Apply { path: String, reason: String },
}

/// A read-only field the service holds differently from what the patched monolith implies.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The target field (`availability.inStock`; `(when)` when the patched document would leave
    /// the target altogether).
    pub field: String,
    /// What the service holds (`None`: absent).
    pub service: Option<Bson>,
    /// What the patched monolith document makes of it (`None`: absent).
    pub monolith: Option<Bson>,
    /// Why the field is read-only, from the transform file.
    pub reason: String,
}

/// Two target fields from one monolith field, changed to values that disagree: nothing is
/// written to that field.
#[derive(Debug, Clone, PartialEq)]
pub struct Disagreement {
    /// The monolith field (`name_en`, `purchases[1].amount`).
    pub path: String,
    /// Each changed target field and the service's value (`None`: absent).
    pub fields: Vec<(String, Option<Bson>)>,
}

/// What the service document calls for in the monolith document: fields to set and to unset
/// (dotted monolith paths, MongoDB update semantics), plus what could not be written back
/// faithfully. The caller decides what to do with a patch that has conflicts or disagreements.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patch {
    /// Dotted monolith path → new value.
    pub set: Document,
    /// Dotted monolith paths to remove.
    pub unset: Vec<String>,
    pub conflicts: Vec<Conflict>,
    pub disagreements: Vec<Disagreement>,
}

impl Patch {
    /// Nothing to write and nothing to report.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.unset.is_empty() && self.conflicts.is_empty() && self.disagreements.is_empty()
    }

    /// Whether it reports conflicts or disagreements.
    pub fn has_issues(&self) -> bool {
        !self.conflicts.is_empty() || !self.disagreements.is_empty()
    }

    /// The MongoDB update document: `{ $set: {…}, $unset: {path: ""} }`, the empty parts left
    /// out. Values are data: a sub-document whose own keys begin with `$` is legal since MongoDB
    /// 5.0 but `$set` refuses it; a writer meeting one needs a pipeline update with `$literal`.
    pub fn to_update(&self) -> Document {
        let mut update = Document::new();
        if !self.set.is_empty() {
            update.insert("$set", self.set.clone());
        }
        if !self.unset.is_empty() {
            let unset: Document = self.unset.iter().map(|p| (p.clone(), Bson::String(String::new()))).collect();
            update.insert("$unset", unset);
        }
        update
    }

    /// Applies the patch to a document as MongoDB applies `$set` and `$unset` with dotted paths:
    /// missing sub-documents are created, a numeric segment indexes an array (padding with
    /// null), `$unset` of an array element nulls it, and unsetting what is not there does
    /// nothing. Paths that overlap, and paths through a value that is neither a document nor an
    /// array, are errors, as on the server; the document is then left unchanged.
    pub fn apply_to(&self, doc: &mut Document) -> Result<(), ReverseError> {
        let paths: Vec<&str> =
            self.set.keys().map(String::as_str).chain(self.unset.iter().map(String::as_str)).collect();
        for (i, a) in paths.iter().enumerate() {
            for b in &paths[i + 1..] {
                if a == b || super::invert::strictly_inside(a, b) || super::invert::strictly_inside(b, a) {
                    let reason = format!("`{a}` and `{b}` overlap; MongoDB refuses such an update");
                    return Err(ReverseError::Apply { path: a.to_string(), reason });
                }
            }
        }
        let mut out = doc.clone();
        let mut sets: Vec<(&String, &Bson)> = self.set.iter().collect();
        // MongoDB (5.0 on) applies the fields of an update operator in lexicographic order.
        sets.sort_by(|a, b| a.0.cmp(b.0));
        for (path, value) in sets {
            set_path(&mut out, path, value.clone())
                .map_err(|reason| ReverseError::Apply { path: path.clone(), reason })?;
        }
        for path in &self.unset {
            unset_path(&mut out, path);
        }
        *doc = out;
        Ok(())
    }
}

/// What changed from `before` to `after`, as an update would say it: dotted paths set (into
/// sub-documents present on both sides; arrays and other values whole) and paths removed.
pub(super) fn diff(before: &Document, after: &Document) -> (Document, Vec<String>) {
    fn walk(b: &Document, a: &Document, at: &str, set: &mut Document, removed: &mut Vec<String>) {
        for (k, av) in a {
            let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
            match (b.get(k), av) {
                (Some(Bson::Document(bd)), Bson::Document(ad)) => walk(bd, ad, &path, set, removed),
                (Some(bv), av) if bv == av => {}
                _ => {
                    set.insert(path, av.clone());
                }
            }
        }
        for k in b.keys().filter(|k| !a.contains_key(*k)) {
            removed.push(if at.is_empty() { k.clone() } else { format!("{at}.{k}") });
        }
    }
    let (mut set, mut removed) = (Document::new(), Vec::new());
    walk(before, after, "", &mut set, &mut removed);
    (set, removed)
}

/// Sets a dotted path the way `$set` does.
pub fn set_path(doc: &mut Document, path: &str, value: Bson) -> Result<(), String> {
    let segments: Vec<&str> = path.split('.').collect();
    let Some((last, parents)) = segments.split_last() else { return Err("empty path".into()) };
    let Some((first, rest)) = parents.split_first() else {
        doc.insert(*last, value);
        return Ok(());
    };
    let mut cur = doc.entry(first.to_string()).or_insert_with(|| Bson::Document(Document::new()));
    for (depth, seg) in rest.iter().enumerate() {
        cur = step_into(cur, seg, &parents[..=depth])?;
    }
    match cur {
        Bson::Document(d) => {
            d.insert(*last, value);
            Ok(())
        }
        Bson::Array(items) => match last.parse::<usize>() {
            Ok(i) => {
                if items.len() <= i {
                    items.resize(i + 1, Bson::Null);
                }
                items[i] = value;
                Ok(())
            }
            Err(_) => Err(format!("cannot create field `{last}` in the array at `{}`", parents.join("."))),
        },
        other => Err(format!("cannot create field `{last}` in {} at `{}`", found(other), parents.join("."))),
    }
}

/// One step down a path being set: into (or creating) a sub-document, or into an array element
/// (padding the array with null, the new element a sub-document).
fn step_into<'d>(cur: &'d mut Bson, seg: &str, at: &[&str]) -> Result<&'d mut Bson, String> {
    match cur {
        Bson::Document(d) => Ok(d.entry(seg.to_string()).or_insert_with(|| Bson::Document(Document::new()))),
        Bson::Array(items) => match seg.parse::<usize>() {
            Ok(i) => {
                if items.len() <= i {
                    items.resize(i, Bson::Null);
                    items.push(Bson::Document(Document::new()));
                }
                Ok(&mut items[i])
            }
            Err(_) => Err(format!("cannot create field `{seg}` in the array at `{}`", at.join("."))),
        },
        other => Err(format!("cannot create field `{seg}` in {} at `{}`", found(other), at.join("."))),
    }
}

/// Removes a dotted path the way `$unset` does (an array element becomes null).
pub fn unset_path(doc: &mut Document, path: &str) {
    let mut segments: Vec<&str> = path.split('.').collect();
    let Some(last) = segments.pop() else { return };
    let Some((first, rest)) = segments.split_first() else {
        doc.remove(last);
        return;
    };
    let Some(mut cur) = doc.get_mut(*first) else { return };
    for seg in rest {
        let next = match cur {
            Bson::Document(d) => d.get_mut(*seg),
            Bson::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        let Some(next) = next else { return };
        cur = next;
    }
    match cur {
        Bson::Document(d) => {
            d.remove(last);
        }
        Bson::Array(items) => {
            if let Some(slot) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                *slot = Bson::Null;
            }
        }
        _ => {}
    }
}

/// What a service change says about the monolith document ([`super::Reverse::rebase_merged`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rebased {
    /// The service-shaped document for [`super::Reverse::put`]; `None` when there is nothing at all.
    pub document: Option<Document>,
    /// Array elements the change and the monolith both changed, differently, by the array's
    /// target path: the change's version is in `document` (a write-back is the owner's).
    pub conflicts: Vec<(String, ElementConflict)>,
}

/// The outermost array on a dotted path (the path itself, or a prefix of it) in any of the
/// documents.
pub(super) fn outermost_array(path: &str, docs: &[Option<&Document>]) -> Option<String> {
    let segments: Vec<&str> = path.split('.').collect();
    (1..=segments.len())
        .map(|n| segments[..n].join("."))
        .find(|prefix| docs.iter().flatten().any(|d| matches!(get_path(d, prefix), Some(Bson::Array(_)))))
}
