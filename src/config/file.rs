//! The configuration file as written: every key optional, read leniently so that one run
//! reports every problem in the file.
//!
//! A file is parsed as TOML first (a syntax error stops there: nothing after it can be trusted).
//! Each known key is then read on its own, so a value of the wrong type (`db = 5`) is one
//! problem among others instead of the end of the parse, and every unknown key is reported too,
//! each with its dotted path and line. What was read is handed to [`super::Config`], which
//! fills the gaps with defaults and the environment and checks the values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use serde::de::DeserializeOwned;

use super::report::{DefinitionError, Report};

/// The file, every value optional.
#[derive(Debug, Default, Clone)]
pub struct ConfigFile {
    pub source: SourceFile,
    pub kafka: KafkaFile,
    pub target: UriFile,
    pub store: StoreFile,
    pub tail: TailFile,
    pub snapshot: SnapshotFile,
    pub consume: ConsumeFile,
    pub reverse: ReverseFile,
    pub cutover: CutoverFile,
    pub redis: RedisFile,
    pub paths: PathsFile,
}

#[derive(Debug, Default, Clone)]
pub struct SourceFile {
    pub uri: Option<String>,
    pub db: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct KafkaFile {
    pub brokers: Option<String>,
    pub ce_headers: Option<bool>,
    /// Names this process slot in every consumer group it joins (static membership).
    pub instance_id: Option<String>,
    /// `"static"` (default) or `"dynamic"`.
    pub membership: Option<String>,
    /// librdkafka properties for every client (security.protocol, sasl.*, ssl.*, …).
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties for consumers only.
    pub consumer: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone)]
pub struct UriFile {
    pub uri: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct StoreFile {
    pub uri: Option<String>,
    pub db: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct TailFile {
    pub on_history_lost: Option<String>,
    pub max_in_flight: Option<u64>,
    pub checkpoint_interval_ms: Option<u64>,
    pub max_await_ms: Option<u64>,
    pub batch_size: Option<u64>,
    pub lease_ttl_ms: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct SnapshotFile {
    pub batch_size: Option<u64>,
    pub max_docs_per_sec: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct ConsumeFile {
    pub batch_max: Option<u64>,
    pub batch_wait_ms: Option<u64>,
    pub tombstone_ttl_days: Option<u64>,
    pub stall_secs: Option<u64>,
    pub shutdown_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct ReverseFile {
    pub partitions: Option<u64>,
    pub replication_factor: Option<u64>,
    pub ownership_poll_ms: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct CutoverFile {
    pub view_max_age_secs: Option<u64>,
    pub transaction_lifetime_secs: Option<u64>,
    /// `[cutover.analysis.<check>]`: a progressive rollout's check settings, by check name.
    pub analysis: BTreeMap<String, CheckFile>,
}

/// `[cutover.analysis.<check>]`: what a rollout's check accepts and how it fails.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CheckFile {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub failure_limit: Option<u32>,
    pub critical: Option<bool>,
    pub consecutive_error_limit: Option<u32>,
}

/// `[redis]`: the Redis that services with `[redis]` targets write into.
#[derive(Debug, Default, Clone)]
pub struct RedisFile {
    pub uri: Option<String>,
    pub pause_above: Option<f64>,
}

#[derive(Debug, Default, Clone)]
pub struct PathsFile {
    pub topics: Option<PathBuf>,
    pub transforms: Option<PathBuf>,
}

impl ConfigFile {
    /// Reads a file's text: what could be read, and every problem found (syntax, types,
    /// unknown keys), each naming its field and line.
    pub fn parse(text: &str, origin: &Path) -> (ConfigFile, Report) {
        let mut r = Reader { origin, text, report: Report::default() };
        let root: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let e: toml::de::Error = e;
                let at = e.span().map(|s| format!(" (line {})", line_of(text, s.start))).unwrap_or_default();
                r.report.push(DefinitionError::new(origin, "", format!("{}{at}", e.message().trim_end())));
                return (ConfigFile::default(), r.report);
            }
        };
        r.unknown(
            &root,
            "",
            &[
                "source", "kafka", "target", "store", "tail", "snapshot", "consume", "reverse", "cutover", "redis",
                "paths",
            ],
        );
        let file = ConfigFile {
            source: r.source(&root),
            kafka: r.kafka(&root),
            target: r.target(&root),
            store: r.store(&root),
            tail: r.tail(&root),
            snapshot: r.snapshot(&root),
            consume: r.consume(&root),
            reverse: r.reverse(&root),
            cutover: r.cutover(&root),
            redis: r.redis(&root),
            paths: r.paths(&root),
        };
        (file, r.report)
    }
}

// The sections, each read from the file's root table; their problems are reported in the
// order they are read.
impl Reader<'_> {
    /// A section's table with its unknown keys reported; an empty table if it is absent (or
    /// not a table, which is reported).
    fn section<'t>(&mut self, root: &'t toml::Table, name: &str, keys: &[&str]) -> &'t toml::Table {
        static EMPTY: LazyLock<toml::Table> = LazyLock::new(toml::Table::new);
        let t = self.table(root, "", name).unwrap_or(&EMPTY);
        self.unknown(t, name, keys);
        t
    }

