//! What a rollout's analysis measures, per service, from outside the daemon (nothing here needs
//! Prometheus): the forward and reverse groups' lag, the conflicts and fence violations reported
//! on `<service>.conflicts` and the dead letters on the service's topics since a [`Baseline`],
//! and the verify score of the buckets the service owns. `cutover --plan` measures every
//! interval of a hold; `ficus analyze --service S --once` measures once, counting what is new
//! since the run before it, for tools that gate on an exit code (an Argo job metric, a CI step).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Event;
use super::cutover::CutoverError;
use crate::bus::{ReadFrom, Reader};
use crate::clients::Clients;
use crate::config::Config;
use crate::config::topics::{conflicts_topic, dlq_topic};
use crate::consume::{Direction, Pipeline};
use crate::cutover::log::{CheckReading, Entry, Kind, MigrationLog};
use crate::cutover::ownership::OwnershipStore;
use crate::cutover::plans::{Baseline, PlanStore};
use crate::cutover::rollout::{Analysis, Outcome, Reading, Tally, configured, one_shot};
use crate::daemon::Definitions;
use crate::transform::ServiceTransforms;

/// Measures one service.
pub(super) struct Meter<'a> {
    pub config: &'a Config,
    pub definitions: &'a Definitions,
    pub clients: &'a Clients,
    pub transforms: &'a ServiceTransforms,
}

