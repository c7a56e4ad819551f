//! The daemon: starts the roles asked for (tail, consume, archive, reverse) in one process, serves
//! the probes and metrics, and supervises them until `shutdown` completes (the shape of
//! mini-redis's `server::run(listener, ctrl_c())`): the first role to fail stops the others, and
//! from the shutdown on every role has the shutdown timeout, all together, to drain and
//! checkpoint. The binary only parses arguments, hears signals and maps the outcome to an exit
//! code; a test runs the same daemon in-process with any future as its shutdown.
//!
//! - `roles`: how each role is built from the [`Clients`] and the definitions, and reverse sync's
//!   start once a service first owns keys;
//! - `cutover`: what `GET /cutover` serves, and the gauges the rollback alert watches;
//! - `running`: what is still running, by name, for the messages of a stop that does not finish.

mod cutover;
mod roles;
mod running;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::running::{Entered, Running};
use crate::clients::Clients;
use crate::config::Config;
use crate::config::topics::Topics;
use crate::consume::ConsumeError;
use crate::cutover::ownership::OwnershipError;
use crate::ops::Health;
use crate::sink::SinkError;
use crate::store::StoreError;
use crate::tail::TailError;
use crate::transform::ServiceTransforms;

/// The topic definitions and every service's transforms, loaded and validated once.
#[derive(Clone)]
pub struct Definitions {
    pub topics: Arc<Topics>,
    pub services: Vec<Arc<ServiceTransforms>>,
}

impl Definitions {
    /// The services `wanted` names (all when it names none).
    pub fn select(&self, wanted: &[String]) -> Result<Vec<Arc<ServiceTransforms>>, UnknownService> {
        select(&self.services, wanted)
    }
}

/// The services of `all` that `wanted` names (all when it names none).
pub fn select(
    all: &[Arc<ServiceTransforms>],
    wanted: &[String],
) -> Result<Vec<Arc<ServiceTransforms>>, UnknownService> {
    if wanted.is_empty() {
        return Ok(all.to_vec());
    }
    wanted
        .iter()
        .map(|w| {
            all.iter().find(|s| s.service() == w).cloned().ok_or_else(|| UnknownService {
                name: w.clone(),
                known: all.iter().map(|s| s.service().to_string()).collect(),
            })
        })
        .collect()
}

/// A service name that is not in `transforms/`: bad input.
#[derive(Debug, thiserror::Error)]
#[error("no service `{name}` in transforms/ (known: {})", known.join(", "))]
pub struct UnknownService {
    pub name: String,
    pub known: Vec<String>,
}

/// A role the daemon can play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Monolith change stream → Kafka.
    Tail,
    /// Kafka → transforms → service databases.
    Consume,
    /// Kafka → the event store.
    Archive,
    /// Reverse sync, for each service while it owns keys: its database's changes →
    /// `<service>.changes` → the monolith.
    Reverse,
}

impl Role {
    /// Every role, as `ficus run` runs by default.
    pub const ALL: [Role; 4] = [Role::Tail, Role::Consume, Role::Archive, Role::Reverse];
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub roles: Vec<Role>,
    /// With the consume and reverse roles: only these services (all when empty).
    pub services: Vec<String>,
    /// Discard the tail checkpoint and take a fresh snapshot before streaming.
    pub resnapshot: bool,
    /// Serve `/metrics`, `/healthz`, `/readyz` and `/cutover` here (and install the process's
    /// metrics recorder: once per process).
    pub metrics_addr: Option<SocketAddr>,
    /// Where the roles record themselves while they run (shared with whoever reports a stop
    /// that does not finish, e.g. the binary's signal listener).
    pub running: Running,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            roles: Role::ALL.to_vec(),
            services: vec![],
            resnapshot: false,
            metrics_addr: None,
            running: Running::default(),
        }
    }
}

