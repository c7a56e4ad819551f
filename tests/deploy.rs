//! The deployment artifacts, checked without any server: docker-compose.kafka.yml, the
//! Dockerfile, the Kubernetes manifests, the systemd unit, the Grafana dashboard and the
//! Prometheus alert rules. Every command line they contain is parsed by ficus's own CLI, every
//! ficus.toml by its own configuration parser, and every PromQL expression may only name the
//! metrics ficus exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use ficus::cli::Cli;
use yaml_rust2::{Yaml, YamlLoader};

/// Every metric ficus exports (histograms without their `_bucket`/`_sum`/`_count` suffixes).
const METRICS: &[&str] = &[
    "ficus_tail_changes_read_total",
    "ficus_events_published_total",
    "ficus_events_applied_total",
    "ficus_events_dead_lettered_total",
    "ficus_events_archived_total",
    "ficus_errors_total",
    "ficus_consume_apply_seconds",
    "ficus_end_to_end_latency_seconds",
    "ficus_consume_batch_size",
    "ficus_tail_lag_seconds",
    "ficus_tail_checkpoint_age_seconds",
    "ficus_tail_checkpoints_total",
    "ficus_consumer_lag",
    "ficus_snapshot_documents_total",
    "ficus_replay_events_total",
    "ficus_tail_key_fallback_total",
    "ficus_tail_resnapshots_total",
    "ficus_role_ready",
    "ficus_lease_held",
    "ficus_cutover_percent",
    "ficus_cutover_epoch",
    "ficus_cutover_fenced_buckets",
    "ficus_cutover_can_rollback",
    "ficus_conflicts_total",
    "ficus_fence_violations_total",
    "ficus_conflict_repairs_total",
    "ficus_echoes_skipped_total",
    "ficus_reverse_unrouted_total",
    "ficus_consumer_rejoins_total",
    "ficus_cutover_analysis_value",
    "ficus_cutover_analysis_total",
    "ficus_cutover_rollbacks_total",
    "ficus_cutover_rollback_seconds",
    "ficus_redis_paused",
    "ficus_redis_expired_on_arrival_total",
];

/// `ficus run --shutdown-timeout` when not given.
const DEFAULT_SHUTDOWN_TIMEOUT: f64 = 30.0;
const METRICS_PORT: i64 = 9464;
const COMPOSE: &str = "docker-compose.kafka.yml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const K8S_DIR: &str = "deploy/kubernetes";
const SYSTEMD_UNIT: &str = "deploy/systemd/ficus.service";
const DASHBOARD: &str = "deploy/grafana/ficus-dashboard.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";

// ---------------------------------------------------------------------------------------------
// Helpers: files, YAML, durations, metric names, command lines
// ---------------------------------------------------------------------------------------------

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("{rel}: cannot read: {e}"))
}

fn yaml_docs(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not valid YAML: {e}"))
}

fn yaml_doc(rel: &str) -> Yaml {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected exactly one YAML document, found {}", docs.len());
    docs.remove(0)
}

/// A scalar as text (YAML reads `9464` as an integer and `true` as a boolean).
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn text(y: &Yaml) -> String {
    scalar(y).unwrap_or_default()
}

/// The items of a sequence; nothing for anything else.
fn items(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

/// The keys and values of a mapping as text keys; nothing for anything else.
fn entries(y: &Yaml) -> Vec<(String, &Yaml)> {
    y.as_hash().map(|h| h.iter().map(|(k, v)| (text(k), v)).collect()).unwrap_or_default()
}

fn is_true(y: &Yaml) -> bool {
    y.as_bool() == Some(true)
}

/// Seconds in a systemd or Docker Compose duration: `45`, `45s`, `1min 30s`, `1m30s`, `2h`.
fn duration_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let letters = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let factor = match &rest[..letters] {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "ms" | "msec" => 0.001,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            _ => return None,
        };
        total += number * factor;
        rest = rest[letters..].trim_start();
    }
    (!s.is_empty()).then_some(total)
}

/// The `ficus_*` metric names a PromQL expression mentions, histogram suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    for (start, _) in expr.match_indices("ficus_") {
        if start > 0 && ident(bytes[start - 1]) {
            continue;
        }
        let len = expr[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(expr.len() - start);
        let name = &expr[start..start + len];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|b| METRICS.contains(b)))
            .unwrap_or(name);
        names.insert(base.to_string());
    }
    names
}

/// Fails naming every metric in `expr` that ficus does not export; returns the ones it does.
fn check_metrics(expr: &str, location: &str) -> BTreeSet<String> {
    let names = metric_names(expr);
    let unknown: Vec<_> = names.iter().filter(|n| !METRICS.contains(&n.as_str())).collect();
    assert!(
        unknown.is_empty(),
        "{location}: unknown metric(s) {unknown:?} in `{expr}`; ficus exports only the METRICS listed in tests/deploy.rs"
    );
    names
}

