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

use bson::{Bson, Document, doc};

use super::edits::{Edit, edits};
use super::patch::Patch;
use super::put::Reverse;
use super::report::{Law, LawFailure, LensReport, Tally};
use crate::config::topics::Topics;
use crate::event::mapping::get_path;
use crate::transform::ServiceTransforms;
use crate::transform::builtins::{describe, same, same_opt};
use crate::transform::error::TransformError;
use crate::transform::model::{Align, Computed, FieldPlan, How, ScopePlan};
use crate::transform::op::WriteOp;

/// Checks the laws document by document.
pub struct LensCheck<'a> {
    service: &'a ServiceTransforms,
    topics: &'a Topics,
    source_name: &'a str,
    report: LensReport,
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
        (_, Computed::Value(e)) => e.input_paths(&mut out),
        (_, Computed::Each { source, .. }) => source.input_paths(&mut out),
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
            problems.extend(read_only(field, e, g, patch, claimed));
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
                    let arrays = Arrays { before, expected: a, got: b, known: original.is_some() };
                    compare_elements(element, align, &arrays, patch, claimed, &field, problems);
                    continue;
                }
                _ if same_opt(e, g) || follows => continue,
                _ => {}
            }
        } else if follows {
            continue;
        }
        problems.push(changed(field, strict, e, g));
    }
}

/// A read-only field after the round trip: one that differs must come with a conflict naming
/// the round trip's value, which it claims. Returns the problem, if any.
fn read_only(
    field: String,
    e: Option<&Bson>,
    g: Option<&Bson>,
    patch: &Patch,
    claimed: &mut [bool],
) -> Option<(String, String)> {
    let conflict = patch.conflicts.iter().position(|c| c.field == field);
    match (same_opt(e, g), conflict) {
        // A conflict on a field that agrees stays unclaimed, and is reported as such.
        (true, _) => None,
        (false, Some(i)) if same_opt(patch.conflicts[i].monolith.as_ref(), g) => {
            claimed[i] = true;
            None
        }
        (false, Some(i)) => {
            claimed[i] = true;
            Some((field, "the conflict names another monolith value than the round trip has".into()))
        }
        (false, None) => Some((
            field,
            format!(
                "read-only and different after the round trip ({} vs {}), but put reported no conflict",
                e.map_or("absent".into(), describe),
                g.map_or("absent".into(), describe)
            ),
        )),
    }
}

/// An array of the same length on both sides of the round trip, with the array before the edit.
struct Arrays<'d> {
    /// The array before the edit (empty when there was none).
    before: &'d [Bson],
    /// The service's array after the edit.
    expected: &'d [Bson],
    /// The array after the round trip.
    got: &'d [Bson],
    /// Whether the document before the edit is known (`false` for an insert).
    known: bool,
}

/// Compares an array element by element: documents through their element plan, each with the
/// element it was before the edit; other values must come back equal.
fn compare_elements(
    element: &ScopePlan,
    align: &Align,
    arrays: &Arrays<'_>,
    patch: &Patch,
    claimed: &mut [bool],
    field: &str,
    problems: &mut Vec<(String, String)>,
) {
    let mut used = vec![false; arrays.before.len()];
    for (i, (x, y)) in arrays.expected.iter().zip(arrays.got).enumerate() {
        let at = format!("{field}[{i}]");
        let (Bson::Document(x), Bson::Document(y)) = (x, y) else {
            if !same(x, y) {
                problems.push((at, format!("{} came back as {}", describe(x), describe(y))));
            }
            continue;
        };
        let was = match (arrays.known, element_before(align, arrays.before, &mut used, i, x)) {
            (true, Some(Bson::Document(d))) => Some(d),
            _ => None,
        };
        compare(element, was, x, y, patch, claimed, &at, &[], problems);
    }
}

/// The element before the edit of service element `x` at `i`: the one with the same alignment
/// key (the first not `used` yet, which it marks), or at the same position; none for a new one.
fn element_before<'b>(
    align: &Align,
    before: &'b [Bson],
    used: &mut [bool],
    i: usize,
    x: &Document,
) -> Option<&'b Bson> {
    match align {
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
    }
}

/// The problem of a field that came back different: one the edit changed (`strict`) did not
/// come back as written, any other changed though the edit did not touch it.
fn changed(field: String, strict: bool, e: Option<&Bson>, g: Option<&Bson>) -> (String, String) {
    let why =
        if strict { "did not come back as the service wrote it" } else { "changed, though the edit did not touch it" };
    (
        field,
        format!(
            "{why}: service {}, round trip {}",
            e.map_or("absent".into(), describe),
            g.map_or("absent".into(), describe)
        ),
    )
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
