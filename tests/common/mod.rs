//! Test harness: real servers on free loopback ports, the real `ficus` binary, a plain Kafka
//! consumer to read what arrived. Nothing is mocked. The fault suite's scenario builder, its
//! seeded workload and its audit are in [`scenario`]; the TCP proxy for network faults in
//! [`proxy`].
//!
//! Server binaries come from `FICUS_SECANTUSD` / `FICUS_TANSU` / `FICUS_REDIS_SERVER` (set by
//! `tests/run.sh`, which installs them pinned into a cache, Redis from Debian's package), or
//! from their default locations.

#![allow(dead_code)]

pub mod proxy;
pub mod scenario;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::Document;
use ficus::event::{CanonicalEvent, Message};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub const SECANTUS_VERSION: &str = "0.5.3-beta.196";
pub const TANSU_VERSION: &str = "0.6.0";

fn cache_dir() -> PathBuf {
    std::env::var_os("FICUS_SERVERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ficus/servers"))
}

fn server_binary(var: &str, default: PathBuf) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    assert!(
        p.exists(),
        "{} not found at {}: run `bash .ci/install-servers` (the test command `bash tests/run.sh` does it)",
        var,
        p.display()
    );
    p
}

pub fn secantusd() -> PathBuf {
    server_binary("FICUS_SECANTUSD", cache_dir().join(format!("secantus-mdb-{SECANTUS_VERSION}/bin/secantusd-rs")))
}

pub fn tansu() -> PathBuf {
    server_binary("FICUS_TANSU", cache_dir().join(format!("tansu-{TANSU_VERSION}/bin/tansu")))
}

pub fn redis_server() -> PathBuf {
    server_binary("FICUS_REDIS_SERVER", PathBuf::from("/usr/bin/redis-server"))
}

/// A plain HTTP GET on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    try_http_get(port, path).unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// [`http_get`], with a server that is not there (killed, paused) an error rather than a panic.
pub fn try_http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {port}; log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

/// Kills the child's whole life with the test: the child gets SIGKILL if the test process dies.
fn spawn(cmd: &mut Command, log: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let err = out.try_clone().unwrap();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("spawning {:?}: {e}", cmd.get_program()))
}

