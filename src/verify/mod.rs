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
//! Only the fields the transforms write are compared (see [`crate::transform::FieldTree`]): a
//! service document is cut down to them before it is hashed, and what is left out, the fields
//! the service keeps on its own, is listed per collection as *service-only fields*, never
//! counted as drift.
//!
//! Scores follow the seed's migration gate: consistency (matching documents over all documents
//! on either side) against 99%, and a validation score (per collection: counts equal, nothing
//! missing, nothing unexpected, contents matching) against 95%.
//!
//! A service whose targets are Redis entries is verified by [`verify_redis`] (`redis`): the
//! same expectation, compared with the entries and their absolute expiry.

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::ops::Range;
use std::time::Duration;

use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::Database;

use crate::config::topics::Topics;
use crate::mongo;
use crate::sink::rollup::GroupTally;
use crate::sink::{doc_key, strip_meta};
use crate::transform::{Projection, ServiceTransforms, WriteOp};

mod checks;
mod redis;
mod score;
mod scratch;

pub use scratch::MEMORY_ENTRIES;
use scratch::Scratch;

pub use checks::Offender;
pub use redis::verify_redis;
pub use score::{Check, Difference, Tally, Verdict, VerifyReport, content_hash};

/// Errors of a verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("MongoDB: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error("{0}")]
    Transform(#[from] crate::transform::TransformError),
    #[error("a document of {collection} is not valid BSON: {error}")]
    Bson { collection: String, error: bson::error::Error },
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
}

impl crate::retry::Classify for VerifyError {
    fn class(&self) -> crate::retry::ErrorClass {
        match self {
            VerifyError::Mongo(e) => e.class(),
            VerifyError::Sink(e) => e.class(),
            VerifyError::Transform(_) | VerifyError::Bson { .. } => crate::retry::ErrorClass::Fatal,
        }
    }
}

/// Reads documents raw and converts them structurally (see [`mongo::to_document`]), so field
/// names like `$oid` stay field names.
fn document(collection: &str, raw: bson::RawDocumentBuf) -> Result<Document, VerifyError> {
    mongo::to_document(&raw).map_err(|error| VerifyError::Bson { collection: collection.to_string(), error })
}

/// Options.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// How many differing documents to show side by side, per collection.
    pub sample: usize,
    /// Pause before re-checking differences.
    pub settle: Duration,
    /// How many times differences are re-checked (each after `settle`), a document counting as
    /// matching once it matched in any round: its change was in flight. A safe cutover's verify
    /// asks for several, since the gaining side may go on writing the moving documents (the
    /// monolith's own code, merged into the service's) while it runs; a lost write differs in
    /// every round.
    pub rechecks: u32,
    /// Only the documents whose routing key falls in these buckets (see `cutover::route`), in
    /// the collections written back: what a safe cutover moves. Rollups and targets without a
    /// reverse are left out then. `None`: everything.
    pub buckets: Option<Range<u8>>,
    /// The data quality rules the transform files declare, judged on every document compared
    /// (`ficus verify`; a cutover's verify of the moving buckets leaves them out).
    pub quality: bool,
    /// Expected documents kept in memory before the expectation spills into the store
    /// ([`MEMORY_ENTRIES`] by default).
    pub memory_entries: usize,
}

/// Whether a service document is in scope: every one without `buckets`, else one of a
/// collection written back whose routing key's bucket is in range.
fn in_scope(transforms: &ServiceTransforms, buckets: Option<&Range<u8>>, collection: &str, doc: &Document) -> bool {
    let Some(range) = buckets else { return true };
    transforms
        .reverse_for(collection)
        .and_then(|r| r.route_value(doc))
        .is_some_and(|key| range.contains(&crate::cutover::route::bucket_of(&key)))
}

/// A service document cut down to the fields the transforms write into its collection.
fn written_part(transforms: &ServiceTransforms, collection: &str, doc: Document) -> Projection {
    match transforms.written_fields(collection) {
        Some(tree) => tree.project(&doc),
        None => Projection { document: doc, service_only: BTreeSet::new() },
    }
}

/// One rollup group being recomputed from the source: its constant fields and its members'
/// aggregates, as the sink computes them.
struct Group {
    fields: Document,
    count_field: String,
    tally: GroupTally,
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
    scratch: Scratch,
    groups: HashMap<(String, String), (Bson, Group)>,
    buckets: Option<Range<u8>>,
}

const BATCH: usize = 1000;

