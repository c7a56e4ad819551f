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
use crate::clients::Clients;
use crate::cutover::feed::OwnershipSource;
use crate::cutover::moves::{DrainTo, MoveRecord, MoveStore};
use crate::cutover::ownership::{Drain, Ownership, OwnershipStore};
use crate::cutover::plan::{Decision, Move, Phase, Side, decide};
use crate::cutover::views::{self, Held, Seen, Viewer, Views};
use crate::tail::checkpoint::{CheckpointStore, MongoCheckpoints, TailPhase};
use crate::tail::lease::Lease;
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
pub(super) async fn cutover(loaded: &Loaded, clients: &Clients, req: Request) -> anyhow::Result<ExitCode> {
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
    let (store, monolith) = (clients.store(), clients.monolith());
    let sides = Sides {
        loaded,
        transforms,
        ownership: OwnershipSource {
            store: OwnershipStore::new(&store),
            store_db: store.clone(),
            monolith: monolith.clone(),
            services: clients.service("admin"),
        },
        moves: MoveStore::new(&store),
        service_db: clients.service(transforms.database()),
        store,
        monolith,
    };
    if req.dry_run {
        return moved(&sides, service, &req, None).await;
    }
    // One command drives a service's move at a time.
    let lock = match MoveLock::take(&sides.store, service).await? {
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
async fn moved(sides: &Sides<'_>, service: &str, req: &Request, lock: Option<&MoveLock>) -> anyhow::Result<ExitCode> {
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
        return dry_run(sides, &record).await;
    }
    match drive(sides, record, req.timeout, req.until, lock).await? {
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

/// `--abort` of a move that has not flipped (or of a forced switch cut short): takes back a
/// pending flip, lifts the fence and forgets the move. Exit 0 only once the record is back at
/// `back_to`, unfenced, nothing pending, and the service's pipelines are flowing (live members,
/// none stalled); 1 otherwise, saying what is not.
async fn abort(sides: &Sides<'_>, service: &str, back_to: u8, dry_run: bool) -> anyhow::Result<ExitCode> {
    if dry_run {
        println!("{service}: --abort would return to {back_to}%, unfenced, with nothing pending");
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(o) = sides.ownership.store.undo_pending(service).await?
        && !o.pending()
    {
        println!("{service}: the flip under way taken back (epoch {})", o.epoch);
    }
    let o = sides.ownership.store.set_fence(service, None).await?;
    println!("{service}: fence lifted (epoch {})", o.epoch);
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
    if problems.is_empty() {
        println!("{service}: move aborted; {back_to}% owned by the service, as before it, and its pipelines flowing");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{service}: move aborted, but: {}", problems.join("; "));
        Ok(ExitCode::from(1))
    }
}

/// What stops the consumers carrying a service's changes from each side (no live member, a
/// stalled group); empty when they flow.
async fn pipelines_stopped(sides: &Sides<'_>, from: &[Side]) -> anyhow::Result<Vec<String>> {
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

/// How long a `ficus cutover`'s move lock lives unrenewed (it is renewed every third of it).
const MOVE_LOCK_TTL: Duration = Duration::from_secs(15);

/// The lock of one service's moves: the command driving a move holds it (a lease in
/// `<store.db>.leases`, `cutover/<service>`), so two commands never run one move's steps
/// together. A holder killed on this host is taken over at once; elsewhere once it expires.
struct MoveLock {
    lease: Lease,
    epoch: i64,
    renewal: tokio::task::JoinHandle<()>,
    lost: tokio_util::sync::CancellationToken,
}

impl MoveLock {
    /// Takes the lock, or names its live holder.
    async fn take(store: &Database, service: &str) -> anyhow::Result<Result<MoveLock, String>> {
        let host = crate::config::host_name();
        let holder = format!("{host}:{}", std::process::id());
        let name = format!("cutover/{service}");
        let lease = Lease::new(store, &name, &holder, MOVE_LOCK_TTL);
        let epoch = match lease.try_acquire().await? {
            Some(epoch) => epoch,
            None => {
                let held = store.collection::<Document>("leases").find_one(doc! { "_id": &name }).await?;
                let by = held.as_ref().and_then(|d| d.get_str("holder").ok()).unwrap_or("?").to_string();
                let gone = by
                    .rsplit_once(':')
                    .filter(|(h, _)| *h == host)
                    .and_then(|(_, pid)| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !crate::ops::presence::process_alive(pid));
                match lease.take_over(&by).await? {
                    Some(epoch) if gone => {
                        println!("{service}: took over the move lock of {by}, which is gone");
                        epoch
                    }
                    _ => return Ok(Err(by)),
                }
            }
        };
        let lost = tokio_util::sync::CancellationToken::new();
        let renewal = tokio::spawn({
            let (lease, lost) = (lease.clone(), lost.clone());
            async move {
                loop {
                    tokio::time::sleep(MOVE_LOCK_TTL / 3).await;
                    if !matches!(lease.renew(epoch).await, Ok(true)) {
                        lost.cancel();
                        return;
                    }
                }
            }
        });
        Ok(Ok(MoveLock { lease, epoch, renewal, lost }))
    }

    /// Fails once the lock was lost (this command paused past its life, and another took it).
    fn check(&self) -> anyhow::Result<()> {
        if self.lost.is_cancelled() {
            anyhow::bail!(
                "lost the move lock (this command was paused or cut off for over {}s); another command may be driving the move now",
                MOVE_LOCK_TTL.as_secs()
            );
        }
        Ok(())
    }

    async fn release(self) {
        self.renewal.abort();
        let _ = self.lease.release(self.epoch).await;
    }
}

fn bad(msg: String) -> anyhow::Error {
    anyhow::Error::new(BadInput(msg))
}

/// A step's name as printed.
fn name(p: Phase) -> &'static str {
    p.name()
}

/// `--force`: the share set at once, in the record's two steps (pending, then in force with its
/// times; see `cutover::ownership`). A pending step left by a switch or a flip cut short is
/// finished when it asks for the same share, and taken back first otherwise.
async fn forced(sides: &Sides<'_>, service: &str, to: u8) -> anyhow::Result<ExitCode> {
    let was = sides.ownership.store.get(service).await?;
    let from = was.as_ref().map_or(0, |o| o.percent);
    eprintln!(
        "WARNING: --force moves ownership of {service} from {from}% to {to}% at once: no fencing, no draining, no \
         verification. Writes made on the side that no longer owns their keys (applications acting on an older \
         view) are merged, and where both sides changed a field the owner's value stands on both sides and both \
         go to {service}.conflicts."
    );
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
        let cfg = &sides.loaded.config;
        let bound = cfg.cutover.transaction_lifetime + cfg.consume.judgement_max_age + SWITCH_MARGIN;
        let decide = |seen: &[Seen], now| views::switch_held(seen, o.revision, step.set_at, now, bound);
        let t0 = Instant::now();
        let (acknowledged, by_age) =
            wait_held(sides, Viewer::Ficus, service, earlier(step.set_at, bound), decide).await?;
        println!(
            "{service}: {} ficus process(es) acknowledged the switch in {:.1}s{}",
            acknowledged.len(),
            t0.elapsed().as_secs_f64(),
            if by_age { " (some did not: waited until no batch judged before it can commit)" } else { "" }
        );
    }
    crate::failpoint::hit("cutover.force.pending");
    let at = sides.ownership.clocks().await?;
    let o = sides
        .ownership
        .store
        .resolve(service, at)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{service}: no ownership record"))?;
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
    lock: Option<&MoveLock>,
) -> anyhow::Result<Result<(), Gate>> {
    let service = record.mv.service.clone();
    while let Some(phase) = record.mv.next() {
        if let Some(lock) = lock {
            lock.check()?;
        }
        let t0 = Instant::now();
        println!("[{}] {}: …", phase_no(phase), name(phase));
        let detail = match step(sides, &mut record, phase, timeout).await? {
            Ok(detail) => detail,
            Err(why) => return Ok(Err(Gate { step: phase, why })),
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

/// Runs one step: `Ok(detail)` to print, or `Err(why)` a gate failed.
async fn step(
    sides: &Sides<'_>,
    record: &mut MoveRecord,
    phase: Phase,
    timeout: Duration,
) -> anyhow::Result<Result<String, String>> {
    let service = record.mv.service.clone();
    Ok(Ok(match phase {
        Phase::Plan => {
            print_plan(&record.mv);
            String::new()
        }
        Phase::Preflight => {
            let problems = preflight(sides, &record.mv).await?;
            if !problems.is_empty() {
                return Ok(Err(problems.join("; ")));
            }
            "lens laws hold, consumers live, the reverse side can start".into()
        }
        Phase::Fence => {
            let o = sides.ownership.store.set_fence(&service, Some((record.mv.buckets(), record.mv.losing()))).await?;
            let fence = o.fenced.ok_or_else(|| anyhow::anyhow!("{service}: the fence vanished as it was set"))?;
            let max_age = sides.loaded.config.cutover.view_max_age;
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
        Phase::Verify => return verify_moving(sides, &record.mv).await,
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

/// Waits until the readers of the service's ownership of a kind (applications, or ficus's
/// processes) have acknowledged what `decide` asks, printing who is awaited now and then;
/// returns who acknowledged and whether it ended by the age bound.
async fn wait_held(
    sides: &Sides<'_>,
    reader: Viewer,
    service: &str,
    since: bson::DateTime,
    decide: impl Fn(&[Seen], bson::DateTime) -> Held,
) -> anyhow::Result<(Vec<String>, bool)> {
    let registry = Views::new(&sides.store);
    let mut told = Instant::now() - Duration::from_secs(60);
    let host = crate::config::host_name();
    loop {
        let mut seen = registry.of(reader, service, since).await?;
        // A ficus process of this host that is gone (SIGKILL) acknowledges nothing, and has no
        // batch left to commit: not waited on (one elsewhere is, up to the bound).
        if reader == Viewer::Ficus {
            seen.retain(|s| {
                let pid = s.instance.rsplit_once(':').filter(|(h, _)| *h == host).and_then(|(_, p)| p.parse().ok());
                pid.is_none_or(crate::ops::presence::process_alive)
            });
        }
        match decide(&seen, bson::DateTime::now()) {
            Held::Yes { acknowledged, by_age } => return Ok((acknowledged, by_age)),
            Held::Waiting { missing } if told.elapsed() > Duration::from_secs(5) => {
                println!("  waiting for {} to acknowledge: {}", reader_name(reader), missing.join(", "));
                told = Instant::now();
            }
            Held::Waiting { .. } => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `d` before `t`.
fn earlier(t: bson::DateTime, d: Duration) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis().saturating_sub(d.as_millis().min(i64::MAX as u128) as i64))
}

fn reader_name(r: Viewer) -> &'static str {
    match r {
        Viewer::App => "applications",
        Viewer::Ficus => "ficus processes",
    }
}

/// The flip: the new share stored pending, then in force with its times and the fence lifted,
/// each one write (see `cutover::ownership`). A flip cut short is finished, never done twice.
async fn flip(sides: &Sides<'_>, mv: &Move) -> anyhow::Result<Ownership> {
    let service = mv.service.as_str();
    let current = sides.ownership.store.get(service).await?;
    let pending = current.as_ref().and_then(|o| o.history.iter().find(|s| s.pending)).map(|s| s.percent);
    match (&current, pending) {
        (Some(o), None) if o.percent == mv.to && o.fenced.is_none() => return Ok(o.clone()),
        (_, Some(p)) if p == mv.to => {}
        (_, Some(_)) => {
            sides.ownership.store.undo_pending(service).await?;
            sides.ownership.store.begin(service, mv.to, false).await?;
        }
        (_, None) => {
            sides.ownership.store.begin(service, mv.to, false).await?;
        }
    }
    crate::failpoint::hit("cutover.flip.pending");
    let at = sides.ownership.clocks().await?;
    let o = sides.ownership.store.resolve(service, at).await?;
    o.ok_or_else(|| anyhow::anyhow!("{service}: the ownership record vanished during the flip"))
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
        &sides.monolith,
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
    problems.extend(crate::pre_images::problems(sides.transforms, &sides.monolith, &sides.service_db).await?);
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
        // The marker is the drain point: writes on the losing side to fenced keys after it are
        // fence violations. While it is being written, judges of the service's changes wait.
        let marker = match record.marker {
            Some(m) => m,
            None => {
                if sides.ownership.store.set_drain(&service, Drain::Pending).await?.is_none() {
                    anyhow::bail!("{service}: the fence was lifted (an --abort?) before the drain");
                }
                crate::failpoint::hit("cutover.drain.pending");
                let m = write_marker(db, &service, &record.mv).await?;
                record.marker = Some(m);
                sides.moves.save(record).await?;
                m
            }
        };
        if sides.ownership.store.set_drain(&service, Drain::At(marker)).await?.is_none() {
            anyhow::bail!("{service}: the fence was lifted (an --abort?) during the drain");
        }
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
    // Up to 30 s of re-checks: the gaining side's own writes to the moving documents (the
    // monolith's code touching customers the service owns) are in flight while it runs.
    let opts = crate::verify::VerifyOptions {
        sample: 10,
        settle: Duration::from_secs(2),
        rechecks: 15,
        buckets: Some(mv.buckets()),
    };
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
