//! The command line: parses arguments, loads configuration and definitions once, wires the
//! adapters together and maps outcomes to exit codes. The binary's edge, so `anyhow` is used
//! here and nowhere else.
//!
//! - `run`: `ficus run`, the daemon's role supervisor;
//! - `commands`: every other command (topics, replay, verify, dlq, status, lens);
//! - `cutover`: `ficus cutover`, ownership moved between the monolith and a service.
//!
//! Exit codes: 0 success; 1 a runtime failure (or drift found by `topics check`, `verify`,
//! `lens check`); 2 bad input: invalid configuration or definitions, an unknown service, two
//! processes configured with one `kafka.instance_id`.

mod commands;
mod cutover;
mod run;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::clients::Clients;
use crate::config::report::Report;
use crate::config::topics::{self, Topics};
use crate::config::{Config, ConsumeConfig};
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
    Run(run::RunArgs),
    /// Each stage's position, lag and health, from checkpoints and consumer-group offsets.
    Status {
        /// One JSON document for scripts: the stages, and each service's cutover state (what
        /// `GET /cutover` serves).
        #[arg(long)]
        json: bool,
        /// With --json: the application instance reading it, recorded as having seen each
        /// service's epoch (as `GET /cutover?instance=ID` records it; see the application
        /// contract).
        #[arg(long, value_name = "ID", requires = "json")]
        instance: Option<String>,
    },
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
        #[command(flatten)]
        consume: ConsumeArgs,
    },
    /// Prove a service database equals its transforms applied to the monolith's current state.
    Verify(VerifyArgs),
    /// Dead letters (`<topic>.dlq`).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Move a service's share of ownership (the percentage of routing-key buckets whose writes
    /// it owns; see the README's routing function).
    Cutover {
        #[arg(long = "service", value_name = "NAME")]
        service: String,
        /// The share to move to, 0 to 100 (0: the monolith owns everything).
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100), required_unless_present_any = ["abort", "plan"])]
        to: Option<u8>,
        /// Set it at once, without fencing, draining or verification (the last resort: writes in
        /// flight are merged afterwards, conflicts reported).
        #[arg(long)]
        force: bool,
        /// The emergency move (e.g. a rollback, `--to 0 --emergency`): fenced and drained like
        /// every safe move, so no write in flight is lost, but without the lens check before it
        /// and the verification of the moving buckets; no plan, no holds.
        #[arg(long, conflicts_with_all = ["force", "abort", "plan"], requires = "to")]
        emergency: bool,
        /// Print the plan and the preflight's results; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Return a move under way to the share before it (unfenced; after its flip, by the
        /// same steps the other way).
        #[arg(long)]
        abort: bool,
        /// Seconds the drain (and the observation) may wait before the gate fails.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        timeout: u64,
        /// Stop after this step (plan, preflight, fence, drain, verify, record-start, flip),
        /// e.g. to have a move verified and ready (`canFlip`) and flip it at a chosen moment:
        /// the same command without it goes on from there.
        #[arg(long, value_name = "STEP", value_parser = crate::cutover::plan::Phase::named)]
        until: Option<crate::cutover::plan::Phase>,
        /// A progressive rollout: the shares to move to in turn (e.g. 10,50,100; going down,
        /// 50,10,0 with --to 0), each by the safe move and held while analysis runs; a critical
        /// failure rolls back to the last share that finished its hold.
        #[arg(long, value_name = "SHARES", value_parser = clap::value_parser!(crate::cutover::rollout::Shares))]
        plan: Option<crate::cutover::rollout::Shares>,
        /// With --plan: how long to hold each share while analysis runs (e.g. 5m, 30s).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "5m")]
        hold: std::time::Duration,
        /// With --plan: how often analysis measures during a hold.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
        interval: std::time::Duration,
    },
    /// Measure a service's migration once, as a rollout's analysis does (lags, conflicts, fence
    /// violations and dead letters since the previous run, the verify score of the buckets it
    /// owns): exit 0 pass, 1 a check failed, 3 inconclusive (no data, or a reading erred).
    Analyze {
        #[arg(long = "service", value_name = "NAME")]
        service: String,
        /// One measurement (the only mode: a tool that gates on the exit code runs it again).
        #[arg(long, required = true)]
        once: bool,
        /// The result as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// The migration log: every move, step, gate, abort, forced switch, plan, analysis and
    /// rollback, oldest first.
    Log {
        /// One service's (default: every service's).
        #[arg(long = "service", value_name = "NAME")]
        service: Option<String>,
        /// The last N entries.
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// MongoDB `$jsonSchema` validators from the transforms' `[[quality]]` rules.
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
    /// Reverse sync: the derived reverses of the transforms.
    Lens {
        #[command(subcommand)]
        action: LensAction,
    },
}

/// `ficus verify`: exit 0 every check passed, 1 one failed its gate, 3 inconclusive (orphans
/// still pending after the wait, a server gone mid-run), 2 bad input.
#[derive(Debug, clap::Args)]
struct VerifyArgs {
    #[arg(long = "service", value_name = "NAME")]
    service: String,
    /// Differing documents to show side by side, per collection.
    #[arg(long, default_value_t = 10)]
    sample: usize,
    /// Exit 0 when the scores pass the seed's migration gate (99% consistency, 95%
    /// validation) even if some documents differ; by default any difference fails.
    #[arg(long)]
    gate: bool,
    /// Seconds to wait before re-checking differences and pending orphans (traffic in flight).
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// The checks to run, comma-separated: counts, contents, references, quality (default: all).
    #[arg(long, value_name = "LIST")]
    checks: Option<String>,
    /// The whole report as one JSON document.
    #[arg(long)]
    json: bool,
    /// Expected documents kept in memory (about 300 bytes each) before verify's expectation
    /// spills into a scratch collection in ficus's store: memory stays bounded at any size.
    #[arg(long, value_name = "N", default_value_t = crate::verify::MEMORY_ENTRIES)]
    memory_entries: usize,
}

#[derive(Debug, Subcommand)]
enum SchemaAction {
    /// Print, per collection of the service with rules, the `collMod` command that installs the
    /// validator its rules imply (one JSON document per line), for teams that want the database
    /// to enforce them. Rules with a `mostly` below 1 and uniqueness are left out (say why).
    Emit {
        #[arg(long = "service", value_name = "NAME")]
        service: String,
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
        /// The write-backs' dead letters (`<service>.changes.dlq`, into the monolith) instead of
        /// the service's own.
        #[arg(long)]
        reverse: bool,
        #[command(flatten)]
        consume: ConsumeArgs,
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

/// Overrides of the `[consume]` settings, for every command that applies events (`run`,
/// `replay`, `dlq replay`), so they all write with the same values.
#[derive(Debug, Clone, Default, clap::Args)]
struct ConsumeArgs {
    /// Messages per batch, at most (`consume.batch_max`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch_max: Option<u64>,
    /// Milliseconds a batch is collected for, at most (`consume.batch_wait_ms`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch_wait_ms: Option<u64>,
    /// Days a delete's tombstone refuses late older writes (`consume.tombstone_ttl_days`);
    /// must exceed Kafka retention.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    tombstone_ttl_days: Option<u64>,
}

impl ConsumeArgs {
    fn apply(&self, c: &mut ConsumeConfig) {
        if let Some(n) = self.batch_max {
            c.batch_max = n as usize;
        }
        if let Some(ms) = self.batch_wait_ms {
            c.batch_wait = std::time::Duration::from_millis(ms);
        }
        if let Some(days) = self.tombstone_ttl_days {
            c.tombstone_ttl = std::time::Duration::from_secs(days.saturating_mul(86_400));
        }
    }
}

/// Bad input on the command line (an unknown service): exit 2, like invalid configuration.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

/// How long the runtime may take to wind down after the command returned.
const RUNTIME_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

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
    let code = rt.block_on(dispatch(cli));
    // Whatever a role left behind (a blocking call into a broker that does not answer) must not
    // hold the exit: every role has drained and checkpointed by now, or said it could not. After
    // a failure (or a drain given up) nothing left is worth waiting for.
    if code == ExitCode::SUCCESS {
        rt.shutdown_timeout(RUNTIME_GRACE);
    } else {
        rt.shutdown_background();
    }
    code
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

/// Loads the configuration and every definition it points to, reporting every problem of all
/// of them together.
fn load(cli_config: Option<&std::path::Path>) -> Result<Loaded, Report> {
    let env = |k: &str| std::env::var(k).ok();
    let (config, mut report) = Config::load(cli_config, &env);
    let topics = topics::load(&config.topics_dir).map_err(|r| report.extend(r)).ok();
    // Transforms are checked against the topics; with broken topics there is nothing to check against.
    let services =
        topics.as_ref().and_then(|t| transform::load_all(&config.transforms_dir, t).map_err(|r| report.extend(r)).ok());
    match (topics, services) {
        (Some(topics), Some(services)) if report.is_empty() => {
            Ok(Loaded { config, topics: Arc::new(topics), services: services.into_iter().map(Arc::new).collect() })
        }
        _ => Err(report),
    }
}

async fn dispatch(cli: Cli) -> ExitCode {
    let mut loaded = match load(cli.config.as_deref()) {
        Ok(l) => l,
        Err(report) => {
            eprint!("{report}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Validate => Ok(commands::validate(&loaded)),
        Command::Run(args) => {
            args.consume.apply(&mut loaded.config.consume);
            run::run(loaded, args).await
        }
        command => match Clients::connect(&loaded.config, "cli").await {
            Ok(clients) => command_with(command, &mut loaded, &clients).await,
            Err(e) => Err(anyhow::anyhow!("connecting to MongoDB: {}", crate::mongo::describe(&e))),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {}", crate::config::redact_text(&format!("{e:#}")));
            if e.chain().any(|c| c.is::<BadInput>()) || run::misconfigured(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Every command but `validate` and `run`, with the process's clients.
async fn command_with(command: Command, loaded: &mut Loaded, clients: &Clients) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate | Command::Run(_) => unreachable!("dispatched before clients are connected"),
        Command::Lens { action: LensAction::Check { service, sample } } => {
            commands::lens_check(loaded, clients, service.as_deref(), sample).await
        }
        Command::Topics { action } => commands::topics(loaded, clients, action).await,
        Command::Dlq { action: DlqAction::Replay { service, reverse, consume } } => {
            consume.apply(&mut loaded.config.consume);
            commands::dlq_replay(loaded, clients, &service, reverse).await
        }
        Command::Analyze { service, json, .. } => cutover::analyze(loaded, clients, &service, json).await,
        Command::Schema { action: SchemaAction::Emit { service } } => commands::schema_emit(loaded, &service),
        Command::Log { service, limit, json } => commands::log(loaded, clients, service.as_deref(), limit, json).await,
        Command::Status { json, instance } => commands::status(loaded, clients, json, instance.as_deref()).await,
        Command::Cutover {
            service,
            to,
            force,
            dry_run,
            abort,
            timeout,
            until,
            plan: Some(crate::cutover::rollout::Shares(shares)),
            hold,
            interval,
            ..
        } => {
            if force || abort || until.is_some() {
                let msg = "--plan runs safe moves with holds: it goes with neither --force, --abort nor --until";
                return Err(anyhow::Error::new(BadInput(msg.into())));
            }
            let timeout = std::time::Duration::from_secs(timeout);
            let req = crate::commands::rollout::PlanRequest { service, to, shares, hold, interval, timeout, dry_run };
            cutover::rollout(loaded, clients, req).await
        }
        Command::Cutover { service, to, force, dry_run, abort, emergency, timeout, until, plan: None, .. } => {
            let timeout = std::time::Duration::from_secs(timeout);
            let req =
                crate::commands::cutover::Request { service, to, force, dry_run, abort, emergency, timeout, until };
            cutover::cutover(loaded, clients, req).await
        }
        Command::Replay { service, in_place, from, consume } => {
            consume.apply(&mut loaded.config.consume);
            commands::replay(loaded, clients, &service, in_place, from).await
        }
        Command::Verify(args) => commands::verify(loaded, clients, args).await,
    }
}

/// The services a command names (all when it names none); an unknown name is bad input.
fn select_services(all: &[Arc<ServiceTransforms>], wanted: &[String]) -> anyhow::Result<Vec<Arc<ServiceTransforms>>> {
    crate::daemon::select(all, wanted).map_err(|e| anyhow::Error::new(BadInput(e.to_string())))
}

/// Cancels `shutdown` on SIGTERM or SIGINT; a second signal exits at once (see `signals`).
fn spawn_signal_handler(shutdown: CancellationToken) {
    signals::watch(shutdown, None, crate::daemon::Running::default());
}

fn parse_time(s: &str) -> Result<bson::DateTime, String> {
    bson::DateTime::parse_rfc3339_str(s).map_err(|e| format!("`{s}` is not an RFC 3339 time: {e}"))
}
