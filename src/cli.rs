//! The command line: parses arguments, loads configuration and definitions once, wires the
//! adapters together and maps outcomes to exit codes. The binary's edge, so `anyhow` is used
//! here and nowhere else.
//!
//! Exit codes: 0 success; 1 a runtime failure (or drift found by `topics check`); 2 invalid
//! configuration or definitions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::bus::{KafkaPublisher, Publisher, TopicAdmin, TopicState};
use crate::checkpoint::MongoCheckpoints;
use crate::config::report::Report;
use crate::config::{Config, parse_addr};
use crate::consume::ServiceConsumer;
use crate::sink::MongoSink;
use crate::store::{Archiver, EventStore, StoreError};

use crate::checkpoint::CheckpointError;
use crate::config::topics::{self, Topics};
use crate::lease::Lease;
use crate::ops::Health;
use crate::source::MongoSource;
use crate::tail::{TailError, Tailer};
use crate::transform::{self, ServiceTransforms};

#[derive(Debug, Parser)]
#[command(name = "ficus", version, about = "Keeps service databases in step with a MongoDB monolith through Kafka.")]
pub struct Cli {
    /// Configuration file (default: ./ficus.toml if present; otherwise built-in defaults plus FICUS_* variables).
    #[arg(long, short, global = true, env = "FICUS_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the configuration and every definition; report all problems (exit 2) or none (exit 0).
    Validate,
    /// Kafka topics described in topics/.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Run the daemon.
    Run(RunArgs),
    /// Each stage's position, lag and health, from checkpoints and consumer-group offsets.
    Status,
    /// Rebuild a service database from the event store plus the live tail.
    Replay {
        #[arg(long = "service", value_name = "NAME")]
        service: String,
        /// Apply into the live database instead of building a shadow and swapping it in.
        #[arg(long)]
        in_place: bool,
        /// Only archived events from this time on (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long, value_parser = parse_time)]
        from: Option<bson::DateTime>,
    },
    /// Prove a service database equals its transforms applied to the monolith's current state.
    Verify {
        #[arg(long = "service", value_name = "NAME")]
        service: String,
        /// Differing documents to show side by side.
        #[arg(long, default_value_t = 10)]
        sample: usize,
        /// Exit 0 when the scores pass the seed's migration gate (99% consistency, 95%
        /// validation) even if some documents differ; by default any difference fails.
        #[arg(long)]
        gate: bool,
        /// Seconds to wait before re-checking differences (traffic in flight).
        #[arg(long, default_value_t = 2)]
        settle: u64,
    },
    /// Dead letters (`<topic>.dlq`).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Reverse sync: the derived reverses of the transforms.
    Lens {
        #[command(subcommand)]
        action: LensAction,
    },
}

#[derive(Debug, Subcommand)]
enum LensAction {
    /// Check GetPut, PutGet and Insert on the monolith documents each service reads; print the
    /// classification and the failures side by side; exit 1 if a law breaks.
    Check {
        #[arg(long = "service", value_name = "NAME")]
        service: Option<String>,
        /// Documents per monolith collection, in _id order (default: all).
        #[arg(long, value_name = "N")]
        sample: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Re-drive a service's dead letters through its transforms (after a fix); what fails
    /// again is dead-lettered again.
    Replay {
        #[arg(long = "service", value_name = "NAME")]
        service: String,
    },
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum TopicsAction {
    /// Create missing topics (and enable pre-images on the source collections that ask for
    /// them); report drift in existing ones without changing them.
    Apply,
    /// Exit 1 if any topic is missing or differs from its definition.
    Check,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Monolith change stream → Kafka.
    Tail,
    /// Kafka → transforms → service databases.
    Consume,
    /// Kafka → the event store.
    Archive,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Roles to run in this process.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Role::Tail, Role::Consume, Role::Archive])]
    roles: Vec<Role>,
    /// With the consume role: only these services (transforms/<service>); default all.
    #[arg(long = "service", value_name = "NAME")]
    services: Vec<String>,
    /// Consume batches: at most this many messages...
    #[arg(long, default_value_t = 500)]
    batch_max: usize,
    /// ...collected for at most this many milliseconds.
    #[arg(long, default_value_t = 50)]
    batch_wait_ms: u64,
    /// /readyz reports a role that made no progress for this many seconds as stalled.
    #[arg(long, default_value_t = 60)]
    stall_secs: u64,
    /// How long a delete's tombstone is kept to refuse late older writes; must exceed Kafka retention.
    #[arg(long, default_value_t = 14)]
    tombstone_ttl_days: u64,
    /// Discard the tail checkpoint and take a fresh snapshot before streaming.
    #[arg(long)]
    resnapshot: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "FICUS_METRICS_ADDR", value_parser = parse_addr)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds to drain and checkpoint after SIGTERM/SIGINT before giving up.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(dispatch(cli))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FICUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn,mongodb=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

