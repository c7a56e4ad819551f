//! The tail role against real servers: secantusd-rs for MongoDB, Tansu for Kafka.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bson::{Bson, Document, doc};
use common::{Record, World, checkpoint, eventually, read_topics};
use ficus::event::Op;

const CUSTOMERS: &str = "linechatbot.customers";
const PRODUCTS: &str = "linechatbot.products";

fn customer(user: &str) -> Document {
    doc! {
        "user_id": user, "name": "Somchai", "lang": "th", "tz": "Asia/Bangkok", "country": "TH",
        "prefs": ["health"], "interests": [], "tier": "basic", "ltv": "0.00",
        "stats": { "msgs": 1_i32, "sessions": 1_i32, "avg_session_sec": 12.5, "score": 0.1 },
        "purchases": [],
    }
}

fn of_key<'a>(records: &'a [Record], key: &str) -> Vec<&'a Record> {
    records.iter().filter(|r| r.key == key).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_change_becomes_the_right_canonical_event() {
    let world = World::start();
    world.apply_topics();
    let mut ficus = world.spawn_ficus(&["run"], &[]);
    let client = world.mongo.client().await;
    let db = client.database("linechatbot");
    let customers = db.collection::<Document>("customers");

    // Wait for the (empty) snapshot to finish, so what follows is streamed.
    eventually("streaming", Duration::from_secs(60), || async {
        checkpoint(&client, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok())
    })
    .await;

    customers.insert_one(customer("U1")).await.unwrap();
    customers
        .update_one(
            doc! { "user_id": "U1" },
            doc! { "$set": { "tier": "vip", "stats.score": 0.9 }, "$unset": { "tz": "" }, "$inc": { "stats.msgs": 2 } },
        )
        .await
        .unwrap();
    customers
        .update_one(
            doc! { "user_id": "U1" },
            doc! { "$push": { "purchases": { "id": "P1", "product_id": "SKU-1", "product_name": "Vitamin C", "amount": "129.50", "currency": "THB", "status": "paid" } } },
        )
        .await
        .unwrap();
    let mut replaced = customer("U1");
    replaced.insert("name", "Somchai J.");
    customers.replace_one(doc! { "user_id": "U1" }, replaced).await.unwrap();
    // A multi-document transaction across two collections.
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    customers.insert_one(customer("U2")).session(&mut session).await.unwrap();
    db.collection::<Document>("products")
        .insert_one(doc! { "sku": "SKU-1", "name_en": "Vitamin C", "price": "129.50", "category": "supplements", "stock": 5_i32 })
        .session(&mut session)
        .await
        .unwrap();
    customers
        .update_one(doc! { "user_id": "U2" }, doc! { "$set": { "tier": "premium" } })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    customers.delete_one(doc! { "user_id": "U1" }).await.unwrap();

    // The empty snapshot's end-of-copy markers come first; the changes after them.
    let records: Vec<Record> =
        read_topics(&world.kafka.brokers(), &[CUSTOMERS, PRODUCTS], Duration::from_secs(60), |r| {
            r.iter().filter(|r| r.is_event()).count() >= 9
        })
        .into_iter()
        .filter(Record::is_event)
        .collect();
    let u1 = of_key(&records, "U1");
    let types: Vec<&str> = u1.iter().map(|r| r.event().event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "customer.created",
            "customer.updated",
            "customer.updated",
            "customer.purchase_recorded",
            "customer.updated",
            "customer.deleted"
        ],
        "U1's events, in order:\n{records:#?}"
    );
    let ops: Vec<Op> = u1.iter().map(|r| r.event().data.op).collect();
    assert_eq!(ops, [Op::Insert, Op::Update, Op::Update, Op::Update, Op::Replace, Op::Delete]);

    // $set / $unset / $inc on nested paths: the update description says exactly what changed
    // (the after-state is looked up later and may already show the replace that followed).
    let upd = u1[1].event();
    assert!(upd.data.after.is_some(), "updates carry the looked-up full document");
    let changed = upd.data.changed.as_ref().unwrap();
    assert_eq!(changed.get_str("tier").unwrap(), "vip");
    // MongoDB reports `stats.msgs`; some servers report the whole `stats` sub-document.
    let msgs = changed.get("stats.msgs").or_else(|| changed.get_document("stats").ok().and_then(|s| s.get("msgs")));
    assert_eq!(msgs, Some(&Bson::Int32(3)), "Int32 stays Int32: {changed}");
    assert_eq!(upd.data.removed, ["tz"]);

    assert!(
        upd.data.before.as_ref().is_some_and(|b| b.get_str("tz").is_ok()),
        "pre-images are on: before-state carried"
    );

    // $push: the derived event carries the new element.
    let derived = u1[3].event().data.derived.as_ref().unwrap();
    assert_eq!(derived.field, "purchases");
    assert_eq!(derived.element.as_document().unwrap().get_str("id").unwrap(), "P1");

    // Delete: keyed by the aggregate (from the pre-image), no after-state.
    let del = u1[5].event();
    assert!(del.data.after.is_none());
    assert_eq!(del.subject, "U1");

    // Envelope: CloudEvents attributes and ce_ headers.
    for r in &records {
        assert_eq!(r.key, r.event().subject);
        assert!(r.headers.iter().any(|(k, v)| k == "ce_id" && *v == r.event().id));
        assert!(r.headers.iter().any(|(k, v)| k == "content-type" && v == "application/cloudevents+json"));
    }

    // The transaction's events, in commit order, with strictly increasing sequences.
    let u2 = of_key(&records, "U2");
    assert_eq!(
        u2.iter().map(|r| r.event().event_type.as_str()).collect::<Vec<_>>(),
        ["customer.created", "customer.updated"]
    );
    let product = of_key(&records, "SKU-1");
    assert_eq!(product.len(), 1);
    assert_eq!(product[0].event().event_type, "product.created");
    let seqs =
        [u2[0].event().position.sequence(), product[0].event().position.sequence(), u2[1].event().position.sequence()];
    assert!(seqs[0] < seqs[1] && seqs[1] < seqs[2], "transaction order: {seqs:?}");

    // All sequences within a key strictly increase.
    for key in ["U1", "U2"] {
        let s: Vec<String> = of_key(&records, key)
            .iter()
            .filter(|r| r.event().data.derived.is_none())
            .map(|r| r.event().position.sequence())
            .collect();
        assert!(s.windows(2).all(|w| w[0] < w[1]), "{key}: {s:?}");
    }

    assert!(ficus.terminate().success(), "SIGTERM should exit 0; log:\n{}", ficus.logs());
}

