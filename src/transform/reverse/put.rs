//! A service document back into the monolith's shape: `put(monolith, service) -> Patch` (pure).
//!
//! When a service database becomes the writer of the aggregates it owns, each of its changes has
//! to reach the monolith, which other services still read. The reverse of a transform is derived
//! from the transform itself ([`super::invert`] plans it at load), in the manner of Boomerang's
//! lenses: `put` takes the monolith document as it is now (the complement: every field the
//! transform does not read, the lexical form of every value it does) and the service document,
//! and returns a field-scoped patch: `$set`/`$unset` of the monolith paths the transform reads,
//! never a whole-document replace. Arrays are aligned element by element by an element id, so
//! fields of an element the transform does not read stay with that element. Where two target
//! fields come from one monolith field and the service changed them differently, the patch says
//! so (a disagreement) instead of picking one; where the service holds a read-only field (a
//! computed one) that the patched monolith document would not produce, the patch says so too
//! (a conflict). The laws `put(m, get(m))` = no change and `get(put(m, v))` = `v` are checked by
//! [`super::laws`] and `ficus lens check`.

use std::borrow::Cow;

use bson::{Bson, Document, Timestamp, doc};

use super::lens::route_field;
use super::patch::{Conflict, Disagreement, Patch, Rebased, ReverseError, diff, outermost_array, set_path, unset_path};
use crate::event::CanonicalEvent;
use crate::event::mapping::{ChangeRecord, change_event, get_path};
use crate::transform::builtins::{found, same_doc, same_opt};
use crate::transform::elements::{MergedArray, Wins};
use crate::transform::error::TransformError;
use crate::transform::expr::{Expr, Scope};
use crate::transform::model::{Align, Computed, DocumentPlan, How, Key, ScopePlan, Target, Transform};
use crate::transform::op::WriteOp;

/// The metadata field ficus's sink writes on every service document (`sink::META`):
/// `{ v, src: { c, id }, event }`. Named here rather than imported, to keep this pure module
/// apart from the sink.
const FICUS_META: &str = "_ficus";

/// The reverse of one transform: how documents of one service collection go back into one
/// monolith collection. Obtained from [`crate::transform::ServiceTransforms::reverse_for`].
#[derive(Debug, Clone, Copy)]
pub struct Reverse<'a> {
    pub(in crate::transform) t: &'a Transform,
    pub(in crate::transform) plan: &'a DocumentPlan,
}

/// One write a field calls for, before fields sharing a monolith path are reconciled.
#[derive(Debug)]
struct Write {
    path: String,
    field: String,
    service: Option<Bson>,
    /// `None`: unset.
    value: Option<Bson>,
    /// Whether the service changed the field (an unchanged one writes nothing, but tells which
    /// of two fields sharing a path changed).
    changed: bool,
}

/// A monolith array being aligned: its path and current value, the forward of each of its
/// elements, and the forward scope around it.
#[derive(Clone, Copy)]
struct Monolith<'m, 's> {
    /// The array's monolith path, for naming disagreements inside elements.
    path: &'m str,
    current: Option<&'m Bson>,
    images: &'m [Bson],
    forward: &'m Scope<'s>,
}

/// What stays fixed while a document is reversed.
struct Cx<'a> {
    r: &'a Reverse<'a>,
    /// The whole service document (`$doc` in rules).
    service: &'a Document,
}

