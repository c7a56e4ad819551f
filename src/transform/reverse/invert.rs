//! Which target fields of a transform go back into the monolith's shape, and how: the static
//! half of reverse sync, worked out once when the definitions load.
//!
//! A service that becomes the writer of its aggregates must have every change written back in
//! the monolith's shape. Writing those reverse mappings by hand would define every field twice,
//! so they are derived from the forward transforms instead: a target field whose expression is a
//! monolith path, possibly through casts, an injective value map or `camel_keys`, reverses on its
//! own (a *lens*); an array built with `each` reverses element by element when its elements can
//! be aligned by an id. Everything else loses information on the way forward (a comparison, a
//! ratio, a constant, a non-injective map) and needs a `[reverse]` entry in the file saying what
//! to do: never write it back (`read_only`, with the reason) or a rule (`set` a monolith path
//! `from` an expression). Missing, unneeded or broken entries are definition errors, reported at
//! load like every other, so a transform that loads is a transform whose reverse is fully known.
//! Rollups and targets built from array elements are never written back: each side recomputes
//! them. [`super::put`] runs the plans made here.

use std::collections::{BTreeMap, BTreeSet};

use bson::Bson;

use crate::transform::expr::{Expr, Root};
use crate::transform::model::{
    Align, Computed, DocumentPlan, FieldPlan, Fields, How, Input, Key, Lens, Reversal, ScopePlan, Shape, Target,
};
use crate::transform::value::{CmpOp, Func, ValueMap};

/// A `[reverse]` entry as written in the file.
#[derive(Debug, Clone)]
pub(in crate::transform) struct Entry {
    /// The target field it is about (`availability.inStock`, `sources`, `messages.role`).
    pub target: String,
    pub line: usize,
    pub kind: EntryKind,
}

#[derive(Debug, Clone)]
pub(in crate::transform) enum EntryKind {
    /// `{ read_only = "why" }`: never written back; `put` reports a conflict when the service
    /// holds another value than the patched monolith document implies.
    ReadOnly(String),
    /// `{ set = "path", from = "expression" }`: write `path` (relative to the document, or to
    /// the element inside an array) with the expression's value; absent unsets it.
    Rule { set: String, from: Expr },
    /// `{ align = "field" | "position" }`: how the elements of an array are matched.
    Align(Align),
}

/// A problem found while planning, for the compiler to report with file and line.
#[derive(Debug, Clone)]
pub(in crate::transform) struct Problem {
    pub field: String,
    pub line: Option<usize>,
    pub message: String,
}

/// Why a field does not reverse on its own, and which entries can describe it.
#[derive(Debug, Clone)]
struct NotAuto {
    why: String,
    options: Options,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Options {
    /// A single value: `read_only` or a rule.
    Leaf,
    /// An array whose elements carry no id: `align` or `read_only`.
    Array,
    /// An array `each` cannot write back at all: `read_only`.
    ReadOnlyArray,
}

/// How a field would reverse on its own.
#[derive(Debug, Clone)]
enum Auto {
    Lens(Lens),
    Array { source: String, id: String },
}

/// One target field of a scope before the entries are consulted.
struct Candidate<'f> {
    target: String,
    forward: Computed,
    element: Option<&'f Fields>,
    auto: Result<Auto, NotAuto>,
}

