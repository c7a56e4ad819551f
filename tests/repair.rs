//! Conflict repairs against a real secantusd-rs: a repair never hides a change still on its way.
//!
//! When a service's write loses to the monolith's (the monolith owns the key), the service's
//! side is repaired with the monolith's document as it is now, versioned at the cluster time
//! read before it, like a snapshot copy: a monolith change older than that read, still on its
//! way to the service, is then skipped as held. So the repair must bring everything such a
//! change carried (here a counter the monolith's own code incremented), not only the field in
//! conflict; a repair that set only that field under the new version lost the counter for
//! good on the service, and (once the service owned the key) a later merge let the service's
//! stale counter win over the monolith's and wrote it back there: an increment lost on both
//! sides, as the ownership chaos test saw in CI.

mod common;

use std::time::Duration;

use bson::{Bson, Document, Timestamp, doc};
use ficus::config::topics::Topics;
use ficus::consume::Repairs;
use ficus::event::Op;
use ficus::event::mapping::{ChangeRecord, map_change};
use ficus::sink::conflicts::{ConflictRecord, Outbox, SideState};
use ficus::sink::merge::FieldConflict;
use ficus::sink::{MongoSink, MonolithSink, Sink, Versioned};
use ficus::testkit::workload::Workload;
use ficus::transform::ServiceTransforms;

const SERVICE: &str = "customers_db";

/// A monolith change as the tail reads it, at cluster time `time`.
fn change(op: Op, id: &Bson, before: Option<&Document>, after: &Document, time: u32) -> ChangeRecord {
    ChangeRecord {
        op,
        collection: "customers".into(),
        document_id: id.clone(),
        changed: None,
        after: Some(after.clone()),
        before: before.cloned(),
        removed: vec![],
        truncated: Vec::new(),
        cluster_time: Timestamp { time, increment: 1 },
        index: 1,
        wall_time: None,
        resume_token: Some(format!("T{time}")),
        txn: None,
        origin: None,
    }
}

/// The service's writes for one monolith change, as its forward consumer applies them.
fn forward(topics: &Topics, service: &ServiceTransforms, record: ChangeRecord) -> Vec<Versioned> {
    let def = topics.for_collection("customers").unwrap();
    map_change(def, "linechatbot", record)
        .events
        .into_iter()
        .map(|ev| {
            let ops = service.apply(&ev).unwrap();
            Versioned::of(&ficus::event::Message::Event(ev), ops)
        })
        .collect()
}

fn messages(d: &Document) -> i64 {
    let a = d.get_document("analytics").unwrap();
    a.get_i32("totalMessages").map(i64::from).or_else(|_| a.get_i64("totalMessages")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repair_of_the_service_side_keeps_a_monolith_change_still_on_its_way() {
    let dir = tempfile::tempdir().unwrap();
    let mongo = common::Mongo::start(dir.path(), &[]);
    let client = mongo.client().await;
    let root = common::repo_root();
    let topics = std::sync::Arc::new(ficus::config::topics::load(&root.join("topics")).unwrap());
    let service = ficus::transform::load_all(&root.join("transforms"), &topics)
        .unwrap()
        .into_iter()
        .find(|s| s.service() == SERVICE)
        .map(std::sync::Arc::new)
        .unwrap();
    let (collections, written_back) = (service.collections(), service.written_back());
    let sink = MongoSink::open(client.clone(), SERVICE, &collections, &written_back, Duration::from_secs(86_400))
        .await
        .unwrap();

    // The customer, created in the monolith and applied to the service.
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let user = Workload::user_id(0);
    monolith.insert_one(Workload::new(7).customer(0)).await.unwrap();
    let created = monolith.find_one(doc! { "user_id": &user }).await.unwrap().unwrap();
    let id = created.get("_id").cloned().unwrap();
    sink.apply(&forward(&topics, &service, change(Op::Insert, &id, None, &created, 1000)), None).await.unwrap();

    // The monolith's own code counts a message; its change is still on its way to the service
    // (committed long before the repair reads the monolith below).
    monolith.update_one(doc! { "_id": &id }, doc! { "$inc": { "stats.msgs": 1 } }).await.unwrap();
    let counted = monolith.find_one(doc! { "_id": &id }).await.unwrap().unwrap();
    let on_its_way = forward(&topics, &service, change(Op::Replace, &id, Some(&created), &counted, 1001));

    // Meanwhile the service (not the owner) renamed the customer, and the monolith renamed it
    // too: the write-back recorded the conflict the monolith won.
    let customers = client.database(SERVICE).collection::<Document>("customers");
    customers.update_one(doc! { "_id": &user }, doc! { "$set": { "displayName": "by the service" } }).await.unwrap();
    monolith.update_one(doc! { "_id": &id }, doc! { "$set": { "name": "by the monolith" } }).await.unwrap();
    let record = ConflictRecord {
        service: SERVICE.into(),
        side: ficus::cutover::Side::Service,
        collection: "customers".into(),
        id: id.clone(),
        event: "service-rename".into(),
        fields: vec![FieldConflict {
            path: "displayName".into(),
            owner: Some(Bson::String("by the monolith".into())),
            other: Some(Bson::String("by the service".into())),
            base: None,
            element: None,
        }],
        owner: SideState { version: None, document: monolith.find_one(doc! { "_id": &id }).await.unwrap() },
        other: SideState {
            version: Some("service".into()),
            document: customers.find_one(doc! { "_id": &user }).await.unwrap(),
        },
        reason: None,
        why: Some(ficus::transform::Why::NonOwner),
    };
    let outbox = Outbox::new(&client.database("linechatbot"));
    let mut s = client.start_session().await.unwrap();
    outbox.record(&mut s, &record).await.unwrap();
    let pending = outbox.pending(SERVICE, 10).await.unwrap();
    assert_eq!(pending.len(), 1);

    let repairs = Repairs {
        transforms: service.clone(),
        topics: topics.clone(),
        source_name: "linechatbot".into(),
        monolith: MonolithSink::new(client.clone(), "linechatbot", service.clone()),
        service: sink.clone(),
    };
    let done = repairs.repair(&pending[0]).await.unwrap();
    assert!(done.is_some(), "a conflict with fields asks for a repair");

    // The change on its way arrives after the repair.
    sink.apply(&on_its_way, None).await.unwrap();

    let theirs = monolith.find_one(doc! { "_id": &id }).await.unwrap().unwrap();
    let ours = customers.find_one(doc! { "_id": &user }).await.unwrap().unwrap();
    assert_eq!(ours.get_str("displayName").unwrap(), "by the monolith", "the owner's value stands: {ours}");
    let want = i64::from(theirs.get_document("stats").unwrap().get_i32("msgs").unwrap());
    assert_eq!(messages(&ours), want, "the count the monolith made is on the service: {ours}");
}
