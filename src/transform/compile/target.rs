//! The target of a definition: its `[fields]` (values, objects, arrays built with `each`), its
//! key, and its `[rollup]`, each checked as it compiles.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bson::Bson;

use super::node::{Node, Raw};
use super::{Compiler, ROLLUP_KEYS, join};
use crate::transform::builtins;
use crate::transform::expr::{Context, Expr, Root};
use crate::transform::model::{Fields, Input, Key, Rollup, Shape};
use crate::transform::value::ValueMap;

impl Compiler<'_> {
    /// A top-level table of target fields (`[fields]`, `[rollup.fields]`); `None` when it is not
    /// a table.
    pub(super) fn field_table(&mut self, at: &str, node: &Node, cx: &Context<'_>) -> Option<Fields> {
        let Raw::Table(entries) = &node.value else {
            self.err(at, Some(node.line), format!("expected a table of target fields, found {}", node.value.kind()));
            return None;
        };
        let sets_id = |key: &str| key.split('.').next() == Some("_id");
        for (key, n) in entries.iter().filter(|(k, _)| sets_id(k)) {
            self.err(
                &join(at, key),
                Some(n.line),
                "the sink sets `_id`: use key = \"_id\" to keep the monolith's, or key = \"<field>\" for a natural key",
            );
        }
        Some(self.fields(at, entries.iter().filter(|(k, _)| !sets_id(k)), node.line, cx))
    }

    pub(super) fn fields<'n>(
        &mut self,
        at: &str,
        entries: impl Iterator<Item = &'n (String, Node)>,
        line: usize,
        cx: &Context<'_>,
    ) -> Fields {
        let mut out = Fields::new();
        let mut declared = 0;
        for (key, node) in entries {
            declared += 1;
            let field = join(at, key);
            let segments: Vec<&str> = key.split('.').collect();
            if segments.iter().any(|s| s.is_empty() || s.starts_with('$') || s.contains('\0')) {
                self.err(&field, Some(node.line), format!("`{key}` is not a target field path"));
                continue;
            }
            if let Some(target) = field.strip_prefix("fields.") {
                self.lines.insert(target.to_string(), node.line);
            }
            let Some(shape) = self.shape(&field, node, cx) else { continue };
            if let Err(clash) = insert(&mut out, &segments, shape) {
                self.err(&field, Some(node.line), format!("`{}` is declared more than once", join(at, &clash)));
            }
        }
        if declared == 0 {
            self.err(at, Some(line), "declares no fields");
        }
        out
    }

    pub(super) fn shape(&mut self, field: &str, node: &Node, cx: &Context<'_>) -> Option<Shape> {
        match &node.value {
            Raw::Text(src) => self.expr(field, node, src, cx).map(Shape::Value),
            Raw::Int(i) => Some(Shape::Value(Expr::Literal(builtins::int_value(*i)))),
            Raw::Float(f) => Some(Shape::Value(Expr::Literal(Bson::Double(*f)))),
            Raw::Bool(b) => Some(Shape::Value(Expr::Literal(Bson::Boolean(*b)))),
            Raw::Table(entries) => match entries.iter().find(|(k, _)| k == "each") {
                Some((_, each)) => {
                    let each_field = join(field, "each");
                    let source = self.text(&each_field, each).and_then(|src| self.expr(&each_field, each, &src, cx));
                    let fields = self.fields(field, entries.iter().filter(|(k, _)| k != "each"), node.line, cx);
                    Some(Shape::Each { source: source?, fields })
                }
                None => Some(Shape::Object(self.fields(field, entries.iter(), node.line, cx))),
            },
            other => {
                self.err(
                    field,
                    Some(node.line),
                    format!("expected an expression (text), a number, a boolean or a table, found {}", other.kind()),
                );
                None
            }
        }
    }

    pub(super) fn key(&mut self, node: &Node, fields: &Fields, input: &Input) -> Option<Key> {
        let name = self.text("key", node)?;
        let element = matches!(input, Input::Element { .. });
        if name == "_id" {
            if element {
                self.err("key", Some(node.line), "array elements have no `_id`; name a field of [fields]");
                return None;
            }
            return Some(Key::SourceId);
        }
        match fields.iter().find(|(k, _)| *k == name) {
            Some((_, Shape::Value(expr))) if element && expr.reads_event() => {
                self.err(
                    "key",
                    Some(node.line),
                    format!(
                        "`{name}` reads `$event`: the key of an element's target must come from the element \
                         (and `$key`), so the document's own changes can tell which elements it still has"
                    ),
                );
                None
            }
            Some((_, Shape::Value(expr))) => Some(Key::Field { name, expr: expr.clone() }),
            _ => {
                self.err(
                    "key",
                    Some(node.line),
                    format!("`{name}` must be a top-level field of [fields] holding a single value, or \"_id\""),
                );
                None
            }
        }
    }

    pub(super) fn rollup(&mut self, node: &Node, maps: &BTreeMap<String, Arc<ValueMap>>) -> Option<Rollup> {
        let Raw::Table(entries) = &node.value else {
            self.err("rollup", Some(node.line), format!("expected a table, found {}", node.value.kind()));
            return None;
        };
        let cx = Context { maps, allow_group: false, reverse: false };
        let (mut group, mut count, mut distinct, mut fields) = (None, None, Vec::new(), Fields::new());
        for (key, n) in entries {
            let field = format!("rollup.{key}");
            match key.as_str() {
                "group" => group = self.text(&field, n).and_then(|src| self.expr(&field, n, &src, &cx)),
                "count" => count = self.rollup_count(&field, n),
                "distinct" => distinct = self.rollup_distinct(&field, n, &cx),
                "fields" => fields = self.rollup_fields(&field, n, maps),
                _ => {
                    self.err(&field, Some(n.line), format!("unknown key (expected one of: {})", ROLLUP_KEYS.join(", ")))
                }
            }
        }
        if group.is_none() && !entries.iter().any(|(k, _)| k == "group") {
            self.err("rollup.group", Some(node.line), "missing: the expression that names a source document's group");
        }
        if count.is_none() && !entries.iter().any(|(k, _)| k == "count") {
            self.err("rollup.count", Some(node.line), "missing: the group field that counts members");
        }
        let mut taken: BTreeSet<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        for name in count.iter().chain(distinct.iter().map(|(k, _)| k)) {
            if !taken.insert(name) {
                self.err("rollup", Some(node.line), format!("`{name}` is declared more than once"));
            }
        }
        Some(Rollup { group: group?, count_field: count?, distinct, fields })
    }

    /// `rollup.count`: the top-level group field counting members.
    pub(super) fn rollup_count(&mut self, field: &str, n: &Node) -> Option<String> {
        self.text(field, n).filter(|name| {
            let ok = top_level_name(name);
            if !ok {
                self.err(field, Some(n.line), format!("`{name}` is not a top-level target field name"));
            }
            ok
        })
    }

    /// `[rollup.distinct]`: group arrays of the distinct values over the members.
    pub(super) fn rollup_distinct(&mut self, field: &str, n: &Node, cx: &Context<'_>) -> Vec<(String, Expr)> {
        let Raw::Table(arrays) = &n.value else {
            self.err(
                field,
                Some(n.line),
                format!("expected a table of `targetArray = \"expression\"`, found {}", n.value.kind()),
            );
            return Vec::new();
        };
        let mut distinct = Vec::new();
        for (target, e) in arrays {
            let f = join(field, target);
            if !top_level_name(target) {
                self.err(&f, Some(e.line), format!("`{target}` is not a top-level target field name"));
            } else if let Some(expr) = self.text(&f, e).and_then(|src| self.expr(&f, e, &src, cx)) {
                distinct.push((target.clone(), expr));
            }
        }
        distinct
    }

    /// `[rollup.fields]`: group fields, from `$group` and constants only.
    pub(super) fn rollup_fields(&mut self, field: &str, n: &Node, maps: &BTreeMap<String, Arc<ValueMap>>) -> Fields {
        let group_cx = Context { maps, allow_group: true, reverse: false };
        let fields = self.field_table(field, n, &group_cx).unwrap_or_default();
        for (name, shape) in &fields {
            if reads_source(shape) {
                self.err(
                    &join(field, name),
                    Some(n.line),
                    "group fields may use only `$group` and constants, so all members agree on them",
                );
            }
        }
        fields
    }
}

