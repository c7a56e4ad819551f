//! The lens laws, checked on monolith documents (pure): the proof behind reverse sync.
//!
//! A derived reverse is only worth having if it is right, and "right" has a precise meaning for
//! a pair `get` (the forward transform) and `put` (its reverse):
//!
//! - **GetPut**: `put(m, get(m))` writes nothing and reports nothing. A service that changed
//!   nothing changes nothing in the monolith, however odd the document's lexical forms, key
//!   spellings or unread fields.
//! - **PutGet**: `get(put(m, v)) = v` for an edited `v`. Edits are generated from the document
//!   itself, one per reversible field: change a string, move a number, toggle a boolean, move a
//!   date, pick another value of a value map, add and remove a key, unset an optional field;
//!   for an array, add an element (a copy with a new id), remove one, reverse the order, edit
//!   the first one's fields. After applying the patch, the edited field must come back as the
//!   service wrote it; any other field may change only if it reads a monolith field the patch
//!   wrote (two fields from one source follow each other); a read-only field that differs must
//!   be reported as a conflict with the value the monolith implies; nothing may disagree.
//! - **Insert**: `get(put(None, get(m))) = get(m)`: a document the monolith has never seen is
//!   built from the service document alone, with the same tolerance for read-only fields.
//!
//! The forward `get` goes through exactly the code live traffic uses: `mapping::map_change` of a
//! snapshot copy, then [`ServiceTransforms::apply`]. [`LensCheck`] takes documents one at a time
//! (`ficus lens check` streams a collection through it); [`check_laws`] takes an iterator.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bson::{Bson, DateTime, Document, doc};

use super::ServiceTransforms;
use super::builtins::{describe, same, same_opt};
use super::classify::{CollectionClass, render_service};
use super::error::TransformError;
use super::expr::Expr;
use super::model::{Align, DocumentPlan, FieldPlan, Forward, How, ScopePlan};
use super::op::WriteOp;
use super::reverse::{Patch, Reverse, unset_path};
use super::value::Func;
use crate::config::topics::Topics;
use crate::event::mapping::get_path;

/// Which law a failure broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Law {
    GetPut,
    PutGet,
    Insert,
}

impl std::fmt::Display for Law {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Law::GetPut => "GetPut",
            Law::PutGet => "PutGet",
            Law::Insert => "Insert",
        })
    }
}

/// One broken law on one document.
#[derive(Debug, Clone, PartialEq)]
pub struct LawFailure {
    pub law: Law,
    /// The service collection.
    pub collection: String,
    pub source_collection: String,
    /// The monolith document's `_id`.
    pub id: Bson,
    /// The target field where it broke (`(put)` when `put` itself failed).
    pub field: String,
    /// The edit applied to the service document (empty for GetPut).
    pub edit: String,
    pub problem: String,
    pub monolith: Document,
    /// The service document given to `put` (the edited one for PutGet).
    pub service: Document,
    /// The patch `put` returned: the update document, then conflicts and disagreements.
    pub patch: Option<Document>,
    /// `get` of the patched monolith document.
    pub round_trip: Option<Document>,
}

/// Counts per service collection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Monolith documents that reached the collection and were checked.
    pub documents: u64,
    /// Monolith documents the forward rejects (dead-lettered by live traffic): no law applies.
    pub rejected: u64,
    pub get_put: u64,
    pub put_get: u64,
    pub inserts: u64,
    pub failed: u64,
}

/// What a lens check found for one service.
#[derive(Debug, Clone, Default)]
pub struct LensReport {
    pub service: String,
    pub classification: Vec<CollectionClass>,
    /// Per service collection that is written back.
    pub tallies: BTreeMap<String, Tally>,
    /// The first failures (at most [`LensCheck::KEEP`]); `failed` in the tallies counts them all.
    pub failures: Vec<LawFailure>,
    /// Failed checks per (collection, field, law), all of them.
    pub by_field: BTreeMap<(String, String, Law), u64>,
}

impl LensReport {
    /// Whether every law held on every document.
    pub fn ok(&self) -> bool {
        self.tallies.values().all(|t| t.failed == 0)
    }

