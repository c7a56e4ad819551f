//! `ficus verify`: proves a service database equals the transforms applied to the monolith.
//!
//! Every source document the service reads is mapped as a snapshot copy and run through the
//! service's transforms, exactly as live traffic would be; the expected target documents are
//! reduced to a content hash (BLAKE3 over the document with keys sorted at every depth, ficus's
//! metadata and `_id` left out) and kept in a scratch collection in ficus's store, so memory
//! stays bounded whatever the size. The target is then streamed and each document's hash is
//! looked up in batches. Documents that differ are re-checked once after a short settling
//! pause (live traffic may have been in flight), and a sample is shown side by side.
//!
//! Scores follow the seed's migration gate: consistency (matching documents over all documents
//! on either side) against 99%, and a validation score (per collection: counts equal, nothing
//! missing, nothing unexpected, contents matching) against 95%.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::time::Duration;

use bson::{Bson, Document, Timestamp, doc};
use futures::TryStreamExt;
use mongodb::options::InsertManyOptions;
use mongodb::{Collection, Database};

use crate::config::topics::Topics;
use crate::event::Op;
use crate::event::mapping::{ChangeRecord, map_change};
use crate::mongo;
use crate::sink::{META, doc_key, strip_meta};
use crate::transform::{ServiceTransforms, WriteOp};

pub const CONSISTENCY_THRESHOLD: f64 = 99.0;
pub const VALIDATION_THRESHOLD: f64 = 95.0;

/// Errors of a verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("MongoDB: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error("{0}")]
    Transform(#[from] crate::transform::TransformError),
    #[error("a document of {collection} is not valid BSON: {error}")]
    Bson { collection: String, error: bson::error::Error },
}

/// Reads documents raw and converts them structurally (see [`mongo::to_document`]), so field
/// names like `$oid` stay field names.
fn document(collection: &str, raw: bson::RawDocumentBuf) -> Result<Document, VerifyError> {
    mongo::to_document(&raw).map_err(|error| VerifyError::Bson { collection: collection.to_string(), error })
}

/// Options.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// How many differing documents to show side by side.
    pub sample: usize,
    /// Pause before re-checking differences.
    pub settle: Duration,
}

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

/// One rollup group being recomputed from the source.
#[derive(Default)]
struct Group {
    count: i64,
    fields: Document,
    distinct: BTreeMap<String, Vec<Bson>>,
    order: Vec<String>,
}

/// Why a document is suspect after the first pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspect {
    Differing,
    Missing,
    Unexpected,
}

/// Expected target documents of a service, computed from the source.
struct Expected<'a> {
    transforms: &'a ServiceTransforms,
    topics: &'a Topics,
    source_name: &'a str,
    scratch: Collection<Document>,
    groups: HashMap<(String, String), (Bson, Group)>,
    count_fields: HashMap<String, String>,
}

const BATCH: usize = 1000;

impl Expected<'_> {
    /// Every target write the current state of one source document leads to.
    fn writes(&self, collection: &str, doc: Document) -> Result<Vec<WriteOp>, VerifyError> {
        let Some(def) = self.topics.for_collection(collection) else { return Ok(Vec::new()) };
        let record = ChangeRecord {
            op: Op::Snapshot,
            collection: collection.to_string(),
            document_id: doc.get("_id").cloned().unwrap_or(Bson::Null),
            after: Some(doc),
            before: None,
            changed: None,
            removed: Vec::new(),
            cluster_time: Timestamp { time: 0, increment: 0 },
            index: 0,
            wall_time: None,
            resume_token: None,
        };
        let mut out = Vec::new();
        for ev in map_change(def, self.source_name, record).events {
            out.extend(self.transforms.apply(&ev)?);
        }
        Ok(out)
    }

    async fn record(
        &mut self,
        src_collection: &str,
        src_id: &Bson,
        ops: Vec<WriteOp>,
        pending: &mut Vec<Document>,
    ) -> Result<(), VerifyError> {
        for op in ops {
            match op {
                WriteOp::Upsert { collection, id, doc } => {
                    pending.push(doc! {
                        "_id": doc_key(&collection, &id),
                        "c": &collection,
                        "id": id,
                        "h": Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: content_hash(&doc) }),
                        "src": { "c": src_collection, "id": src_id.clone() },
                    });
                }
                WriteOp::Rollup { collection, group: Some(g), count_field, distinct, group_fields, .. } => {
                    self.count_fields.insert(collection.clone(), count_field.clone());
                    let entry =
                        self.groups.entry((collection, g.to_string())).or_insert_with(|| (g.clone(), Group::default()));
                    let grp = &mut entry.1;
                    grp.count += 1;
                    grp.fields = group_fields;
                    for (field, value) in distinct {
                        if !grp.order.contains(&field) {
                            grp.order.push(field.clone());
                        }
                        let seen = grp.distinct.entry(field).or_default();
                        if let Some(v) = value.filter(|v| !matches!(v, Bson::Null))
                            && !seen.contains(&v)
                        {
                            seen.push(v);
                        }
                    }
                }
                WriteOp::Rollup { group: None, .. }
                | WriteOp::Delete { .. }
                | WriteOp::Sweep { .. }
                | WriteOp::Retain { .. } => {}
            }
        }
        if pending.len() >= BATCH {
            self.flush(pending).await?;
        }
        Ok(())
    }

    async fn flush(&self, pending: &mut Vec<Document>) -> Result<(), VerifyError> {
        if pending.is_empty() {
            return Ok(());
        }
        // The same target reported twice (e.g. a purchase listed twice) lands once, as in the sink.
        match self
            .scratch
            .insert_many(pending.drain(..))
            .with_options(InsertManyOptions::builder().ordered(false).build())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::InsertMany(im) if im.write_errors.as_ref().is_some_and(|w| w.iter().all(|w| w.code == 11000))) => {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The rollup group documents, as the sink would have built them.
    fn group_docs(&self) -> Vec<(String, Bson, Document)> {
        let mut out = Vec::new();
        for ((collection, _), (g, grp)) in &self.groups {
            let mut d = grp.fields.clone();
            d.insert(self.count_fields[collection].clone(), grp.count);
            for field in &grp.order {
                let mut vals = grp.distinct.get(field).cloned().unwrap_or_default();
                vals.sort_by_key(|b| b.to_string());
                d.insert(field.clone(), vals);
            }
            out.push((collection.clone(), g.clone(), d));
        }
        out
    }
}

