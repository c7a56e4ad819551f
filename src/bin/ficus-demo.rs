//! `ficus-demo`: the helper behind `deploy/demo.sh`. Seeds a sample monolith in the reference
//! shapes, keeps writing to it, and shows what arrived where (topics, service databases).
//! Not part of the product; the daemon is `ficus`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use bson::{Document, doc};
use clap::{Parser, Subcommand};
use ficus::bus::{ReadFrom, Reader};
use ficus::event::{CanonicalEvent, Message};
use ficus::testkit::workload::Workload;

#[derive(Parser)]
#[command(name = "ficus-demo", about = "Seed a sample monolith and show what ficus delivered.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Insert reference documents into the monolith.
    Seed {
        #[arg(long, env = "FICUS_SOURCE_URI")]
        uri: String,
        #[arg(long, env = "FICUS_SOURCE_DB", default_value = "linechatbot")]
        db: String,
        /// Documents per collection.
        #[arg(long, default_value_t = 50)]
        count: u64,
    },
    /// Make live changes (updates, pushes, deletes) for a while.
    Churn {
        #[arg(long, env = "FICUS_SOURCE_URI")]
        uri: String,
        #[arg(long, env = "FICUS_SOURCE_DB", default_value = "linechatbot")]
        db: String,
        #[arg(long, default_value_t = 20)]
        changes: u64,
    },
    /// Count the documents in every service database.
    Targets {
        #[arg(long, env = "FICUS_TARGET_URI")]
        uri: String,
        #[arg(long, default_value = "transforms")]
        transforms_dir: std::path::PathBuf,
    },
    /// An anomaly for a rollout's analysis: a customers_db customer the service owns at
    /// `share` gets a value the reverse cannot map (a dead letter on `customers_db.changes.dlq`).
    Spoil {
        #[arg(long, env = "FICUS_TARGET_URI")]
        uri: String,
        /// The service's share now: the customer spoiled is one of its keys.
        #[arg(long, default_value_t = 100)]
        share: u8,
        /// Put the spoiled values right again (the monolith's, as decimals).
        #[arg(long)]
        repair: bool,
        #[arg(long, env = "FICUS_SOURCE_URI")]
        source: String,
    },
    /// Count what is on each ficus topic and show one event.
    Peek {
        #[arg(long, env = "FICUS_KAFKA_BROKERS")]
        brokers: String,
        #[arg(long, default_value = "topics")]
        topics_dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Seed { uri, db, count } => seed(&uri, &db, count).await,
        Cmd::Churn { uri, db, changes } => churn(&uri, &db, changes).await,
        Cmd::Peek { brokers, topics_dir } => peek(&brokers, &topics_dir).await,
        Cmd::Targets { uri, transforms_dir } => targets(&uri, &transforms_dir).await,
        Cmd::Spoil { uri, share, repair: false, .. } => spoil(&uri, share).await,
        Cmd::Spoil { uri, source, repair: true, .. } => repair(&uri, &source).await,
    }
}

async fn repair(uri: &str, source: &str) -> anyhow::Result<()> {
    let service =
        mongodb::Client::with_uri_str(uri).await?.database("customers_db").collection::<Document>("customers");
    let monolith =
        mongodb::Client::with_uri_str(source).await?.database("linechatbot").collection::<Document>("customers");
    let mut spoiled = service.find(doc! { "segmentation.lifetimeValue": { "$type": "string" } }).await?;
    while spoiled.advance().await? {
        let d = spoiled.deserialize_current()?;
        let Ok(key) = d.get_str("_id") else { continue };
        let Some(m) = monolith.find_one(doc! { "user_id": key }).await? else { continue };
        let ltv: bson::Decimal128 = m.get_str("ltv").unwrap_or("0").parse().context("the monolith's ltv")?;
        service.update_one(doc! { "_id": key }, doc! { "$set": { "segmentation.lifetimeValue": ltv } }).await?;
        println!("customers_db.customers {key}: segmentation.lifetimeValue put right");
    }
    Ok(())
}

async fn spoil(uri: &str, share: u8) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let customers = client.database("customers_db").collection::<Document>("customers");
    let mut cursor = customers.find(doc! {}).projection(doc! { "_id": 1 }).await?;
    while cursor.advance().await? {
        let id = cursor.deserialize_current()?;
        let Ok(key) = id.get_str("_id") else { continue };
        if ficus::cutover::route::owns(share, ficus::cutover::route::bucket(key)) {
            customers
                .update_one(doc! { "_id": key }, doc! { "$set": { "segmentation.lifetimeValue": "lots" } })
                .await?;
            println!(
                "customers_db.customers {key}: segmentation.lifetimeValue = \"lots\" (no decimal: the reverse cannot map it)"
            );
            return Ok(());
        }
    }
    anyhow::bail!("no customer of customers_db is the service's at {share}%")
}

async fn seed(uri: &str, db: &str, count: u64) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let db = client.database(db);
    let mut w = Workload::new(42);
    for coll in Workload::COLLECTIONS {
        let docs: Vec<Document> = (0..count).filter_map(|i| w.document(coll, i, 8)).collect();
        db.collection::<Document>(coll).insert_many(docs).await.with_context(|| format!("seeding {coll}"))?;
        println!("seeded {count:>5} {}.{coll}", db.name());
    }
    Ok(())
}

