//! Configuration: one TOML file (default `ficus.toml`), built-in defaults, and the environment.
//!
//! The file format ([`ConfigFile`]) is kept apart from what the program runs on ([`Config`]):
//! the file is all optional, defaults and `FICUS_*` environment variables fill the gaps, and
//! [`Config::load`] validates the result once, reporting every problem together. Connection
//! strings can carry passwords, so anything that prints one goes through [`redact_uri`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use report::{DefinitionError, Problem, Report};

mod file;
pub use file::CheckFile as CheckSettings;
pub mod report;
pub mod topics;

pub use file::ConfigFile;
use file::{ConsumeFile, CutoverFile, KafkaFile, RedisFile, ReverseFile, SnapshotFile, TailFile};

/// Environment variables that override connection settings (documented in the README).
pub const ENV_VARS: &[(&str, &str)] = &[
    ("FICUS_SOURCE_URI", "source.uri: the monolith's MongoDB"),
    ("FICUS_SOURCE_DB", "source.db: the monolith database (default linechatbot)"),
    ("FICUS_SOURCE_NAME", "source.name: names the source in events and checkpoints (default: the db)"),
    ("FICUS_KAFKA_BROKERS", "kafka.brokers: bootstrap servers"),
    (
        "FICUS_KAFKA_INSTANCE_ID",
        "kafka.instance_id: this process slot's static group membership (default: the host name)",
    ),
    ("FICUS_TARGET_URI", "target.uri: the service databases' MongoDB"),
    ("FICUS_STORE_URI", "store.uri: ficus's own database (checkpoints, leases, event store)"),
    ("FICUS_STORE_DB", "store.db: the name of that database (default ficus)"),
    ("FICUS_REDIS_URI", "redis.uri: the Redis of services with [redis] targets (default redis://127.0.0.1:6379)"),
    ("FICUS_TOPICS_DIR", "paths.topics (default ./topics)"),
    ("FICUS_TRANSFORMS_DIR", "paths.transforms (default ./transforms)"),
];

/// How ficus's consumers join their groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// KIP-345 static membership: each member has a `group.instance.id` built from
    /// `kafka.instance_id`, so a process that restarts in place (systemd, a StatefulSet pod, a
    /// one-replica Deployment) gets its partitions back at once, with no rebalance and no wait
    /// for the dead member's session to expire. The default.
    Static,
    /// Plain dynamic membership: every start is a new member.
    Dynamic,
}

/// What to do when the change stream can no longer resume from the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHistoryLost {
    /// Stop with an error naming the cause and the remedy (the default).
    Fail,
    /// Take a fresh snapshot and stream from there.
    Resnapshot,
}

/// The validated configuration ficus runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    pub target_uri: String,
    pub store: StoreConfig,
    pub tail: TailConfig,
    pub snapshot: SnapshotConfig,
    pub consume: ConsumeConfig,
    pub reverse: ReverseConfig,
    pub cutover: CutoverConfig,
    pub redis: RedisConfig,
    pub topics_dir: PathBuf,
    pub transforms_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub uri: String,
    pub db: String,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub ce_headers: bool,
    /// Stable across restarts of the same process slot (host name, pod name): with
    /// [`Membership::Static`] every consumer group member is `group.instance.id =
    /// <instance_id>/<group>`, so a restarted process takes its partitions straight back.
    pub instance_id: String,
    pub membership: Membership,
    pub properties: BTreeMap<String, String>,
    pub producer: BTreeMap<String, String>,
    pub consumer: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub uri: String,
    pub db: String,
}

#[derive(Debug, Clone)]
pub struct TailConfig {
    pub on_history_lost: OnHistoryLost,
    /// Events handed to Kafka but not yet acknowledged, at most (backpressure).
    pub max_in_flight: usize,
    pub checkpoint_interval: Duration,
    /// How long one change-stream getMore waits for new changes.
    pub max_await: Duration,
    pub batch_size: u32,
    /// How long a tailer's lease lasts unrenewed: a standby takes over within it.
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    pub batch_size: u32,
    /// 0 = unthrottled.
    pub max_docs_per_sec: u32,
}