impl Expected<'_> {
    /// Every target write the current state of one source document leads to.
    fn writes(&self, collection: &str, doc: Document) -> Result<Vec<WriteOp>, VerifyError> {
        let Some(def) = self.topics.for_collection(collection) else { return Ok(Vec::new()) };
        Ok(self.transforms.writes_of_copy(def, self.source_name, doc)?)
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
                    if !in_scope(self.transforms, self.buckets.as_ref(), &collection, &doc) {
                        continue;
                    }
                    pending.push(doc! {
                        "_id": doc_key(&collection, &id),
                        "c": &collection,
                        "id": id,
                        "h": Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: content_hash(&doc) }),
                        "src": { "c": src_collection, "id": src_id.clone() },
                    });
                }
                WriteOp::Rollup { collection, group: Some(g), count_field, distinct, group_fields, .. }
                    if self.buckets.is_none() =>
                {
                    let (_, grp) = self.groups.entry((collection, g.to_string())).or_insert_with(|| {
                        let tally = GroupTally::new(distinct.iter().map(|(f, _)| f.as_str()));
                        (g.clone(), Group { fields: Document::new(), count_field: count_field.clone(), tally })
                    });
                    grp.fields = group_fields;
                    grp.tally.add(|field| distinct.iter().find(|(f, _)| f == field).and_then(|(_, v)| v.as_ref()));
                }
                WriteOp::Rollup { .. }
                | WriteOp::Delete { .. }
                | WriteOp::Sweep { .. }
                | WriteOp::Retain { .. }
                | WriteOp::Merge { .. }
                | WriteOp::Witness { .. } => {}
            }
        }
        if pending.len() >= BATCH {
            self.flush(pending).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, pending: &mut Vec<Document>) -> Result<(), VerifyError> {
        // The same target reported twice (e.g. a purchase listed twice) lands once, as in the sink.
        self.scratch.insert(std::mem::take(pending)).await
    }

    /// The rollup group documents, as the sink would have built them.
    fn group_docs(&self) -> Vec<(String, Bson, Document)> {
        let mut out = Vec::new();
        for ((collection, _), (g, grp)) in &self.groups {
            let mut d = grp.fields.clone();
            d.extend(grp.tally.fields(&grp.count_field));
            out.push((collection.clone(), g.clone(), d));
        }
        out
    }
}

/// Verifies one service database against the source: the source through the transforms into
/// a scratch collection, the target compared with it, and what differs checked again.
pub async fn verify(
    transforms: &ServiceTransforms,
    topics: &Topics,
    source: &Database,
    source_name: &str,
    target: &Database,
    scratch_db: &Database,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let coll = scratch_db.collection::<Document>(&format!("verify_{}", transforms.service()));
    let mut expected = Expected {
        transforms,
        topics,
        source_name,
        scratch: Scratch::new(coll, opts.memory_entries).await?,
        groups: HashMap::new(),
        buckets: opts.buckets.clone(),
    };
    let bar = bar();
    expect_all(&mut expected, source, &bar).await?;
    let mut quality = opts.quality.then(|| checks::Quality::new(transforms));
    let scratch = &mut expected.scratch;
    let (mut report, mut suspects) = compare_all(transforms, scratch, target, opts, quality.as_mut(), &bar).await?;
    bar.finish_and_clear();
    if let Some(q) = quality {
        report.quality = Some(q.tallies);
        report.checks.push(Check::Quality);
    }
    // Re-check what differs after a pause, against fresh reads on both sides, as many rounds as
    // asked, until nothing differs.
    let rounds = opts.rechecks.max(1);
    for round in 1..=rounds {
        if suspects.is_empty() {
            break;
        }
        tokio::time::sleep(opts.settle).await;
        let sample = if round == rounds { opts.sample } else { 0 };
        suspects = recheck(&mut report, &expected, source, target, suspects, sample).await?;
    }
    if let Some(rules) = report.quality.as_mut() {
        for r in rules.iter_mut() {
            sources_of(&expected.scratch, &mut r.samples).await?;
        }
    }
    expected.scratch.drop().await?;
    Ok(report)
}

/// The `references` check, added to `report`: every reference the service declares, across
/// service databases (see `checks`). `all`: every service, to tell inherited orphans.
pub async fn references(
    report: &mut VerifyReport,
    transforms: &ServiceTransforms,
    all: &[std::sync::Arc<ServiceTransforms>],
    service_db: &Database,
    monolith: &Database,
    settle: Duration,
) -> Result<(), VerifyError> {
    report.references = Some(checks::references(transforms, all, service_db, monolith, settle).await?);
    report.checks.push(Check::References);
    Ok(())
}

/// Fills in the monolith documents offenders were made from, from verify's expectation.
async fn sources_of(scratch: &Scratch, offenders: &mut [Offender]) -> Result<(), VerifyError> {
    let keys: Vec<String> = offenders.iter().map(|o| doc_key(&o.collection, &o.id)).collect();
    let found = scratch.get_many(&keys).await?;
    let sources: HashMap<String, (String, Bson)> = found
        .iter()
        .filter_map(|e| {
            let src = e.get_document("src").ok()?;
            Some((e.get_str("_id").ok()?.to_string(), (src.get_str("c").ok()?.to_string(), src.get("id")?.clone())))
        })
        .collect();
    checks::with_sources(offenders, &sources);
    Ok(())
}

