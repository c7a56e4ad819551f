//! `ficus verify` for a service whose targets are Redis entries: every source document through
//! the transforms and the Redis sink's own plan (key, shaped value, absolute expiry), compared
//! with what Redis holds, value for value and expiry to the second.
//!
//! The entries ficus holds are found by SCANning its version records (`ficus:<service>:v:*`),
//! so keys ficus never wrote are not looked at; an expected key is read directly too, so an
//! entry written by hand where ficus expects one is compared as well. The expectation is kept in
//! memory (a cache's entries, keys and values): a cache of millions of entries needs its size
//! in memory to verify. Entries that differ are read again after `--settle`, against a fresh
//! expectation from the monolith, as MongoDB targets are.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::Database;
use redis::aio::ConnectionManager;

use super::{Difference, Tally, VerifyError, VerifyOptions, VerifyReport};
use crate::config::topics::Topics;
use crate::sink::redis::plan::{self, Layout, Value};
use crate::sink::redis::rebuild::{self, Held};
use crate::transform::{ServiceTransforms, WriteOp};

/// One entry the monolith's state calls for.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    collection: String,
    value: Value,
    expire_at: i64,
}

/// Verifies the service's live keys against the monolith.
pub async fn verify_redis(
    transforms: &ServiceTransforms,
    topics: &Topics,
    source: &Database,
    source_name: &str,
    redis: &ConnectionManager,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let layout = Layout::live(transforms.service());
    let expected = expect(transforms, topics, source, source_name).await?;
    let mut keys: BTreeSet<String> = rebuild::keys(redis, &layout).await?.into_iter().collect();
    keys.extend(expected.keys().cloned());
    let mut suspects = Vec::new();
    let mut held = HashMap::new();
    for key in keys {
        let h = rebuild::read(redis, &layout, &key).await?;
        if !matches(expected.get(&key), h.as_ref()) {
            suspects.push(key.clone());
        }
        held.insert(key, h);
    }
    if !suspects.is_empty() {
        tokio::time::sleep(opts.settle).await;
        let fresh = expect(transforms, topics, source, source_name).await?;
        for key in &suspects {
            held.insert(key.clone(), rebuild::read(redis, &layout, key).await?);
        }
        return Ok(report(transforms.service(), &fresh, &held, opts.sample));
    }
    Ok(report(transforms.service(), &expected, &held, opts.sample))
}

/// Every live entry the monolith's documents call for now (expired ones call for none).
async fn expect(
    transforms: &ServiceTransforms,
    topics: &Topics,
    source: &Database,
    source_name: &str,
) -> Result<HashMap<String, Expected>, VerifyError> {
    let now = bson::DateTime::now().timestamp_millis();
    let mut out = HashMap::new();
    let collections: BTreeSet<&str> =
        transforms.topics().iter().filter_map(|t| topics.by_topic(t)).map(|d| d.collection.as_str()).collect();
    for coll in collections {
        let Some(def) = topics.for_collection(coll) else { continue };
        let mut cursor = source.collection::<bson::RawDocumentBuf>(coll).find(doc! {}).await?;
        while let Some(raw) = cursor.try_next().await? {
            let doc = super::document(coll, raw)?;
            for op in transforms.writes_of_copy(def, source_name, doc)? {
                let WriteOp::Upsert { collection, id: Bson::String(key), doc } = op else { continue };
                let Some(t) = transforms.redis_target(&collection) else { continue };
                // A document the sink refuses (dead-lettered live) calls for no entry.
                let (Ok(expire_at), Ok(value)) = (plan::expiry(t, &doc), plan::shape(t, &doc)) else { continue };
                if !plan::expired(expire_at, now) {
                    out.insert(key, Expected { collection, value: sorted(value), expire_at });
                }
            }
        }
    }
    Ok(out)
}

/// A hash's fields in order (Redis does not keep the order they were written in).
fn sorted(v: Value) -> Value {
    match v {
        Value::Hash(mut fields) => {
            fields.sort();
            Value::Hash(fields)
        }
        text => text,
    }
}

/// Whether Redis holds what is expected: the same value, expiring in the same second.
fn matches(expected: Option<&Expected>, held: Option<&Held>) -> bool {
    match (expected, held) {
        (None, None) => true,
        (Some(e), Some(h)) => e.value == h.value && h.expire_at.map(|at| at / 1000) == Some(e.expire_at / 1000),
        _ => false,
    }
}

