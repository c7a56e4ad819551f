//! Pre-images on both sides of a write-back, against real servers: the consumer creates a
//! service database with them, a shadow replay keeps them on the collections it swaps in, so a
//! service delete after a later cutover still reaches the monolith; the cutover's preflight refuses a move while they are off on either side, naming
//! the collection.

mod common;

use std::time::Duration;

use bson::{Document, doc};
use common::{World, eventually, poll_until};
use ficus::testkit::workload::Workload;

const SERVICE: &str = "customers_db";
const CUSTOMERS: u64 = 30;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn ok(out: &std::process::Output) -> String {
    let t = text(out);
    assert!(out.status.success(), "exit {:?}:\n{t}", out.status.code());
    t
}

fn cutover(world: &World, to: u8) -> std::process::Output {
    world.ficus(&["cutover", "--service", SERVICE, "--to", &to.to_string(), "--timeout", "120"], &[])
}

/// A world with customers in the monolith and `ficus run` for customers_db caught up. With
/// `fresh`, the service database `topics apply` prepared is dropped first, so the consumer
/// creates it.
async fn setup(fresh: bool) -> (World, mongodb::Client, common::Ficus) {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    if fresh {
        client.database(SERVICE).drop().await.unwrap();
    }
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let mut w = Workload::new(11);
    for i in 0..CUSTOMERS {
        monolith.insert_one(w.customer(i)).await.unwrap();
    }
    let f = world.spawn_ficus(&["run", "--service", SERVICE], &[]);
    let service = client.database(SERVICE).collection::<Document>("customers");
    eventually("customers_db populated", Duration::from_secs(120), || async {
        service.count_documents(doc! {}).await.unwrap() == CUSTOMERS
    })
    .await;
    (world, client, f)
}

/// A collection's `changeStreamPreAndPostImages` option as the server lists it.
async fn pre_images(client: &mongodb::Client, db: &str, coll: &str) -> Option<bool> {
    use futures::TryStreamExt;
    let mut specs = client.database(db).list_collections().filter(doc! { "name": coll }).await.unwrap();
    let spec = specs.try_next().await.unwrap()?;
    Some(spec.options.change_stream_pre_and_post_images.is_some_and(|p| p.enabled))
}

async fn set_pre_images(client: &mongodb::Client, db: &str, coll: &str, enabled: bool) {
    client
        .database(db)
        .run_command(doc! { "collMod": coll, "changeStreamPreAndPostImages": { "enabled": enabled } })
        .await
        .unwrap();
    assert_eq!(pre_images(client, db, coll).await, Some(enabled), "{db}.{coll}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pre_images_kept_from_creation_through_a_shadow_replay_let_a_service_delete_reach_the_monolith() {
    let (world, client, mut f) = setup(true).await;
    assert_eq!(pre_images(&client, SERVICE, "customers").await, Some(true), "the consumer created it with them");
    // Rebuilt in a shadow and swapped in while `ficus run` keeps consuming.
    let out = ok(&world.ficus(&["replay", "--service", SERVICE], &[]));
    assert!(out.contains("rebuilt from"), "{out}");
    let out = ok(&cutover(&world, 100));
    assert!(out.contains("] observe done"), "{out}");

    // The service now owns every customer; its application deletes two of them at once.
    let service = client.database(SERVICE).collection::<Document>("customers");
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let gone = [Workload::user_id(3), Workload::user_id(17)];
    for key in &gone {
        assert_eq!(service.delete_one(doc! { "_id": key }).await.unwrap().deleted_count, 1, "{key}");
    }
    let reached = poll_until(Duration::from_secs(60), || async {
        monolith.count_documents(doc! { "user_id": { "$in": gone.to_vec() } }).await.unwrap() == 0
    })
    .await;
    let state = pre_images(&client, SERVICE, "customers").await;
    assert!(
        reached,
        "the service's deletes never reached the monolith (pre-images on {SERVICE}.customers after the replay: {state:?})\n{}",
        f.logs().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(state, Some(true));
    // And the rest of the service still verifies against the monolith.
    ok(&world.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"], &[]));
    assert!(f.terminate().success(), "{}", f.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_preflight_refuses_a_move_while_pre_images_are_off_on_either_side() {
    let (world, client, mut f) = setup(false).await;
    let ownership = client.database("ficus").collection::<Document>("ownership");
    let share = || async {
        let o = ownership.find_one(doc! { "_id": SERVICE }).await.unwrap();
        o.map(|o| (o.get_i32("percent").unwrap_or(0), o.get_document("fenced").is_ok()))
    };

    // Off on the service collection written back: refused at preflight, naming it.
    set_pre_images(&client, SERVICE, "customers", false).await;
    let out = cutover(&world, 50);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("preflight gate failed") && t.contains("pre-images are off on customers_db.customers"), "{t}");
    assert!(matches!(share().await, None | Some((0, false))), "nothing fenced or moved: {:?}", share().await);

    // Back on (by the remedy the message names), then off on the monolith collection the
    // write-backs land in: refused again, naming that one.
    ok(&world.ficus(&["topics", "apply"], &[]));
    assert_eq!(pre_images(&client, SERVICE, "customers").await, Some(true));
    set_pre_images(&client, "linechatbot", "customers", false).await;
    let out = cutover(&world, 50);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("preflight gate failed") && t.contains("pre-images are off on linechatbot.customers"), "{t}");
    assert!(!t.contains("pre-images are off on customers_db"), "only what is off is named: {t}");
    assert!(matches!(share().await, None | Some((0, false))), "nothing fenced or moved: {:?}", share().await);

    // With both on, the same command goes through.
    ok(&world.ficus(&["topics", "apply"], &[]));
    let out = ok(&cutover(&world, 50));
    assert!(out.contains("] observe done"), "{out}");
    assert_eq!(share().await, Some((50, false)));
    assert!(f.terminate().success(), "{}", f.logs());
}
