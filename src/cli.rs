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
use crate::config::{Config, parse_addr};
use crate::definitions::Report;
use crate::source::MongoSource;
use crate::tail::Tailer;
use crate::topics::{self, Topics};

#[derive(Debug, Parser)]
#[command(
    name = "ficus",
    version,
    about = "Keeps service databases in step with a MongoDB monolith through Kafka."
)]
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
    Tail,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Roles to run in this process.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Role::Tail])]
    roles: Vec<Role>,
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn,mongodb=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// Configuration and definitions, loaded and validated together.
struct Loaded {
    config: Config,
    topics: Arc<Topics>,
}

fn load(cli_config: Option<&std::path::Path>) -> Result<Loaded, Report> {
    let env = |k: &str| std::env::var(k).ok();
    let mut report = Report::default();
    let config = Config::load(cli_config, &env)
        .map_err(|r| report.extend(r))
        .ok();
    let topics_dir = config
        .as_ref()
        .map_or_else(|| PathBuf::from("topics"), |c| c.topics_dir.clone());
    let topics = topics::load(&topics_dir).map_err(|r| report.extend(r)).ok();
    match (config, topics) {
        (Some(config), Some(topics)) if report.is_empty() => Ok(Loaded {
            config,
            topics: Arc::new(topics),
        }),
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
                "ok: configuration and {} topic definition(s) are valid ({})",
                loaded.topics.defs.len(),
                loaded.config.describe()
            );
            return ExitCode::SUCCESS;
        }
        Command::Topics { action } => topics_cmd(&loaded, action).await,
        Command::Run(args) => run(loaded, args).await,
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
            TopicsAction::Check => admin
                .inspect(def)
                .await
                .map(|state| crate::bus::TopicReport {
                    topic: def.topic.clone(),
                    state,
                    created: false,
                }),
        }
        .with_context(|| format!("topic {}", def.topic))?;
        match &report.state {
            TopicState::Ok if report.created => println!("created  {}", report.topic),
            TopicState::Ok => println!("ok       {}", report.topic),
            TopicState::Missing => {
                bad += 1;
                println!("MISSING  {}", report.topic);
            }
            TopicState::Drift(lines) => {
                bad += 1;
                println!("DRIFT    {}", report.topic);
                for l in lines {
                    println!("           {l}");
                }
            }
        }
    }
    let collections: Vec<String> = loaded.topics.collections().map(String::from).collect();
    let source = MongoSource::connect(
        &loaded.config.source.uri,
        &loaded.config.source.db,
        collections,
    )
    .await?;
    for def in loaded.topics.defs.iter().filter(|d| d.pre_images) {
        let enabled = source.pre_images_enabled(&def.collection).await?;
        match (action, enabled) {
            (_, true) => {}
            (TopicsAction::Apply, false) => {
                source.enable_pre_images(&def.collection).await?;
                println!(
                    "enabled  pre-images on {}.{}",
                    loaded.config.source.db, def.collection
                );
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
            TopicsAction::Apply => println!(
                "{bad} topic(s) differ from their definitions; ficus does not alter existing topics"
            ),
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(loaded: Loaded, args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = &loaded.config;
    info!(
        "ficus {} starting: {}",
        env!("CARGO_PKG_VERSION"),
        cfg.describe()
    );
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        info!(%addr, "serving Prometheus metrics");
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let mut tasks = tokio::task::JoinSet::new();
    if args.roles.contains(&Role::Tail) {
        let collections: Vec<String> = loaded.topics.collections().map(String::from).collect();
        let source = MongoSource::connect(&cfg.source.uri, &cfg.source.db, collections).await?;
        let store_client = crate::mongo::connect(&cfg.store.uri, "store").await?;
        let checkpoints = MongoCheckpoints::new(&store_client.database(&cfg.store.db));
        let publisher = Arc::new(KafkaPublisher::new(
            &cfg.kafka,
            &format!("ficus-tail-{}", cfg.source.name),
        )?);
        let tailer = Tailer {
            source_name: cfg.source.name.clone(),
            topics: loaded.topics.clone(),
            source,
            publisher: publisher.clone(),
            checkpoints,
            tail: cfg.tail.clone(),
            snapshot: cfg.snapshot.clone(),
        };
        let token = shutdown.clone();
        let resnapshot = args.resnapshot;
        tasks.spawn(async move {
            let r = tailer
                .run(token.clone(), resnapshot)
                .await
                .map_err(anyhow::Error::from);
            // Everything handed to Kafka was awaited by the tailer; flush is a last guard.
            let _ =
                tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(10))).await;
            r.context("tail")
        });
    }

    // The first role to fail stops the others; a signal stops them all.
    let mut failure: Option<anyhow::Error> = None;
    loop {
        let next = if shutdown.is_cancelled() {
            match tokio::time::timeout(
                Duration::from_secs(args.shutdown_timeout),
                tasks.join_next(),
            )
            .await
            {
                Ok(n) => n,
                Err(_) => {
                    error!(
                        "roles did not drain within {}s; exiting without a clean stop",
                        args.shutdown_timeout
                    );
                    return Ok(ExitCode::from(1));
                }
            }
        } else {
            tasks.join_next().await
        };
        let Some(joined) = next else { break };
        let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = outcome {
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

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
