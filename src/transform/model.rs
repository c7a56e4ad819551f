//! The compiled model: what a definition file becomes once it loads, the forward shape of its
//! target and the plan of its way back.
//!
//! `compile` builds it, `apply` runs its forward half, `reverse` its way back, and `fields`
//! and `classify` read it; kept apart from all of them, the model imports none of them, so
//! none of those modules needs another just to name a transform, a field or a plan.

use std::collections::BTreeSet;
use std::path::PathBuf;

use bson::Bson;

use super::expr::Expr;
use super::template::{KeyTemplate, RedisTarget};
use super::value::Func;
use crate::config::topics::TopicDef;

/// One compiled transform: one file, one target collection.
#[derive(Debug, Clone)]
pub(super) struct Transform {
    pub file: PathBuf,
    /// The file stem.
    pub name: String,
    pub topic: String,
    /// The monolith collection the topic carries (matched against `data.collection`).
    pub source_collection: String,
    pub events: BTreeSet<String>,
    pub input: Input,
    /// The target collection.
    pub collection: String,
    pub when: Option<Expr>,
    /// The monolith path of the routing key: which aggregate a document belongs to for
    /// ownership (`route = "user_id"`); the topic's aggregate key unless the file names another.
    pub route: String,
    pub target: Target,
    /// The topic's definition without its derived events: the reverse runs the forward on
    /// patched documents through `mapping::map_change` with it, as live traffic does.
    pub def: TopicDef,
    /// How the target goes back into the monolith's shape.
    pub reverse: Reversal,
    /// What the file declares of the data it writes: references and quality rules.
    pub refs: Vec<super::checks::RefDecl>,
    pub quality: Vec<super::checks::QualityRule>,
    /// `[redis]`: the target is a key-value store's entries, not a collection's documents.
    pub redis: Option<RedisTarget>,
}

/// What plain paths read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Input {
    /// The source document (the after-state; the before-state when keying a delete).
    Document,
    /// The array element a derived event reports (`customer.purchase_recorded`), from the
    /// source document's array at `array` (`purchases`).
    Element { array: String },
}

#[derive(Debug, Clone)]
pub(super) enum Target {
    /// One target document per source document (or per derived element).
    Document { key: Key, fields: Fields },
    /// One membership per source document in a group document derived from many.
    Rollup(Rollup),
}

/// What identifies a target document.
#[derive(Debug, Clone)]
pub(super) enum Key {
    /// `key = "_id"`: the monolith's `_id`.
    SourceId,
    /// A natural key: a top-level target field and the expression that computes it.
    Field { name: String, expr: Expr },
    /// A key-value store's key, rendered from target fields (`[redis] key = "cache:{kind}:{key}"`).
    Template(KeyTemplate),
}

#[derive(Debug, Clone)]
pub(super) struct Rollup {
    pub group: Expr,
    pub count_field: String,
    pub distinct: Vec<(String, Expr)>,
    /// Fields of the group document, from `$group` and constants only.
    pub fields: Fields,
}

/// Target fields in declaration order.
pub(super) type Fields = Vec<(String, Shape)>;

/// How one target field is produced.
#[derive(Debug, Clone)]
pub(super) enum Shape {
    Value(Expr),
    Object(Fields),
    /// An array built element by element from a source array.
    Each {
        source: Expr,
        fields: Fields,
    },
}

/// How a transform's target goes back into the monolith.
#[derive(Debug, Clone)]
pub(super) enum Reversal {
    /// Never written back; each side recomputes it. The reason, for the classification.
    Derived(String),
    Document(DocumentPlan),
}

#[derive(Debug, Clone)]
pub(super) struct DocumentPlan {
    pub scope: ScopePlan,
    /// The natural key's target field (`None` for `key = "_id"`).
    pub key: Option<String>,
    /// `path == constant` conjuncts of `when`: a document the monolith does not have yet gets
    /// them, or it would not reach this target.
    pub when_constants: Vec<(String, Bson)>,
}

/// The target fields of one scope (the document, or the element of an array), flattened.
#[derive(Debug, Clone, Default)]
pub(super) struct ScopePlan {
    pub fields: Vec<FieldPlan>,
}

impl ScopePlan {
    /// Whether a field of the scope, or of an array's elements inside it, is read-only: only
    /// then can a patched document imply other values than the service holds.
    pub fn has_read_only(&self) -> bool {
        self.fields.iter().any(|f| match &f.how {
            How::ReadOnly(_) => true,
            How::Array { element, .. } => element.has_read_only(),
            How::Lens(_) | How::Rule { .. } => false,
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct FieldPlan {
    /// Dotted target path relative to the scope.
    pub target: String,
    pub forward: Computed,
    pub how: How,
}

/// What the forward transform computes for a field.
#[derive(Debug, Clone)]
pub(super) enum Computed {
    Value(Expr),
    Each { source: Expr, fields: Fields },
}

#[derive(Debug, Clone)]
pub(super) enum How {
    /// Reverses on its own.
    Lens(Lens),
    /// A `[reverse]` rule.
    Rule { set: String, from: Expr },
    /// Never written back, for this reason.
    ReadOnly(String),
    /// An array built with `each`, written back element by element.
    Array {
        /// The monolith array's path.
        source: String,
        align: Align,
        /// Whether the alignment comes from a `[reverse]` entry (else the element id was inferred).
        by_rule: bool,
        element: ScopePlan,
    },
}

/// How service elements are matched with monolith elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Align {
    /// By this element field's value (and occurrence, for repeated values).
    Field(String),
    /// By position: a reorder in the service misattributes the fields the transform does not read.
    Position,
}

/// A monolith path and the invertible steps the forward applies to it, in forward order.
#[derive(Debug, Clone)]
pub(super) struct Lens {
    pub path: String,
    /// Casts, injective value maps and `camel_keys` only.
    pub steps: Vec<Func>,
}
