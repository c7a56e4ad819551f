//! `ficus cutover --plan 10,50,100 --hold 5m`: a progressive rollout. Each share of the plan is
//! reached by the safe move (`commands::cutover`), then held while analysis measures the
//! migration every interval (`cutover::rollout` decides); a critical failure rolls back to the
//! last share that finished its hold, through the safe move; a non-critical one past its limit
//! stops the plan where it is. The shares whose hold finished are recorded (`<store.db>.rollouts`),
//! so the same command, run again after a kill, goes on from there.
//!
//! What is measured is `commands::analysis`'s; the plan's record is `cutover::plans`'s.

use std::time::{Duration, Instant};

use super::Event;
use super::analysis::{Meter, line, readings};
use super::cutover::{CutoverError, Gate, Outcome, Request, cutover};
use crate::clients::Clients;
use crate::config::Config;
use crate::cutover::log::{Entry, Kind, MigrationLog};
use crate::cutover::ownership::OwnershipStore;
use crate::cutover::plans::{Baseline, Measured, PlanRecord, PlanStore};
use crate::cutover::rollout::{Analysis, Check, Next, Rollout, Verdict, Why, configured, hold_over};
use crate::daemon::Definitions;

/// What `ficus cutover --plan` was asked.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub service: String,
    pub to: Option<u8>,
    pub shares: Vec<u8>,
    pub hold: Duration,
    /// How often analysis measures during a hold.
    pub interval: Duration,
    /// How long each move's drain and observation may wait.
    pub timeout: Duration,
    pub dry_run: bool,
}

/// How a plan ended (errors aside).
#[derive(Debug)]
pub enum PlanOutcome {
    /// Every share moved to and held.
    Done,
    /// A move's gate failed: nothing flipped at that step, the plan stands where it was.
    GateFailed(Gate),
    /// A critical check failed: the service is back at `to`.
    RolledBack { to: u8, why: Why },
    /// A check failed past its limit: the plan stopped at `at` (the command again goes on).
    Stopped { at: u8, why: Why },
    /// A dry run: the plan and the checks it would run.
    DryRun { plan: Rollout, checks: Vec<Check> },
    /// `--abort`: the plan walked back to `to`, the last share that finished its hold (or where
    /// it began), and forgotten.
    Aborted { to: u8 },
}

