//! One compiled transform applied to one canonical event: the writes that make the target
//! reflect the source document's new state.
//!
//! Targets hold live documents derived from source documents, so every rule here is about
//! state, not about the operation: a document that passes the filter is upserted whole; one
//! that stops passing (or is deleted) has its target removed, keyed from the before-state when
//! the event carries one and by source document otherwise; a natural key that changed removes
//! the old target; a rollup member moves to its new group. Nothing here reads a clock or a
//! random source, so the same event always yields the same writes.

use std::borrow::Cow;

use bson::{Bson, Document};

use super::builtins::found;
use super::error::TransformError;
use super::expr::{Expr, Scope};
use super::model::{Fields, Input, Key, Rollup, Shape, Target, Transform};
use super::op::WriteOp;
use crate::event::{CanonicalEvent, Op, SnapshotMarker};

/// A failure inside the fields: which target field, and why.
pub(super) struct FieldError {
    field: String,
    reason: String,
}

impl Transform {
    /// Whether this transform reads the event.
    pub(super) fn reads(&self, ev: &CanonicalEvent) -> bool {
        ev.data.collection == self.source_collection && self.events.contains(&ev.event_type)
    }

    /// The sweep a completed snapshot calls for here: where this transform follows the deletes
    /// of the snapshotted collection, and, for whole documents, reads its snapshot copies too.
    pub(super) fn sweep(&self, marker: &SnapshotMarker) -> Option<WriteOp> {
        let follows = marker.collection == self.source_collection && self.events.contains(&marker.delete_type);
        let mirrors = match self.input {
            Input::Document => follows && self.events.contains(&marker.snapshot_type),
            Input::Element { .. } => follows,
        };
        mirrors.then(|| WriteOp::Sweep {
            collection: self.collection.clone(),
            source_collection: self.source_collection.clone(),
            before: marker.start.clone(),
            partition: marker.partition,
            partitions: marker.partitions,
            rollup: match &self.target {
                Target::Rollup(r) => {
                    Some((r.count_field.clone(), r.distinct.iter().map(|(name, _)| name.clone()).collect()))
                }
                Target::Document { .. } => None,
            },
        })
    }

    /// For a target of array elements: a change of the source document itself says which
    /// elements it has now, and so which of its target documents stay ([`WriteOp::Retain`]).
    /// Elements that do not pass `when` or yield no key build nothing, so they are not kept.
    pub(super) fn retain(&self, ev: &CanonicalEvent) -> Option<WriteOp> {
        let Input::Element { array } = &self.input else { return None };
        let Target::Document { key: Key::Field { expr, .. }, .. } = &self.target else { return None };
        let data = &ev.data;
        let document_event =
            data.collection == self.source_collection && data.derived.is_none() && data.op != Op::Delete;
        let after = data.after.as_ref().filter(|_| document_event)?;
        let empty = Document::new();
        let mut keep = Vec::new();
        if let Some(Bson::Array(elements)) = crate::event::mapping::get_path(after, array) {
            for element in elements {
                let Bson::Document(element) = element else { continue };
                // The same scope a derived event of this element gets: no document, the element.
                let scope = Scope::forward(ev, &empty, element);
                if !matches!(self.passes(&scope), Ok(true)) {
                    continue;
                }
                if let Some(id) = expr.eval(&scope).ok().and_then(|v| key_value(v.as_deref()).ok())
                    && !keep.contains(&id)
                {
                    keep.push(id);
                }
            }
        }
        Some(WriteOp::Retain { collection: self.collection.clone(), keep })
    }

    /// Appends the event's writes to `out`.
    pub(super) fn apply(&self, ev: &CanonicalEvent, out: &mut Vec<WriteOp>) -> Result<(), TransformError> {
        match &self.target {
            Target::Document { key, fields } => self.document(key, fields, ev, out),
            Target::Rollup(rollup) => self.rollup(rollup, ev, out),
        }
    }

