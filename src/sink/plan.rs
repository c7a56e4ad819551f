//! The order a batch's writes go to the target in: pure, so it is tested on its own.
//!
//! Every write is version-guarded, so the final state does not depend on the order the writes
//! land in (tests/sink_property.rs holds the sink to that). That allows, for speed: only the
//! newest upsert per target document, every upsert of a collection in one bulk command, then
//! deletes and rollups in batch order, then, per element target, what each source document
//! still has (retains), and last the sweeps of completed snapshots, so a marker's sweep follows
//! every write delivered before it.

use std::collections::{BTreeMap, HashMap};

use bson::{Bson, Document};

use super::Versioned;
use crate::event::Version;
use crate::transform::WriteOp;

/// One document to upsert, with the message that versions it.
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert<'a> {
    pub by: &'a Versioned,
    pub id: &'a Bson,
    pub doc: &'a Document,
}

/// A delete or a rollup membership change, in batch order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step<'a> {
    pub by: &'a Versioned,
    pub op: &'a WriteOp,
}

/// A batch's writes in the order they go out.
#[derive(Debug, Default, PartialEq)]
pub struct Plan<'a> {
    /// Per collection, the newest upsert of each target document.
    pub upserts: BTreeMap<&'a str, Vec<Upsert<'a>>>,
    /// Deletes, rollups, merges and witnesses, in batch order.
    pub steps: Vec<Step<'a>>,
    /// Per element target, each source document's newest retain (what it still has).
    pub retains: BTreeMap<&'a str, Vec<(&'a Versioned, &'a [Bson])>>,
    /// Sweeps of completed snapshots, last.
    pub sweeps: Vec<Step<'a>>,
}

/// Plans a batch.
pub fn plan(batch: &[Versioned]) -> Plan<'_> {
    let mut plan = Plan::default();
    let mut newest: HashMap<(&str, String), usize> = HashMap::new();
    let mut newest_retain: HashMap<(&str, String), usize> = HashMap::new();
    for v in batch {
        for op in &v.ops {
            match op {
                WriteOp::Upsert { collection, id, doc } => {
                    let list = plan.upserts.entry(collection.as_str()).or_default();
                    match newest.get(&(collection.as_str(), id.to_string())) {
                        Some(&i) if list[i].by.version >= v.version => {}
                        Some(&i) => list[i] = Upsert { by: v, id, doc },
                        None => {
                            newest.insert((collection.as_str(), id.to_string()), list.len());
                            list.push(Upsert { by: v, id, doc });
                        }
                    }
                }
                WriteOp::Delete { .. } | WriteOp::Rollup { .. } | WriteOp::Merge { .. } | WriteOp::Witness { .. } => {
                    plan.steps.push(Step { by: v, op })
                }
                WriteOp::Retain { collection, keep } => {
                    let list = plan.retains.entry(collection.as_str()).or_default();
                    match newest_retain.get(&(collection.as_str(), v.source_id.to_string())) {
                        Some(&i) if list[i].0.version >= v.version => {}
                        Some(&i) => list[i] = (v, keep.as_slice()),
                        None => {
                            newest_retain.insert((collection.as_str(), v.source_id.to_string()), list.len());
                            list.push((v, keep.as_slice()));
                        }
                    }
                }
                WriteOp::Sweep { .. } => plan.sweeps.push(Step { by: v, op }),
            }
        }
    }
    plan
}

/// A target document as a retain sees it: what built it and at which version.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub id: Bson,
    pub source_id: Bson,
    pub version: Version,
}

