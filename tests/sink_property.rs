//! Property: duplicates, replays and different interleavings of partitions leave a service
//! database identical to one ordered delivery. Real pipeline (mapping → shipped transforms →
//! MongoSink) against a real secantusd-rs; many generated histories. Also: a redelivered merge
//! into a document the service owns (and writes plain) is a no-op.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bson::{Bson, DateTime, Document, Timestamp, doc};
use ficus::config::topics::Topics;
use ficus::event::Op;
use ficus::event::mapping::{ChangeRecord, map_change};
use ficus::sink::{MongoSink, Sink, Versioned};
use ficus::transform::ServiceTransforms;
use futures::TryStreamExt;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    /// Create or replace the product with this category/subcategory and stock.
    Put {
        key: u8,
        category: u8,
        sub: u8,
        stock: i32,
    },
    /// Change only the stock.
    Stock {
        key: u8,
        stock: i32,
    },
    Delete {
        key: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..4u8, 0..3u8, 0..2u8, 0..5i32).prop_map(|(key, category, sub, stock)| Step::Put { key, category, sub, stock }),
        2 => (0..4u8, 0..5i32).prop_map(|(key, stock)| Step::Stock { key, stock }),
        1 => (0..4u8).prop_map(|key| Step::Delete { key }),
    ]
}

fn product(key: u8, category: u8, sub: u8, stock: i32) -> Document {
    doc! {
        "_id": i32::from(key), "sku": format!("SKU-{key}"), "name_en": "P", "name_th": "พี", "desc_en": "d", "desc_th": "ด",
        "price": "10.50", "currency": "THB", "category": format!("cat-{category}"), "subcategory": format!("sub-{sub}"),
        "images": [], "specs": {}, "specs_th": {}, "stock": stock, "reorder_at": 1, "tags": [], "search_terms": [],
        "views": 10, "sold": 2, "rating": 4.5, "reviews": 3, "status": "active",
        "created_at": DateTime::from_millis(0), "updated_at": DateTime::from_millis(0),
    }
}

/// Turns steps into change records with pre-images, as the tailer would read them.
fn history(steps: &[Step]) -> Vec<ChangeRecord> {
    let mut live: BTreeMap<u8, Document> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let ts = Timestamp { time: 1000 + i as u32, increment: 1 };
        let (op, key, after) = match s {
            Step::Put { key, category, sub, stock } => {
                let op = if live.contains_key(key) { Op::Replace } else { Op::Insert };
                (op, *key, Some(product(*key, *category, *sub, *stock)))
            }
            Step::Stock { key, stock } => {
                let Some(mut d) = live.get(key).cloned() else { continue };
                d.insert("stock", *stock);
                (Op::Update, *key, Some(d))
            }
            Step::Delete { key } => {
                if !live.contains_key(key) {
                    continue;
                }
                (Op::Delete, *key, None)
            }
        };
        let before = live.get(&key).cloned();
        match &after {
            Some(d) => live.insert(key, d.clone()),
            None => live.remove(&key),
        };
        out.push(ChangeRecord {
            op,
            collection: "products".into(),
            document_id: Bson::Int32(i32::from(key)),
            changed: (op == Op::Update).then(|| doc! { "stock": after.as_ref().unwrap().get_i32("stock").unwrap() }),
            after,
            before: if op == Op::Insert { None } else { before },
            removed: vec![],
            truncated: Vec::new(),
            cluster_time: ts,
            index: 1,
            wall_time: None,
            resume_token: Some(format!("T{i}")),
            txn: None,
            origin: None,
        });
    }
    out
}

/// The writes each event leads to, with the aggregate (partition key) it belongs to.
fn versioned(topics: &Topics, service: &ServiceTransforms, records: Vec<ChangeRecord>) -> Vec<(String, Versioned)> {
    let def = topics.for_collection("products").unwrap();
    let mut out = Vec::new();
    for r in records {
        for ev in map_change(def, "linechatbot", r).events {
            let ops = service.apply(&ev).expect("shipped transforms accept generated products");
            let subject = ev.subject.clone();
            out.push((subject, Versioned::of(&ficus::event::Message::Event(ev), ops)));
        }
    }
    out
}

