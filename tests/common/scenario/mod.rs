//! The fault suite's scenario builder (`tests/faults_*.rs`): one world per scenario, its seed,
//! its configuration, the ficus processes it runs, a seeded workload ([`workload`]) and the
//! audit that ends it ([`audit`]), which returns an [`audit::Report`] the test asserts on.
//!
//! A scenario reads like this:
//!
//! ```text
//! let mut s = Setup::seeded("sigkill-streaming").start().await;   // world, topics, config
//! let mut driver = s.driver();
//! driver.seed(150, 100).await;                                    // before ficus starts
//! let mut f = s.spawn(ALL);
//! s.wait_streaming().await;
//! let writer = driver.until_stopped(Duration::from_millis(15));   // writes in the background
//! /* the faults */
//! let driver = writer.stop().await;
//! let mut report = s.audit(&driver.log).note(...).run().await;     // settle, verify, trace
//! report.finish(&mut f, "ficus");                                 // still running, stops on SIGTERM
//! report.check();                                                 // nothing lost
//! ```
//!
//! Knobs, from the environment (documented in the README, "Faults"): `FICUS_FAULTS_LONG=1` for
//! the long variants ([`long`]), `FICUS_FAULTS_SEED=<n>` to rerun a seed ([`seed_for`]),
//! `FICUS_TANSU_LOG` for Tansu's log filter (`common::Kafka`), `FICUS_FAULTS_KEEP_LOGS=1` to keep
//! every log of every scenario ([`Scenario::problems`]).

pub mod audit;
pub mod workload;

use std::path::Path;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;

use audit::Audit;
use workload::{Driver, Write};

use super::{Ficus, World, checkpoint};

pub const PRODUCTS: &str = "linechatbot.products";
pub const CUSTOMERS: &str = "linechatbot.customers";
/// The services the workload's topics feed, which the audit verifies.
pub const SERVICES: [&str; 2] = ["products_db", "customers_db"];

