//! `ficus cutover`: moves a service's share of ownership.
//!
//! By default the safe way: the state machine of [`crate::cutover::plan`], driven here one
//! step at a time, each step printed as it happens and saved in the store
//! ([`crate::cutover::moves`]) before the next begins, so the same command resumes after a
//! `kill -9`. The I/O of each step:
//!
//! - **preflight**: the lens laws hold on the monolith's documents; the consumers of the
//!   service are live and not stalled (and, moving back, its write-back consumers); the
//!   service's `<service>.changes` topic exists and its database's change stream opens;
//! - **fence**: the moving buckets are marked fenced in the ownership record (epoch + 1);
//! - **drain**: a fence marker is written into the losing side's `_ficus_applied`; its tail
//!   checkpoints past the marker only once Kafka has acknowledged everything before it; the
//!   ends of the losing side's topics at that moment are recorded, and the step waits until
//!   the consumers of the service have committed up to them on every partition. A token in
//!   the stream, never a lag that looks small;
//! - **verify**: every service document in the moving buckets equals the forward transforms
//!   of its monolith document (100%, not the verify gate's share);
//! - **record start**: the gaining side's cluster time, before anything can write there;
//! - **flip**: the share moves (epoch + 1 again), the fence is lifted;
//! - **observe**: lags, echoes and conflicts, and (moving up) the reverse tail following.
//!
//! Exit 0 done, 1 a gate failed (which and why; nothing flipped), 2 bad input.
//!
//! `--force` sets the share at once: the plan's emergency switch (and rollback, `--to 0`). No
//! fencing, no draining, no verification: a write in flight at the moment of the switch may land
//! on the side that no longer owns its key. Such a write is not lost: reverse sync hands on
//! whatever the service wrote while it owned a key, and a write on the non-owner's side is merged
//! field by field, conflicts reported on `<service>.conflicts`. A running `ficus run` follows the
//! change within `reverse.ownership_poll_ms`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bson::{Document, Timestamp, doc};
use mongodb::Database;

use super::{BadInput, Loaded, select_services};
use crate::bus::Reader;
use crate::cutover::moves::{DrainTo, MoveRecord, MoveStore};
use crate::cutover::ownership::{OwnershipSource, OwnershipStore};
use crate::cutover::plan::{Decision, Move, Phase, Side, decide};
use crate::tail::checkpoint::{CheckpointStore, MongoCheckpoints, TailPhase};
use crate::transform::ServiceTransforms;

/// What `ficus cutover` was asked.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub service: String,
    pub to: Option<u8>,
    pub force: bool,
    pub dry_run: bool,
    pub abort: bool,
    /// How long the drain and the observation may wait.
    pub timeout: Duration,
    /// Stop after this step.
    pub until: Option<Phase>,
}

/// A gate that did not pass: exit 1, nothing flipped.
struct Gate {
    step: Phase,
    why: String,
}

/// The connections a move uses.
struct Sides<'a> {
    loaded: &'a Loaded,
    transforms: &'a ServiceTransforms,
    store: Database,
    monolith: Database,
    /// The service's own database.
    service_db: Database,
    ownership: OwnershipSource,
    moves: MoveStore,
}