    /// `[source]`: the monolith's MongoDB, its database and the name events give it.
    fn source(&mut self, root: &toml::Table) -> SourceFile {
        let t = self.section(root, "source", &["uri", "db", "name"]);
        SourceFile {
            uri: self.get(t, "source", "uri"),
            db: self.get(t, "source", "db"),
            name: self.get(t, "source", "name"),
        }
    }

    /// `[kafka]`: the brokers, group membership and librdkafka properties.
    fn kafka(&mut self, root: &toml::Table) -> KafkaFile {
        let t = self.section(
            root,
            "kafka",
            &["brokers", "ce_headers", "instance_id", "membership", "properties", "producer", "consumer"],
        );
        KafkaFile {
            brokers: self.get(t, "kafka", "brokers"),
            ce_headers: self.get(t, "kafka", "ce_headers"),
            instance_id: self.get(t, "kafka", "instance_id"),
            membership: self.get(t, "kafka", "membership"),
            properties: self.properties(t, "kafka", "properties"),
            producer: self.properties(t, "kafka", "producer"),
            consumer: self.properties(t, "kafka", "consumer"),
        }
    }

    /// `[target]`: the service databases' MongoDB.
    fn target(&mut self, root: &toml::Table) -> UriFile {
        let t = self.section(root, "target", &["uri"]);
        UriFile { uri: self.get(t, "target", "uri") }
    }

    /// `[store]`: ficus's own database (checkpoints, leases, the event store).
    fn store(&mut self, root: &toml::Table) -> StoreFile {
        let t = self.section(root, "store", &["uri", "db"]);
        StoreFile { uri: self.get(t, "store", "uri"), db: self.get(t, "store", "db") }
    }

    /// `[tail]`: the tail role's window, checkpoints, batches and lease.
    fn tail(&mut self, root: &toml::Table) -> TailFile {
        let keys = [
            "on_history_lost",
            "max_in_flight",
            "checkpoint_interval_ms",
            "max_await_ms",
            "batch_size",
            "lease_ttl_ms",
        ];
        let t = self.section(root, "tail", &keys);
        TailFile {
            on_history_lost: self.get(t, "tail", "on_history_lost"),
            max_in_flight: self.get(t, "tail", "max_in_flight"),
            checkpoint_interval_ms: self.get(t, "tail", "checkpoint_interval_ms"),
            max_await_ms: self.get(t, "tail", "max_await_ms"),
            batch_size: self.get(t, "tail", "batch_size"),
            lease_ttl_ms: self.get(t, "tail", "lease_ttl_ms"),
        }
    }

    /// `[snapshot]`: the initial copy's batch size and rate.
    fn snapshot(&mut self, root: &toml::Table) -> SnapshotFile {
        let t = self.section(root, "snapshot", &["batch_size", "max_docs_per_sec"]);
        SnapshotFile {
            batch_size: self.get(t, "snapshot", "batch_size"),
            max_docs_per_sec: self.get(t, "snapshot", "max_docs_per_sec"),
        }
    }

