//! End-to-end benchmark on local servers: a source MongoDB (the monolith), a target MongoDB (the
//! service databases and ficus's store) and a Kafka broker, started like the integration tests
//! start them (`tests/common`), and the real `ficus` binary of this build (release under
//! `cargo bench`), run as child processes so that each one's CPU time and peak memory can be read
//! from `/proc`.
//!
//! Ceilings are measured in the same run, on the same servers, with the same documents
//! (`e2e/ceilings.rs`), with ficus's default settings where it has one:
//! - a bare loop that only reads the change stream (same pipeline and options as the tail) and
//!   produces each change's raw BSON to Kafka with ficus's own producer settings (rdkafka
//!   FutureProducer, idempotent, acks=all, linger 5 ms, lz4), catching up over a backlog and while
//!   documents are being inserted; the same over a collection scan for the snapshot;
//! - a bare bulk-upsert loop (`update` commands of 500 upserts, majority and journaled like the
//!   sink) writing the documents the shipped transforms produce, for consume and replay;
//! - a bare scan of source and target, for verify.
//!
//! The workload is `linechatbot.customers` (~2 KB, `Workload::customer`), consumed by
//! `customers_db`: each insert is one `customer.created` event plus one
//! `customer.purchase_recorded` per purchase (0 to 5), and each event is one upsert in the target.
//! Sizes are in canonical events: `FICUS_BENCH_BACKLOG` (default 10,000) for the backlog the tail
//! catches up over (and consume, archive, replay, verify and the snapshot work on),
//! `FICUS_BENCH_EVENTS` (default 10,000) for each while-inserting run, `FICUS_BENCH_RATE` (1,000
//! events/s) and `FICUS_BENCH_LATENCY_SECS` (10) for the latency run, `FICUS_BENCH_GUARD_EVENTS`
//! (5,000) for the diagnostic pass with the sink's old `$or` guard. `FICUS_BENCH_PHASES` picks
//! phases (comma list of consume, replay, verify, snapshot, headers, live, latency, reverse,
//! cutover; default all;
//! the backlog catch-up always runs), e.g. `FICUS_BENCH_PHASES=none FICUS_BENCH_BACKLOG=1000000`
//! for the tail's memory over a million-event backlog.
//!
//! `FICUS_BENCH_KAFKA_PRODUCER` and `FICUS_BENCH_KAFKA_CONSUMER` (`key=value,…`) add
//! `[kafka.producer]` and `[kafka.consumer]` settings to every ficus run.
//!
//! Every ficus run uses `kafka.ce_headers = false` unless `FICUS_BENCH_CE_HEADERS=true`: Tansu 0.6.0
//! pays dearly for record headers (about 2.5× the CPU to produce and about 130× to fetch a record
//! with ficus's seven headers, measured here), which would make every consuming figure a figure
//! of the broker's header path; the `headers` phase runs the tail catch-up with the other setting,
//! so CPU per event with headers on and off is in every run.
//!
//! The run, in order ([`run`]): [`insert_backlog`], [`bare_catch_up`], [`tail_catch_up`],
//! [`consume`] (with the bare bulk passes), [`archive`] and [`replay`], [`verify`],
//! [`snapshot`], [`headers`], [`live`] (while inserting), [`latency`], then [`goals`]. Each phase
//! adds its figures to [`Figures`] and returns what later phases need; [`Bench`] is what they
//! share (servers, clients, the shipped definitions).
//!
//! Runs only under `cargo bench` (`--bench`); `cargo test --all-targets` just builds it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

#[path = "e2e/ceilings.rs"]
mod ceilings;
#[path = "e2e/probe.rs"]
mod probe;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/workload.rs"]
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::{Bson, Document, Timestamp, doc};
use futures::StreamExt;
use mongodb::{Client, Database};
use serde_json::{Value, json};

use ficus::bus::TopicAdmin;
use ficus::config::topics::Topics;
use ficus::config::{Config, ConfigFile};
use ficus::tail::checkpoint::{CheckpointStore, MongoCheckpoints, StreamPosition, TailPhase, TailState};
use ficus::transform::ServiceTransforms;

use ceilings::{Shape, bare_bulk, bare_scan, bare_snapshot, bare_tail};
use probe::{Cpu, Ficus, Metrics, Procs, Watermarks, cpu_delta};
use report::{Figures, bound_seconds, limit, mb, rate};
use workload::{Set, events_of};

const SOURCE_DB: &str = "linechatbot";
const SOURCE_NAME: &str = "linechatbot";
const COLLECTION: &str = "customers";
const TOPIC: &str = "linechatbot.customers";
const SERVICE: &str = "customers_db";
const RAW_TOPIC: &str = "bench.raw";
const STORE_DB: &str = "ficus";
/// A measured ficus run that makes no progress for this long has failed (and is reported so).
const STALL: Duration = Duration::from_secs(120);