impl<'a> Reverse<'a> {
    /// The service collection this reverse reads.
    pub fn collection(&self) -> &'a str {
        &self.t.collection
    }

    /// The monolith collection it writes.
    pub fn source_collection(&self) -> &'a str {
        &self.t.source_collection
    }

    /// The transform file it comes from.
    pub fn file(&self) -> &'a std::path::Path {
        &self.t.file
    }

    /// The routing key of a service document, as the monolith holds it (`user_id` of a
    /// customer, from its `lineUserId`): which aggregate it belongs to for ownership. `None`
    /// when the document lacks it.
    pub fn route_value(&self, service: &Document) -> Option<Bson> {
        match route_field(self.t, self.plan)? {
            (target, None) => service.get(&target).cloned(),
            (target, Some(lens)) => lens.put(get_path(service, &target)?, None).ok(),
        }
    }

    /// The target document the forward transform makes of a monolith document; `None` when it
    /// does not pass `when`.
    pub fn image(&self, monolith: &Document) -> Result<Option<Document>, TransformError> {
        self.forward(monolith.clone())
    }

    /// The filter that finds the monolith document a service document belongs to: the source
    /// `_id` ficus recorded in the document's `_ficus.src` when it names this monolith collection
    /// (it survives a change of natural key); else its `_id` for `key = "_id"` targets; for a
    /// natural key, the key field's monolith path and the key written back in its default form
    /// (`{ sku: "SKU-000042" }`).
    pub fn locate(&self, service: &Document) -> Result<Document, ReverseError> {
        if let Ok(src) = service.get_document(FICUS_META).and_then(|m| m.get_document("src"))
            && src.get_str("c").is_ok_and(|c| c == self.t.source_collection)
            && let Some(id) = src.get("id").filter(|id| !matches!(id, Bson::Null))
        {
            return Ok(doc! { "_id": id.clone() });
        }
        let Some(key) = &self.plan.key else {
            return match service.get("_id") {
                Some(id) => Ok(doc! { "_id": id.clone() }),
                None => Err(self.error("_id", None, "the service document has no `_id`, which is the monolith's")),
            };
        };
        let value = service.get(key).filter(|v| !matches!(v, Bson::Null));
        let Some(value) = value else {
            return Err(self.error(key, None, "the service document has no key value"));
        };
        let field = self.plan.scope.fields.iter().find(|f| f.target == *key);
        match field.map(|f| &f.how) {
            Some(How::Lens(lens)) => {
                let back = lens.put(value, None).map_err(|why| self.error(key, Some(value), why))?;
                Ok(doc! { lens.path.clone(): back })
            }
            Some(How::Rule { set, from }) => {
                let scope =
                    Scope { event: None, doc: service, input: service, group: None, value: Some(value), source: None };
                let back = from.eval(&scope).map_err(|e| self.error(key, Some(value), e.to_string()))?;
                match back {
                    Some(v) => Ok(doc! { set.clone(): v.into_owned() }),
                    None => Err(self.error(key, Some(value), format!("the rule's `{from}` gives no value"))),
                }
            }
            _ => Err(self.error(key, Some(value), "the key is read-only, so no monolith document can be found by it")),
        }
    }

    /// The patch that makes `monolith` (`None`: a document the monolith has never seen) say what
    /// `service` says, limited to the fields this transform reads. `_id` and ficus's `_ficus`
    /// metadata in `service` are ignored, as are fields the transform does not write (the
    /// service's own). Read-only fields are checked after patching: the forward transform runs
    /// on the patched document and each difference is a [`Conflict`].
    pub fn put(&self, monolith: Option<&Document>, service: &Document) -> Result<Patch, ReverseError> {
        let empty = Document::new();
        let m = monolith.unwrap_or(&empty);
        let event = self.snapshot(m.clone());
        let cx = Cx { r: self, service };
        let forward = Scope::forward(&event, m, m);
        let mut patch = Patch::default();
        let mut writes = cx.scope(&self.plan.scope, monolith, &forward, service, "", &mut patch)?;
        if monolith.is_none() {
            for (path, value) in &self.plan.when_constants {
                if !writes.iter().any(|w| w.path == *path) {
                    writes.push(Write {
                        path: path.clone(),
                        field: "(when)".into(),
                        service: None,
                        value: Some(value.clone()),
                        changed: true,
                    });
                }
            }
        }
        for (path, value) in reconcile(writes, m, "", &mut patch.disagreements) {
            match value {
                Some(v) => {
                    patch.set.insert(path, v);
                }
                None => patch.unset.push(path),
            }
        }
        let mut patched = m.clone();
        if monolith.is_none()
            && matches!(self.t.target, Target::Document { key: Key::SourceId, .. })
            && let Some(id) = service.get("_id")
        {
            patched.insert("_id", id.clone());
        }
        patch.apply_to(&mut patched)?;
        // Without read-only fields or `when`, the forward of the patched document can only
        // agree with the service (the laws `ficus lens check` proves), so it is not run.
        if self.t.when.is_some() || self.plan.scope.has_read_only() {
            self.check(&patched, service, &mut patch)?;
        }
        Ok(patch)
    }

    /// The `_id` a monolith document created from a service document takes: the service's
    /// `_id` where the transform keys by the monolith's `_id`; `None` (a fresh one) otherwise.
    pub fn insert_id(&self, service: &Document) -> Option<Bson> {
        match self.t.target {
            Target::Document { key: Key::SourceId, .. } => service.get("_id").cloned(),
            _ => None,
        }
    }

    /// The element id of each array a service document holds (built with `each`), by its target
    /// path: `("purchaseHistory", Some("purchaseId"))`, or `None` where elements are matched by
    /// position (`align = "position"`). Arrays inside array elements are not listed: they go with
    /// their element. The three-way merge of arrays ([`crate::transform::elements::merge`]) takes these ids,
    /// in this direction and the other.
    pub fn array_keys(&self) -> Vec<(String, Option<String>)> {
        let id = |align: &Align| match align {
            Align::Field(name) => Some(name.clone()),
            Align::Position => None,
        };
        self.plan
            .scope
            .fields
            .iter()
            .filter_map(|f| match &f.how {
                How::Array { align, .. } => Some((f.target.clone(), id(align))),
                _ => None,
            })
            .collect()
    }

    /// What a service change says about the monolith document as it is now:
    /// [`Reverse::rebase_merged`]'s document.
    pub fn rebase(&self, monolith: Option<&Document>, change: &crate::event::EventData) -> Option<Document> {
        self.rebase_merged(monolith, change).document
    }

    /// What a service change says about the monolith document as it is now: the service's own
    /// changes (an update's fields, or what a replace changed against its pre-image) laid over
    /// the service-shaped image of the monolith's current document, so that [`Reverse::put`]
    /// writes back exactly what the service changed and leaves every other field as the
    /// monolith has it, concurrent monolith changes included. An update whose document is gone
    /// by the time it was read (a delete follows) still says what it changed. The whole
    /// document after the change where there is nothing to lay it over (an insert, no monolith
    /// document, no pre-image, a monolith document outside the target); `None` when there is
    /// nothing at all.
    ///
    /// A change at or inside an array (`purchaseHistory.3`, `purchaseHistory.1.status`, the
    /// whole array, an array the update cut: `truncatedArrays`) is never laid by index, since
    /// the monolith's array may have another shape by now (its own code pushed or removed
    /// elements). The whole outermost array is merged three ways by element id
    /// ([`crate::transform::elements::merge`], ids from [`Reverse::array_keys`]): the array in the
    /// change's pre-image, in its exact result (the pre-image with the update's description
    /// applied, [`crate::event::update`]), and in the image of the monolith document; the
    /// change's side wins where both changed an element (a write-back is the owner's), and
    /// those elements come back in [`Rebased::conflicts`] for the caller to record. Without a pre-image (or with one the description does not
    /// fit) the array after the change is taken whole from the document looked up after it,
    /// which may hold later service changes too but never an index laid on another shape; with
    /// no document after it either, the paths are laid as they are.
    pub fn rebase_merged(&self, monolith: Option<&Document>, change: &crate::event::EventData) -> Rebased {
        use crate::event::Op;
        let whole = || Rebased { document: change.after.clone(), conflicts: Vec::new() };
        // What the change did, and the document before and after it where known exactly.
        let (changed, removed, exact) = match (change.op, &change.changed, &change.before, &change.after) {
            (Op::Update, Some(changed), before, _) => {
                let exact = before.as_ref().and_then(|b| Some((b, change.update_applied_to(b)?.ok()?)));
                (changed.clone(), change.removed.clone(), exact)
            }
            (Op::Replace | Op::Update, _, Some(before), Some(after)) => {
                let (changed, removed) = diff(before, after);
                (changed, removed, Some((before, after.clone())))
            }
            _ => return whole(),
        };
        let Some(mut out) = monolith.and_then(|m| self.image(m).ok().flatten()) else { return whole() };
        // The outermost arrays the change reaches, judged on the service's own documents.
        let seen = [exact.as_ref().map(|e| e.0), exact.as_ref().map(|e| &e.1), change.after.as_ref()];
        let paths = changed.keys().chain(&removed).chain(change.truncated.iter().map(|t| &t.field));
        let mut arrays: Vec<String> = Vec::new();
        for a in paths.filter_map(|p| outermost_array(p, &seen)) {
            if !arrays.contains(&a) {
                arrays.push(a);
            }
        }
        let after_array = |a: &str| change.after.as_ref().map(|d| get_path(d, a).cloned());
        let laid_whole = |a: &String| exact.is_some() || after_array(a).is_some();
        let inside = |p: &str| arrays.iter().any(|a| laid_whole(a) && (p == a || p.starts_with(&format!("{a}."))));
        for (path, value) in changed.iter().filter(|(p, _)| !inside(p)) {
            if set_path(&mut out, path, value.clone()).is_err() {
                return whole(); // the shapes differ too much to lay one over the other
            }
        }
        for path in removed.iter().filter(|p| !inside(p)) {
            unset_path(&mut out, path);
        }
        let keys = self.array_keys();
        let mut conflicts = Vec::new();
        for a in arrays.iter().filter(|a| laid_whole(a)) {
            let merged = match &exact {
                Some((pre, post)) => {
                    let id = keys.iter().find(|(k, _)| k == a).and_then(|(_, id)| id.as_deref());
                    crate::transform::elements::merge(
                        get_path(pre, a),
                        get_path(post, a),
                        get_path(&out, a),
                        id,
                        Wins::Change,
                    )
                }
                None => MergedArray { value: after_array(a).flatten(), conflicts: Vec::new() },
            };
            match merged.value {
                Some(v) => {
                    if set_path(&mut out, a, v).is_err() {
                        return whole();
                    }
                }
                None => unset_path(&mut out, a),
            }
            conflicts.extend(merged.conflicts.into_iter().map(|c| (a.clone(), c)));
        }
        Rebased { document: Some(out), conflicts }
    }

    fn error(&self, field: &str, value: Option<&Bson>, reason: impl Into<String>) -> ReverseError {
        ReverseError::Value {
            file: self.t.file.clone(),
            transform: self.t.name.clone(),
            field: field.to_string(),
            value: value.map(|v| Box::new(v.clone())),
            reason: reason.into(),
        }
    }

    /// The monolith document as the tail would publish a snapshot copy of it (its change
    /// event; the events derived from its arrays are of no use here).
    fn snapshot(&self, doc: Document) -> CanonicalEvent {
        let record = ChangeRecord::snapshot(&self.t.source_collection, doc, Timestamp { time: 0, increment: 0 });
        change_event(&self.t.def, "", record).0
    }

    /// The target document the forward transform makes of a monolith document; `None` when it
    /// does not pass `when`.
    pub(super) fn forward(&self, doc: Document) -> Result<Option<Document>, TransformError> {
        let event = self.snapshot(doc);
        let mut out = Vec::new();
        self.t.apply(&event, &mut out)?;
        Ok(out.into_iter().find_map(|w| match w {
            WriteOp::Upsert { collection, doc, .. } if collection == self.t.collection => Some(doc),
            _ => None,
        }))
    }

    /// Runs the forward on the patched document and compares each read-only field with the
    /// service's value.
    fn check(&self, patched: &Document, service: &Document, patch: &mut Patch) -> Result<(), ReverseError> {
        let Some(target) = self.forward(patched.clone())? else {
            let when = self.t.when.as_ref().map(ToString::to_string).unwrap_or_default();
            patch.conflicts.push(Conflict {
                field: "(when)".into(),
                service: None,
                monolith: None,
                reason: format!(
                    "the patched monolith document no longer passes `{when}`: the forward would delete the \
                     service's document"
                ),
            });
            return Ok(());
        };
        read_only(&self.plan.scope, &target, service, "", &mut patch.conflicts);
        Ok(())
    }
}

