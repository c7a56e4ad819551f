//! Declarative transforms: canonical events → writes into a service's database (pure).
//!
//! Each service database has a directory `transforms/<database>/` of TOML files, one per target
//! collection, saying which topic and event types feed it and how each target field is computed
//! from the source document:
//!
//! ```toml
//! topic = "linechatbot.customers"
//! events = ["customer.snapshot", "customer.created", "customer.updated", "customer.deleted"]
//! collection = "customers"
//! key = "lineUserId"                                  # target _id = this field's value
//!
//! [fields]
//! lineUserId = "user_id"                              # a source path
//! "profile.language" = "lang"                         # dotted target paths nest
//! "segmentation.lifetimeValue" = "ltv | decimal"      # casts, functions, maps, comparisons
//! [fields.purchaseHistory]
//! each = "purchases"                                  # one element per source element
//! purchaseId = "id"
//! ```
//!
//! Definitions are compiled once at start-up ([`load_all`]); every problem in every file is
//! reported together. [`ServiceTransforms::apply`] is then a pure function from one event to the
//! [`WriteOp`]s that bring the service's collections in line with the source document's new
//! state: no I/O, no clock, no randomness, so replaying an event reproduces its writes exactly.
//! The shipped definitions, with a format guide at the top of each file, live in `transforms/`,
//! and the golden fixtures beside them (`transforms/<service>/fixtures/*.json`) are their spec.
//!
//! The way back is derived from the same definitions: [`ServiceTransforms::reverse_for`] gives
//! the [`Reverse`] of a service collection, whose [`Reverse::put`] turns a service document into
//! a field-scoped [`Patch`] of the monolith document; [`ServiceTransforms::classification`] says
//! field by field what goes back and how, and [`check_laws`] proves the round trip on documents.
//! Where both sides change one array at once, [`elements::merge`] merges it three ways by
//! element id, so a change made by index lands on its own element in an array of another shape.
//! [`ServiceTransforms::written_fields`] says which fields of a service document ficus writes;
//! the rest are the service's own.
//!
//! # Map
//!
//! The forward half depends on nothing of the way back except `compile` calling the planner;
//! the way back (`reverse/`) reads the model and runs the forward, never the other way round.
//!
//! - `value`: what expressions compute with: values, functions, value maps, comparisons, casts.
//! - `builtins`: what the built-in functions do, and the inverses of the invertible ones.
//! - `expr/`: the expression language: lexer (`lex`), parser, compiled `Expr`, evaluation.
//! - `model`: the compiled transform, the forward shape of its target and its reverse plan.
//! - `compile/`: definition files into the model, every problem reported with file and line.
//! - `apply`: the forward: one event into [`WriteOp`]s.
//! - `op`, `error`: the write ops the sinks carry out, and [`TransformError`].
//! - `template`: what a target in a key-value store declares (`[redis]`: key template, value
//!   shape, expiry field), and key rendering.
//! - `fields`: which fields of a service document ficus writes ([`FieldTree`]).
//! - [`checks`]: what a file declares of its data: references and quality rules.
//! - [`elements`]: the three-way merge of arrays by element id.
//! - `reverse/`: the way back: planning (`invert`), lenses, [`Patch`], [`Reverse`],
//!   classification, and the law check.
//! - `tests`: the shipped transforms against their golden fixtures, and the compiler's errors.

mod apply;
mod builtins;
pub mod checks;
mod compile;
pub mod elements;
mod error;
mod expr;
mod fields;
mod model;
mod op;
mod reverse;
mod template;
#[cfg(test)]
mod tests;
mod value;

pub use error::TransformError;
pub use fields::{FieldTree, Projection};
pub use op::{Base, Write, WriteBack, WriteOp};
pub use reverse::{
    CollectionClass, Conflict, Disagreement, FieldClass, Law, LawFailure, LensCheck, LensReport, Patch, Rebased,
    Reverse, ReverseError, Reversibility, Tally, check_laws, render_classification, set_path, unset_path,
};
pub use template::{KeyTemplate, Part, RedisTarget, ValueShape};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bson::{Bson, Document};