/// Configuration and definitions, loaded and validated together.
struct Loaded {
    config: Config,
    topics: Arc<Topics>,
    services: Vec<Arc<ServiceTransforms>>,
}

fn load(cli_config: Option<&std::path::Path>) -> Result<Loaded, Report> {
    let env = |k: &str| std::env::var(k).ok();
    let mut report = Report::default();
    let (config, problems) = Config::load(cli_config, &env);
    report.extend(problems);
    let topics = topics::load(&config.topics_dir).map_err(|r| report.extend(r)).ok();
    let transforms_dir = config.transforms_dir.clone();
    // Transforms are checked against the topics; with broken topics there is nothing to check against.
    let services =
        topics.as_ref().and_then(|t| transform::load_all(&transforms_dir, t).map_err(|r| report.extend(r)).ok());
    match (topics, services) {
        (Some(topics), Some(services)) if report.is_empty() => {
            Ok(Loaded { config, topics: Arc::new(topics), services: services.into_iter().map(Arc::new).collect() })
        }
        _ => Err(report),
    }
}

async fn dispatch(cli: Cli) -> ExitCode {
    let loaded = match load(cli.config.as_deref()) {
        Ok(l) => l,
        Err(report) => {
            eprint!("{report}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Validate => {
            println!(
                "ok: configuration, {} topic definition(s) and the transforms of {} service(s) are valid ({})",
                loaded.topics.defs.len(),
                loaded.services.len(),
                loaded.config.describe()
            );
            print!("{}", transform::render_classification(loaded.services.iter().map(AsRef::as_ref)));
            return ExitCode::SUCCESS;
        }
        Command::Lens { action: LensAction::Check { service, sample } } => {
            let cfg = &loaded.config;
            let (uri, db, name) = (&cfg.source.uri, &cfg.source.db, &cfg.source.name);
            match crate::lens::check(&loaded.services, &loaded.topics, uri, db, name, service.as_deref(), sample).await
            {
                Ok(ok) => Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }),
                Err(crate::lens::LensError::UnknownService(why)) => {
                    eprintln!("error: {why}");
                    return ExitCode::from(2);
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Topics { action } => topics_cmd(&loaded, action).await,
        Command::Run(args) => run(loaded, args).await,
        Command::Dlq { action: DlqAction::Replay { service } } => dlq_replay(&loaded, &service).await,
        Command::Status => crate::status::collect(&loaded.config, &loaded.topics, &loaded.services).await.map(|rows| {
            print!("{}", crate::status::render(&rows));
            ExitCode::SUCCESS
        }),
        Command::Replay { service, in_place, from } => replay_cmd(&loaded, &service, in_place, from).await,
        Command::Verify { service, sample, gate, settle } => verify_cmd(&loaded, &service, sample, gate, settle).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {}", crate::config::redact_text(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

async fn topics_cmd(loaded: &Loaded, action: TopicsAction) -> anyhow::Result<ExitCode> {
    let admin = TopicAdmin::new(&loaded.config.kafka).context("creating the Kafka admin client")?;
    let mut bad = 0;
    for def in &loaded.topics.defs {
        let report = match action {
            TopicsAction::Apply => admin.apply(def).await,
            TopicsAction::Check => admin.inspect(def).await.map(|state| crate::bus::TopicReport {
                topic: def.topic.clone(),
                state,
                created: false,
            }),
        }
        .with_context(|| format!("topic {}", def.topic))?;
        bad += print_topic(&report);
    }
    // Dead-letter topics: one partition, kept a month so an operator can inspect and re-drive.
    for def in &loaded.topics.defs {
        let dlq = def.dlq_topic();
        let report = match action {
            TopicsAction::Apply => admin.apply_dead_letters(def).await,
            TopicsAction::Check => admin.inspect_dead_letters(def).await.map(|state| crate::bus::TopicReport {
                topic: dlq.clone(),
                state,
                created: false,
            }),
        }
        .with_context(|| format!("topic {dlq}"))?;
        bad += print_topic(&report);
    }
    let collections: Vec<String> = loaded.topics.collections().map(String::from).collect();
    let source = MongoSource::connect(&loaded.config.source.uri, &loaded.config.source.db, collections).await?;
    for def in loaded.topics.defs.iter().filter(|d| d.pre_images) {
        let enabled = source.pre_images_enabled(&def.collection).await?;
        match (action, enabled) {
            (_, true) => {}
            (TopicsAction::Apply, false) => {
                source.enable_pre_images(&def.collection).await?;
                println!("enabled  pre-images on {}.{}", loaded.config.source.db, def.collection);
            }
            (TopicsAction::Check, false) => {
                bad += 1;
                println!(
                    "DRIFT    pre-images are off on {}.{} (topics apply turns them on)",
                    loaded.config.source.db, def.collection
                );
            }
        }
    }
    if bad > 0 {
        match action {
            TopicsAction::Check => {
                println!("{bad} problem(s): run `ficus topics apply` (drift needs an operator)")
            }
            TopicsAction::Apply => {
                println!("{bad} topic(s) differ from their definitions; ficus does not alter existing topics")
            }
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_time(s: &str) -> Result<bson::DateTime, String> {
    bson::DateTime::parse_rfc3339_str(s).map_err(|e| format!("`{s}` is not an RFC 3339 time: {e}"))
}

async fn replay_cmd(
    loaded: &Loaded,
    service: &str,
    in_place: bool,
    from: Option<bson::DateTime>,
) -> anyhow::Result<ExitCode> {
    let chosen = select_services(&loaded.services, &[service.to_string()])?;
    let cfg = &loaded.config;
    let store_client = crate::mongo::connect(&cfg.store.uri, "replay").await?;
    let store = EventStore::open(&store_client.database(&cfg.store.db)).await?;
    let target = crate::mongo::connect(&cfg.target_uri, "replay").await?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let opts = crate::replay::ReplayOptions {
        in_place,
        from,
        batch: cfg.consume.batch_max,
        tombstone_ttl: cfg.consume.tombstone_ttl,
    };
    let r = crate::replay::replay(&chosen[0], &store, &target, &cfg.kafka, &opts, &shutdown).await?;
    let total = r.from_store + r.from_live;
    println!(
        "{}: rebuilt from {} archived and {} live events in {:.1}s ({:.0} events/s); {} rejected by transforms or writes (see the DLQ)",
        r.database,
        r.from_store,
        r.from_live,
        r.elapsed.as_secs_f64(),
        total as f64 / r.elapsed.as_secs_f64().max(1e-9),
        r.rejected
    );
    Ok(ExitCode::SUCCESS)
}

async fn verify_cmd(
    loaded: &Loaded,
    service: &str,
    sample: usize,
    gate: bool,
    settle: u64,
) -> anyhow::Result<ExitCode> {
    let chosen = select_services(&loaded.services, &[service.to_string()])?;
    let cfg = &loaded.config;
    let source = crate::mongo::connect(&cfg.source.uri, "verify").await?;
    let target = crate::mongo::connect(&cfg.target_uri, "verify").await?;
    let store = crate::mongo::connect(&cfg.store.uri, "verify").await?;
    let opts = crate::verify::VerifyOptions { sample, settle: Duration::from_secs(settle) };
    let report = crate::verify::verify(
        &chosen[0],
        &loaded.topics,
        &source.database(&cfg.source.db),
        &cfg.source.name,
        &target.database(chosen[0].database()),
        &store.database(&cfg.store.db),
        &opts,
    )
    .await?;
    print!("{}", report.render());
    let ok = if gate { report.consistent() } else { report.exact() };

    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn dlq_replay(loaded: &Loaded, service: &str) -> anyhow::Result<ExitCode> {
    let chosen = select_services(&loaded.services, &[service.to_string()])?;
    let transforms = &chosen[0];
    let target = crate::mongo::connect(&loaded.config.target_uri, "dlq").await?;
    let consume = &loaded.config.consume;
    let sink = MongoSink::open(target, transforms.database(), &transforms.collections(), consume.tombstone_ttl).await?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let kafka = &loaded.config.kafka;
    let report = crate::consume::redrive_dead_letters(transforms, &sink, kafka, consume.batch_max, &shutdown).await?;
    println!(
        "{service}: {} applied, {} failed again (dead-lettered anew), {} belong to other services",
        report.applied, report.failed, report.skipped
    );
    Ok(if report.failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Prints one topic's state; returns 1 if it is a problem.
fn print_topic(report: &crate::bus::TopicReport) -> usize {
    match &report.state {
        TopicState::Ok if report.created => println!("created  {}", report.topic),
        TopicState::Ok => println!("ok       {}", report.topic),
        TopicState::Missing => {
            println!("MISSING  {}", report.topic);
            return 1;
        }
        TopicState::Drift(lines) => {
            println!("DRIFT    {}", report.topic);
            for l in lines {
                println!("           {l}");
            }
            return 1;
        }
    }
    0
}

async fn run(loaded: Loaded, args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = &loaded.config;
    info!("ficus {} starting: {}", env!("CARGO_PKG_VERSION"), cfg.describe());
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let health = Health::new(Duration::from_secs(args.stall_secs));
    if let Some(addr) = args.metrics_addr {
        let handle = crate::ops::install_metrics().context("installing the metrics recorder")?;
        let bound = crate::ops::serve(addr, handle, health.clone(), shutdown.clone())
            .await
            .with_context(|| format!("serving /metrics, /healthz, /readyz on {addr}"))?;
        info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    }

    let mut tasks = tokio::task::JoinSet::new();
    if args.roles.contains(&Role::Tail) {
        let role = TailRole {
            cfg: cfg.clone(),
            topics: loaded.topics.clone(),
            resnapshot: args.resnapshot,
            health: health.clone(),
        };
        let token = shutdown.clone();
        tasks.spawn(async move { role.run(token).await.context("tail") });
    }

    if args.roles.contains(&Role::Consume) {
        let chosen = select_services(&loaded.services, &args.services)?;
        let target = crate::mongo::connect(&cfg.target_uri, "consume").await?;
        let store = crate::mongo::connect(&cfg.store.uri, "consume").await?.database(&cfg.store.db);
        for service in chosen {
            let (target, health, kafka, token) = (target.clone(), health.clone(), cfg.kafka.clone(), shutdown.clone());
            let store = store.clone();
            let ttl = Duration::from_secs(args.tombstone_ttl_days * 86_400);
            let (batch_max, batch_wait) = (args.batch_max.max(1), Duration::from_millis(args.batch_wait_ms));
            tasks.spawn(async move {
                let name = service.service().to_string();
                // The target may not be reachable yet: wait for it rather than exit.
                let collections = service.collections();
                let open = || MongoSink::open(target.clone(), service.database(), &collections, ttl);
                let transient = |e: &crate::sink::SinkError| e.class() == crate::mongo::ErrorClass::Transient;
                let sink = crate::retry::with_backoff(&format!("consume:{name}"), &token, open, transient)
                    .await
                    .with_context(|| format!("opening {}", service.database()))?;
                let consumer =
                    ServiceConsumer { health, store, transforms: service, sink, kafka, batch_max, batch_wait };
                consumer.run(token).await.map_err(anyhow::Error::from).with_context(|| format!("consume {name}"))
            });
        }
    }

    if args.roles.contains(&Role::Archive) {
        let store_client = crate::mongo::connect(&cfg.store.uri, "archive").await?;
        let store_db = store_client.database(&cfg.store.db);
        let (health, token) = (health.clone(), shutdown.clone());
        let (kafka, topics) = (cfg.kafka.clone(), loaded.topics.defs.iter().map(|d| d.topic.clone()).collect());
        let (batch_max, batch_wait) = (args.batch_max.max(1), Duration::from_millis(args.batch_wait_ms));
        tasks.spawn(async move {
            // The store may not be reachable yet: wait for it rather than exit.
            let store =
                crate::retry::with_backoff("archive", &token, || EventStore::open(&store_db), StoreError::is_transient)
                    .await
                    .context("opening the event store")?;
            let archiver = Archiver { health, store, db: store_db, kafka, topics, batch_max, batch_wait };
            archiver.run(token).await.map_err(anyhow::Error::from).context("archive")
        });
    }

    // The first role to fail stops the others; a signal stops them all.
    let mut failure: Option<anyhow::Error> = None;
    loop {
        let next = if shutdown.is_cancelled() {
            match tokio::time::timeout(Duration::from_secs(args.shutdown_timeout), tasks.join_next()).await {
                Ok(n) => n,
                Err(_) => {
                    error!("roles did not drain within {}s; exiting without a clean stop", args.shutdown_timeout);
                    return Ok(ExitCode::from(1));
                }
            }
        } else {
            tasks.join_next().await
        };
        let Some(joined) = next else { break };
        let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = outcome {
            metrics::counter!("ficus_errors_total", "stage" => "run", "kind" => "fatal").increment(1);
            if failure.is_none() {
                failure = Some(e);
            }
            shutdown.cancel();
        } else if !shutdown.is_cancelled() {
            warn!("a role ended on its own; stopping the others");
            shutdown.cancel();
        }
    }
    match failure {
        Some(e) if misconfigured(&e) => {
            error!("{e:#}");
            eprintln!("error: {}", crate::config::redact_text(&format!("{e:#}")));
            Ok(ExitCode::from(2))
        }
        Some(e) => Err(e),
        None => {
            info!("stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Whether a role stopped over how ficus is deployed (two processes with one
/// `kafka.instance_id`): exit 2, which supervisors are told not to restart, so the two never
/// take turns fencing each other.
fn misconfigured(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::consume::ConsumeError>().is_some_and(|e| e.is_misconfiguration())
            || c.downcast_ref::<StoreError>().is_some_and(|e| e.is_misconfiguration())
    })
}

/// The tail role: waits for the source's lease, tails while holding it, and stands by again if
/// it loses it (a paused process whose lease expired); releases it on a clean stop so a standby
/// takes over at once.
struct TailRole {
    cfg: Config,
    topics: Arc<Topics>,
    resnapshot: bool,
    health: Health,
}

impl TailRole {
    async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let store_client = crate::mongo::connect(&cfg.store.uri, "tail").await?;
        let store = store_client.database(&cfg.store.db);
        let lease = Lease::new(&store, &cfg.source.name, &holder_id(), cfg.tail.lease_ttl);
        let collections: Vec<String> = self.topics.collections().map(String::from).collect();
        let source = MongoSource::connect(&cfg.source.uri, &cfg.source.db, collections).await?;
        loop {
            // The store may not be reachable yet: waiting for it is what a tailer should do.
            let transient =
                |e: &mongodb::error::Error| crate::mongo::classify(e) == crate::mongo::ErrorClass::Transient;
            let acquired =
                crate::retry::with_backoff("tail", &shutdown, || lease.acquire(&shutdown, &self.health), transient);
            let Some(epoch) = acquired.await? else { return Ok(()) };
            let active = shutdown.child_token();
            let renewal = tokio::spawn(keep_lease(lease.clone(), epoch, active.clone()));
            let publisher = Arc::new(KafkaPublisher::new(&cfg.kafka, &format!("ficus-tail-{}", cfg.source.name))?);
            let tailer = Tailer {
                source_name: cfg.source.name.clone(),
                topics: self.topics.clone(),
                source: source.clone(),
                publisher: publisher.clone(),
                checkpoints: MongoCheckpoints::new(&store),
                tail: cfg.tail.clone(),
                snapshot: cfg.snapshot.clone(),
                epoch: Some(epoch),
                health: self.health.clone(),
            };
            let result = tailer.run(active.clone(), std::mem::take(&mut self.resnapshot)).await;
            renewal.abort();
            // Everything handed to Kafka was awaited by the tailer; flush is a last guard.
            let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(10))).await;
            match result {
                Ok(()) if shutdown.is_cancelled() => {
                    let _ = lease.release(epoch).await;
                    return Ok(());
                }
                // Lost the lease (or the store while holding it): stand by and try again.
                Ok(()) | Err(TailError::Checkpoint(CheckpointError::Fenced { .. })) => {
                    warn!(source = %cfg.source.name, "lost the lease; standing by");
                    metrics::gauge!("ficus_lease_held", "source" => cfg.source.name.clone()).set(0.0);
                }
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    warn!(source = %cfg.source.name, error = %e, "tailer stopped on a transient error after losing its lease; standing by");
                }
                Err(e) => {
                    let _ = lease.release(epoch).await;
                    return Err(e.into());
                }
            }
        }
    }
}

/// Renews the lease every third of its life; cancels `active` if it is lost or cannot be
/// renewed before it would expire.
async fn keep_lease(lease: Lease, epoch: i64, active: CancellationToken) {
    let mut renewed = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = active.cancelled() => return,
            _ = tokio::time::sleep(lease.ttl() / 3) => {}
        }
        match lease.renew(epoch).await {
            Ok(true) => renewed = std::time::Instant::now(),
            Ok(false) => {
                error!("the tail lease was taken over; stopping this tailer");
                active.cancel();
                return;
            }
            Err(e) if renewed.elapsed() >= lease.ttl() => {
                error!("the tail lease could not be renewed before it expired ({e}); stopping this tailer");
                active.cancel();
                return;
            }
            Err(e) => warn!("lease renewal failed, retrying: {e}"),
        }
    }
}

/// Identifies this process in the lease: host name and process id.
fn holder_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

fn select_services(all: &[Arc<ServiceTransforms>], wanted: &[String]) -> anyhow::Result<Vec<Arc<ServiceTransforms>>> {
    if wanted.is_empty() {
        return Ok(all.to_vec());
    }
    wanted
        .iter()
        .map(|w| {
            all.iter().find(|s| s.service() == w).cloned().ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(|s| s.service()).collect();
                anyhow::anyhow!("no service `{w}` in transforms/ (known: {})", known.join(", "))
            })
        })
        .collect()
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                error!("cannot listen for SIGTERM: {e}");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
        }
        shutdown.cancel();
    });
}