/// Plans the reverse of one transform and checks its `[reverse]` entries against it.
/// `lines` maps target paths (`availability.inStock`) to the line declaring them.
pub(in crate::transform) fn plan(
    target: &Target,
    input: &Input,
    when: Option<&Expr>,
    entries: Vec<Entry>,
    lines: &BTreeMap<String, usize>,
    source_collection: &str,
) -> (Reversal, Vec<Problem>) {
    let mut p = Planner {
        entries: BTreeMap::new(),
        problems: Vec::new(),
        lines,
        objects: BTreeSet::new(),
        read_only_arrays: BTreeSet::new(),
        unplanned_arrays: BTreeSet::new(),
    };
    for e in entries {
        if let Some(first) = p.entries.get(&e.target) {
            let message = format!("`{}` has an entry already (line {})", e.target, first.line);
            p.problem(&format!("reverse.{}", e.target), Some(e.line), message);
        } else {
            p.entries.insert(e.target.clone(), e);
        }
    }
    let derived = match (target, input) {
        (Target::Document { key: Key::Template(_), .. }, _) => {
            Some("an entry of a key-value store (`[redis]`): forward only, a cache never writes back".to_string())
        }
        (Target::Rollup(_), _) => Some(format!(
            "a rollup over many `{source_collection}` documents: each side recomputes it, nothing is written back"
        )),
        (Target::Document { .. }, Input::Element { .. }) => Some(format!(
            "built from array elements of `{source_collection}` (derived events): each side recomputes it from \
             the arrays, nothing is written back"
        )),
        (Target::Document { .. }, Input::Document) => None,
    };
    if let Some(why) = derived {
        let entries = std::mem::take(&mut p.entries);
        for e in entries.values() {
            let message = format!("this target is never written back ({why}); remove [reverse]");
            p.problem(&format!("reverse.{}", e.target), Some(e.line), message);
        }
        return (Reversal::Derived(why), p.problems);
    }
    let Target::Document { key, fields } = target else {
        return (Reversal::Derived(String::new()), p.problems);
    };
    let scope = p.scope(fields, "", false);
    p.leftovers();
    let key = match key {
        Key::SourceId | Key::Template(_) => None,
        Key::Field { name, .. } => Some(name.clone()),
    };
    let plan = DocumentPlan { scope, key, when_constants: when_constants(when) };
    (Reversal::Document(plan), p.problems)
}

struct Planner<'l> {
    entries: BTreeMap<String, Entry>,
    problems: Vec<Problem>,
    lines: &'l BTreeMap<String, usize>,
    /// Full target paths of sub-documents, read-only arrays and arrays without a plan, to
    /// explain entries that name them or fields inside them.
    objects: BTreeSet<String>,
    read_only_arrays: BTreeSet<String>,
    unplanned_arrays: BTreeSet<String>,
}

