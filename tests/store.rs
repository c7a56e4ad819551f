//! The event store, replay and verify, against real servers.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bson::{Document, doc};
use common::{World, eventually, poll_until, read_all};
use ficus::testkit::workload::Workload;

const TOPICS: [&str; 2] = ["linechatbot.customers", "linechatbot.products"];

async fn count(client: &mongodb::Client, db: &str, coll: &str, filter: Document) -> u64 {
    client.database(db).collection::<Document>(coll).count_documents(filter).await.unwrap()
}

/// Every collection of a database, documents sorted by `_id`.
async fn dump(client: &mongodb::Client, db: &str) -> BTreeMap<String, Vec<Document>> {
    common::dump(&client.database(db)).await
}

async fn seed(client: &mongodb::Client, customers: u64, products: u64) {
    let db = client.database("linechatbot");
    let mut w = Workload::new(21);
    let docs: Vec<Document> = (0..customers).map(|i| w.customer(i)).collect();
    db.collection::<Document>("customers").insert_many(docs).await.unwrap();
    let docs: Vec<Document> = (0..products).map(|i| w.product(i)).collect();
    db.collection::<Document>("products").insert_many(docs).await.unwrap();
}

/// Waits until the archive holds every distinct event on the topics. Kafka is read back once
/// per minute of waiting, not on every poll: Tansu 0.6.0 serves a read from the start of a
/// topic at about a hundred records a second.
async fn archive_caught_up(world: &World, client: &mongodb::Client) -> usize {
    let archived = || async { count(client, "ficus", "events", doc! { "topic": { "$in": TOPICS.to_vec() } }).await };
    for _ in 0..4 {
        let distinct = read_all(&world.kafka.brokers(), &TOPICS)
            .into_iter()
            .map(|r| r.message.id().to_string())
            .collect::<HashSet<String>>()
            .len();
        if poll_until(Duration::from_secs(60), || async { archived().await == distinct as u64 }).await {
            return distinct;
        }
    }
    panic!("the archive never caught up with Kafka ({} archived)", archived().await);
}

