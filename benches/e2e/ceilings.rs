//! The bare loops each ficus figure is measured against, run in the same run on the same servers
//! with the same documents, and with ficus's own default settings (`Config`) where ficus has one:
//!
//! - [`bare_tail`]: the change stream as the tail opens it → each change's raw BSON → Kafka;
//! - [`bare_snapshot`]: a collection scan in `_id` order → raw BSON → Kafka;
//! - [`bare_bulk`]: the documents the shipped transforms produce, bulk-upserted by `_id`;
//! - [`bare_scan`]: every source and target document read once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bson::{Bson, Document, RawDocumentBuf, Timestamp, doc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use mongodb::Database;
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use ficus::bus::{ClientRole, client_config};
use ficus::config::Config;
use ficus::config::topics::Topics;
use ficus::event::mapping::{ChangeRecord, map_change};
use ficus::event::{Message, Op};
use ficus::sink::{META, MongoSink, Versioned};
use ficus::transform::{ServiceTransforms, WriteOp};

use crate::workload::Set;
use crate::{COLLECTION, RAW_TOPIC, SOURCE_NAME};

/// A producer with ficus's producer settings (idempotent, acks=all, linger 5 ms, lz4).
fn producer(cfg: &Config, id: &str) -> FutureProducer {
    client_config(&cfg.kafka, ClientRole::Producer, id).create().expect("producer")
}

/// Hands one record to the producer, waiting while its queue is full.
async fn send(p: &FutureProducer, key: &[u8], payload: &[u8]) -> DeliveryFuture {
    loop {
        match p.send_result(FutureRecord::to(RAW_TOPIC).key(key).payload(payload)) {
            Ok(f) => return f,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            Err((e, _)) => panic!("bare producer: {e}"),
        }
    }
}

/// The change stream's filter, as the tail's MongoDB source writes it (`source` is private to
/// the library), for the bench's one collection.
fn change_stream_pipeline() -> [Document; 1] {
    [doc! { "$match": {
        "ns.coll": { "$in": [COLLECTION] },
        "operationType": { "$in": ["insert", "update", "replace", "delete", "drop", "rename", "dropDatabase", "invalidate"] },
    }}]
}

/// The bare tail: change stream (as the tail opens it: `updateLookup`, pre-images when
/// available, the tail's batch size and wait) → raw BSON → Kafka, at most `tail.max_in_flight`
/// unacknowledged, until `expect` changes are acknowledged. Returns when the last one is.
pub async fn bare_tail(db: Database, cfg: Config, start: Timestamp, expect: u64) -> Duration {
    let started = Instant::now();
    let p = producer(&cfg, "bench-bare-tail");
    let mut stream = db
        .watch()
        .pipeline(change_stream_pipeline())
        .full_document(FullDocumentType::UpdateLookup)
        .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
        .batch_size(cfg.tail.batch_size)
        .max_await_time(cfg.tail.max_await)
        .start_at_operation_time(start)
        .await
        .expect("bare change stream")
        .with_type::<RawDocumentBuf>();
    // A reader task and a producer loop joined by a bounded channel, as in the tail.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RawDocumentBuf>(cfg.tail.batch_size as usize * 2);
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < expect {
            match stream.next().await {
                Some(Ok(raw)) => {
                    n += 1;
                    if tx.send(raw).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => panic!("bare change stream: {e}"),
                None => return,
            }
        }
    });
    let mut inflight = FuturesUnordered::new();
    let mut acked = 0u64;
    let mut open = true;
    while acked < expect {
        tokio::select! {
            Some(r) = inflight.next(), if !inflight.is_empty() => {
                let r: Result<Result<_, _>, _> = r;
                r.expect("bare delivery cancelled").map_err(|(e, _)| e).expect("bare delivery");
                acked += 1;
            }
            m = rx.recv(), if open && inflight.len() < cfg.tail.max_in_flight => match m {
                Some(raw) => {
                    let key = raw.get_document("documentKey").map(|d| d.as_bytes().to_vec()).unwrap_or_default();
                    inflight.push(send(&p, &key, raw.as_bytes()).await);
                }
                None => open = false,
            },
        }
    }
    reader.abort();
    started.elapsed()
}