/// How consumers apply what they read, for live consumption, replay and re-drive alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeConfig {
    /// A batch is at most this many messages...
    pub batch_max: usize,
    /// ...collected for at most this long.
    pub batch_wait: Duration,
    /// How long a delete's tombstone refuses late older writes; must exceed Kafka retention.
    pub tombstone_ttl: Duration,
    /// `/readyz` reports a role that made no progress for this long as stalled.
    pub stall: Duration,
    /// How long SIGTERM/SIGINT may take to drain and checkpoint.
    pub shutdown_timeout: Duration,
    /// How old a batch's judgement of ownership may be when it commits: half the servers'
    /// transaction lifetime (`cutover.transaction_lifetime_secs`; see `cutover::views`).
    pub judgement_max_age: Duration,
}

/// Reverse sync (a service's own writes back into the monolith) and cutover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseConfig {
    /// Partitions of each service's `<service>.changes` topic.
    pub partitions: i32,
    /// Replication factor of the reverse topics (`<service>.changes`, `.conflicts`).
    pub replication_factor: i32,
    /// How often a running process re-reads the ownership records.
    pub ownership_poll: Duration,
}

/// The Redis that services with `[redis]` targets write into.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, `rediss://` for TLS (used only by services
    /// whose transforms declare `[redis]`).
    pub uri: String,
    /// A Redis consumer pauses while `used_memory / maxmemory` is above this share.
    pub pause_above: f64,
}

/// What ficus assumes of applications and servers around an ownership change.
#[derive(Debug, Clone, PartialEq)]
pub struct CutoverConfig {
    /// The longest an application may act on a view of `GET /cutover` (the application
    /// contract): a fence holds once every application seen within it has acknowledged the
    /// fence, or once it has passed since the fence; the reverse tail reads this long past a
    /// return to 0%.
    pub view_max_age: Duration,
    /// The servers' `transactionLifetimeLimitSeconds`: a forced switch waits at most this long
    /// (plus a margin) for a ficus process that does not acknowledge it, since any batch it had
    /// open by then has been aborted by the server.
    pub transaction_lifetime: Duration,
    /// `[cutover.analysis.<check>]`: a progressive rollout's check settings, by check name
    /// (applied over `cutover::rollout::default_checks`).
    pub analysis: BTreeMap<String, CheckSettings>,
}

/// The checks a progressive rollout runs, by name (`cutover::rollout::default_checks` has one
/// of each; `[cutover.analysis.<name>]` tunes one).
pub const ANALYSIS_CHECKS: &[&str] =
    &["forward_lag", "reverse_lag", "conflicts", "fence_violations", "dead_letters", "verify_score"];

pub const DEFAULT_MONGO_URI: &str = "mongodb://127.0.0.1:27017/?directConnection=true";
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
pub const DEFAULT_REDIS_URI: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_CONFIG_FILE: &str = "ficus.toml";