    /// `[consume]`: the consumers' batches, tombstones, stall and shutdown limits.
    fn consume(&mut self, root: &toml::Table) -> ConsumeFile {
        let keys = ["batch_max", "batch_wait_ms", "tombstone_ttl_days", "stall_secs", "shutdown_timeout_secs"];
        let t = self.section(root, "consume", &keys);
        ConsumeFile {
            batch_max: self.get(t, "consume", "batch_max"),
            batch_wait_ms: self.get(t, "consume", "batch_wait_ms"),
            tombstone_ttl_days: self.get(t, "consume", "tombstone_ttl_days"),
            stall_secs: self.get(t, "consume", "stall_secs"),
            shutdown_timeout_secs: self.get(t, "consume", "shutdown_timeout_secs"),
        }
    }

    /// `[reverse]`: the reverse topics and how often ownership is polled.
    fn reverse(&mut self, root: &toml::Table) -> ReverseFile {
        let t = self.section(root, "reverse", &["partitions", "replication_factor", "ownership_poll_ms"]);
        ReverseFile {
            partitions: self.get(t, "reverse", "partitions"),
            replication_factor: self.get(t, "reverse", "replication_factor"),
            ownership_poll_ms: self.get(t, "reverse", "ownership_poll_ms"),
        }
    }

    /// `[cutover]`: what ficus assumes of applications and servers around a move.
    fn cutover(&mut self, root: &toml::Table) -> CutoverFile {
        let t = self.section(root, "cutover", &["view_max_age_secs", "transaction_lifetime_secs", "analysis"]);
        CutoverFile {
            view_max_age_secs: self.get(t, "cutover", "view_max_age_secs"),
            transaction_lifetime_secs: self.get(t, "cutover", "transaction_lifetime_secs"),
            analysis: self.analysis(t),
        }
    }

    /// `[cutover.analysis.<check>]`, one table per check it names (known checks only).
    fn analysis(&mut self, cutover: &toml::Table) -> BTreeMap<String, CheckFile> {
        let mut out = BTreeMap::new();
        let Some(t) = self.table(cutover, "cutover", "analysis") else { return out };
        self.unknown(t, "cutover.analysis", super::ANALYSIS_CHECKS);
        for name in t.keys().filter(|k| super::ANALYSIS_CHECKS.contains(&k.as_str())) {
            let Some(c) = self.table(t, "cutover.analysis", name) else { continue };
            let at = format!("cutover.analysis.{name}");
            self.unknown(c, &at, &["min", "max", "failure_limit", "critical", "consecutive_error_limit"]);
            let check = CheckFile {
                min: self.get(c, &at, "min"),
                max: self.get(c, &at, "max"),
                failure_limit: self.get(c, &at, "failure_limit"),
                critical: self.get(c, &at, "critical"),
                consecutive_error_limit: self.get(c, &at, "consecutive_error_limit"),
            };
            if let (Some(lo), Some(hi)) = (check.min, check.max)
                && lo > hi
            {
                self.problem(&join(&at, "min"), format!("min {lo} is above max {hi}: nothing could pass"));
            }
            out.insert(name.clone(), check);
        }
        out
    }

    /// `[paths]`: where the topic definitions and transforms are.
    /// `[redis]`: the Redis of the services whose targets live there, and when they pause.
    fn redis(&mut self, root: &toml::Table) -> RedisFile {
        let t = self.section(root, "redis", &["uri", "pause_above"]);
        RedisFile { uri: self.get(t, "redis", "uri"), pause_above: self.get(t, "redis", "pause_above") }
    }

    fn paths(&mut self, root: &toml::Table) -> PathsFile {
        let t = self.section(root, "paths", &["topics", "transforms"]);
        PathsFile { topics: self.get(t, "paths", "topics"), transforms: self.get(t, "paths", "transforms") }
    }
}

struct Reader<'a> {
    origin: &'a Path,
    text: &'a str,
    report: Report,
}