/// `ficus cutover --plan`.
pub async fn rollout(
    config: &Config,
    definitions: &Definitions,
    clients: &Clients,
    req: PlanRequest,
    progress: &(dyn Fn(Event<'_>) + Sync),
) -> Result<PlanOutcome, CutoverError> {
    let chosen =
        definitions.select(std::slice::from_ref(&req.service)).map_err(|e| CutoverError::BadInput(e.to_string()))?;
    let transforms = chosen[0].clone();
    let store = clients.store();
    let service = req.service.as_str();
    let now = OwnershipStore::new(&store).get(service).await?.map_or(0, |o| o.percent);
    let plans = PlanStore::new(&store);
    let recorded = plans.get(service).await?;
    let (from, held) = match &recorded {
        Some(r) if r.shares == req.shares => (r.from, r.held.clone()),
        Some(r) => {
            return Err(CutoverError::BadInput(format!(
                "{service}: another plan is under way ({:?} from {}%): run it again to finish it, or --abort it",
                r.shares, r.from
            )));
        }
        None => (now, Vec::new()),
    };
    let plan = Rollout::new(from, req.to, &req.shares, req.hold).map_err(|p| CutoverError::BadInput(p.join("; ")))?;
    let checks = configured(&config.cutover.analysis);
    if req.dry_run {
        return Ok(PlanOutcome::DryRun { plan, checks });
    }
    let log = MigrationLog::new(&store);
    let meter = Meter { config, definitions, clients, transforms: &transforms };
    let run = Run { config, definitions, clients, req: &req, progress, meter, plans: &plans, log };
    let steps: Vec<String> = req.shares.iter().map(|s| format!("{s}%")).collect();
    let hold = humantime::format_duration(req.hold);
    if recorded.is_none() {
        let record = PlanRecord {
            service: service.to_string(),
            from,
            shares: req.shares.clone(),
            held: Vec::new(),
            hold_secs: req.hold.as_secs(),
            holding: None,
            baseline: None,
            last: None,
        };
        plans.start(&record).await?;
        let detail = format!("plan {}, each held {hold}", steps.join(" → "));
        run.log(Entry::now(service, Kind::PlanStarted, now, plan.target(), detail)).await;
    } else {
        progress(Event::Info(&format!("{service}: resuming the plan; held so far: {held:?}")));
        let detail = format!("plan {} resumed, held so far {held:?}", steps.join(" → "));
        run.log(Entry::now(service, Kind::PlanStarted, now, plan.target(), detail)).await;
    }
    let baseline = recorded.and_then(|r| r.baseline);
    let outcome = run.steps(&plan, held, now, &checks, baseline).await?;
    if !matches!(outcome, PlanOutcome::Stopped { .. } | PlanOutcome::GateFailed(_)) {
        plans.forget(service).await?;
    }
    Ok(outcome)
}

/// `ficus cutover --service S --abort` while a plan is under way: the move under way (if any)
/// aborted, then the safe move back to the last share that finished its hold (where the plan
/// began if none did), and the plan forgotten. `None`: no plan is under way (the abort is a
/// single move's, `commands::cutover`).
pub async fn abort(
    config: &Config,
    definitions: &Definitions,
    clients: &Clients,
    service: &str,
    timeout: Duration,
    progress: &(dyn Fn(Event<'_>) + Sync),
) -> Result<Option<PlanOutcome>, CutoverError> {
    let store = clients.store();
    let plans = PlanStore::new(&store);
    let Some(PlanRecord { from, shares, held, .. }) = plans.get(service).await? else { return Ok(None) };
    // A recorded plan was validated when it began.
    let back = Rollout::new(from, None, &shares, Duration::ZERO).map_or(from, |p| p.last_good(&held));
    progress(Event::Info(&format!("{service}: aborting the plan {shares:?} (held {held:?}): back to {back}%")));
    let single = |to: Option<u8>, abort: bool| Request {
        service: service.to_string(),
        to,
        force: false,
        dry_run: false,
        abort,
        emergency: false,
        timeout,
        until: None,
    };
    let was = OwnershipStore::new(&store).get(service).await?.map_or(0, |o| o.percent);
    let pending =
        crate::cutover::moves::MoveStore::new(&store).get(service).await?.is_some_and(|r| r.mv.next().is_some());
    if pending {
        match cutover(config, definitions, clients, single(None, true), progress).await? {
            Outcome::Done => {}
            Outcome::GateFailed(gate) => return Ok(Some(PlanOutcome::GateFailed(gate))),
            other => return Err(CutoverError::State(format!("aborting the move under way: {other:?}"))),
        }
    }
    let now = OwnershipStore::new(&store).get(service).await?.map_or(0, |o| o.percent);
    if now != back {
        match cutover(config, definitions, clients, single(Some(back), false), progress).await? {
            Outcome::Done => {}
            Outcome::GateFailed(gate) => return Ok(Some(PlanOutcome::GateFailed(gate))),
            other => return Err(CutoverError::State(format!("the move back to {back}%: {other:?}"))),
        }
    }
    plans.forget(service).await?;
    let entry = Entry::now(service, Kind::Aborted, was, back, format!("plan {shares:?} aborted (held {held:?})"));
    if let Err(e) = MigrationLog::new(&store).append(&entry).await {
        progress(Event::Warning(&format!("the migration log did not take the abort: {}", crate::mongo::describe(&e))));
    }
    Ok(Some(PlanOutcome::Aborted { to: back }))
}

/// How a hold ends: its time up with the last measurement passing, or a check that rolls the
/// plan back or stops it.
enum HoldEnd {
    Passed,
    RollBack(Why),
    Stop(Why),
}

/// One plan's run.
struct Run<'a> {
    config: &'a Config,
    definitions: &'a Definitions,
    clients: &'a Clients,
    req: &'a PlanRequest,
    progress: &'a (dyn Fn(Event<'_>) + Sync),
    meter: Meter<'a>,
    plans: &'a PlanStore,
    log: MigrationLog,
}

impl Run<'_> {
    /// Appends to the migration log; a failure is the operator's to know, never the plan's.
    async fn log(&self, entry: Entry) {
        if let Err(e) = self.log.append(&entry).await {
            let line = format!("the migration log did not take \"{}\": {}", entry.line(), crate::mongo::describe(&e));
            (self.progress)(Event::Warning(&line));
        }
    }

    async fn steps(
        &self,
        plan: &Rollout,
        mut held: Vec<u8>,
        mut now: u8,
        checks: &[Check],
        mut baseline: Option<Baseline>,
    ) -> Result<PlanOutcome, CutoverError> {
        let service = self.req.service.as_str();
        // What a step's counts start from: taken before its move and recorded, so an anomaly
        // during the move counts in its hold, and a resumed step counts from its start.
        loop {
            match plan.next(&held, now) {
                Next::Done => {
                    self.log(Entry::now(service, Kind::PlanDone, now, now, format!("held {held:?}"))).await;
                    return Ok(PlanOutcome::Done);
                }
                Next::Move(to) => {
                    (self.progress)(Event::Info(&format!("{service}: plan step to {to}%")));
                    let b = self.meter.baseline().await?;
                    self.plans.step_baseline(service, &b).await?;
                    baseline = Some(b);
                    if let Some(gate) = self.move_to(to).await? {
                        return Ok(PlanOutcome::GateFailed(gate));
                    }
                    now = to;
                }
                Next::Hold(at) => match self.hold(at, checks, baseline.take()).await? {
                    HoldEnd::Passed => {
                        let detail =
                            format!("held {} with every check passing", humantime::format_duration(self.req.hold));
                        self.log(Entry::now(service, Kind::Held, at, at, detail)).await;
                        held.push(at);
                        self.plans.held(service, at).await?;
                    }
                    HoldEnd::RollBack(why) => {
                        let back = plan.last_good(&held);
                        (self.progress)(Event::Warning(&format!("{service}: rolling back to {back}%: {why}")));
                        let t0 = Instant::now();
                        if let Some(gate) = self.move_to(back).await? {
                            return Ok(PlanOutcome::GateFailed(gate));
                        }
                        self.log(Entry::now(service, Kind::RolledBack, at, back, why.to_string()).took(t0.elapsed()))
                            .await;
                        return Ok(PlanOutcome::RolledBack { to: back, why });
                    }
                    HoldEnd::Stop(why) => {
                        self.log(Entry::now(service, Kind::Stopped, at, at, why.to_string())).await;
                        return Ok(PlanOutcome::Stopped { at, why });
                    }
                },
            }
        }
    }

    /// The safe move to `to`; the failed gate, if one did.
    async fn move_to(&self, to: u8) -> Result<Option<Gate>, CutoverError> {
        let req = Request {
            service: self.req.service.clone(),
            to: Some(to),
            force: false,
            dry_run: false,
            abort: false,
            emergency: false,
            timeout: self.req.timeout,
            until: None,
        };
        match cutover(self.config, self.definitions, self.clients, req, self.progress).await? {
            Outcome::Done => Ok(None),
            Outcome::GateFailed(gate) => Ok(Some(gate)),
            other => Err(CutoverError::State(format!("the move to {to}% ended unexpectedly: {other:?}"))),
        }
    }

    /// Holds at `at` for the plan's hold (a resumed hold for what is left of it), measuring
    /// every interval, counts from `baseline` (taken before the step's move); returns the
    /// verdict that ended it (a pass once the time is up, or a rollback or a stop).
    async fn hold(&self, at: u8, checks: &[Check], baseline: Option<Baseline>) -> Result<HoldEnd, CutoverError> {
        let service = self.req.service.as_str();
        let from = match baseline {
            Some(b) => b,
            None => {
                let b = self.meter.baseline().await?;
                self.plans.step_baseline(service, &b).await?;
                b
            }
        };
        self.plans.holding(service, at).await?;
        let since =
            self.plans.get(service).await?.and_then(|p| p.holding).map_or_else(bson::DateTime::now, |h| h.since);
        let mut analysis = Analysis::new(checks.to_vec());
        let left = self.req.hold.saturating_sub(bson::DateTime::now().saturating_duration_since(since));
        (self.progress)(Event::Info(&format!(
            "{service}: holding at {at}% for {}s more, measuring every {}s",
            left.as_secs(),
            self.req.interval.as_secs()
        )));
        loop {
            tokio::time::sleep(self.req.interval).await;
            // Counts since the step began (its baseline stays).
            let verdict = analysis.measure(&self.meter.read(&from, at).await.0);
            let text = line(&analysis.tallies);
            (self.progress)(Event::Info(&format!("  analysis at {at}%: {text}")));
            let readings = readings(&analysis.tallies);
            let measured = Measured { at: bson::DateTime::now(), readings: readings.clone() };
            self.plans.measured(service, &measured).await?;
            self.log(Entry { readings, ..Entry::now(service, Kind::Analysis, at, at, text) }).await;
            let elapsed = bson::DateTime::now().saturating_duration_since(since);
            match verdict {
                Verdict::RollBack(why) => return Ok(HoldEnd::RollBack(why)),
                Verdict::Stop(why) => return Ok(HoldEnd::Stop(why)),
                v if hold_over(elapsed, self.req.hold, Some(&v)) => return Ok(HoldEnd::Passed),
                _ => {}
            }
        }
    }
}