/// The bare snapshot: the collection in `_id` order (the snapshot's batch size) → raw BSON →
/// Kafka.
pub async fn bare_snapshot(db: Database, cfg: Config, expect: u64) -> Duration {
    let started = Instant::now();
    let p = producer(&cfg, "bench-bare-snapshot");
    let mut cursor = db
        .collection::<RawDocumentBuf>(COLLECTION)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .batch_size(cfg.snapshot.batch_size)
        .await
        .expect("bare snapshot cursor");
    let mut inflight = FuturesUnordered::new();
    let mut acked = 0u64;
    let mut open = true;
    while acked < expect {
        tokio::select! {
            Some(r) = inflight.next(), if !inflight.is_empty() => {
                let r: Result<Result<_, _>, _> = r;
                r.expect("bare delivery cancelled").map_err(|(e, _)| e).expect("bare delivery");
                acked += 1;
            }
            m = cursor.next(), if open && inflight.len() < cfg.tail.max_in_flight => match m {
                Some(Ok(raw)) => {
                    let key = raw.get_object_id("_id").map(|o| o.bytes().to_vec()).unwrap_or_default();
                    inflight.push(send(&p, &key, raw.as_bytes()).await);
                }
                Some(Err(e)) => panic!("bare snapshot: {e}"),
                None => open = false,
            },
        }
    }
    started.elapsed()
}

/// What the shipped transforms make of a set's documents: per event, its upserts as the sink
/// writes them (`_id`, and `_ficus` from the event's [`Versioned`], by the sink's own builder).
pub fn target_docs(topics: &Topics, svc: &ServiceTransforms, docs: Vec<Document>) -> Vec<(String, Document)> {
    let def = topics.for_collection(COLLECTION).expect("customers topic");
    let mut out = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        let rec = ChangeRecord {
            op: Op::Insert,
            collection: COLLECTION.into(),
            document_id: d.get("_id").cloned().unwrap_or(Bson::Null),
            after: Some(d),
            before: None,
            changed: None,
            removed: Vec::new(),
            truncated: Vec::new(),
            cluster_time: Timestamp { time: 1_767_225_600, increment: 1 + i as u32 },
            index: 1,
            wall_time: None,
            resume_token: Some("bench".into()),
            txn: None,
            origin: None,
        };
        for ev in map_change(def, SOURCE_NAME, rec).events {
            let m = Message::Event(ev);
            let ops = svc.apply_message(&m).expect("transform");
            let v = Versioned::of(&m, ops);
            for op in &v.ops {
                if let WriteOp::Upsert { collection, id, doc } = op {
                    let mut doc = doc.clone();
                    doc.insert("_id", id.clone());
                    doc.insert(META, MongoSink::meta(&v));
                    out.push((collection.clone(), doc));
                }
            }
        }
    }
    out
}

/// How a bulk loop shapes its writes: the ceiling itself, and ficus's version guard written two
/// ways, to attribute the gap between the sink and the ceiling (a diagnostic: the sink is not
/// called, the shape of its `update` statements is copied, with the `_ficus.src.id` index the sink
/// keeps on every target collection).
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Shape {
    /// `q: {_id}`: the ceiling.
    Plain,
    /// `q: {_id, $or: [{_ficus.v: {$lt: v}}, {_ficus.v: {$exists: false}}]}`, the sink's old guard.
    GuardOr,
    /// `q: {_id, _ficus.v: {$not: {$gte: v}}}`: the sink's guard now.
    GuardNot,
    /// [`Shape::GuardNot`], each batch one transaction that first upserts an apply marker (as
    /// the sink does for a service that writes back, so the tail can tell ficus's own writes):
    /// the echo-tagging transaction's cost on the server, beside `GuardNot`.
    GuardNotMarked,
}