/// Reads `FICUS_*` overrides from a lookup function (the process environment in production,
/// a map in tests).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Loads the config file if given or if `ficus.toml` exists in the working directory, then
    /// applies the environment. An explicitly named file that is missing is an error. Returns
    /// the configuration as far as it could be read (defaults where a value is wrong, so the
    /// definitions it points to can still be checked) and every problem found.
    pub fn load(path: Option<&Path>, env: EnvLookup<'_>) -> (Config, Report) {
        let origin = path.unwrap_or(Path::new(DEFAULT_CONFIG_FILE));
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| format!("cannot read: {e}")),
            None if origin.exists() => std::fs::read_to_string(origin).map_err(|e| format!("cannot read: {e}")),
            None => Ok(String::new()),
        };
        match text {
            Ok(text) => Self::from_text(&text, origin, env),
            Err(why) => {
                let (config, mut report) = Self::build(ConfigFile::default(), origin, env);
                report.errors.insert(0, DefinitionError::new(origin, "", why));
                (config, report)
            }
        }
    }

    /// Reads a configuration file's text (see [`ConfigFile::parse`]) and builds the
    /// configuration from it and the environment; every problem of both, together.
    pub fn from_text(text: &str, origin: &Path, env: EnvLookup<'_>) -> (Config, Report) {
        let (file, mut report) = ConfigFile::parse(text, origin);
        let (config, more) = Self::build(file, origin, env);
        report.extend(more);
        (config, report)
    }

    /// Builds and validates a config from a parsed file and the environment.
    pub fn from_file(f: ConfigFile, origin: &Path, env: EnvLookup<'_>) -> Result<Config, Report> {
        let (config, report) = Self::build(f, origin, env);
        report.into_result(config)
    }

    /// Builds a config from a parsed file and the environment, with defaults where a value is
    /// wrong, and the problems found, in the order of the file's sections.
    fn build(f: ConfigFile, origin: &Path, env: EnvLookup<'_>) -> (Config, Report) {
        let mut report = Report::default();
        let mut err = |field: &str, msg: String| report.push(DefinitionError::new(origin, field, msg));
        let at = Endpoints::pick(&f, env);
        at.check(&f.kafka, &mut err);
        let membership = membership(f.kafka.membership.as_deref(), &mut err);
        let tail = tail_config(&f.tail, &mut err);
        let snapshot = snapshot_config(&f.snapshot, &mut err);
        let consume = consume_config(&f.consume, &f.cutover, &mut err);
        let reverse = reverse_config(&f.reverse, &mut err);
        let cutover = cutover_config(&f.cutover, &mut err);
        let redis = redis_config(&f.redis, env, &mut err);
        let cfg = Config {
            source: at.source,
            kafka: KafkaConfig {
                brokers: at.brokers,
                ce_headers: f.kafka.ce_headers.unwrap_or(true),
                instance_id: at.instance_id,
                membership,
                properties: f.kafka.properties,
                producer: f.kafka.producer,
                consumer: f.kafka.consumer,
            },
            target_uri: at.target_uri,
            store: at.store,
            tail,
            snapshot,
            consume,
            reverse,
            cutover,
            redis,
            topics_dir: at.topics_dir,
            transforms_dir: at.transforms_dir,
        };
        (cfg, report)
    }

    /// A human-readable summary with every password redacted.
    pub fn describe(&self) -> String {
        format!(
            "source {} db {} (name {}), kafka {} (instance {}, {} membership), target {}, store {} db {}, topics {}, transforms {}",
            redact_uri(&self.source.uri),
            self.source.db,
            self.source.name,
            self.kafka.brokers,
            self.kafka.instance_id,
            match self.kafka.membership {
                Membership::Static => "static",
                Membership::Dynamic => "dynamic",
            },
            redact_uri(&self.target_uri),
            redact_uri(&self.store.uri),
            self.store.db,
            self.topics_dir.display(),
            self.transforms_dir.display(),
        )
    }
}

/// Where ficus connects and reads its definitions from, before they are checked.
struct Endpoints {
    source: SourceConfig,
    target_uri: String,
    store: StoreConfig,
    brokers: String,
    instance_id: String,
    topics_dir: PathBuf,
    transforms_dir: PathBuf,
}