/// Verifies one service database against the source.
pub async fn verify(
    transforms: &ServiceTransforms,
    topics: &Topics,
    source: &Database,
    source_name: &str,
    target: &Database,
    scratch_db: &Database,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let scratch = scratch_db.collection::<Document>(&format!("verify_{}", transforms.service()));
    scratch.drop().await?;
    let mut expected = Expected {
        transforms,
        topics,
        source_name,
        scratch: scratch.clone(),
        groups: HashMap::new(),
        count_fields: HashMap::new(),
    };
    let source_collections: BTreeSet<String> =
        transforms.topics().iter().filter_map(|t| topics.by_topic(t)).map(|d| d.collection.clone()).collect();
    let bar = bar();

    // 1. Expected: the source through the transforms.
    let mut pending = Vec::with_capacity(BATCH);
    for coll in &source_collections {
        let mut cursor = source.collection::<bson::RawDocumentBuf>(coll).find(doc! {}).batch_size(BATCH as u32).await?;
        while let Some(d) = cursor.try_next().await? {
            let d = document(coll, d)?;
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            let ops = expected.writes(coll, d)?;
            expected.record(coll, &id, ops, &mut pending).await?;
            bar.inc(1);
        }
    }
    for (collection, g, d) in expected.group_docs() {
        pending.push(doc! {
            "_id": doc_key(&collection, &g),
            "c": &collection,
            "id": g,
            "h": Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: content_hash(&d) }),
            "rollup": true,
        });
        if pending.len() >= BATCH {
            expected.flush(&mut pending).await?;
        }
    }
    expected.flush(&mut pending).await?;

    // 2. Actual: the target, looked up against the expectation in batches.
    let mut report = VerifyReport { service: transforms.service().to_string(), ..Default::default() };
    let mut suspects: Vec<(String, Bson, Suspect)> = Vec::new();
    for coll in transforms.collections() {
        let tally = report.collections.entry(coll.clone()).or_default();
        tally.expected = scratch.count_documents(doc! { "c": &coll }).await?;
        let mut cursor =
            target.collection::<bson::RawDocumentBuf>(&coll).find(doc! {}).batch_size(BATCH as u32).await?;
        let mut chunk: Vec<Document> = Vec::with_capacity(BATCH);
        loop {
            let next = cursor.try_next().await?.map(|d| document(&coll, d)).transpose()?;
            let done = next.is_none();
            if let Some(d) = next {
                chunk.push(d);
            }
            if chunk.len() >= BATCH || (done && !chunk.is_empty()) {
                compare_chunk(&scratch, &coll, &mut chunk, tally, &mut suspects).await?;
                bar.inc(BATCH as u64);
            }
            if done {
                break;
            }
        }
        // Expected documents nobody matched are missing.
        let mut missing =
            scratch.find(doc! { "c": &coll, "seen": { "$ne": true } }).projection(doc! { "id": 1 }).await?;
        while let Some(m) = missing.try_next().await? {
            tally.missing += 1;
            if let Some(id) = m.get("id").cloned() {
                suspects.push((coll.clone(), id, Suspect::Missing));
            }
        }
    }
    bar.finish_and_clear();

    // 3. Re-check what differs once, after a pause, against fresh reads on both sides.
    if !suspects.is_empty() {
        tokio::time::sleep(opts.settle).await;
        recheck(&mut report, &expected, source, target, suspects, opts.sample).await?;
    }
    scratch.drop().await?;
    Ok(report)
}

