//! The verdict of a verification: per collection tallies, the documents that differ, and the
//! scores the seed's migration gate is judged by (pure, so each is tested on its own).
//!
//! - **consistency**: matching documents over every document on either side;
//! - **validation**: per collection, the mean of four shares (counts agreeing, expected
//!   documents present, present documents expected, contents matching), collections weighted by
//!   size; see [`VerifyReport::validation`].
//!
//! Fields no transform writes are the service's own: they are not compared, and each
//! collection's tally lists them (their paths, and how many documents carry each).

use std::collections::{BTreeMap, BTreeSet};

use bson::{Bson, Document};

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

/// The verdict.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub service: String,
    pub collections: BTreeMap<String, Tally>,
    pub differences: Vec<Difference>,
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
        }
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