impl Endpoints {
    /// Each setting from the environment (`FICUS_*`, if set and not empty; a directory if set),
    /// else the file, else its default.
    fn pick(f: &ConfigFile, env: EnvLookup<'_>) -> Endpoints {
        let pick = |var: &str, file: Option<&str>, default: &str| -> String {
            env(var).filter(|v| !v.is_empty()).or(file.map(str::to_owned)).unwrap_or_else(|| default.to_string())
        };
        let dir = |var: &str, file: Option<&Path>, default: &str| -> PathBuf {
            env(var).map(PathBuf::from).or(file.map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from(default))
        };
        let source_uri = pick("FICUS_SOURCE_URI", f.source.uri.as_deref(), DEFAULT_MONGO_URI);
        let source_db = pick("FICUS_SOURCE_DB", f.source.db.as_deref(), "linechatbot");
        let source_name = pick("FICUS_SOURCE_NAME", f.source.name.as_deref(), &source_db);
        let target_uri = pick("FICUS_TARGET_URI", f.target.uri.as_deref(), &source_uri);
        let store_uri = pick("FICUS_STORE_URI", f.store.uri.as_deref(), &target_uri);
        let store_db = pick("FICUS_STORE_DB", f.store.db.as_deref(), "ficus");
        let brokers = pick("FICUS_KAFKA_BROKERS", f.kafka.brokers.as_deref(), DEFAULT_BROKERS);
        let instance_id = pick("FICUS_KAFKA_INSTANCE_ID", f.kafka.instance_id.as_deref(), &host_name());
        Endpoints {
            source: SourceConfig { uri: source_uri, db: source_db, name: source_name },
            target_uri,
            store: StoreConfig { uri: store_uri, db: store_db },
            brokers,
            instance_id,
            topics_dir: dir("FICUS_TOPICS_DIR", f.paths.topics.as_deref(), "topics"),
            transforms_dir: dir("FICUS_TRANSFORMS_DIR", f.paths.transforms.as_deref(), "transforms"),
        }
    }

    /// Checks the connection strings, the database and source names, the brokers, the Kafka
    /// properties ficus sets itself, and the instance id.
    fn check(&self, kafka: &KafkaFile, err: Problem<'_>) {
        let uris = [("source.uri", &self.source.uri), ("target.uri", &self.target_uri), ("store.uri", &self.store.uri)];
        for (field, uri) in uris {
            if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
                err(field, format!("`{}` is not a mongodb:// connection string", redact_uri(uri)));
            }
        }
        for (field, db) in [("source.db", &self.source.db), ("store.db", &self.store.db)] {
            if db.is_empty() || db.contains(['/', '\\', '.', ' ', '"', '$', '\0']) {
                err(field, format!("`{db}` is not a valid database name"));
            }
        }
        let source_name = &self.source.name;
        if source_name.is_empty() || source_name.contains(char::is_whitespace) {
            err("source.name", format!("`{source_name}` must be a non-empty word"));
        }
        if self.brokers.trim().is_empty() {
            err("kafka.brokers", "no bootstrap servers".into());
        }
        check_kafka_properties(kafka, err);
        let instance_id = &self.instance_id;
        if instance_id.is_empty() || instance_id.len() > 200 || !instance_id.chars().all(|c| c.is_ascii_graphic()) {
            err(
                "kafka.instance_id",
                format!(
                    "`{instance_id}` must be 1 to 200 printable characters without spaces (say, the pod or host name)"
                ),
            );
        }
    }
}

/// Reports the librdkafka properties ficus sets itself, in any of the three tables.
fn check_kafka_properties(kafka: &KafkaFile, err: Problem<'_>) {
    for (section, props) in
        [("properties", &kafka.properties), ("producer", &kafka.producer), ("consumer", &kafka.consumer)]
    {
        for k in props.keys() {
            let why = match k.as_str() {
                "bootstrap.servers" => "set kafka.brokers (or FICUS_KAFKA_BROKERS) instead",
                "group.instance.id" => "set kafka.instance_id (and kafka.membership) instead",
                "group.id" | "enable.auto.commit" | "enable.auto.offset.store" => {
                    "ficus sets it: offsets are stored only after the write, per consumer group"
                }
                _ => continue,
            };
            err(&format!("kafka.{section}.{k}"), why.into());
        }
    }
}

/// `kafka.membership`: `"static"` (the default) or `"dynamic"`.
fn membership(value: Option<&str>, err: Problem<'_>) -> Membership {
    match value {
        None | Some("static") => Membership::Static,
        Some("dynamic") => Membership::Dynamic,
        Some(other) => {
            err("kafka.membership", format!("`{other}`: expected \"static\" or \"dynamic\""));
            Membership::Static
        }
    }
}

