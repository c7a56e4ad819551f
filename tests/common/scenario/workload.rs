//! The fault scenarios' workload: seeded writes to the monolith's products and customers,
//! each one traceable (its marker field), logged as [`Write`]s for the audit, and retried until
//! the monolith takes it, so outages of the monolith itself do not change what was written.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bson::{Document, Timestamp, doc};
use ficus::testkit::workload::Workload;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{CUSTOMERS, PRODUCTS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
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
pub struct Write {
    pub topic: &'static str,
    pub key: String,
    pub marker: i64,
    pub kind: Kind,
    /// For a delete: no earlier than its cluster time (the monolith's `operationTime` read right
    /// after the delete was acknowledged), where the monolith answered. See [`super::audit::deleted_unseen`].
    pub by: Option<Timestamp>,
}

impl Write {
    pub fn new(topic: &'static str, key: String, marker: i64, kind: Kind) -> Write {
        Write { topic, key, marker, kind, by: None }
    }
}

pub fn marker_field(topic: &str) -> &'static str {
    if topic == PRODUCTS { "views" } else { "stats.msgs" }
}

/// Writes the reference workload's products and customers: inserts, updates (the marker,
/// category moves, purchases that raise derived events) and deletes, chosen by a seeded RNG.
/// Each write is retried until the monolith takes it, idempotently (inserts carry their `_id`,
/// updates set values, a purchase is pushed only if absent), so outages of the monolith itself
/// do not change what was written.
pub struct Driver {
    db: mongodb::Database,
    rng: StdRng,
    docs: Workload,
    marker: i64,
    products: Vec<u64>,
    customers: Vec<u64>,
    next_product: u64,
    next_customer: u64,
    /// Every write made, in order.
    pub log: Vec<Write>,
}

impl Driver {
    pub fn new(client: &mongodb::Client, seed: u64) -> Driver {
        Driver {
            db: monolith(client),
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
    pub async fn seed(&mut self, products: usize, customers: usize) {
        for (topic, n) in [(PRODUCTS, products), (CUSTOMERS, customers)] {
            let mut docs = Vec::new();
            for _ in 0..n {
                let (key, d, m) = if topic == PRODUCTS { self.product() } else { self.customer() };
                self.log.push(Write::new(topic, key, m, Kind::Seed));
                docs.push(d);
            }
            let coll = self.db.collection::<Document>(if topic == PRODUCTS { "products" } else { "customers" });
            for chunk in docs.chunks(500) {
                coll.insert_many(chunk.to_vec()).await.unwrap();
            }
        }
    }

    /// Updates, then deletes, `n` seeded products and `n` seeded customers, chosen by the RNG:
    /// documents whose whole life after their insert happens at once.
    pub async fn retire(&mut self, n: usize) {
        for topic in [PRODUCTS, CUSTOMERS] {
            for _ in 0..n {
                let (coll, field, live) = if topic == PRODUCTS {
                    ("products", "sku", &mut self.products)
                } else {
                    ("customers", "user_id", &mut self.customers)
                };
                let i = live.swap_remove(self.rng.random_range(0..live.len()));
                let key = if topic == PRODUCTS { Workload::sku(i) } else { Workload::user_id(i) };
                let m = self.next_marker();
                let coll = self.db.collection::<Document>(coll);
                let set = doc! { "$set": { marker_field(topic): m } };
                retry(|| async { coll.update_one(doc! { field: &key }, set.clone()).await.map(|_| ()) }).await;
                self.log.push(Write::new(topic, key.clone(), m, Kind::Update));
                retry(|| async { coll.delete_one(doc! { field: &key }).await.map(|_| ()) }).await;
                let by = self.cluster_time().await;
                self.log.push(Write { by, ..Write::new(topic, key, 0, Kind::Delete) });
            }
        }
    }

    /// The monolith's latest cluster time, which is at or after that of every write it has
    /// acknowledged (`operationTime`, on a replica set); `None` if it cannot be read now.
    async fn cluster_time(&self) -> Option<Timestamp> {
        let reply = self.db.run_command(doc! { "ping": 1 }).await.ok()?;
        reply.get_timestamp("operationTime").ok()
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
                self.log.push(Write::new(PRODUCTS, key, m, Kind::Insert));
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
                self.log.push(Write::new(PRODUCTS, Workload::sku(i), m, Kind::Update));
            }
            50..54 if self.products.len() > 10 => {
                let at = self.rng.random_range(0..self.products.len());
                let i = self.products.swap_remove(at);
                retry(|| async { products.delete_one(doc! { "sku": Workload::sku(i) }).await.map(|_| ()) }).await;
                let by = self.cluster_time().await;
                self.log.push(Write { by, ..Write::new(PRODUCTS, Workload::sku(i), 0, Kind::Delete) });
            }
            54..62 => {
                let (key, d, m) = self.customer();
                retry(|| async { ok_or_duplicate(customers.insert_one(d.clone()).await.map(|_| ())) }).await;
                self.log.push(Write::new(CUSTOMERS, key, m, Kind::Insert));
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
                self.log.push(Write::new(CUSTOMERS, user, m, Kind::Update));
            }
            96..100 if self.customers.len() > 10 => {
                let at = self.rng.random_range(0..self.customers.len());
                let i = self.customers.swap_remove(at);
                retry(|| async { customers.delete_one(doc! { "user_id": Workload::user_id(i) }).await.map(|_| ()) })
                    .await;
                let by = self.cluster_time().await;
                self.log.push(Write { by, ..Write::new(CUSTOMERS, Workload::user_id(i), 0, Kind::Delete) });
            }
            _ => {} // a delete or an update with nothing to act on: skip the roll
        }
    }

