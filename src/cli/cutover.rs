//! `ficus cutover`: prints the executor's progress (`commands::cutover`) and maps its outcome to
//! an exit code: 0 done, 1 a gate failed (which and why; nothing flipped) or an abort left
//! something not as it should be, 2 bad input.

use std::process::ExitCode;
use std::time::Duration;

use super::{BadInput, Loaded};
use crate::clients::Clients;
use crate::commands::Event;
use crate::commands::cutover::{CutoverError, Outcome, Request};
use crate::cutover::plan::Phase;
use crate::daemon::Definitions;

/// `ficus cutover --service NAME (--to PERCENT [--force] [--dry-run] | --abort)`.
pub(super) async fn cutover(loaded: &Loaded, clients: &Clients, req: Request) -> anyhow::Result<ExitCode> {
    let definitions = Definitions { topics: loaded.topics.clone(), services: loaded.services.clone() };
    let service = req.service.clone();
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