/// `tail.on_history_lost`: `"fail"` (the default) or `"resnapshot"`.
fn on_history_lost(value: Option<&str>, err: Problem<'_>) -> OnHistoryLost {
    match value {
        None | Some("fail") => OnHistoryLost::Fail,
        Some("resnapshot") => OnHistoryLost::Resnapshot,
        Some(other) => {
            err("tail.on_history_lost", format!("`{other}`: expected \"fail\" or \"resnapshot\""));
            OnHistoryLost::Fail
        }
    }
}

/// A setting that must be greater than 0: its value, or the default if it is unset, or the
/// default and a problem if it is 0.
fn positive(field: &str, v: Option<u64>, default: u64, err: Problem<'_>) -> u64 {
    match v {
        Some(0) => {
            err(field, "must be greater than 0".into());
            default
        }
        Some(v) => v,
        None => default,
    }
}

// The sections below read their fields in the file's order (a struct expression evaluates its
// fields as written), so problems are reported in it.

/// The `[tail]` section.
fn tail_config(f: &TailFile, err: Problem<'_>) -> TailConfig {
    TailConfig {
        on_history_lost: on_history_lost(f.on_history_lost.as_deref(), err),
        max_in_flight: positive("tail.max_in_flight", f.max_in_flight, 20_000, err) as usize,
        checkpoint_interval: Duration::from_millis(positive(
            "tail.checkpoint_interval_ms",
            f.checkpoint_interval_ms,
            1000,
            err,
        )),
        max_await: Duration::from_millis(positive("tail.max_await_ms", f.max_await_ms, 1000, err)),
        batch_size: positive("tail.batch_size", f.batch_size, 1000, err).min(u64::from(u32::MAX)) as u32,
        lease_ttl: Duration::from_millis(positive("tail.lease_ttl_ms", f.lease_ttl_ms, 15_000, err)),
    }
}

/// The `[snapshot]` section.
fn snapshot_config(f: &SnapshotFile, err: Problem<'_>) -> SnapshotConfig {
    SnapshotConfig {
        batch_size: positive("snapshot.batch_size", f.batch_size, 1000, err).min(u64::from(u32::MAX)) as u32,
        max_docs_per_sec: f.max_docs_per_sec.unwrap_or(0).min(u64::from(u32::MAX)) as u32,
    }
}

/// The `[consume]` section; a batch's judgement of ownership may be half the transaction
/// lifetime old, from the `[cutover]` section (which reports that setting's problems).
fn consume_config(f: &ConsumeFile, cutover: &CutoverFile, err: Problem<'_>) -> ConsumeConfig {
    ConsumeConfig {
        batch_max: positive("consume.batch_max", f.batch_max, 500, err) as usize,
        batch_wait: Duration::from_millis(positive("consume.batch_wait_ms", f.batch_wait_ms, 50, err)),
        tombstone_ttl: Duration::from_secs(
            positive("consume.tombstone_ttl_days", f.tombstone_ttl_days, 14, err).saturating_mul(86_400),
        ),
        stall: Duration::from_secs(positive("consume.stall_secs", f.stall_secs, 60, err)),
        shutdown_timeout: Duration::from_secs(positive(
            "consume.shutdown_timeout_secs",
            f.shutdown_timeout_secs,
            30,
            err,
        )),
        judgement_max_age: Duration::from_secs(transaction_lifetime_secs(cutover, &mut |_, _| {}).div_ceil(2)),
    }
}

/// The `[reverse]` section.
fn reverse_config(f: &ReverseFile, err: Problem<'_>) -> ReverseConfig {
    ReverseConfig {
        partitions: positive("reverse.partitions", f.partitions, 6, err).min(10_000) as i32,
        replication_factor: positive("reverse.replication_factor", f.replication_factor, 1, err).min(100) as i32,
        ownership_poll: Duration::from_millis(positive("reverse.ownership_poll_ms", f.ownership_poll_ms, 1000, err)),
    }
}