/// The value after `--flag` (`--flag value` or `--flag=value`).
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(name).and_then(|r| r.strip_prefix('='))
        }
    })
}

/// The shutdown timeout a `ficus run` command line asks for.
fn shutdown_timeout(args: &[String]) -> f64 {
    flag(args, "--shutdown-timeout").and_then(duration_secs).unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT)
}

/// Fails unless ficus's own CLI accepts `args` (without the program name).
fn assert_cli_accepts(args: &[String], location: &str) {
    let argv = std::iter::once("ficus".to_string()).chain(args.iter().cloned());
    if let Err(e) = Cli::try_parse_from(argv) {
        panic!("{location}: `ficus {}` is not a valid ficus command line: {e}", args.join(" "));
    }
}

// ---------------------------------------------------------------------------------------------
// docker-compose.kafka.yml
// ---------------------------------------------------------------------------------------------

fn compose_services() -> Vec<(String, Yaml)> {
    let doc = yaml_doc(COMPOSE);
    let services = entries(&doc["services"]);
    assert!(!services.is_empty(), "{COMPOSE}: no `services`");
    services.into_iter().map(|(name, s)| (name, s.clone())).collect()
}

fn compose_service(name: &str) -> Yaml {
    compose_services()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{COMPOSE}: no service `{name}`"))
        .1
}

