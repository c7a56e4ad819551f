//! `ficus run`: the daemon. Starts the roles asked for (tail, consume, archive, reverse) in one
//! process, serves the probes and metrics, and supervises: the first role to fail stops the
//! others, a signal stops them all, and every role drains and checkpoints within the shutdown
//! timeout. Every role that judges ownership follows one [`OwnershipFeed`], so a `ficus cutover`
//! takes effect without a restart.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use std::sync::Arc;

use super::signals::{self, Running};
use super::{ConsumeArgs, Loaded, RUNTIME_GRACE, select_services};
use crate::config::{Config, parse_addr};
use crate::consume::{Direction, Repairs, ServiceConsumer};
use crate::cutover::feed::{OwnershipFeed, OwnershipSource};
use crate::cutover::ownership::{OwnershipError, OwnershipStore};
use crate::ops::Health;
use crate::sink::conflicts::Outbox;
use crate::sink::{MongoSink, MonolithSink};
use crate::store::{Archiver, EventStore, StoreError};
use crate::transform::ServiceTransforms;

/// A role `ficus run` can play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Monolith change stream → Kafka.
    Tail,
    /// Kafka → transforms → service databases.
    Consume,
    /// Kafka → the event store.
    Archive,
    /// Reverse sync, for each service while it owns keys (see `ficus cutover`): its database's
    /// changes → `<service>.changes` → the monolith.
    Reverse,
}

#[derive(Debug, clap::Args)]
pub(super) struct RunArgs {
    /// Roles to run in this process.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Role::Tail, Role::Consume, Role::Archive, Role::Reverse])]
    roles: Vec<Role>,
    /// With the consume and reverse roles: only these services (transforms/<service>); default all.
    #[arg(long = "service", value_name = "NAME")]
    services: Vec<String>,
    #[command(flatten)]
    pub(super) consume: ConsumeArgs,
    /// /readyz reports a role that made no progress for this many seconds as stalled
    /// (`consume.stall_secs`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stall_secs: Option<u64>,
    /// Seconds to drain and checkpoint after SIGTERM/SIGINT before giving up
    /// (`consume.shutdown_timeout_secs`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    shutdown_timeout: Option<u64>,
    /// Discard the tail checkpoint and take a fresh snapshot before streaming.
    #[arg(long)]
    resnapshot: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "FICUS_METRICS_ADDR", value_parser = parse_addr)]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// `ficus run`: starts the roles asked for, supervises them, and stops them all on a signal or