/// The `[cutover]` section.
fn cutover_config(f: &CutoverFile, err: Problem<'_>) -> CutoverConfig {
    CutoverConfig {
        view_max_age: Duration::from_secs(positive("cutover.view_max_age_secs", f.view_max_age_secs, 10, err)),
        transaction_lifetime: Duration::from_secs(transaction_lifetime_secs(f, err)),
        analysis: f.analysis.clone(),
    }
}

/// The `[redis]` section and `FICUS_REDIS_URI`: a `redis://`, `rediss://` or `redis+unix://`
/// URI, and a pause share in (0, 1].
fn redis_config(f: &RedisFile, env: EnvLookup<'_>, err: Problem<'_>) -> RedisConfig {
    let uri = env("FICUS_REDIS_URI").filter(|v| !v.is_empty()).or_else(|| f.uri.clone());
    let uri = uri.unwrap_or_else(|| DEFAULT_REDIS_URI.to_string());
    let known = |p: &url::Url| match p.scheme() {
        "redis" | "rediss" => p.has_host(),
        "redis+unix" | "unix" => !p.path().is_empty(),
        _ => false,
    };
    if !url::Url::parse(&uri).is_ok_and(|p| known(&p)) {
        err("redis.uri", format!("`{}` is not a redis:// or rediss:// connection string", redact_uri(&uri)));
    }
    let pause_above = match f.pause_above {
        Some(share) if !(share > 0.0 && share <= 1.0) => {
            err("redis.pause_above", format!("{share}: a share of maxmemory, above 0 and at most 1 (say 0.85)"));
            0.85
        }
        Some(share) => share,
        None => 0.85,
    };
    RedisConfig { uri, pause_above }
}

/// `cutover.transaction_lifetime_secs`: the servers' `transactionLifetimeLimitSeconds`.
fn transaction_lifetime_secs(f: &CutoverFile, err: Problem<'_>) -> u64 {
    positive("cutover.transaction_lifetime_secs", f.transaction_lifetime_secs, 60, err)
}

/// This machine's host name (the pod name in Kubernetes, stable under systemd), or
/// `localhost` if the system will not say.
pub fn host_name() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Parses a metrics listen address.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("`{s}` is not host:port: {e}"))
}

/// Replaces the password of a connection string's user-info with `***`
/// (`mongodb://u:secret@h1,h2/db` → `mongodb://u:***@h1,h2/db`). Works on multi-host MongoDB
/// URIs, which URL parsers reject.
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = &uri[rest_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return uri.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    let redacted = if userinfo.contains(':') { format!("{user}:***") } else { user.to_string() };
    format!("{}{}{}", &uri[..rest_start], redacted, &rest[at..])
}

