//! The cutover executor (`ficus cutover`): moves a service's share of ownership, reporting each
//! step through the caller's callback and returning a typed [`Outcome`]; the binary prints.
//!
//! By default the safe way: the state machine of [`crate::cutover::plan`], driven here one
//! step at a time, each step reported as it happens and saved in the store
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
//! Outcomes: done; a gate failed (which and why; nothing flipped); bad input is an error.
//!
//! `--force` sets the share at once: the plan's emergency switch (and rollback, `--to 0`). No
//! fencing, no draining, no verification: a write in flight at the moment of the switch may land
//! on the side that no longer owns its key. Such a write is not lost: reverse sync hands on
//! whatever the service wrote while it owned a key, and a write on the non-owner's side is merged
//! field by field, conflicts reported on `<service>.conflicts`. A running `ficus run` follows the
//! change within `reverse.ownership_poll_ms`.

use std::time::{Duration, Instant};

use mongodb::Database;

pub(super) mod lock;
mod steps;

use self::lock::{MOVE_LOCK_TTL, MoveLock};
use self::steps::{carriers, drain, earlier, flip, observe, preflight, verify_moving, wait_held};
use super::Event;
use crate::clients::Clients;
use crate::config::Config;
use crate::cutover::feed::OwnershipSource;
use crate::cutover::log::{Entry, Kind, MigrationLog};
use crate::cutover::moves::{MoveRecord, MoveStore};
use crate::cutover::ownership::OwnershipStore;
use crate::cutover::plan::{Decision, Move, Phase, Side, decide};
use crate::cutover::views::{self, Seen, Viewer};
use crate::daemon::Definitions;
use crate::transform::ServiceTransforms;

/// What `ficus cutover` was asked.
#[derive(Debug, Clone)]
pub struct Request {
    pub service: String,
    pub to: Option<u8>,
    pub force: bool,
    pub dry_run: bool,
    pub abort: bool,
    /// The emergency move: fenced and drained like every safe move (no write in flight is
    /// lost), but neither the lens laws nor the moving buckets are checked first.
    pub emergency: bool,
    /// How long the drain and the observation may wait.
    pub timeout: Duration,
    /// Stop after this step.
    pub until: Option<Phase>,
}

/// A gate that did not pass: nothing flipped.
#[derive(Debug)]
pub struct Gate {
    pub step: Phase,
    pub why: String,
}

/// The connections a move uses.
struct Sides<'a> {
    config: &'a Config,
    definitions: &'a Definitions,
    progress: &'a (dyn Fn(Event<'_>) + Sync),
    transforms: &'a ServiceTransforms,
    store: Database,
    monolith: Database,
    /// The service's own database.
    service_db: Database,
    ownership: OwnershipSource,
    moves: MoveStore,
    log: MigrationLog,
}

/// How a cutover command ended (errors aside).
#[derive(Debug)]
pub enum Outcome {
    /// The move, switch or abort is done (or stopped where `--until` asked).
    Done,
    /// A gate failed: nothing flipped.
    GateFailed(Gate),
    /// The abort took the move back, but the record or the pipelines are not as they should be.
    AbortIncomplete(Vec<String>),
    /// A dry run: what the preflight found (empty: the move can go).
    DryRun(Vec<String>),
}

/// Why a cutover command stopped.
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    /// What was asked cannot be done: the service, the share, the flags, another move under way.
    #[error("{0}")]
    BadInput(String),
    /// The state changed under the command (a record lifted or gone, the move lock lost).
    #[error("{0}")]
    State(String),
    #[error("MongoDB: {}", crate::mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error(transparent)]
    Ownership(#[from] crate::cutover::ownership::OwnershipError),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    Checkpoint(#[from] crate::tail::checkpoint::CheckpointError),
    #[error(transparent)]
    Lens(#[from] crate::lens::LensError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
}

impl Sides<'_> {
    fn say(&self, line: String) {
        (self.progress)(Event::Info(&line));
    }

    fn warn(&self, line: String) {
        (self.progress)(Event::Warning(&line));
    }

    /// Appends to the migration log; a failure is the operator's to know, never the move's.
    async fn log(&self, entry: Entry) {
        if let Err(e) = self.log.append(&entry).await {
            self.warn(format!("the migration log did not take \"{}\": {}", entry.line(), crate::mongo::describe(&e)));
        }
    }
}