/// `environment` as a mapping or as a list of `KEY=VALUE`.
fn compose_env(service: &Yaml) -> BTreeMap<String, String> {
    let env = &service["environment"];
    if env.is_array() {
        items(env).iter().filter_map(|i| i.as_str()?.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
    } else {
        entries(env).into_iter().map(|(k, v)| (k, text(v))).collect()
    }
}

/// `command` as a list or as a whitespace-separated string.
fn compose_command(service: &Yaml) -> Vec<String> {
    match service["command"].as_str() {
        Some(s) => s.split_whitespace().map(String::from).collect(),
        None => items(&service["command"]).iter().map(text).collect(),
    }
}

/// `depends_on` as a list of names or as a mapping of name to condition.
fn compose_depends_on(service: &Yaml) -> Vec<String> {
    let deps = &service["depends_on"];
    if deps.is_array() {
        items(deps).iter().map(text).collect()
    } else {
        entries(deps).into_iter().map(|(k, _)| k).collect()
    }
}

#[test]
fn compose_depends_on_names_existing_services() {
    let services = compose_services();
    let names: BTreeSet<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    for (name, service) in &services {
        for dep in compose_depends_on(service) {
            assert!(
                names.contains(dep.as_str()),
                "{COMPOSE}: service `{name}` depends_on `{dep}`, which is not a service"
            );
        }
    }
}

#[test]
fn compose_kafka_runs_kraft_without_zookeeper() {
    let services = compose_services();
    for (name, service) in &services {
        let image = text(&service["image"]);
        assert!(
            !format!("{name} {image}").to_lowercase().contains("zookeeper"),
            "{COMPOSE}: service `{name}` is ZooKeeper"
        );
        for key in compose_env(service).keys() {
            assert!(!key.contains("ZOOKEEPER"), "{COMPOSE}: service `{name}` sets {key}: Kafka must run in KRaft mode");
        }
    }
    let kafka = compose_service("kafka");
    let roles = compose_env(&kafka).get("KAFKA_PROCESS_ROLES").cloned().unwrap_or_default();
    assert!(
        roles.split(',').any(|r| r.trim() == "controller"),
        "{COMPOSE}: service `kafka` has KAFKA_PROCESS_ROLES={roles:?}, which lacks `controller` (KRaft)"
    );
}

#[test]
fn compose_has_two_mongodb_replica_sets() {
    let replica_sets: Vec<String> = compose_services()
        .into_iter()
        .filter(|(_, s)| text(&s["image"]).starts_with("mongo"))
        .filter(|(_, s)| compose_command(s).iter().any(|a| a == "--replSet" || a.starts_with("--replSet=")))
        .map(|(n, _)| n)
        .collect();
    assert!(
        replica_sets.len() >= 2,
        "{COMPOSE}: expected two MongoDB services started with --replSet (monolith, services), found {replica_sets:?}"
    );
}

#[test]
fn compose_ficus_is_built_from_the_dockerfile_and_configured() {
    for (name, service) in compose_services() {
        let build = &service["build"];
        if build.is_badvalue() {
            continue;
        }
        let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
        assert_eq!(dockerfile, DOCKERFILE, "{COMPOSE}: service `{name}` builds from {dockerfile}, not {DOCKERFILE}");
        let command = compose_command(&service);
        if !command.is_empty() {
            assert_cli_accepts(&command, &format!("{COMPOSE}: service `{name}` command"));
        }
    }
    let ficus = compose_service("ficus");
    assert_eq!(
        ficus["build"]["dockerfile"].as_str(),
        Some(DOCKERFILE),
        "{COMPOSE}: service `ficus` must build from {DOCKERFILE}"
    );
    let env = compose_env(&ficus);
    for var in ["FICUS_SOURCE_URI", "FICUS_KAFKA_BROKERS", "FICUS_TARGET_URI", "FICUS_STORE_URI", "FICUS_REDIS_URI"] {
        assert!(env.get(var).is_some_and(|v| !v.is_empty()), "{COMPOSE}: service `ficus` does not set {var}");
    }
    let command = compose_command(&ficus);
    let grace = ficus["stop_grace_period"].as_str().and_then(duration_secs).unwrap_or(10.0);
    assert!(
        grace > shutdown_timeout(&command),
        "{COMPOSE}: service `ficus` stop_grace_period is {grace}s, not more than its shutdown timeout of {}s",
        shutdown_timeout(&command)
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/Dockerfile
// ---------------------------------------------------------------------------------------------

/// Instructions as (keyword, rest), comments and continuations folded.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let joined = read(DOCKERFILE).replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (kw, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (kw.to_ascii_uppercase(), rest.trim().to_string())
        })
        .collect()
}

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() {
    let instructions = dockerfile_instructions();
    let froms: Vec<usize> = instructions.iter().enumerate().filter(|(_, (k, _))| k == "FROM").map(|(i, _)| i).collect();
    assert!(froms.len() >= 2, "{DOCKERFILE}: expected a build stage and a runtime stage, found {} FROM", froms.len());
    let runtime = &instructions[*froms.last().unwrap()..];
    let user = runtime.iter().rev().find(|(k, _)| k == "USER").map(|(_, v)| v.as_str());
    let user = user.unwrap_or_else(|| panic!("{DOCKERFILE}: the runtime stage has no USER, so it runs as root"));
    let uid = user.split(':').next().unwrap_or_default();
    assert!(!matches!(uid, "root" | "0"), "{DOCKERFILE}: the runtime stage runs as USER {user}");
    assert!(
        uid.parse::<u32>().is_ok(),
        "{DOCKERFILE}: USER {user} is not numeric, so Kubernetes runAsNonRoot cannot verify it"
    );
    let copies_binary = runtime.iter().any(|(k, v)| k == "COPY" && v.starts_with("--from="));
    assert!(copies_binary, "{DOCKERFILE}: the runtime stage copies nothing from the build stage");
    let entrypoint = runtime.iter().rev().find(|(k, _)| k == "ENTRYPOINT").map(|(_, v)| v.as_str()).unwrap_or("");
    assert!(
        entrypoint.contains("/usr/local/bin/ficus"),
        "{DOCKERFILE}: ENTRYPOINT is {entrypoint:?}; the Kubernetes manifests pass only `args` and rely on it being ficus"
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/kubernetes
// ---------------------------------------------------------------------------------------------

/// One YAML document of one manifest file.
struct Manifest {
    file: String,
    doc: Yaml,
}

impl Manifest {
    fn kind(&self) -> String {
        text(&self.doc["kind"])
    }

    fn name(&self) -> String {
        text(&self.doc["metadata"]["name"])
    }

    fn at(&self) -> String {
        format!("{}: {}/{}", self.file, self.kind(), self.name())
    }

    /// The pod template's spec, for the kinds that run pods.
    fn pod(&self) -> Option<&Yaml> {
        let pod = match self.kind().as_str() {
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => &self.doc["spec"]["template"]["spec"],
            "CronJob" => &self.doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => return None,
        };
        Some(pod)
    }
}

fn manifest_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(path(K8S_DIR))
        .unwrap_or_else(|e| panic!("{K8S_DIR}: cannot list: {e}"))
        .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("{K8S_DIR}/{n}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{K8S_DIR}: no .yaml files");
    files
}

fn manifests() -> Vec<Manifest> {
    let mut out = Vec::new();
    for file in manifest_files() {
        for (i, doc) in yaml_docs(&file).into_iter().enumerate() {
            for key in ["apiVersion", "kind"] {
                assert!(doc[key].as_str().is_some(), "{file}: document {} has no `{key}`", i + 1);
            }
            assert!(doc["metadata"]["name"].as_str().is_some(), "{file}: document {} has no `metadata.name`", i + 1);
            out.push(Manifest { file: file.clone(), doc });
        }
    }
    out
}

fn of_kind<'a>(all: &'a [Manifest], kind: &'a str) -> impl Iterator<Item = &'a Manifest> {
    all.iter().filter(move |m| m.kind() == kind)
}

/// A container's `command` followed by its `args`.
fn container_args(container: &Yaml) -> Vec<String> {
    items(&container["command"]).iter().chain(items(&container["args"])).map(text).collect()
}

/// Every container of a pod, init containers included.
fn containers(pod: &Yaml) -> impl Iterator<Item = &Yaml> {
    items(&pod["initContainers"]).iter().chain(items(&pod["containers"]))
}

/// A container's security setting, falling back to the pod's.
fn security<'a>(pod: &'a Yaml, container: &'a Yaml, key: &str) -> &'a Yaml {
    let own = &container["securityContext"][key];
    if own.is_badvalue() { &pod["securityContext"][key] } else { own }
}

/// The role a `ficus run` container runs (`--roles tail` → `tail`).
fn roles(container: &Yaml) -> Option<String> {
    let args = container_args(container);
    args.iter().any(|a| a == "run").then(|| flag(&args, "--roles").unwrap_or("all").to_string())
}

/// The Deployment whose ficus container runs exactly `role`.
fn deployment_with_role<'a>(all: &'a [Manifest], role: &str) -> &'a Manifest {
    of_kind(all, "Deployment")
        .find(|m| m.pod().is_some_and(|p| containers(p).any(|c| roles(c).as_deref() == Some(role))))
        .unwrap_or_else(|| panic!("{K8S_DIR}: no Deployment runs `ficus run --roles {role}`"))
}

