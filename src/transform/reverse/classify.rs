//! Per service, collection and target field: does a service change go back into the monolith,
//! and how? Printed by `ficus validate` and `ficus lens check`.
//!
//! Before a service becomes the writer of its aggregates, its team and the monolith's need to
//! see, field by field, what reverse sync will do: which fields go back on their own (and from
//! which monolith field), which by a rule in the transform file, which are read-only (with the
//! file's reason) and which are derived and recomputed on each side. The answer is static (it
//! follows from the definitions alone), so it is worked out from the plans made at load.

use std::fmt::Write;
use std::path::PathBuf;

use crate::transform::ServiceTransforms;
use crate::transform::model::{Align, Computed, Fields, How, Reversal, ScopePlan, Shape, Target, Transform};

/// What happens to a service change of one target field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reversibility {
    /// Written back on its own; how (`← ltv | decimal`).
    Reversible(String),
    /// Written back by a `[reverse]` rule or alignment in the file; which.
    ByRule(String),
    /// Never written back; a service value the monolith would not produce is a conflict. Why,
    /// from the file.
    ReadOnly(String),
    /// Never written back: each side recomputes it. Why.
    Derived(String),
}

impl Reversibility {
    /// `reversible`, `reversible by rule`, `read-only` or `derived`.
    pub fn label(&self) -> &'static str {
        match self {
            Reversibility::Reversible(_) => "reversible",
            Reversibility::ByRule(_) => "reversible by rule",
            Reversibility::ReadOnly(_) => "read-only",
            Reversibility::Derived(_) => "derived",
        }
    }

    /// How, which rule, or why.
    pub fn detail(&self) -> &str {
        match self {
            Reversibility::Reversible(s)
            | Reversibility::ByRule(s)
            | Reversibility::ReadOnly(s)
            | Reversibility::Derived(s) => s,
        }
    }
}

/// One target field and its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldClass {
    /// The target path; fields of array elements follow the array (`purchaseHistory.amount`).
    pub field: String,
    pub class: Reversibility,
}

/// The fields of one target collection as one transform file writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionClass {
    pub service: String,
    pub collection: String,
    pub source_collection: String,
    pub file: PathBuf,
    pub fields: Vec<FieldClass>,
}

impl ServiceTransforms {
    /// Every target field of the service, per transform file, with its reverse class.
    pub fn classification(&self) -> Vec<CollectionClass> {
        self.transforms
            .iter()
            .map(|t| {
                let shared = self.transforms.iter().filter(|o| o.collection == t.collection).count() > 1;
                let fields = match (&t.reverse, shared) {
                    (Reversal::Document(plan), false) => {
                        let mut out = Vec::new();
                        scope_rows(&plan.scope, "", plan.key.as_deref(), &mut out);
                        out
                    }
                    (Reversal::Document(_), true) => derived_rows(
                        t,
                        &format!(
                            "`{}` is written by several transforms: a service document does not say which monolith \
                             collection it goes back to",
                            t.collection
                        ),
                    ),
                    (Reversal::Derived(why), _) => derived_rows(t, why),
                };
                CollectionClass {
                    service: self.service.clone(),
                    collection: t.collection.clone(),
                    source_collection: t.source_collection.clone(),
                    file: t.file.clone(),
                    fields,
                }
            })
            .collect()
    }
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() { name.to_string() } else { format!("{at}.{name}") }
}

fn scope_rows(plan: &ScopePlan, at: &str, key: Option<&str>, out: &mut Vec<FieldClass>) {
    for f in &plan.fields {
        let field = join(at, &f.target);
        let class = match (&f.how, &f.forward) {
            (How::Lens(_), Computed::Value(expr)) => {
                let keyed = if key == Some(f.target.as_str()) { " (the key)" } else { "" };
                Reversibility::Reversible(format!("← {expr}{keyed}"))
            }
            (How::Lens(lens), Computed::Each { .. }) => Reversibility::Reversible(format!("← {}", lens.path)),
            (How::Rule { set, from }, _) => Reversibility::ByRule(format!("sets `{set}` from `{from}`")),
            (How::ReadOnly(why), _) => Reversibility::ReadOnly(why.clone()),
            (How::Array { source, align, by_rule, .. }, _) => {
                let how = match align {
                    Align::Field(name) if !by_rule => format!("← {source}, elements aligned by their id `{name}`"),
                    Align::Field(name) => format!("← {source}, elements aligned by `{name}`"),
                    Align::Position => format!(
                        "← {source}, elements aligned by position (a reorder in the service misattributes the \
                         element fields the transform does not read)"
                    ),
                };
                if *by_rule { Reversibility::ByRule(how) } else { Reversibility::Reversible(how) }
            }
        };
        out.push(FieldClass { field: field.clone(), class });
        if let How::Array { element, .. } = &f.how {
            scope_rows(element, &field, None, out);
        }
    }
}

/// Every target field of a transform that is never written back.
fn derived_rows(t: &Transform, why: &str) -> Vec<FieldClass> {
    let mut names = Vec::new();
    match &t.target {
        Target::Document { fields, .. } => leaf_names(fields, "", &mut names),
        Target::Rollup(r) => {
            leaf_names(&r.fields, "", &mut names);
            names.push(r.count_field.clone());
            names.extend(r.distinct.iter().map(|(name, _)| name.clone()));
        }
    }
    names.into_iter().map(|field| FieldClass { field, class: Reversibility::Derived(why.to_string()) }).collect()
}

fn leaf_names(fields: &Fields, at: &str, out: &mut Vec<String>) {
    for (name, shape) in fields {
        let path = join(at, name);
        match shape {
            Shape::Object(inner) => leaf_names(inner, &path, out),
            Shape::Value(_) | Shape::Each { .. } => out.push(path),
        }
    }
}

/// The classification of every service as a table, one block per target collection.
pub fn render_classification<'a>(services: impl IntoIterator<Item = &'a ServiceTransforms>) -> String {
    let mut s =
        String::from("reverse sync, per target field (reversible | reversible by rule | read-only | derived):\n");
    for svc in services {
        s.push_str(&render_service(&svc.classification(), None));
    }
    s
}

/// Counts something per (collection, field), for a column of the table.
pub(super) type PerField<'a> = &'a dyn Fn(&str, &str) -> usize;

/// One service's classification; with `failures`, the number of failed law checks per field is
/// appended to each row (`ficus lens check`).
pub(super) fn render_service(classes: &[CollectionClass], failures: Option<PerField<'_>>) -> String {
    let mut s = String::new();
    for c in classes {
        let _ = writeln!(
            s,
            "\n{}.{} ← {} ({})",
            c.service,
            c.collection,
            c.source_collection,
            c.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        );
        let width = c.fields.iter().map(|f| f.field.chars().count()).max().unwrap_or(0);
        for f in &c.fields {
            let failed = failures.map(|count| count(&c.collection, &f.field)).unwrap_or(0);
            let mark = if failed > 0 { format!("  [{failed} failed]") } else { String::new() };
            let _ = writeln!(s, "  {:<width$}  {:<18}  {}{mark}", f.field, f.class.label(), f.class.detail());
        }
    }
    s
}
