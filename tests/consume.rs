//! The consume role end to end: monolith writes → tail → Kafka → transforms → the seven service
//! databases, on real servers; crashes, and poison messages.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bson::{Bson, Document, doc};
use common::{World, eventually};
use ficus::testkit::workload::Workload;
use futures::TryStreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};

async fn find(client: &mongodb::Client, db: &str, coll: &str, filter: Document) -> Option<Document> {
    client.database(db).collection::<Document>(coll).find_one(filter).await.unwrap()
}

async fn count(client: &mongodb::Client, db: &str, coll: &str, filter: Document) -> u64 {
    client.database(db).collection::<Document>(coll).count_documents(filter).await.unwrap()
}

async fn all(client: &mongodb::Client, db: &str, coll: &str) -> Vec<Document> {
    client
        .database(db)
        .collection::<Document>(coll)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn monolith_writes_arrive_in_every_service_database() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let db = client.database("linechatbot");
    let mut w = Workload::new(3);
    for coll in Workload::COLLECTIONS {
        let docs: Vec<Document> = (0..6).filter_map(|i| w.document(coll, i, 3)).collect();
        db.collection::<Document>(coll).insert_many(docs).await.unwrap();
    }
    let mut f = world.spawn_ficus(&["run"], &[]);

    // Snapshot arrives everywhere.
    let user0 = Workload::user_id(0);
    eventually("customers_db.customers", Duration::from_secs(90), || async {
        count(&client, "customers_db", "customers", doc! {}).await == 6
    })
    .await;
    for (dbname, coll, n) in [
        ("conversations_db", "conversations", 6),
        ("ai_sessions_db", "ai_sessions", 6),
        ("products_db", "products", 6),
        ("ai_sessions_db", "ai_responses", 3),
        ("research_db", "research_cache", 3),
        ("conversations_db", "webhook_events", 2),
        ("metrics_db", "audit_logs", 2),
        ("auth_db", "security_events", 2),
        ("metrics_db", "system_metrics", 3),
        ("ai_sessions_db", "provider_stats", 3),
        ("auth_db", "api_keys", 6),
        ("research_db", "healthcare_knowledge", 6),
    ] {
        eventually(&format!("{dbname}.{coll} has {n}"), Duration::from_secs(60), || async {
            count(&client, dbname, coll, doc! {}).await == n
        })
        .await;
    }

    // The seed's target schema, legacy quirks absorbed.
    let c = find(&client, "customers_db", "customers", doc! { "lineUserId": &user0 }).await.unwrap();
    assert!(c.get_document("profile").unwrap().get_str("language").is_ok());
    assert!(
        matches!(
            c.get_document("segmentation").unwrap().get("lifetimeValue"),
            Some(Bson::Decimal128(_) | Bson::Double(_))
        ),
        "{c}"
    );
    assert!(c.get("user_id").is_none() && c.get("ltv").is_none(), "legacy fields are not copied: {c}");
    let conv = all(&client, "conversations_db", "conversations").await;
    let roles: Vec<String> = conv
        .iter()
        .flat_map(|c| {
            c.get_array("messages")
                .unwrap()
                .iter()
                .map(|m| m.as_document().unwrap().get_str("role").unwrap().to_string())
        })
        .collect();
    assert!(!roles.iter().any(|r| r == "bot"), "bot becomes assistant: {roles:?}");
    let keys = all(&client, "auth_db", "api_keys").await;
    assert!(keys.iter().all(|k| k.get_str("hashedKey").is_ok() && k.get("key").is_none()));

    // Live changes of every kind.
    let customers = db.collection::<Document>("customers");
    customers
        .update_one(
            doc! { "user_id": &user0 },
            doc! { "$push": { "purchases": { "id": "P-live", "product_id": "SKU-000001", "product_name": "X", "amount": "99.50", "currency": "THB", "date": bson::DateTime::now(), "status": "paid" } }, "$set": { "tier": "vip" } },
        )
        .await
        .unwrap();
    eventually("customer_events gets the purchase", Duration::from_secs(60), || async {
        count(&client, "customers_db", "customer_events", doc! { "eventData.purchaseId": "P-live" }).await == 1
    })
    .await;
    eventually("tier update", Duration::from_secs(30), || async {
        find(&client, "customers_db", "customers", doc! { "lineUserId": &user0 })
            .await
            .is_some_and(|c| c.get_document("segmentation").unwrap().get_str("tier").ok() == Some("vip"))
    })
    .await;

    // Categories follow products through create, move and delete.
    let products = db.collection::<Document>("products");
    let mut p = w.product(100);
    p.insert("category", "brand-new");
    products.insert_one(p).await.unwrap();
    let cat_count = |cat: &'static str| {
        let client = client.clone();
        async move {
            find(&client, "products_db", "categories", doc! { "categoryId": cat })
                .await
                .and_then(|d| d.get("productCount").cloned())
        }
    };
    eventually("new category counted", Duration::from_secs(60), || async {
        cat_count("brand-new").await.is_some_and(|n| n == Bson::Int64(1) || n == Bson::Int32(1))
    })
    .await;
    products
        .update_one(doc! { "sku": Workload::sku(100) }, doc! { "$set": { "category": "other-new" } })
        .await
        .unwrap();
    eventually("category moved", Duration::from_secs(60), || async {
        cat_count("brand-new").await.is_none_or(|n| n == Bson::Int64(0) || n == Bson::Int32(0))
            && cat_count("other-new").await.is_some()
    })
    .await;
    products.delete_one(doc! { "sku": Workload::sku(100) }).await.unwrap();
    eventually("deleted product uncounted and gone", Duration::from_secs(60), || async {
        cat_count("other-new").await.is_none_or(|n| n == Bson::Int64(0) || n == Bson::Int32(0))
            && count(&client, "products_db", "products", doc! { "productId": Workload::sku(100) }).await == 0
    })
    .await;

    // A delete reaches the service; a replace too.
    customers.delete_one(doc! { "user_id": Workload::user_id(1) }).await.unwrap();
    eventually("customer deleted", Duration::from_secs(60), || async {
        count(&client, "customers_db", "customers", doc! { "lineUserId": Workload::user_id(1) }).await == 0
    })
    .await;
    assert!(f.terminate().success(), "{}", f.logs());

    // The consumer group is the one operators look for.
    assert!(f.logs().contains("ficus.customers_db"), "consumer group named ficus.<service>");
}