/// Long-running ficus workloads: the containers that run `ficus run`.
fn run_containers(all: &[Manifest]) -> Vec<(&Manifest, &Yaml, &Yaml)> {
    let mut out = Vec::new();
    for m in all {
        if let Some(pod) = m.pod() {
            out.extend(containers(pod).filter(|c| roles(c).is_some()).map(|c| (m, pod, c)));
        }
    }
    assert!(!out.is_empty(), "{K8S_DIR}: no container runs `ficus run`");
    out
}

#[test]
fn kubernetes_manifests_parse_and_are_named() {
    let all = manifests();
    let mut seen = BTreeSet::new();
    for m in &all {
        assert!(seen.insert((m.kind(), m.name())), "{}: {} `{}` is defined twice", m.file, m.kind(), m.name());
    }
    for kind in ["Deployment", "Job", "ConfigMap", "Secret", "Service"] {
        assert!(of_kind(&all, kind).next().is_some(), "{K8S_DIR}: no {kind}");
    }
}

#[test]
fn kubernetes_containers_run_non_root_and_locked_down() {
    let all = manifests();
    let workloads: Vec<&Manifest> = all.iter().filter(|m| m.pod().is_some()).collect();
    assert!(!workloads.is_empty(), "{K8S_DIR}: no workload");
    for m in workloads {
        let pod = m.pod().unwrap();
        assert!(containers(pod).next().is_some(), "{}: the pod template has no containers", m.at());
        for c in containers(pod) {
            let at = format!("{} container `{}`", m.at(), text(&c["name"]));
            assert!(is_true(security(pod, c, "runAsNonRoot")), "{at}: runAsNonRoot is not true");
            let uid = security(pod, c, "runAsUser");
            assert!(uid.as_i64() != Some(0), "{at}: runAsUser is 0 (root)");
            assert!(
                is_true(&c["securityContext"]["readOnlyRootFilesystem"]),
                "{at}: readOnlyRootFilesystem is not true"
            );
            assert_eq!(
                c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{at}: allowPrivilegeEscalation is not false"
            );
            let drops: Vec<String> = items(&c["securityContext"]["capabilities"]["drop"]).iter().map(text).collect();
            assert!(drops.iter().any(|d| d == "ALL"), "{at}: capabilities.drop does not include ALL (has {drops:?})");
            for (section, keys) in [("requests", &["cpu", "memory"][..]), ("limits", &["memory"][..])] {
                for key in keys {
                    assert!(scalar(&c["resources"][section][*key]).is_some(), "{at}: no resources.{section}.{key}");
                }
            }
            assert!(!text(&c["image"]).is_empty(), "{at}: no image");
            assert_cli_accepts(&container_args(c), &format!("{at} args"));
        }
    }
}

#[test]
fn kubernetes_runs_each_role_in_its_own_deployment() {
    let all = manifests();
    let tail = deployment_with_role(&all, "tail");
    let replicas = tail.doc["spec"]["replicas"].as_i64().unwrap_or(1);
    assert!(replicas >= 2, "{}: replicas is {replicas}; tail needs an active tailer and a standby (2)", tail.at());
    for role in ["consume", "archive"] {
        deployment_with_role(&all, role);
    }
    for (m, _, c) in run_containers(&all) {
        let roles = roles(c).unwrap();
        let runs_tail = roles == "all" || roles.split(',').any(|r| r == "tail");
        assert!(
            !runs_tail || roles == "tail",
            "{}: runs `--roles {roles}`; keep tail in its own Deployment (its replicas wait on the lease)",
            m.at()
        );
    }
}

