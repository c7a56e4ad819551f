//! `ficus cutover --plan 10,50,100 --hold 5m`: a progressive rollout. Each share of the plan is
//! reached by the safe move (`commands::cutover`), then held while analysis measures the
//! migration every interval (`cutover::rollout` decides); a critical failure rolls back to the
//! last share that finished its hold, through the safe move; a non-critical one past its limit
//! stops the plan where it is. The shares whose hold finished are recorded (`<store.db>.rollouts`),
//! so the same command, run again after a kill, goes on from there.
//!
//! What is measured, per service, from outside the daemon (nothing here needs Prometheus): the
//! forward and reverse groups' lag, the conflicts and fence violations reported on
//! `<service>.conflicts` and the dead letters on the service's topics since the step began, and
//! the verify score of the buckets the service owns.

use std::time::{Duration, Instant};

use bson::{Document, doc};
use tokio_util::sync::CancellationToken;

use super::Event;
use super::cutover::{CutoverError, Gate, Outcome, Request, cutover};
use crate::bus::{ReadFrom, Reader};
use crate::clients::Clients;
use crate::config::Config;
use crate::config::topics::{conflicts_topic, dlq_topic};
use crate::consume::{Direction, Pipeline};
use crate::cutover::log::{CheckReading, Entry, Kind, MigrationLog};
use crate::cutover::ownership::OwnershipStore;
use crate::cutover::rollout::{Analysis, Check, Next, Reading, Rollout, Verdict, Why, configured, hold_over};
use crate::daemon::Definitions;
use crate::transform::ServiceTransforms;

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

