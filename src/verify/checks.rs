//! verify's `references` and `quality` checks: the references a service's transform files
//! declare (`[[refs]]`), checked across service databases, and its data quality rules
//! (`[[quality]]`), checked on every document compared.
//!
//! References are checked with bounded memory: the referencing documents are streamed, their
//! values looked up in the referenced collection a thousand at a time. An orphan (a value no
//! referenced document has) younger than its reference's grace, by its document's version, is
//! **pending**: what it names may still be on its way, and it is looked up again after the
//! settling pause. One whose value the monolith does not have either (the referenced field a
//! plain copy of a monolith field, and no monolith document with that value) is **inherited**:
//! the monolith's own dangling reference, reported but not the migration's doing. Only the
//! others are broken.
//!
//! Quality rules are judged per document (a rule's share of passing documents against its
//! `mostly`); uniqueness keeps a 16-byte digest per value seen.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::Database;

use super::VerifyError;
use crate::sink::META;
use crate::transform::ServiceTransforms;
use crate::transform::checks::{Nulls, QualityRule, RefDecl, Rule, plain_path, present_everywhere, values_at};

/// Samples kept per reference or rule.
const SAMPLES: usize = 5;
const BATCH: usize = 1000;

/// An offending document: which, and the value at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Offender {
    pub collection: String,
    pub id: Bson,
    /// `None`: the field is absent.
    pub value: Option<Bson>,
    /// The monolith document it was made from (collection and `_id`), where verify knows it.
    pub source: Option<(String, Bson)>,
}

/// One reference's result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RefTally {
    pub name: String,
    /// Values looked up (nulls ignored by declaration excluded).
    pub checked: u64,
    /// Orphans the monolith has too (its own dangling references).
    pub inherited: u64,
    /// Orphans younger than the grace, still unresolved after the wait.
    pub pending: u64,
    /// Orphans: broken.
    pub broken: u64,
    pub samples: Vec<Offender>,
}

impl RefTally {
    /// Valid values over those judged (pending and inherited left out), in percent.
    pub fn score(&self) -> f64 {
        let judged = self.checked.saturating_sub(self.pending + self.inherited);
        if judged == 0 { 100.0 } else { 100.0 * judged.saturating_sub(self.broken) as f64 / judged as f64 }
    }
}

/// One quality rule's result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleTally {
    pub name: String,
    pub mostly: f64,
    pub checked: u64,
    pub failed: u64,
    pub samples: Vec<Offender>,
}

impl RuleTally {
    /// The share of documents that pass.
    pub fn share(&self) -> f64 {
        if self.checked == 0 { 1.0 } else { (self.checked - self.failed) as f64 / self.checked as f64 }
    }

    pub fn passes(&self) -> bool {
        self.share() >= self.mostly
    }
}

/// The quality rules of a service, judged document by document as verify streams them.
pub(super) struct Quality<'a> {
    rules: Vec<&'a QualityRule>,
    pub tallies: Vec<RuleTally>,
    seen: Vec<HashSet<u128>>,
}

