//! The bench's source documents: deterministic sets of customers (`Workload::customer`),
//! generated chunk by chunk (a 1M-event backlog never sits in memory), sized in canonical events.

use std::time::{Duration, Instant};

use bson::Document;
use mongodb::Database;

use ficus::testkit::workload::Workload;

use crate::COLLECTION;

/// Documents generated (and inserted) at a time.
pub const CHUNK: u64 = 1000;

/// One set of source documents with disjoint `user_id`s.
#[derive(Clone, Copy, Debug)]
pub struct Set {
    pub seed: u64,
    pub docs: u64,
    pub events: u64,
}

/// Events one customer insert maps to: `customer.created` and one `customer.purchase_recorded`
/// per purchase.
pub fn events_of(d: &Document) -> u64 {
    1 + d.get_array("purchases").map(|a| a.len() as u64).unwrap_or(0)
}

impl Set {
    /// Sizes a set to at least `events` events.
    pub fn sized(seed: u64, events: u64) -> Set {
        let mut set = Set { seed, docs: 0, events: 0 };
        let mut c = 0;
        'outer: loop {
            for d in set.chunk(c, CHUNK) {
                if set.events >= events {
                    break 'outer;
                }
                set.events += events_of(&d);
                set.docs += 1;
            }
            c += 1;
        }
        set
    }

    fn chunk(&self, c: u64, len: u64) -> Vec<Document> {
        let mut w = Workload::new(self.seed * 1_000_003 + c);
        let base = self.seed * 100_000_000 + c * CHUNK;
        (0..len).map(|k| w.customer(base + k)).collect()
    }

    /// The set's documents in chunks of up to `CHUNK`.
    pub fn chunks(&self) -> impl Iterator<Item = Vec<Document>> + '_ {
        (0..self.docs.div_ceil(CHUNK)).map(move |c| self.chunk(c, CHUNK.min(self.docs - c * CHUNK)))
    }

    /// Inserts the set into the source collection (`insert_many` of `batch`, unordered).
    pub async fn insert(&self, db: &Database, batch: usize) -> Duration {
        let coll = db.collection::<Document>(COLLECTION);
        let started = Instant::now();
        for chunk in self.chunks() {
            for part in chunk.chunks(batch) {
                coll.insert_many(part.to_vec()).ordered(false).await.expect("inserting source documents");
            }
        }
        started.elapsed()
    }
}
