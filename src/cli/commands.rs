//! The commands other than `run`: each loads what it needs, does one job and says how it went
//! in its exit code.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{BadInput, Loaded, TopicsAction, select_services, spawn_signal_handler};
use crate::bus::{TopicAdmin, TopicState};
use crate::clients::Clients;
use crate::commands::CommandError;
use crate::config::topics::{TopicDef, Topics};
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
pub(super) async fn status(
    loaded: &Loaded,
    clients: &Clients,
    json: bool,
    instance: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let rows = crate::status::collect(&loaded.config, clients, &loaded.topics, &loaded.services).await?;
    if json {
        let cutover = crate::status::cutover_states(&loaded.config, clients, &loaded.services).await?;
        if let Some(instance) = instance.filter(|i| !i.is_empty()) {
            let store = clients.store();
            let epochs: Vec<(String, i64)> = cutover.iter().map(|s| (s.service.clone(), s.epoch)).collect();
            crate::cutover::views::Views::new(&store)
                .saw(crate::cutover::views::Viewer::App, instance, &epochs)
                .await?;
        }
        let out = serde_json::json!({ "stages": rows, "cutover": cutover });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", crate::status::render(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// `ficus schema emit --service S`: one `collMod` per collection with rules.
pub(super) fn schema_emit(loaded: &Loaded, service: &str) -> anyhow::Result<ExitCode> {
    let chosen = select_services(&loaded.services, &[service.to_string()])?;
    let rules: Vec<_> = chosen[0].quality().collect();
    let collections: std::collections::BTreeSet<&str> = rules.iter().map(|r| r.collection.as_str()).collect();
    for c in &collections {
        let of = rules.iter().copied().filter(|r| r.collection == *c);
        let schema = crate::transform::checks::json_schema(of.clone());
        let left_out: Vec<String> = of
            .filter(|r| r.mostly < 1.0 || matches!(r.rule, crate::transform::checks::Rule::Unique))
            .map(|r| if r.mostly < 1.0 { format!("{} (mostly {})", r.name(), r.mostly) } else { r.name() })
            .collect();
        if !left_out.is_empty() {
            eprintln!(
                "{}.{c}: not in the validator: {} (a unique index says uniqueness; a validator cannot tolerate a share)",
                chosen[0].database(),
                left_out.join("; ")
            );
        }
        let cmd = bson::doc! { "collMod": *c, "validator": { "$jsonSchema": schema }, "validationLevel": "moderate" };
        println!("{}", bson::Bson::Document(cmd).into_relaxed_extjson());
    }
    if collections.is_empty() {
        eprintln!("{service}: no [[quality]] rules declared");
    }
    Ok(ExitCode::SUCCESS)
}

/// `ficus log`: the migration log, oldest first (an unknown service is bad input).
pub(super) async fn log(
    loaded: &Loaded,
    clients: &Clients,
    service: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(s) = service {
        super::select_services(&loaded.services, &[s.to_string()])?;
    }
    let entries = crate::cutover::log::MigrationLog::new(&clients.store()).read(service, limit).await?;
    for e in &entries {
        if json {
            println!("{}", e.to_json());
        } else {
            println!("{}", e.line());
        }
    }
    if entries.is_empty() && !json {
        eprintln!("the migration log is empty{}", service.map_or(String::new(), |s| format!(" for {s}")));
    }
    Ok(ExitCode::SUCCESS)
}

/// `ficus lens check`.
pub(super) async fn lens_check(
    loaded: &Loaded,
    clients: &Clients,
    service: Option<&str>,
    sample: Option<u64>,
) -> anyhow::Result<ExitCode> {
    if let Some(name) = service {
        select_services(&loaded.services, &[name.to_string()])?;
    }
    let (monolith, name) = (clients.monolith(), &loaded.config.source.name);
    let ok = crate::lens::check(&loaded.services, &loaded.topics, &monolith, name, service, sample).await?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `ficus topics apply|check`: the monolith's topics and their dead letters, the pre-images
/// the definitions ask for; and, for each service that can write back, its reverse topics
/// (`<service>.changes`, its dead letters, `<service>.conflicts`) and pre-images on the service
/// collections written back (a delete's routing key, what a replace changed).
pub(super) async fn topics(loaded: &Loaded, clients: &Clients, action: TopicsAction) -> anyhow::Result<ExitCode> {
    let cfg = &loaded.config;
    let admin = TopicAdmin::new(&cfg.kafka).context("creating the Kafka admin client")?;
    let mut bad = 0;
    let reverse: Vec<(String, Topics)> = loaded
        .services
        .iter()
        .filter(|s| !s.written_back().is_empty())
        .map(|s| (s.service().to_string(), Topics::reverse(s.service(), s.written_back(), &cfg.reverse)))
        .collect();
    // One definition per topic (a service's collections share its `.changes`).
    let mut defs: Vec<&TopicDef> = loaded.topics.defs.iter().collect();
    for (_, t) in &reverse {
        defs.extend(t.defs.first());
    }
    for def in &defs {
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
    for def in &defs {
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
    for (service, _) in &reverse {
        let rf = cfg.reverse.replication_factor;
        let topic = crate::config::topics::conflicts_topic(service);
        let report = match action {
            TopicsAction::Apply => admin.apply_conflicts(service, rf).await,
            TopicsAction::Check => admin.inspect_conflicts(service, rf).await.map(|state| crate::bus::TopicReport {
                topic: topic.clone(),
                state,
                created: false,
            }),
        }
        .with_context(|| format!("topic {topic}"))?;
        bad += print_topic(&report);
    }
    // Pre-images where the definitions ask for them, and on both sides of every write-back.
    let monolith = clients.monolith();
    let mut wanted: BTreeSet<&str> =
        loaded.topics.defs.iter().filter(|d| d.pre_images).map(|d| d.collection.as_str()).collect();
    let needs: Vec<_> = loaded.services.iter().map(|s| (s.database(), crate::pre_images::needs(s))).collect();
    wanted.extend(needs.iter().flat_map(|(_, n)| n.monolith.iter().copied()));
    bad += pre_images(&monolith, wanted, action).await?;
    for (db, n) in &needs {
        bad += pre_images(&clients.service(db), n.service.iter().copied(), action).await?;
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

/// Turns pre-images on (apply) or reports where they are off (check); returns the problems.
async fn pre_images<'a>(
    db: &mongodb::Database,
    collections: impl IntoIterator<Item = &'a str>,
    action: TopicsAction,
) -> anyhow::Result<usize> {
    use crate::pre_images::{State, ensure, state};
    let name = db.name();
    let mut bad = 0;
    for coll in collections {
        match (action, state(db, coll).await?) {
            (_, State::On) => {}
            (TopicsAction::Apply, _) => {
                ensure(db, coll).await?;
                println!("enabled  pre-images on {name}.{coll}");
            }
            (TopicsAction::Check, State::Off) => {
                bad += 1;
                println!("DRIFT    pre-images are off on {name}.{coll} (topics apply turns them on)");
            }
            (TopicsAction::Check, State::Missing) => {
                bad += 1;
                println!(
                    "DRIFT    {name}.{coll} does not exist, so it has no pre-images (topics apply creates it with them)"
                );
            }
        }
    }
    Ok(bad)
}

/// `ficus replay`.
pub(super) async fn replay(
    loaded: &Loaded,
    clients: &Clients,
    service: &str,
    in_place: bool,
    from: Option<bson::DateTime>,
) -> anyhow::Result<ExitCode> {
    let chosen = select_services(&loaded.services, &[service.to_string()])?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let r = crate::commands::rebuild::replay(&loaded.config, clients, &chosen[0], in_place, from, &shutdown)
        .await
        .map_err(bad_input)?;
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

/// A command's bad input as such (exit 2); any other error as it is.
fn bad_input(e: CommandError) -> anyhow::Error {
    match e {
        CommandError::BadInput(msg) => anyhow::Error::new(BadInput(msg)),
        e => e.into(),
    }
}

/// `ficus verify`.
pub(super) async fn verify(loaded: &Loaded, clients: &Clients, args: super::VerifyArgs) -> anyhow::Result<ExitCode> {
    use crate::verify::{Check, Verdict};
    let chosen = select_services(&loaded.services, std::slice::from_ref(&args.service))?;
    let checks = match &args.checks {
        None => Check::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
            .map(|c| {
                Check::parse(c).ok_or_else(|| {
                    let known: Vec<&str> = Check::ALL.iter().map(|c| c.name()).collect();
                    anyhow::Error::new(super::BadInput(format!(
                        "--checks: `{c}` is not a check ({})",
                        known.join(", ")
                    )))
                })
            })
            .collect::<anyhow::Result<Vec<Check>>>()?,
    };
    let settle = Duration::from_secs(args.settle);
    let (transforms, monolith) = (&chosen[0], clients.monolith());
    let service_db = clients.service(transforms.database());
    let opts = crate::verify::VerifyOptions {
        sample: args.sample,
        settle,
        rechecks: 1,
        buckets: None,
        quality: checks.contains(&Check::Quality),
        memory_entries: args.memory_entries,
    };
    let run = async {
        let topics = &loaded.topics;
        if transforms.is_redis() {
            // A Redis target: its keys, values and expiry against the transforms (counts and contents).
            let redis = &clients.redis;
            let conn = redis.get().await.map_err(|e| crate::verify::VerifyError::Sink(e.into()))?;
            let name = &loaded.config.source.name;
            let mut report = crate::verify::verify_redis(transforms, topics, &monolith, name, &conn, &opts).await?;
            report.checks = vec![Check::Counts, Check::Contents];
            return Ok(report);
        }
        let source = &loaded.config.source.name;
        let mut report =
            crate::verify::verify(transforms, topics, &monolith, source, &service_db, &clients.store(), &opts).await?;
        if checks.contains(&Check::References) {
            let all = &loaded.services;
            crate::verify::references(&mut report, transforms, all, &service_db, &monolith, settle).await?;
        }
        Ok::<_, crate::verify::VerifyError>(report)
    };
    let mut report = match run.await {
        Ok(r) => r,
        // A server that went away mid-run: nothing was proved either way.
        Err(e) if crate::retry::Classify::is_transient(&e) => {
            eprintln!("{}: inconclusive: {e}", args.service);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "service": args.service, "result": "inconclusive", "error": e.to_string() })
                );
            }
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    report.checks.retain(|c| checks.contains(c));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json(args.gate))?);
    } else {
        print!("{}", report.render());
    }
    Ok(match report.verdict(args.gate) {
        Verdict::Pass => ExitCode::SUCCESS,
        Verdict::Fail => ExitCode::from(1),
        Verdict::Inconclusive => ExitCode::from(3),
    })
}

/// `ficus dlq replay`: the forward direction's dead letters, or (`reverse`) the write-backs'.
pub(super) async fn dlq_replay(
    loaded: &Loaded,
    clients: &Clients,
    service: &str,
    reverse: bool,
) -> anyhow::Result<ExitCode> {
    let chosen = select_services(&loaded.services, &[service.to_string()])?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let report = crate::commands::rebuild::redrive(&loaded.config, clients, &chosen[0], reverse, &shutdown)
        .await
        .map_err(bad_input)?;
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