impl Meter<'_> {
    /// What counts start from now.
    pub async fn baseline(&self) -> Result<Baseline, CutoverError> {
        let reader = Reader::new(&self.config.kafka, "ficus-analysis", None)?;
        let conflicts = ends(&reader, &conflicts_topic(self.transforms.service()))?;
        let dead_letters = dead_letters(&reader, self.transforms)?;
        Ok(Baseline { conflicts, dead_letters, at: bson::DateTime::now() })
    }

    /// Every check's reading now, counts since `from` up to the returned baseline (the ends
    /// counted to, so the next measurement counts from exactly there; `None` when Kafka did not
    /// answer), the verify score of the buckets below `at` (an error is an error reading,
    /// never a failure).
    pub async fn read(&self, from: &Baseline, at: u8) -> (Vec<(String, Reading)>, Option<Baseline>) {
        let of = |r: Result<f64, String>| r.map_or_else(Reading::Error, Reading::Value);
        let to = self.baseline().await.map_err(|e| e.to_string());
        let mut out = Vec::new();
        for (name, direction) in [("forward_lag", Direction::Forward), ("reverse_lag", Direction::Reverse)] {
            let Pipeline { group, topics } = Pipeline::of(self.transforms, direction);
            let lag = crate::status::group_lag(&self.config.kafka, &group, &topics);
            out.push((name.to_string(), of(lag.map(|l| l.lag as f64).map_err(|e| e.to_string()))));
        }
        let reports = match &to {
            Ok(to) => self.reports(from, to).await,
            Err(e) => Err(e.clone()),
        };
        match reports {
            Ok((conflicts, violations)) => {
                out.push(("conflicts".into(), Reading::Value(conflicts as f64)));
                out.push(("fence_violations".into(), Reading::Value(violations as f64)));
            }
            Err(e) => {
                out.push(("conflicts".into(), Reading::Error(e.clone())));
                out.push(("fence_violations".into(), Reading::Error(e)));
            }
        }
        let dlq = to.as_ref().map(|to| (to.dead_letters - from.dead_letters) as f64).map_err(Clone::clone);
        out.push(("dead_letters".into(), of(dlq)));
        out.push(("verify_score".into(), of(self.score(at).await)));
        (out, to.ok())
    }

    /// Conflicts and fence violations reported from `from` up to `to`.
    async fn reports(&self, from: &Baseline, to: &Baseline) -> Result<(u64, u64), String> {
        let topic = conflicts_topic(self.transforms.service());
        let reader = Reader::new(&self.config.kafka, "ficus-analysis", None).map_err(|e| e.to_string())?;
        let start = |_: &str, p: i32| {
            let at = from.conflicts.iter().find(|(q, _)| *q == p).map_or(0, |(_, o)| *o);
            ReadFrom::Offset(at)
        };
        let (mut conflicts, mut violations) = (0u64, 0u64);
        let never = CancellationToken::new();
        reader
            .read_to_end(&[topic], start, 500, false, &never, async |batch: Vec<crate::bus::Delivery>| {
                // Past `to` is the next measurement's.
                let end = |p: i32| to.conflicts.iter().find(|(q, _)| *q == p).map_or(0, |(_, o)| *o);
                for d in batch.into_iter().filter(|d| d.offset < end(d.partition)) {
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

    /// The verify score (%) of the buckets the service owns at `at` (none at 0%: 100, verify's
    /// score of nothing to compare, since going back to 0% is what a rollback is for).
    async fn score(&self, at: u8) -> Result<f64, String> {
        let opts = crate::verify::VerifyOptions {
            sample: 0,
            settle: Duration::from_secs(2),
            rechecks: 3,
            buckets: Some(0..at),
            quality: false,
            memory_entries: crate::verify::MEMORY_ENTRIES,
        };
        let report = crate::verify::verify(
            self.transforms,
            &self.definitions.topics,
            &self.clients.monolith(),
            &self.config.source.name,
            &self.clients.service(self.transforms.database()),
            &self.clients.store(),
            &opts,
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(report.consistency())
    }
}

/// One check's reading as the migration log and `GET /log` keep it.
pub(super) fn readings(tallies: &[Tally]) -> Vec<CheckReading> {
    tallies
        .iter()
        .map(|t| CheckReading {
            metric: t.check.name.clone(),
            value: match &t.last {
                Some((Reading::Value(v), _)) if !v.is_nan() => Some(*v),
                _ => None,
            },
            bounds: t.check.bounds(),
            result: t.last.as_ref().map_or(Outcome::Inconclusive, |(_, o)| *o).as_str().to_string(),
        })
        .collect()
}

/// A measurement as one line: each check's value, bounds and result.
pub(super) fn line(tallies: &[Tally]) -> String {
    let parts: Vec<String> = tallies
        .iter()
        .map(|t| match &t.last {
            Some((Reading::Value(v), o)) if !v.is_nan() => {
                format!("{} {v} ({}, {})", t.check.name, t.check.bounds(), o.as_str())
            }
            Some((Reading::Error(e), o)) => format!("{} {} ({e})", t.check.name, o.as_str()),
            Some((_, o)) => format!("{} {}", t.check.name, o.as_str()),
            None => t.check.name.clone(),
        })
        .collect();
    parts.join("; ")
}

/// What `ficus analyze --once` found.
#[derive(Debug)]
pub struct Analyzed {
    /// Pass, fail (a check out of its bounds), or inconclusive (no data, or a reading erred).
    pub outcome: Outcome,
    pub readings: Vec<CheckReading>,
    /// What the counts started from: the run before this one (`None`: this is the first, the
    /// counts start now).
    pub since: Option<bson::DateTime>,
}

/// `ficus analyze --service S --once`: every check measured once, counts since the previous
/// run (a plan under way counts from its step's start), logged like a plan's measurements.
pub async fn analyze_once(
    config: &Config,
    definitions: &Definitions,
    clients: &Clients,
    service: &str,
    progress: &(dyn Fn(Event<'_>) + Sync),
) -> Result<Analyzed, CutoverError> {
    let chosen = definitions.select(&[service.to_string()]).map_err(|e| CutoverError::BadInput(e.to_string()))?;
    let meter = Meter { config, definitions, clients, transforms: &chosen[0] };
    let store = clients.store();
    let plans = PlanStore::new(&store);
    let at = OwnershipStore::new(&store).get(service).await?.map_or(0, |o| o.percent);
    // A plan under way counts from its step's start; otherwise from the run before, or (the
    // first run) from now. Kafka not answering is an inconclusive measurement, never a failure
    // (nor a pass), and the next run counts from where this one could not.
    let from = match plans.get(service).await?.and_then(|p| p.baseline) {
        Some(step) => Ok(step),
        None => match plans.last_baseline(service).await? {
            Some(last) => Ok(last),
            None => meter.baseline().await,
        },
    };
    let since = from.as_ref().ok().map(|b| b.at);
    let mut analysis = Analysis::new(configured(&config.cutover.analysis));
    let (read, to) = match &from {
        Ok(b) => meter.read(b, at).await,
        Err(e) => {
            let checks = crate::config::ANALYSIS_CHECKS.iter();
            (checks.map(|c| (c.to_string(), Reading::Error(e.to_string()))).collect(), None)
        }
    };
    analysis.measure(&read);
    if let Some(b) = &to {
        plans.save_baseline(service, b).await?;
    }
    let outcome = one_shot(&analysis.tallies);
    let text = line(&analysis.tallies);
    progress(Event::Info(&format!("{service} at {at}%: {text}")));
    let entry = Entry { readings: readings(&analysis.tallies), ..Entry::now(service, Kind::Analysis, at, at, text) };
    if let Err(e) = MigrationLog::new(&store).append(&entry).await {
        progress(Event::Warning(&format!("the migration log did not take it: {}", crate::mongo::describe(&e))));
    }
    Ok(Analyzed { outcome, readings: entry.readings, since })
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