impl Planner<'_> {
    fn problem(&mut self, field: &str, line: Option<usize>, message: impl Into<String>) {
        self.problems.push(Problem { field: field.to_string(), line, message: message.into() });
    }

    fn scope(&mut self, fields: &Fields, prefix: &str, in_element: bool) -> ScopePlan {
        let mut candidates = Vec::new();
        self.collect(fields, prefix, "", in_element, &mut candidates);
        overlaps(&mut candidates);
        let mut plan = ScopePlan::default();
        for c in candidates {
            if let Some(how) = self.resolve(&c, prefix) {
                plan.fields.push(FieldPlan { target: c.target, forward: c.forward, how });
            }
        }
        self.check_rules(&plan, prefix);
        plan
    }

    /// Flattens sub-documents into dotted targets.
    fn collect<'f>(
        &mut self,
        fields: &'f Fields,
        prefix: &str,
        at: &str,
        in_element: bool,
        out: &mut Vec<Candidate<'f>>,
    ) {
        for (name, shape) in fields {
            let target = join(at, name);
            match shape {
                Shape::Value(expr) => out.push(Candidate {
                    auto: lens_of(expr, in_element)
                        .map(Auto::Lens)
                        .map_err(|why| NotAuto { why, options: Options::Leaf }),
                    target,
                    forward: Computed::Value(expr.clone()),
                    element: None,
                }),
                Shape::Object(inner) => {
                    self.objects.insert(join(prefix, &target));
                    self.collect(inner, prefix, &target, in_element, out);
                }
                Shape::Each { source, fields } => out.push(Candidate {
                    auto: array_auto(source, fields, in_element),
                    target,
                    forward: Computed::Each { source: source.clone(), fields: fields.clone() },
                    element: Some(fields),
                }),
            }
        }
    }

    fn resolve(&mut self, c: &Candidate<'_>, prefix: &str) -> Option<How> {
        let full = join(prefix, &c.target);
        let entry = self.entries.remove(&full);
        let at = format!("reverse.{full}");
        match (&c.auto, entry) {
            (Ok(Auto::Lens(lens)), entry) => {
                if let Some(e) = entry {
                    let how = match &c.forward {
                        Computed::Value(expr) => format!("← {expr}"),
                        Computed::Each { .. } => String::new(),
                    };
                    self.problem(
                        &at,
                        Some(e.line),
                        format!("`{full}` reverses automatically ({how}); remove this entry"),
                    );
                }
                Some(How::Lens(lens.clone()))
            }
            (Ok(Auto::Array { source, id }), entry) => {
                if let Some(e) = entry {
                    let message = format!(
                        "`{full}` reverses automatically (elements aligned by their id, `{id}`); remove this entry"
                    );
                    self.problem(&at, Some(e.line), message);
                }
                let element = self.scope(c.element?, &full, true);
                let align = Align::Field(id.clone());
                Some(How::Array { source: source.clone(), align, by_rule: false, element })
            }
            (Err(not), None) => {
                if c.element.is_some() {
                    self.unplanned_arrays.insert(full.clone());
                }
                let line = self.lines.get(&full).copied();
                let add = match not.options {
                    Options::Leaf => format!(
                        "\"{full}\" = {{ read_only = \"<why the service never changes it>\" }} or \
                         {{ set = \"<monolith path>\", from = \"<expression of $value>\" }}"
                    ),
                    Options::Array => format!(
                        "\"{full}\" = {{ align = \"<element field that identifies an element>\" }}, \
                         {{ align = \"position\" }} or {{ read_only = \"<why the service never changes it>\" }}"
                    ),
                    Options::ReadOnlyArray => {
                        format!("\"{full}\" = {{ read_only = \"<why the service never changes it>\" }}")
                    }
                };
                let message = format!("not automatically reversible: {}; add to [reverse]: {add}", not.why);
                self.problem(&format!("fields.{full}"), line, message);
                None
            }
            (Err(not), Some(e)) => {
                let how = self.entry(c, &full, not, e);
                if how.is_none() && c.element.is_some() {
                    self.unplanned_arrays.insert(full);
                }
                how
            }
        }
    }

    /// A field that needs an entry, and has one.
    fn entry(&mut self, c: &Candidate<'_>, full: &str, not: &NotAuto, e: Entry) -> Option<How> {
        let at = format!("reverse.{full}");
        match (not.options, e.kind) {
            (_, EntryKind::ReadOnly(why)) => {
                if not.options != Options::Leaf {
                    self.read_only_arrays.insert(full.to_string());
                }
                Some(How::ReadOnly(why))
            }
            (Options::Leaf, EntryKind::Rule { set, from }) => Some(How::Rule { set, from }),
            (Options::Leaf, EntryKind::Align(_)) => {
                self.problem(
                    &at,
                    Some(e.line),
                    format!("`align` is for arrays built with `each`; `{full}` is a value"),
                );
                None
            }
            (Options::Array | Options::ReadOnlyArray, EntryKind::Rule { .. }) => {
                let message = format!("`{full}` is an array built with `each`: it takes `align` or `read_only`");
                self.problem(&at, Some(e.line), message);
                None
            }
            (Options::ReadOnlyArray, EntryKind::Align(_)) => {
                self.problem(&at, Some(e.line), format!("{}; only `read_only` can describe it", not.why));
                None
            }
            (Options::Array, EntryKind::Align(align)) => {
                let fields = c.element?;
                if let Align::Field(name) = &align {
                    let single = fields.iter().any(|(k, s)| k == name && matches!(s, Shape::Value(_)));
                    if !single {
                        let known: Vec<&str> = fields
                            .iter()
                            .filter(|(_, s)| matches!(s, Shape::Value(_)))
                            .map(|(k, _)| k.as_str())
                            .collect();
                        let message = format!(
                            "`align = \"{name}\"` must name a single-value field of the elements of `{full}` \
                             (they have: {}), or be \"position\"",
                            known.join(", ")
                        );
                        self.problem(&at, Some(e.line), message);
                        return None;
                    }
                }
                let Computed::Each { source, .. } = &c.forward else { return None };
                let source = match lens_of(source, false) {
                    Ok(lens) => lens.path,
                    Err(_) => return None,
                };
                let element = self.scope(fields, full, true);
                Some(How::Array { source, align, by_rule: true, element })
            }
        }
    }

    /// A rule's `set` must not write inside (or around) a path another field writes back.
    fn check_rules(&mut self, plan: &ScopePlan, prefix: &str) {
        let writes: Vec<(&str, &str)> = plan
            .fields
            .iter()
            .filter_map(|f| match &f.how {
                How::Lens(l) => Some((f.target.as_str(), l.path.as_str())),
                How::Rule { set, .. } => Some((f.target.as_str(), set.as_str())),
                How::Array { source, .. } => Some((f.target.as_str(), source.as_str())),
                How::ReadOnly(_) => None,
            })
            .collect();
        for f in &plan.fields {
            let How::Rule { set, .. } = &f.how else { continue };
            for (other, path) in &writes {
                if *other != f.target && (strictly_inside(set, path) || strictly_inside(path, set)) {
                    let full = join(prefix, &f.target);
                    let line = self.lines.get(&full).copied();
                    let message = format!(
                        "the rule sets `{set}`, and `{}` writes `{path}` back: one would overwrite part of the \
                         other; set a path no other field writes, or the same path",
                        join(prefix, other)
                    );
                    self.problem(&format!("reverse.{full}"), line, message);
                }
            }
        }
    }

    /// Entries that named no field of the target.
    fn leftovers(&mut self) {
        let entries = std::mem::take(&mut self.entries);
        for e in entries.values() {
            let inside = |set: &BTreeSet<String>| set.iter().find(|a| strictly_inside(&e.target, a)).cloned();
            let message = if self.objects.contains(&e.target) {
                format!("`{}` is a sub-document; entries name the fields inside it", e.target)
            } else if let Some(array) = inside(&self.read_only_arrays) {
                format!("`{}` is inside `{array}`, which is read_only as a whole", e.target)
            } else if let Some(array) = inside(&self.unplanned_arrays) {
                format!("`{}` is inside `{array}`, which needs its own entry first", e.target)
            } else {
                format!("`{}` is not a target field of [fields]", e.target)
            };
            self.problem(&format!("reverse.{}", e.target), Some(e.line), message);
        }
    }
}