impl Reader<'_> {
    fn problem(&mut self, field: &str, message: impl std::fmt::Display) {
        let at = find_line(self.text, field).map(|l| format!(" (line {l})")).unwrap_or_default();
        self.report.push(DefinitionError::new(self.origin, field, format!("{message}{at}")));
    }

    fn table<'t>(&mut self, parent: &'t toml::Table, at: &str, key: &str) -> Option<&'t toml::Table> {
        match parent.get(key)? {
            toml::Value::Table(t) => Some(t),
            other => {
                self.problem(&join(at, key), format!("expected a table, found {}", other.type_str()));
                None
            }
        }
    }

    fn unknown(&mut self, t: &toml::Table, at: &str, known: &[&str]) {
        for key in t.keys().filter(|k| !known.contains(&k.as_str())) {
            self.problem(&join(at, key), format!("unknown key (expected one of: {})", known.join(", ")));
        }
    }

    fn get<T: DeserializeOwned>(&mut self, t: &toml::Table, at: &str, key: &str) -> Option<T> {
        let v = t.get(key)?;
        match T::deserialize(v.clone()) {
            Ok(x) => Some(x),
            Err(e) => {
                self.problem(&join(at, key), e.message().trim_end());
                None
            }
        }
    }

    /// A table of librdkafka properties: names to text (numbers and booleans are taken as text).
    fn properties(&mut self, t: &toml::Table, at: &str, key: &str) -> BTreeMap<String, String> {
        let Some(table) = self.table(t, at, key) else { return BTreeMap::new() };
        let at = join(at, key);
        let mut out = BTreeMap::new();
        for (k, v) in table {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => {
                    self.problem(
                        &join(&at, k),
                        format!("expected a librdkafka value (text), found {}", other.type_str()),
                    );
                    continue;
                }
            };
            out.insert(k.clone(), text);
        }
        out
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() { key.to_string() } else { format!("{at}.{key}") }
}

/// The line a byte offset is on.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].lines().count().max(1)
}

/// The line a dotted field is set on: its key under its table's header (`[a.b]` then `c = `),
/// or a header naming it. Quoted keys are matched with their quotes.
fn find_line(text: &str, field: &str) -> Option<usize> {
    let (table, key) = field.rsplit_once('.').map_or(("", field), |(t, k)| (t, k));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(header) = l.strip_prefix('[').and_then(|h| h.split(']').next()) {
            current = header.trim().to_string();
            if current == field {
                return Some(i + 1);
            }
            continue;
        }
        let name = l.split('=').next().unwrap_or_default().trim().trim_matches('"');
        if current == table && name == key && l.contains('=') {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_of_a_file_is_reported_in_one_run() {
        let text = "[source]\ndb = 5\nurl = \"x\"\n\n[tail]\nlease_ttl_ms = \"abc\"\n\n[kafka.producer]\n\"linger.ms\" = 5\n\n[paths]\ntopics = \"defs\"\n\n[nonsense]\n";
        let (file, report) = ConfigFile::parse(text, Path::new("f.toml"));
        let text = report.to_string();
        for needle in [
            "f.toml: source.db: invalid type: integer `5`, expected a string (line 2)",
            "f.toml: source.url: unknown key",
            "(line 3)",
            "f.toml: tail.lease_ttl_ms:",
            "(line 6)",
            "f.toml: nonsense: unknown key",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert_eq!(report.errors.len(), 4, "{text}");
        // What could be read was read.
        assert_eq!(file.paths.topics.as_deref(), Some(Path::new("defs")));
        assert_eq!(file.kafka.producer.get("linger.ms").map(String::as_str), Some("5"));
    }

    #[test]
    fn analysis_settings_name_known_checks_and_keys_every_problem_reported() {
        let text = "[cutover.analysis.forward_lag]\nmax = 5000\nfailure_limit = 4\n\n[cutover.analysis.verify_score]\n\
                    min = 99.5\nmax = 90\n\n[cutover.analysis.latency]\nmax = 1\n\n[cutover.analysis.dead_letters]\n\
                    critical = \"yes\"\nbound = 3\n";
        let (file, report) = ConfigFile::parse(text, Path::new("f.toml"));
        let text = report.to_string();
        for needle in [
            "f.toml: cutover.analysis.latency: unknown key (expected one of: forward_lag, reverse_lag",
            "f.toml: cutover.analysis.verify_score.min: min 99.5 is above max 90",
            "f.toml: cutover.analysis.dead_letters.critical: invalid type: string \"yes\", expected a boolean",
            "f.toml: cutover.analysis.dead_letters.bound: unknown key",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert_eq!(report.errors.len(), 4, "{text}");
        let lag = &file.cutover.analysis["forward_lag"];
        assert_eq!((lag.max, lag.failure_limit, lag.min), (Some(5000.0), Some(4), None));
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let (_, report) = ConfigFile::parse("[tail]\nlease_ttl_ms = = 3\n", Path::new("f.toml"));
        assert_eq!(report.errors.len(), 1);
        assert!(report.to_string().contains("(line 2)"), "{report}");
    }
}