/// The tail alone.
pub const TAIL: &[&str] = &["run", "--roles", "tail"];
/// The consumers of the workload's services, and the archive.
pub const CONSUME: &[&str] = &[
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
/// Every role, for the workload's services.
pub const ALL: &[&str] = &["run", "--service", "products_db", "--service", "customers_db", "--batch-max", "100"];

/// secantusd-rs acknowledges journaled (`j: true`) writes before they reach the disk unless
/// told to sync on commit; a server that is SIGKILLed in these tests gets the flag, so it keeps
/// what it acknowledged, as MongoDB does.
pub const DURABLE: &[&str] = &["--sync-on-commit"];

// ---------------------------------------------------------------------------------------------
// Knobs
// ---------------------------------------------------------------------------------------------

/// `FICUS_FAULTS_LONG=1`: the long variants.
pub fn long() -> bool {
    std::env::var("FICUS_FAULTS_LONG").is_ok_and(|v| v == "1" || v == "true")
}

/// The scenario's seed: `FICUS_FAULTS_SEED` if set, else fixed per scenario (reproducible CI).
pub fn seed_for(name: &str) -> u64 {
    let seed = std::env::var("FICUS_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    });
    announce(&format!(
        "fault {name}: seed {seed} (rerun with FICUS_FAULTS_SEED={seed}){}",
        if long() { ", long" } else { "" }
    ));
    seed
}

/// Prints a scenario's line where CI logs show it: straight to stderr, past the test harness's
/// output capture (which would hide it for passing tests).
pub fn announce(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A ficus.toml for fault runs: a short tail lease, so a SIGKILLed tailer's successor takes
/// over in seconds rather than the production default's. Consumers keep ficus's membership
/// defaults: static group membership (a restarted process is the same member of each group and takes
/// its partitions straight back) with its 45 s session; see the README's caveats for what
/// Tansu 0.6.0 does with dynamic members that die and with static members on short sessions.
///
/// Consumers fetch at most 64 KB a partition: Tansu 0.6.0 (sqlite storage) serves a fetch at
/// about a hundred records a second and answers little else meanwhile, so a member that
/// rejoins far behind asked for librdkafka's default 1 MB a partition and held the broker for
/// tens of seconds; every member's heartbeats timed out (45 s sessions expired "without a
/// successful response from the group coordinator") and the groups rebalanced over and over.
/// Smaller fetches leave the broker time for everyone. Real Kafka needs no such setting.
pub fn fault_config(dir: &Path, name: &str, tail: &str, rest: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[tail]\nlease_ttl_ms = 2000\n{tail}\n\n[kafka.consumer]\n\"max.partition.fetch.bytes\" = \"65536\"\n\n{rest}\n"
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Environment overrides for every ficus process of a scenario.
#[derive(Clone, Default)]
pub struct Env(Vec<(String, String)>);

impl Env {
    pub fn with(mut self, k: &str, v: impl Into<String>) -> Self {
        self.0.retain(|(x, _)| x != k);
        self.0.push((k.to_string(), v.into()));
        self
    }

    pub fn pairs(&self) -> Vec<(&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Setting a scenario up
// ---------------------------------------------------------------------------------------------

/// Where a scenario's seed comes from.
enum Seed {
    /// Nothing random in it: no seed is chosen or printed.
    None,
    /// [`seed_for`] its name (printed).
    Named,
    /// Given by the caller (one of several runs of a scenario; the caller prints it).
    Given(u64),
}

/// How a scenario's world is set up; [`Setup::start`] starts it.
pub struct Setup {
    name: String,
    seed: Seed,
    mongo_args: Vec<String>,
    tail: String,
    rest: String,
    config: bool,
    topics: bool,
}

impl Setup {
    /// A scenario with nothing random in it (its seed, unused, is 0 and never printed).
    pub fn new(name: &str) -> Setup {
        Setup {
            name: name.to_string(),
            seed: Seed::None,
            mongo_args: Vec::new(),
            tail: String::new(),
            rest: String::new(),
            config: true,
            topics: true,
        }
    }

    /// A seeded scenario: `FICUS_FAULTS_SEED`, or a seed fixed by its name; printed.
    pub fn seeded(name: &str) -> Setup {
        Setup { seed: Seed::Named, ..Setup::new(name) }
    }

    /// A scenario seeded by the caller.
    pub fn with_seed(name: &str, seed: u64) -> Setup {
        Setup { seed: Seed::Given(seed), ..Setup::new(name) }
    }

    /// Arguments for the monolith's server (secantusd-rs).
    pub fn mongo(mut self, args: &[&str]) -> Setup {
        self.mongo_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// More `[tail]` settings for [`fault_config`].
    pub fn tail(mut self, toml: &str) -> Setup {
        self.tail = toml.to_string();
        self
    }

    /// More sections for [`fault_config`].
    pub fn config(mut self, toml: &str) -> Setup {
        self.rest = toml.to_string();
        self
    }

    /// ficus's own defaults: no `FICUS_CONFIG`.
    pub fn default_config(mut self) -> Setup {
        self.config = false;
        self
    }

    /// The test applies the topics itself (through a proxy, or with credentials).
    pub fn topics_by_hand(mut self) -> Setup {
        self.topics = false;
        self
    }

    /// Starts the world (a monolith server, a broker, a scratch directory), applies the topics
    /// and writes the configuration.
    pub async fn start(self) -> Scenario {
        let seed = match self.seed {
            Seed::None => 0,
            Seed::Named => seed_for(&self.name),
            Seed::Given(seed) => seed,
        };
        let args: Vec<&str> = self.mongo_args.iter().map(String::as_str).collect();
        let world = World::start_with(&args);
        if self.topics {
            world.apply_topics();
        }
        let mut env = Env::default();
        if self.config {
            env = env.with("FICUS_CONFIG", fault_config(world.dir.path(), &self.name, &self.tail, &self.rest));
        }
        let client = world.mongo.client().await;
        Scenario {
            name: self.name,
            seed,
            rng: StdRng::seed_from_u64(seed),
            env,
            source: client.clone(),
            target: client,
            world,
        }
    }
}

/// A running scenario: its world and what its ficus processes are given.
pub struct Scenario {
    pub name: String,
    pub seed: u64,
    /// Seeded by [`Self::seed`]: the moments and lengths of the faults.
    pub rng: StdRng,
    pub world: World,
    /// For every ficus process the scenario starts (and the audit's `ficus verify`).
    pub env: Env,
    /// The monolith, as the workload writes to it and the audit reads it.
    pub source: mongodb::Client,
    /// The server of the service databases and of ficus's store (the monolith's, unless the
    /// scenario moves them).
    pub target: mongodb::Client,
}

impl Scenario {
    /// The seeded workload, writing through [`Self::source`].
    pub fn driver(&self) -> Driver {
        Driver::new(&self.source, self.seed)
    }

    /// Starts ficus in the background with the scenario's environment.
    pub fn spawn(&self, args: &[&str]) -> Ficus {
        self.spawn_with(args, &self.env)
    }

    pub fn spawn_with(&self, args: &[&str], env: &Env) -> Ficus {
        self.world.spawn_ficus(args, &env.pairs())
    }

    /// Runs a ficus command to completion (off the runtime's workers: the workload keeps going).
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.run_with(args, &self.env)
    }

    pub fn run_with(&self, args: &[&str], env: &Env) -> std::process::Output {
        tokio::task::block_in_place(|| self.world.ficus(args, &env.pairs()))
    }

    /// Whether the tail has finished its snapshot and streams (per its checkpoint in the store).
    pub async fn streaming(&self) -> bool {
        streaming(&self.target).await
    }

    /// Waits (two minutes at most) until the tail streams.
    pub async fn wait_streaming(&self) {
        self.wait("streaming", Duration::from_secs(120), || self.streaming()).await;
    }

    /// Polls `f` until it holds; on timeout, fails with ficus's warnings and errors (and where
    /// every log was kept).
    pub async fn wait<F, Fut>(&self, what: &str, timeout: Duration, f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        if super::poll_until(timeout, f).await {
            return;
        }
        panic!("timed out after {timeout:?} waiting for: {what}\n{}", self.problems());
    }

    /// Warnings and errors from every ficus log of the world, for failure messages, and a copy
    /// of every log (ficus's and the servers') kept where the message says.
    pub fn problems(&self) -> String {
        ficus_problems(&self.world, &self.name)
    }

    /// The audit that ends the scenario, of the writes in `log`; see [`Audit`].
    pub fn audit<'a>(&'a self, log: &'a [Write]) -> Audit<'a> {
        Audit::new(self, log)
    }
}

/// Whether the tail streams, per its checkpoint in `store`.
pub async fn streaming(store: &mongodb::Client) -> bool {
    checkpoint(store, "linechatbot").await.is_some_and(|c| c.get_document("stream").is_ok())
}

pub async fn mongo_client(uri: &str) -> mongodb::Client {
    mongodb::Client::with_uri_str(uri).await.unwrap()
}

/// A URI with a short server selection timeout, for clients that must notice outages quickly.
pub fn impatient(uri: &str) -> String {
    format!("{uri}&serverSelectionTimeoutMS=2000&connectTimeoutMS=2000")
}

// ---------------------------------------------------------------------------------------------
// Processes and their output
// ---------------------------------------------------------------------------------------------

/// SIGTERM, expecting a clean exit (0) within the harness's minute.
pub fn stop_cleanly(f: &mut Ficus, what: &str) {
    let status = tokio::task::block_in_place(|| f.terminate());
    assert!(status.success(), "{what} should stop cleanly after the faults ({status:?}):\n{}", tail_of(&f.logs(), 40));
}

/// A command's stdout and stderr.
pub fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The last `n` lines of a log, for failure messages.
pub fn tail_of(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes ANSI colour sequences (the logs are written with them).
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Warnings and errors from every ficus log of the world, for failure messages, and a copy of
/// every log (ficus's and the servers') kept where the failure message says.
pub fn ficus_problems(world: &World, name: &str) -> String {
    let keep = std::env::temp_dir().join(format!("ficus-faults-{name}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&keep);
    let mut out = String::new();
    let mut logs: Vec<std::path::PathBuf> = Vec::new();
    let mut dirs = vec![world.dir.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() && !p.ends_with("data") {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "log") {
                logs.push(p);
            }
        }
    }
    logs.sort();
    for p in logs {
        let rel = p.strip_prefix(world.dir.path()).unwrap().to_string_lossy().replace('/', "_");
        let log = plain(&std::fs::read_to_string(&p).unwrap_or_default());
        let _ = std::fs::write(keep.join(&rel), &log);
        if rel.starts_with("ficus-") {
            let bad: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
            if !bad.is_empty() {
                out.push_str(&format!("--- {rel}\n{}\n", tail_of(&bad.join("\n"), 12)));
            }
        }
    }
    out.push_str(&format!("(every log kept in {})", keep.display()));
    out
}