#[test]
fn kubernetes_grace_period_exceeds_the_shutdown_timeout() {
    let all = manifests();
    for (m, pod, c) in run_containers(&all) {
        let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30) as f64;
        let timeout = shutdown_timeout(&container_args(c));
        assert!(
            grace > timeout.max(DEFAULT_SHUTDOWN_TIMEOUT),
            "{}: terminationGracePeriodSeconds is {grace}, not more than the {timeout}s ficus may take to drain on SIGTERM",
            m.at()
        );
    }
}

/// The port a probe hits, resolving a named port through the container's ports.
fn probe_port(container: &Yaml, probe: &Yaml) -> Option<i64> {
    let port = &probe["httpGet"]["port"];
    port.as_i64().or_else(|| {
        let name = port.as_str()?;
        items(&container["ports"]).iter().find(|p| p["name"].as_str() == Some(name))?["containerPort"].as_i64()
    })
}

#[test]
fn kubernetes_probes_hit_health_and_readiness_on_the_metrics_port() {
    let all = manifests();
    for (m, _, c) in run_containers(&all) {
        let args = container_args(c);
        let addr =
            flag(&args, "--metrics-addr").unwrap_or_else(|| panic!("{}: `ficus run` without --metrics-addr", m.at()));
        let port: i64 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(-1);
        assert_eq!(port, METRICS_PORT, "{}: --metrics-addr {addr} is not on port {METRICS_PORT}", m.at());
        assert!(
            !addr.starts_with("127.") && !addr.starts_with("localhost"),
            "{}: --metrics-addr {addr} is loopback only",
            m.at()
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let p = &c[probe];
            assert_eq!(p["httpGet"]["path"].as_str(), Some(path), "{}: {probe} does not GET {path}", m.at());
            assert_eq!(probe_port(c, p), Some(port), "{}: {probe} does not hit the metrics port {port}", m.at());
        }
    }
}

#[test]
fn kubernetes_keeps_connection_strings_in_secrets() {
    let all = manifests();
    let secrets: BTreeSet<String> = of_kind(&all, "Secret").map(Manifest::name).collect();
    for m in all.iter().filter(|m| m.pod().is_some()) {
        for c in containers(m.pod().unwrap()) {
            for e in items(&c["env"]) {
                let (name, value) = (text(&e["name"]), text(&e["value"]));
                assert!(
                    !name.ends_with("_URI") || e["value"].is_badvalue(),
                    "{}: env {name} is inline; connection strings belong in a Secret",
                    m.at()
                );
                assert!(!(value.contains("://") && value.contains('@')), "{}: env {name} inlines credentials", m.at());
            }
            for from in items(&c["envFrom"]) {
                if let Some(secret) = from["secretRef"]["name"].as_str() {
                    assert!(
                        secrets.contains(secret),
                        "{}: envFrom names Secret `{secret}`, which is not in {K8S_DIR}",
                        m.at()
                    );
                }
            }
        }
    }
    for cm in of_kind(&all, "ConfigMap") {
        for (key, value) in entries(&cm.doc["data"]) {
            let value = text(value);
            assert!(!value.contains("mongodb://") || !value.contains('@'), "{}: `{key}` inlines credentials", cm.at());
        }
    }
}

