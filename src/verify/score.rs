//! The verdict of a verification: per collection tallies, the documents that differ, and the
//! scores the seed's migration gate is judged by (pure, so each is tested on its own).
//!
//! - **consistency**: matching documents over every document on either side;
//! - **validation**: per collection, the mean of four shares (counts agreeing, expected
//!   documents present, present documents expected, contents matching), collections weighted by
//!   size; see [`VerifyReport::validation`].
//!
//! Per check (`counts`, `contents`, `references`, `quality`), its own score and gate, and the
//! overall score as the migration plan's validator defines it: the mean of the checks run.
//!
//! Fields no transform writes are the service's own: they are not compared, and each
//! collection's tally lists them (their paths, and how many documents carry each).

use std::collections::{BTreeMap, BTreeSet};

use bson::{Bson, Document};

use super::checks::{Offender, RefTally, RuleTally};
use crate::sink::META;

pub const CONSISTENCY_THRESHOLD: f64 = 99.0;
pub const VALIDATION_THRESHOLD: f64 = 95.0;

/// One differing document.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub collection: String,
    pub id: Bson,
    /// `None`: the document should not exist.
    pub expected: Option<Document>,
    /// `None`: the document is missing.
    pub actual: Option<Document>,
}

/// Per collection tallies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub expected: u64,
    pub actual: u64,
    pub matched: u64,
    pub differing: u64,
    pub missing: u64,
    pub unexpected: u64,
    /// Service-only fields: the path of each field no transform writes (`nickname`,
    /// `profile.nickname`, `purchaseHistory[].giftNote`) and how many documents compared carry
    /// it. At most [`MAX_SERVICE_ONLY_PATHS`] paths; documents with others count under
    /// [`OTHER_PATHS`].
    pub service_only: BTreeMap<String, u64>,
}

/// The most service-only paths listed per collection (a service keying a sub-document by its
/// own ids would otherwise list one per id).
pub const MAX_SERVICE_ONLY_PATHS: usize = 50;
/// Where documents with service-only paths beyond the listed ones are counted.
pub const OTHER_PATHS: &str = "(other paths)";

impl Tally {
    /// Counts one compared document's service-only fields.
    pub fn note_service_only(&mut self, paths: &BTreeSet<String>) {
        let mut other = false;
        for path in paths {
            let listed = self.service_only.len() - usize::from(self.service_only.contains_key(OTHER_PATHS));
            if let Some(n) = self.service_only.get_mut(path) {
                *n += 1;
            } else if listed < MAX_SERVICE_ONLY_PATHS {
                self.service_only.insert(path.clone(), 1);
            } else {
                other = true;
            }
        }
        if other {
            *self.service_only.entry(OTHER_PATHS.to_string()).or_default() += 1;
        }
    }
}

/// The checks verify runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Document counts per collection agree.
    Counts,
    /// Every document equals the transforms applied to its monolith document.
    Contents,
    /// Declared references name documents that exist.
    References,
    /// Declared data quality rules hold.
    Quality,
}

impl Check {
    pub const ALL: [Check; 4] = [Check::Counts, Check::Contents, Check::References, Check::Quality];

    pub fn name(self) -> &'static str {
        match self {
            Check::Counts => "counts",
            Check::Contents => "contents",
            Check::References => "references",
            Check::Quality => "quality",
        }
    }

    pub fn parse(s: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// How a verification ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// A check failed its gate.
    Fail,
    /// Nothing failed, but something could not be judged (orphans still pending).
    Inconclusive,
}

/// The verdict.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub service: String,
    pub collections: BTreeMap<String, Tally>,
    pub differences: Vec<Difference>,
    /// The checks run, in order.
    pub checks: Vec<Check>,
    /// The references check's results, when it ran.
    pub references: Option<Vec<RefTally>>,
    /// The quality rules' results, when they ran.
    pub quality: Option<Vec<RuleTally>>,
}