async fn compare_chunk(
    scratch: &Collection<Document>,
    coll: &str,
    chunk: &mut Vec<Document>,
    tally: &mut Tally,
    suspects: &mut Vec<(String, Bson, Suspect)>,
) -> Result<(), VerifyError> {
    let keys: Vec<String> = chunk.iter().map(|d| doc_key(coll, d.get("_id").unwrap_or(&Bson::Null))).collect();
    let found: Vec<Document> = scratch.find(doc! { "_id": { "$in": &keys } }).await?.try_collect().await?;
    let by_key: HashMap<&str, &Document> = found.iter().filter_map(|f| Some((f.get_str("_id").ok()?, f))).collect();
    for (d, key) in chunk.drain(..).zip(keys.iter()) {
        tally.actual += 1;
        let id = d.get("_id").cloned().unwrap_or(Bson::Null);
        match by_key.get(key.as_str()) {
            None => {
                tally.unexpected += 1;
                suspects.push((coll.to_string(), id, Suspect::Unexpected));
            }
            Some(exp) => {
                let same = matches!(exp.get("h"), Some(Bson::Binary(b)) if b.bytes == content_hash(&d));
                if same {
                    tally.matched += 1;
                } else {
                    tally.differing += 1;
                    suspects.push((coll.to_string(), id, Suspect::Differing));
                }
            }
        }
    }
    scratch.update_many(doc! { "_id": { "$in": keys } }, doc! { "$set": { "seen": true } }).await?;
    Ok(())
}

/// Re-reads each suspect on both sides; what now matches is moved to `matched`, the rest is
/// kept, and a sample of it is recorded side by side.
async fn recheck(
    report: &mut VerifyReport,
    expected: &Expected<'_>,
    source: &Database,
    target: &Database,
    suspects: Vec<(String, Bson, Suspect)>,
    sample: usize,
) -> Result<(), VerifyError> {
    const MAX_RECHECK: usize = 10_000;
    for (coll, id, why) in suspects.into_iter().take(MAX_RECHECK) {
        let actual = target
            .collection::<bson::RawDocumentBuf>(&coll)
            .find_one(doc! { "_id": id.clone() })
            .await?
            .map(|d| document(&coll, d))
            .transpose()?
            .map(strip_meta);
        let exp = expected_now(expected, source, &coll, &id).await?;
        let tally = report.collections.entry(coll.clone()).or_default();
        let agree = match (&exp, &actual) {
            (Some(e), Some(a)) => content_hash(e) == content_hash(a),
            (None, None) => true,
            _ => false,
        };
        if agree {
            // Traffic in flight during the first pass; it matches now.
            match why {
                Suspect::Differing => tally.differing -= 1,
                Suspect::Missing => tally.missing -= 1,
                Suspect::Unexpected => tally.unexpected -= 1,
            }
            if actual.is_some() {
                tally.matched += 1;
            }
        } else if report.differences.len() < sample {
            report.differences.push(Difference { collection: coll, id, expected: exp, actual });
        }
    }
    Ok(())
}

/// The expected state of one target document now, recomputed from its source document.
async fn expected_now(
    expected: &Expected<'_>,
    source: &Database,
    coll: &str,
    id: &Bson,
) -> Result<Option<Document>, VerifyError> {
    let entry = expected.scratch.find_one(doc! { "_id": doc_key(coll, id) }).await?;
    if entry.as_ref().is_some_and(|e| e.get_bool("rollup").unwrap_or(false)) {
        let key = (coll.to_string(), id.to_string());
        return Ok(expected
            .group_docs()
            .into_iter()
            .find(|(c, g, _)| (c.clone(), g.to_string()) == key)
            .map(|(_, _, d)| d));
    }
    let Some(src) = entry.and_then(|e| e.get_document("src").ok().cloned()) else { return Ok(None) };
    let (Ok(src_coll), Some(src_id)) = (src.get_str("c"), src.get("_id").or_else(|| src.get("id"))) else {
        return Ok(None);
    };
    let Some(doc) = source
        .collection::<bson::RawDocumentBuf>(src_coll)
        .find_one(doc! { "_id": src_id.clone() })
        .await?
        .map(|d| document(src_coll, d))
        .transpose()?
    else {
        return Ok(None);
    };
    for op in expected.writes(src_coll, doc)? {
        if let WriteOp::Upsert { collection, id: tid, doc } = op
            && collection == coll
            && &tid == id
        {
            return Ok(Some(doc));
        }
    }
    Ok(None)
}

fn bar() -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("verify {spinner} {pos} documents {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar
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
        Tally { expected, actual, matched, differing, missing, unexpected }
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