#[test]
fn kubernetes_config_map_is_a_valid_ficus_toml_mounted_where_ficus_config_points() {
    let all = manifests();
    let maps: BTreeMap<String, &Manifest> = of_kind(&all, "ConfigMap").map(|m| (m.name(), m)).collect();
    for m in maps.values() {
        if let Some(toml) = m.doc["data"]["ficus.toml"].as_str() {
            let (_, report) = ficus::config::Config::from_text(toml, Path::new("ficus.toml"), &|_| None);
            assert!(report.is_empty(), "{}: ficus.toml is not a valid ficus configuration: {report}", m.at());
        }
    }
    for m in all.iter().filter(|m| m.pod().is_some()) {
        let pod = m.pod().unwrap();
        let volumes: BTreeMap<String, &Yaml> = items(&pod["volumes"]).iter().map(|v| (text(&v["name"]), v)).collect();
        for v in volumes.values() {
            if let Some(cm) = v["configMap"]["name"].as_str() {
                assert!(maps.contains_key(cm), "{}: volume names ConfigMap `{cm}`, which is not in {K8S_DIR}", m.at());
            }
        }
        for c in containers(pod) {
            let config = items(&c["env"]).iter().find(|e| e["name"].as_str() == Some("FICUS_CONFIG"));
            let Some(config) = config.map(|e| text(&e["value"])) else { continue };
            let dir = Path::new(&config).parent().map(|d| d.to_string_lossy().into_owned()).unwrap_or_default();
            let mount = items(&c["volumeMounts"]).iter().find(|vm| text(&vm["mountPath"]) == dir);
            let mount =
                mount.unwrap_or_else(|| panic!("{}: FICUS_CONFIG={config} but nothing is mounted at {dir}", m.at()));
            let volume = volumes.get(&text(&mount["name"]));
            let map = volume.and_then(|v| v["configMap"]["name"].as_str()).and_then(|n| maps.get(n));
            let file = Path::new(&config).file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                map.is_some_and(|cm| cm.doc["data"][file.as_str()].as_str().is_some()),
                "{}: FICUS_CONFIG={config}, but the volume at {dir} is not a ConfigMap with key {file}",
                m.at()
            );
        }
    }
}

#[test]
fn kubernetes_applies_topics_before_the_roles_need_them() {
    let all = manifests();
    let applies = |c: &Yaml| container_args(c).windows(2).any(|w| w[0] == "topics" && w[1] == "apply");
    let job = of_kind(&all, "Job").any(|m| m.pod().is_some_and(|p| containers(p).any(applies)));
    let init = all.iter().any(|m| m.pod().is_some_and(|p| items(&p["initContainers"]).iter().any(applies)));
    assert!(job || init, "{K8S_DIR}: no Job or initContainer runs `ficus topics apply`");
}

#[test]
fn kubernetes_exposes_metrics_to_prometheus() {
    let all = manifests();
    let scraped = of_kind(&all, "Service").find(|s| {
        let annotations = &s.doc["metadata"]["annotations"];
        text(&annotations["prometheus.io/scrape"]) == "true"
            && text(&annotations["prometheus.io/port"]) == METRICS_PORT.to_string()
            && items(&s.doc["spec"]["ports"]).iter().any(|p| p["port"].as_i64() == Some(METRICS_PORT))
    });
    assert!(
        scraped.is_some(),
        "{K8S_DIR}: no Service with prometheus.io/scrape: \"true\" and prometheus.io/port: \"{METRICS_PORT}\" on port {METRICS_PORT}"
    );
}