async fn churn(uri: &str, db: &str, changes: u64) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let db = client.database(db);
    let mut w = Workload::new(7);
    let customers = db.collection::<Document>("customers");
    let conversations = db.collection::<Document>("conversations");
    let products = db.collection::<Document>("products");
    for i in 0..changes {
        let user = Workload::user_id(i % 10);
        let purchase = doc! { "id": format!("P-live-{i}"), "product_id": Workload::sku(i % 5), "product_name": "Vitamin blend",
        "amount": "199.00", "currency": "THB", "date": bson::DateTime::now(), "status": "paid" };
        customers
            .update_one(doc! { "user_id": &user }, doc! { "$push": { "purchases": purchase }, "$inc": { "stats.msgs": 1 }, "$set": { "updated_at": bson::DateTime::now() } })
            .await?;
        if let Some(c) = conversations.find_one(doc! {}).skip(i % 10).await? {
            conversations
                .update_one(doc! { "_id": c.get("_id") }, doc! { "$push": { "messages": w.message(100 + i) } })
                .await?;
        }
        products
            .update_one(
                doc! { "sku": Workload::sku(i % 7) },
                doc! { "$set": { "category": "devices" }, "$inc": { "views": 1 } },
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    products.delete_one(doc! { "sku": Workload::sku(3) }).await?;
    // A customer replaced as a whole (new purchases, the old ones gone), a purchase pulled, and a
    // customer with purchases deleted: their purchase events follow (customer_events mirrors).
    let mut replaced = w.customer(11);
    replaced.remove("_id");
    replaced.insert(
        "purchases",
        vec![doc! { "id": "P-replaced", "product_id": Workload::sku(1), "product_name": "Collagen",
        "amount": "350.00", "currency": "THB", "date": bson::DateTime::now(), "status": "paid" }],
    );
    customers.replace_one(doc! { "user_id": Workload::user_id(11) }, replaced).await?;
    customers
        .update_one(doc! { "user_id": Workload::user_id(1) }, doc! { "$pull": { "purchases": { "id": "P-live-1" } } })
        .await?;
    customers.delete_one(doc! { "user_id": Workload::user_id(12) }).await?;
    println!("made {} changes (pushes, increments, category moves, a replace, a pull, deletes)", changes * 3 + 4);
    Ok(())
}

async fn peek(brokers: &str, topics_dir: &std::path::Path) -> anyhow::Result<()> {
    let topics = ficus::config::topics::load(topics_dir).map_err(|r| anyhow::anyhow!("{r}"))?;
    let env = |k: &str| (k == "FICUS_KAFKA_BROKERS").then(|| brokers.to_string());
    let (config, report) = ficus::config::Config::from_text("", std::path::Path::new("(demo)"), &env);
    anyhow::ensure!(report.is_empty(), "{report}");
    let reader = Reader::new(&config.kafka, "ficus-demo-peek", None)?;
    let names: Vec<String> = topics.defs.iter().map(|d| d.topic.clone()).collect();
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut sample: Option<CanonicalEvent> = None;
    let never = tokio_util::sync::CancellationToken::new();
    reader
        .read_to_end(
            &names,
            |_, _| ReadFrom::Beginning,
            1000,
            false,
            &never,
            async |batch| {
                for d in batch {
                    let m = Message::decode(&d.payload)?;
                    *counts.entry(d.topic.clone()).or_default().entry(m.event_type().to_string()).or_default() += 1;
                    if let Message::Event(ev) = m
                        && ev.event_type == "customer.purchase_recorded"
                    {
                        sample = Some(ev);
                    }
                }
                Ok::<(), anyhow::Error>(())
            },
        )
        .await?;
    println!("\n{:<32} {:<34} {:>7}", "topic", "event type", "events");
    for (topic, types) in &counts {
        for (t, n) in types {
            println!("{topic:<32} {t:<34} {n:>7}");
        }
    }
    if let Some(ev) = sample {
        let mut json = ev.to_json();
        for big in ["after", "before", "changed"] {
            if json["data"][big].is_object() {
                json["data"][big] = serde_json::Value::String("(elided here)".into());
            }
        }
        println!("\none event, as kcat would show it:\n{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}

async fn targets(uri: &str, transforms_dir: &std::path::Path) -> anyhow::Result<()> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let mut services: Vec<_> =
        std::fs::read_dir(transforms_dir)?.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).collect();
    services.sort_by_key(|e| e.file_name());
    println!("\n{:<44} {:>9}", "service database.collection", "documents");
    for service in services {
        let name = service.file_name().to_string_lossy().into_owned();
        let db = client.database(&name);
        let mut colls = db.list_collection_names().await?;
        colls.sort();
        for c in colls.iter().filter(|c| !c.starts_with("_ficus")) {
            let n = db.collection::<Document>(c).estimated_document_count().await?;
            println!("{:<44} {n:>9}", format!("{name}.{c}"));
        }
    }
    Ok(())
}
