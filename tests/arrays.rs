//! Arrays against real servers (issue 18, points 8 and 10): an element the service changes by
//! index reaches the monolith on its own element, whatever the monolith's own code did to the
//! array meanwhile, and nothing is dead-lettered; an array a pipeline update cuts
//! (`truncatedArrays`) reaches the other side with exactly the elements left, both ways.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bson::{Bson, DateTime, Document, doc};
use common::{World, eventually, poll_until, read_all};
use ficus::testkit::workload::Workload;
use rdkafka::consumer::{BaseConsumer, Consumer};

const DEAD_LETTERS: &str = "customers_db.changes.dlq";

fn ok(out: &std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}:\n{text}", out.status.code());
    text
}

/// A purchase of customer `i` as the monolith keeps it, with a field no transform reads
/// (`gateway`), which must stay with its element whatever moves. Purchase ids are unique across
/// customers (`customer_events` holds one document per purchase id): `P1` of customer 2 is
/// `P1@2`, and [`elements`] reads it back as `P1`.
fn buy(i: u64, tag: &str, status: &str) -> Bson {
    let id = format!("{tag}@{i}");
    Bson::Document(doc! {
        "id": &id, "product_id": "SKU-000001", "product_name": "Product SKU-000001", "amount": "10.00",
        "currency": "THB", "date": DateTime::from_millis(1_700_000_000_000), "status": status,
        "gateway": format!("gw-{id}"),
    })
}

/// A purchase of customer `i` as the service's application writes one.
fn service_buy(i: u64, tag: &str) -> Document {
    let id = format!("{tag}@{i}");
    doc! {
        "purchaseId": id, "productId": "SKU-000002", "productName": "Product SKU-000002",
        "amount": Bson::Decimal128("25.50".parse().unwrap()), "currency": "THB",
        "purchaseDate": DateTime::from_millis(1_700_000_100_000), "status": "paid",
    }
}

/// `(id, status)` of each element of an array, in order: the monolith's (`purchases`, `id`) or
/// the service's (`purchaseHistory`, `purchaseId`).
fn elements(d: Option<&Document>, array: &str, id: &str) -> Vec<(String, String)> {
    let Some(items) = d.and_then(|d| d.get_array(array).ok()) else { return Vec::new() };
    items
        .iter()
        .map(|e| {
            let e = e.as_document().expect("an element is a document");
            (tag(e.get_str(id).unwrap_or("?")), e.get_str("status").unwrap_or("?").to_string())
        })
        .collect()
}

/// A purchase id without its customer (`P1@2` → `P1`).
fn tag(id: &str) -> String {
    id.split('@').next().unwrap_or(id).to_string()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// Each partition's high watermark of a topic.
fn watermarks(brokers: &str, topic: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ficus-test-wm")
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap().1))
        .collect()
}

fn signal(f: &common::Ficus, sig: i32) {
    let pid = f.pid().expect("ficus runs") as i32;
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to ficus");
}

/// A world whose monolith holds `customers` (user id → purchases), the rest of each customer
/// from the workload, and `ficus run` for customers_db once the service holds them all.
async fn started(customers: &[(u64, Vec<Bson>)]) -> (World, common::Ficus, mongodb::Client) {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let mut w = Workload::new(18);
    for (i, purchases) in customers {
        let mut c = w.customer(*i);
        c.insert("purchases", purchases.clone());
        monolith.insert_one(c).await.unwrap();
    }
    let f = world.spawn_ficus(&["run", "--service", "customers_db"], &[]);
    let service = client.database("customers_db").collection::<Document>("customers");
    eventually("customers_db populated", Duration::from_secs(120), || async {
        service.count_documents(doc! {}).await.unwrap() == customers.len() as u64
    })
    .await;
    (world, f, client)
}

/// What the two sides and the element target hold for one customer.
struct Sides {
    monolith: Vec<(String, String)>,
    service: Vec<(String, String)>,
    /// Purchase ids in `customer_events`, sorted.
    events: Vec<String>,
}