/// Redacts every connection string found anywhere in a piece of text (error messages from
/// drivers can echo the URI back).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("mongodb") {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let end = tail.find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ')').unwrap_or(tail.len());
        out.push_str(&redact_uri(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let cfg = Config::from_file(ConfigFile::default(), Path::new("ficus.toml"), &env_of(&[])).unwrap();
        assert_eq!(cfg.source.db, "linechatbot");
        assert_eq!(cfg.source.name, "linechatbot");
        assert_eq!(cfg.target_uri, DEFAULT_MONGO_URI);
        assert_eq!(cfg.store.db, "ficus");
        assert!(cfg.kafka.ce_headers);

        let env = env_of(&[("FICUS_KAFKA_BROKERS", "k:2"), ("FICUS_STORE_URI", "mongodb://s:1")]);
        let text = "[source]\ndb = \"other\"\n[kafka]\nbrokers = \"k:1\"\nce_headers = false\n";
        let (cfg, report) = Config::from_text(text, Path::new("f.toml"), &env);
        assert!(report.is_empty(), "{report}");
        assert_eq!(cfg.source.db, "other");
        assert_eq!(cfg.kafka.brokers, "k:2");
        assert!(!cfg.kafka.ce_headers);
        assert_eq!(cfg.store.uri, "mongodb://s:1");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let file = "[source]\ndb = \"a.b\"\n[tail]\non_history_lost = \"shrug\"\nmax_in_flight = 0\n[consume]\nbatch_max = 0\n[kafka.producer]\n\"bootstrap.servers\" = \"x\"\n";
        let env = env_of(&[("FICUS_TARGET_URI", "http://nope")]);
        let text = Config::from_text(file, Path::new("f.toml"), &env).1.to_string();
        for needle in [
            "source.db",
            "tail.on_history_lost",
            "tail.max_in_flight",
            "target.uri",
            "kafka.producer.bootstrap.servers",
            "consume.batch_max",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
    }

    #[test]
    fn redis_is_checked_with_the_rest_and_the_environment_wins() {
        let text = "[redis]\nuri = \"http://cache:6379\"\npause_above = 1.5\n[consume]\nbatch_max = 0\n";
        let (_, report) = Config::from_text(text, Path::new("f.toml"), &env_of(&[]));
        let report = report.to_string();
        for needle in ["redis.uri", "not a redis://", "redis.pause_above", "consume.batch_max"] {
            assert!(report.contains(needle), "missing {needle} in {report}");
        }
        let env = env_of(&[("FICUS_REDIS_URI", "rediss://u:secret@cache:6380/0")]);
        let (cfg, report) = Config::from_text("[redis]\nuri = \"redis://other\"\n", Path::new("f.toml"), &env);
        assert!(report.is_empty(), "{report}");
        assert_eq!(cfg.redis.uri, "rediss://u:secret@cache:6380/0");
        assert_eq!(cfg.redis.pause_above, 0.85);
        assert_eq!(redact_uri(&cfg.redis.uri), "rediss://u:***@cache:6380/0");
        let (bare, _) = Config::from_text("", Path::new("f.toml"), &env_of(&[]));
        assert_eq!(bare.redis.uri, DEFAULT_REDIS_URI);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let (_, report) = Config::from_text("[source]\nurl = \"x\"\n", Path::new("f.toml"), &env_of(&[]));
        assert!(report.to_string().contains("source.url: unknown key"), "{report}");
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/ficus.example.toml"));
        let (cfg, report) = Config::load(Some(path), &env_of(&[]));
        assert!(report.is_empty(), "{report}");
        assert_eq!(cfg.consume.batch_max, 500);
    }

    #[test]
    fn paths_are_kept_when_other_values_are_wrong() {
        let text = "[source]\ndb = 5\n[paths]\ntopics = \"elsewhere\"\n";
        let (cfg, report) = Config::from_text(text, Path::new("f.toml"), &env_of(&[]));
        assert_eq!(report.errors.len(), 1, "{report}");
        assert_eq!(cfg.topics_dir, Path::new("elsewhere"));
    }

    #[test]
    fn passwords_never_print() {
        assert_eq!(redact_uri("mongodb://u:secret@h1:1,h2:2/db?x=1"), "mongodb://u:***@h1:1,h2:2/db?x=1");
        assert_eq!(redact_uri("mongodb://u@h/db"), "mongodb://u@h/db");
        assert_eq!(redact_uri("mongodb://h/db"), "mongodb://h/db");
        assert_eq!(redact_uri("mongodb+srv://a:p%40ss@c.example/"), "mongodb+srv://a:***@c.example/");
        let t = redact_text("failed to reach mongodb://u:pw@h:1/?tls=true (timeout)");
        assert_eq!(t, "failed to reach mongodb://u:***@h:1/?tls=true (timeout)");
        assert!(
            !Config::from_file(
                ConfigFile::default(),
                Path::new("x"),
                &env_of(&[("FICUS_SOURCE_URI", "mongodb://a:hunter2@h/")])
            )
            .unwrap()
            .describe()
            .contains("hunter2")
        );
    }
}