/// The bare bulk loop: the same documents, upserted by `_id` in `update` commands of
/// `consume.batch_max` statements (unordered, majority, journaled), one command at a time. Only
/// the writes are timed. Returns the time and the upserts.
pub async fn bare_bulk(
    db: &Database,
    cfg: &Config,
    topics: &Topics,
    svc: &ServiceTransforms,
    set: &Set,
    shape: Shape,
) -> (Duration, u64) {
    let version = format!("{META}.v");
    if shape != Shape::Plain {
        for c in svc.collections() {
            db.collection::<Document>(&c)
                .create_index(mongodb::IndexModel::builder().keys(doc! { format!("{META}.src.id"): 1 }).build())
                .await
                .expect("index");
        }
    }
    let mut timed = Duration::ZERO;
    let mut n = 0u64;
    for chunk in set.chunks() {
        let docs = target_docs(topics, svc, chunk);
        for batch in docs.chunks(cfg.consume.batch_max) {
            let mut by_coll: BTreeMap<&str, Vec<Document>> = BTreeMap::new();
            for (c, d) in batch {
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                let v = d.get_document(META).ok().and_then(|m| m.get_str("v").ok()).unwrap_or("").to_string();
                let q = match shape {
                    Shape::Plain => doc! { "_id": id },
                    Shape::GuardOr => {
                        doc! { "_id": id, "$or": [ { &version: { "$lt": &v } }, { &version: { "$exists": false } } ] }
                    }
                    Shape::GuardNot | Shape::GuardNotMarked => {
                        doc! { "_id": id, &version: { "$not": { "$gte": &v } } }
                    }
                };
                by_coll.entry(c.as_str()).or_default().push(doc! { "q": q, "u": d.clone(), "upsert": true });
            }
            let started = Instant::now();
            if shape == Shape::GuardNotMarked {
                marked_batch(db, by_coll, n).await;
            } else {
                for (c, updates) in by_coll {
                    let reply = db
                        .run_command(doc! {
                            "update": c, "updates": updates, "ordered": false,
                            "writeConcern": { "w": "majority", "j": true },
                        })
                        .await
                        .expect("bare bulk upsert");
                    assert!(reply.get("writeErrors").is_none(), "bare bulk upsert: {reply}");
                }
            }
            timed += started.elapsed();
            n += batch.len() as u64;
        }
    }
    (timed, n)
}

/// One batch of [`Shape::GuardNotMarked`]: a transaction (majority, journaled at commit) that
/// upserts the batch's apply marker, then the batch's updates; `at` numbers the marker.
async fn marked_batch(db: &Database, by_coll: BTreeMap<&str, Vec<Document>>, at: u64) {
    let mut session = db.client().start_session().await.expect("session");
    let wc =
        mongodb::options::WriteConcern::builder().w(mongodb::options::Acknowledgment::Majority).journal(true).build();
    session.start_transaction().write_concern(wc).await.expect("start transaction");
    let marker = doc! {
        "update": "_ficus_applied",
        "updates": [ { "q": { "_id": "bench/customers/0" }, "u": { "$set": { "at": at as i64 } }, "upsert": true } ],
    };
    db.run_command(marker).session(&mut session).await.expect("marker");
    for (c, updates) in by_coll {
        let reply = db
            .run_command(doc! { "update": c, "updates": updates, "ordered": false })
            .session(&mut session)
            .await
            .expect("marked bulk upsert");
        assert!(reply.get("writeErrors").is_none(), "marked bulk upsert: {reply}");
    }
    session.commit_transaction().await.expect("commit");
}

/// The bare verify: read every source document and every target document. Returns the time and
/// the source documents.
pub async fn bare_scan(source: &Database, target: &Database, collections: &[String]) -> (Duration, u64) {
    let started = Instant::now();
    let mut n = 0;
    let mut c = source.collection::<RawDocumentBuf>(COLLECTION).find(doc! {}).batch_size(1000).await.unwrap();
    while let Some(d) = c.next().await {
        d.unwrap();
        n += 1;
    }
    for coll in collections {
        let mut c = target.collection::<RawDocumentBuf>(coll).find(doc! {}).batch_size(1000).await.unwrap();
        while let Some(d) = c.next().await {
            d.unwrap();
        }
    }
    (started.elapsed(), n)
}