fn signal(child: &Child, sig: i32) {
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// A child process that is killed (SIGKILL) when dropped or killed.
pub struct Owned(Option<Child>);

impl Owned {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A secantusd-rs MongoDB server (single node presenting as a replica set).
pub struct Mongo {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Owned,
}

impl Mongo {
    pub fn start(dir: &Path, extra: &[&str]) -> Mongo {
        let mut m = Mongo {
            port: free_port(),
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: Owned(None),
        };
        std::fs::create_dir_all(&m.dir).unwrap();
        m.boot();
        m
    }

    fn boot(&mut self) {
        let log = self.dir.join("secantusd.log");
        let mut cmd = Command::new(secantusd());
        cmd.current_dir(&self.dir)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--storage-path")
            .arg(self.dir.join("data"))
            .args(["--cache-size", "128M", "--log-level", "WARNING"])
            .args(&self.extra);
        self.child = Owned(Some(spawn(&mut cmd, &log)));
        wait_port(self.port, "secantusd-rs", &log);
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// The server's process id, while it runs (the benchmarks read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(self.uri()).await.unwrap()
    }

    pub fn kill(&mut self) {
        self.child.kill();
    }

    pub fn restart(&mut self) {
        self.kill();
        self.boot();
    }
}

/// A Tansu Kafka broker on sqlite storage.
pub struct Kafka {
    pub port: u16,
    /// The port it tells clients to connect to: its own, or a proxy's in front of it.
    advertised: u16,
    dir: PathBuf,
    child: Owned,
}

impl Kafka {
    pub fn start(dir: &Path) -> Kafka {
        let port = free_port();
        Kafka::start_advertising(dir, port, port)
    }

    /// A broker on `port` that advertises `advertised` (a proxy forwarding to `port`).
    pub fn start_advertising(dir: &Path, port: u16, advertised: u16) -> Kafka {
        std::fs::create_dir_all(dir).unwrap();
        let mut k = Kafka { port, advertised, dir: dir.to_path_buf(), child: Owned(None) };
        k.boot();
        k
    }

    fn boot(&mut self) {
        let log = self.dir.join("tansu.log");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let mut cmd = Command::new(tansu());
        cmd.current_dir(&self.dir)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .env("RUST_LOG", std::env::var("FICUS_TANSU_LOG").unwrap_or_else(|_| "warn".into()));
        self.child = Owned(Some(spawn(&mut cmd, &log)));
        wait_port(self.port, "tansu", &log);
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id, while it runs (the benchmarks read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// ficus's Kafka settings for this broker, as the defaults give them.
    pub fn config(&self) -> ficus::config::KafkaConfig {
        let env = |k: &str| (k == "FICUS_KAFKA_BROKERS").then(|| self.brokers());
        let file = ficus::config::ConfigFile::default();
        ficus::config::Config::from_file(file, Path::new("test"), &env).expect("default configuration").kafka
    }

    pub fn kill(&mut self) {
        self.child.kill();
    }

    pub fn restart(&mut self) {
        self.kill();
        self.boot();
    }
}

/// A Redis server (Debian's `redis-server`) on a free loopback port, without persistence unless
/// asked (`--appendonly yes`, for a test that kills it and expects its data back).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Owned,
}

impl Redis {
    pub fn start(dir: &Path, extra: &[&str]) -> Redis {
        std::fs::create_dir_all(dir).unwrap();
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut r = Redis { port: free_port(), dir: dir.to_path_buf(), extra, child: Owned(None) };
        r.boot();
        r
    }

    fn boot(&mut self) {
        let log = self.dir.join("redis.log");
        let mut cmd = Command::new(redis_server());
        cmd.current_dir(&self.dir)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra);
        self.child = Owned(Some(spawn(&mut cmd, &log)));
        wait_port(self.port, "redis-server", &log);
    }

    pub fn uri(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain connection for the test's own commands.
    pub fn conn(&self) -> redis::Connection {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match redis::Client::open(self.uri()).and_then(|c| c.get_connection()) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("Redis at {}: {e}", self.uri()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Starts it again on the same port, with the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.boot();
    }
}

/// One test's world: a monolith MongoDB, a broker, a Redis, and a scratch directory.
pub struct World {
    pub dir: tempfile::TempDir,
    pub mongo: Mongo,
    pub kafka: Kafka,
    pub redis: Redis,
}

/// With `FICUS_TEST_KEEP=1`, a failed test's scratch directory (servers' data, every ficus log)
/// stays for a post-mortem; its path is printed.
impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var("FICUS_TEST_KEEP").is_ok_and(|v| v == "1") {
            self.dir.disable_cleanup(true);
            eprintln!("FICUS_TEST_KEEP: kept {}", self.dir.path().display());
        }
    }
}

impl World {
    pub fn start() -> World {
        Self::start_with(&[])
    }

    pub fn start_with(mongo_args: &[&str]) -> World {
        let dir = tempfile::Builder::new().prefix("ficus-test-").tempdir().unwrap();
        let mongo = Mongo::start(&dir.path().join("mongo"), mongo_args);
        let kafka = Kafka::start(&dir.path().join("kafka"));
        let redis = Redis::start(&dir.path().join("redis"), &[]);
        World { dir, mongo, kafka, redis }
    }

    /// Environment for a ficus process pointed at this world.
    pub fn env(&self) -> HashMap<String, String> {
        let mut env = HashMap::new();
        env.insert("FICUS_SOURCE_URI".into(), self.mongo.uri());
        env.insert("FICUS_KAFKA_BROKERS".into(), self.kafka.brokers());
        env.insert("FICUS_TARGET_URI".into(), self.mongo.uri());
        env.insert("FICUS_STORE_URI".into(), self.mongo.uri());
        env.insert("FICUS_REDIS_URI".into(), self.redis.uri());
        env
    }

    /// Runs a ficus command to completion.
    pub fn ficus(&self, args: &[&str], extra_env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ficus"));
        cmd.current_dir(repo_root()).args(args).envs(self.env()).env_remove("FICUS_CONFIG");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// `ficus topics apply`, asserting success.
    pub fn apply_topics(&self) {
        let out = self.ficus(&["topics", "apply"], &[]);
        assert!(
            out.status.success(),
            "topics apply failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `ficus run` in the background.
    pub fn spawn_ficus(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Ficus {
        self.spawn_ficus_named(&free_port().to_string(), args, extra_env)
    }

    /// Starts ficus in the background like [`Self::spawn_ficus`], with its log in
    /// `ficus-<name>.log` of the scratch directory (the benchmarks keep the logs by name).
    pub fn spawn_ficus_named(&self, name: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Ficus {
        let log = self.dir.path().join(format!("ficus-{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ficus"));
        cmd.current_dir(repo_root())
            .args(args)
            .envs(self.env())
            .env_remove("FICUS_CONFIG")
            .env("FICUS_LOG", "info,ficus=debug");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = spawn(&mut cmd, &log);
        Ficus { child: Some(child), log }
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running ficus process.
pub struct Ficus {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Ficus {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal, without waiting.
    pub fn send(&self, sig: i32) {
        if let Some(c) = &self.child {
            signal(c, sig);
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        signal(&c, libc::SIGTERM);
        wait_timeout(&mut c, Duration::from_secs(60)).unwrap_or_else(|| {
            let _ = c.kill();
            panic!("ficus did not stop within 60s of SIGTERM; log:\n{}", self.logs());
        })
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut().expect("running");
        let st = wait_timeout(c, timeout);
        if st.is_some() {
            self.child = None;
        }
        st
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ficus {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn wait_timeout(c: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub headers: Vec<(String, String)>,
    pub message: Message,
}

impl Record {
    /// The canonical event this record carries; a test that meets a control message here
    /// expected an event.
    pub fn event(&self) -> &CanonicalEvent {
        self.message
            .as_event()
            .unwrap_or_else(|| panic!("{}@{}: a control message, not an event", self.topic, self.offset))
    }

    /// Whether it carries a canonical event (not a control message such as a snapshot marker).
    pub fn is_event(&self) -> bool {
        self.message.as_event().is_some()
    }
}

/// Reads every record of `topics` from the beginning with a plain consumer (no group), until
/// `until` is satisfied by what was read or `timeout` passes.
pub fn read_topics(
    brokers: &str,
    topics: &[&str],
    timeout: Duration,
    until: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    read_topics_in(brokers, topics, timeout, &[], until)
}

/// [`read_topics`] with extra client settings.
fn read_topics_in(
    brokers: &str,
    topics: &[&str],
    timeout: Duration,
    settings: &[(&str, &str)],
    until: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", "ficus-test-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10)).unwrap();
        let parts = md.topics()[0].partitions().len();
        assert!(parts > 0, "topic {t} has no partitions");
        for p in 0..parts as i32 {
            tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let payload = m.payload().expect("payload");
                let message = Message::decode(payload).unwrap_or_else(|e| panic!("undecodable record: {e}"));
                let headers = m
                    .headers()
                    .map(|h| {
                        use rdkafka::message::Headers;
                        h.iter()
                            .map(|h| {
                                (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    headers,
                    message,
                });
            }
            Some(Err(e)) => panic!("kafka read: {e}"),
            None => {
                if until(&out) {
                    return out;
                }
            }
        }
    }
    out
}

/// Every collection of a database, documents in `_id` order, with tombstones' wall-clock `at`
/// left out: for comparing two databases built by different deliveries. The apply markers
/// (`_ficus_applied`) are left out too: they are bookkeeping whose documents depend on how the
/// deliveries fell into batches (a closing marker is named after its batch's first partition),
/// not on what was applied.
pub async fn dump(db: &mongodb::Database) -> std::collections::BTreeMap<String, Vec<Document>> {
    use futures::TryStreamExt;
    let mut names = db.list_collection_names().await.unwrap();
    names.retain(|n| n != "_ficus_applied");
    names.sort();
    let mut out = std::collections::BTreeMap::new();
    for name in names {
        let mut docs: Vec<Document> = db
            .collection::<Document>(&name)
            .find(bson::doc! {})
            .sort(bson::doc! { "_id": 1 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        for d in &mut docs {
            d.remove("at");
        }
        out.insert(name, docs);
    }
    out
}

/// Polls an async condition until true or panics after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if poll_until(timeout, f).await {
        return;
    }
    panic!("timed out waiting for: {what}");
}

/// Polls an async condition every 200 ms until true (`true`) or `timeout` passes (`false`).
pub async fn poll_until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The time of the oldest entry in the server's oplog.
pub async fn oldest_oplog_time(client: &mongodb::Client) -> Option<bson::Timestamp> {
    let oldest = client
        .database("local")
        .collection::<Document>("oplog.rs")
        .find_one(bson::doc! {})
        .sort(bson::doc! { "$natural": 1 })
        .await
        .unwrap();
    oldest.and_then(|d| d.get_timestamp("ts").ok())
}

/// Every partition's high watermark of some topics.
pub fn watermarks(brokers: &str, topics: &[&str]) -> std::collections::BTreeMap<(String, i32), i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", "ficus-test-wm").create().unwrap();
    let mut out = std::collections::BTreeMap::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10)).unwrap();
        for p in md.topics()[0].partitions() {
            let (_, high) = consumer.fetch_watermarks(t, p.id(), Duration::from_secs(10)).unwrap();
            out.insert((t.to_string(), p.id()), high);
        }
    }
    out
}

/// Every JSON record of some topics up to their ends now (dead letters, conflict reports), read
/// in small fetches (see [`read_all`] on Tansu's fetches).
pub fn read_json_all(brokers: &str, topics: &[&str]) -> Vec<serde_json::Value> {
    use rdkafka::message::Message as _;
    let ends = watermarks(brokers, topics);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ficus-test-json")
        .set("enable.auto.commit", "false")
        .set("max.partition.fetch.bytes", "65536")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for ((t, p), end) in &ends {
        if *end > 0 {
            tpl.add_partition_offset(t, *p, Offset::Beginning).unwrap();
        }
    }
    if tpl.count() == 0 {
        return Vec::new();
    }
    consumer.assign(&tpl).unwrap();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ends.iter().any(|(k, end)| next.get(k).copied().unwrap_or(0) < *end) {
        assert!(Instant::now() < deadline, "reading {topics:?} to its end took over 120 s");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            next.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            if let Ok(v) = serde_json::from_slice(m.payload().unwrap_or_default()) {
                out.push(v);
            }
        }
    }
    out
}

/// The tail checkpoint document, if any.
pub async fn checkpoint(client: &mongodb::Client, source: &str) -> Option<Document> {
    client.database("ficus").collection::<Document>("checkpoints").find_one(bson::doc! { "_id": source }).await.unwrap()
}

/// Reads every record of `topics` that is there now and whatever is still arriving: up to each
/// partition's high watermark as of the call (a slow first fetch must not cut it short), and
/// then until nothing new came for two seconds.
pub fn read_all(brokers: &str, topics: &[&str]) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ficus-test-watermarks")
        .create()
        .unwrap();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10)).unwrap();
        for p in md.topics()[0].partitions() {
            let (_, high) = consumer.fetch_watermarks(t, p.id(), Duration::from_secs(10)).unwrap();
            ends.insert((t.to_string(), p.id()), high);
        }
    }
    let last_len = std::cell::Cell::new(0usize);
    let quiet_since = std::cell::Cell::new(Instant::now());
    // Small fetches: Tansu 0.6.0 serves about a hundred records a second to a fetch and answers
    // a fetch of many partitions only once each is read to its byte limit (1 MB by default),
    // which held a read of a few hundred records past its two minutes. This read stops only
    // once every partition has reached its end, so the order records arrive in does not matter.
    let small = [("max.partition.fetch.bytes", "65536"), ("fetch.max.bytes", "1048576")];
    read_topics_in(brokers, topics, Duration::from_secs(120), &small, |r| {
        if r.len() != last_len.get() {
            last_len.set(r.len());
            quiet_since.set(Instant::now());
        }
        quiet_since.get().elapsed() > Duration::from_secs(2)
            && ends.iter().all(|((t, p), end)| {
                *end == 0 || r.iter().any(|x| x.topic == *t && x.partition == *p && x.offset + 1 >= *end)
            })
    })
}
