//! `ficus run`: the daemon. Starts the roles asked for (tail, consume, archive) in one process,
//! serves the probes and metrics, and supervises: the first role to fail stops the others, a
//! signal stops them all, and every role drains and checkpoints within the shutdown timeout.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{ConsumeArgs, Loaded, select_services, spawn_signal_handler};
use crate::config::parse_addr;
use crate::consume::ServiceConsumer;
use crate::ops::Health;
use crate::sink::MongoSink;
use crate::store::{Archiver, EventStore, StoreError};

/// A role `ficus run` can play.
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
pub(super) struct RunArgs {
    /// Roles to run in this process.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Role::Tail, Role::Consume, Role::Archive])]
    roles: Vec<Role>,
    /// With the consume role: only these services (transforms/<service>); default all.
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
    spawn_signal_handler(shutdown.clone());
    let health = Health::new(settings.stall);
    if let Some(addr) = args.metrics_addr {
        let handle = crate::ops::install_metrics().context("installing the metrics recorder")?;
        let bound = crate::ops::serve(addr, handle, health.clone(), shutdown.clone())
            .await
            .with_context(|| format!("serving /metrics, /healthz, /readyz on {addr}"))?;
        info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    }

    let mut tasks = tokio::task::JoinSet::new();
    if args.roles.contains(&Role::Tail) {
        let role = crate::tail::role::TailRole {
            cfg: cfg.clone(),
            topics: loaded.topics.clone(),
            resnapshot: args.resnapshot,
            health: health.clone(),
        };
        let token = shutdown.clone();
        tasks.spawn(async move { role.run(token).await.map_err(anyhow::Error::from).context("tail") });
    }

    if args.roles.contains(&Role::Consume) {
        let chosen = select_services(&loaded.services, &args.services)?;
        let target = crate::mongo::connect(&cfg.target_uri, "consume").await?;
        let store = crate::mongo::connect(&cfg.store.uri, "consume").await?.database(&cfg.store.db);
        for service in chosen {
            let (target, health, kafka, token) = (target.clone(), health.clone(), cfg.kafka.clone(), shutdown.clone());
            let (store, settings) = (store.clone(), settings.clone());
            tasks.spawn(async move {
                let name = service.service().to_string();
                // The target may not be reachable yet: wait for it rather than exit.
                let collections = service.collections();
                let ttl = settings.tombstone_ttl;
                let open = || MongoSink::open(target.clone(), service.database(), &collections, ttl);
                let transient = |e: &crate::sink::SinkError| e.class() == crate::mongo::ErrorClass::Transient;
                let sink = crate::retry::with_backoff(&format!("consume:{name}"), &token, open, transient)
                    .await
                    .with_context(|| format!("opening {}", service.database()))?;
                let consumer = ServiceConsumer { health, store, transforms: service, sink, kafka, settings };
                consumer.run(token).await.map_err(anyhow::Error::from).with_context(|| format!("consume {name}"))
            });
        }
    }

    if args.roles.contains(&Role::Archive) {
        let store_client = crate::mongo::connect(&cfg.store.uri, "archive").await?;
        let store_db = store_client.database(&cfg.store.db);
        let (health, token) = (health.clone(), shutdown.clone());
        let (kafka, topics) = (cfg.kafka.clone(), loaded.topics.defs.iter().map(|d| d.topic.clone()).collect());
        let (batch_max, batch_wait) = (settings.batch_max, settings.batch_wait);
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
            match tokio::time::timeout(settings.shutdown_timeout, tasks.join_next()).await {
                Ok(n) => n,
                Err(_) => {
                    let secs = settings.shutdown_timeout.as_secs();
                    error!("roles did not drain within {secs}s; exiting without a clean stop");
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
pub(super) fn misconfigured(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::consume::ConsumeError>().is_some_and(|e| e.is_misconfiguration())
            || c.downcast_ref::<StoreError>().is_some_and(|e| e.is_misconfiguration())
    })
}