#[test]
fn duplicates_and_interleavings_converge_to_the_ordered_result() {
    let dir = tempfile::tempdir().unwrap();
    let mongo = common::Mongo::start(dir.path(), &[]);
    let root = common::repo_root();
    let topics = ficus::config::topics::load(&root.join("topics")).unwrap();
    let services = ficus::transform::load_all(&root.join("transforms"), &topics).unwrap();
    let products = services.into_iter().find(|s| s.service() == "products_db").expect("products_db transforms");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(mongo.client());
    let case = std::sync::atomic::AtomicU32::new(0);

    let config = ProptestConfig { cases: 100, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(steps in prop::collection::vec(step(), 1..30), seed in any::<u64>(), batch in 1usize..8)| {
        let case = case.fetch_add(1, std::sync::atomic::Ordering::SeqCst);

        let events = versioned(&topics, &products, history(&steps));
        rt.block_on(async {
            let open = |name: String| {
                let client = client.clone();
                let colls = products.collections();
                async move { MongoSink::open(client, &name, &colls, &[], Duration::from_secs(86_400)).await.unwrap() }
            };
            let ordered = open(format!("ordered_{case}")).await;
            for (_, v) in &events {
                ordered.apply(std::slice::from_ref(v), None).await.unwrap();
            }

            // Per-partition order kept, partitions interleaved at random, every event delivered
            // once or twice, and a partition rewound (redelivery after a rebalance) now and then.
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut partitions: BTreeMap<&str, Vec<&Versioned>> = BTreeMap::new();
            for (k, v) in &events {
                partitions.entry(k.as_str()).or_default().push(v);
            }
            let mut cursors: BTreeMap<&str, usize> = partitions.keys().map(|k| (*k, 0)).collect();
            let mut delivery: Vec<Versioned> = Vec::new();
            while let Some(k) = {
                let open: Vec<&str> = cursors.iter().filter(|(k, c)| **c < partitions[*k].len()).map(|(k, _)| *k).collect();
                (!open.is_empty()).then(|| open[rng.random_range(0..open.len())])
            } {
                let c = cursors.get_mut(k).unwrap();
                let v = partitions[k][*c];
                delivery.push(v.clone());
                if rng.random_bool(0.5) {
                    delivery.push(v.clone());
                }
                *c += 1;
                if rng.random_bool(0.1) {
                    *c -= rng.random_range(0..=*c); // rewind
                }
            }
            // Every other batch as one marked transaction (a service whose writes go back to the
            // monolith): the same promises either way.
            let shuffled = open(format!("shuffled_{case}")).await;
            let origin = ficus::event::Origin { service: "products_db".into(), collection: None };
            for (i, chunk) in delivery.chunks(batch).enumerate() {
                let marker =
                    ficus::sink::Marker {
                        origin: origin.clone(),
                        positions: vec![("t".into(), 0, i as i64)],
                        echoes: 0,
                        judged: None,
                    };
                shuffled.apply(chunk, (i % 2 == 1).then_some(&marker)).await.unwrap();
            }
            let (a, b) = (common::dump(ordered.database()).await, common::dump(shuffled.database()).await);
            prop_assert_eq!(a, b);
            Ok(())
        })?;
    });
}