/// `ficus cutover --service NAME (--to PERCENT [--force] [--dry-run] | --abort)`: the move asked,
/// each step reported through `progress` as it happens.
pub async fn cutover(
    config: &Config,
    definitions: &Definitions,
    clients: &Clients,
    req: Request,
    progress: &(dyn Fn(Event<'_>) + Sync),
) -> Result<Outcome, CutoverError> {
    let chosen = definitions.select(std::slice::from_ref(&req.service)).map_err(|e| bad(e.to_string()))?;
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
    if req.emergency && (req.force || req.abort || req.to.is_none()) {
        return Err(bad(
            "--emergency is a move to a share: it goes with --to, and with neither --force nor --abort".into()
        ));
    }
    let (store, monolith) = (clients.store(), clients.monolith());
    let sides = Sides {
        config,
        definitions,
        progress,
        transforms,
        ownership: OwnershipSource {
            store: OwnershipStore::new(&store),
            store_db: store.clone(),
            monolith: monolith.clone(),
            services: clients.service("admin"),
        },
        moves: MoveStore::new(&store),
        log: MigrationLog::new(&store),
        service_db: clients.service(transforms.database()),
        store,
        monolith,
    };
    if req.dry_run {
        return moved(&sides, service, &req, None).await;
    }
    // One command drives a service's move at a time.
    let lock = match MoveLock::take(&sides.store, service, sides.progress).await? {
        Ok(lock) => lock,
        Err(holder) => {
            return Err(bad(format!(
                "another `ficus cutover` ({holder}) is moving {service} now: wait for it to finish, or stop it (the \
                 lock of a killed one is taken over at once on its host, elsewhere within {}s)",
                MOVE_LOCK_TTL.as_secs()
            )));
        }
    };
    let outcome = moved(&sides, service, &req, Some(&lock)).await;
    lock.release().await;
    outcome
}

/// The move itself, under the service's move lock.
async fn moved(
    sides: &Sides<'_>,
    service: &str,
    req: &Request,
    lock: Option<&MoveLock>,
) -> Result<Outcome, CutoverError> {
    if req.force {
        return forced(sides, service, req.to.unwrap_or_default()).await;
    }
    let ownership = sides.ownership.store.get(service).await?;
    let (current, fenced, pending) =
        ownership.as_ref().map_or((0, false, false), |o| (o.percent, o.fenced.is_some(), o.pending()));
    let stored = sides.moves.get(service).await?.map(|mut r| {
        r.mv = r.mv.clone().reconciled(current, fenced, pending);
        r
    });
    if req.abort && stored.as_ref().is_none_or(|r| r.mv.next().is_none()) && pending {
        // A forced switch cut short: nothing but its pending step to take back.
        return abort(sides, service, current, req.dry_run).await;
    }
    let asked = match (req.to, &stored) {
        (Some(to), _) => u16::from(to),
        (None, Some(r)) => u16::from(r.mv.to),
        (None, None) => 0,
    };
    let decision =
        decide(service, current, stored.as_ref().map(|r| &r.mv), asked, req.abort).map_err(|e| bad(e.to_string()))?;
    let record = match decision {
        Decision::Abort { service, back_to, .. } => return abort(sides, &service, back_to, req.dry_run).await,
        Decision::Start(mv) => {
            sides.say(format!("{service}: moving from {}% to {}%", mv.from, mv.to));
            MoveRecord::new(mv)
        }
        Decision::Reverse(mv) => {
            sides.say(format!(
                "{service}: the move had flipped; --abort moves back from {}% to {}% the same way",
                mv.from, mv.to
            ));
            MoveRecord::new(mv)
        }
        Decision::Resume(mv) => {
            let mut r = stored.expect("a move to resume is stored");
            r.mv = mv;
            sides.say(format!(
                "{service}: resuming the move from {}% to {}% at step {}",
                r.mv.from,
                r.mv.to,
                r.mv.next().map_or("-", name)
            ));
            r
        }
    };
    let mut record = record;
    if req.emergency && !record.emergency {
        record.emergency = true;
        sides.warn(format!(
            "{service}: --emergency: the move is fenced and drained (no write in flight is lost), but neither the lens \
             laws nor the moving buckets are checked; run `ficus verify --service {service}` once it is done"
        ));
    }
    if req.dry_run {
        return dry_run(sides, &record).await;
    }
    let resumed = record.mv.next() != Some(Phase::Plan);
    let what = if record.emergency { "emergency move" } else { "safe move" };
    let detail = match record.mv.next() {
        Some(p) if resumed => format!("{what}, resumed at {}", name(p)),
        _ => what.to_string(),
    };
    sides.log(Entry::now(service, Kind::MoveStarted, record.mv.from, record.mv.to, detail)).await;
    match drive(sides, record, req.timeout, req.until, lock).await? {
        Ok(()) => Ok(Outcome::Done),
        Err(gate) => Ok(Outcome::GateFailed(gate)),
    }
}

/// `--abort` of a move that has not flipped (or of a forced switch cut short): takes back a
/// pending flip, lifts the fence and forgets the move. Exit 0 only once the record is back at
/// `back_to`, unfenced, nothing pending, and the service's pipelines are flowing (live members,
/// none stalled); 1 otherwise, saying what is not.
async fn abort(sides: &Sides<'_>, service: &str, back_to: u8, dry_run: bool) -> Result<Outcome, CutoverError> {
    if dry_run {
        sides.say(format!("{service}: --abort would return to {back_to}%, unfenced, with nothing pending"));
        return Ok(Outcome::DryRun(vec![]));
    }
    if let Some(o) = sides.ownership.store.undo_pending(service).await?
        && !o.pending()
    {
        sides.say(format!("{service}: the flip under way taken back (epoch {})", o.epoch));
    }
    let o = sides.ownership.store.set_fence(service, None).await?;
    sides.say(format!("{service}: fence lifted (epoch {})", o.epoch));
    sides.moves.forget(service).await?;
    let mut problems = Vec::new();
    if o.percent != back_to || o.fenced.is_some() || o.pending() {
        problems.push(format!(
            "the ownership record is at {}%{}{}, not {back_to}% unfenced",
            o.percent,
            if o.fenced.is_some() { ", fenced" } else { "" },
            if o.pending() { ", a change pending" } else { "" }
        ));
    }
    // The write-back consumers run once the service has owned keys.
    let sides_flowing: &[Side] = if o.ever_owned() { &[Side::Monolith, Side::Service] } else { &[Side::Monolith] };
    problems.extend(pipelines_stopped(sides, sides_flowing).await?);
    let detail = if problems.is_empty() { "unfenced, nothing pending".to_string() } else { problems.join("; ") };
    sides.log(Entry::now(service, Kind::Aborted, o.percent, back_to, detail)).await;
    if problems.is_empty() {
        sides.say(format!(
            "{service}: move aborted; {back_to}% owned by the service, as before it, and its pipelines flowing"
        ));
        Ok(Outcome::Done)
    } else {
        Ok(Outcome::AbortIncomplete(problems))
    }
}

/// What stops the consumers carrying a service's changes from each side (no live member, a
/// stalled group); empty when they flow.
async fn pipelines_stopped(sides: &Sides<'_>, from: &[Side]) -> Result<Vec<String>, CutoverError> {
    let mut problems = Vec::new();
    for side in from {
        let (group, _) = carriers(sides.transforms, *side);
        let members = crate::ops::presence::live_members(&sides.store, &group).await?;
        if members.is_empty() {
            problems.push(format!("group {group} has no live member: is `ficus run` running?"));
        } else if let Some((who, m)) = members.iter().find(|(_, m)| m.stalled.is_some()) {
            problems.push(format!("group {group} is stalled ({who}: {})", m.stalled.as_deref().unwrap_or_default()));
        }
    }
    Ok(problems)
}

/// Added to the wait of a forced switch for a process that does not acknowledge it.
const SWITCH_MARGIN: Duration = Duration::from_secs(5);

fn bad(msg: String) -> CutoverError {
    CutoverError::BadInput(msg)
}

/// A step's name as printed.
fn name(p: Phase) -> &'static str {
    p.name()
}

/// `--force`: the share set at once, in the record's two steps (pending, then in force with its
/// times; see `cutover::ownership`). A pending step left by a switch or a flip cut short is
/// finished when it asks for the same share, and taken back first otherwise.
async fn forced(sides: &Sides<'_>, service: &str, to: u8) -> Result<Outcome, CutoverError> {
    let was = sides.ownership.store.get(service).await?;
    let from = was.as_ref().map_or(0, |o| o.percent);
    sides.warn(format!(
        "WARNING: --force moves ownership of {service} from {from}% to {to}% at once: no fencing, no draining, no \
         verification. Writes made on the side that no longer owns their keys (applications acting on an older \
         view) are merged, and where both sides changed a field the owner's value stands on both sides and both \
         go to {service}.conflicts."
    ));
    let pending = was.as_ref().and_then(|o| o.history.iter().find(|s| s.pending)).map(|s| s.percent);
    if pending.is_some_and(|p| p != to) {
        sides.ownership.store.undo_pending(service).await?;
    }
    if pending != Some(to) {
        sides.ownership.store.begin(service, to, true).await?;
    }
    // Every batch a ficus process judged before the pending step lands before the switch, or
    // never (see `cutover::views::switch_held`).
    let stored = sides.ownership.store.get(service).await?;
    let step = stored.as_ref().and_then(|o| o.history.iter().find(|s| s.pending).cloned());
    if let (Some(o), Some(step)) = (&stored, step) {
        let cfg = &sides.config;
        let bound = cfg.cutover.transaction_lifetime + cfg.consume.judgement_max_age + SWITCH_MARGIN;
        let decide = |seen: &[Seen], now| views::switch_held(seen, o.revision, step.set_at, now, bound);
        let t0 = Instant::now();
        let (acknowledged, by_age) =
            wait_held(sides, Viewer::Ficus, service, earlier(step.set_at, bound), decide).await?;
        sides.say(format!(
            "{service}: {} ficus process(es) acknowledged the switch in {:.1}s{}",
            acknowledged.len(),
            t0.elapsed().as_secs_f64(),
            if by_age { " (some did not: waited until no batch judged before it can commit)" } else { "" }
        ));
    }
    crate::failpoint::hit("cutover.force.pending");
    let at = sides.ownership.clocks().await?;
    let o = sides
        .ownership
        .store
        .resolve(service, at)
        .await?
        .ok_or_else(|| CutoverError::State(format!("{service}: no ownership record")))?;
    // A safe move under way is over: the forced share stands.
    if let Some(r) = sides.moves.get(service).await?
        && r.mv.next().is_some()
    {
        sides.warn(format!("the move from {}% to {}% under way is abandoned", r.mv.from, r.mv.to));
        sides.moves.forget(service).await?;
    }
    let step = o.history.last().expect("a step was just recorded");
    let detail = format!("no fence, no drain, no verification (epoch {})", o.epoch);
    sides.log(Entry::now(service, Kind::Forced, from, to, detail)).await;
    sides.say(format!(
        "{service}: {to}% (epoch {}), in force from monolith time {}.{} and service time {}.{}",
        o.epoch, step.at_monolith.time, step.at_monolith.increment, step.at_service.time, step.at_service.increment
    ));
    Ok(Outcome::Done)
}

fn print_plan(sides: &Sides<'_>, mv: &Move) {
    let b = mv.buckets();
    sides.say(format!(
        "  plan: buckets {}..{} ({} of 100) move from {} to {}; {} is drained to a marker before the flip",
        b.start,
        b.end,
        b.len(),
        mv.losing(),
        mv.gaining(),
        mv.losing()
    ));
}

/// `--dry-run`: the plan and the preflight's results; nothing changes.
async fn dry_run(sides: &Sides<'_>, record: &MoveRecord) -> Result<Outcome, CutoverError> {
    print_plan(sides, &record.mv);
    let problems = preflight(sides, &record.mv, !record.emergency).await?;
    Ok(Outcome::DryRun(problems))
}

/// Runs the move's remaining steps, saving it after each.
async fn drive(
    sides: &Sides<'_>,
    mut record: MoveRecord,
    timeout: Duration,
    until: Option<Phase>,
    lock: Option<&MoveLock>,
) -> Result<Result<(), Gate>, CutoverError> {
    let service = record.mv.service.clone();
    while let Some(phase) = record.mv.next() {
        if let Some(lock) = lock {
            lock.check()?;
        }
        let t0 = Instant::now();
        (sides.progress)(Event::Step(phase));
        let (from, to) = (record.mv.from, record.mv.to);
        let detail = match step(sides, &mut record, phase, timeout).await? {
            Ok(detail) => detail,
            Err(why) => {
                let entry = Entry::now(&service, Kind::GateFailed, from, to, why.clone());
                sides.log(entry.step(name(phase)).took(t0.elapsed())).await;
                return Ok(Err(Gate { step: phase, why }));
            }
        };
        record.done(phase);
        sides.moves.save(&record).await?;
        let took = t0.elapsed();
        sides.log(Entry::now(&service, Kind::Step, from, to, detail.clone()).step(name(phase)).took(took)).await;
        (sides.progress)(Event::StepDone { phase, took, detail: &detail });
        if until == Some(phase) && record.mv.next().is_some() {
            sides.say(format!(
                "{service}: stopped after {} (--until); the same command without --until goes on from there",
                name(phase)
            ));
            return Ok(Ok(()));
        }
    }
    let total = bson::DateTime::now().saturating_duration_since(record.started);
    let (from, to) = (record.mv.from, record.mv.to);
    let detail = if record.emergency { "emergency move: run `ficus verify`" } else { "fenced, drained, verified" };
    sides.log(Entry::now(&service, Kind::MoveDone, from, to, detail).took(total)).await;
    sides.say(format!("{service}: {}% owned by the service; the move took {:.1}s", record.mv.to, total.as_secs_f64()));
    Ok(Ok(()))
}

/// Runs one step: `Ok(detail)` to print, or `Err(why)` a gate failed.
async fn step(
    sides: &Sides<'_>,
    record: &mut MoveRecord,
    phase: Phase,
    timeout: Duration,
) -> Result<Result<String, String>, CutoverError> {
    let service = record.mv.service.clone();
    Ok(Ok(match phase {
        Phase::Plan => {
            print_plan(sides, &record.mv);
            String::new()
        }
        Phase::Preflight => {
            let problems = preflight(sides, &record.mv, !record.emergency).await?;
            if !problems.is_empty() {
                return Ok(Err(problems.join("; ")));
            }
            if record.emergency {
                "consumers live, the reverse side can start (lens laws not checked: --emergency)".into()
            } else {
                "lens laws hold, consumers live, the reverse side can start".into()
            }
        }
        Phase::Fence => {
            let o = sides.ownership.store.set_fence(&service, Some((record.mv.buckets(), record.mv.losing()))).await?;
            let fence =
                o.fenced.ok_or_else(|| CutoverError::State(format!("{service}: the fence vanished as it was set")))?;
            let max_age = sides.config.cutover.view_max_age;
            let decide = |seen: &[Seen], now| views::fence_held(seen, fence.epoch, fence.set_at, now, max_age);
            let since = earlier(fence.set_at, max_age);
            let (acknowledged, by_age) = wait_held(sides, Viewer::App, &service, since, decide).await?;
            let waited = bson::DateTime::now().saturating_duration_since(fence.set_at).as_secs_f64();
            let who = if acknowledged.is_empty() { "no application".to_string() } else { acknowledged.join(", ") };
            format!(
                "buckets {:?} fenced (epoch {}): applications hold writes for their keys; acknowledged by {who}{} \
                 after {waited:.1}s",
                record.mv.buckets(),
                o.epoch,
                if by_age { format!(" (waited the longest view age, {}s)", max_age.as_secs()) } else { String::new() }
            )
        }
        Phase::Drain => return drain(sides, record, timeout).await,
        Phase::Verify if record.emergency => "skipped (--emergency): run `ficus verify` once the move is done".into(),
        Phase::Verify => return verify_moving(sides, &record.mv).await,
        Phase::RecordStart => {
            let db = match record.mv.gaining() {
                Side::Service => &sides.service_db,
                Side::Monolith => &sides.monolith,
            };
            let at = crate::mongo::cluster_time(db)
                .await?
                .ok_or_else(|| CutoverError::State(format!("{} reports no cluster time", record.mv.gaining())))?;
            record.reverse_start = Some(at);
            format!("{} at {}.{}", record.mv.gaining(), at.time, at.increment)
        }
        Phase::Flip => {
            let o = flip(sides, &record.mv).await?;
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
    }))
}