    /// The report as `ficus lens check` prints it: the classification with failure counts per
    /// field, the tallies, then up to `sample` failures side by side.
    pub fn render(&self, sample: usize) -> String {
        let mut s = String::new();
        let count = |collection: &str, field: &str| -> usize {
            self.by_field
                .iter()
                .filter(|((c, f, _), _)| c == collection && (f == field || f.starts_with(&format!("{field}["))))
                .map(|(_, n)| *n as usize)
                .sum()
        };
        s.push_str(&render_service(&self.classification, Some(&count)));
        let _ = writeln!(
            s,
            "\n{:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "collection", "documents", "rejected", "GetPut", "PutGet", "Insert", "failed"
        );
        for (c, t) in &self.tallies {
            let _ = writeln!(
                s,
                "{:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
                format!("{}.{c}", self.service),
                t.documents,
                t.rejected,
                t.get_put,
                t.put_get,
                t.inserts,
                t.failed
            );
        }
        if !self.by_field.is_empty() {
            let _ = writeln!(s, "\nfailed checks per field:");
            for ((c, f, law), n) in &self.by_field {
                let _ = writeln!(s, "  {}.{c}  {f}  {law}: {n}", self.service);
            }
        }
        for failure in self.failures.iter().take(sample) {
            s.push_str(&render_failure(&self.service, failure));
        }
        let _ = writeln!(
            s,
            "\n{}: {}",
            self.service,
            if self.ok() { "every law holds" } else { "LAWS BROKEN (see above)" }
        );
        s
    }
}

fn one_line(b: &Bson) -> String {
    b.clone().into_relaxed_extjson().to_string()
}

fn flatten(doc: &Document, at: &str, out: &mut Vec<(String, String)>) {
    for (k, v) in doc {
        let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
        match v {
            Bson::Document(d) if !d.is_empty() => flatten(d, &path, out),
            other => out.push((path, one_line(other))),
        }
    }
}

/// One failure: the problem, then the service document and what came back, field by field
/// side by side (`≠` marks the rows that differ), then the patch and the monolith document.
fn render_failure(service: &str, f: &LawFailure) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{} {service}.{} ← {} _id {}: {}: {}",
        f.law,
        f.collection,
        f.source_collection,
        one_line(&f.id),
        f.field,
        f.problem
    );
    if !f.edit.is_empty() {
        let _ = writeln!(s, "  edit: {}", f.edit);
    }
    let mut left = Vec::new();
    flatten(&f.service, "", &mut left);
    let mut right = Vec::new();
    if let Some(r) = &f.round_trip {
        flatten(r, "", &mut right);
    }
    let mut paths: Vec<&String> = left.iter().map(|(p, _)| p).collect();
    for (p, _) in &right {
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    let cut = |t: &str| -> String {
        if t.chars().count() > 48 { format!("{}…", t.chars().take(47).collect::<String>()) } else { t.to_string() }
    };
    let width = paths.iter().map(|p| p.chars().count()).max().unwrap_or(5).max(5);
    let _ = writeln!(s, "    {:<width$}    {:<48}   get(put(monolith, service))", "field", "service");
    for p in paths {
        let l = left.iter().find(|(q, _)| q == p).map(|(_, v)| v.as_str());
        let r = right.iter().find(|(q, _)| q == p).map(|(_, v)| v.as_str());
        let mark = if l == r { " " } else { "≠" };
        let _ = writeln!(
            s,
            "  {mark} {:<width$}    {:<48}   {}",
            p,
            cut(l.unwrap_or("(absent)")),
            cut(r.unwrap_or(if f.round_trip.is_some() { "(absent)" } else { "(no document)" }))
        );
    }
    if let Some(p) = &f.patch {
        let _ = writeln!(s, "  patch:    {}", one_line(&Bson::Document(p.clone())));
    }
    let _ = writeln!(s, "  monolith: {}", one_line(&Bson::Document(f.monolith.clone())));
    s
}

/// Checks the laws document by document.
pub struct LensCheck<'a> {
    service: &'a ServiceTransforms,
    topics: &'a Topics,
    source_name: &'a str,
    report: LensReport,
}

/// One generated edit of a service document.
struct Edit {
    /// The field whose round trip is checked: a value field, or a whole array.
    field: String,
    what: String,
    doc: Document,
}