impl<'a> Quality<'a> {
    pub fn new(transforms: &'a ServiceTransforms) -> Quality<'a> {
        let rules: Vec<&QualityRule> = transforms.quality().collect();
        let tallies =
            rules.iter().map(|r| RuleTally { name: r.name(), mostly: r.mostly, ..Default::default() }).collect();
        let seen = rules.iter().map(|_| HashSet::new()).collect();
        Quality { rules, tallies, seen }
    }

    /// Judges one document of `collection` by every rule of that collection.
    pub fn judge(&mut self, collection: &str, doc: &Document) {
        for (i, rule) in self.rules.iter().enumerate().filter(|(_, r)| r.collection == collection) {
            let values = values_at(doc, &rule.field);
            let ok = match &rule.rule {
                Rule::Required => present_everywhere(doc, &rule.field),
                Rule::Unique => {
                    values.iter().filter(|v| !matches!(v, Bson::Null)).all(|v| self.seen[i].insert(digest(v)))
                }
                r => r.passes(&values),
            };
            let t = &mut self.tallies[i];
            t.checked += 1;
            if !ok {
                t.failed += 1;
                if t.samples.len() < SAMPLES {
                    let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
                    let value = values.first().map(|v| (*v).clone());
                    t.samples.push(Offender { collection: collection.to_string(), id, value, source: None });
                }
            }
        }
    }
}

fn digest(v: &Bson) -> u128 {
    let text = v.clone().into_canonical_extjson().to_string();
    let hash = blake3::hash(text.as_bytes());
    u128::from_le_bytes(hash.as_bytes()[..16].try_into().expect("32 bytes"))
}

/// A value's identity for lookups.
fn key(v: &Bson) -> String {
    v.clone().into_canonical_extjson().to_string()
}

/// One orphan found, before it is judged pending, inherited or broken.
struct Found {
    id: Bson,
    value: Option<Bson>,
    young: bool,
}

/// Checks every reference the service declares; `settle`: the wait before pending orphans
/// are looked up again.
pub(super) async fn references(
    transforms: &ServiceTransforms,
    all: &[std::sync::Arc<ServiceTransforms>],
    service_db: &Database,
    monolith: &Database,
    settle: Duration,
) -> Result<Vec<RefTally>, VerifyError> {
    let mut out = Vec::new();
    for decl in transforms.refs() {
        out.push(reference(transforms, all, decl, service_db, monolith, settle).await?);
    }
    Ok(out)
}

async fn reference(
    transforms: &ServiceTransforms,
    all: &[std::sync::Arc<ServiceTransforms>],
    decl: &RefDecl,
    service_db: &Database,
    monolith: &Database,
    settle: Duration,
) -> Result<RefTally, VerifyError> {
    let mut tally = RefTally { name: decl.name(transforms.database()), ..Default::default() };
    let target = service_db.client().database(&decl.to_database).collection::<Document>(&decl.to_collection);
    let top = plain_path(&decl.field).split('.').next().unwrap_or_default().to_string();
    let mut cursor = service_db
        .collection::<Document>(&decl.collection)
        .find(doc! {})
        .projection(doc! { &top: 1, META: 1 })
        .batch_size(BATCH as u32)
        .await?;
    let now = bson::DateTime::now();
    let mut batch: Vec<(Bson, Option<Bson>, bool)> = Vec::new();
    let mut orphans: Vec<Found> = Vec::new();
    while let Some(d) = cursor.try_next().await? {
        let young = age(&d, now).is_some_and(|a| a < decl.grace);
        let id = d.get("_id").cloned().unwrap_or(Bson::Null);
        let values = values_at(&d, &decl.field);
        if values.iter().all(|v| matches!(v, Bson::Null)) {
            if decl.nulls == Nulls::Orphan {
                tally.checked += 1;
                orphans.push(Found { id: id.clone(), value: values.first().map(|v| (*v).clone()), young });
            }
            continue;
        }
        for v in values.into_iter().filter(|v| !matches!(v, Bson::Null)) {
            batch.push((id.clone(), Some(v.clone()), young));
        }
        if batch.len() >= BATCH {
            tally.checked += batch.len() as u64;
            orphans.extend(missing(&target, &decl.to_field, std::mem::take(&mut batch)).await?);
        }
    }
    tally.checked += batch.len() as u64;
    orphans.extend(missing(&target, &decl.to_field, batch).await?);
    judge(&mut tally, decl, orphans, all, &target, monolith, settle).await?;
    Ok(tally)
}

/// The entries whose value no document of `target` has at `field`.
async fn missing(
    target: &mongodb::Collection<Document>,
    field: &str,
    batch: Vec<(Bson, Option<Bson>, bool)>,
) -> Result<Vec<Found>, VerifyError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<Bson> = batch.iter().filter_map(|(_, v, _)| v.clone()).collect();
    let found: HashSet<String> = target
        .find(doc! { field: { "$in": values } })
        .projection(doc! { field: 1 })
        .await?
        .try_collect::<Vec<Document>>()
        .await?
        .iter()
        .flat_map(|d| values_at(d, field).into_iter().map(key).collect::<Vec<_>>())
        .collect();
    Ok(batch
        .into_iter()
        .filter(|(_, v, _)| v.as_ref().is_none_or(|v| !found.contains(&key(v))))
        .map(|(id, value, young)| Found { id, value, young })
        .collect())
}