/// Compares the read-only fields of one scope (and of aligned arrays' elements).
fn read_only(plan: &ScopePlan, target: &Document, service: &Document, at: &str, out: &mut Vec<Conflict>) {
    for f in &plan.fields {
        let field = join(at, &f.target);
        let (mine, theirs) = (get_path(target, &f.target), get_path(service, &f.target));
        match &f.how {
            How::ReadOnly(reason) => {
                let from_event = match &f.forward {
                    Computed::Value(e) => e.reads_event(),
                    Computed::Each { .. } => false,
                };
                if !from_event && !same_opt(mine, theirs) {
                    out.push(Conflict {
                        field,
                        service: theirs.cloned(),
                        monolith: mine.cloned(),
                        reason: reason.clone(),
                    });
                }
            }
            How::Array { element, .. }
                if element.fields.iter().any(|e| matches!(e.how, How::ReadOnly(_) | How::Array { .. })) =>
            {
                if let (Some(Bson::Array(a)), Some(Bson::Array(b))) = (mine, theirs) {
                    for (i, (x, y)) in a.iter().zip(b).enumerate() {
                        if let (Bson::Document(x), Bson::Document(y)) = (x, y) {
                            read_only(element, x, y, &format!("{field}[{i}]"), out);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Reconciles the writes of one scope: per monolith path, the changed fields' values must agree
/// (else a [`Disagreement`] and nothing is written there); what equals the monolith's current
/// value is dropped. Returns `(path, Some(value) | None for unset)` in field order.
fn reconcile(
    writes: Vec<Write>,
    m: &Document,
    at: &str,
    disagreements: &mut Vec<Disagreement>,
) -> Vec<(String, Option<Bson>)> {
    let mut paths: Vec<String> = Vec::new();
    for w in &writes {
        if !paths.contains(&w.path) {
            paths.push(w.path.clone());
        }
    }
    let mut out = Vec::new();
    for path in paths {
        let changed: Vec<&Write> = writes.iter().filter(|w| w.path == path && w.changed).collect();
        let Some(first) = changed.first() else { continue };
        if !changed.iter().all(|w| same_opt(w.value.as_ref(), first.value.as_ref())) {
            disagreements.push(Disagreement {
                path: join(at, &path),
                fields: changed.iter().map(|w| (w.field.clone(), w.service.clone())).collect(),
            });
            continue;
        }
        if same_opt(first.value.as_ref(), get_path(m, &path)) {
            continue;
        }
        out.push((path, first.value.clone()));
    }
    out
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() { name.to_string() } else { format!("{at}.{name}") }
}

/// Reads a target path from a service document; a sub-document path holding something else is
/// an error (the forward never writes one).
fn service_value<'d>(doc: &'d Document, path: &str) -> Result<Option<&'d Bson>, (String, &'d Bson)> {
    let mut cur = doc;
    let mut walked = String::new();
    let mut segments = path.split('.').peekable();
    while let Some(seg) = segments.next() {
        let Some(v) = cur.get(seg) else { return Ok(None) };
        if segments.peek().is_none() {
            return Ok(Some(v));
        }
        walked = join(&walked, seg);
        match v {
            Bson::Document(d) => cur = d,
            other => return Err((walked, other)),
        }
    }
    Ok(None)
}

impl Cx<'_> {
    /// The writes the fields of one scope call for. `m` is the monolith scope (the document, or
    /// the aligned element; `None` when there is none), `forward` evaluates the forward
    /// expressions over it, `s` is the service scope.
    fn scope(
        &self,
        plan: &ScopePlan,
        m: Option<&Document>,
        forward: &Scope<'_>,
        s: &Document,
        at: &str,
        patch: &mut Patch,
    ) -> Result<Vec<Write>, ReverseError> {
        let empty = Document::new();
        let mdoc = m.unwrap_or(&empty);
        let mut writes = Vec::new();
        for f in &plan.fields {
            let field = join(at, &f.target);
            let sv = service_value(s, &f.target).map_err(|(path, v)| {
                let path = join(at, &path);
                self.r.error(&field, Some(v), format!("expected a sub-document at `{path}`, found {}", found(v)))
            })?;
            let (path, current) = match &f.how {
                How::ReadOnly(_) => continue,
                How::Lens(lens) => (&lens.path, get_path(mdoc, &lens.path)),
                How::Rule { set, .. } => (set, get_path(mdoc, set)),
                How::Array { source, .. } => (source, get_path(mdoc, source)),
            };
            // What the forward makes of the monolith's current value: equal to the service's,
            // the field is unchanged and writes nothing.
            let image: Option<Option<Bson>> = match &f.forward {
                Computed::Value(expr) => expr.eval(forward).ok().map(|v| v.map(Cow::into_owned)),
                Computed::Each { source, fields } => {
                    crate::transform::apply::each(source, fields, forward, &field).ok()
                }
            };
            let unchanged = image.as_ref().is_some_and(|v| same_opt(v.as_ref(), sv));
            if unchanged {
                let value = current.cloned();
                writes.push(Write { path: path.clone(), field, service: sv.cloned(), value, changed: false });
                continue;
            }
            let value = match (&f.how, sv) {
                (How::Rule { from, .. }, sv) => self.rule(from, sv, m, s, &field)?,
                (_, None) => None,
                (How::Lens(lens), Some(v)) => {
                    Some(lens.put(v, current).map_err(|why| self.r.error(&field, Some(v), why))?)
                }
                (How::Array { align, element, .. }, Some(v)) => {
                    let images = match &image {
                        Some(Some(Bson::Array(items))) => items.as_slice(),
                        _ => &[],
                    };
                    let monolith = Monolith { path, current, images, forward };
                    Some(self.array(align, element, v, &monolith, &field, patch)?)
                }
                (How::ReadOnly(_), Some(_)) => continue,
            };
            writes.push(Write { path: path.clone(), field, service: sv.cloned(), value, changed: true });
        }
        Ok(writes)
    }

    /// A `[reverse]` rule's value: `$value` the service's, plain paths the service scope,
    /// `$source` the monolith scope.
    fn rule(
        &self,
        from: &Expr,
        v: Option<&Bson>,
        m: Option<&Document>,
        s: &Document,
        field: &str,
    ) -> Result<Option<Bson>, ReverseError> {
        let scope = Scope { event: None, doc: self.service, input: s, group: None, value: v, source: m };
        let value = from.eval(&scope).map_err(|e| self.r.error(field, v, e.to_string()))?;
        Ok(value.map(Cow::into_owned))
    }

    /// A service array back into the monolith array, element by element: each service element
    /// is matched with a monolith element (by the alignment field's value and its occurrence,
    /// or by position), takes that element as its complement, and the result follows the
    /// service's order; unmatched monolith elements are dropped, unmatched service elements are
    /// built from the fields the transform reads.
    fn array(
        &self,
        align: &Align,
        element: &ScopePlan,
        v: &Bson,
        monolith: &Monolith<'_, '_>,
        field: &str,
        patch: &mut Patch,
    ) -> Result<Bson, ReverseError> {
        let Monolith { path, current, images, forward } = *monolith;
        let items = match v {
            Bson::Null => return Ok(Bson::Null),
            Bson::Array(items) => items,
            other => {
                return Err(self.r.error(field, Some(other), format!("expected an array, found {}", found(other))));
            }
        };
        let mine = self.monolith_elements(current, field)?;
        let keys = match align {
            Align::Field(name) => self.element_keys(name, element, &mine, forward, field)?,
            Align::Position => Vec::new(),
        };
        let service = self.service_elements(items, field)?;
        let matched = match_elements(align, &mine, &keys, images, &service);
        let mut out = Vec::with_capacity(items.len());
        for (j, se) in service.into_iter().enumerate() {
            let at = format!("{field}[{j}]");
            let me = matched[j].map(|i| mine[i]);
            let empty = Document::new();
            let inner = forward.with_input(me.unwrap_or(&empty));
            let writes = self.scope(element, me, &inner, se, &at, patch)?;
            let mut built = me.cloned().unwrap_or_default();
            let monolith_at = format!("{path}[{j}]");
            for (path, value) in reconcile(writes, me.unwrap_or(&empty), &monolith_at, &mut patch.disagreements) {
                let applied = match value {
                    Some(v) => set_path(&mut built, &path, v),
                    None => {
                        unset_path(&mut built, &path);
                        Ok(())
                    }
                };
                applied.map_err(|why| self.r.error(&at, None, why))?;
            }
            out.push(Bson::Document(built));
        }
        Ok(Bson::Array(out))
    }

    /// The monolith array's elements, which must all be documents to be aligned (none when
    /// there is no array).
    fn monolith_elements<'m>(&self, current: Option<&'m Bson>, field: &str) -> Result<Vec<&'m Document>, ReverseError> {
        let mut mine: Vec<&Document> = Vec::new();
        if let Some(Bson::Array(existing)) = current {
            for (i, e) in existing.iter().enumerate() {
                match e {
                    Bson::Document(d) => mine.push(d),
                    other => {
                        let reason = format!(
                            "the monolith's element {i} is {}, not a document: elements cannot be aligned",
                            found(other)
                        );
                        return Err(self.r.error(field, None, reason));
                    }
                }
            }
        }
        Ok(mine)
    }

    /// The alignment key of each monolith element: what the forward computes for the element
    /// field `name` from it.
    fn element_keys(
        &self,
        name: &str,
        element: &ScopePlan,
        mine: &[&Document],
        forward: &Scope<'_>,
        field: &str,
    ) -> Result<Vec<Option<Bson>>, ReverseError> {
        let key_of = |plan_field: &str, d: &Document| -> Result<Option<Bson>, ReverseError> {
            let Some(f) = element.fields.iter().find(|f| f.target == plan_field) else { return Ok(None) };
            let Computed::Value(expr) = &f.forward else { return Ok(None) };
            expr.eval(&forward.with_input(d))
                .map(|v| v.map(Cow::into_owned))
                .map_err(|e| self.r.error(field, None, format!("a monolith element's `{plan_field}`: {e}")))
        };
        let mut keys: Vec<Option<Bson>> = Vec::with_capacity(mine.len());
        for d in mine {
            keys.push(key_of(name, d)?);
        }
        Ok(keys)
    }

    /// The service array's elements, which must all be documents.
    fn service_elements<'s>(&self, items: &'s [Bson], field: &str) -> Result<Vec<&'s Document>, ReverseError> {
        let mut service: Vec<&Document> = Vec::with_capacity(items.len());
        for (j, item) in items.iter().enumerate() {
            match item {
                Bson::Document(se) => service.push(se),
                other => {
                    let at = format!("{field}[{j}]");
                    return Err(self.r.error(&at, Some(other), format!("expected a document, found {}", found(other))));
                }
            }
        }
        Ok(service)
    }
}

