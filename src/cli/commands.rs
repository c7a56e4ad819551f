//! The commands other than `run`: each loads what it needs, does one job and says how it went
//! in its exit code.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{Loaded, TopicsAction, select_services, spawn_signal_handler};
use crate::bus::{TopicAdmin, TopicState};
use crate::sink::MongoSink;
use crate::source::MongoSource;
use crate::store::EventStore;
use crate::transform;

/// `ficus validate`: everything loaded (or the command would not have got here); prints the
/// reverse classification of every service.
pub(super) fn validate(loaded: &Loaded) -> ExitCode {
    println!(
        "ok: configuration, {} topic definition(s) and the transforms of {} service(s) are valid ({})",
        loaded.topics.defs.len(),
        loaded.services.len(),
        loaded.config.describe()
    );
    print!("{}", transform::render_classification(loaded.services.iter().map(AsRef::as_ref)));
    ExitCode::SUCCESS
}

/// `ficus status`.
pub(super) async fn status(loaded: &Loaded) -> anyhow::Result<ExitCode> {
    let rows = crate::status::collect(&loaded.config, &loaded.topics, &loaded.services).await?;
    print!("{}", crate::status::render(&rows));
    Ok(ExitCode::SUCCESS)
}

/// `ficus lens check`.
pub(super) async fn lens_check(
    loaded: &Loaded,
    service: Option<&str>,
    sample: Option<u64>,
) -> anyhow::Result<ExitCode> {
    if let Some(name) = service {
        select_services(&loaded.services, &[name.to_string()])?;
    }
    let cfg = &loaded.config;
    let (uri, db, name) = (&cfg.source.uri, &cfg.source.db, &cfg.source.name);
    let ok = crate::lens::check(&loaded.services, &loaded.topics, uri, db, name, service, sample).await?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `ficus topics apply|check`.
pub(super) async fn topics(loaded: &Loaded, action: TopicsAction) -> anyhow::Result<ExitCode> {
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

/// `ficus replay`.
pub(super) async fn replay(
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

/// `ficus verify`.
pub(super) async fn verify(
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

/// `ficus dlq replay`.
pub(super) async fn dlq_replay(loaded: &Loaded, service: &str) -> anyhow::Result<ExitCode> {
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