#[test]
fn kubernetes_kustomization_lists_existing_files() {
    let file = format!("{K8S_DIR}/kustomization.yaml");
    if !path(&file).exists() {
        return;
    }
    let doc = yaml_doc(&file);
    for resource in items(&doc["resources"]).iter().map(text) {
        assert!(path(&format!("{K8S_DIR}/{resource}")).exists(), "{file}: resource {resource} does not exist");
        let secrets = yaml_docs(&format!("{K8S_DIR}/{resource}")).iter().any(|d| d["kind"].as_str() == Some("Secret"));
        assert!(!secrets, "{file}: lists {resource}, a Secret template; an apply would overwrite the real credentials");
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/systemd/ficus.service
// ---------------------------------------------------------------------------------------------

/// The unit's settings as (section, key, value), in order (keys may repeat).
fn unit_settings() -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in read(SYSTEMD_UNIT).replace("\\\n", " ").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// The last value of `[section] key`, failing if it is not set.
fn unit_value(settings: &[(String, String, String)], section: &str, key: &str) -> String {
    let value = settings.iter().rev().find(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.clone());
    value.unwrap_or_else(|| panic!("{SYSTEMD_UNIT}: [{section}] has no {key}="))
}

/// ExecStart without the program, `$VARIABLE` words expanded to nothing.
fn unit_exec_start(settings: &[(String, String, String)]) -> Vec<String> {
    let exec = unit_value(settings, "Service", "ExecStart");
    let mut words = exec.trim_start_matches(['-', '@', '+', '!', ':']).split_whitespace();
    let program = words.next().unwrap_or_default();
    assert_eq!(program, "/usr/local/bin/ficus", "{SYSTEMD_UNIT}: ExecStart runs {program}, not /usr/local/bin/ficus");
    words.filter(|w| !w.starts_with('$')).map(String::from).collect()
}

#[test]
fn systemd_unit_stops_gracefully() {
    let settings = unit_settings();
    let args = unit_exec_start(&settings);
    assert_eq!(args.first().map(String::as_str), Some("run"), "{SYSTEMD_UNIT}: ExecStart is not `ficus run`");
    assert_cli_accepts(&args, &format!("{SYSTEMD_UNIT}: ExecStart"));
    let stop = unit_value(&settings, "Service", "TimeoutStopSec");
    let secs =
        duration_secs(&stop).unwrap_or_else(|| panic!("{SYSTEMD_UNIT}: TimeoutStopSec={stop} is not a duration"));
    let timeout = shutdown_timeout(&args);
    assert!(
        secs > timeout.max(DEFAULT_SHUTDOWN_TIMEOUT),
        "{SYSTEMD_UNIT}: TimeoutStopSec={stop} does not exceed the {timeout}s ficus may take to drain on SIGTERM"
    );
    let signal = unit_value(&settings, "Service", "KillSignal");
    assert_eq!(signal, "SIGTERM", "{SYSTEMD_UNIT}: KillSignal={signal}; ficus drains and checkpoints on SIGTERM");
}

#[test]
fn systemd_unit_runs_unprivileged_and_hardened() {
    let settings = unit_settings();
    let expected = [
        ("Type", "exec"),
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ];
    for (key, want) in expected {
        let got = unit_value(&settings, "Service", key);
        assert_eq!(got, want, "{SYSTEMD_UNIT}: {key}={got}, expected {key}={want}");
    }
    for key in ["User", "Group"] {
        let who = unit_value(&settings, "Service", key);
        assert!(!matches!(who.as_str(), "root" | "0"), "{SYSTEMD_UNIT}: {key}={who} runs ficus as root");
    }
    let env_file = unit_value(&settings, "Service", "EnvironmentFile");
    assert!(env_file.trim_start_matches('-').starts_with("/etc/"), "{SYSTEMD_UNIT}: EnvironmentFile={env_file}");
    assert!(duration_secs(&unit_value(&settings, "Service", "RestartSec")).is_some(), "{SYSTEMD_UNIT}: bad RestartSec");
    assert!(!unit_value(&settings, "Install", "WantedBy").is_empty(), "{SYSTEMD_UNIT}: [Install] WantedBy= is empty");
}

// ---------------------------------------------------------------------------------------------
// deploy/grafana/ficus-dashboard.json
// ---------------------------------------------------------------------------------------------

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: not valid JSON: {e}"))
}

/// Every panel, including those nested in collapsed rows.
fn panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every PromQL expression with where it is: panel targets and query variables.
fn dashboard_queries(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            let (title, target) = (p["title"].as_str().unwrap_or("?"), t["refId"].as_str().unwrap_or("?"));
            out.push((format!("{DASHBOARD}: panel `{title}` target {target}"), expr.to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let query = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
        if v["type"] == "query" {
            out.push((format!("{DASHBOARD}: variable `{}`", v["name"].as_str().unwrap_or("?")), query.to_string()));
        }
    }
    out
}

#[test]
fn grafana_dashboard_has_the_rows_and_a_datasource_input() {
    let dash = dashboard();
    let rows: Vec<&str> =
        panels(&dash).iter().filter(|p| p["type"] == "row").filter_map(|p| p["title"].as_str()).collect();
    for row in ["Tail", "Consume", "Errors & DLQ", "Archive", "Roles", "Cutover"] {
        assert!(rows.contains(&row), "{DASHBOARD}: no row `{row}` (rows: {rows:?})");
    }
    let inputs = dash["__inputs"].as_array().into_iter().flatten();
    let variables = dash["templating"]["list"].as_array().into_iter().flatten();
    assert!(
        inputs.chain(variables).any(|i| i["name"] == "DS_PROMETHEUS"),
        "{DASHBOARD}: no DS_PROMETHEUS input or variable"
    );
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        let title = &p["title"];
        assert!(ids.insert(p["id"].as_i64()), "{DASHBOARD}: panel {title} reuses id {}", p["id"]);
        assert!(p["gridPos"]["w"].is_number(), "{DASHBOARD}: panel {title} has no gridPos");
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{DASHBOARD}: panel {title} does not use ${{DS_PROMETHEUS}}"
            );
            assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "{DASHBOARD}: panel {title} has no query");
        }
    }
}

#[test]
fn grafana_dashboard_queries_only_known_metrics_and_charts_them_all() {
    let dash = dashboard();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 15, "{DASHBOARD}: only {} queries found", queries.len());
    let mut used = BTreeSet::new();
    for (location, expr) in &queries {
        assert!(!expr.trim().is_empty(), "{location}: empty query");
        used.extend(check_metrics(expr, location));
    }
    let missing: Vec<_> = METRICS.iter().filter(|m| !used.contains(**m)).collect();
    assert!(missing.is_empty(), "{DASHBOARD}: no panel charts {missing:?}");
}

// ---------------------------------------------------------------------------------------------
// deploy/prometheus/alerts.yml
// ---------------------------------------------------------------------------------------------