impl VerifyReport {
    /// Matching documents over every document on either side, in percent.
    pub fn consistency(&self) -> f64 {
        let (mut matched, mut all) = (0u64, 0u64);
        for t in self.collections.values() {
            matched += t.matched;
            all += t.matched + t.differing + t.missing + t.unexpected;
        }
        if all == 0 { 100.0 } else { 100.0 * matched as f64 / all as f64 }
    }

    /// The validation score, after the seed's validator (record counts, missing records, data
    /// quality), with each criterion measured rather than passed or failed, so the score moves
    /// in proportion to what is wrong: per collection the mean of four shares, counts agreeing
    /// (smaller count over larger), expected documents present, present documents expected,
    /// and contents matching among documents on both sides; collections weighted by size. One
    /// stray document among fifty costs about one point, not a whole criterion.
    pub fn validation(&self) -> f64 {
        let share = |part: u64, whole: u64| if whole == 0 { 1.0 } else { part as f64 / whole as f64 };
        let (mut score, mut weight) = (0.0, 0.0);
        for t in self.collections.values() {
            let size = t.expected.max(t.actual);
            if size == 0 {
                continue;
            }
            let criteria = [
                share(t.expected.min(t.actual), size),
                share(t.expected.saturating_sub(t.missing), t.expected),
                share(t.actual.saturating_sub(t.unexpected), t.actual),
                share(t.matched, t.matched + t.differing),
            ];
            score += size as f64 * criteria.iter().sum::<f64>() / criteria.len() as f64;
            weight += size as f64;
        }
        if weight == 0.0 { 100.0 } else { 100.0 * score / weight }
    }

    /// A check's score, in percent: counts agreeing (smaller count over larger, per collection,
    /// weighted by size), consistency, valid references over those judged, the mean share of
    /// documents passing each quality rule.
    pub fn score(&self, check: Check) -> f64 {
        match check {
            Check::Counts => {
                // Counts after the re-checks: a document in flight during the first pass (gone
                // on both sides, or there on both, when looked at again) is no disagreement.
                let (mut agree, mut weight) = (0.0, 0.0);
                for t in self.collections.values() {
                    let (expected, actual) = settled_counts(t);
                    agree += expected.min(actual) as f64;
                    weight += expected.max(actual) as f64;
                }
                if weight == 0.0 { 100.0 } else { 100.0 * agree / weight }
            }
            Check::Contents => self.consistency(),
            Check::References => {
                let refs = self.references.as_deref().unwrap_or_default();
                if refs.is_empty() { 100.0 } else { refs.iter().map(RefTally::score).sum::<f64>() / refs.len() as f64 }
            }
            Check::Quality => {
                let rules = self.quality.as_deref().unwrap_or_default();
                if rules.is_empty() {
                    100.0
                } else {
                    100.0 * rules.iter().map(RuleTally::share).sum::<f64>() / rules.len() as f64
                }
            }
        }
    }

    /// Whether a check passes its gate. Counts and contents: exactly (or with `gate`, the seed's
    /// 99% consistency and 95% validation); references: no broken one (inherited ones are the
    /// monolith's); quality: every rule's share at least its `mostly`.
    pub fn passes(&self, check: Check, gate: bool) -> bool {
        match check {
            Check::Counts if gate => self.validation() >= VALIDATION_THRESHOLD,
            Check::Counts => self.collections.values().all(|t| {
                let (expected, actual) = settled_counts(t);
                expected == actual
            }),
            Check::Contents if gate => self.consistency() >= CONSISTENCY_THRESHOLD,
            Check::Contents => self.exact(),
            Check::References => self.references.as_deref().unwrap_or_default().iter().all(|r| r.broken == 0),
            Check::Quality => self.quality.as_deref().unwrap_or_default().iter().all(RuleTally::passes),
        }
    }

    /// The overall score as the migration plan's validator defines it: the mean of the checks run.
    pub fn overall(&self) -> f64 {
        if self.checks.is_empty() {
            return 100.0;
        }
        self.checks.iter().map(|c| self.score(*c)).sum::<f64>() / self.checks.len() as f64
    }

