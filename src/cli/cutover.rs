//! `ficus cutover`: prints the executor's progress (`commands::cutover`) and maps its outcome to
//! an exit code: 0 done, 1 a gate failed (which and why; nothing flipped) or an abort left
//! something not as it should be, 2 bad input.

use std::process::ExitCode;
use std::time::Duration;

use super::{BadInput, Loaded};
use crate::clients::Clients;
use crate::commands::Event;
use crate::commands::cutover::{CutoverError, Outcome, Request};
use crate::commands::rollout::{PlanOutcome, PlanRequest};
use crate::cutover::plan::Phase;
use crate::daemon::Definitions;

/// `ficus cutover --service NAME (--to PERCENT [--force] [--dry-run] | --abort)`.
pub(super) async fn cutover(loaded: &Loaded, clients: &Clients, req: Request) -> anyhow::Result<ExitCode> {
    let definitions = Definitions { topics: loaded.topics.clone(), services: loaded.services.clone() };
    let service = req.service.clone();
    if req.abort && !req.dry_run {
        // A plan under way is walked back as a whole; otherwise the abort is the move's.
        let (config, timeout) = (&loaded.config, req.timeout);
        match crate::commands::rollout::abort(config, &definitions, clients, &service, timeout, &print).await {
            Ok(None) => {}
            Ok(Some(outcome)) => return plan_outcome(&service, (Duration::ZERO, Duration::ZERO), Ok(outcome)),
            Err(CutoverError::BadInput(msg)) => return Err(anyhow::Error::new(BadInput(msg))),
            Err(e) => return Err(e.into()),
        }
    }
    let outcome = crate::commands::cutover::cutover(&loaded.config, &definitions, clients, req, &print).await;
    match outcome {
        Ok(Outcome::Done) => Ok(ExitCode::SUCCESS),
        Ok(Outcome::GateFailed(gate)) => {
            eprintln!(
                "{service}: the {} gate failed: {}\nnothing flipped; run the same command again once fixed, or add --abort \
                 to return to the share before this move",
                gate.step.name(),
                gate.why
            );
            Ok(ExitCode::from(1))
        }
        Ok(Outcome::AbortIncomplete(problems)) => {
            eprintln!("{service}: move aborted, but: {}", problems.join("; "));
            Ok(ExitCode::from(1))
        }
        Ok(Outcome::DryRun(problems)) => {
            for p in &problems {
                println!("  preflight: FAIL {p}");
            }
            if problems.is_empty() {
                println!("  preflight: ok");
            }
            println!("dry run: nothing changed");
            Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Err(CutoverError::BadInput(msg)) => Err(anyhow::Error::new(BadInput(msg))),
        Err(e) => Err(e.into()),
    }
}

/// `ficus cutover --plan SHARES [--hold D] [--interval D] [--dry-run]`: 0 done, 1 rolled back,
/// stopped or a gate failed (which check, its value and its bound; or which gate), 2 bad input.
pub(super) async fn rollout(loaded: &Loaded, clients: &Clients, req: PlanRequest) -> anyhow::Result<ExitCode> {
    let definitions = Definitions { topics: loaded.topics.clone(), services: loaded.services.clone() };
    let service = req.service.clone();
    let (hold, interval) = (req.hold, req.interval);
    let result = crate::commands::rollout::rollout(&loaded.config, &definitions, clients, req, &print).await;
    plan_outcome(&service, (hold, interval), result)
}

/// Prints how a plan ended and maps it to an exit code (`hold`, `interval`: for a dry run).
fn plan_outcome(
    service: &str,
    (hold, interval): (Duration, Duration),
    result: Result<PlanOutcome, CutoverError>,
) -> anyhow::Result<ExitCode> {
    match result {
        Ok(PlanOutcome::Done) => Ok(ExitCode::SUCCESS),
        Ok(PlanOutcome::DryRun { plan, checks }) => {
            let steps: Vec<String> = plan.shares.iter().map(|s| format!("{s}%")).collect();
            println!(
                "{service}: plan from {}% through {}, each by the safe move, held {} while analysis measures every {}:",
                plan.from,
                steps.join(" → "),
                humantime::format_duration(hold),
                humantime::format_duration(interval)
            );
            for c in &checks {
                let kind = if c.critical {
                    "critical: rolls back".to_string()
                } else {
                    format!("stops past {} failures", c.failure_limit)
                };
                println!("  {:<17} {:<10} {kind}; {}", c.name, c.bounds(), c.about);
            }
            println!(
                "  no data holds the plan (it never passes on silence); a reading that errs {} times in a row stops it",
                checks.first().map_or(4, |c| c.consecutive_error_limit)
            );
            println!("dry run: nothing changed");
            Ok(ExitCode::SUCCESS)
        }
        Ok(PlanOutcome::RolledBack { to, why }) => {
            eprintln!("{service}: rolled back to {to}%: {why}");
            Ok(ExitCode::from(1))
        }
        Ok(PlanOutcome::Stopped { at, why }) => {
            eprintln!(
                "{service}: the plan stopped at {at}%: {why}
run the same command again to go on once fixed"
            );
            Ok(ExitCode::from(1))
        }
        Ok(PlanOutcome::Aborted { to }) => {
            println!("{service}: plan aborted; back at {to}%");
            Ok(ExitCode::SUCCESS)
        }
        Ok(PlanOutcome::GateFailed(gate)) => {
            eprintln!(
                "{service}: the {} gate failed: {}
the plan stands where it was; run the same command again once fixed",
                gate.step.name(),
                gate.why
            );
            Ok(ExitCode::from(1))
        }
        Err(CutoverError::BadInput(msg)) => Err(anyhow::Error::new(BadInput(msg))),
        Err(e) => Err(e.into()),
    }
}

/// `ficus analyze --service S --once [--json]`: 0 pass, 1 a check failed, 3 inconclusive.
pub(super) async fn analyze(loaded: &Loaded, clients: &Clients, service: &str, json: bool) -> anyhow::Result<ExitCode> {
    let definitions = Definitions { topics: loaded.topics.clone(), services: loaded.services.clone() };
    let quiet = |_: Event<'_>| {};
    let progress: &(dyn Fn(Event<'_>) + Sync) = if json { &quiet } else { &print };
    let analyzed =
        match crate::commands::analysis::analyze_once(&loaded.config, &definitions, clients, service, progress).await {
            Ok(a) => a,
            Err(CutoverError::BadInput(msg)) => return Err(anyhow::Error::new(BadInput(msg))),
            Err(e) => return Err(e.into()),
        };
    let result = analyzed.outcome.as_str();
    if json {
        let readings: Vec<serde_json::Value> = analyzed
            .readings
            .iter()
            .map(
                |r| serde_json::json!({ "metric": r.metric, "value": r.value, "bounds": r.bounds, "result": r.result }),
            )
            .collect();
        let since = analyzed.since.and_then(|t| t.try_to_rfc3339_string().ok());
        let out = serde_json::json!({ "service": service, "result": result, "since": since, "readings": readings });
        println!("{out}");
    } else {
        let since = analyzed.since.map_or("now (the first run)".to_string(), |t| {
            humantime::format_rfc3339_seconds(t.to_system_time()).to_string()
        });
        println!("{service}: {result} (counts since {since})");
    }
    Ok(ExitCode::from(match analyzed.outcome {
        crate::cutover::rollout::Outcome::Pass => 0,
        crate::cutover::rollout::Outcome::Fail => 1,
        crate::cutover::rollout::Outcome::Inconclusive | crate::cutover::rollout::Outcome::Error => 3,
    }))
}

/// Prints one event of the move: steps numbered, warnings on stderr.
fn print(event: Event<'_>) {
    match event {
        Event::Info(line) => println!("{line}"),
        Event::Warning(line) => eprintln!("{line}"),
        Event::Step(phase) => println!("[{}] {}: …", number(phase), phase.name()),
        Event::StepDone { phase, took, detail } => {
            println!("[{}] {} done in {}{}", number(phase), phase.name(), secs(took), {
                if detail.is_empty() { String::new() } else { format!(": {detail}") }
            })
        }
    }
}

fn number(p: Phase) -> String {
    let i = Phase::ALL.iter().position(|q| *q == p).unwrap_or(0) + 1;
    format!("{i}/{}", Phase::ALL.len())
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