/// Every rule with where it is.
fn alert_rules() -> Vec<(String, Yaml)> {
    let doc = yaml_doc(ALERTS);
    let groups = items(&doc["groups"]);
    assert!(!groups.is_empty(), "{ALERTS}: no `groups`");
    let mut out = Vec::new();
    for g in groups {
        let group = g["name"].as_str().unwrap_or_else(|| panic!("{ALERTS}: a group has no name"));
        let rules = items(&g["rules"]);
        assert!(!rules.is_empty(), "{ALERTS}: group `{group}` has no rules");
        for r in rules {
            let name = scalar(&r["alert"]).or(scalar(&r["record"])).unwrap_or_else(|| "<unnamed>".into());
            out.push((format!("{ALERTS}: group `{group}` rule `{name}`"), r.clone()));
        }
    }
    out
}

#[test]
fn alert_rules_are_well_formed() {
    let mut names = BTreeSet::new();
    for (at, rule) in alert_rules() {
        assert!(rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{at}: no expr");
        let Some(alert) = rule["alert"].as_str() else {
            assert!(rule["record"].as_str().is_some(), "{at}: neither `alert` nor `record`");
            continue;
        };
        assert!(names.insert(alert.to_string()), "{at}: alert name used twice");
        let severity = text(&rule["labels"]["severity"]);
        assert!(matches!(severity.as_str(), "critical" | "warning" | "info"), "{at}: severity {severity:?}");
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{at}: no annotations.summary");
        if let Some(duration) = scalar(&rule["for"]) {
            assert!(duration_secs(&duration).is_some(), "{at}: `for: {duration}` is not a duration");
        }
    }
}

#[test]
fn alert_rules_query_only_known_metrics() {
    for (at, rule) in alert_rules() {
        check_metrics(rule["expr"].as_str().unwrap_or_default(), &at);
    }
}

#[test]
fn alert_rules_cover_the_failure_modes() {
    let rules = alert_rules();
    let covers = |metric: &str, also: &str, at_least: f64| {
        rules.iter().any(|(_, r)| {
            let expr = r["expr"].as_str().unwrap_or_default();
            let wait = scalar(&r["for"]).and_then(|d| duration_secs(&d)).unwrap_or(0.0);
            r["alert"].as_str().is_some()
                && metric_names(expr).contains(metric)
                && expr.contains(also)
                && wait >= at_least
        })
    };
    let wanted = [
        ("ficus_consumer_lag", "", 600.0, "consumer lag high and growing for 10m"),
        ("ficus_tail_lag_seconds", "60", 300.0, "tail lag over 60 s for 5m"),
        ("ficus_tail_checkpoint_age_seconds", "", 0.0, "checkpoint age nearing the oplog window"),
        ("ficus_events_dead_lettered_total", "", 0.0, "dead letters"),
        ("ficus_lease_held", "== 0", 120.0, "no active tailer for 2m"),
        ("ficus_role_ready", "", 300.0, "a role not ready for 5m"),
        ("ficus_errors_total", "fatal", 0.0, "fatal errors"),
        ("ficus_cutover_can_rollback", "== 0", 120.0, "a rollback would lose writes"),
    ];
    for (metric, also, at_least, what) in wanted {
        assert!(
            covers(metric, also, at_least),
            "{ALERTS}: no alert for {what} (on {metric}{}, `for` >= {at_least}s)",
            if also.is_empty() { String::new() } else { format!(" mentioning `{also}`") }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The helpers themselves, so a broken helper cannot make the checks above pass vacuously
// ---------------------------------------------------------------------------------------------

#[test]
fn helpers_find_metric_names_and_parse_durations() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(ficus_consume_apply_seconds_bucket[5m]))) \
         / ficus_consume_batch_size_count + ficus_bogus_total{group=\"ficus.archive\"} + xficus_no",
    );
    let expected = ["ficus_bogus_total", "ficus_consume_apply_seconds", "ficus_consume_batch_size"];
    assert_eq!(names.iter().map(String::as_str).collect::<Vec<_>>(), expected);
    assert_eq!(duration_secs("45"), Some(45.0));
    assert_eq!(duration_secs("1min 30s"), Some(90.0));
    assert_eq!(duration_secs("1m30s"), Some(90.0));
    assert_eq!(duration_secs("40s"), Some(40.0));
    assert_eq!(duration_secs("soon"), None);
    let args: Vec<String> = ["run", "--roles=tail", "--shutdown-timeout", "20"].map(String::from).into();
    assert_eq!(flag(&args, "--roles"), Some("tail"));
    assert_eq!(shutdown_timeout(&args), 20.0);
    assert!(Cli::try_parse_from(["ficus", "run", "--roles", "nonsense"]).is_err(), "the CLI check accepts anything");
}