use crate::config::report::{DefinitionError, Report, toml_files};
use crate::config::topics::Topics;
pub use crate::cutover::rules::{Apply, Why};
use crate::event::mapping::{ChangeRecord, map_change};
use crate::event::{CanonicalEvent, Control, Message};
use model::Transform;

/// The compiled transforms of one service database.
#[derive(Debug, Clone)]
pub struct ServiceTransforms {
    service: String,
    transforms: Vec<Transform>,
}

impl ServiceTransforms {
    /// The service name: its directory name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The target database: named like the service.
    pub fn database(&self) -> &str {
        &self.service
    }

    /// The Kafka topics this service reads.
    pub fn topics(&self) -> BTreeSet<String> {
        self.transforms.iter().map(|t| t.topic.clone()).collect()
    }

    /// The monolith path that routes a monolith collection's documents to an owner (its
    /// aggregate key unless the transforms name another); `None` when no transform reads it.
    pub fn route(&self, source_collection: &str) -> Option<&str> {
        self.transforms.iter().find(|t| t.source_collection == source_collection).map(|t| t.route.as_str())
    }

    /// The routing key of the document an event is about (see `cutover::route`): its route
    /// field in the document after (or, for a delete, before) the change, or the aggregate key
    /// when that is the route. `None` when no transform of this service reads the collection or
    /// the document has no routing key (the monolith owns it then).
    pub fn route_of(&self, ev: &CanonicalEvent) -> Option<Bson> {
        let t = self.transforms.iter().find(|t| t.source_collection == ev.data.collection)?;
        let image = ev.data.after.as_ref().or(ev.data.before.as_ref());
        match image.and_then(|d| crate::event::mapping::get_path(d, &t.route)) {
            Some(v) => Some(v.clone()),
            None if t.route == t.def.key => Some(ev.data.key.clone()),
            None => None,
        }
    }

    /// The `[redis]` declaration of the transforms writing `collection`, if its entries live in
    /// Redis (every transform of a service writes into one kind of store, see [`load_service`]).
    pub fn redis_target(&self, collection: &str) -> Option<&RedisTarget> {
        self.transforms.iter().filter(|t| t.collection == collection).find_map(|t| t.redis.as_ref())
    }

    /// Whether the service's targets are entries in Redis rather than MongoDB documents.
    pub fn is_redis(&self) -> bool {
        self.transforms.iter().any(|t| t.redis.is_some())
    }

    /// Why the service cannot take over writes (`ficus cutover` refuses): a collection written
    /// back whose routing key is not in its service documents. Empty when it can.
    pub fn cutover_problems(&self) -> Vec<String> {
        if self.is_redis() {
            return vec![format!(
                "{}: its targets are Redis entries ([redis]), which are forward only: a cache service never \
                 writes back to the monolith, so it has no writes to take over",
                self.service
            )];
        }
        let mut out = Vec::new();
        for t in &self.transforms {
            if let model::Reversal::Document(plan) = &t.reverse
                && reverse::route_field(t, plan).is_none()
            {
                out.push(format!(
                    "{}: route: the routing key `{}` must be written back from a field of the service document \
                     (map it to a target field, or route by another key)",
                    t.file.display(),
                    t.route
                ));
            }
        }
        if !self.transforms.iter().any(|t| matches!(t.reverse, model::Reversal::Document(_))) {
            out.push(format!("{}: no collection of this service is ever written back to the monolith", self.service));
        }
        out
    }

    /// The target collections it writes.
    pub fn collections(&self) -> BTreeSet<String> {
        self.transforms.iter().map(|t| t.collection.clone()).collect()
    }

    /// The writes a message calls for: an event's (see [`Self::apply`]), or the sweeps a
    /// completed snapshot calls for.
    pub fn apply_message(&self, m: &Message) -> Result<Vec<WriteOp>, TransformError> {
        match m {
            Message::Event(ev) => self.apply(ev),
            Message::Control(c) => match &c.control {
                Control::SnapshotCompleted(marker) => {
                    Ok(self.transforms.iter().filter_map(|t| t.sweep(marker)).collect())
                }
            },
        }
    }

