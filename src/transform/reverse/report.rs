//! What the law check found: failures by law, tallies per collection, and the report
//! `ficus lens check` prints, beside the classification of each field.
//!
//! Kept apart from the check (`laws`), which only fills it in: how a failure reads (a field, the
//! documents involved, flattened one per line) is a matter of its own.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bson::{Bson, Document};

use super::classify::{CollectionClass, render_service};

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
    /// The first failures (at most [`super::LensCheck::KEEP`]); `failed` in the tallies counts them all.
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