async fn sides(client: &mongodb::Client, user: &str) -> Sides {
    use futures::TryStreamExt;
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let service = client.database("customers_db").collection::<Document>("customers");
    let events = client.database("customers_db").collection::<Document>("customer_events");
    let m = monolith.find_one(doc! { "user_id": user }).await.unwrap();
    let s = service.find_one(doc! { "_id": user }).await.unwrap();
    let docs: Vec<Document> = events.find(doc! { "lineUserId": user }).await.unwrap().try_collect().await.unwrap();
    let mut events: Vec<String> =
        docs.iter().filter_map(|d| d.get_document("eventData").ok()?.get_str("purchaseId").ok().map(tag)).collect();
    events.sort();
    Sides {
        monolith: elements(m.as_ref(), "purchases", "id"),
        service: elements(s.as_ref(), "purchaseHistory", "purchaseId"),
        events,
    }
}

/// The monolith document's purchases, each with its unread `gateway`, which must have stayed
/// with its element.
async fn gateways_stay(client: &mongodb::Client, user: &str) {
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let m = monolith.find_one(doc! { "user_id": user }).await.unwrap().unwrap();
    for e in m.get_array("purchases").unwrap() {
        let e = e.as_document().unwrap();
        let id = e.get_str("id").unwrap();
        if id.starts_with('S') {
            continue; // the service's own purchase: built from what the transform reads
        }
        assert_eq!(e.get_str("gateway").ok(), Some(format!("gw-{id}").as_str()), "{user}: {m}");
    }
}

/// A world whose monolith holds three customers of three purchases each, with customers_db
/// owning every customer, and ficus in two processes: `tail,archive,reverse` and the forward
/// `consume` (paused: ficus's forward side is behind, as the contract allows). Then the
/// monolith's own code reshapes each customer's purchases and the service, on its own older
/// shape, changes each by index (issue 18, point 10):
///
/// - U0: the monolith drops P0 and pushes P3 (same length, shifted); the service refunds its
///   element 1 (P1, which is element 0 in the monolith now);
/// - U1: the monolith puts P-new first (longer, shifted); the service refunds element 1 (P1);
/// - U2: the monolith drops P0 (shorter); the service pushes S9 as its element 3, which by index
///   is a hole in the monolith's array (`purchaseHistory[3]: expected a document, found null`,
///   dead-lettered before).
///
/// Returns with the forward consumer still paused, once the monolith holds every element change
/// or after three minutes: (world, tail and reverse, forward consumer, client).
async fn reshaped_while_the_service_changes_by_index() -> (World, common::Ficus, common::Ficus, mongodb::Client) {
    let three = |i| vec![buy(i, "P0", "paid"), buy(i, "P1", "paid"), buy(i, "P2", "paid")];
    let (world, all, client) = started(&[(0, three(0)), (1, three(1)), (2, three(2))]).await;
    ok(&world.ficus(&["cutover", "--service", "customers_db", "--to", "100", "--force"], &[]));
    // The same roles, split: the forward consumer on its own, so that it can be paused.
    let mut all = all;
    assert!(all.terminate().success(), "{}", all.logs());
    let a = world.spawn_ficus_named(
        "tail-reverse",
        &["run", "--roles", "tail,archive,reverse", "--service", "customers_db"],
        &[],
    );
    let b = world.spawn_ficus_named("forward", &["run", "--roles", "consume", "--service", "customers_db"], &[]);
    signal(&b, libc::SIGSTOP);
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let service = client.database("customers_db").collection::<Document>("customers");
    let user = Workload::user_id;

    // The monolith's own code.
    let pull_p0 = |i| doc! { "$pull": { "purchases": { "id": format!("P0@{i}") } } };
    monolith.update_one(doc! { "user_id": user(0) }, pull_p0(0)).await.unwrap();
    let push_p3 = doc! { "$push": { "purchases": buy(0, "P3", "paid") } };
    monolith.update_one(doc! { "user_id": user(0) }, push_p3).await.unwrap();
    let first = doc! { "$push": { "purchases": { "$each": [buy(1, "P-new", "paid")], "$position": 0 } } };
    monolith.update_one(doc! { "user_id": user(1) }, first).await.unwrap();
    monolith.update_one(doc! { "user_id": user(2) }, pull_p0(2)).await.unwrap();
    // The service's application, by index on its own view.
    let refund = doc! { "$set": { "purchaseHistory.1.status": "refunded" } };
    service.update_one(doc! { "_id": user(0) }, refund.clone()).await.unwrap();
    service.update_one(doc! { "_id": user(1) }, refund).await.unwrap();
    let push_s9 = doc! { "$push": { "purchaseHistory": service_buy(2, "S9") } };
    service.update_one(doc! { "_id": user(2) }, push_s9).await.unwrap();

    poll_until(Duration::from_secs(180), || async {
        let mut all = true;
        for (i, want) in reshaped().iter().enumerate() {
            all &= sides(&client, &user(i as u64)).await.monolith == *want;
        }
        all
    })
    .await;
    (world, a, b, client)
}

