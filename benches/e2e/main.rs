//! End-to-end benchmark on local servers: a source MongoDB (the monolith), a target MongoDB (the
//! service databases and ficus's store) and a Kafka broker, started like the integration tests
//! start them (`tests/common`), and the real `ficus` binary of this build (release under
//! `cargo bench`), run as child processes so that each one's CPU time and peak memory can be read
//! from `/proc`.
//!
//! Ceilings are measured in the same run, on the same servers, with the same documents
//! ([`ceilings`]), with ficus's default settings where it has one:
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
//! [`snapshot`], [`headers`], [`live`] (while inserting), [`latency()`], [`reverse`], [`cutover`],
//! then [`goals`]. Each phase adds its figures to [`Figures`] and returns what later phases need;
//! [`Bench`] is what they share (servers, clients, the shipped definitions).
//!
//! The phases live by the stretch of the pipeline they measure: [`source`] (source → Kafka),
//! [`target`] (Kafka → target, reverse sync, the cutover), [`store`] (archive, replay, verify)
//! and [`mod@latency`]; beside them [`bench`] (what the phases share and how they run ficus),
//! [`ceilings`] (the bare loops), [`probe`] (CPU, memory, metrics, watermarks), [`report`] (the
//! figures) and [`workload`] (the documents).
//!
//! Runs only under `cargo bench` (`--bench`); `cargo test --all-targets` just builds it.

// The integration tests' harness and the benches' shared report, outside this folder.
#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

mod bench;
mod ceilings;
mod latency;
mod probe;
mod report;
mod source;
mod store;
mod target;
mod workload;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use bench::Bench;
use latency::latency;
use probe::Cpu;
use report::Figures;
use source::{CatchUp, bare_catch_up, headers, insert_backlog, live, snapshot, tail_catch_up};
use store::{archive, replay, verify};
use target::{Consumed, consume, cutover, reverse};
use workload::Set;

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