    fn error(&self, field: impl Into<String>, reason: impl Into<String>) -> TransformError {
        TransformError {
            file: self.file.clone(),
            transform: self.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn passes(&self, scope: &Scope<'_>) -> Result<bool, TransformError> {
        match &self.when {
            None => Ok(true),
            Some(when) => when.truthy(scope).map_err(|e| self.error("when", e.to_string())),
        }
    }

    fn document(
        &self,
        key: &Key,
        fields: &Fields,
        ev: &CanonicalEvent,
        out: &mut Vec<WriteOp>,
    ) -> Result<(), TransformError> {
        let data = &ev.data;
        if data.op == Op::Delete {
            out.extend(self.retract(key, ev));
            return Ok(());
        }
        let empty = Document::new();
        let (doc, input) = match self.input {
            Input::Document => match &data.after {
                Some(after) => (after, after),
                // The document vanished before the update was looked up; its delete follows.
                None => return Ok(()),
            },
            Input::Element { .. } => match data.derived.as_ref().map(|d| &d.element) {
                Some(Bson::Document(element)) => (data.after.as_ref().unwrap_or(&empty), element),
                Some(other) => {
                    return Err(
                        self.error("(event)", format!("the derived element is {}, expected a document", found(other)))
                    );
                }
                None => {
                    return Err(
                        self.error("(event)", format!("a `{}` event without its derived element", ev.event_type))
                    );
                }
            },
        };
        let scope = Scope::forward(ev, doc, input);
        let changed = self.input == Input::Document && matches!(data.op, Op::Update | Op::Replace);
        if !self.passes(&scope)? {
            // Filtered out now: whatever an earlier state of the document fed goes away.
            if changed {
                out.extend(self.retract(key, ev));
            }
            return Ok(());
        }
        let target = build(fields, &scope, "").map_err(|e| self.error(e.field, e.reason))?.unwrap_or_default();
        let id =
            match key {
                Key::SourceId => data.document_id.clone(),
                Key::Field { name, expr } => key_value(target.get(name))
                    .map_err(|why| self.error(name.as_str(), format!("the key `{expr}` {why}")))?,
                Key::Template(t) => Bson::String(t.render(|f| target.get(f)).map_err(|(field, why)| {
                    self.error(format!("redis.key `{}`", t.source), format!("`{field}` {why}"))
                })?),
            };
        if changed
            && let Some(WriteOp::Delete { id: Some(old), .. }) = self.retract(key, ev)
            && old != id
        {
            // The natural key changed: the target under the old key is gone.
            out.push(WriteOp::Delete { collection: self.collection.clone(), id: Some(old) });
        }
        out.push(WriteOp::Upsert { collection: self.collection.clone(), id, doc: target });
        Ok(())
    }

    /// The delete that removes what the document's previous state fed to this target: keyed from
    /// the before-state when the event has one, by source document otherwise; nothing when the
    /// before-state shows the document did not feed this target.
    fn retract(&self, key: &Key, ev: &CanonicalEvent) -> Option<WriteOp> {
        let delete = |id| WriteOp::Delete { collection: self.collection.clone(), id };
        let by_source = match key {
            Key::SourceId => delete(Some(ev.data.document_id.clone())),
            Key::Field { .. } | Key::Template(_) => delete(None),
        };
        let before = match (&self.input, &ev.data.before) {
            (Input::Document, Some(before)) => before,
            // Without a before-state (or for array elements, which a document's before-state
            // does not key) only the sink knows what this document produced.
            _ => return Some(by_source),
        };
        let scope = Scope::forward(ev, before, before);
        match self.passes(&scope) {
            Ok(false) => return None,
            Ok(true) => {}
            Err(_) => return Some(by_source),
        }
        match key {
            Key::SourceId => Some(by_source),
            Key::Field { expr, .. } => {
                let old = expr.eval(&scope).ok().and_then(|v| key_value(v.as_deref()).ok());
                Some(old.map_or(by_source, |k| delete(Some(k))))
            }
            Key::Template(t) => {
                // A before-state whose key does not render never made an entry (it was refused):
                // nothing to delete.
                let Target::Document { fields, .. } = &self.target else { return Some(by_source) };
                let before = build(fields, &scope, "").ok().flatten().unwrap_or_default();
                t.render(|f| before.get(f)).ok().map(|k| delete(Some(Bson::String(k))))
            }
        }
    }

    fn rollup(&self, rollup: &Rollup, ev: &CanonicalEvent, out: &mut Vec<WriteOp>) -> Result<(), TransformError> {
        let data = &ev.data;
        let write = |group: Option<Bson>, distinct, group_fields| WriteOp::Rollup {
            collection: self.collection.clone(),
            group,
            member: data.document_id.clone(),
            count_field: rollup.count_field.clone(),
            distinct,
            group_fields,
        };
        let leave =
            || write(None, rollup.distinct.iter().map(|(name, _)| (name.clone(), None)).collect(), Document::new());
        let after = match (data.op, &data.after) {
            (Op::Delete, _) => {
                out.push(leave());
                return Ok(());
            }
            (_, Some(after)) => after,
            (_, None) => return Ok(()),
        };
        let scope = Scope::forward(ev, after, after);
        if !self.passes(&scope)? {
            out.push(leave());
            return Ok(());
        }
        let group = match rollup.group.eval(&scope).map_err(|e| self.error("rollup.group", e.to_string()))? {
            None => None,
            Some(v) => match v.as_ref() {
                Bson::Null => None,
                Bson::String(s) if s.is_empty() => None,
                Bson::Document(_) | Bson::Array(_) => {
                    return Err(self.error(
                        "rollup.group",
                        format!("`{}` must be a single value, found {}", rollup.group, found(&v)),
                    ));
                }
                _ => Some(v.into_owned()),
            },
        };
        let Some(group) = group else {
            out.push(leave());
            return Ok(());
        };
        let mut distinct = Vec::with_capacity(rollup.distinct.len());
        for (name, expr) in &rollup.distinct {
            let v = expr.eval(&scope).map_err(|e| self.error(format!("rollup.distinct.{name}"), e.to_string()))?;
            distinct.push((name.clone(), v.filter(|v| !matches!(**v, Bson::Null)).map(Cow::into_owned)));
        }
        let group_scope = Scope { group: Some(&group), ..scope };
        let group_fields = build(&rollup.fields, &group_scope, "")
            .map_err(|e| self.error(format!("rollup.fields.{}", e.field), e.reason))?
            .unwrap_or_default();
        out.push(write(Some(group), distinct, group_fields));
        Ok(())
    }
}

/// A key must be one present, non-empty, single value.
fn key_value(v: Option<&Bson>) -> Result<Bson, String> {
    match v {
        None => Err("has no value".into()),
        Some(Bson::Null) => Err("is null".into()),
        Some(Bson::String(s)) if s.is_empty() => Err("is an empty string".into()),
        Some(v @ (Bson::Document(_) | Bson::Array(_))) => Err(format!("must be a single value, found {}", found(v))),
        Some(v) => Ok(v.clone()),
    }
}

/// Builds a (sub)document from its field shapes; `None` when no field had a value, so an object
/// whose sources are all absent is left out rather than written empty.
fn build(fields: &Fields, scope: &Scope<'_>, at: &str) -> Result<Option<Document>, FieldError> {
    let mut out = Document::new();
    for (name, shape) in fields {
        let field = if at.is_empty() { name.clone() } else { format!("{at}.{name}") };
        let value = match shape {
            Shape::Value(expr) => {
                expr.eval(scope).map_err(|e| FieldError { field, reason: e.to_string() })?.map(Cow::into_owned)
            }
            Shape::Object(inner) => build(inner, scope, &field)?.map(Bson::Document),
            Shape::Each { source, fields } => each(source, fields, scope, &field)?,
        };
        if let Some(v) = value {
            out.insert(name.clone(), v);
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

/// Maps every element of a source array through `fields`.
pub(super) fn each(source: &Expr, fields: &Fields, scope: &Scope<'_>, field: &str) -> Result<Option<Bson>, FieldError> {
    let fail = |reason: String| FieldError { field: field.to_string(), reason: format!("`{source}`: {reason}") };
    let Some(value) = source.eval(scope).map_err(|e| FieldError { field: field.to_string(), reason: e.to_string() })?
    else {
        return Ok(None);
    };
    let items = match value.as_ref() {
        Bson::Null => return Ok(Some(Bson::Null)),
        Bson::Array(items) => items,
        other => return Err(fail(format!("expected an array, found {}", found(other)))),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Bson::Document(element) = item else {
            return Err(fail(format!("element {i} is {}, expected a document", found(item))));
        };
        let at = format!("{field}[{i}]");
        out.push(Bson::Document(build(fields, &scope.with_input(element), &at)?.unwrap_or_default()));
    }
    Ok(Some(Bson::Array(out)))
}