/// What the monolith holds after [`reshaped_while_the_service_changes_by_index`]: its own
/// reshaping and the service's element changes, each on its own element.
fn reshaped() -> [Vec<(String, String)>; 3] {
    [
        // The refund on P1, not on P2 (element 1 by index); P0 not back, P3 kept.
        pairs(&[("P1", "refunded"), ("P2", "paid"), ("P3", "paid")]),
        // The refund on P1, not on P0.
        pairs(&[("P-new", "paid"), ("P0", "paid"), ("P1", "refunded"), ("P2", "paid")]),
        // S9 after P2, no hole, P0 not back.
        pairs(&[("P1", "paid"), ("P2", "paid"), ("S9", "paid")]),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn an_element_changed_by_index_is_written_back_to_its_own_element_whatever_the_array_became() {
    let (world, mut a, mut b, client) = reshaped_while_the_service_changes_by_index().await;
    let mut got = Vec::new();
    for i in 0..3 {
        got.push(sides(&client, &Workload::user_id(i)).await.monolith);
    }
    assert_eq!(got, reshaped(), "the monolith's purchases; ficus log:\n{}", a.logs());
    for i in 0..3 {
        gateways_stay(&client, &Workload::user_id(i)).await;
    }
    let dead: i64 = watermarks(&world.kafka.brokers(), DEAD_LETTERS).values().sum();
    assert_eq!(dead, 0, "write-backs dead-lettered; ficus log:\n{}", a.logs());
    signal(&b, libc::SIGCONT);
    assert!(a.terminate().success(), "{}", a.logs());
    assert!(b.terminate().success(), "{}", b.logs());
}

/// The same scenario once the forward consumer goes on: the monolith's own push and pull must
/// reach the document the service owns beside the service's element change, and stay in the
/// monolith (both sides hold every element change, `ficus verify` passes). The forward merge
/// into owned documents merges arrays by element id (`sink::merge`); compared whole, both sides
/// changed the array, the service's stood without the monolith's push and pull, and the
/// conflict repair then wrote it over the monolith's (seen: U0 back to P0, P1 refunded, P2; P3
/// gone).
#[tokio::test(flavor = "multi_thread")]
async fn both_sides_hold_every_element_change_after_the_monolith_reshaped_an_owned_array() {
    let (world, mut a, mut b, client) = reshaped_while_the_service_changes_by_index().await;
    signal(&b, libc::SIGCONT);
    let settled = poll_until(Duration::from_secs(120), || async {
        let mut all = true;
        for (i, want) in reshaped().iter().enumerate() {
            let s = sides(&client, &Workload::user_id(i as u64)).await;
            all &= s.monolith == *want && s.service == *want;
        }
        all
    })
    .await;
    for i in 0..3 {
        let s = sides(&client, &Workload::user_id(i)).await;
        assert!(settled, "customer {i}: monolith {:?}, service {:?}", s.monolith, s.service);
    }
    let dead: i64 = watermarks(&world.kafka.brokers(), DEAD_LETTERS).values().sum();
    assert_eq!(dead, 0, "write-backs dead-lettered");
    ok(&world.ficus(&["verify", "--checks", "counts,contents", "--service", "customers_db", "--settle", "2"], &[]));
    assert!(a.terminate().success(), "{}", a.logs());
    assert!(b.terminate().success(), "{}", b.logs());
}

/// `truncatedArrays`, both ways. Pipeline updates that shorten an array: keeping a prefix
/// (secantusd-rs reports it as `truncatedArrays` alone, MongoDB 5+ likewise, with index sets for
/// the elements left where they changed), and dropping the first element (reported as the
/// whole array here).
#[tokio::test(flavor = "multi_thread")]
async fn an_array_cut_on_either_side_reaches_the_other_with_exactly_the_elements_left() {
    let four = |i| vec![buy(i, "P0", "paid"), buy(i, "P1", "paid"), buy(i, "P2", "refunded"), buy(i, "P3", "paid")];
    let (world, mut f, client) = started(&[(0, four(0)), (1, four(1)), (2, four(2)), (3, four(3))]).await;
    let user = Workload::user_id;
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let service = client.database("customers_db").collection::<Document>("customers");
    let keep_two = |array: &str| vec![doc! { "$set": { array: { "$slice": [format!("${array}"), 2] } } }];
    let drop_first = |array: &str| vec![doc! { "$set": { array: { "$slice": [format!("${array}"), 1, 10] } } }];

    // The monolith owns everything: its cut reaches both service targets, the customer and its
    // purchase events, and derives no purchase event for the elements left.
    monolith.update_one(doc! { "user_id": user(0) }, keep_two("purchases")).await.unwrap();
    monolith.update_one(doc! { "user_id": user(1) }, drop_first("purchases")).await.unwrap();
    let want = |ids: &[(&str, &str)]| pairs(ids);
    let (cut0, cut1) =
        (want(&[("P0", "paid"), ("P1", "paid")]), want(&[("P1", "paid"), ("P2", "refunded"), ("P3", "paid")]));
    poll_until(Duration::from_secs(120), || async {
        let (a, b) = (sides(&client, &user(0)).await, sides(&client, &user(1)).await);
        a.service == cut0 && b.service == cut1 && a.events == ["P0", "P1"] && b.events == ["P1", "P2", "P3"]
    })
    .await;
    for (i, want) in [(0, &cut0), (1, &cut1)] {
        let s = sides(&client, &user(i)).await;
        assert_eq!((&s.monolith, &s.service), (want, want), "customer {i}");
        let ids: Vec<String> = want.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(s.events, ids, "customer {i}: its purchase events, without the cut ones");
    }
    let derived = read_all(&world.kafka.brokers(), &["linechatbot.customers"])
        .into_iter()
        .filter(|r| r.is_event() && r.event().event_type == "customer.purchase_recorded")
        .filter(|r| [user(0), user(1)].contains(&r.event().subject))
        .count();
    assert_eq!(derived, 8, "one purchase_recorded per purchase copied, none for the elements a cut left");

    // The service owns everything: its cuts reach the monolith with exactly the elements left
    // (no stale element stays, none is doubled), and, through the monolith, its purchase events.
    ok(&world.ficus(&["cutover", "--service", "customers_db", "--to", "100", "--force"], &[]));
    service.update_one(doc! { "_id": user(2) }, keep_two("purchaseHistory")).await.unwrap();
    service.update_one(doc! { "_id": user(3) }, drop_first("purchaseHistory")).await.unwrap();
    let (cut2, cut3) = (want(&[("P0", "paid"), ("P1", "paid")]), cut1.clone());
    poll_until(Duration::from_secs(120), || async {
        let (a, b) = (sides(&client, &user(2)).await, sides(&client, &user(3)).await);
        a.monolith == cut2 && b.monolith == cut3 && a.events == ["P0", "P1"] && b.events == ["P1", "P2", "P3"]
    })
    .await;
    for (i, want) in [(2, &cut2), (3, &cut3)] {
        let s = sides(&client, &user(i)).await;
        assert_eq!((&s.monolith, &s.service), (want, want), "customer {i}; ficus log:\n{}", f.logs());
        let ids: Vec<String> = want.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(s.events, ids, "customer {i}: its purchase events, without the cut ones");
        gateways_stay(&client, &user(i)).await;
    }
    let dead: i64 = watermarks(&world.kafka.brokers(), DEAD_LETTERS).values().sum();
    assert_eq!(dead, 0, "write-backs dead-lettered; ficus log:\n{}", f.logs());
    ok(&world.ficus(&["verify", "--checks", "counts,contents", "--service", "customers_db", "--settle", "2"], &[]));
    assert!(f.terminate().success(), "{}", f.logs());
}
