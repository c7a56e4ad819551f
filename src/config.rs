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

use serde::Deserialize;

use crate::definitions::{DefinitionError, Report, read_toml};

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
    ("FICUS_TOPICS_DIR", "paths.topics (default ./topics)"),
    ("FICUS_TRANSFORMS_DIR", "paths.transforms (default ./transforms)"),
];

/// The file as written: everything optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub source: SourceFile,
    #[serde(default)]
    pub kafka: KafkaFile,
    #[serde(default)]
    pub target: UriFile,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub tail: TailFile,
    #[serde(default)]
    pub snapshot: SnapshotFile,
    #[serde(default)]
    pub paths: PathsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub uri: Option<String>,
    pub db: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    pub brokers: Option<String>,
    pub ce_headers: Option<bool>,
    /// Names this process slot in every consumer group it joins (static membership).
    pub instance_id: Option<String>,
    /// `"static"` (default) or `"dynamic"`.
    pub membership: Option<String>,
    /// librdkafka properties for every client (security.protocol, sasl.*, ssl.*, …).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties for consumers only.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UriFile {
    pub uri: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub uri: Option<String>,
    pub db: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailFile {
    pub on_history_lost: Option<String>,
    pub max_in_flight: Option<usize>,
    pub checkpoint_interval_ms: Option<u64>,
    pub max_await_ms: Option<u64>,
    pub batch_size: Option<u32>,
    pub lease_ttl_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile {
    pub batch_size: Option<u32>,
    pub max_docs_per_sec: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsFile {
    pub topics: Option<PathBuf>,
    pub transforms: Option<PathBuf>,
}

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

pub const DEFAULT_MONGO_URI: &str = "mongodb://127.0.0.1:27017/?directConnection=true";
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
pub const DEFAULT_CONFIG_FILE: &str = "ficus.toml";

/// Reads `FICUS_*` overrides from a lookup function (the process environment in production,
/// a map in tests).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Loads the config file if given or if `ficus.toml` exists in the working directory, then
    /// applies the environment. An explicitly named file that is missing is an error.
    pub fn load(path: Option<&Path>, env: EnvLookup<'_>) -> Result<Config, Report> {
        let file = match path {
            Some(p) => read_toml::<ConfigFile>(p).map_err(|e| Report { errors: vec![e] })?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                read_toml::<ConfigFile>(Path::new(DEFAULT_CONFIG_FILE)).map_err(|e| Report { errors: vec![e] })?
            }
            None => ConfigFile::default(),
        };
        let origin = path.unwrap_or(Path::new(DEFAULT_CONFIG_FILE));
        Self::from_file(file, origin, env)
    }

    /// Builds and validates a config from a parsed file and the environment.
    pub fn from_file(f: ConfigFile, origin: &Path, env: EnvLookup<'_>) -> Result<Config, Report> {
        let mut report = Report::default();
        let mut err = |field: &str, msg: String| report.push(DefinitionError::new(origin, field, msg));
        let pick = |var: &str, file: Option<String>, default: &str| -> String {
            env(var).filter(|v| !v.is_empty()).or(file).unwrap_or_else(|| default.to_string())
        };
        let source_uri = pick("FICUS_SOURCE_URI", f.source.uri, DEFAULT_MONGO_URI);
        let source_db = pick("FICUS_SOURCE_DB", f.source.db, "linechatbot");
        let source_name = pick("FICUS_SOURCE_NAME", f.source.name, &source_db);
        let target_uri = pick("FICUS_TARGET_URI", f.target.uri, &source_uri);
        let store_uri = pick("FICUS_STORE_URI", f.store.uri, &target_uri);
        let store_db = pick("FICUS_STORE_DB", f.store.db, "ficus");
        let brokers = pick("FICUS_KAFKA_BROKERS", f.kafka.brokers, DEFAULT_BROKERS);
        let instance_id = pick("FICUS_KAFKA_INSTANCE_ID", f.kafka.instance_id, &host_name());
        let topics_dir =
            env("FICUS_TOPICS_DIR").map(PathBuf::from).or(f.paths.topics).unwrap_or_else(|| PathBuf::from("topics"));
        let transforms_dir = env("FICUS_TRANSFORMS_DIR")
            .map(PathBuf::from)
            .or(f.paths.transforms)
            .unwrap_or_else(|| PathBuf::from("transforms"));

        for (field, uri) in [("source.uri", &source_uri), ("target.uri", &target_uri), ("store.uri", &store_uri)] {
            if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
                err(field, format!("`{}` is not a mongodb:// connection string", redact_uri(uri)));
            }
        }
        for (field, db) in [("source.db", &source_db), ("store.db", &store_db)] {
            if db.is_empty() || db.contains(['/', '\\', '.', ' ', '"', '$', '\0']) {
                err(field, format!("`{db}` is not a valid database name"));
            }
        }
        if source_name.is_empty() || source_name.contains(char::is_whitespace) {
            err("source.name", format!("`{source_name}` must be a non-empty word"));
        }
        if brokers.trim().is_empty() {
            err("kafka.brokers", "no bootstrap servers".into());
        }
        for (section, props) in
            [("properties", &f.kafka.properties), ("producer", &f.kafka.producer), ("consumer", &f.kafka.consumer)]
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
        if instance_id.is_empty() || instance_id.len() > 200 || !instance_id.chars().all(|c| c.is_ascii_graphic()) {
            err(
                "kafka.instance_id",
                format!(
                    "`{instance_id}` must be 1 to 200 printable characters without spaces (say, the pod or host name)"
                ),
            );
        }
        let membership = match f.kafka.membership.as_deref() {
            None | Some("static") => Membership::Static,
            Some("dynamic") => Membership::Dynamic,
            Some(other) => {
                err("kafka.membership", format!("`{other}`: expected \"static\" or \"dynamic\""));
                Membership::Static
            }
        };
        let on_history_lost = match f.tail.on_history_lost.as_deref() {
            None | Some("fail") => OnHistoryLost::Fail,
            Some("resnapshot") => OnHistoryLost::Resnapshot,
            Some(other) => {
                err("tail.on_history_lost", format!("`{other}`: expected \"fail\" or \"resnapshot\""));
                OnHistoryLost::Fail
            }
        };
        let positive = |field: &str, v: Option<u64>, default: u64, err: &mut dyn FnMut(&str, String)| -> u64 {
            match v {
                Some(0) => {
                    err(field, "must be greater than 0".into());
                    default
                }
                Some(v) => v,
                None => default,
            }
        };
        let max_in_flight =
            positive("tail.max_in_flight", f.tail.max_in_flight.map(|v| v as u64), 20_000, &mut err) as usize;
        let checkpoint_interval =
            positive("tail.checkpoint_interval_ms", f.tail.checkpoint_interval_ms, 1000, &mut err);
        let max_await = positive("tail.max_await_ms", f.tail.max_await_ms, 1000, &mut err);
        let tail_batch = positive("tail.batch_size", f.tail.batch_size.map(u64::from), 1000, &mut err) as u32;
        let lease_ttl = positive("tail.lease_ttl_ms", f.tail.lease_ttl_ms, 15_000, &mut err);
        let snap_batch = positive("snapshot.batch_size", f.snapshot.batch_size.map(u64::from), 1000, &mut err) as u32;

        let cfg = Config {
            source: SourceConfig { uri: source_uri, db: source_db, name: source_name },
            kafka: KafkaConfig {
                brokers,
                ce_headers: f.kafka.ce_headers.unwrap_or(true),
                instance_id,
                membership,
                properties: f.kafka.properties,
                producer: f.kafka.producer,
                consumer: f.kafka.consumer,
            },
            target_uri,
            store: StoreConfig { uri: store_uri, db: store_db },
            tail: TailConfig {
                on_history_lost,
                max_in_flight,
                checkpoint_interval: Duration::from_millis(checkpoint_interval),
                max_await: Duration::from_millis(max_await),
                batch_size: tail_batch,
                lease_ttl: Duration::from_millis(lease_ttl),
            },
            snapshot: SnapshotConfig {
                batch_size: snap_batch,
                max_docs_per_sec: f.snapshot.max_docs_per_sec.unwrap_or(0),
            },
            topics_dir,
            transforms_dir,
        };
        report.into_result(cfg)
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

        let file: ConfigFile =
            toml::from_str("[source]\ndb = \"other\"\n[kafka]\nbrokers = \"k:1\"\nce_headers = false\n").unwrap();
        let env = env_of(&[("FICUS_KAFKA_BROKERS", "k:2"), ("FICUS_STORE_URI", "mongodb://s:1")]);
        let cfg = Config::from_file(file, Path::new("f.toml"), &env).unwrap();
        assert_eq!(cfg.source.db, "other");
        assert_eq!(cfg.kafka.brokers, "k:2");
        assert!(!cfg.kafka.ce_headers);
        assert_eq!(cfg.store.uri, "mongodb://s:1");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let file: ConfigFile = toml::from_str(
            "[source]\ndb = \"a.b\"\n[tail]\non_history_lost = \"shrug\"\nmax_in_flight = 0\n[kafka.producer]\n\"bootstrap.servers\" = \"x\"\n",
        )
        .unwrap();
        let env = env_of(&[("FICUS_TARGET_URI", "http://nope")]);
        let text = Config::from_file(file, Path::new("f.toml"), &env).unwrap_err().to_string();
        for needle in [
            "source.db",
            "tail.on_history_lost",
            "tail.max_in_flight",
            "target.uri",
            "kafka.producer.bootstrap.servers",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<ConfigFile>("[source]\nurl = \"x\"\n").is_err());
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/ficus.example.toml"));
        let file: ConfigFile = read_toml(path).unwrap();
        Config::from_file(file, path, &env_of(&[])).unwrap();
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