#[test]
fn validate_reports_every_broken_definition_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("customers.toml"),
        "collection = \"customers\"\ntopic = \"has space\"\naggregate = \"customer\"\nkey = \"user_id\"\npartitions = 0\nreplication_factor = 1\npre_images = true\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("logs.toml"), "collection = \"logs\"\nkey = \"_id\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ficus"))
        .current_dir(common::repo_root())
        .arg("validate")
        .env("FICUS_TOPICS_DIR", dir.path())
        .env("FICUS_SOURCE_URI", "mongodb://user:hunter2@127.0.0.1:1/")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in ["customers.toml: topic:", "customers.toml: partitions:", "logs.toml:", "missing field"] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("hunter2"));
}

#[test]
fn validate_accepts_the_shipped_definitions() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ficus"))
        .current_dir(common::repo_root())
        .arg("validate")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Per aggregate, the `seq` values the writer set, in the order Kafka holds them, with the id
/// and the data of the event that carries each: from change events only, or (with `snapshot`)
/// from snapshot copies only.
fn seqs_by_key(records: &[Record], snapshot: bool) -> BTreeMap<String, Vec<(i64, String, String)>> {
    let mut out: BTreeMap<String, Vec<(i64, String, String)>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.is_event() && r.event().data.derived.is_none() && (r.event().data.op == Op::Snapshot) == snapshot)
    {
        let seq = match r.event().data.op {
            Op::Update => r.event().data.changed.as_ref().and_then(|c| c.get("seq")).cloned(),
            Op::Insert | Op::Snapshot | Op::Replace => {
                r.event().data.after.as_ref().and_then(|a| a.get("seq")).cloned()
            }
            Op::Delete => None,
        };
        if let Some(Bson::Int64(s)) = seq {
            let data = r.event().to_json()["data"].to_string();
            out.entry(r.key.clone()).or_default().push((s, r.event().id.clone(), data));
        }
    }
    out
}