/// Every service database, ficus's metadata and tombstones included, for comparison.
async fn snapshot_of_services(client: &mongodb::Client) -> BTreeMap<String, Vec<Document>> {
    let mut out = BTreeMap::new();
    for dbname in
        ["conversations_db", "ai_sessions_db", "customers_db", "products_db", "research_db", "metrics_db", "auth_db"]
    {
        let db = client.database(dbname);
        for coll in db.list_collection_names().await.unwrap() {
            if coll.starts_with("_ficus") {
                continue;
            }
            let docs = all(client, dbname, &coll).await.into_iter().map(ficus::sink::strip_meta).collect();
            out.insert(format!("{dbname}.{coll}"), docs);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn consumers_killed_mid_batch_converge_to_a_clean_run() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let db = client.database("linechatbot");
    let mut w = Workload::new(11);
    let docs: Vec<Document> = (0..300).map(|i| w.customer(i)).collect();
    db.collection::<Document>("customers").insert_many(docs).await.unwrap();
    let docs: Vec<Document> = (0..200).map(|i| w.product(i)).collect();
    db.collection::<Document>("products").insert_many(docs).await.unwrap();

    // Tail everything first, then consume with SIGKILLs while writes continue.
    let mut tail = world.spawn_ficus(&["run", "--roles", "tail"], &[]);
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            for i in 0..300u64 {
                db.collection::<Document>("customers")
                    .update_one(doc! { "user_id": Workload::user_id(i) }, doc! { "$inc": { "stats.msgs": 1 } })
                    .await
                    .unwrap();
                db.collection::<Document>("products")
                    .update_one(
                        doc! { "sku": Workload::sku(i % 200) },
                        doc! { "$set": { "category": format!("c{}", i % 7) } },
                    )
                    .await
                    .unwrap();
            }
        })
    };
    for _ in 0..4 {
        let mut c = world.spawn_ficus(
            &[
                "run",
                "--roles",
                "consume",
                "--service",
                "customers_db",
                "--service",
                "products_db",
                "--batch-max",
                "50",
            ],
            &[],
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        c.sigkill();
    }
    writer.await.unwrap();
    let mut c =
        world.spawn_ficus(&["run", "--roles", "consume", "--service", "customers_db", "--service", "products_db"], &[]);
    // Caught up when the tail has published every change (its checkpoint is quiet) and both
    // groups have committed everything on the topics.
    let kafka = world.kafka.config();
    let topics = ["linechatbot.customers".to_string(), "linechatbot.products".to_string()];
    eventually("consumers caught up", Duration::from_secs(120), || async {
        let lag = |g: &str, t: &str| ficus::status::group_lag(&kafka, g, &[t.to_string()]).map(|l| l.lag).unwrap_or(1);
        let streaming =
            common::checkpoint(&client, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok());
        streaming && lag("ficus.customers_db", &topics[0]) == 0 && lag("ficus.products_db", &topics[1]) == 0
    })
    .await;
    assert!(tail.terminate().success(), "{}", tail.logs());
    eventually("consumers caught up with the tail's last events", Duration::from_secs(60), || async {
        let lag = |g: &str, t: &str| ficus::status::group_lag(&kafka, g, &[t.to_string()]).map(|l| l.lag).unwrap_or(1);
        lag("ficus.customers_db", &topics[0]) == 0 && lag("ficus.products_db", &topics[1]) == 0
    })
    .await;
    assert!(c.terminate().success(), "{}", c.logs());

    let crashed = snapshot_of_services(&client).await;

    // A clean run: the same events, once, in partition order, through the same transforms and
    // sink, into fresh databases.
    let root = common::repo_root();
    let topics = ficus::config::topics::load(&root.join("topics")).unwrap();
    let services = ficus::transform::load_all(&root.join("transforms"), &topics).unwrap();
    let records = common::read_all(&world.kafka.brokers(), &["linechatbot.customers", "linechatbot.products"]);
    let mut clean = BTreeMap::new();
    for service in services.iter().filter(|s| ["customers_db", "products_db"].contains(&s.service())) {
        let name = format!("clean_{}", service.service());
        let sink = ficus::sink::MongoSink::open(
            client.clone(),
            &name,
            &service.collections(),
            &[],
            Duration::from_secs(86_400),
        )
        .await
        .unwrap();
        for r in &records {
            let ops = service.apply_message(&r.message).unwrap();
            let v = ficus::sink::Versioned::of(&r.message, ops);
            use ficus::sink::Sink;
            sink.apply(&[v], None).await.unwrap();
        }
        for coll in service.collections() {
            let docs = all(&client, &name, &coll).await.into_iter().map(ficus::sink::strip_meta).collect::<Vec<_>>();
            clean.insert(format!("{}.{coll}", service.service()), docs);
        }
    }
    let crashed: BTreeMap<String, Vec<Document>> = crashed.into_iter().filter(|(k, _)| clean.contains_key(k)).collect();
    assert_eq!(crashed.keys().collect::<Vec<_>>(), clean.keys().collect::<Vec<_>>());
    for (k, docs) in &clean {
        assert_eq!(crashed[k].len(), docs.len(), "{k}: document counts differ from a clean run");
        for (a, b) in crashed[k].iter().zip(docs) {
            assert_eq!(a, b, "{k}: a document differs from a clean run");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_is_dead_lettered_and_the_rest_applied() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let mut f = world.spawn_ficus(&["run", "--roles", "tail,consume", "--service", "customers_db"], &[]);

    // Another producer puts garbage on a ficus topic, keyed like a customer.
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", world.kafka.brokers()).create().unwrap();
    producer
        .send(FutureRecord::to("linechatbot.customers").key("U-poison").payload("{not json"), Duration::from_secs(10))
        .await
        .unwrap();
    // A real customer behind it, and one whose ltv cannot be a number (a permanent transform error).
    let db = client.database("linechatbot");
    let mut good = Workload::new(5).customer(1);
    good.insert("user_id", "U-good");
    db.collection::<Document>("customers").insert_one(good).await.unwrap();
    let mut bad = Workload::new(5).customer(2);
    bad.insert("user_id", "U-bad-ltv");
    bad.insert("ltv", "twelve baht");
    db.collection::<Document>("customers").insert_one(bad).await.unwrap();

    eventually("the good customer applied", Duration::from_secs(90), || async {
        count(&client, "customers_db", "customers", doc! { "lineUserId": "U-good" }).await == 1
    })
    .await;
    let dead = read_dlq(&world.kafka.brokers(), "linechatbot.customers.dlq", 2).await;
    assert_eq!(dead.len(), 2, "{dead:#?}");
    let poison = dead.iter().find(|d| d["stage"] == "decode").expect("the undecodable message");
    assert_eq!(poison["service"], "customers_db");
    assert_eq!(poison["event"], "{not json");
    assert!(poison["error"].as_str().unwrap().contains("not JSON"));
    let bad = dead.iter().find(|d| d["stage"] == "transform").expect("the untransformable event");
    assert!(bad["error"].as_str().unwrap().contains("ltv"), "{bad}");
    assert_eq!(bad["event"]["subject"], "U-bad-ltv", "the original event travels with the error");
    assert!(f.terminate().success(), "{}", f.logs());

    // After "fixing" the data in the monolith is not how a DLQ is re-driven; a fixed transform
    // is. Re-driving unchanged transforms keeps the letter dead and says so.
    let out = world.ficus(&["dlq", "replay", "--service", "customers_db"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 applied, 2 failed again"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1));
}

async fn read_dlq(brokers: &str, topic: &str, n: usize) -> Vec<serde_json::Value> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", "dlq-reader").create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while out.len() < n && std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            out.push(serde_json::from_slice(m.payload().unwrap()).unwrap());
        }
    }
    out
}

/// The TTL of the tombstones index of one service database, in days.
async fn tombstone_ttl_days(client: &mongodb::Client, db: &str) -> Option<i64> {
    use futures::TryStreamExt;
    let indexes: Vec<mongodb::IndexModel> = client
        .database(db)
        .collection::<Document>("_ficus_tombstones")
        .list_indexes()
        .await
        .ok()?
        .try_collect()
        .await
        .ok()?;
    let ttl = indexes.iter().find_map(|i| i.options.as_ref()?.expire_after)?;
    Some(ttl.as_secs() as i64 / 86_400)
}

/// Every command that writes a service database opens its tombstones with a TTL; one run with
/// a longer TTL than the next command's must not stop that command (MongoDB refuses to create
/// the same index with other options), and no command shortens what another lengthened.
#[tokio::test(flavor = "multi_thread")]
async fn commands_with_different_tombstone_ttls_share_one_database() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let mut f = world
        .spawn_ficus(&["run", "--roles", "consume", "--service", "products_db", "--tombstone-ttl-days", "30"], &[]);
    eventually("the sink opened", Duration::from_secs(60), || async {
        tombstone_ttl_days(&client, "products_db").await == Some(30)
    })
    .await;
    assert!(f.terminate().success(), "{}", f.logs());

    // The default TTL (14 days) after a run with 30.
    let out = world.ficus(&["dlq", "replay", "--service", "products_db"], &[]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dlq replay after a run with a longer TTL:\n{text}");
    assert_eq!(tombstone_ttl_days(&client, "products_db").await, Some(30), "kept the longer TTL");
    let out = world.ficus(&["replay", "--service", "products_db"], &[]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "replay after a run with a longer TTL:\n{text}");
    assert_eq!(tombstone_ttl_days(&client, "products_db").await, Some(30), "the shadow swapped in kept it too");
    // A longer one lengthens it.
    let out = world.ficus(&["dlq", "replay", "--service", "products_db", "--tombstone-ttl-days", "45"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tombstone_ttl_days(&client, "products_db").await, Some(45));
}
