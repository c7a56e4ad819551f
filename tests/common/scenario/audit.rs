//! The audit that ends a fault scenario, independent of ficus's own code except for decoding
//! its events: the source and the service databases compared field by field, `ficus verify`
//! for every service, and each write of the workload traced to the event that carried it on
//! Kafka, to the version the target holds and to the archive. It returns a [`Report`]:
//!
//! - **written**: writes the workload made to the monolith (seeded documents included);
//! - **delivered**: records on Kafka carrying document events (duplicates included);
//! - **applied**: writes whose event the target holds, or a newer version of the same document
//!   (the version guards' definition of "applied": nothing older can land over it); and writes
//!   of a document the monolith provably deleted before the snapshot's start, which no event
//!   carries and the target rightly lacks (counted in the line's note; see [`deleted_unseen`]);
//! - **lost**: writes not applied, plus documents that differ between source and target, plus
//!   events missing from the archive where the archive runs. Must be 0;
//! - **duplicated-absorbed**: records on Kafka repeating an event id (re-published after a
//!   crash or a broker failure) that the version guards absorbed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use ficus::event::{CanonicalEvent, Message, Op};
use futures::TryStreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;

use super::workload::{Kind, Write, marker_field};
use super::{CUSTOMERS, Env, PRODUCTS, SERVICES, Scenario, announce, long, plain, tail_of, text};
use crate::common::Ficus;

// ---------------------------------------------------------------------------------------------
// Reading Kafka back
// ---------------------------------------------------------------------------------------------

