//! The fault suite: faults injected while a generated, seeded workload runs against the
//! monolith, then proof that nothing was lost or corrupted.
//!
//! Every scenario runs in its own [`World`] and ends the same way: the source and the service
//! databases are compared field by field (independently of ficus's own code), `ficus verify`
//! must exit 0 for every service involved, and each write the workload made is traced to the
//! event that carried it on Kafka and to the version the target holds. One line per scenario:
//!
//! ```text
//! fault sigkill-streaming: written 1200, delivered 1260, applied 1200, lost 0, duplicated-absorbed 60 (...)
//! ```
//!
//! - **written**: writes the workload made to the monolith (seeded documents included);
//! - **delivered**: records on Kafka carrying document events (duplicates included);
//! - **applied**: writes whose event the target holds, or a newer version of the same document
//!   (the version guards' definition of "applied": nothing older can land over it);
//! - **lost**: writes not applied, plus documents that differ between source and target, plus
//!   events missing from the archive where the archive runs. Must be 0;
//! - **duplicated-absorbed**: records on Kafka repeating an event id (re-published after a
//!   crash or a broker failure) that the version guards absorbed.
//!
//! Short variants run by default (the whole file in a few minutes on two cores). Set
//! `FICUS_FAULTS_LONG=1` for the long variants (20+ SIGKILL cycles, longer outages, more
//! writes). Each scenario prints its RNG seed; `FICUS_FAULTS_SEED=<n>` reruns with that seed.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use common::proxy::Proxy;
use common::{Ficus, World, checkpoint, free_port};
use ficus::event::{CanonicalEvent, Op};
use ficus::workload::Workload;
use futures::TryStreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

const PRODUCTS: &str = "linechatbot.products";
const CUSTOMERS: &str = "linechatbot.customers";
const SERVICES: [&str; 2] = ["products_db", "customers_db"];

// ---------------------------------------------------------------------------------------------
// Knobs
// ---------------------------------------------------------------------------------------------

/// `FICUS_FAULTS_LONG=1`: the long variants.
fn long() -> bool {
    std::env::var("FICUS_FAULTS_LONG").is_ok_and(|v| v == "1" || v == "true")
}