/// `ficus cutover --service NAME (--to PERCENT [--force] [--dry-run] | --abort)`.
pub(super) async fn cutover(loaded: &Loaded, req: Request) -> anyhow::Result<ExitCode> {
    let chosen = select_services(&loaded.services, std::slice::from_ref(&req.service))?;
    let transforms = chosen[0].as_ref();
    let service = req.service.as_str();
    let problems = transforms.cutover_problems();
    if !problems.is_empty() {
        return Err(bad(format!("{service} cannot take over writes:\n  {}", problems.join("\n  "))));
    }
    if req.to.is_none() && !req.abort {
        return Err(bad("--to PERCENT is required (or --abort)".into()));
    }
    if req.force && (req.abort || req.dry_run) {
        return Err(bad("--force sets a share at once: it goes with neither --abort nor --dry-run".into()));
    }
    let cfg = &loaded.config;
    let store = crate::mongo::connect(&cfg.store.uri, "cutover").await?.database(&cfg.store.db);
    let monolith = crate::mongo::connect(&cfg.source.uri, "cutover").await?.database(&cfg.source.db);
    let services = crate::mongo::connect(&cfg.target_uri, "cutover").await?;
    let sides = Sides {
        loaded,
        transforms,
        ownership: OwnershipSource {
            store: OwnershipStore::new(&store),
            monolith: monolith.clone(),
            services: services.database("admin"),
        },
        moves: MoveStore::new(&store),
        service_db: services.database(transforms.database()),
        store,
        monolith,
    };
    if req.force {
        return forced(&sides, service, req.to.unwrap_or_default()).await;
    }

    let stored = sides.moves.get(service).await?;
    let current = sides.ownership.store.get(service).await?.map_or(0, |o| o.percent);
    let asked = match (req.to, &stored) {
        (Some(to), _) => u16::from(to),
        (None, Some(r)) => u16::from(r.mv.to),
        (None, None) => 0,
    };
    let decision =
        decide(service, current, stored.as_ref().map(|r| &r.mv), asked, req.abort).map_err(|e| bad(e.to_string()))?;
    let record = match decision {
        Decision::Abort { service, back_to, unfence } => {
            if req.dry_run {
                println!(
                    "{service}: --abort would return to {back_to}%{}",
                    if unfence { " and lift the fence" } else { "" }
                );
                return Ok(ExitCode::SUCCESS);
            }
            if unfence {
                let o = sides.ownership.store.set_fence(&service, None).await?;
                println!("{service}: fence lifted (epoch {})", o.epoch);
            }
            sides.moves.forget(&service).await?;
            println!("{service}: move aborted; {back_to}% owned by the service, as before it");
            return Ok(ExitCode::SUCCESS);
        }
        Decision::Start(mv) => {
            println!("{service}: moving from {}% to {}%", mv.from, mv.to);
            MoveRecord::new(mv)
        }
        Decision::Reverse(mv) => {
            println!(
                "{service}: the move had flipped; --abort moves back from {}% to {}% the same way",
                mv.from, mv.to
            );
            MoveRecord::new(mv)
        }
        Decision::Resume(mv) => {
            let mut r = stored.expect("a move to resume is stored");
            r.mv = mv;
            println!(
                "{service}: resuming the move from {}% to {}% at step {}",
                r.mv.from,
                r.mv.to,
                r.mv.next().map_or("-", name)
            );
            r
        }
    };
    if req.dry_run {
        return dry_run(&sides, &record).await;
    }
    match drive(&sides, record, req.timeout, req.until).await? {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(gate) => {
            eprintln!(
                "{service}: the {} gate failed: {}\nnothing flipped; run the same command again once fixed, or add --abort \
                 to return to the share before this move",
                name(gate.step),
                gate.why
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn bad(msg: String) -> anyhow::Error {
    anyhow::Error::new(BadInput(msg))
}

/// A step's name as printed.
fn name(p: Phase) -> &'static str {
    p.name()
}

async fn forced(sides: &Sides<'_>, service: &str, to: u8) -> anyhow::Result<ExitCode> {
    let was = sides.ownership.store.get(service).await?;
    let from = was.as_ref().map_or(0, |o| o.percent);
    eprintln!(
        "WARNING: --force moves ownership of {service} from {from}% to {to}% at once: no fencing, no draining, no \
         verification. Writes in flight now may land on the side that no longer owns their keys; they are merged, \
         and where both sides changed a field the owner's value stands and both go to {service}.conflicts."
    );
    let o = sides.ownership.set(service, to, true).await?;
    // A safe move under way is over: the forced share stands.
    if let Some(r) = sides.moves.get(service).await?
        && r.mv.next().is_some()
    {
        eprintln!("the move from {}% to {}% under way is abandoned", r.mv.from, r.mv.to);
        sides.moves.forget(service).await?;
    }
    let step = o.history.last().expect("a step was just recorded");
    println!(
        "{service}: {to}% (epoch {}), in force from monolith time {}.{} and service time {}.{}",
        o.epoch, step.at_monolith.time, step.at_monolith.increment, step.at_service.time, step.at_service.increment
    );
    Ok(ExitCode::SUCCESS)
}

fn print_plan(mv: &Move) {
    let b = mv.buckets();
    println!(
        "  plan: buckets {}..{} ({} of 100) move from {} to {}; {} is drained to a marker before the flip",
        b.start,
        b.end,
        b.len(),
        mv.losing(),
        mv.gaining(),
        mv.losing()
    );
}

/// `--dry-run`: the plan and the preflight's results; nothing changes.
async fn dry_run(sides: &Sides<'_>, record: &MoveRecord) -> anyhow::Result<ExitCode> {
    print_plan(&record.mv);
    let problems = preflight(sides, &record.mv).await?;
    for p in &problems {
        println!("  preflight: FAIL {p}");
    }
    if problems.is_empty() {
        println!("  preflight: ok");
    }
    println!("dry run: nothing changed");
    Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Runs the move's remaining steps, saving it after each.
async fn drive(
    sides: &Sides<'_>,
    mut record: MoveRecord,
    timeout: Duration,
    until: Option<Phase>,
) -> anyhow::Result<Result<(), Gate>> {
    let service = record.mv.service.clone();
    while let Some(phase) = record.mv.next() {
        let t0 = Instant::now();
        println!("[{}] {}: …", phase_no(phase), name(phase));
        let detail = match phase {
            Phase::Plan => {
                print_plan(&record.mv);
                String::new()
            }
            Phase::Preflight => {
                let problems = preflight(sides, &record.mv).await?;
                if !problems.is_empty() {
                    return Ok(Err(Gate { step: phase, why: problems.join("; ") }));
                }
                "lens laws hold, consumers live, the reverse side can start".into()
            }
            Phase::Fence => {
                let o = sides.ownership.store.set_fence(&service, Some(record.mv.buckets())).await?;
                format!(
                    "buckets {:?} fenced (epoch {}): applications hold writes for their keys",
                    record.mv.buckets(),
                    o.epoch
                )
            }
            Phase::Drain => match drain(sides, &mut record, timeout).await? {
                Ok(d) => d,
                Err(why) => return Ok(Err(Gate { step: phase, why })),
            },
            Phase::Verify => match verify_moving(sides, &record.mv).await? {
                Ok(d) => d,
                Err(why) => return Ok(Err(Gate { step: phase, why })),
            },
            Phase::RecordStart => {
                let db = match record.mv.gaining() {
                    Side::Service => &sides.service_db,
                    Side::Monolith => &sides.monolith,
                };
                let at = crate::mongo::cluster_time(db)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("{} reports no cluster time", record.mv.gaining()))?;
                record.reverse_start = Some(at);
                format!("{} at {}.{}", record.mv.gaining(), at.time, at.increment)
            }
            Phase::Flip => {
                let o = match sides.ownership.store.get(&service).await? {
                    // Flipped before a kill -9 that came before the step was saved: its
                    // times are given if they were not yet, never a second flip.
                    Some(o) if o.percent == record.mv.to && o.fenced.is_none() => {
                        let at = sides.ownership.clocks().await?;
                        sides.ownership.store.resolve(&service, at).await?.unwrap_or(o)
                    }
                    _ => sides.ownership.set(&service, record.mv.to, false).await?,
                };
                let held = record.finished_at(Phase::Fence).map(|t| bson::DateTime::now().saturating_duration_since(t));
                format!(
                    "{} owns buckets {:?}: {}% (epoch {}); writes to them were held {}",
                    record.mv.gaining(),
                    record.mv.buckets(),
                    o.percent,
                    o.epoch,
                    held.map_or("-".into(), |h| format!("{:.1}s (fence → flip)", h.as_secs_f64()))
                )
            }
            Phase::Observe => observe(sides, &record.mv, timeout).await?,
        };
        record.done(phase);
        sides.moves.save(&record).await?;
        let took = t0.elapsed().as_secs_f64();
        if detail.is_empty() {
            println!("[{}] {} done in {took:.1}s", phase_no(phase), name(phase));
        } else {
            println!("[{}] {} done in {took:.1}s: {detail}", phase_no(phase), name(phase));
        }
        if until == Some(phase) && record.mv.next().is_some() {
            println!(
                "{service}: stopped after {} (--until); the same command without --until goes on from there",
                name(phase)
            );
            return Ok(Ok(()));
        }
    }
    let total = bson::DateTime::now().saturating_duration_since(record.started);
    println!("{service}: {}% owned by the service; the move took {:.1}s", record.mv.to, total.as_secs_f64());
    Ok(Ok(()))
}

fn phase_no(p: Phase) -> String {
    let i = Phase::ALL.iter().position(|q| *q == p).unwrap_or(0) + 1;
    format!("{i}/{}", Phase::ALL.len())
}

/// The consumer group and topics that carry the losing side's writes to the gaining side.
fn carriers(transforms: &ServiceTransforms, losing: Side) -> (String, Vec<String>) {
    let service = transforms.service();
    match losing {
        Side::Monolith => (crate::consume::group_id(service), transforms.topics().into_iter().collect()),
        Side::Service => {
            (crate::consume::reverse_group_id(service), vec![crate::config::topics::changes_topic(service)])
        }
    }
}

/// What stops a move before it changes anything (empty: it can go).
async fn preflight(sides: &Sides<'_>, mv: &Move) -> anyhow::Result<Vec<String>> {
    let cfg = &sides.loaded.config;
    let service = mv.service.as_str();
    let mut problems = Vec::new();
    let laws = crate::lens::check(
        &sides.loaded.services,
        &sides.loaded.topics,
        &cfg.source.uri,
        &cfg.source.db,
        &cfg.source.name,
        Some(service),
        None,
    )
    .await?;
    if !laws {
        problems.push(format!("`ficus lens check --service {service}` fails (see above)"));
    }
    let mut groups = vec![crate::consume::group_id(service)];
    if mv.gaining() == Side::Monolith {
        groups.push(crate::consume::reverse_group_id(service));
    }
    for group in groups {
        let members = crate::ops::presence::live_members(&sides.store, &group).await?;
        if members.is_empty() {
            problems.push(format!("group {group} has no live member: is `ficus run` running?"));
        } else if let Some((who, m)) = members.iter().find(|(_, m)| m.stalled.is_some()) {
            problems.push(format!("group {group} is stalled ({who}: {})", m.stalled.as_deref().unwrap_or_default()));
        }
    }
    let changes = crate::config::topics::changes_topic(service);
    let reader = Reader::new(&cfg.kafka, "ficus-cutover", None)?;
    if reader.partitions(&changes)?.is_empty() {
        problems.push(format!("topic {changes} does not exist: run `ficus topics apply`"));
    }
    if let Err(e) = sides.service_db.watch().await {
        problems.push(format!("the change stream of {service} does not open: {}", crate::mongo::describe(&e)));
    }
    Ok(problems)
}

/// Writes the fence marker into the losing side, waits for its tail to checkpoint past it,
/// records the ends of its topics then, and waits for the consumers to commit up to them.
async fn drain(
    sides: &Sides<'_>,
    record: &mut MoveRecord,
    timeout: Duration,
) -> anyhow::Result<Result<String, String>> {
    let cfg = &sides.loaded.config;
    let service = record.mv.service.clone();
    let losing = record.mv.losing();
    let (db, tail) = match losing {
        Side::Monolith => (&sides.monolith, cfg.source.name.clone()),
        Side::Service => (&sides.service_db, service.clone()),
    };
    let deadline = Instant::now() + timeout;
    if record.drain_to.is_empty() {
        let marker = match record.marker {
            Some(m) => m,
            None => {
                let m = write_marker(db, &service, &record.mv).await?;
                record.marker = Some(m);
                sides.moves.save(record).await?;
                m
            }
        };
        let checkpoints = MongoCheckpoints::new(&sides.store);
        loop {
            let at = checkpoints.load(&tail).await?.and_then(|s| match s.phase {
                TailPhase::Stream(p) => Some(p.cluster_time),
                TailPhase::Snapshot(_) => None,
            });
            if at.is_some_and(|t| t >= marker) {
                break;
            }
            if Instant::now() > deadline {
                return Ok(Err(format!(
                    "the tail of {} has not checkpointed past the fence marker (at {}.{}) within {}s: is `ficus run` \
                     running, and its tail healthy?",
                    losing,
                    marker.time,
                    marker.increment,
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Everything before the marker is on Kafka now: below these ends.
        let (_, topics) = carriers(sides.transforms, losing);
        let reader = Reader::new(&cfg.kafka, "ficus-cutover", None)?;
        record.drain_to = reader
            .positions(&topics)?
            .into_iter()
            .map(|p| DrainTo { topic: p.topic, partition: p.partition, offset: p.high })
            .collect();
        sides.moves.save(record).await?;
    }
    let (group, topics) = carriers(sides.transforms, losing);
    let reader = Reader::new(&cfg.kafka, "ficus-cutover", Some(&group))?;
    loop {
        let positions = reader.positions(&topics)?;
        let behind: Vec<String> = record
            .drain_to
            .iter()
            .filter(|d| {
                !positions.iter().any(|p| p.topic == d.topic && p.partition == d.partition && p.consumed_to(d.offset))
            })
            .map(|d| format!("{}[{}] < {}", d.topic, d.partition, d.offset))
            .collect();
        if behind.is_empty() {
            return Ok(Ok(format!(
                "group {group} committed past the fence marker on all {} partitions",
                record.drain_to.len()
            )));
        }
        if Instant::now() > deadline {
            return Ok(Err(format!(
                "group {group} has not committed past the fence marker within {}s on: {}",
                timeout.as_secs(),
                behind.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The fence marker: a write of ficus's own into the losing side's `_ficus_applied`, outside
/// any transaction (its tail reads it as bookkeeping, publishes nothing, and checkpoints past
/// it once everything before it is acknowledged). Returns its cluster time.
async fn write_marker(db: &Database, service: &str, mv: &Move) -> anyhow::Result<Timestamp> {
    let mut session = db.client().start_session().await?;
    db.collection::<Document>(crate::source::MARKERS)
        .update_one(
            doc! { "_id": format!("{service}/fence") },
            doc! { "$set": { "fence": { "from": i32::from(mv.from), "to": i32::from(mv.to) }, "at": bson::DateTime::now() } },
        )
        .upsert(true)
        .session(&mut session)
        .await?;
    session
        .operation_time()
        .ok_or_else(|| anyhow::anyhow!("no operation time for the fence marker: is it a replica set?"))
}

/// Every service document in the moving buckets against the forward transforms.
async fn verify_moving(sides: &Sides<'_>, mv: &Move) -> anyhow::Result<Result<String, String>> {
    let cfg = &sides.loaded.config;
    let opts = crate::verify::VerifyOptions { sample: 10, settle: Duration::from_secs(2), buckets: Some(mv.buckets()) };
    let report = crate::verify::verify(
        sides.transforms,
        &sides.loaded.topics,
        &sides.monolith,
        &cfg.source.name,
        &sides.service_db,
        &sides.store,
        &opts,
    )
    .await?;
    let checked: u64 = report.collections.values().map(|t| t.expected).sum();
    if report.exact() {
        Ok(Ok(format!("{checked} documents in the moving buckets equal the forward transforms of the monolith")))
    } else {
        Ok(Err(format!("the moving buckets differ from the monolith:\n{}", report.render())))
    }
}

/// Lags, echoes and conflicts after the flip; moving up, waits for the reverse tail to follow.
async fn observe(sides: &Sides<'_>, mv: &Move, timeout: Duration) -> anyhow::Result<String> {
    let cfg = &sides.loaded.config;
    let service = mv.service.as_str();
    let mut parts = Vec::new();
    if mv.to > 0 {
        let checkpoints = MongoCheckpoints::new(&sides.store);
        let deadline = Instant::now() + timeout.min(Duration::from_secs(60));
        let following = loop {
            if checkpoints.load(service).await?.is_some() {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        parts.push(if following {
            "reverse tail following".to_string()
        } else {
            "WARNING: the reverse tail has not started (is `ficus run` running with the reverse role?)".to_string()
        });
    }
    let (fg, ft) = carriers(sides.transforms, Side::Monolith);
    let (rg, rt) = carriers(sides.transforms, Side::Service);
    for (what, group, topics) in [("forward", fg, ft), ("write-back", rg, rt)] {
        match crate::status::group_lag(&cfg.kafka, &group, &topics) {
            Ok(g) => parts.push(format!("{what} lag {}", g.lag)),
            Err(e) => parts.push(format!("{what} lag unknown ({e})")),
        }
    }
    let echoes = sides
        .service_db
        .collection::<Document>(crate::sink::ECHOES)
        .find_one(doc! { "_id": service })
        .await?
        .and_then(|d| d.get_i64("skipped").ok())
        .unwrap_or(0);
    parts.push(format!("{echoes} echoes skipped"));
    Ok(parts.join(", "))
}
