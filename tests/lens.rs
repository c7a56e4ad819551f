//! `ficus lens check` against a real monolith: the shipped reverses obey the lens laws on the
//! documents the monolith holds (read raw, `$` keys included), `--sample` limits the documents,
//! an unknown service is bad input, and a wrong `[reverse]` rule is caught with the failure
//! shown side by side.

mod common;

use bson::{Document, doc, oid::ObjectId};
use common::World;
use ficus::testkit::workload::Workload;

fn text(out: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The tally row of a service collection: documents, rejected, GetPut, PutGet, Insert, failed.
fn tally(stdout: &str, collection: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(collection))
        .map(|l| l.split_whitespace().skip(1).map(|n| n.parse().ok()).collect::<Option<Vec<u64>>>())
        .find_map(|numbers| numbers.filter(|n| n.len() == 6))
        .unwrap_or_default()
}

const BROKEN: &str = r#"topic = "linechatbot.products"
events = ["product.snapshot", "product.created", "product.updated", "product.deleted"]
collection = "items"
key = "itemId"

[maps.state_of]
active = "live"
discontinued = "gone"
out_of_stock = "gone"

[fields]
itemId = "sku"
state = "status | state_of"

# Wrong on purpose: every state goes back as `active`.
[reverse]
state = { set = "status", from = "'active'" }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn lens_check_proves_the_shipped_reverses_and_catches_a_wrong_rule() {
    let world = World::start();
    let client = world.mongo.client().await;
    let db = client.database("linechatbot");
    let mut w = Workload::new(5);
    for collection in Workload::COLLECTIONS {
        let docs: Vec<Document> = (0..6).filter_map(|i| w.document(collection, i, 3)).collect();
        db.collection::<Document>(collection).insert_many(docs).await.unwrap();
    }
    // Keys that look like Extended JSON inside a free-form sub-document: read raw, they stay keys.
    let hostile = doc! {
        "_id": ObjectId::new(), "user_id": "U-hostile", "state": "active", "lang": "th", "messages": [],
        "ai": { "session_id": "S-hostile", "tokens": 1 },
        "meta": { "$oid": "not an id", "$numberInt": "5", "a.b": { "$date": "soon" } },
    };
    db.collection::<Document>("conversations").insert_one(hostile).await.unwrap();

    let out = world.ficus(&["lens", "check"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for service in
        ["ai_sessions_db", "auth_db", "conversations_db", "customers_db", "metrics_db", "products_db", "research_db"]
    {
        assert!(stdout.contains(&format!("{service}: every law holds")), "{service}:\n{stdout}");
    }
    assert!(stdout.contains("products_db.products ← products (products.toml)"), "{stdout}");
    assert!(stdout.contains("read-only"), "{stdout}");
    let conversations = tally(&stdout, "conversations_db.conversations");
    assert_eq!(conversations.first(), Some(&7), "6 reference conversations and the hostile one: {stdout}");
    assert!(conversations.get(3).is_some_and(|&edits| edits > 50), "{stdout}");

    let out = world.ficus(&["lens", "check", "--service", "products_db", "--sample", "2"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(tally(&stdout, "products_db.products").first(), Some(&2), "{stdout}");
    assert!(!stdout.contains("customers_db"), "only the service asked for: {stdout}");

    let out = world.ficus(&["lens", "check", "--service", "nope"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("no service `nope`"), "{stderr}");

    let dir = world.dir.path().join("broken-transforms/broken_db");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("items.toml"), BROKEN).unwrap();
    let transforms = world.dir.path().join("broken-transforms");
    let out = world.ficus(&["lens", "check"], &[("FICUS_TRANSFORMS_DIR", transforms.to_str().unwrap())]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("broken_db: LAWS BROKEN"), "{stdout}");
    assert!(stdout.contains("PutGet broken_db.items ← products"), "{stdout}");
    assert!(stdout.contains("≠ state"), "{stdout}");
    assert!(stdout.contains("patch:") && stdout.contains("monolith:"), "{stdout}");
}
