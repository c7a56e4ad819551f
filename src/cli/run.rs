//! `ficus run`: the daemon's arguments, its signals and its exit codes; the daemon itself is
//! `crate::daemon`.

use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use tokio_util::sync::CancellationToken;
use tracing::error;

use super::signals;
use super::{BadInput, ConsumeArgs, Loaded, RUNTIME_GRACE};
use crate::config::parse_addr;
use crate::daemon::{DaemonError, Definitions, Options, Running};

/// A role `ficus run` can play (see `daemon::Role`).
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

impl Role {
    fn daemon(self) -> crate::daemon::Role {
        match self {
            Role::Tail => crate::daemon::Role::Tail,
            Role::Consume => crate::daemon::Role::Consume,
            Role::Archive => crate::daemon::Role::Archive,
            Role::Reverse => crate::daemon::Role::Reverse,
        }
    }
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

/// `ficus run`: maps the arguments onto the daemon's options, hears signals (a second one, or
/// the process still running well past the shutdown timeout, exits at once), and runs the
/// daemon until a signal or the first role that fails.
pub(super) async fn run(mut loaded: Loaded, args: RunArgs) -> anyhow::Result<ExitCode> {
    if let Some(s) = args.stall_secs {
        loaded.config.consume.stall = Duration::from_secs(s);
    }
    if let Some(s) = args.shutdown_timeout {
        loaded.config.consume.shutdown_timeout = Duration::from_secs(s);
    }
    let shutdown = CancellationToken::new();
    let running = Running::default();
    // The daemon stops waiting at the shutdown timeout and the runtime winds down within its
    // grace; past both (a runtime that could not even do that), the listener exits.
    let bound = loaded.config.consume.shutdown_timeout + RUNTIME_GRACE + Duration::from_secs(3);
    signals::watch(shutdown.clone(), Some(bound), running.clone());
    let roles = args.roles.iter().map(|r| r.daemon()).collect();
    let options = Options {
        roles,
        services: args.services,
        resnapshot: args.resnapshot,
        metrics_addr: args.metrics_addr,
        running,
    };
    let definitions = Definitions { topics: loaded.topics, services: loaded.services };
    let stopped = crate::daemon::run(definitions, loaded.config, options, shutdown.cancelled_owned()).await;
    match stopped {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e @ DaemonError::NotDrained { .. }) => {
            error!("{e}");
            Ok(ExitCode::from(1))
        }
        Err(e) if e.is_misconfiguration() => Err(anyhow::Error::new(BadInput(e.to_string()))),
        Err(e) => Err(e.into()),
    }
}

/// Whether a command stopped over how ficus is deployed (two processes with one
/// `kafka.instance_id`): exit 2, which supervisors are told not to restart, so the two never
/// take turns fencing each other.
pub(super) fn misconfigured(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::consume::ConsumeError>().is_some_and(|e| e.is_misconfiguration())
            || c.downcast_ref::<crate::store::StoreError>().is_some_and(|e| e.is_misconfiguration())
    })
}