/// A top-level target field name: no dots, no `$`, not `_id`.
fn top_level_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['.', '$', '\0']) && name != "_id"
}

pub(super) fn reads_doc(shape: &Shape) -> bool {
    match shape {
        Shape::Value(e) => e.reads_root(Root::Doc),
        Shape::Object(fields) => fields.iter().any(|(_, s)| reads_doc(s)),
        Shape::Each { source, fields } => source.reads_root(Root::Doc) || fields.iter().any(|(_, s)| reads_doc(s)),
    }
}

fn reads_source(shape: &Shape) -> bool {
    match shape {
        Shape::Value(e) => e.reads_source(),
        Shape::Object(fields) => fields.iter().any(|(_, s)| reads_source(s)),
        Shape::Each { .. } => true,
    }
}

/// Places a shape at a dotted target path, merging objects; on a clash returns the clashing path.
fn insert(fields: &mut Fields, path: &[&str], shape: Shape) -> Result<(), String> {
    let Some((head, rest)) = path.split_first() else { return Ok(()) };
    let existing = fields.iter_mut().find(|(k, _)| k == head);
    match (existing, shape) {
        (None, shape) => {
            let shape = if rest.is_empty() {
                shape
            } else {
                let mut inner = Fields::new();
                insert(&mut inner, rest, shape)?;
                Shape::Object(inner)
            };
            fields.push((head.to_string(), shape));
            Ok(())
        }
        (Some((_, Shape::Object(inner))), shape) if !rest.is_empty() => {
            insert(inner, rest, shape).map_err(|clash| join(head, &clash))
        }
        (Some((_, Shape::Object(inner))), Shape::Object(more)) => {
            for (k, s) in more {
                insert(inner, &[k.as_str()], s).map_err(|clash| join(head, &clash))?;
            }
            Ok(())
        }
        _ => Err(path.join(".")),
    }
}
