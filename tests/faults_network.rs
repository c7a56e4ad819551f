//! Network faults between ficus and its servers, while a seeded workload writes to the
//! monolith: latency, resets, refusal and a partition from an in-test TCP proxy
//! (`tests/common/proxy.rs`) between ficus and MongoDB, and between ficus and Kafka (a Tansu
//! broker that advertises the proxy's address, so every Kafka connection crosses it). Each
//! scenario runs in its own world and ends with the audit of `tests/common/scenario` (nothing
//! lost, one line per scenario); the knobs (`FICUS_FAULTS_LONG`, `FICUS_FAULTS_SEED`, …) are in
//! the README, "Faults, and what the tests prove".

mod common;

use std::path::Path;
use std::time::Duration;

use common::free_port;
use common::proxy::Proxy;
use common::scenario::{ALL, Setup, long, text};
use rand::Rng;
use rand::rngs::StdRng;

/// Latency, resets, refusal and a partition, in turn, at seeded lengths; returns what it did.
async fn network_faults(proxy: &Proxy, rng: &mut StdRng) -> String {
    let scale = if long() { 4 } else { 1 };
    let pause = || tokio::time::sleep(Duration::from_millis(1500));
    let latency = Duration::from_millis(rng.random_range(100..300));
    let slow = Duration::from_millis(rng.random_range(2000..4000) * scale);
    proxy.set_latency(latency);
    tokio::time::sleep(slow).await;
    proxy.restore();
    pause().await;
    proxy.reset();
    pause().await;
    let refused = Duration::from_millis(rng.random_range(2000..4000) * scale);
    proxy.refuse();
    tokio::time::sleep(refused).await;
    proxy.restore();
    pause().await;
    let partitioned = Duration::from_millis(rng.random_range(4000..8000) * scale);
    proxy.partition();
    tokio::time::sleep(partitioned).await;
    proxy.restore();
    pause().await;
    proxy.reset();
    format!(
        "latency {}ms for {:.1}s, 2 resets, refused {:.1}s, partitioned {:.1}s",
        latency.as_millis(),
        slow.as_secs_f64(),
        refused.as_secs_f64(),
        partitioned.as_secs_f64()
    )
}

/// Every connection ficus makes to MongoDB (source, targets, store) goes through the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn network_faults_between_ficus_and_mongodb() {
    let mut s = Setup::seeded("proxy-mongodb").start().await;
    let proxy = Proxy::start(s.world.mongo.port);
    let via = format!("mongodb://{}/?directConnection=true", proxy.addr());
    let direct = s.env.clone();
    let env =
        direct.clone().with("FICUS_SOURCE_URI", &via).with("FICUS_TARGET_URI", &via).with("FICUS_STORE_URI", &via);
    let mut driver = s.driver();
    driver.seed(150, 80).await;
    let mut f = s.spawn_with(ALL, &env);
    s.wait_streaming().await;
    let writer = driver.until_stopped(Duration::from_millis(15));
    let faults = network_faults(&proxy, &mut s.rng).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let driver = writer.stop().await;
    let note = format!("seed {}, {faults}, {} connections through the proxy", s.seed, proxy.accepted());
    // Verified directly, not through the proxy.
    let mut report = s.audit(&driver.log).env(&direct).note(note).run().await;
    report.finish(&mut f, "ficus");
    report.check();
}

/// A Tansu broker that advertises a proxy's address, so every Kafka connection (bootstrap and
/// partition leaders alike) goes through the proxy. Killed with the test.
struct ProxiedKafka {
    _kafka: common::Kafka,
    proxy: Proxy,
}

impl ProxiedKafka {
    fn start(dir: &Path) -> ProxiedKafka {
        let port = free_port();
        let proxy = Proxy::start(port);
        let kafka = common::Kafka::start_advertising(dir, port, proxy.port);
        ProxiedKafka { _kafka: kafka, proxy }
    }

    fn brokers(&self) -> String {
        self.proxy.addr()
    }
}

/// Kafka network faults. Consumers keep their group membership through them (librdkafka
/// reconnects by itself; ficus never replaces a consumer over a transient error), and the
/// consumer session timeout (ficus's default for static members, 45 s) outlasts the longest partition (8 s,
/// 32 s in the long variant), so no member's session expires. That is deliberate, not a way
/// around a ficus fault: Tansu 0.6.0 wedges a group for good when its leader's session expires
/// while that leader is still heartbeating late (its heartbeat path drops the member but keeps
/// it as the group's leader, so every later JoinGroup waits on a leader that no longer exists;
/// `FICUS_TANSU_LOG=warn,tansu_broker::coordinator=debug` shows it). Real Kafka rebalances
/// and recovers.
#[tokio::test(flavor = "multi_thread")]
async fn network_faults_between_ficus_and_kafka() {
    let mut s = Setup::seeded("proxy-kafka").topics_by_hand().start().await;
    let kafka = ProxiedKafka::start(&s.world.dir.path().join("proxied-kafka"));
    s.env = s.env.clone().with("FICUS_KAFKA_BROKERS", kafka.brokers());
    let out = s.run(&["topics", "apply"]);
    assert!(out.status.success(), "topics apply through the proxy:\n{}", text(&out));
    let mut driver = s.driver();
    driver.seed(150, 80).await;
    let mut f = s.spawn(ALL);
    s.wait_streaming().await;
    let writer = driver.until_stopped(Duration::from_millis(15));
    let faults = network_faults(&kafka.proxy, &mut s.rng).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let driver = writer.stop().await;
    let note = format!("seed {}, {faults}, {} connections through the proxy", s.seed, kafka.proxy.accepted());
    let mut report = s.audit(&driver.log).brokers(kafka.brokers()).note(note).run().await;
    report.finish(&mut f, "ficus");
    report.check();
}