/// Which monolith element (index into `mine`) each service element is matched with. By
/// position; or by the alignment field, first with a monolith element whose forward (`images`)
/// is the service element exactly (so elements sharing a key keep their own complement when
/// they move), then by occurrence among those sharing the key (`keys`, one per monolith element).
fn match_elements(
    align: &Align,
    mine: &[&Document],
    keys: &[Option<Bson>],
    images: &[Bson],
    service: &[&Document],
) -> Vec<Option<usize>> {
    let mut taken = vec![false; mine.len()];
    let mut matched: Vec<Option<usize>> = vec![None; service.len()];
    match align {
        Align::Position => {
            for (j, m) in matched.iter_mut().enumerate() {
                *m = (j < mine.len()).then_some(j);
            }
        }
        Align::Field(name) => {
            let key = |se: &Document| se.get(name.as_str()).cloned();
            for exact in [true, false] {
                for (j, se) in service.iter().enumerate() {
                    if matched[j].is_some() {
                        continue;
                    }
                    let found = (0..mine.len()).find(|&i| {
                        !taken[i]
                            && same_opt(keys[i].as_ref(), key(se).as_ref())
                            && (!exact || matches!(images.get(i), Some(Bson::Document(img)) if same_doc(img, se)))
                    });
                    if let Some(i) = found {
                        taken[i] = true;
                        matched[j] = Some(i);
                    }
                }
            }
        }
    }
    matched
}