/// Paths written back by two fields of one scope must not nest: the deeper one does not reverse
/// on its own (writing both would have MongoDB refuse the update, or one overwrite the other).
fn overlaps(candidates: &mut [Candidate<'_>]) {
    let writes: Vec<Option<(String, String)>> = candidates
        .iter()
        .map(|c| match &c.auto {
            Ok(Auto::Lens(l)) => Some((c.target.clone(), l.path.clone())),
            Ok(Auto::Array { source, .. }) => Some((c.target.clone(), source.clone())),
            Err(_) => None,
        })
        .collect();
    for (i, c) in candidates.iter_mut().enumerate() {
        let Some((_, mine)) = &writes[i] else { continue };
        let outer = writes.iter().flatten().find(|(_, other)| strictly_inside(mine, other));
        if let Some((target, other)) = outer {
            let options = if c.element.is_some() { Options::ReadOnlyArray } else { Options::Leaf };
            let why = format!("it reads `{mine}`, inside `{other}`, which `{target}` writes back whole");
            c.auto = Err(NotAuto { why, options });
        }
    }
}

/// Whether dotted path `inner` lies strictly inside `outer`.
pub(super) fn strictly_inside(inner: &str, outer: &str) -> bool {
    inner.len() > outer.len() && inner.starts_with(outer) && inner.as_bytes()[outer.len()] == b'.'
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() { name.to_string() } else { format!("{at}.{name}") }
}

/// The lens a forward expression is, or why it is not one.
pub(super) fn lens_of(expr: &Expr, in_element: bool) -> Result<Lens, String> {
    match expr {
        Expr::Path { root: Root::Input, path } => plain(path),
        Expr::Path { root: Root::Doc, path } if path.is_empty() => {
            Err("`$doc` is the whole monolith document, not one of its fields".into())
        }
        Expr::Path { root: Root::Doc, .. } if in_element => {
            Err(format!("`{expr}` reads the document from inside an array element: every element would write it back"))
        }
        Expr::Path { root: Root::Doc, path } => plain(path),
        Expr::Path { root: Root::Event(_), .. } => {
            Err(format!("`{expr}` comes from the event, which the monolith document does not hold"))
        }
        Expr::Path { root: Root::Key, .. } => {
            Err("`$key` is the event's aggregate id, not a field the transform maps".into())
        }
        Expr::Path { root: Root::Id, .. } => Err("`$id` is the monolith's `_id`, which never changes".into()),
        Expr::Path { .. } => Err(format!("`{expr}` is not a monolith field")),
        Expr::Literal(_) => Err(format!("`{expr}` is a constant")),
        Expr::Call { func, args, .. } => {
            let inner = || match args.as_slice() {
                [inner] => lens_of(inner, in_element),
                _ => Err(format!("`{expr}` takes several values")),
            };
            match func {
                Func::Cast(_) | Func::CamelKeys => {
                    let mut lens = inner()?;
                    lens.steps.push(func.clone());
                    Ok(lens)
                }
                Func::Map(map) => {
                    injective(map)?;
                    let mut lens = inner()?;
                    lens.steps.push(func.clone());
                    Ok(lens)
                }
                Func::Ratio => Err(format!("`{expr}` is computed from several fields")),
                Func::Default => Err(format!(
                    "`{expr}` writes a default for an absent or null value, and the service cannot tell the \
                     default from a real value"
                )),
                Func::Concat => Err(format!("`{expr}` joins several values into one text")),
                Func::Drop => Err(format!("`{expr}` leaves sub-fields out, which only the monolith still has")),
            }
        }
        Expr::Compare { .. } | Expr::And(..) | Expr::Or(..) | Expr::Not(_) => {
            Err(format!("`{expr}` is a condition: it keeps whether it holds, not the values it reads"))
        }
    }
}

fn plain(path: &str) -> Result<Lens, String> {
    if path.split('.').any(|s| s.parse::<usize>().is_ok()) {
        return Err(format!("`{path}` reads an array element by its position"));
    }
    Ok(Lens { path: path.to_string(), steps: Vec::new() })
}

/// A value map reverses when no two of its entries give the same value.
fn injective(map: &ValueMap) -> Result<(), String> {
    let mut seen: Vec<(&Bson, &str)> = Vec::new();
    for (from, to) in &map.entries {
        if let Some((_, first)) = seen.iter().find(|(v, _)| *v == to) {
            let to = match to {
                Bson::String(s) => format!("`{s}`"),
                other => format!("`{other}`"),
            };
            return Err(format!("value map `{}` is not injective: `{first}` and `{from}` both become {to}", map.name));
        }
        seen.push((to, from));
    }
    Ok(())
}

/// How an array built with `each` reverses on its own: a plain source path and an element id
/// (an element field that is a plain copy of `id` or `_id`).
fn array_auto(source: &Expr, fields: &Fields, in_element: bool) -> Result<Auto, NotAuto> {
    let source = match lens_of(source, in_element) {
        Ok(lens) if lens.steps.is_empty() => lens.path,
        _ => {
            let why = format!("`each` reads `{source}`, which is not a plain path of the monolith document");
            return Err(NotAuto { why, options: Options::ReadOnlyArray });
        }
    };
    let id = fields.iter().find(|(_, shape)| {
        matches!(shape, Shape::Value(Expr::Path { root: Root::Input, path }) if path == "id" || path == "_id")
    });
    match id {
        Some((name, _)) => Ok(Auto::Array { source, id: name.clone() }),
        None => Err(NotAuto {
            why: format!(
                "the elements of `{source}` carry no id (no element field is a plain copy of `id` or `_id`), so \
                 service elements cannot be matched with monolith elements"
            ),
            options: Options::Array,
        }),
    }
}

/// The `path == constant` conjuncts of a filter.
fn when_constants(when: Option<&Expr>) -> Vec<(String, Bson)> {
    fn walk(e: &Expr, out: &mut Vec<(String, Bson)>) {
        match e {
            Expr::And(l, r) => {
                walk(l, out);
                walk(r, out);
            }
            Expr::Compare { op: CmpOp::Eq, left, right } => match (left.as_ref(), right.as_ref()) {
                (Expr::Path { root: Root::Input | Root::Doc, path }, Expr::Literal(v))
                | (Expr::Literal(v), Expr::Path { root: Root::Input | Root::Doc, path })
                    if !path.is_empty() && *v != Bson::Null =>
                {
                    out.push((path.clone(), v.clone()));
                }
                _ => {}
            },
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(e) = when {
        walk(e, &mut out);
    }
    out
}

/// Whether a `set` path names a monolith field a rule may write.
pub(in crate::transform) fn valid_set_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.split('.').any(|s| s.is_empty() || s.starts_with('$') || s.contains('\0')) {
        return Err(format!("`{path}` is not a monolith field path"));
    }
    if path == "_id" || path.starts_with("_id.") {
        return Err("`_id` never changes; a rule cannot set it".into());
    }
    Ok(())
}