    /// The reverse of a service collection: how its documents go back into the monolith.
    /// `None` for a collection that is never written back (a rollup, a target built from array
    /// elements, one written by several transforms) or that the service does not have.
    pub fn reverse_for(&self, collection: &str) -> Option<Reverse<'_>> {
        let mut writers = self.transforms.iter().filter(|t| t.collection == collection);
        let t = writers.next()?;
        if writers.next().is_some() {
            return None;
        }
        match &t.reverse {
            model::Reversal::Document(plan) => Some(Reverse { t, plan }),
            model::Reversal::Derived(_) => None,
        }
    }

    /// The fields the transforms write in a service collection (several transforms: all they
    /// write together); `None` when no transform writes it. See [`FieldTree`].
    pub fn written_fields(&self, collection: &str) -> Option<FieldTree> {
        self.transforms.iter().filter(|t| t.collection == collection).map(FieldTree::of).reduce(FieldTree::union)
    }

    /// Where a target field's value comes from when it is a plain copy of one monolith field
    /// (`products.productId` ← `products.sku`): the monolith collection and path. `None` for a
    /// computed value.
    pub fn copied_from(&self, collection: &str, field: &str) -> Option<(&str, String)> {
        self.transforms.iter().filter(|t| t.collection == collection && t.input == model::Input::Document).find_map(
            |t| {
                let model::Target::Document { fields, .. } = &t.target else { return None };
                match shape_at(fields, field)? {
                    model::Shape::Value(expr::Expr::Path { root: expr::Root::Input | expr::Root::Doc, path }) => {
                        Some((t.source_collection.as_str(), path.clone()))
                    }
                    _ => None,
                }
            },
        )
    }

    /// The references the service's transform files declare.
    pub fn refs(&self) -> impl Iterator<Item = &checks::RefDecl> {
        self.transforms.iter().flat_map(|t| t.refs.iter())
    }

    /// The quality rules the service's transform files declare, of every collection.
    pub fn quality(&self) -> impl Iterator<Item = &checks::QualityRule> {
        self.transforms.iter().flat_map(|t| t.quality.iter())
    }

    /// The service collections written back to the monolith (those with a reverse), in order.
    pub fn written_back(&self) -> Vec<&str> {
        self.collections_in_order().filter(|c| self.reverse_for(c).is_some()).collect()
    }

    /// The monolith collections write-backs land in (those the transforms of the collections
    /// written back read), in order.
    pub fn written_back_into(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        self.transforms
            .iter()
            .filter(|t| self.reverse_for(&t.collection).is_some())
            .map(|t| t.source_collection.as_str())
            .filter(|c| seen.insert(*c))
            .collect()
    }

    fn collections_in_order(&self) -> impl Iterator<Item = &str> {
        let mut seen = BTreeSet::new();
        self.transforms.iter().map(|t| t.collection.as_str()).filter(move |c| seen.insert(*c))
    }

    /// What live traffic writes for a snapshot copy of `doc` (a document of `def`'s collection
    /// as it is now): the expectation `verify` and the lens laws hold a target to.
    pub fn writes_of_copy(
        &self,
        def: &crate::config::topics::TopicDef,
        source_name: &str,
        doc: Document,
    ) -> Result<Vec<WriteOp>, TransformError> {
        let record = ChangeRecord::snapshot(&def.collection, doc, bson::Timestamp { time: 0, increment: 0 });
        let mut out = Vec::new();
        for ev in map_change(def, source_name, record).events {
            out.extend(self.apply(&ev)?);
        }
        Ok(out)
    }

    /// The writes one event calls for, in file order; `Ok(vec![])` when no transform reads it.
    /// Pure: no I/O, and the same event always yields the same writes (or the same error).
    pub fn apply(&self, ev: &CanonicalEvent) -> Result<Vec<WriteOp>, TransformError> {
        let mut out = Vec::new();
        for t in &self.transforms {
            if t.reads(ev) {
                t.apply(ev, &mut out)?;
            } else if let Some(retain) = t.retain(ev) {
                out.push(retain);
            }
        }
        Ok(out)
    }
}