/// The scenario's seed: `FICUS_FAULTS_SEED` if set, else fixed per scenario (reproducible CI).
fn seed_for(name: &str) -> u64 {
    let seed = std::env::var("FICUS_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    });
    println!("fault {name}: seed {seed} (rerun with FICUS_FAULTS_SEED={seed}){}", if long() { ", long" } else { "" });
    seed
}

/// A ficus.toml for fault runs: a short tail lease and consumer session, so a SIGKILLed
/// process's successor takes over in seconds rather than the production defaults' 15-30 s.
fn fault_config(dir: &Path, name: &str, tail: &str, rest: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[tail]\nlease_ttl_ms = 2000\n{tail}\n\n[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\n{rest}\n"
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const TAIL: &[&str] = &["run", "--roles", "tail"];
const CONSUME: &[&str] = &[
    "run",
    "--roles",
    "consume,archive",
    "--service",
    "products_db",
    "--service",
    "customers_db",
    "--batch-max",
    "100",
];
const ALL: &[&str] = &["run", "--service", "products_db", "--service", "customers_db", "--batch-max", "100"];

/// Environment overrides for every ficus process of a scenario.
#[derive(Clone, Default)]
struct Env(Vec<(String, String)>);

impl Env {
    fn with(mut self, k: &str, v: impl Into<String>) -> Self {
        self.0.retain(|(x, _)| x != k);
        self.0.push((k.to_string(), v.into()));
        self
    }

    fn pairs(&self) -> Vec<(&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
}

fn spawn(world: &World, args: &[&str], env: &Env) -> Ficus {
    world.spawn_ficus(args, &env.pairs())
}

/// Runs a ficus command to completion (off the runtime's workers: the workload keeps going).
fn run_ficus(world: &World, args: &[&str], env: &Env) -> std::process::Output {
    tokio::task::block_in_place(|| world.ficus(args, &env.pairs()))
}

/// SIGTERM, expecting a clean exit (0) within the harness's minute.
fn stop_cleanly(f: &mut Ficus, what: &str) {
    let status = tokio::task::block_in_place(|| f.terminate());
    assert!(status.success(), "{what} should stop cleanly after the faults ({status:?}):\n{}", tail_of(&f.logs(), 40));
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The last `n` lines of a log, for failure messages.
fn tail_of(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Warnings and errors from every ficus log of the world, for failure messages.
fn ficus_problems(world: &World) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(world.dir.path()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("ficus-") && name.ends_with(".log") {
            let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let bad: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
            if !bad.is_empty() {
                out.push_str(&format!("--- {name}\n{}\n", tail_of(&bad.join("\n"), 15)));
            }
        }
    }
    out
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

async fn streaming(store: &mongodb::Client) -> bool {
    checkpoint(store, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok())
}

async fn mongo_client(uri: &str) -> mongodb::Client {
    mongodb::Client::with_uri_str(uri).await.unwrap()
}

/// A URI with a short server selection timeout, for clients that must notice outages quickly.
fn impatient(uri: &str) -> String {
    format!("{uri}&serverSelectionTimeoutMS=2000&connectTimeoutMS=2000")
}

// ---------------------------------------------------------------------------------------------
// The workload: seeded writes to the monolith, each one traceable
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Inserted before ficus's snapshot.
    Seed,
    Insert,
    Update,
    Delete,
}

/// One write to the monolith. Every insert and update sets the document's marker field
/// (`views` for products, `stats.msgs` for customers) to a value unique in the run, so the
/// write can be found on Kafka and in the target.
#[derive(Debug, Clone)]
struct Write {
    topic: &'static str,
    key: String,
    marker: i64,
    kind: Kind,
}

fn marker_field(topic: &str) -> &'static str {
    if topic == PRODUCTS { "views" } else { "stats.msgs" }
}

/// Writes the reference workload's products and customers: inserts, updates (the marker,
/// category moves, purchases that raise derived events) and deletes, chosen by a seeded RNG.
/// Each write is retried until the monolith takes it, idempotently (inserts carry their `_id`,
/// updates set values, a purchase is pushed only if absent), so outages of the monolith itself
/// do not change what was written.
struct Driver {
    db: mongodb::Database,
    rng: StdRng,
    docs: Workload,
    marker: i64,
    products: Vec<u64>,
    customers: Vec<u64>,
    next_product: u64,
    next_customer: u64,
    log: Vec<Write>,
}

impl Driver {
    fn new(client: &mongodb::Client, seed: u64) -> Driver {
        Driver {
            db: client.database("linechatbot"),
            rng: StdRng::seed_from_u64(seed),
            docs: Workload::new(seed),
            marker: 0,
            products: Vec::new(),
            customers: Vec::new(),
            next_product: 0,
            next_customer: 0,
            log: Vec::new(),
        }
    }

    fn next_marker(&mut self) -> i64 {
        self.marker += 1;
        self.marker
    }

    fn product(&mut self) -> (String, Document, i64) {
        let i = self.next_product;
        self.next_product += 1;
        self.products.push(i);
        let m = self.next_marker();
        let mut d = self.docs.product(i);
        d.insert("views", m);
        (Workload::sku(i), d, m)
    }

    fn customer(&mut self) -> (String, Document, i64) {
        let i = self.next_customer;
        self.next_customer += 1;
        self.customers.push(i);
        let m = self.next_marker();
        let mut d = self.docs.customer(i);
        d.get_document_mut("stats").unwrap().insert("msgs", m);
        (Workload::user_id(i), d, m)
    }

    /// Inserts documents before ficus starts (they reach Kafka as snapshot copies).
    async fn seed(&mut self, products: usize, customers: usize) {
        for (topic, n) in [(PRODUCTS, products), (CUSTOMERS, customers)] {
            let mut docs = Vec::new();
            for _ in 0..n {
                let (key, d, m) = if topic == PRODUCTS { self.product() } else { self.customer() };
                self.log.push(Write { topic, key, marker: m, kind: Kind::Seed });
                docs.push(d);
            }
            let coll = self.db.collection::<Document>(if topic == PRODUCTS { "products" } else { "customers" });
            for chunk in docs.chunks(500) {
                coll.insert_many(chunk.to_vec()).await.unwrap();
            }
        }
    }

    /// One random write, retried until the monolith has it.
    async fn step(&mut self) {
        let roll = self.rng.random_range(0..100);
        let products = self.db.collection::<Document>("products");
        let customers = self.db.collection::<Document>("customers");
        match roll {
            0..12 => {
                let (key, d, m) = self.product();
                retry(|| async { ok_or_duplicate(products.insert_one(d.clone()).await.map(|_| ())) }).await;
                self.log.push(Write { topic: PRODUCTS, key, marker: m, kind: Kind::Insert });
            }
            12..50 if !self.products.is_empty() => {
                let i = self.products[self.rng.random_range(0..self.products.len())];
                let m = self.next_marker();
                let mut set = doc! { "views": m };
                if self.rng.random_bool(0.25) {
                    set.insert("category", format!("cat-{}", self.rng.random_range(0..5)));
                }
                let update = doc! { "$set": set };
                retry(|| async {
                    products.update_one(doc! { "sku": Workload::sku(i) }, update.clone()).await.map(|_| ())
                })
                .await;
                self.log.push(Write { topic: PRODUCTS, key: Workload::sku(i), marker: m, kind: Kind::Update });
            }
            50..54 if self.products.len() > 10 => {
                let at = self.rng.random_range(0..self.products.len());
                let i = self.products.swap_remove(at);
                retry(|| async { products.delete_one(doc! { "sku": Workload::sku(i) }).await.map(|_| ()) }).await;
                self.log.push(Write { topic: PRODUCTS, key: Workload::sku(i), marker: 0, kind: Kind::Delete });
            }
            54..62 => {
                let (key, d, m) = self.customer();
                retry(|| async { ok_or_duplicate(customers.insert_one(d.clone()).await.map(|_| ())) }).await;
                self.log.push(Write { topic: CUSTOMERS, key, marker: m, kind: Kind::Insert });
            }
            62..96 if !self.customers.is_empty() => {
                let i = self.customers[self.rng.random_range(0..self.customers.len())];
                let m = self.next_marker();
                let user = Workload::user_id(i);
                let (filter, update) = if self.rng.random_bool(0.3) {
                    let pid = format!("P-f{m}");
                    let sku = Workload::sku(self.rng.random_range(0..50));
                    let purchase = doc! {
                        "id": &pid, "product_id": &sku, "product_name": format!("Product {sku}"),
                        "amount": format!("{}.50", self.rng.random_range(1..900)), "currency": "THB",
                        "date": bson::DateTime::from_millis(1_767_225_600_000 + m * 1000), "status": "paid",
                    };
                    (
                        doc! { "user_id": &user, "purchases.id": { "$ne": &pid } },
                        doc! { "$set": { "stats.msgs": m }, "$push": { "purchases": purchase } },
                    )
                } else {
                    (doc! { "user_id": &user }, doc! { "$set": { "stats.msgs": m } })
                };
                retry(|| async { customers.update_one(filter.clone(), update.clone()).await.map(|_| ()) }).await;
                self.log.push(Write { topic: CUSTOMERS, key: user, marker: m, kind: Kind::Update });
            }
            96..100 if self.customers.len() > 10 => {
                let at = self.rng.random_range(0..self.customers.len());
                let i = self.customers.swap_remove(at);
                retry(|| async { customers.delete_one(doc! { "user_id": Workload::user_id(i) }).await.map(|_| ()) })
                    .await;
                self.log.push(Write { topic: CUSTOMERS, key: Workload::user_id(i), marker: 0, kind: Kind::Delete });
            }
            _ => {} // a delete or an update with nothing to act on: skip the roll
        }
    }

    /// `n` writes, `pace` apart.
    async fn run(mut self, n: usize, pace: Duration) -> Driver {
        let target = self.log.len() + n;
        while self.log.len() < target {
            self.step().await;
            tokio::time::sleep(pace).await;
        }
        self
    }

    /// Writes, `pace` apart, until `stop` is set.
    async fn run_until(mut self, stop: Arc<AtomicBool>, pace: Duration) -> Driver {
        while !stop.load(Ordering::SeqCst) {
            self.step().await;
            tokio::time::sleep(pace).await;
        }
        self
    }
}

fn ok_or_duplicate(r: mongodb::error::Result<()>) -> mongodb::error::Result<()> {
    match r {
        Err(e) if ficus::mongo::error_code(&e) == Some(11000) => Ok(()), // an earlier attempt landed
        other => other,
    }
}

/// Retries a write until it succeeds (the monolith may be down or unreachable for a while).
async fn retry<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = mongodb::error::Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the monolith refused a workload write for 5 minutes: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading Kafka and auditing
// ---------------------------------------------------------------------------------------------

/// One record as it sits on Kafka, decoded if it is a canonical event.
struct Raw {
    topic: String,
    partition: i32,
    offset: i64,
    payload: Option<Vec<u8>>,
}

/// Every record of `topics`, from the low to the high watermark of each partition as of now.
fn read_raw(brokers: &str, topics: &[&str]) -> Vec<Raw> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ficus-faults-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(30)).unwrap();
        for p in md.topics()[0].partitions() {
            let (low, high) = consumer.fetch_watermarks(t, p.id(), Duration::from_secs(30)).unwrap();
            if high > low {
                tpl.add_partition_offset(t, p.id(), rdkafka::Offset::Offset(low)).unwrap();
                ends.insert((t.to_string(), p.id()), high);
            }
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !ends.is_empty() {
        assert!(Instant::now() < deadline, "reading Kafka back took over 3 minutes; left: {ends:?}");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let k = (m.topic().to_string(), m.partition());
                if let Some(end) = ends.get(&k).copied() {
                    if m.offset() < end {
                        out.push(Raw {
                            topic: m.topic().to_string(),
                            partition: m.partition(),
                            offset: m.offset(),
                            payload: m.payload().map(<[u8]>::to_vec),
                        });
                    }
                    if m.offset() + 1 >= end {
                        ends.remove(&k);
                    }
                }
            }
            Some(Err(e)) => panic!("kafka read: {e}"),
            None => {}
        }
    }
    out
}

async fn read_raw_async(brokers: &str, topics: &[&str]) -> Vec<Raw> {
    let brokers = brokers.to_string();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        read_raw(&brokers, &refs)
    })
    .await
    .unwrap()
}