/// One record as it sits on Kafka, decoded if it is a canonical event.
pub struct Raw {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// Every record of `topics`, from the low to the high watermark of each partition as of now.
///
/// A reader that gets nothing for 45 s is replaced by a fresh one that resumes where it
/// stopped, and three fresh readers that all stall fail the audit, with librdkafka's debug log
/// of the last one.
pub fn read_raw(brokers: &str, topics: &[&str]) -> Vec<Raw> {
    // A group id of its own per reader: it only assigns, but librdkafka still talks to that
    // group's coordinator, and a fresh reader should share nothing with a stalled one.
    let readers = std::sync::atomic::AtomicU32::new(0);
    let reader = || -> BaseConsumer<LogTail> {
        let n = readers.fetch_add(1, Ordering::SeqCst);
        // 64 KB a partition, and 16 times more for each fresh reader: Tansu 0.6.0 answers a
        // fetch whose next record batch is larger than the limit with nothing at all (a
        // dead-lettered hostile record sat unread at 64 KB), where Kafka returns that batch.
        let partition_bytes = (65_536u64 << (4 * n.min(3))).min(64 << 20);
        let request_bytes = partition_bytes.max(262_144).to_string();
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("ficus-faults-reader-{}-{n}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            // Every record there is: ficus writes no Kafka transactions, so nothing is
            // uncommitted, and the audit must not depend on the broker's last stable offset.
            .set("isolation.level", "read_uncommitted")
            // Small fetches: Tansu 0.6.0 (sqlite storage) serves about a hundred records a
            // second to a fetch from the start of a partition, and answers a fetch only once
            // every partition in it is read to its byte limit. With librdkafka's defaults
            // (1 MB a partition, nine partitions a request) one answer took minutes and every
            // fresh reader started the same request again (the debug log below showed it).
            .set("max.partition.fetch.bytes", partition_bytes.to_string())
            .set("fetch.max.bytes", &request_bytes)
            .set("message.max.bytes", &request_bytes)
            // Kept in memory and printed only when a reader stalls.
            .set("debug", "broker,fetch,cgrp,topic,protocol")
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug)
            .create_with_context(LogTail::default())
            .unwrap()
    };
    let mut consumer = reader();
    // Per partition with records: the next offset to read, and the end.
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(30)).unwrap();
        for p in md.topics()[0].partitions() {
            let (low, high) = consumer.fetch_watermarks(t, p.id(), Duration::from_secs(30)).unwrap();
            if high > low {
                next.insert((t.to_string(), p.id()), low);
                ends.insert((t.to_string(), p.id()), high);
            }
        }
    }
    let mut out = Vec::new();
    let assign =
        |consumer: &BaseConsumer<LogTail>, next: &HashMap<(String, i32), i64>, ends: &HashMap<(String, i32), i64>| {
            let mut tpl = rdkafka::TopicPartitionList::new();
            for (k, _) in ends.iter() {
                tpl.add_partition_offset(&k.0, k.1, rdkafka::Offset::Offset(next[k])).unwrap();
            }
            consumer.assign(&tpl).unwrap();
        };
    if ends.is_empty() {
        return out;
    }
    assign(&consumer, &next, &ends);
    let mut fresh_readers = 0;
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        if last_progress.elapsed() > Duration::from_secs(45) {
            assert!(
                fresh_readers < 3,
                "reading Kafka back: {} readers in a row got nothing for 45 s; left: {ends:?}, next: {next:?}; the last reader's last log lines:\n{}",
                fresh_readers + 1,
                consumer.context().tail()
            );
            fresh_readers += 1;
            announce(&format!(
                "reading Kafka back: nothing for 45 s; a fresh reader resumes at {next:?}; the stalled reader's last log lines:\n{}",
                consumer.context().tail()
            ));
            consumer = reader();
            assign(&consumer, &next, &ends);
            last_progress = Instant::now();
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let k = (m.topic().to_string(), m.partition());
                if let Some(end) = ends.get(&k).copied() {
                    if m.offset() >= next[&k] && m.offset() < end {
                        last_progress = Instant::now();
                        next.insert(k.clone(), m.offset() + 1);
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

/// The last lines librdkafka logged for one client, to show why a reader got nothing.
#[derive(Default)]
struct LogTail(std::sync::Mutex<std::collections::VecDeque<String>>);

impl LogTail {
    const KEEP: usize = 120;

    fn tail(&self) -> String {
        self.0.lock().unwrap().iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl rdkafka::ClientContext for LogTail {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, fac: &str, line: &str) {
        let mut lines = self.0.lock().unwrap();
        if lines.len() == Self::KEEP {
            lines.pop_front();
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        lines.push_back(format!("{:.3} {fac} {line}", now.as_secs_f64()));
    }
}

impl rdkafka::consumer::ConsumerContext for LogTail {}

pub async fn read_raw_async(brokers: &str, topics: &[&str]) -> Vec<Raw> {
    let brokers = brokers.to_string();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        read_raw(&brokers, &refs)
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tracing writes
// ---------------------------------------------------------------------------------------------

pub fn as_i64(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(i) => Some(i64::from(*i)),
        Bson::Int64(i) => Some(*i),
        Bson::Double(d) => Some(*d as i64),
        _ => None,
    }
}

/// A value at a dotted path.
pub fn at<'a>(d: &'a Document, path: &str) -> Option<&'a Bson> {
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
pub fn carries(e: &CanonicalEvent, w: &Write) -> bool {
    let f = marker_field(w.topic);
    let after = e.data.after.as_ref().and_then(|a| as_i64(at(a, f)));
    match (w.kind, e.data.op) {
        // Keys are never reused: a delete supersedes every earlier write of its aggregate (a
        // document deleted before the snapshot reached it has no copy, rightly).
        (_, Op::Delete) => true,
        (Kind::Delete, _) => false,
        (_, Op::Snapshot) => after.is_some_and(|m| m >= w.marker),
        (Kind::Seed | Kind::Insert, Op::Insert) => after == Some(w.marker),
        (Kind::Update, Op::Update) => e.data.changed.as_ref().and_then(|c| as_i64(c.get(f))) == Some(w.marker),
        (_, Op::Replace) => after == Some(w.marker),
        _ => false,
    }
}

/// Whether write `w`, which no event on Kafka carries, belongs to a document that the monolith
/// deleted before the point a completed snapshot of its topic started from (`snapshot`, the
/// sequence of its copies, from its end-of-copy markers), and that the target does not hold.
///
/// Such a write is superseded before ficus could see it: the snapshot copies what exists at its
/// start and later, so it had nothing to copy, and the stream starts at that point, after the
/// delete, so there was no change to carry; a document that never reached the target rightly
/// never does. This is a delete's own rule (a delete event supersedes every earlier write of its
/// aggregate, see [`carries`]) for the one delete that has no event. It is proven, never
/// assumed: the delete's recorded time is read from the monolith after the delete was
/// acknowledged, so it is no earlier than the delete's cluster time, and must be before the
/// snapshot's start; a delete at or after that point must have an event, and one without a
/// recorded time proves nothing.
pub fn deleted_unseen(w: &Write, log: &[Write], snapshot: Option<&str>, present: bool) -> bool {
    let Some(start) = snapshot else { return false };
    w.kind != Kind::Delete
        && !present
        && log.iter().any(|d| {
            d.kind == Kind::Delete
                && d.topic == w.topic
                && d.key == w.key
                && d.by.is_some_and(|t| ficus::event::Version::at(t, 0).as_str() < start)
        })
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// A scenario's tally; see the module's header.
#[derive(Debug, Default)]
pub struct Report {
    pub name: String,
    pub written: usize,
    pub delivered: usize,
    pub applied: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub note: String,
    /// Everything found wrong; [`Report::check`] fails on any.
    pub problems: Vec<String>,
}

impl Report {
    pub fn line(&self) -> String {
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
    pub fn check(&self) {
        announce(&self.line());
        assert!(
            self.lost == 0 && self.problems.is_empty(),
            "{}\nproblems (first 20):\n{}",
            self.line(),
            self.problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }

    /// The end of a scenario for a ficus process: it must still be running (not crashed, not
    /// given up), and must stop cleanly (exit 0) on SIGTERM. Either failure becomes a problem.
    pub fn finish(&mut self, f: &mut Ficus, what: &str) {
        let problem = match f.wait(Duration::ZERO) {
            Some(status) => Some(format!("{what} was no longer running at the end ({status:?})")),
            None => {
                let status = tokio::task::block_in_place(|| f.terminate());
                (!status.success()).then(|| format!("{what} did not stop cleanly on SIGTERM ({status:?})"))
            }
        };
        if let Some(p) = problem {
            self.problems.insert(0, format!("{p}:\n{}", tail_of(&plain(&f.logs()), 15)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Source and target compared
// ---------------------------------------------------------------------------------------------

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
        .find(doc! { "c": coll })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    for t in tombs {
        let Some(Bson::String(id)) = t.get("id") else { continue };
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
pub async fn differences(source: &mongodb::Client, target: &mongodb::Client) -> Vec<String> {
    async fn all(c: &mongodb::Client, db: &str, coll: &str) -> Vec<Document> {
        c.database(db).collection::<Document>(coll).find(doc! {}).await.unwrap().try_collect().await.unwrap()
    }
    let len = |d: &Document, f: &str| d.get_array(f).map(|a| a.len() as i64).ok();
    /// Per aggregate: the marker, the category (products), the purchases (customers).
    type Moving = (Option<i64>, Option<String>, Option<i64>);
    let mut expected: BTreeMap<String, Moving> = BTreeMap::new();
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

/// Waits until the target matches the source; gives up when the differences have not changed
/// for 45 s (nothing is moving any more) or after the scenario's deadline. Returns what differs.
pub async fn converge(source: &mongodb::Client, target: &mongodb::Client) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(if long() { 600 } else { 150 });
    let mut diffs = differences(source, target).await;
    let mut since = Instant::now();
    // A consumer that lost its group coordinator may only rejoin when its session times out
    // (45 s at most in this suite), so wait past that before calling it stuck.
    while !diffs.is_empty() && Instant::now() < deadline && since.elapsed() < Duration::from_secs(75) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = differences(source, target).await;
        if now != diffs {
            since = Instant::now();
        }
        diffs = now;
    }
    diffs
}

// ---------------------------------------------------------------------------------------------
// The audit
// ---------------------------------------------------------------------------------------------

/// The audit of a scenario's writes: built by [`Scenario::audit`], with the scenario's own
/// servers, broker and environment unless told otherwise, and run by [`Audit::run`].
pub struct Audit<'a> {
    s: &'a Scenario,
    log: &'a [Write],
    env: &'a Env,
    brokers: String,
    archive: bool,
    note: String,
}

/// What Kafka holds, per write to trace.
#[derive(Default)]
struct OnKafka {
    /// The document events of each aggregate, by topic and key.
    by_key: HashMap<(String, String), Vec<CanonicalEvent>>,
    /// Every message id (events and control messages), for the archive.
    ids: HashSet<String>,
    /// Topics with a completed snapshot: a delete made while history was lost has no event, and
    /// the consumers' sweep after that snapshot carries it instead. With the newest snapshot's
    /// start (the sequence of its copies), for [`deleted_unseen`].
    swept: HashMap<String, String>,
}

impl<'a> Audit<'a> {
    pub(super) fn new(s: &'a Scenario, log: &'a [Write]) -> Audit<'a> {
        Audit { s, log, env: &s.env, brokers: s.world.kafka.brokers(), archive: true, note: String::new() }
    }

    /// The environment for `ficus verify` (the scenario's, unless it sent ficus through a proxy).
    pub fn env(mut self, env: &'a Env) -> Self {
        self.env = env;
        self
    }

    /// Where to read Kafka back (the scenario's broker, unless it sits behind a proxy).
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = brokers.into();
        self
    }

    /// The scenario runs no archive: the event store is not audited.
    pub fn without_archive(mut self) -> Self {
        self.archive = false;
        self
    }

    /// What the scenario did, for its line.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// Waits until the target matches the source (independent check), then until `ficus verify`
    /// passes for every service, then audits Kafka, the target's versions and (unless
    /// [`Self::without_archive`]) the event store against the writes made.
    pub async fn run(self) -> Report {
        let name = &self.s.name;
        let t0 = Instant::now();
        let diffs = converge(&self.s.source, &self.s.target).await;
        let mut report = Report { name: name.clone(), note: self.note.clone(), ..Default::default() };
        eprintln!("[{name}] converged after {:?}", t0.elapsed());
        self.verify(&mut report, &diffs).await;
        eprintln!("[{name}] verified after {:?}", t0.elapsed());
        let kafka = self.read_kafka(&mut report).await;
        self.trace(&mut report, &kafka).await;
        report.lost += diffs.len();
        eprintln!("[{name}] audited Kafka after {:?}", t0.elapsed());
        if self.archive {
            self.archived(&mut report, &kafka.ids, diffs.is_empty()).await;
        }
        eprintln!("[{name}] archive checked after {:?}", t0.elapsed());
        if std::env::var("FICUS_FAULTS_KEEP_LOGS").is_ok_and(|v| v == "1") {
            eprintln!("{}", self.s.problems());
        }
        report
    }

    /// The differences as problems, or, with none, `ficus verify` of every service (five tries).
    async fn verify(&self, report: &mut Report, diffs: &[String]) {
        if !diffs.is_empty() {
            report.problems.push(format!("source and target never converged ({} differences):", diffs.len()));
            report.problems.extend(diffs.iter().take(10).cloned());
            report.problems.push(format!("ficus warnings and errors:\n{}", self.s.problems()));
            return;
        }
        for service in SERVICES {
            let mut last = String::new();
            let mut passed = false;
            for _ in 0..5 {
                let out = self.s.run_with(&["verify", "--service", service, "--settle", "1"], self.env);
                last = text(&out);
                if out.status.success() {
                    passed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            if !passed {
                report.problems.push(format!("ficus verify --service {service} did not pass:\n{}", tail_of(&last, 30)));
                report.problems.push(format!("ficus warnings and errors:\n{}", self.s.problems()));
            }
        }
    }

    /// Every record of the workload's topics, counted (delivered, duplicated) and sorted.
    async fn read_kafka(&self, report: &mut Report) -> OnKafka {
        let raw = read_raw_async(&self.brokers, &[PRODUCTS, CUSTOMERS]).await;
        let mut kafka = OnKafka::default();
        let mut events: HashSet<String> = HashSet::new();
        for r in &raw {
            let Some(message) = r.payload.as_deref().and_then(|p| Message::decode(p).ok()) else {
                report.problems.push(format!("undecodable record at {}[{}]@{}", r.topic, r.partition, r.offset));
                continue;
            };
            kafka.ids.insert(message.id().to_string());
            let ev = match message {
                Message::Event(ev) => ev,
                Message::Control(c) => {
                    // A snapshot's end-of-copy marker: the newest start of the topic's snapshots.
                    let ficus::event::Control::SnapshotCompleted(marker) = c.control;
                    let start = kafka.swept.entry(r.topic.clone()).or_default();
                    if marker.start.as_str() > start.as_str() {
                        *start = marker.start.as_str().to_string();
                    }
                    continue;
                }
            };
            if ev.data.derived.is_some() {
                continue;
            }
            report.delivered += 1;
            if !events.insert(ev.id.clone()) {
                report.duplicated += 1;
            }
            kafka.by_key.entry((r.topic.clone(), ev.subject.clone())).or_default().push(ev);
        }
        kafka
    }

    /// Each write of the log traced to the events that carry it and to the version the target
    /// holds: applied or lost.
    async fn trace(&self, report: &mut Report, kafka: &OnKafka) {
        let (log, target) = (self.log, &self.s.target);
        let mut versions = HashMap::new();
        versions.insert(PRODUCTS, target_versions(target, "products_db", "products").await);
        versions.insert(CUSTOMERS, target_versions(target, "customers_db", "customers").await);
        report.written = log.len();
        let mut unseen = 0;
        for w in log {
            let events = kafka.by_key.get(&(w.topic.to_string(), w.key.clone())).map(Vec::as_slice).unwrap_or_default();
            let carriers: Vec<&CanonicalEvent> = events.iter().filter(|e| carries(e, w)).collect();
            if carriers.is_empty() && w.kind == Kind::Delete && kafka.swept.contains_key(w.topic) {
                match versions[w.topic].get(&w.key) {
                    Some((_, true)) => {
                        report.lost += 1;
                        report.problems.push(format!("{w:?}: no delete event, and no sweep removed it"));
                    }
                    _ => report.applied += 1,
                }
                continue;
            }
            if carriers.is_empty() {
                let present = versions[w.topic].get(&w.key).is_some_and(|v| v.1);
                if deleted_unseen(w, log, kafka.swept.get(w.topic).map(String::as_str), present) {
                    report.applied += 1;
                    unseen += 1;
                    continue;
                }
                report.lost += 1;
                let seen: Vec<String> =
                    events.iter().map(|e| format!("{}@{}", e.data.op, e.position.sequence())).collect();
                let writes: Vec<String> = log
                    .iter()
                    .filter(|x| x.topic == w.topic && x.key == w.key)
                    .map(|x| format!("{:?}({}, {:?})", x.kind, x.marker, x.by))
                    .collect();
                report.problems.push(format!(
                    "{w:?}: no event on Kafka carries it; its events: {seen:?}; every write of its document: {writes:?}"
                ));
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
        if unseen > 0 {
            report.note.push_str(&format!(
                "{}{unseen} writes of documents deleted before the snapshot's start",
                if report.note.is_empty() { "" } else { "; " }
            ));
        }
    }

    /// Every message on Kafka in the event store (waited for, when the consumers kept up).
    async fn archived(&self, report: &mut Report, ids: &HashSet<String>, converged: bool) {
        let events = self.s.target.database("ficus").collection::<Document>("events");
        let mut missing = ids.len();
        // Only worth waiting for when the consumers kept up.
        let wait = if converged { 120 } else { 0 };
        let deadline = Instant::now() + Duration::from_secs(wait);
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
            missing = ids.iter().filter(|id| !archived.contains(*id)).count();
            if missing == 0 || Instant::now() + Duration::from_millis(500) >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if missing > 0 {
            report.lost += missing;
            report.problems.push(format!("{missing} event(s) on Kafka never reached the archive"));
            if converged {
                report.problems.push(format!("ficus warnings and errors:\n{}", self.s.problems()));
            }
        }
    }
}