fn main() {
    if !support::bench_mode() {
        println!("e2e: skipped (it starts servers and runs for minutes: `cargo bench --bench e2e`)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    // The orchestration runs on this (the main) thread: children get PR_SET_PDEATHSIG tied to the
    // thread that spawned them, so servers and ficus processes are spawned from here only.
    let report = rt.block_on(run());
    support::publish("e2e", report);
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Every phase in order; the report `support` publishes as `e2e.json`.
async fn run() -> Value {
    let plan = Plan::from_env();
    let b = Bench::start(&plan).await;
    let mut fig = Figures::default();
    let workload = plan.workload(b.ce_headers);
    b.say(&format!("workload: {workload}"));

    let t0 = insert_backlog(&b, &mut fig, &plan.backlog).await;
    let bare_rate = bare_catch_up(&b, &mut fig, &plan.backlog, t0).await;
    let catch_up = tail_catch_up(&b, &mut fig, &plan, bare_rate);
    let consumed = if plan.want("consume") { consume(&b, &mut fig, &plan).await } else { None };
    if plan.want("replay") && archive(&b, &mut fig, &plan) {
        replay(&b, &mut fig, &plan.backlog, consumed.as_ref().map_or(0.0, |c| c.bulk_rate));
    }
    if plan.want("verify") {
        verify(&b, &mut fig, &plan.backlog).await;
    }
    if plan.want("snapshot") {
        snapshot(&b, &mut fig, &plan).await;
    }
    let other_headers_cpu = if plan.want("headers") { headers(&b, &mut fig, &plan, t0, bare_rate).await } else { None };
    if plan.want("live") {
        live(&b, &mut fig, &plan, &catch_up).await;
    }
    if plan.want("latency") {
        latency(&b, &mut fig, &plan).await;
    }
    // Last: it moves customers_db's ownership to the service, after which a shadow replay is
    // refused and the forward consumers merge rather than overwrite.
    if plan.want("reverse")
        && let Some(c) = &consumed
    {
        reverse(&b, &mut fig, &plan, c.rate).await;
    }
    if plan.want("cutover") && plan.want("consume") {
        cutover(&b, &mut fig).await;
    }
    let headers = goals(&b, &mut fig, &plan.backlog, &catch_up, consumed.as_ref(), other_headers_cpu);
    keep_logs(&b);
    b.say("done");

    json!({
        "machine": b.machine,
        "workload": workload,
        "ficus_binary": env!("CARGO_BIN_EXE_ficus"),
        "figures": fig.rows,
        "cpu": fig.phases,
        "headers": headers,
        "verdicts": fig.verdicts,
        "notes": fig.notes,
        "elapsed_s": b.started.elapsed().as_secs_f64(),
    })
}

/// Sizes and phases, from the environment (benches/README.md).
struct Plan {
    /// The backlog the tail catches up over; consume, archive, replay, verify and the snapshot
    /// work on the same data.
    backlog: Set,
    /// The while-inserting runs' sets (ficus's and the bare loop's).
    live_ficus: Set,
    live_bare: Set,
    /// The latency run: events per second, for how long.
    lat_rate: u64,
    lat_secs: u64,
    /// The diagnostic bulk pass with the old `$or` guard.
    guard_events: u64,
    /// `FICUS_BENCH_PHASES`.
    phases: String,
}

impl Plan {
    fn from_env() -> Plan {
        let backlog_events = support::env_u64("FICUS_BENCH_BACKLOG", 10_000);
        let live_events = support::env_u64("FICUS_BENCH_EVENTS", 10_000);
        Plan {
            backlog: Set::sized(1, backlog_events),
            live_ficus: Set::sized(2, live_events),
            live_bare: Set::sized(3, live_events),
            lat_rate: support::env_u64("FICUS_BENCH_RATE", 1_000),
            lat_secs: support::env_u64("FICUS_BENCH_LATENCY_SECS", 10),
            guard_events: support::env_u64("FICUS_BENCH_GUARD_EVENTS", 5_000),
            phases: std::env::var("FICUS_BENCH_PHASES").unwrap_or_else(|_| "all".into()),
        }
    }

    fn listed(&self, phase: &str) -> bool {
        self.phases == "all" || self.phases.split(',').any(|x| x.trim() == phase)
    }

    /// Whether a phase runs: listed, or consume when replay or verify (which need it) are.
    fn want(&self, phase: &str) -> bool {
        self.listed(phase)
            || (phase == "consume" && ["replay", "verify", "reverse", "cutover"].iter().any(|p| self.listed(p)))
    }

    /// How long a tail run over the backlog may take.
    fn tail_timeout(&self) -> Duration {
        Duration::from_secs(120 + self.backlog.events / 100)
    }

    /// How long a consuming run (consume, archive) over the backlog may take.
    fn consume_timeout(&self) -> Duration {
        Duration::from_secs(300 + self.backlog.events / 50)
    }

    fn workload(&self, ce_headers: bool) -> Value {
        json!({
            "ce_headers": ce_headers,
            "kafka_producer": std::env::var("FICUS_BENCH_KAFKA_PRODUCER").unwrap_or_default(),
            "kafka_consumer": std::env::var("FICUS_BENCH_KAFKA_CONSUMER").unwrap_or_default(),
            "collection": "linechatbot.customers (~2 KB, 0-5 purchases each)",
            "backlog": format!("{} docs / {} events", self.backlog.docs, self.backlog.events),
            "while_inserting": format!("{} docs / {} events per run", self.live_ficus.docs, self.live_ficus.events),
            "latency": format!("{} events/s for {} s", self.lat_rate, self.lat_secs),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// What the phases share.

struct Bench {
    /// The source MongoDB (the monolith), Tansu, and the scratch directory for ficus's logs and
    /// configuration files (`tests/common`).
    world: common::World,
    /// The target MongoDB: the service databases and ficus's store.
    target: common::Mongo,
    /// The servers and the bench, for CPU per phase.
    procs: Procs,
    /// ficus's configuration with no file: the defaults the bare loops copy (producer settings,
    /// `tail.max_in_flight`, batch sizes).
    defaults: Config,
    /// `kafka.ce_headers` for every ficus run but the headers phase's (`FICUS_BENCH_CE_HEADERS`).
    ce_headers: bool,
    /// Configuration files: `[kafka] ce_headers = true|false`, plus the bench's Kafka settings.
    headers_on: PathBuf,
    headers_off: PathBuf,
    /// The shipped `topics/` and `transforms/`.
    topics: Topics,
    services: Vec<ServiceTransforms>,
    source_client: Client,
    target_client: Client,
    /// The monolith's database.
    source: Database,
    /// ficus's store (checkpoints).
    store: Database,
    /// Records in the customers topic, and in the bare loops' topic.
    records: Watermarks,
    raw_records: Watermarks,
    machine: Value,
    cores: f64,
    started: Instant,
}

impl Bench {
    /// Starts the servers and creates the topics.
    async fn start(plan: &Plan) -> Bench {
        let machine = support::machine();
        let cores = machine["cores"].as_f64().unwrap_or(2.0);
        let started = Instant::now();
        let topics = ficus::config::topics::load(&repo().join("topics")).unwrap_or_else(|r| panic!("{r}"));
        let services =
            ficus::transform::load_all(&repo().join("transforms"), &topics).unwrap_or_else(|r| panic!("{r}"));

        // secantusd keeps 100,000 oplog entries by default; the backlog must stay in it.
        let oplog = (3 * plan.backlog.events + 200_000).to_string();
        let world = common::World::start_with(&["--oplog-max-entries", &oplog]);
        let target = common::Mongo::start(&world.dir.path().join("target"), &[]);
        let pid = |p: Option<u32>, what: &str| p.unwrap_or_else(|| panic!("no pid for {what}")) as i32;
        let procs = Procs {
            named: vec![
                ("mongo-source", pid(world.mongo.pid(), "source")),
                ("mongo-target", pid(target.pid(), "target")),
                ("kafka", pid(world.kafka.pid(), "kafka")),
                ("bench", std::process::id() as i32),
            ],
        };
        let brokers = world.kafka.brokers();
        let env = |k: &str| (k == "FICUS_KAFKA_BROKERS").then(|| brokers.clone());
        let defaults = Config::from_file(ConfigFile::default(), Path::new("bench"), &env).expect("ficus's defaults");

        // FICUS_BENCH_KAFKA_PRODUCER="linger.ms=50,batch.num.messages=10000": [kafka.producer] for
        // ficus; FICUS_BENCH_KAFKA_CONSUMER likewise [kafka.consumer].
        let section = |var: &str, table: &str| {
            let mut out = String::new();
            for kv in std::env::var(var).unwrap_or_default().split(',').filter(|s| !s.trim().is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{var}: key=value,…"));
                out.push_str(&format!("{:?} = {:?}\n", k.trim(), v.trim()));
            }
            if out.is_empty() { out } else { format!("[{table}]\n{out}") }
        };
        let kafka_sections = format!(
            "{}{}",
            section("FICUS_BENCH_KAFKA_PRODUCER", "kafka.producer"),
            section("FICUS_BENCH_KAFKA_CONSUMER", "kafka.consumer")
        );
        let headers_on = world.dir.path().join("headers-on.toml");
        std::fs::write(&headers_on, format!("[kafka]\nce_headers = true\n{kafka_sections}")).unwrap();
        let headers_off = world.dir.path().join("headers-off.toml");
        std::fs::write(&headers_off, format!("[kafka]\nce_headers = false\n{kafka_sections}")).unwrap();
        let ce_headers = std::env::var("FICUS_BENCH_CE_HEADERS").map(|v| v == "true" || v == "1").unwrap_or(false);

        let source_client = world.mongo.client().await;
        let target_client = target.client().await;
        let say = |what: &str| eprintln!("[e2e {:>6.1}s] {what}", started.elapsed().as_secs_f64());
        say(&format!("servers up in {}", world.dir.path().display()));

        world.apply_topics();
        let raw_cfg: BTreeMap<String, String> = [("cleanup.policy".to_string(), "delete".to_string())].into();
        TopicAdmin::new(&defaults.kafka).unwrap().apply_named(RAW_TOPIC, 6, 1, &raw_cfg).await.expect("bench topic");
        Bench {
            records: Watermarks::new(&defaults.kafka, TOPIC),
            raw_records: Watermarks::new(&defaults.kafka, RAW_TOPIC),
            source: source_client.database(SOURCE_DB),
            store: target_client.database(STORE_DB),
            world,
            target,
            procs,
            defaults,
            ce_headers,
            headers_on,
            headers_off,
            topics,
            services,
            source_client,
            target_client,
            machine,
            cores,
            started,
        }
    }

    fn say(&self, what: &str) {
        eprintln!("[e2e {:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// The bench's service's transforms.
    fn service(&self) -> &ServiceTransforms {
        self.services.iter().find(|s| s.service() == SERVICE).expect("customers_db")
    }

    /// Starts `ficus <args>` with its log in `ficus-<name>.log`, plus `--metrics-addr` for `run`,
    /// and `--config` (the ce_headers setting of the run) unless `args` has one.
    fn spawn(&self, name: &str, args: &[&str]) -> Ficus {
        let mut all: Vec<String> = Vec::new();
        if !args.contains(&"--config") {
            let config = if self.ce_headers { &self.headers_on } else { &self.headers_off };
            all.extend(["--config".to_string(), config.display().to_string()]);
        }
        all.extend(args.iter().map(|s| s.to_string()));
        let metrics = args.contains(&"run").then(|| {
            let p = common::free_port();
            all.extend(["--metrics-addr".to_string(), format!("127.0.0.1:{p}")]);
            p
        });
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        // On top of `tests/common`'s environment (source, brokers): the target server, and
        // quieter logs.
        let target = self.target.uri();
        let topics = repo().join("topics").display().to_string();
        let transforms = repo().join("transforms").display().to_string();
        let env = [
            ("FICUS_SOURCE_DB", SOURCE_DB),
            ("FICUS_TARGET_URI", target.as_str()),
            ("FICUS_STORE_URI", target.as_str()),
            ("FICUS_TOPICS_DIR", topics.as_str()),
            ("FICUS_TRANSFORMS_DIR", transforms.as_str()),
            ("FICUS_LOG", "warn,ficus=info"),
        ];
        Ficus { proc: self.world.spawn_ficus_named(name, &all, &env), metrics }
    }

    /// Runs a ficus command to completion, sampling its peak memory.
    fn run_to_end(&self, name: &str, args: &[&str]) -> Finished {
        let before = probe::children_cpu();
        let started = Instant::now();
        let mut f = self.spawn(name, args);
        let mut peak_rss_mb = None;
        let status = loop {
            if let Some(mb) = f.peak_rss_mb() {
                peak_rss_mb = Some(mb);
            }
            if let Some(st) = f.proc.wait(Duration::ZERO) {
                break st;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = started.elapsed();
        Finished { elapsed, log: f.logs(), ok: status.success(), peak_rss_mb, cpu: probe::children_cpu() - before }
    }

    /// A command's CPU: the servers' over the run, and ficus's own (rusage).
    fn cpu_with_ficus(&self, cpu0: &Cpu, done: &Finished) -> Cpu {
        let mut cpu = cpu_delta(cpu0, &self.procs.snapshot(None));
        cpu.insert("ficus".into(), (done.cpu * 100.0).round() / 100.0);
        cpu
    }

    /// Waits until `progress()` reaches `expect`, sampling RSS and, once a second, everyone's CPU.
    /// `progress` counts from 0. An error after `timeout`, or after `STALL` without progress.
    fn measure(
        &self,
        f: &mut Ficus,
        spawned: Instant,
        expect: u64,
        timeout: Duration,
        mut progress: impl FnMut(&Ficus) -> u64,
    ) -> Result<Run, String> {
        let cpu0 = self.procs.snapshot(Some(f.pid()));
        let mut first: Option<(Instant, u64, Cpu)> = None;
        let mut curve = Vec::new();
        let mut next_mark = 0.0;
        let mut timeline: Vec<Value> = Vec::new();
        let mut next_tick = Instant::now();
        let deadline = Instant::now() + timeout;
        let mut last = (0u64, Instant::now());
        loop {
            f.check_alive();
            let p = progress(f);
            let now = Instant::now();
            if p != last.0 {
                last = (p, now);
            }
            if p > 0 && first.is_none() {
                first = Some((now, p, self.procs.snapshot(Some(f.pid()))));
            }
            if now >= next_tick {
                // Once a second: progress and each process's CPU seconds so far.
                next_tick = now + Duration::from_secs(1);
                let cpu = self.procs.snapshot(Some(f.pid()));
                timeline.push(
                    json!({ "t": ((now - spawned).as_secs_f64() * 10.0).round() / 10.0, "done": p, "cpu_s": cpu }),
                );
            }
            let frac = p as f64 / expect as f64;
            if frac >= next_mark {
                if let Some(rss) = f.rss_mb() {
                    curve.push(((frac * 100.0).round() / 100.0, (rss * 10.0).round() / 10.0));
                }
                next_mark = frac + 0.1;
            }
            if p >= expect {
                let cpu1 = self.procs.snapshot(Some(f.pid()));
                let (t0, p0, cpu_first) = first.unwrap_or((spawned, 0, cpu0.clone()));
                let steady_work = expect - p0.min(expect);
                // CPU over the same window as the steady rate (first progress → done).
                let steady = steady_work > 0;
                return Ok(Run {
                    total: now - spawned,
                    steady: if steady { now - t0 } else { now - spawned },
                    steady_work: if steady { steady_work } else { expect },
                    cpu: cpu_delta(if steady { &cpu_first } else { &cpu0 }, &cpu1),
                    cpu_total: cpu_delta(&cpu0, &cpu1),
                    peak_rss_mb: f.peak_rss_mb(),
                    rss_curve: curve,
                    timeline,
                });
            }
            let stalled = now - last.1 > STALL;
            if now > deadline || stalled {
                let log = f.logs();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                let why = if stalled {
                    format!("no progress for {}s", STALL.as_secs())
                } else {
                    format!("timed out after {timeout:?}")
                };
                return Err(format!("{why} at {p}/{expect}; ficus log (newest first):\n{}", tail.join("\n")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a tail (`ficus run --roles tail` plus `args`) and measures it until the backlog's
    /// events are in Kafka.
    fn tail_over_backlog(&self, name: &str, args: &[&str], plan: &Plan) -> Result<Run, String> {
        let base = self.records.total();
        let spawned = Instant::now();
        let mut f = self.spawn(name, args);
        let r =
            self.measure(&mut f, spawned, plan.backlog.events, plan.tail_timeout(), |_| self.records.total() - base);
        f.stop();
        r
    }

    /// The source's current cluster time (`source` is private to the library).
    async fn cluster_time(&self) -> Timestamp {
        let reply = self.source_client.database(SOURCE_DB).run_command(doc! { "ping": 1 }).await.expect("ping");
        reply
            .get_timestamp("operationTime")
            .or_else(|_| reply.get_document("$clusterTime").and_then(|d| d.get_timestamp("clusterTime")))
            .expect("the source reports its cluster time")
    }

    /// Points the tail's checkpoint at a cluster time: the next `ficus run --roles tail` streams
    /// every change from there (a backlog to catch up over), with no snapshot.
    async fn checkpoint_at(&self, at: Timestamp) {
        let state = TailState {
            source: SOURCE_NAME.into(),
            phase: TailPhase::Stream(StreamPosition { resume_token: None, cluster_time: at, index: 0 }),
            updated_at: bson::DateTime::now(),
            last_event_time: None,
            token_time: None,
            epoch: None,
        };
        MongoCheckpoints::new(&self.store).save(&state).await.expect("writing the tail checkpoint");
    }
}

/// A ficus command run to completion.
struct Finished {
    elapsed: Duration,
    log: String,
    ok: bool,
    peak_rss_mb: Option<f64>,
    /// ficus's CPU seconds (rusage of the waited-for child).
    cpu: f64,
}

/// Progress of one measured ficus run.
struct Run {
    /// Spawn → done.
    total: Duration,
    /// First progress → done (excludes start-up: connecting, lease, consumer group join).
    steady: Duration,
    /// Work done between first progress and done (for the steady rate).
    steady_work: u64,
    /// CPU seconds per process over the steady window.
    cpu: Cpu,
    /// CPU seconds per process, spawn → done.
    cpu_total: Cpu,
    peak_rss_mb: Option<f64>,
    /// RSS samples (progress fraction, MB), to see whether memory grows with the backlog.
    rss_curve: Vec<(f64, f64)>,
    /// Once a second: elapsed, progress, CPU seconds per process (cumulative).
    timeline: Vec<Value>,
}

impl Run {
    /// Changes per second of a tail run over `set`, from its steady window in events.
    fn changes_per_sec(&self, set: &Set) -> f64 {
        rate(set.docs, self.steady) * self.steady_work as f64 / set.events as f64
    }
}

// ---------------------------------------------------------------------------------------------
// Source → Kafka, catching up.

/// The backlog, inserted while nothing tails, after a tail checkpoint; returns the checkpoint's
/// time (every catch-up starts there).
async fn insert_backlog(b: &Bench, fig: &mut Figures, backlog: &Set) -> Timestamp {
    let t0 = b.cluster_time().await;
    b.checkpoint_at(t0).await;
    let cpu0 = b.procs.snapshot(None);
    let ins = backlog.insert(&b.source, 1000).await;
    let cpu1 = b.procs.snapshot(None);
    fig.phase(
        "insert backlog (insert_many of 1000)",
        backlog.events,
        ins,
        &cpu_delta(&cpu0, &cpu1),
        json!({ "docs": backlog.docs, "docs_per_sec": rate(backlog.docs, ins) }),
    );
    b.say(&format!("backlog inserted: {} docs in {:.1}s", backlog.docs, ins.as_secs_f64()));
    t0
}

/// The bare tail over the backlog from `t0`: three runs (one for a large backlog), the median is
/// the ceiling. Returns it in changes/s.
async fn bare_catch_up(b: &Bench, fig: &mut Figures, backlog: &Set, t0: Timestamp) -> f64 {
    let repeats = if backlog.docs < 50_000 { 3 } else { 1 };
    let mut runs = Vec::new();
    let cpu0 = b.procs.snapshot(None);
    for _ in 0..repeats {
        let limit = Duration::from_secs(120 + backlog.docs / 200);
        let run = tokio::time::timeout(limit, bare_tail(b.source.clone(), b.defaults.clone(), t0, backlog.docs)).await;
        runs.push(
            run.unwrap_or_else(|_| panic!("the bare tail did not see {} changes within {limit:?}", backlog.docs)),
        );
    }
    let cpu1 = b.procs.snapshot(None);
    runs.sort();
    let bare_catchup = runs[runs.len() / 2];
    // CPU of the three runs, scaled to one.
    let bare_cpu: Cpu =
        cpu_delta(&cpu0, &cpu1).into_iter().map(|(k, v)| (k, (v / 3.0 * 100.0).round() / 100.0)).collect();
    let bare_rate = rate(backlog.docs, bare_catchup);
    let runs_s: Vec<f64> = runs.iter().map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0).collect();
    fig.phase(
        "bare tail, catching up (median of the runs)",
        backlog.docs,
        bare_catchup,
        &bare_cpu,
        json!({ "unit": "changes", "runs_s": runs_s }),
    );
    b.say(&format!("bare tail catch-up: {bare_rate:.0} changes/s"));
    bare_rate
}

/// What the tail's catch-up found, for the goals and the while-inserting verdicts.
struct CatchUp {
    /// The bare tail's changes/s (the ceiling) and ficus's, and whether ficus made ≥ 0.8×.
    bare_rate: f64,
    changes: f64,
    met: bool,
    peak_rss_mb: Option<f64>,
    cpu: Cpu,
    /// What limited it (`limit`, `bound_seconds`).
    limit: String,
}

/// `ficus run --roles tail` from the checkpoint before the backlog, until every event is in
/// Kafka (a failure here fails the bench).
fn tail_catch_up(b: &Bench, fig: &mut Figures, plan: &Plan, bare_rate: f64) -> CatchUp {
    let backlog = &plan.backlog;
    let r = b
        .tail_over_backlog("tail-catchup", &["run", "--roles", "tail"], plan)
        .unwrap_or_else(|e| panic!("ficus tail catch-up failed: {e}"));
    let changes = r.changes_per_sec(backlog);
    let events = rate(r.steady_work, r.steady);
    let met = changes >= 0.8 * bare_rate;
    fig.add(
        "source → Kafka, catching up (changes/s)",
        Some(changes),
        "changes/s",
        Some(bare_rate),
        Some(("≥ 0.8× bare loop", met)),
        json!({ "events_per_sec": events, "startup_s": (r.total - r.steady).as_secs_f64(), "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    fig.phase(
        &format!("ficus tail, catching up (ce_headers {})", if b.ce_headers { "on" } else { "off" }),
        backlog.events,
        r.steady,
        &r.cpu,
        json!({ "cpu_incl_startup_s": r.cpu_total,  "changes": backlog.docs, "peak_rss_mb": mb(r.peak_rss_mb), "rss_curve": r.rss_curve }),
    );
    let rss = r.peak_rss_mb;
    fig.add(
        &format!("peak RSS, tail catching up over {} events (MB)", backlog.events),
        rss,
        "MB",
        None,
        Some(("≤ 150 MB at 1M events", rss.is_some_and(|m| m <= 150.0))),
        json!({ "rss_curve": r.rss_curve }),
    );
    b.say(&format!("ficus tail catch-up: {changes:.0} changes/s ({events:.0} events/s), peak RSS {rss:?} MB"));
    CatchUp {
        bare_rate,
        changes,
        met,
        peak_rss_mb: rss,
        limit: format!("{}; {}", limit(&r.cpu, r.steady, b.cores), bound_seconds(&r.timeline)),
        cpu: r.cpu,
    }
}

// ---------------------------------------------------------------------------------------------
// Kafka → target.

/// What the consume phase found, for replay and the goals.
struct Consumed {
    peak_rss_mb: Option<f64>,
    cpu: Cpu,
    /// The plain bare bulk loop's upserts/s: the ceiling of consume and replay.
    bulk_rate: f64,
    /// ficus's forward consume rate (events/s): the ceiling the reverse direction is held to.
    rate: f64,
}

/// `ficus run --roles consume --service customers_db` over the backlog's events, then the bare
/// bulk passes (the ceiling and the guard diagnostics). `None` if ficus failed (a verdict says
/// why).
async fn consume(b: &Bench, fig: &mut Figures, plan: &Plan) -> Option<Consumed> {
    let backlog = &plan.backlog;
    let spawned = Instant::now();
    let mut f = b.spawn("consume", &["run", "--roles", "consume", "--service", SERVICE]);
    let r = match b.measure(&mut f, spawned, backlog.events, plan.consume_timeout(), Ficus::applied) {
        Ok(r) => r,
        Err(e) => {
            f.stop();
            fig.verdicts.push(format!("consume: FAILED: {e}"));
            return None;
        }
    };
    let stats = probe::consume_stats(&Metrics::default(), &f.scrape(), r.steady);
    f.stop();
    let consume_rate = rate(r.steady_work, r.steady);
    let rss = r.peak_rss_mb;
    let consume_limit = format!("{}; {}", limit(&r.cpu, r.steady, b.cores), bound_seconds(&r.timeline));
    fig.phase(
        "ficus consume customers_db",
        backlog.events,
        r.steady,
        &r.cpu,
        json!({ "peak_rss_mb": mb(rss), "rss_curve": r.rss_curve, "consumer": stats, "timeline": r.timeline }),
    );
    b.say(&format!("ficus consume: {consume_rate:.0} events/s, peak RSS {rss:?} MB, {stats}"));

    let bulk = bare_bulks(b, fig, plan).await;
    let bulk_rate = bulk["Plain"].rate;
    for (shape, what) in
        [("GuardOr", "with the sink's `$or` version guard"), ("GuardNot", "with the guard as `$not: {$gte}`")]
    {
        fig.add(
            &format!("diagnostic: bare bulk upsert {what} (upserts/s, {} events)", bulk[shape].upserts),
            Some(bulk[shape].rate),
            "upserts/s",
            Some(bulk_rate),
            None,
            json!({ "target_cpu_us_per_upsert": bulk[shape].target_us, "plain_target_cpu_us_per_upsert": bulk["Plain"].target_us }),
        );
    }
    // The echo-tagging transaction (customers_db writes back, so every one of its forward
    // batches is a marked transaction): its cost, the guarded bulk loop with and without it.
    let (marked, unmarked) = (&bulk["GuardNotMarked"], &bulk["GuardNot"]);
    let marker_cost = 1.0 - marked.rate / unmarked.rate;
    let marker_met = marker_cost <= 0.10;
    fig.add(
        "bare guarded bulk upsert, each batch a marked transaction (upserts/s)",
        Some(marked.rate),
        "upserts/s",
        Some(unmarked.rate),
        Some(("costs ≤ 10% of the unmarked guarded loop", marker_met)),
        json!({ "cost": marker_cost, "target_cpu_us_per_upsert": marked.target_us, "unmarked_target_cpu_us_per_upsert": unmarked.target_us }),
    );
    if !marker_met {
        fig.verdicts
            .push(format!("the echo-tagging transaction costs {:.0}% of the guarded bulk loop", marker_cost * 100.0));
    }
    let met = consume_rate >= 0.8 * bulk_rate;
    fig.add(
        "Kafka → target, customers_db (events/s)",
        Some(consume_rate),
        "events/s",
        Some(bulk_rate),
        Some(("≥ 0.8× bare bulk loop", met)),
        json!({ "startup_s": (r.total - r.steady).as_secs_f64(), "peak_rss_mb": mb(rss) }),
    );
    if !met {
        fig.verdicts.push(format!("Kafka → target missed ({:.2}×): {consume_limit}", consume_rate / bulk_rate));
    }
    fig.add(
        &format!("peak RSS, consume over {} events (MB)", backlog.events),
        rss,
        "MB",
        None,
        Some(("≤ 150 MB at 1M events", rss.is_some_and(|m| m <= 150.0))),
        json!({}),
    );
    Some(Consumed { peak_rss_mb: rss, cpu: r.cpu, bulk_rate, rate: consume_rate })
}

/// Reverse sync over the consumed documents, against forward sync of the same change:
/// first every monolith customer changed (one `updateMany` of one field), tailed onto Kafka and
/// consumed by customers_db (`ficus run --roles consume`, timed like the consume phase); then
/// `ficus cutover --to 100 --force`, every customers_db customer changed by the service (one
/// `updateMany` of the field that one maps to), and `ficus run --roles reverse` (the reverse
/// tail and the write-back consumer) until each change is a patch of its monolith document.
/// Held to ≥ 0.8× the forward rate over those same documents and the same kind of change (the
/// backlog's consume rate is per event, most of them small derived events: shown beside it).
async fn reverse(b: &Bench, fig: &mut Figures, plan: &Plan, backlog_rate: f64) {
    // The reverse topics exist already; this turns on pre-images in the bench's target server.
    let topics = b.run_to_end("topics", &["topics", "apply"]);
    if !topics.ok {
        fig.verdicts.push(format!("reverse: FAILED: ficus topics apply: {}", topics.log.lines().last().unwrap_or("")));
        return;
    }
    let forward_rate = match forward_updates(b, fig, plan).await {
        Ok(r) => r,
        Err(e) => {
            fig.verdicts.push(format!("reverse: FAILED: the forward run over the same documents: {e}"));
            return;
        }
    };
    let to = b.run_to_end("cutover", &["cutover", "--service", SERVICE, "--to", "100", "--force"]);
    if !to.ok {
        fig.verdicts.push(format!("reverse: FAILED: ficus cutover: {}", to.log.lines().last().unwrap_or("")));
        return;
    }
    let spawned = Instant::now();
    let mut f = b.spawn("reverse", &["run", "--roles", "reverse", "--service", SERVICE]);
    let customers = b.target_client.database(SERVICE).collection::<Document>("customers");
    let changed = customers
        .update_many(doc! {}, doc! { "$set": { "displayName": "changed by the service" } })
        .await
        .expect("service-side update")
        .modified_count;
    let r = match b.measure(&mut f, spawned, changed, plan.consume_timeout(), Ficus::applied) {
        Ok(r) => r,
        Err(e) => {
            f.stop();
            fig.verdicts.push(format!("reverse: FAILED: {e}"));
            return;
        }
    };
    f.stop();
    let reverse_rate = rate(r.steady_work, r.steady);
    let written =
        b.source.collection::<Document>(COLLECTION).count_documents(doc! { "name": "changed by the service" }).await;
    fig.phase(
        "ficus reverse customers_db (reverse tail + write-back)",
        changed,
        r.steady,
        &r.cpu,
        json!({ "peak_rss_mb": mb(r.peak_rss_mb), "timeline": r.timeline, "monolith_documents_patched": written.ok() }),
    );
    let met = reverse_rate >= 0.8 * forward_rate;
    fig.add(
        "service → monolith, customers_db (changes/s)",
        Some(reverse_rate),
        "changes/s",
        Some(forward_rate),
        Some(("≥ 0.8× forward sync of the same documents", met)),
        json!({
            "startup_s": (r.total - r.steady).as_secs_f64(),
            "peak_rss_mb": mb(r.peak_rss_mb),
            "against_backlog_consume_events_per_sec": backlog_rate,
        }),
    );
    if !met {
        fig.verdicts.push(format!("reverse missed ({:.2}× forward)", reverse_rate / forward_rate));
    }
    b.say(&format!("ficus reverse: {reverse_rate:.0} changes/s over {changed} service changes"));
}

/// Forward sync of one change to every consumed customer: a monolith `updateMany` of one field
/// (`name`), published by `ficus run --roles tail`, then applied by `ficus run --roles consume`
/// (timed from its first write, like the consume phase). Its changes/s is what reverse sync is
/// held to.
async fn forward_updates(b: &Bench, fig: &mut Figures, plan: &Plan) -> Result<f64, String> {
    let base = b.records.total();
    let changed = b
        .source
        .collection::<Document>(COLLECTION)
        .update_many(doc! {}, doc! { "$set": { "name": "changed by the monolith" } })
        .await
        .map_err(|e| format!("monolith-side update: {e}"))?
        .modified_count;
    let spawned = Instant::now();
    let mut tail = b.spawn("forward-tail", &["run", "--roles", "tail"]);
    let published = b.measure(&mut tail, spawned, changed, plan.tail_timeout(), |_| b.records.total() - base);
    tail.stop();
    published?;
    let spawned = Instant::now();
    let mut f = b.spawn("forward-updates", &["run", "--roles", "consume", "--service", SERVICE]);
    let r = b.measure(&mut f, spawned, changed, plan.consume_timeout(), Ficus::applied);
    f.stop();
    let r = r?;
    let forward_rate = rate(r.steady_work, r.steady);
    fig.phase(
        "ficus consume customers_db, one monolith change per customer",
        changed,
        r.steady,
        &r.cpu,
        json!({ "peak_rss_mb": mb(r.peak_rss_mb), "timeline": r.timeline }),
    );
    fig.add(
        "monolith → service, customers_db, one change per customer (changes/s)",
        Some(forward_rate),
        "changes/s",
        None,
        None,
        json!({ "startup_s": (r.total - r.steady).as_secs_f64(), "changes": changed }),
    );
    b.say(&format!("ficus forward: {forward_rate:.0} changes/s over {changed} monolith changes"));
    Ok(forward_rate)
}

/// The safe cutover's fence window: customers_db from 0% to 50% (`ficus cutover`, every step)
/// under `ficus run` while the monolith's customers change at 1,000 changes/s. How long writes
/// to the moving keys are held (fence → flip) against the drain inside it, which is the floor
/// (the consumers must commit past the marker: Kafka's auto-commit interval and the broker's
/// fetch wait), and the whole step.
async fn cutover(b: &Bench, fig: &mut Figures) {
    // `FICUS_BENCH_CUTOVER_RATE`: monolith changes per second while the move runs.
    let rate: u64 = support::env_u64("FICUS_BENCH_CUTOVER_RATE", 1_000);
    // From wherever earlier phases left ownership (the reverse phase forces 100%).
    let reset = b.run_to_end("cutover-reset", &["cutover", "--service", SERVICE, "--to", "0", "--force"]);
    if !reset.ok {
        fig.verdicts.push(format!("cutover: FAILED: reset to 0%: {}", reset.log.lines().last().unwrap_or("")));
        return;
    }
    probe::skip_to_end(&b.defaults.kafka, &ficus::consume::group_id(SERVICE), TOPIC);
    b.checkpoint_at(b.cluster_time().await).await;
    // No archive role: it would start reading every topic from the start, which Tansu 0.6.0
    // serves at about a hundred records a second while answering little else (README, caveats).
    let mut f = b.spawn("cutover-run", &["run", "--roles", "tail,consume,reverse", "--service", SERVICE]);
    f.wait_log("streaming changes", Duration::from_secs(60));
    f.wait_log("partitions assigned", Duration::from_secs(60));
    let ids: Vec<bson::Bson> = {
        use futures::TryStreamExt;
        let docs: Vec<Document> = b
            .source
            .collection::<Document>(COLLECTION)
            .find(doc! {})
            .projection(doc! { "user_id": 1 })
            .limit(5_000)
            .await
            .expect("customers")
            .try_collect()
            .await
            .expect("customers");
        docs.into_iter().filter_map(|d| d.get("user_id").cloned()).collect()
    };
    // `rate` changes/s: a twentieth of it every 50 ms, round the collection.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (coll, stop, ids) = (b.source.collection::<Document>(COLLECTION), stop.clone(), ids.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let (mut at, mut written) = (0usize, 0u64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && !ids.is_empty() {
                tick.tick().await;
                let batch: Vec<bson::Bson> =
                    (0..(rate / 20).max(1) as usize).map(|i| ids[(at + i) % ids.len()].clone()).collect();
                at += batch.len();
                let r =
                    coll.update_many(doc! { "user_id": { "$in": batch } }, doc! { "$inc": { "stats.msgs": 1 } }).await;
                written += r.map_or(0, |r| r.modified_count);
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let moved = b.run_to_end("cutover-50", &["cutover", "--service", SERVICE, "--to", "50", "--timeout", "600"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await.unwrap_or(0);
    f.stop();
    if !moved.ok {
        fig.verdicts
            .push(format!("cutover: FAILED: {}", moved.log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")));
        return;
    }
    // "[4/8] drain done in 5.2s: …", "… were held 7.9s (fence → flip)".
    let step = |name: &str| {
        moved.log.lines().find_map(|l| {
            let rest = l.split_once(&format!("] {name} done in "))?.1;
            rest.split_once('s')?.0.parse::<f64>().ok()
        })
    };
    let held = moved.log.lines().find_map(|l| {
        let rest = l.split_once("were held ")?.1;
        rest.split_once("s (fence")?.0.parse::<f64>().ok()
    });
    let (drain, verify) = (step("drain"), step("verify"));
    let total = moved.elapsed.as_secs_f64();
    let own = held.zip(drain).map(|(h, d)| h - d);
    let met = held.zip(drain).is_some_and(|(h, d)| d >= 0.5 * h);
    fig.add(
        &format!("fence window, customers_db 0 → 50% at {rate} changes/s (s)"),
        held,
        "s",
        drain,
        Some(("a few seconds, dominated by the drain", met)),
        json!({ "drain_s": drain, "verify_s": verify, "ficus_own_s": own, "monolith_changes_meanwhile": written,
                "steps": moved.log.lines().filter(|l| l.starts_with('[')).collect::<Vec<_>>() }),
    );
    fig.add(
        "whole cutover step, customers_db 0 → 50% (s)",
        Some(total),
        "s",
        None,
        None,
        json!({ "peak_rss_mb": mb(moved.peak_rss_mb), "cpu_s": moved.cpu }),
    );
    if !met {
        fig.verdicts.push(format!(
            "cutover: the fence window ({held:?} s) is not dominated by the drain ({drain:?} s; verify {verify:?} s)"
        ));
    }
    b.say(&format!(
        "cutover 0 → 50%: writes held {held:?} s (drain {drain:?} s, verify {verify:?} s), step {total:.1} s"
    ));
}

/// One bare bulk pass.
struct Bulk {
    rate: f64,
    /// The target server's CPU µs per upsert.
    target_us: f64,
    upserts: u64,
}

/// The bare bulk loop over the backlog's target documents, plain (the ceiling) and with the
/// sink's guard as `$not: {$gte}`, each into a database of its own; and with the old `$or`
/// guard, which makes each upsert scan the collection on secantusd (quadratic), over the first
/// `FICUS_BENCH_GUARD_EVENTS` events only. Keyed by the shape's name.
async fn bare_bulks(b: &Bench, fig: &mut Figures, plan: &Plan) -> HashMap<String, Bulk> {
    let guard_set = Set::sized(1, plan.guard_events.min(plan.backlog.events));
    let mut bulk = HashMap::new();
    for (shape, db, set) in [
        (Shape::Plain, "bench_bulk", &plan.backlog),
        (Shape::GuardNot, "bench_bulk_guard_not", &plan.backlog),
        (Shape::GuardOr, "bench_bulk_guard_or", &guard_set),
        (Shape::GuardNotMarked, "bench_bulk_guard_marked", &plan.backlog),
    ] {
        let cpu0 = b.procs.snapshot(None);
        let (time, n) = bare_bulk(&b.target_client.database(db), &b.defaults, &b.topics, b.service(), set, shape).await;
        let cpu = cpu_delta(&cpu0, &b.procs.snapshot(None));
        let r = rate(n, time);
        fig.phase(
            &format!("bare bulk upsert ({shape:?})"),
            n,
            time,
            &cpu,
            json!({ "note": "wall: the timed writes; bench CPU also computes the documents (untimed)" }),
        );
        b.say(&format!("bare bulk upsert ({shape:?}): {r:.0} upserts/s over {n}"));
        let target_us = cpu.get("mongo-target").copied().unwrap_or(0.0) * 1e6 / n as f64;
        bulk.insert(format!("{shape:?}"), Bulk { rate: r, target_us, upserts: n });
    }
    bulk
}

// ---------------------------------------------------------------------------------------------
// The event store: archive, replay, verify.

/// `ficus run --roles archive` until the backlog's events are in the event store. False if it
/// failed (a verdict says why; replay is skipped).
fn archive(b: &Bench, fig: &mut Figures, plan: &Plan) -> bool {
    let backlog = &plan.backlog;
    let spawned = Instant::now();
    let mut f = b.spawn("archive", &["run", "--roles", "archive"]);
    let archived = |f: &Ficus| f.scrape().sum("ficus_events_archived_total", "") as u64;
    let r = match b.measure(&mut f, spawned, backlog.events, plan.consume_timeout(), archived) {
        Ok(r) => r,
        Err(e) => {
            f.stop();
            fig.verdicts.push(format!("replay: FAILED: {e}"));
            return false;
        }
    };
    f.stop();
    let archive_rate = rate(r.steady_work, r.steady);
    fig.phase("ficus archive", backlog.events, r.steady, &r.cpu, json!({ "peak_rss_mb": mb(r.peak_rss_mb) }));
    fig.add(
        "archive into the event store (events/s)",
        Some(archive_rate),
        "events/s",
        None,
        None,
        json!({ "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    b.say(&format!("ficus archive: {archive_rate:.0} events/s"));
    true
}

/// `ficus replay --service customers_db` (shadow build from the event store, swap), wall time,
/// against the bare bulk loop.
fn replay(b: &Bench, fig: &mut Figures, backlog: &Set, bulk_rate: f64) {
    let cpu0 = b.procs.snapshot(None);
    let done = b.run_to_end("replay", &["replay", "--service", SERVICE]);
    let cpu = b.cpu_with_ficus(&cpu0, &done);
    assert!(done.ok, "ficus replay failed:\n{}", done.log);
    let replay_rate = rate(backlog.events, done.elapsed);
    let replay_limit = limit(&cpu, done.elapsed, b.cores);
    let met = replay_rate >= 0.8 * bulk_rate;
    let peak = done.peak_rss_mb;
    fig.phase("ficus replay customers_db", backlog.events, done.elapsed, &cpu, json!({ "peak_rss_mb": mb(peak) }));
    fig.add(
        "replay customers_db (events/s)",
        Some(replay_rate),
        "events/s",
        Some(bulk_rate),
        Some(("≥ 0.8× bare bulk loop", met)),
        json!({ "ficus_says": done.log.lines().rev().find(|l| l.contains("events/s")).unwrap_or("").trim(), "peak_rss_mb": mb(peak) }),
    );
    if !met {
        fig.verdicts.push(format!("replay missed ({:.2}×): {replay_limit}", replay_rate / bulk_rate));
    }
    b.say(&format!("ficus replay: {replay_rate:.0} events/s"));
}

/// `ficus verify --service customers_db`, wall time in source documents per second (and whether
/// it says consistent), against a bare scan of source and target.
async fn verify(b: &Bench, fig: &mut Figures, backlog: &Set) {
    let collections: Vec<String> = b.service().collections().into_iter().collect();
    let (scan_time, scanned) = bare_scan(&b.source, &b.target_client.database(SERVICE), &collections).await;
    let scan_rate = rate(scanned, scan_time);
    let cpu0 = b.procs.snapshot(None);
    let done = b.run_to_end("verify", &["verify", "--service", SERVICE]);
    let cpu = b.cpu_with_ficus(&cpu0, &done);
    let (ok, peak) = (done.ok, done.peak_rss_mb);
    let verify_rate = rate(backlog.docs, done.elapsed);
    fig.phase(
        "ficus verify customers_db",
        backlog.docs,
        done.elapsed,
        &cpu,
        json!({ "unit": "source documents", "peak_rss_mb": mb(peak), "exit_ok": ok }),
    );
    fig.add(
        "verify customers_db (source docs/s)",
        Some(verify_rate),
        "docs/s",
        Some(scan_rate),
        None,
        json!({ "consistent": ok, "ceiling_is": "bare scan of source and target", "peak_rss_mb": mb(peak) }),
    );
    if !ok {
        fig.notes.push(format!("verify reported drift after consume + replay:\n{}", done.log));
    }
    b.say(&format!("ficus verify: {verify_rate:.0} docs/s (exit ok: {ok})"));
}

// ---------------------------------------------------------------------------------------------
// Source → Kafka: the snapshot, the other ce_headers setting, while inserting.

/// The initial snapshot (fresh: `--resnapshot`) over the backlog's documents, against the bare
/// scan → Kafka.
async fn snapshot(b: &Bench, fig: &mut Figures, plan: &Plan) {
    let backlog = &plan.backlog;
    let raw_base = b.raw_records.total();
    let cpu0 = b.procs.snapshot(None);
    let bare_snap = bare_snapshot(b.source.clone(), b.defaults.clone(), backlog.docs).await;
    let cpu1 = b.procs.snapshot(None);
    assert_eq!(b.raw_records.total() - raw_base, backlog.docs);
    let bare_snap_rate = rate(backlog.docs, bare_snap);
    fig.phase(
        "bare snapshot (scan → Kafka)",
        backlog.docs,
        bare_snap,
        &cpu_delta(&cpu0, &cpu1),
        json!({ "unit": "documents" }),
    );

    let r = match b.tail_over_backlog("snapshot", &["run", "--roles", "tail", "--resnapshot"], plan) {
        Ok(r) => r,
        Err(e) => {
            fig.verdicts.push(format!("snapshot: FAILED: {e}"));
            return;
        }
    };
    let snap_docs = r.changes_per_sec(backlog);
    fig.phase(
        "ficus initial snapshot",
        backlog.events,
        r.steady,
        &r.cpu,
        json!({ "docs": backlog.docs, "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    fig.add(
        "initial snapshot (docs/s)",
        Some(snap_docs),
        "docs/s",
        Some(bare_snap_rate),
        None,
        json!({ "events_per_sec": rate(r.steady_work, r.steady), "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    b.say(&format!("ficus snapshot: {snap_docs:.0} docs/s (bare {bare_snap_rate:.0})"));
}

/// The tail's catch-up again from `t0`, with the other `kafka.ce_headers` setting than every
/// other run's: CPU per event with headers on and off. Returns that run's CPU.
async fn headers(b: &Bench, fig: &mut Figures, plan: &Plan, t0: Timestamp, bare_rate: f64) -> Option<Cpu> {
    let backlog = &plan.backlog;
    b.checkpoint_at(t0).await;
    let (other, other_name) = if b.ce_headers { (&b.headers_off, "off") } else { (&b.headers_on, "on") };
    let other = other.display().to_string();
    let args = ["run", "--config", other.as_str(), "--roles", "tail"];
    let r = match b.tail_over_backlog(&format!("tail-headers-{other_name}"), &args, plan) {
        Ok(r) => r,
        Err(e) => {
            fig.verdicts.push(format!("headers: FAILED: {e}"));
            return None;
        }
    };
    let changes = r.changes_per_sec(backlog);
    fig.phase(
        &format!("ficus tail, catching up (ce_headers {other_name})"),
        backlog.events,
        r.steady,
        &r.cpu,
        json!({ "changes": backlog.docs, "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    fig.add(
        &format!("source → Kafka, catching up, ce_headers {other_name} (changes/s)"),
        Some(changes),
        "changes/s",
        Some(bare_rate),
        None,
        json!({ "events_per_sec": rate(r.steady_work, r.steady) }),
    );
    b.say(&format!("ficus tail catch-up with ce_headers {other_name}: {changes:.0} changes/s"));
    Some(r.cpu)
}

/// While inserting: a ficus tail already streaming while its set is inserted (`insert_many` of
/// 100), from the first insert to the last event in Kafka; then the bare loop over its own set,
/// inserted the same way. Also gives the source → Kafka verdicts, catching up and while
/// inserting.
async fn live(b: &Bench, fig: &mut Figures, plan: &Plan, catch_up: &CatchUp) {
    let (ficus_set, bare_set) = (plan.live_ficus, plan.live_bare);
    let spawned = Instant::now();
    let mut f = b.spawn("tail-live", &["run", "--roles", "tail"]);
    f.wait_log("streaming changes", Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = b.records.total();
    let insert_started = Instant::now();
    let source = b.source.clone();
    let inserter = tokio::spawn(async move { ficus_set.insert(&source, 100).await });
    let r = match b.measure(&mut f, spawned, ficus_set.events, plan.tail_timeout(), |_| b.records.total() - base) {
        Ok(r) => r,
        Err(e) => {
            f.stop();
            fig.verdicts.push(format!("live: FAILED: {e}"));
            return;
        }
    };
    let live_wall = insert_started.elapsed();
    let live_insert = inserter.await.unwrap();
    f.stop();
    let live_rate = rate(ficus_set.docs, live_wall);
    fig.phase(
        "ficus tail while inserting",
        ficus_set.events,
        live_wall,
        &r.cpu,
        json!({ "changes": ficus_set.docs, "insert_s": live_insert.as_secs_f64(), "peak_rss_mb": mb(r.peak_rss_mb) }),
    );

    let t = b.cluster_time().await;
    let cpu0 = b.procs.snapshot(None);
    let bare = tokio::spawn(bare_tail(b.source.clone(), b.defaults.clone(), t, bare_set.docs));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let insert_started = Instant::now();
    let bare_insert = bare_set.insert(&b.source, 100).await;
    bare.await.unwrap();
    let bare_live_wall = insert_started.elapsed();
    let cpu1 = b.procs.snapshot(None);
    let bare_live_rate = rate(bare_set.docs, bare_live_wall);
    fig.phase(
        "bare tail while inserting",
        bare_set.docs,
        bare_live_wall,
        &cpu_delta(&cpu0, &cpu1),
        json!({ "insert_s": bare_insert.as_secs_f64(), "note": "bench CPU includes the inserts" }),
    );
    let met_live = live_rate >= 0.8 * bare_live_rate;
    fig.add(
        "source → Kafka, while inserting (changes/s)",
        Some(live_rate),
        "changes/s",
        Some(bare_live_rate),
        Some(("≥ 0.8× bare loop", met_live)),
        json!({ "insert_only_changes_per_sec": rate(ficus_set.docs, live_insert), "events_per_sec": rate(ficus_set.events, live_wall) }),
    );
    b.say(&format!("while inserting: ficus {live_rate:.0} changes/s, bare {bare_live_rate:.0} changes/s"));
    if !catch_up.met {
        fig.verdicts.push(format!(
            "source → Kafka catching up missed ({:.2}×): {}",
            catch_up.changes / catch_up.bare_rate,
            catch_up.limit
        ));
    }
    if !met_live {
        fig.verdicts.push(format!(
            "source → Kafka while inserting missed ({:.2}×): {}",
            live_rate / bare_live_rate,
            limit(&r.cpu, live_wall, b.cores)
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// End-to-end latency.

/// Tail + consume in one process, caught up (the group moved to the end of the topic, the tail's
/// checkpoint to now); customers inserted at `FICUS_BENCH_RATE` events/s ([`measure_latency`]).
async fn latency(b: &Bench, fig: &mut Figures, plan: &Plan) {
    let lat_rate = plan.lat_rate;
    probe::skip_to_end(&b.defaults.kafka, &ficus::consume::group_id(SERVICE), TOPIC);
    b.checkpoint_at(b.cluster_time().await).await;
    let mut f = b.spawn("latency", &["run", "--roles", "tail,consume", "--service", SERVICE]);
    f.wait_log("streaming changes", Duration::from_secs(60));
    f.wait_log("partitions assigned", Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lat = measure_latency(b, plan, &mut f).await;
    f.stop();
    fig.phase(
        &format!("latency run ({lat_rate} events/s, tail + consume)"),
        lat.events,
        lat.wall,
        &lat.cpu,
        json!({ "peak_rss_mb": mb(lat.peak_rss), "consumer": lat.stats, "applied_per_sec": rate(lat.events, lat.wall) }),
    );
    let p99 = lat.exact.get(2).copied().flatten();
    let met = p99.is_some_and(|p| p <= 100.0);
    for (i, q) in ["p50", "p95", "p99"].iter().enumerate() {
        fig.add(
            &format!("end-to-end latency {q} at {lat_rate} ev/s (ms)"),
            lat.exact[i],
            "ms",
            None,
            if *q == "p99" { Some(("≤ 100 ms", met)) } else { None },
            json!({ "from_ficus_histogram_ms": lat.histogram[i], "samples": lat.samples }),
        );
    }
    if !met {
        fig.verdicts.push(format!(
            "p99 latency missed ({:?} ms): {}",
            p99.map(|p| p.round()),
            limit(&lat.cpu, lat.wall, b.cores)
        ));
    }
    b.say(&format!("latency p50/p95/p99 {:?} ms (histogram {:?}), consumer {}", lat.exact, lat.histogram, lat.stats));
}

struct Latency {
    /// p50, p95, p99 in ms: measured per target write, and from ficus's histogram.
    exact: [Option<f64>; 3],
    histogram: [Option<f64>; 3],
    samples: usize,
    events: u64,
    wall: Duration,
    cpu: Cpu,
    peak_rss: Option<f64>,
    /// The consumer's own view: batches, their sizes and time in the sink.
    stats: Value,
}

/// Inserts customers at the plan's rate for its seconds, each batch stamped with the time just
/// before its insert, and watches the target (a change stream on customers_db): a target write's
/// latency is its `wallTime` (or, without one, when the watcher saw it) minus its source insert's
/// stamp. Also reads ficus's own `ficus_end_to_end_latency_seconds` histogram.
async fn measure_latency(b: &Bench, plan: &Plan, f: &mut Ficus) -> Latency {
    let (rate_, secs) = (plan.lat_rate, plan.lat_secs);
    let set = Set::sized(4, rate_ * secs);
    let docs: Vec<Document> = set.chunks().flatten().collect();
    // Target _id → index of the source document it comes from.
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (i, d) in docs.iter().enumerate() {
        keys.insert(d.get_str("user_id").unwrap().to_string(), i);
        for p in d.get_array("purchases").unwrap() {
            if let Bson::Document(p) = p {
                keys.insert(format!("purchase_made:{}", p.get_str("id").unwrap()), i);
            }
        }
    }
    let expect_writes = keys.len();
    let mut watch = b
        .target_client
        .database(SERVICE)
        .watch()
        .pipeline([doc! { "$match": { "operationType": { "$in": ["insert", "replace", "update"] } } }])
        .await
        .expect("watching the target");
    let watcher = tokio::spawn(async move {
        let mut seen: HashMap<String, i64> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(secs + 120);
        while seen.len() < expect_writes && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(1), watch.next()).await {
                Ok(Some(Ok(ev))) => {
                    let at = ev.wall_time.map(|t| t.timestamp_millis()).unwrap_or_else(now_ms);
                    if let Some(Bson::String(id)) = ev.document_key.as_ref().and_then(|k| k.get("_id")) {
                        seen.entry(id.clone()).or_insert(at);
                    }
                }
                Ok(Some(Err(e))) => panic!("target change stream: {e}"),
                Ok(None) => break,
                Err(_) => {}
            }
        }
        seen
    });

    let before = f.scrape();
    let applied0 = before.sum("ficus_events_applied_total", SERVICE) as u64;
    let cpu0 = b.procs.snapshot(Some(f.pid()));
    let coll = b.source.collection::<Document>(COLLECTION);
    let mut stamps = vec![0i64; docs.len()];
    let started = Instant::now();
    // Events before each document: document i is due once rate × elapsed reaches it.
    let mut cum = Vec::with_capacity(docs.len());
    let mut acc = 0u64;
    for d in &docs {
        cum.push(acc);
        acc += events_of(d);
    }
    let mut next = 0usize;
    while next < docs.len() {
        let budget = started.elapsed().as_secs_f64() * rate_ as f64;
        let from = next;
        while next < docs.len() && cum[next] as f64 <= budget {
            next += 1;
        }
        if next > from {
            let at = now_ms();
            for s in &mut stamps[from..next] {
                *s = at;
            }
            coll.insert_many(docs[from..next].to_vec()).await.expect("paced insert");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let insert_wall = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while f.applied() < applied0 + set.events && Instant::now() < deadline {
        f.check_alive();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = started.elapsed();
    let cpu1 = b.procs.snapshot(Some(f.pid()));
    let after = f.scrape();
    let stats = probe::consume_stats(&before, &after, wall);
    let seen = watcher.await.unwrap();
    let mut lat: Vec<f64> =
        seen.iter().filter_map(|(k, at)| keys.get(k).map(|&i| (*at - stamps[i]).max(0) as f64)).collect();
    lat.sort_by(f64::total_cmp);
    let hb = before.buckets("ficus_end_to_end_latency_seconds", SERVICE);
    let ha = after.buckets("ficus_end_to_end_latency_seconds", SERVICE);
    let delta: Vec<(f64, f64)> =
        ha.iter().map(|(le, c)| (*le, c - hb.iter().find(|(l, _)| l == le).map(|x| x.1).unwrap_or(0.0))).collect();
    let q = |x: f64| probe::exact_quantile(&lat, x);
    let h = |x: f64| probe::bucket_quantile(&delta, x).map(|s| (s * 1e4).round() / 10.0);
    eprintln!(
        "latency: {} of {} target writes seen; inserts took {:.1}s for {} events ({:.0}/s)",
        lat.len(),
        expect_writes,
        insert_wall.as_secs_f64(),
        set.events,
        rate(set.events, insert_wall)
    );
    Latency {
        exact: [q(0.5), q(0.95), q(0.99)],
        histogram: [h(0.5), h(0.95), h(0.99)],
        samples: lat.len(),
        events: set.events,
        wall,
        cpu: cpu_delta(&cpu0, &cpu1),
        peak_rss: f.peak_rss_mb(),
        stats,
    }
}

// ---------------------------------------------------------------------------------------------
// The end.

/// The memory verdict, the notes (ce_headers and CPU per event, consume's CPU), and one line per
/// goal before the other verdicts. Returns the tail's CPU per event with headers on and off
/// (`headers` in the JSON).
fn goals(
    b: &Bench,
    fig: &mut Figures,
    backlog: &Set,
    catch_up: &CatchUp,
    consumed: Option<&Consumed>,
    other_headers_cpu: Option<Cpu>,
) -> Value {
    let consume_rss = consumed.and_then(|c| c.peak_rss_mb);
    let tail_rss = catch_up.peak_rss_mb;
    let rss_ok = tail_rss.is_some_and(|m| m <= 150.0) && consume_rss.is_some_and(|m| m <= 150.0);
    if backlog.events < 1_000_000 {
        fig.notes.push(format!(
            "RSS measured with a {}-event backlog; the goal is stated for 1,000,000 (FICUS_BENCH_BACKLOG=1000000); rss_curve in the JSON shows whether memory grows with progress",
            backlog.events
        ));
    }
    if !rss_ok {
        fig.verdicts.push(format!("RSS missed: tail {tail_rss:?} MB, consume {consume_rss:?} MB"));
    }
    let per_event = |cpu: &Cpu| {
        json!({
            "ficus_us_per_event": cpu.get("ficus").map(|s| s * 1e6 / backlog.events as f64),
            "kafka_us_per_event": cpu.get("kafka").map(|s| s * 1e6 / backlog.events as f64),
        })
    };
    let other = other_headers_cpu.unwrap_or_default();
    let headers = if b.ce_headers {
        json!({ "on": per_event(&catch_up.cpu), "off": per_event(&other) })
    } else {
        json!({ "on": per_event(&other), "off": per_event(&catch_up.cpu) })
    };
    fig.notes.push(format!(
        "every ficus run used kafka.ce_headers = {} (FICUS_BENCH_CE_HEADERS); tail catch-up CPU µs per event with headers on vs off: {headers}",
        b.ce_headers
    ));
    let consume_cpu = consumed.map(|c| c.cpu.clone()).unwrap_or_default();
    fig.notes.push(format!(
        "consume CPU per event: ficus {:.1} µs, target MongoDB {:.1} µs, Kafka {:.1} µs",
        consume_cpu.get("ficus").unwrap_or(&0.0) * 1e6 / backlog.events as f64,
        consume_cpu.get("mongo-target").unwrap_or(&0.0) * 1e6 / backlog.events as f64,
        consume_cpu.get("kafka").unwrap_or(&0.0) * 1e6 / backlog.events as f64,
    ));
    fig.summarise_goals();
    headers
}

/// Keeps the ficus logs in `target/bench/logs` (the scratch directory goes with the servers).
fn keep_logs(b: &Bench) {
    let logs = support::out_dir().join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    let _ = std::fs::create_dir_all(&logs);
    for e in std::fs::read_dir(b.world.dir.path()).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let _ = std::fs::copy(e.path(), logs.join(e.file_name()));
        }
    }
}