fn ok(out: &std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}:\n{text}", out.status.code());
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_rebuilds_a_dropped_database_while_writes_continue_and_verify_proves_it() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    seed(&client, 200, 60).await;
    let mut f = world.spawn_ficus(&["run"], &[]);
    eventually("customers_db populated", Duration::from_secs(120), || async {
        count(&client, "customers_db", "customers", doc! {}).await == 200
            && count(&client, "products_db", "products", doc! {}).await == 60
    })
    .await;
    archive_caught_up(&world, &client).await;
    ok(&world.ficus(&["verify", "--checks", "counts,contents", "--service", "customers_db"], &[]));

    // Writes keep coming while the service database is lost and rebuilt.
    let writer = {
        let db = client.database("linechatbot");
        tokio::spawn(async move {
            for i in 0..150u64 {
                db.collection::<Document>("customers")
                    .update_one(doc! { "user_id": Workload::user_id(i % 200) }, doc! { "$inc": { "stats.msgs": 1 } })
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    client.database("customers_db").drop().await.unwrap();
    let text = ok(&world.ficus(&["replay", "--service", "customers_db"], &[]));
    assert!(text.contains("rebuilt from"), "{text}");
    writer.await.unwrap();

    // Once the live consumer has the last writes, the rebuilt database equals the monolith.
    let mut last = String::new();
    eventually("verify passes after the rebuild", Duration::from_secs(90), || {
        let out =
            world.ficus(&["verify", "--checks", "counts,contents", "--service", "customers_db", "--settle", "1"], &[]);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        async move { out.status.success() }
    })
    .await;
    assert!(last.contains("consistency 100.00%"), "{last}");

    // Replaying again changes nothing.
    assert!(f.terminate().success(), "{}", f.logs());
    let once = dump(&client, "customers_db").await;
    ok(&world.ficus(&["replay", "--service", "customers_db"], &[]));
    assert_eq!(dump(&client, "customers_db").await, once, "replaying twice must equal replaying once");
    ok(&world.ficus(&["replay", "--service", "customers_db", "--in-place"], &[]));
    assert_eq!(dump(&client, "customers_db").await, once, "an in-place replay over a current database is a no-op");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_names_documents_changed_deleted_or_added_behind_ficus_back() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    seed(&client, 50, 30).await;
    let mut f = world.spawn_ficus(&["run", "--roles", "tail,consume"], &[]);
    eventually("products_db populated", Duration::from_secs(120), || async {
        count(&client, "products_db", "products", doc! {}).await == 30
            && count(&client, "customers_db", "customers", doc! {}).await == 50
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(f.terminate().success(), "{}", f.logs());
    let out = ok(&world.ficus(&["verify", "--checks", "counts,contents", "--service", "products_db"], &[]));
    assert!(out.contains("consistent"), "{out}");

    let products = client.database("products_db").collection::<Document>("products");
    products.update_one(doc! { "_id": Workload::sku(3) }, doc! { "$set": { "price": 1 } }).await.unwrap();
    products.delete_one(doc! { "_id": Workload::sku(4) }).await.unwrap();
    products.insert_one(doc! { "_id": "SKU-intruder", "productId": "SKU-intruder" }).await.unwrap();
    client
        .database("products_db")
        .collection::<Document>("categories")
        .update_many(doc! {}, doc! { "$inc": { "productCount": 1 } })
        .await
        .unwrap();

    let out = world.ficus(
        &["verify", "--checks", "counts,contents", "--service", "products_db", "--settle", "0", "--sample", "50"],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for needle in [Workload::sku(3), Workload::sku(4), "SKU-intruder".to_string(), "DRIFT".to_string()] {
        assert!(text.contains(&needle), "the report should name {needle}:\n{text}");
    }
    assert!(text.contains("expected") && text.contains("actual"), "side by side:\n{text}");
    // A service nobody touched still verifies.
    ok(&world.ficus(&["verify", "--checks", "counts,contents", "--service", "customers_db"], &[]));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archive_holds_each_event_exactly_once_after_duplicates_and_restarts() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    seed(&client, 100, 20).await;
    let writer = {
        let db = client.database("linechatbot");
        tokio::spawn(async move {
            for i in 0..400u64 {
                db.collection::<Document>("customers")
                    .update_one(doc! { "user_id": Workload::user_id(i % 100) }, doc! { "$inc": { "stats.msgs": 1 } })
                    .await
                    .unwrap();
            }
        })
    };
    // Tail and archive killed -9 repeatedly: the tail re-publishes (duplicates on Kafka), the
    // archive re-reads what it had not committed.
    for _ in 0..4 {
        let mut f = world.spawn_ficus(&["run", "--roles", "tail,archive", "--batch-max", "20"], &[]);
        tokio::time::sleep(Duration::from_millis(2000)).await;
        f.sigkill();
    }
    writer.await.unwrap();
    let mut f = world.spawn_ficus(&["run", "--roles", "tail,archive"], &[]);
    let distinct = archive_caught_up(&world, &client).await;
    assert!(f.terminate().success(), "{}", f.logs());
    let on_kafka = read_all(&world.kafka.brokers(), &TOPICS).len();
    assert!(distinct >= 520, "{distinct} distinct events");
    // (The archive also holds the other topics' snapshot markers.)
    let stored = count(&client, "ficus", "events", doc! { "topic": { "$in": TOPICS.to_vec() } }).await;
    assert_eq!(stored, distinct as u64, "one record per event id ({on_kafka} records on Kafka)");
    // Each record knows where it sat on Kafka.
    let one = client.database("ficus").collection::<Document>("events").find_one(doc! {}).await.unwrap().unwrap();
    assert!(
        one.get_i64("offset").is_ok() && one.get_i32("partition").is_ok() && one.get_str("sequence").is_ok(),
        "{one}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_brand_new_service_database_is_built_from_the_store_alone() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    seed(&client, 40, 10).await;
    let mut f = world.spawn_ficus(&["run", "--roles", "tail,archive"], &[]);
    archive_caught_up(&world, &client).await;
    assert!(f.terminate().success(), "{}", f.logs());

    // A new service, defined after the fact: a CRM view of customers.
    let dir = world.dir.path().join("transforms");
    std::fs::create_dir_all(dir.join("crm_db")).unwrap();
    std::fs::write(
        dir.join("crm_db/contacts.toml"),
        r#"topic = "linechatbot.customers"
events = ["customer.snapshot", "customer.created", "customer.updated", "customer.deleted"]
collection = "contacts"
key = "lineUserId"

[fields]
lineUserId = "user_id"
name = "name"
tier = "tier"
"#,
    )
    .unwrap();
    // The monolith is unreachable for this command: the store and Kafka are all it has.
    let transforms = dir.to_str().unwrap();
    let out = world.ficus(
        &["replay", "--service", "crm_db"],
        &[
            ("FICUS_TRANSFORMS_DIR", transforms),
            ("FICUS_SOURCE_URI", "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500"),
        ],
    );
    ok(&out);
    assert_eq!(count(&client, "crm_db", "contacts", doc! {}).await, 40);
    let c = client
        .database("crm_db")
        .collection::<Document>("contacts")
        .find_one(doc! { "_id": Workload::user_id(7) })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.get_str("lineUserId").unwrap(), Workload::user_id(7));
    assert!(c.get_str("tier").is_ok() && c.get("purchases").is_none());
}

/// The reference workload over every collection, including what removes purchases (a customer
/// replaced with new purchases, a `$pull`, customers with purchases deleted): afterwards every
/// shipped service verifies, and a replay of customers_db from the event store builds the same
/// customer_events as live consumption did.
#[tokio::test(flavor = "multi_thread")]
async fn every_service_verifies_after_replaces_pulls_and_deletes_and_replay_agrees() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let db = client.database("linechatbot");
    let mut w = Workload::new(33);
    for coll in Workload::COLLECTIONS {
        let docs: Vec<Document> = (0..20).filter_map(|i| w.document(coll, i, 6)).collect();
        db.collection::<Document>(coll).insert_many(docs).await.unwrap();
    }
    let mut f = world.spawn_ficus(&["run"], &[]);
    let customers = db.collection::<Document>("customers");
    let purchase = |id: &str| doc! { "id": id, "product_id": "SKU-000001", "product_name": "Collagen", "amount": "99.00", "currency": "THB", "date": bson::DateTime::from_millis(1_767_225_600_000), "status": "paid" };
    for i in 0..20u64 {
        let user = Workload::user_id(i);
        match i % 5 {
            0 => {
                let mut replaced = w.customer(i);
                replaced.remove("_id");
                replaced.insert("purchases", vec![purchase(&format!("P-new-{i}"))]);
                customers.replace_one(doc! { "user_id": &user }, replaced).await.unwrap();
            }
            1 => {
                // Two purchases pushed one by one, then the first pulled.
                for p in ["a", "b"] {
                    let update = doc! { "$push": { "purchases": purchase(&format!("P-{p}-{i}")) } };
                    customers.update_one(doc! { "user_id": &user }, update).await.unwrap();
                }
                let pull = doc! { "$pull": { "purchases": { "id": format!("P-a-{i}") } } };
                customers.update_one(doc! { "user_id": &user }, pull).await.unwrap();
            }
            2 => {
                customers.delete_one(doc! { "user_id": &user }).await.unwrap();
            }
            3 => {
                let update =
                    doc! { "$push": { "purchases": purchase(&format!("P-push-{i}")) }, "$inc": { "stats.msgs": 1 } };
                customers.update_one(doc! { "user_id": &user }, update).await.unwrap();
            }
            _ => {
                let update = doc! { "$set": { "purchases": [purchase(&format!("P-set-{i}"))], "tier": "vip" } };
                customers.update_one(doc! { "user_id": &user }, update).await.unwrap();
            }
        }
    }
    let kafka = world.kafka.config();
    let root = common::repo_root();
    let topics = ficus::config::topics::load(&root.join("topics")).unwrap();
    let services = ficus::transform::load_all(&root.join("transforms"), &topics).unwrap();
    let all: Vec<String> = topics.defs.iter().map(|d| d.topic.clone()).collect();
    eventually("every group caught up", Duration::from_secs(180), || async {
        let streaming =
            common::checkpoint(&client, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok());
        streaming
            && services.iter().all(|s| {
                let topics: Vec<String> = s.topics().into_iter().collect();
                ficus::status::group_lag(&kafka, &ficus::consume::group_id(s.service()), &topics)
                    .is_ok_and(|g| g.lag == 0)
            })
            && ficus::status::group_lag(&kafka, "ficus.archive", &all).is_ok_and(|g| g.lag == 0)
    })
    .await;
    for s in &services {
        let out = world.ficus(&["verify", "--checks", "counts,contents", "--service", s.service()], &[]);
        ok(&out);
    }
    let live = dump(&client, "customers_db").await;
    let ids = |docs: &[Document]| docs.iter().map(|d| d.get_str("_id").unwrap().to_string()).collect::<Vec<_>>();
    let events = ids(&live["customer_events"]);
    assert!(events.contains(&"purchase_made:P-new-0".to_string()), "{events:?}");
    assert!(
        events.contains(&"purchase_made:P-b-1".to_string()) && !events.contains(&"purchase_made:P-a-1".to_string())
    );
    assert!(f.terminate().success(), "{}", f.logs());

    ok(&world.ficus(&["replay", "--service", "customers_db"], &[]));
    let replayed = dump(&client, "customers_db").await;
    let strip = |docs: &[Document]| docs.iter().cloned().map(ficus::sink::strip_meta).collect::<Vec<_>>();
    assert_eq!(
        strip(&replayed["customer_events"]),
        strip(&live["customer_events"]),
        "replay built other customer_events"
    );
    assert_eq!(strip(&replayed["customers"]), strip(&live["customers"]));
    ok(&world.ficus(&["verify", "--checks", "counts,contents", "--service", "customers_db"], &[]));
}