    /// Pass, fail (a check failed its gate) or inconclusive (orphans still pending).
    pub fn verdict(&self, gate: bool) -> Verdict {
        if self.checks.iter().any(|c| !self.passes(*c, gate)) {
            Verdict::Fail
        } else if self.references.as_deref().unwrap_or_default().iter().any(|r| r.pending > 0) {
            Verdict::Inconclusive
        } else {
            Verdict::Pass
        }
    }

    /// Whether the service passes the gate.
    pub fn consistent(&self) -> bool {
        self.consistency() >= CONSISTENCY_THRESHOLD && self.validation() >= VALIDATION_THRESHOLD
    }

    /// Whether not a single document differs.
    pub fn exact(&self) -> bool {
        self.collections.values().all(|t| t.differing == 0 && t.missing == 0 && t.unexpected == 0)
    }

    /// The report as printed by `ficus verify`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "collection", "expected", "actual", "matched", "differ", "missing", "unexpected"
        );
        for (c, t) in &self.collections {
            let _ = writeln!(
                s,
                "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
                format!("{}.{c}", self.service),
                t.expected,
                t.actual,
                t.matched,
                t.differing,
                t.missing,
                t.unexpected
            );
        }
        let own: Vec<(&String, &Tally)> = self.collections.iter().filter(|(_, t)| !t.service_only.is_empty()).collect();
        if !own.is_empty() {
            let _ = writeln!(s, "\nservice-only fields (no transform writes them: the service's own, not compared):");
            for (c, t) in own {
                let paths: Vec<String> = t
                    .service_only
                    .iter()
                    .map(|(path, n)| format!("{path} in {n} document{}", if *n == 1 { "" } else { "s" }))
                    .collect();
                let _ = writeln!(s, "  {}.{c}: {}", self.service, paths.join(", "));
            }
        }
        for d in &self.differences {
            let show = |x: &Option<Document>| match x {
                Some(d) => Bson::Document(d.clone()).into_relaxed_extjson().to_string(),
                None => "(none)".into(),
            };
            let _ =
                writeln!(s, "\n{}.{} _id {}:", self.service, d.collection, Bson::clone(&d.id).into_relaxed_extjson());
            let _ = writeln!(s, "  expected {}", show(&d.expected));
            let _ = writeln!(s, "  actual   {}", show(&d.actual));
        }
        s.push_str(&self.render_checks());
        let _ = writeln!(
            s,
            "\nconsistency {:.2}% (gate {CONSISTENCY_THRESHOLD}%), validation score {:.2}% (gate {VALIDATION_THRESHOLD}%): {}",
            self.consistency(),
            self.validation(),
            if self.exact() {
                "consistent"
            } else if self.consistent() {
                "within the gate, with drift"
            } else {
                "DRIFT"
            }
        );
        s
    }
}

impl VerifyReport {
    /// The references' and quality rules' results, with their offenders.
    fn render_checks(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let show =
            |v: &Option<Bson>| v.as_ref().map_or("(absent)".into(), |v| v.clone().into_relaxed_extjson().to_string());
        let offenders = |s: &mut String, list: &[Offender]| {
            for o in list {
                let src = o.source.as_ref().map_or(String::new(), |(c, id)| {
                    format!(", from monolith {c} _id {}", id.clone().into_relaxed_extjson())
                });
                let _ = writeln!(
                    s,
                    "      {} _id {}: {}{src}",
                    o.collection,
                    o.id.clone().into_relaxed_extjson(),
                    show(&o.value)
                );
            }
        };
        if let Some(refs) = &self.references {
            let _ = writeln!(s, "\nreferences:");
            for r in refs {
                let _ = writeln!(
                    s,
                    "  {}: {} checked, {} broken, {} pending, {} inherited (the monolith lacks them too)",
                    r.name, r.checked, r.broken, r.pending, r.inherited
                );
                offenders(&mut s, &r.samples);
            }
        }
        if let Some(rules) = &self.quality {
            let _ = writeln!(s, "\nquality:");
            for r in rules {
                let verdict = if r.passes() { "pass" } else { "FAIL" };
                let _ = writeln!(
                    s,
                    "  {}: {} of {} documents fail ({:.2}% pass, mostly {}): {verdict}",
                    r.name,
                    r.failed,
                    r.checked,
                    100.0 * r.share(),
                    r.mostly
                );
                offenders(&mut s, &r.samples);
            }
        }
        let _ = writeln!(s, "\nchecks:");
        for c in &self.checks {
            let _ = writeln!(
                s,
                "  {:<11} {:>7.2}%  {}",
                c.name(),
                self.score(*c),
                if self.passes(*c, false) { "pass" } else { "FAIL" }
            );
        }
        let _ = writeln!(s, "  {:<11} {:>7.2}%", "overall", self.overall());
        s
    }