/// Sorts the orphans into inherited (the monolith lacks the value too), pending (young, and
/// still missing after the wait) and broken.
async fn judge(
    tally: &mut RefTally,
    decl: &RefDecl,
    orphans: Vec<Found>,
    all: &[std::sync::Arc<ServiceTransforms>],
    target: &mongodb::Collection<Document>,
    monolith: &Database,
    settle: Duration,
) -> Result<(), VerifyError> {
    // Which orphan values the monolith has: only those are the migration's to answer for.
    let from = all
        .iter()
        .find(|s| s.database() == decl.to_database)
        .and_then(|s| s.copied_from(&decl.to_collection, &decl.to_field).map(|(c, p)| (c.to_string(), p)));
    let in_monolith = match &from {
        Some((coll, path)) => Some(present(monolith, coll, path, &orphans).await?),
        None => None,
    };
    let theirs = |o: &Found| match &in_monolith {
        None => true,
        Some(present) => o.value.as_ref().is_some_and(|v| present.contains(&key(v))),
    };
    let (ours, inherited): (Vec<Found>, Vec<Found>) = orphans.into_iter().partition(theirs);
    tally.inherited = inherited.len() as u64;
    let (young, old): (Vec<Found>, Vec<Found>) = ours.into_iter().partition(|o| o.young);
    if !young.is_empty() {
        tokio::time::sleep(settle).await;
        let again: Vec<(Bson, Option<Bson>, bool)> = young.into_iter().map(|o| (o.id, o.value, true)).collect();
        let still = missing(target, &decl.to_field, again).await?;
        tally.pending = still.len() as u64;
        for o in still.into_iter().take(SAMPLES) {
            tally.samples.push(Offender {
                collection: decl.collection.clone(),
                id: o.id,
                value: o.value,
                source: None,
            });
        }
    }
    tally.broken = old.len() as u64;
    for o in old.into_iter().take(SAMPLES.saturating_sub(tally.samples.len())) {
        tally.samples.push(Offender { collection: decl.collection.clone(), id: o.id, value: o.value, source: None });
    }
    Ok(())
}

/// The values among the orphans' that some monolith document of `coll` has at `path`.
async fn present(
    monolith: &Database,
    coll: &str,
    path: &str,
    orphans: &[Found],
) -> Result<HashSet<String>, VerifyError> {
    let mut present = HashSet::new();
    for chunk in orphans.chunks(BATCH) {
        let values: Vec<Bson> = chunk.iter().filter_map(|o| o.value.clone()).collect();
        if values.is_empty() {
            continue;
        }
        let docs: Vec<Document> = monolith
            .collection::<Document>(coll)
            .find(doc! { path: { "$in": values } })
            .projection(doc! { path: 1 })
            .await?
            .try_collect()
            .await?;
        present.extend(docs.iter().flat_map(|d| values_at(d, path).into_iter().map(key).collect::<Vec<_>>()));
    }
    Ok(present)
}

/// How long ago a target document's version was written at the source (`None`: no version).
fn age(d: &Document, now: bson::DateTime) -> Option<Duration> {
    let v = d.get_document(META).ok()?.get_str("v").ok()?;
    let (at, _) = crate::event::Version::stored(v).position()?;
    let written = bson::DateTime::from_millis(i64::from(at.time) * 1000);
    Some(now.saturating_duration_since(written))
}

/// Offenders' monolith documents, where verify's expectation knows them (by target key).
pub(super) fn with_sources(offenders: &mut [Offender], sources: &HashMap<String, (String, Bson)>) {
    for o in offenders {
        o.source = sources.get(&crate::sink::doc_key(&o.collection, &o.id)).cloned();
    }
}