/// Why a role stopped.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Tail(#[from] TailError),
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    #[error("the task ended abnormally: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Why the daemon stopped other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    UnknownService(#[from] UnknownService),
    #[error("connecting to MongoDB: {}", crate::mongo::describe(.0))]
    Connect(#[source] mongodb::error::Error),
    #[error("installing the metrics recorder: {0}")]
    Metrics(String),
    #[error("serving /metrics, /healthz, /readyz, /cutover on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
    #[error("{role}: {source}")]
    Role { role: String, source: Box<RoleError> },
    /// The roles did not all drain within the shutdown timeout (what they had checkpointed
    /// stands; the rest is read again on restart).
    #[error(
        "did not drain within {secs}s: {running}; stopped without a clean stop (what they had \
         checkpointed stands; the rest is read again on restart){}",
        .failure.as_ref().map(|f| format!("; first failure: {f}")).unwrap_or_default()
    )]
    NotDrained { secs: u64, running: String, failure: Option<Box<DaemonError>> },
}

impl DaemonError {
    /// Whether it stopped over how ficus is deployed (two processes with one
    /// `kafka.instance_id`) or what it was asked (an unknown service): bad input, which
    /// supervisors are told not to restart, so two processes never take turns fencing each other.
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            DaemonError::UnknownService(_) => true,
            DaemonError::Role { source, .. } => match source.as_ref() {
                RoleError::Consume(e) => e.is_misconfiguration(),
                RoleError::Store(e) => e.is_misconfiguration(),
                RoleError::Sink(e) => e.is_misconfiguration(),
                _ => false,
            },
            _ => false,
        }
    }
}

/// Runs the roles `options` asks for until `shutdown` completes or one of them fails; then
/// every role drains within `config.consume.shutdown_timeout`. Clients are connected once
/// here and passed to every role.
pub async fn run(
    definitions: Definitions,
    config: Config,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    info!("ficus {} starting: {}", env!("CARGO_PKG_VERSION"), config.describe());
    let token = CancellationToken::new();
    {
        let token = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => token.cancel(),
                _ = token.cancelled() => {}
            }
        });
    }
    let clients = Clients::connect(&config, "run").await.map_err(DaemonError::Connect)?;
    let health = Health::new(config.consume.stall);
    if let Some(addr) = options.metrics_addr {
        cutover::serve(addr, &config, &definitions, &clients, &health, &token).await?;
    }
    let ctx =
        roles::Context { config, definitions, clients, health, shutdown: token.clone(), running: options.running };
    let mut tasks = JoinSet::new();
    let started = roles::spawn(&ctx, &options.roles, &options.services, options.resnapshot, &mut tasks);
    if let Err(e) = started {
        token.cancel();
        tasks.shutdown().await;
        return Err(e);
    }
    supervise(tasks, &token, ctx.config.consume.shutdown_timeout, &ctx.running).await
}

/// A role's task: its name, and how it ended.
type Task = JoinSet<(String, Result<(), RoleError>)>;

/// Waits for the roles: the first to fail (or to end on its own) stops the others; from the
/// shutdown on they have `timeout`, all together, to drain.
async fn supervise(
    mut tasks: Task,
    shutdown: &CancellationToken,
    timeout: Duration,
    running: &Running,
) -> Result<(), DaemonError> {
    let mut failure: Option<DaemonError> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = if shutdown.is_cancelled() {
            let by = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
            match tokio::time::timeout_at(by, tasks.join_next()).await {
                Ok(n) => n,
                Err(_) => {
                    let (secs, running) = (timeout.as_secs(), running.describe());
                    return Err(DaemonError::NotDrained { secs, running, failure: failure.map(Box::new) });
                }
            }
        } else {
            tokio::select! {
                n = tasks.join_next() => n,
                _ = shutdown.cancelled() => continue,
            }
        };
        let Some(joined) = next else { break };
        let (role, outcome) = match joined {
            Ok((role, outcome)) => (role, outcome),
            Err(e) => ("a role".to_string(), Err(RoleError::Join(e))),
        };
        match outcome {
            Err(source) => {
                metrics::counter!("ficus_errors_total", "stage" => "run", "kind" => "fatal").increment(1);
                failure.get_or_insert(DaemonError::Role { role, source: Box::new(source) });
                shutdown.cancel();
            }
            Ok(()) if !shutdown.is_cancelled() => {
                warn!(%role, "a role ended on its own; stopping the others");
                shutdown.cancel();
            }
            Ok(()) => {}
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            info!("stopped cleanly");
            Ok(())
        }
    }
}