#[test]
fn the_ordered_result_is_what_the_transforms_say() {
    // Sanity for the property above: a create, a move and a delete move category counts.
    let dir = tempfile::tempdir().unwrap();
    let mongo = common::Mongo::start(dir.path(), &[]);
    let root = common::repo_root();
    let topics = ficus::config::topics::load(&root.join("topics")).unwrap();
    let services = ficus::transform::load_all(&root.join("transforms"), &topics).unwrap();
    let products = services.into_iter().find(|s| s.service() == "products_db").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = mongo.client().await;
        let sink = MongoSink::open(client, "products_check", &products.collections(), &[], Duration::from_secs(86_400))
            .await
            .unwrap();
        let steps = [
            Step::Put { key: 0, category: 0, sub: 0, stock: 1 },
            Step::Put { key: 1, category: 0, sub: 1, stock: 0 },
            Step::Put { key: 2, category: 1, sub: 0, stock: 3 },
            Step::Put { key: 1, category: 1, sub: 1, stock: 0 }, // moves cat-0 → cat-1
            Step::Delete { key: 2 },
        ];
        for (_, v) in versioned(&topics, &products, history(&steps)) {
            sink.apply(&[v], None).await.unwrap();
        }
        let db = sink.database();
        let count = |cat: &str| {
            let db = db.clone();
            let cat = cat.to_string();
            async move {
                db.collection::<Document>("categories")
                    .find_one(doc! { "_id": cat })
                    .await
                    .unwrap()
                    .map(|d| d.get_i64("productCount").unwrap())
            }
        };
        assert_eq!(count("cat-0").await, Some(1));
        assert_eq!(count("cat-1").await, Some(1));
        let live: Vec<Document> =
            db.collection::<Document>("products").find(doc! {}).await.unwrap().try_collect().await.unwrap();
        assert_eq!(live.len(), 2, "the deleted product is gone from the service collection");
    });
}

#[test]
fn a_redelivered_merge_never_takes_back_what_the_owner_set_since() {
    // A service owns U1; the monolith changed `n` from 1 to 72 and that change was merged. The
    // service's application then replaced the document from a read made before the merge
    // (`n` back to 1, written plain: no `_ficus`). The monolith's change is redelivered (a
    // crash before its offset was committed): it must not set `n` to 72 again, although the
    // owner's value equals the merge base, because it was merged already.
    let dir = tempfile::tempdir().unwrap();
    let mongo = common::Mongo::start(dir.path(), &[]);
    let root = common::repo_root();
    let topics = ficus::config::topics::load(&root.join("topics")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = mongo.client().await;
        let collections = std::collections::BTreeSet::from(["customers".to_string()]);
        let sink =
            MongoSink::open(client, "merge_check", &collections, &[], Duration::from_secs(86_400)).await.unwrap();
        let customers = sink.database().collection::<Document>("customers");
        customers.insert_one(doc! { "_id": "U1", "n": 1, "name": "a" }).await.unwrap();

        let mut r = ChangeRecord::snapshot(
            "customers",
            doc! { "_id": "m1", "user_id": "U1" },
            Timestamp { time: 100, increment: 1 },
        );
        r.op = Op::Update;
        r.index = 1;
        let ev = map_change(topics.for_collection("customers").unwrap(), "linechatbot", r).events.remove(0);
        let merge = ficus::transform::WriteOp::Merge {
            collection: "customers".into(),
            id: Bson::String("U1".into()),
            doc: Some(doc! { "n": 72, "name": "a" }),
            base: ficus::transform::Base::Was(doc! { "n": 1, "name": "a" }),
            why: ficus::transform::Why::NonOwner,
            arrays: Vec::new(),
        };
        let change = Versioned::of(&ficus::event::Message::Event(ev), vec![merge]);
        sink.apply(std::slice::from_ref(&change), None).await.unwrap();
        let merged = customers.find_one(doc! { "_id": "U1" }).await.unwrap().unwrap();
        assert_eq!(merged.get_i32("n").unwrap(), 72, "the monolith's change merged: {merged}");

        customers.replace_one(doc! { "_id": "U1" }, doc! { "n": 1, "name": "b" }).await.unwrap();
        sink.apply(std::slice::from_ref(&change), None).await.unwrap();
        let now = customers.find_one(doc! { "_id": "U1" }).await.unwrap().unwrap();
        assert_eq!(
            (now.get_i32("n").unwrap(), now.get_str("name").unwrap()),
            (1, "b"),
            "the owner's write stands: {now}"
        );
    });
}
