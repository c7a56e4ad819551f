//! The `[reverse]` table of a definition: one entry per target field saying what the planner
//! (`reverse::invert`) cannot infer, read and checked here like the rest of the file.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::node::{Node, Raw};
use super::{Compiler, REVERSE_KEYS, join};
use crate::transform::expr::{self, Context};
use crate::transform::model::Align;
use crate::transform::reverse::invert;
use crate::transform::value::ValueMap;

/// An entry's keys as written: each key's text and the line it is on.
type EntrySlots = BTreeMap<&'static str, (String, usize)>;

impl Compiler<'_> {
    /// `[reverse]`: one inline table per target field, `{ read_only = "why" }`,
    /// `{ set = "monolith.path", from = "expression" }` or `{ align = "field" | "position" }`.
    pub(super) fn reverse_entries(
        &mut self,
        node: &Node,
        maps: &BTreeMap<String, Arc<ValueMap>>,
    ) -> Vec<invert::Entry> {
        let Raw::Table(entries) = &node.value else {
            self.err(
                "reverse",
                Some(node.line),
                format!("expected a table of target fields, found {}", node.value.kind()),
            );
            return Vec::new();
        };
        let cx = Context { maps, allow_group: false, reverse: true };
        let mut out = Vec::new();
        for (target, n) in entries {
            if let Some(kind) = self.reverse_entry(target, n, &cx) {
                out.push(invert::Entry { target: target.clone(), line: n.line, kind });
            }
        }
        out
    }

    /// One entry of `[reverse]`, for target field `target`: what its keys say, or `None` once
    /// the problem is reported.
    fn reverse_entry(&mut self, target: &str, n: &Node, cx: &Context<'_>) -> Option<invert::EntryKind> {
        let field = format!("reverse.{target}");
        let Raw::Table(keys) = &n.value else {
            self.err(
                &field,
                Some(n.line),
                format!(
                    "expected {{ read_only = \"why\" }}, {{ set = \"path\", from = \"expression\" }} or \
                     {{ align = \"field\" }}, found {}",
                    n.value.kind()
                ),
            );
            return None;
        };
        let mut slots = self.entry_slots(&field, keys);
        let line = n.line;
        match (slots.remove("read_only"), slots.remove("set"), slots.remove("from"), slots.remove("align")) {
            (Some((why, l)), None, None, None) => {
                if why.trim().is_empty() {
                    self.err(&field, Some(l), "`read_only` takes the reason the service never changes this field");
                    return None;
                }
                Some(invert::EntryKind::ReadOnly(why))
            }
            (None, Some((set, set_line)), Some((src, from_line)), None) => {
                self.reverse_rule(&field, set, set_line, &src, from_line, cx)
            }
            (None, None, None, Some((align, _))) => {
                Some(invert::EntryKind::Align(if align == "position" { Align::Position } else { Align::Field(align) }))
            }
            (None, Some(_), None, None) | (None, None, Some(_), None) => {
                self.err(&field, Some(line), "a rule takes both `set` (the monolith path) and `from` (its value)");
                None
            }
            (None, None, None, None) => {
                self.err(&field, Some(line), "empty entry: give `read_only`, `set` and `from`, or `align`");
                None
            }
            _ => {
                self.err(&field, Some(line), "give one of `read_only`, `set` with `from`, or `align`");
                None
            }
        }
    }

    /// The known keys of one entry with their text and line; unknown keys and values that are
    /// not text are reported and left out.
    fn entry_slots(&mut self, field: &str, keys: &[(String, Node)]) -> EntrySlots {
        let mut slots: EntrySlots = BTreeMap::new();
        for (key, v) in keys {
            match REVERSE_KEYS.iter().find(|k| **k == key) {
                Some(k) => {
                    if let Some(text) = self.text(&join(field, key), v) {
                        slots.insert(k, (text, v.line));
                    }
                }
                None => self.err(
                    &join(field, key),
                    Some(v.line),
                    format!("unknown key (expected one of: {})", REVERSE_KEYS.join(", ")),
                ),
            }
        }
        slots
    }

    /// A rule, `{ set = "path", from = "expression" }`: a `set` path the planner cannot use is
    /// reported (the rule still counts, so its field is not reported missing too); a `from`
    /// that does not parse drops the entry.
    fn reverse_rule(
        &mut self,
        field: &str,
        set: String,
        set_line: usize,
        src: &str,
        from_line: usize,
        cx: &Context<'_>,
    ) -> Option<invert::EntryKind> {
        if let Err(why) = invert::valid_set_path(&set) {
            self.err(&join(field, "set"), Some(set_line), why);
        }
        let from = match expr::parse(src, cx) {
            Ok(e) => e,
            Err(e) => {
                self.err(&join(field, "from"), Some(from_line), format!("in `{src}`: {e}"));
                return None;
            }
        };
        Some(invert::EntryKind::Rule { set, from })
    }
}