fn as_i64(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(i) => Some(i64::from(*i)),
        Bson::Int64(i) => Some(*i),
        Bson::Double(d) => Some(*d as i64),
        _ => None,
    }
}

/// A value at a dotted path.
fn at<'a>(d: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut cur = d;
    let mut parts = path.split('.').peekable();
    while let Some(p) = parts.next() {
        let v = cur.get(p)?;
        if parts.peek().is_none() {
            return Some(v);
        }
        cur = v.as_document()?;
    }
    None
}

/// Whether event `e` carries write `w` (or, for a snapshot copy, a state at or after it).
fn carries(e: &CanonicalEvent, w: &Write) -> bool {
    let f = marker_field(w.topic);
    let after = e.data.after.as_ref().and_then(|a| as_i64(at(a, f)));
    match (w.kind, e.data.op) {
        (Kind::Delete, op) => op == Op::Delete,
        (_, Op::Snapshot) => after.is_some_and(|m| m >= w.marker),
        (Kind::Seed | Kind::Insert, Op::Insert) => after == Some(w.marker),
        (Kind::Update, Op::Update) => e.data.changed.as_ref().and_then(|c| as_i64(c.get(f))) == Some(w.marker),
        (_, Op::Replace) => after == Some(w.marker),
        _ => false,
    }
}

