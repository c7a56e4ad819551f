//! `ficus verify`'s references and data quality checks against real servers (issue 22): an
//! orphan purchase the migration caused (broken), one the monolith has too (inherited), a null
//! reference (ignored by the reference, caught by a `required` rule), an orphan customer event
//! still within its grace (pending: inconclusive) that resolves once its customer arrives, a
//! malformed monolith document that still transforms (a quality rule with a tolerance), the
//! `--json` report's shape, and exit 3 when the service's server is gone.

mod common;

use std::path::Path;
use std::time::Duration;

use bson::{Document, doc};
use common::{World, eventually};
use ficus::testkit::workload::Workload;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The shipped definitions with this test's changes: the purchases' reference has no grace (an
/// orphan is broken at once), the tier rule tolerates a customer in seven or so, and the
/// events' reference waits an hour.
fn definitions(dir: &Path) -> std::path::PathBuf {
    let root = common::repo_root();
    let out = dir.join("transforms");
    for service in ["customers_db", "products_db"] {
        std::fs::create_dir_all(out.join(service)).unwrap();
        for f in std::fs::read_dir(root.join("transforms").join(service)).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "toml") {
                std::fs::copy(&f, out.join(service).join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    let customers = out.join("customers_db/customers.toml");
    let t = std::fs::read_to_string(&customers).unwrap();
    let t = t.replace(
        "to = \"products_db.products.productId\"\n",
        "to = \"products_db.products.productId\"\ngrace_secs = 0\n",
    );
    let t = t
        .replace("in = [\"basic\", \"premium\", \"vip\"]\n", "in = [\"basic\", \"premium\", \"vip\"]\nmostly = 0.85\n");
    std::fs::write(&customers, t).unwrap();
    // A long grace for the events' customers: the orphan below stays pending however slow the run.
    let events = out.join("customers_db/customer_events.toml");
    let t = std::fs::read_to_string(&events).unwrap();
    let t = t.replace("nulls = \"orphan\"\n", "nulls = \"orphan\"\ngrace_secs = 3600\n");
    std::fs::write(&events, t).unwrap();
    out
}

fn purchase(id: &str, sku: Option<&str>) -> Document {
    doc! {
        "id": id, "product_id": sku, "product_name": "P", "amount": "10.00", "currency": "THB",
        "date": bson::DateTime::now(), "status": "paid",
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn references_across_services_and_quality_rules_are_reported_as_declared() {
    let world = World::start();
    world.apply_topics();
    let target = common::Mongo::start(&world.dir.path().join("target"), &[]);
    let client = world.mongo.client().await;
    let transforms = definitions(world.dir.path());
    let config = world.dir.path().join("ficus.toml");
    let paths = format!("[paths]\ntopics = {:?}\ntransforms = {:?}\n", common::repo_root().join("topics"), transforms);
    std::fs::write(&config, paths).unwrap();
    let target_uri = format!("{}&serverSelectionTimeoutMS=3000", target.uri());
    let env = [("FICUS_CONFIG", config.to_str().unwrap()), ("FICUS_TARGET_URI", target_uri.as_str())];

    let monolith = client.database("linechatbot");
    let mut w = Workload::new(22);
    for i in 1..=3 {
        monolith.collection::<Document>("products").insert_one(w.product(i)).await.unwrap();
    }
    // Ten customers: C0 buys SKU-000001 (fine), C1 SKU-000002 (its product will vanish from
    // products_db: broken), C2 SKU-000999 (no such product in the monolith either: inherited),
    // C3 a purchase without a product (a null reference: ignored; `required` catches it),
    // C4 is "gold" (the monolith's code wrote a tier the service does not know).
    let customers = monolith.collection::<Document>("customers");
    for i in 0..10u64 {
        let mut c = w.customer(i);
        c.insert("tier", if i == 4 { "gold" } else { "basic" });
        let purchases = match i {
            0 => vec![purchase("P-0", Some("SKU-000001"))],
            1 => vec![purchase("P-1", Some("SKU-000002"))],
            2 => vec![purchase("P-2", Some("SKU-000999"))],
            3 => vec![purchase("P-3", None)],
            _ => vec![],
        };
        c.insert("purchases", purchases);
        customers.insert_one(c).await.unwrap();
    }
    let mut f = world.spawn_ficus(&["run", "--service", "customers_db", "--service", "products_db"], &env);
    let service = target.client().await;
    eventually("both services populated", Duration::from_secs(120), || async {
        service.database("customers_db").collection::<Document>("customers").count_documents(doc! {}).await.unwrap()
            == 10
            && service
                .database("products_db")
                .collection::<Document>("products")
                .count_documents(doc! {})
                .await
                .unwrap()
                == 3
            && service
                .database("customers_db")
                .collection::<Document>("customer_events")
                .count_documents(doc! {})
                .await
                .unwrap()
                == 4
    })
    .await;
    // Breakage only the services see: a product gone from products_db, a customer gone from
    // customers_db (its events now name nobody).
    service
        .database("products_db")
        .collection::<Document>("products")
        .delete_one(doc! { "productId": "SKU-000002" })
        .await
        .unwrap();
    let c0 = service
        .database("customers_db")
        .collection::<Document>("customers")
        .find_one_and_delete(doc! { "lineUserId": Workload::user_id(0) })
        .await
        .unwrap()
        .unwrap();

    let verify = |checks: &str| {
        let out =
            world.ficus(&["verify", "--service", "customers_db", "--checks", checks, "--json", "--settle", "1"], &env);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
        (out.status.code(), v)
    };
    let (code, v) = verify("references,quality");
    assert_eq!(code, Some(1), "a broken reference and a failing rule: {v:#}");
    let refs = v["references"].as_array().unwrap();
    let purchases = refs.iter().find(|r| r["name"].as_str().unwrap().contains("purchaseHistory[].productId")).unwrap();
    assert_eq!(
        (purchases["checked"].as_u64(), purchases["broken"].as_u64(), purchases["inherited"].as_u64()),
        (Some(2), Some(1), Some(1)),
        "{purchases:#}"
    );
    let offender = &purchases["offenders"][0];
    assert_eq!(offender["value"], "SKU-000002", "{offender:#}");
    let events = refs.iter().find(|r| r["name"].as_str().unwrap().contains("customer_events.lineUserId")).unwrap();
    assert_eq!(
        (events["pending"].as_u64(), events["broken"].as_u64()),
        (Some(1), Some(0)),
        "within its grace: pending {events:#}"
    );
    let rules = v["quality"].as_array().unwrap();
    let rule = |name: &str| rules.iter().find(|r| r["rule"].as_str().unwrap().contains(name)).unwrap().clone();
    let tier = rule("segmentation.tier in");
    assert_eq!((tier["failed"].as_u64(), tier["pass"].as_bool()), (Some(1), Some(true)), "1 in 9, tolerated: {tier:#}");
    assert_eq!(tier["offenders"][0]["value"], "gold");
    assert!(
        tier["offenders"][0]["source"]["collection"] == "customers",
        "the monolith document it came from: {tier:#}"
    );
    let required = rule("purchaseHistory[].productId required");
    assert_eq!((required["failed"].as_u64(), required["pass"].as_bool()), (Some(1), Some(false)), "{required:#}");
    for check in ["references", "quality"] {
        assert!(v["checks"][check]["score"].as_f64().is_some() && v["checks"][check]["pass"].is_boolean(), "{v:#}");
    }
    assert!(v["overall"].as_f64().is_some() && v["result"] == "fail", "{v:#}");

    // Fixed: the product is back in products_db, and the customer whose purchase had no product
    // is deleted in the monolith (its events go with it). What is left is the event of the
    // customer still on its way: inconclusive.
    service
        .database("products_db")
        .collection::<Document>("products")
        .insert_one(doc! { "productId": "SKU-000002", "name": "back" })
        .await
        .unwrap();
    customers.delete_one(doc! { "user_id": Workload::user_id(3) }).await.unwrap();
    let events = service.database("customers_db").collection::<Document>("customer_events");
    eventually("C3's event gone from customers_db", Duration::from_secs(60), || async {
        events.count_documents(doc! {}).await.unwrap() == 3
    })
    .await;
    let mut last = serde_json::Value::Null;
    let settled = common::poll_until(Duration::from_secs(60), || {
        let (code, v) = verify("references,quality");
        last = v;
        async move { code == Some(3) }
    })
    .await;
    assert!(settled, "only a pending orphan left: inconclusive (3): {last:#}");
    assert_eq!(last["result"], "inconclusive");
    // Its customer arrives: the orphan resolves, everything passes.
    service.database("customers_db").collection::<Document>("customers").insert_one(c0).await.unwrap();
    let (code, v) = verify("references,quality");
    assert_eq!(code, Some(0), "{v:#}");
    // Every check, the expectation in memory and spilled into the store after three entries:
    // the same verdict and tallies.
    let mut reports = Vec::new();
    for memory in ["200000", "3"] {
        let args = ["verify", "--service", "customers_db", "--json", "--settle", "1", "--memory-entries", memory];
        let out = world.ficus(&args, &env);
        assert_eq!(out.status.code(), Some(0), "--memory-entries {memory}: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        reports.push((v["collections"].clone(), v["checks"].clone()));
    }
    assert_eq!(reports[0], reports[1]);
    assert_eq!(reports[0].0["customers"]["matched"], 9, "{:#}", reports[0].0);

    // The service's server gone: nothing proved either way (3), not a failure.
    let mut target = target;
    target.kill();
    let out = world.ficus(&["verify", "--service", "customers_db", "--json", "--settle", "1"], &env);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(v["result"], "inconclusive", "{}", text(&out));
    let _ = f.terminate();

    // The rules as MongoDB validators, for teams that want the database to enforce them.
    let out = world.ficus(&["schema", "emit", "--service", "customers_db"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let cmds: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let customers = cmds.iter().find(|c| c["collMod"] == "customers").unwrap_or_else(|| panic!("{}", text(&out)));
    let schema = &customers["validator"]["$jsonSchema"];
    assert_eq!(schema["required"], serde_json::json!(["lineUserId"]), "{schema}");
    assert_eq!(schema["properties"]["purchaseHistory"]["items"]["required"], serde_json::json!(["productId"]));
    assert!(schema["properties"]["segmentation"]["properties"]["tier"].get("enum").is_none(), "mostly 0.85: left out");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the validator"), "{}", text(&out));
}