/// Checks at-least-once, per-aggregate order and stable ids: each aggregate `k` received, after
/// the stream's starting point, writes setting `seq` to `first..=last[k]`; every one of them is
/// on Kafka as a change event, first occurrences in write order (a redelivery after a crash
/// repeats a suffix, never reorders), and a duplicate carries the same event id exactly when it
/// carries the same data (an update read again after a crash may have its document looked up
/// anew, and then has another id: one id never carries two contents). (Snapshot
/// copies are not part of this order: they sit before the stream's starting point by
/// `sequence`, wherever they land on the topic.)
fn assert_complete_and_ordered(records: &[Record], first: i64, last: &HashMap<String, i64>) {
    let by_key = seqs_by_key(records, false);
    for (key, &max) in last {
        let seen = by_key.get(key).unwrap_or_else(|| panic!("no change events for {key}"));
        let mut distinct: Vec<i64> = seen.iter().map(|s| s.0).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct, (first..=max).collect::<Vec<_>>(), "{key}: missing writes");
        let mut firsts = Vec::new();
        let mut ids: HashMap<i64, Vec<(&str, &str)>> = HashMap::new();
        for (s, id, data) in seen {
            match ids.get_mut(s) {
                Some(prev) => {
                    for (p_id, p_data) in prev.iter() {
                        assert_eq!(
                            p_id == id,
                            p_data == data,
                            "{key}: a duplicate of seq {s}: ids {p_id} and {id}, data\n{p_data}\n{data}"
                        );
                    }
                    prev.push((id, data));
                }
                None => {
                    ids.insert(*s, vec![(id, data)]);
                    firsts.push(*s);
                }
            }
        }
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{key}: out of order: {firsts:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_thousands_of_writes_loses_nothing() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let products = client.database("linechatbot").collection::<Document>("products");
    const KEYS: i64 = 20;
    const ROUNDS: i64 = 150; // 20 inserts + 2,980 updates = 3,000 changes
    for k in 0..KEYS {
        products.insert_one(doc! { "sku": format!("SKU-{k}"), "seq": 0_i64, "stock": 1_i32 }).await.unwrap();
    }

    // The snapshot of those 20 completes first; then thousands of writes stream in.
    let mut f = world.spawn_ficus(&["run"], &[]);
    eventually("streaming", Duration::from_secs(60), || async {
        checkpoint(&client, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok())
    })
    .await;
    let writer = {
        let products = products.clone();

        tokio::spawn(async move {
            for round in 1..ROUNDS {
                for k in 0..KEYS {
                    products
                        .update_one(doc! { "sku": format!("SKU-{k}") }, doc! { "$set": { "seq": round } })
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Kill ficus -9 three times while the writes stream in, then let it finish.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f.sigkill();
        f = world.spawn_ficus(&["run"], &[]);
    }
    writer.await.unwrap();
    let last: HashMap<String, i64> = (0..KEYS).map(|k| (format!("SKU-{k}"), ROUNDS - 1)).collect();
    let records = read_topics(&world.kafka.brokers(), &[PRODUCTS], Duration::from_secs(120), |r| {
        let by_key = seqs_by_key(r, false);
        last.iter().all(|(k, max)| by_key.get(k).is_some_and(|s| s.iter().any(|(v, _, _)| v == max)))
    });
    assert!(f.terminate().success(), "{}", f.logs());
    assert_complete_and_ordered(&records, 1, &last);
    let snapshots = seqs_by_key(&records, true);
    assert!((0..KEYS).all(|k| snapshots[&format!("SKU-{k}")].iter().all(|s| s.0 == 0)), "the snapshot copied seq 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_with_writes_during_the_copy_and_a_crash_mid_copy() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let customers = client.database("linechatbot").collection::<Document>("customers");
    const N: usize = 3000;
    let docs: Vec<Document> = (0..N)
        .map(|i| {
            let mut d = customer(&format!("U{i:05}"));
            d.insert("seq", 0_i64);
            d
        })
        .collect();
    customers.insert_many(docs).await.unwrap();

    // Throttled so the copy takes a few seconds: crash it part-way.
    let config = world.dir.path().join("ficus.toml");
    std::fs::write(&config, "[snapshot]\nmax_docs_per_sec = 800\nbatch_size = 200\n").unwrap();
    let cfg = config.to_str().unwrap();
    let mut f = world.spawn_ficus(&["run", "--config", cfg], &[]);
    eventually("snapshot progress", Duration::from_secs(60), || async {
        checkpoint(&client, "linechatbot")
            .await
            .and_then(|c| c.get_document("snapshot").ok().and_then(|s| s.get_i64("copied").ok()))
            .is_some_and(|n| n >= 600)
    })
    .await;
    f.sigkill();
    let copied_before_crash =
        checkpoint(&client, "linechatbot").await.unwrap().get_document("snapshot").unwrap().get_i64("copied").unwrap();
    assert!(copied_before_crash < N as i64, "the crash should land mid-copy");

    // Restart; write while the copy continues.
    let mut f = world.spawn_ficus(&["run", "--config", cfg], &[]);
    let mut last = HashMap::new();
    for round in 1..=3_i64 {
        for i in (0..N).step_by(97) {
            let key = format!("U{i:05}");
            customers.update_one(doc! { "user_id": &key }, doc! { "$set": { "seq": round } }).await.unwrap();
            last.insert(key, round);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // An insert and a delete during the copy too.
    let mut late = customer("U-late");
    late.insert("seq", 0_i64);
    customers.insert_one(late).await.unwrap();
    customers.delete_one(doc! { "user_id": "U00001" }).await.unwrap();

    eventually("snapshot done", Duration::from_secs(120), || async {
        checkpoint(&client, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok())
    })
    .await;
    // Every partition to its end (stopping at the first sight of the last writes could leave
    // other partitions half read), until the last writes are there.
    let last_writes_in = |r: &[common::Record]| {
        r.iter().any(|r| r.key == "U-late") && r.iter().any(|r| r.key == "U00001" && r.event().data.op == Op::Delete)
    };
    let mut records = common::read_all(&world.kafka.brokers(), &[CUSTOMERS]);
    for _ in 0..10 {
        if last_writes_in(&records) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        records = common::read_all(&world.kafka.brokers(), &[CUSTOMERS]);
    }
    assert!(last_writes_in(&records), "the last writes never reached Kafka");
    assert!(f.terminate().success(), "{}", f.logs());

    // The topic's latest state per key equals the collection.
    let mut latest: HashMap<&str, Option<&Document>> = HashMap::new();
    // (Document events only: not derived events, nor the snapshot's end-of-copy markers.)
    for r in records.iter().filter(|r| r.is_event() && r.event().data.derived.is_none()) {
        latest.insert(r.key.as_str(), r.event().data.after.as_ref());
    }
    let mut cursor = customers.find(doc! {}).await.unwrap();
    let mut live = 0;
    use futures::TryStreamExt;
    while let Some(d) = cursor.try_next().await.unwrap() {
        live += 1;
        let key = d.get_str("user_id").unwrap();
        assert_eq!(latest.get(key).copied().flatten(), Some(&d), "{key}: topic's latest state differs");
    }
    assert_eq!(
        latest.values().filter(|v| v.is_some()).count(),
        live,
        "a deleted document still looks alive on the topic"
    );
    assert_eq!(latest.get("U00001"), Some(&None), "the delete during the copy arrived last");
    assert_complete_and_ordered(&records, 1, &last);

    // The copy resumed rather than restarting: at most the in-flight batch was copied twice.
    let snapshot_events = records
        .iter()
        .filter(|r| r.is_event() && r.event().data.op == Op::Snapshot && r.event().data.derived.is_none())
        .count();
    assert!(snapshot_events >= N, "{snapshot_events} snapshot events for {N} documents");
    assert!(snapshot_events <= N + 2 * 200, "the copy restarted from zero: {snapshot_events} snapshot events");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_source_still_advances_its_checkpoint() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let mut f = world.spawn_ficus(&["run"], &[]);
    let token = |c: Document| c.get_document("stream").ok().and_then(|s| s.get_document("resume_token").ok().cloned());
    eventually("a first checkpoint", Duration::from_secs(60), || async {
        checkpoint(&client, "linechatbot").await.and_then(token).is_some()
    })
    .await;
    let first = checkpoint(&client, "linechatbot").await.and_then(token);
    // Activity the stream filters out (another database) moves the post-batch resume token.
    client.database("elsewhere").collection::<Document>("x").insert_one(doc! { "a": 1 }).await.unwrap();
    eventually("the checkpoint moved without any event", Duration::from_secs(30), || async {
        checkpoint(&client, "linechatbot").await.and_then(token) != first
    })
    .await;
    assert!(f.terminate().success(), "{}", f.logs());
    let records = read_topics(&world.kafka.brokers(), &[CUSTOMERS], Duration::from_secs(2), |_| true);
    // The empty snapshot's end-of-copy markers, one per partition, and no change event.
    assert!(records.iter().all(|r| !r.is_event()), "{} records", records.len());
    assert_eq!(records.len(), 6, "one snapshot marker per partition of {CUSTOMERS}");
}

#[tokio::test(flavor = "multi_thread")]
async fn history_lost_stops_with_the_remedy_and_resnapshot_recovers() {
    let world = World::start_with(&["--oplog-max-entries", "50"]);
    world.apply_topics();
    let client = world.mongo.client().await;
    let customers = client.database("linechatbot").collection::<Document>("customers");
    let mut f = world.spawn_ficus(&["run"], &[]);
    eventually("streaming", Duration::from_secs(60), || async {
        checkpoint(&client, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok())
    })
    .await;
    customers.insert_one(customer("U-before")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(f.terminate().success(), "{}", f.logs());

    // While ficus is down, the oplog rolls far past its checkpoint.
    for i in 0..300 {
        customers.insert_one(customer(&format!("U-gap-{i}"))).await.unwrap();
    }
    // secantusd-rs prunes its oplog every few seconds; wait until the checkpoint is gone.
    let checkpoint_time = checkpoint(&client, "linechatbot")
        .await
        .unwrap()
        .get_document("stream")
        .unwrap()
        .get_timestamp("cluster_time")
        .unwrap();
    eventually("the oplog pruned past the checkpoint", Duration::from_secs(60), || async {
        common::oldest_oplog_time(&client).await.is_some_and(|ts| ts > checkpoint_time)
    })
    .await;

    let mut f = world.spawn_ficus(&["run"], &[]);
    let Some(status) = f.wait(Duration::from_secs(60)) else {
        panic!("ficus should stop by itself; log:\n{}", f.logs())
    };

    assert!(!status.success());
    let logs = f.logs();
    assert!(
        logs.contains("--resnapshot") && logs.contains("oplog"),
        "the error should name the cause and the remedy:\n{logs}"
    );

    let mut f = world.spawn_ficus(&["run", "--resnapshot"], &[]);
    let records = read_topics(&world.kafka.brokers(), &[CUSTOMERS], Duration::from_secs(120), |r| {
        (0..300).all(|i| r.iter().any(|r| r.key == format!("U-gap-{i}")))
    });
    for i in 0..300 {
        assert!(records.iter().any(|r| r.key == format!("U-gap-{i}")), "U-gap-{i} missing after re-snapshot");
    }
    assert!(f.terminate().success(), "{}", f.logs());
}