/// A scenario's tally; see the file's header.
#[derive(Debug, Default)]
struct Report {
    name: String,
    written: usize,
    delivered: usize,
    applied: usize,
    lost: usize,
    duplicated: usize,
    note: String,
    problems: Vec<String>,
}

impl Report {
    fn line(&self) -> String {
        format!(
            "fault {}: written {}, delivered {}, applied {}, lost {}, duplicated-absorbed {}{}",
            self.name,
            self.written,
            self.delivered,
            self.applied,
            self.lost,
            self.duplicated,
            if self.note.is_empty() { String::new() } else { format!(" ({})", self.note) }
        )
    }

    /// Prints the line and asserts nothing was lost.
    fn check(&self) {
        println!("{}", self.line());
        assert!(
            self.lost == 0 && self.problems.is_empty(),
            "{}\nproblems (first 20):\n{}",
            self.line(),
            self.problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

/// Per aggregate: the newest version the target holds (document or tombstone) and whether the
/// document exists.
async fn target_versions(target: &mongodb::Client, db: &str, coll: &str) -> HashMap<String, (Option<String>, bool)> {
    let mut out: HashMap<String, (Option<String>, bool)> = HashMap::new();
    let db = target.database(db);
    let docs: Vec<Document> = db.collection::<Document>(coll).find(doc! {}).await.unwrap().try_collect().await.unwrap();
    for d in docs {
        let Some(Bson::String(id)) = d.get("_id") else { continue };
        let v = d.get_document("_ficus").ok().and_then(|m| m.get_str("v").ok()).map(str::to_string);
        out.insert(id.clone(), (v, true));
    }
    let tombs: Vec<Document> = db
        .collection::<Document>("_ficus_tombstones")
        .find(doc! { "_id.c": coll })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    for t in tombs {
        let Some(Bson::String(id)) = t.get_document("_id").ok().and_then(|i| i.get("id")) else { continue };
        let v = t.get_str("v").ok().map(str::to_string);
        let e = out.entry(id.clone()).or_insert((None, false));
        if v > e.0 {
            e.0 = v;
        }
    }
    out
}

/// The fields the workload moves, per aggregate, in the source and in the target; the
/// differences (independent of ficus's own `verify`).
async fn differences(source: &mongodb::Client, target: &mongodb::Client) -> Vec<String> {
    async fn all(c: &mongodb::Client, db: &str, coll: &str) -> Vec<Document> {
        c.database(db).collection::<Document>(coll).find(doc! {}).await.unwrap().try_collect().await.unwrap()
    }
    let len = |d: &Document, f: &str| d.get_array(f).map(|a| a.len() as i64).ok();
    let mut expected: BTreeMap<String, (Option<i64>, Option<String>, Option<i64>)> = BTreeMap::new();
    for d in all(source, "linechatbot", "products").await {
        let key = format!("product {}", d.get_str("sku").unwrap_or("?"));
        expected.insert(key, (as_i64(d.get("views")), d.get_str("category").ok().map(String::from), None));
    }
    for d in all(source, "linechatbot", "customers").await {
        let key = format!("customer {}", d.get_str("user_id").unwrap_or("?"));
        expected.insert(key, (as_i64(at(&d, "stats.msgs")), None, len(&d, "purchases")));
    }
    let mut actual = BTreeMap::new();
    for d in all(target, "products_db", "products").await {
        let key = format!("product {}", d.get_str("_id").unwrap_or("?"));
        actual.insert(key, (as_i64(at(&d, "analytics.views")), d.get_str("category").ok().map(String::from), None));
    }
    for d in all(target, "customers_db", "customers").await {
        let key = format!("customer {}", d.get_str("_id").unwrap_or("?"));
        actual.insert(key, (as_i64(at(&d, "analytics.totalMessages")), None, len(&d, "purchaseHistory")));
    }
    let mut out = Vec::new();
    for (k, want) in &expected {
        match actual.get(k) {
            None => out.push(format!("{k}: missing from the target (source {want:?})")),
            Some(have) if have != want => out.push(format!("{k}: source {want:?}, target {have:?}")),
            Some(_) => {}
        }
    }
    for k in actual.keys().filter(|k| !expected.contains_key(*k)) {
        out.push(format!("{k}: in the target, not in the source"));
    }
    out
}

/// Waits until the target matches the source (independent check), then until `ficus verify`
/// passes for every service, then audits Kafka, the target's versions and (with `archive`) the
/// event store against the writes made.
#[allow(clippy::too_many_arguments)]
async fn settle_and_audit(
    name: &str,
    world: &World,
    env: &Env,
    brokers: &str,
    source: &mongodb::Client,
    target: &mongodb::Client,
    log: &[Write],
    archive: bool,
    note: String,
) -> Report {
    let t0 = Instant::now();
    let mut diffs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(if long() { 600 } else { 240 });
    while Instant::now() < deadline {
        diffs = differences(source, target).await;
        if diffs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut report = Report { name: name.to_string(), note, ..Default::default() };
    eprintln!("[{name}] converged after {:?}", t0.elapsed());
    if !diffs.is_empty() {
        report.problems.push(format!("source and target never converged ({} differences):", diffs.len()));
        report.problems.extend(diffs.iter().take(10).cloned());
        report.problems.push(format!("ficus warnings and errors:\n{}", ficus_problems(world)));
    }
    if diffs.is_empty() {
        for service in SERVICES {
            let mut last = String::new();
            let mut passed = false;
            for _ in 0..5 {
                let out = run_ficus(world, &["verify", "--service", service, "--settle", "1"], env);
                last = text(&out);
                if out.status.success() {
                    passed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            if !passed {
                report.problems.push(format!("ficus verify --service {service} did not pass:\n{}", tail_of(&last, 30)));
            }
        }
    }

    eprintln!("[{name}] verified after {:?}", t0.elapsed());
    // Kafka: every record, and the events that carry each write.
    let raw = read_raw_async(brokers, &[PRODUCTS, CUSTOMERS]).await;
    let mut by_key: HashMap<(String, String), Vec<CanonicalEvent>> = HashMap::new();
    let mut ids: HashSet<String> = HashSet::new();
    let mut all_ids: HashSet<String> = HashSet::new();
    for r in &raw {
        let Some(ev) = r.payload.as_deref().and_then(|p| CanonicalEvent::decode(p).ok()) else {
            report.problems.push(format!("undecodable record at {}[{}]@{}", r.topic, r.partition, r.offset));
            continue;
        };
        all_ids.insert(ev.id.clone());
        if ev.data.derived.is_some() {
            continue;
        }
        report.delivered += 1;
        if !ids.insert(ev.id.clone()) {
            report.duplicated += 1;
        }
        by_key.entry((r.topic.clone(), ev.subject.clone())).or_default().push(ev);
    }

    let mut versions = HashMap::new();
    versions.insert(PRODUCTS, target_versions(target, "products_db", "products").await);
    versions.insert(CUSTOMERS, target_versions(target, "customers_db", "customers").await);
    report.written = log.len();
    for w in log {
        let events = by_key.get(&(w.topic.to_string(), w.key.clone())).map(Vec::as_slice).unwrap_or_default();
        let carriers: Vec<&CanonicalEvent> = events.iter().filter(|e| carries(e, w)).collect();
        if carriers.is_empty() {
            report.lost += 1;
            report.problems.push(format!("{w:?}: no event on Kafka carries it"));
            continue;
        }
        let (v, present) = versions[w.topic].get(&w.key).cloned().unwrap_or((None, false));
        let applied = carriers.iter().any(|e| v.as_deref().is_some_and(|v| v >= e.position.sequence().as_str()))
            && !(w.kind == Kind::Delete && present);
        if applied {
            report.applied += 1;
        } else {
            report.lost += 1;
            report.problems.push(format!(
                "{w:?}: on Kafka as {:?}, target holds version {v:?} (present: {present})",
                carriers.iter().map(|e| e.position.sequence()).collect::<Vec<_>>()
            ));
        }
    }
    report.lost += diffs.len();

    eprintln!("[{name}] audited Kafka after {:?}", t0.elapsed());
    if archive {
        let events = target.database("ficus").collection::<Document>("events");
        let mut missing = all_ids.len();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let archived: HashSet<String> = events
                .find(doc! { "topic": { "$in": [PRODUCTS, CUSTOMERS] } })
                .projection(doc! { "_id": 1 })
                .await
                .unwrap()
                .try_collect::<Vec<Document>>()
                .await
                .unwrap()
                .into_iter()
                .filter_map(|d| d.get_str("_id").ok().map(String::from))
                .collect();
            missing = all_ids.iter().filter(|id| !archived.contains(*id)).count();
            if missing == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if missing > 0 {
            report.lost += missing;
            report.problems.push(format!("{missing} event(s) on Kafka never reached the archive"));
        }
    }
    eprintln!("[{name}] archive checked after {:?}", t0.elapsed());
    report
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL at random moments
// ---------------------------------------------------------------------------------------------

/// The tail and the consumers (with the archive) run as two processes; a seeded schedule kills
/// one, the other or both with SIGKILL at random moments while the workload streams, and
/// restarts them.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_streaming_and_consumption() {
    let name = "sigkill-streaming";
    let seed = seed_for(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let env = Env::default().with("FICUS_CONFIG", fault_config(world.dir.path(), name, "", ""));
    let mut driver = Driver::new(&client, seed);
    driver.seed(150, 100).await;

    let mut tail = spawn(&world, TAIL, &env);
    let mut consume = spawn(&world, CONSUME, &env);
    wait_for("streaming", Duration::from_secs(120), || streaming(&client)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(driver.run_until(stop.clone(), Duration::from_millis(15)));
    let cycles = if long() { 24 } else { 5 };
    let mut kills = BTreeMap::new();
    for _ in 0..cycles {
        tokio::time::sleep(Duration::from_millis(rng.random_range(700..2500))).await;
        let victim = ["tail", "consume", "both"][rng.random_range(0..3)];
        *kills.entry(victim).or_insert(0) += 1;
        if victim != "consume" {
            tail.sigkill();
        }
        if victim != "tail" {
            consume.sigkill();
        }
        // Restart at once or after a short outage.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
        if victim != "consume" {
            tail = spawn(&world, TAIL, &env);
        }
        if victim != "tail" {
            consume = spawn(&world, CONSUME, &env);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let driver = writer.await.unwrap();

    let report = settle_and_audit(
        name,
        &world,
        &env,
        &world.kafka.brokers(),
        &client,
        &client,
        &driver.log,
        true,
        format!("seed {seed}, {cycles} SIGKILLs: {kills:?}"),
    )
    .await;
    stop_cleanly(&mut tail, "the tail");
    stop_cleanly(&mut consume, "the consumers");
    report.check();
}

/// SIGKILL at random moments of a throttled initial snapshot (tail, consumers and archive in
/// one process), with writes landing during the copy; each restart resumes the copy.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_the_snapshot() {
    let name = "sigkill-snapshot";
    let seed = seed_for(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let (products, customers) = if long() { (1500, 500) } else { (450, 150) };
    let rate = if long() { 300 } else { 150 };
    let snapshot = format!("[snapshot]\nmax_docs_per_sec = {rate}\nbatch_size = 25\n");
    let env = Env::default().with("FICUS_CONFIG", fault_config(world.dir.path(), name, "", &snapshot));
    let mut driver = Driver::new(&client, seed);
    driver.seed(products, customers).await;

    let copied = || async {
        checkpoint(&client, "linechatbot")
            .await
            .and_then(|c| c.get_document("snapshot").ok().and_then(|s| s.get_i64("copied").ok()))
    };
    let mut f = spawn(&world, ALL, &env);
    wait_for("the snapshot started", Duration::from_secs(60), || async { copied().await.is_some() }).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(driver.run_until(stop.clone(), Duration::from_millis(20)));
    let cycles = if long() { 20 } else { 3 };
    let mut mid_copy = 0;
    for _ in 0..cycles {
        // Kill once the copy has moved on, somewhere in its next stretch.
        let before = copied().await;
        wait_for("snapshot progress", Duration::from_secs(60), || async {
            copied().await > before || streaming(&client).await
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        f.sigkill();
        if !streaming(&client).await {
            mid_copy += 1;
        }
        f = spawn(&world, ALL, &env);
    }
    wait_for("the snapshot finished", Duration::from_secs(120), || streaming(&client)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let driver = writer.await.unwrap();
    assert!(mid_copy > 0, "no SIGKILL landed mid-copy: make the copy slower");

    let report = settle_and_audit(
        name,
        &world,
        &Env::default(),
        &world.kafka.brokers(),
        &client,
        &client,
        &driver.log,
        true,
        format!("seed {seed}, {cycles} SIGKILLs, {mid_copy} of them mid-copy"),
    )
    .await;
    stop_cleanly(&mut f, "ficus");
    report.check();
}

/// `ficus replay` killed with SIGKILL at random moments (shadow and in-place) while the daemon
/// keeps consuming live writes; a final replay completes and the database verifies.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_replay() {
    let name = "sigkill-replay";
    let seed = seed_for(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    let env = Env::default().with("FICUS_CONFIG", fault_config(world.dir.path(), name, "", ""));
    let mut driver = Driver::new(&client, seed);
    driver.seed(if long() { 800 } else { 250 }, 100).await;
    let mut f = spawn(&world, ALL, &env);
    wait_for("streaming", Duration::from_secs(120), || streaming(&client)).await;
    let driver = driver.run(200, Duration::from_millis(10)).await;
    wait_for("the service databases caught up", Duration::from_secs(240), || async {
        differences(&client, &client).await.is_empty()
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(driver.run_until(stop.clone(), Duration::from_millis(25)));
    client.database("products_db").drop().await.unwrap();
    let cycles = if long() { 20 } else { 3 };
    let mut interrupted = 0;
    for cycle in 0..cycles {
        let args: &[&str] = if cycle % 3 == 2 {
            &["replay", "--service", "products_db", "--in-place"]
        } else {
            &["replay", "--service", "products_db"]
        };
        let mut r = spawn(&world, args, &env);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2500))).await;
        if r.wait(Duration::ZERO).is_none() {
            interrupted += 1;
        }
        r.sigkill();
    }
    let out = run_ficus(&world, &["replay", "--service", "products_db"], &env);
    assert!(out.status.success(), "the final replay failed:\n{}", text(&out));
    stop.store(true, Ordering::SeqCst);
    let driver = writer.await.unwrap();
    assert!(interrupted > 0, "no replay was interrupted");
    let leftovers = client.list_database_names().await.unwrap();
    assert!(!leftovers.iter().any(|d| d == "products_db_replay"), "the shadow database was left behind: {leftovers:?}");

    let report = settle_and_audit(
        name,
        &world,
        &env,
        &world.kafka.brokers(),
        &client,
        &client,
        &driver.log,
        true,
        format!("seed {seed}, {cycles} replays SIGKILLed, {interrupted} of them mid-run"),
    )
    .await;
    stop_cleanly(&mut f, "ficus");
    report.check();
}

// ---------------------------------------------------------------------------------------------
// 2. Servers killed and restarted mid-stream
// ---------------------------------------------------------------------------------------------

/// Runs the workload against a daemon while `fault` strikes `outages` times at seeded moments
/// (it gets the outage's seeded duration), then settles and audits.
async fn outage_scenario<F>(
    name: &str,
    world: &mut World,
    target: Option<common::Mongo>,
    outages: usize,
    mut fault: F,
) -> Report
where
    F: FnMut(&mut World, &mut Option<common::Mongo>, Duration),
{
    let seed = seed_for(name);
    let mut rng = StdRng::seed_from_u64(seed);
    world.apply_topics();
    let mut target = target;
    let target_uri = target.as_ref().map_or_else(|| world.mongo.uri(), |t| t.uri());
    let mut env = Env::default().with("FICUS_CONFIG", fault_config(world.dir.path(), name, "", ""));
    if target.is_some() {
        env = env.with("FICUS_TARGET_URI", &target_uri).with("FICUS_STORE_URI", &target_uri);
    }
    let source = mongo_client(&impatient(&world.mongo.uri())).await;
    let target_client = mongo_client(&impatient(&target_uri)).await;
    let mut driver = Driver::new(&source, seed);
    driver.seed(150, 80).await;
    let mut f = spawn(world, ALL, &env);
    wait_for("streaming", Duration::from_secs(120), || streaming(&target_client)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(driver.run_until(stop.clone(), Duration::from_millis(15)));
    let mut total = Duration::ZERO;
    for _ in 0..outages {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        let down =
            Duration::from_millis(if long() { rng.random_range(3000..15000) } else { rng.random_range(1500..4000) });
        total += down;
        tokio::task::block_in_place(|| fault(world, &mut target, down));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let driver = writer.await.unwrap();
    let report = settle_and_audit(
        name,
        world,
        &env,
        &world.kafka.brokers(),
        &source,
        &target_client,
        &driver.log,
        true,
        format!("seed {seed}, {outages} outages, {:.1}s down in all", total.as_secs_f64()),
    )
    .await;
    stop_cleanly(&mut f, "ficus");
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_broker_killed_and_restarted_mid_stream() {
    let mut world = World::start();
    let outages = if long() { 6 } else { 2 };
    let report = outage_scenario("kafka-restart", &mut world, None, outages, |w, _, down| {
        w.kafka.kill();
        std::thread::sleep(down);
        w.kafka.restart();
    })
    .await;
    report.check();
}

#[tokio::test(flavor = "multi_thread")]
async fn source_mongodb_killed_and_restarted_mid_stream() {
    let mut world = World::start();
    let target = common::Mongo::start(&world.dir.path().join("target"), &[]);
    let outages = if long() { 6 } else { 2 };
    let report = outage_scenario("mongo-source-restart", &mut world, Some(target), outages, |w, _, down| {
        w.mongo.kill();
        std::thread::sleep(down);
        w.mongo.restart();
    })
    .await;
    report.check();
}

/// The target server holds the service databases and ficus's store (checkpoints, lease, event
/// store), so its outage hits every role at once.
#[tokio::test(flavor = "multi_thread")]
async fn target_mongodb_killed_and_restarted_mid_stream() {
    let mut world = World::start();
    let target = common::Mongo::start(&world.dir.path().join("target"), &[]);
    let outages = if long() { 6 } else { 2 };
    let report = outage_scenario("mongo-target-restart", &mut world, Some(target), outages, |_, t, down| {
        let t = t.as_mut().unwrap();
        t.kill();
        std::thread::sleep(down);
        t.restart();
    })
    .await;
    report.check();
}