    /// `n` writes, `pace` apart.
    pub async fn run(mut self, n: usize, pace: Duration) -> Driver {
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

    /// Writes in the background, `pace` apart, until [`Writer::stop`].
    pub fn until_stopped(self, pace: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        Writer { task: tokio::spawn(self.run_until(stop.clone(), pace)), stop }
    }

    /// `n` writes in the background, `pace` apart; [`Writer::join`] waits for the last.
    pub fn in_background(self, n: usize, pace: Duration) -> Writer {
        Writer { task: tokio::spawn(self.run(n, pace)), stop: Arc::new(AtomicBool::new(false)) }
    }

    /// The same workload, writing through another client (the monolith's server restarted).
    pub fn through(self, client: &mongodb::Client) -> Driver {
        Driver { db: monolith(client), ..self }
    }
}

/// A [`Driver`] writing in the background.
pub struct Writer {
    task: tokio::task::JoinHandle<Driver>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    /// Stops the writes (after the one under way) and hands the driver back.
    pub async fn stop(self) -> Driver {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    /// Waits for the writes to end by themselves ([`Driver::in_background`]).
    pub async fn join(self) -> Driver {
        self.task.await.unwrap()
    }
}

/// The monolith's database as the workload writes it: each write is acknowledged once a
/// majority has journaled it, as an application asks of writes it counts on (and what the
/// server's default is on a replica set). That is what `written` counts, and what must survive
/// a SIGKILL of the server: secantusd-rs syncs its journal on commit only when started with
/// [`super::DURABLE`], so every scenario that kills the monolith starts it so. (Measured with it: 150
/// inserts acknowledged just before a SIGKILL were all there after the restart, 15 runs of 15.)
pub fn monolith(client: &mongodb::Client) -> mongodb::Database {
    let durable =
        mongodb::options::WriteConcern::builder().w(mongodb::options::Acknowledgment::Majority).journal(true).build();
    client.database_with_options(
        "linechatbot",
        mongodb::options::DatabaseOptions::builder().write_concern(durable).build(),
    )
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