    /// The whole report as one JSON document (`ficus verify --json`); `gate` as `--gate`.
    pub fn to_json(&self, gate: bool) -> serde_json::Value {
        let ext = |b: &Bson| b.clone().into_relaxed_extjson();
        let offenders = |list: &[Offender]| -> Vec<serde_json::Value> {
            list.iter()
                .map(|o| {
                    serde_json::json!({
                        "collection": o.collection, "id": ext(&o.id), "value": o.value.as_ref().map(ext),
                        "source": o.source.as_ref().map(|(c, id)| serde_json::json!({ "collection": c, "id": ext(id) })),
                    })
                })
                .collect()
        };
        let checks: serde_json::Map<String, serde_json::Value> = self
            .checks
            .iter()
            .map(|c| {
                (c.name().to_string(), serde_json::json!({ "score": self.score(*c), "pass": self.passes(*c, gate) }))
            })
            .collect();
        let collections: serde_json::Map<String, serde_json::Value> = self
            .collections
            .iter()
            .map(|(c, t)| {
                let v = serde_json::json!({
                    "expected": t.expected, "actual": t.actual, "matched": t.matched, "differing": t.differing,
                    "missing": t.missing, "unexpected": t.unexpected, "serviceOnly": t.service_only,
                });
                (c.clone(), v)
            })
            .collect();
        let verdict = match self.verdict(gate) {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        };
        serde_json::json!({
            "service": self.service,
            "result": verdict,
            "overall": self.overall(),
            "checks": checks,
            "collections": collections,
            "differences": self.differences.iter().map(|d| serde_json::json!({
                "collection": d.collection, "id": ext(&d.id),
                "expected": d.expected.as_ref().map(|e| ext(&Bson::Document(e.clone()))),
                "actual": d.actual.as_ref().map(|a| ext(&Bson::Document(a.clone()))),
            })).collect::<Vec<_>>(),
            "references": self.references.as_ref().map(|refs| refs.iter().map(|r| serde_json::json!({
                "name": r.name, "checked": r.checked, "broken": r.broken, "pending": r.pending,
                "inherited": r.inherited, "score": r.score(), "offenders": offenders(&r.samples),
            })).collect::<Vec<_>>()),
            "quality": self.quality.as_ref().map(|rules| rules.iter().map(|r| serde_json::json!({
                "rule": r.name, "checked": r.checked, "failed": r.failed, "share": r.share(), "mostly": r.mostly,
                "pass": r.passes(), "offenders": offenders(&r.samples),
            })).collect::<Vec<_>>()),
        })
    }
}

/// A collection's expected and present documents as the re-checks left them: those that match
/// or differ, plus the missing ones on one side and the unexpected ones on the other.
fn settled_counts(t: &Tally) -> (u64, u64) {
    (t.matched + t.differing + t.missing, t.matched + t.differing + t.unexpected)
}