/// The report, per target: counts, and a sample of differences side by side.
fn report(
    service: &str,
    expected: &HashMap<String, Expected>,
    held: &HashMap<String, Option<Held>>,
    sample: usize,
) -> VerifyReport {
    let mut collections: BTreeMap<String, Tally> = BTreeMap::new();
    let mut differences = Vec::new();
    for e in expected.values() {
        collections.entry(e.collection.clone()).or_default().expected += 1;
    }
    for (key, h) in held {
        let e = expected.get(key);
        let collection = match (e, h) {
            (Some(e), _) => e.collection.clone(),
            (None, Some(h)) => h.target.clone().unwrap_or_else(|| "(unknown)".into()),
            (None, None) => continue,
        };
        let tally = collections.entry(collection.clone()).or_default();
        tally.actual += u64::from(h.is_some());
        match (e, h) {
            _ if matches(e, h.as_ref()) => {
                tally.matched += 1;
                continue;
            }
            (Some(_), Some(_)) => tally.differing += 1,
            (Some(_), None) => tally.missing += 1,
            (None, _) => tally.unexpected += 1,
        }
        if differences.iter().filter(|d: &&Difference| d.collection == collection).count() < sample {
            differences.push(Difference {
                collection,
                id: Bson::String(key.clone()),
                expected: e.map(|e| entry_doc(&e.value, Some(e.expire_at))),
                actual: h.as_ref().map(|h| entry_doc(&h.value, h.expire_at)),
            });
        }
    }
    VerifyReport {
        service: service.to_string(),
        collections,
        differences,
        checks: vec![super::Check::Counts, super::Check::Contents],
        references: None,
        quality: None,
    }
}

/// An entry shown as a document: its value and its expiry, to the second.
fn entry_doc(value: &Value, expire_at: Option<i64>) -> Document {
    let value = match value {
        Value::Hash(fields) => {
            Bson::Document(fields.iter().map(|(k, v)| (k.clone(), Bson::String(v.clone()))).collect())
        }
        Value::Text(t) => Bson::String(t.clone()),
    };
    let at = expire_at.map_or(Bson::Null, |ms| Bson::DateTime(bson::DateTime::from_millis(ms / 1000 * 1000)));
    doc! { "value": value, "expireAt": at }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(text: &str, at: Option<i64>) -> Held {
        Held { value: Value::Text(text.into()), expire_at: at, version: None, target: Some("research".into()) }
    }

    #[test]
    fn an_entry_matches_on_its_value_and_its_expiry_to_the_second() {
        let e = Expected { collection: "research".into(), value: Value::Text("v".into()), expire_at: 10_400 };
        assert!(matches(Some(&e), Some(&held("v", Some(10_999)))));
        assert!(!matches(Some(&e), Some(&held("v", Some(11_000)))), "a second later");
        assert!(!matches(Some(&e), Some(&held("v", None))), "no expiry at all");
        assert!(!matches(Some(&e), Some(&held("w", Some(10_400)))));
        assert!(!matches(Some(&e), None) && !matches(None, Some(&held("v", None))) && matches(None, None));
    }

    #[test]
    fn the_report_counts_each_target_and_shows_what_differs() {
        let e = |v: &str| Expected { collection: "research".into(), value: Value::Text(v.into()), expire_at: 5_000 };
        let expected: HashMap<String, Expected> =
            [("a".to_string(), e("1")), ("b".to_string(), e("2")), ("c".to_string(), e("3"))].into();
        let held: HashMap<String, Option<Held>> = [
            ("a".to_string(), Some(held("1", Some(5_000)))),
            ("b".to_string(), Some(held("tampered", Some(5_000)))),
            ("c".to_string(), None),
            ("d".to_string(), Some(held("stray", Some(5_000)))),
        ]
        .into();
        let r = report("cache", &expected, &held, 10);
        let t = &r.collections["research"];
        assert_eq!((t.expected, t.actual, t.matched, t.differing, t.missing, t.unexpected), (3, 3, 1, 1, 1, 1));
        assert_eq!(r.differences.len(), 3);
        assert!(!r.exact());
    }
}