impl<'a> LensCheck<'a> {
    /// Failures kept with their documents; the rest are counted.
    pub const KEEP: usize = 100;

    pub fn new(service: &'a ServiceTransforms, topics: &'a Topics, source_name: &'a str) -> Self {
        let mut report = LensReport {
            service: service.service().to_string(),
            classification: service.classification(),
            ..Default::default()
        };
        for c in service.collections() {
            if service.reverse_for(&c).is_some() {
                report.tallies.insert(c, Tally::default());
            }
        }
        LensCheck { service, topics, source_name, report }
    }

    /// The monolith collections whose documents this service's reversible targets come from.
    pub fn source_collections(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .report
            .tallies
            .keys()
            .filter_map(|c| self.service.reverse_for(c).map(|r| r.source_collection().to_string()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// `get`: what live traffic writes for a snapshot copy of `doc`.
    fn get(&self, collection: &str, doc: &Document) -> Result<Vec<WriteOp>, TransformError> {
        let Some(def) = self.topics.for_collection(collection) else { return Ok(Vec::new()) };
        self.service.writes_of_copy(def, self.source_name, doc.clone())
    }

    fn target_of(writes: &[WriteOp], collection: &str) -> Option<(Bson, Document)> {
        writes.iter().find_map(|w| match w {
            WriteOp::Upsert { collection: c, id, doc } if c == collection => Some((id.clone(), doc.clone())),
            _ => None,
        })
    }

    /// Checks every law on one monolith document of `collection`.
    pub fn document(&mut self, collection: &str, m: &Document) {
        let service = self.service;
        let targets: Vec<Reverse<'_>> = self
            .report
            .tallies
            .keys()
            .filter_map(|c| service.reverse_for(c))
            .filter(|r| r.source_collection() == collection)
            .collect();
        if targets.is_empty() {
            return;
        }
        let writes = match self.get(collection, m) {
            Ok(w) => w,
            Err(_) => {
                for r in &targets {
                    self.tally(r.collection()).rejected += 1;
                }
                return;
            }
        };
        for r in targets {
            let Some((id, s)) = Self::target_of(&writes, r.collection()) else { continue };
            self.tally(r.collection()).documents += 1;
            self.get_put(&r, m, &id, &s);
            for edit in edits(r.plan, m, &s) {
                self.put_get(&r, m, &s, edit);
            }
            self.insert(&r, m, &s);
        }
    }

    /// The report so far.
    pub fn finish(self) -> LensReport {
        self.report
    }

    fn tally(&mut self, collection: &str) -> &mut Tally {
        self.report.tallies.entry(collection.to_string()).or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn fail(
        &mut self,
        law: Law,
        r: &Reverse<'_>,
        m: &Document,
        field: &str,
        edit: &str,
        problem: String,
        service: &Document,
        patch: Option<&Patch>,
        round_trip: Option<Document>,
    ) {
        self.tally(r.collection()).failed += 1;
        *self.report.by_field.entry((r.collection().to_string(), field.to_string(), law)).or_default() += 1;
        if self.report.failures.len() < Self::KEEP {
            self.report.failures.push(LawFailure {
                law,
                collection: r.collection().to_string(),
                source_collection: r.source_collection().to_string(),
                id: m.get("_id").cloned().unwrap_or(Bson::Null),
                field: field.to_string(),
                edit: edit.to_string(),
                problem,
                monolith: m.clone(),
                service: service.clone(),
                patch: patch.map(render_patch),
                round_trip,
            });
        }
    }

    fn get_put(&mut self, r: &Reverse<'_>, m: &Document, id: &Bson, s: &Document) {
        self.tally(r.collection()).get_put += 1;
        // As the service database holds it: with its `_id` and ficus's metadata, both ignored.
        let mut held = s.clone();
        held.insert("_id", id.clone());
        held.insert("_ficus", doc! { "v": "00000000000000000000000000000", "src": { "c": r.source_collection() } });
        match r.put(Some(m), &held) {
            Ok(p) if p.is_empty() => {}
            Ok(p) => {
                let field = p
                    .set
                    .keys()
                    .next()
                    .cloned()
                    .or_else(|| p.unset.first().cloned())
                    .or_else(|| p.conflicts.first().map(|c| c.field.clone()))
                    .or_else(|| p.disagreements.first().map(|d| d.path.clone()))
                    .unwrap_or_default();
                let problem = "the forward image should write nothing back".to_string();
                self.fail(Law::GetPut, r, m, &field, "", problem, &held, Some(&p), Some(s.clone()));
            }
            Err(e) => self.fail(Law::GetPut, r, m, "(put)", "", e.to_string(), &held, None, None),
        }
    }

    fn put_get(&mut self, r: &Reverse<'_>, m: &Document, s: &Document, edit: Edit) {
        self.tally(r.collection()).put_get += 1;
        self.round_trip(Law::PutGet, r, Some(m), m, &edit.doc, Some(s), &edit.field, &edit.what);
    }

    fn insert(&mut self, r: &Reverse<'_>, m: &Document, s: &Document) {
        self.tally(r.collection()).inserts += 1;
        self.round_trip(Law::Insert, r, None, m, s, None, "(document)", "the monolith has no document yet");
    }

    /// `put`, apply, `get`, compare.
    #[allow(clippy::too_many_arguments)]
    fn round_trip(
        &mut self,
        law: Law,
        r: &Reverse<'_>,
        monolith: Option<&Document>,
        m: &Document,
        v: &Document,
        original: Option<&Document>,
        field: &str,
        what: &str,
    ) {
        let patch = match r.put(monolith, v) {
            Ok(p) => p,
            Err(e) => return self.fail(law, r, m, field, what, format!("put failed: {e}"), v, None, None),
        };
        let mut patched = match monolith {
            Some(m) => m.clone(),
            None => m.get("_id").map(|id| doc! { "_id": id.clone() }).unwrap_or_default(),
        };
        if let Err(e) = patch.apply_to(&mut patched) {
            return self.fail(law, r, m, field, what, e.to_string(), v, Some(&patch), None);
        }
        let back = match self.get(r.source_collection(), &patched) {
            Ok(writes) => Self::target_of(&writes, r.collection()).map(|(_, d)| d),
            Err(e) => {
                let problem = format!("the patched document does not transform: {e}");
                return self.fail(law, r, m, field, what, problem, v, Some(&patch), None);
            }
        };
        let Some(back) = back else {
            let problem = "the patched document no longer reaches the collection".to_string();
            return self.fail(law, r, m, field, what, problem, v, Some(&patch), None);
        };
        let mut problems = Vec::new();
        let written: Vec<&str> =
            patch.set.keys().map(String::as_str).chain(patch.unset.iter().map(String::as_str)).collect();
        let mut claimed = vec![false; patch.conflicts.len()];
        compare(&r.plan.scope, original, v, &back, &patch, &mut claimed, "", &written, &mut problems);
        for (i, c) in patch.conflicts.iter().enumerate() {
            if !claimed[i] {
                problems.push((
                    c.field.clone(),
                    format!("conflict reported, but the round trip agrees with the service: {}", c.reason),
                ));
            }
        }
        for d in &patch.disagreements {
            let fields: Vec<&str> = d.fields.iter().map(|(f, _)| f.as_str()).collect();
            problems.push((d.path.clone(), format!("unexpected disagreement between {}", fields.join(", "))));
        }
        for (field, problem) in problems {
            self.fail(law, r, m, &field, what, problem, v, Some(&patch), Some(back.clone()));
        }
    }
}

/// The patch as one document: `$set`, `$unset`, then `conflicts` and `disagreements`.
fn render_patch(p: &Patch) -> Document {
    let mut d = p.to_update();
    if !p.conflicts.is_empty() {
        let conflicts: Vec<Bson> = p
            .conflicts
            .iter()
            .map(|c| {
                Bson::Document(doc! {
                    "field": &c.field,
                    "service": c.service.clone().unwrap_or(Bson::Null),
                    "monolith": c.monolith.clone().unwrap_or(Bson::Null),
                })
            })
            .collect();
        d.insert("conflicts", conflicts);
    }
    if !p.disagreements.is_empty() {
        let list: Vec<Bson> = p
            .disagreements
            .iter()
            .map(|x| {
                let fields: Document =
                    x.fields.iter().map(|(f, v)| (f.clone(), v.clone().unwrap_or(Bson::Null))).collect();
                Bson::Document(doc! { "path": &x.path, "fields": fields })
            })
            .collect();
        d.insert("disagreements", list);
    }
    d
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() { name.to_string() } else { format!("{at}.{name}") }
}

/// Whether dotted paths `a` and `b` touch (equal, or one inside the other).
fn touches(a: &str, b: &str) -> bool {
    a == b || super::invert::strictly_inside(a, b) || super::invert::strictly_inside(b, a)
}

/// The monolith paths a field reads (relative to its scope).
fn reads(f: &FieldPlan) -> Vec<String> {
    let mut out = Vec::new();
    match (&f.how, &f.forward) {
        (How::Lens(l), _) => out.push(l.path.clone()),
        (How::Array { source, .. }, _) => out.push(source.clone()),
        (_, Forward::Value(e)) => e.input_paths(&mut out),
        (_, Forward::Each { source, .. }) => source.input_paths(&mut out),
    }
    out
}

/// Compares the service document `expected` with the round trip `got`, field by field, knowing
/// `original`, the service document before the edit (`None` for an insert: every field is then
/// the service's to set). A field the edit changed must come back as the service wrote it; any
/// other may change only if it reads a monolith field the patch wrote (`written`, at the top) or
/// one an edited field of the same scope reads (two fields from one source follow each other); a
/// read-only field that differs must be a conflict with the round trip's value.
#[allow(clippy::too_many_arguments)]
fn compare(
    plan: &ScopePlan,
    original: Option<&Document>,
    expected: &Document,
    got: &Document,
    patch: &Patch,
    claimed: &mut [bool],
    at: &str,
    written: &[&str],
    problems: &mut Vec<(String, String)>,
) {
    let edited = |f: &FieldPlan| match original {
        None => true,
        Some(o) => !same_opt(get_path(o, &f.target), get_path(expected, &f.target)),
    };
    let edited_reads: Vec<String> = plan
        .fields
        .iter()
        .filter(|f| original.is_some() && !matches!(f.how, How::ReadOnly(_)) && edited(f))
        .flat_map(reads)
        .collect();
    for f in &plan.fields {
        let field = join(at, &f.target);
        let (e, g) = (get_path(expected, &f.target), get_path(got, &f.target));
        if let How::ReadOnly(_) = f.how {
            let conflict = patch.conflicts.iter().position(|c| c.field == field);
            match (same_opt(e, g), conflict) {
                // A conflict on a field that agrees stays unclaimed, and is reported as such.
                (true, _) => {}
                (false, Some(i)) if same_opt(patch.conflicts[i].monolith.as_ref(), g) => claimed[i] = true,
                (false, Some(i)) => {
                    claimed[i] = true;
                    problems.push((field, "the conflict names another monolith value than the round trip has".into()));
                }
                (false, None) => problems.push((
                    field,
                    format!(
                        "read-only and different after the round trip ({} vs {}), but put reported no conflict",
                        e.map_or("absent".into(), describe),
                        g.map_or("absent".into(), describe)
                    ),
                )),
            }
            continue;
        }
        if same_opt(e, g) && !matches!(f.how, How::Array { .. }) {
            continue;
        }
        let strict = edited(f);
        let follows = !strict
            && reads(f)
                .iter()
                .any(|p| written.iter().any(|w| touches(p, w)) || edited_reads.iter().any(|w| touches(p, w)));
        if let How::Array { element, align, .. } = &f.how {
            match (e, g) {
                (Some(Bson::Array(a)), Some(Bson::Array(b))) if a.len() == b.len() && (strict || !follows) => {
                    let before = match original.map(|o| get_path(o, &f.target)) {
                        Some(Some(Bson::Array(items))) => items.as_slice(),
                        _ => &[],
                    };
                    let mut used = vec![false; before.len()];
                    for (i, (x, y)) in a.iter().zip(b).enumerate() {
                        let at = format!("{field}[{i}]");
                        let (Bson::Document(x), Bson::Document(y)) = (x, y) else {
                            if !same(x, y) {
                                problems.push((at, format!("{} came back as {}", describe(x), describe(y))));
                            }
                            continue;
                        };
                        // The element before the edit: the one with the same alignment key, or
                        // at the same position; none for a new one.
                        let was = match align {
                            Align::Position => before.get(i),
                            Align::Field(name) => {
                                let found = (0..before.len()).find(|&k| {
                                    !used[k]
                                        && matches!(&before[k], Bson::Document(d)
                                            if same_opt(d.get(name.as_str()), x.get(name.as_str())))
                                });
                                found.map(|k| {
                                    used[k] = true;
                                    &before[k]
                                })
                            }
                        };
                        let was = match (original, was) {
                            (Some(_), Some(Bson::Document(d))) => Some(d),
                            _ => None,
                        };
                        compare(element, was, x, y, patch, claimed, &at, &[], problems);
                    }
                    continue;
                }
                _ if same_opt(e, g) || follows => continue,
                _ => {}
            }
        } else if follows {
            continue;
        }
        let why = if strict {
            "did not come back as the service wrote it"
        } else {
            "changed, though the edit did not touch it"
        };
        problems.push((
            field,
            format!(
                "{why}: service {}, round trip {}",
                e.map_or("absent".into(), describe),
                g.map_or("absent".into(), describe)
            ),
        ));
    }
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
    let _ = super::reverse::set_path(&mut out, path, value);
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
        if let Forward::Value(Expr::Call { func: Func::Map(map), .. }) = &f.forward
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
fn edits(plan: &DocumentPlan, m: &Document, s: &Document) -> Vec<Edit> {
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
        let with_items = |items: Vec<Bson>| with_value(s, field, Bson::Array(items));
        let align_field = match align {
            Align::Field(name) => Some(name.as_str()),
            Align::Position => None,
        };
        // Add: a copy of an element with a new id (or, by position, of the last one).
        match align {
            Align::Field(name) => {
                if let Some(Bson::Document(first)) = items.first()
                    && let Some(key) = first.get(name.as_str())
                {
                    let key_plan = element.fields.iter().find(|e| e.target == *name);
                    let first_monolith = match monolith_items.first() {
                        Some(Bson::Document(d)) => Some(d),
                        _ => None,
                    };
                    let new_key = key_plan.and_then(|k| moved(k, first_monolith, key)).or_else(|| move_value(key));
                    if let Some(new_key) = new_key {
                        let mut copy = first.clone();
                        copy.insert(name.clone(), new_key.clone());
                        let mut more = items.clone();
                        more.push(Bson::Document(copy));
                        out.push(edit(
                            format!("add a copy of {field}[0] with {name} {}", describe(&new_key)),
                            with_items(more),
                        ));
                    }
                }
            }
            Align::Position => {
                if let Some(last) = items.last() {
                    let mut more = items.clone();
                    more.push(last.clone());
                    out.push(edit(format!("add a copy of the last element of {field}"), with_items(more)));
                }
            }
        }
        if !items.is_empty() {
            let mut fewer = items.clone();
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
            out.push(edit(format!("remove {removed} element of {field}"), with_items(fewer)));
        }
        if items.len() >= 2 {
            let reversed: Vec<Bson> = items.iter().rev().cloned().collect();
            if !same(&Bson::Array(reversed.clone()), &Bson::Array(items.clone())) {
                out.push(edit(format!("reverse the order of {field}"), with_items(reversed)));
            }
        }
        if let Some(Bson::Document(first)) = items.first() {
            let first_monolith = match monolith_items.first() {
                Some(Bson::Document(d)) => Some(d),
                _ => None,
            };
            for (inner, what, value) in field_edits(element, first_monolith, first, None, align_field) {
                let changed = match value {
                    Some(v) => with_value(first, &inner, v),
                    None => without(first, &inner),
                };
                let mut next = items.clone();
                next[0] = Bson::Document(changed);
                out.push(edit(format!("in {field}[0]: {what}"), with_items(next)));
            }
        }
        out.push(edit(format!("unset {field}"), without(s, field)));
    }
    out
}

/// Checks the laws on every `(monolith collection, document)` for one service.
pub fn check_laws(
    service: &ServiceTransforms,
    topics: &Topics,
    source_name: &str,
    docs: impl IntoIterator<Item = (String, Document)>,
) -> LensReport {
    let mut check = LensCheck::new(service, topics, source_name);
    for (collection, doc) in docs {
        check.document(&collection, &doc);
    }
    check.finish()
}