/// Content hash of a target document: keys sorted at every depth, `_id` and ficus's metadata
/// left out, BLAKE3 over the BSON encoding.
pub fn content_hash(doc: &Document) -> Vec<u8> {
    fn canon(b: &Bson) -> Bson {
        match b {
            Bson::Document(d) => {
                let mut keys: Vec<&String> = d.keys().collect();
                keys.sort();
                Bson::Document(keys.into_iter().map(|k| (k.clone(), canon(&d[k.as_str()]))).collect())
            }
            Bson::Array(a) => Bson::Array(a.iter().map(canon).collect()),
            other => other.clone(),
        }
    }
    let mut d = doc.clone();
    d.remove("_id");
    d.remove(META);
    let Bson::Document(c) = canon(&Bson::Document(d)) else { unreachable!("a document stays a document") };
    let bytes = bson::serialize_to_vec(&c).unwrap_or_default();
    blake3::hash(&bytes).as_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(collections: &[(&str, Tally)]) -> VerifyReport {
        VerifyReport {
            service: "s".into(),
            collections: collections.iter().map(|(c, t)| (c.to_string(), t.clone())).collect(),
            differences: Vec::new(),
            checks: vec![Check::Counts, Check::Contents],
            references: None,
            quality: None,
        }
    }

    #[test]
    fn counts_are_judged_as_the_rechecks_left_them() {
        // 6 documents there on the first pass, gone from both sides when re-checked (deletes
        // in flight): the raw counts differ, the settled ones agree.
        let mut t = tally(69, 75, 69, 0, 0, 0);
        let r = report(&[("customer_events", t.clone())]);
        assert!(r.passes(Check::Counts, false), "{:?}", r.collections);
        assert_eq!(r.score(Check::Counts), 100.0);
        t.missing = 2;
        let r = report(&[("customer_events", t)]);
        assert!(!r.passes(Check::Counts, false));
        assert!((r.score(Check::Counts) - 100.0 * 69.0 / 71.0).abs() < 1e-9);
    }

    #[test]
    fn each_check_has_its_score_and_gate_and_pending_orphans_are_inconclusive() {
        let mut r = report(&[("customers", tally(100, 100, 100, 0, 0, 0))]);
        assert_eq!(r.verdict(false), Verdict::Pass);
        let broken =
            RefTally { name: "refs".into(), checked: 200, inherited: 40, pending: 0, broken: 4, samples: vec![] };
        r.references = Some(vec![broken.clone()]);
        r.checks.push(Check::References);
        // 4 broken of the 160 judged (the monolith's own 40 left out).
        assert!((r.score(Check::References) - 97.5).abs() < 1e-9, "{}", r.score(Check::References));
        assert!(!r.passes(Check::References, true), "a broken reference fails, gate or not");
        assert_eq!(r.verdict(true), Verdict::Fail);
        r.references = Some(vec![RefTally { broken: 0, pending: 3, ..broken }]);
        assert_eq!(r.verdict(false), Verdict::Inconclusive, "nothing failed, something could not be judged");
        let rule = |failed, mostly| RuleTally { name: "tier".into(), mostly, checked: 100, failed, samples: vec![] };
        r.quality = Some(vec![rule(2, 0.99)]);
        r.checks.push(Check::Quality);
        assert!(!r.passes(Check::Quality, false), "98% passing, 99% asked");
        r.quality = Some(vec![rule(2, 0.95)]);
        assert!(r.passes(Check::Quality, false));
        assert!((r.score(Check::Quality) - 98.0).abs() < 1e-9);
        // The overall score: the mean of the checks run.
        let mean = (100.0 + 100.0 + 100.0 + 98.0) / 4.0;
        assert!((r.overall() - mean).abs() < 1e-9, "{}", r.overall());
        let json = r.to_json(false);
        assert_eq!(json["result"], "inconclusive");
        assert_eq!(json["checks"]["quality"]["pass"], true);
        assert_eq!(json["references"][0]["pending"], 3);
        assert_eq!(Check::parse("references"), Some(Check::References));
    }

    fn tally(expected: u64, actual: u64, matched: u64, differing: u64, missing: u64, unexpected: u64) -> Tally {
        Tally { expected, actual, matched, differing, missing, unexpected, service_only: BTreeMap::new() }
    }

    fn set(paths: &[&str]) -> BTreeSet<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn service_only_fields_are_counted_per_document_listed_and_never_drift() {
        let mut t = tally(3, 3, 3, 0, 0, 0);
        t.note_service_only(&set(&["nickname", "profile.nickname"]));
        t.note_service_only(&set(&["nickname"]));
        t.note_service_only(&set(&[]));
        assert_eq!(t.service_only, BTreeMap::from([("nickname".into(), 2), ("profile.nickname".into(), 1)]));
        let r = report(&[("customers", t), ("customer_events", tally(2, 2, 2, 0, 0, 0))]);
        assert!(r.exact() && r.consistent());
        let text = r.render();
        assert!(
            text.contains("service-only fields")
                && text.contains("s.customers: nickname in 2 documents, profile.nickname in 1 document\n"),
            "{text}"
        );
        assert!(!text.contains("s.customer_events:"), "a collection without any is not listed:\n{text}");
        assert!(!report(&[("c", tally(1, 1, 1, 0, 0, 0))]).render().contains("service-only"));
    }

    #[test]
    fn service_only_paths_beyond_the_limit_are_counted_together() {
        let mut t = Tally::default();
        let many: Vec<String> = (0..MAX_SERVICE_ONLY_PATHS + 5).map(|i| format!("tags.t{i:03}")).collect();
        t.note_service_only(&many.iter().cloned().collect());
        t.note_service_only(&set(&["tags.t000", "tags.zzz"]));
        t.note_service_only(&set(&["tags.t001"]));
        assert_eq!(t.service_only.len(), MAX_SERVICE_ONLY_PATHS + 1);
        assert_eq!(t.service_only[OTHER_PATHS], 2, "two documents carried paths beyond the limit");
        assert_eq!((t.service_only["tags.t000"], t.service_only["tags.t001"]), (2, 2));
    }

    #[test]
    fn a_clean_service_scores_full_marks() {
        let r = report(&[("customers", tally(14, 14, 14, 0, 0, 0)), ("customer_events", tally(40, 40, 40, 0, 0, 0))]);
        assert_eq!((r.consistency(), r.validation()), (100.0, 100.0));
        assert!(r.exact() && r.consistent());
        assert_eq!(report(&[]).validation(), 100.0);
    }

    #[test]
    fn scores_move_in_proportion_to_what_is_wrong() {
        // One stray document among 55: about a point off, not a whole criterion.
        let one = report(&[("customers", tally(14, 14, 14, 0, 0, 0)), ("customer_events", tally(40, 41, 40, 0, 0, 1))]);
        assert!((one.consistency() - 100.0 * 54.0 / 55.0).abs() < 1e-9, "{}", one.consistency());
        assert!(one.validation() > 98.5 && one.validation() < 100.0, "{}", one.validation());
        assert!(!one.exact());
        // Ten times as much wrong costs about ten times as much.
        let ten =
            report(&[("customers", tally(14, 14, 14, 0, 0, 0)), ("customer_events", tally(40, 50, 40, 0, 0, 10))]);
        let (lost_one, lost_ten) = (100.0 - one.validation(), 100.0 - ten.validation());
        assert!(lost_ten > 5.0 * lost_one && lost_ten < 15.0 * lost_one, "{lost_one} vs {lost_ten}");
        // Missing, differing and unexpected documents each count.
        let mixed = report(&[("c", tally(100, 100, 90, 5, 5, 5))]);
        assert!((mixed.consistency() - 100.0 * 90.0 / 105.0).abs() < 1e-9);
        let expected = 100.0 * (1.0 + 0.95 + 0.95 + 90.0 / 95.0) / 4.0;
        assert!((mixed.validation() - expected).abs() < 1e-9, "{}", mixed.validation());
        assert!(!mixed.consistent());
    }

    #[test]
    fn content_hashes_ignore_key_order_ids_and_metadata() {
        let a = bson::doc! { "_id": 1, "x": { "b": 2, "a": 1 }, "_ficus": { "v": "1" } };
        let b = bson::doc! { "x": { "a": 1, "b": 2 }, "_id": 2 };
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(content_hash(&a), content_hash(&bson::doc! { "x": { "a": 1, "b": 3 } }));
    }
}