/// on the first that fails.
pub(super) async fn run(mut loaded: Loaded, args: RunArgs) -> anyhow::Result<ExitCode> {
    if let Some(s) = args.stall_secs {
        loaded.config.consume.stall = Duration::from_secs(s);
    }
    if let Some(s) = args.shutdown_timeout {
        loaded.config.consume.shutdown_timeout = Duration::from_secs(s);
    }
    let cfg = &loaded.config;
    let settings = cfg.consume.clone();
    info!("ficus {} starting: {}", env!("CARGO_PKG_VERSION"), cfg.describe());
    let shutdown = CancellationToken::new();
    let running = Running::default();
    // The supervisor stops waiting at the shutdown timeout and the runtime winds down within
    // its grace; past both (a runtime that could not even do that), the listener exits.
    let bound = settings.shutdown_timeout + RUNTIME_GRACE + Duration::from_secs(3);
    signals::watch(shutdown.clone(), Some(bound), running.clone());
    let health = Health::new(settings.stall);
    if let Some(addr) = args.metrics_addr {
        let handle = crate::ops::install_metrics().context("installing the metrics recorder")?;
        let (tx, feeds) = tokio::sync::watch::channel(None);
        let store = crate::mongo::connect(&cfg.store.uri, "cutover").await?.database(&cfg.store.db);
        tokio::spawn(watch_cutover(cfg.clone(), loaded.services.clone(), store.clone(), tx, shutdown.clone()));
        let cutover = cutover_handler(loaded.services.clone(), store, feeds);
        let bound = crate::ops::serve(addr, handle, health.clone(), cutover, shutdown.clone())
            .await
            .with_context(|| format!("serving /metrics, /healthz, /readyz, /cutover on {addr}"))?;
        info!(addr = %bound, "serving /metrics, /healthz, /readyz and /cutover");
    }

    let mut tasks = tokio::task::JoinSet::new();
    if args.roles.contains(&Role::Tail) {
        let role = crate::tail::role::TailRole {
            cfg: cfg.clone(),
            topics: loaded.topics.clone(),
            resnapshot: args.resnapshot,
            health: health.clone(),
        };
        let (token, entered) = (shutdown.clone(), running.enter("tail"));
        tasks.spawn(async move {
            let _running = entered;
            role.run(token).await.map_err(anyhow::Error::from).context("tail")
        });
    }

    let chosen = select_services(&loaded.services, &args.services)?;
    // Ownership, read once servers answer, shared by every role that judges it.
    let ownership = Arc::new(tokio::sync::OnceCell::<OwnershipFeed>::new());
    // The services this process judges changes of: those that can write back.
    let judged: Arc<Vec<String>> =
        Arc::new(chosen.iter().filter(|s| !s.written_back().is_empty()).map(|s| s.service().to_string()).collect());
    let follow = {
        let (cfg, ownership, token) = (cfg.clone(), ownership.clone(), shutdown.clone());
        move || {
            let (cfg, ownership, token, judged) = (cfg.clone(), ownership.clone(), token.clone(), judged.clone());
            async move { follow_ownership(&cfg, &judged, &ownership, &token).await }
        }
    };

    if args.roles.contains(&Role::Consume) {
        let target = crate::mongo::connect(&cfg.target_uri, "consume").await?;
        let store = crate::mongo::connect(&cfg.store.uri, "consume").await?.database(&cfg.store.db);
        for service in chosen.iter().cloned() {
            let (target, health, kafka, token) = (target.clone(), health.clone(), cfg.kafka.clone(), shutdown.clone());
            let (store, settings, follow) = (store.clone(), settings.clone(), follow.clone());
            let (repair_cfg, topics) = (cfg.clone(), loaded.topics.clone());
            let entered = running.enter(&format!("consume:{}", service.service()));
            tasks.spawn(async move {
                let _running = entered;
                let name = service.service().to_string();
                // The target may not be reachable yet: wait for it rather than exit.
                let (collections, written_back) = (service.collections(), service.written_back());
                let ttl = settings.tombstone_ttl;
                let open = || MongoSink::open(target.clone(), service.database(), &collections, &written_back, ttl);
                let transient = |e: &crate::sink::SinkError| e.class() == crate::mongo::ErrorClass::Transient;
                let sink = crate::retry::with_backoff(&format!("consume:{name}"), &token, open, transient)
                    .await
                    .with_context(|| format!("opening {}", service.database()))?;
                // A service that can write back judges ownership and records conflicts.
                let writes_back = !service.written_back().is_empty();
                let ownership = match writes_back {
                    true => match follow().await? {
                        Some(feed) => Some(feed),
                        None => return Ok(()), // shutdown while waiting
                    },
                    false => None,
                };
                let outbox = writes_back.then(|| Outbox::new(sink.database()));
                let repairs = match writes_back {
                    true => {
                        let monolith = crate::mongo::connect(&repair_cfg.source.uri, "consume").await?;
                        Some(Repairs {
                            transforms: service.clone(),
                            topics: topics.clone(),
                            source_name: repair_cfg.source.name.clone(),
                            monolith: MonolithSink::new(monolith, &repair_cfg.source.db, service.clone()),
                            service: sink.clone(),
                        })
                    }
                    false => None,
                };
                let consumer = ServiceConsumer {
                    health,
                    store,
                    transforms: service,
                    direction: Direction::Forward,
                    sink,
                    kafka,
                    settings,
                    ownership,
                    outbox,
                    repairs,
                };
                consumer.run(token).await.map_err(anyhow::Error::from).with_context(|| format!("consume {name}"))
            });
        }
    }

    if args.roles.contains(&Role::Reverse) {
        let store = crate::mongo::connect(&cfg.store.uri, "reverse").await?.database(&cfg.store.db);
        for service in chosen.iter().filter(|s| !s.written_back().is_empty()).cloned() {
            let (cfg, health, token, follow) = (cfg.clone(), health.clone(), shutdown.clone(), follow.clone());
            let (store, topics) = (store.clone(), loaded.topics.clone());
            let entered = running.enter(&format!("reverse:{}", service.service()));
            tasks.spawn(async move {
                let _running = entered;
                let Some(feed) = follow().await? else { return Ok(()) };
                reverse_sync(service, topics, cfg, feed, health, store, token).await
            });
        }
    }

    if args.roles.contains(&Role::Archive) {
        let store_client = crate::mongo::connect(&cfg.store.uri, "archive").await?;
        let store_db = store_client.database(&cfg.store.db);
        let (health, token) = (health.clone(), shutdown.clone());
        // Every event: the monolith's, and the services' own changes (reverse sync).
        let mut topics: Vec<String> = loaded.topics.defs.iter().map(|d| d.topic.clone()).collect();
        for s in loaded.services.iter().filter(|s| !s.written_back().is_empty()) {
            topics.push(crate::config::topics::changes_topic(s.service()));
        }
        let kafka = cfg.kafka.clone();
        let (batch_max, batch_wait) = (settings.batch_max, settings.batch_wait);
        let entered = running.enter("archive");
        tasks.spawn(async move {
            let _running = entered;
            // The store may not be reachable yet: wait for it rather than exit.
            let store =
                crate::retry::with_backoff("archive", &token, || EventStore::open(&store_db), StoreError::is_transient)
                    .await
                    .context("opening the event store")?;
            let archiver = Archiver { health, store, db: store_db, kafka, topics, batch_max, batch_wait };
            archiver.run(token).await.map_err(anyhow::Error::from).context("archive")
        });
    }

    // The first role to fail stops the others; a signal stops them all, and from then on the
    // roles have the shutdown timeout, all together, to drain.
    let mut failure: Option<anyhow::Error> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = if shutdown.is_cancelled() {
            let by = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + settings.shutdown_timeout);
            match tokio::time::timeout_at(by, tasks.join_next()).await {
                Ok(n) => n,
                Err(_) => {
                    let secs = settings.shutdown_timeout.as_secs();
                    error!(
                        "did not drain within {secs}s: {}; exiting without a clean stop (what they had \
                         checkpointed stands; the rest is read again on restart)",
                        running.describe()
                    );
                    if let Some(e) = failure {
                        error!("{e:#}");
                    }
                    return Ok(ExitCode::from(1));
                }
            }
        } else {
            tokio::select! {
                n = tasks.join_next() => n,
                _ = shutdown.cancelled() => continue,
            }
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
        Some(e) => Err(e),
        None => {
            info!("stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The process's ownership feed, started on first use once the servers answer; `None` when
/// shutdown came first.
async fn follow_ownership(
    cfg: &Config,
    judged: &[String],
    cell: &tokio::sync::OnceCell<OwnershipFeed>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<OwnershipFeed>> {
    let start = || async {
        let store = crate::mongo::connect(&cfg.store.uri, "ownership").await?.database(&cfg.store.db);
        let monolith = crate::mongo::connect(&cfg.source.uri, "ownership").await?.database(&cfg.source.db);
        let services = crate::mongo::connect(&cfg.target_uri, "ownership").await?.database("admin");
        let source = OwnershipSource { store: OwnershipStore::new(&store), store_db: store, monolith, services };
        let instance = format!("{}:{}", crate::config::host_name(), std::process::id());
        let judged = (instance, judged.to_vec());
        OwnershipFeed::start(source, cfg.reverse.ownership_poll, judged, shutdown.clone()).await
    };
    let feed = cell
        .get_or_try_init(|| async {
            crate::retry::with_backoff("ownership", shutdown, start, OwnershipError::is_transient)
                .await
                .map_err(anyhow::Error::from)
        })
        .await;
    match feed {
        Ok(f) => Ok(Some(f.clone())),
        Err(_) if shutdown.is_cancelled() => Ok(None),
        Err(e) => Err(e.context("following ownership")),
    }
}

/// Reverse sync for one service: from the first time it owns keys, its write-back consumer
/// (`<service>.changes` → the monolith) runs for good, and its database's tail while it is
/// needed (see `tail::reverse`).
async fn reverse_sync(
    service: Arc<ServiceTransforms>,
    topics: Arc<crate::config::topics::Topics>,
    cfg: Config,
    feed: OwnershipFeed,
    health: Health,
    store: mongodb::Database,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = service.service().to_string();
    let mut changes = feed.subscribe();
    while feed.current().get(&name).is_none_or(|o| o.periods().is_empty()) {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = changes.changed() => {}
            _ = tokio::time::sleep(cfg.reverse.ownership_poll) => {}
        }
    }
    info!(service = %name, "reverse sync: the service has owned keys; writing its changes back to the monolith");
    let monolith = crate::mongo::connect(&cfg.source.uri, "reverse").await?;
    let sink = MonolithSink::new(monolith, &cfg.source.db, service.clone());
    let target = crate::mongo::connect(&cfg.target_uri, "reverse").await?;
    let (collections, written_back) = (service.collections(), service.written_back());
    let service_sink =
        MongoSink::open(target, service.database(), &collections, &written_back, cfg.consume.tombstone_ttl).await?;
    let repairs = Repairs {
        transforms: service.clone(),
        topics,
        source_name: cfg.source.name.clone(),
        monolith: sink.clone(),
        service: service_sink,
    };
    let consumer = ServiceConsumer {
        transforms: service.clone(),
        direction: Direction::Reverse,
        health: health.clone(),
        store,
        outbox: Some(Outbox::new(sink.database())),
        sink,
        kafka: cfg.kafka.clone(),
        settings: cfg.consume.clone(),
        ownership: Some(feed.clone()),
        repairs: Some(repairs),
    };
    let tail = crate::tail::reverse::ReverseTailRole { cfg: cfg.clone(), transforms: service, health, ownership: feed };
    let (consumed, tailed) = tokio::join!(
        async { consumer.run(shutdown.clone()).await.with_context(|| format!("write-back {name}")) },
        async { tail.run(shutdown.clone()).await.with_context(|| format!("reverse tail {name}")) },
    );
    consumed.and(tailed)
}

/// Whether a role stopped over how ficus is deployed (two processes with one
/// `kafka.instance_id`): exit 2, which supervisors are told not to restart, so the two never
/// take turns fencing each other.
pub(super) fn misconfigured(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::consume::ConsumeError>().is_some_and(|e| e.is_misconfiguration())
            || c.downcast_ref::<StoreError>().is_some_and(|e| e.is_misconfiguration())
    })
}

/// How often the feeds behind `GET /cutover` (lags, the reverse feeds) and the cutover gauges
/// are read again; the ownership records themselves are read on every request.
const CUTOVER_EVERY: Duration = Duration::from_secs(5);

/// Reads every cutover service's feeds every [`CUTOVER_EVERY`] for `GET /cutover`, and sets the
/// gauges the `FicusCannotRollBack` alert watches.
async fn watch_cutover(
    cfg: crate::config::Config,
    services: Vec<Arc<ServiceTransforms>>,
    store: mongodb::Database,
    tx: tokio::sync::watch::Sender<Option<crate::status::CutoverFeeds>>,
    shutdown: CancellationToken,
) {
    loop {
        let read = async {
            let records = crate::status::CutoverRecords::read(&store).await?;
            let feeds = crate::status::cutover_feeds(&cfg, &services, &store, &records).await?;
            anyhow::Ok((records, feeds))
        };
        match read.await {
            Ok((records, feeds)) => {
                for s in records.states(&services, &feeds) {
                    let service = s.service.clone();
                    metrics::gauge!("ficus_cutover_can_rollback", "service" => service.clone())
                        .set(if s.can_rollback { 1.0 } else { 0.0 });
                    let fenced = s.fenced.map_or(0, |f| f.to.saturating_sub(f.from));
                    metrics::gauge!("ficus_cutover_fenced_buckets", "service" => service).set(f64::from(fenced));
                }
                tx.send_replace(Some(feeds));
            }
            Err(e) => tracing::warn!("reading the cutover state: {e:#}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CUTOVER_EVERY) => {}
        }
    }
}

/// `GET /cutover`: the ownership records read now, with the feeds as last read; an application
/// that names itself (`?instance=ID`) is recorded as having seen the epochs served (see
/// `cutover::views`: a fence holds once the applications seen have acknowledged it).
fn cutover_handler(
    services: Vec<Arc<ServiceTransforms>>,
    store: mongodb::Database,
    feeds: tokio::sync::watch::Receiver<Option<crate::status::CutoverFeeds>>,
) -> crate::ops::CutoverHandler {
    Arc::new(move |instance| {
        let (services, store, feeds) = (services.clone(), store.clone(), feeds.borrow().clone());
        Box::pin(async move {
            let feeds = feeds?;
            let records = match crate::status::CutoverRecords::read(&store).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("reading the ownership records for GET /cutover: {e:#}");
                    return None;
                }
            };
            let states = records.states(&services, &feeds);
            if let Some(instance) = instance {
                let epochs: Vec<(String, i64)> = states.iter().map(|s| (s.service.clone(), s.epoch)).collect();
                let views = crate::cutover::views::Views::new(&store);
                if let Err(e) = views.saw(crate::cutover::views::Viewer::App, &instance, &epochs).await {
                    tracing::warn!(%instance, "recording what an application saw: {e}");
                }
            }
            Some(serde_json::json!({ "services": states }).to_string())
        })
    })
}