/// The plans under way, one per service, in ficus's store.
const ROLLOUTS: &str = "rollouts";

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
    let plans = store.collection::<Document>(ROLLOUTS);
    let recorded = plans.find_one(doc! { "_id": service }).await?;
    let (from, held) = match &recorded {
        Some(r) if shares_of(r, "shares") == req.shares => (r.get_i32("from").unwrap_or(0) as u8, shares_of(r, "held")),
        Some(r) => {
            return Err(CutoverError::BadInput(format!(
                "{service}: another plan is under way ({:?} from {}%): run it again to finish it",
                shares_of(r, "shares"),
                r.get_i32("from").unwrap_or(0)
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
    let run = Run { config, definitions, clients, req: &req, progress, transforms: &transforms, plans: &plans, log };
    let steps: Vec<String> = req.shares.iter().map(|s| format!("{s}%")).collect();
    let hold = humantime::format_duration(req.hold);
    if recorded.is_none() {
        plans
            .insert_one(
                doc! { "_id": service, "from": i32::from(from), "shares": shares_bson(&req.shares), "held": [] },
            )
            .await?;
        let detail = format!("plan {}, each held {hold}", steps.join(" → "));
        run.log(Entry::now(service, Kind::PlanStarted, now, plan.target(), detail)).await;
    } else {
        progress(Event::Info(&format!("{service}: resuming the plan; held so far: {held:?}")));
        let detail = format!("plan {} resumed, held so far {held:?}", steps.join(" → "));
        run.log(Entry::now(service, Kind::PlanStarted, now, plan.target(), detail)).await;
    }
    let outcome = run.steps(&plan, held, now, &checks).await?;
    if !matches!(outcome, PlanOutcome::Stopped { .. } | PlanOutcome::GateFailed(_)) {
        plans.delete_one(doc! { "_id": service }).await?;
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
    let plans = store.collection::<Document>(ROLLOUTS);
    let Some(recorded) = plans.find_one(doc! { "_id": service }).await? else { return Ok(None) };
    let from = recorded.get_i32("from").unwrap_or(0) as u8;
    let (shares, held) = (shares_of(&recorded, "shares"), shares_of(&recorded, "held"));
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
    plans.delete_one(doc! { "_id": service }).await?;
    let entry = Entry::now(service, Kind::Aborted, was, back, format!("plan {shares:?} aborted (held {held:?})"));
    if let Err(e) = MigrationLog::new(&store).append(&entry).await {
        progress(Event::Warning(&format!("the migration log did not take the abort: {}", crate::mongo::describe(&e))));
    }
    Ok(Some(PlanOutcome::Aborted { to: back }))
}

fn shares_of(d: &Document, field: &str) -> Vec<u8> {
    d.get_array(field).map(|a| a.iter().filter_map(|v| v.as_i32()).map(|v| v as u8).collect()).unwrap_or_default()
}

fn shares_bson(shares: &[u8]) -> Vec<i32> {
    shares.iter().map(|&s| i32::from(s)).collect()
}

/// One plan's run.
struct Run<'a> {
    config: &'a Config,
    definitions: &'a Definitions,
    clients: &'a Clients,
    req: &'a PlanRequest,
    progress: &'a (dyn Fn(Event<'_>) + Sync),
    transforms: &'a ServiceTransforms,
    plans: &'a mongodb::Collection<Document>,
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
    ) -> Result<PlanOutcome, CutoverError> {
        let service = self.req.service.as_str();
        // What a step's counts start from: taken before its move, so an anomaly during the
        // move counts in its hold (a resumed hold starts counting when it resumes).
        let mut baseline = None;
        loop {
            match plan.next(&held, now) {
                Next::Done => {
                    self.log(Entry::now(service, Kind::PlanDone, now, now, format!("held {held:?}"))).await;
                    return Ok(PlanOutcome::Done);
                }
                Next::Move(to) => {
                    (self.progress)(Event::Info(&format!("{service}: plan step to {to}%")));
                    baseline = Some(Measure::begin(self, to).await?);
                    if let Some(gate) = self.move_to(to).await? {
                        return Ok(PlanOutcome::GateFailed(gate));
                    }
                    now = to;
                }
                Next::Hold(at) => match self.hold(at, checks, baseline.take()).await? {
                    Verdict::Pass => {
                        let detail =
                            format!("held {} with every check passing", humantime::format_duration(self.req.hold));
                        self.log(Entry::now(service, Kind::Held, at, at, detail)).await;
                        held.push(at);
                        self.plans
                            .update_one(doc! { "_id": service }, doc! { "$push": { "held": i32::from(at) } })
                            .await?;
                    }
                    Verdict::RollBack(why) => {
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
                    Verdict::Stop(why) => {
                        self.log(Entry::now(service, Kind::Stopped, at, at, why.to_string())).await;
                        return Ok(PlanOutcome::Stopped { at, why });
                    }
                    Verdict::Inconclusive { .. } => unreachable!("a hold ends only on a pass, a rollback or a stop"),
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

    /// Holds at `at` for the plan's hold, measuring every interval (counts from `baseline`, taken
    /// before the step's move); returns the verdict that ended it (a pass once the time is up,
    /// or a rollback or a stop).
    async fn hold(&self, at: u8, checks: &[Check], baseline: Option<Measure>) -> Result<Verdict, CutoverError> {
        let service = self.req.service.as_str();
        let measure = match baseline {
            Some(m) => m,
            None => Measure::begin(self, at).await?,
        };
        let mut analysis = Analysis::new(checks.to_vec());
        let started = Instant::now();
        (self.progress)(Event::Info(&format!(
            "{service}: holding at {at}% for {}s, measuring every {}s",
            self.req.hold.as_secs(),
            self.req.interval.as_secs()
        )));
        loop {
            tokio::time::sleep(self.req.interval).await;
            let readings = measure.read(self).await;
            let verdict = analysis.measure(&readings);
            let line: Vec<String> = analysis
                .tallies
                .iter()
                .map(|t| match &t.last {
                    Some((Reading::Value(v), o)) => {
                        format!("{} {v} ({}, {})", t.check.name, t.check.bounds(), o.as_str())
                    }
                    Some((_, o)) => format!("{} {}", t.check.name, o.as_str()),
                    None => t.check.name.clone(),
                })
                .collect();
            (self.progress)(Event::Info(&format!("  analysis at {at}%: {}", line.join("; "))));
            let readings = analysis
                .tallies
                .iter()
                .map(|t| CheckReading {
                    metric: t.check.name.clone(),
                    value: match &t.last {
                        Some((Reading::Value(v), _)) => Some(*v),
                        _ => None,
                    },
                    bounds: t.check.bounds(),
                    result: t.last.as_ref().map_or("inconclusive", |(_, o)| o.as_str()).to_string(),
                })
                .collect();
            self.log(Entry { readings, ..Entry::now(service, Kind::Analysis, at, at, line.join("; ")) }).await;
            match verdict {
                Verdict::RollBack(_) | Verdict::Stop(_) => return Ok(verdict),
                v if hold_over(started.elapsed(), self.req.hold, Some(&v)) => return Ok(v),
                _ => {}
            }
        }
    }
}

/// The measurements of one step: the baselines its counts start from.
struct Measure {
    at: u8,
    conflicts: Vec<(i32, i64)>,
    dead_letters: i64,
}

impl Measure {
    async fn begin(run: &Run<'_>, at: u8) -> Result<Measure, CutoverError> {
        let reader = Reader::new(&run.config.kafka, "ficus-analysis", None)?;
        let conflicts = ends(&reader, &conflicts_topic(run.transforms.service()))?;
        let dead_letters = dead_letters(&reader, run.transforms)?;
        Ok(Measure { at, conflicts, dead_letters })
    }

    /// Every check's reading now (an error is an error reading, never a failure).
    async fn read(&self, run: &Run<'_>) -> Vec<(String, Reading)> {
        let of = |r: Result<f64, String>| r.map_or_else(Reading::Error, Reading::Value);
        let mut out = Vec::new();
        for (name, direction) in [("forward_lag", Direction::Forward), ("reverse_lag", Direction::Reverse)] {
            let Pipeline { group, topics } = Pipeline::of(run.transforms, direction);
            let lag = crate::status::group_lag(&run.config.kafka, &group, &topics);
            out.push((name.to_string(), of(lag.map(|l| l.lag as f64).map_err(|e| e.to_string()))));
        }
        match self.reports(run).await {
            Ok((conflicts, violations)) => {
                out.push(("conflicts".into(), Reading::Value(conflicts as f64)));
                out.push(("fence_violations".into(), Reading::Value(violations as f64)));
            }
            Err(e) => {
                out.push(("conflicts".into(), Reading::Error(e.clone())));
                out.push(("fence_violations".into(), Reading::Error(e)));
            }
        }
        let dlq = Reader::new(&run.config.kafka, "ficus-analysis", None)
            .map_err(|e| e.to_string())
            .and_then(|r| dead_letters(&r, run.transforms).map_err(|e| e.to_string()));
        out.push(("dead_letters".into(), of(dlq.map(|n| (n - self.dead_letters) as f64))));
        out.push(("verify_score".into(), of(self.score(run).await)));
        out
    }

    /// Conflicts and fence violations reported since the hold began.
    async fn reports(&self, run: &Run<'_>) -> Result<(u64, u64), String> {
        let topic = conflicts_topic(run.transforms.service());
        let reader = Reader::new(&run.config.kafka, "ficus-analysis", None).map_err(|e| e.to_string())?;
        let start = |_: &str, p: i32| {
            let at = self.conflicts.iter().find(|(q, _)| *q == p).map_or(0, |(_, o)| *o);
            ReadFrom::Offset(at)
        };
        let (mut conflicts, mut violations) = (0u64, 0u64);
        let never = CancellationToken::new();
        reader
            .read_to_end(&[topic], start, 500, false, &never, async |batch: Vec<crate::bus::Delivery>| {
                for d in batch {
                    conflicts += 1;
                    let report: serde_json::Value = serde_json::from_slice(&d.payload).unwrap_or_default();
                    if report["fenceViolation"].as_bool() == Some(true) {
                        violations += 1;
                    }
                }
                Ok::<(), crate::bus::BusError>(())
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok((conflicts - violations, violations))
    }

    /// The verify score (%) of the buckets the service owns at this share.
    async fn score(&self, run: &Run<'_>) -> Result<f64, String> {
        let opts = crate::verify::VerifyOptions {
            sample: 0,
            settle: Duration::from_secs(2),
            rechecks: 3,
            buckets: Some(0..self.at),
        };
        let report = crate::verify::verify(
            run.transforms,
            &run.definitions.topics,
            &run.clients.monolith(),
            &run.config.source.name,
            &run.clients.service(run.transforms.database()),
            &run.clients.store(),
            &opts,
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(report.consistency())
    }
}

/// Each partition's end of `topic`.
fn ends(reader: &Reader, topic: &str) -> Result<Vec<(i32, i64)>, crate::bus::BusError> {
    let mut out = Vec::new();
    for p in reader.partitions(topic)? {
        out.push((p, reader.watermarks(topic, p)?.1));
    }
    Ok(out)
}

/// The dead letters on the service's topics (forward and reverse), all partitions.
fn dead_letters(reader: &Reader, transforms: &ServiceTransforms) -> Result<i64, crate::bus::BusError> {
    let mut total = 0;
    for direction in [Direction::Forward, Direction::Reverse] {
        for topic in Pipeline::of(transforms, direction).topics {
            total += ends(reader, &dlq_topic(&topic))?.iter().map(|(_, e)| e).sum::<i64>();
        }
    }
    Ok(total)
}
