//! What the phases share ([`Bench`]: the servers, their clients, the shipped definitions) and
//! how a phase runs ficus: spawned with the run's configuration, run to its end
//! ([`Bench::run_to_end`]) or measured until its progress reaches a count ([`Bench::measure`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bson::{Timestamp, doc};
use mongodb::{Client, Database};
use serde_json::{Value, json};

use ficus::bus::TopicAdmin;
use ficus::config::topics::Topics;
use ficus::config::{Config, ConfigFile};
use ficus::tail::checkpoint::{CheckpointStore, MongoCheckpoints, StreamPosition, TailPhase, TailState};
use ficus::transform::ServiceTransforms;

use crate::probe::{self, Cpu, Ficus, Procs, Watermarks, cpu_delta};
use crate::report::rate;
use crate::workload::Set;
use crate::{Plan, RAW_TOPIC, SERVICE, SOURCE_DB, SOURCE_NAME, STALL, STORE_DB, TOPIC, common, repo, support};

pub struct Bench {
    /// The source MongoDB (the monolith), Tansu, and the scratch directory for ficus's logs and
    /// configuration files (`tests/common`).
    pub world: common::World,
    /// The target MongoDB: the service databases and ficus's store.
    pub target: common::Mongo,
    /// The servers and the bench, for CPU per phase.
    pub procs: Procs,
    /// ficus's configuration with no file: the defaults the bare loops copy (producer settings,
    /// `tail.max_in_flight`, batch sizes).
    pub defaults: Config,
    /// `kafka.ce_headers` for every ficus run but the headers phase's (`FICUS_BENCH_CE_HEADERS`).
    pub ce_headers: bool,
    /// Configuration files: `[kafka] ce_headers = true|false`, plus the bench's Kafka settings.
    pub headers_on: PathBuf,
    pub headers_off: PathBuf,
    /// The shipped `topics/` and `transforms/`.
    pub topics: Topics,
    pub services: Vec<ServiceTransforms>,
    pub source_client: Client,
    pub target_client: Client,
    /// The monolith's database.
    pub source: Database,
    /// ficus's store (checkpoints).
    pub store: Database,
    /// Records in the customers topic, and in the bare loops' topic.
    pub records: Watermarks,
    pub raw_records: Watermarks,
    pub machine: Value,
    pub cores: f64,
    pub started: Instant,
}

impl Bench {
    /// Starts the servers and creates the topics.
    pub async fn start(plan: &Plan) -> Bench {
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

    pub fn say(&self, what: &str) {
        eprintln!("[e2e {:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// The bench's service's transforms.
    pub fn service(&self) -> &ServiceTransforms {
        self.services.iter().find(|s| s.service() == SERVICE).expect("customers_db")
    }

    /// Starts `ficus <args>` with its log in `ficus-<name>.log`, plus `--metrics-addr` for `run`,
    /// and `--config` (the ce_headers setting of the run) unless `args` has one.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Ficus {
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
    pub fn run_to_end(&self, name: &str, args: &[&str]) -> Finished {
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
    pub fn cpu_with_ficus(&self, cpu0: &Cpu, done: &Finished) -> Cpu {
        let mut cpu = cpu_delta(cpu0, &self.procs.snapshot(None));
        cpu.insert("ficus".into(), (done.cpu * 100.0).round() / 100.0);
        cpu
    }

    /// Waits until `progress()` reaches `expect`, sampling RSS and, once a second, everyone's CPU.
    /// `progress` counts from 0. An error after `timeout`, or after `STALL` without progress.
    pub fn measure(
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
    pub fn tail_over_backlog(&self, name: &str, args: &[&str], plan: &Plan) -> Result<Run, String> {
        let base = self.records.total();
        let spawned = Instant::now();
        let mut f = self.spawn(name, args);
        let r =
            self.measure(&mut f, spawned, plan.backlog.events, plan.tail_timeout(), |_| self.records.total() - base);
        f.stop();
        r
    }

    /// The source's current cluster time (`source` is private to the library).
    pub async fn cluster_time(&self) -> Timestamp {
        let reply = self.source_client.database(SOURCE_DB).run_command(doc! { "ping": 1 }).await.expect("ping");
        reply
            .get_timestamp("operationTime")
            .or_else(|_| reply.get_document("$clusterTime").and_then(|d| d.get_timestamp("clusterTime")))
            .expect("the source reports its cluster time")
    }

    /// Points the tail's checkpoint at a cluster time: the next `ficus run --roles tail` streams
    /// every change from there (a backlog to catch up over), with no snapshot.
    pub async fn checkpoint_at(&self, at: Timestamp) {
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
pub struct Finished {
    pub elapsed: Duration,
    pub log: String,
    pub ok: bool,
    pub peak_rss_mb: Option<f64>,
    /// ficus's CPU seconds (rusage of the waited-for child).
    pub cpu: f64,
}

/// Progress of one measured ficus run.
pub struct Run {
    /// Spawn → done.
    pub total: Duration,
    /// First progress → done (excludes start-up: connecting, lease, consumer group join).
    pub steady: Duration,
    /// Work done between first progress and done (for the steady rate).
    pub steady_work: u64,
    /// CPU seconds per process over the steady window.
    pub cpu: Cpu,
    /// CPU seconds per process, spawn → done.
    pub cpu_total: Cpu,
    pub peak_rss_mb: Option<f64>,
    /// RSS samples (progress fraction, MB), to see whether memory grows with the backlog.
    pub rss_curve: Vec<(f64, f64)>,
    /// Once a second: elapsed, progress, CPU seconds per process (cumulative).
    pub timeline: Vec<Value>,
}

impl Run {
    /// Changes per second of a tail run over `set`, from its steady window in events.
    pub fn changes_per_sec(&self, set: &Set) -> f64 {
        rate(set.docs, self.steady) * self.steady_work as f64 / set.events as f64
    }
}