/// Which target documents the retains of a collection remove, each with the retain that
/// removes it: a document its source's retain does not keep goes, unless its version is at
/// least the retain's (a newer element event already wrote it).
pub fn retained_away<'a>(retains: &[(&'a Versioned, &[Bson])], built: &[Built]) -> Vec<(&'a Versioned, Bson)> {
    let by_source: HashMap<String, &(&'a Versioned, &[Bson])> =
        retains.iter().map(|r| (r.0.source_id.to_string(), r)).collect();
    built
        .iter()
        .filter_map(|b| {
            let (v, keep) = by_source.get(&b.source_id.to_string())?;
            (!keep.contains(&b.id) && b.version < v.version).then(|| (*v, b.id.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn v(source: &str, version: u32, ops: Vec<WriteOp>) -> Versioned {
        Versioned {
            version: Version::at(bson::Timestamp { time: 100, increment: version }, 1),
            event_id: format!("e{version}"),
            source_collection: "customers".into(),
            source_id: Bson::String(source.into()),
            event_time: bson::DateTime::from_millis(0),
            ops,
            redriven: false,
        }
    }

    fn upsert(collection: &str, id: &str, n: i32) -> WriteOp {
        WriteOp::Upsert { collection: collection.into(), id: Bson::String(id.into()), doc: doc! { "n": n } }
    }

    #[test]
    fn only_the_newest_upsert_of_a_document_goes_out_and_order_is_kept_elsewhere() {
        let delete = WriteOp::Delete { collection: "c".into(), id: Some(Bson::String("B".into())) };
        let sweep = WriteOp::Sweep {
            collection: "c".into(),
            source_collection: "customers".into(),
            before: Version::at(bson::Timestamp { time: 1, increment: 0 }, 0),
            partition: 0,
            partitions: 1,
            rollup: None,
        };
        let batch = vec![
            v("1", 3, vec![upsert("c", "A", 3), sweep.clone()]),
            v("1", 1, vec![upsert("c", "A", 1), delete.clone()]), // older, arrived later
            v("2", 2, vec![upsert("c", "B", 2), upsert("d", "A", 2)]),
            v("1", 5, vec![upsert("c", "A", 5)]),
        ];
        let p = plan(&batch);
        let ns: Vec<(&str, i32)> =
            p.upserts["c"].iter().map(|u| (u.id.as_str().unwrap(), u.doc.get_i32("n").unwrap())).collect();
        assert_eq!(ns, [("A", 5), ("B", 2)]);
        assert_eq!(p.upserts["d"].len(), 1);
        assert_eq!(p.steps, [Step { by: &batch[1], op: &delete }]);
        assert_eq!(p.sweeps, [Step { by: &batch[0], op: &sweep }]);
    }

    #[test]
    fn per_source_document_the_newest_retain_counts() {
        let keep = |ids: &[&str]| WriteOp::Retain {
            collection: "events".into(),
            keep: ids.iter().map(|i| Bson::String(i.to_string())).collect(),
        };
        let batch =
            vec![v("C1", 2, vec![keep(&["P1", "P2"])]), v("C1", 4, vec![keep(&["P1"])]), v("C2", 3, vec![keep(&[])])];
        let p = plan(&batch);
        let retains = &p.retains["events"];
        assert_eq!(retains.len(), 2);
        let built = |id: &str, source: &str, at: u32| Built {
            id: Bson::String(id.into()),
            source_id: Bson::String(source.into()),
            version: Version::at(bson::Timestamp { time: 100, increment: at }, 1),
        };
        let docs = [
            built("P1", "C1", 0), // kept by the newest state
            built("P2", "C1", 0), // pulled since: goes at the newest retain's version
            built("P3", "C1", 9), // written by an element event newer than every retain: stays
            built("P4", "C2", 3), // as new as the retain: stays (a version never regresses)
            built("P5", "C2", 2), // C2 has no elements left: goes
            built("P6", "C3", 0), // another customer, not retained here: untouched
        ];
        let gone: Vec<(String, Bson)> =
            retained_away(retains, &docs).into_iter().map(|(v, id)| (v.event_id.clone(), id)).collect();
        assert_eq!(
            gone,
            [("e4".to_string(), Bson::String("P2".into())), ("e3".to_string(), Bson::String("P5".into()))]
        );
    }
}