/// The shape declared at a dotted target path (declared dotted, nested, or both).
fn shape_at<'f>(fields: &'f model::Fields, path: &str) -> Option<&'f model::Shape> {
    let steps: Vec<&str> = path.split('.').collect();
    (1..=steps.len()).find_map(|n| {
        let (_, shape) = fields.iter().find(|(name, _)| *name == steps[..n].join("."))?;
        match (n == steps.len(), shape) {
            (true, s) => Some(s),
            (false, model::Shape::Object(inner)) => shape_at(inner, &steps[n..].join(".")),
            (false, _) => None,
        }
    })
}

/// Loads one service directory (`transforms/customers_db`): every `*.toml` in it.
pub fn load_service(dir: &Path, topics: &Topics) -> Result<ServiceTransforms, Report> {
    let mut report = Report::default();
    let service = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Err(why) = valid_database(&service) {
        report.push(DefinitionError::new(dir, "", why));
    }
    let files = match toml_files(dir) {
        Ok(files) => files,
        Err(e) => {
            report.push(e);
            return Err(report);
        }
    };
    if files.is_empty() {
        report.push(DefinitionError::new(dir, "", "no transform definitions (*.toml) found"));
    }
    let transforms: Vec<Transform> =
        files.iter().filter_map(|f| compile::compile_file(f, topics, &mut report)).collect();
    compile::check_service(&transforms, &mut report);
    report.into_result(ServiceTransforms { service, transforms })
}

/// Every reference and quality rule names a field its collection's transforms write.
fn check_declared_fields(service: &ServiceTransforms, report: &mut Report) {
    let declared = service
        .refs()
        .map(|r| (&r.collection, &r.field, &r.file, r.line, "refs"))
        .chain(service.quality().map(|q| (&q.collection, &q.field, &q.file, q.line, "quality")));
    for (collection, field, file, line, what) in declared {
        if !service.written_fields(collection).is_some_and(|t| t.writes(field)) {
            report.push(DefinitionError::new(
                file,
                format!("{what}.field"),
                format!("`{field}` is not a field the transforms write into {collection} (line {line})"),
            ));
        }
    }
}

/// Every reference names a service, a collection it writes and a field written there.
fn check_references(services: &[ServiceTransforms], report: &mut Report) {
    for r in services.iter().flat_map(|s| s.refs()) {
        let to = services.iter().find(|s| s.database() == r.to_database);
        let problem = match to {
            None => Some(format!("no service writes a database `{}`", r.to_database)),
            Some(s) => match s.written_fields(&r.to_collection) {
                None => Some(format!("{} writes no collection `{}`", r.to_database, r.to_collection)),
                Some(tree) if !tree.writes(&r.to_field) => Some(format!(
                    "{}.{} has no field `{}` its transforms write",
                    r.to_database, r.to_collection, r.to_field
                )),
                Some(_) => None,
            },
        };
        if let Some(why) = problem {
            let to = format!("{}.{}.{}", r.to_database, r.to_collection, r.to_field);
            report.push(DefinitionError::new(&r.file, "refs.to", format!("`{to}`: {why} (line {})", r.line)));
        }
    }
}

/// Loads every service directory under `dir` (`transforms/`), reporting all errors of all files.
pub fn load_all(dir: &Path, topics: &Topics) -> Result<Vec<ServiceTransforms>, Report> {
    let mut report = Report::default();
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect(),
        Err(e) => {
            report.push(DefinitionError::new(dir, "", format!("cannot read directory: {e}")));
            return Err(report);
        }
    };
    dirs.sort();
    if dirs.is_empty() {
        report.push(DefinitionError::new(dir, "", "no service directories (<database>/*.toml) found"));
    }
    let mut services = Vec::with_capacity(dirs.len());
    for d in dirs {
        match load_service(&d, topics) {
            Ok(s) => services.push(s),
            Err(r) => report.extend(r),
        }
    }
    // What the files declare of their data, once every service is there to check it against.
    for s in &services {
        check_declared_fields(s, &mut report);
    }
    check_references(&services, &mut report);
    report.into_result(services)
}

/// MongoDB's rules for database names.
fn valid_database(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 63
        || name.contains(['/', '\\', '.', ' ', '"', '$', '*', '<', '>', ':', '|', '?', '\0'])
    {
        return Err(format!("`{name}` is not a valid database name (the directory name is the service's database)"));
    }
    Ok(())
}
