//! `ficus verify` compares what the transforms write, against real servers: fields a service
//! keeps on its own are listed as service-only fields, never drift, and never hold the safe move
//! back to 0%.

mod common;

use std::time::Duration;

use bson::{Document, doc};
use common::{World, eventually};
use ficus::cutover::route;
use ficus::testkit::workload::Workload;

const SERVICE: &str = "customers_db";
const CUSTOMERS: u64 = 40;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn ok(out: &std::process::Output) -> String {
    let t = text(out);
    assert!(out.status.success(), "exit {:?}:\n{t}", out.status.code());
    t
}

fn cutover(world: &World, to: u8) -> String {
    ok(&world.ficus(&["cutover", "--service", SERVICE, "--to", &to.to_string(), "--timeout", "120"], &[]))
}

async fn percent(client: &mongodb::Client) -> Option<i32> {
    let ownership = client.database("ficus").collection::<Document>("ownership");
    ownership.find_one(doc! { "_id": SERVICE }).await.unwrap().and_then(|o| o.get_i32("percent").ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn fields_the_service_keeps_on_its_own_neither_fail_verify_nor_hold_the_move_back() {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let mut w = Workload::new(5);
    for i in 0..CUSTOMERS {
        monolith.insert_one(w.customer(i)).await.unwrap();
    }
    let mut f = world.spawn_ficus(&["run", "--service", SERVICE], &[]);
    let service = client.database(SERVICE).collection::<Document>("customers");
    eventually("customers_db populated", Duration::from_secs(120), || async {
        service.count_documents(doc! {}).await.unwrap() == CUSTOMERS
    })
    .await;
    cutover(&world, 50);
    assert_eq!(percent(&client).await, Some(50));

    // The service's application gives the customers it owns fields no transform writes, at the
    // top and inside `profile`, at once (it does not wait for ficus to settle after the move).
    let owned: Vec<String> =
        (0..CUSTOMERS).map(Workload::user_id).filter(|k| route::owns(50, route::bucket(k))).collect();
    assert!(owned.len() > 5, "a fair share of the customers moved ({})", owned.len());
    for key in &owned {
        let set = doc! { "$set": { "nickname": format!("nick {key}"), "profile.nickname": "pal" } };
        let r = service.update_one(doc! { "_id": key }, set).await.unwrap();
        assert_eq!(r.matched_count, 1, "{key}");
    }

    // They are the service's own: verify passes and names them with their counts.
    let out = world.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"], &[]);
    let report = text(&out);
    assert!(out.status.success(), "verify with service-only fields:\n{report}");
    let n = owned.len();
    let listed = format!("{SERVICE}.customers: nickname in {n} documents, profile.nickname in {n} documents");
    assert!(report.contains("service-only fields") && report.contains(&listed), "expected `{listed}`:\n{report}");
    assert!(report.contains("consistency 100.00%"), "{report}");

    // The safe move back to 0% verifies the moving buckets (where every one of those customers
    // is) and completes.
    let out = cutover(&world, 0);
    for step in ["preflight", "drain", "verify", "flip", "observe"] {
        assert!(out.contains(&format!("] {step} done")), "step {step}:\n{out}");
    }
    assert_eq!(percent(&client).await, Some(0));
    // Nothing of the service's own was touched on the way.
    let kept =
        service.count_documents(doc! { "nickname": { "$exists": true }, "profile.nickname": "pal" }).await.unwrap();
    assert_eq!(kept, n as u64);
    ok(&world.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"], &[]));

    // A field the transforms do write still differs: the projection hides nothing of ficus's.
    // (With ficus stopped, so that no write-back or repair carries the change anywhere.)
    assert!(f.terminate().success(), "{}", f.logs());
    let key = &owned[0];
    service.update_one(doc! { "_id": key }, doc! { "$set": { "profile.language": "xx" } }).await.unwrap();
    let out = world.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "0"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(key.as_str()) && text(&out).contains(r#""language":"xx""#), "{}", text(&out));
}