/// What differs on a first look: a document, and how.
type Suspects = Vec<(String, Bson, Suspect)>;

/// The expectation: every source document of the service's topics through the transforms (the
/// rollups' group documents last), hashed into the scratch collection.
async fn expect_all(
    expected: &mut Expected<'_>,
    source: &Database,
    bar: &indicatif::ProgressBar,
) -> Result<(), VerifyError> {
    let (transforms, topics) = (expected.transforms, expected.topics);
    let source_collections: BTreeSet<String> =
        transforms.topics().iter().filter_map(|t| topics.by_topic(t)).map(|d| d.collection.clone()).collect();
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
    expected.flush(&mut pending).await
}

/// The target against the expectation, in batches: the tallies, and what differs or is missing.
async fn compare_all(
    transforms: &ServiceTransforms,
    scratch: &mut Scratch,
    target: &Database,
    opts: &VerifyOptions,
    mut quality: Option<&mut checks::Quality<'_>>,
    bar: &indicatif::ProgressBar,
) -> Result<(VerifyReport, Suspects), VerifyError> {
    let mut report = VerifyReport {
        service: transforms.service().to_string(),
        checks: vec![Check::Counts, Check::Contents],
        ..Default::default()
    };
    let mut suspects: Suspects = Vec::new();
    let in_scope_collections =
        transforms.collections().into_iter().filter(|c| opts.buckets.is_none() || transforms.reverse_for(c).is_some());
    for coll in in_scope_collections {
        let tally = report.collections.entry(coll.clone()).or_default();
        tally.expected = scratch.count(&coll).await?;
        let mut cursor =
            target.collection::<bson::RawDocumentBuf>(&coll).find(doc! {}).batch_size(BATCH as u32).await?;
        let mut chunk: Vec<Document> = Vec::with_capacity(BATCH);
        loop {
            let next = cursor.try_next().await?.map(|d| document(&coll, d)).transpose()?;
            let done = next.is_none();
            if let Some(d) = next
                && in_scope(transforms, opts.buckets.as_ref(), &coll, &d)
            {
                if let Some(q) = quality.as_deref_mut() {
                    q.judge(&coll, &d);
                }
                let written = written_part(transforms, &coll, d);
                tally.note_service_only(&written.service_only);
                chunk.push(written.document);
            }
            if chunk.len() >= BATCH || (done && !chunk.is_empty()) {
                compare_chunk(scratch, &coll, &mut chunk, tally, &mut suspects).await?;
                bar.inc(BATCH as u64);
            }
            if done {
                break;
            }
        }
        // Expected documents nobody matched are missing.
        for id in scratch.unseen(&coll).await? {
            tally.missing += 1;
            suspects.push((coll.clone(), id, Suspect::Missing));
        }
    }
    Ok((report, suspects))
}

async fn compare_chunk(
    scratch: &mut Scratch,
    coll: &str,
    chunk: &mut Vec<Document>,
    tally: &mut Tally,
    suspects: &mut Vec<(String, Bson, Suspect)>,
) -> Result<(), VerifyError> {
    let keys: Vec<String> = chunk.iter().map(|d| doc_key(coll, d.get("_id").unwrap_or(&Bson::Null))).collect();
    let found = scratch.take_seen(&keys).await?;
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
    Ok(())
}

/// Re-reads each suspect on both sides; what now matches is moved to `matched`, the rest is
/// returned, and a sample of it (up to `sample` per collection) is recorded side by side.
async fn recheck(
    report: &mut VerifyReport,
    expected: &Expected<'_>,
    source: &Database,
    target: &Database,
    suspects: Vec<(String, Bson, Suspect)>,
    sample: usize,
) -> Result<Vec<(String, Bson, Suspect)>, VerifyError> {
    const MAX_RECHECK: usize = 10_000;
    let mut still = Vec::new();
    for (coll, id, why) in suspects.into_iter().take(MAX_RECHECK) {
        let actual = target
            .collection::<bson::RawDocumentBuf>(&coll)
            .find_one(doc! { "_id": id.clone() })
            .await?
            .map(|d| document(&coll, d))
            .transpose()?
            .map(|d| strip_meta(written_part(expected.transforms, &coll, d).document));
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
        } else {
            if report.differences.iter().filter(|d| d.collection == coll).count() < sample {
                report.differences.push(Difference { collection: coll.clone(), id: id.clone(), expected: exp, actual });
            }
            still.push((coll, id, why));
        }
    }
    Ok(still)
}

/// The expected state of one target document now, recomputed from its source document.
async fn expected_now(
    expected: &Expected<'_>,
    source: &Database,
    coll: &str,
    id: &Bson,
) -> Result<Option<Document>, VerifyError> {
    let entry = expected.scratch.get(&doc_key(coll, id)).await?;
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
